"""Atomic commits' local pieces: temporary names, stale-temp cleanup, folder fsync.

A save streams a temporary file beside the destination and commits it by fsync + rename + folder
fsync (``storage.LocalStorage``; the hashed writer above it is ``storage.write_tensor_file``), so
a crash leaves the old file or the new one, plus at most a temporary file that the next save to
that name removes (its writer's process is gone).

Temporary names are ``.{final name}.{pid}-{8 hex}.mk-tmp``; they are written by ``temp_name``
and read back by ``parse_temp_name`` only, so the writer's pid is found the same way everywhere.
"""

from __future__ import annotations

import contextlib
import os
import secrets

import xxhash

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
