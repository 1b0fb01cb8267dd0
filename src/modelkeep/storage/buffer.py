"""Bytes in memory and open file objects as a (read-only) storage: what ``torch.load`` takes
besides paths.

``torch.load(f)`` accepts a binary file object (an open file at any position, ``io.BytesIO``, a
zip member, a socket's stream) and code written around it passes those. :func:`from_object` turns
``bytes``/``bytearray``/``memoryview`` or a binary file object into a :class:`BufferStorage`
holding one file, named for messages (the file object's ``name``, or ``<BytesIO>``), read from
the object's current position. After a successful read, :meth:`BufferStorage.settle` leaves the
caller's file object positioned right after the object that was read, as torch does, so that
several objects saved one after another into one stream load one after another. A stream that
cannot seek is read to its end (torch refuses those; there is no going back either way).
"""

from __future__ import annotations

import io
import json
from typing import Any, BinaryIO, Sequence

from modelkeep import errors
from modelkeep.storage.base import Storage, TempFile

BYTES_NAME = "<bytes>"
READ_ONLY_FIX = "save to a path or an fsspec URL; bytes and file objects are only read"


def is_file_object(value: Any) -> bool:
    """Whether ``value`` is something torch.load reads as a file object (it has ``read``)."""
    return callable(getattr(value, "read", None))


def is_buffer(value: Any) -> bool:
    """Whether ``value`` is raw bytes (``bytes``, ``bytearray``, ``memoryview``)."""
    return isinstance(value, (bytes, bytearray, memoryview))


def object_name(value: Any) -> str:
    """How a file object or buffer is named in messages."""
    if is_buffer(value):
        return BYTES_NAME
    name = getattr(value, "name", None)
    if isinstance(name, str) and name:
        return name
    return f"<{type(value).__name__}>"


def _read_all(stream: Any, name: str) -> bytes:
    """The rest of ``stream``, refusing text streams with the fix."""
    try:
        data = stream.read()
    except OSError as e:
        raise errors.storage_error(e, name, "reading") from e
    except ValueError as e:  # closed, or opened for writing only
        raise errors.InvalidArgumentError(
            f"the file object cannot be read: {e}", path=name, item="f", fix="pass an open binary file object"
        ) from e
    if isinstance(data, str):
        raise errors.InvalidArgumentError(
            "the file object is opened in text mode", path=name, item="f",
            fix="open it in binary mode: open(path, 'rb')",
        )
    if not is_buffer(data):
        raise errors.InvalidArgumentError(
            f"the file object's read() returned {type(data).__name__}, not bytes", path=name, item="f",
            fix="pass a binary file object",
        )
    return bytes(data)


def _position(stream: Any) -> int | None:
    """The stream's position, or None when it cannot seek back to it."""
    try:
        if hasattr(stream, "seekable") and not stream.seekable():
            return None
        return int(stream.tell())
    except (OSError, ValueError, AttributeError):
        return None


def safetensors_length(data: bytes) -> int | None:
    """Where a safetensors file that starts ``data`` ends (its header and the largest tensor end),
    or None when the start does not parse (the reader then reports what is wrong)."""
    if len(data) < 8:
        return None
    length = int.from_bytes(data[:8], "little")
    if 8 + length > len(data):
        return None
    try:
        header = json.loads(data[8 : 8 + length])
        ends = [
            int(entry["data_offsets"][1])
            for key, entry in header.items()
            if key != "__metadata__" and isinstance(entry, dict)
        ]
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, RecursionError):
        return None
    return 8 + length + max(ends, default=0)


class BufferStorage(Storage):
    """One read-only file held in memory, named ``name``; writes are refused."""

    def __init__(self, data: bytes, name: str, *, stream: Any = None, start: int | None = None) -> None:
        self.data = data
        self.name = name
        self._stream = stream
        self._start = start

    def settle(self, end: int | None = None) -> None:
        """Leave the caller's file object right after the object read: ``end`` bytes into the
        buffer (None: all of it). Nothing to do for bytes, or for a stream that cannot seek."""
        if self._stream is None or self._start is None:
            return
        consumed = len(self.data) if end is None else min(end, len(self.data))
        with errors.map_os_errors(self.name, "seeking"):
            self._stream.seek(self._start + consumed)

    def trimmed(self, end: int) -> "BufferStorage":
        """The same storage holding only the first ``end`` bytes (one object of a stream)."""
        return BufferStorage(self.data[:end], self.name, stream=self._stream, start=self._start)

    # -- names -------------------------------------------------------------------------------
    def join(self, folder: str, name: str) -> str:
        return f"{folder}/{name}"

    def parent(self, path: str) -> str:
        return ""

    # -- reading -----------------------------------------------------------------------------
    def open_read(self, path: str) -> BinaryIO:
        self._check(path)
        return io.BytesIO(self.data)  # shares the bytes object's memory until written

    def size(self, path: str) -> int:
        self._check(path)
        return len(self.data)

    def exists(self, path: str) -> bool:
        return path == self.name

    def isdir(self, path: str) -> bool:
        return False

    def list_names(self, folder: str) -> list[str]:
        return []

    def _check(self, path: str) -> None:
        if path != self.name:
            raise errors.MissingFileError(
                "no such file beside an object read from memory", path=path,
                fix="a file object or bytes holds one file: pass the other files by path",
            )

    # -- writing: refused --------------------------------------------------------------------
    def _refuse(self, path: str) -> errors.StorageError:
        return errors.StorageError("cannot write into bytes or a file object being read", path=path,
                                   fix=READ_ONLY_FIX)

    def makedirs(self, folder: str) -> None:
        raise self._refuse(folder)

    def create_temp(self, final: str) -> TempFile:
        raise self._refuse(final)

    def write(self, temp: TempFile, buffers: Sequence[Any]) -> None:
        raise self._refuse(temp.final)

    def commit(self, temp: TempFile) -> None:
        raise self._refuse(temp.final)

    def discard(self, temp: TempFile) -> None:
        return None

    def remove(self, path: str) -> None:
        raise self._refuse(path)


def from_object(value: Any) -> tuple[BufferStorage, str]:
    """A storage holding the bytes of ``value`` (bytes-like, or a binary file object read from
    its current position), and the name to read.

    Raises:
        InvalidArgumentError: a text-mode or otherwise unreadable file object.
        StorageError: reading the file object failed.
    """
    name = object_name(value)
    if is_buffer(value):
        return BufferStorage(bytes(value), name), name
    start = _position(value)
    return BufferStorage(_read_all(value, name), name, stream=value, start=start), name
