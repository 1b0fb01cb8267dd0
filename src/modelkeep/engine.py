"""Moving bytes between files and tensor memory.

Reads go from the file straight into the destination tensor's own memory with ``os.preadv`` (one
system call scatters a run of consecutive small tensors; large tensors are split so several reads
are in flight), from a thread pool: the reads release the GIL, and on a cold page cache several
outstanding reads are what reach the disk's speed. Destinations that cannot take raw bytes (another
dtype, another device, a non-contiguous layout) get a per-tensor staging buffer and one ``copy_``.

Writes stream each tensor's bytes to a temporary file beside the destination, hashing them on the
way, and commit with fsync + rename + folder fsync, so a crash leaves the old file or the new one.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import dataclasses
import errno
import os
import secrets
from typing import Callable, Iterable, Iterator, Sequence

import torch
import xxhash

from modelkeep import errors, format

HASH_ALGORITHM = "xxh3-128"
HASH_HEX_LENGTH = 32
CHUNK_BYTES = 16 * 1024 * 1024  # one read task: large enough to amortise, small enough to overlap
IOV_MAX = 1024  # Linux's limit on buffers per preadv call
TEMP_SUFFIX = ".mk-tmp"


def io_threads() -> int:
    """Reads in flight. Warm reads are bound by memory bandwidth, cold ones by queue depth."""
    configured = os.environ.get("MODELKEEP_IO_THREADS")
    if configured and configured.isdigit() and int(configured) > 0:
        return int(configured)
    return max(4, min(8, 2 * (os.cpu_count() or 1)))


def new_hasher() -> "xxhash.xxh3_128":
    return xxhash.xxh3_128()


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """A writable byte view of a contiguous CPU tensor's memory (no copy, any dtype)."""
    nbytes = tensor.numel() * tensor.element_size()
    if nbytes == 0:
        return memoryview(bytearray(0))
    array = (ctypes.c_char * nbytes).from_address(tensor.data_ptr())
    return memoryview(array).cast("B")


def accepts_raw_bytes(tensor: torch.Tensor, entry: format.TensorEntry) -> bool:
    """True when the file's bytes can land directly in ``tensor``'s memory."""
    return (
        tensor.device.type == "cpu"
        and tensor.dtype == entry.torch_dtype
        and tensor.is_contiguous()
        and tuple(tensor.shape) == entry.shape
        and not tensor.is_quantized
        and tensor.layout == torch.strided
    )


@dataclasses.dataclass
class _ReadTask:
    """A contiguous file range scattered into one or more byte buffers."""

    offset: int
    buffers: list[memoryview]
    after: Callable[[], None] | None = None  # e.g. copy a staging buffer into its destination


def _preadv_exactly(fd: int, buffers: list[memoryview], offset: int, path: str) -> None:
    pending = [b for b in buffers if len(b)]
    while pending:
        batch = pending[:IOV_MAX]
        try:
            count = os.preadv(fd, batch, offset)
        except OSError as e:
            raise errors.StorageError(f"read failed: {e.strerror}", path=path, fix="check the disk") from e
        if count == 0:
            raise errors.FormatError(
                "file ended before its data (was it truncated while reading?)",
                path=path,
                fix="re-download or re-save the file",
            )
        offset += count
        while count:
            head = pending[0]
            if count >= len(head):
                count -= len(head)
                pending.pop(0)
            else:
                pending[0] = head[count:]
                count = 0


def _plan_tasks(
    pairs: Sequence[tuple[format.TensorEntry, torch.Tensor]], chunk_bytes: int
) -> list[_ReadTask]:
    """Group direct reads into tasks of about ``chunk_bytes``; stage the others one by one."""
    tasks: list[_ReadTask] = []
    current: _ReadTask | None = None
    current_bytes = 0
    for entry, destination in sorted(pairs, key=lambda pair: pair[0].begin):
        if entry.nbytes == 0:
            continue
        if not accepts_raw_bytes(destination, entry):
            tasks.extend(_staged_tasks(entry, destination, chunk_bytes))
            continue
        view = tensor_bytes(destination)
        for start in range(0, entry.nbytes, chunk_bytes):
            piece = view[start : start + chunk_bytes]
            offset = entry.begin + start
            contiguous = current is not None and current.offset + current_bytes == offset
            if current is None or not contiguous or current_bytes + len(piece) > chunk_bytes:
                current = _ReadTask(offset, [])
                current_bytes = 0
                tasks.append(current)
            current.buffers.append(piece)
            current_bytes += len(piece)
    return tasks


def _staged_tasks(
    entry: format.TensorEntry, destination: torch.Tensor, chunk_bytes: int
) -> list[_ReadTask]:
    """Read into a CPU buffer of the file's dtype, then one ``copy_`` converts and moves it."""
    pin = destination.device.type == "cuda" and torch.cuda.is_available()
    staging = torch.empty(entry.shape, dtype=entry.torch_dtype, pin_memory=pin)

    def copy_into_destination() -> None:
        with torch.no_grad():
            destination.copy_(staging)

    return [_ReadTask(entry.begin, [tensor_bytes(staging)], after=copy_into_destination)]


def read_into(
    path: str,
    pairs: Sequence[tuple[format.TensorEntry, torch.Tensor]],
    *,
    threads: int | None = None,
    chunk_bytes: int = CHUNK_BYTES,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Fill each destination tensor with its entry's bytes; returns the bytes read.

    Destinations must have the entry's shape; dtype, device and layout may differ (converted).
    """
    tasks = _plan_tasks(pairs, chunk_bytes)
    total = sum(sum(len(b) for b in task.buffers) for task in tasks)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        raise errors.StorageError(f"cannot open: {e.strerror}", path=path, fix="check the path") from e
    try:
        def run(task: _ReadTask) -> int:
            _preadv_exactly(fd, task.buffers, task.offset, path)
            if task.after is not None:
                task.after()
            size = sum(len(b) for b in task.buffers)
            if progress is not None:
                progress(size)
            return size

        workers = min(threads or io_threads(), max(1, len(tasks)))
        if workers == 1:
            for task in tasks:
                run(task)
        else:
            with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="modelkeep-read") as pool:
                for future in [pool.submit(run, task) for task in tasks]:
                    future.result()
    finally:
        os.close(fd)
    return total


def read_tensors(
    path: str,
    entries: Iterable[format.TensorEntry],
    *,
    device: torch.device | str = "cpu",
    threads: int | None = None,
) -> dict[str, torch.Tensor]:
    """New tensors holding the given entries, on ``device``."""
    device = torch.device(device)
    pin = device.type == "cuda" and torch.cuda.is_available()
    pairs = [(e, torch.empty(e.shape, dtype=e.torch_dtype, pin_memory=pin)) for e in entries]
    read_into(path, pairs, threads=threads)
    out = {entry.name: tensor for entry, tensor in pairs}
    if device.type != "cpu":
        out = {name: tensor.to(device, non_blocking=pin) for name, tensor in out.items()}
        if pin:
            torch.cuda.synchronize(device)
    return out


# --------------------------------------------------------------------------------------------
# Writing


def cpu_contiguous(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's values as a C-ordered CPU tensor, copying only when it must."""
    tensor = tensor.detach()
    if tensor.device.type != "cpu":
        tensor = tensor.to("cpu")
    if not tensor.is_contiguous():
        tensor = tensor.contiguous()
    return tensor


def _write_all(fd: int, view: memoryview, path: str) -> None:
    while len(view):
        written = os.write(fd, view)
        view = view[written:]


def write_tensors(fd: int, tensors: Iterable[torch.Tensor], path: str) -> list[str]:
    """Write each tensor's bytes in order; return their hex digests.

    Each tensor is made contiguous on the CPU one at a time, so memory beyond the model stays at
    the size of the largest tensor that needs a copy; contiguous CPU tensors are written from their
    own memory.
    """
    digests = []
    for tensor in tensors:
        data = cpu_contiguous(tensor)
        view = tensor_bytes(data)
        hasher = new_hasher()
        hasher.update(view)
        _write_all(fd, view, path)
        digests.append(hasher.hexdigest())
    return digests


def temp_path_for(path: str) -> str:
    folder, name = os.path.split(os.path.abspath(path))
    return os.path.join(folder, f".{name}.{os.getpid()}-{secrets.token_hex(4)}{TEMP_SUFFIX}")


def remove_stale_temps(path: str) -> list[str]:
    """Delete temporary files that a crashed save to ``path`` left behind (their writer is gone)."""
    folder, name = os.path.split(os.path.abspath(path))
    removed = []
    prefix = f".{name}."
    try:
        candidates = os.listdir(folder)
    except OSError:
        return removed
    for candidate in candidates:
        if not (candidate.startswith(prefix) and candidate.endswith(TEMP_SUFFIX)):
            continue
        pid_text = candidate[len(prefix) : -len(TEMP_SUFFIX)].split("-", 1)[0]
        if pid_text.isdigit() and _process_alive(int(pid_text)):
            continue
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(folder, candidate))
            removed.append(candidate)
    return removed


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def fsync_folder(folder: str) -> None:
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(path: str) -> Iterator[int]:
    """Yield a file descriptor of a temporary file that replaces ``path`` on success.

    The bytes are fsynced before the rename and the folder after it. On any exception the
    temporary file is removed and ``path`` is left as it was.
    """
    path = os.path.abspath(os.fspath(path))
    folder = os.path.dirname(path)
    if not os.path.isdir(folder):
        raise errors.StorageError(
            "folder does not exist", path=path, fix=f"create {folder} first"
        )
    remove_stale_temps(path)
    temp = temp_path_for(path)
    try:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except OSError as e:
        raise _storage_error(e, path) from e
    committed = False
    try:
        try:
            yield fd
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp, path)
        committed = True
        fsync_folder(folder)
    except OSError as e:
        if isinstance(e, errors.ModelkeepError):
            raise
        raise _storage_error(e, path) from e
    finally:
        if not committed:
            with contextlib.suppress(OSError):
                os.unlink(temp)


def _storage_error(e: OSError, path: str) -> errors.StorageError:
    fixes = {
        errno.ENOSPC: "free disk space or save elsewhere; the previous file is untouched",
        errno.EDQUOT: "free quota or save elsewhere; the previous file is untouched",
        errno.EACCES: "check the folder's permissions",
        errno.EROFS: "save to a writable location",
    }
    return errors.StorageError(
        f"write failed: {e.strerror or e}", path=path, fix=fixes.get(e.errno or 0, "check the disk")
    )



def write_file(
    path: str,
    tensors: Sequence[tuple[str, torch.Tensor]],
    metadata: dict[str, str],
    *,
    with_hashes: bool = True,
) -> dict[str, str]:
    """Write a safetensors file atomically; return the per-tensor digests.

    Digests are computed while the bytes stream out, so the header is first written with
    same-length placeholders and rewritten in place at the end.
    """
    planned = [
        format.PlannedTensor(name, format.name_from_dtype(t.dtype, item=name), tuple(t.shape))
        for name, t in tensors
    ]
    metadata = dict(metadata)
    placeholder = "0" * HASH_HEX_LENGTH
    if with_hashes:
        metadata[format.KEY_HASHES] = _hashes_value({name: placeholder for name, _ in tensors})
    header = format.encode_header(planned, metadata)
    digests: dict[str, str] = {}
    with atomic_file(path) as fd:
        _write_all(fd, memoryview(header), path)
        values = write_tensors(fd, (t for _, t in tensors), path)
        digests = {name: value for (name, _), value in zip(tensors, values)}
        if with_hashes:
            metadata[format.KEY_HASHES] = _hashes_value(digests)
            final = format.encode_header(planned, metadata)
            if len(final) != len(header):  # digests are fixed-width hex, so this cannot differ
                raise RuntimeError("header length changed while filling in digests")
            os.pwrite(fd, final, 0)
    return digests


def _hashes_value(digests: dict[str, str]) -> str:
    return format.dumps({"algorithm": HASH_ALGORITHM, "tensors": digests})


def digest_range(fd: int, begin: int, end: int, path: str, chunk_bytes: int = CHUNK_BYTES) -> str:
    """Digest of bytes ``[begin, end)`` of an open file, read in bounded chunks."""
    hasher = new_hasher()
    buffer = bytearray(min(chunk_bytes, max(end - begin, 0)))
    view = memoryview(buffer)
    offset = begin
    while offset < end:
        piece = view[: min(len(view), end - offset)]
        _preadv_exactly(fd, [piece], offset, path)
        hasher.update(piece)
        offset += len(piece)
    return hasher.hexdigest()
