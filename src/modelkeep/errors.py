"""The exception tree of modelkeep.

Every failure on bad input is one of these, and each names the file, the item and the fix, so a
user can act on the message alone. Each class also inherits the built-in exception that code
written against torch or the standard library already catches::

    ModelkeepError (Exception)
    ├── FormatError (ValueError)            the bytes are not a valid file of a supported format
    │   └── UnsafeContentError              the file asks for code to run (pickle globals, ...)
    ├── IntegrityError (ValueError)         stored digests or expected hashes do not match
    ├── KeyMismatchError (KeyError)         file and model disagree on names or shapes
    ├── ArchitectureError (TypeError)       a model cannot be recorded or rebuilt safely
    ├── UnsupportedValueError (TypeError)   a value cannot be saved in this kind of file
    └── StorageError (OSError)              the file system or object store failed
"""

from __future__ import annotations

import os

__all__ = [
    "ArchitectureError",
    "FormatError",
    "IntegrityError",
    "KeyMismatchError",
    "ModelkeepError",
    "StorageError",
    "UnsafeContentError",
    "UnsupportedValueError",
    "reading_failed",
]


class ModelkeepError(Exception):
    """Root of every modelkeep error: ``what`` happened to ``item`` in ``path``; ``fix`` says how to
    get past it."""

    def __init__(
        self,
        what: str,
        *,
        path: str | os.PathLike[str] | None = None,
        item: str | None = None,
        fix: str | None = None,
    ) -> None:
        self.what = what
        self.path = os.fspath(path) if path is not None else None
        self.item = item
        self.fix = fix
        super().__init__(self._message())

    def _message(self) -> str:
        parts = []
        if self.path is not None:
            parts.append(f"{self.path}")
        if self.item is not None:
            parts.append(f"{self.item!r}")
        text = ": ".join(parts + [self.what]) if parts else self.what
        if self.fix:
            text += f" (fix: {self.fix})"
        return text

    def __str__(self) -> str:  # KeyError would otherwise print the repr of the message
        return self._message()


class FormatError(ModelkeepError, ValueError):
    """The file is not a valid file of any format modelkeep reads."""


class UnsafeContentError(FormatError):
    """The file would need code to run (an untrusted pickle global, an untrusted factory)."""


class IntegrityError(ModelkeepError, ValueError):
    """Bytes do not match their recorded or expected digest."""


class KeyMismatchError(ModelkeepError, KeyError):
    """The names or shapes in a file do not match the model they are loaded into."""


class ArchitectureError(ModelkeepError, TypeError):
    """A model's structure cannot be recorded, or a recorded one cannot be rebuilt safely."""


class UnsupportedValueError(ModelkeepError, TypeError):
    """A value cannot be stored in the requested kind of file."""


class StorageError(ModelkeepError, OSError):
    """Reading or writing bytes failed in the file system or object store."""


def reading_failed(e: OSError, path: str) -> StorageError:
    """The StorageError for an OSError met while opening or reading ``path``."""
    if isinstance(e, FileNotFoundError):
        return StorageError("no such file", path=path, fix="check the path; save the file first")
    if isinstance(e, IsADirectoryError):
        return StorageError("is a folder, not a file", path=path, fix="name a file")
    if isinstance(e, PermissionError):
        return StorageError("permission denied", path=path, fix="check the file's permissions")
    return StorageError(f"cannot read: {e.strerror or e}", path=path, fix="check the path and the disk")


def storage_error(e: BaseException, path: str, action: str) -> StorageError:
    """The StorageError for an OSError (or an fsspec backend's failure) while ``action`` on ``path``."""
    if isinstance(e, StorageError):
        return e
    if isinstance(e, OSError) and action == "reading":
        return reading_failed(e, path)
    import errno

    fixes = {
        errno.ENOSPC: "free disk space or save elsewhere; the previous file is untouched",
        errno.EDQUOT: "free quota or save elsewhere; the previous file is untouched",
        errno.EFBIG: "the file exceeds a size limit of this file system or process (ulimit -f)",
        errno.EACCES: "check the folder's permissions",
        errno.EROFS: "save to a writable location",
        errno.ENOENT: "check the path",
    }
    reason = getattr(e, "strerror", None) or str(e) or type(e).__name__
    return StorageError(f"{action} failed: {reason}", path=path,
                        fix=fixes.get(getattr(e, "errno", None) or 0, "check the disk or the store"))


import contextlib as _contextlib


@_contextlib.contextmanager
def map_os_errors(path: str, action: str):  # type: ignore[no-untyped-def]
    """Turn OSErrors (and fsspec failures) inside the block into StorageErrors naming ``path``."""
    try:
        yield
    except ModelkeepError:
        raise
    except OSError as e:
        raise storage_error(e, path, action) from e
