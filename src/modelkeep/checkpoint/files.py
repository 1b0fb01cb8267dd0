"""Checkpoint files: a modelkeep safetensors file of kind ``checkpoint`` whose nested state is JSON
in ``modelkeep.state`` with tensor leaves stored by name.

Reading one never builds anything but plain data and tensors, so ``read_state`` is safe on any
file; ``describe_state`` needs the header alone (for ``modelkeep inspect``); ``extract_weights``
turns a checkpoint's model into a weights file.
"""

from __future__ import annotations

import math
import os
from typing import Any, Mapping

import torch

from modelkeep import api, conventions, errors, format, storage, weights
from modelkeep.sources import checkpoint as checkpoint_source
from modelkeep.sources import state_tree as tree

STATE_VERSION = checkpoint_source.STATE_VERSION
KIND = checkpoint_source.KIND


def encode_state(state: Any) -> tuple[dict[str, str], list[tuple[str, torch.Tensor]]]:
    """The header metadata and the tensors of a checkpoint file holding ``state``."""
    encoded = tree.encode(state)
    metadata = weights.modelkeep_metadata(KIND, {})
    metadata[format.KEY_STATE] = format.dumps({"version": STATE_VERSION, "tree": encoded.tree})
    return metadata, encoded.tensors


state_tree = checkpoint_source.state_tree_of  # the raw tagged tree of a checkpoint's header
verify_tensors = checkpoint_source.verify_tensors
load = checkpoint_source.read_checkpoint  # (store, path, *, header, verify, device) -> (header, state)


def read_state(
    path: str | os.PathLike[str],
    header: format.Header | None = None,
    *,
    device: torch.device | str = "cpu",
    verify: bool = True,
    storage_options: Mapping[str, Any] | None = None,
) -> Any:
    """The nested state of the checkpoint at ``path``, every tensor checked against its digest.

    Args:
        path: a local path or an fsspec URL.
        header: its header when already read.
        device: where the tensors go.
        verify: check every tensor's digest.
        storage_options: for the fsspec file system of a URL.

    Returns:
        Dicts, lists, numbers, strings, tensors and numpy arrays.

    Raises:
        FormatError: not a checkpoint. IntegrityError: a tensor changed. StorageError: unreadable.
    """
    store, location = storage.resolve(path, storage_options)
    return checkpoint_source.read_checkpoint(store, location, header=header, verify=verify, device=device)[1]


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


def model_weights(
    checkpoint_path: str | os.PathLike[str],
    *,
    verify: bool = True,
    storage_options: Mapping[str, Any] | None = None,
) -> dict[str, torch.Tensor]:
    """The model state dict of a checkpoint, reading only its tensors; names that were one
    tensor when saved (tied weights) are one tensor here too.

    Raises:
        KeyMismatchError: the checkpoint holds no model. IntegrityError: a tensor changed.
    """
    store, location = storage.resolve(checkpoint_path, storage_options)
    source = checkpoint_source.CheckpointSource(store, location, store.read_header(location))
    return source.tensors() if verify else source.tensors_unverified()


def extract_weights(
    checkpoint_path: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    metadata: Mapping[str, str] | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> dict[str, str]:
    """Write the model weights of a checkpoint to ``dst`` as a modelkeep weights file.

    Tied tensors stay stored once. Returns the per-tensor digests of the new file.
    """
    state = model_weights(checkpoint_path, storage_options=storage_options)
    return api.save_weights(state, dst, metadata=metadata, storage_options=storage_options)


# --------------------------------------------------------------------------------------------
# Importing torch.save training checkpoints

_ROLE_KEYS = conventions.ROLE_KEYS
_STEP_KEYS = conventions.STEP_KEYS


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
