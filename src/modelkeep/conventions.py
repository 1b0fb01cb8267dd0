"""Other people's naming conventions, written down once.

A ``torch.save`` training checkpoint keeps the model's state dict under a key the training script
chose; wrappers (DataParallel/DDP, ``torch.compile``) prefix every parameter name. Reading weights
(``load_weights``, ``load_state_dict``), reading a whole pickled module and importing a training
checkpoint (``Checkpointer.import_torch_checkpoint``) all ask "which key holds the model?" and must
give the same answer, so the lists live here and nowhere else.
"""

from __future__ import annotations

from typing import Mapping

MODEL_KEYS: tuple[str, ...] = (
    "state_dict",  # Lightning, many scripts
    "model_state_dict",  # the PyTorch tutorial
    "model_state",
    "model",
    "module",
    "net",
    "network",
    "ema",
    "model_ema",
    "state_dict_ema",  # timm's training script
    "weights",
    "params",
)
"""Keys of a checkpoint dict that may hold the model (its state dict or the module), best first."""

OPTIMIZER_KEYS: tuple[str, ...] = (
    "optimizer_state_dict", "optimizer", "optim", "optimizer_state", "optimizer_states",
)
SCHEDULER_KEYS: tuple[str, ...] = (
    "scheduler_state_dict", "scheduler", "lr_scheduler", "lr_scheduler_state_dict", "lr_schedulers",
)
SCALER_KEYS: tuple[str, ...] = ("scaler_state_dict", "scaler", "grad_scaler", "amp_scaler")
STEP_KEYS: tuple[str, ...] = ("step", "global_step", "iteration", "epoch")
"""Keys that record how far training got, best first."""

ROLE_KEYS: Mapping[str, tuple[str, ...]] = {
    "model": MODEL_KEYS,
    "optimizer": OPTIMIZER_KEYS,
    "scheduler": SCHEDULER_KEYS,
    "scaler": SCALER_KEYS,
}
"""The keys of each checkpoint role, for mapping a training checkpoint onto modelkeep's roles."""

WRAPPER_PREFIXES: tuple[str, ...] = ("module.", "_orig_mod.")
"""Name prefixes added by DataParallel/DDP (``module.``) and torch.compile (``_orig_mod.``)."""


def strip_wrapper_prefixes(name: str) -> str:
    """``name`` without any leading ``module.``/``_orig_mod.`` prefixes (in any order, repeated).

    Args:
        name: a parameter or buffer name.

    Returns:
        The name as the unwrapped model spells it.
    """
    changed = True
    while changed:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix) :]
                changed = True
    return name
