"""Shared helpers of the legacy-reader tests: deep value comparison and file writers for layouts
current torch no longer writes (the pre-1.0 tar format, big-endian archives)."""

from __future__ import annotations

import argparse
import collections
import io
import math
import pickle
import struct
import tarfile
import types
import weakref
import zipfile
from typing import Any

import numpy as np
import torch

from modelkeep.legacy import Placeholder, Record
from helpers import bits


def same(ours: Any, theirs: Any, where: str = "value") -> None:
    """Assert that ``ours`` (read by modelkeep) equals ``theirs`` (torch.load or the original),
    exactly: types, dtypes, shapes, strides, values (bitwise), flags and attributes."""
    if isinstance(theirs, torch.Tensor):
        assert isinstance(ours, torch.Tensor), f"{where}: {type(ours)} is not a tensor"
        assert type(ours) is type(theirs), f"{where}: {type(ours)} vs {type(theirs)}"
        assert ours.dtype == theirs.dtype and ours.shape == theirs.shape, where
        assert ours.layout == theirs.layout and ours.device.type == theirs.device.type, where
        assert ours.requires_grad == theirs.requires_grad, f"{where}: requires_grad"
        if theirs.layout == torch.strided and not theirs.is_meta:
            assert ours.stride() == theirs.stride(), f"{where}: stride {ours.stride()} vs {theirs.stride()}"
            assert ours.storage_offset() == theirs.storage_offset(), f"{where}: storage offset"
            assert ours.is_conj() == theirs.is_conj() and ours.is_neg() == theirs.is_neg(), where
            a, b = ours.detach().resolve_conj().resolve_neg(), theirs.detach().resolve_conj().resolve_neg()
            if a.numel():
                assert torch.equal(bits(a), bits(b)), f"{where}: values differ"
        elif theirs.is_sparse:
            assert torch.equal(ours.to_dense(), theirs.to_dense()), where
        same(dict(vars(ours)), dict(vars(theirs)), f"{where}.__dict__")
        return
    if isinstance(theirs, np.ndarray):
        assert isinstance(ours, np.ndarray) and ours.dtype == theirs.dtype and ours.shape == theirs.shape, where
        if theirs.dtype.hasobject:
            for k, (x, y) in enumerate(zip(ours.ravel(), theirs.ravel())):
                same(x, y, f"{where}[{k}]")
        else:
            assert ours.tobytes() == theirs.tobytes(), where
            assert ours.flags.f_contiguous == theirs.flags.f_contiguous, where
        return
    if isinstance(theirs, np.generic):
        assert type(ours) is type(theirs) and ours.tobytes() == theirs.tobytes(), f"{where}: {ours!r} vs {theirs!r}"
        return
    if isinstance(theirs, (argparse.Namespace, types.SimpleNamespace)):
        assert type(ours) is type(theirs), f"{where}: {type(ours)}"  # the real class: plain data
        same(vars(ours), vars(theirs), where)
        return
    if isinstance(theirs, torch.nn.Module):
        assert type(ours) is type(theirs), f"{where}: {type(ours)} vs {type(theirs)}"
        assert set(vars(ours)) >= set(vars(theirs)), f"{where}: attributes {set(vars(theirs)) - set(vars(ours))}"
        for key, value in vars(theirs).items():
            same(vars(ours)[key], value, f"{where}.{key}")
        return
    if isinstance(theirs, torch.storage.TypedStorage):
        assert isinstance(ours, torch.storage.TypedStorage) and ours.dtype == theirs.dtype, where
        assert bytes(ours._untyped_storage) == bytes(theirs._untyped_storage), where
        return
    if isinstance(theirs, dict):
        assert isinstance(ours, dict), f"{where}: {type(ours)} is not a dict"
        assert type(ours) is type(theirs), f"{where}: {type(ours)} vs {type(theirs)}"
        assert list(ours) == list(theirs), f"{where}: keys {list(ours)[:8]} vs {list(theirs)[:8]}"
        if isinstance(theirs, collections.defaultdict):
            assert ours.default_factory is theirs.default_factory, where
        for key in theirs:
            same(ours[key], theirs[key], f"{where}[{key!r}]")
        if hasattr(theirs, "__dict__"):
            same(dict(vars(ours)), dict(vars(theirs)), f"{where}.__dict__")
        return
    if isinstance(theirs, (list, tuple, collections.deque)):
        assert type(ours) is type(theirs), f"{where}: {type(ours)} vs {type(theirs)}"
        assert len(ours) == len(theirs), f"{where}: length"
        if isinstance(theirs, collections.deque):
            assert ours.maxlen == theirs.maxlen, where
        for k, (x, y) in enumerate(zip(ours, theirs)):
            same(x, y, f"{where}[{k}]")
        return
    if isinstance(theirs, weakref.ref):
        assert isinstance(ours, weakref.ref), where
        same(ours(), theirs(), f"{where}()")
        return
    if isinstance(theirs, float) and math.isnan(theirs):
        assert isinstance(ours, float) and math.isnan(ours), where
        return
    if callable(theirs) and not isinstance(theirs, type) and hasattr(theirs, "func"):  # functools.partial
        assert ours.func is theirs.func and ours.args == theirs.args and ours.keywords == theirs.keywords, where
        return
    assert not isinstance(ours, Placeholder), f"{where}: placeholder {ours!r}"
    assert type(ours) is type(theirs) or (type(theirs).__module__ == "pathlib"), f"{where}: {type(ours)} vs {type(theirs)}"
    assert ours == theirs, f"{where}: {ours!r} vs {theirs!r}"


def shares_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


# ------------------------------------------------------------------------------------------
# Layouts torch no longer writes


def write_tar(path: str, obj: Any, *, protocol: int = 2) -> None:
    """The pre-1.0 tar layout (members ``storages``, ``tensors``, ``pickle``), as torch's
    ``legacy_load`` still reads it. Tensors are found by identity in ``obj``."""
    tensors: dict[int, torch.Tensor] = {}
    storages: dict[int, torch.Tensor] = {}
    keys: dict[int, int] = {}

    class Writer(pickle.Pickler):
        def persistent_id(self, value: Any) -> Any:
            if isinstance(value, torch.Tensor):
                key = keys.setdefault(id(value), 1000 + len(keys))
                tensors[key] = value
                return str(key)
            return None

    main = io.BytesIO()
    Writer(main, protocol=protocol).dump(obj)

    storage_keys: dict[int, int] = {}
    storage_part = io.BytesIO()
    tensor_part = io.BytesIO()
    for tensor in tensors.values():
        pointer = tensor.untyped_storage().data_ptr()
        if pointer not in storage_keys:
            storage_keys[pointer] = len(storage_keys) + 1
            storages[storage_keys[pointer]] = tensor
    pickle.dump(len(storages), storage_part, protocol=protocol)
    for key, tensor in storages.items():
        kind = getattr(torch, torch.storage._dtype_to_storage_type_map()[tensor.dtype])
        pickle.dump((key, "cpu", kind), storage_part, protocol=protocol)
        raw = bytes(tensor.untyped_storage())
        storage_part.write(struct.pack("<q", len(raw) // tensor.element_size()))
        storage_part.write(raw)
    pickle.dump([], storage_part, protocol=protocol)
    pickle.dump(len(tensors), tensor_part, protocol=protocol)
    for key, tensor in tensors.items():
        storage_key = storage_keys[tensor.untyped_storage().data_ptr()]
        tensor_type = getattr(torch, _TENSOR_TYPES.get(tensor.dtype, "Tensor"))
        pickle.dump((key, storage_key, tensor_type), tensor_part, protocol=protocol)
        tensor_part.write(struct.pack("<i", tensor.dim()) + b"\0" * 4)
        tensor_part.write(struct.pack(f"<{tensor.dim()}q", *tensor.shape))
        tensor_part.write(struct.pack(f"<{tensor.dim()}q", *tensor.stride()))
        tensor_part.write(struct.pack("<q", tensor.storage_offset()))
    with tarfile.open(path, "w:", format=tarfile.PAX_FORMAT) as archive:
        for name, data in (("storages", storage_part), ("tensors", tensor_part), ("pickle", main)):
            info = tarfile.TarInfo(name)
            info.size = len(data.getvalue())
            archive.addfile(info, io.BytesIO(data.getvalue()))


_TENSOR_TYPES = {
    torch.float64: "DoubleTensor", torch.float32: "FloatTensor", torch.float16: "HalfTensor",
    torch.int64: "LongTensor", torch.int32: "IntTensor", torch.int16: "ShortTensor",
    torch.int8: "CharTensor", torch.uint8: "ByteTensor", torch.bool: "BoolTensor",
}


def storage_dtypes(data_pkl: bytes) -> dict[str, torch.dtype]:
    """Storage key -> dtype of a torch zip archive's data.pkl (read with pickle: our own file)."""
    found: dict[str, torch.dtype] = {}

    class Recorder(pickle.Unpickler):
        def persistent_load(self, pid: Any) -> Any:
            _, kind, key, _location, numel = pid
            dtype = torch.uint8 if kind is torch.UntypedStorage else kind.dtype
            found[key] = dtype
            return torch.storage.TypedStorage(numel, dtype=dtype)

    Recorder(io.BytesIO(data_pkl)).load()
    return found


def to_big_endian(src: str, dst: str) -> None:
    """Rewrite a torch zip archive as a big-endian machine would have written it."""
    with zipfile.ZipFile(src) as archive:
        names = archive.namelist()
        data = {name: archive.read(name) for name in names}
    folder = names[0].split("/")[0]
    dtypes = storage_dtypes(data[f"{folder}/data.pkl"])
    with zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as archive:
        for name in names:
            raw = data[name]
            key = name.rsplit("/", 1)[-1]
            if name.startswith(f"{folder}/data/") and key in dtypes:
                width = dtypes[key].itemsize // (2 if dtypes[key].is_complex else 1)
                if width > 1:
                    raw = b"".join(raw[k : k + width][::-1] for k in range(0, len(raw), width))
            if name == f"{folder}/byteorder":
                raw = b"big"
            archive.writestr(name, raw)
