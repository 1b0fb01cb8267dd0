"""The tutorial's step 5 literally: a model built by torchvision's own builder saves with no hints,
because ``save`` recognises the one registered builder that rebuilds it (``arch.recognize``)."""

from __future__ import annotations

import json
import logging

import pytest
import torch
import torchvision
from torch import nn

import modelkeep as mk
from modelkeep import format, reading
from modelkeep.arch import recognize
from helpers import assert_same


def record_of(path) -> dict:
    return json.loads(reading.read_header(path).metadata[format.KEY_ARCHITECTURE])


def test_the_tutorials_vgg16_saves_and_loads_whole(tmp_path, caplog) -> None:
    torch.manual_seed(0)
    model = torchvision.models.vgg16()  # the tutorial's vgg16(weights=...) has this very structure
    path = tmp_path / "model.safetensors"
    with caplog.at_level(logging.INFO, logger="modelkeep"):
        mk.save(model, path)
    record = record_of(path)
    assert (record["strategy"], record["factory"], record["kwargs"]) == ("factory", "torchvision.models.vgg16", {})
    assert "recorded factory torchvision.models.vgg16()" in caplog.text  # said which builder
    loaded = mk.load(path)
    assert type(loaded) is torchvision.models.VGG and not loaded.training
    assert_same(loaded, model)


def test_num_classes_is_inferred_from_the_shapes(tmp_path, caplog) -> None:
    torch.manual_seed(1)
    model = torchvision.models.resnet18(num_classes=7).eval()
    path = tmp_path / "resnet.safetensors"
    with caplog.at_level(logging.INFO, logger="modelkeep"):
        mk.save(model, path)
    record = record_of(path)
    assert (record["factory"], record["kwargs"]) == ("torchvision.models.resnet18", {"num_classes": 7})
    assert "resnet18(num_classes=7)" in caplog.text
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(mk.load(path)(x), model(x))


@pytest.mark.parametrize(
    ("build", "factory", "kwargs"),
    [
        (lambda: torchvision.models.vgg16_bn(), "torchvision.models.vgg16_bn", {}),  # not vgg16: batch norm
        (lambda: torchvision.models.vgg11(num_classes=3), "torchvision.models.vgg11", {"num_classes": 3}),
        (lambda: torchvision.models.mobilenet_v3_small(), "torchvision.models.mobilenet_v3_small", {}),
        (lambda: torchvision.models.efficientnet_b0(num_classes=3), "torchvision.models.efficientnet_b0",
         {"num_classes": 3}),
        # what inception_v3(weights=IMAGENET1K_V1) builds: only a setting tells it from inception_v3()
        (lambda: torchvision.models.inception_v3(init_weights=False, aux_logits=True, transform_input=True),
         "torchvision.models.inception_v3", {"weights": "Inception_V3_Weights.IMAGENET1K_V1"}),
        (lambda: torchvision.models.inception_v3(init_weights=False), "torchvision.models.inception_v3", {}),
    ],
)
def test_builders_are_recognised_on_the_meta_device(build, factory, kwargs) -> None:
    with torch.device("meta"):
        model = build()
    found, matches = recognize.recognize(model)
    assert found == recognize.Recognized(factory, kwargs) and matches == [found]


def test_a_changed_torchvision_model_is_refused_with_the_options(tmp_path) -> None:
    model = torchvision.models.squeezenet1_1()
    model.features[1] = nn.GELU()  # same tensors, a layer no builder makes
    assert recognize.recognize(model) == (None, [])
    with pytest.raises(mk.ArchitectureError, match="not from a trusted factory") as caught:
        mk.save(model, tmp_path / "m.safetensors")
    assert "factory=" in str(caught.value) and not (tmp_path / "m.safetensors").exists()


def test_a_subclass_is_not_taken_for_the_builders_class(tmp_path) -> None:
    class MyVGG(torchvision.models.VGG):
        pass

    model = MyVGG(torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs["A"]))
    assert recognize.candidates(model) == []
    with pytest.raises(mk.ArchitectureError, match="MyVGG"):
        mk.save(model, tmp_path / "m.safetensors")


def test_several_matching_builders_choose_none(tmp_path, monkeypatch) -> None:
    model = torchvision.models.squeezenet1_1()
    monkeypatch.setattr(recognize, "candidates", lambda m: ["torchvision.models.squeezenet1_1"] * 2)
    found, matches = recognize.recognize(model)
    assert found is None and len(matches) == 2
    with pytest.raises(mk.ArchitectureError, match="several trusted builders rebuild it") as caught:
        mk.save(model, tmp_path / "m.safetensors", strategy="factory")
    assert "torchvision.models.squeezenet1_1" in str(caught.value)


def test_an_explicit_factory_still_wins(tmp_path) -> None:
    model = torchvision.models.squeezenet1_1(num_classes=4)
    path = tmp_path / "sq.safetensors"
    mk.save(model, path, factory={"factory": "torchvision.models.squeezenet1_1", "kwargs": {"num_classes": 4}})
    assert record_of(path)["kwargs"] == {"num_classes": 4}
    with pytest.raises(mk.ArchitectureError, match="shape differs"):  # a wrong hint is not overridden
        mk.save(model, path, factory="torchvision.models.squeezenet1_1")
