"""Reading any supported file, from any storage: the one file-kind dispatch of modelkeep.

``open_source`` is the only place that asks "what kind of file is this?" and branches; every
operation above it (``load_weights``, ``load_state_dict``, ``convert``, ``diff``, ``predict``,
``create(weights=...)``) gets a :class:`~modelkeep.sources.base.TensorSource` and branches on
nothing. ``read`` is the safe ``torch.load``: the data of any file, with nothing from it run.

=====================  ==================================================================
what the location is   source
=====================  ==================================================================
safetensors/modelkeep  :class:`~modelkeep.sources.safetensors.SafetensorsSource`
modelkeep checkpoint   :class:`~modelkeep.sources.checkpoint.CheckpointSource` (its model)
folder / index.json    :class:`~modelkeep.sources.sharded.ShardedSource` (or its one file)
torch.save file        :class:`~modelkeep.sources.torchsave.TorchSaveSource` (``legacy/``)
=====================  ==================================================================
"""

from __future__ import annotations

import os
from typing import Any, Iterable, Mapping

from modelkeep import errors, format, sniff, storage
from modelkeep.options import DEFAULT_READ_OPTIONS, Limits, ReadOptions, read_options
from modelkeep.sources import checkpoint, sharded, torchsave
from modelkeep.sources.base import TensorSource
from modelkeep.sources.safetensors import SafetensorsSource

Location = str | os.PathLike[str]


def open_source(
    location: Location,
    options: ReadOptions = DEFAULT_READ_OPTIONS,
    *,
    storage_options: Mapping[str, Any] | None = None,
) -> TensorSource:
    """The named tensors of any supported file or sharded folder, on any storage.

    Args:
        location: a path or fsspec URL of a file, a model folder or a shard index.
        options: how torch.save files may be read (built by ``options.read_options``).
        storage_options: for the fsspec file system of a URL.

    Returns:
        A tensor source: ``entries()`` to plan, ``read_into``/``tensors`` to read.

    Raises:
        StorageError: the location cannot be read.
        FormatError: the file is not valid (UnsafeContentError: it names untrusted code).
    """
    store, path = storage.resolve(location, storage_options)
    return open_in(store, path, options)


def open_in(store: storage.Storage, path: str, options: ReadOptions = DEFAULT_READ_OPTIONS) -> TensorSource:
    """:func:`open_source` for a location already resolved to ``(store, path)``."""
    kind = sniff.sniff(path, store)
    if kind == "folder":
        found, inner = sharded.find_in_folder(store, path)
        if found == "single":
            return open_in(store, inner, options)
        kind, path = "index", inner
    if kind == "index":
        return sharded.ShardedSource(store, path, lambda shard: open_in(store, shard, options))
    if kind == "safetensors":
        header = store.read_header(path)
        if checkpoint.is_checkpoint(header):
            return checkpoint.CheckpointSource(store, path, header)
        return SafetensorsSource(store, path, header)
    return torchsave.open_weights(store, path, options)


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
    kind = sniff.sniff(path, store)
    if kind in ("folder", "index"):
        raise errors.FormatError(
            f"is a {'folder' if kind == 'folder' else 'shard index'}, not a safetensors/modelkeep file",
            path=path,
            fix="read it with modelkeep.load_state_dict() or modelkeep.read(), or name one file",
        )
    if kind != "safetensors":
        raise errors.FormatError(
            f"is a torch.save file ({kind}), not a safetensors/modelkeep file",
            path=path,
            fix="read it with modelkeep.read(), or rescue it with `modelkeep convert SRC DST`",
        )
    return store.read_header(path)


def read(
    location: Location,
    *,
    trust: Iterable[str] | str = (),
    on_unknown: str = "error",
    limits: Limits | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> Any:
    """The data of any supported file, built without running anything from it.

    * torch.save files (zip, stream, pre-1.0 tar, plain pickles): what ``torch.load`` would
      return (see ``modelkeep.legacy.read``).
    * TorchScript archives: ``{"data": <module record>, "constants": <tuple>}``.
    * modelkeep checkpoints: their nested state, every tensor checked against its digest.
    * safetensors/modelkeep files and sharded folders: the state dict.

    Args:
        location: a path or fsspec URL.
        trust: extra dotted namespaces or class names whose pickled objects may be rebuilt
            (``torch.nn``, ``torchvision.models`` and ``torchvision.ops`` always are).
        on_unknown: ``"error"`` refuses any other global (UnsafeContentError listing each with
            its byte position); ``"placeholder"`` keeps such objects as inert placeholders.
        limits: bounds on the work one file may cause (``modelkeep.options.Limits``).
        storage_options: for the fsspec file system of a URL.

    Returns:
        Nested dicts, lists, numbers, strings, tensors and numpy arrays.

    Raises:
        StorageError, FormatError, UnsafeContentError, IntegrityError: see ``open_source``.
        UnsupportedValueError: an argument is invalid.
    """
    options = read_options(trust, on_unknown, limits)
    store, path = storage.resolve(location, storage_options)
    kind = sniff.sniff(path, store)
    if kind in ("zip", "tar", "pickle"):
        return torchsave.read(store, path, options)
    if kind == "safetensors":
        header = store.read_header(path)
        if checkpoint.is_checkpoint(header):
            return checkpoint.read_checkpoint(store, path, header=header)[1]
        return SafetensorsSource(store, path, header).tensors()  # the header is read once
    return open_in(store, path, options).tensors()
