"""modelkeep: save, load, inspect, convert and serve PyTorch models, safely and fast.

Only the public surface lives here. Heavy optional imports (torchvision, the HTTP server) happen
inside the functions that need them, so ``import modelkeep`` costs little more than ``import torch``.
"""

from modelkeep import errors
from modelkeep._version import __version__
from modelkeep.api import LoadReport, load_state_dict, load_weights, save_weights
from modelkeep.arch.factories import register_factory
from modelkeep.checkpoint import Checkpointer, KeepAll, KeepBest, KeepEvery, KeepIf, KeepLast
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
from modelkeep.models import create, load, save
from modelkeep.predict.pipeline import Prediction, predict  # binds modelkeep.predict to the function
from modelkeep.predict.spec import ImagePreprocess, InferenceSpec
from modelkeep.reading import read

__all__ = [
    "ArchitectureError",
    "Checkpointer",
    "FileInfo",
    "FormatError",
    "ImagePreprocess",
    "InferenceSpec",
    "IntegrityError",
    "KeepAll",
    "KeepBest",
    "KeepEvery",
    "KeepIf",
    "KeepLast",
    "KeyMismatchError",
    "LoadReport",
    "ModelkeepError",
    "Prediction",
    "StorageError",
    "UnsafeContentError",
    "UnsupportedValueError",
    "VerifyReport",
    "__version__",
    "create",
    "errors",
    "inspect",
    "load",
    "load_state_dict",
    "load_weights",
    "predict",
    "read",
    "register_factory",
    "save",
    "save_weights",
    "verify",
]
