"""The inference spec: what a model expects and what its outputs mean, as data.

Stored as JSON under ``modelkeep.inference`` so that a saved file alone is enough to predict: the
input signature (shape with dynamic dims, dtype), the image preprocessing (resize, center crop,
rescale, normalize, interpolation, channel order) and the label names. Preprocessing is a record
of numbers and names, never code, so reading it cannot run anything; ``preprocess.py`` applies it.

Example document::

    {"version": 1,
     "input": {"shape": ["batch", 3, 224, 224], "dtype": "float32"},
     "preprocess": {"type": "image", "channels": "RGB", "resize": [256], "interpolation": "bilinear",
                    "antialias": true, "center_crop": [224, 224], "divide": 255.0,
                    "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
     "output": "logits", "labels": ["tench", ...], "source": "torchvision VGG16_Weights.IMAGENET1K_V1"}
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Mapping

import torch

from modelkeep import errors, format

SPEC_VERSION = 1
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos")
CHANNELS = ("RGB", "BGR", "L")
OUTPUTS = ("logits", "probabilities", "raw")
DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int64": torch.int64,
    "int32": torch.int32,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
MAX_SIDE = 16384  # a stored resize/crop never makes an image larger than this per side
MAX_LABELS = 1_000_000
MAX_LABEL_CHARS = 1000
MAX_NDIM = 16
MAX_DIM = 2**31 - 1

Dim = int | str | None  # an int is fixed; a name (or None) is dynamic, e.g. "batch"


@dataclasses.dataclass(frozen=True)
class ImagePreprocess:
    """How an image becomes the model's input tensor, in torchvision's order: convert to
    ``channels``, resize, center crop, to a CHW float tensor divided by ``divide``, normalize.

    ``resize`` with one number sets the shorter side (aspect ratio kept), with two it is
    ``(height, width)``; ``center_crop`` is ``(height, width)``. Defaults are ImageNet's.
    """

    resize: tuple[int, ...] | None = (256,)
    center_crop: tuple[int, int] | None = (224, 224)
    interpolation: str = "bilinear"
    antialias: bool = True
    divide: float = 255.0
    mean: tuple[float, ...] | None = (0.485, 0.456, 0.406)
    std: tuple[float, ...] | None = (0.229, 0.224, 0.225)
    channels: str = "RGB"

    def __post_init__(self) -> None:
        _check_image(self, path=None)

    @property
    def channel_count(self) -> int:
        return 1 if self.channels == "L" else 3

    def to_json(self) -> dict[str, Any]:
        return {
            "type": "image",
            "channels": self.channels,
            "resize": list(self.resize) if self.resize is not None else None,
            "interpolation": self.interpolation,
            "antialias": self.antialias,
            "center_crop": list(self.center_crop) if self.center_crop is not None else None,
            "divide": self.divide,
            "mean": list(self.mean) if self.mean is not None else None,
            "std": list(self.std) if self.std is not None else None,
        }


@dataclasses.dataclass(frozen=True)
class InferenceSpec:
    """What a model takes and what its outputs mean; settable for any model.

    ``input_shape`` uses an int for a fixed dim and a name (or None) for a dynamic one, e.g.
    ``("batch", 1, 8, 8)``. ``output`` says how to read the first output: ``"logits"`` (softmax,
    then top-k), ``"probabilities"`` (top-k as is) or ``"raw"`` (returned untouched).
    """

    input_shape: tuple[Dim, ...] | None = None
    input_dtype: str = "float32"
    image: ImagePreprocess | None = None
    labels: tuple[str, ...] | None = None
    output: str = "logits"
    source: str | None = None

    def __post_init__(self) -> None:
        if self.input_shape is not None:
            object.__setattr__(self, "input_shape", tuple(self.input_shape))
        if self.labels is not None:
            object.__setattr__(self, "labels", tuple(self.labels))
        _check_spec(self, path=None)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.input_dtype]

    def to_json(self) -> dict[str, Any]:
        """The JSON document stored under ``modelkeep.inference``."""
        document: dict[str, Any] = {"version": SPEC_VERSION}
        document["input"] = {
            "shape": list(self.input_shape) if self.input_shape is not None else None,
            "dtype": self.input_dtype,
        }
        document["preprocess"] = self.image.to_json() if self.image is not None else None
        document["output"] = self.output
        document["labels"] = list(self.labels) if self.labels is not None else None
        if self.source is not None:
            document["source"] = self.source
        return document

    @classmethod
    def from_json(cls, document: Any, *, path: str | None = None) -> "InferenceSpec":
        """Validate a stored document strictly; a bad one is a FormatError naming the field."""
        return _from_json(document, path=path)

    @classmethod
    def from_torchvision(cls, weights: Any) -> "InferenceSpec":
        """The spec of a torchvision weights entry: its ``transforms()`` and ``meta["categories"]``."""
        return from_torchvision(weights)

    def replace(self, **changes: Any) -> "InferenceSpec":
        return dataclasses.replace(self, **changes)


# --------------------------------------------------------------------------------------------
# Validation (the same rules for values built in code and documents read from files)


def _bad(what: str, field: str, path: str | None) -> errors.ModelkeepError:
    if path is None:
        return errors.UnsupportedValueError(what, item=field, fix="correct the inference spec")
    return errors.FormatError(
        what,
        path=path,
        item=f"{format.KEY_INFERENCE}.{field}",
        fix="re-save the model with a valid inference spec (modelkeep.InferenceSpec)",
    )


def _positive_ints(value: Any, field: str, path: str | None, lengths: tuple[int, ...]) -> None:
    if not isinstance(value, (list, tuple)) or len(value) not in lengths:
        raise _bad(f"must be a list of {' or '.join(map(str, lengths))} integers", field, path)
    for item in value:
        if isinstance(item, bool) or not isinstance(item, int) or not 1 <= item <= MAX_SIDE:
            raise _bad(f"sizes must be integers from 1 to {MAX_SIDE}, got {item!r}", field, path)


def _floats(value: Any, field: str, path: str | None, count: int, *, nonzero: bool) -> None:
    if not isinstance(value, (list, tuple)) or len(value) != count:
        raise _bad(f"must be a list of {count} numbers (one per channel)", field, path)
    for item in value:
        if isinstance(item, bool) or not isinstance(item, (int, float)) or not math.isfinite(item):
            raise _bad(f"must hold finite numbers, got {item!r}", field, path)
        if nonzero and item == 0:
            raise _bad("must not hold zeros (it divides)", field, path)


def _one_of(value: Any, choices: Any) -> bool:
    return isinstance(value, str) and value in choices


def _check_image(image: ImagePreprocess, path: str | None) -> None:
    if not _one_of(image.channels, CHANNELS):
        raise _bad(f"channels must be one of {', '.join(CHANNELS)}", "preprocess.channels", path)
    if image.resize is not None:
        _positive_ints(image.resize, "preprocess.resize", path, (1, 2))
    if image.center_crop is not None:
        _positive_ints(image.center_crop, "preprocess.center_crop", path, (2,))
    if not _one_of(image.interpolation, INTERPOLATIONS):
        raise _bad(
            f"interpolation must be one of {', '.join(INTERPOLATIONS)}", "preprocess.interpolation", path
        )
    if not isinstance(image.antialias, bool):
        raise _bad("antialias must be true or false", "preprocess.antialias", path)
    if (
        isinstance(image.divide, bool)
        or not isinstance(image.divide, (int, float))
        or not math.isfinite(image.divide)
        or image.divide <= 0
    ):
        raise _bad("divide must be a positive number", "preprocess.divide", path)
    if (image.mean is None) != (image.std is None):
        raise _bad("mean and std are given together or not at all", "preprocess.mean", path)
    if image.mean is not None:
        _floats(image.mean, "preprocess.mean", path, image.channel_count, nonzero=False)
        _floats(image.std, "preprocess.std", path, image.channel_count, nonzero=True)


def _check_spec(spec: InferenceSpec, path: str | None) -> None:
    if spec.input_shape is not None:
        if len(spec.input_shape) > MAX_NDIM:
            raise _bad(f"at most {MAX_NDIM} dims", "input.shape", path)
        for dim in spec.input_shape:
            fixed = isinstance(dim, int) and not isinstance(dim, bool) and 0 <= dim <= MAX_DIM
            named = dim is None or (isinstance(dim, str) and 0 < len(dim) <= 64)
            if not (fixed or named):
                raise _bad(f"dims are sizes or names of dynamic dims, got {dim!r}", "input.shape", path)
    if not _one_of(spec.input_dtype, DTYPES):
        raise _bad(f"dtype must be one of {', '.join(DTYPES)}", "input.dtype", path)
    if not _one_of(spec.output, OUTPUTS):
        raise _bad(f"output must be one of {', '.join(OUTPUTS)}", "output", path)
    if spec.image is not None and not isinstance(spec.image, ImagePreprocess):
        raise _bad("must be an ImagePreprocess", "preprocess", path)
    if spec.labels is not None:
        if len(spec.labels) > MAX_LABELS:
            raise _bad(f"at most {MAX_LABELS} labels", "labels", path)
        for label in spec.labels:
            if not isinstance(label, str) or len(label) > MAX_LABEL_CHARS:
                raise _bad(f"labels are strings of at most {MAX_LABEL_CHARS} characters", "labels", path)
    if spec.source is not None and not isinstance(spec.source, str):
        raise _bad("source must be a string", "source", path)


def _from_json(document: Any, *, path: str | None) -> InferenceSpec:
    if not isinstance(document, Mapping):
        raise _bad("must be a JSON object", "", path)
    version = document.get("version", SPEC_VERSION)
    if isinstance(version, bool) or version != SPEC_VERSION:
        raise _bad(f"version {version!r} is not supported (this modelkeep reads {SPEC_VERSION})", "version", path)
    unknown = set(document) - {"version", "input", "preprocess", "output", "labels", "source"}
    if unknown:
        raise _bad(f"unknown fields {sorted(unknown)}", "", path)
    signature = document.get("input") or {}
    if not isinstance(signature, Mapping):
        raise _bad("must be a JSON object", "input", path)
    if set(signature) - {"shape", "dtype"}:
        raise _bad(f"unknown fields {sorted(set(signature) - {'shape', 'dtype'})}", "input", path)
    shape = signature.get("shape")
    if shape is not None and not isinstance(shape, list):
        raise _bad("must be a list", "input.shape", path)
    image = _image_from_json(document.get("preprocess"), path)
    labels = document.get("labels")
    if labels is not None and not isinstance(labels, list):
        raise _bad("must be a list of strings", "labels", path)
    values = dict(
        input_shape=tuple(shape) if shape is not None else None,
        input_dtype=signature.get("dtype", "float32"),
        image=image,
        labels=tuple(labels) if labels is not None else None,
        output=document.get("output", "logits"),
        source=document.get("source"),
    )
    spec = InferenceSpec.__new__(InferenceSpec)
    for key, value in values.items():
        object.__setattr__(spec, key, value)
    _check_spec(spec, path)
    return spec


def _image_from_json(document: Any, path: str | None) -> ImagePreprocess | None:
    if document is None:
        return None
    if not isinstance(document, Mapping) or document.get("type") != "image":
        raise _bad('must be null or an object with "type": "image"', "preprocess", path)
    fields = {"type", "channels", "resize", "interpolation", "antialias", "center_crop", "divide", "mean", "std"}
    unknown = set(document) - fields
    if unknown:
        raise _bad(f"unknown fields {sorted(unknown)}", "preprocess", path)

    def as_tuple(key: str) -> tuple[Any, ...] | None:
        value = document.get(key)
        if value is None:
            return None
        if not isinstance(value, list):
            raise _bad("must be a list", f"preprocess.{key}", path)
        return tuple(value)

    image = ImagePreprocess.__new__(ImagePreprocess)
    values = dict(
        resize=as_tuple("resize"),
        center_crop=as_tuple("center_crop"),
        interpolation=document.get("interpolation", "bilinear"),
        antialias=document.get("antialias", True),
        divide=document.get("divide", 255.0),
        mean=as_tuple("mean"),
        std=as_tuple("std"),
        channels=document.get("channels", "RGB"),
    )
    for key, value in values.items():
        object.__setattr__(image, key, value)
    _check_image(image, path)
    return image


# --------------------------------------------------------------------------------------------
# Conversions: user values, files, torchvision weights


def coerce(value: "InferenceSpec | Mapping[str, Any] | None") -> InferenceSpec | None:
    """An InferenceSpec from what a caller passes as ``inference=`` (a spec or its JSON dict)."""
    if value is None or isinstance(value, InferenceSpec):
        return value
    if isinstance(value, Mapping):
        return _from_json(value, path=None)
    raise errors.UnsupportedValueError(
        f"inference must be an InferenceSpec or its JSON dict, got {type(value).__name__}",
        item="inference",
        fix="pass modelkeep.InferenceSpec(...) or spec.to_json()",
    )


def encode(value: "InferenceSpec | Mapping[str, Any]") -> str:
    """The metadata string stored under ``modelkeep.inference``."""
    spec = coerce(value)
    if spec is None:
        raise errors.UnsupportedValueError("no inference spec to encode", item="inference")
    return format.dumps(spec.to_json())


def from_header(header: format.Header) -> InferenceSpec | None:
    """The spec recorded in a file's header, validated, or None when the file has none."""
    document = header.modelkeep_value(format.KEY_INFERENCE)
    if document is None or document == {}:
        return None
    return _from_json(document, path=header.path)


def read(
    path: str | os.PathLike[str], *, storage_options: Mapping[str, Any] | None = None
) -> InferenceSpec | None:
    """The spec recorded in the modelkeep file at ``path`` (None when it has none)."""
    from modelkeep import reading

    return from_header(reading.read_header(os.fspath(path), storage_options=storage_options))


# The attribute under which a model built by modelkeep (``create`` with named weights, ``load``)
# carries its spec, so that ``save`` records it and ``predict`` uses it.
ATTRIBUTE = "_modelkeep_inference"


def attach(model: torch.nn.Module, value: "InferenceSpec | Mapping[str, Any] | None") -> None:
    """Remember ``value`` on ``model`` (``None`` forgets it)."""
    spec = coerce(value)
    if spec is None:
        model.__dict__.pop(ATTRIBUTE, None)
    else:
        model.__dict__[ATTRIBUTE] = spec


def attached(model: torch.nn.Module) -> InferenceSpec | None:
    """The spec carried by ``model``, or None."""
    value = model.__dict__.get(ATTRIBUTE)
    if not value:  # None, or the empty dict of weights that record no spec
        return None
    return coerce(value)


_INTERPOLATION_BY_TORCHVISION = {
    "nearest": "nearest",
    "nearest-exact": "nearest",
    "bilinear": "bilinear",
    "bicubic": "bicubic",
    "box": "box",
    "hamming": "hamming",
    "lanczos": "lanczos",
}


def from_torchvision(weights: Any) -> InferenceSpec:
    """Capture a torchvision weights entry's preprocessing and categories as data.

    Image classification presets become full image preprocessing; the other presets (detection,
    segmentation, video, optical flow) keep their labels and leave outputs raw, since their
    inputs and outputs are not one image in, one score vector out.
    """
    categories = weights.meta.get("categories")
    labels = tuple(str(c) for c in categories) if categories else None
    source = f"torchvision {type(weights).__name__}.{weights.name}"
    transforms = weights.transforms()
    kind = type(transforms).__name__
    if kind == "ImageClassification":
        crop = int(transforms.crop_size[0])
        image = ImagePreprocess(
            resize=tuple(int(v) for v in transforms.resize_size),
            center_crop=(crop, crop),
            interpolation=_INTERPOLATION_BY_TORCHVISION.get(transforms.interpolation.value, "bilinear"),
            antialias=bool(transforms.antialias) if transforms.antialias is not None else True,
            mean=tuple(float(v) for v in transforms.mean),
            std=tuple(float(v) for v in transforms.std),
        )
        return InferenceSpec(
            input_shape=("batch", 3, crop, crop), image=image, labels=labels, output="logits", source=source
        )
    return InferenceSpec(labels=labels, output="raw", source=source)
