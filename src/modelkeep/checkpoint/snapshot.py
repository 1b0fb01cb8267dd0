"""Snapshots: the state of one save, copied off the training tensors into reusable buffers.

An asynchronous save may only return once training can change its tensors without changing the
checkpoint. Two ways get there:

* **copy**: every tensor is copied before ``save`` returns (CUDA tensors into pinned memory with
  asynchronous device-to-host copies, ordered before any later kernel on the stream).
* **overlap** (the default): parameters and optimizer state change only inside
  ``optimizer.step()``, so their copy runs in the background while the next forward and
  backward pass compute, and a step pre-hook on the optimizer holds the next ``step()`` until the
  copy is done. Everything else (buffers such as BatchNorm statistics, RNG states, user
  tensors) is copied before ``save`` returns. Each deferred tensor's version counter is
  compared before and after its copy; if anything changed it in place in between (outside
  ``optimizer.step()``), the save fails loudly instead of writing a mixed state.

Buffers are kept and reused, so after the first save a snapshot costs one memory copy and no
allocation.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from typing import Any, Iterable, Sequence

import torch

from modelkeep import errors

ALIGNMENT = 64  # every snapshot tensor starts on a cache line (and any dtype's alignment)
ViewKey = tuple[Any, ...]


def view_key(tensor: torch.Tensor) -> ViewKey:
    """Identity of a tensor's exact view of memory (state_dict() detaches, so ids differ)."""
    return (tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset(),
            tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype)


def guarded_views(optimizers: Iterable[Any]) -> set[ViewKey]:
    """Views that only ``optimizer.step()`` changes: parameters and optimizer state tensors."""
    keys: set[ViewKey] = set()
    for optimizer in optimizers:
        for group in getattr(optimizer, "param_groups", []):
            keys.update(view_key(p) for p in group.get("params", []) if isinstance(p, torch.Tensor))
        for state in getattr(optimizer, "state", {}).values():
            if isinstance(state, dict):
                keys.update(view_key(v) for v in state.values() if isinstance(v, torch.Tensor))
    return keys


def _version(tensor: torch.Tensor) -> int | None:
    try:
        return tensor._version
    except RuntimeError:  # inference tensors keep no version counter
        return None


@dataclasses.dataclass
class _Deferred:
    name: str
    view: torch.Tensor
    source: torch.Tensor
    version: int


@dataclasses.dataclass
class Snapshot:
    """Tensors that no longer alias training memory once ``ready()`` returns."""

    tensors: list[tuple[str, torch.Tensor]]
    buffer: torch.Tensor | None = None
    event: Any = None  # a CUDA event recorded after the device-to-host copies
    deferred: list[_Deferred] = dataclasses.field(default_factory=list)
    copied: threading.Event = dataclasses.field(default_factory=threading.Event)
    error: BaseException | None = None

    def copy_deferred(self) -> None:
        try:
            with torch.no_grad():
                for item in self.deferred:
                    item.view.copy_(item.source)
                    if item.source._version != item.version:
                        raise errors.UnsupportedValueError(
                            "was changed in place after save() and before the next "
                            "optimizer.step(), so the checkpoint would mix two training states; "
                            "it was not written",
                            item=item.name,
                            fix="change parameters and optimizer state only inside "
                            "optimizer.step(), call checkpointer.wait() before changing them, or "
                            "use Checkpointer(..., snapshot='copy')",
                        )
        except BaseException as e:
            self.error = e
        finally:
            self.deferred = []  # drop the references to the live tensors
            self.copied.set()

    def wait_copied(self) -> float:
        """Wait until the deferred copies are done; return the seconds waited."""
        if self.copied.is_set():
            return 0.0
        started = time.perf_counter()
        self.copied.wait()
        return time.perf_counter() - started

    def ready(self) -> None:
        """Wait until every byte is in the snapshot; raise if a deferred copy was torn."""
        self.copied.wait()
        if self.error is not None:
            raise self.error
        if self.event is not None:
            self.event.synchronize()


class SnapshotPool:
    """Reusable flat host buffers for snapshots (a new one only when the state has grown)."""

    def __init__(self) -> None:
        self._free: list[torch.Tensor] = []
        self._lock = threading.Lock()

    def _acquire(self, nbytes: int, pinned: bool) -> torch.Tensor:
        with self._lock:
            for index, buffer in enumerate(self._free):
                if buffer.numel() >= nbytes and buffer.is_pinned() == pinned:
                    return self._free.pop(index)
            self._free = [b for b in self._free if b.numel() > nbytes]  # drop ones too small
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned)

    def release(self, snapshot: Snapshot) -> None:
        if snapshot.buffer is not None:
            with self._lock:
                self._free.append(snapshot.buffer)
            snapshot.buffer = None
        snapshot.tensors = []

    def clear(self) -> None:
        with self._lock:
            self._free = []

    def take(self, tensors: Sequence[tuple[str, torch.Tensor]],
             defer: set[ViewKey] = frozenset()) -> Snapshot:  # type: ignore[assignment]
        """Views of one buffer holding ``tensors`` (same order). CPU tensors whose view is in
        ``defer`` are copied by a background thread; the rest before this returns."""
        offsets, total = [], 0
        for _, tensor in tensors:
            offsets.append(total)
            total += -(-tensor.numel() * tensor.element_size() // ALIGNMENT) * ALIGNMENT
        on_cuda = any(t.device.type == "cuda" for _, t in tensors) and torch.cuda.is_available()
        buffer = self._acquire(max(total, 1), pinned=on_cuda)
        out, deferred = [], []
        with torch.no_grad():
            for (name, tensor), offset in zip(tensors, offsets):
                nbytes = tensor.numel() * tensor.element_size()
                if nbytes == 0:
                    out.append((name, torch.empty(tensor.shape, dtype=tensor.dtype)))
                    continue
                view = buffer[offset : offset + nbytes].view(tensor.dtype).view(tensor.shape)
                out.append((name, view))
                version = _version(tensor) if tensor.device.type == "cpu" else None
                if version is not None and defer and view_key(tensor) in defer:
                    deferred.append(_Deferred(name, view, tensor.detach(), version))
                else:
                    view.copy_(tensor.detach(), non_blocking=tensor.device.type == "cuda")
        event = None
        if on_cuda:
            event = torch.cuda.Event()
            event.record()
        snapshot = Snapshot(out, buffer, event, deferred)
        if deferred:
            threading.Thread(target=snapshot.copy_deferred, name="modelkeep-snapshot",
                             daemon=True).start()
        else:
            snapshot.copied.set()
        return snapshot
