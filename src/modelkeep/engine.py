"""Moving bytes between files and tensor memory.

Reading fills the destination tensors' own memory (a model's parameters), never a private copy.
When the file's pages are in the page cache (mincore on 64 sampled pages), one thread per core
fills its share of the file: a piece whose file offset and destination address agree modulo 32
with ``os.preadv`` (the kernel's copy), any other from a read-only mapping with numpy (the GIL is
released), 4 MB at a time, dropping each copied window from the mapping again (MADV_DONTNEED:
the page cache keeps it), so the RSS grows by a few MB, not by the file. Otherwise 8 reader
threads each preadv their own contiguous run of the file on their own descriptor (advised
sequential), so the kernel keeps 8 readahead streams in flight. Either way one system call
scatters a run of up to 1,024 consecutive small tensors. Destinations that cannot take raw bytes
(another dtype or device, non-contiguous) get a staging buffer and one ``copy_``.

Writing streams a temporary file beside the destination: header (placeholder digests), then each
tensor's bytes from its own memory in 1 MB write calls, each piece XXH3-128-hashed just before it
is written; the digests are spliced into the header; fsync + rename + folder fsync commit it, so
a crash leaves the old file or the new one.

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
  collector was the largest cost (parsing the header: ~250 ms, ~90 ms with it paused; see
  ``gc_paused``); ``Tensor.numpy()`` gives a buffer in ~1 us where a ctypes view cost tens (a new
  ctypes type per size); buffers are made by the threads that use them.
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

import concurrent.futures
import contextlib
import ctypes
import errno
import functools
import gc
import json
import mmap
import os
import secrets
import stat
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
import xxhash

from modelkeep import errors, format

HASH_ALGORITHM = "xxh3-128"
HASH_HEX_LENGTH = 32
EMPTY_DIGEST = xxhash.xxh3_128_hexdigest(b"")
CHUNK_BYTES = 16 * 1024 * 1024  # bytes per preadv call
MIN_STREAM_BYTES = 32 * 1024 * 1024  # below this a second reader thread costs more than it gives
READ_ADVICE = "sequential"  # posix_fadvise for each reader's descriptor: sequential/normal/random
READ_METHOD = "auto"  # "mmap" (copy from a mapping), "preadv", or "auto": mmap when cached
WARM_FRACTION = 0.9  # "auto" copies from a mapping when this much of the range is in the page cache
MAP_WINDOW_BYTES = 4 * 1024 * 1024  # copied per step, then dropped from the mapping (RSS bound)
KERNEL_COPY_ALIGNMENT = 32  # preadv copies at full speed when offset and address agree mod this
IOV_MAX = 1024  # Linux's limit on buffers per preadv/writev call
WRITE_CHUNK_BYTES = 1024 * 1024  # bytes per write call: below 2 MB (see the module docstring)
WRITEBACK_BYTES = 64 * 1024 * 1024  # start disk writeback after this many bytes (0: leave it to fsync)
TEMP_SUFFIX = ".mk-tmp"


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


def new_hasher() -> "xxhash.xxh3_128":
    return xxhash.xxh3_128()


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector for a burst of allocations.

    Parsing a 20,000-tensor header and planning its reads allocate ~10^5 objects; with a large
    model alive, each generation-2 collection that this triggers walks every object of the
    process. Pausing made the many-small-tensors load several times faster.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """A writable byte view of a contiguous CPU tensor's memory (no copy, any dtype)."""
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

    ``Tensor.numpy()`` costs about a microsecond; the uint8 fallback (dtypes numpy lacks) three.
    With 20,000 small tensors this is a cost that counts, so the reader threads pay it, each
    while the other thread's read is in the kernel.
    """
    if tensor.requires_grad:
        tensor = tensor.detach()
    try:
        return tensor.numpy()
    except TypeError:
        return tensor.reshape(-1).view(torch.uint8).numpy()


def accepts_raw_bytes(tensor: torch.Tensor, entry: format.TensorEntry) -> bool:
    """True when the file's bytes can land directly in ``tensor``'s memory."""
    return (
        tensor.is_cpu
        and tensor.dtype == entry.torch_dtype
        and tensor.shape == entry.shape
        and tensor.is_contiguous()
        and tensor.layout == torch.strided
        and not tensor.is_quantized
    )


# One preadv call: (file offset, destinations that tile the range, bytes). A destination is a
# whole tensor (made a buffer by the thread that reads it) or a byte slice of a large one.
_Call = tuple[int, list[Any], int]


def _preadv_exactly(fd: int, buffers: list[Any], offset: int, path: str, nbytes: int | None = None) -> None:
    """Fill ``buffers`` (which tile the file range from ``offset``); one system call as a rule."""
    if nbytes is None:
        nbytes = sum(memoryview(b).nbytes for b in buffers)
    pending = buffers
    while nbytes:
        try:
            count = os.preadv(fd, pending[:IOV_MAX], offset)
        except OSError as e:
            raise errors.StorageError(f"read failed: {e.strerror}", path=path, fix="check the disk") from e
        if count == 0:
            raise errors.FormatError(
                "file ended before its data (was it truncated while reading?)",
                path=path,
                fix="re-download or re-save the file",
            )
        offset += count
        nbytes -= count
        if nbytes:  # a short read (a signal, the 2 GB per-call limit): skip what arrived
            pending = _advance(pending, count)


def _advance(buffers: list[Any], count: int) -> list[Any]:
    rest = []
    for buffer in buffers:
        flat = np.frombuffer(buffer, dtype=np.uint8)  # writable, since the buffer is
        if rest or count < flat.nbytes:
            rest.append(flat[count:])
            count = 0
        else:
            count -= flat.nbytes
    return rest


def _byte_view(buffer: Any) -> Any:
    """The same memory as a flat uint8 array, so it can be cut at any byte."""
    return buffer.reshape(-1).view(np.uint8)


def plan_calls(
    pieces: Sequence[tuple[int, int, Any]], chunk_bytes: int
) -> list[_Call]:
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
            flat = _byte_view(direct_buffer(buffer) if isinstance(buffer, torch.Tensor) else buffer)
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


def _open_for_reading(path: str) -> int:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        raise errors.StorageError(f"cannot open: {e.strerror}", path=path, fix="check the path") from e
    advice = {"sequential": "POSIX_FADV_SEQUENTIAL", "random": "POSIX_FADV_RANDOM"}.get(READ_ADVICE)
    if advice:
        with contextlib.suppress(OSError, AttributeError):
            os.posix_fadvise(fd, 0, 0, getattr(os, advice))
    return fd


def _read_run(path: str, run: list[_Call], progress: Callable[[int], None] | None) -> None:
    fd = _open_for_reading(path)
    try:
        for offset, buffers, size in run:
            buffers = [direct_buffer(b) if isinstance(b, torch.Tensor) else b for b in buffers]
            _preadv_exactly(fd, buffers, offset, path, size)
            if progress is not None:
                progress(size)
    finally:
        os.close(fd)


def _copy_run(path: str, run: list[_Call], progress: Callable[[int], None] | None) -> None:
    """Fill a run whose pages are in the page cache, each call the faster of two ways.

    The kernel's copy (preadv) runs at full speed only when the file offset and the destination
    address agree modulo 32 (measured: 11 GB/s aligned, 3-9 GB/s misaligned), and the file's
    offsets are only 8-aligned. Misaligned large pieces are therefore copied from a read-only
    mapping in user space (~10 GB/s at any alignment); each copied window is dropped from the
    mapping again (MADV_DONTNEED: the page cache keeps it), so the RSS grows by one window, not
    by the file. Runs of small tensors always go through one scattering preadv.
    """
    fd = _open_for_reading(path)
    mapped: mmap.mmap | None = None
    source: Any = None
    low = run[0][0] - run[0][0] % mmap.ALLOCATIONGRANULARITY
    released = 0
    try:
        for offset, buffers, size in run:
            buffers = [direct_buffer(b) if isinstance(b, torch.Tensor) else b for b in buffers]
            if len(buffers) > 1 or (offset - buffers[0].ctypes.data) % KERNEL_COPY_ALIGNMENT == 0:
                _preadv_exactly(fd, buffers, offset, path, size)
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


def resident_fraction(path: str, begin: int, end: int, samples: int = 64) -> float | None:
    """About what fraction of ``[begin, end)`` of the file is in the page cache, from
    ``samples`` pages spread evenly over it (mincore on a mapping faults nothing in; asking
    about every page of a 4 GB file would cost milliseconds), or None where it cannot be asked."""
    mincore = _mincore()
    if end <= begin or mincore is None:
        return None
    low = begin - begin % mmap.ALLOCATIONGRANULARITY
    try:
        with open(path, "rb") as stream, mmap.mmap(
            stream.fileno(), end - low, offset=low, access=mmap.ACCESS_READ
        ) as mapped:
            view = np.frombuffer(mapped, dtype=np.uint8)
            try:
                address = view.ctypes.data
                first, last = (begin - low) // mmap.PAGESIZE, (end - 1 - low) // mmap.PAGESIZE
                pages = sorted({first + (last - first) * i // max(1, samples - 1) for i in range(samples)})
                flag = ctypes.c_ubyte()
                resident = 0
                for page in pages:
                    if mincore(address + page * mmap.PAGESIZE, mmap.PAGESIZE, ctypes.byref(flag)) != 0:
                        return None
                    resident += flag.value & 1
                return resident / len(pages)
            finally:
                del view
    except (OSError, ValueError):
        return None


_mincore_function: Any = None


def _mincore() -> Any:
    global _mincore_function
    if _mincore_function is None:
        try:
            function = ctypes.CDLL(None, use_errno=True).mincore
            function.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
            function.restype = ctypes.c_int
            _mincore_function = function
        except (OSError, AttributeError):
            _mincore_function = False
    return _mincore_function or None


def _read_staged(
    path: str,
    pairs: list[tuple[format.TensorEntry, torch.Tensor]],
    progress: Callable[[int], None] | None,
) -> None:
    """Read each into a CPU buffer of the file's dtype, then one ``copy_`` converts and moves it.

    One buffer at a time per thread, so the memory beyond the model stays at a few tensors.
    """
    fd = _open_for_reading(path)
    try:
        for entry, destination in pairs:
            pin = destination.device.type == "cuda" and torch.cuda.is_available()
            staging = torch.empty(entry.shape, dtype=entry.torch_dtype, pin_memory=pin)
            for offset, buffers, size in plan_calls([(entry.begin, entry.nbytes, direct_buffer(staging))], CHUNK_BYTES):
                _preadv_exactly(fd, buffers, offset, path, size)
            with torch.no_grad():
                destination.copy_(staging)
            del staging
            if progress is not None:
                progress(entry.nbytes)
    finally:
        os.close(fd)


def _run_all(jobs: list[Callable[[], None]], workers: int) -> None:
    if workers <= 1 or len(jobs) <= 1:
        for job in jobs:
            job()
        return
    with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="modelkeep-read") as pool:
        for future in [pool.submit(job) for job in jobs]:
            future.result()


def read_into(
    path: str,
    pairs: Sequence[tuple[format.TensorEntry, torch.Tensor]],
    *,
    threads: int | None = None,
    chunk_bytes: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Fill each destination tensor with its entry's bytes; returns the bytes read.

    Destinations must have the entry's shape; dtype, device and layout may differ (converted).
    """
    pieces: list[tuple[int, int, Any]] = []
    staged: list[tuple[format.TensorEntry, torch.Tensor]] = []
    total = 0
    with gc_paused():
        for entry, destination in pairs:
            nbytes = entry.end - entry.begin
            if nbytes == 0:
                continue
            total += nbytes
            if accepts_raw_bytes(destination, entry):
                pieces.append((entry.begin, nbytes, destination))
            else:
                staged.append((entry, destination))
        pieces.sort(key=_first)
        method = os.environ.get("MODELKEEP_READ_METHOD") or READ_METHOD
        if method == "auto" and pieces:
            resident = resident_fraction(path, pieces[0][0], pieces[-1][0] + pieces[-1][1])
            method = "mmap" if resident is not None and resident >= WARM_FRACTION else "preadv"
        copying = method == "mmap"
        calls = plan_calls(pieces, chunk_bytes or (MAP_WINDOW_BYTES if copying else CHUNK_BYTES))
    direct_bytes = total - sum(entry.nbytes for entry, _ in staged)
    readers = threads or (copy_threads() if copying else io_threads())
    streams = max(1, min(readers, -(-direct_bytes // MIN_STREAM_BYTES)))
    runs = split_streams(calls, streams)
    jobs: list[Callable[[], None]] = [
        functools.partial(_copy_run if copying else _read_run, path, run, progress) for run in runs
    ]
    workers = threads or io_threads()
    if staged:  # after the direct reads, spread over the threads
        share = -(-len(staged) // workers)
        jobs += [
            functools.partial(_read_staged, path, staged[i : i + share], progress)
            for i in range(0, len(staged), share)
        ]
    _run_all(jobs, min(workers, len(jobs)))
    return total


def _first(piece: tuple[int, int, Any]) -> int:
    return piece[0]


HUGE_PAGE_MIN_BYTES = 4 * 1024 * 1024


def allocate(
    shape: Sequence[int],
    dtype: torch.dtype,
    *,
    stride: Sequence[int] | None = None,
    device: torch.device | str = "cpu",
    pin: bool = False,
) -> torch.Tensor:
    """Uninitialised memory for a tensor the engine is about to fill.

    The first touch of fresh memory, not the copy, dominates loading into new tensors (4 KB page
    faults: about 2-3 GB/s against 12+ GB/s for the copy). Large CPU tensors therefore get their
    own anonymous mapping advised for transparent huge pages, which cuts that cost about five
    times; the mapping is page aligned, so kernels see the same alignment as torch's allocator
    gives and produce bit-identical results. Everything else comes from torch.
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
    if device.type != "cpu" or pin or nbytes < HUGE_PAGE_MIN_BYTES or not hasattr(mmap, "MADV_HUGEPAGE"):
        return torch.empty_strided(shape, tuple(stride), dtype=dtype, device=device, pin_memory=pin)
    region = mmap.mmap(-1, span * dtype.itemsize, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    with contextlib.suppress(OSError):
        region.madvise(mmap.MADV_HUGEPAGE)
    flat = torch.frombuffer(region, dtype=torch.uint8).view(dtype)
    return flat.as_strided(shape, tuple(stride))


def read_tensors(
    path: str,
    entries: Iterable[format.TensorEntry],
    *,
    device: torch.device | str = "cpu",
    threads: int | None = None,
) -> dict[str, torch.Tensor]:
    """New tensors holding the given entries, on ``device``."""
    device = torch.device(device)
    pin = device.type == "cuda" and torch.cuda.is_available()
    pairs = [(e, allocate(e.shape, e.torch_dtype, pin=pin)) for e in entries]
    read_into(path, pairs, threads=threads)
    out = {entry.name: tensor for entry, tensor in pairs}
    if device.type != "cpu":
        out = {name: tensor.to(device, non_blocking=pin) for name, tensor in out.items()}
        if pin:
            torch.cuda.synchronize(device)
    return out


# --------------------------------------------------------------------------------------------
# Writing


def cpu_contiguous(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's values as a C-ordered CPU tensor, copying only when it must."""
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


def _cpu_bytes(tensor: torch.Tensor) -> tuple[Any, int]:
    """A buffer over the tensor's values in C order on the CPU, and its size; copies only a
    tensor that is not already such memory (another device, non-contiguous, a lazy view)."""
    if not (tensor.is_cpu and tensor.is_contiguous() and not tensor.is_conj() and not tensor.is_neg()):
        tensor = cpu_contiguous(tensor)
    nbytes = tensor.numel() * tensor.element_size()
    return (direct_buffer(tensor) if nbytes else b""), nbytes


def _write_all(fd: int, view: memoryview, path: str) -> None:
    while len(view):
        written = os.write(fd, view[:WRITE_CHUNK_BYTES])
        view = view[written:]


_sync_file_range: Any = None


def start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Ask the kernel to start writing a range to disk now, without waiting (Linux only).

    The final fsync of an atomic save then waits for the tail only: the disk works while later
    tensors are still being copied into the page cache.
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
        _sync_file_range(fd, offset, nbytes, 2)  # SYNC_FILE_RANGE_WRITE; a failure only costs time


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
            for rest in _advance(buffers, written):
                view = memoryview(rest)
                while len(view):
                    view = view[os.write(self.fd, view) :]
        self.offset += nbytes
        if WRITEBACK_BYTES and self.offset - self.unsynced_from >= WRITEBACK_BYTES:
            start_writeback(self.fd, self.unsynced_from, self.offset - self.unsynced_from)
            self.unsynced_from = self.offset


def _hash_each(buffers: list[Any], slots: list[int], digests: list[str]) -> None:
    for buffer, slot in zip(buffers, slots):
        digests[slot] = xxhash.xxh3_128_hexdigest(buffer)


def write_tensors(fd: int, tensors: Iterable[torch.Tensor], path: str) -> list[str]:
    """Write each tensor's bytes in order from the current file position; return their digests.

    Runs of small tensors go out in one ``writev`` each, large tensors in ``WRITE_CHUNK_BYTES``
    pieces; each piece is hashed just before it is written, while it is in the CPU cache. Every
    byte is written from the tensor's own memory; a tensor that is not contiguous CPU memory is
    copied alone, so memory beyond the model stays at the largest such tensor.
    """
    writer = _Writer(fd, os.lseek(fd, 0, os.SEEK_CUR))
    chunk = WRITE_CHUNK_BYTES
    digests: list[str] = []
    batch: list[Any] = []
    slots: list[int] = []
    batch_bytes = 0
    for tensor in tensors:
        buffer, nbytes = _cpu_bytes(tensor)
        slot = len(digests)
        digests.append(EMPTY_DIGEST)
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
        flat = _byte_view(buffer)
        hasher = new_hasher()
        for cut in range(0, nbytes, chunk):
            piece = flat[cut : cut + chunk]
            hasher.update(piece)
            writer.write([piece], len(piece))
        digests[slot] = hasher.hexdigest()
    if batch:
        _hash_each(batch, slots, digests)
        writer.write(batch, batch_bytes)
    return digests


def _temp_prefix(name: str) -> str:
    """``.NAME.``, shortened for long names so the temporary name stays within NAME_MAX (255)."""
    if len(name.encode("utf-8")) > 200:
        name = name[:100] + "~" + xxhash.xxh64_hexdigest(name.encode("utf-8", "surrogatepass"))
    return f".{name}."


def temp_path_for(path: str) -> str:
    folder, name = os.path.split(os.path.abspath(path))
    return os.path.join(folder, f"{_temp_prefix(name)}{os.getpid()}-{secrets.token_hex(4)}{TEMP_SUFFIX}")


def remove_stale_temps(path: str) -> list[str]:
    """Delete temporary files that a crashed save to ``path`` left behind (their writer is gone)."""
    folder, name = os.path.split(os.path.abspath(path))
    removed = []
    prefix = _temp_prefix(name)
    try:
        candidates = os.listdir(folder)
    except OSError:
        return removed
    for candidate in candidates:
        if not (candidate.startswith(prefix) and candidate.endswith(TEMP_SUFFIX)):
            continue
        # Exactly "<pid>-<8 hex>": ".a." also prefixes the temps of "a.b", which are not ours.
        pid_text, _, token = candidate[len(prefix) : -len(TEMP_SUFFIX)].partition("-")
        if not (pid_text.isascii() and pid_text.isdigit() and len(token) == 8):
            continue
        if not all(c in "0123456789abcdef" for c in token):
            continue
        if process_alive(int(pid_text)):
            continue
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(folder, candidate))
            removed.append(candidate)
    return removed


def process_alive(pid: int) -> bool:
    """Whether a save by process ``pid`` may still be writing its temporary file."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def fsync_folder(folder: str) -> None:
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(path: str) -> Iterator[int]:
    """Yield a file descriptor of a temporary file that replaces ``path`` on success.

    The bytes are fsynced before the rename and the folder after it. On any exception the
    temporary file is removed and ``path`` is left as it was. A symlink is written through (its
    target is replaced, the link stays), and a replaced file keeps its permission bits.
    """
    path = os.path.realpath(os.fspath(path))
    folder = os.path.dirname(path)
    if not os.path.isdir(folder):
        raise errors.StorageError(
            "folder does not exist", path=path, fix=f"create {folder} first"
        )
    remove_stale_temps(path)
    temp = temp_path_for(path)
    try:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except OSError as e:
        raise _storage_error(e, path) from e
    committed = False
    try:
        try:
            with contextlib.suppress(FileNotFoundError):
                os.fchmod(fd, stat.S_IMODE(os.stat(path).st_mode))
            yield fd
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp, path)
        committed = True
        fsync_folder(folder)
    except OSError as e:
        if isinstance(e, errors.ModelkeepError):
            raise
        raise _storage_error(e, path) from e
    finally:
        if not committed:
            with contextlib.suppress(OSError):
                os.unlink(temp)


def _storage_error(e: OSError, path: str) -> errors.StorageError:
    fixes = {
        errno.ENOSPC: "free disk space or save elsewhere; the previous file is untouched",
        errno.EDQUOT: "free quota or save elsewhere; the previous file is untouched",
        errno.EACCES: "check the folder's permissions",
        errno.EROFS: "save to a writable location",
    }
    return errors.StorageError(
        f"write failed: {e.strerror or e}", path=path, fix=fixes.get(e.errno or 0, "check the disk")
    )



def write_file(
    path: str,
    tensors: Sequence[tuple[str, torch.Tensor]],
    metadata: dict[str, str],
    *,
    with_hashes: bool = True,
) -> dict[str, str]:
    """Write a safetensors file atomically; return the per-tensor digests.

    Digests are computed while the bytes stream out, so the header is first written with
    same-length placeholders and rewritten in place at the end.
    """
    planned = [
        format.PlannedTensor(name, format.name_from_dtype(t.dtype, item=name), tuple(t.shape))
        for name, t in tensors
    ]
    metadata = dict(metadata)
    placeholder = "0" * HASH_HEX_LENGTH
    if with_hashes:
        metadata[format.KEY_HASHES] = _hashes_value({name: placeholder for name, _ in tensors})
    header = format.encode_header(planned, metadata)
    digests: dict[str, str] = {}
    with atomic_file(path) as fd:
        _write_all(fd, memoryview(header), path)
        values = write_tensors(fd, (t for _, t in tensors), path)
        digests = {name: value for (name, _), value in zip(tensors, values)}
        if with_hashes:
            final = _with_digests(header, planned, metadata, digests)
            if len(final) != len(header):  # digests are fixed-width hex, so this cannot differ
                raise RuntimeError("header length changed while filling in digests")
            os.pwrite(fd, final, 0)
    return digests


def _with_digests(
    header: bytes, planned: list[format.PlannedTensor], metadata: dict[str, str], digests: dict[str, str]
) -> bytes:
    """The header with its placeholder digests filled in.

    The placeholders form one JSON string value, so it is spliced in place (encoding a
    20,000-tensor header again costs tens of milliseconds); should that value's encoding
    appear more than once, the header is encoded again instead.
    """
    placeholder = json.dumps(metadata[format.KEY_HASHES], ensure_ascii=False).encode("utf-8")
    metadata[format.KEY_HASHES] = _hashes_value(digests)
    filled = json.dumps(metadata[format.KEY_HASHES], ensure_ascii=False).encode("utf-8")
    if len(filled) == len(placeholder) and header.count(placeholder) == 1:
        return header.replace(placeholder, filled)
    return format.encode_header(planned, metadata)


def _hashes_value(digests: dict[str, str]) -> str:
    return format.dumps({"algorithm": HASH_ALGORITHM, "tensors": digests})


def digest_range(fd: int, begin: int, end: int, path: str, chunk_bytes: int = CHUNK_BYTES) -> str:
    """Digest of bytes ``[begin, end)`` of an open file, read in bounded chunks."""
    hasher = new_hasher()
    buffer = bytearray(min(chunk_bytes, max(end - begin, 0)))
    view = memoryview(buffer)
    offset = begin
    while offset < end:
        piece = view[: min(len(view), end - offset)]
        _preadv_exactly(fd, [piece], offset, path)
        hasher.update(piece)
        offset += len(piece)
    return hasher.hexdigest()


# Names the storage layer uses (the hash record's one owner is this section).
PLACEHOLDER_DIGEST = "0" * HASH_HEX_LENGTH
hashes_value = _hashes_value
write_all = _write_all
with_digests = _with_digests


def recorded_digests(header: format.Header) -> dict[str, str] | None:
    """The per-tensor digests a header records, None when it records none.

    Raises:
        FormatError: the record is malformed or of an unknown algorithm.
    """
    record = header.modelkeep_value(format.KEY_HASHES)
    if record is None:
        return None
    if (not isinstance(record, dict) or record.get("algorithm") != HASH_ALGORITHM
            or not isinstance(record.get("tensors"), dict)):
        raise errors.FormatError(
            "hash record is malformed or of an unknown algorithm", path=header.path, item=format.KEY_HASHES,
            fix="the file is damaged or from a newer modelkeep; use an intact file or upgrade modelkeep",
        )
    return record["tensors"]
