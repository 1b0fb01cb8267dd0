"""Finding the state dict in whatever a torch.save file holds, and reading it into tensors.

Files hold a state dict directly, a training checkpoint that keeps it under a key such as
``state_dict`` or ``model``, a whole pickled module, or a TorchScript module. The search works on
the ``refs`` reading (nothing built, nothing imported), so tensors of other entries (optimizer
state) are never read, and the chosen ones can be read straight into a model's own memory.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import re
from typing import Any, Iterable, Mapping, Sequence

import torch

from modelkeep import conventions, errors, format
from modelkeep.io import buffers, placement, reads
from modelkeep.io import tensors as tensor_io
from modelkeep.legacy import blobs, tensors
from modelkeep.legacy.loader import Contents
from modelkeep.legacy.records import Placeholder

STATE_DICT_KEYS = conventions.MODEL_KEYS  # one list for every reader (modelkeep.conventions)
TensorLike = (tensors.TensorRef, tensors.DeferredTensor, torch.Tensor)
MAX_ENTRIES = 10_000_000


def _is_module_record(value: Any) -> bool:
    if not isinstance(value, Placeholder):
        return False
    attributes = value.attributes
    return ("_parameters" in attributes and "_modules" in attributes) or (value.script and "training" in attributes)


def _flat(value: Any) -> dict[str, Any] | None:
    if isinstance(value, Mapping) and all(type(k) is str for k in value):
        kept = {k: v for k, v in value.items() if not k.endswith("_extra_state")}
        if all(isinstance(v, TensorLike) for v in kept.values()) and (kept or not value):
            return kept
    return None


def find(contents: Contents) -> tuple[dict[str, Any], str | None]:
    """``(name -> tensor reference, key it was found under)`` for a file's state dict."""
    top = contents.value
    declared = script_declarations(contents.script_code) if contents.script_code is not None else {}
    found = _state_of(top, declared)
    if found is not None:
        return found, None
    if isinstance(top, Placeholder) and not _is_module_record(top):
        top = top.contents()  # look inside what the untrusted object held
    if isinstance(top, Mapping):
        for key in STATE_DICT_KEYS:
            if key in top:
                found = _state_of(top[key], declared)
                if found is not None:
                    return found, key
        for key in STATE_DICT_KEYS:
            inner = top.get(key)
            if isinstance(inner, Placeholder) and not _is_module_record(inner):
                inner = inner.contents()
            if isinstance(inner, Mapping):
                for sub in STATE_DICT_KEYS:
                    if sub in inner:
                        found = _state_of(inner[sub], declared)
                        if found is not None:
                            return found, f"{key}.{sub}"
    raise errors.FormatError(
        f"holds {_describe(top)}, in which no state dict was found",
        path=contents.path,
        fix="read the file with modelkeep.read() and pick the entry that holds the weights",
    )


def _describe(value: Any) -> str:
    if isinstance(value, Mapping):
        keys = [str(k)[:40] for k in list(value)[:20]]
        return f"a dict with keys {keys}"
    if isinstance(value, Placeholder):
        return f"an object of {value.qualname}"
    return f"a {type(value).__name__}"


def _state_of(value: Any, declared: dict[str, tuple[list[str], list[str]]]) -> dict[str, Any] | None:
    if isinstance(value, Placeholder) and not _is_module_record(value):
        value = value.contents()  # an untrusted dict subclass or object kept in rescue mode
    flat = _flat(value)
    if flat is not None:
        return flat
    if isinstance(value, torch.nn.Module):
        return dict(value.state_dict())
    if _is_module_record(value):
        out: dict[str, Any] = {}
        _module_state(value, "", out, declared, set())
        return out
    return None


def _items(value: Any) -> Iterable[tuple[Any, Any]]:
    if isinstance(value, Mapping):
        return list(value.items())
    return []


def _module_state(
    record: Placeholder, prefix: str, out: dict[str, Any], declared: dict, active: set[int]
) -> None:
    if id(record) in active:
        raise ValueError("a module contains itself")
    active.add(id(record))
    attributes = record.attributes
    if record.script:
        names = declared.get(record.qualname)
        if names is None:
            chosen = [(k, v) for k, v in attributes.items() if isinstance(v, TensorLike)]
        else:
            chosen = [(k, attributes.get(k)) for k in (*names[0], *names[1])]
        children = [(k, v) for k, v in attributes.items() if _is_module_record(v)]
    else:
        skip = attributes.get("_non_persistent_buffers_set") or set()
        chosen = _items(attributes.get("_parameters"))
        chosen += [(k, v) for k, v in _items(attributes.get("_buffers")) if k not in skip]
        children = _items(attributes.get("_modules"))
    for name, value in chosen:
        if isinstance(value, TensorLike) and type(name) is str:
            out[prefix + name] = value
            if len(out) > MAX_ENTRIES:
                raise ValueError("too many tensors")
    for name, child in children:
        if child is not None and type(name) is str and _is_module_record(child):
            _module_state(child, f"{prefix}{name}.", out, declared, active)
    active.discard(id(record))


_CLASS = re.compile(r"class (\w+)\(")
_NAMES = re.compile(r"\s+(__parameters__|__buffers__) = \[(.*)\]\s*$")


def script_declarations(code: dict[str, str]) -> dict[str, tuple[list[str], list[str]]]:
    """``{TorchScript class: (parameter names, buffer names)}`` from the archive's code text,
    found by matching lines, never by running or compiling the code."""
    found: dict[str, tuple[list[str], list[str]]] = {}
    for module_path, text in code.items():
        module = module_path.replace("/", ".")
        current: tuple[list[str], list[str]] | None = None
        for line in text.splitlines():
            match = _CLASS.match(line)
            if match:
                current = ([], [])
                found[f"{module}.{match.group(1)}"] = current
                continue
            names = _NAMES.match(line)
            if names and current is not None:
                target = current[0] if names.group(1) == "__parameters__" else current[1]
                target.extend(re.findall(r'"([^"]*)"', names.group(2)))
    return found


# ---------------------------------------------------------------------------------------------
# Reading


def materialize(value: Any, loader: tensors.StorageLoader) -> torch.Tensor:
    """The tensor a state-dict value describes, as a plain (non-parameter) tensor."""
    if isinstance(value, tensors.TensorRef):
        plain = dataclasses.replace(value, parameter=False, requires_grad=False, attributes=None)
        return loader.tensor(plain)
    if isinstance(value, tensors.DeferredTensor):
        built = value.build(*(materialize(arg, loader) for arg in value.args))
        return built.detach()
    if isinstance(value, torch.Tensor):
        if value.is_meta:
            raise errors.FormatError(
                "a tensor of the state dict was saved on the meta device and holds no values",
                fix="save the model after its weights are materialised",
            )
        return value.detach()
    raise TypeError(f"not a tensor: {type(value).__name__}")


def read_tensors(state: dict[str, Any], loader: tensors.StorageLoader, device: Any) -> dict[str, torch.Tensor]:
    loader.preload([v.storage.blob for v in state.values() if isinstance(v, tensors.TensorRef)])
    out = {name: materialize(value, loader) for name, value in state.items()}
    return placement.move(out, torch.device(device))  # names that shared a storage still share it


def read_into(
    path: str,
    pairs: Sequence[tuple[Any, torch.Tensor]],
    loader: tensors.StorageLoader,
    *,
    threads: int | None = None,
) -> int:
    """Fill each destination with its reference's values: contiguous tensors of uncompressed
    little-endian archives go straight from the file into the destination's memory (the same
    parallel reader as safetensors files); the rest are read once and copied. Every storage read
    is checked against its CRC-32."""
    direct: list[tuple[format.TensorEntry, torch.Tensor]] = []
    covered: dict[int, list[tuple[tensors.TensorRef, torch.Tensor]]] = {}
    staged: list[tuple[Any, torch.Tensor]] = []
    for ref, destination in pairs:
        span = ref.file_range() if isinstance(ref, tensors.TensorRef) else None
        name = _safetensors_name(ref)
        if span is None or name is None or ref.numel == 0:
            staged.append((ref, destination))
            continue
        direct.append((format.TensorEntry("", name, ref.shape, span[0], span[1]), destination))
        covered.setdefault(id(ref.storage.blob), []).append((ref, destination))
    total = tensor_io.read_into(path, direct, threads=threads) if direct else 0
    _verify_direct(covered, loader, threads)
    with torch.no_grad():
        for ref, destination in staged:
            source = materialize(ref, loader)
            destination.copy_(source)
            total += source.numel() * source.element_size()
    return total


def _safetensors_name(ref: Any) -> str | None:
    try:
        return format.name_from_dtype(ref.torch_dtype)
    except errors.ModelkeepError:
        return None


def _verify_direct(covered: dict[int, list], loader: tensors.StorageLoader, threads: int | None) -> None:
    """CRC-32 of every storage that was read directly: from the destination when one tensor
    took the whole storage unchanged, else from the file."""
    jobs = []
    for refs in covered.values():
        blob = refs[0][0].storage.blob
        if not loader.check_crc or blob.crc is None:
            continue
        ref, destination = refs[0]
        whole = (
            len(refs) == 1
            and ref.storage.start == 0
            and ref.offset == 0
            and ref.nbytes == blob.nbytes
            and tensor_io.accepts_raw_bytes(destination, format.TensorEntry("", _safetensors_name(ref) or "U8", ref.shape, 0, ref.nbytes))
        )
        jobs.append((blob, destination if whole else None))

    def check(job: tuple[tensors.Blob, torch.Tensor | None]) -> None:
        blob, destination = job
        if destination is not None:
            blobs.verify_crc(blob, buffers.tensor_bytes(destination.detach()))
        elif blobs.crc_of_file_range(blob.path, blob.offset, blob.offset + blob.nbytes) != blob.crc:
            raise blobs.crc_error(blob)

    workers = max(1, min(threads or reads.io_threads(), len(jobs)))
    if workers == 1:
        for job in jobs:
            check(job)
        return
    with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="modelkeep-crc") as pool:
        for future in [pool.submit(check, job) for job in jobs]:
            future.result()
