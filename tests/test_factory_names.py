"""The one factory-name parser (``modelkeep.arch.names.parse``) and its users."""

from __future__ import annotations

import dataclasses

import pytest
from torch import nn

import modelkeep as mk
from modelkeep import errors, models, pretrained
from modelkeep.arch import factories, names
from test_pretrained import isolated_caches  # noqa: F401 - autouse: registry cleared after each test

TV = "torchvision.models."


@pytest.mark.parametrize(
    "spelling, namespace, name, qualified",
    [
        ("torchvision:vgg16", "torchvision", "vgg16", TV + "vgg16"),
        (TV + "vgg16", "torchvision", "vgg16", TV + "vgg16"),
        ("torchvision:fasterrcnn_resnet50_fpn", "torchvision", "fasterrcnn_resnet50_fpn",
         TV + "detection.fasterrcnn_resnet50_fpn"),
        (TV + "fasterrcnn_mobilenet_v3_large_320_fpn", "torchvision", "fasterrcnn_mobilenet_v3_large_320_fpn",
         TV + "detection.fasterrcnn_mobilenet_v3_large_320_fpn"),
        ("torchvision:detection.fasterrcnn_mobilenet_v3_large_320_fpn", "torchvision",
         "fasterrcnn_mobilenet_v3_large_320_fpn", TV + "detection.fasterrcnn_mobilenet_v3_large_320_fpn"),
        (TV + "detection.fasterrcnn_resnet50_fpn", "torchvision", "fasterrcnn_resnet50_fpn",
         TV + "detection.fasterrcnn_resnet50_fpn"),
        ("torchvision:quantized_resnet18", "torchvision", "quantized_resnet18", TV + "quantization.resnet18"),
        (TV + "quantization.resnet18", "torchvision", "quantized_resnet18", TV + "quantization.resnet18"),
        ("torchvision:raft_small", "torchvision", "raft_small", TV + "optical_flow.raft_small"),
        ("torchvision:lraspp_mobilenet_v3_large", "torchvision", "lraspp_mobilenet_v3_large",
         TV + "segmentation.lraspp_mobilenet_v3_large"),
        ("torchvision:r3d_18", "torchvision", "r3d_18", TV + "video.r3d_18"),
        (TV + "VisionTransformer", "torchvision", "VisionTransformer", TV + "VisionTransformer"),
        ("torchvision:detection.FasterRCNN", "torchvision", "detection.FasterRCNN", TV + "detection.FasterRCNN"),
        ("timm:resnet18", "timm", "resnet18", "timm.resnet18"),
        ("timm.resnet18", "timm", "resnet18", "timm.resnet18"),
        ("timm:vit_base_patch16_224.augreg_in21k", "timm", "vit_base_patch16_224.augreg_in21k",
         "timm.vit_base_patch16_224.augreg_in21k"),
        ("timm:convnext-tiny", "timm", "convnext-tiny", "timm.convnext-tiny"),
        ("mylib.models.tiny_cnn", "python", "mylib.models.tiny_cnn", "mylib.models.tiny_cnn"),
        ("vgg16", "python", "vgg16", "vgg16"),  # bare: a registered name, never torchvision's
        ("torchvision.ops.nms", "python", "torchvision.ops.nms", "torchvision.ops.nms"),
    ],
)
def test_every_documented_spelling(spelling, namespace, name, qualified) -> None:
    parsed = names.parse(spelling)
    assert parsed == names.FactoryName(namespace, name, qualified)
    assert str(parsed) == qualified
    assert names.parse(parsed.qualified) == parsed  # the qualified spelling is a fixed point


def test_the_docstring_lists_the_spellings() -> None:
    doc = names.parse.__doc__
    for spelling in ('"torchvision:vgg16"', '"torchvision.models.vgg16"', '"timm:resnet18"', '"timm.resnet18"',
                     '"torchvision:quantized_resnet18"', '"torchvision.models.VisionTransformer"', '"vgg16"'):
        assert spelling in doc, spelling


def test_result_is_frozen() -> None:
    parsed = names.parse("timm:resnet18")
    with pytest.raises(dataclasses.FrozenInstanceError):
        parsed.name = "other"  # type: ignore[misc]


@pytest.mark.parametrize(
    "bad",
    [None, 3, b"vgg16", "", "torchvision:", "timm:", "torchvision:vgg-16", "torchvision:a.b.c",
     "torchvision:nothere.vgg16", "torchvision:../x", "timm:-x", "timm:a b", "hub:vgg16", "my lib.x",
     "mylib..x", "1abc", "os.system;", "mylib.<locals>.f"],
)
def test_bad_names_are_typed_errors(bad) -> None:
    with pytest.raises(errors.ArchitectureError) as info:
        names.parse(bad)
    assert not isinstance(info.value, errors.FormatError)
    with pytest.raises(errors.FormatError) as from_file:
        names.parse(bad, path="model.safetensors")
    assert from_file.value.path == "model.safetensors" and from_file.value.item == "factory"


def test_registry_create_and_named_weights_key_on_the_same_name() -> None:
    @mk.register_factory("tests.names.tiny")
    def tiny(width: int = 2) -> nn.Module:
        return nn.Linear(width, width)

    try:
        assert factories.resolve("tests.names.tiny") is tiny
        model = mk.create("tests.names.tiny", width=3)
        assert model._modelkeep_recipe["factory"] == "tests.names.tiny"
        entry = pretrained.register_weights("tests.names.tiny", "V1", url="http://127.0.0.1:9/t-00.pth")
        assert pretrained.resolve("tests.names.tiny", "V1") is entry
        assert pretrained.registered_only("tests.names.tiny", "V1")
        assert not pretrained.registered_only("tests.names.tiny", "V2")
    finally:
        factories.unregister_factory("tests.names.tiny")
    for spelling in ("torchvision:resnet18", TV + "resnet18"):
        assert mk.create(spelling)._modelkeep_recipe["factory"] == TV + "resnet18"
    assert models._factory_recipe(nn.Linear(1, 1), "torchvision:fasterrcnn_resnet50_fpn")["factory"] == (
        TV + "detection.fasterrcnn_resnet50_fpn"
    )
    # torchvision's own weights names are not "registered only": the builder is told about them
    pretrained.register_weights("torchvision:resnet18", "IMAGENET1K_V1", url="http://127.0.0.1:9/r-00.pth")
    assert not pretrained.registered_only(TV + "resnet18", "IMAGENET1K_V1")


@pytest.mark.parametrize("name", ["torchvision.models.evil", "timm.evil", "torchvision:vgg16", "a b"])
def test_register_factory_refuses_names_outside_the_python_namespace(name) -> None:
    with pytest.raises(errors.ArchitectureError):
        mk.register_factory(nn.ReLU, name=name)
    assert name not in factories.registered()


def test_a_bad_name_in_a_file_is_a_format_error() -> None:
    with pytest.raises(errors.FormatError):
        factories.resolve("torchvision:../../x", path="m.safetensors")
    with pytest.raises(errors.UnsafeContentError):
        factories.resolve("mylib.tiny", path="m.safetensors")
