"""One tagged-JSON codec for plain values, and one key for "the same tensor".

Both architecture records (constructor keyword arguments) and checkpoints (nested training state)
store Python values as JSON. JSON lacks tuples, sets, non-string keys, non-finite floats and torch's
small value types, so those become one-key tagged objects. The tags and their shapes are defined
here once::

    (3, 3)                 -> {"$tuple": [3, 3]}
    {1, 2}                 -> {"$set": [1, 2]}                  (sorted by repr: equal sets, equal files)
    {0: "a"}, {"$x": 1}    -> {"$dict": [[0, "a"]]}, {"$dict": [["$x", 1]]}
                              (keys that are not strings, or could be read as a tag)
    {"a": 1}               -> {"a": 1}                          (plain JSON where JSON can say it)
    float("inf")           -> {"$float": "inf"}                 ("nan", "inf", "-inf")
    b"\\x00"                -> {"$bytes": "AA=="}                (base64)
    torch.float16          -> {"$dtype": "float16"}
    torch.device("cuda:0") -> {"$device": "cuda:0"}
    torch.Size([2, 3])     -> {"$size": [2, 3]}
    np.float32(0.5)        -> {"$np": "float32", "value": 0.5}

Callers add their own tags through hooks (``EncodeHook``/``DecodeHook``): the checkpoint's tensor
and numpy-array leaves (``$tensor``, ``$ndarray``), the architecture's nested modules
(``$module``). Any dict key starting with ``$`` is reserved for tags.

Files written before the codec was shared spelled ``$dict`` two ways: the checkpoint's
``{"$dict": [[key, value], ...]}`` and the architecture record's ``{"$dict": {"key": value}}``
(every string-keyed dict). The decoder accepts both, so every file written so far still reads.

Decoding is strict because the JSON comes from a file: an unknown tag, a tag with stray keys, a
wrong type or a tree nested too deeply is the caller's error naming the tree path, never a crash.

``identity_key`` is the single definition of "the same view of the same memory", used to store
tied tensors once in weights files and checkpoints alike.
"""

from __future__ import annotations

import base64
import functools
import math
from typing import Any, Callable, Mapping

import torch

MAX_DEPTH = 200  # far below Python's recursion limit, far above any real nested value
PLAIN_TAGS = ("$tuple", "$set", "$dict", "$float", "$np", "$bytes", "$dtype", "$size", "$device")
NUMPY_SCALARS = ("bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
                 "float16", "float32", "float64")
_SPECIAL_FLOATS = ("nan", "inf", "-inf")
_TAG_KEYS: dict[str, frozenset[str]] = {"$np": frozenset({"value"})}

NOT_HANDLED: Any = object()
"""What an encode hook returns for a value it does not own (the codec then encodes it)."""

Fail = Callable[[str, str], Exception]
"""``fail(where, what)``: the error to raise for the tree path ``where`` (``""`` is the root)."""
EncodeChild = Callable[[Any, str], Any]
"""``encode_child(value, where)``: encode a value nested one level below the current one."""
EncodeHook = Callable[[Any, str, EncodeChild], Any]
"""``hook(value, where, encode_child)``: a JSON node for values the caller owns, else NOT_HANDLED."""
DecodeChild = Callable[[Any, str], Any]
DecodeHook = Callable[[dict[str, Any], str, DecodeChild], Any]
"""``hook(node, where, decode_child)``: the value of a node carrying the hook's tag."""


# --------------------------------------------------------------------------------------------
# Tensor identity


def identity_key(tensor: torch.Tensor) -> tuple[Any, ...] | None:
    """The identity of a tensor's exact view of memory, or None where memory identity means nothing.

    Two tensors with equal keys read the same bytes as the same values: same storage, offset,
    shape, strides, dtype and device, and the same lazy conjugate/negative bits (``x`` and
    ``x.conj()`` share memory but not values, so they must not be stored as one).

    Args:
        tensor: any tensor.

    Returns:
        A hashable tuple, or None for empty, meta and non-strided tensors (nothing to share).
    """
    if tensor.numel() == 0 or tensor.is_meta or tensor.layout != torch.strided:
        return None
    return (
        tensor.device,
        tensor.untyped_storage().data_ptr(),
        tensor.untyped_storage().nbytes(),
        tensor.storage_offset(),
        tuple(tensor.shape),
        tuple(tensor.stride()),
        tensor.dtype,
        tensor.is_conj(),
        tensor.is_neg(),
    )


# --------------------------------------------------------------------------------------------
# Encoding


def child_path(where: str, key: Any) -> str:
    """The tree path of ``key`` under ``where`` (``"optimizer/state/0"``)."""
    return f"{where}/{key}" if where else str(key)


def is_tag(key: Any) -> bool:
    """True for dict keys the codec reserves for tags (they start with ``$``)."""
    return isinstance(key, str) and key.startswith("$")


class _Encoder:
    def __init__(self, fail: Fail, hook: EncodeHook | None, max_depth: int) -> None:
        self.fail = fail
        self.hook = hook
        self.max_depth = max_depth
        self.active: set[int] = set()  # containers on the current path, to refuse cycles

    def encode(self, value: Any, where: str, depth: int) -> Any:
        if depth > self.max_depth:
            raise self.fail(where, f"nested deeper than {self.max_depth} levels")
        if self.hook is not None:
            node = self.hook(value, where, lambda v, w: self.encode(v, w, depth + 1))
            if node is not NOT_HANDLED:
                return node
        if type(value).__module__.startswith("numpy"):  # first: np.float64 is also a float
            return self.numpy_scalar(value, where)
        if value is None or isinstance(value, bool):
            return value
        if isinstance(value, str):
            check_text(value, where, self.fail)
            return value
        if isinstance(value, int):
            return int(value)
        if isinstance(value, float):
            return float(value) if math.isfinite(value) else {"$float": repr(float(value))}
        if isinstance(value, torch.dtype):
            return {"$dtype": str(value).removeprefix("torch.")}
        if isinstance(value, torch.device):
            return {"$device": str(value)}
        if isinstance(value, torch.Size):
            return {"$size": [int(v) for v in value]}
        if isinstance(value, (bytes, bytearray)):
            return {"$bytes": base64.b64encode(bytes(value)).decode("ascii")}
        if isinstance(value, (Mapping, list, tuple, set, frozenset)):
            if id(value) in self.active:
                raise self.fail(where, "the structure contains itself (a cycle)")
            self.active.add(id(value))
            try:
                return self.container(value, where, depth)
            finally:
                self.active.discard(id(value))
        raise self.fail(where, f"values of type {type(value).__qualname__} cannot be stored")

    def numpy_scalar(self, value: Any, where: str) -> Any:
        import numpy as np

        if not isinstance(value, np.generic) or value.dtype.name not in NUMPY_SCALARS:
            raise self.fail(where, f"values of type numpy {type(value).__qualname__} cannot be stored")
        return {"$np": value.dtype.name, "value": self.encode(value.item(), where, 0)}

    def container(self, value: Any, where: str, depth: int) -> Any:
        if isinstance(value, Mapping):
            for key in value:
                if isinstance(key, str):
                    check_text(key, child_path(where, key), self.fail)
            if all(isinstance(k, str) and not is_tag(k) for k in value):
                return {k: self.encode(v, child_path(where, k), depth + 1) for k, v in value.items()}
            return {"$dict": [
                [self.encode(k, child_path(where, f"<key {k!r}>"), depth + 1),
                 self.encode(v, child_path(where, k), depth + 1)]
                for k, v in value.items()
            ]}
        if isinstance(value, list):
            return [self.encode(v, child_path(where, i), depth + 1) for i, v in enumerate(value)]
        if isinstance(value, tuple):
            return {"$tuple": [self.encode(v, child_path(where, i), depth + 1) for i, v in enumerate(value)]}
        items = sorted(value, key=repr)  # a stable order, so equal sets make equal files
        return {"$set": [self.encode(v, child_path(where, i), depth + 1) for i, v in enumerate(items)]}


def check_text(value: str, where: str, fail: Fail) -> None:
    """Refuse strings JSON cannot carry as UTF-8 (lone surrogates)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise fail(where, "string is not valid Unicode (lone surrogate)") from e


def encode(
    value: Any,
    *,
    fail: Fail,
    hook: EncodeHook | None = None,
    where: str = "",
    max_depth: int = MAX_DEPTH,
) -> Any:
    """The JSON-ready tree of ``value`` (see the module docstring for the tags).

    Args:
        value: nested plain values (and whatever ``hook`` owns).
        fail: builds the caller's error for a value that cannot be stored.
        hook: called first on every value; returns a node for the values the caller owns (tensors,
            modules) or NOT_HANDLED.
        where: the tree path of ``value``, for error messages and hooks.
        max_depth: deepest nesting accepted.

    Returns:
        A tree of dicts, lists, strings, ints, finite floats, bools and None.

    Raises:
        Whatever ``fail`` builds: for an unsupported type, a cycle, a lone surrogate or nesting
        deeper than ``max_depth``; the path names the first offending value.
    """
    return _Encoder(fail, hook, max_depth).encode(value, where, 0)


# --------------------------------------------------------------------------------------------
# Decoding


@functools.lru_cache(maxsize=1)
def _dtypes() -> dict[str, torch.dtype]:
    """``{"float32": torch.float32, ...}`` for every dtype torch defines, by the name ``encode``
    writes; read from the module's namespace so that no name from a file reaches ``getattr``
    (torch imports some submodules lazily on attribute access)."""
    return {
        str(value).removeprefix("torch."): value
        for value in vars(torch).values()
        if isinstance(value, torch.dtype)
    }


class _Decoder:
    def __init__(
        self, fail: Fail, hooks: Mapping[str, DecodeHook], tag_keys: Mapping[str, frozenset[str]],
        max_depth: int,
    ) -> None:
        self.fail = fail
        self.hooks = hooks
        self.tag_keys = {**_TAG_KEYS, **tag_keys}
        self.max_depth = max_depth

    def decode(self, node: Any, where: str, depth: int) -> Any:
        if depth > self.max_depth:
            raise self.fail(where, f"is nested deeper than {self.max_depth} levels")
        if node is None or isinstance(node, (bool, int, float, str)):
            return node
        if isinstance(node, list):
            return [self.decode(v, child_path(where, i), depth + 1) for i, v in enumerate(node)]
        if not isinstance(node, dict):
            raise self.fail(where, f"holds a {type(node).__name__}")
        tags = [k for k in node if is_tag(k)]
        if not tags:
            return {k: self.decode(v, child_path(where, k), depth + 1) for k, v in node.items()}
        tag = tags[0]
        if len(tags) != 1 or (tag not in PLAIN_TAGS and tag not in self.hooks):
            raise self.fail(where, f"has unknown tag(s) {tags}")
        extra_keys = set(node) - {tag} - self.tag_keys.get(tag, frozenset())
        if extra_keys:
            raise self.fail(where, f"has unexpected keys {sorted(extra_keys)}")
        if tag in self.hooks:
            return self.hooks[tag](node, where, lambda v, w: self.decode(v, w, depth + 1))
        return self.tagged(tag, node, where, depth)

    def items(self, value: Any, tag: str, where: str, depth: int) -> list[Any]:
        if not isinstance(value, list):
            raise self.fail(where, f"{tag} must hold a list")
        return [self.decode(v, child_path(where, i), depth + 1) for i, v in enumerate(value)]

    def tagged(self, tag: str, node: dict[str, Any], where: str, depth: int) -> Any:
        value = node[tag]
        if tag == "$tuple":
            return tuple(self.items(value, tag, where, depth))
        if tag == "$set":
            try:
                return set(self.items(value, tag, where, depth))
            except TypeError as e:
                raise self.fail(where, "holds a set of unhashable values") from e
        if tag == "$dict":
            return self.mapping(value, where, depth)
        if tag == "$float":
            if value not in _SPECIAL_FLOATS:
                raise self.fail(where, f"$float must be nan, inf or -inf, not {value!r}")
            return float(value)
        if tag == "$np":
            return self.numpy_scalar(node, where, depth)
        return self.simple(tag, value, where)

    def mapping(self, value: Any, where: str, depth: int) -> dict[Any, Any]:
        if isinstance(value, dict):  # the architecture record's older spelling: string keys only
            return {k: self.decode(v, child_path(where, k), depth + 1) for k, v in value.items()}
        if not isinstance(value, list) or not all(isinstance(p, list) and len(p) == 2 for p in value):
            raise self.fail(where, "$dict must hold [key, value] pairs")
        out: dict[Any, Any] = {}
        for i, (raw_key, raw_value) in enumerate(value):
            key = self.decode(raw_key, child_path(where, f"<key {i}>"), depth + 1)
            try:
                out[key] = self.decode(raw_value, child_path(where, key), depth + 1)
            except TypeError as e:
                raise self.fail(where, f"has an unhashable key {key!r}") from e
        return out

    def numpy_scalar(self, node: dict[str, Any], where: str, depth: int) -> Any:
        import numpy as np

        name = node["$np"]
        if name not in NUMPY_SCALARS or "value" not in node:
            raise self.fail(where, f"$np must name a numpy scalar type and a value, not {name!r}")
        raw = self.decode(node["value"], where, depth + 1)
        if not isinstance(raw, (bool, int, float)):
            raise self.fail(where, "$np value must be a number")
        try:
            return np.dtype(name).type(raw)
        except (OverflowError, ValueError) as e:
            raise self.fail(where, f"$np value {raw!r} does not fit {name}") from e

    def simple(self, tag: str, value: Any, where: str) -> Any:
        try:
            if tag == "$bytes" and isinstance(value, str):
                return base64.b64decode(value.encode("ascii"), validate=True)
            if tag == "$dtype" and isinstance(value, str) and value in _dtypes():
                return _dtypes()[value]
            if tag == "$device" and isinstance(value, str):
                return torch.device(value)
            if tag == "$size" and isinstance(value, list) and all(type(v) is int and v >= 0 for v in value):
                return torch.Size(value)
        except (ValueError, RuntimeError, UnicodeEncodeError) as e:
            raise self.fail(where, f"{tag} value {value!r} is invalid") from e
        raise self.fail(where, f"{tag} value {value!r} is invalid")


def decode(
    node: Any,
    *,
    fail: Fail,
    hooks: Mapping[str, DecodeHook] | None = None,
    tag_keys: Mapping[str, frozenset[str]] | None = None,
    where: str = "",
    max_depth: int = MAX_DEPTH,
) -> Any:
    """The Python value of a tree written by ``encode`` (or by an older modelkeep).

    Args:
        node: parsed JSON.
        fail: builds the caller's error for a node the codec refuses.
        hooks: ``{tag: hook}`` for the caller's own tags.
        tag_keys: ``{tag: keys}`` allowed beside a caller's tag (``{"$tensor": {"device"}}``).
        where: the tree path of ``node``, for error messages and hooks.
        max_depth: deepest nesting accepted.

    Returns:
        The nested value: tuples, sets, dicts with any hashable keys, floats, bytes, dtypes, ...

    Raises:
        Whatever ``fail`` builds, naming the tree path of the first node refused.
    """
    return _Decoder(fail, hooks or {}, tag_keys or {}, max_depth).decode(node, where, 0)
