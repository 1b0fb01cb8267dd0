"""The exception tree of modelkeep, and the one place where OS errors become modelkeep errors.

Every failure on bad input is one of these, and each names the file, the item and the fix, so a
user can act on the message alone. Each class also inherits the built-in exception that code
written against torch or the standard library already catches::

    ModelkeepError (Exception)
    ├── FormatError (ValueError)               the bytes are not a valid file of a supported format
    │   └── UnsafeContentError (pickle.UnpicklingError)  the file asks for code to run (pickle globals, ...)
    ├── IntegrityError (ValueError)            stored digests or expected hashes do not match
    ├── KeyMismatchError (KeyError)            file and model disagree on names or shapes
    ├── ArchitectureError (TypeError)          a model cannot be recorded or rebuilt safely
    ├── UnsupportedValueError (TypeError)      a value cannot be saved in this kind of file
    ├── InvalidArgumentError (ValueError)      an argument is out of its allowed values
    └── StorageError (OSError)                 the file system or object store failed
        ├── MissingFileError (FileNotFoundError)       no such file or folder
        │   └── StepNotFoundError                      no committed checkpoint for the step asked
        ├── FileExistsStorageError (FileExistsError)   the name is taken
        │   └── StepExistsError                        a checkpoint step is already saved
        ├── PermissionStorageError (PermissionError)   the OS refused access
        ├── IsAFolderError (IsADirectoryError)         a folder where a file was needed
        └── NotAFolderError (NotADirectoryError)       a file where a folder was needed

OS errors are turned into ``StorageError`` at the boundary, by :func:`map_os_errors` (a context
manager) or :func:`storage_error` (for an ``except`` clause), never by hand: the reason and the fix
for each errno (ENOENT, EACCES, ENOSPC, EDQUOT, EFBIG, EROFS, ...) are written once, below, and the
error is of the most specific class, so ``except FileNotFoundError`` around ``modelkeep.read``
works as it does around ``torch.load``; likewise ``except pickle.UnpicklingError`` catches a
refused global, as it catches torch's ``weights_only`` refusals.
"""

from __future__ import annotations

import contextlib
import errno as errnos
import os
import pickle
from typing import Any, Iterator

__all__ = [
    "ArchitectureError",
    "FileExistsStorageError",
    "FormatError",
    "IntegrityError",
    "InvalidArgumentError",
    "IsAFolderError",
    "KeyMismatchError",
    "MissingFileError",
    "ModelkeepError",
    "NotAFolderError",
    "PermissionStorageError",
    "StepExistsError",
    "StepNotFoundError",
    "StorageError",
    "UnsafeContentError",
    "UnsupportedValueError",
    "map_os_errors",
    "storage_error",
]

PathArg = str | os.PathLike[str] | None


class ModelkeepError(Exception):
    """Root of every modelkeep error: ``what`` happened to ``item`` in ``path``; ``fix`` says how to
    get past it."""

    def __init__(
        self,
        what: str,
        *,
        path: PathArg = None,
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


class UnsafeContentError(FormatError, pickle.UnpicklingError):
    """The file would need code to run (an untrusted pickle global, an untrusted factory)."""

    globals: list[tuple[str, list[str]]]
    """Each offending global (``"module.name"``) with the places the file names it (``"byte 12"``,
    ``"data.pkl byte 40"``), in the order first met; empty when the error is not about globals."""

    def __init__(
        self,
        what: str,
        *,
        path: PathArg = None,
        item: str | None = None,
        fix: str | None = None,
        globals: list[tuple[str, list[str]]] | None = None,  # noqa: A002 - the field's name
    ) -> None:
        self.globals = list(globals or [])
        super().__init__(what, path=path, item=item, fix=fix)


class IntegrityError(ModelkeepError, ValueError):
    """Bytes do not match their recorded or expected digest."""


class KeyMismatchError(ModelkeepError, KeyError):
    """The names or shapes in a file do not match the model they are loaded into."""

    report: Any
    """The ``modelkeep.LoadReport`` of the failed load (``missing``, ``unexpected``,
    ``shape_mismatches``) when ``load_weights``/``load_state_dict`` raised it, else None. Typed
    ``Any`` because the report class lives above this layer."""

    def __init__(
        self,
        what: str,
        *,
        path: PathArg = None,
        item: str | None = None,
        fix: str | None = None,
        report: Any = None,
    ) -> None:
        self.report = report
        super().__init__(what, path=path, item=item, fix=fix)


class ArchitectureError(ModelkeepError, TypeError):
    """A model's structure cannot be recorded, or a recorded one cannot be rebuilt safely."""


class UnsupportedValueError(ModelkeepError, TypeError):
    """A value cannot be stored in the requested kind of file."""


class InvalidArgumentError(ModelkeepError, ValueError):
    """An argument of a public call is outside its allowed values (``item`` names the argument)."""


class StorageError(ModelkeepError, OSError):
    """Reading or writing bytes failed in the file system or object store.

    ``errno`` is the OS error number when the failure came from one (``errno.ENOSPC``, ...), else
    None.
    """


class MissingFileError(StorageError, FileNotFoundError):
    """No such file or folder (ENOENT)."""


class FileExistsStorageError(StorageError, FileExistsError):
    """The name is already taken (EEXIST)."""


class PermissionStorageError(StorageError, PermissionError):
    """The OS refused access (EACCES, EPERM)."""


class IsAFolderError(StorageError, IsADirectoryError):
    """A folder was found where a file was needed (EISDIR)."""


class NotAFolderError(StorageError, NotADirectoryError):
    """A part of the path is a file where a folder was needed (ENOTDIR)."""


class StepExistsError(FileExistsStorageError):
    """A checkpoint step is already saved and ``overwrite`` was not asked for."""


class StepNotFoundError(MissingFileError):
    """There is no committed checkpoint for the step asked for (or none at all)."""


# errno -> (the reason, or None to keep the OS's own words; the fix). One fix per errno.
_BY_ERRNO: dict[int, tuple[str | None, str]] = {
    errnos.ENOENT: ("no such file or folder", "check the path; save the file first"),
    errnos.ENOTDIR: ("a part of the path is not a folder", "check the path"),
    errnos.EISDIR: ("is a folder, not a file", "name a file"),
    errnos.EEXIST: ("already exists", "choose another name or remove the existing one"),
    errnos.EACCES: ("permission denied", "check the permissions of the file and its folder"),
    errnos.EPERM: ("operation not permitted", "check the permissions of the file and its folder"),
    errnos.ENOSPC: (None, "free disk space or save elsewhere; files already saved are untouched"),
    errnos.EDQUOT: (None, "free quota or save elsewhere; files already saved are untouched"),
    errnos.EFBIG: (None, "the file exceeds a size limit of this file system or process (ulimit -f)"),
    errnos.EROFS: ("read-only file system", "save to a writable location"),
    errnos.ENAMETOOLONG: ("the name is too long", "use a shorter path"),
    errnos.EMFILE: (None, "too many open files: close some or raise the limit (ulimit -n)"),
    errnos.ENFILE: (None, "too many open files in the system: close some"),
    errnos.EIO: (None, "the disk or the store reported an I/O error: check it, then retry"),
}
# fsspec backends often raise the built-in subclasses without an errno.
_BY_CLASS: tuple[tuple[type[OSError], int], ...] = (
    (FileNotFoundError, errnos.ENOENT),
    (IsADirectoryError, errnos.EISDIR),
    (NotADirectoryError, errnos.ENOTDIR),
    (FileExistsError, errnos.EEXIST),
    (PermissionError, errnos.EACCES),
)
_DEFAULT_FIX = "check the path, the disk or the store, then retry"
# errno -> the most specific class; any other errno gives a plain StorageError.
_CLASS_BY_ERRNO: dict[int, type[StorageError]] = {
    errnos.ENOENT: MissingFileError,
    errnos.EEXIST: FileExistsStorageError,
    errnos.EACCES: PermissionStorageError,
    errnos.EPERM: PermissionStorageError,
    errnos.EISDIR: IsAFolderError,
    errnos.ENOTDIR: NotAFolderError,
}


def storage_error(e: BaseException, path: PathArg, action: str) -> StorageError:
    """The StorageError to raise (``from e``) for ``e``, met while ``action`` on ``path``.

    Args:
        e: an OSError, or any exception an fsspec backend raised; a ModelkeepError (a
            StorageError included) is returned unchanged.
        path: the file or folder being worked on.
        action: a gerund naming the work, for the message: ``"reading"``, ``"writing"``,
            ``"deleting"``, ``"listing"``, ...

    Returns:
        A StorageError of the most specific class for the errno (``MissingFileError`` for
        ENOENT, ...), whose message is ``"{action} failed: {reason}"`` with the fix for the errno,
        and whose ``errno`` is ``e``'s; or ``e`` itself when it is a ModelkeepError.
    """
    if isinstance(e, ModelkeepError):
        return e  # type: ignore[return-value]  # already says what and how to fix it
    code = getattr(e, "errno", None)
    if not isinstance(code, int) or code not in _BY_ERRNO:
        code = next((number for cls, number in _BY_CLASS if isinstance(e, cls)), code)
    known = _BY_ERRNO.get(code) if isinstance(code, int) else None
    own_words = getattr(e, "strerror", None) or str(e) or type(e).__name__
    reason = (known[0] if known else None) or own_words
    cls = _CLASS_BY_ERRNO.get(code, StorageError) if isinstance(code, int) else StorageError
    error = cls(f"{action} failed: {reason}", path=path, fix=known[1] if known else _DEFAULT_FIX)
    error.errno = code if isinstance(code, int) else None
    return error


@contextlib.contextmanager
def map_os_errors(
    path: PathArg, action: str, *, also: tuple[type[BaseException], ...] = ()
) -> Iterator[None]:
    """Run the block; an OSError (or one of ``also``) leaving it becomes a StorageError.

    Use it around the calls that touch the file system or an object store, at the boundary where
    the path is known; ModelkeepErrors raised inside pass through unchanged.

    Args:
        path: the file or folder the block works on, named in the error.
        action: a gerund naming the work (``"reading"``, ``"writing"``, ...).
        also: further exception classes to map, e.g. an fsspec backend's own errors.

    Returns:
        A context manager that yields None.

    Raises:
        StorageError: from any OSError (or ``also``) raised in the block, with the cause chained.
    """
    try:
        yield
    except ModelkeepError:
        raise
    except (OSError, *also) as e:
        raise storage_error(e, path, action) from e
