"""``map_location``, with ``torch.load``'s meaning, written once: where each storage read from a
file goes.

torch restores every storage with ``restore_location(storage, location)``, ``location`` being the
device the file recorded (``"cpu"``, ``"cuda:0"``); ``map_location`` chooses how:

=============================  ============================================================
``map_location``               where a storage saved at ``location`` goes
=============================  ============================================================
``None``                       ``location`` (modelkeep: the CPU when the machine lacks that
                               device, where torch raises)
``"cpu"``, ``"cuda:1"``,       that device
``"meta"``, a ``torch.device``
a dict                         ``map_location.get(location, location)``
a callable                     ``map_location(storage, location)`` (a storage on the CPU);
                               when it returns None, ``location``
=============================  ============================================================

torch.save files record each storage's ``location`` and the legacy reader restores storage by
storage with it (``legacy.tensors.StorageLoader.placed_bytes``); safetensors and modelkeep files
record none, so their tensors, read on the CPU, are moved with ``location="cpu"``.

Storages are moved, never tensors, so tensors that shared a storage in the file share one after
the move (torch's own guarantee). :func:`restore` moves one storage; :func:`move` moves every
tensor of a nested value, one storage at a time. Every reader that hands out tensors somewhere
other than where it read them (``device=`` of ``load_state_dict``, checkpoints, safetensors and
torch.save sources) moves them with :func:`move`: one behaviour for all.
"""

from __future__ import annotations

import collections
from typing import Any

import torch

from modelkeep import errors

MapLocation = Any  # None, str, torch.device, dict[str, str], or (storage, location) -> storage


def check(map_location: MapLocation) -> None:
    """InvalidArgumentError unless ``map_location`` is one of the forms torch.load takes."""
    if map_location is None or isinstance(map_location, (str, torch.device)) or callable(map_location):
        return
    if isinstance(map_location, dict) and all(
        isinstance(k, str) and isinstance(v, (str, torch.device)) for k, v in map_location.items()
    ):
        return
    raise errors.InvalidArgumentError(
        f"map_location must be None, a device name, a torch.device, a dict of device names or a "
        f"callable, not {type(map_location).__name__}",
        item="map_location",
        fix="pass map_location='cpu', torch.device('cuda:0'), {'cuda:1': 'cuda:0'} or a function",
    )


def _available(location: str) -> bool:
    try:
        device = torch.device(location)
    except (RuntimeError, ValueError):
        return False
    if device.type == "cuda":
        return torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count()
    if device.type == "mps":
        return torch.backends.mps.is_available()
    return device.type in ("cpu", "meta")


def _saved_or_cpu(location: str) -> str:
    """Where ``map_location=None`` puts a storage: its saved device, the CPU when it is absent."""
    return location if _available(location) else "cpu"


def _to(storage: torch.UntypedStorage, location: str, *, wait: bool = True) -> torch.UntypedStorage:
    """``storage`` on the device ``location`` names (torch's default restore). A copy from pinned
    host memory to a GPU is asynchronous; ``wait=False`` leaves the wait to the caller."""
    try:
        device = torch.device(location)
    except (RuntimeError, ValueError) as e:
        raise errors.InvalidArgumentError(
            f"{location!r} is not a device name", item="map_location", fix="use 'cpu', 'cuda:0', 'meta', ..."
        ) from e
    if device.type == storage.device.type and (device.index is None or device.index == storage.device.index):
        return storage
    if device.type == "meta":
        return torch.UntypedStorage(storage.nbytes(), device="meta")
    if not _available(str(device)):
        raise errors.InvalidArgumentError(
            f"the tensors would go to {device}, which this machine does not have",
            item="map_location",
            fix="pass map_location='cpu' (or a device this machine has)",
        )
    moved = torch.UntypedStorage(storage.nbytes(), device=device)
    pinned = device.type == "cuda" and storage.device.type == "cpu" and storage.is_pinned()
    moved.copy_(storage, non_blocking=pinned)  # pinned host memory: the copies overlap
    if pinned and wait:
        torch.cuda.synchronize(device)
    return moved


def restore(
    storage: torch.UntypedStorage, location: str, map_location: MapLocation, *, wait: bool = True
) -> torch.UntypedStorage:
    """Where one storage saved at ``location`` goes under ``map_location`` (see the table).

    Args:
        storage: the bytes as read, on the CPU.
        location: the device the file recorded for it.
        map_location: any form torch.load takes.

    Returns:
        The storage on its device (``storage`` itself when it stays on the CPU).

    Raises:
        InvalidArgumentError: a device this machine lacks was asked for, or a callable returned
            something that is not a storage.
    """
    if map_location is None:
        return _to(storage, _saved_or_cpu(location), wait=wait)
    if isinstance(map_location, dict):
        target = map_location.get(location, location)
        return _to(storage, str(target), wait=wait)
    if isinstance(map_location, (str, torch.device)):
        return _to(storage, str(map_location), wait=wait)
    result = map_location(storage, location)
    if result is None:
        return _to(storage, _saved_or_cpu(location), wait=wait)
    if isinstance(result, torch.storage.TypedStorage):
        result = result.untyped()
    if not isinstance(result, torch.UntypedStorage):
        raise errors.InvalidArgumentError(
            f"the map_location function returned {type(result).__name__}, not a storage",
            item="map_location",
            fix="return the storage it was given, storage.cuda(...), or None",
        )
    if result.nbytes() != storage.nbytes():
        raise errors.InvalidArgumentError(
            f"the map_location function returned a storage of {result.nbytes()} bytes for one of "
            f"{storage.nbytes()}", item="map_location", fix="return the storage itself or a copy of it",
        )
    return result


def _stays_on_cpu(map_location: MapLocation) -> bool:
    """Whether ``map_location`` leaves tensors read on the CPU where they are."""
    if map_location is None:
        return True
    if isinstance(map_location, (str, torch.device)):
        return torch.device(map_location).type == "cpu"
    return False


def move(value: Any, map_location: MapLocation) -> Any:
    """Every tensor in ``value`` (dicts, lists, tuples, modules' tensors stay where they are)
    moved under ``map_location``, each storage once, so that sharing is kept.

    Args:
        value: what a reader returned: tensors, read on the CPU, in nested dicts, lists and tuples.
        map_location: any form torch.load takes; None and the CPU keep the tensors where they are
            (nothing is walked: the readers' common case costs nothing).

    Returns:
        The value with its tensors moved (containers rebuilt; ``value`` itself when nothing moved).
    """
    if _stays_on_cpu(map_location):
        return value
    moved: dict[int, torch.UntypedStorage] = {}

    def tensor(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        key = storage.data_ptr() if storage.device.type != "meta" else id(storage)
        target = moved.get(key)
        if target is None:
            target = moved[key] = restore(storage, str(storage.device), map_location, wait=False)
        if target is storage:
            return t
        out = torch.empty((0,), dtype=t.dtype, device=target.device)
        out.set_(target, t.storage_offset(), t.shape, t.stride())
        if isinstance(t, torch.nn.Parameter):
            out = torch.nn.Parameter(out, requires_grad=t.requires_grad)
        else:
            out.requires_grad_(t.requires_grad)
        return out

    def walk(item: Any) -> Any:
        if isinstance(item, torch.Tensor) and item.layout == torch.strided:
            return tensor(item)
        if type(item) is dict:
            return {k: walk(v) for k, v in item.items()}
        if type(item) is collections.OrderedDict:
            return collections.OrderedDict((k, walk(v)) for k, v in item.items())
        if type(item) is list:
            return [walk(v) for v in item]
        if type(item) is tuple:
            return tuple(walk(v) for v in item)
        return item

    result = walk(value)
    if any(s.device.type == "cuda" for s in moved.values()):
        torch.cuda.synchronize()  # the asynchronous copies from pinned memory have landed
    return result
