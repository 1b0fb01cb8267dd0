"""How much of a file is in the page cache: the question that picks the warm or cold read path.

``mincore`` on a read-only mapping answers without faulting anything in; sampling 64 pages spread
over the range keeps the question cheap on a 4 GB file (asking about every page would cost
milliseconds). Where the platform cannot answer, the answer is None and readers take the cold
path, which is correct either way.
"""

from __future__ import annotations

import ctypes
import mmap
from typing import Any

import numpy as np


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
