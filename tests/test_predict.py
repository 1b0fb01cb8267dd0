"""Predictions from a model in memory: the inference spec, preprocessing equal to torchvision's,
top-k values and labels, tensor inputs, and clear errors on bad inputs."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

import modelkeep as mk
from modelkeep import errors
from modelkeep.inference import preprocess, spec

SAMPLES = os.path.join(os.path.dirname(__import__("sklearn.datasets").datasets.__file__), "images")
CHINA = os.path.join(SAMPLES, "china.jpg")
FLOWER = os.path.join(SAMPLES, "flower.jpg")


def vgg16_weights():
    import torchvision

    return torchvision.models.VGG16_Weights.IMAGENET1K_V1


# --------------------------------------------------------------------------------------------
# The spec


def test_spec_from_torchvision_captures_transforms_and_categories() -> None:
    weights = vgg16_weights()
    captured = mk.InferenceSpec.from_torchvision(weights)
    assert captured.input_shape == ("batch", 3, 224, 224)
    assert captured.labels == tuple(weights.meta["categories"])
    assert captured.labels[0] == "tench" and len(captured.labels) == 1000
    assert captured.image == mk.ImagePreprocess(
        resize=(256,),
        center_crop=(224, 224),
        interpolation="bilinear",
        antialias=True,
        mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225),
    )
    assert captured.output == "logits"
    assert captured.source == "torchvision VGG16_Weights.IMAGENET1K_V1"


def test_spec_json_round_trip_and_stored_text() -> None:
    original = mk.InferenceSpec(
        input_shape=("batch", 1, 8, None),
        input_dtype="float16",
        image=mk.ImagePreprocess(resize=(10, 12), center_crop=None, channels="L", mean=(0.5,), std=(0.25,)),
        labels=["a", "b"],
        output="probabilities",
    )
    document = json.loads(spec.encode(original))
    assert document == {
        "version": 1,
        "input": {"shape": ["batch", 1, 8, None], "dtype": "float16"},
        "preprocess": {
            "type": "image",
            "channels": "L",
            "resize": [10, 12],
            "interpolation": "bilinear",
            "antialias": True,
            "center_crop": None,
            "divide": 255.0,
            "mean": [0.5],
            "std": [0.25],
        },
        "output": "probabilities",
        "labels": ["a", "b"],
    }
    assert mk.InferenceSpec.from_json(document, path="f") == original
    assert spec.coerce(document) == original


@pytest.mark.parametrize(
    ("change", "item"),
    [
        ({"version": 2}, "version"),
        ({"input": {"shape": [1.5]}}, "input.shape"),
        ({"input": {"shape": "batch"}}, "input.shape"),
        ({"input": {"dtype": "object"}}, "input.dtype"),
        ({"output": "code"}, "output"),
        ({"labels": [1, 2]}, "labels"),
        ({"labels": "abc"}, "labels"),
        ({"preprocess": {"type": "python", "code": "x"}}, "preprocess"),
        ({"preprocess": {"type": "image", "resize": [10**9]}}, "preprocess.resize"),
        ({"preprocess": {"type": "image", "resize": [0]}}, "preprocess.resize"),
        ({"preprocess": {"type": "image", "center_crop": [224]}}, "preprocess.center_crop"),
        ({"preprocess": {"type": "image", "interpolation": "magic"}}, "preprocess.interpolation"),
        ({"preprocess": {"type": "image", "std": [0, 1, 1], "mean": [0, 0, 0]}}, "preprocess.std"),
        ({"preprocess": {"type": "image", "mean": [0, 0], "std": [1, 1]}}, "preprocess.mean"),
        ({"preprocess": {"type": "image", "divide": -1}}, "preprocess.divide"),
        ({"preprocess": {"type": "image", "exec": 1}}, "preprocess"),
        ({"extra": 1}, ""),
    ],
)
def test_bad_stored_spec_is_a_format_error_naming_the_field(change: dict, item: str) -> None:
    document = {**mk.InferenceSpec.from_torchvision(vgg16_weights()).to_json(), **change}
    with pytest.raises(errors.FormatError) as caught:
        mk.InferenceSpec.from_json(document, path="model.safetensors")
    assert caught.value.path == "model.safetensors"
    assert caught.value.item == f"modelkeep.inference.{item}"


def test_bad_spec_in_code_is_a_clear_error() -> None:
    with pytest.raises(errors.UnsupportedValueError, match="interpolation"):
        mk.ImagePreprocess(interpolation="magic")
    with pytest.raises(errors.UnsupportedValueError, match="output"):
        mk.InferenceSpec(output="text")
    with pytest.raises(errors.UnsupportedValueError):
        spec.coerce(42)


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)
_fields = st.fixed_dictionaries(
    {},
    optional={
        "version": _json,
        "input": st.fixed_dictionaries({}, optional={"shape": _json, "dtype": _json}) | _json,
        "preprocess": st.fixed_dictionaries(
            {"type": st.just("image")},
            optional={k: _json for k in ("channels", "resize", "center_crop", "mean", "std", "divide", "antialias")},
        )
        | _json,
        "output": _json,
        "labels": _json,
    },
)


@settings(max_examples=300, deadline=None)
@given(_fields)
def test_any_stored_document_is_a_spec_or_a_format_error(document: dict) -> None:
    try:
        parsed = mk.InferenceSpec.from_json(document, path="f")
    except errors.FormatError:
        return
    assert mk.InferenceSpec.from_json(parsed.to_json(), path="f") == parsed


# --------------------------------------------------------------------------------------------
# Preprocessing


@pytest.mark.parametrize("photo", [CHINA, FLOWER])
def test_image_preprocessing_equals_torchvision_weights_transforms(photo: str) -> None:
    weights = vgg16_weights()
    expected = weights.transforms()(Image.open(photo))
    got = preprocess.image_to_tensor(preprocess.open_image(photo), mk.InferenceSpec.from_torchvision(weights).image)
    assert got.shape == expected.shape == (3, 224, 224)
    assert got.dtype == torch.float32
    assert torch.allclose(got, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "size", [(37, 100), (100, 37), (224, 224), (300, 199)], ids=["wide", "tall", "exact", "odd"]
)
@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic", "nearest"])
def test_resize_and_crop_match_torchvision_on_odd_sizes(size: tuple[int, int], interpolation: str) -> None:
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms._presets import ImageClassification

    generator = np.random.default_rng(0)
    image = Image.fromarray(generator.integers(0, 256, (size[0], size[1], 3), dtype=np.uint8))
    reference = ImageClassification(crop_size=64, resize_size=80, interpolation=InterpolationMode(interpolation))
    ours = mk.ImagePreprocess(resize=(80,), center_crop=(64, 64), interpolation=interpolation)
    assert torch.allclose(preprocess.image_to_tensor(image, ours), reference(image), rtol=0, atol=1e-6)


def test_crop_larger_than_image_pads_like_torchvision() -> None:
    import torchvision.transforms.functional as F

    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (5, 7, 3), dtype=np.uint8))
    ours = mk.ImagePreprocess(resize=None, center_crop=(10, 12), mean=None, std=None)
    expected = F.convert_image_dtype(F.pil_to_tensor(F.center_crop(image, [10, 12])), torch.float32)
    assert torch.equal(preprocess.image_to_tensor(image, ours), expected)


def test_grayscale_png_and_bgr_channel_order(tmp_path) -> None:
    array = np.random.default_rng(2).integers(0, 256, (12, 9, 4), dtype=np.uint8)
    path = tmp_path / "rgba.png"
    Image.fromarray(array, "RGBA").save(path)
    rgb = preprocess.image_to_tensor(
        preprocess.open_image(str(path)), mk.ImagePreprocess(resize=None, center_crop=None, mean=None, std=None)
    )
    assert torch.equal(rgb, torch.from_numpy(array[:, :, :3].copy()).permute(2, 0, 1).float() / 255)
    bgr = preprocess.image_to_tensor(
        preprocess.open_image(str(path)),
        mk.ImagePreprocess(resize=None, center_crop=None, mean=None, std=None, channels="BGR"),
    )
    assert torch.equal(bgr, rgb.flip(0))
    gray = preprocess.image_to_tensor(
        preprocess.open_image(str(path)),
        mk.ImagePreprocess(resize=None, center_crop=None, channels="L", mean=(0.5,), std=(0.5,)),
    )
    expected = np.asarray(Image.fromarray(array, "RGBA").convert("L"), dtype=np.float32)
    assert torch.equal(gray, (torch.from_numpy(expected)[None] / 255 - 0.5) / 0.5)


# --------------------------------------------------------------------------------------------
# Predicting


def linear_classifier() -> torch.nn.Module:
    model = torch.nn.Linear(4, 3)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 0, 0, 0], [0, 2.0, 0, 0], [0, 0, 3.0, 0]]))
        model.bias.zero_()
    return model


LABELS = ("cat", "dog", "eel")
LINEAR_SPEC = mk.InferenceSpec(input_shape=("batch", 4), labels=LABELS)


def test_topk_values_and_labels_on_a_small_model() -> None:
    inputs = torch.tensor([[1.0, 1.0, 1.0, 9.0], [3.0, 0.0, 0.0, 0.0]])
    predictions = mk.predict(linear_classifier(), inputs, topk=2, spec=LINEAR_SPEC)
    expected = torch.softmax(torch.tensor([[1.0, 2.0, 3.0], [3.0, 0.0, 0.0]]), dim=1)
    assert [p.source for p in predictions] == ["<tensor 0>[0]", "<tensor 0>[1]"]
    first, second = predictions
    assert [(r.label, r.index) for r in first.top] == [("eel", 2), ("dog", 1)]
    assert [r.probability for r in first.top] == [expected[0, 2].item(), expected[0, 1].item()]
    assert first.label == "eel"
    assert [(r.label, r.index, r.probability) for r in second.top][0] == ("cat", 0, expected[1, 0].item())
    assert torch.equal(first.output, torch.tensor([1.0, 2.0, 3.0]))
    assert first.to_json() == {
        "input": "<tensor 0>[0]",
        "top": [
            {"label": "eel", "index": 2, "probability": expected[0, 2].item()},
            {"label": "dog", "index": 1, "probability": expected[0, 1].item()},
        ],
    }


def test_topk_larger_than_classes_and_probability_outputs() -> None:
    probabilities = LINEAR_SPEC.replace(output="probabilities")
    (prediction,) = mk.predict(linear_classifier(), torch.tensor([0.1, 0.2, 0.3, 0.0]), topk=10, spec=probabilities)
    assert [r.index for r in prediction.top] == [2, 1, 0]
    assert prediction.top[0].probability == pytest.approx(0.9, abs=1e-6)  # as the model says: no softmax
    (raw,) = mk.predict(linear_classifier(), torch.tensor([0.1, 0.2, 0.3, 0.0]), spec=LINEAR_SPEC.replace(output="raw"))
    assert raw.top == [] and torch.equal(raw.output, linear_classifier()(torch.tensor([0.1, 0.2, 0.3, 0.0])).detach())
    assert raw.to_json()["output"] == raw.output.tolist()


def test_images_through_the_stored_preprocessing_batched() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 5, stride=4), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 5)
    )
    captured = mk.InferenceSpec.from_torchvision(vgg16_weights()).replace(labels=tuple("abcde"))
    predictions = mk.predict(model, [CHINA, Image.open(FLOWER)], topk=5, spec=captured, batch_size=1)
    transform = vgg16_weights().transforms()
    with torch.no_grad():
        logits = model(torch.stack([transform(Image.open(CHINA)), transform(Image.open(FLOWER))]))
    values, indices = logits.softmax(dim=1).topk(5, dim=1)
    assert [p.source for p in predictions] == [CHINA, "<image 1>"]
    for row, prediction in enumerate(predictions):
        assert [r.index for r in prediction.top] == indices[row].tolist()
        assert [r.label for r in prediction.top] == ["abcde"[i] for i in indices[row].tolist()]
        assert torch.allclose(torch.tensor([r.probability for r in prediction.top]), values[row], atol=1e-6)


def test_tensor_files_npy_and_safetensors(tmp_path) -> None:
    batch = np.array([[0.0, 0.0, 5.0, 0.0], [9.0, 0.0, 0.0, 0.0]], dtype=np.float64)
    np.save(tmp_path / "batch.npy", batch)
    np.save(tmp_path / "one.npy", batch[1])
    mk.save_weights({"a": torch.tensor([0.0, 4.0, 0.0, 0.0]), "b": torch.tensor([[0.0, 0.0, 0.0, 1.0]])}, tmp_path / "x.safetensors")
    sources = [tmp_path / "batch.npy", str(tmp_path / "one.npy"), tmp_path / "x.safetensors"]
    predictions = mk.predict(linear_classifier(), sources, topk=1, spec=LINEAR_SPEC)
    assert [p.source for p in predictions] == [
        f"{tmp_path / 'batch.npy'}[0]",
        f"{tmp_path / 'batch.npy'}[1]",
        str(tmp_path / "one.npy"),
        f"{tmp_path / 'x.safetensors'}#a",
        f"{tmp_path / 'x.safetensors'}#b",
    ]
    assert [p.label for p in predictions] == ["eel", "cat", "cat", "dog", "cat"]


def test_model_without_spec_predicts_on_tensors_with_index_labels() -> None:
    model = linear_classifier()
    (prediction,) = mk.predict(model, np.array([[0.0, 1.0, 0.0, 0.0]], dtype=np.float32), topk=3)
    assert [r.label for r in prediction.top] == ["1", "0", "2"]
    model.train()
    mk.predict(model, torch.zeros(1, 4))
    assert model.training  # the caller's mode is restored


def test_spec_attached_to_a_model_is_used() -> None:
    model = linear_classifier()
    spec.attach(model, LINEAR_SPEC)
    assert mk.predict(model, torch.tensor([0.0, 0.0, 1.0, 0.0]))[0].label == "eel"
    spec.attach(model, None)
    assert spec.attached(model) is None


def test_input_dtype_follows_the_model() -> None:
    model = linear_classifier().to(torch.float64)
    (prediction,) = mk.predict(model, torch.tensor([[1, 0, 0, 0]], dtype=torch.int64), spec=LINEAR_SPEC)
    assert prediction.output.dtype == torch.float64 and prediction.label == "cat"


# --------------------------------------------------------------------------------------------
# Bad inputs


def test_unreadable_image_names_the_file(tmp_path) -> None:
    garbage = tmp_path / "photo.jpg"
    garbage.write_bytes(b"not an image at all" * 10)
    captured = mk.InferenceSpec.from_torchvision(vgg16_weights())
    with pytest.raises(errors.FormatError) as caught:
        mk.predict(linear_classifier(), [str(garbage)], spec=captured)
    assert caught.value.path == str(garbage) and "not an image" in str(caught.value)


def test_truncated_jpeg_is_a_format_error(tmp_path) -> None:
    truncated = tmp_path / "cut.jpg"
    truncated.write_bytes(open(CHINA, "rb").read()[:5000])
    with pytest.raises(errors.FormatError, match="damaged or truncated"):
        mk.predict(linear_classifier(), truncated, spec=mk.InferenceSpec.from_torchvision(vgg16_weights()))


def test_wrong_shape_against_the_spec() -> None:
    with pytest.raises(errors.FormatError, match=r"got shape \[2, 5\], the model takes \[batch, 4\]"):
        mk.predict(linear_classifier(), torch.zeros(2, 5), spec=LINEAR_SPEC)
    with pytest.raises(errors.FormatError, match="has shape"):
        mk.predict(linear_classifier(), torch.zeros(1, 1, 4), spec=LINEAR_SPEC)


def test_wrong_shape_without_a_spec_is_wrapped() -> None:
    with pytest.raises(errors.FormatError, match=r"could not run on input of shape \[1, 7\]") as caught:
        mk.predict(linear_classifier(), torch.zeros(1, 7))
    assert isinstance(caught.value.__cause__, RuntimeError)


def test_image_for_a_model_without_image_preprocessing() -> None:
    with pytest.raises(errors.FormatError, match="no image preprocessing"):
        mk.predict(linear_classifier(), CHINA, spec=LINEAR_SPEC)


def test_bad_tensor_files(tmp_path) -> None:
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(errors.FormatError, match="npy"):
        mk.predict(linear_classifier(), tmp_path / "objects.npy")
    (tmp_path / "cut.npy").write_bytes(open(tmp_path / "objects.npy", "rb").read()[:20])
    with pytest.raises(errors.FormatError):
        mk.predict(linear_classifier(), tmp_path / "cut.npy")
    (tmp_path / "junk.bin").write_bytes(b"\x00" * 3)
    with pytest.raises(errors.FormatError):
        mk.predict(linear_classifier(), tmp_path / "junk.bin")
    with pytest.raises(errors.StorageError, match="no such file"):
        mk.predict(linear_classifier(), tmp_path / "missing.png")


def test_bad_arguments() -> None:
    with pytest.raises(errors.UnsupportedValueError, match="topk"):
        mk.predict(linear_classifier(), torch.zeros(1, 4), topk=0)
    with pytest.raises(errors.UnsupportedValueError, match="cannot predict on"):
        mk.predict(linear_classifier(), 3)
    with pytest.raises(errors.UnsupportedValueError, match="cannot predict with"):
        mk.predict(42, torch.zeros(1, 4))


def test_integer_spec_gets_integer_inputs() -> None:
    model = torch.nn.Sequential(torch.nn.Embedding(5, 3), torch.nn.Flatten())
    ids = mk.InferenceSpec(input_shape=("batch", 2), input_dtype="int64", output="raw")
    (prediction,) = mk.predict(model, np.array([[1.0, 4.0]]), spec=ids)
    assert torch.equal(prediction.output, model(torch.tensor([[1, 4]])).detach()[0])
