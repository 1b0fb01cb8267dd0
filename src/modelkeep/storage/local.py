"""The local file system as a storage: OS paths, fsync + rename commits, the byte engine's
fast reads (through :meth:`~modelkeep.storage.base.Storage.local_path`)."""

from __future__ import annotations

import contextlib
import os
import stat
from typing import Any, BinaryIO, Sequence

from modelkeep import atomic, errors
from modelkeep.io import writes
from modelkeep.storage.base import Storage, TempFile


class LocalStorage(Storage):
    """The local file system: OS paths, fsync + rename commits, the engine's fast reads."""

    def join(self, folder: str, name: str) -> str:
        return os.path.join(folder, name)

    def parent(self, path: str) -> str:
        return os.path.dirname(path)

    def local_path(self, path: str) -> str | None:
        return path

    def open_read(self, path: str) -> BinaryIO:
        with errors.map_os_errors(path, "reading"):
            return open(path, "rb")

    def size(self, path: str) -> int:
        with errors.map_os_errors(path, "reading"):
            return os.stat(path).st_size

    def exists(self, path: str) -> bool:
        return os.path.exists(path)

    def isdir(self, path: str) -> bool:
        return os.path.isdir(path)

    def list_names(self, folder: str) -> list[str]:
        try:
            return sorted(os.listdir(folder))
        except FileNotFoundError:
            return []
        except OSError as e:
            raise errors.storage_error(e, folder, "listing") from e

    def makedirs(self, folder: str) -> None:
        with errors.map_os_errors(folder, "creating the folder"):
            os.makedirs(folder, exist_ok=True)

    def create_temp(self, final: str) -> TempFile:
        final = os.path.realpath(final)  # a symlink is written through: its target is replaced
        folder = os.path.dirname(final)
        if not os.path.isdir(folder):
            raise errors.MissingFileError("folder does not exist", path=final, fix=f"create {folder} first")
        atomic.remove_stale_temps(final)
        temp = atomic.temp_path_for(final)
        with errors.map_os_errors(final, "writing"):
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            with contextlib.suppress(FileNotFoundError):
                os.fchmod(fd, stat.S_IMODE(os.stat(final).st_mode))  # a replaced file keeps its bits
        except OSError as e:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(temp)
            raise errors.storage_error(e, final, "writing") from e
        return TempFile(temp, final, fd)

    def write(self, temp: TempFile, buffers: Sequence[Any]) -> None:
        for buffer in buffers:
            writes.write_all(temp.stream, memoryview(buffer).cast("B"))

    def commit(self, temp: TempFile) -> None:
        with errors.map_os_errors(temp.final, "writing"):
            os.fsync(temp.stream)
            os.close(temp.stream)
            temp.stream = -1
            os.replace(temp.path, temp.final)
            atomic.fsync_folder(os.path.dirname(temp.final))

    def discard(self, temp: TempFile) -> None:
        if isinstance(temp.stream, int) and temp.stream >= 0:
            with contextlib.suppress(OSError):
                os.close(temp.stream)
            temp.stream = -1
        with contextlib.suppress(OSError):
            os.unlink(temp.path)

    def remove(self, path: str) -> None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            return
        except OSError as e:
            raise errors.storage_error(e, path, "deleting") from e


LOCAL = LocalStorage()
