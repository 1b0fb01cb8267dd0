"""Where bytes live: local files, or any fsspec URL (``memory://``, ``s3://``, ...), behind a few
primitives, with the atomic, hashed file writer written once above them.

Every public operation resolves its location with :func:`resolve` (a path or a URL plus
``storage_options``) and then speaks only to the returned :class:`Storage`. The primitives are
DCP's ``filesystem.py`` set: open for ranged reads, create a temporary object, commit it under its
final name, list, test, remove. Locally a commit is fsync + rename + folder fsync (a crash leaves
the old file or the new one); on an object store it is a whole-object upload to a temporary key
followed by a move, so a reader never sees a partial object under the final name.

Fast paths stay where they pay: :meth:`Storage.local_path` gives the byte engine an OS path (for
its parallel ``preadv`` and mapping reads), and a local temporary file can be rewritten in place
(the digests are filled into the header after the tensors streamed out). Remote backends get the
same bytes through plain streams.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

from modelkeep import errors

from modelkeep.storage.base import (
    TEMP_SUFFIX,
    Storage,
    TempFile,
    atomic_write,
    is_url,
    temp_owner_pid,
    write_bytes,
    write_tensor_file,
)
from modelkeep.storage.local import LOCAL, LocalStorage
from modelkeep.storage.remote import FsspecStorage

__all__ = [
    "LOCAL",
    "TEMP_SUFFIX",
    "FsspecStorage",
    "LocalStorage",
    "Storage",
    "TempFile",
    "atomic_write",
    "is_url",
    "resolve",
    "temp_owner_pid",
    "write_bytes",
    "write_tensor_file",
]


def resolve(
    location: str | os.PathLike[str], storage_options: Mapping[str, Any] | None = None
) -> tuple["Storage", str]:
    """The storage holding ``location`` and the path to use inside it.

    Args:
        location: an OS path, a ``file://`` URL or any fsspec URL.
        storage_options: passed to the fsspec file system (credentials, endpoint, ...); local
            paths need none and ignore them (so one set serves an operation on a local file and
            a URL, such as a conversion).

    Returns:
        ``(storage, path)``: local paths are returned as given (errors name what the user typed).

    Raises:
        StorageError: the URL's scheme has no installed fsspec backend.
        InvalidArgumentError: ``location`` is not a path or URL.
    """
    if not isinstance(location, (str, os.PathLike)):
        raise errors.InvalidArgumentError(
            f"takes a path or an fsspec URL, not a {type(location).__name__}", item="path",
            fix="pass a path or a URL (reads also take bytes and binary file objects)",
        )
    location = os.fspath(location)
    if location.startswith("file://"):
        location = location[len("file://") :]
    if is_url(location):
        return FsspecStorage.from_url(location, **dict(storage_options or {})), location
    return LOCAL, location
