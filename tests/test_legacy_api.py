"""``read``, ``load_state_dict`` and ``load_weights`` accept every supported file: checkpoints are
searched for their state dict, and bytes of torch zip archives go straight into the model."""

from __future__ import annotations

import argparse
import zipfile

import numpy as np
import pytest
import torch
from torch import nn

import modelkeep as mk
from modelkeep import errors, format, legacy, reading, storage
from modelkeep.legacy import statedict
import helpers
from test_legacy_support import same


def small_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def test_read_is_exported():
    assert "read" in mk.__all__ and mk.read is reading.read


@pytest.mark.parametrize(
    "key", ["state_dict", "model_state_dict", "model", "module", "net", "network", "ema", "model_ema"]
)
def test_checkpoint_keys_are_found_and_reported(tmp_path, key):
    model = small_model()
    path = str(tmp_path / "ckpt.pt")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(5, 4)).sum().backward()
    optimizer.step()
    torch.save({"epoch": 3, key: model.state_dict(), "optimizer": optimizer.state_dict(),
                "args": argparse.Namespace(lr=0.1), "np": np.float64(1.0)}, path)
    fresh = small_model(seed=1)
    report = mk.load_weights(fresh, path)
    assert report.source_key == key and report.ok and f"{key!r}" in str(report)
    assert helpers.same(fresh, model) and not fresh.training
    state = mk.load_state_dict(path)
    assert list(state) == list(model.state_dict())


def test_nested_checkpoint_key(tmp_path):
    model = small_model()
    path = str(tmp_path / "ckpt.pt")
    torch.save({"model": {"state_dict": model.state_dict(), "step": 1}}, path)
    report = mk.load_weights(small_model(1), path)
    assert report.source_key == "model.state_dict"


def test_checkpoint_without_state_dict_says_what_it_holds(tmp_path):
    path = str(tmp_path / "ckpt.pt")
    torch.save({"epoch": 1, "losses": [0.5]}, path)
    with pytest.raises(errors.FormatError, match="epoch"):
        mk.load_state_dict(path)


@pytest.mark.parametrize("layout", ["zip", "stream"])
def test_load_weights_matches_torch(tmp_path, layout):
    model = small_model()
    path = str(tmp_path / "w.pt")
    torch.save(model.state_dict(), path, _use_new_zipfile_serialization=layout == "zip")
    fresh = small_model(seed=5)
    report = mk.load_weights(fresh, path)
    assert report.ok and report.source_key is None and helpers.same(fresh, model)
    assert report.bytes_read == sum(t.numel() * t.element_size() for t in model.state_dict().values())
    expected = torch.load(path)
    state = mk.load_state_dict(path)
    for key in expected:
        same(state[key], expected[key], key)


def test_zip_tensors_go_straight_into_the_model(tmp_path, monkeypatch):
    """Contiguous tensors of an uncompressed archive are read by the engine into the model's own
    memory: the slower read-then-copy path is never taken."""
    model = small_model()
    path = str(tmp_path / "w.pt")
    torch.save(model.state_dict(), path)

    def no_copies(*args, **kwargs):
        raise AssertionError("a tensor was staged instead of read in place")

    monkeypatch.setattr(statedict, "materialize", no_copies)
    fresh = small_model(seed=9)
    pointers = {name: t.data_ptr() for name, t in fresh.state_dict().items()}
    assert mk.load_weights(fresh, path).ok
    assert helpers.same(fresh, model)
    assert pointers == {name: t.data_ptr() for name, t in fresh.state_dict().items()}


def test_views_and_conversions_take_the_staged_path(tmp_path):
    model = small_model()
    state = model.state_dict()
    big = torch.randn(100, 8)
    state["0.bias"] = big[:8, 0]  # a strided view into a larger storage
    path = str(tmp_path / "w.pt")
    torch.save(state, path)
    fresh = small_model(seed=2).double()
    report = mk.load_weights(fresh, path)
    assert report.ok and ("0.weight", "F32", "torch.float64") in report.dtype_conversions
    assert torch.equal(fresh[0].bias, big[:8, 0].double())
    assert torch.equal(fresh[0].weight, model[0].weight.double())


def corrupt_storage(path: str, key: str = "0") -> None:
    """Flip one byte inside a stored tensor, leaving the archive's CRC as written."""
    with zipfile.ZipFile(path) as archive:
        folder = archive.namelist()[0].split("/")[0]
        info = archive.getinfo(f"{folder}/data/{key}")
    with open(path, "r+b") as stream:
        stream.seek(info.header_offset + 26)
        name_length, extra_length = (int.from_bytes(stream.read(2), "little") for _ in range(2))
        stream.seek(info.header_offset + 30 + name_length + extra_length + 3)
        byte = stream.read(1)
        stream.seek(-1, 1)
        stream.write(bytes([byte[0] ^ 0x40]))


def test_damaged_tensor_bytes_are_detected_on_every_path(tmp_path):
    model = small_model()
    path = str(tmp_path / "w.pt")
    torch.save(model.state_dict(), path)
    corrupt_storage(path)
    for attempt in (
        lambda: mk.load_weights(small_model(1), path),
        lambda: mk.load_state_dict(path),
        lambda: mk.read(path),
    ):
        with pytest.raises(errors.FormatError, match="CRC-32"):
            attempt()


def test_strict_mismatch_names_the_file(tmp_path):
    path = str(tmp_path / "w.pt")
    torch.save({"model": nn.Linear(2, 2).state_dict()}, path)
    with pytest.raises(errors.KeyMismatchError) as caught:
        mk.load_weights(small_model(), path)
    assert path in str(caught.value)
    report = mk.load_weights(nn.Sequential(nn.Linear(2, 2)), path, strict=False)
    assert report.source_key == "model" and report.missing and report.unexpected


def test_safetensors_files_keep_their_path(tmp_path, monkeypatch):
    model = small_model()
    path = str(tmp_path / "w.safetensors")
    mk.save_weights(model, path)
    assert mk.read(path).keys() == model.state_dict().keys()
    assert isinstance(reading.open_source(path), reading.SafetensorsSource)
    fresh = small_model(3)
    assert mk.load_weights(fresh, path).ok and helpers.same(fresh, model)


def test_checkpoint_files_read_as_their_state(tmp_path):
    path = str(tmp_path / "c.safetensors")
    state = {"version": 1, "tree": {"w": {"$tensor": "w"}, "step": 3}}
    base = {format.KEY_FORMAT: format.dumps("1"), format.KEY_KIND: format.dumps("checkpoint")}
    storage.LOCAL.write_tensor_file(path, [("w", torch.ones(2))], {**base, format.KEY_STATE: format.dumps(state)})
    data = mk.read(path)
    assert set(data) == {"w", "step"} and data["step"] == 3 and torch.equal(data["w"], torch.ones(2))
    flat = str(tmp_path / "w.safetensors")  # a weights file reads as its flat state dict
    mk.save_weights({"w": torch.ones(2)}, flat)
    assert torch.equal(mk.read(flat)["w"], torch.ones(2))


def test_legacy_weights_interface(tmp_path):
    model = small_model()
    path = str(tmp_path / "w.pt")
    torch.save({"ema": model.state_dict()}, path)
    weights = legacy.open_weights(path)
    assert weights.source_key == "ema" and weights.container == "zip"
    entries = weights.entries()
    assert entries["0.weight"].shape == (8, 4) and entries["0.weight"].dtype == "F32"
    assert entries["1.num_batches_tracked"].torch_dtype == torch.int64
    tensors = legacy.read_state_dict(path)
    assert all(torch.equal(tensors[k], v) for k, v in model.state_dict().items())
