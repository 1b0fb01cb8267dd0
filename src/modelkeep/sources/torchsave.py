"""torch.save files (zip, legacy stream, pre-1.0 tar, TorchScript) from any storage.

The restricted pickle reader in :mod:`modelkeep.legacy` needs random access to a local file (it
maps the archive and checks every member in place). A file on an object store is therefore first
copied, as bytes, into a private temporary file (``$MODELKEEP_SPOOL`` or the system's temporary
folder), which lives as long as the source reading from it; nothing in it is run either way.
Errors name the URL the caller gave, not the temporary copy.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import weakref
from typing import Any, Iterator, Sequence

import torch

from modelkeep import errors
from modelkeep.options import ReadOptions
from modelkeep.storage import Storage
from modelkeep.storage.buffer import BufferStorage

SPOOL_ENV = "MODELKEEP_SPOOL"
COPY_BYTES = 16 << 20


@contextlib.contextmanager
def _named_as(location: str, local: str) -> Iterator[None]:
    """Errors raised about the temporary copy ``local`` name ``location`` instead."""
    try:
        yield
    except errors.ModelkeepError as e:
        if e.path == local:
            e.path = location
            e.args = (e._message(),)
        raise


def _spool(store: Storage, path: str) -> str:
    """A private local copy of ``path``'s bytes; the caller removes it."""
    fd, local = tempfile.mkstemp(prefix=".modelkeep-", suffix=".spool", dir=os.environ.get(SPOOL_ENV))
    try:
        with os.fdopen(fd, "wb") as out, errors.map_os_errors(path, "reading"), store.open_read(path) as src:
            shutil.copyfileobj(src, out, COPY_BYTES)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(local)
        raise
    return local


@contextlib.contextmanager
def local_copy(store: Storage, path: str) -> Iterator[str]:
    """An OS path with ``path``'s bytes for the duration of the block (the file itself if local)."""
    local = store.local_path(path)
    if local is not None:
        yield local
        return
    spooled = _spool(store, path)
    try:
        with _named_as(path, spooled):
            yield spooled
    finally:
        with contextlib.suppress(OSError):
            os.unlink(spooled)


class TorchSaveSource:
    """A torch.save file (zip, stream, tar; ``container``) as a source, read lazily.

    ``entries``/``read_into``/``tensors`` give its state dict (``legacy.open_weights``: found
    under a checkpoint key, in a pickled module, in TorchScript), ``data`` what ``torch.load``
    would return, ``module`` a whole pickled module, ``describe`` its tensors and globals; none of
    them runs anything from the file. Bytes in memory (and file objects) are read in place; a
    file on an object store is read from a private local copy, made once and removed with the
    source; errors name the caller's location.
    """

    kind = "torch.save"

    def __init__(self, store: Storage, location: str, options: ReadOptions, container: str) -> None:
        self.store = store
        self.location = location
        self.options = options
        self.container = container  # "zip", "tar" or "pickle", as the dispatch found it
        self.end: int | None = None  # where the object ends when more bytes follow it (``data``)
        self._weights: Any = None
        self._data: bytes | None = store.data if isinstance(store, BufferStorage) else None  # read in place
        self._local: str | None = store.local_path(location) if self._data is None else location
        self._spooled: str | None = None

    def _path(self) -> str:
        """An OS path with the file's bytes (a private copy for object stores); for bytes in
        memory, just the name the messages use (the reader works on ``_data``)."""
        if self._local is None:
            self._spooled = self._local = _spool(self.store, self.location)
            weakref.finalize(self, _remove, self._spooled)
        return self._local

    def _named(self) -> contextlib.AbstractContextManager[None]:
        return _named_as(self.location, self._spooled) if self._spooled else contextlib.nullcontext()

    def weights(self) -> Any:
        """The ``legacy.LegacyWeights`` of the state dict (found once)."""
        if self._weights is None:
            from modelkeep import legacy  # imported on first use: keeps ``import modelkeep`` light

            path = self._path()
            with self._named():
                self._weights = legacy.open_weights(path, options=self.options, container=self.container, data=self._data)
            self.end = self._weights.end
        return self._weights

    @property
    def source_key(self) -> str | None:
        return self.weights().source_key

    @property
    def left_out(self) -> list[str]:
        """A checkpoint's entries that are not the weights (optimizer state, epoch, ...)."""
        return self.weights().left_out

    def entries(self) -> dict[str, Any]:
        return self.weights().entries()

    def read_into(self, pairs: Sequence[tuple[Any, torch.Tensor]], *, threads: int | None = None) -> int:
        weights = self.weights()
        with self._named():
            return weights.read_into(pairs, threads=threads)

    def tensors(self, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        weights = self.weights()
        with self._named():
            return weights.tensors(device)

    def metadata(self) -> None:
        return None  # a pickle has no header: ``describe`` tells what it holds

    def digests(self) -> dict[str, str]:
        return {}  # zip archives' CRC-32s are checked as each storage is read

    def data(self) -> Any:
        """What ``torch.load`` would return, built without running the file."""
        from modelkeep import legacy

        path = self._path()
        with self._named():
            value, self.end = legacy.read_object(path, options=self.options, container=self.container, data=self._data)
        return value

    def module(self) -> torch.nn.Module:
        """The whole pickled ``nn.Module`` (trusted classes only)."""
        from modelkeep import legacy

        path = self._path()
        with self._named():
            return legacy.read_module(path, options=self.options, container=self.container, data=self._data)

    def describe(self) -> Any:
        """``legacy.Description``: tensors and globals, nothing built (``modelkeep inspect``)."""
        from modelkeep import legacy

        path = self._path()
        with self._named():
            return legacy.describe(path, options=self.options, container=self.container, data=self._data)

    def check_crcs(self, blobs: Sequence[Any]) -> list[str]:
        """The names of the zip entries among ``blobs`` whose bytes do not match their CRC-32."""
        from modelkeep.legacy import blobs as legacy_blobs

        bad = []
        with self._named():
            for blob in blobs:
                if blob.crc is None:
                    continue
                try:
                    legacy_blobs.read_blob(blob, check_crc=True)
                except errors.FormatError:
                    bad.append(blob.name)
        return bad


def _remove(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)
