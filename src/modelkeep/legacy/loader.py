"""Reading a torch.save file end to end: container, pickles, storages, final checks.

``read_contents`` finds the layout (zip, TorchScript zip, stream, tar or a plain pickle), runs each
pickle through the machine under a ``Policy``, and either builds tensors (``values`` mode) or only
describes them (``refs`` mode). Every global the file names but modelkeep does not build is
collected first, so one ``UnsafeContentError`` lists them all with their byte positions.

Where a pickle must be a whole member (zip ``data.pkl``/``constants.pkl``, the tar ``pickle`` and
``sys_info`` members, a plain pickle file, a nested archive) bytes after its STOP opcode are
refused: such a file is a polyglot, one thing to this reader and another to whatever reads on.
The stream format's pickles follow one another by design, and are not checked that way.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from modelkeep import errors
from modelkeep import sniff as sniffing
from modelkeep.legacy import containers, graph, tarfmt, tensors, trusted, vm
from modelkeep.legacy.limits import DEFAULT_LIMITS, Limits
from modelkeep.legacy.persistent import StorageProvider
from modelkeep.legacy.policy import REFS, VALUES, Offence, Policy, Sighting

TRAILING = "trailing"  # a Sighting's meaning for bytes after a pickle that must fill its member


@dataclasses.dataclass
class Contents:
    """What a file holds: ``value`` as torch.load would return it (with tensors as ``TensorRef``
    in refs mode), its ``container`` kind, and TorchScript's constants and source text."""

    path: str
    value: Any
    container: str
    constants: Any = None
    script_code: dict[str, str] | None = None
    loader: tensors.StorageLoader | None = None
    end: int | None = None  # where the object ends in a stream-format file (None: the whole file)


def sniff(path: str) -> str | None:
    """``"zip"``, ``"tar"``, ``"pickle"`` or None from a file's first bytes."""
    kind = sniffing.kind_of_head(sniffing.read_head(path))
    return kind if kind in ("zip", "tar", "pickle") else None


class _Context:
    """Settings shared by every pickle of one read (and of archives nested inside it)."""

    def __init__(self, path: str, mode: str, trust: trusted.Trust, on_unknown: str, limits: Limits,
                 check_crc: bool, threads: int | None, sightings: list[Sighting] | None = None,
                 encoding: str = "utf-8", mmap: bool = False, map_location: Any = None,
                 data: bytes | None = None) -> None:
        self.path = path
        self.data = data  # the whole file when it is read from memory, not from ``path``
        self.encoding = encoding
        self.mode = mode
        self.trust = trust
        self.on_unknown = on_unknown
        self.limits = limits
        self.offences: list[Offence] = []
        self.sightings = sightings
        self.loader = tensors.StorageLoader(check_crc=check_crc, threads=threads, mmap=mmap,
                                            map_location=map_location)
        self.stream_end: int | None = None  # the top-level stream's end: bytes after it are not its

    def policy(self, mode: str, storages: StorageProvider | None, item: str, *, torchscript: bool = False,
               depth: int = 0) -> Policy:
        return Policy(
            mode=mode, trust=self.trust, on_unknown=self.on_unknown, limits=self.limits, path=self.path,
            item=item, storages=storages, loader=self.loader, torchscript=torchscript,
            offences=self.offences, depth=depth, nested=self._nested, sightings=self.sightings,
            encoding=self.encoding,
        )

    def run(self, data: Any, start: int, policy: Policy) -> tuple[Any, int]:
        machine = vm.Machine(data, policy, limits=self.limits, path=self.path, item=policy.item)
        policy.machine = machine
        try:
            result = machine.run(start)
        except errors.UnsafeContentError:
            raise
        except errors.ModelkeepError as e:
            if self.offences:
                raise unsafe_error(self.offences, self.path) from e
            raise
        if self.offences:
            raise unsafe_error(self.offences, self.path)
        return result

    def whole(self, end: int, size: int, item: str, after: str = "the pickle's STOP opcode") -> None:
        """Refuse ``size - end`` bytes after what must fill a member (``modelkeep scan`` gets a
        ``trailing`` sighting instead, and reads on)."""
        if end == size:
            return
        if end > size:
            raise errors.FormatError(f"{after} lies past the end of its member", path=self.path, item=item,
                                     fix="the file is damaged or crafted; re-download it")
        if self.sightings is not None:
            self.sightings.append(Sighting("<polyglot>", f"bytes after {after}", end, item, TRAILING))
            return
        raise errors.FormatError(
            f"{size - end} bytes after {after} (byte {end}): a polyglot file, which another reader "
            "may take for different content",
            path=self.path, item=item,
            fix="do not load this file; re-save it with torch.save, or re-download it from a trusted source",
        )

    def whole_pickle(self, data: bytes, item: str) -> None:
        """``whole`` for a member that is one pickle, found by decoding before anything is built
        (a pickle that does not decode is left to the machine, whose error names the place)."""
        try:
            end = vm.skip(data, 0, limits=self.limits)
        except errors.FormatError:
            return
        self.whole(end, len(data), item)

    def _nested(self, data: bytes, parent: Policy, pos: int) -> Any:
        """``torch.storage._load_from_bytes``: a stream-format file inside the pickle."""
        value, _, child = read_stream(self, data, memory=True, item=f"nested archive at pickle byte {pos}",
                                      mode=parent.mode, depth=parent.depth + 1)
        if isinstance(value, tensors.StorageRef):
            return value
        ref = child.storage_ref(value)  # ValueError unless the nested file holds one storage
        parent._storage_refs[id(value)] = (value, ref)
        return value


def _module_of(name: str) -> str:
    """``"mypkg.models"`` for ``"mypkg.models.Net"``: what ``trust=`` takes to rebuild it."""
    module = name.rpartition(".")[0]
    return module if module else name


def _unsafe_fix(names: list[str]) -> str:
    """What to do about refused globals: never suggest trusting one that runs code."""
    rescue = "do not torch.load this file unless you trust its source. To rescue its tensors pass on_unknown='placeholder'"
    dangerous = [name for name in names if trusted.is_dangerous(name)]
    if dangerous:
        return f"{rescue}; {dangerous[0]} runs code or touches the system: no trust= makes it safe"
    return f"{rescue}; to rebuild classes you trust pass trust=({_module_of(names[0])!r},)"


def unsafe_error(offences: list[Offence], path: str) -> errors.UnsafeContentError:
    grouped: dict[str, list[str]] = {}
    for offence in offences:
        where = f"{offence.item} byte {offence.position}" if offence.item else f"byte {offence.position}"
        grouped.setdefault(offence.name, []).append(where)
    listed = [f"{name} (at {', '.join(places[:5])}{', ...' if len(places) > 5 else ''})" for name, places in grouped.items()]
    return errors.UnsafeContentError(
        f"the pickle names {len(grouped)} global(s) that modelkeep does not build, because torch.load "
        f"would import and run them: {'; '.join(listed[:50])}" + (" ..." if len(listed) > 50 else ""),
        path=path,
        fix=_unsafe_fix(list(grouped)),
        globals=list(grouped.items()),
    )


def read_contents(
    path: str,
    *,
    mode: str = VALUES,
    trust: trusted.Trust | None = None,
    on_unknown: str = "error",
    limits: Limits = DEFAULT_LIMITS,
    check_crc: bool = True,
    threads: int | None = None,
    sightings: list[Sighting] | None = None,
    encoding: str = "utf-8",
    mmap: bool = False,
    container: str | None = None,
    map_location: Any = None,
    data: bytes | None = None,
) -> Contents:
    """Read the torch.save/torch.jit.save file at ``path`` without running anything from it.

    ``sightings``, when given, collects every global the pickles name (``modelkeep scan``).
    ``container`` (``"zip"``, ``"tar"``, ``"pickle"``) is the kind the read dispatch found
    (``modelkeep.reading.open_in``); direct callers may leave it out and it is found here.
    ``data`` holds the file's bytes when it comes from memory or a file object (``path`` then
    only names it in messages; ``container`` must be given).
    """
    path = os.fspath(path)
    try:
        return _read_contents(path, mode, trust, on_unknown, limits, check_crc, threads, sightings, encoding, mmap,
                              container, map_location, data)
    except errors.FormatError as e:
        if e.path is None:  # raised deep in the pickle machine, which knows no file
            e.path = path
            what = sniffing.looks_like(data[: sniffing.HEAD_BYTES] if data is not None else sniffing.read_head(path))
            if what is not None and not isinstance(e, errors.UnsafeContentError):
                e.what += f"; the file looks like {what}, not a torch.save file"
                e.fix = e.fix or "name a model file; re-download it if it should be one"
            e.args = (e._message(),)
        raise


def _read_contents(path: str, mode: str, trust: trusted.Trust | None, on_unknown: str, limits: Limits,
                   check_crc: bool, threads: int | None, sightings: list[Sighting] | None, encoding: str,
                   mmap: bool, container: str | None, map_location: Any = None,
                   data: bytes | None = None) -> Contents:
    ctx = _Context(path, mode, trust or trusted.Trust(), on_unknown, limits, check_crc, threads, sightings,
                   encoding=encoding, mmap=mmap, map_location=map_location, data=data)
    kind = container if container is not None else sniff(path)
    if kind == "zip":
        contents = _read_zip(ctx)
    elif kind == "tar":
        contents = Contents(ctx.path, tarfmt.read_value(ctx), "tar")
    elif kind == "pickle":
        contents = _read_pickle_file(ctx)
    else:
        raise errors.FormatError(
            "is not a torch.save file (zip, stream or tar) nor a safetensors file",
            path=path,
            fix="check that the file is a model file and was fully downloaded",
        )
    graph.check(contents.value, limits=limits, path=path, item=None)
    if contents.constants is not None:
        graph.check(contents.constants, limits=limits, path=path, item="constants.pkl")
    contents.loader = ctx.loader
    return contents


def _read_zip(ctx: _Context) -> Contents:
    archive = containers.TorchZip(ctx.path, ctx.limits, data=ctx.data)
    item = f"{archive.folder}/data.pkl"
    data = archive.pickle("data.pkl")
    storages = archive.storages("data")
    policy = ctx.policy(REFS, storages, item, torchscript=archive.torchscript)
    value, end = ctx.run(data, 0, policy)  # describe first: offences before building or importing
    ctx.whole(end, len(data), item)
    graph.check(value, limits=ctx.limits, path=ctx.path, item=item)
    if ctx.mode == VALUES:
        ctx.loader.preload(list(storages.blobs.values()))
        policy = ctx.policy(VALUES, storages, item, torchscript=archive.torchscript)
        value, _ = ctx.run(data, 0, policy)
    if not archive.torchscript:
        return Contents(ctx.path, value, "zip")
    constants: Any = ()
    if f"{archive.folder}/constants.pkl" in archive.archive.entries:
        item = f"{archive.folder}/constants.pkl"
        policy = ctx.policy(ctx.mode, archive.storages("constants"), item, torchscript=True)
        data = archive.pickle("constants.pkl")
        ctx.whole_pickle(data, item)
        constants, _ = ctx.run(data, 0, policy)
    return Contents(ctx.path, value, "torchscript", constants=constants, script_code=archive.script_code())


def _read_pickle_file(ctx: _Context) -> Contents:
    with containers.file_bytes(ctx.path, ctx.data) as data:
        if not len(data):
            raise errors.FormatError("the file is empty", path=ctx.path, fix="re-download it")
        value, container, _ = read_stream(ctx, data, memory=False, item=None, mode=ctx.mode, depth=0)
    return Contents(ctx.path, value, container, end=ctx.stream_end)


def read_stream(ctx: _Context, data: Any, *, memory: bool, item: str | None, mode: str,
                depth: int) -> tuple[Any, str, Policy]:
    """The stream format (or a plain pickle) in ``data``: value, container kind, last policy.
    ``memory``: a nested archive (exactly the bytes torch.save wrote). A file read from memory
    (``ctx.data``) keeps its storages as views of those bytes too, but bytes may follow it."""
    limits = ctx.limits
    first_end = vm.skip(data, 0, limits=limits)
    if not containers.is_magic(data[:first_end]):  # a plain pickle (pickle.dump of tensors, ...)
        if first_end > limits.max_pickle_bytes:
            raise errors.FormatError("the pickle is larger than the limit", path=ctx.path, fix="raise Limits.max_pickle_bytes")
        policy = ctx.policy(REFS, None, item or "pickle", depth=depth)
        value, end = ctx.run(data, 0, policy)  # describe first: offences before building or importing
        ctx.whole(end, len(data), policy.item)
        graph.check(value, limits=limits, path=ctx.path, item=policy.item)
        if mode == VALUES:
            policy = ctx.policy(VALUES, None, item or "pickle", depth=depth)
            value, _ = ctx.run(data, 0, policy)
        return value, "pickle", policy
    version, pos = ctx.run(data, first_end, ctx.policy(REFS, None, "protocol version", depth=depth))
    if version != containers.PROTOCOL_VERSION:
        raise errors.FormatError(f"unsupported legacy protocol version {version!r}", path=ctx.path,
                                 item=item, fix="re-save the file with a current torch")
    sys_info, main_start = ctx.run(data, pos, ctx.policy(REFS, None, "system info", depth=depth))
    containers.check_sys_info(sys_info, ctx.path, "system info")
    main_end = vm.skip(data, main_start, limits=limits)
    if main_end - main_start > limits.max_pickle_bytes:
        raise errors.FormatError("the pickle is larger than the limit", path=ctx.path, fix="raise Limits.max_pickle_bytes")
    keys, storage_start = ctx.run(data, main_end, ctx.policy(REFS, None, "storage keys", depth=depth))
    storages = containers.StreamStorages(ctx.path, data if not memory else bytes(data),
                                         memory or ctx.data is not None)
    main_item = item or "main pickle"
    policy = ctx.policy(REFS, storages, main_item, depth=depth)
    value, end = ctx.run(data, main_start, policy)
    if end != main_end:
        raise errors.FormatError("the main pickle's end is ambiguous (a parser differential)", path=ctx.path,
                                 item=main_item, fix="the file is crafted; do not load it")
    graph.check(value, limits=limits, path=ctx.path, item=main_item)
    storages_end = storages.layout(keys, storage_start)
    if memory:  # a nested archive is exactly the bytes torch.save wrote
        ctx.whole(storages_end, len(data), main_item, "the nested archive's last storage")
    elif depth == 0:  # a top-level stream may be followed by more objects (torch.save into one file)
        ctx.stream_end = storages_end
    if mode == VALUES:
        ctx.loader.preload(list(storages.blobs.values()))
        policy = ctx.policy(VALUES, storages, main_item, depth=depth)
        value, _ = ctx.run(data, main_start, policy)
    return value, "stream", policy
