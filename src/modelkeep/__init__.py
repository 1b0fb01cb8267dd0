"""modelkeep: save, load, inspect, convert and serve PyTorch models, safely and fast.

Only the public surface lives here. Heavy optional imports (torchvision, the HTTP server) happen
inside the functions that need them, so ``import modelkeep`` costs little more than ``import torch``.
"""

from modelkeep import errors
from modelkeep._version import __version__
from modelkeep.api import LoadReport, load_state_dict, load_weights, save_weights
from modelkeep.errors import (
    ArchitectureError,
    FormatError,
    IntegrityError,
    KeyMismatchError,
    ModelkeepError,
    StorageError,
    UnsafeContentError,
    UnsupportedValueError,
)
from modelkeep.inspection import FileInfo, VerifyReport, inspect, verify

__all__ = [
    "ArchitectureError",
    "FileInfo",
    "FormatError",
    "IntegrityError",
    "KeyMismatchError",
    "LoadReport",
    "ModelkeepError",
    "StorageError",
    "UnsafeContentError",
    "UnsupportedValueError",
    "VerifyReport",
    "__version__",
    "errors",
    "inspect",
    "load_state_dict",
    "load_weights",
    "save_weights",
    "verify",
]
