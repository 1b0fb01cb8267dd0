"""Nested training state <-> a JSON tree plus named tensors, without pickle.

The tree is plain JSON where it can be and a one-key tagged object where it cannot, in the one
codec of ``modelkeep.statetree`` (tuples, sets, dicts with non-string keys, non-finite floats,
numpy scalars, bytes, dtypes, sizes, devices). This module adds the tensor leaves::

    {"$tensor": "optimizer/state/0/exp_avg"}     a tensor, stored under that name in the file
                                                 (with "device": "cuda:0" beside it off the CPU)
    {"$ndarray": "rng/numpy/keys"}               a numpy array, stored as a tensor

The same tensor (the same view of the same memory, ``statetree.identity_key``) reached twice is
stored once, so tied weights and shared buffers stay one tensor. Decoding validates every node
and names the tree path of anything it refuses, because the tree comes from a file.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import torch

from modelkeep import errors, format, statetree

MAX_DEPTH = statetree.MAX_DEPTH
LEAF_TAGS = ("$tensor", "$ndarray")
TAGS = (*LEAF_TAGS, *statetree.PLAIN_TAGS)
NUMPY_FILE_DTYPES = {"BOOL", "U8", "I8", "U16", "I16", "U32", "I32", "U64", "I64", "F16", "F32", "F64"}
NUMPY_SCALARS = statetree.NUMPY_SCALARS
_LEAF_KEYS = {tag: frozenset({"device"}) for tag in LEAF_TAGS}


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


class _Leaves:
    """The encode hook: names and collects the tensors (and numpy arrays) of one tree."""

    def __init__(self) -> None:
        self.tensors: list[tuple[str, torch.Tensor]] = []
        self.names: set[str] = set()
        self.by_view: dict[tuple[Any, ...], str] = {}

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
        key = statetree.identity_key(value)
        if key is not None and key in self.by_view:
            return self.by_view[key]
        name = self.name_for(path)
        self.tensors.append((name, value.detach()))
        if key is not None:
            self.by_view[key] = name
        return name

    def __call__(self, value: Any, path: str, encode_child: statetree.EncodeChild) -> Any:
        if isinstance(value, torch.Tensor):
            tag: dict[str, Any] = {"$tensor": self.tensor(value, path)}
            if value.device.type != "cpu":
                tag["device"] = str(value.device)
            return tag
        if type(value).__module__.startswith("numpy"):
            import numpy as np

            if not isinstance(value, np.ndarray):
                return statetree.NOT_HANDLED  # numpy scalars are plain values
            if value.dtype.kind not in "biuf" or value.dtype.name not in NUMPY_SCALARS:
                raise _unsupported(path, f"numpy arrays of dtype {value.dtype} cannot be stored")
            native = np.ascontiguousarray(value.astype(value.dtype.newbyteorder("="), copy=False))
            return {"$ndarray": self.tensor(torch.from_numpy(native), path)}
        return statetree.NOT_HANDLED


def encode(value: Any) -> Encoded:
    """The JSON tree and tensors of ``value``.

    Args:
        value: nested training state (see the module docstring).

    Returns:
        The tree and ``(name, tensor)`` pairs, each distinct view stored once.

    Raises:
        UnsupportedValueError: naming the tree path of the first value that cannot be stored.
    """
    leaves = _Leaves()
    tree = statetree.encode(value, fail=_unsupported, hook=leaves, max_depth=MAX_DEPTH)
    return Encoded(tree, leaves.tensors)


# --------------------------------------------------------------------------------------------
# Decoding


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

    Args:
        tree: the parsed ``tree`` of a checkpoint's state document.
        tensors: the stored tensors (or header entries) by name.
        path: the file the tree came from, for error messages.
        resolve: what a tensor leaf becomes (the tensor, or a description of it).

    Returns:
        The nested state.

    Raises:
        FormatError: naming the tree path of the first node refused.
    """
    def bad(where: str, what: str) -> errors.FormatError:
        return errors.FormatError(
            f"checkpoint state {what}",
            path=path,
            item=f"{format.KEY_STATE}:{where or '<root>'}",
            fix="the file was damaged or edited; restore an earlier checkpoint",
        )

    def leaf(node: dict[str, Any], where: str, _: statetree.DecodeChild) -> Any:
        tag = "$tensor" if "$tensor" in node else "$ndarray"
        value = node[tag]
        if not isinstance(value, str) or value not in tensors:
            raise bad(where, f"names tensor {value!r}, which the file does not hold")
        stored = tensors[value]
        if tag == "$ndarray" and _file_dtype(stored) not in NUMPY_FILE_DTYPES:
            raise bad(where, f"names tensor {value!r}, whose dtype numpy lacks")
        resolved = resolve(stored)
        return resolved.numpy() if tag == "$ndarray" and isinstance(resolved, torch.Tensor) else resolved

    return statetree.decode(
        tree, fail=bad, hooks={tag: leaf for tag in LEAF_TAGS}, tag_keys=_LEAF_KEYS, max_depth=MAX_DEPTH
    )


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
