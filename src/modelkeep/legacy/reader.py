"""The legacy reader's entry points: values, state dicts, weights sources and whole modules."""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Sequence

import torch

from modelkeep import conventions, errors
from modelkeep.legacy import loader, statedict, tensors, trusted
from modelkeep.legacy.policy import REFS, VALUES, Sighting
from modelkeep.options import DEFAULT_READ_OPTIONS, ReadOptions

MODULE_KEYS = conventions.MODEL_KEYS  # one list for every reader (modelkeep.conventions)


def _contents(
    path: str | os.PathLike[str], mode: str, options: ReadOptions, container: str | None = None,
    data: bytes | None = None,
) -> loader.Contents:
    return loader.read_contents(
        os.fspath(path), mode=mode, trust=trusted.Trust(options.trust), on_unknown=options.on_unknown,
        limits=options.limits, encoding=options.encoding, mmap=options.mmap, container=container,
        map_location=options.map_location, data=data,
    )


def read_object(
    path: str | os.PathLike[str],
    *,
    options: ReadOptions = DEFAULT_READ_OPTIONS,
    container: str | None = None,
    data: bytes | None = None,
) -> tuple[Any, int | None]:
    """:func:`read`, and where the object ends in a stream-format file whose bytes go on (several
    objects saved into one stream); None where the object is the whole file."""
    contents = _contents(path, VALUES, options, container, data)
    if contents.container == "torchscript":
        return {"data": contents.value, "constants": contents.constants}, None
    return contents.value, contents.end


def read(
    path: str | os.PathLike[str],
    *,
    options: ReadOptions = DEFAULT_READ_OPTIONS,
) -> Any:
    """What ``torch.load(path, weights_only=False)`` would return, built without running the file.

    Tensors, numpy data, plain containers and records are built; whole modules only of trusted
    classes (``torch.nn``, ``torchvision.models``, ``torchvision.ops`` and ``trust``). Any other
    global raises UnsafeContentError listing them all, or with ``on_unknown="placeholder"``
    becomes an inert ``Placeholder``. A TorchScript archive reads as
    ``{"data": <module record>, "constants": <tuple>}``.
    """
    return read_object(path, options=options)[0]


class LegacyWeights:
    """The state dict of a torch.save file as references: ``entries`` by name (each with
    ``shape``, ``dtype`` and ``torch_dtype``), the checkpoint key it came from, and readers."""

    def __init__(self, contents: loader.Contents, state: dict[str, Any], source_key: str | None) -> None:
        self.path = contents.path
        self.container = contents.container
        self.source_key = source_key
        self.end = contents.end  # where the object ends when more bytes follow it, else None
        top = contents.value
        outer = source_key.split(".")[0] if source_key else None
        self.left_out = (  # a checkpoint's other entries (optimizer state, epoch, args, ...)
            [str(k) for k in top if k != outer] if source_key is not None and isinstance(top, dict) else []
        )
        self._entries = state
        self._loader = contents.loader

    def entries(self) -> dict[str, Any]:
        return dict(self._entries)

    def tensors(self, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """Every tensor of the state dict; names that shared a storage in the file share it here."""
        return statedict.read_tensors(self._entries, self._loader, device)

    def read_into(self, pairs: Sequence[tuple[Any, torch.Tensor]], *, threads: int | None = None) -> int:
        """Fill destination tensors from ``(entry, destination)`` pairs; returns bytes read."""
        return statedict.read_into(self.path, pairs, self._loader, threads=threads)


def open_weights(
    path: str | os.PathLike[str],
    *,
    options: ReadOptions = DEFAULT_READ_OPTIONS,
    container: str | None = None,
    data: bytes | None = None,
) -> LegacyWeights:
    """Find the state dict of a torch.save file (directly saved, under a checkpoint key such as
    ``state_dict``/``model``, inside a whole pickled module, or a TorchScript module's parameters
    and buffers) without building anything or importing any class."""
    contents = _contents(path, REFS, options, container, data)
    try:
        state, key = statedict.find(contents)
    except errors.ModelkeepError:
        raise
    except ValueError as e:
        raise errors.FormatError(str(e), path=contents.path, fix="the file is crafted or damaged") from e
    return LegacyWeights(contents, state, key)


def read_state_dict(
    path: str | os.PathLike[str],
    *,
    options: ReadOptions = DEFAULT_READ_OPTIONS,
    device: torch.device | str = "cpu",
) -> dict[str, torch.Tensor]:
    """``{name: tensor}`` of a torch.save file's state dict (see ``open_weights``)."""
    return open_weights(path, options=options).tensors(device)


def read_module(
    path: str | os.PathLike[str],
    *,
    options: ReadOptions = DEFAULT_READ_OPTIONS,
    container: str | None = None,
    data: bytes | None = None,
) -> torch.nn.Module:
    """The whole ``nn.Module`` pickled in a torch.save file (``torch.save(model, path)``), rebuilt
    from trusted classes only and left in the training mode it was saved in. A checkpoint that
    holds the module under one of ``conventions.MODEL_KEYS`` (``model``, ``module``, ``net``,
    ``ema``, ...) works too."""
    value, _ = read_object(path, options=dataclasses.replace(options, on_unknown="error"), container=container,
                           data=data)
    if isinstance(value, torch.nn.Module):
        return value
    if isinstance(value, dict):
        for key in MODULE_KEYS:
            if isinstance(value.get(key), torch.nn.Module):
                return value[key]
    raise errors.ArchitectureError(
        f"holds a {type(value).__name__}, not a whole pickled module",
        path=os.fspath(path),
        fix="for a state dict, build the model and use modelkeep.load_weights(model, path)",
    )


@dataclasses.dataclass
class Description:
    """What a torch.save file holds, found without building anything: its container, every
    tensor by its path in the saved structure (``model_state_dict.fc.weight``), the globals its
    pickles name, and, for a zip archive, each stored blob with its CRC-32."""

    container: str
    tensors: list[tuple[str, tensors.TensorRef]]
    globals: list[str]
    blobs: list[tensors.Blob]


def describe(
    path: str | os.PathLike[str], *, options: ReadOptions = DEFAULT_READ_OPTIONS, container: str | None = None,
    data: bytes | None = None,
) -> Description:
    """:class:`Description` of a torch.save file (unknown globals are described, not refused)."""
    sightings: list[Sighting] = []
    contents = loader.read_contents(
        os.fspath(path), mode=REFS, trust=trusted.Trust(options.trust), on_unknown="placeholder",
        limits=options.limits, encoding=options.encoding, sightings=sightings, container=container, data=data,
    )
    found: list[tuple[str, tensors.TensorRef]] = []
    seen: set[int] = set()

    def walk(value: Any, prefix: str, depth: int) -> None:
        if depth > 64 or id(value) in seen:
            return
        if isinstance(value, tensors.TensorRef):
            found.append((prefix or "(tensor)", value))
            return
        seen.add(id(value))
        if isinstance(value, dict):
            items = [(str(k), v) for k, v in value.items()]
        elif isinstance(value, (list, tuple)):
            items = [(str(i), v) for i, v in enumerate(value)]
        else:
            state = getattr(value, "state", None) if type(value).__name__ == "Placeholder" else None
            items = [(str(k), v) for k, v in state.items()] if isinstance(state, dict) else []
        for key, item in items:
            walk(item, f"{prefix}.{key}" if prefix else key, depth + 1)

    walk(contents.value, "", 0)
    blobs = {id(ref.storage.blob): ref.storage.blob for _, ref in found}
    return Description(
        container=contents.container,
        tensors=found,
        globals=sorted({f"{s.module}.{s.name}" for s in sightings if s.meaning != "trailing"}),
        blobs=list(blobs.values()),
    )
