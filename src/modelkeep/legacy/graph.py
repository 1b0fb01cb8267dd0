"""Final checks on a result: nesting depth and size once shared parts are counted each time.

A pickle can reuse a value through its memo, so a few kilobytes can describe a list of lists of
lists whose unfolded size is astronomical ("billion laughs"), or nest containers far deeper than
Python code that walks them can recurse. Both are refused here, by one iterative walk that visits
every distinct value once.
"""

from __future__ import annotations

import collections
import functools
from typing import Any, Iterable

import torch

from modelkeep import errors
from modelkeep.legacy import tensors
from modelkeep.legacy.records import Placeholder
from modelkeep.legacy.limits import Limits

_LEAVES = (str, bytes, bytearray, int, float, complex, bool, type(None), torch.dtype, torch.device)


def children(node: Any) -> Iterable[Any]:
    """The values inside ``node`` that the reader built."""
    if isinstance(node, (list, tuple, set, frozenset, collections.deque)):
        return node
    if isinstance(node, dict):
        extra = list(vars(node).values()) if hasattr(node, "__dict__") else []
        return [*node.keys(), *node.values(), *extra]
    if isinstance(node, Placeholder):
        return [*node.args, *node.kwargs.values(), node.state, *node.appended, *(v for pair in node.pairs for v in pair)]
    if isinstance(node, tensors.TensorRef):
        return list((node.attributes or {}).values())
    if isinstance(node, tensors.DeferredTensor):
        return node.args
    if isinstance(node, functools.partial):
        return [node.func, *node.args, *node.keywords.values()]
    if isinstance(node, torch.Tensor):
        return list((getattr(node, "__dict__", None) or {}).values())
    if isinstance(node, torch.nn.Module):
        return list(vars(node).values())
    if type(node).__module__ == "numpy" and getattr(getattr(node, "dtype", None), "hasobject", False):
        return list(node.flat) if hasattr(node, "flat") else []
    return ()


def check(value: Any, *, limits: Limits, path: str | None, item: str | None) -> None:
    """Raise FormatError when ``value`` nests deeper than ``limits.max_depth`` or unfolds to more
    than ``limits.max_expanded`` values."""
    size: dict[int, int] = {}
    height: dict[int, int] = {}
    entered: set[int] = set()
    stack: list[tuple[Any, bool, int]] = [(value, False, 0)]
    cap = limits.max_expanded + 1
    while stack:
        node, done, depth = stack.pop()
        key = id(node)
        if done:
            entered.discard(key)
            total, tallest = 1, 0
            for child in children(node):
                if isinstance(child, _LEAVES):
                    total += 1
                    continue
                child_key = id(child)
                total += size.get(child_key, 1)
                tallest = max(tallest, height.get(child_key, 0) + 1)
            if tallest > limits.max_depth:
                raise _error(f"values are nested more than {limits.max_depth} levels deep", path, item)
            if total > limits.max_expanded:
                raise _error(
                    f"shared values unfold to more than {limits.max_expanded} values "
                    "(an exponential structure built from the pickle memo)",
                    path,
                    item,
                )
            size[key] = min(total, cap)
            height[key] = tallest
            continue
        if key in size or key in entered or isinstance(node, _LEAVES):
            continue
        if depth > limits.max_depth:
            raise _error(f"values are nested more than {limits.max_depth} levels deep", path, item)
        entered.add(key)
        stack.append((node, True, depth))
        for child in children(node):
            if not isinstance(child, _LEAVES) and id(child) not in size and id(child) not in entered:
                stack.append((child, False, depth + 1))


def _error(what: str, path: str | None, item: str | None) -> errors.FormatError:
    return errors.FormatError(
        what, path=path, item=item, fix="the file was crafted to exhaust readers; do not use it"
    )
