"""Tensors' own memory as buffers, and memory for tensors about to be filled.

Every byte modelkeep reads lands in, and every byte it writes leaves from, the tensor's own
memory: these helpers give that memory as a buffer without a copy, as cheaply as Python allows
(with 20,000 small tensors a microsecond per tensor counts).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import gc
import mmap
import os
from typing import Any, Iterator, Sequence

import numpy as np
import torch

IOV_MAX = 1024  # Linux's limit on buffers per preadv/writev call
HUGE_PAGE_MIN_BYTES = 4 * 1024 * 1024  # CPU tensors from this size get a huge-page mapping
HUGE_PAGES_VARIABLE = "MODELKEEP_HUGE_PAGES"  # "1" or "0" forces the choice ``huge_pages`` makes
VIRTIO_DEVICES = "/sys/bus/virtio/devices"
VIRTIO_BALLOON = "0x0005"  # the virtio device id of a memory balloon


@functools.lru_cache(maxsize=1)
def _memory_is_ballooned() -> bool:
    """Whether a virtio memory balloon is attached (cloud VMs, Firecracker microVMs)."""
    try:
        devices = os.listdir(VIRTIO_DEVICES)
    except OSError:
        return False
    for device in devices:
        with contextlib.suppress(OSError):
            with open(os.path.join(VIRTIO_DEVICES, device, "device")) as stream:
                if stream.read().strip() == VIRTIO_BALLOON:
                    return True
    return False


def huge_pages() -> bool:
    """Whether large fresh CPU tensors get transparent huge pages.

    Yes on a machine whose memory is its own: one fault per 2 MB instead of per 4 KB cut the first
    touch of fresh memory about five times. No under a virtio memory balloon: free page reporting
    hands free blocks of 2 MB and more back to the host, so each huge page touched again is a
    host fault too. Measured on such a VM (Firecracker, 2 cores, 553 MB of fresh memory touched
    in a new process a second after the last run freed it; 4 rounds): 0.78-1.34 s with huge
    pages against 0.24-0.31 s with 4 KB pages, and ``modelkeep.load`` of a whole vgg16 in a fresh
    process 0.63-0.97 s against 0.19-0.25 s (``torch.load``: 0.31-0.50 s). ``MODELKEEP_HUGE_PAGES``
    = ``1``/``0`` overrides the detection.
    """
    forced = os.environ.get(HUGE_PAGES_VARIABLE)
    if forced in ("0", "1"):
        return forced == "1"
    return hasattr(mmap, "MADV_HUGEPAGE") and not _memory_is_ballooned()


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector for a burst of allocations.

    Parsing a 20,000-tensor header and planning its reads allocate ~10^5 objects; with a large
    model alive, each generation-2 collection that this triggers walks every object of the
    process. Pausing made the many-small-tensors load several times faster (parsing the header:
    ~250 ms, ~90 ms with it paused).
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """A writable byte view of a contiguous CPU tensor's memory (no copy, any dtype).

    Args:
        tensor: a contiguous CPU tensor.

    Returns:
        A flat ``B`` memoryview of ``numel * element_size`` bytes (empty for an empty tensor).
    """
    if tensor.numel() == 0:
        return memoryview(bytearray(0))
    if tensor.is_contiguous():
        with contextlib.suppress(TypeError, RuntimeError):
            return memoryview(tensor.detach().reshape(-1).view(torch.uint8).numpy())
    nbytes = tensor.numel() * tensor.element_size()
    array = (ctypes.c_char * nbytes).from_address(tensor.data_ptr())
    return memoryview(array).cast("B")


def direct_buffer(tensor: torch.Tensor) -> Any:
    """A writable buffer over a contiguous CPU tensor's own memory, as cheaply as Python allows.

    ``Tensor.numpy()`` costs about a microsecond (a ctypes view cost tens: a new ctypes type per
    size); the uint8 fallback (dtypes numpy lacks) three. With 20,000 small tensors this is a
    cost that counts, so the reader threads pay it, each while the other thread's read is in the
    kernel.

    Args:
        tensor: a contiguous CPU tensor.

    Returns:
        A numpy array sharing the tensor's memory.
    """
    if tensor.requires_grad:
        tensor = tensor.detach()
    try:
        return tensor.numpy()
    except TypeError:
        return tensor.reshape(-1).view(torch.uint8).numpy()


def byte_view(buffer: Any) -> Any:
    """The same memory as a flat uint8 numpy array, so it can be cut at any byte."""
    if isinstance(buffer, np.ndarray):
        return buffer.reshape(-1).view(np.uint8)
    return np.frombuffer(buffer, dtype=np.uint8)  # writable when the buffer is


def advance(buffers: list[Any], count: int) -> list[Any]:
    """What remains of ``buffers`` (which tile a range) once ``count`` bytes of it are done."""
    rest = []
    for buffer in buffers:
        flat = np.frombuffer(buffer, dtype=np.uint8)  # writable, since the buffer is
        if rest or count < flat.nbytes:
            rest.append(flat[count:])
            count = 0
        else:
            count -= flat.nbytes
    return rest


def cpu_contiguous(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's values as a C-ordered CPU tensor, copying only when it must.

    Args:
        tensor: any strided tensor (another device, non-contiguous, a lazy conj/neg view).

    Returns:
        A contiguous CPU tensor holding the same values (``tensor`` itself when it already is).
    """
    tensor = tensor.detach()
    if tensor.device.type != "cpu":
        tensor = tensor.to("cpu")
    if tensor.is_conj():  # lazy conjugate/negative views: the memory holds the other values
        tensor = tensor.resolve_conj()
    if tensor.is_neg():
        tensor = tensor.resolve_neg()
    if not tensor.is_contiguous():
        tensor = tensor.contiguous()
    return tensor


def cpu_bytes(tensor: torch.Tensor) -> tuple[Any, int]:
    """A buffer over the tensor's values in C order on the CPU, and its size; copies only a
    tensor that is not already such memory (another device, non-contiguous, a lazy view)."""
    if not (tensor.is_cpu and tensor.is_contiguous() and not tensor.is_conj() and not tensor.is_neg()):
        tensor = cpu_contiguous(tensor)
    nbytes = tensor.numel() * tensor.element_size()
    return (direct_buffer(tensor) if nbytes else b""), nbytes


def allocate(
    shape: Sequence[int],
    dtype: torch.dtype,
    *,
    stride: Sequence[int] | None = None,
    device: torch.device | str = "cpu",
    pin: bool = False,
) -> torch.Tensor:
    """Uninitialised memory for a tensor that is about to be filled from a file.

    The first touch of fresh memory, not the copy, dominates loading into new tensors (4 KB page
    faults: about 2-3 GB/s against 12+ GB/s for the copy). Where ``huge_pages()`` says so, large
    CPU tensors therefore get their own anonymous mapping advised for transparent huge pages,
    which cuts that cost about five times; the mapping is page aligned, so kernels see the same
    alignment as torch's allocator gives and produce bit-identical results. Everything else, and
    everything under a memory balloon, comes from torch's allocator.

    Args:
        shape: the tensor's shape.
        dtype: its dtype.
        stride: its strides (default C order).
        device: where it lives; only CPU tensors get huge pages.
        pin: pinned host memory (for a later copy to CUDA), from torch.

    Returns:
        An uninitialised tensor.
    """
    shape = tuple(shape)
    count = 1
    for dim in shape:
        count *= dim
    nbytes = count * dtype.itemsize
    device = torch.device(device)
    if stride is None:
        stride = torch.empty(shape, device="meta").stride() if shape else ()
    span = 1 + sum((size - 1) * step for size, step in zip(shape, stride)) if count else 0
    if device.type != "cpu" or pin or nbytes < HUGE_PAGE_MIN_BYTES or not huge_pages():
        return torch.empty_strided(shape, tuple(stride), dtype=dtype, device=device, pin_memory=pin)
    region = mmap.mmap(-1, span * dtype.itemsize, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    with contextlib.suppress(OSError):
        region.madvise(mmap.MADV_HUGEPAGE)
    flat = torch.frombuffer(region, dtype=torch.uint8).view(dtype)
    return flat.as_strided(shape, tuple(stride))
