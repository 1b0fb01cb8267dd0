"""Reading a safetensors file's byte ranges from any storage into destination tensors.

Local files go to the byte engine (parallel ``preadv`` or a mapping copy, straight into the
destinations' memory). Other storages are read through their stream: one ranged read per tensor
in file order, into the destination's own memory when it can take the file's bytes as they are,
else into a staging tensor of the file's dtype followed by one ``copy_`` (another dtype, device
or layout), one staging buffer at a time.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Mapping, Sequence

import torch

from modelkeep import errors, format, hashing
from modelkeep.io import buffers, placement, reads
from modelkeep.io import tensors as tensor_io
from modelkeep.storage import Storage

Pair = tuple[format.TensorEntry, torch.Tensor]


def read_into(
    store: Storage,
    path: str,
    pairs: Sequence[Pair],
    *,
    threads: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Fill each destination with its entry's bytes; return the bytes read.

    Args:
        store: the storage holding ``path``.
        path: a safetensors file whose header gave the entries.
        pairs: ``(entry, destination)``; destinations have the entry's shape, any dtype/device.
        threads: reader threads for local files (the engine's default when None).
        progress: called with byte counts as they arrive.

    Returns:
        The number of bytes read from the file.

    Raises:
        StorageError: reading failed.
        FormatError: the file ended before an entry's bytes.
    """
    local = store.local_path(path)
    if local is not None:
        return tensor_io.read_into(local, pairs, threads=threads, progress=progress)
    total = 0
    with errors.map_os_errors(path, "reading"), store.open_read(path) as stream:
        for entry, destination in sorted(pairs, key=lambda pair: pair[0].begin):
            if entry.nbytes == 0:
                continue
            direct = tensor_io.accepts_raw_bytes(destination, entry)
            target = destination if direct else torch.empty(entry.shape, dtype=entry.torch_dtype)
            _read_exactly(stream, entry, buffers.tensor_bytes(target), path)
            if not direct:
                with torch.no_grad():
                    destination.copy_(target)
            total += entry.nbytes
            if progress is not None:
                progress(entry.nbytes)
    return total


def _read_exactly(stream: object, entry: format.TensorEntry, view: memoryview, path: str) -> None:
    stream.seek(entry.begin)  # type: ignore[attr-defined]
    while len(view):
        count = stream.readinto(view)  # type: ignore[attr-defined]
        if not count:
            raise errors.FormatError(
                "file ended before its data", path=path, item=entry.name,
                fix="the file or object was truncated; save it again",
            )
        view = view[count:]


def read_tensors(
    store: Storage,
    path: str,
    entries: Sequence[format.TensorEntry],
    *,
    device: torch.device | str = "cpu",
    threads: int | None = None,
) -> dict[str, torch.Tensor]:
    """New tensors holding the given entries, on ``device``.

    Args:
        store: the storage holding ``path``.
        path: the safetensors file.
        entries: the header entries to read.
        device: where the tensors go (read on the CPU, then moved).
        threads: reader threads for local files.

    Returns:
        ``{entry name: tensor}``.

    Raises:
        StorageError, FormatError: as :func:`read_into`.
    """
    local = store.local_path(path)
    if local is not None:
        return tensor_io.read_tensors(local, entries, device=device, threads=threads)
    out = {e.name: buffers.allocate(e.shape, e.torch_dtype) for e in entries}
    read_into(store, path, [(e, out[e.name]) for e in entries])
    return placement.move(out, torch.device(device))


def digests_of(
    store: Storage,
    path: str,
    entries: Sequence[format.TensorEntry],
    *,
    progress: Callable[[int], None] | None = None,
) -> dict[str, str]:
    """The digest of each entry's bytes as stored, read in bounded chunks.

    Args:
        store: the storage holding ``path``.
        path: a safetensors file.
        entries: the entries to hash.
        progress: called with each entry's byte count when it is done.

    Returns:
        ``{entry name: hex digest}``.

    Raises:
        StorageError: reading failed.
    """
    local = store.local_path(path)
    out: dict[str, str] = {}
    if local is not None:
        import concurrent.futures

        with errors.map_os_errors(path, "reading"):
            fd = os.open(local, os.O_RDONLY)
        try:
            def one(entry: format.TensorEntry) -> tuple[str, str]:
                digest = reads.digest_range(fd, entry.begin, entry.end, path)
                if progress is not None:
                    progress(entry.nbytes)
                return entry.name, digest

            with concurrent.futures.ThreadPoolExecutor(reads.io_threads()) as pool:
                out.update(pool.map(one, entries))
        finally:
            os.close(fd)
        return out
    with errors.map_os_errors(path, "reading"), store.open_read(path) as stream:
        for entry in sorted(entries, key=lambda e: e.begin):
            hasher = hashing.new_hasher()
            stream.seek(entry.begin)
            remaining = entry.nbytes
            while remaining:
                chunk = stream.read(min(remaining, reads.CHUNK_BYTES))
                if not chunk:
                    raise errors.FormatError("file ended before its data", path=path, item=entry.name,
                                             fix="the file or object was truncated; save it again")
                hasher.update(chunk)
                remaining -= len(chunk)
            out[entry.name] = hasher.hexdigest()
            if progress is not None:
                progress(entry.nbytes)
    return out


def check_filled(
    pairs: Sequence[tuple[Any, torch.Tensor]], digests: Mapping[str, str], path: str, *, threads: int | None = None
) -> int:
    """Recompute the digest of each destination that received an entry's bytes unchanged (CPU,
    the entry's dtype, C order) and compare it with the recorded one; return how many were checked.

    Destinations that were converted (another dtype or device) are not checked here: ``modelkeep
    verify`` checks the file itself.

    Raises:
        IntegrityError: a tensor's bytes differ from its digest (the file changed after it was written).
    """
    import concurrent.futures

    checkable = [
        (entry, tensor) for entry, tensor in pairs
        if getattr(entry, "name", None) in digests and tensor.device.type == "cpu"
        and tensor.dtype == entry.torch_dtype and tensor.is_contiguous() and not tensor.is_conj() and not tensor.is_neg()
    ]

    def one(pair: tuple[Any, torch.Tensor]) -> str | None:
        entry, tensor = pair
        data, nbytes = buffers.cpu_bytes(tensor)
        actual = hashing.digest(data) if nbytes else hashing.EMPTY_DIGEST
        return None if actual == digests[entry.name] else entry.name

    with concurrent.futures.ThreadPoolExecutor(max(1, threads or reads.io_threads())) as pool:
        bad = [name for name in pool.map(one, checkable) if name is not None]
    if bad:
        raise errors.IntegrityError(
            f"{len(bad)} tensor(s) do not match the digests recorded when the file was written: "
            + ", ".join(bad[:10]) + (" ..." if len(bad) > 10 else ""),
            path=path,
            item=bad[0],
            fix="the file was damaged after it was saved (disk, copy or download); the model now holds the "
            "damaged values: load from a good copy (modelkeep verify FILE checks one)",
        )
    return len(checkable)
