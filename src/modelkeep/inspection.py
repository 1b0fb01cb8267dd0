"""Reports about files that never build anything from them: inspect and verify.

``inspect`` reads the header only; ``verify`` re-reads every tensor's bytes and compares them with
the digests recorded when the file was written.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Mapping

from modelkeep import format, hashing, reading, storage
from modelkeep.checkpoint import files as checkpoint_files
from modelkeep.sources import ranges


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int


@dataclasses.dataclass(frozen=True)
class FileInfo:
    """What a file holds, from its header alone."""

    path: str
    file_size: int
    kind: str
    format_version: str | None
    tensors: list[TensorInfo]
    aliases: dict[str, str]
    hash_algorithm: str | None
    hashed_tensors: int
    metadata: dict[str, str]  # the user's own keys
    modelkeep: dict[str, Any]  # decoded modelkeep.* keys (hashes summarised, not listed)
    state: Any = None  # a checkpoint's nested state, tensors shown as "tensor F32[8, 4]"
    globals: list[str] | None = None  # a torch.save file's pickle globals (never imported or run)

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def total_elements(self) -> int:
        total = 0
        for t in self.tensors:
            count = 1
            for dim in t.shape:
                count *= dim
            total += count
        return total

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "file_size": self.file_size,
            "kind": self.kind,
            "format_version": self.format_version,
            "tensor_count": len(self.tensors),
            "total_bytes": self.total_bytes,
            "total_elements": self.total_elements,
            "tensors": [
                {"name": t.name, "dtype": t.dtype, "shape": list(t.shape), "nbytes": t.nbytes}
                for t in self.tensors
            ],
            "aliases": self.aliases,
            "hashes": {"algorithm": self.hash_algorithm, "count": self.hashed_tensors},
            "metadata": self.metadata,
            "modelkeep": self.modelkeep,
            **({"state": self.state} if self.state is not None else {}),
            **({"globals": self.globals} if self.globals is not None else {}),
        }


def _hash_record(header: format.Header) -> tuple[str | None, dict[str, str]]:
    record = hashing.read_record(header, require_known=False)  # inspect reports any algorithm
    return (None, {}) if record is None else (record.algorithm, dict(record.tensors))


def inspect(path: str | os.PathLike[str], *, storage_options: Mapping[str, Any] | None = None) -> FileInfo:
    """Describe a model file without building anything from it: a modelkeep or safetensors file
    from its header alone; a torch.save file (zip, stream, tar) from its pickles read in
    describe-only mode: every tensor by its path in the saved structure, and the globals the
    pickles name (never imported or run).

    Args:
        path: a local path or an fsspec URL.
        storage_options: for the fsspec file system of a URL.

    Returns:
        A FileInfo: tensors, totals, aliases, digests, metadata, a checkpoint's nested state, a
        torch.save file's globals.

    Raises:
        FormatError: not a model file, or an invalid one.
        StorageError: the file cannot be read.
    """
    path = os.fspath(path)
    store, where = storage.resolve(path, storage_options)
    source = reading.open_file_in(store, where)
    header = source.metadata()
    if header is None:
        return _torch_save_info(path, store.size(where), source.describe())
    algorithm, digests = _hash_record(header)
    decoded = {
        key: header.modelkeep_value(key)
        for key in header.metadata
        if key.startswith(format.PREFIX) and key not in (format.KEY_HASHES, format.KEY_STATE)
    }
    return FileInfo(
        path=path,
        file_size=header.file_size,
        kind=header.kind,
        format_version=decoded.get(format.KEY_FORMAT),
        tensors=[TensorInfo(e.name, e.dtype, e.shape, e.nbytes) for e in header.entries.values()],
        aliases=header.aliases,
        hash_algorithm=algorithm,
        hashed_tensors=len(digests),
        metadata={k: v for k, v in header.metadata.items() if not k.startswith(format.PREFIX)},
        modelkeep=decoded,
        state=_checkpoint_state(header),
    )


def _torch_save_info(path: str, size: int, found: Any) -> FileInfo:
    """A FileInfo for a torch.save file (``legacy.Description``); zip archives carry CRC-32s."""
    zipped = found.container in ("zip", "torchscript")
    return FileInfo(
        path=path,
        file_size=size,
        kind=f"torch.save ({found.container})",
        format_version=None,
        tensors=[TensorInfo(name, ref.dtype, tuple(ref.shape), ref.nbytes) for name, ref in found.tensors],
        aliases={},
        hash_algorithm="crc32 (zip)" if zipped else None,
        hashed_tensors=len(found.tensors) if zipped else 0,
        metadata={},
        modelkeep={},
        globals=found.globals,
    )


def _checkpoint_state(header: format.Header) -> Any:
    if header.kind != "checkpoint":
        return None
    return checkpoint_files.describe_state(header)


@dataclasses.dataclass
class VerifyReport:
    """Result of recomputing every digest: ``ok`` when all recorded digests match."""

    path: str
    algorithm: str | None
    checked: list[str] = dataclasses.field(default_factory=list)
    mismatched: list[str] = dataclasses.field(default_factory=list)
    unhashed: list[str] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.algorithm is not None and not self.mismatched and not self.unhashed


def verify(
    path: str | os.PathLike[str],
    *,
    progress: Callable[[int], None] | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> VerifyReport:
    """Recompute each tensor's digest and compare it with the one recorded at save time.

    Args:
        path: a local path or an fsspec URL.
        progress: called with byte counts as tensors are checked.
        storage_options: for the fsspec file system of a URL.

    Returns:
        A VerifyReport; ``ok`` when every tensor has a digest and all match.

    A torch.save zip archive is checked against the CRC-32 of each stored entry; stream and tar
    files carry no checksums, so their tensors are reported unhashed.

    Raises:
        FormatError: not a model file, a malformed hash record, or an unknown hash algorithm.
        StorageError: the file cannot be read.
    """
    path = os.fspath(path)
    store, where = storage.resolve(path, storage_options)
    source = reading.open_file_in(store, where)
    header = source.metadata()
    if header is None:
        return _verify_torch_save(path, source)
    algorithm, digests = _hash_record(header)
    report = VerifyReport(path=path, algorithm=algorithm)
    if algorithm is None:
        report.unhashed = list(header.entries)
        return report
    hashing.read_record(header)  # refuses an algorithm this modelkeep cannot recompute
    hashed = [entry for entry in header.entries.values() if entry.name in digests]
    actual = ranges.digests_of(store, where, hashed, progress=progress)
    for name in header.entries:
        if name not in digests:
            report.unhashed.append(name)
        elif actual[name] == digests[name]:
            report.checked.append(name)
        else:
            report.mismatched.append(name)
    return report


def _verify_torch_save(path: str, source: Any) -> VerifyReport:
    """Each tensor of a torch.save file checked by its zip entry's CRC-32 (none in other kinds)."""
    found = source.describe()
    if found.container not in ("zip", "torchscript"):
        return VerifyReport(path=path, algorithm=None, unhashed=[name for name, _ in found.tensors])
    bad = set(source.check_crcs(found.blobs))
    report = VerifyReport(path=path, algorithm="crc32 (zip)")
    for name, ref in found.tensors:
        (report.mismatched if ref.storage.blob.name in bad else report.checked).append(name)
    return report
