"""Any fsspec file system (``memory://``, ``s3://``, ...) as a storage: objects are written whole
to a temporary key, then moved under their final name."""

from __future__ import annotations

import contextlib
import posixpath
from typing import Any, BinaryIO, Sequence

from modelkeep import atomic, errors
from modelkeep.storage.base import Storage, TempFile


class FsspecStorage(Storage):
    """Any fsspec file system. Objects are written whole to a temporary key, then moved."""

    def __init__(self, fs: Any) -> None:
        self.fs = fs

    @classmethod
    def from_url(cls, url: str, **options: Any) -> "FsspecStorage":
        """The storage for ``url``'s scheme, built with ``options`` (fsspec caches instances)."""
        try:
            import fsspec
        except ImportError as e:
            raise errors.StorageError(
                "URLs need the fsspec package", path=url, fix="pip install fsspec (and s3fs for s3://)"
            ) from e
        try:
            fs, _ = fsspec.core.url_to_fs(url, **options)
        except (ImportError, ValueError, TypeError) as e:
            raise errors.StorageError(
                f"no file system for this URL: {e}", path=url, fix="install the fsspec backend it names"
            ) from e
        return cls(fs)

    def join(self, folder: str, name: str) -> str:
        return posixpath.join(folder, name)

    def parent(self, path: str) -> str:
        scheme, sep, rest = path.partition("://")
        return f"{scheme}{sep}{posixpath.dirname(rest)}" if sep else posixpath.dirname(path)

    def open_read(self, path: str) -> BinaryIO:
        with errors.map_os_errors(path, "reading"):
            return self.fs.open(path, "rb")

    def size(self, path: str) -> int:
        with errors.map_os_errors(path, "reading"):
            return int(self.fs.size(path))

    def exists(self, path: str) -> bool:
        with errors.map_os_errors(path, "reading"):
            return bool(self.fs.exists(path))

    def isdir(self, path: str) -> bool:
        with errors.map_os_errors(path, "reading"):
            return bool(self.fs.isdir(path))

    def list_names(self, folder: str) -> list[str]:
        try:
            if not self.fs.exists(folder):
                return []
            listed = self.fs.ls(folder, detail=False)
        except FileNotFoundError:
            return []
        except Exception as e:  # fsspec backends raise their own errors
            raise errors.storage_error(e, folder, "listing") from e
        return sorted(posixpath.basename(str(p).rstrip("/")) for p in listed)

    def makedirs(self, folder: str) -> None:
        with errors.map_os_errors(folder, "creating the folder"):
            self.fs.makedirs(folder, exist_ok=True)

    def create_temp(self, final: str) -> TempFile:
        folder, name = posixpath.split(final)
        temp = posixpath.join(folder, atomic.temp_name(name))
        with errors.map_os_errors(final, "writing"):
            return TempFile(temp, final, self.fs.open(temp, "wb"))

    def write(self, temp: TempFile, buffers: Sequence[Any]) -> None:
        with errors.map_os_errors(temp.final, "writing"):
            for buffer in buffers:
                temp.stream.write(buffer)

    def commit(self, temp: TempFile) -> None:
        with errors.map_os_errors(temp.final, "writing"):
            temp.stream.close()
            self.fs.mv(temp.path, temp.final)

    def discard(self, temp: TempFile) -> None:
        with contextlib.suppress(Exception):
            temp.stream.close()
        with contextlib.suppress(Exception):
            self.fs.rm(temp.path)

    def remove(self, path: str) -> None:
        try:
            self.fs.rm(path)
        except FileNotFoundError:
            return
        except Exception as e:
            raise errors.storage_error(e, path, "deleting") from e
