"""Scanning model files for code they would run, without running or importing anything.

Every pickle in a torch.save/TorchScript file is walked by modelkeep's own interpreter in
describe-only mode, so globals are found exactly as ``torch.load`` would meet them (also names
computed with STACK_GLOBAL and pickles nested inside pickles), and nothing is built or imported.
Each global is classified:

- ``safe``: modelkeep builds it as data (tensors, storages, containers, numpy arrays), or it is a
  class of a namespace modelkeep trusts by default (``torch.nn``, ``torchvision.models``), or a
  TorchScript class (its code is never run);
- ``needs-trust``: an unknown class or function; reading the file needs ``trust=`` for it;
- ``dangerous``: a known way to run code (``os.system``, ``builtins.eval``, ``subprocess``,
  attribute-chain gadgets, ``torch.load`` re-entry, names computed at load time, ...), and bytes
  hidden after a pickle that must fill its member (a polyglot: ``<bytes after ...>``).

Folders are scanned recursively and plain zip archives member by member, so ``modelkeep scan``
fits as a CI gate over a folder of downloaded models (exit 0 clean, 1 findings, 2 unreadable).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import zipfile
from typing import Any, Iterator

from modelkeep import errors, format, sniff, storage
from modelkeep.legacy.trusted import DANGEROUS_MODULES
from modelkeep.sources import sharded, torchsave

SAFE, NEEDS_TRUST, DANGEROUS = "safe", "needs-trust", "dangerous"
_SEVERITY = {SAFE: 0, NEEDS_TRUST: 1, DANGEROUS: 2}

# DANGEROUS_MODULES (legacy.trusted): modules (and their submodules) whose globals have no business
# in a model file and are known ways to run code, reach the network or the file system, or re-enter
# deserialisation.
DANGEROUS_NAMES = frozenset({("torch", "load"), ("torch", "compile"), ("torch", "_load_global_deps")})


@dataclasses.dataclass(frozen=True)
class GlobalFinding:
    """One global a file names, where, and what it means for safety."""

    name: str
    position: int
    item: str | None
    verdict: str


@dataclasses.dataclass
class FileScan:
    """The result for one file (or archive member, named ``archive.zip!member``)."""

    path: str
    container: str
    globals: list[GlobalFinding] = dataclasses.field(default_factory=list)
    error: str | None = None

    @property
    def verdict(self) -> str:
        """``safe``, ``needs-trust``, ``dangerous`` or ``unreadable``."""
        worst = max((_SEVERITY[g.verdict] for g in self.globals), default=0)
        if worst or self.error is None:
            return [SAFE, NEEDS_TRUST, DANGEROUS][worst]
        return "unreadable"

    @property
    def findings(self) -> list[GlobalFinding]:
        return [g for g in self.globals if g.verdict != SAFE]

    @property
    def next_step(self) -> str | None:
        """What to do about this file, in words (None for a safe one)."""
        verdict = self.verdict
        if verdict == SAFE:
            return None
        if verdict == "unreadable":
            return "the file could not be read as a model file; check that it is one and fully downloaded"
        names = sorted({g.name for g in self.findings})
        modules = sorted({name.rsplit(".", 1)[0] for name in names})
        rescue = f"modelkeep convert {self.path} OUT.safetensors --on-unknown placeholder"
        if verdict == NEEDS_TRUST:
            return (
                f"it names classes modelkeep does not build ({', '.join(names[:4])}): if you trust their "
                f"source, modelkeep.read(path, trust={tuple(modules[:4])!r}) rebuilds them without running "
                f"the file; to keep only the tensors: {rescue}"
            )
        return (
            "it names globals that run code when torch.load unpickles it: never load it with "
            f"weights_only=False; to keep only the tensors, nothing run: {rescue}"
        )

    def to_json(self) -> dict[str, Any]:
        distinct: dict[tuple[str, str], list[int]] = {}
        for finding in self.globals:
            distinct.setdefault((finding.name, finding.verdict), []).append(finding.position)
        return {
            "path": self.path,
            "container": self.container,
            "verdict": self.verdict,
            "error": self.error,
            "next_step": self.next_step,
            "globals": [
                {"name": name, "verdict": verdict, "positions": positions[:20], "count": len(positions)}
                for (name, verdict), positions in distinct.items()
            ],
        }


def classify(module: str, name: str, meaning: str) -> str:
    """The verdict for one sighting of the pickle interpreter (see ``legacy.policy.Sighting``)."""
    if meaning in ("builder", "trusted", "script"):
        return SAFE
    if meaning in ("computed", "extension"):
        return DANGEROUS  # names that only exist at load time hide what they call
    if meaning == "trailing":
        return DANGEROUS  # a polyglot: content hidden from this reader, there for another
    parts = module.split(".")
    prefixes = {".".join(parts[: i + 1]) for i in range(len(parts))}
    if prefixes & DANGEROUS_MODULES or (module, name) in DANGEROUS_NAMES:
        return DANGEROUS
    chain = name.split(".")
    if any(part.startswith("__") for part in chain):
        return DANGEROUS  # dunder access such as object.__reduce__ or a __subclasses__ chain
    if len(chain) > 1 and any(part in DANGEROUS_MODULES for part in chain[:-1]):
        return DANGEROUS  # an attribute chain through a re-exported module: trusted.os.system
    return NEEDS_TRUST


def scan_file(path: str) -> FileScan:
    """Scan one file of any supported container (or a sharded checkpoint's index)."""
    from modelkeep.legacy import loader, policy

    try:
        kind = sniff.sniff(path)
    except errors.ModelkeepError as e:
        return FileScan(path, "unknown", error=str(e))
    if kind == "index":  # shard names that leave the folder are refused by every reader
        try:
            sharded.index_weight_map(storage.LOCAL, path)
        except errors.ModelkeepError as e:
            return FileScan(path, "shard index", error=str(e))
        return FileScan(path, "shard index")
    if kind == "safetensors":
        return _scan_safetensors(path)
    if kind == "zip" and not _is_torch_zip(path):
        return FileScan(path, "zip archive", error=None)  # members are scanned by scan_paths
    sightings: list[policy.Sighting] = []
    result = FileScan(path, kind)
    try:
        contents = loader.read_contents(path, mode=policy.REFS, on_unknown="placeholder", sightings=sightings)
        result.container = contents.container
    except errors.ModelkeepError as e:
        result.error = str(e)
    result.globals = [
        GlobalFinding(_label(s.module, s.name, s.meaning), s.position, s.item, classify(s.module, s.name, s.meaning))
        for s in sightings
    ]
    return result


def _label(module: str, name: str, meaning: str) -> str:
    if meaning == "computed":
        return "<global with a name computed at load time>"
    if meaning == "trailing":
        return f"<{name}>"
    return f"{module}.{name}"


def _scan_safetensors(path: str) -> FileScan:
    result = FileScan(path, "safetensors")
    try:
        header = format.read_header_file(path)
        header.kind  # noqa: B018 - validates the modelkeep metadata that readers act on
        header.aliases  # noqa: B018
    except errors.ModelkeepError as e:
        result.error = str(e)
    return result


def _is_torch_zip(path: str) -> bool:
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.endswith("data.pkl") or name.endswith("constants.pkl") for name in archive.namelist())
    except (zipfile.BadZipFile, OSError, ValueError):
        return True  # let the torch reader say what is wrong with it


MAX_MEMBER_BYTES = 64 * 1024**3
MAX_ARCHIVE_DEPTH = 3


def _archive_members(path: str, depth: int) -> Iterator[FileScan]:
    """Scan each member of a plain zip archive (a bundle of model files) through a temp copy;
    an archive whose end records disagree with its directory (members other unzippers would see
    differently) is unreadable."""
    from modelkeep.legacy import zipend

    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        yield FileScan(path, "zip archive", error=f"unreadable archive: {e}")
        return
    try:
        with open(path, "rb") as raw:
            zipend.check_end_records(raw, path, len(archive.infolist()))
    except (errors.FormatError, OSError) as e:
        archive.close()
        yield FileScan(path, "zip archive", error=f"unreadable archive: {e}")
        return
    with archive, tempfile.TemporaryDirectory(prefix="modelkeep-scan-") as scratch:
        for info in archive.infolist():
            label = f"{path}!{info.filename}"
            if info.is_dir():
                continue
            if info.file_size > MAX_MEMBER_BYTES or (
                info.compress_size and info.file_size / info.compress_size > 1000
            ):
                yield FileScan(label, "zip member", error="member too large or too compressed (zip bomb?)")
                continue
            target = os.path.join(scratch, "member")
            try:
                with archive.open(info) as source, open(target, "wb") as sink:
                    shutil.copyfileobj(source, sink, 1024 * 1024)
            except (zipfile.BadZipFile, OSError, NotImplementedError, RuntimeError) as e:
                yield FileScan(label, "zip member", error=f"cannot extract: {e}")
                continue
            for found in _scan_one(target, depth + 1):
                found.path = label + found.path[len(target) :]
                yield found
            os.unlink(target)


def _scan_one(path: str, depth: int) -> Iterator[FileScan]:
    result = scan_file(path)
    if result.container == "zip archive" and result.error is None:
        if depth >= MAX_ARCHIVE_DEPTH:
            result.error = "archives nested too deeply"
            yield result
            return
        yield from _archive_members(path, depth)
        return
    yield result


def scan_paths(paths: list[str]) -> list[FileScan]:
    """Scan files, folders (recursively, symlinks not followed) and plain zip archives."""
    results: list[FileScan] = []
    for top in paths:
        if os.path.isdir(top):
            for folder, dirs, files in os.walk(top):
                dirs.sort()
                for name in sorted(files):
                    path = os.path.join(folder, name)
                    if os.path.islink(path) or not os.path.isfile(path) or not _looks_like_model(path):
                        continue
                    results.extend(_scan_one(path, 0))
        else:
            results.extend(_scan_one(top, 0))
    return results


MODEL_EXTENSIONS = frozenset(
    ".pt .pth .bin .ckpt .pkl .pickle .safetensors .mk .model .tar .zip .pt2 .jit .torchscript .joblib .dat".split()
)


def _looks_like_model(path: str) -> bool:
    """In folders: files with a model extension, or whose first bytes are a model format (a
    protocol 2+ pickle, a zip, a safetensors header); config and text files are skipped."""
    if os.path.splitext(path)[1].lower() in MODEL_EXTENSIONS or path.endswith(".index.json"):
        return True
    try:
        with open(path, "rb") as stream:
            head = stream.read(9)
    except OSError:
        return True  # reported as unreadable
    return head.startswith((b"PK\x03\x04", b"\x80")) or (len(head) == 9 and head[8:9] == b"{")


def _scan_url(store: storage.Storage, top: str) -> list[FileScan]:
    """Scan an object (or every object under a prefix) of a remote storage through a local copy
    of its bytes; results name the URLs."""
    if store.isdir(top):
        found: list[FileScan] = []
        for name in store.list_names(top):
            found.extend(_scan_url(store, store.join(top, name)))
        return found
    if not (os.path.splitext(top)[1].lower() in MODEL_EXTENSIONS or top.endswith(".index.json")):
        return []
    try:
        with torchsave.local_copy(store, top) as local:
            results = list(_scan_one(local, 0))
    except errors.ModelkeepError as e:
        return [FileScan(top, "unknown", error=str(e))]
    for result in results:  # the local copy's name is no use to the caller
        result.path = top + result.path[len(local):]
        if result.error is not None:
            result.error = result.error.replace(local, top)
    return results


def scan(
    path: str | os.PathLike[str] | list[str | os.PathLike[str]],
    *,
    storage_options: dict[str, Any] | None = None,
) -> list[FileScan]:
    """Scan files or folders for the code their pickles would run, without running anything.

    Args:
        path: a file or folder (folders recursively, plain zip archives member by member), a
            URL (objects under a URL prefix are scanned too), or a list of them.
        storage_options: for the fsspec file system of URLs.

    Returns:
        One FileScan per model file found: its globals with verdicts, or why it is unreadable.

    Raises:
        StorageError: a URL's scheme has no installed fsspec backend.
    """
    paths = [os.fspath(p) for p in path] if isinstance(path, list) else [os.fspath(path)]
    results: list[FileScan] = []
    for top in paths:
        if storage.is_url(top):
            store, where = storage.resolve(top, storage_options)
            results.extend(_scan_url(store, where))
        else:
            results.extend(scan_paths([top]))
    return results


def exit_code(results: list[FileScan]) -> int:
    """0 when every file is clean, 1 when any has findings, else 2 when any is unreadable."""
    if any(r.findings for r in results):
        return 1
    if any(r.error is not None for r in results):
        return 2
    return 0
