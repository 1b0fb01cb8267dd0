"""Predictions from a saved file alone: ``modelkeep.predict(path, ...)`` and ``modelkeep predict``."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import modelkeep as mk
from modelkeep import cli, models
from modelkeep.inference import spec

SAMPLES = os.path.join(os.path.dirname(__import__("sklearn.datasets").datasets.__file__), "images")
CHINA = os.path.join(SAMPLES, "china.jpg")
FLOWER = os.path.join(SAMPLES, "flower.jpg")
LABELS = tuple(f"class {i}" for i in range(6))


def image_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 7, stride=4),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(8, 6),
    ).eval()


IMAGE_SPEC = mk.InferenceSpec(
    input_shape=("batch", 3, 64, 64),
    image=mk.ImagePreprocess(resize=(72,), center_crop=(64, 64)),
    labels=LABELS,
)


@pytest.fixture
def saved(tmp_path) -> str:
    path = str(tmp_path / "net.safetensors")
    models.save(image_model(), path, inference=IMAGE_SPEC)
    return path


def expected_top(photos: list[str], k: int) -> tuple[torch.Tensor, torch.Tensor]:
    from torchvision.transforms._presets import ImageClassification

    transform = ImageClassification(crop_size=64, resize_size=72)
    with torch.no_grad():
        logits = image_model()(torch.stack([transform(Image.open(p)) for p in photos]))
    return logits.softmax(dim=1).topk(k, dim=1)


def test_spec_is_stored_in_the_file(saved: str) -> None:
    assert spec.read(saved) == IMAGE_SPEC


def test_predict_from_the_path_alone(saved: str) -> None:
    predictions = mk.predict(saved, [CHINA, FLOWER], topk=3)
    values, indices = expected_top([CHINA, FLOWER], 3)
    for row, prediction in enumerate(predictions):
        assert [r.index for r in prediction.top] == indices[row].tolist()
        assert [r.label for r in prediction.top] == [LABELS[i] for i in indices[row].tolist()]
        assert torch.allclose(torch.tensor([r.probability for r in prediction.top]), values[row], atol=1e-6)


def test_cli_predict_json(saved: str) -> None:
    result = CliRunner().invoke(cli.main, ["predict", saved, CHINA, FLOWER, "--topk", "2", "--json"])
    assert result.exit_code == 0, result.output
    document = json.loads(result.output)
    values, indices = expected_top([CHINA, FLOWER], 2)
    assert document["model"] == saved
    assert [p["input"] for p in document["predictions"]] == [CHINA, FLOWER]
    for row, prediction in enumerate(document["predictions"]):
        assert [r["index"] for r in prediction["top"]] == indices[row].tolist()
        assert [r["label"] for r in prediction["top"]] == [LABELS[i] for i in indices[row].tolist()]
        assert prediction["top"][0]["probability"] == pytest.approx(values[row, 0].item(), abs=1e-6)


def test_cli_predict_tables_and_tensor_inputs(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    model = torch.nn.Sequential(torch.nn.Linear(3, 2))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))
        model[0].bias.zero_()
    path = str(tmp_path / "linear.safetensors")
    models.save(model, path)  # no inference spec: tensors still predict, labels are indices
    np.save(tmp_path / "x.npy", np.array([[0.0, 3.0, 0.0]], dtype=np.float32))
    result = CliRunner().invoke(cli.main, ["predict", "linear.safetensors", "x.npy"])
    assert result.exit_code == 0, result.output
    assert "x.npy" in result.output and "95.26%" in result.output  # softmax([0, 3])[1]


def test_cli_predict_bad_input_exits_2(saved: str, tmp_path) -> None:
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    result = CliRunner().invoke(cli.main, ["predict", saved, str(bad)])
    assert result.exit_code == 2
    assert "bad.png" in result.output and "image" in result.output
