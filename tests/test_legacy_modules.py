"""Whole pickled modules (``torch.save(model)``): trusted classes are rebuilt without running
their constructors, others are refused (or rescued as placeholders), and their weights can be read
without building anything."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

import modelkeep as mk
from modelkeep import errors, legacy
from modelkeep.options import read_options
from test_legacy_support import same

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore:.*enable_nested_tensor.*:UserWarning")


class Net(nn.Module):
    """A user's own class: not trusted unless the caller says so."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
        self.head = nn.Linear(4 * 6 * 6, 2)
        self.register_buffer("scale", torch.tensor(2.0))
        self.register_buffer("cache", torch.zeros(1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1)) * self.scale


def check_module(ours: nn.Module, original: nn.Module, example: torch.Tensor) -> None:
    same(ours, original)
    assert ours.training == original.training
    was_training = original.training
    ours.eval()
    original.eval()
    with torch.no_grad():
        assert torch.equal(ours(example), original(example))
    original.train(was_training)


def builtin_layers() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Dropout(0.1),
        nn.Linear(4 * 4 * 4, 6),
    )


@pytest.mark.parametrize("protocol", [0, 1, 2, 4, 5])
@pytest.mark.parametrize("layout", ["zip", "stream"])
def test_torch_nn_modules(tmp_path, protocol, layout):
    model = builtin_layers()
    path = str(tmp_path / "m.pt")
    torch.save(model, path, pickle_protocol=protocol, _use_new_zipfile_serialization=layout == "zip")
    check_module(legacy.read_module(path), model, torch.randn(2, 3, 8, 8))
    if protocol > 0:  # torch itself cannot read its protocol-0 tensors
        same(mk.read(path), torch.load(path, weights_only=False))


def test_recurrent_and_attention_modules(tmp_path):
    torch.manual_seed(0)
    model = nn.ModuleDict(
        {
            "lstm": nn.LSTM(3, 4, num_layers=2),
            "encoder": nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0),  # holds F.relu as a value
            "attention": nn.MultiheadAttention(8, 2),
        }
    )
    path = str(tmp_path / "m.pt")
    torch.save(model, path)
    ours = legacy.read_module(path)
    same(ours, torch.load(path, weights_only=False))
    ours.eval()
    model.eval()
    x = torch.randn(5, 2, 3)
    y = torch.randn(5, 2, 8)
    with torch.no_grad():
        assert torch.equal(ours["lstm"](x)[0], model["lstm"](x)[0])
        assert torch.equal(ours["encoder"](y), model["encoder"](y))
        assert torch.equal(ours["attention"](y, y, y)[0], model["attention"](y, y, y)[0])


@pytest.mark.parametrize("factory", [torchvision.models.resnet18, torchvision.models.mobilenet_v3_small])
def test_torchvision_models(tmp_path, factory):
    torch.manual_seed(0)
    model = factory(num_classes=10)
    path = str(tmp_path / "tv.pt")
    torch.save(model, path)
    check_module(mk.read(path), model, torch.randn(1, 3, 64, 64))
    state = mk.load_state_dict(path)  # weights without building anything
    assert list(state) == list(model.state_dict())
    for key, value in model.state_dict().items():
        same(state[key], value, key)


def test_user_class_is_refused_then_trusted_or_rescued(tmp_path):
    torch.manual_seed(0)
    model = Net()
    path = str(tmp_path / "net.pt")
    torch.save(model, path)
    with pytest.raises(errors.UnsafeContentError) as caught:
        mk.read(path)
    names = [name for name, _ in caught.value.globals]
    assert names == [f"{Net.__module__}.Net"]
    assert "byte" in str(caught.value) and "trust=" in str(caught.value)

    check_module(mk.read(path, trust=[Net.__module__]), model, torch.randn(1, 3, 8, 8))
    check_module(legacy.read_module(path, options=read_options(f"{Net.__module__}.Net")), model, torch.randn(1, 3, 8, 8))

    rescued = mk.read(path, on_unknown="placeholder")
    assert isinstance(rescued, legacy.Placeholder) and rescued.qualname == f"{Net.__module__}.Net"
    assert torch.equal(rescued.attributes["_buffers"]["scale"], model.scale)
    assert isinstance(rescued.attributes["_modules"]["head"], nn.Linear)  # trusted parts are real

    for kwargs in ({"on_unknown": "placeholder"}, {"trust": [Net.__module__]}):
        state = mk.load_state_dict(path, **kwargs)
        assert list(state) == list(model.state_dict())  # non-persistent buffers left out
        fresh = Net()
        report = mk.load_weights(fresh, path, **kwargs)
        assert report.ok
        assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))
    with pytest.raises(errors.UnsafeContentError):
        mk.load_state_dict(path)


def test_checkpoint_holding_a_module(tmp_path):
    model = builtin_layers()
    path = str(tmp_path / "ckpt.pt")
    torch.save({"model": model, "epoch": 4}, path)
    check_module(legacy.read_module(path), model, torch.randn(1, 3, 8, 8))
    fresh = builtin_layers()
    report = mk.load_weights(fresh, path)
    assert report.source_key == "model" and report.ok


def test_read_module_refuses_state_dicts(tmp_path):
    path = str(tmp_path / "sd.pt")
    torch.save(builtin_layers().state_dict(), path)
    with pytest.raises(errors.ArchitectureError):
        legacy.read_module(path)


def test_trusted_names_are_checked_where_they_are_defined(tmp_path):
    """torch.nn.modules.rnn imports torch.Tensor; a file naming it there is not trusted."""
    import pickle

    path = tmp_path / "reexport.pkl"
    path.write_bytes(b"\x80\x02ctorch.nn.modules.rnn\nTensor\n)\x81.")
    with pytest.raises(errors.UnsafeContentError, match="not defined in a trusted namespace"):
        mk.read(str(path))
    path.write_bytes(pickle.dumps(nn.functional.relu, protocol=2))
    assert mk.read(str(path)) is nn.functional.relu  # a trusted function as a value is fine
    path.write_bytes(b"\x80\x02ctorch.nn.functional\nrelu\nK\x01\x85R.")
    with pytest.raises(errors.FormatError, match="never calls functions"):
        mk.read(str(path))
    path.write_bytes(b"\x80\x02ctorch.nn.modules.linear\nLinear\nK\x02K\x03\x86R.")
    with pytest.raises(errors.FormatError, match="constructed with arguments"):
        mk.read(str(path))


def test_bad_trust_and_on_unknown_arguments(tmp_path):
    path = str(tmp_path / "x.pt")
    torch.save({"a": 1}, path)
    with pytest.raises(errors.UnsupportedValueError):
        mk.read(path, trust=["not a name!"])
    with pytest.raises(errors.UnsupportedValueError):
        mk.read(path, on_unknown="ignore")
