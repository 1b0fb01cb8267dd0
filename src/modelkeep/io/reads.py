"""Reading byte ranges of a file into destination buffers (a model's own parameter memory).

Reading fills the destinations' own memory, never a private copy. When the file's pages are in
the page cache (mincore on 64 sampled pages), one thread per core fills its share of the file: a
piece whose file offset and destination address agree modulo 32 with ``os.preadv`` (the kernel's
copy), any other from a read-only mapping with numpy (the GIL is released), 4 MB at a time,
dropping each copied window from the mapping again (MADV_DONTNEED: the page cache keeps it), so
the RSS grows by a few MB, not by the file. Otherwise 8 reader threads each preadv their own
contiguous run of the file on their own descriptor (advised sequential), so the kernel keeps 8
readahead streams in flight. Either way one system call scatters a run of up to 1,024
consecutive small pieces. ``MODELKEEP_READ_METHOD`` (mmap / preadv / auto) forces a method.

This module speaks byte ranges only: ``(file offset, destination)``. Converting dtypes, devices
and layouts (staging) is ``modelkeep.io.tensors``' job.

Measured with ``python -m bench.run`` (fresh process per operation, rounds interleaved, medians of
per-round ratios; bench/RESULTS.md) on a shared 2-core VM, kernel 6.18:

* Warm, the kernel's copy into user memory runs at 11 GB/s when file offset and destination
  agree modulo 32 or 64 and at 3-9 GB/s when not (offset +8: 2.9, +16: 5.3, +40: 8.6 GB/s); a
  numpy copy from a mapping ran at 10-11 GB/s at any offset. safetensors files, and so
  modelkeep's, align tensors to 8 bytes only: vgg16's are all at +40, and copying its misaligned
  pieces from the mapping took 0.070 s against 0.081 s with preadv alone (6 rounds; 0.062
  against 0.076 in 5 earlier ones), while gpt2's (+32) were equal. Copies of 200 MB or more
  would get glibc's non-temporal stores (20 GB/s instead of 14 GB/s on 2 threads) but would put
  200 MB of mapping into the RSS. Warm, 1-16 reader threads made no difference to preadv; with
  20,000 small tensors 2 threads beat 8 (0.30 s against 0.52 s: the per-tensor Python work
  fights over the GIL). The mapping's cost: a file truncated in place during those milliseconds
  kills the process with SIGBUS, as it does safetensors' and torch's mmap loaders (the size is
  checked first; modelkeep's own saves replace files by rename, never truncate them);
  MODELKEEP_READ_METHOD=preadv avoids it.
* Cold: 8 readers on their own descriptors took 0.50x the time of 4 tasks sharing one
  descriptor (vgg16; 1 reader 2.7x); 4, 8 and 16 were equal on gpt2 (1.6-1.9 GB/s, about twice
  safetensors.load_model). Advice sequential/normal/random and 4-64 MB per call: equal.
* 20,000 tensors of 1-64 KB: the bytes take ~0.1 s, the rest is per-tensor Python. The garbage
  collector was the largest cost (see ``buffers.gc_paused``); ``Tensor.numpy()`` gives a buffer in
  ~1 us where a ctypes view cost tens (a new ctypes type per size); buffers are made by the
  threads that use them.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import mmap
import os
from typing import Any, Callable, Sequence

import numpy as np
import torch

from modelkeep import errors, hashing
from modelkeep.io import residency
from modelkeep.io.buffers import IOV_MAX, advance, byte_view, direct_buffer, gc_paused

CHUNK_BYTES = 16 * 1024 * 1024  # bytes per preadv call
MIN_STREAM_BYTES = 32 * 1024 * 1024  # below this a second reader thread costs more than it gives
READ_ADVICE = "sequential"  # posix_fadvise for each reader's descriptor: sequential/normal/random
READ_METHOD = "auto"  # "mmap" (copy from a mapping), "preadv", or "auto": mmap when cached
WARM_FRACTION = 0.9  # "auto" copies from a mapping when this much of the range is in the page cache
MAP_WINDOW_BYTES = 4 * 1024 * 1024  # copied per step, then dropped from the mapping (RSS bound)
KERNEL_COPY_ALIGNMENT = 32  # preadv copies at full speed when offset and address agree mod this
READ_METHOD_VARIABLE = "MODELKEEP_READ_METHOD"

# One preadv call: (file offset, destinations that tile the range, bytes). A destination is a
# whole tensor (made a buffer by the thread that reads it) or a byte slice of a large one.
_Call = tuple[int, list[Any], int]
Progress = Callable[[int], None]


def io_threads() -> int:
    """Reads in flight (``MODELKEEP_IO_THREADS`` overrides). Cold reads are bound by the disk's
    queue depth, not by cores, so even a 2-core machine gets 8; warm ones did not care."""
    configured = os.environ.get("MODELKEEP_IO_THREADS")
    if configured and configured.isdigit() and int(configured) > 0:
        return int(configured)
    return 8


def copy_threads() -> int:
    """Threads copying from the page cache: memory bandwidth, so one per core."""
    configured = os.environ.get("MODELKEEP_COPY_THREADS")
    if configured and configured.isdigit() and int(configured) > 0:
        return int(configured)
    return max(1, min(8, os.cpu_count() or 1))


def preadv_exactly(fd: int, buffers: list[Any], offset: int, path: str, nbytes: int | None = None) -> None:
    """Fill ``buffers`` (which tile the file range from ``offset``); one system call as a rule.

    Raises:
        StorageError: the read failed.
        FormatError: the file ends before the range does.
    """
    if nbytes is None:
        nbytes = sum(memoryview(b).nbytes for b in buffers)
    pending = buffers
    while nbytes:
        try:
            count = os.preadv(fd, pending[:IOV_MAX], offset)
        except OSError as e:
            raise errors.storage_error(e, path, "reading") from e
        if count == 0:
            raise errors.FormatError(
                "file ended before its data (was it truncated while reading?)",
                path=path,
                fix="re-download or re-save the file",
            )
        offset += count
        nbytes -= count
        if nbytes:  # a short read (a signal, the 2 GB per-call limit): skip what arrived
            pending = advance(pending, count)


def plan_calls(pieces: Sequence[tuple[int, int, Any]], chunk_bytes: int) -> list[_Call]:
    """Group ``(offset, nbytes, buffer)`` pieces (sorted by offset) into preadv calls.

    A call covers a contiguous file range of at most ``chunk_bytes`` and ``IOV_MAX`` buffers, so
    a run of small tensors costs one system call and a large tensor is cut into several.
    """
    calls: list[_Call] = []
    start = -1
    buffers: list[Any] = []
    size = 0
    for offset, nbytes, buffer in pieces:
        if nbytes > chunk_bytes:  # a large tensor: full chunks, the tail may share a call
            flat = byte_view(direct_buffer(buffer) if isinstance(buffer, torch.Tensor) else buffer)
            if buffers:
                calls.append((start, buffers, size))
            for cut in range(0, nbytes - chunk_bytes, chunk_bytes):
                calls.append((offset + cut, [flat[cut : cut + chunk_bytes]], chunk_bytes))
            cut = (nbytes - 1) // chunk_bytes * chunk_bytes
            start, buffers, size = offset + cut, [flat[cut:]], nbytes - cut
        elif buffers and start + size == offset and size + nbytes <= chunk_bytes and len(buffers) < IOV_MAX:
            buffers.append(buffer)
            size += nbytes
        else:
            if buffers:
                calls.append((start, buffers, size))
            start, buffers, size = offset, [buffer], nbytes
    if buffers:
        calls.append((start, buffers, size))
    return calls


def split_streams(calls: list[_Call], streams: int) -> list[list[_Call]]:
    """Cut the calls (in file order) into ``streams`` consecutive runs of about equal bytes.

    Each run is read front to back by one thread on its own file descriptor, so the kernel sees
    ``streams`` sequential readers and keeps a readahead window going for each: measured, that
    is what reaches the disk's speed cold (per-chunk tasks on one shared descriptor defeated the
    readahead), and what spreads the copy over the cores warm.
    """
    total = sum(call[2] for call in calls)
    if streams <= 1 or total == 0:
        return [calls] if calls else []
    share = -(-total // streams)
    runs: list[list[_Call]] = [[] for _ in range(streams)]
    done = 0
    for call in calls:
        runs[min(streams - 1, (done + call[2] // 2) // share)].append(call)
        done += call[2]
    return [run for run in runs if run]


def open_for_reading(path: str) -> int:
    """A descriptor for ``path`` advised ``READ_ADVICE``; the caller closes it.

    Raises:
        StorageError: the file cannot be opened.
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        raise errors.storage_error(e, path, "reading") from e
    advice = {"sequential": "POSIX_FADV_SEQUENTIAL", "random": "POSIX_FADV_RANDOM"}.get(READ_ADVICE)
    if advice:
        with contextlib.suppress(OSError, AttributeError):
            os.posix_fadvise(fd, 0, 0, getattr(os, advice))
    return fd


def _read_run(path: str, run: list[_Call], progress: Progress | None) -> None:
    """Read a run with preadv alone (the cold path: one sequential reader per run)."""
    fd = open_for_reading(path)
    try:
        for offset, buffers, size in run:
            buffers = [direct_buffer(b) if isinstance(b, torch.Tensor) else b for b in buffers]
            preadv_exactly(fd, buffers, offset, path, size)
            if progress is not None:
                progress(size)
    finally:
        os.close(fd)


def _copy_run(path: str, run: list[_Call], progress: Progress | None) -> None:
    """Fill a run whose pages are in the page cache, each call the faster of two ways.

    The kernel's copy (preadv) runs at full speed only when the file offset and the destination
    address agree modulo 32 (measured: 11 GB/s aligned, 3-9 GB/s misaligned), and the file's
    offsets are only 8-aligned. Misaligned large pieces are therefore copied from a read-only
    mapping in user space (~10 GB/s at any alignment); each copied window is dropped from the
    mapping again (MADV_DONTNEED: the page cache keeps it), so the RSS grows by one window, not
    by the file. Runs of small tensors always go through one scattering preadv.
    """
    fd = open_for_reading(path)
    mapped: mmap.mmap | None = None
    source: Any = None
    low = run[0][0] - run[0][0] % mmap.ALLOCATIONGRANULARITY
    released = 0
    try:
        for offset, buffers, size in run:
            buffers = [direct_buffer(b) if isinstance(b, torch.Tensor) else b for b in buffers]
            if len(buffers) > 1 or (offset - _address(buffers[0])) % KERNEL_COPY_ALIGNMENT == 0:
                preadv_exactly(fd, buffers, offset, path, size)
            else:
                if mapped is None:
                    high = run[-1][0] + run[-1][2]
                    if os.fstat(fd).st_size < high:  # pages past the end would be SIGBUS
                        raise errors.FormatError(
                            "file ended before its data (was it truncated after it was opened?)",
                            path=path,
                            fix="re-download or re-save the file",
                        )
                    mapped = mmap.mmap(fd, high - low, offset=low, access=mmap.ACCESS_READ)
                    source = np.frombuffer(mapped, dtype=np.uint8)
                position = offset - low
                np.copyto(np.frombuffer(buffers[0], dtype=np.uint8), source[position : position + size])
                done = (position + size) - (position + size) % mmap.PAGESIZE
                if done > released:
                    mapped.madvise(mmap.MADV_DONTNEED, released, done - released)
                    released = done
            if progress is not None:
                progress(size)
    finally:
        del source
        if mapped is not None:
            mapped.close()
        os.close(fd)


def _address(buffer: Any) -> int:
    """The memory address of a destination buffer (numpy arrays directly, others via numpy)."""
    if isinstance(buffer, np.ndarray):
        return buffer.ctypes.data
    return np.frombuffer(buffer, dtype=np.uint8).ctypes.data


def read_method(path: str, begin: int, end: int) -> str:
    """``"mmap"`` or ``"preadv"`` for the range: ``MODELKEEP_READ_METHOD`` or ``READ_METHOD``,
    ``auto`` resolved by how much of the range is in the page cache."""
    method = os.environ.get(READ_METHOD_VARIABLE) or READ_METHOD
    if method == "auto":
        resident = residency.resident_fraction(path, begin, end)
        method = "mmap" if resident is not None and resident >= WARM_FRACTION else "preadv"
    return method


def run_all(jobs: list[Callable[[], None]], workers: int) -> None:
    """Run the jobs on ``workers`` threads (inline for one), re-raising the first failure."""
    if workers <= 1 or len(jobs) <= 1:
        for job in jobs:
            job()
        return
    with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="modelkeep-read") as pool:
        for future in [pool.submit(job) for job in jobs]:
            future.result()


def _size(destination: Any) -> int:
    if isinstance(destination, torch.Tensor):
        return destination.nbytes
    return memoryview(destination).nbytes


def read_ranges(
    path: str,
    pieces: Sequence[tuple[int, Any]],
    *,
    threads: int | None = None,
    chunk_bytes: int | None = None,
    progress: Progress | None = None,
    then: Sequence[Callable[[], None]] = (),
) -> int:
    """Fill each destination with the file's bytes from its offset; return the bytes read.

    Args:
        path: the file.
        pieces: ``(file offset, destination)``; a destination is a contiguous CPU tensor (its
            ``nbytes`` are read into its memory; made a buffer by the thread that fills it) or a
            writable buffer (numpy array, memoryview, bytearray). Any order; they may not overlap.
        threads: readers (default ``copy_threads()`` warm, ``io_threads()`` cold) and pool size.
        chunk_bytes: bytes per call (default 4 MB windows warm, 16 MB preadv calls cold).
        progress: called with each call's byte count, from the reader threads.
        then: more jobs run on the same thread pool after the readers (the tensors helper's
            staged reads), so they share its threads as before the split.

    Returns:
        The bytes read into ``pieces`` (not counting what ``then`` reads).

    Raises:
        StorageError: the file cannot be opened or read.
        FormatError: the file ends before a piece does.
    """
    with gc_paused():
        sized = [(offset, _size(destination), destination) for offset, destination in pieces]
    return read_sized_ranges(path, sized, threads=threads, chunk_bytes=chunk_bytes, progress=progress, then=then)


def read_sized_ranges(
    path: str,
    pieces: list[tuple[int, int, Any]],
    *,
    threads: int | None = None,
    chunk_bytes: int | None = None,
    progress: Progress | None = None,
    then: Sequence[Callable[[], None]] = (),
) -> int:
    """``read_ranges`` for callers that already know each piece's size: ``(file offset, nbytes,
    destination)``, ``nbytes`` being the destination's size (the tensors helper knows it from
    the header, which saves a pass over 20,000 small tensors). Sorts ``pieces`` in place;
    pieces of 0 bytes are skipped."""
    with gc_paused():
        planned = pieces if all(piece[1] for piece in pieces) else [piece for piece in pieces if piece[1]]
        planned.sort(key=_first)
        direct_bytes = sum(piece[1] for piece in planned)
        method = READ_METHOD
        if planned:
            method = read_method(path, planned[0][0], planned[-1][0] + planned[-1][1])
        copying = method == "mmap"
        calls = plan_calls(planned, chunk_bytes or (MAP_WINDOW_BYTES if copying else CHUNK_BYTES))
    readers = threads or (copy_threads() if copying else io_threads())
    streams = max(1, min(readers, -(-direct_bytes // MIN_STREAM_BYTES)))
    runs = split_streams(calls, streams)
    jobs: list[Callable[[], None]] = [
        functools.partial(_copy_run if copying else _read_run, path, run, progress) for run in runs
    ]
    jobs += list(then)
    run_all(jobs, min(threads or io_threads(), len(jobs)))
    return direct_bytes


def _first(piece: tuple[int, int, Any]) -> int:
    return piece[0]


def digest_range(fd: int, begin: int, end: int, path: str, chunk_bytes: int = CHUNK_BYTES) -> str:
    """Digest of bytes ``[begin, end)`` of an open file, read in bounded chunks into one buffer.

    Args:
        fd: a descriptor open for reading (positional reads: threads may share it).
        begin: first byte.
        end: one past the last byte.
        path: the file's name, for errors.
        chunk_bytes: bytes per read, bounding the memory used.

    Returns:
        The hex digest of the range (``hashing.new_hasher``).

    Raises:
        StorageError: a read failed.
        FormatError: the file ends before ``end``.
    """
    hasher = hashing.new_hasher()
    view = memoryview(bytearray(min(chunk_bytes, max(end - begin, 0))))
    offset = begin
    while offset < end:
        piece = view[: min(len(view), end - offset)]
        preadv_exactly(fd, [piece], offset, path)
        hasher.update(piece)
        offset += len(piece)
    return hasher.hexdigest()
