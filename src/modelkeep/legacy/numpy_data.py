"""numpy arrays, dtypes and scalars in pickles, rebuilt as data.

numpy pickles an array as ``_reconstruct(ndarray, (0,), b'b')`` followed by BUILD with
``(version, shape, dtype, fortran, raw bytes)``, a dtype as ``dtype(code, align, copy)`` followed by
BUILD with its byte order and flags, and a scalar as ``scalar(dtype, raw bytes)``. Here each piece
is checked (simple dtypes only, sizes that match the bytes, flags equal to what numpy itself gives
that dtype) before numpy's own constructors see it, so a file cannot hand numpy an inconsistent
dtype or array.
"""

from __future__ import annotations

import re
from typing import Any

_CODE = re.compile(r"[a-zA-Z?]\d{0,6}")
_BYTE_ORDERS = ("<", ">", "|", "=")
_TIME_UNITS = {
    b"Y", b"M", b"W", b"D", b"h", b"m", b"s", b"ms", b"us", b"ns", b"ps", b"fs", b"as", b"generic",
}


def np():  # numpy is imported only when a file holds numpy data
    import numpy

    return numpy


def make_dtype(args: tuple, kwargs: dict) -> Any:
    """``numpy.dtype(code, align, copy)``: a fresh (copied) simple dtype."""
    if kwargs or not 1 <= len(args) <= 3:
        raise ValueError("numpy.dtype takes a code and two flags")
    code = args[0]
    align = args[1] if len(args) > 1 else False
    if type(code) is not str or not _CODE.fullmatch(code) or type(align) is not bool:
        raise ValueError(f"unsupported numpy dtype code {str(code)[:40]!r}")
    dtype = np().dtype(code, align=align, copy=True)
    if dtype.fields is not None or dtype.subdtype is not None:
        raise ValueError("structured numpy dtypes are not supported")
    return dtype


def build_dtype(dtype: Any, state: Any) -> None:
    """Apply a pickled dtype state: only the byte order (and a datetime unit) may differ from
    what numpy gives a fresh dtype of that code."""
    own = dtype.__reduce__()[2]
    if type(state) is not tuple or len(state) != len(own) or state[0] != own[0]:
        raise ValueError("unsupported numpy dtype state")
    order = state[1]
    if order not in _BYTE_ORDERS:
        raise ValueError("numpy dtype byte order must be one of < > | =")
    if tuple(state[2:8]) != tuple(own[2:8]):
        raise ValueError("numpy dtype state differs from a simple dtype's (structured or altered)")
    wanted = list(own)
    wanted[1] = order
    if len(own) == 9:  # datetime64/timedelta64: (extra metadata, (unit, count, 1, 1))
        wanted[8] = _time_metadata(state[8])
    dtype.__setstate__(tuple(wanted))


def _time_metadata(value: Any) -> tuple:
    if (
        type(value) is tuple
        and len(value) == 2
        and value[0] is None
        and type(value[1]) is tuple
        and len(value[1]) == 4
        and value[1][0] in _TIME_UNITS
        and all(type(v) is int and 1 <= v <= 1_000_000 for v in value[1][1:])
    ):
        return value
    raise ValueError("unsupported datetime64 unit metadata")


def empty_array(subtype: Any, shape: Any, code: Any) -> Any:
    """``_reconstruct(ndarray, (0,), b'b')``: an empty array that BUILD fills."""
    numpy = np()
    if subtype is not numpy.ndarray or shape != (0,) or code not in (b"b", "b"):
        raise ValueError("only plain numpy.ndarray objects can be rebuilt")
    return numpy.ndarray((0,), dtype="b")


def build_array(array: Any, state: Any, *, max_ndim: int, is_ours: Any) -> None:
    """Fill an array from ``(version, shape, dtype, fortran, raw)`` after checking that the
    bytes are exactly what shape x dtype needs (or, for object arrays, one value per element)."""
    numpy = np()
    if type(state) is not tuple or len(state) != 5:
        raise ValueError("unsupported numpy array state")
    version, shape, dtype, fortran, raw = state
    if version != 1 or type(fortran) is not bool:
        raise ValueError("unsupported numpy array state")
    if type(shape) is not tuple or len(shape) > max_ndim:
        raise ValueError("numpy array shape must be a tuple of at most 64 sizes")
    if not all(type(dim) is int and 0 <= dim < 2**62 for dim in shape):
        raise ValueError("numpy array sizes must be non-negative integers")
    if not isinstance(dtype, numpy.dtype) or not is_ours(dtype):
        raise ValueError("numpy array dtype was not read from the file")
    count = 1
    for dim in shape:
        count *= dim
    if dtype.hasobject:
        if type(raw) is not list or len(raw) != count:
            raise ValueError("object array needs one value per element")
    else:
        if isinstance(raw, str):
            raw = raw.encode("latin-1")
        if not isinstance(raw, (bytes, bytearray)) or len(raw) != count * dtype.itemsize:
            raise ValueError("numpy array bytes do not match its shape and dtype")
    array.__setstate__((1, shape, dtype, fortran, raw))


def scalar(dtype: Any, data: Any, *, is_ours: Any) -> Any:
    numpy = np()
    if not isinstance(dtype, numpy.dtype) or not is_ours(dtype):
        raise ValueError("numpy scalar dtype was not read from the file")
    if dtype.hasobject:
        return data
    if isinstance(data, str):
        data = data.encode("latin-1")
    if not isinstance(data, (bytes, bytearray)) or len(data) != dtype.itemsize:
        raise ValueError("numpy scalar bytes do not match its dtype")
    return numpy.frombuffer(bytes(data), dtype=dtype, count=1)[0]


def from_buffer(buffer: Any, dtype: Any, shape: Any, order: Any, *, max_ndim: int, is_ours: Any) -> Any:
    """``_frombuffer(buffer, dtype, shape, order)`` (protocol 5 in-band arrays)."""
    numpy = np()
    if not isinstance(dtype, numpy.dtype) or not is_ours(dtype) or dtype.hasobject:
        raise ValueError("numpy buffer dtype was not read from the file")
    if not isinstance(buffer, (bytes, bytearray)) or order not in ("C", "F"):
        raise ValueError("numpy buffer must be bytes with order C or F")
    if type(shape) is not tuple or len(shape) > max_ndim or not all(type(d) is int and d >= 0 for d in shape):
        raise ValueError("numpy array shape must be a tuple of non-negative sizes")
    count = 1
    for dim in shape:
        count *= dim
    if count * dtype.itemsize != len(buffer):
        raise ValueError("numpy buffer size does not match its shape and dtype")
    return numpy.frombuffer(bytearray(buffer), dtype=dtype).reshape(shape, order=order)
