"""Places to put files, one per storage backend, for the tests that run on every backend.

A :class:`Place` is a folder on one backend: ``path(name)`` names a file in it, ``options`` are
the ``storage_options`` its URLs need. The ``place`` fixture (``conftest.py``) yields one per
entry of :data:`BACKENDS`; a new backend (a real S3 server) is one more entry there.
"""

from __future__ import annotations

import dataclasses
import uuid
from pathlib import Path
from typing import Any, Iterator

import fsspec

from modelkeep import storage

BACKENDS = ("local", "memory")


@dataclasses.dataclass
class Place:
    """A folder on one backend: ``path(name)`` for a file in it, ``options`` for its URLs."""

    root: str
    options: dict[str, Any] | None

    def path(self, name: str) -> str:
        return f"{self.root}/{name}"

    def put(self, name: str, data: bytes) -> str:
        """Write raw bytes (a file made by another tool) and return its location."""
        location = self.path(name)
        store, where = storage.resolve(location, self.options)
        store.makedirs(store.parent(where))
        storage.write_bytes(store, where, data)
        return location

    def get(self, name: str) -> bytes:
        store, where = storage.resolve(self.path(name), self.options)
        with store.open_read(where) as stream:
            return stream.read()

    def makedirs(self, name: str) -> None:
        store, where = storage.resolve(self.path(name), self.options)
        store.makedirs(where)

    def names(self) -> list[str]:
        store, where = storage.resolve(self.root, self.options)
        return store.list_names(where)


def make_place(backend: str, tmp_path: Path) -> Iterator[Place]:
    """A fresh, empty place on ``backend``, removed afterwards."""
    if backend == "local":
        yield Place(str(tmp_path), None)
        return
    bucket = f"mk-contract-{uuid.uuid4().hex[:12]}"
    fsspec.filesystem("memory").makedirs(f"/{bucket}", exist_ok=True)
    yield Place(f"memory://{bucket}", {})
    fsspec.filesystem("memory").rm(f"/{bucket}", recursive=True)
