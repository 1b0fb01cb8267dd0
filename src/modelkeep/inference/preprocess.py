"""Turning inputs into model-ready tensors: images through the stored preprocessing, tensors from
``.npy``/``.safetensors`` files as they are.

Image preprocessing reproduces torchvision's classification preset (``weights.transforms()``) step
for step on PIL images (the same size arithmetic, the same PIL resampling, the same float
operations), so a model fed by modelkeep sees the tensor it was trained and evaluated on, without
importing torchvision. Every reader turns bad input into a FormatError naming the input.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from typing import Any, Iterable

import numpy as np
import torch

from modelkeep import errors
from modelkeep.inference import spec as spec_module

IMAGE_MAGIC = (
    b"\xff\xd8\xff",  # JPEG
    b"\x89PNG\r\n\x1a\n",
    b"GIF87a",
    b"GIF89a",
    b"BM",
    b"II*\x00",  # TIFF
    b"MM\x00*",
)
NPY_MAGIC = b"\x93NUMPY"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff")


@dataclasses.dataclass
class Item:
    """One input as given: a tensor that is one sample (``batched=False``) or a batch of them."""

    source: str
    tensor: torch.Tensor
    batched: bool


def _input_error(what: str, source: str, fix: str) -> errors.FormatError:
    return errors.FormatError(what, path=source, fix=fix)


def sniff(path: str) -> str:
    """``"image"``, ``"npy"`` or ``"safetensors"``, by the file's first bytes."""
    with errors.map_os_errors(path, "reading"), open(path, "rb") as stream:
        head = stream.read(16)
    if head.startswith(NPY_MAGIC):
        return "npy"
    if any(head.startswith(magic) for magic in IMAGE_MAGIC) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP"):
        return "image"
    if path.lower().endswith(IMAGE_SUFFIXES):
        return "image"  # a damaged image: let the image reader say what is wrong
    return "safetensors"


# --------------------------------------------------------------------------------------------
# Images


def open_image(path: str) -> Any:
    """A fully decoded PIL image, or a FormatError that says the file is not a readable image."""
    from PIL import Image, UnidentifiedImageError

    fix = "pass a JPEG or PNG image (or a .npy/.safetensors tensor file)"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(path)
            image.load()
    except (FileNotFoundError, IsADirectoryError, PermissionError) as e:  # not a damaged image
        raise errors.storage_error(e, path, "reading") from e
    except UnidentifiedImageError as e:
        raise _input_error("is not an image that can be read", path, fix) from e
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise _input_error(f"image is too large to decode safely ({e})", path, "resize it first") from e
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        raise _input_error(f"image is damaged or truncated ({e})", path, fix) from e
    return image


def _resized_size(height: int, width: int, resize: tuple[int, ...]) -> tuple[int, int]:
    """torchvision's output size: one number sets the shorter side, two are (height, width)."""
    if len(resize) == 2:
        return resize[0], resize[1]
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = resize[0], int(resize[0] * long / short)
    new_w, new_h = (new_short, new_long) if width <= height else (new_long, new_short)
    return new_h, new_w


def _center_crop(image: Any, crop_h: int, crop_w: int) -> Any:
    """torchvision's center crop, zero padding an image smaller than the crop the same way."""
    from PIL import Image

    width, height = image.size
    if crop_w > width or crop_h > height:
        left = (crop_w - width) // 2 if crop_w > width else 0
        top = (crop_h - height) // 2 if crop_h > height else 0
        right = (crop_w - width + 1) // 2 if crop_w > width else 0
        bottom = (crop_h - height + 1) // 2 if crop_h > height else 0
        padded = Image.new(image.mode, (width + left + right, height + top + bottom), 0)
        padded.paste(image, (left, top))
        image = padded
        width, height = image.size
        if (crop_w, crop_h) == (width, height):
            return image
    top = int(round((height - crop_h) / 2.0))
    left = int(round((width - crop_w) / 2.0))
    return image.crop((left, top, left + crop_w, top + crop_h))


def image_to_tensor(image: Any, preprocess: spec_module.ImagePreprocess, source: str = "<image>") -> torch.Tensor:
    """One image through ``preprocess``: a float32 CHW tensor."""
    from PIL import Image

    mode = "L" if preprocess.channels == "L" else "RGB"
    try:
        if image.mode != mode:
            image = image.convert(mode)
        if preprocess.resize is not None:
            height, width = _resized_size(image.size[1], image.size[0], preprocess.resize)
            if (height, width) != (image.size[1], image.size[0]):
                resample = getattr(Image.Resampling, preprocess.interpolation.upper())
                image = image.resize((width, height), resample)
        if preprocess.center_crop is not None:
            image = _center_crop(image, *preprocess.center_crop)
        array = np.array(image, copy=True)
    except (OSError, ValueError) as e:
        raise _input_error(f"image could not be converted ({e})", source, "pass a JPEG or PNG image") from e
    channels = 1 if mode == "L" else 3
    tensor = torch.as_tensor(array).view(image.size[1], image.size[0], channels).permute(2, 0, 1)
    if preprocess.channels == "BGR":
        tensor = tensor.flip(0)
    tensor = tensor.to(torch.float32) / float(preprocess.divide)
    if preprocess.mean is not None and preprocess.std is not None:
        mean = torch.as_tensor(preprocess.mean, dtype=torch.float32).view(-1, 1, 1)
        std = torch.as_tensor(preprocess.std, dtype=torch.float32).view(-1, 1, 1)
        tensor = tensor.sub_(mean).div_(std)
    return tensor


# --------------------------------------------------------------------------------------------
# Tensors


def read_npy(path: str) -> torch.Tensor:
    try:
        array = np.load(path, allow_pickle=False, mmap_mode="r")
        tensor = torch.from_numpy(np.array(array, copy=True))
    except (ValueError, OSError, EOFError) as e:
        raise _input_error(
            f"is not a readable .npy array of numbers ({e})",
            path,
            "save it with numpy.save(path, array) from a numeric array",
        ) from e
    except TypeError as e:  # dtypes torch has no equivalent for (strings, objects)
        raise _input_error(f"holds values that are not numbers ({e})", path, "save a numeric array") from e
    return tensor


def read_safetensors(path: str) -> list[tuple[str, torch.Tensor]]:
    from modelkeep import api

    tensors = api.load_state_dict(path)
    if not tensors:
        raise _input_error("holds no tensors", path, "save the inputs as tensors")
    return list(tensors.items())


def _as_tensor(value: Any) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, np.ndarray):
        try:
            return torch.from_numpy(np.ascontiguousarray(value))
        except TypeError as e:
            raise errors.FormatError(
                f"array of dtype {value.dtype} is not numeric", item="input", fix="pass a numeric array"
            ) from e
    return None


def _is_pil(value: Any) -> bool:
    module = type(value).__module__
    return module.startswith("PIL.") and hasattr(value, "convert") and hasattr(value, "size")


def gather(
    inputs: Any, spec: spec_module.InferenceSpec | None
) -> list[Item]:
    """Every input as tensors: paths (images, .npy, .safetensors), PIL images, tensors, arrays.

    A tensor whose rank equals the spec's input rank is a batch; one dim less is one sample.
    Without a spec a tensor is taken as a batch, as it stands.
    """
    if isinstance(inputs, (str, os.PathLike, torch.Tensor, np.ndarray)) or _is_pil(inputs):
        inputs = [inputs]
    elif not isinstance(inputs, Iterable):
        raise errors.UnsupportedValueError(
            f"cannot predict on a {type(inputs).__name__}",
            item="inputs",
            fix="pass image paths, .npy/.safetensors paths, PIL images, tensors or arrays",
        )
    items: list[Item] = []
    for index, value in enumerate(inputs):
        if isinstance(value, (str, os.PathLike)):
            items.extend(_from_path(os.fspath(value), spec))
        elif _is_pil(value):
            items.append(Item(f"<image {index}>", _preprocessed(value, spec, f"<image {index}>"), batched=False))
        else:
            tensor = _as_tensor(value)
            if tensor is None:
                raise errors.UnsupportedValueError(
                    f"input {index} is a {type(value).__name__}",
                    item="inputs",
                    fix="pass image paths, .npy/.safetensors paths, PIL images, tensors or arrays",
                )
            items.append(_tensor_item(f"<tensor {index}>", tensor, spec))
    return items


def _preprocessed(image: Any, spec: spec_module.InferenceSpec | None, source: str) -> torch.Tensor:
    if spec is None or spec.image is None:
        raise errors.FormatError(
            "the model has no image preprocessing recorded",
            path=source,
            fix="pass tensors (.npy/.safetensors), or save the model with "
            "inference=modelkeep.InferenceSpec(image=modelkeep.ImagePreprocess(...))",
        )
    return image_to_tensor(image, spec.image, source)


def _from_path(path: str, spec: spec_module.InferenceSpec | None) -> list[Item]:
    kind = sniff(path)
    if kind == "image":
        return [Item(path, _preprocessed(open_image(path), spec, path), batched=False)]
    if kind == "npy":
        return [_tensor_item(path, read_npy(path), spec)]
    pairs = read_safetensors(path)
    if len(pairs) == 1:
        return [_tensor_item(path, pairs[0][1], spec)]
    return [_tensor_item(f"{path}#{name}", tensor, spec) for name, tensor in pairs]


def _tensor_item(source: str, tensor: torch.Tensor, spec: spec_module.InferenceSpec | None) -> Item:
    if spec is None or spec.input_shape is None:
        return Item(source, tensor, batched=True)
    rank = len(spec.input_shape)
    if tensor.dim() == rank:
        return Item(source, tensor, batched=True)
    if tensor.dim() == rank - 1:
        return Item(source, tensor, batched=False)
    dims = ", ".join("?" if d is None else str(d) for d in spec.input_shape)
    raise errors.FormatError(
        f"has shape {list(tensor.shape)}; the model takes [{dims}] (or one sample without the first dim)",
        path=source,
        fix="reshape the input to the model's input shape",
    )
