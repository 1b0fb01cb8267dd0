"""Header entries into tensors: the format-aware layer over ``reads``' byte ranges.

A destination that can take the file's bytes as they are (a contiguous CPU tensor of the entry's
dtype and shape) is filled directly by ``reads.read_ranges``; any other (another dtype or device,
non-contiguous, quantized) gets a staging buffer of the file's dtype and one ``copy_``, on the
same thread pool after the direct reads.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Callable, Iterable, Sequence

import torch

from modelkeep import format
from modelkeep.io import placement, reads
from modelkeep.io.buffers import allocate, direct_buffer, gc_paused


def accepts_raw_bytes(tensor: torch.Tensor, entry: format.TensorEntry) -> bool:
    """True when the file's bytes for ``entry`` can land directly in ``tensor``'s memory."""
    return (
        tensor.is_cpu
        and tensor.dtype == entry.torch_dtype
        and tensor.shape == entry.shape
        and tensor.is_contiguous()
        and tensor.layout == torch.strided
        and not tensor.is_quantized
    )


def _read_staged(
    path: str,
    pairs: list[tuple[format.TensorEntry, torch.Tensor]],
    progress: Callable[[int], None] | None,
) -> None:
    """Read each into a CPU buffer of the file's dtype, then one ``copy_`` converts and moves it.

    One buffer at a time per thread, so the memory beyond the model stays at a few tensors.
    """
    fd = reads.open_for_reading(path)
    try:
        for entry, destination in pairs:
            pin = destination.device.type == "cuda" and torch.cuda.is_available()
            staging = torch.empty(entry.shape, dtype=entry.torch_dtype, pin_memory=pin)
            planned = [(entry.begin, entry.nbytes, direct_buffer(staging))]
            for offset, buffers, size in reads.plan_calls(planned, reads.CHUNK_BYTES):
                reads.preadv_exactly(fd, buffers, offset, path, size)
            with torch.no_grad():
                destination.copy_(staging)
            del staging
            if progress is not None:
                progress(entry.nbytes)
    finally:
        os.close(fd)


def read_into(
    path: str,
    pairs: Sequence[tuple[format.TensorEntry, torch.Tensor]],
    *,
    threads: int | None = None,
    chunk_bytes: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Fill each destination tensor with its entry's bytes; return the bytes read.

    Args:
        path: the safetensors (or other raw-tensor) file.
        pairs: ``(entry, destination)``; destinations must have the entry's shape; dtype, device
            and layout may differ (converted through a staging buffer).
        threads: reader threads (see ``reads.read_ranges``).
        chunk_bytes: bytes per read call.
        progress: called with byte counts as they arrive.

    Returns:
        The bytes read from the file.

    Raises:
        StorageError: the file cannot be opened or read.
        FormatError: the file ends before an entry does.
    """
    pieces: list[tuple[int, int, Any]] = []
    staged: list[tuple[format.TensorEntry, torch.Tensor]] = []
    staged_bytes = 0
    with gc_paused():
        for entry, destination in pairs:
            if entry.end == entry.begin:
                continue
            if accepts_raw_bytes(destination, entry):
                pieces.append((entry.begin, entry.end - entry.begin, destination))
            else:
                staged.append((entry, destination))
                staged_bytes += entry.nbytes
    jobs: list[Callable[[], None]] = []
    if staged:  # after the direct reads, spread over the threads
        workers = threads or reads.io_threads()
        share = -(-len(staged) // workers)
        jobs = [
            functools.partial(_read_staged, path, staged[i : i + share], progress)
            for i in range(0, len(staged), share)
        ]
    direct = reads.read_sized_ranges(
        path, pieces, threads=threads, chunk_bytes=chunk_bytes, progress=progress, then=jobs
    )
    return direct + staged_bytes


def read_tensors(
    path: str,
    entries: Iterable[format.TensorEntry],
    *,
    device: torch.device | str = "cpu",
    threads: int | None = None,
) -> dict[str, torch.Tensor]:
    """New tensors holding the given entries, on ``device``.

    Args:
        path: the file.
        entries: header entries to read.
        device: where the tensors go (CUDA through pinned memory).
        threads: reader threads.

    Returns:
        Entry name -> tensor of the entry's dtype and shape.

    Raises:
        StorageError: the file cannot be opened or read.
        FormatError: the file ends before an entry does.
    """
    device = torch.device(device)
    pin = device.type == "cuda" and torch.cuda.is_available()
    pairs = [(e, allocate(e.shape, e.torch_dtype, pin=pin)) for e in entries]
    read_into(path, pairs, threads=threads)
    return placement.move({entry.name: tensor for entry, tensor in pairs}, device)
