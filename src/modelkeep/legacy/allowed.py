"""Every global a pickle may name, and what it means: ``(module, name) -> Builder or value``.

Anything not listed here is either a class of a trusted namespace (``trusted``), a TorchScript
record, or an offence. Protocols 0-2 write some names the Python 2 way (``__builtin__.set``,
``copy_reg._reconstructor``); they are mapped to their Python 3 names first.
"""

from __future__ import annotations

import functools
from typing import Any

from modelkeep.legacy import builders, tensor_builders

MODULE_ALIASES = {"__builtin__": "builtins", "copy_reg": "copyreg"}
NAME_ALIASES = {
    ("builtins", "unicode"): ("builtins", "str"),
    ("builtins", "long"): ("builtins", "int"),
    ("builtins", "xrange"): ("builtins", "range"),
}
MISSING = object()


@functools.cache
def table() -> dict[tuple[str, str], Any]:
    return {**builders.stdlib_table(), **builders.numpy_table(), **tensor_builders.table()}


def canonical(module: str, name: str) -> tuple[str, str]:
    module = MODULE_ALIASES.get(module, module)
    return NAME_ALIASES.get((module, name), (module, name))


def lookup(module: str, name: str) -> Any:
    """The builder or value of an allowed global, or ``MISSING``."""
    return table().get(canonical(module, name), MISSING)
