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
    """The state dict of a torch.save file as a tensor source (``legacy.LegacyWeights`` inside).

    For a file on an object store the reader works on a private local copy, removed when the
    source is; errors raised while reading it later still name the caller's location.
    """

    kind = "torch.save"

    def __init__(self, weights: Any, location: str, spooled: str | None = None) -> None:
        self._weights = weights
        self.location = location
        self.source_key: str | None = weights.source_key
        self.end: int | None = weights.end  # where the object ends when more bytes follow it
        self.left_out: list[str] = weights.left_out  # a checkpoint's entries that are not the weights
        self._spooled = spooled
        if spooled is not None:
            weakref.finalize(self, _remove, spooled)

    def _named(self) -> contextlib.AbstractContextManager[None]:
        return _named_as(self.location, self._spooled) if self._spooled else contextlib.nullcontext()

    def entries(self) -> dict[str, Any]:
        return self._weights.entries()

    def read_into(self, pairs: Sequence[tuple[Any, torch.Tensor]], *, threads: int | None = None) -> int:
        with self._named():
            return self._weights.read_into(pairs, threads=threads)

    def tensors(self, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        with self._named():
            return self._weights.tensors(device)


def open_weights(store: Storage, path: str, options: ReadOptions) -> TorchSaveSource:
    """The state dict of a torch.save file, found without running anything (see
    ``legacy.open_weights``: under a checkpoint key, in a pickled module, in TorchScript)."""
    from modelkeep import legacy  # imported on first use: keeps ``import modelkeep`` light

    local = store.local_path(path)
    if local is not None:
        return TorchSaveSource(legacy.open_weights(local, options=options), path)
    spooled = _spool(store, path)
    try:
        with _named_as(path, spooled):
            return TorchSaveSource(legacy.open_weights(spooled, options=options), path, spooled)
    except BaseException:
        _remove(spooled)
        raise


def _remove(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


def read(store: Storage, path: str, options: ReadOptions) -> tuple[Any, int | None]:
    """What ``torch.load`` would return for a torch.save file, built without running it, and
    where the object ends when more bytes follow it (a stream-format file; else None)."""
    from modelkeep import legacy

    with local_copy(store, path) as local, _named_as(path, local):
        return legacy.read_object(local, options=options)


def describe(store: Storage, path: str, options: ReadOptions) -> Any:
    """``legacy.Description`` of a torch.save file: its tensors and the globals it names, with
    nothing built or run (``modelkeep inspect``)."""
    from modelkeep import legacy

    with local_copy(store, path) as local, _named_as(path, local):
        return legacy.describe(local, options=options)


def check_crcs(store: Storage, path: str, blobs: Sequence[Any]) -> list[str]:
    """The names of the zip entries among ``blobs`` whose bytes do not match their CRC-32."""
    from modelkeep.legacy import tensors as legacy_tensors

    bad = []
    with local_copy(store, path) as local, _named_as(path, local):
        for blob in blobs:
            if blob.crc is None:
                continue
            try:
                legacy_tensors.read_blob(blob, check_crc=True)
            except errors.FormatError:
                bad.append(blob.name)
    return bad
