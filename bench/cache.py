"""Page-cache control for warm and cold runs: evict with posix_fadvise(DONTNEED), warm by reading,
and check either with mincore (the fraction of a file's pages resident in memory)."""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
import time

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
MAP_FAILED = ctypes.c_void_p(-1).value
PAGE = mmap.PAGESIZE


def residency(path: str) -> float:
    """Fraction of the file's pages in the page cache (mapping it faults nothing in)."""
    size = os.path.getsize(path)
    if size == 0:
        return 1.0
    fd = os.open(path, os.O_RDONLY)
    try:
        address = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if address in (None, MAP_FAILED):
            raise OSError(ctypes.get_errno(), "mmap failed")
        try:
            pages = (size + PAGE - 1) // PAGE
            vector = (ctypes.c_ubyte * pages)()
            if _libc.mincore(address, size, vector) != 0:
                raise OSError(ctypes.get_errno(), "mincore failed")
            return (pages - bytes(vector).count(0)) / pages
        finally:
            _libc.munmap(address, size)
    finally:
        os.close(fd)


def evict(path: str) -> None:
    """Drop the file's clean pages from the page cache (dirty ones are written back first)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def warm(path: str, block: int = 16 << 20) -> None:
    """Read the whole file so every page is cached."""
    buffer = bytearray(block)
    with open(path, "rb", buffering=0) as stream:
        while stream.readinto(buffer):
            pass


def read_seconds(path: str, limit: int = 512 << 20) -> tuple[float, int]:
    """Seconds to read the first ``limit`` bytes sequentially, and the bytes read."""
    buffer = bytearray(16 << 20)
    done = 0
    started = time.perf_counter()
    with open(path, "rb", buffering=0) as stream:
        while done < limit:
            count = stream.readinto(buffer)
            if not count:
                break
            done += count
    return time.perf_counter() - started, done


def eviction_check(path: str) -> dict[str, float]:
    """Does DONTNEED really evict here? Residency and read speed warm, then after eviction."""
    warm(path)
    warm_res = residency(path)
    warm_s, warm_bytes = read_seconds(path)
    evict(path)
    cold_res = residency(path)
    cold_s, cold_bytes = read_seconds(path)
    return {
        "warm_residency": warm_res,
        "warm_gbps": warm_bytes / warm_s / 1e9,
        "evicted_residency": cold_res,
        "cold_gbps": cold_bytes / cold_s / 1e9,
    }
