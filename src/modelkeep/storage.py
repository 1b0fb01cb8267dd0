"""Where files live: local folders by default, fsspec URLs (``memory://``, ``s3://``, ...) behind
the same small interface.

Everything that reads or writes checkpoint files goes through a :class:`Storage`, so a test can
hand in one that fails the way a full disk or a broken network does, and a URL works wherever a
path does. Each write is atomic on every backend: the bytes go to a temporary name that only
becomes the final name once complete. Locally that is ``atomic.write_file`` (fsync + rename +
folder fsync); on fsspec it is a whole-object write to a temporary key, then a move.
"""

from __future__ import annotations

import abc
import contextlib
import errno
import os
import posixpath
from typing import Any, Iterable, Sequence

import torch

from modelkeep import atomic, errors, format, hashing
from modelkeep.io import buffers
from modelkeep.io import tensors as tensor_io

TEMP_SUFFIX = atomic.TEMP_SUFFIX


def is_url(location: str) -> bool:
    """True for ``scheme://...`` locations other than ``file://``."""
    scheme, sep, _ = location.partition("://")
    return bool(sep) and scheme.isidentifier() and scheme != "file"


def open_storage(location: str | os.PathLike[str], **options: Any) -> tuple["Storage", str]:
    """The storage for ``location`` and the folder name to use inside it."""
    location = os.fspath(location)
    if location.startswith("file://"):
        location = location[len("file://") :]
    if is_url(location):
        return FsspecStorage.from_url(location, **options), location
    return LocalStorage(), os.path.abspath(location)


def temp_owner_pid(name: str) -> int | None:
    """The process id embedded in a temporary file name ``.{name}.{pid}-{hex}.mk-tmp``."""
    parsed = atomic.parse_temp_name(name)
    return None if parsed is None else parsed[1]


def storage_error(e: BaseException, path: str, action: str) -> errors.StorageError:
    """A StorageError for an OSError (or an fsspec failure) while ``action`` on ``path``."""
    if isinstance(e, errors.StorageError):
        return e
    code = getattr(e, "errno", None)
    fixes = {
        errno.ENOSPC: "free disk space or save elsewhere; earlier checkpoints are untouched",
        errno.EDQUOT: "free quota or save elsewhere; earlier checkpoints are untouched",
        errno.EFBIG: "the file exceeds a size limit of this file system or process (ulimit -f)",
        errno.EACCES: "check the folder's permissions",
        errno.EROFS: "save to a writable location",
        errno.ENOENT: "check the path",
    }
    reason = getattr(e, "strerror", None) or str(e) or type(e).__name__
    return errors.StorageError(
        f"{action} failed: {reason}", path=path, fix=fixes.get(code or 0, "check the disk or the store")
    )


class Storage(abc.ABC):
    """The operations checkpoint code needs. Paths are this storage's own (OS paths or URLs)."""

    @abc.abstractmethod
    def join(self, folder: str, name: str) -> str: ...

    @abc.abstractmethod
    def list_names(self, folder: str) -> list[str]:
        """Names in ``folder`` (empty when it does not exist)."""

    @abc.abstractmethod
    def makedirs(self, folder: str) -> None: ...

    @abc.abstractmethod
    def write_tensor_file(
        self, path: str, tensors: Sequence[tuple[str, torch.Tensor]], metadata: dict[str, str]
    ) -> dict[str, str]:
        """Write a safetensors file atomically with per-tensor digests; return the digests."""

    @abc.abstractmethod
    def read_header(self, path: str) -> format.Header: ...

    @abc.abstractmethod
    def read_tensors(
        self, path: str, entries: Iterable[format.TensorEntry]
    ) -> dict[str, torch.Tensor]:
        """New CPU tensors holding the given entries' bytes."""

    @abc.abstractmethod
    def delete(self, path: str) -> None: ...

    def remove_stale_temps(self, folder: str) -> list[str]:
        """Delete temporary files in ``folder`` whose writing process is gone; return their names."""
        removed = []
        for name in self.list_names(folder):
            pid = temp_owner_pid(name)
            if pid is None or atomic.process_alive(pid):
                continue
            with contextlib.suppress(errors.StorageError):
                self.delete(self.join(folder, name))
                removed.append(name)
        return removed

    def local_path(self, path: str) -> str | None:
        """An OS path for ``path`` when the storage is the local file system."""
        return None


class LocalStorage(Storage):
    """Local folders; writes go through ``atomic.write_file`` (hashed, fsynced, renamed)."""

    def join(self, folder: str, name: str) -> str:
        return os.path.join(folder, name)

    def list_names(self, folder: str) -> list[str]:
        try:
            return sorted(os.listdir(folder))
        except FileNotFoundError:
            return []
        except OSError as e:
            raise storage_error(e, folder, "listing") from e

    def makedirs(self, folder: str) -> None:
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as e:
            raise storage_error(e, folder, "creating the folder") from e

    def write_tensor_file(
        self, path: str, tensors: Sequence[tuple[str, torch.Tensor]], metadata: dict[str, str]
    ) -> dict[str, str]:
        try:
            return atomic.write_file(path, tensors, metadata)
        except errors.StorageError:
            raise
        except OSError as e:
            raise storage_error(e, path, "writing") from e

    def read_header(self, path: str) -> format.Header:
        return format.read_header_file(path)

    def read_tensors(
        self, path: str, entries: Iterable[format.TensorEntry]
    ) -> dict[str, torch.Tensor]:
        return tensor_io.read_tensors(path, list(entries))

    def delete(self, path: str) -> None:
        try:
            os.unlink(path)
            atomic.fsync_folder(os.path.dirname(path) or ".")
        except FileNotFoundError:
            return
        except OSError as e:
            raise storage_error(e, path, "deleting") from e

    def local_path(self, path: str) -> str | None:
        return path


class FsspecStorage(Storage):
    """Any fsspec file system. Objects are written whole to a temporary key, then moved."""

    def __init__(self, fs: Any) -> None:
        self.fs = fs

    @classmethod
    def from_url(cls, url: str, **options: Any) -> "FsspecStorage":
        try:
            import fsspec
        except ImportError as e:
            raise errors.StorageError(
                "URLs need the fsspec package", path=url, fix="pip install fsspec (and s3fs for s3://)"
            ) from e
        try:
            fs, _ = fsspec.core.url_to_fs(url, **options)
        except (ImportError, ValueError) as e:
            raise errors.StorageError(
                f"no file system for this URL: {e}", path=url, fix="install the fsspec backend it names"
            ) from e
        return cls(fs)

    def join(self, folder: str, name: str) -> str:
        return posixpath.join(folder, name)

    def list_names(self, folder: str) -> list[str]:
        try:
            if not self.fs.exists(folder):
                return []
            listed = self.fs.ls(folder, detail=False)
        except FileNotFoundError:
            return []
        except Exception as e:  # fsspec backends raise their own errors
            raise storage_error(e, folder, "listing") from e
        return sorted(posixpath.basename(str(p).rstrip("/")) for p in listed)

    def makedirs(self, folder: str) -> None:
        try:
            self.fs.makedirs(folder, exist_ok=True)
        except Exception as e:
            raise storage_error(e, folder, "creating the folder") from e

    def write_tensor_file(
        self, path: str, tensors: Sequence[tuple[str, torch.Tensor]], metadata: dict[str, str]
    ) -> dict[str, str]:
        # Objects cannot be rewritten in place, so digests come first (a hashing pass over
        # memory), then the header, then the bytes in one streaming write.
        prepared = [(name, buffers.cpu_contiguous(t)) for name, t in tensors]
        digests = {}
        for name, tensor in prepared:
            hasher = hashing.new_hasher()
            hasher.update(buffers.tensor_bytes(tensor))
            digests[name] = hasher.hexdigest()
        metadata = dict(metadata)
        metadata[format.KEY_HASHES] = hashing.encode_record(digests)
        planned = [
            format.PlannedTensor(name, format.name_from_dtype(t.dtype, item=name), tuple(t.shape))
            for name, t in prepared
        ]
        header = format.encode_header(planned, metadata)
        folder, name = posixpath.split(path)
        temp = posixpath.join(folder, atomic.temp_name(name))
        try:
            with self.fs.open(temp, "wb") as stream:
                stream.write(header)
                for _, tensor in prepared:
                    stream.write(buffers.tensor_bytes(tensor))
            self.fs.mv(temp, path)
        except Exception as e:
            with contextlib.suppress(Exception):
                self.fs.rm(temp)
            raise storage_error(e, path, "writing") from e
        return digests

    def read_header(self, path: str) -> format.Header:
        try:
            size = self.fs.size(path)
            with self.fs.open(path, "rb") as stream:
                return format.read_header(stream, path=path, file_size=size)
        except errors.ModelkeepError:
            raise
        except FileNotFoundError as e:
            raise errors.StorageError("no such file", path=path, fix="check the path") from e
        except Exception as e:
            raise storage_error(e, path, "reading") from e

    def read_tensors(
        self, path: str, entries: Iterable[format.TensorEntry]
    ) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        try:
            with self.fs.open(path, "rb") as stream:
                for entry in sorted(entries, key=lambda e: e.begin):
                    tensor = torch.empty(entry.shape, dtype=entry.torch_dtype)
                    view = buffers.tensor_bytes(tensor)
                    stream.seek(entry.begin)
                    while len(view):
                        count = stream.readinto(view)
                        if not count:
                            raise errors.FormatError(
                                "file ended before its data", path=path, item=entry.name,
                                fix="the object was truncated; save it again",
                            )
                        view = view[count:]
                    out[entry.name] = tensor
        except errors.ModelkeepError:
            raise
        except Exception as e:
            raise storage_error(e, path, "reading") from e
        return out

    def delete(self, path: str) -> None:
        try:
            self.fs.rm(path)
        except FileNotFoundError:
            return
        except Exception as e:
            raise storage_error(e, path, "deleting") from e
