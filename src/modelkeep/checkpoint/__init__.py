"""Training checkpoints without pickle: atomic and asynchronous saves, retention, exact resume.

The package follows the split of *what* is saved (``capture``, ``tree``: nested state to JSON and
tensors), *how and where* bytes are written (``files``, ``writer``, ``modelkeep.storage``) and
*when and which* checkpoints exist (``manager``, ``retention``)::

    ckpt = modelkeep.Checkpointer("runs/exp1", keep_last=3)
    if ckpt.latest() is not None:
        start = ckpt.restore(model=model, optimizer=opt, scheduler=sched).step + 1
    for step in range(start, steps):
        ...
        ckpt.save(step, model=model, optimizer=opt, scheduler=sched, metrics={"loss": loss})
    ckpt.wait()
"""

from modelkeep.checkpoint.files import (
    describe_state,
    extract_weights,
    model_weights,
    read_state,
)
from modelkeep.checkpoint.manager import Checkpointer, Restored
from modelkeep.checkpoint.retention import (
    AllOf,
    AnyOf,
    CheckpointInfo,
    KeepAll,
    KeepBest,
    KeepEvery,
    KeepIf,
    KeepLast,
    Policy,
)

__all__ = [
    "AllOf",
    "AnyOf",
    "CheckpointInfo",
    "Checkpointer",
    "KeepAll",
    "KeepBest",
    "KeepEvery",
    "KeepIf",
    "KeepLast",
    "Policy",
    "Restored",
    "describe_state",
    "extract_weights",
    "model_weights",
    "read_state",
]
