"""Whole models through save/load: outputs before and after are identical, for factory models
(vgg16, resnet18, mobilenet_v3_small, a ViT), a module tree, non-persistent buffers, dtypes and
the inference spec."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from torch import nn

import modelkeep as mk
from modelkeep import api, format, models, reading
from modelkeep.inference import spec as spec_module

BATCHES = (1, 3)


def _record(path) -> dict:
    return json.loads(reading.read_header(path).metadata[format.KEY_ARCHITECTURE])


def _same_outputs(
    original: nn.Module, loaded: nn.Module, shape: tuple[int, ...], dtype: torch.dtype = torch.float32
) -> None:
    torch.manual_seed(1)
    original.eval()
    with torch.no_grad():
        for batch in BATCHES:
            x = torch.randn(batch, *shape, dtype=dtype)
            expected, actual = original(x), loaded(x)
            assert actual.shape == expected.shape
            assert torch.equal(actual, expected), (actual - expected).abs().max()


def _same_state(original: nn.Module, loaded: nn.Module) -> None:
    left, right = original.state_dict(), loaded.state_dict()
    assert list(left) == list(right)
    for name in left:
        assert left[name].dtype == right[name].dtype, name
        assert torch.equal(left[name], right[name]), name


@pytest.fixture(scope="module")
def vgg16_roundtrip(tmp_path_factory):
    torch.manual_seed(0)
    model = mk.create("torchvision:vgg16").eval()
    path = tmp_path_factory.mktemp("vgg") / "vgg16.mk"
    mk.save(model, path)
    return model, path


def test_vgg16_outputs_identical(vgg16_roundtrip) -> None:
    model, path = vgg16_roundtrip
    loaded = mk.load(path)
    assert not loaded.training
    assert type(loaded) is type(model)
    _same_outputs(model, loaded, (3, 32, 32))
    _same_state(model, loaded)
    record = _record(path)
    assert record == {"version": 1, "strategy": "factory", "factory": "torchvision.models.vgg16", "kwargs": {}, "buffers": {}}


def test_vgg16_mapped_load(vgg16_roundtrip) -> None:
    """``mmap=True``: parameters are copy-on-write views of the file; writing to them leaves the
    file alone."""
    model, path = vgg16_roundtrip
    before = path.read_bytes()[-4096:]
    loaded = mk.load(path, mmap=True)
    assert loaded.classifier[0].weight.untyped_storage().nbytes() == path.stat().st_size
    _same_outputs(model, loaded, (3, 32, 32))
    with torch.no_grad():
        loaded.classifier[6].bias.add_(1.0)
    assert path.read_bytes()[-4096:] == before
    assert torch.equal(mk.load(path).classifier[6].bias, model.classifier[6].bias)


def test_vgg16_file_is_plain_safetensors(vgg16_roundtrip) -> None:
    safetensors = pytest.importorskip("safetensors.torch")
    model, path = vgg16_roundtrip
    tensors = safetensors.load_file(str(path))
    assert set(tensors) == set(model.state_dict())
    assert torch.equal(tensors["classifier.6.weight"], model.classifier[6].weight)


@pytest.mark.parametrize(
    "name, kwargs, shape",
    [
        ("torchvision:resnet18", {}, (3, 32, 32)),
        ("torchvision:mobilenet_v3_small", {"num_classes": 7}, (3, 32, 32)),
        # vit_b_16 is 330 MB; the same VisionTransformer class, small configuration.
        (
            "torchvision.models.VisionTransformer",
            {"image_size": 32, "patch_size": 8, "num_layers": 2, "num_heads": 2, "hidden_dim": 32, "mlp_dim": 64},
            (3, 32, 32),
        ),
    ],
)
def test_factory_models_outputs_identical(tmp_path, name, kwargs, shape) -> None:
    torch.manual_seed(0)
    model = mk.create(name, **kwargs).eval()
    path = tmp_path / "model.mk"
    mk.save(model, path)
    loaded = mk.load(path)
    _same_outputs(model, loaded, shape)
    _same_state(model, loaded)
    record = _record(path)
    assert record["strategy"] == "factory"
    assert {k: v for k, v in record["kwargs"].items()} == kwargs
    mk.save(loaded, tmp_path / "again.mk")  # a loaded model remembers its recipe
    assert _record(tmp_path / "again.mk") == record


def _cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, (3, 3), stride=(1, 1), padding="same", bias=False),
        nn.GELU(approximate="tanh"),
        nn.AdaptiveAvgPool2d((2, 2)),
        nn.Flatten(),
        nn.Dropout(0.25),
        nn.Linear(64, 10),
    )


def test_sequential_cnn_through_module_tree(tmp_path) -> None:
    torch.manual_seed(0)
    model = _cnn()
    model[1].running_mean.uniform_()  # buffers must come from the file too
    model[1].num_batches_tracked += 5
    path = tmp_path / "cnn.mk"
    mk.save(model, path)
    record = _record(path)
    assert record["strategy"] == "modules"
    assert record["root"]["children"]["4"]["args"]["kernel_size"] == {"$tuple": [3, 3]}
    assert record["root"]["children"]["4"]["args"]["padding"] == "same"
    loaded = mk.load(path)
    assert isinstance(loaded, nn.Sequential) and not loaded.training
    _same_outputs(model, loaded, (1, 8, 8))
    _same_state(model, loaded)


def test_dtypes_are_kept(tmp_path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2)).double()
    path = tmp_path / "double.mk"
    mk.save(model, path)
    loaded = mk.load(path)
    assert loaded[0].weight.dtype == torch.float64
    _same_outputs(model, loaded, (4,), dtype=torch.float64)
    model[2].to(torch.bfloat16)  # mixed dtypes: each tensor keeps its own
    mk.save(model, path)
    _same_state(model, mk.load(path))


class _Scaled(nn.Module):
    """A registered builder whose non-persistent buffer is changed after construction."""

    def __init__(self, width: int = 4) -> None:
        super().__init__()
        self.linear = nn.Linear(width, width)
        self.register_buffer("scale", torch.ones(width), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) * self.scale


def test_nonpersistent_buffers_are_stored(tmp_path) -> None:
    mk.register_factory(_Scaled, name="tests.models_roundtrip.scaled")
    try:
        model = mk.create("tests.models_roundtrip.scaled", width=3)
        model.scale.copy_(torch.tensor([2.0, 3.0, 4.0]))
        path = tmp_path / "scaled.mk"
        mk.save(model, path)
        assert "scale" not in model.state_dict()
        assert _record(path)["buffers"] == {"scale": "modelkeep.buffer.scale"}
        loaded = mk.load(path)
        assert torch.equal(loaded.scale, model.scale)
        _same_outputs(model, loaded, (3,))
    finally:
        mk.arch.factories.unregister_factory("tests.models_roundtrip.scaled")


def test_inference_spec_is_stored_and_attached(tmp_path) -> None:
    model = _cnn()
    spec = {"input": {"shape": [None, 1, 8, 8], "dtype": "float32"}, "labels": [str(i) for i in range(10)]}
    path = tmp_path / "cnn.mk"
    mk.save(model, path, inference=spec, metadata={"note": "kept"})
    stored = mk.InferenceSpec.from_json(spec)  # the file holds the validated, complete document
    assert models.read_inference(path) == stored.to_json()
    assert stored.input_shape == (None, 1, 8, 8) and stored.labels == tuple(str(i) for i in range(10))
    loaded = mk.load(path)
    assert spec_module.attached(loaded) == stored
    assert loaded.__dict__[spec_module.ATTRIBUTE] == stored  # one value type on the attribute
    assert reading.read_header(path).metadata["note"] == "kept"

    class Spec:
        def to_json(self) -> dict:
            return {"labels": ["a"]}

    mk.save(model, path, inference=Spec())
    assert spec_module.read(path).labels == ("a",)
    spec_module.attach(model, {"labels": ["b"]})
    assert isinstance(model.__dict__[spec_module.ATTRIBUTE], mk.InferenceSpec)
    mk.save(model, path)
    assert spec_module.read(path).labels == ("b",)
    with pytest.raises(mk.UnsupportedValueError):
        mk.save(model, path, inference={"bad": object()})
    with pytest.raises(mk.UnsupportedValueError):
        mk.save(model, path, inference=object())


def test_create_with_named_weights_uses_the_pretrained_loader(tmp_path, monkeypatch) -> None:
    """``create(weights=...)`` builds on meta (no random init), hands the model to
    ``pretrained.load_named_weights`` and keeps the spec it returns."""
    torch.manual_seed(0)
    reference = mk.create("torchvision:resnet18").eval()
    weights_file = tmp_path / "r18.safetensors"
    mk.save_weights(reference, weights_file)
    calls = []

    def fake_load_named_weights(model, *, factory, weights, path=None, storage_options=None):
        calls.append((factory, weights, any(t.is_meta for t in model.parameters())))
        api.load_weights(model, weights_file)
        return {"labels": ["tench"]}

    from modelkeep import pretrained

    monkeypatch.setattr(pretrained, "load_named_weights", fake_load_named_weights)
    model = mk.create("torchvision:resnet18", weights="IMAGENET1K_V1")
    assert calls == [("torchvision.models.resnet18", "IMAGENET1K_V1", True)]
    assert spec_module.attached(model) == mk.InferenceSpec(labels=("tench",))
    assert model._modelkeep_recipe["kwargs"] == {"weights": "ResNet18_Weights.IMAGENET1K_V1"}
    _same_outputs(reference, model, (3, 32, 32))
    path = tmp_path / "r18.mk"
    mk.save(model, path)
    assert spec_module.read(path) == mk.InferenceSpec(labels=("tench",))
    _same_outputs(reference, mk.load(path), (3, 32, 32))
    with pytest.raises(mk.ArchitectureError, match="no weights"):
        mk.create("torchvision:resnet18", weights="NOT_A_WEIGHT")


def test_wrappers_are_unwrapped(tmp_path) -> None:
    model = _cnn()
    path = tmp_path / "cnn.mk"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrapped = nn.DataParallel(model)
    mk.save(wrapped, path)
    _same_state(model, mk.load(path))


def test_load_to_device_and_refuses_weights_files(tmp_path) -> None:
    model = _cnn()
    path = tmp_path / "cnn.mk"
    mk.save(model, path)
    loaded = mk.load(path, device="cpu")
    assert all(t.device.type == "cpu" for t in loaded.state_dict().values())
    weights = tmp_path / "w.safetensors"
    mk.save_weights(model, weights)
    with pytest.raises(mk.FormatError, match="not a whole model"):
        mk.load(weights)
