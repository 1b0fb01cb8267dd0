"""Streaming tensors' bytes to a file descriptor, hashing each piece as it goes out.

Each tensor's bytes leave from its own memory in 1 MB write calls (runs of small tensors in one
``writev``), each piece XXH3-128-hashed just before it is written, while it is in the CPU cache.
The atomic commit around it (temporary name, fsync, rename, folder fsync) is ``modelkeep.atomic``.

Measured with ``python -m bench.run`` (bench/RESULTS.md) on a shared 2-core VM, kernel 6.18:

* 1 MB write calls: on this VM a write() of 2 MB or more into the page cache took 8-10x longer in
  about 40% of runs (553 MB in 1.0-1.5 s instead of 0.12 s), calls under 2 MB never did (30 of
  30). save_weights(vgg16): 0.32 s with 1 MB calls, 1.37 s with 16 MB calls (6 rounds each).
* Early writeback: ``sync_file_range(WRITE)`` every ``WRITEBACK_BYTES`` lets the disk work while
  later tensors are copied, so the commit's fsync waits for the tail (vgg16: 0.02 s instead of
  0.18 s); totals equal or better, and dirty memory stays bounded on multi-GB saves.
* XXH3-128 hashes at 30 GB/s on one core (blake3 4.0 GB/s, 4.2 with its threads; CRC32 3.4).
  Hashing on a second thread while writing measured no faster (0.98x; the save is disk-bound).
"""

from __future__ import annotations

import ctypes
import os
from typing import Any, Iterable

import torch

from modelkeep import hashing
from modelkeep.io.buffers import IOV_MAX, advance, byte_view, cpu_bytes

WRITE_CHUNK_BYTES = 1024 * 1024  # bytes per write call: below 2 MB (see the module docstring)
WRITEBACK_BYTES = 64 * 1024 * 1024  # start disk writeback after this many bytes (0: leave it to fsync)


def write_all(fd: int, view: memoryview) -> None:
    """Write every byte of ``view`` at the current position, in ``WRITE_CHUNK_BYTES`` calls.

    Raises:
        OSError: a write failed (the caller maps it to a StorageError naming the file).
    """
    while len(view):
        written = os.write(fd, view[:WRITE_CHUNK_BYTES])
        view = view[written:]


_sync_file_range: Any = None


def start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Ask the kernel to start writing a range to disk now, without waiting (Linux only).

    The final fsync of an atomic save then waits for the tail only: the disk works while later
    tensors are still being copied into the page cache. A failure only costs time.
    """
    global _sync_file_range
    if _sync_file_range is None:
        try:
            function = ctypes.CDLL(None, use_errno=True).sync_file_range
            function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
            _sync_file_range = function
        except (OSError, AttributeError):
            _sync_file_range = False
    if _sync_file_range:
        _sync_file_range(fd, offset, nbytes, 2)  # SYNC_FILE_RANGE_WRITE


class _Writer:
    """Sequential writes with ``writev`` batching from the caller's buffers, handing every
    ``WRITEBACK_BYTES`` written to the disk early."""

    def __init__(self, fd: int, offset: int) -> None:
        self.fd = fd
        self.offset = offset
        self.unsynced_from = offset

    def write(self, buffers: list[Any], nbytes: int) -> None:
        written = os.writev(self.fd, buffers)
        if written != nbytes:  # a short write: finish buffer by buffer (errors raise OSError)
            for rest in advance(buffers, written):
                view = memoryview(rest)
                while len(view):
                    view = view[os.write(self.fd, view) :]
        self.offset += nbytes
        if WRITEBACK_BYTES and self.offset - self.unsynced_from >= WRITEBACK_BYTES:
            start_writeback(self.fd, self.unsynced_from, self.offset - self.unsynced_from)
            self.unsynced_from = self.offset


def _hash_each(buffers: list[Any], slots: list[int], digests: list[str]) -> None:
    for buffer, slot in zip(buffers, slots):
        digests[slot] = hashing.digest(buffer)


def write_tensors(fd: int, tensors: Iterable[torch.Tensor]) -> list[str]:
    """Write each tensor's bytes in order from the current file position; return their digests.

    Runs of small tensors go out in one ``writev`` each, large tensors in ``WRITE_CHUNK_BYTES``
    pieces; each piece is hashed just before it is written, while it is in the CPU cache. Every
    byte is written from the tensor's own memory; a tensor that is not contiguous CPU memory is
    copied alone, so memory beyond the model stays at the largest such tensor.

    Args:
        fd: a descriptor open for writing, positioned where the first tensor's bytes go.
        tensors: the tensors, in file order (any device, layout or lazy view).

    Returns:
        Each tensor's ``hashing`` digest, in order.

    Raises:
        OSError: a write failed.
    """
    writer = _Writer(fd, os.lseek(fd, 0, os.SEEK_CUR))
    chunk = WRITE_CHUNK_BYTES
    digests: list[str] = []
    batch: list[Any] = []
    slots: list[int] = []
    batch_bytes = 0
    for tensor in tensors:
        buffer, nbytes = cpu_bytes(tensor)
        slot = len(digests)
        digests.append(hashing.EMPTY_DIGEST)
        if nbytes == 0:
            continue
        if batch and (nbytes > chunk or batch_bytes + nbytes > chunk or len(batch) == IOV_MAX):
            _hash_each(batch, slots, digests)
            writer.write(batch, batch_bytes)
            batch, slots, batch_bytes = [], [], 0
        if nbytes <= chunk:
            batch.append(buffer)
            slots.append(slot)
            batch_bytes += nbytes
            continue
        flat = byte_view(buffer)
        hasher = hashing.new_hasher()
        for cut in range(0, nbytes, chunk):
            piece = flat[cut : cut + chunk]
            hasher.update(piece)
            writer.write([piece], len(piece))
        digests[slot] = hasher.hexdigest()
    if batch:
        _hash_each(batch, slots, digests)
        writer.write(batch, batch_bytes)
    return digests
