"""The JSON schema of architecture records and of the values inside them.

A record is ``{"version": 1, "strategy": ..., ...}``. Constructor arguments are plain JSON where JSON
can say it, and a one-key tagged object where it cannot, so that a tuple stays a tuple (``(3, 3)``
and ``[3, 3]`` build different layers in places) and infinities survive::

    (3, 3)            -> {"$tuple": [3, 3]}
    {"a": 1}          -> {"$dict": {"a": 1}}
    float("inf")      -> {"$float": "inf"}
    torch.float16     -> {"$dtype": "float16"}
    nn.Linear(2, 3)   -> {"$module": {...}}      (modules strategy only)

Decoding is strict: an unknown tag, a wrong type or a tree nested too deeply is a FormatError that
names the file and the item, never a crash.
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable, Mapping

import torch

from modelkeep import errors

VERSION = 1
STRATEGIES = ("factory", "modules", "graph")
MAX_DEPTH = 64
EXTRA_PREFIX = "modelkeep."  # names of stored tensors that are not state-dict entries
# Attribute paths that may reach code generation (torch.fx) must be plain: identifiers or indices.
FQN_PATTERN = re.compile(r"[A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)*")
DOTTED_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*")

_DTYPES: dict[str, torch.dtype] = {
    name: value
    for name in (
        "float16", "bfloat16", "float32", "float64", "int8", "int16", "int32", "int64",
        "uint8", "bool", "complex64", "complex128",
    )
    if isinstance(value := getattr(torch, name), torch.dtype)
}
_DTYPE_NAMES = {value: name for name, value in _DTYPES.items()}
_SPECIAL_FLOATS = {"inf": math.inf, "-inf": -math.inf, "nan": math.nan}
TAGS = ("$tuple", "$dict", "$float", "$dtype", "$module")


# --------------------------------------------------------------------------------------------
# Values


def encode_value(
    value: Any,
    *,
    item: str,
    module: Callable[[torch.nn.Module, str], Any] | None = None,
    depth: int = 0,
) -> Any:
    """The JSON form of a constructor argument, or an ArchitectureError naming ``item``."""
    if depth > MAX_DEPTH:
        raise errors.ArchitectureError("value is nested too deeply to record", item=item)
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        if math.isfinite(value):
            return value
        return {"$float": "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")}
    if isinstance(value, torch.dtype) and value in _DTYPE_NAMES:
        return {"$dtype": _DTYPE_NAMES[value]}
    if isinstance(value, (tuple, torch.Size)):
        return {"$tuple": [encode_value(v, item=item, module=module, depth=depth + 1) for v in value]}
    if isinstance(value, list):
        return [encode_value(v, item=item, module=module, depth=depth + 1) for v in value]
    if isinstance(value, Mapping) and all(isinstance(k, str) for k in value):
        return {
            "$dict": {
                k: encode_value(v, item=f"{item}.{k}", module=module, depth=depth + 1)
                for k, v in value.items()
            }
        }
    if isinstance(value, torch.nn.Module) and module is not None:
        return {"$module": module(value, item)}
    raise errors.ArchitectureError(
        f"a value of type {type(value).__name__} cannot be recorded as JSON",
        item=item,
        fix="pass only numbers, strings, booleans, None, lists, tuples and dicts of them; "
        "or save with strategy='graph' and example_inputs",
    )


def decode_value(
    value: Any,
    *,
    path: str,
    item: str,
    module: Callable[[Any, str], torch.nn.Module] | None = None,
    depth: int = 0,
) -> Any:
    """The Python value of an encoded argument; a FormatError for anything not written by
    ``encode_value``."""
    if depth > MAX_DEPTH:
        raise bad_record(path, "value is nested too deeply", item)
    if value is None or isinstance(value, (bool, str, int, float)):
        return value
    if isinstance(value, list):
        return [decode_value(v, path=path, item=item, module=module, depth=depth + 1) for v in value]
    if not isinstance(value, dict) or len(value) != 1:
        raise bad_record(path, "value must be JSON scalar, list or a one-key tagged object", item)
    tag, inner = next(iter(value.items()))
    if tag == "$tuple" and isinstance(inner, list):
        return tuple(decode_value(v, path=path, item=item, module=module, depth=depth + 1) for v in inner)
    if tag == "$dict" and isinstance(inner, dict):
        return {
            k: decode_value(v, path=path, item=f"{item}.{k}", module=module, depth=depth + 1)
            for k, v in inner.items()
        }
    if tag == "$float" and inner in _SPECIAL_FLOATS:
        return _SPECIAL_FLOATS[inner]
    if tag == "$dtype" and inner in _DTYPES:
        return _DTYPES[inner]
    if tag == "$module" and module is not None:
        return module(inner, item)
    raise bad_record(path, f"unknown or misplaced value tag {tag!r}", item)


# --------------------------------------------------------------------------------------------
# The envelope


def bad_record(path: str | None, what: str, item: str | None = None) -> errors.FormatError:
    return errors.FormatError(
        f"architecture record: {what}",
        path=path,
        item=item,
        fix="the file was damaged or edited; re-save the model with modelkeep.save",
    )


def new_record(strategy: str, **fields: Any) -> dict[str, Any]:
    return {"version": VERSION, "strategy": strategy, **fields}


def check_envelope(record: Any, *, path: str) -> str:
    """The strategy of a decoded record, after checking its version and shape."""
    if not isinstance(record, dict):
        raise bad_record(path, "is not a JSON object")
    version = record.get("version")
    if version != VERSION:
        raise errors.FormatError(
            f"architecture record version {version!r} is not supported (this modelkeep reads "
            f"version {VERSION})",
            path=path,
            item="modelkeep.architecture",
            fix="upgrade modelkeep, or re-save the model with this version",
        )
    strategy = record.get("strategy")
    if strategy not in STRATEGIES:
        raise bad_record(path, f"unknown strategy {strategy!r} (known: {', '.join(STRATEGIES)})")
    return strategy


def string_map(record: Mapping[str, Any], key: str, *, path: str, names: re.Pattern[str]) -> dict[str, str]:
    """A ``{name: stored tensor name}`` field of a record, with every name checked."""
    value = record.get(key, {})
    if not isinstance(value, dict):
        raise bad_record(path, f"{key} must be an object", key)
    for name, stored in value.items():
        if not names.fullmatch(name) or not isinstance(stored, str) or not stored.startswith(EXTRA_PREFIX):
            raise bad_record(path, f"bad entry {name!r} -> {stored!r}", key)
    return dict(value)


def require(record: Mapping[str, Any], key: str, kind: type | tuple[type, ...], *, path: str) -> Any:
    value = record.get(key)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise bad_record(path, f"field {key!r} is missing or has the wrong type", key)
    return value
