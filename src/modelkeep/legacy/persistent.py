"""Persistent ids: how a pickle refers to the storages (and, in old files, module sources) that
live outside it, and the storage values built for them.

``PersistentIds`` is the part of ``policy.Policy`` that answers ``persistent``/``persistent_text``:
it checks each storage id (kind, key, location, size, view) before asking the container's
``StorageProvider`` where the bytes are, keeps one storage object per storage (as ``torch.load``
gives), and remembers which storage value stands for which ``StorageRef`` so tensors can be built
on it. It relies on the policy's ``storages``, ``loader``, ``refs``, ``limits``, ``depth``,
``nested``, ``fail`` and ``find_global``.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from modelkeep import errors
from modelkeep.legacy import tensors
from modelkeep.legacy.records import Placeholder


class StorageProvider:
    """Where a container's storages are; each container implements ``storage`` (and, for the
    pre-1.0 tar format, ``tensor``)."""

    def storage(self, kind: tensors.StorageType, key: str, numel: int, view: Any, pos: int) -> tensors.StorageRef:
        raise ValueError("this pickle may not refer to storages")

    def tensor(self, key: str, pos: int) -> Any:
        raise ValueError("this pickle may not refer to tensors by key")


_PID_MODULE = re.compile(r"\('module', <class '([\w.]+)'>, ")
_PID_TEXT = re.compile(
    r"\('storage', <class '([\w.]+)'>, '(\w+)', '([\w:]+)', (\d+)(?:, (None|\('(\w+)', (\d+), (\d+)\)))?\)"
)


class PersistentIds:
    """The persistent-id answers of a policy (see the module docstring)."""

    storages: StorageProvider
    loader: Any
    nested: Any
    depth: int
    limits: Any
    _storage_refs: dict[int, tuple[Any, tensors.StorageRef]]
    _storage_values: dict[tuple, Any]

    @property
    def refs(self) -> bool:  # overridden by the policy
        raise NotImplementedError

    def fail(self, what: str, pos: int) -> errors.FormatError:  # provided by the policy
        raise NotImplementedError

    def find_global(self, module: str, name: str, pos: int) -> Any:  # provided by the policy
        raise NotImplementedError


    def persistent(self, pid: Any, pos: int) -> Any:
        try:
            return self._persistent(pid, pos)
        except (TypeError, ValueError, OverflowError) as e:
            if isinstance(e, errors.ModelkeepError):
                raise
            raise self.fail(f"persistent id: {str(e)[:300]}", pos) from e

    def _persistent(self, pid: Any, pos: int) -> Any:
        if type(pid) is str:
            if not pid.isdigit() or len(pid) > 40:
                raise ValueError("a text persistent id must be a storage key")
            return self.storages.tensor(pid, pos)
        if type(pid) is not tuple or not pid:
            raise ValueError(f"a persistent id must be a tuple, not a {type(pid).__name__}")
        tag = pid[0].decode("ascii") if isinstance(pid[0], bytes) else pid[0]
        if tag == "module" and len(pid) == 4:
            return pid[1]
        if tag != "storage":
            if isinstance(pid[0], Placeholder) or (len(pid) == 3 and isinstance(pid[0], type)):
                return pid[0]  # pre-1.0 module references: (class, source file, source)
            raise ValueError(f"unknown persistent id kind {str(tag)[:40]!r}")
        if len(pid) == 5:
            kind, key, location, numel = pid[1:]
            view = None
        elif len(pid) == 6:
            kind, key, location, numel, view = pid[1:]
        else:
            raise ValueError("a storage persistent id has 5 or 6 parts")
        if isinstance(kind, Placeholder):
            return kind  # already an offence
        if not isinstance(kind, tensors.StorageType):
            raise ValueError("a storage persistent id must name a storage type")
        if isinstance(key, bytes):
            key = key.decode("ascii")
        if isinstance(location, bytes):
            location = location.decode("ascii")
        if type(key) is not str or not re.fullmatch(r"\w{1,64}", key):
            raise ValueError("storage keys are short names")
        if type(location) is not str or len(location) > 64:
            raise ValueError("storage location must be a short device name")
        if type(numel) is not int or not 0 <= numel < tensors.MAX_ELEMENTS:
            raise ValueError("storage size must be a non-negative integer")
        ref = self.storages.storage(kind, key, numel, view, pos)
        ref.location = location  # where torch.load would restore it (see ``io.placement``)
        return self._storage_value(ref, kind)

    def persistent_text(self, text: str, pos: int) -> Any:
        """Protocol 0 writes a persistent id as its repr; only storage ids are understood."""
        if text.isdigit():
            return self.persistent(text, pos)
        module_match = _PID_MODULE.match(text)
        if module_match is not None:  # ('module', <class '...'>, source file, source): the class
            module, _, name = module_match.group(1).rpartition(".")
            return self.find_global(module, name, pos)
        match = _PID_TEXT.fullmatch(text)
        if match is None:
            raise self.fail("unrecognised text persistent id", pos)
        cls, key, location, numel, view_text, view_key, view_offset, view_size = match.groups()
        module, _, name = cls.rpartition(".")
        kind = self.find_global(module, name, pos)
        view = None if view_text in (None, "None") else (view_key, int(view_offset), int(view_size))
        pid: tuple = ("storage", kind, key, location, int(numel))
        if view_text is not None:
            pid += (view,)
        return self.persistent(pid, pos)

    def _storage_value(self, ref: tensors.StorageRef, kind: tensors.StorageType) -> Any:
        if self.refs:
            return ref
        key = (id(ref.blob), ref.start, ref.nbytes, ref.dtype, kind.untyped)
        known = self._storage_values.get(key)
        if known is not None:  # one storage object per storage, as torch.load gives
            return known
        untyped = self.loader.storage(ref)
        value: Any = untyped if kind.untyped else torch.storage.TypedStorage(
            wrap_storage=untyped, dtype=ref.dtype, _internal=True
        )
        self._storage_refs[id(value)] = (value, ref)
        self._storage_values[key] = value
        return value

    def storage_ref(self, value: Any) -> tensors.StorageRef:
        if isinstance(value, tensors.StorageRef):
            return value
        entry = self._storage_refs.get(id(value))
        if entry is None or entry[0] is not value:
            raise ValueError("a tensor must be built on a storage read from the file")
        return entry[1]

    def nested_storage(self, data: bytes, pos: int) -> Any:
        if self.nested is None or self.depth >= self.limits.max_nested_archives:
            raise ValueError("torch.save data nested this deep is not read")
        return self.nested(data, self, pos)
