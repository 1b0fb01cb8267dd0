"""torch.save and torch.jit.save files, read without running them.

``read`` is the safe ``torch.load``; ``open_weights``/``read_state_dict`` find a file's state dict
(also inside checkpoints, whole pickled modules and TorchScript archives) without building
anything; ``read_module`` rebuilds a whole pickled ``nn.Module`` of trusted classes. Pickles are
interpreted by modelkeep's own opcode machine (``vm``), which never imports and never calls what
a file names; ``policy`` and ``builders`` decide what each global may mean.
"""

from modelkeep.legacy.loader import sniff
from modelkeep.legacy.reader import (
    Description,
    LegacyWeights,
    describe,
    open_weights,
    read,
    read_module,
    read_object,
    read_state_dict,
)
from modelkeep.legacy.records import Placeholder, Record
from modelkeep.legacy.trusted import DEFAULT_TRUST
from modelkeep.legacy.limits import DEFAULT_LIMITS, Limits

__all__ = [
    "DEFAULT_LIMITS",
    "DEFAULT_TRUST",
    "Description",
    "LegacyWeights",
    "Limits",
    "Placeholder",
    "Record",
    "describe",
    "open_weights",
    "read",
    "read_module",
    "read_object",
    "read_state_dict",
    "sniff",
]
