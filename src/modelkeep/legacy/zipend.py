"""A zip archive's end records, checked against the central directory they describe.

A zip file says where its directory is and how many entries it holds up to three times: in the
end-of-central-directory record, in the zip64 end record (torch.save always writes one), and by
the central-directory headers themselves. Readers disagree about which copy they trust: Python's
``zipfile`` walks the directory by its byte size and ignores both entry counts; others stop after
the count, or trust the zip64 locator's offset, or scan local headers from the front. An archive
whose copies disagree therefore shows different entries to different readers, which is how a
file passes one tool's inspection and loads other content in another. Here every copy must agree
exactly: one disk, both counts equal to the headers present, the directory ending where the end
records begin (no bytes prepended, none hidden between), and nothing after the end record.
"""

from __future__ import annotations

import dataclasses
import struct
from typing import BinaryIO

from modelkeep import errors

__all__ = ["EndRecord", "check_end_records"]

_EOCD = struct.Struct("<4s4H2LH")  # signature, disk, directory disk, entries here, total, size, offset, comment
_LOCATOR = struct.Struct("<4sLQL")  # signature, disk of the zip64 record, its offset, total disks
_ZIP64 = struct.Struct("<4sQ2H2L4Q")  # signature, record size, versions, disks, entries here, total, size, offset
_EOCD_MAGIC, _LOCATOR_MAGIC, _ZIP64_MAGIC, _CENTRAL_MAGIC = b"PK\x05\x06", b"PK\x06\x07", b"PK\x06\x06", b"PK\x01\x02"
_CENTRAL = 46  # fixed part of a central-directory header
_ZIP64_BODY = _ZIP64.size - 12  # the record-size field counts what follows it
_MAX_COMMENT = 0xFFFF
_FIX = "the archive is damaged or crafted (its end records disagree with its directory); re-download it or re-save it with torch.save"


@dataclasses.dataclass(frozen=True)
class EndRecord:
    """What the end records say, once checked: entry count, directory size and offset, and
    whether a zip64 end record was present."""

    entries: int
    directory_size: int
    directory_offset: int
    zip64: bool


def _bad(path: str | None, what: str) -> errors.FormatError:
    return errors.FormatError(what, path=path, item="end of central directory", fix=_FIX)


def _pread(stream: BinaryIO, offset: int, size: int) -> bytes:
    stream.seek(offset)
    return stream.read(size)


def _find_eocd(stream: BinaryIO, path: str | None, file_size: int) -> tuple[int, tuple]:
    """The end record zipfile would use, required to end exactly at the end of the file."""
    if file_size < _EOCD.size:
        raise _bad(path, "the file is too short to be a zip archive")
    last = _pread(stream, file_size - _EOCD.size, _EOCD.size)
    if last[:4] == _EOCD_MAGIC and last[-2:] == b"\0\0":  # zipfile's first choice: no comment
        return file_size - _EOCD.size, _EOCD.unpack(last)
    start = max(0, file_size - _EOCD.size - _MAX_COMMENT)
    tail = _pread(stream, start, file_size - start)
    found = tail.rfind(_EOCD_MAGIC)  # zipfile's second choice: the last signature in the tail
    if found < 0 or found + _EOCD.size > len(tail):
        raise _bad(path, "the archive has no end-of-central-directory record (truncated?)")
    fields = _EOCD.unpack(tail[found : found + _EOCD.size])
    if found + _EOCD.size + fields[7] != len(tail):
        raise _bad(
            path, f"the end-of-central-directory record does not end the file ({len(tail) - found - _EOCD.size - fields[7]} "
            "bytes after its comment, or a record signature inside the comment)",
        )
    return start + found, fields


def _agree(path: str | None, name: str, short: int, sentinel: int, wide: int) -> None:
    if short != sentinel and short != wide:
        raise _bad(path, f"the end record and the zip64 end record disagree on the {name} ({short} vs {wide})")


def check_end_records(stream: BinaryIO, path: str | None = None, listed: int | None = None) -> EndRecord:
    """Check that a zip archive's end records agree with each other and with its directory.

    Args:
        stream: the archive, open for binary reading (seekable).
        path: the file's name, for errors.
        listed: how many entries the caller's parser found (``len(ZipFile.infolist())``), which
            must equal the headers present too.

    Returns:
        The checked ``EndRecord``.

    Raises:
        FormatError: the records disagree, the archive spans disks, has bytes before its
            directory's stated place or after its end record, or its directory headers do not
            fill the directory's stated size.
    """
    file_size = stream.seek(0, 2)
    eocd_at, (_, disk, cd_disk, here, total, size, offset, _) = _find_eocd(stream, path, file_size)
    zip64 = eocd_at >= _LOCATOR.size and _pread(stream, eocd_at - _LOCATOR.size, 4) == _LOCATOR_MAGIC
    directory_end = eocd_at
    if zip64:
        locator_at = eocd_at - _LOCATOR.size
        _, z_disk, z_offset, disks = _LOCATOR.unpack(_pread(stream, locator_at, _LOCATOR.size))
        if z_disk != 0 or disks > 1:
            raise _bad(path, "the archive spans several disks")
        if z_offset + _ZIP64.size != locator_at:  # zipfile reads the record just before the locator
            raise _bad(path, f"the zip64 locator points at byte {z_offset}, not at the zip64 end record before it")
        record = _ZIP64.unpack(_pread(stream, z_offset, _ZIP64.size))
        magic, body, _, _, z_disk, z_cd_disk, z_here, z_total, z_size, z_offset_cd = record
        if magic != _ZIP64_MAGIC or body != _ZIP64_BODY:
            raise _bad(path, "the zip64 locator points at no valid zip64 end record")
        for name, short, sentinel, wide in (
            ("disk number", disk, 0xFFFF, z_disk), ("directory's disk", cd_disk, 0xFFFF, z_cd_disk),
            ("entries on this disk", here, 0xFFFF, z_here), ("total entries", total, 0xFFFF, z_total),
            ("directory size", size, 0xFFFFFFFF, z_size), ("directory offset", offset, 0xFFFFFFFF, z_offset_cd),
        ):
            _agree(path, name, short, sentinel, wide)
        disk, cd_disk, here, total, size, offset = z_disk, z_cd_disk, z_here, z_total, z_size, z_offset_cd
        directory_end = z_offset
    if disk != 0 or cd_disk != 0:
        raise _bad(path, "the archive spans several disks")
    if here != total:
        raise _bad(path, f"the end record counts {here} entries on this disk but {total} in all")
    if offset + size != directory_end:
        raise _bad(
            path, f"the central directory's recorded offset ({offset}) and size ({size}) do not end where the "
            f"end records begin (byte {directory_end}): bytes prepended, hidden or missing",
        )
    present = _count_headers(stream, path, offset, size)
    if present != total:
        raise _bad(path, f"the end record counts {total} entries but the central directory holds {present}")
    if listed is not None and listed != present:
        raise _bad(path, f"the zip parser found {listed} entries but the central directory holds {present}")
    return EndRecord(total, size, offset, zip64)


def _count_headers(stream: BinaryIO, path: str | None, offset: int, size: int) -> int:
    """The central-directory headers that fill exactly ``size`` bytes from ``offset``."""
    directory = _pread(stream, offset, size)
    if len(directory) != size:
        raise _bad(path, "the central directory runs past the end of the file")
    pos = count = 0
    while pos < size:
        if directory[pos : pos + 4] != _CENTRAL_MAGIC or pos + _CENTRAL > size:
            raise _bad(path, f"central directory byte {pos} is not a directory header")
        name, extra, comment = struct.unpack_from("<3H", directory, pos + 28)
        pos += _CENTRAL + name + extra + comment
        count += 1
    if pos != size:
        raise _bad(path, "the last central-directory header runs past the directory's recorded size")
    return count
