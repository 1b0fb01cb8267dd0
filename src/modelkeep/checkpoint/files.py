"""Checkpoint files: a modelkeep safetensors file of kind ``checkpoint`` whose nested state is JSON
in ``modelkeep.state`` with tensor leaves stored by name.

Reading one never builds anything but plain data and tensors, so ``read_state`` is safe on any
file; ``describe_state`` needs the header alone (for ``modelkeep inspect``); ``extract_weights``
turns a checkpoint's model into a weights file.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping

import torch

from modelkeep import api, errors, format, hashing, storage
from modelkeep.io import buffers
from modelkeep.checkpoint import tree

STATE_VERSION = 1
KIND = "checkpoint"


def encode_state(state: Any) -> tuple[dict[str, str], list[tuple[str, torch.Tensor]]]:
    """The header metadata and the tensors of a checkpoint file holding ``state``."""
    encoded = tree.encode(state)
    metadata = api.modelkeep_metadata(KIND, {})
    metadata[format.KEY_STATE] = format.dumps({"version": STATE_VERSION, "tree": encoded.tree})
    return metadata, encoded.tensors


def _bad(path: str, what: str, item: str = format.KEY_STATE) -> errors.FormatError:
    return errors.FormatError(what, path=path, item=item,
                              fix="the file is damaged or not a modelkeep checkpoint; use an intact one")


def state_tree(header: format.Header) -> Any:
    """The raw (still tagged) tree of a checkpoint's header."""
    if header.kind != KIND:
        raise errors.FormatError(
            f"is a {header.kind!r} file, not a checkpoint", path=header.path, item=format.KEY_KIND,
            fix="load weights with modelkeep.load_weights; checkpoints come from modelkeep.Checkpointer",
        )
    document = header.modelkeep_value(format.KEY_STATE)
    if not isinstance(document, dict) or set(document) != {"version", "tree"}:
        raise _bad(header.path, "checkpoint state must be {version, tree}")
    if document["version"] != STATE_VERSION:
        raise errors.FormatError(
            f"checkpoint state version {document['version']!r} is not supported", path=header.path,
            item=format.KEY_STATE, fix="upgrade modelkeep to read this checkpoint",
        )
    return document["tree"]


def _recorded_digests(header: format.Header) -> dict[str, str] | None:
    record = hashing.read_record(header)
    return None if record is None else dict(record.tensors)


def verify_tensors(header: format.Header, tensors: Mapping[str, torch.Tensor]) -> None:
    """Compare the bytes read with the digests recorded at save time (IntegrityError if not)."""
    digests = _recorded_digests(header)
    if digests is None:
        return
    for name, tensor in tensors.items():
        expected = digests.get(name)
        if expected is None:
            raise errors.IntegrityError("tensor has no recorded digest", path=header.path, item=name,
                                        fix="the file was edited; use an intact checkpoint")
        hasher = hashing.new_hasher()
        hasher.update(buffers.tensor_bytes(tensor))
        if hasher.hexdigest() != expected:
            raise errors.IntegrityError(
                "bytes do not match the digest recorded when the checkpoint was saved",
                path=header.path, item=name,
                fix="the file is corrupt; restore an earlier checkpoint",
            )


def load(
    store: storage.Storage,
    path: str,
    *,
    header: format.Header | None = None,
    verify: bool = True,
    device: torch.device | str = "cpu",
) -> tuple[format.Header, Any]:
    """Read a checkpoint: its header and its nested state with every tensor in memory."""
    header = header if header is not None else store.read_header(path)
    raw = state_tree(header)
    tensors = store.read_tensors(path, header.entries.values())
    if verify:
        verify_tensors(header, tensors)
    device = torch.device(device)
    if device.type != "cpu":
        tensors = {name: t.to(device) for name, t in tensors.items()}
    return header, tree.decode(raw, tensors, path=path)


def read_state(
    path: str | os.PathLike[str],
    header: format.Header | None = None,
    *,
    device: torch.device | str = "cpu",
    verify: bool = True,
) -> Any:
    """The nested state of the checkpoint at ``path`` (a local path or a URL): dicts, lists,
    numbers, strings, tensors and numpy arrays, every tensor checked against its digest."""
    store, location = storage.open_storage(path)
    return load(store, location, header=header, verify=verify, device=device)[1]


# --------------------------------------------------------------------------------------------
# Describing (inspect) and extracting weights


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k if isinstance(k, str) else repr(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return sorted((_jsonable(v) for v in value), key=repr)
    if isinstance(value, bytes):
        return f"<{len(value)} bytes>"
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if hasattr(value, "item") and type(value).__module__.startswith("numpy"):
        return value.item()
    return str(value)


def describe_state(header: format.Header) -> Any:
    """The nested state with each tensor shown as ``"tensor F32[64, 3]"``, from the header alone."""
    def describe(entry: format.TensorEntry) -> str:
        return f"tensor {entry.dtype}{list(entry.shape)}"

    return _jsonable(tree.decode(state_tree(header), header.entries, path=header.path, resolve=describe))


def format_state(description: Any, *, max_items: int = 8, max_lines: int = 400) -> str:
    """An indented outline of a described state, long lists shortened."""
    lines: list[str] = []

    def short(value: Any) -> str:
        text = json.dumps(value, ensure_ascii=False)
        return text if len(text) <= 120 else text[:117] + "..."

    def walk(value: Any, indent: str) -> None:
        if len(lines) >= max_lines:
            return
        if isinstance(value, dict):
            for key, child in value.items():
                if isinstance(child, (dict, list)) and child and not _scalars(child):
                    lines.append(f"{indent}{key}:")
                    walk(child, indent + "  ")
                else:
                    lines.append(f"{indent}{key}: {short(child)}")
        elif isinstance(value, list):
            for index, child in enumerate(value[:max_items]):
                if isinstance(child, (dict, list)) and child and not _scalars(child):
                    lines.append(f"{indent}[{index}]:")
                    walk(child, indent + "  ")
                else:
                    lines.append(f"{indent}[{index}]: {short(child)}")
            if len(value) > max_items:
                lines.append(f"{indent}... {len(value) - max_items} more")

    walk(description, "")
    if len(lines) >= max_lines:
        lines.append("...")
    return "\n".join(lines)


def _scalars(value: Any) -> bool:
    return isinstance(value, list) and all(not isinstance(v, (dict, list)) for v in value)


def model_weights(checkpoint_path: str | os.PathLike[str], *, verify: bool = True) -> dict[str, torch.Tensor]:
    """The model state dict of a checkpoint, reading only its tensors; names that were one
    tensor when saved (tied weights) are one tensor here too."""
    store, location = storage.open_storage(checkpoint_path)
    header = store.read_header(location)
    raw = state_tree(header)
    model = raw.get("model") if isinstance(raw, dict) else None
    if not isinstance(model, dict) or not all(
        isinstance(v, dict) and set(v) <= {"$tensor", "device"} for v in model.values()
    ):
        raise errors.KeyMismatchError(
            "checkpoint holds no model weights", path=location, item="model",
            fix="save the checkpoint with save(step, model=...)",
        )
    names = tree.tensor_names(model)
    missing = sorted(n for n in names if n not in header.entries)
    if missing:
        raise _bad(location, f"model state names tensors the file does not hold: {missing[:5]}")
    tensors = store.read_tensors(location, [header.entries[n] for n in names])
    if verify:
        verify_tensors(header, tensors)
    return tree.decode(model, tensors, path=location)


def extract_weights(
    checkpoint_path: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    metadata: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Write the model weights of a checkpoint to ``dst`` as a modelkeep weights file.

    Tied tensors stay stored once. Returns the per-tensor digests of the new file.
    """
    return api.save_weights(model_weights(checkpoint_path), dst, metadata=metadata)


# --------------------------------------------------------------------------------------------
# Importing torch.save training checkpoints

_ROLE_KEYS = {
    "model": ("model_state_dict", "state_dict", "model", "model_state", "net", "network"),
    "optimizer": ("optimizer_state_dict", "optimizer", "optim", "optimizer_state", "optimizer_states"),
    "scheduler": ("scheduler_state_dict", "scheduler", "lr_scheduler", "lr_scheduler_state_dict",
                  "lr_schedulers"),
    "scaler": ("scaler_state_dict", "scaler", "grad_scaler", "amp_scaler"),
}
_STEP_KEYS = ("step", "global_step", "iteration", "epoch")


def _is_state_dict(value: Any) -> bool:
    return isinstance(value, Mapping) and bool(value) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items()
    )


def state_from_torch(data: Any, step: int | None, path: str) -> tuple[int, dict[str, Any]]:
    """Map a ``torch.save`` training checkpoint (as plain data) onto checkpoint roles.

    Recognises the tutorial's keys (``model_state_dict``, ``optimizer_state_dict``, ``epoch``,
    ``loss``), Lightning's (``state_dict``, ``optimizer_states``, ``lr_schedulers``,
    ``global_step``) and a bare state dict; everything else is kept under ``extra``.
    """
    if _is_state_dict(data):
        data = {"model": data}
    if not isinstance(data, Mapping):
        raise errors.UnsupportedValueError(
            f"holds a {type(data).__name__}, not a dict of training state", path=path,
            fix="import files saved as torch.save({'model_state_dict': ..., ...})",
        )
    rest = dict(data)
    state: dict[str, Any] = {}
    for role, keys in _ROLE_KEYS.items():
        for key in keys:
            if key in rest and (role != "model" or _is_state_dict(rest[key])):
                state[role] = rest.pop(key)
                break
    if step is None:
        for key in _STEP_KEYS:
            value = rest.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
                step = value
                break
    if step is None:
        raise errors.UnsupportedValueError(
            "the file records no step", path=path, fix="pass step=N to import_torch_checkpoint",
        )
    state = {"step": step, **state, "metrics": {}}
    if rest:
        state["extra"] = rest
    return step, state
