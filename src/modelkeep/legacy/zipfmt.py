"""A strict reader of the zip archives torch.save and torch.jit.save write.

Python's ``zipfile`` parses the central directory; everything after that is checked here before a
byte is used: every name is a plain relative path (no traversal, no absolute or Windows paths), no
entry is a symlink, encrypted, duplicated or stored with an unknown method, the end records agree
with the central directory (``zipend``), each local header agrees with the central directory,
entries do not overlap (overlapping entries are how non-recursive zip bombs multiply their size),
and a deflated entry may not claim to inflate past deflate's own limit or past a bound on the
whole archive. Data is read with ``pread`` from the offsets found here, and every entry's CRC-32
is checked (archives written with ``compute_crc32=False`` record no checksums at all, and are
read without).
"""

from __future__ import annotations

import dataclasses
import io
import os
import zipfile
import zlib
from typing import Iterator

from modelkeep import errors
from modelkeep.io import buffers
from modelkeep.legacy import blobs, tensors, zipend
from modelkeep.legacy.limits import Limits

LOCAL_HEADER = 30
LOCAL_MAGIC = b"PK\x03\x04"
_SYMLINK = 0o120000


@dataclasses.dataclass(frozen=True)
class Entry:
    name: str
    header: int  # offset of the local header
    offset: int  # first data byte
    compressed: int  # bytes on disk
    size: int  # bytes when read
    crc: int
    deflated: bool

    @property
    def end(self) -> int:
        return self.offset + self.compressed


class ZipArchive:
    """The validated entries of a zip archive on disk, or in memory (``data``; ``path`` then only
    names it in messages)."""

    def __init__(self, path: str, *, limits: Limits, data: bytes | None = None) -> None:
        self.path = path
        self.limits = limits
        self.data = data
        self.entries: dict[str, Entry] = {}
        try:
            self.file_size = len(data) if data is not None else os.path.getsize(path)
            opened = io.BytesIO(data) if data is not None else open(path, "rb")
            with opened as stream, zipfile.ZipFile(stream) as archive:
                infos = archive.infolist()
                if len(infos) > limits.max_entries:
                    raise self._bad(f"the archive has {len(infos)} entries, more than {limits.max_entries}")
                zipend.check_end_records(stream, path, len(infos))
                for info in infos:
                    self._add(stream, info)
        except errors.ModelkeepError:
            raise
        except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, ValueError, OverflowError,
                NotImplementedError, UnicodeError, IndexError, KeyError) as e:
            raise self._bad(f"is not a readable zip archive ({e})") from e
        except OSError as e:
            raise errors.storage_error(e, path, "reading") from e
        self._check_layout()
        self.check_crc = any(e.crc != 0 for e in self.entries.values() if e.size)

    def _bad(self, what: str, item: str | None = None) -> errors.FormatError:
        return errors.FormatError(
            what, path=self.path, item=item,
            fix="the archive is damaged or crafted; re-download it or re-save it with torch.save",
        )

    def _add(self, stream, info: zipfile.ZipInfo) -> None:  # noqa: ANN001
        name = info.filename
        _check_name(name, self._bad)
        if name in self.entries:
            raise self._bad("the archive holds two entries with the same name", name)
        if ((info.external_attr >> 16) & 0o170000) == _SYMLINK:
            raise self._bad("the archive holds a symbolic link", name)
        if info.flag_bits & 0x1:
            raise self._bad("the archive holds an encrypted entry", name)
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise self._bad(f"entry uses unsupported compression method {info.compress_type}", name)
        deflated = info.compress_type == zipfile.ZIP_DEFLATED
        if not deflated and info.compress_size != info.file_size:
            raise self._bad("stored entry's sizes disagree", name)
        if deflated and info.file_size > info.compress_size * self.limits.max_inflate_ratio + 1024:
            raise self._bad("deflated entry claims to inflate far beyond what deflate can (zip bomb)", name)
        if not 0 <= info.header_offset < self.file_size:
            raise self._bad("entry's local header lies outside the file (truncated archive)", name)
        stream.seek(info.header_offset)
        header = stream.read(LOCAL_HEADER)
        if len(header) != LOCAL_HEADER or header[:4] != LOCAL_MAGIC:
            raise self._bad("entry has no valid local header", name)
        name_length = int.from_bytes(header[26:28], "little")
        extra_length = int.from_bytes(header[28:30], "little")
        local_name = stream.read(name_length)
        encoding = "utf-8" if info.flag_bits & 0x800 else "cp437"
        if local_name != info.orig_filename.encode(encoding, "surrogateescape"):
            raise self._bad("the local header names a different file than the directory", name)
        offset = info.header_offset + LOCAL_HEADER + name_length + extra_length
        if offset + info.compress_size > self.file_size:
            raise self._bad("entry's data runs past the end of the file (truncated archive)", name)
        self.entries[name] = Entry(
            name, info.header_offset, offset, info.compress_size, info.file_size, info.CRC, deflated
        )

    def _check_layout(self) -> None:
        last_end, last_name = 0, None
        inflated = 0
        for entry in sorted(self.entries.values(), key=lambda e: e.header):
            if entry.header < last_end:
                raise self._bad(f"entry overlaps entry {last_name!r} (zip bomb or damaged archive)", entry.name)
            last_end, last_name = entry.end, entry.name
            if entry.deflated:
                inflated += entry.size
        bound = self.limits.max_inflated_factor * self.file_size + (64 << 20)
        if inflated > bound:
            raise self._bad(f"compressed entries inflate to {inflated} bytes, more than {bound} (zip bomb)")

    # ------------------------------------------------------------------------------ access

    def names(self) -> Iterator[str]:
        return iter(self.entries)

    def blob(self, name: str) -> tensors.Blob:
        entry = self.entries[name]
        return tensors.Blob(
            path=self.path,
            name=name,
            offset=entry.offset,
            nbytes=entry.size,
            crc=entry.crc if self.check_crc else None,
            compressed=entry.compressed if entry.deflated else None,
            memory=self.data,
        )

    def read(self, name: str, max_bytes: int) -> bytes:
        """A whole (small) entry's bytes, CRC-checked."""
        entry = self.entries.get(name)
        if entry is None:
            raise self._bad("the archive has no such entry", name)
        if entry.size > max_bytes:
            raise self._bad(f"entry of {entry.size} bytes is larger than the {max_bytes}-byte limit", name)
        blob = self.blob(name)
        data = bytes(buffers.tensor_bytes(blobs.read_blob(blob))) if entry.size else b""
        if blob.crc is not None and not entry.size and entry.crc != zlib.crc32(b""):
            raise self._bad("the bytes do not match the archive's CRC-32 checksum", name)
        return data


def _check_name(name: str, bad) -> None:  # noqa: ANN001
    parts = name.split("/")
    if name.endswith("/"):
        parts = parts[:-1]
    if (
        not name
        or name.startswith("/")
        or "\\" in name
        or "\x00" in name
        or (len(name) > 1 and name[1] == ":")
        or any(part in ("", ".", "..") for part in parts)
        or len(name) > 4096
    ):
        raise bad("entry name is not a plain relative path (path traversal?)", name)
