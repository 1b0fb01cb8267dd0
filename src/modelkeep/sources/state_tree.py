"""Nested training state <-> a JSON tree plus named tensors, without pickle.

The tree is plain JSON where it can be (dicts with string keys, lists, strings, ints, bools, None,
finite floats) and a one-key tagged object where it cannot::

    {"$tensor": "optimizer/state/0/exp_avg"}     a tensor, stored under that name in the file
    {"$ndarray": "rng/numpy/keys"}               a numpy array, stored as a tensor
    {"$tuple": [...]}  {"$set": [...]}            tuples and sets
    {"$dict": [[key, value], ...]}               dicts whose keys are not all plain strings
                                                 (optimizer state is keyed by parameter index)
    {"$float": "nan" | "inf" | "-inf"}           non-finite floats (JSON has none)
    {"$np": "float32", "value": 0.5}             numpy scalars
    {"$bytes": "<base64>"}  {"$dtype": "float32"}  {"$size": [2, 3]}  {"$device": "cuda:0"}

The same tensor (the same view of the same memory) reached twice is stored once, so tied weights
and shared buffers stay one tensor. Decoding validates every node and names the tree path of
anything it refuses, because the tree comes from a file.
"""

from __future__ import annotations

import base64
import dataclasses
import math
from typing import Any, Callable, Mapping

import torch

from modelkeep import errors, format

MAX_DEPTH = 200  # far below Python's recursion limit, far above any real training state
TAGS = ("$tensor", "$ndarray", "$tuple", "$set", "$dict", "$float", "$np", "$bytes", "$dtype",
        "$size", "$device")
NUMPY_FILE_DTYPES = {"BOOL", "U8", "I8", "U16", "I16", "U32", "I32", "U64", "I64", "F16", "F32", "F64"}
NUMPY_SCALARS = ("bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
                 "float16", "float32", "float64")


@dataclasses.dataclass
class Encoded:
    """A JSON-ready tree and the tensors it names, in the order they are first reached."""

    tree: Any
    tensors: list[tuple[str, torch.Tensor]]


def _unsupported(path: str, what: str) -> errors.UnsupportedValueError:
    return errors.UnsupportedValueError(
        what,
        item=path or "<root>",
        fix="checkpoints hold dicts, lists, tuples, numbers, strings, bytes, None, tensors and "
        "numpy arrays; convert other objects to those (e.g. obj.state_dict() or dataclasses.asdict)",
    )


class _Encoder:
    def __init__(self) -> None:
        self.tensors: list[tuple[str, torch.Tensor]] = []
        self.names: set[str] = set()
        self.by_view: dict[tuple[Any, ...], str] = {}
        self.active: set[int] = set()  # containers on the current path, to refuse cycles

    def name_for(self, path: str) -> str:
        name, count = path or "tensor", 1
        while name in self.names:
            count += 1
            name = f"{path}#{count}"
        self.names.add(name)
        return name

    def tensor(self, value: torch.Tensor, path: str) -> str:
        if value.is_meta or value.layout != torch.strided or value.is_quantized or value.is_nested:
            raise _unsupported(path, f"cannot store a {'meta' if value.is_meta else value.layout} tensor")
        format.name_from_dtype(value.dtype, item=path)
        key = None
        if value.numel():
            key = (value.device, value.untyped_storage().data_ptr(), value.storage_offset(),
                   tuple(value.shape), tuple(value.stride()), value.dtype)
            if key in self.by_view:
                return self.by_view[key]
        name = self.name_for(path)
        self.tensors.append((name, value.detach()))
        if key is not None:
            self.by_view[key] = name
        return name

    def encode(self, value: Any, path: str, depth: int) -> Any:
        if depth > MAX_DEPTH:
            raise _unsupported(path, f"nested deeper than {MAX_DEPTH} levels")
        numpy_node = _encode_numpy(self, value, path)  # first: np.float64 is also a float
        if numpy_node is not None:
            return numpy_node
        if value is None or isinstance(value, (bool, str)):
            if isinstance(value, str):
                _check_text(value, path)
            return value
        if isinstance(value, int):
            return int(value)
        if isinstance(value, float):
            return float(value) if math.isfinite(value) else {"$float": repr(float(value))}
        if isinstance(value, torch.Tensor):
            tag: dict[str, Any] = {"$tensor": self.tensor(value, path)}
            if value.device.type != "cpu":
                tag["device"] = str(value.device)
            return tag
        if isinstance(value, (torch.dtype, torch.device, torch.Size)):
            return _encode_torch_value(value)
        if isinstance(value, (bytes, bytearray)):
            return {"$bytes": base64.b64encode(bytes(value)).decode("ascii")}
        if isinstance(value, (Mapping, list, tuple, set, frozenset)):
            if id(value) in self.active:
                raise _unsupported(path, "the structure contains itself (a cycle)")
            self.active.add(id(value))
            try:
                return self.container(value, path, depth)
            finally:
                self.active.discard(id(value))
        raise _unsupported(path, f"values of type {type(value).__qualname__} cannot be stored")

    def container(self, value: Any, path: str, depth: int) -> Any:
        def child(key: Any) -> str:
            return f"{path}/{key}" if path else str(key)

        if isinstance(value, Mapping):
            for key in value:
                if isinstance(key, str):
                    _check_text(key, child(key))
            if all(isinstance(k, str) and not k.startswith("$") for k in value):
                return {k: self.encode(v, child(k), depth + 1) for k, v in value.items()}
            return {"$dict": [
                [self.encode(k, child(f"<key {k!r}>"), depth + 1), self.encode(v, child(k), depth + 1)]
                for k, v in value.items()
            ]}
        if isinstance(value, list):
            return [self.encode(v, child(i), depth + 1) for i, v in enumerate(value)]
        if isinstance(value, tuple):
            return {"$tuple": [self.encode(v, child(i), depth + 1) for i, v in enumerate(value)]}
        items = sorted(value, key=repr)  # a stable order, so equal sets make equal files
        return {"$set": [self.encode(v, child(i), depth + 1) for i, v in enumerate(items)]}


def _check_text(value: str, path: str) -> None:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise _unsupported(path, "string is not valid Unicode (lone surrogate)") from e


def _encode_torch_value(value: Any) -> dict[str, Any]:
    if isinstance(value, torch.dtype):
        return {"$dtype": str(value).removeprefix("torch.")}
    if isinstance(value, torch.device):
        return {"$device": str(value)}
    return {"$size": list(value)}


def _encode_numpy(encoder: _Encoder, value: Any, path: str) -> dict[str, Any] | None:
    module = type(value).__module__
    if not module.startswith("numpy"):
        return None
    import numpy as np

    if isinstance(value, np.ndarray):
        if value.dtype.kind not in "biuf" or value.dtype.name not in NUMPY_SCALARS:
            raise _unsupported(path, f"numpy arrays of dtype {value.dtype} cannot be stored")
        native = np.ascontiguousarray(value.astype(value.dtype.newbyteorder("="), copy=False))
        return {"$ndarray": encoder.tensor(torch.from_numpy(native), path)}
    if isinstance(value, np.generic):
        name = value.dtype.name
        if name not in NUMPY_SCALARS:
            raise _unsupported(path, f"numpy scalars of dtype {name} cannot be stored")
        return {"$np": name, "value": encoder.encode(value.item(), path, 0)}
    return None


def encode(value: Any) -> Encoded:
    """The JSON tree and tensors of ``value``. Raises UnsupportedValueError naming the tree path
    of the first value that cannot be stored."""
    encoder = _Encoder()
    tree = encoder.encode(value, "", 0)
    return Encoded(tree, encoder.tensors)


# --------------------------------------------------------------------------------------------
# Decoding


class _Decoder:
    def __init__(self, tensors: Mapping[str, Any], path: str, resolve: Callable[[Any], Any]) -> None:
        self.tensors = tensors
        self.file = path
        self.resolve = resolve  # what a tensor leaf becomes (the tensor, or a description)

    def bad(self, where: str, what: str) -> errors.FormatError:
        return errors.FormatError(
            f"checkpoint state {what}",
            path=self.file,
            item=f"{format.KEY_STATE}:{where or '<root>'}",
            fix="the file was damaged or edited; restore an earlier checkpoint",
        )

    def decode(self, node: Any, where: str, depth: int) -> Any:
        if depth > MAX_DEPTH:
            raise self.bad(where, f"is nested deeper than {MAX_DEPTH} levels")
        if node is None or isinstance(node, (bool, int, float, str)):
            return node
        if isinstance(node, list):
            return [self.decode(v, f"{where}/{i}", depth + 1) for i, v in enumerate(node)]
        if not isinstance(node, dict):
            raise self.bad(where, f"holds a {type(node).__name__}")
        tags = [k for k in node if k.startswith("$")]
        if not tags:
            return {k: self.decode(v, f"{where}/{k}" if where else k, depth + 1) for k, v in node.items()}
        if len(tags) != 1 or tags[0] not in TAGS:
            raise self.bad(where, f"has unknown tag(s) {tags}")
        return self.tagged(tags[0], node, where, depth)

    def items(self, node: dict[str, Any], tag: str, where: str, depth: int) -> list[Any]:
        value = node[tag]
        if not isinstance(value, list):
            raise self.bad(where, f"{tag} must hold a list")
        return [self.decode(v, f"{where}/{i}", depth + 1) for i, v in enumerate(value)]

    def tagged(self, tag: str, node: dict[str, Any], where: str, depth: int) -> Any:
        allowed = {"$tensor": {"device"}, "$ndarray": {"device"}, "$np": {"value"}}.get(tag, set())
        extra_keys = set(node) - {tag} - allowed
        if extra_keys:
            raise self.bad(where, f"has unexpected keys {sorted(extra_keys)}")
        value = node[tag]
        if tag in ("$tensor", "$ndarray"):
            if not isinstance(value, str) or value not in self.tensors:
                raise self.bad(where, f"names tensor {value!r}, which the file does not hold")
            stored = self.tensors[value]
            if tag == "$ndarray" and _file_dtype(stored) not in NUMPY_FILE_DTYPES:
                raise self.bad(where, f"names tensor {value!r}, whose dtype numpy lacks")
            leaf = self.resolve(stored)
            return leaf.numpy() if tag == "$ndarray" and isinstance(leaf, torch.Tensor) else leaf
        if tag == "$tuple":
            return tuple(self.items(node, tag, where, depth))
        if tag == "$set":
            try:
                return set(self.items(node, tag, where, depth))
            except TypeError as e:
                raise self.bad(where, "holds a set of unhashable values") from e
        if tag == "$dict":
            return self.mapping(value, where, depth)
        if tag == "$float":
            if value not in ("nan", "inf", "-inf"):
                raise self.bad(where, f"$float must be nan, inf or -inf, not {value!r}")
            return float(value)
        if tag == "$np":
            return self.numpy_scalar(node, where, depth)
        return self.simple(tag, value, where)

    def mapping(self, value: Any, where: str, depth: int) -> dict[Any, Any]:
        if not isinstance(value, list) or not all(isinstance(p, list) and len(p) == 2 for p in value):
            raise self.bad(where, "$dict must hold [key, value] pairs")
        out: dict[Any, Any] = {}
        for i, (raw_key, raw_value) in enumerate(value):
            key = self.decode(raw_key, f"{where}/<key {i}>", depth + 1)
            try:
                out[key] = self.decode(raw_value, f"{where}/{key}", depth + 1)
            except TypeError as e:
                raise self.bad(where, f"has an unhashable key {key!r}") from e
        return out

    def numpy_scalar(self, node: dict[str, Any], where: str, depth: int) -> Any:
        import numpy as np

        name = node["$np"]
        if name not in NUMPY_SCALARS or "value" not in node:
            raise self.bad(where, f"$np must name a numpy scalar type and a value, not {name!r}")
        raw = self.decode(node["value"], where, depth + 1)
        if not isinstance(raw, (bool, int, float)):
            raise self.bad(where, "$np value must be a number")
        try:
            return np.dtype(name).type(raw)
        except (OverflowError, ValueError) as e:
            raise self.bad(where, f"$np value {raw!r} does not fit {name}") from e

    def simple(self, tag: str, value: Any, where: str) -> Any:
        try:
            if tag == "$bytes" and isinstance(value, str):
                return base64.b64decode(value.encode("ascii"), validate=True)
            if tag == "$dtype" and isinstance(value, str):
                dtype = getattr(torch, value, None)
                if isinstance(dtype, torch.dtype):
                    return dtype
            if tag == "$device" and isinstance(value, str):
                return torch.device(value)
            if tag == "$size" and isinstance(value, list) and all(type(v) is int for v in value):
                return torch.Size(value)
        except (ValueError, RuntimeError, UnicodeEncodeError) as e:
            raise self.bad(where, f"{tag} value {value!r} is invalid") from e
        raise self.bad(where, f"{tag} value {value!r} is invalid")


def _file_dtype(stored: Any) -> str | None:
    if isinstance(stored, format.TensorEntry):
        return stored.dtype
    if isinstance(stored, torch.Tensor):
        return format.name_from_dtype(stored.dtype)
    return None


def decode(
    tree: Any,
    tensors: Mapping[str, Any],
    *,
    path: str,
    resolve: Callable[[Any], Any] = lambda leaf: leaf,
) -> Any:
    """Rebuild the nested value of ``tree``; tensor leaves become ``resolve(tensors[name])``.

    ``path`` is the file the tree came from, for error messages.
    """
    return _Decoder(tensors, path, resolve).decode(tree, "", 0)


def tensor_names(tree: Any) -> set[str]:
    """Names of the tensors referenced inside a (validated) subtree."""
    found: set[str] = set()
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(node)
        elif isinstance(node, dict):
            for key in ("$tensor", "$ndarray"):
                if isinstance(node.get(key), str):
                    found.add(node[key])
            stack.extend(v for k, v in node.items() if k not in ("$tensor", "$ndarray"))
    return found
