"""Builders for torch's own globals: tensors, parameters, storages, sizes, devices, dtypes.

A tensor rebuild never trusts the pickle's numbers: ``make_tensor`` checks offset, size and stride
against the storage (whose size was checked against the archive), and in ``refs`` mode only
describes the tensor (``TensorRef``) so a state dict can be read straight into a model later.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import torch

from modelkeep.legacy import builders, numpy_data, tensors
from modelkeep.legacy.records import KIND_OBJECT, Placeholder

def identity_list(p: Any, args: tuple, kwargs: dict, pos: int) -> Any:
    builders.arity(args, kwargs, 1)
    if type(args[0]) is not list:
        raise TypeError("expected a list")
    return args[0]


def restore_type_tag(p: Any, args: tuple, kwargs: dict, pos: int) -> Any:
    builders.arity(args, kwargs, 2)
    return args[0]


def tensor_from_id(p: Any, args: tuple, kwargs: dict, pos: int) -> Any:
    builders.arity(args, kwargs, 1)
    return args[0] if builders.is_int(args[0]) else None


# ---------------------------------------------------------------------------------------------
# torch values


def torch_size(p: Any, args: tuple, kwargs: dict, pos: int) -> Any:
    builders.arity(args, kwargs, 0, 1)
    dims = args[0] if args else ()
    if not isinstance(dims, (tuple, list)) or len(dims) > 1024 or not all(builders.is_int(d) for d in dims):
        raise TypeError("torch.Size takes a tuple of integers")
    return torch.Size(dims)


def torch_device(p: Any, args: tuple, kwargs: dict, pos: int) -> Any:
    builders.arity(args, kwargs, 1, 2)
    kind = args[0]
    if type(kind) is not str or len(kind) > 64 or (len(args) == 2 and not (args[1] is None or builders.is_int(args[1]))):
        raise TypeError("torch.device takes a device name and an index")
    try:
        return torch.device(*args)
    except RuntimeError as e:
        raise ValueError(f"invalid device {kind[:64]!r}") from e


def get_layout(p: Any, args: tuple, kwargs: dict, pos: int) -> Any:
    builders.arity(args, kwargs, 1)
    name = args[0]
    value = torch_values().get(name.replace("torch.", "", 1)) if type(name) is str else None
    if not isinstance(value, torch.layout):
        raise ValueError("unknown layout")
    return value


# tensors: every rebuild goes through the policy, which validates against the storage


def rebuild_tensor(p: Any, args: tuple, kwargs: dict, pos: int) -> Any:
    builders.arity(args, kwargs, 4)
    return make_tensor(p, args[0], args[1], args[2], args[3], None, False, None)


def rebuild_tensor_v2(p: Any, args: tuple, kwargs: dict, pos: int) -> Any:
    builders.arity(args, kwargs, 6, 7)
    metadata = args[6] if len(args) > 6 else None
    return make_tensor(p, args[0], args[1], args[2], args[3], None, args[4], metadata)


def rebuild_tensor_v3(p: Any, args: tuple, kwargs: dict, pos: int) -> Any:
    builders.arity(args, kwargs, 7, 8)
    if not isinstance(args[6], torch.dtype):
        raise TypeError("_rebuild_tensor_v3 needs a dtype")
    metadata = args[7] if len(args) > 7 else None
    return make_tensor(p, args[0], args[1], args[2], args[3], args[6], args[4], metadata)


def rebuild_parameter(p: Any, args: tuple, kwargs: dict, pos: int) -> Any:
    builders.arity(args, kwargs, 3)
    return as_parameter(p, args[0], args[1], None)


def rebuild_parameter_with_state(p: Any, args: tuple, kwargs: dict, pos: int) -> Any:
    builders.arity(args, kwargs, 4)
    return as_parameter(p, args[0], args[1], args[3])


def rebuild_from_type_v2(p: Any, args: tuple, kwargs: dict, pos: int) -> Any:
    builders.arity(args, kwargs, 4)
    func, new_type, inner, state = args
    if not (isinstance(func, builders.Builder) and func.tensor and func.fn is not None) or type(inner) is not tuple:
        raise TypeError("_rebuild_from_type_v2 must wrap a tensor rebuild")
    if not isinstance(new_type, builders.Builder) or new_type.value not in (torch.Tensor, torch.nn.Parameter):
        raise TypeError("only torch.Tensor and torch.nn.Parameter types are rebuilt")
    if any(isinstance(arg, Placeholder) for arg in inner):  # rescue mode: stays a placeholder
        return Placeholder("torch._tensor", "_rebuild_from_type_v2", pos, kind=KIND_OBJECT, args=args)
    tensor = func.fn(p, inner, {}, pos)
    if new_type.value is torch.nn.Parameter:
        return as_parameter(p, tensor, True, state)
    return with_attributes(p, tensor, state)


def rebuild_meta(p: Any, args: tuple, kwargs: dict, pos: int) -> Any:
    builders.arity(args, kwargs, 4)
    dtype, size, stride, requires_grad = args
    if not isinstance(dtype, torch.dtype) or type(requires_grad) is not bool:
        raise TypeError("meta tensors need a dtype and a requires_grad flag")
    for dims in (size, stride):
        if not isinstance(dims, (tuple, list)) or len(dims) > p.limits.max_ndim:
            raise TypeError("size and stride must be short tuples")
        if not all(builders.is_int(d) and 0 <= d < tensors.MAX_ELEMENTS for d in dims):
            raise TypeError("size and stride must be non-negative integers")
    return torch.empty_strided(tuple(size), tuple(stride), dtype=dtype, device="meta", requires_grad=requires_grad)


def rebuild_from_numpy(p: Any, args: tuple, kwargs: dict, pos: int) -> Any:
    builders.arity(args, kwargs, 4)
    data, dtype, _device, requires_grad = args
    numpy = numpy_data.np()
    if not isinstance(data, numpy.ndarray) or data.dtype.hasobject or not isinstance(dtype, torch.dtype):
        raise TypeError("expected a numeric numpy array and a dtype")
    tensor = torch.from_numpy(numpy.array(data, copy=True)).to(dtype=dtype)
    if requires_grad is True:
        tensor.requires_grad_(True)
    return tensor


def rebuild_from_cpu_tensor(p: Any, args: tuple, kwargs: dict, pos: int) -> Any:
    builders.arity(args, kwargs, 4)
    data, dtype, _device, requires_grad = args
    if not isinstance(dtype, torch.dtype) or type(requires_grad) is not bool:
        raise TypeError("expected a tensor, a dtype and a flag")

    def build(tensor: torch.Tensor) -> torch.Tensor:
        out = tensor.to(dtype=dtype)
        return out.requires_grad_(True) if requires_grad else out

    return derived_tensor(p, build, (data,))


def rebuild_sparse(p: Any, args: tuple, kwargs: dict, pos: int) -> Any:
    builders.arity(args, kwargs, 2)
    layout, data = args
    if layout is not torch.sparse_coo or type(data) is not tuple or len(data) not in (3, 4):
        raise TypeError("only COO sparse tensors are rebuilt")
    size = data[2]
    coalesced = data[3] if len(data) == 4 else None
    if not isinstance(size, (tuple, list)) or not all(builders.is_int(d) and d >= 0 for d in size):
        raise TypeError("sparse size must be non-negative integers")
    if coalesced not in (None, True, False):
        raise TypeError("is_coalesced must be a flag")

    def build(indices: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        return torch.sparse_coo_tensor(
            indices, values, tuple(size), check_invariants=True, is_coalesced=coalesced
        )

    return derived_tensor(p, build, (data[0], data[1]))


def load_from_bytes(p: Any, args: tuple, kwargs: dict, pos: int) -> Any:
    builders.arity(args, kwargs, 1)
    if not isinstance(args[0], (bytes, bytearray)):
        raise TypeError("_load_from_bytes takes bytes")
    return p.nested_storage(bytes(args[0]), pos)



# ---------------------------------------------------------------------------------------------
# tensors, checked against their storage


def make_tensor(
    p: Any, storage: Any, offset: Any, size: Any, stride: Any, dtype: Any, requires_grad: Any, metadata: Any
) -> Any:
    ref_storage = p.storage_ref(storage)
    dtype = ref_storage.dtype if dtype is None else dtype
    if type(requires_grad) is not bool:
        raise TypeError("requires_grad must be a flag")
    if requires_grad and not (dtype.is_floating_point or dtype.is_complex):
        raise ValueError("only floating point and complex tensors can require gradients")
    if metadata is not None and (
        not isinstance(metadata, dict)
        or not all(k in ("conj", "neg") and type(v) is bool for k, v in metadata.items())
    ):
        raise ValueError("tensor metadata may only hold the conj and neg flags")
    offset, shape, stride_t = tensors.check_view(
        ref_storage, dtype, offset, size, stride, max_ndim=p.limits.max_ndim
    )
    ref = tensors.TensorRef(
        ref_storage, offset, shape, stride_t, dtype, requires_grad=requires_grad,
        metadata=dict(metadata) if metadata else None,
    )
    return ref if p.refs else p.loader.tensor(ref)

def as_parameter(p: Any, data: Any, requires_grad: Any, state: Any) -> Any:
    if type(requires_grad) is not bool:
        raise TypeError("requires_grad must be a flag")
    attributes = _tensor_attributes(state)
    if isinstance(data, tensors.TensorRef):
        return dataclasses.replace(data, parameter=True, requires_grad=requires_grad, attributes=attributes)
    if isinstance(data, tensors.DeferredTensor):
        return derived_tensor(p, lambda t: _parameter(t, requires_grad, attributes), (data,))
    if isinstance(data, torch.Tensor):
        return _parameter(data, requires_grad, attributes)
    raise TypeError("a parameter needs a tensor")

def _parameter(tensor: torch.Tensor, requires_grad: bool, attributes: dict | None) -> torch.Tensor:
    if requires_grad and not (tensor.dtype.is_floating_point or tensor.dtype.is_complex):
        raise ValueError("only floating point and complex parameters can require gradients")
    param = torch.nn.Parameter(tensor.detach(), requires_grad=requires_grad)
    for key, value in (attributes or {}).items():
        setattr(param, key, value)
    return param

def with_attributes(p: Any, tensor: Any, state: Any) -> Any:
    attributes = _tensor_attributes(state)
    if not attributes:
        return tensor
    if isinstance(tensor, tensors.TensorRef):
        return dataclasses.replace(tensor, attributes=attributes)
    if isinstance(tensor, torch.Tensor):
        for key, value in attributes.items():
            setattr(tensor, key, value)
        return tensor
    raise TypeError("attributes need a tensor")

def _tensor_attributes(state: Any) -> dict[str, Any] | None:
    if isinstance(state, tuple) and len(state) == 2:
        if state[1]:
            raise ValueError("tensor slot state is not supported")
        state = state[0]
    if not state:
        return None
    if type(state) is not dict:
        raise ValueError("tensor attributes must be a dict")
    for key in state:
        if type(key) is not str or not key.isidentifier() or key.startswith("__") or hasattr(torch.Tensor, key):
            raise ValueError(f"tensor attribute {str(key)[:60]!r} is not allowed")
    return dict(state)

def derived_tensor(p: Any, build: Callable[..., torch.Tensor], args: tuple) -> Any:
    if p.refs:
        return tensors.DeferredTensor(build, args)
    if not all(isinstance(a, torch.Tensor) for a in args):
        raise TypeError("expected tensors")
    return build(*args)


# ---------------------------------------------------------------------------------------------
# the table


@functools.cache
@functools.cache
def torch_values() -> dict[str, Any]:
    kinds = (torch.dtype, torch.layout, torch.memory_format, torch.qscheme)
    return {name: value for name in dir(torch) if isinstance(value := getattr(torch, name, None), kinds)}



def table() -> dict[tuple[str, str], Any]:
    """The torch globals a file may name: tensor and storage rebuilds, dtypes, devices, sizes."""
    u = "torch._utils"
    table: dict[tuple[str, str], Any] = {
        (u, "_rebuild_tensor"): builders.Builder("torch._utils._rebuild_tensor", rebuild_tensor, tensor=True),
        (u, "_rebuild_tensor_v2"): builders.Builder("torch._utils._rebuild_tensor_v2", rebuild_tensor_v2, tensor=True),
        (u, "_rebuild_tensor_v3"): builders.Builder("torch._utils._rebuild_tensor_v3", rebuild_tensor_v3, tensor=True),
        (u, "_rebuild_parameter"): builders.Builder("torch._utils._rebuild_parameter", rebuild_parameter, tensor=True),
        (u, "_rebuild_parameter_with_state"): builders.Builder(
            "torch._utils._rebuild_parameter_with_state", rebuild_parameter_with_state, tensor=True
        ),
        (u, "_rebuild_meta_tensor_no_storage"): builders.Builder(
            "torch._utils._rebuild_meta_tensor_no_storage", rebuild_meta, tensor=True
        ),
        (u, "_rebuild_device_tensor_from_numpy"): builders.Builder(
            "torch._utils._rebuild_device_tensor_from_numpy", rebuild_from_numpy, tensor=True
        ),
        (u, "_rebuild_xla_tensor"): builders.Builder("torch._utils._rebuild_xla_tensor", rebuild_from_numpy, tensor=True),
        (u, "_rebuild_device_tensor_from_cpu_tensor"): builders.Builder(
            "torch._utils._rebuild_device_tensor_from_cpu_tensor", rebuild_from_cpu_tensor, tensor=True
        ),
        (u, "_rebuild_sparse_tensor"): builders.Builder("torch._utils._rebuild_sparse_tensor", rebuild_sparse, tensor=True),
        ("torch._tensor", "_rebuild_from_type_v2"): builders.Builder(
            "torch._tensor._rebuild_from_type_v2", rebuild_from_type_v2, tensor=True
        ),
        ("torch.storage", "_load_from_bytes"): builders.Builder("torch.storage._load_from_bytes", load_from_bytes),
        ("torch", "Size"): builders.Builder("torch.Size", torch_size, torch.Size),
        ("torch", "device"): builders.Builder("torch.device", torch_device, torch.device),
        ("torch", "Tensor"): builders.Builder("torch.Tensor", None, torch.Tensor),
        ("torch._tensor", "Tensor"): builders.Builder("torch.Tensor", None, torch.Tensor),
        ("torch.nn.parameter", "Parameter"): builders.Builder("torch.nn.Parameter", None, torch.nn.Parameter),
        ("torch.serialization", "_get_layout"): builders.Builder("torch.serialization._get_layout", get_layout),
    }
    for name, dtype in tensors.STORAGE_DTYPES.items():
        token = tensors.StorageType(name, dtype)
        table[("torch", name)] = token
        table[("torch.cuda", name)] = token
    for module in ("torch", "torch.storage"):
        for name in ("UntypedStorage", "_UntypedStorage"):
            table[(module, name)] = tensors.StorageType("UntypedStorage", torch.uint8, untyped=True)
    for name, dtype in tensors.TENSOR_TYPES.items():
        table[("torch", name)] = tensors.TensorType(name, dtype)
        table[("torch.cuda", name)] = tensors.TensorType(name, dtype)
    for name, value in torch_values().items():
        table[("torch", name)] = value
        if isinstance(value, torch.memory_format):  # pickled by qualified name from torch._utils
            table[("torch._utils", f"torch.{name}")] = value
    jit = "torch.jit._pickle"
    for name in ("build_intlist", "build_tensorlist", "build_doublelist", "build_boollist"):
        table[(jit, name)] = builders.Builder(f"{jit}.{name}", identity_list)
    table[(jit, "restore_type_tag")] = builders.Builder(f"{jit}.restore_type_tag", restore_type_tag)
    table[(jit, "build_tensor_from_id")] = builders.Builder(f"{jit}.build_tensor_from_id", tensor_from_id)
    return table

