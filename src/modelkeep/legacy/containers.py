"""Where the pickle and the storages are in each torch.save layout.

* zip (torch >= 1.6, and Hugging Face ``pytorch_model.bin``): ``<folder>/data.pkl`` with storages
  in ``<folder>/data/<key>``, ``byteorder`` and ``version`` records; TorchScript archives add
  ``constants.pkl`` (storages in ``constants/``) and ``code/``.
* stream (``_use_new_zipfile_serialization=False``): magic number, protocol version and system
  info pickles, the main pickle, the sorted storage keys, then per storage an 8-byte element count
  and its bytes.
* tar (before torch 1.0): members ``sys_info``, ``pickle``, ``tensors`` and ``storages``, in
  that order as torch wrote them (``sys_info`` is optional here, as it is for torch).

Each provider maps a storage persistent id to a ``StorageRef`` after checking that the storage it
names exists and holds exactly the bytes the pickle declares.
"""

from __future__ import annotations

import contextlib
import io
import mmap
import os
import re
import sys
import tarfile
from typing import Any, Iterator

import torch

from modelkeep import errors
from modelkeep.legacy import tensors
from modelkeep.legacy.persistent import StorageProvider
from modelkeep.legacy.limits import Limits
from modelkeep.legacy.zipfmt import ZipArchive

MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
PROTOCOL_VERSION = 1001
MAX_RECORD = 1 << 16  # byteorder, version and similar small records
MAX_SCRIPT_CODE = 64 << 20


def is_magic(first: bytes) -> bool:
    """Whether a stream's first pickle is torch's magic number (checked on the bytes: nothing of
    an unknown file is interpreted to find out)."""
    first = bytes(first)
    body = first[2:] if first[:1] == b"\x80" else first
    if body[:1] == b"\x95":
        body = body[9:]
    binary = b"\x8a\x0a" + MAGIC_NUMBER.to_bytes(10, "little") + b"."
    return body in (binary, f"L{MAGIC_NUMBER}L\n.".encode(), f"I{MAGIC_NUMBER}\n.".encode())


@contextlib.contextmanager
def file_bytes(path: str, data: bytes | None) -> Iterator[Any]:
    """The whole file as a buffer for the block: ``data`` when the file is in memory, else a
    read-only mapping of ``path`` (``b""`` for an empty file, which cannot be mapped)."""
    if data is not None:
        yield data
        return
    with open(path, "rb") as stream:
        if os.fstat(stream.fileno()).st_size == 0:
            yield b""
            return
        with mmap.mmap(stream.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            yield mapped


def _default_load_endianness() -> str | None:
    """``torch.serialization.get_default_load_endianness()`` as ``"little"``/``"big"`` (None:
    torch's default, the machine's own order, which is little on every platform torch ships for)."""
    setting = torch.serialization.get_default_load_endianness()
    if setting is None:
        return None
    return sys.byteorder if setting.name == "NATIVE" else setting.name.lower()


def _bad(path: str, what: str, item: str | None = None) -> errors.FormatError:
    return errors.FormatError(
        what, path=path, item=item, fix="the file is damaged or crafted; re-download it or re-save it"
    )


class ZipStorages(StorageProvider):
    """Storages of a torch zip archive: ``<folder>/<directory>/<key>``."""

    def __init__(self, archive: ZipArchive, folder: str, directory: str, big_endian: bool) -> None:
        self.archive = archive
        self.prefix = f"{folder}/{directory}/"
        self.big_endian = big_endian
        self.blobs: dict[str, tensors.Blob] = {}

    def storage(self, kind: tensors.StorageType, key: str, numel: int, view: Any, pos: int) -> tensors.StorageRef:
        if view is not None:
            raise ValueError("zip archives have no storage views")
        name = self.prefix + key
        nbytes = numel * tensors.itemsize(kind.dtype)
        blob = self.blobs.get(key)
        if blob is None:
            entry = self.archive.entries.get(name)
            if entry is None:
                raise ValueError(f"storage {key!r} has no entry {name!r} in the archive")
            if entry.size != nbytes:
                raise ValueError(
                    f"storage {key!r} declares {nbytes} bytes but its entry holds {entry.size}"
                )
            blob = self.archive.blob(name)
            blob.big_endian = self.big_endian
            blob.dtype = kind.dtype
            self.blobs[key] = blob
        elif blob.dtype != kind.dtype or blob.nbytes != nbytes:
            raise ValueError(f"storage {key!r} is referenced with two different types or sizes")
        return tensors.StorageRef(blob, kind.dtype, 0, nbytes, untyped=kind.untyped)


class TorchZip:
    """A torch.save / torch.jit.save zip archive: its folder, records and pickles."""

    def __init__(self, path: str, limits: Limits, data: bytes | None = None) -> None:
        self.path = path
        self.limits = limits
        self.archive = ZipArchive(path, limits=limits, data=data)
        names = list(self.archive.names())
        if not names:
            raise _bad(path, "the zip archive is empty")
        self.folder = names[0].split("/", 1)[0]
        if f"{self.folder}/data.pkl" not in self.archive.entries:
            raise _bad(path, "the zip archive has no data.pkl: not a torch.save file", f"{self.folder}/data.pkl")
        byteorder = self.record("byteorder")
        if byteorder not in (None, b"little", b"big"):
            raise _bad(path, "byteorder record must be 'little' or 'big'", f"{self.folder}/byteorder")
        if byteorder is None:  # archives from before the record: torch's setting decides, as in torch.load
            byteorder = b"big" if _default_load_endianness() == "big" else b"little"
        self.big_endian = byteorder == b"big"
        version = self.record("version")
        if version is not None and not re.fullmatch(rb"\s*\d{1,4}\s*", version):
            raise _bad(path, "version record is not a number", f"{self.folder}/version")
        self.torchscript = any(
            name == f"{self.folder}/constants.pkl" or name.startswith(f"{self.folder}/code/") for name in names
        )

    def record(self, name: str) -> bytes | None:
        full = f"{self.folder}/{name}"
        if full not in self.archive.entries:
            return None
        return self.archive.read(full, MAX_RECORD)

    def pickle(self, name: str) -> bytes:
        return self.archive.read(f"{self.folder}/{name}", self.limits.max_pickle_bytes)

    def storages(self, directory: str) -> ZipStorages:
        return ZipStorages(self.archive, self.folder, directory, self.big_endian)

    def script_code(self) -> dict[str, str]:
        """TorchScript source files (read as text, never run), by module path."""
        code: dict[str, str] = {}
        total = 0
        prefix = f"{self.folder}/code/"
        for name, entry in self.archive.entries.items():
            if name.startswith(prefix) and name.endswith(".py"):
                total += entry.size
                if total > MAX_SCRIPT_CODE:
                    break
                code[name[len(prefix) : -3]] = self.archive.read(name, MAX_SCRIPT_CODE).decode("utf-8", "replace")
        return code


class StreamStorages(StorageProvider):
    """Storages of the stream format, laid out after the pickles in sorted-key order."""

    def __init__(self, path: str, data: Any, memory: bool) -> None:
        self.path = path
        self.data = data
        self.memory = memory
        self.blobs: dict[str, tensors.Blob] = {}
        self.laid_out = False

    def storage(self, kind: tensors.StorageType, key: str, numel: int, view: Any, pos: int) -> tensors.StorageRef:
        element = tensors.itemsize(kind.dtype)
        nbytes = numel * element
        blob = self.blobs.get(key)
        if blob is None:
            if self.laid_out:
                raise ValueError(f"storage {key!r} is not in the file's storage list")
            blob = tensors.Blob(self.path, f"storage {key}", -1, nbytes, dtype=kind.dtype)
            if self.memory:
                blob.memory = self.data
            self.blobs[key] = blob
        elif blob.dtype != kind.dtype or blob.nbytes != nbytes:
            raise ValueError(f"storage {key!r} is referenced with two different types or sizes")
        if view is None:
            return tensors.StorageRef(blob, kind.dtype, 0, nbytes, untyped=kind.untyped)
        if type(view) is not tuple or len(view) != 3:
            raise ValueError("a storage view is (key, offset, size)")
        _, offset, size = view
        if type(offset) is not int or type(size) is not int or offset < 0 or size < 0:
            raise ValueError("a storage view's offset and size are non-negative integers")
        if (offset + size) * element > nbytes:
            raise ValueError("a storage view reaches past its storage")
        return tensors.StorageRef(blob, kind.dtype, offset * element, size * element, untyped=kind.untyped)

    def layout(self, keys: Any, start: int) -> int:
        """Place each listed storage: an 8-byte element count, then its bytes; return the offset
        just after the last one."""
        if type(keys) is not list or not all(type(k) is str for k in keys) or len(keys) != len(set(keys)):
            raise _bad(self.path, "the storage key list is not a list of distinct names")
        if set(keys) != set(self.blobs):
            raise _bad(self.path, "the storage key list does not match the storages the pickle uses")
        offset, end = start, len(self.data)
        for key in keys:
            blob = self.blobs[key]
            if offset + 8 > end:
                raise _bad(self.path, "the file ends before its storages (truncated)", f"storage {key}")
            count = int.from_bytes(self.data[offset : offset + 8], "little")
            if count * tensors.itemsize(blob.dtype) != blob.nbytes:
                raise _bad(self.path, "a storage's recorded size differs from what the pickle declares", f"storage {key}")
            offset += 8
            if offset + blob.nbytes > end:
                raise _bad(self.path, "the file ends inside a storage (truncated)", f"storage {key}")
            blob.offset = offset
            offset += blob.nbytes
        self.laid_out = True
        return offset


class TarLayout:
    """The members of a pre-1.0 tar file: name -> (data offset, size)."""

    MEMBERS = ("storages", "tensors", "pickle")
    OPTIONAL = ("sys_info",)

    def __init__(self, path: str, limits: Limits, data: bytes | None = None) -> None:
        self.path = path
        self.members: dict[str, tuple[int, int]] = {}
        try:
            size = len(data) if data is not None else os.path.getsize(path)
            opened = tarfile.open(fileobj=io.BytesIO(data), mode="r:") if data is not None else tarfile.open(path, mode="r:")
            with opened as archive:
                count = 0
                for member in archive:
                    count += 1
                    if count > limits.max_entries:
                        raise _bad(path, "the tar archive has too many members")
                    if member.name not in self.MEMBERS + self.OPTIONAL or not member.isreg():
                        raise _bad(path, "the tar archive holds an unexpected member (link, folder or path)", member.name)
                    if member.name in self.members:
                        raise _bad(path, "the tar archive holds a member twice", member.name)
                    if member.offset_data + member.size > size:
                        raise _bad(path, "a tar member runs past the end of the file (truncated)", member.name)
                    self.members[member.name] = (member.offset_data, member.size)
        except errors.ModelkeepError:
            raise
        except (tarfile.TarError, ValueError, OverflowError, UnicodeError, EOFError) as e:
            raise _bad(path, f"is not a readable tar archive ({e})") from e
        missing = [name for name in self.MEMBERS if name not in self.members]
        if missing:
            raise _bad(path, f"the tar archive lacks {', '.join(missing)}: not a torch.save file")


_SYS_INFO_KEYS = frozenset({"protocol_version", "little_endian", "type_sizes"})
_TYPE_SIZES = {"short": (2,), "int": (4,), "long": (4, 8)}  # C long is 4 bytes on Windows


def check_sys_info(value: Any, path: str, item: str) -> None:
    """torch.save's system-info record (stream format and the tar ``sys_info`` member).

    torch writes ``{"protocol_version": 1001, "little_endian": ..., "type_sizes": {"short": 2,
    "int": 4, "long": 8}}`` and no longer looks at it. ``little_endian`` is only checked to be a
    flag: torch's raw storage writer stores little-endian bytes on every machine (it swaps on a
    big-endian one), and torch reads such files whatever the flag says. Other type sizes mean a
    machine (or a crafted file) no torch reader was built for.

    Args:
        value: the record as the pickle machine read it.
        path: the file, for errors.
        item: where the record is (``sys_info`` member, ``system info`` pickle).

    Raises:
        FormatError: the record is not such a dict, names another protocol, has a byte-order
            flag that is not a flag, or other type sizes.
    """
    fix = "load the file with torch on the machine that wrote it and re-save it with torch.save"
    if type(value) is not dict or not all(type(k) in (str, bytes) for k in value):
        raise _bad(path, "the system-info record is not a dict of names", item)
    info = {k.decode("latin-1") if type(k) is bytes else k: v for k, v in value.items()}
    if set(info) != _SYS_INFO_KEYS:
        raise _bad(path, f"the system-info record has keys {sorted(info)}, not {sorted(_SYS_INFO_KEYS)}", item)
    if type(info["protocol_version"]) is not int or info["protocol_version"] != PROTOCOL_VERSION:
        raise _bad(path, f"unsupported legacy protocol version {info['protocol_version']!r} in the system-info record", item)
    if type(info["little_endian"]) not in (bool, int) or info["little_endian"] not in (0, 1):
        raise _bad(path, f"the system-info byte-order flag is {str(info['little_endian'])[:40]}, not a flag", item)
    sizes = info["type_sizes"]
    if type(sizes) is not dict or not all(type(k) in (str, bytes) for k in sizes):
        raise _bad(path, "the system-info type sizes are not a dict of names", item)
    sizes = {k.decode("latin-1") if type(k) is bytes else k: v for k, v in sizes.items()}
    if set(sizes) != set(_TYPE_SIZES) or any(
        type(sizes[name]) is not int or sizes[name] not in allowed for name, allowed in _TYPE_SIZES.items()
    ):
        raise errors.FormatError(
            f"was written for C type sizes {str(sizes)[:200]}, not short=2, int=4, long=4 or 8", path=path, item=item, fix=fix
        )


class TarStorages(StorageProvider):
    """Tensors and storages of a tar file, by their keys: integers, or strings for storages in
    files from before torch 0.4, kept as torch keeps them; the main pickle names tensors by
    integer (torch's ``deserialized_objects[int(saved_id)]``)."""

    def __init__(self) -> None:
        self.objects: dict[int | str, Any] = {}  # key -> StorageRef or TensorRef
        self.resolve: Any = None  # set by the reader: turns a ref into the value to return
        self._values: dict[int, Any] = {}

    def tensor(self, key: str, pos: int) -> Any:
        number = int(key)
        if number not in self._values:  # one object per key, as torch.load gives
            found = self.objects.get(number)
            if found is None:
                raise ValueError(f"persistent id {key} names no stored tensor or storage")
            self._values[number] = self.resolve(found)
        return self._values[number]
