"""``create(name, weights=...)`` end to end: torchvision's real entries over a local mirror, named
weights into a torchvision model, the spec carried into ``save`` and used by ``predict``."""

from __future__ import annotations

import os

import pytest
import torch
import torchvision
from PIL import Image

import modelkeep as mk
from modelkeep import errors, models, pretrained
from modelkeep.inference import spec as spec_module
from test_pretrained import Server, checkpoint_bytes, hashed_name, isolated_caches, server  # noqa: F401

SAMPLES = os.path.join(os.path.dirname(__import__("sklearn.datasets").datasets.__file__), "images")
CHINA = os.path.join(SAMPLES, "china.jpg")


def test_real_entry_fetches_its_own_file_name_and_checks_its_hash(server: Server, monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("MODELKEEP_WEIGHTS_MIRROR", server.base)
    server.files["squeezenet1_1-b8a52dc0.pth"] = checkpoint_bytes(torch.nn.Linear(2, 2))  # not the real bytes
    with pytest.raises(errors.IntegrityError, match="b8a52dc0"):
        mk.create("torchvision:squeezenet1_1", weights="IMAGENET1K_V1")
    assert server.requests == [("squeezenet1_1-b8a52dc0.pth", None)]
    entry = pretrained.resolve("torchvision:squeezenet1_1", "IMAGENET1K_V1")
    assert not os.path.exists(pretrained.cached_path(entry))
    assert [n for n in os.listdir(tmp_path / "mk-cache" / "downloads")] == []


def test_create_with_named_weights_then_save_and_predict(server: Server, tmp_path) -> None:
    torch.manual_seed(0)
    reference = torchvision.models.squeezenet1_1().eval()
    data = checkpoint_bytes(reference)
    name = hashed_name(data, stem="squeezenet1_1")
    server.files[name] = data
    weights = torchvision.models.SqueezeNet1_1_Weights.IMAGENET1K_V1
    # A stand-in for torchvision's entry under its real name: same builder, same spec, our bytes.
    pretrained.register_weights(
        "torchvision:squeezenet1_1", "IMAGENET1K_V1", url=server.url(name),
        inference=mk.InferenceSpec.from_torchvision(weights),
    )
    model = mk.create("torchvision:squeezenet1_1", weights="IMAGENET1K_V1")
    for key, value in reference.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    assert not model.training
    assert spec_module.attached(model) == mk.InferenceSpec.from_torchvision(weights)

    path = tmp_path / "squeezenet.safetensors"
    models.save(model, path)  # the spec travels with the model
    assert spec_module.read(path) == mk.InferenceSpec.from_torchvision(weights)
    (prediction,) = mk.predict(path, CHINA, topk=3)
    with torch.no_grad():
        expected = reference(weights.transforms()(Image.open(CHINA))[None]).softmax(dim=1)
    values, indices = expected.topk(3, dim=1)
    assert [r.index for r in prediction.top] == indices[0].tolist()
    assert [r.label for r in prediction.top] == [weights.meta["categories"][i] for i in indices[0].tolist()]
    assert prediction.top[0].probability == pytest.approx(values[0, 0].item(), abs=1e-5)
