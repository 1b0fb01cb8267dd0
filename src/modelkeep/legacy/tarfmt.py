"""The pre-1.0 tar layout of torch.save (members ``sys_info``, ``storages``, ``tensors``,
``pickle``), read as torch's ``legacy_load`` reads it, with every count, size and key checked
before anything is built. The reading context (``loader._Context``) runs the pickles."""

from __future__ import annotations

from typing import Any

from modelkeep import errors
from modelkeep.legacy import containers, tensors
from modelkeep.legacy.policy import REFS, Policy

Context = Any  # ``loader._Context``: path, data, limits, mode, run(), whole(), policy() (no import: no cycle)


def read_value(ctx: Context) -> Any:
    """The value of a pre-1.0 tar file (members ``sys_info``, ``storages``, ``tensors``, ``pickle``)."""
    layout = containers.TarLayout(ctx.path, ctx.limits, data=ctx.data)
    storages = containers.TarStorages()
    with containers.file_bytes(ctx.path, ctx.data) as data:
        if "sys_info" in layout.members:
            begin, size = layout.members["sys_info"]
            if size > containers.MAX_RECORD:
                raise _tar_error(ctx, "the system-info member is larger than a record can be", "sys_info")
            body = bytes(data[begin : begin + size])
            ctx.whole_pickle(body, "sys_info")
            sys_info, _ = ctx.run(body, 0, ctx.policy(REFS, None, "sys_info"))
            containers.check_sys_info(sys_info, ctx.path, "sys_info")
        _tar_storages(ctx, data, layout, storages)
        _tar_tensors(ctx, data, layout, storages)
        begin, size = layout.members["pickle"]
        if size > ctx.limits.max_pickle_bytes:
            raise errors.FormatError("the pickle is larger than the limit", path=ctx.path, fix="raise Limits.max_pickle_bytes")
        body = bytes(data[begin : begin + size])
    policy = ctx.policy(ctx.mode, storages, "pickle")
    storages.resolve = lambda ref: _tar_value(policy, ref)
    ctx.whole_pickle(body, "pickle")  # before any tensor is built
    value, _ = ctx.run(body, 0, policy)
    return value


def _tar_value(policy: Policy, ref: Any) -> Any:
    if isinstance(ref, tensors.TensorRef):
        return ref if policy.refs else policy.loader.tensor(ref)
    kind = tensors.StorageType(str(ref.dtype), ref.dtype)
    return policy._storage_value(ref, kind)


def _tar_error(ctx: Context, what: str, member: str) -> errors.FormatError:
    return errors.FormatError(what, path=ctx.path, item=member, fix="the file is damaged or crafted")


def _count(ctx: Context, value: Any, member: str) -> int:
    if type(value) is not int or not 0 <= value <= ctx.limits.max_entries:
        raise _tar_error(ctx, "member does not start with a valid count", member)
    return value


def _tar_storages(ctx: Context, data: Any, layout: containers.TarLayout, storages: containers.TarStorages) -> None:
    begin, size = layout.members["storages"]
    end = begin + size
    policy = lambda: ctx.policy(REFS, None, "storages")  # noqa: E731
    count, pos = ctx.run(data, begin, policy())
    for _ in range(_count(ctx, count, "storages")):
        header, pos = ctx.run(data, pos, policy())
        if type(header) is not tuple or len(header) != 3 or not isinstance(header[2], tensors.StorageType):
            raise _tar_error(ctx, "storage header must be (key, location, storage type)", "storages")
        key, location, kind = header
        if type(key) not in (int, str) or pos + 8 > end:  # strings before torch 0.4
            raise _tar_error(ctx, "storage key must be an integer or a string", "storages")
        numel = int.from_bytes(data[pos : pos + 8], "little")
        nbytes = numel * tensors.itemsize(kind.dtype)
        pos += 8
        if pos + nbytes > end or key in storages.objects:
            raise _tar_error(ctx, "a storage runs past its member or repeats a key", "storages")
        blob = tensors.Blob(ctx.path, f"storages[{key}]", pos, nbytes, dtype=kind.dtype, memory=ctx.data)
        storages.objects[key] = tensors.StorageRef(blob, kind.dtype, 0, nbytes,
                                                   location=location if type(location) is str else "cpu")
        pos += nbytes
    views, pos = ctx.run(data, pos, policy())
    ctx.whole(pos - begin, size, "storages", "the member's storage views")
    if type(views) is not list:
        raise _tar_error(ctx, "storage views must be a list", "storages")
    for view in views:
        if (type(view) is not tuple or len(view) != 4 or not all(type(v) in (int, str) for v in view[:2])
                or not all(type(v) is int for v in view[2:])):
            raise _tar_error(ctx, "a storage view is (key, root key, offset, count)", "storages")
        target, root_key, offset, numel = view
        root = storages.objects.get(root_key)
        if not isinstance(root, tensors.StorageRef) or offset < 0 or numel < 0 or target in storages.objects:
            raise _tar_error(ctx, "a storage view names no storage", "storages")
        element = root.itemsize
        if (offset + numel) * element > root.nbytes:
            raise _tar_error(ctx, "a storage view reaches past its storage", "storages")
        storages.objects[target] = tensors.StorageRef(root.blob, root.dtype, offset * element, numel * element,
                                                      location=root.location)


def _tar_tensors(ctx: Context, data: Any, layout: containers.TarLayout, storages: containers.TarStorages) -> None:
    begin, size = layout.members["tensors"]
    end = begin + size
    count, pos = ctx.run(data, begin, ctx.policy(REFS, None, "tensors"))
    for _ in range(_count(ctx, count, "tensors")):
        header, pos = ctx.run(data, pos, ctx.policy(REFS, None, "tensors"))
        if type(header) is not tuple or len(header) != 3 or type(header[0]) is not int:
            raise _tar_error(ctx, "tensor header must be (key, storage key, tensor type)", "tensors")
        key, storage_key, _tensor_type = header
        storage = storages.objects.get(storage_key)
        if not isinstance(storage, tensors.StorageRef) or key in storages.objects or pos + 8 > end:
            raise _tar_error(ctx, "a tensor names no storage or repeats a key", "tensors")
        ndim = int.from_bytes(data[pos : pos + 4], "little", signed=True)
        pos += 8
        if not 0 <= ndim <= ctx.limits.max_ndim or pos + 16 * ndim + 8 > end:
            raise _tar_error(ctx, "a tensor's dimensions are out of bounds", "tensors")
        numbers = [int.from_bytes(data[pos + 8 * i : pos + 8 * i + 8], "little", signed=True) for i in range(2 * ndim + 1)]
        pos += 16 * ndim + 8
        try:
            offset, shape, stride = tensors.check_view(
                storage, storage.dtype, numbers[-1], numbers[:ndim], numbers[ndim : 2 * ndim],
                max_ndim=ctx.limits.max_ndim,
            )
        except ValueError as e:
            raise _tar_error(ctx, f"tensor {key}: {e}", "tensors") from e
        storages.objects[key] = tensors.TensorRef(storage, offset, shape, stride, storage.dtype)
    ctx.whole(pos - begin, size, "tensors", "the member's last tensor")
