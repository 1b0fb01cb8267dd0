"""Atomic commits: temporary names, stale-temp cleanup, and the hashed safetensors writer.

A save streams a temporary file beside the destination: header (placeholder digests), then each
tensor's bytes (``io.writes``), each piece hashed just before it is written; the digests are
spliced into the header; fsync + rename + folder fsync commit it, so a crash leaves the old file
or the new one, plus at most a temporary file that the next save to that name removes.

Temporary names are ``.{final name}.{pid}-{8 hex}.mk-tmp``; they are written by ``temp_name``
and read back by ``parse_temp_name`` only, so the writer's pid is found the same way everywhere.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import stat
from typing import Iterator, Sequence

import torch
import xxhash

from modelkeep import errors, format, hashing
from modelkeep.io import writes

TEMP_SUFFIX = ".mk-tmp"
MAX_NAME_BYTES = 200  # longer final names are shortened so the temp name fits NAME_MAX (255)
TOKEN_HEX_DIGITS = 8
_HEX = frozenset("0123456789abcdef")


def temp_stem(final_name: str) -> str:
    """The part of a temp name that stands for ``final_name``: the name itself, or for names of
    more than 200 UTF-8 bytes its first 100 characters, ``~`` and a 64-bit hash of the whole."""
    if len(final_name.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
        return final_name[:100] + "~" + xxhash.xxh64_hexdigest(final_name.encode("utf-8", "surrogatepass"))
    return final_name


def temp_name(final_name: str, pid: int | None = None, token: str | None = None) -> str:
    """The temporary file name a save to ``final_name`` writes first.

    Args:
        final_name: the destination's base name (no folder).
        pid: the writing process (default this one).
        token: 8 lowercase hex digits that keep two saves of one process apart (default random).

    Returns:
        ``.{stem}.{pid}-{token}.mk-tmp``, where ``stem`` is ``temp_stem(final_name)``.

    Raises:
        ValueError: ``token`` is not 8 lowercase hex digits or ``pid`` is negative.
    """
    pid = os.getpid() if pid is None else pid
    token = secrets.token_hex(TOKEN_HEX_DIGITS // 2) if token is None else token
    if len(token) != TOKEN_HEX_DIGITS or not set(token) <= _HEX:
        raise ValueError(f"temp token must be {TOKEN_HEX_DIGITS} lowercase hex digits, not {token!r}")
    if pid < 0:
        raise ValueError(f"pid must not be negative, not {pid}")
    return f".{temp_stem(final_name)}.{pid}-{token}{TEMP_SUFFIX}"


def parse_temp_name(name: str) -> tuple[str, int] | None:
    """The ``(stem, pid)`` of a name that ``temp_name`` wrote, or None for any other name.

    ``stem`` is ``temp_stem`` of the final name (so compare it with ``temp_stem(final)``); the
    pid is the process that was writing it.
    """
    if not (name.startswith(".") and name.endswith(TEMP_SUFFIX)):
        return None
    stem, dot, tail = name[1 : -len(TEMP_SUFFIX)].rpartition(".")
    if not dot or not stem:
        return None
    pid_text, dash, token = tail.partition("-")
    if not (dash and pid_text.isascii() and pid_text.isdigit()):
        return None
    if len(token) != TOKEN_HEX_DIGITS or not set(token) <= _HEX:
        return None
    return stem, int(pid_text)


def temp_path_for(path: str) -> str:
    """A fresh temporary path beside ``path`` for this process."""
    folder, name = os.path.split(os.path.abspath(path))
    return os.path.join(folder, temp_name(name))


def process_alive(pid: int) -> bool:
    """Whether a save by process ``pid`` may still be writing its temporary file."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(path: str) -> list[str]:
    """Delete temporary files that a crashed save to ``path`` left behind (their writer is gone).

    Returns:
        The names removed (temps of other files and of live writers are kept).
    """
    folder, name = os.path.split(os.path.abspath(path))
    stem = temp_stem(name)
    removed = []
    try:
        candidates = os.listdir(folder)
    except OSError:
        return removed
    for candidate in candidates:
        parsed = parse_temp_name(candidate)
        if parsed is None or parsed[0] != stem or process_alive(parsed[1]):
            continue
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(folder, candidate))
            removed.append(candidate)
    return removed


def fsync_folder(folder: str) -> None:
    """Make a rename or unlink in ``folder`` durable (raises OSError)."""
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(path: str) -> Iterator[int]:
    """Yield a file descriptor of a temporary file that replaces ``path`` on success.

    The bytes are fsynced before the rename and the folder after it. On any exception the
    temporary file is removed and ``path`` is left as it was. A symlink is written through (its
    target is replaced, the link stays), and a replaced file keeps its permission bits.

    Raises:
        StorageError: the folder is missing or a write, fsync or rename failed (with a fix).
    """
    path = os.path.realpath(os.fspath(path))
    folder = os.path.dirname(path)
    if not os.path.isdir(folder):
        raise errors.StorageError("folder does not exist", path=path, fix=f"create {folder} first")
    remove_stale_temps(path)
    temp = temp_path_for(path)
    try:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except OSError as e:
        raise _storage_error(e, path) from e
    committed = False
    try:
        try:
            with contextlib.suppress(FileNotFoundError):
                os.fchmod(fd, stat.S_IMODE(os.stat(path).st_mode))
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

    Args:
        path: the destination (a symlink is written through).
        tensors: ``(name, tensor)`` in file order; any device, layout or lazy view.
        metadata: the header's ``__metadata__`` (the hash record is added to a copy).
        with_hashes: record the digests in the header (``modelkeep.hashes``).

    Returns:
        Tensor name -> hex digest.

    Raises:
        StorageError: the write or the commit failed; ``path`` is unchanged.
        FormatError: a tensor's dtype has no safetensors name.
    """
    planned = [
        format.PlannedTensor(name, format.name_from_dtype(t.dtype, item=name), tuple(t.shape))
        for name, t in tensors
    ]
    metadata = dict(metadata)
    if with_hashes:
        metadata[format.KEY_HASHES] = hashing.placeholder_record(name for name, _ in tensors)
    header = format.encode_header(planned, metadata)
    digests: dict[str, str] = {}
    with atomic_file(path) as fd:
        writes.write_all(fd, memoryview(header))
        values = writes.write_tensors(fd, (t for _, t in tensors))
        digests = {name: value for (name, _), value in zip(tensors, values)}
        if with_hashes:
            final = _with_digests(header, planned, metadata, digests)
            if len(final) != len(header):  # digests are fixed-width hex, so this cannot differ
                raise RuntimeError("header length changed while filling in digests")
            os.pwrite(fd, final, 0)
    return digests


def _with_digests(
    header: bytes, planned: list[format.PlannedTensor], metadata: dict[str, str], digests: dict[str, str]
) -> bytes:
    """The header with its placeholder digests filled in.

    The placeholders form one JSON string value, so it is spliced in place (encoding a
    20,000-tensor header again costs tens of milliseconds); should that value's encoding
    appear more than once, the header is encoded again instead.
    """
    placeholder = json.dumps(metadata[format.KEY_HASHES], ensure_ascii=False).encode("utf-8")
    metadata[format.KEY_HASHES] = hashing.encode_record(digests)
    filled = json.dumps(metadata[format.KEY_HASHES], ensure_ascii=False).encode("utf-8")
    if len(filled) == len(placeholder) and header.count(placeholder) == 1:
        return header.replace(placeholder, filled)
    return format.encode_header(planned, metadata)
