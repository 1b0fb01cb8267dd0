"""A blob's bytes, read once: from the file (the engine's parallel reads), inflated from a
deflated zip entry, or copied from memory; checked against the archive's CRC-32 and byte-swapped
when the file is big-endian. ``tensors.StorageLoader`` builds storages and tensors over them."""

from __future__ import annotations

import dataclasses
import os
import zlib
from typing import Any

import torch

from modelkeep import errors, format
from modelkeep.io import tensors as tensor_io
from modelkeep.io.buffers import tensor_bytes


@dataclasses.dataclass(eq=False)
class Blob:
    """Where one storage's bytes are: a range of a file (stored or deflated) or bytes in memory."""

    path: str
    name: str
    offset: int
    nbytes: int
    crc: int | None = None
    compressed: int | None = None  # deflated zip entry: bytes on disk
    memory: bytes | None = None
    big_endian: bool = False
    dtype: torch.dtype | None = None  # fixed by the first reference

    @property
    def direct(self) -> bool:
        """Bytes can go straight from the file into a destination tensor."""
        return self.memory is None and self.compressed is None and not self.big_endian


def _itemsize(dtype: torch.dtype) -> int:
    return dtype.itemsize


def read_blob(blob: Blob, *, check_crc: bool = True, threads: int | None = None) -> torch.Tensor:
    """All bytes of ``blob`` in a new uint8 tensor, verified and in native (little) byte order."""
    out = torch.empty((blob.nbytes,), dtype=torch.uint8)
    if blob.compressed is not None:  # deflated: from the file, or from the bytes in memory
        _inflate_into(blob, tensor_bytes(out))
    elif blob.memory is not None:
        view = tensor_bytes(out)
        view[:] = blob.memory[blob.offset : blob.offset + blob.nbytes]
    elif blob.nbytes:
        entry = format.TensorEntry(blob.name, "U8", (blob.nbytes,), blob.offset, blob.offset + blob.nbytes)
        tensor_io.read_into(blob.path, [(entry, out)], threads=threads)
    if check_crc and blob.crc is not None:
        verify_crc(blob, tensor_bytes(out) if blob.nbytes else b"")
    if blob.big_endian and blob.dtype is not None:
        swap_to_native(out, blob.dtype)
    return out


def verify_crc(blob: Blob, data: Any) -> None:
    if zlib.crc32(data) != blob.crc:
        raise crc_error(blob)


def crc_error(blob: Blob) -> errors.FormatError:
    return errors.FormatError(
        "the bytes do not match the archive's CRC-32 checksum",
        path=blob.path,
        item=blob.name,
        fix="the file is damaged (truncated or altered); re-download or re-save it",
    )


def crc_of_file_range(path: str, begin: int, end: int, chunk: int = 1 << 24) -> int:
    """CRC-32 of ``[begin, end)`` of a file, read in bounded chunks."""
    value = 0
    fd = os.open(path, os.O_RDONLY)
    try:
        offset = begin
        while offset < end:
            piece = os.pread(fd, min(chunk, end - offset), offset)
            if not piece:
                raise errors.FormatError("file ended before its data", path=path, fix="re-download it")
            value = zlib.crc32(piece, value)
            offset += len(piece)
    finally:
        os.close(fd)
    return value


def _inflate_into(blob: Blob, view: memoryview) -> None:
    inflater = zlib.decompressobj(-15)
    filled = 0
    remaining = blob.compressed or 0
    fd = os.open(blob.path, os.O_RDONLY) if blob.memory is None else -1
    try:
        offset = blob.offset
        while remaining and not inflater.eof:
            size = min(1 << 22, remaining)
            piece = os.pread(fd, size, offset) if fd >= 0 else bytes(blob.memory[offset : offset + size])
            if not piece:
                break
            offset += len(piece)
            remaining -= len(piece)
            room = len(view) - filled + 1
            out = inflater.decompress(piece, room)
            while True:
                if filled + len(out) > len(view):
                    raise _inflate_error(blob, "inflates to more bytes than the archive declares")
                view[filled : filled + len(out)] = out
                filled += len(out)
                if not inflater.unconsumed_tail:
                    break
                out = inflater.decompress(inflater.unconsumed_tail, len(view) - filled + 1)
    except zlib.error as e:
        raise _inflate_error(blob, f"is not valid deflate data ({e})") from e
    finally:
        if fd >= 0:
            os.close(fd)
    if filled != len(view) or not inflater.eof:
        raise _inflate_error(blob, f"inflates to {filled} bytes, not the {len(view)} declared")


def _inflate_error(blob: Blob, what: str) -> errors.FormatError:
    return errors.FormatError(
        f"compressed entry {what}", path=blob.path, item=blob.name, fix="the archive is damaged or crafted"
    )


def swap_to_native(data: torch.Tensor, dtype: torch.dtype) -> None:
    """Reverse the bytes of every element (complex numbers: of each part) in place."""
    width = _itemsize(dtype)
    if dtype.is_complex:
        width //= 2
    if width <= 1 or data.numel() % width:
        return
    rows = data.view(-1, width)
    rows.copy_(rows.flip(1))
