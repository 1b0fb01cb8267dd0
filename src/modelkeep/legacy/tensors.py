"""Storages and tensors of torch.save files: where their bytes are, and building them safely.

The pickle only *describes* a tensor (storage key, dtype, offset, size, stride). The reader first
turns each description into a ``TensorRef`` whose numbers are checked against the storage it
points into, and the storage's declared size against the bytes the archive really holds, before
anything is allocated. Bytes are then read once per storage, checked against the archive's CRC-32,
byte-swapped when the file is big-endian, and viewed by every tensor that shares the storage, so
tied weights stay tied exactly as ``torch.load`` leaves them.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
from typing import Any, Callable

import torch

from modelkeep import errors, format
from modelkeep.io import placement, reads
from modelkeep.io.buffers import tensor_bytes
from modelkeep.io import tensors as tensor_io
from modelkeep.legacy import blobs
from modelkeep.legacy.blobs import Blob, _itemsize

MAX_ELEMENTS = 2**62
QUANTIZED = frozenset({torch.qint8, torch.qint32, torch.quint8, torch.quint4x2, torch.quint2x4})

# torch's legacy storage class names (what torch.save writes for these dtypes) and tensor types.
STORAGE_DTYPES: dict[str, torch.dtype] = {
    "DoubleStorage": torch.double,
    "FloatStorage": torch.float,
    "HalfStorage": torch.half,
    "LongStorage": torch.long,
    "IntStorage": torch.int,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
    "BFloat16Storage": torch.bfloat16,
    "ComplexDoubleStorage": torch.cdouble,
    "ComplexFloatStorage": torch.cfloat,
    "QInt8Storage": torch.qint8,
    "QInt32Storage": torch.qint32,
    "QUInt8Storage": torch.quint8,
    "QUInt4x2Storage": torch.quint4x2,
    "QUInt2x4Storage": torch.quint2x4,
}
TENSOR_TYPES: dict[str, torch.dtype] = {
    "DoubleTensor": torch.double,
    "FloatTensor": torch.float,
    "HalfTensor": torch.half,
    "LongTensor": torch.long,
    "IntTensor": torch.int,
    "ShortTensor": torch.int16,
    "CharTensor": torch.int8,
    "ByteTensor": torch.uint8,
    "BoolTensor": torch.bool,
    "BFloat16Tensor": torch.bfloat16,
}


@dataclasses.dataclass(frozen=True)
class StorageType:
    """What a pickled storage class (``torch.FloatStorage``, ``torch.UntypedStorage``) means."""

    name: str
    dtype: torch.dtype
    untyped: bool = False


@dataclasses.dataclass(frozen=True)
class TensorType:
    """A legacy tensor type (``torch.FloatTensor``) named by pre-1.0 files."""

    name: str
    dtype: torch.dtype


@dataclasses.dataclass(eq=False)
class StorageRef:
    """A (possibly partial) view of a blob as storage of ``dtype``."""

    blob: Blob
    dtype: torch.dtype
    start: int  # bytes into the blob
    nbytes: int
    untyped: bool = False
    location: str = "cpu"  # the device the file recorded for the storage ("cuda:0", ...)

    @property
    def itemsize(self) -> int:
        return _itemsize(self.dtype)


@dataclasses.dataclass(eq=False)
class TensorRef:
    """A checked description of a storage-backed tensor; ``materialize`` makes the tensor."""

    storage: StorageRef
    offset: int  # elements of ``torch_dtype`` from the storage start
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    torch_dtype: torch.dtype
    requires_grad: bool = False
    parameter: bool = False
    metadata: dict[str, bool] | None = None
    attributes: dict[str, Any] | None = None

    @property
    def dtype(self) -> str:
        try:
            return format.name_from_dtype(self.torch_dtype)
        except errors.ModelkeepError:
            return str(self.torch_dtype).replace("torch.", "")

    @property
    def numel(self) -> int:
        total = 1
        for dim in self.shape:
            total *= dim
        return total

    @property
    def nbytes(self) -> int:
        return self.numel * _itemsize(self.torch_dtype)

    def is_contiguous(self) -> bool:
        expected = 1
        for dim, step in zip(reversed(self.shape), reversed(self.stride)):
            if dim != 1 and step != expected:
                return False
            expected *= dim
        return True

    def file_range(self) -> tuple[int, int] | None:
        """``(begin, end)`` in the file when the tensor's bytes lie there as they are in memory."""
        blob = self.storage.blob
        if not blob.direct or not self.is_contiguous() or self.metadata:
            return None
        begin = blob.offset + self.storage.start + self.offset * _itemsize(self.torch_dtype)
        return begin, begin + self.nbytes


@dataclasses.dataclass(eq=False)
class DeferredTensor:
    """A tensor built from other tensors (sparse, from numpy, device copies) once they exist."""

    build: Callable[..., torch.Tensor]
    args: tuple


def itemsize(dtype: torch.dtype) -> int:
    return _itemsize(dtype)


def check_view(
    storage: StorageRef,
    dtype: torch.dtype,
    offset: Any,
    size: Any,
    stride: Any,
    *,
    max_ndim: int,
) -> tuple[int, tuple[int, ...], tuple[int, ...]]:
    """Validated ``(offset, size, stride)`` of a tensor that must lie inside ``storage``."""
    if type(offset) is not int or offset < 0:
        raise ValueError("storage offset must be a non-negative integer")
    if not isinstance(size, (tuple, list)) or not isinstance(stride, (tuple, list)):
        raise ValueError("size and stride must be tuples")
    if len(size) != len(stride) or len(size) > max_ndim:
        raise ValueError(f"size and stride must have the same length, at most {max_ndim}")
    if not all(type(v) is int and 0 <= v < MAX_ELEMENTS for v in (*size, *stride)):
        raise ValueError("sizes and strides must be non-negative integers")
    size_t, stride_t = tuple(size), tuple(stride)
    element = _itemsize(dtype)
    if storage.start % element or storage.nbytes % element and not storage.untyped:
        raise ValueError("storage is not aligned to the tensor's element size")
    available = (storage.nbytes) // element
    numel = 1
    for dim in size_t:
        numel *= dim
        if numel > MAX_ELEMENTS:
            raise ValueError("the tensor has too many elements")
    if numel:
        last = offset + sum((dim - 1) * step for dim, step in zip(size_t, stride_t))
        if last >= available:
            raise ValueError(
                f"the tensor reaches element {last} of a storage of {available} elements"
            )
    elif offset > available:
        raise ValueError("the storage offset lies past the end of the storage")
    return offset, size_t, stride_t


# ------------------------------------------------------------------------------------------
# Reading bytes


class StorageLoader:
    """Reads each blob once (CRC-checked, byte-swapped) and builds tensors over it."""

    def __init__(
        self, *, check_crc: bool = True, threads: int | None = None, mmap: bool = False, map_location: Any = None
    ) -> None:
        self.check_crc = check_crc
        self.threads = threads
        self.mmap = mmap
        self.map_location = map_location  # torch.load's, applied per storage (``io.placement``)
        self._placed: dict[int, torch.Tensor] = {}
        self._loaded: dict[int, tuple[Blob, torch.Tensor]] = {}
        self._mapped: dict[str, torch.UntypedStorage] = {}

    def _mapped_bytes(self, blob: Blob) -> torch.Tensor:
        """The blob as a view of a private read-only-in-effect mapping of its file (torch.load's
        ``mmap=True``: ``UntypedStorage.from_file(path, shared=False)``, copy-on-write, nothing
        read until used; the zip CRC is not checked, as torch does not)."""
        whole = self._mapped.get(blob.path)
        if whole is None:
            whole = self._mapped[blob.path] = torch.UntypedStorage.from_file(
                blob.path, shared=False, nbytes=os.path.getsize(blob.path)
            )
        view = torch.empty((0,), dtype=torch.uint8)
        view.set_(whole[blob.offset : blob.offset + blob.nbytes])  # a storage of its own over the range
        return view

    def bytes_of(self, blob: Blob) -> torch.Tensor:
        """The blob as a uint8 tensor (one allocation of exactly ``blob.nbytes``, or a view of the
        file's mapping with ``mmap``)."""
        cached = self._loaded.get(id(blob))
        if cached is not None:
            return cached[1]
        if self.mmap and blob.direct and blob.nbytes:
            data = self._mapped_bytes(blob)
            self._loaded[id(blob)] = (blob, data)
            return data
        data = blobs.read_blob(blob, check_crc=self.check_crc, threads=self.threads)
        self._loaded[id(blob)] = (blob, data)
        return data

    def preload(self, wanted: list[Blob]) -> None:
        """Read many blobs at once: one parallel read for those stored plainly in a file, then
        their checksums on several threads."""
        if self.mmap:  # mapped on first use instead
            return
        pending = [b for b in dict.fromkeys(wanted) if id(b) not in self._loaded]
        direct = [b for b in pending if b.direct and b.nbytes]
        for blob in pending:
            if blob not in direct:
                self.bytes_of(blob)
        if not direct:
            return
        buffers = [(blob, torch.empty((blob.nbytes,), dtype=torch.uint8)) for blob in direct]
        by_path: dict[str, list[tuple[format.TensorEntry, torch.Tensor]]] = {}
        for blob, out in buffers:
            entry = format.TensorEntry(blob.name, "U8", (blob.nbytes,), blob.offset, blob.offset + blob.nbytes)
            by_path.setdefault(blob.path, []).append((entry, out))
        for path, pairs in by_path.items():
            tensor_io.read_into(path, pairs, threads=self.threads)
        if self.check_crc:
            checks = [(blob, out) for blob, out in buffers if blob.crc is not None]
            workers = max(1, min(self.threads or reads.io_threads(), len(checks)))
            with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="modelkeep-crc") as pool:
                for future in [pool.submit(blobs.verify_crc, blob, tensor_bytes(out)) for blob, out in checks]:
                    future.result()
        for blob, out in buffers:
            self._loaded[id(blob)] = (blob, out)

    def placed_bytes(self, blob: Blob, location: str) -> torch.Tensor:
        """The blob's bytes where ``map_location`` sends a storage the file recorded at
        ``location`` (torch's ``restore_location``), moved once per blob so that everything built
        on it shares it; the bytes as read when nothing moves."""
        data = self.bytes_of(blob)
        if self.map_location is None and location == "cpu":
            return data
        placed = self._placed.get(id(blob))
        if placed is None:
            storage = placement.restore(data.untyped_storage(), location, self.map_location)
            placed = torch.empty((0,), dtype=torch.uint8, device=storage.device)
            placed.set_(storage)
            self._placed[id(blob)] = placed
        return placed

    def storage(self, ref: StorageRef) -> torch.UntypedStorage:
        whole = self.placed_bytes(ref.blob, ref.location).untyped_storage()
        if ref.start == 0 and ref.nbytes == ref.blob.nbytes:
            return whole
        if whole.device.type == "meta":  # meta storages cannot be sliced; they hold no bytes anyway
            return torch.UntypedStorage(ref.nbytes, device="meta")
        return whole[ref.start : ref.start + ref.nbytes]  # a view sharing the blob's memory

    def tensor(self, ref: TensorRef) -> torch.Tensor:
        data = self.placed_bytes(ref.storage.blob, ref.storage.location)
        element = _itemsize(ref.torch_dtype)
        base = ref.storage.start // element
        if ref.torch_dtype in QUANTIZED:
            raise ValueError("quantized tensors are not supported")
        tensor = torch.empty((0,), dtype=ref.torch_dtype, device=data.device)
        tensor.set_(data.untyped_storage(), base + ref.offset, ref.shape, ref.stride)
        if ref.metadata:
            torch._C._set_tensor_metadata(tensor, dict(ref.metadata))  # conj/neg bits only
        if ref.parameter:
            tensor = torch.nn.Parameter(tensor, requires_grad=ref.requires_grad)
        elif ref.requires_grad:
            tensor.requires_grad_(True)
        if ref.attributes:
            for key, value in ref.attributes.items():
                setattr(tensor, key, value)
        return tensor
