"""The only things a pickle may call: builders modelkeep writes, one per allowed global.

Each builder receives already-built values, checks them, and makes plain data (containers,
numbers, dates, paths), numpy data or records (torch's own globals are in ``tensor_builders``).
None of them calls anything the file provides. A builder that gets values of the wrong kind raises ValueError/TypeError, which
the policy turns into a FormatError naming the global and the pickle byte.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import decimal
import fractions
import functools
import pathlib
from typing import Any, Callable

from modelkeep.legacy import numpy_data

Fn = Callable[[Any, tuple, dict, int], Any]


@dataclasses.dataclass(frozen=True, eq=False)
class Builder:
    """An allowed global: ``fn(policy, args, kwargs, position)`` builds what calling it means.
    ``value`` is the real object the name denotes when a file stores it as a value (``list`` as a
    defaultdict factory), ``tensor`` marks builders whose result is a tensor."""

    qualname: str
    fn: Fn | None = None
    value: Any = None
    tensor: bool = False

    def __repr__(self) -> str:
        return f"<modelkeep builder {self.qualname}>"


# ---------------------------------------------------------------------------------------------
# argument helpers


def arity(args: tuple, kwargs: dict, low: int, high: int | None = None) -> None:
    if kwargs:
        raise TypeError("keyword arguments are not accepted")
    high = low if high is None else high
    if not low <= len(args) <= high:
        raise TypeError(f"takes {low}..{high} arguments, got {len(args)}")


def is_int(value: Any) -> bool:
    return type(value) is int


def _primitive(value: Any) -> bool:
    return value is None or type(value) in (bool, int, float, str, bytes)


def _fill(p: Any, target: Any, source: Any) -> None:
    """Put ``source``'s pairs (a dict, or a list/tuple of 2-sequences) into ``target``."""
    if isinstance(source, dict):
        pairs = list(source.items())
    elif isinstance(source, (list, tuple)):
        pairs = []
        for pair in source:
            if not isinstance(pair, (list, tuple)) or len(pair) != 2:
                raise TypeError("expected key/value pairs")
            pairs.append((pair[0], pair[1]))
    else:
        raise TypeError(f"cannot read pairs from a {type(source).__name__}")
    for key, value in pairs:
        p.check_key(target, key)
        target[key] = value


def _items(source: Any) -> list[Any]:
    if isinstance(source, (list, tuple, set, frozenset)):
        return list(source)
    raise TypeError(f"cannot iterate a {type(source).__name__}")


# ---------------------------------------------------------------------------------------------
# containers and plain values


def ordered_dict(p: Any, args: tuple, kwargs: dict, pos: int) -> Any:
    arity(args, kwargs, 0, 1)
    result: collections.OrderedDict = collections.OrderedDict()
    if args:
        _fill(p, result, args[0])
    return result


def default_dict(p: Any, args: tuple, kwargs: dict, pos: int) -> Any:
    arity(args, kwargs, 0, 2)
    factory = args[0] if args else None
    if factory is not None:
        if not isinstance(factory, Builder) or factory.value not in _FACTORIES:
            raise TypeError("a defaultdict factory must be a plain container or number type")
        factory = factory.value
    result: collections.defaultdict = collections.defaultdict(factory)
    if len(args) > 1:
        _fill(p, result, args[1])
    return result


def counter(p: Any, args: tuple, kwargs: dict, pos: int) -> Any:
    arity(args, kwargs, 0, 1)
    result: collections.Counter = collections.Counter()
    if args:
        _fill(p, result, args[0])
    return result


def deque(p: Any, args: tuple, kwargs: dict, pos: int) -> Any:
    arity(args, kwargs, 0, 2)
    maxlen = args[1] if len(args) > 1 else None
    if maxlen is not None and (not is_int(maxlen) or maxlen < 0):
        raise TypeError("deque maxlen must be a non-negative integer")
    result = collections.deque(_items(args[0]) if args else (), maxlen)
    p.register(result, "deque")
    return result


def make_set(kind: type) -> Fn:
    def build(p: Any, args: tuple, kwargs: dict, pos: int) -> Any:
        arity(args, kwargs, 0, 1)
        holder: set[Any] = set()
        for value in _items(args[0]) if args else []:
            p.check_key(holder, value)
            holder.add(value)
        return holder if kind is set else frozenset(holder)

    return build


def make_sequence(kind: type) -> Fn:
    def build(p: Any, args: tuple, kwargs: dict, pos: int) -> Any:
        arity(args, kwargs, 0, 1)
        return kind(_items(args[0]) if args else ())

    return build


def make_dict(p: Any, args: tuple, kwargs: dict, pos: int) -> Any:
    arity(args, kwargs, 0, 1)
    result: dict[Any, Any] = {}
    if args:
        _fill(p, result, args[0])
    return result


def make_complex(p: Any, args: tuple, kwargs: dict, pos: int) -> Any:
    arity(args, kwargs, 0, 2)
    if not all(type(v) in (int, float, bool) for v in args):
        raise TypeError("complex takes real numbers")
    return complex(*args)


def make_number(kind: type) -> Fn:
    def build(p: Any, args: tuple, kwargs: dict, pos: int) -> Any:
        arity(args, kwargs, 0, 1)
        if args and not (type(args[0]) in (int, float, bool) or (type(args[0]) is str and len(args[0]) <= 400)):
            raise TypeError(f"{kind.__name__} takes a number or a short string")
        return kind(*args)

    return build


def make_str(p: Any, args: tuple, kwargs: dict, pos: int) -> Any:
    arity(args, kwargs, 0, 1)
    if args and type(args[0]) not in (str, int, float, bool):
        raise TypeError("str takes a string or a number")
    return str(*args)


_ENCODINGS = ("latin1", "latin-1", "utf-8", "utf8", "ascii")


def make_bytes(kind: type) -> Fn:
    def build(p: Any, args: tuple, kwargs: dict, pos: int) -> Any:
        arity(args, kwargs, 0, 2)
        if not args:
            return kind()
        source = args[0]
        if len(args) == 2:
            if type(source) is not str or args[1] not in _ENCODINGS:
                raise TypeError("bytes from text need a str and a standard encoding")
            return kind(source.encode(args[1]))
        if isinstance(source, (bytes, bytearray)):
            return kind(source)
        if type(source) is list and all(is_int(v) and 0 <= v < 256 for v in source):
            return kind(source)
        raise TypeError("bytes take bytes, a list of byte values, or text and an encoding")

    return build


def codecs_encode(p: Any, args: tuple, kwargs: dict, pos: int) -> Any:
    arity(args, kwargs, 1, 2)
    encoding = args[1] if len(args) > 1 else "utf-8"
    if type(args[0]) is not str or encoding not in _ENCODINGS:
        raise TypeError("_codecs.encode takes a str and a standard encoding")
    return args[0].encode(encoding)


def make_slice_or_range(kind: type) -> Fn:
    def build(p: Any, args: tuple, kwargs: dict, pos: int) -> Any:
        arity(args, kwargs, 1, 3)
        if not all(v is None or is_int(v) for v in args) or (kind is range and None in args):
            raise TypeError(f"{kind.__name__} takes integers")
        return kind(*args)

    return build


def record(type_name: str) -> Fn:
    def build(p: Any, args: tuple, kwargs: dict, pos: int) -> Any:
        if args:
            raise TypeError(f"{type_name} takes no positional arguments")
        for key in kwargs:
            if type(key) is not str:
                raise TypeError("attribute names must be strings")
        return p.new_record(type_name, dict(kwargs))

    return build


def dates(kind: type) -> Fn:
    def build(p: Any, args: tuple, kwargs: dict, pos: int) -> Any:
        arity(args, kwargs, 0, 8)
        for value in args:
            if not (_primitive(value) or isinstance(value, (datetime.tzinfo, datetime.timedelta))):
                raise TypeError(f"{kind.__name__} takes numbers, bytes and time zones")
            if type(value) in (str, bytes) and len(value) > 64:
                raise TypeError("date/time state is too long")
        if kind is datetime.timezone and args and type(args[0]) is not datetime.timedelta:
            raise TypeError("timezone takes a timedelta")
        return kind(*args)

    return build


def make_decimal_or_fraction(kind: type) -> Fn:
    def build(p: Any, args: tuple, kwargs: dict, pos: int) -> Any:
        arity(args, kwargs, 0, 2)
        if not all(type(v) in (int, str) and (type(v) is int or len(v) <= 1000) for v in args):
            raise TypeError(f"{kind.__name__} takes integers or a short string")
        if kind is decimal.Decimal and len(args) > 1:
            raise TypeError("Decimal takes one value")
        return kind(*args)

    return build


def make_path(kind: type) -> Fn:
    def build(p: Any, args: tuple, kwargs: dict, pos: int) -> Any:
        if kwargs or not all(type(v) is str and len(v) <= 4096 for v in args) or len(args) > 1024:
            raise TypeError("paths take string parts")
        return kind(*args)

    return build


def reconstructor(p: Any, args: tuple, kwargs: dict, pos: int) -> Any:
    """``copyreg._reconstructor(cls, object, None)``: protocol 0/1's way of saying ``cls.__new__``."""
    arity(args, kwargs, 3)
    cls, base, state = args
    if not (isinstance(base, Builder) and base.value is object) or state is not None:
        raise TypeError("only object-based classes can be rebuilt")
    return p.new(cls, (), {}, pos)


def newobj(p: Any, args: tuple, kwargs: dict, pos: int) -> Any:
    if kwargs or not args:
        raise TypeError("__newobj__ takes a class and its arguments")
    return p.new(args[0], tuple(args[1:]), {}, pos)


def newobj_ex(p: Any, args: tuple, kwargs: dict, pos: int) -> Any:
    arity(args, kwargs, 3)
    if type(args[1]) is not tuple or type(args[2]) is not dict:
        raise TypeError("__newobj_ex__ takes a class, a tuple and a dict")
    return p.new(args[0], args[1], args[2], pos)


def partial(p: Any, args: tuple, kwargs: dict, pos: int) -> Any:
    arity(args, kwargs, 1, 16)
    if len(args) == 1 and p.trusted_callable(args[0]):
        result = functools.partial(args[0])
        p.register(result, "partial")
        return result
    return p.placeholder_object("functools", "partial", args, pos)


# numpy


def np_dtype(p: Any, args: tuple, kwargs: dict, pos: int) -> Any:
    dtype = numpy_data.make_dtype(args, kwargs)
    p.register(dtype, "np_dtype")
    return dtype


def np_reconstruct(p: Any, args: tuple, kwargs: dict, pos: int) -> Any:
    arity(args, kwargs, 3)
    subtype = numpy_data.np().ndarray if args[0] is NDARRAY else None
    array = numpy_data.empty_array(subtype, args[1], args[2])
    p.register(array, "np_array")
    return array


def np_scalar(p: Any, args: tuple, kwargs: dict, pos: int) -> Any:
    arity(args, kwargs, 1, 2)
    return numpy_data.scalar(args[0], args[1] if len(args) > 1 else b"", is_ours=p.is_registered)


def np_frombuffer(p: Any, args: tuple, kwargs: dict, pos: int) -> Any:
    arity(args, kwargs, 4)
    return numpy_data.from_buffer(*args, max_ndim=p.limits.max_ndim, is_ours=p.is_registered)


# ---------------------------------------------------------------------------------------------
# the table


_FACTORIES = (None, list, dict, set, frozenset, int, float, str, tuple, bool, collections.OrderedDict)



def stdlib_table() -> dict[tuple[str, str], Any]:
    """The standard-library globals a file may name: containers, numbers, dates, records."""
    b = "builtins"
    table: dict[tuple[str, str], Any] = {
        ("collections", "OrderedDict"): Builder("collections.OrderedDict", ordered_dict, collections.OrderedDict),
        ("collections", "defaultdict"): Builder("collections.defaultdict", default_dict),
        ("collections", "Counter"): Builder("collections.Counter", counter),
        ("collections", "deque"): Builder("collections.deque", deque),
        (b, "set"): Builder("builtins.set", make_set(set), set),
        (b, "frozenset"): Builder("builtins.frozenset", make_set(frozenset), frozenset),
        (b, "list"): Builder("builtins.list", make_sequence(list), list),
        (b, "tuple"): Builder("builtins.tuple", make_sequence(tuple), tuple),
        (b, "dict"): Builder("builtins.dict", make_dict, dict),
        (b, "complex"): Builder("builtins.complex", make_complex, complex),
        (b, "int"): Builder("builtins.int", make_number(int), int),
        (b, "float"): Builder("builtins.float", make_number(float), float),
        (b, "bool"): Builder("builtins.bool", make_number(bool), bool),
        (b, "str"): Builder("builtins.str", make_str, str),
        (b, "bytes"): Builder("builtins.bytes", make_bytes(bytes), bytes),
        (b, "bytearray"): Builder("builtins.bytearray", make_bytes(bytearray), bytearray),
        (b, "slice"): Builder("builtins.slice", make_slice_or_range(slice), slice),
        (b, "range"): Builder("builtins.range", make_slice_or_range(range), range),
        (b, "object"): Builder("builtins.object", None, object),
        (b, "Ellipsis"): Ellipsis,
        (b, "NotImplemented"): NotImplemented,
        ("_codecs", "encode"): Builder("_codecs.encode", codecs_encode),
        ("copyreg", "_reconstructor"): Builder("copyreg._reconstructor", reconstructor),
        ("copyreg", "__newobj__"): Builder("copyreg.__newobj__", newobj),
        ("copyreg", "__newobj_ex__"): Builder("copyreg.__newobj_ex__", newobj_ex),
        ("argparse", "Namespace"): Builder("argparse.Namespace", record("argparse.Namespace")),
        ("types", "SimpleNamespace"): Builder("types.SimpleNamespace", record("types.SimpleNamespace")),
        ("functools", "partial"): Builder("functools.partial", partial),
        ("decimal", "Decimal"): Builder("decimal.Decimal", make_decimal_or_fraction(decimal.Decimal)),
        ("fractions", "Fraction"): Builder("fractions.Fraction", make_decimal_or_fraction(fractions.Fraction)),
    }
    for name in ("datetime", "date", "time", "timedelta", "timezone"):
        table[("datetime", name)] = Builder(f"datetime.{name}", dates(getattr(datetime, name)))
    for name, kind in (
        ("PosixPath", pathlib.PurePosixPath),
        ("PurePosixPath", pathlib.PurePosixPath),
        ("WindowsPath", pathlib.PureWindowsPath),
        ("PureWindowsPath", pathlib.PureWindowsPath),
        ("Path", pathlib.PurePosixPath),
    ):
        table[("pathlib", name)] = Builder(f"pathlib.{name}", make_path(kind))
    return table


def numpy_table() -> dict[tuple[str, str], Any]:
    """numpy's pickling globals: arrays, dtypes, scalars."""
    table: dict[tuple[str, str], Any] = {}
    for core in ("numpy.core", "numpy._core"):
        table[(f"{core}.multiarray", "_reconstruct")] = Builder("numpy._reconstruct", np_reconstruct)
        table[(f"{core}.multiarray", "scalar")] = Builder("numpy.scalar", np_scalar)
        table[(f"{core}.numeric", "_frombuffer")] = Builder("numpy._frombuffer", np_frombuffer)
    table[("numpy", "dtype")] = Builder("numpy.dtype", np_dtype)
    table[("numpy", "ndarray")] = NDARRAY
    return table


NDARRAY = Builder("numpy.ndarray")  # only meaningful as _reconstruct's subtype argument


