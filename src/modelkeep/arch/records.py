"""The JSON schema of architecture records and of the values inside them.

A record is ``{"version": 1, "strategy": ..., ...}``. Constructor arguments are stored in the one
tagged-JSON codec of ``modelkeep.statetree``: plain JSON where JSON can say it, and a one-key tagged
object where it cannot, so that a tuple stays a tuple (``(3, 3)`` and ``[3, 3]`` build different
layers in places) and infinities survive::

    (3, 3)            -> {"$tuple": [3, 3]}
    {"a": 1}          -> {"a": 1}                (older records said {"$dict": {"a": 1}}; both
                                                  read)
    float("inf")      -> {"$float": "inf"}
    torch.float16     -> {"$dtype": "float16"}
    nn.Linear(2, 3)   -> {"$module": {...}}      (modules strategy only)

Decoding is strict: an unknown tag, a wrong type or a tree nested too deeply is a FormatError that
names the file and the item, never a crash.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Mapping

import torch

from modelkeep import errors, statetree

VERSION = 1
STRATEGIES = ("factory", "modules", "graph")
MAX_DEPTH = 64
EXTRA_PREFIX = "modelkeep."  # names of stored tensors that are not state-dict entries
# Attribute paths that may reach code generation (torch.fx) must be plain: identifiers or indices.
FQN_PATTERN = re.compile(r"[A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)*")
DOTTED_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*")
TAGS = (*statetree.PLAIN_TAGS, "$module")


# --------------------------------------------------------------------------------------------
# Values


def _unrecordable(item: str) -> Callable[[str, str], errors.ArchitectureError]:
    def fail(where: str, what: str) -> errors.ArchitectureError:
        return errors.ArchitectureError(
            f"cannot record as JSON: {what}",
            item=_item(item, where),
            fix="pass only numbers, strings, booleans, None, lists, tuples and dicts of them; "
            "or save with strategy='graph' and example_inputs",
        )

    return fail


def _item(item: str, where: str) -> str:
    return f"{item}/{where}" if where else item


def encode_value(
    value: Any,
    *,
    item: str,
    module: Callable[[torch.nn.Module, str], Any] | None = None,
    depth: int = 0,
) -> Any:
    """The JSON form of a constructor argument, in the shared codec (``modelkeep.statetree``).

    Args:
        value: the argument (plain values, and modules when ``module`` is given).
        item: the argument's name, for error messages.
        module: records a nested module (the modules strategy); ``{"$module": ...}`` holds it.
        depth: nesting already used above ``value``.

    Returns:
        A JSON-ready tree.

    Raises:
        ArchitectureError: naming ``item`` for a value that cannot be recorded.
    """
    def hook(inner: Any, where: str, _: statetree.EncodeChild) -> Any:
        if module is not None and isinstance(inner, torch.nn.Module):
            return {"$module": module(inner, _item(item, where))}
        return statetree.NOT_HANDLED

    return statetree.encode(value, fail=_unrecordable(item), hook=hook, max_depth=MAX_DEPTH - depth)


def decode_value(
    value: Any,
    *,
    path: str | None,
    item: str,
    module: Callable[[Any, str], torch.nn.Module] | None = None,
    depth: int = 0,
) -> Any:
    """The Python value of an encoded argument.

    Args:
        value: parsed JSON from a record (written by ``encode_value`` of this or an older version).
        path: the file, for error messages.
        item: the argument's name, for error messages.
        module: rebuilds a ``$module`` node (the modules strategy); without it the tag is refused.
        depth: nesting already used above ``value``.

    Returns:
        The argument's value.

    Raises:
        FormatError: for anything ``encode_value`` does not write.
    """
    def fail(where: str, what: str) -> errors.FormatError:
        return bad_record(path, f"value {what}", _item(item, where))

    hooks: dict[str, statetree.DecodeHook] = {}
    if module is not None:
        hooks["$module"] = lambda node, where, _: module(node["$module"], _item(item, where))
    return statetree.decode(value, fail=fail, hooks=hooks, max_depth=MAX_DEPTH - depth)


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
