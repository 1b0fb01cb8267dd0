"""Proving that an architecture record rebuilds the model it came from.

Verification compares what a state dict cannot show as well as what it can: every parameter and
buffer name and shape, and per submodule its class, ``extra_repr()`` and plain public attributes
(an ``Inception3`` built for pretrained weights differs only in ``transform_input``; a replaced
activation or a changed dropout rate changes no tensor). It works on meta-device models, so a
record is checked at save time without allocating or initialising anything.
"""

from __future__ import annotations

import enum
import functools
import types
from typing import Any, Mapping

import torch

from modelkeep import errors

MAX_SHOWN = 12


def shapes_of(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    state = model.state_dict(keep_vars=True)
    return {name: tuple(t.shape) for name, t in state.items() if isinstance(t, torch.Tensor)}


def check_shapes(
    actual: Mapping[str, tuple[int, ...]],
    expected: Mapping[str, tuple[int, ...]],
    *,
    what: str,
    path: str | None = None,
    error: type[errors.ModelkeepError] = errors.ArchitectureError,
) -> None:
    lines = [f"  only in the rebuilt model: {n}" for n in actual if n not in expected]
    lines += [f"  missing from the rebuilt model: {n}" for n in expected if n not in actual]
    lines += [
        f"  shape differs: {n}: rebuilt {list(actual[n])}, expected {list(expected[n])}"
        for n in expected
        if n in actual and tuple(actual[n]) != tuple(expected[n])
    ]
    if lines:
        raise error(
            f"{what} does not rebuild the same parameters and buffers ({len(lines)} differences):\n"
            + "\n".join(_shown(lines))
            + "\n",
            path=path,
            item="modelkeep.architecture",
            fix="record the arguments the model was built with, or save with strategy='graph' and "
            "example_inputs",
        )


_SKIP = object()


def _plain(value: Any, depth: int = 0) -> Any:
    """A comparable form of an attribute value, or _SKIP for values that are not configuration."""
    if depth > 8:
        return _SKIP
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, enum.Enum):
        return f"{type(value).__name__}.{value.name}"
    if isinstance(value, torch.dtype):
        return str(value)
    if isinstance(value, (types.FunctionType, types.BuiltinFunctionType)):
        return f"function {getattr(value, '__module__', '')}.{getattr(value, '__qualname__', '')}"
    if isinstance(value, functools.partial):
        return _plain(value.func, depth + 1)
    if isinstance(value, (list, tuple)):
        items = [_plain(v, depth + 1) for v in value]
        return _SKIP if any(v is _SKIP for v in items) else items
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        pairs = {k: _plain(v, depth + 1) for k, v in value.items()}
        return _SKIP if any(v is _SKIP for v in pairs.values()) else pairs
    return _SKIP


def fingerprint(model: torch.nn.Module) -> dict[str, dict[str, Any]]:
    """Per submodule: class, ``extra_repr()`` and plain public attributes (no tensors)."""
    out: dict[str, dict[str, Any]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        cls = type(module)
        entry: dict[str, Any] = {"class": f"{cls.__module__}.{cls.__qualname__}"}
        try:
            entry["extra_repr"] = module.extra_repr()
        except Exception:  # extra_repr of an exotic module reading tensor values on meta
            entry["extra_repr"] = "?"
        for key, value in vars(module).items():
            if key.startswith("_") or key == "training":
                continue
            plain = _plain(value)
            if plain is not _SKIP:
                entry[key] = plain
        out[name or "(root)"] = entry
    return out


def check_same_structure(
    original: torch.nn.Module, rebuilt: torch.nn.Module, *, what: str, path: str | None = None
) -> None:
    """ArchitectureError unless ``rebuilt`` has the names, shapes, classes and settings of
    ``original``."""
    check_shapes(shapes_of(rebuilt), shapes_of(original), what=what, path=path)
    left, right = fingerprint(original), fingerprint(rebuilt)
    lines = [f"  only in the saved model: {n}" for n in left if n not in right]
    lines += [f"  only in the rebuilt model: {n}" for n in right if n not in left]
    for name, attrs in left.items():
        other = right.get(name)
        if other is None:
            continue
        for key in sorted(set(attrs) | set(other)):
            if attrs.get(key, "<absent>") != other.get(key, "<absent>"):
                lines.append(
                    f"  {name}: {key}: saved {attrs.get(key, '<absent>')!r}, rebuilt "
                    f"{other.get(key, '<absent>')!r}"
                )
    if lines:
        raise errors.ArchitectureError(
            f"{what} rebuilds a different model ({len(lines)} differences):\n"
            + "\n".join(_shown(lines))
            + "\n",
            path=path,
            item="modelkeep.architecture",
            fix="record the arguments the model was built with (factory={'factory': ..., "
            "'kwargs': {...}}), or save with strategy='graph' and example_inputs",
        )


def _shown(lines: list[str]) -> list[str]:
    if len(lines) <= MAX_SHOWN:
        return lines
    return lines[:MAX_SHOWN] + [f"  ... and {len(lines) - MAX_SHOWN} more"]
