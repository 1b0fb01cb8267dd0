"""The storage primitives every operation speaks to, and what is written once above them.

:class:`Storage` is the small interface (DCP's ``filesystem.py`` set): open for ranged reads,
create a temporary object, commit it under its final name, list, test, remove. Above it, written
once for every backend: :func:`atomic_write` (a temporary object that replaces the destination
only when the block succeeds) and :func:`write_tensor_file` (the hashed safetensors writer).
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import os
from typing import Any, BinaryIO, Iterator, Mapping, Sequence

import torch

from modelkeep import atomic, errors, format, hashing
from modelkeep.io import buffers, writes

TEMP_SUFFIX = atomic.TEMP_SUFFIX


def is_url(location: str) -> bool:
    """True for ``scheme://...`` locations other than ``file://``."""
    scheme, sep, _ = location.partition("://")
    return bool(sep) and scheme.isidentifier() and scheme != "file"


def temp_owner_pid(name: str) -> int | None:
    """The process id in a temporary name ``.{name}.{pid}-{8 hex}.mk-tmp`` (see ``atomic``)."""
    parsed = atomic.parse_temp_name(name)
    return parsed[1] if parsed is not None else None


@dataclasses.dataclass
class TempFile:
    """A temporary object being written; becomes ``final`` on :meth:`Storage.commit`."""

    path: str
    final: str
    stream: Any  # a local file descriptor (int) or a writable binary stream

    @property
    def rewritable(self) -> bool:
        """Whether bytes already written may be overwritten (the header's digests)."""
        return isinstance(self.stream, int)


class Storage(abc.ABC):
    """The primitives every operation needs. Paths are this storage's own (OS paths or URLs)."""

    # -- names -------------------------------------------------------------------------------
    @abc.abstractmethod
    def join(self, folder: str, name: str) -> str: ...

    @abc.abstractmethod
    def parent(self, path: str) -> str: ...

    def local_path(self, path: str) -> str | None:
        """An OS path for ``path`` when the storage is the local file system."""
        return None

    # -- reading -----------------------------------------------------------------------------
    @abc.abstractmethod
    def open_read(self, path: str) -> BinaryIO:
        """A seekable binary stream (``seek``/``read``/``readinto``) of ``path``."""

    @abc.abstractmethod
    def size(self, path: str) -> int: ...

    @abc.abstractmethod
    def exists(self, path: str) -> bool: ...

    @abc.abstractmethod
    def isdir(self, path: str) -> bool: ...

    @abc.abstractmethod
    def list_names(self, folder: str) -> list[str]:
        """Names in ``folder`` (empty when it does not exist)."""

    # -- writing -----------------------------------------------------------------------------
    @abc.abstractmethod
    def makedirs(self, folder: str) -> None: ...

    @abc.abstractmethod
    def create_temp(self, final: str) -> TempFile:
        """A new temporary object beside ``final`` that only this process writes."""

    @abc.abstractmethod
    def write(self, temp: TempFile, buffers: Sequence[Any]) -> None:
        """Append byte-like ``buffers`` to ``temp``."""

    @abc.abstractmethod
    def commit(self, temp: TempFile) -> None:
        """Make ``temp``'s bytes durable and visible under ``temp.final``, atomically."""

    @abc.abstractmethod
    def discard(self, temp: TempFile) -> None:
        """Remove an uncommitted temporary object (never raises)."""

    @abc.abstractmethod
    def remove(self, path: str) -> None:
        """Delete ``path``; deleting what is gone is not an error."""

    def delete(self, path: str) -> None:  # the name the checkpoint manager uses
        self.remove(path)

    # -- operations written once above the primitives ------------------------------------------
    def read_header(self, path: str) -> format.Header:
        """The validated safetensors header of ``path``."""
        with errors.map_os_errors(path, "reading"), self.open_read(path) as stream:
            return format.read_header(stream, path=path, file_size=self.size(path))

    def read_head(self, path: str, nbytes: int) -> bytes:
        """The first ``nbytes`` of ``path`` (fewer when it is shorter)."""
        with errors.map_os_errors(path, "reading"), self.open_read(path) as stream:
            return stream.read(nbytes)

    def write_tensor_file(
        self, path: str, tensors: Sequence[tuple[str, torch.Tensor]], metadata: dict[str, str],
        *, with_hashes: bool = True,
    ) -> dict[str, str]:
        """Write a safetensors file atomically with per-tensor digests; return the digests."""
        return write_tensor_file(self, path, tensors, metadata, with_hashes=with_hashes)

    def remove_stale_temps(self, folder: str) -> list[str]:
        """Delete temporary files in ``folder`` whose writing process is gone; return their names."""
        removed = []
        for name in self.list_names(folder):
            pid = temp_owner_pid(name)
            if pid is None or atomic.process_alive(pid):
                continue
            with contextlib.suppress(errors.StorageError):
                self.remove(self.join(folder, name))
                removed.append(name)
        return removed


@contextlib.contextmanager
def atomic_write(store: Storage, path: str) -> Iterator[TempFile]:
    """Yield a temporary object that replaces ``path`` when the block ends without an error.

    On any exception the temporary object is removed and ``path`` is left as it was.
    """
    temp = store.create_temp(path)
    try:
        with errors.map_os_errors(path, "writing"):
            yield temp
            store.commit(temp)
    except BaseException:
        store.discard(temp)
        raise


def write_bytes(store: Storage, path: str, data: bytes) -> None:
    """Write ``data`` as the whole of ``path``, atomically (an index, a small JSON document).

    Raises:
        StorageError: writing failed; a file already at ``path`` is untouched.
    """
    with atomic_write(store, path) as temp:
        store.write(temp, [data])


def write_tensor_file(
    store: Storage,
    path: str,
    tensors: Sequence[tuple[str, torch.Tensor]],
    metadata: Mapping[str, str],
    *,
    with_hashes: bool = True,
) -> dict[str, str]:
    """Write a safetensors file atomically on any storage; return the per-tensor digests.

    Where the temporary file can be rewritten (local files) the digests are computed while the
    bytes stream out and filled into the header at the end (same-width placeholders); object
    stores get the digests in a hashing pass over memory first, then one streaming upload.

    Args:
        store: where to write.
        path: the final name in ``store``.
        tensors: ``(name, tensor)`` pairs in file order.
        metadata: the header's ``__metadata__`` (the hash record is added here).
        with_hashes: record per-tensor digests.

    Returns:
        ``{name: hex digest}`` of the bytes written (also when they are not recorded).

    Raises:
        StorageError: the storage failed; ``path`` is untouched.
        UnsupportedValueError: a tensor's dtype cannot be stored.
    """
    planned = [
        format.PlannedTensor(name, format.name_from_dtype(t.dtype, item=name), tuple(t.shape))
        for name, t in tensors
    ]
    metadata = dict(metadata)
    with atomic_write(store, path) as temp:
        if temp.rewritable:
            if with_hashes:
                metadata[format.KEY_HASHES] = hashing.placeholder_record(name for name, _ in tensors)
            header = format.encode_header(planned, metadata)
            writes.write_all(temp.stream, memoryview(header))
            values = writes.write_tensors(temp.stream, (t for _, t in tensors))
            digests = {name: value for (name, _), value in zip(tensors, values)}
            if with_hashes:
                final = hashing.fill_digests(header, planned, metadata, digests)
                if len(final) != len(header):  # fixed-width hex digests: cannot differ
                    raise RuntimeError("header length changed while filling in digests")
                os.pwrite(temp.stream, final, 0)
            return digests
        prepared = [(name, buffers.cpu_contiguous(t)) for name, t in tensors]
        digests = {name: hashing.digest(buffers.tensor_bytes(tensor)) for name, tensor in prepared}
        if with_hashes:
            metadata[format.KEY_HASHES] = hashing.encode_record(digests)
        store.write(temp, [format.encode_header(planned, metadata)])
        store.write(temp, [buffers.tensor_bytes(t) for _, t in prepared])
        return digests
