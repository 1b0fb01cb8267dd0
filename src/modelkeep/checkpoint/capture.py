"""What a training checkpoint holds, and how it is put back: model, optimizer, LR scheduler,
grad scaler, RNG states, user state and metrics.

Everything is gathered as plain nested data (``state_dict()`` of each object, RNG states as
tensors and numbers), so the tree encoder can store it without pickle, and restored through each
object's own ``load_state_dict``, so resuming is bit-exact.
"""

from __future__ import annotations

import math
import random
import time
from typing import Any, Mapping

import torch

from modelkeep import errors

STATE_KEYS = ("step", "time", "model", "optimizer", "scheduler", "scaler", "rng", "extra", "metrics")


def _state_dict_of(obj: Any, role: str) -> Any:
    """``obj.state_dict()``; a list/tuple of objects gives a list of their state dicts."""
    if isinstance(obj, (list, tuple)):
        return [_state_dict_of(item, role) for item in obj]
    if isinstance(obj, Mapping):
        return dict(obj)
    state_dict = getattr(obj, "state_dict", None)
    if not callable(state_dict):
        raise errors.UnsupportedValueError(
            f"{type(obj).__name__} has no state_dict()", item=role,
            fix=f"pass the {role} object itself (or its state_dict())",
        )
    return state_dict()


def model_state(model: Any) -> dict[str, torch.Tensor]:
    if isinstance(model, torch.nn.Module):
        return dict(model.state_dict())
    if isinstance(model, Mapping):
        return dict(model)
    raise errors.UnsupportedValueError(
        f"expected an nn.Module or a state dict, got {type(model).__name__}", item="model",
        fix="pass model=your_module",
    )


def check_metrics(metrics: Mapping[str, Any] | None) -> dict[str, float]:
    """Metrics as ``{name: float}``; 0-dim tensors and numpy scalars are accepted."""
    out: dict[str, float] = {}
    for name, value in (metrics or {}).items():
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        elif hasattr(value, "item") and not isinstance(value, (int, float)):
            value = value.item()
        if not isinstance(name, str) or isinstance(value, bool) or not isinstance(value, (int, float)):
            raise errors.UnsupportedValueError(
                f"metric must be a number, got {type(value).__name__}", item=f"metrics/{name}",
                fix="pass metrics={'val_loss': float(loss)}",
            )
        out[name] = float(value)
    return out


def capture_rng() -> dict[str, Any]:
    """The global RNG states: torch CPU, CUDA (when CUDA is in use), numpy, Python's random."""
    import numpy as np

    version, internal, gauss_next = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    rng: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": keys, "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached_gaussian": float(cached)},
        "python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64),
                   "gauss_next": gauss_next},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return rng


def apply_rng(rng: Any, path: str) -> None:
    import numpy as np

    try:
        torch.set_rng_state(rng["torch"])
        numpy_state = rng["numpy"]
        np.random.set_state((numpy_state["kind"], numpy_state["keys"], numpy_state["pos"],
                             numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
        python_state = rng["python"]
        internal = tuple(int(v) for v in python_state["state"].tolist())
        random.setstate((python_state["version"], internal, python_state["gauss_next"]))
        cuda_states = rng.get("cuda")
        if cuda_states and torch.cuda.is_available():
            count = min(len(cuda_states), torch.cuda.device_count())
            for index in range(count):
                torch.cuda.set_rng_state(cuda_states[index], index)
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as e:
        raise errors.FormatError(
            f"RNG state cannot be restored ({e})", path=path, item="rng",
            fix="restore with restore_rng=False, or use an intact checkpoint",
        ) from e


def capture(
    step: int,
    *,
    model: Any,
    optimizer: Any = None,
    scheduler: Any = None,
    scaler: Any = None,
    extra: Any = None,
    metrics: Mapping[str, Any] | None = None,
    rng: bool = True,
) -> dict[str, Any]:
    """The nested state of one checkpoint, still referring to the live tensors."""
    state: dict[str, Any] = {"step": step, "time": time.time()}
    if model is not None:
        state["model"] = model_state(model)
    for role, obj in (("optimizer", optimizer), ("scheduler", scheduler), ("scaler", scaler)):
        if obj is not None:
            state[role] = _state_dict_of(obj, role)
    if rng:
        state["rng"] = capture_rng()
    if extra is not None:
        state["extra"] = extra
    state["metrics"] = check_metrics(metrics)
    return state


def _load_model(model: Any, saved: Any, *, strict: bool, path: str) -> None:
    if not isinstance(saved, Mapping):
        raise errors.FormatError("model state is not a mapping", path=path, item="model",
                                 fix="use an intact checkpoint")
    if isinstance(model, Mapping):  # a state dict to fill in place
        target = model
    else:
        target = model.state_dict()
    missing = [k for k in target if k not in saved]
    unexpected = [k for k in saved if k not in target]
    shapes = [
        f"{k}: file {list(saved[k].shape)}, model {list(target[k].shape)}"
        for k in target
        if k in saved and isinstance(saved[k], torch.Tensor) and saved[k].shape != target[k].shape
    ]
    if shapes or (strict and (missing or unexpected)):
        lines = ([f"missing in checkpoint: {k}" for k in missing[:20]]
                 + [f"not in model: {k}" for k in unexpected[:20]]
                 + [f"shape differs: {s}" for s in shapes[:20]])
        raise errors.KeyMismatchError(
            f"{len(missing)} missing, {len(unexpected)} unexpected, {len(shapes)} shape mismatches:\n  "
            + "\n  ".join(lines), path=path, item="model",
            fix="restore into the architecture that was saved, or pass strict=False",
        )
    with torch.no_grad():
        if isinstance(model, Mapping):
            for key, tensor in saved.items():
                if key in model:
                    model[key].copy_(tensor)
        else:
            model.load_state_dict(saved, strict=strict)


def _load_into(obj: Any, saved: Any, role: str, path: str) -> None:
    if isinstance(obj, (list, tuple)):
        if not isinstance(saved, list) or len(saved) != len(obj):
            raise errors.KeyMismatchError(
                f"checkpoint holds {len(saved) if isinstance(saved, list) else 1} {role} states, "
                f"{len(obj)} were passed", path=path, item=role, fix=f"pass the same {role}s that were saved",
            )
        for item, item_state in zip(obj, saved):
            _load_into(item, item_state, role, path)
        return
    try:
        obj.load_state_dict(saved)
    except (KeyError, ValueError, TypeError, RuntimeError) as e:
        raise errors.KeyMismatchError(
            f"{role} state does not fit ({e})", path=path, item=role,
            fix=f"build the {role} exactly as when saving (same parameters and groups)",
        ) from e


def apply(
    state: Mapping[str, Any],
    *,
    path: str,
    model: Any = None,
    optimizer: Any = None,
    scheduler: Any = None,
    scaler: Any = None,
    restore_rng: bool = True,
    strict: bool = True,
) -> None:
    """Load each given object from the checkpoint's state; RNG states last."""
    for role, obj in (("model", model), ("optimizer", optimizer), ("scheduler", scheduler),
                      ("scaler", scaler)):
        if obj is None:
            continue
        if role not in state:
            raise errors.KeyMismatchError(
                f"checkpoint has no {role} state", path=path, item=role,
                fix=f"pass {role}=None, or save with {role}=... next time",
            )
        if role == "model":
            _load_model(obj, state[role], strict=strict, path=path)
        else:
            _load_into(obj, state[role], role, path)
    if restore_rng and "rng" in state:
        apply_rng(state["rng"], path)


def metric_values(metrics: Any) -> dict[str, float]:
    """Validated metrics from a stored tree (files written elsewhere may hold anything)."""
    if not isinstance(metrics, Mapping):
        return {}
    return {
        k: float(v) for k, v in metrics.items()
        if isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool)
        and not math.isnan(float(v))
    }
