"""The safetensors layout and modelkeep's metadata schema.

A file is ``[u64 little-endian N][N bytes of JSON header, space padded][data buffer]``. Reading is
strict in the way safetensors' own reader is, so that a file modelkeep accepts is a file every
safetensors reader accepts, and a hostile header can never make us allocate, index or loop past
what the file holds. This module knows nothing about tensors' memory or the disk; ``modelkeep.io`` moves
the bytes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, BinaryIO, Mapping

import torch

from modelkeep import errors

FORMAT_VERSION = "1"
MAX_HEADER_BYTES = 100_000_000  # the same bound safetensors enforces
MAX_TENSOR_BYTES = 2**63 - 1  # offsets are u64 on disk; keep them in int64 for torch
MAX_NDIM = 64
HEADER_ALIGNMENT = 8  # safetensors pads the header so the data buffer starts 8-aligned
METADATA_KEY = "__metadata__"
PREFIX = "modelkeep."

# Metadata keys of DESIGN.md, each a JSON string.
KEY_FORMAT = PREFIX + "format"
KEY_KIND = PREFIX + "kind"
KEY_ALIASES = PREFIX + "aliases"
KEY_HASHES = PREFIX + "hashes"
KEY_ARCHITECTURE = PREFIX + "architecture"
KEY_INFERENCE = PREFIX + "inference"
KEY_STATE = PREFIX + "state"
KEY_PRODUCER = PREFIX + "producer"
KINDS = ("weights", "model", "checkpoint")

# safetensors dtype names <-> torch dtypes: every dtype the two share.
_DTYPE_NAMES: dict[str, torch.dtype] = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "U16": torch.uint16,
    "I16": torch.int16,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "U32": torch.uint32,
    "I32": torch.int32,
    "F32": torch.float32,
    "C64": torch.complex64,
    "U64": torch.uint64,
    "I64": torch.int64,
    "F64": torch.float64,
    "F8_E5M2": torch.float8_e5m2,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E8M0": torch.float8_e8m0fnu,
    "F8_E4M3FNUZ": torch.float8_e4m3fnuz,
    "F8_E5M2FNUZ": torch.float8_e5m2fnuz,
    "F4": torch.float4_e2m1fn_x2,
}
_NAMES_BY_DTYPE = {dtype: name for name, dtype in _DTYPE_NAMES.items()}
# Sub-byte dtypes: safetensors counts 4-bit elements, torch counts bytes holding two of them, so
# the file's last dimension is twice torch's (what safetensors.torch writes and reads).
_ELEMENTS_PER_ITEM = {"F4": 2}


def dtype_from_name(name: str) -> torch.dtype:
    return _DTYPE_NAMES[name]


def name_from_dtype(dtype: torch.dtype, *, item: str | None = None) -> str:
    try:
        return _NAMES_BY_DTYPE[dtype]
    except KeyError:
        raise errors.UnsupportedValueError(
            f"dtype {dtype} has no safetensors equivalent",
            item=item,
            fix="convert the tensor to a supported dtype first (for complex128 use "
            "torch.view_as_real, for quantized tensors dequantize)",
        ) from None


def itemsize(name: str) -> int:
    return _DTYPE_NAMES[name].itemsize


def supported_dtypes() -> tuple[torch.dtype, ...]:
    return tuple(_DTYPE_NAMES.values())


def file_shape(dtype: str, shape: tuple[int, ...], *, item: str | None = None) -> tuple[int, ...]:
    """The shape the header records for a torch ``shape`` (differs only for sub-byte dtypes)."""
    per_item = _ELEMENTS_PER_ITEM.get(dtype)
    if per_item is None:
        return tuple(shape)
    if not shape:
        raise errors.UnsupportedValueError(
            f"a 0-d {dtype} tensor has no safetensors shape",
            item=item,
            fix="give the tensor at least one dimension (reshape(1))",
        )
    return (*shape[:-1], shape[-1] * per_item)


@dataclasses.dataclass(frozen=True)
class TensorEntry:
    """One tensor of the header. ``begin``/``end`` are absolute file offsets."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPE_NAMES[self.dtype]

    @property
    def file_shape(self) -> tuple[int, ...]:
        """The shape as the header records it (``shape`` is torch's; they differ for F4)."""
        return file_shape(self.dtype, self.shape, item=self.name)


@dataclasses.dataclass(frozen=True)
class Header:
    """A validated header: entries in file order, user and modelkeep metadata, layout numbers."""

    path: str
    entries: dict[str, TensorEntry]
    metadata: dict[str, str]
    data_start: int
    file_size: int

    @property
    def data_bytes(self) -> int:
        return self.file_size - self.data_start

    def modelkeep_value(self, key: str, default: Any = None) -> Any:
        """The decoded JSON of a ``modelkeep.*`` metadata key, or ``default`` when absent."""
        raw = self.metadata.get(key)
        if raw is None:
            return default
        try:
            return json.loads(raw, object_pairs_hook=_reject_duplicates)
        except _DuplicateKey as e:
            raise errors.FormatError(
                f"metadata value names the key {e.key!r} twice",
                path=self.path,
                item=key,
                fix="the file was edited or written by another tool; re-save it with modelkeep",
            ) from None
        except (ValueError, RecursionError) as e:
            raise errors.FormatError(
                "metadata value is not valid JSON",
                path=self.path,
                item=key,
                fix="the file was edited or written by another tool; re-save it with modelkeep",
            ) from e

    @property
    def kind(self) -> str:
        kind = self.modelkeep_value(KEY_KIND, "weights")
        if kind not in KINDS:
            raise errors.FormatError(
                f"unknown file kind {kind!r} (expected one of {', '.join(KINDS)})",
                path=self.path,
                item=KEY_KIND,
                fix="the file was written by a newer modelkeep or edited; upgrade modelkeep or re-save it",
            )
        return kind

    @property
    def aliases(self) -> dict[str, str]:
        """Names stored once under another name: ``{alias: stored name}``, validated."""
        aliases = self.modelkeep_value(KEY_ALIASES, {})
        if not isinstance(aliases, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and v in self.entries and k not in self.entries
            for k, v in aliases.items()
        ):
            raise errors.FormatError(
                "aliases must map new names to stored tensor names",
                path=self.path,
                item=KEY_ALIASES,
                fix="re-save the file with modelkeep",
            )
        return aliases


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKey(key)
        result[key] = value
    return result


class _DuplicateKey(Exception):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _bad(path: str, what: str, item: str | None = None) -> errors.FormatError:
    return errors.FormatError(
        what,
        path=path,
        item=item,
        fix="the file is damaged or is not a safetensors/modelkeep file; re-download or re-save it",
    )


def parse_header(raw: bytes, *, file_size: int, path: str) -> Header:
    """Validate the JSON header bytes of a file of ``file_size`` bytes.

    ``raw`` excludes the 8-byte length prefix. The rules are safetensors': known dtypes, sizes
    that match shapes, data offsets that tile the data buffer exactly, string metadata.
    """
    data_start = 8 + len(raw)
    if data_start > file_size:
        raise _bad(path, f"header of {len(raw)} bytes runs past the end of the {file_size}-byte file")
    try:
        text = raw.decode("utf-8")
        document = json.loads(text, object_pairs_hook=_reject_duplicates)
    except _DuplicateKey as e:
        raise _bad(path, "header names the same key twice", e.key) from None
    except UnicodeDecodeError as e:
        raise _bad(path, "header is not UTF-8") from e
    except RecursionError as e:
        raise _bad(path, "header JSON is nested too deeply") from e
    except ValueError as e:
        raise _bad(path, f"header is not valid JSON ({e})") from e
    if not isinstance(document, dict):
        raise _bad(path, "header is not a JSON object")

    metadata = document.pop(METADATA_KEY, {})
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise _bad(path, "metadata must map strings to strings", METADATA_KEY)
    # Lone surrogates can only come from JSON \u escapes (strict UTF-8 decoding refuses them).
    for text in [*document, *metadata, *metadata.values()] if b"\\u" in raw else ():
        if not _is_unicode(text):
            raise _bad(path, "header has a string that is not valid Unicode (a lone surrogate escape)")

    entries = [_parse_entry(path, name, info, data_start) for name, info in document.items()]
    entries.sort(key=lambda entry: (entry.begin, entry.end))
    expected = data_start
    for entry in entries:
        if entry.begin != expected:
            what = "overlaps the tensor before it" if entry.begin < expected else "leaves a hole before it"
            raise _bad(path, f"data offsets {what}", entry.name)
        expected = entry.end
    if expected != file_size:
        raise _bad(
            path,
            f"tensors end at byte {expected} but the file has {file_size} bytes "
            "(truncated, or trailing bytes)",
        )
    return Header(
        path=path,
        entries={entry.name: entry for entry in entries},
        metadata=dict(metadata),
        data_start=data_start,
        file_size=file_size,
    )


def _is_unicode(text: str) -> bool:
    """False for strings with lone surrogates: JSON's ``\\ud800`` escapes decode to them, but no
    UTF-8 (and so no safetensors reader, file name or terminal) can hold them."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _parse_entry(path: str, name: str, info: Any, data_start: int) -> TensorEntry:
    # Plain loops and exact type checks: this runs once per tensor, 20,000 times for some models.
    if type(info) is not dict or info.keys() != _ENTRY_KEYS:
        raise _bad(path, "tensor entry must have exactly dtype, shape and data_offsets", name)
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    size = _ITEMSIZES.get(dtype) if type(dtype) is str else None
    if size is None:
        raise _bad(path, f"unknown dtype {dtype!r}", name)
    if type(shape) is not list or len(shape) > MAX_NDIM:
        raise _bad(path, f"shape must be a list of at most {MAX_NDIM} non-negative integers", name)
    for dim in shape:
        if type(dim) is not int or dim < 0:
            raise _bad(path, f"shape must be a list of at most {MAX_NDIM} non-negative integers", name)
    if type(offsets) is not list or len(offsets) != 2:
        raise _bad(path, "data_offsets must be two increasing non-negative integers", name)
    begin, end = offsets
    if type(begin) is not int or type(end) is not int or not 0 <= begin <= end <= MAX_TENSOR_BYTES:
        raise _bad(path, "data_offsets must be two increasing non-negative integers", name)
    if dtype in _ELEMENTS_PER_ITEM:
        per_item = _ELEMENTS_PER_ITEM[dtype]
        if not shape or shape[-1] % per_item:
            raise _bad(
                path, f"the last dimension of a {dtype} tensor must be a multiple of {per_item}", name
            )
        shape = [*shape[:-1], shape[-1] // per_item]
    nbytes = _checked_nbytes(shape, size)
    if nbytes is None or nbytes != end - begin:
        raise _bad(
            path,
            f"shape {info['shape']} of {dtype} does not match the {end - begin} bytes "
            "of its offsets",
            name,
        )
    return TensorEntry(name, dtype, tuple(shape), data_start + begin, data_start + end)


_ENTRY_KEYS = frozenset(("dtype", "shape", "data_offsets"))
_ITEMSIZES = {name: dtype.itemsize for name, dtype in _DTYPE_NAMES.items()}


def _checked_nbytes(shape: list[int], size: int) -> int | None:
    """Shape x itemsize, or None when the product of the non-zero dimensions overflows a file
    offset (such a shape would also overflow torch's own size arithmetic)."""
    total = size
    for dim in shape:
        if dim:
            total *= dim
            if total > MAX_TENSOR_BYTES:
                return None
    return 0 if 0 in shape else total


def read_header(stream: BinaryIO, *, path: str, file_size: int) -> Header:
    """Read and validate the header at the start of ``stream``."""
    prefix = stream.read(8)
    if len(prefix) < 8:
        raise _bad(path, f"file has {file_size} bytes, too short for the 8-byte header length")
    length = int.from_bytes(prefix, "little")
    if length > MAX_HEADER_BYTES:
        raise _bad(path, f"header length {length} exceeds the {MAX_HEADER_BYTES}-byte limit")
    if 8 + length > file_size:
        raise _bad(path, f"header length {length} runs past the end of the {file_size}-byte file")
    raw = stream.read(length)
    if len(raw) != length:
        raise _bad(path, "file ended inside the header")
    return parse_header(raw, file_size=file_size, path=path)


def read_header_file(path: str | os.PathLike[str]) -> Header:
    """Open ``path`` and read its validated header."""
    path = os.fspath(path)
    with errors.map_os_errors(path, "reading"), open(path, "rb") as stream:
        size = os.fstat(stream.fileno()).st_size
        return read_header(stream, path=path, file_size=size)


@dataclasses.dataclass(frozen=True)
class PlannedTensor:
    """What the writer knows of a tensor before its bytes exist: name, dtype name, shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * itemsize(self.dtype)


def encode_header(tensors: list[PlannedTensor], metadata: Mapping[str, str]) -> bytes:
    """The length prefix and JSON header for ``tensors`` laid out in the given order.

    Keys keep their order, the JSON is compact, and the header is space-padded so the data
    buffer starts 8-byte aligned, exactly as safetensors writes it.
    """
    document: dict[str, Any] = {}
    if metadata:
        document[METADATA_KEY] = dict(metadata)
    offset = 0
    for tensor in tensors:
        if tensor.name == METADATA_KEY or tensor.name in document:
            raise errors.UnsupportedValueError(
                "tensor name is reserved for the header's metadata"
                if tensor.name == METADATA_KEY
                else "two tensors have this name",
                item=tensor.name,
                fix="rename the tensor",
            )
        end = offset + tensor.nbytes
        document[tensor.name] = {
            "dtype": tensor.dtype,
            "shape": list(file_shape(tensor.dtype, tensor.shape, item=tensor.name)),
            "data_offsets": [offset, end],
        }
        offset = end
    body = json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    body += b" " * (-len(body) % HEADER_ALIGNMENT)
    return len(body).to_bytes(8, "little") + body


def dumps(value: Any) -> str:
    """The JSON string form of a ``modelkeep.*`` metadata value (compact, key order kept)."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
