"""Classes a caller trusts by name, and how their objects are rebuilt without running them.

A whole pickled ``nn.Module`` names its classes (``torch.nn.modules.linear.Linear``,
``torchvision.models.resnet.ResNet``). Those in trusted namespaces are looked up (importing the
trusted module if needed, never anything else), checked to really be defined there (so a trusted
module's re-export of ``os`` or ``torch.load`` is refused), created with ``object.__new__`` (no
``__init__``) and given their saved attributes with a plain ``__dict__`` update. A class's own
``__setstate__`` is not run: its loops could be driven by the file's numbers. Modules get
``nn.Module``'s bounded defaults for attributes that older pickles lack.
"""

from __future__ import annotations

import importlib
import re
import types
from typing import Any, Iterable

import torch

from modelkeep import errors

DEFAULT_TRUST = ("torch.nn", "torchvision.models", "torchvision.ops")
_DOTTED = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")


def _is_dunder(part: str) -> bool:
    return part.startswith("__") and part.endswith("__")


class Trust:
    """Namespaces (``"torchvision.models"``) or exact names (``"mypkg.nets.Net"``) whose classes
    may be rebuilt. ``torch.nn``, ``torchvision.models`` and ``torchvision.ops`` always are."""

    def __init__(self, extra: Iterable[str] | str = ()) -> None:
        if isinstance(extra, str):
            extra = (extra,)
        names = []
        for name in extra:
            if not isinstance(name, str) or not _DOTTED.fullmatch(name):
                raise errors.UnsupportedValueError(
                    f"trust entry {name!r} is not a dotted module or class name",
                    fix="pass names such as trust=('mypackage',) or trust=('mypackage.models.Net',)",
                )
            names.append(name)
        self.names = tuple(DEFAULT_TRUST) + tuple(names)

    def allows(self, module: str, name: str) -> bool:
        full = f"{module}.{name}"
        for space in self.names:
            if module == space or module.startswith(space + ".") or full == space:
                return True
        return False


def valid_name(module: str, name: str) -> bool:
    """Dotted identifiers without dunder parts (``__main__`` is allowed as a module)."""
    if not _DOTTED.fullmatch(module) or not _DOTTED.fullmatch(name):
        return False
    if any(_is_dunder(part) for part in module.split(".") if part != "__main__"):
        return False
    return not any(_is_dunder(part) for part in name.split("."))


def resolve(module: str, name: str, trust: Trust) -> Any | None:
    """The class or function ``module.name`` when it is defined in a trusted namespace, else None.

    Only a trusted module is imported. Nested names walk class dictionaries, never attribute
    hooks of objects; the final object must itself come from a trusted namespace.
    """
    if not valid_name(module, name) or not trust.allows(module, name):
        return None
    try:
        target: Any = importlib.import_module(module)
    except Exception:  # a trusted module that cannot be imported here is simply unavailable
        return None
    for index, part in enumerate(name.split(".")):
        if index == 0:
            found = vars(target).get(part, _MISSING)
            if found is _MISSING:
                return None
        else:
            if not isinstance(target, type):
                return None
            found = vars(target).get(part, _MISSING)
            if found is _MISSING:
                return None
        target = found
    if isinstance(target, type) or isinstance(target, types.FunctionType):
        origin = getattr(target, "__module__", None)
        qualname = getattr(target, "__qualname__", None)
        if isinstance(origin, str) and isinstance(qualname, str) and trust.allows(origin, qualname):
            return target
    return None


_MISSING = object()


def can_instantiate(cls: type) -> bool:
    """Whether objects of ``cls`` can be made by ``object.__new__`` plus an attribute restore."""
    return (
        isinstance(cls, type)
        and cls.__new__ is object.__new__
        and "__slots__" not in vars(cls)
        and not issubclass(cls, (torch.Tensor, BaseException))
    )


def instantiate(cls: type) -> Any:
    return object.__new__(cls)


def restore(obj: Any, state: Any, *, describe: str) -> None:
    """Give ``obj`` the attributes in ``state`` (a dict, or pickle's ``(dict, slots)`` pair)."""
    slots = None
    if isinstance(state, tuple) and len(state) == 2:
        state, slots = state
    if slots is not None:
        raise ValueError(f"{describe}: slot state is not supported for rebuilt objects")
    if state is None:
        state = {}
    if type(state) is not dict:
        raise ValueError(f"{describe}: the saved attributes are a {type(state).__name__}, not a dict")
    for key in state:
        if type(key) is not str or _is_dunder(key):
            raise ValueError(f"{describe}: attribute name {str(key)[:80]!r} is not allowed")
    obj.__dict__.update(state)
    if isinstance(obj, torch.nn.Module):
        torch.nn.Module.__setstate__(obj, {})  # bounded: fills hook dicts older pickles lack
    if isinstance(obj, torch.nn.RNNBase):  # its weakrefs to the weights are not pickled
        names = obj.__dict__.get("_flat_weights_names")
        if type(names) is not list or len(names) > 100_000 or not all(type(n) is str for n in names):
            raise ValueError(f"{describe}: recurrent layers saved before torch 1.8 are not supported")
        obj._init_flat_weights()


# Modules whose functions run code, touch the system or unpickle more: never worth trusting
# (``modelkeep scan`` calls their globals dangerous; refusals never suggest trusting them).
DANGEROUS_MODULES = frozenset(
    """
    os posix nt subprocess sys shutil socket importlib runpy pty commands webbrowser ctypes
    code codeop marshal pickle _pickle cPickle dill cloudpickle shelve joblib multiprocessing
    asyncio signal pip setuptools distutils requests urllib urllib2 urllib3 http httplib ftplib
    smtplib telnetlib platform gc inspect threading _thread bdb pdb timeit profile cProfile trace
    zipimport pkgutil imp types builtins __builtin__ operator functools itertools io _io
    tempfile glob pathlib fileinput linecache site sysconfig ensurepip venv unittest doctest
    numpy.testing numpy.f2py numpy.distutils numpy.ctypeslib
    torch.hub torch.jit torch.fx torch.serialization torch._dynamo torch._inductor torch.utils
    torch.distributed torch.package torch.storage torch._C torch._ops torch.ops torch.library
    """.split()
)


def is_dangerous(name: str) -> bool:
    """Whether the dotted global ``name`` lives in (or under) a module of :data:`DANGEROUS_MODULES`."""
    parts = name.split(".")[:-1]
    return any(".".join(parts[:i]) in DANGEROUS_MODULES for i in range(1, len(parts) + 1))
