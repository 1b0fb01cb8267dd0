"""modelkeep: save, load, inspect, scan, convert and compare PyTorch models, and predict with
them, safely and fast.

Only the public surface lives here: ``__all__`` lists every public name, and no public name
shadows a submodule (the modules behind ``scan``, ``convert``, ``diff`` and ``predict`` are
``scanning``, ``conversion``, ``comparison`` and ``inference``). Heavy optional imports
(torchvision, PIL) happen inside the functions that need them, so ``import modelkeep`` costs little
more than ``import torch``.
"""

from modelkeep import errors
from modelkeep._version import __version__
from modelkeep.api import LoadReport, load_state_dict, load_weights, save_weights
from modelkeep.arch.factories import register_factory
from modelkeep.checkpoint import (
    CheckpointInfo,
    Checkpointer,
    KeepAll,
    KeepBest,
    KeepEvery,
    KeepIf,
    KeepLast,
    Restored,
)
from modelkeep.comparison import DiffReport, TensorDiff, diff
from modelkeep.conversion import ConvertReport, convert
from modelkeep.errors import (
    ArchitectureError,
    FileExistsStorageError,
    FormatError,
    IntegrityError,
    InvalidArgumentError,
    IsAFolderError,
    KeyMismatchError,
    MissingFileError,
    ModelkeepError,
    NotAFolderError,
    PermissionStorageError,
    StepExistsError,
    StepNotFoundError,
    StorageError,
    UnsafeContentError,
    UnsupportedValueError,
)
from modelkeep.inference.pipeline import Prediction, Ranked, predict
from modelkeep.inference.spec import ImagePreprocess, InferenceSpec
from modelkeep.inspection import FileInfo, TensorInfo, VerifyReport, inspect, verify
from modelkeep.creation import create
from modelkeep.models import load, save
from modelkeep.patching import Patch, patch_torch_load
from modelkeep.reading import read
from modelkeep.scanning import FileScan, GlobalFinding, scan

__all__ = [
    "ArchitectureError",
    "CheckpointInfo",
    "Checkpointer",
    "ConvertReport",
    "DiffReport",
    "FileExistsStorageError",
    "FileInfo",
    "FileScan",
    "FormatError",
    "GlobalFinding",
    "ImagePreprocess",
    "InferenceSpec",
    "IntegrityError",
    "InvalidArgumentError",
    "IsAFolderError",
    "KeepAll",
    "KeepBest",
    "KeepEvery",
    "KeepIf",
    "KeepLast",
    "KeyMismatchError",
    "LoadReport",
    "MissingFileError",
    "ModelkeepError",
    "NotAFolderError",
    "Patch",
    "PermissionStorageError",
    "Prediction",
    "Ranked",
    "Restored",
    "StepExistsError",
    "StepNotFoundError",
    "StorageError",
    "TensorDiff",
    "TensorInfo",
    "UnsafeContentError",
    "UnsupportedValueError",
    "VerifyReport",
    "__version__",
    "convert",
    "create",
    "diff",
    "errors",
    "inspect",
    "load",
    "load_state_dict",
    "load_weights",
    "patch_torch_load",
    "predict",
    "read",
    "register_factory",
    "save",
    "save_weights",
    "scan",
    "verify",
]
