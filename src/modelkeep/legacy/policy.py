"""What each global, call, BUILD and persistent id of a pickle is allowed to mean.

The policy answers the machine's questions. Allowed globals map to modelkeep's builders
(``allowed.table``); classes in trusted namespaces are rebuilt without running them (``trusted``);
TorchScript's ``__torch__`` classes become records; everything else is an offence, collected with
its byte position so one error can list them all, or (``on_unknown="placeholder"``) an inert
``Placeholder``. Nothing is ever called unless it is a builder. Persistent ids (the storages a
pickle refers to) are answered by ``persistent.PersistentIds``, which the policy extends.

Two modes: ``values`` builds tensors (reading their bytes) and trusted modules; ``refs`` only
describes tensors (``TensorRef``) and never imports anything, for finding a state dict and
reading it straight into a model's memory.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import sys
import types
from typing import Any, Callable

from modelkeep import errors
from modelkeep.legacy import allowed, builders, numpy_data, tensors, trusted
from modelkeep.legacy.records import KIND_OBJECT, Placeholder, Record
from modelkeep.legacy.limits import Limits
from modelkeep.legacy.persistent import PersistentIds, StorageProvider

NAMESPACES: dict[str, type] = {"argparse.Namespace": argparse.Namespace, "types.SimpleNamespace": types.SimpleNamespace}

VALUES = "values"
REFS = "refs"
ON_UNKNOWN = ("error", "placeholder")


@dataclasses.dataclass(frozen=True)
class Sighting:
    """A global a pickle names and what the policy made of it; collected only when scanning.

    ``meaning`` is ``builder`` (built by modelkeep), ``trusted`` (a class of a trusted namespace),
    ``script`` (a TorchScript class, never run), ``unknown``, ``computed`` (a STACK_GLOBAL name
    built at run time), ``extension`` (a copyreg code) or ``trailing`` (bytes after a pickle).
    """

    module: str
    name: str
    position: int
    item: str | None
    meaning: str


@dataclasses.dataclass(frozen=True)
class Offence:
    """A global the file names that modelkeep will not build, and where."""

    name: str
    position: int
    item: str | None


class Policy(PersistentIds):
    """The meaning of one pickle's globals, calls, BUILDs and persistent ids (see module doc)."""

    def __init__(
        self,
        *,
        mode: str,
        trust: trusted.Trust,
        on_unknown: str,
        limits: Limits,
        path: str | None,
        item: str | None = None,
        storages: StorageProvider | None = None,
        loader: tensors.StorageLoader | None = None,
        nested: Callable[[bytes, "Policy", int], Any] | None = None,
        torchscript: bool = False,
        offences: list[Offence] | None = None,
        depth: int = 0,
        sightings: list[Sighting] | None = None,
        encoding: str = "utf-8",
    ) -> None:
        if on_unknown not in ON_UNKNOWN:
            raise errors.UnsupportedValueError(
                f"on_unknown must be 'error' or 'placeholder', not {on_unknown!r}",
                fix="pass on_unknown='error' (default) or on_unknown='placeholder'",
            )
        self.mode = mode
        self.trust = trust
        self.on_unknown = on_unknown
        self.limits = limits
        self.path = path
        self.item = item
        self.storages = storages or StorageProvider()
        self.loader = loader
        self.nested = nested
        self.torchscript = torchscript
        self.offences: list[Offence] = offences if offences is not None else []
        self.sightings = sightings
        self.depth = depth
        self.encoding = encoding  # how Python 2 byte strings become text (pickle's encoding=)
        self.machine: Any = None
        self._registered: dict[int, tuple[Any, str]] = {}
        self._trusted_ids: dict[int, Any] = {}
        self._storage_refs: dict[int, tuple[Any, tensors.StorageRef]] = {}
        self._storage_values: dict[tuple, Any] = {}

    @property
    def refs(self) -> bool:
        return self.mode == REFS

    def fail(self, what: str, pos: int) -> errors.FormatError:
        return errors.FormatError(
            f"{what} (pickle byte {pos})",
            path=self.path,
            item=self.item,
            fix="the file is damaged or crafted; re-download it or re-save it with torch.save",
        )

    # ------------------------------------------------------------------------ bookkeeping

    def register(self, obj: Any, kind: str) -> None:
        self._registered[id(obj)] = (obj, kind)

    def registered_kind(self, obj: Any) -> str | None:
        entry = self._registered.get(id(obj))
        return entry[1] if entry is not None and entry[0] is obj else None

    def is_registered(self, obj: Any) -> bool:
        return self.registered_kind(obj) is not None

    def check_key(self, container: Any, key: Any) -> None:
        self.machine.check_key(container, key)

    def new_record(self, type_name: str, values: dict[str, Any]) -> Any:
        """A plain-data record: a real ``argparse.Namespace``/``types.SimpleNamespace`` (classes
        with no code of their own that a state could reach), a ``Record`` for anything else."""
        namespace = NAMESPACES.get(type_name)
        result: Any = Record(type_name, values) if namespace is None else namespace()
        if namespace is not None:
            result.__dict__.update(values)  # attribute names are checked strings (builders.record)
        self.register(result, "record")
        return result

    def trusted_callable(self, value: Any) -> bool:
        entry = self._trusted_ids.get(id(value))
        return entry is not None and entry is value

    def placeholder_object(self, module: str, name: str, args: tuple, pos: int) -> Placeholder:
        return Placeholder(module, name, pos, kind=KIND_OBJECT, args=args)

    # ------------------------------------------------------------------------ globals

    def _saw(self, module: str, name: str, pos: int, meaning: str) -> None:
        if self.sightings is not None:
            self.sightings.append(Sighting(module, name, pos, self.item, meaning))

    def find_global(self, module: str, name: str, pos: int) -> Any:
        module, name = allowed.canonical(module, name)
        found = allowed.lookup(module, name)
        if found is not allowed.MISSING:
            self._saw(module, name, pos, "builder")
            return found
        if self.torchscript and (module == "__torch__" or module.startswith("__torch__.")):
            self._saw(module, name, pos, "script")
            return Placeholder(module, name, pos, trusted=True, script=True)
        if trusted.valid_name(module, name) and self.trust.allows(module, name):
            self._saw(module, name, pos, "trusted")
            if self.refs and module not in sys.modules:
                return Placeholder(module, name, pos, trusted=True)  # not imported just to check
            target = trusted.resolve(module, name, self.trust)
            if target is None:
                return self._unknown(f"{module}.{name}", pos, module, name, "not defined in a trusted namespace")
            if self.refs:  # described, never built: but checked like a real one
                record = Placeholder(module, name, pos, trusted=True)
                self._trusted_ids[id(record)] = target
                return record
            self._trusted_ids[id(target)] = target
            return target
        return self._unknown(f"{module}.{name}", pos, module, name)

    def computed_global(self, module: Any, name: Any, pos: int) -> Any:
        return self._unknown("<global with a computed name>", pos, "?", "?", meaning="computed")

    def extension(self, code: int, pos: int) -> Any:
        return self._unknown(
            f"<copyreg extension {code}>", pos, "copyreg", f"extension_{code}", meaning="extension"
        )

    def _unknown(
        self, label: str, pos: int, module: str, name: str, reason: str = "", *, meaning: str = "unknown"
    ) -> Placeholder:
        self._saw(module, name, pos, meaning)
        if self.on_unknown != "placeholder":
            self.offences.append(Offence(label + (f" ({reason})" if reason else ""), pos, self.item))
        return Placeholder(module, name, pos)

    # ------------------------------------------------------------------------ calls

    def call(self, func: Any, args: tuple, pos: int) -> Any:
        return self._invoke(func, args, {}, pos, instantiate=False)

    def new(self, cls: Any, args: tuple, kwargs: dict, pos: int) -> Any:
        return self._invoke(cls, args, kwargs, pos, instantiate=True)

    def _invoke(self, func: Any, args: tuple, kwargs: dict, pos: int, *, instantiate: bool) -> Any:
        if isinstance(func, builders.Builder):
            if func.fn is None:
                raise self.fail(f"{func.qualname} cannot be called here", pos)
            if func.tensor and any(isinstance(a, Placeholder) for a in args):
                return Placeholder("modelkeep", func.qualname, pos, kind=KIND_OBJECT, args=args)
            try:
                return func.fn(self, args, kwargs, pos)
            except (TypeError, ValueError, OverflowError, RuntimeError, IndexError, KeyError) as e:
                if isinstance(e, errors.ModelkeepError):
                    raise
                raise self.fail(f"{func.qualname}: {str(e)[:300]}", pos) from e
        if isinstance(func, Placeholder):
            known = self._trusted_ids.get(id(func))
            if known is not None:
                self._check_trusted_use(known, args, kwargs, pos)
            return Placeholder(
                func.module, func.name, pos, kind=KIND_OBJECT, args=args, kwargs=kwargs,
                trusted=func.trusted, script=func.script,
            )
        if self.trusted_callable(func):
            self._check_trusted_use(func, args, kwargs, pos)
            obj = trusted.instantiate(func)
            self.register(obj, "trusted")
            return obj
        what = "called" if not instantiate else "instantiated"
        raise self.fail(f"a {type(func).__name__} value cannot be {what}", pos)

    def _check_trusted_use(self, target: Any, args: tuple, kwargs: dict, pos: int) -> None:
        """Trusted names are only ever instantiated empty (then given attributes), never called."""
        label = f"{getattr(target, '__module__', '?')}.{getattr(target, '__qualname__', '?')}"
        if not isinstance(target, type):
            raise self.fail(f"{label} is a function; modelkeep never calls functions named by a file", pos)
        if args or kwargs:
            raise self.fail(f"{label} would be constructed with arguments, which runs its code", pos)
        if not trusted.can_instantiate(target):
            raise self.fail(f"{label} cannot be rebuilt without running its code", pos)

    # ------------------------------------------------------------------------ BUILD, append, setitem

    def build(self, obj: Any, state: Any, pos: int) -> None:
        kind = self.registered_kind(obj)
        try:
            if isinstance(obj, Placeholder):
                obj.state = state
            elif kind == "record":
                self._restore_record(obj, state)
            elif kind == "trusted":
                trusted.restore(obj, state, describe=type(obj).__qualname__)
            elif kind == "np_dtype":
                numpy_data.build_dtype(obj, state)
            elif kind == "np_array":
                numpy_data.build_array(obj, state, max_ndim=self.limits.max_ndim, is_ours=self.is_registered)
            elif kind == "partial":
                self._restore_partial(obj, state)
            elif type(obj) is collections.OrderedDict:
                self._attributes(obj, state)
            else:
                raise self.fail(f"BUILD cannot give state to a {type(obj).__name__}", pos)
        except (TypeError, ValueError, OverflowError) as e:
            if isinstance(e, errors.ModelkeepError):
                raise
            raise self.fail(f"BUILD: {str(e)[:300]}", pos) from e

    def _restore_record(self, record: Any, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2 and state[1] is None:
            state = state[0]
        if state is None:
            return
        if type(state) is not dict:
            raise ValueError("a record's state must be a dict")
        for key, value in state.items():
            if type(key) is not str:
                raise ValueError("record attribute names must be strings")
            if isinstance(record, Record):
                record[key] = value
            else:  # a namespace: its __dict__, so no name (``__class__`` included) reaches a setter
                record.__dict__[key] = value

    def _attributes(self, obj: Any, state: Any) -> None:
        if type(state) is not dict or not all(type(k) is str and not k.startswith("__") for k in state):
            raise ValueError("attributes must be a dict of plain names")
        obj.__dict__.update(state)

    def _restore_partial(self, obj: functools.partial, state: Any) -> None:
        if type(state) is not tuple or len(state) != 4:
            raise ValueError("functools.partial state must have four parts")
        func, args, kwds, namespace = state
        if func is not obj.func or type(args) is not tuple:
            raise ValueError("functools.partial state does not match its function")
        if kwds is not None and (type(kwds) is not dict or not all(type(k) is str for k in kwds)):
            raise ValueError("functools.partial keywords must be a dict of names")
        if namespace is not None and type(namespace) is not dict:
            raise ValueError("functools.partial attributes must be a dict")
        obj.__setstate__((func, args, kwds or {}, namespace))

    def extend(self, obj: Any, items: list, pos: int) -> None:
        if isinstance(obj, Placeholder):
            obj.appended.extend(items)
        elif self.registered_kind(obj) == "deque":
            obj.extend(items)
        else:
            raise self.fail(f"cannot append to a {type(obj).__name__}", pos)

    def set_items(self, obj: Any, pairs: list, pos: int) -> None:
        if isinstance(obj, Placeholder):
            obj.pairs.extend(zip(pairs[0::2], pairs[1::2]))
        else:
            raise self.fail(f"cannot set items on a {type(obj).__name__}", pos)
