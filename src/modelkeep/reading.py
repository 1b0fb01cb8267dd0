"""Reading any supported file, from any storage: the one file-kind dispatch of modelkeep.

``open_source`` (``open_in``) is the only place that asks "what kind of file is this?" and
branches (a test checks it); every operation above it (``read``, ``load``, ``load_weights``,
``load_state_dict``, ``inspect``, ``verify``, ``convert``, ``diff``, ``predict``,
``create(weights=...)``) gets a :class:`~modelkeep.sources.base.TensorSource` and branches on
nothing. ``read`` is the safe ``torch.load``, ``open_source(f).data()``: the data of any file,
with nothing from it run; it takes whatever ``torch.load`` takes (paths, URLs, bytes, file
objects) with torch's arguments.

=====================  ==================================================================
what the location is   source
=====================  ==================================================================
safetensors/modelkeep  :class:`~modelkeep.sources.safetensors.SafetensorsSource`
modelkeep checkpoint   :class:`~modelkeep.sources.checkpoint.CheckpointSource` (its model)
folder / index.json    :class:`~modelkeep.sources.sharded.ShardedSource` (or its one file)
torch.save file        :class:`~modelkeep.sources.torchsave.TorchSaveSource` (``legacy/``, lazy)
=====================  ==================================================================
"""

from __future__ import annotations

import os
from typing import Any, Iterable, Mapping

from modelkeep import errors, format, sniff, storage
from modelkeep.io import placement
from modelkeep.options import DEFAULT_READ_OPTIONS, Limits, ReadOptions, read_options, torch_safe_globals
from modelkeep.sources import checkpoint, sharded, torchsave
from modelkeep.sources.base import TensorSource
from modelkeep.sources.safetensors import SafetensorsSource
from modelkeep.storage import buffer

Location = str | os.PathLike[str]
Source = Any  # a Location, bytes-like, or a binary file object: what torch.load takes


def resolve(source: Source, storage_options: Mapping[str, Any] | None = None) -> tuple[storage.Storage, str]:
    """The storage and path of anything ``torch.load`` takes, or an fsspec URL.

    A path or URL resolves as every operation resolves it (``storage.resolve``). Bytes and binary
    file objects become a :class:`~modelkeep.storage.buffer.BufferStorage` read from the file
    object's position (``open_in`` cuts a safetensors file in a stream where it ends, so that
    what follows it is left for the next read).

    Raises:
        InvalidArgumentError: ``source`` is none of these (or a text-mode file object).
        StorageError: the location or stream cannot be read.
    """
    if buffer.is_buffer(source) or buffer.is_file_object(source):
        return buffer.from_object(source)
    if not isinstance(source, (str, os.PathLike)):
        raise errors.InvalidArgumentError(
            f"cannot read from a {type(source).__name__}", item="f",
            fix="pass a path, an fsspec URL, bytes, or a binary file object (open(path, 'rb'), io.BytesIO)",
        )
    return storage.resolve(source, storage_options)


def settle(source: TensorSource) -> None:
    """After a read from a file object: leave it right after the object the source read."""
    store = getattr(source, "store", None)
    if isinstance(store, buffer.BufferStorage):
        store.settle(getattr(source, "end", None))


def open_source(
    location: Source,
    options: ReadOptions = DEFAULT_READ_OPTIONS,
    *,
    storage_options: Mapping[str, Any] | None = None,
) -> TensorSource:
    """The named tensors of any supported file or sharded folder, on any storage.

    Args:
        location: a path or fsspec URL of a file, a model folder or a shard index; or bytes or a
            binary file object holding one file (left positioned right after it).
        options: how torch.save files may be read (built by ``options.read_options``).
        storage_options: for the fsspec file system of a URL.

    Returns:
        A tensor source: ``entries()`` to plan, ``read_into``/``tensors`` to read.

    Raises:
        StorageError: the location cannot be read.
        FormatError: the file is not valid (UnsafeContentError: it names untrusted code).
    """
    store, path = resolve(location, storage_options)
    source = open_in(store, path, options)
    if isinstance(store, buffer.BufferStorage):
        source.entries()  # finds where the object ends, so the file object can be left after it
        settle(source)
    return source


def open_in(store: storage.Storage, path: str, options: ReadOptions = DEFAULT_READ_OPTIONS) -> TensorSource:
    """:func:`open_source` for a location already resolved to ``(store, path)``: the only place
    that asks what kind of file this is (``tests/test_reading.py`` checks it)."""
    kind = sniff.sniff(path, store)
    if kind == "folder":
        found, inner = sharded.find_in_folder(store, path)
        if found == "single":
            return open_in(store, inner, options)
        kind, path = "index", inner
    if kind == "index":
        return sharded.ShardedSource(store, path, lambda shard: open_in(store, shard, options))
    if kind == "safetensors":
        if isinstance(store, buffer.BufferStorage):  # one object of a stream: the rest is the next one's
            end = buffer.safetensors_length(store.data)
            if end is not None and end < len(store.data):
                store = store.trimmed(end)
        header = store.read_header(path)
        if checkpoint.is_checkpoint(header):
            return checkpoint.CheckpointSource(store, path, header)
        return SafetensorsSource(store, path, header)
    return torchsave.TorchSaveSource(store, path, options, kind)


def open_file_in(store: storage.Storage, path: str, options: ReadOptions = DEFAULT_READ_OPTIONS) -> TensorSource:
    """:func:`open_in` for one file: a folder or a shard index is a FormatError saying so (what
    ``inspect``, ``verify`` and ``load`` report on is one file)."""
    source = open_in(store, path, options)
    if source.kind == "sharded" or store.isdir(path):
        raise errors.FormatError(
            "is a folder or a shard index, not one model file",
            path=path,
            fix="read it with modelkeep.load_state_dict() or modelkeep.read(), or name one file",
        )
    return source


def read_header(location: Location, *, storage_options: Mapping[str, Any] | None = None) -> format.Header:
    """The validated header of a safetensors/modelkeep file, or a FormatError saying what the
    file is instead (a folder, a shard index, a torch.save file).

    Raises:
        StorageError: the location cannot be read.
        FormatError: it is not a safetensors/modelkeep file, or its header is invalid.
    """
    store, path = storage.resolve(location, storage_options)
    return header_in(store, path)


def header_in(store: storage.Storage, path: str) -> format.Header:
    """:func:`read_header` for a resolved location."""
    source = open_file_in(store, path)
    header = source.metadata()
    if header is not None:
        return header
    if sniff.looks_like(sniff.read_head(path, store)) == "text":
        raise sniff.not_a_model_file(path, "text (or a pickle written as text)")
    raise errors.FormatError(
        f"is a torch.save file ({getattr(source, 'container', source.kind)}), not a safetensors/modelkeep file",
        path=path,
        fix="read it with modelkeep.read(), or rescue it with `modelkeep convert SRC DST`",
    )


def read(
    f: Source,
    map_location: placement.MapLocation = None,
    pickle_module: Any = None,
    *,
    weights_only: bool | None = None,
    mmap: bool | None = None,
    encoding: str = "utf-8",
    trust: Iterable[str] | str = (),
    on_unknown: str = "error",
    limits: Limits | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> Any:
    """The safe ``torch.load``: the data of any supported file, built without running anything
    from it. Takes what ``torch.load`` takes, with torch's meaning (see the README's "from
    torch.load" table).

    * torch.save files (zip, stream, pre-1.0 tar, plain pickles): what ``torch.load`` would
      return (see ``modelkeep.legacy.read``).
    * TorchScript archives: ``{"data": <module record>, "constants": <tuple>}``.
    * modelkeep checkpoints: their nested state, every tensor checked against its digest.
    * safetensors/modelkeep files and sharded folders: the state dict.

    Args:
        f: a path, an ``os.PathLike``, an fsspec URL, ``bytes``/``bytearray``/``memoryview``, or
            a binary file object (an open file at any position, ``io.BytesIO``, a zip member, a
            stream that cannot seek). A file object is left right after the object read, so
            objects saved one after another into one stream read one after another.
        map_location: as torch's: None, ``"cpu"``/``"cuda:0"``/``"meta"``, a ``torch.device``,
            a dict remapping locations, or ``(storage, location) -> storage``. Tensors that
            share a storage share one after the move (``modelkeep.io.placement``).
        pickle_module: accepted for torch.load's signature and ignored: modelkeep never uses
            Python's unpickler.
        weights_only: accepted and ignored: nothing in a file is ever run, whatever it says;
            classes beyond plain data are rebuilt only when trusted (``trust``, or torch's own
            ``add_safe_globals``/``safe_globals`` allowlist, which is honoured).
        mmap: as torch's: tensor data of a torch.save zip file on disk is a private mapping of
            the file, not a copy (other kinds read as usual).
        encoding: as pickle's, for Python 2 strings in old files: a codec (``"latin1"``,
            ``"ASCII"``) or ``"bytes"``; the default keeps non-UTF-8 strings as bytes.
        trust: extra dotted namespaces or class names whose pickled objects may be rebuilt
            (``torch.nn``, ``torchvision.models`` and ``torchvision.ops`` always are).
        on_unknown: ``"error"`` refuses any other global (UnsafeContentError listing each with
            its byte position); ``"placeholder"`` keeps such objects as inert placeholders.
        limits: bounds on the work one file may cause (``modelkeep.options.Limits``).
        storage_options: for the fsspec file system of a URL.

    Returns:
        Nested dicts, lists, numbers, strings, tensors and numpy arrays.

    Raises:
        MissingFileError: no such file (a ``FileNotFoundError``, as torch.load raises).
        UnsafeContentError: the file names untrusted code (a ``pickle.UnpicklingError``).
        StorageError, FormatError, IntegrityError: see ``open_source``.
        UnsupportedValueError, InvalidArgumentError: an argument is invalid.

    Example:
        >>> import io, torch
        >>> stream = io.BytesIO()
        >>> torch.save({"w": torch.ones(2)}, stream)
        >>> _ = stream.seek(0)
        >>> read(stream, map_location="cpu")
        {'w': tensor([1., 1.])}
    """
    del pickle_module, weights_only  # accepted for torch.load's signature; see the docstring
    placement.check(map_location)
    names = (trust,) if isinstance(trust, str) else tuple(trust)
    options = read_options(names + torch_safe_globals(), on_unknown, limits, encoding=encoding, mmap=bool(mmap),
                           map_location=map_location)
    store, path = resolve(f, storage_options)
    source = open_in(store, path, options)
    value = source.data()
    settle(source)
    if source.kind == "torch.save":
        return value  # placed storage by storage while it was built, with the recorded locations
    return placement.move(value, map_location)
