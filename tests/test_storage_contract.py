"""Every public operation, run the same way against every storage backend.

A backend is a place to put files (a local folder, an fsspec ``memory://`` bucket; a real S3
server joins as one more entry of ``BACKENDS``) plus the ``storage_options`` its URLs need. Each
test names files with ``place.path(name)`` and passes ``place.options`` wherever the operation
takes ``storage_options``, so a new backend needs nothing but its fixture entry.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
import torchvision
from click.testing import CliRunner
from torch import nn

import modelkeep as mk
from modelkeep import cli, pretrained
from places import Place
from helpers import same

def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).eval()


def tied(seed: int = 0) -> nn.Module:
    model = mlp(seed)
    model.add_module("3", nn.Linear(8, 3))
    model[3].weight = model[2].weight
    return model


def torch_bytes(value: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def test_weights_round_trip(place: Place) -> None:
    model = tied()
    path = place.path("w.safetensors")
    digests = mk.save_weights(model, path, metadata={"note": "kept"}, storage_options=place.options)
    assert set(digests) == {"0.weight", "0.bias", "2.weight", "2.bias", "3.bias"}  # 3.weight is an alias
    fresh = tied(seed=1)
    report = mk.load_weights(fresh, path, storage_options=place.options)
    assert report.ok and same(fresh, model) and fresh[3].weight is fresh[2].weight
    state = mk.load_state_dict(path, storage_options=place.options)
    assert same(state, model) and state["3.weight"] is state["2.weight"]
    assert same(mk.read(path, storage_options=place.options), model)
    half = tied(seed=2)  # converted on load: the staged path of every backend
    mk.load_weights(half, path, dtype=torch.float16, storage_options=place.options)
    assert torch.equal(half[0].weight, model[0].weight.half())


def test_failed_save_leaves_the_old_file(place: Place) -> None:
    path = place.path("w.safetensors")
    mk.save_weights(mlp(), path, storage_options=place.options)
    before = place.get("w.safetensors")
    with pytest.raises(mk.UnsupportedValueError):
        mk.save_weights({"ok": torch.ones(2), "bad": "not a tensor"}, path, storage_options=place.options)
    assert place.get("w.safetensors") == before and place.names() == ["w.safetensors"]


def test_whole_model_save_load_predict(place: Place) -> None:
    model = mlp()
    path = place.path("m.safetensors")
    spec = mk.InferenceSpec(input_shape=("batch", 4), labels=("a", "b", "c"))
    mk.save(model, path, inference=spec, storage_options=place.options)
    loaded = mk.load(path, storage_options=place.options)
    x = torch.randn(2, 4)
    assert not loaded.training and torch.equal(loaded(x), model(x))
    predictions = mk.predict(path, x, topk=2, storage_options=place.options)
    expected = model(x).softmax(dim=1).topk(2, dim=1).indices
    assert [[r.index for r in p.top] for p in predictions] == expected.tolist()
    assert predictions[0].top[0].label == "abc"[expected[0, 0]]


def test_torch_save_files(place: Place) -> None:
    model = mlp()
    path = place.put("ckpt.pt", torch_bytes({"model_state_dict": model.state_dict(), "epoch": 3}))
    data = mk.read(path, storage_options=place.options)
    assert data["epoch"] == 3 and same(data["model_state_dict"], model)
    fresh = mlp(seed=1)
    assert mk.load_weights(fresh, path, storage_options=place.options).source_key == "model_state_dict"
    assert same(fresh, model)
    whole = place.put("whole.pt", torch_bytes(model))
    assert same(mk.load(whole, storage_options=place.options), model)


def test_unsafe_torch_save_file_is_refused_and_scanned(place: Place) -> None:
    class Evil:
        def __reduce__(self) -> tuple[Any, ...]:
            return (os.system, ("true",))

    path = place.put("evil.pt", torch_bytes({"w": torch.ones(2), "x": Evil()}))
    with pytest.raises(mk.UnsafeContentError) as caught:
        mk.read(path, storage_options=place.options)
    assert "os" in str(caught.value) and path in str(caught.value)
    (result,) = mk.scan(path, storage_options=place.options)
    assert result.path == path and result.verdict == "dangerous"
    assert [f.name for f in result.findings] == ["posix.system"]
    place.put("clean.pt", torch_bytes({"w": torch.ones(2)}))
    by_path = {r.path: r.verdict for r in mk.scan(place.root, storage_options=place.options)}
    assert by_path == {path: "dangerous", place.path("clean.pt"): "safe"}


def test_inspect_and_verify(place: Place) -> None:
    path = place.path("w.safetensors")
    mk.save_weights(mlp(), path, storage_options=place.options)
    info = mk.inspect(path, storage_options=place.options)
    assert info.kind == "weights" and [t.name for t in info.tensors] == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert info.hashed_tensors == 4 and info.total_bytes == (32 + 8 + 24 + 3) * 4
    assert mk.verify(path, storage_options=place.options).ok
    data = bytearray(place.get("w.safetensors"))
    data[-1] ^= 0xFF  # the last byte belongs to 2.bias
    place.put("w.safetensors", bytes(data))
    report = mk.verify(path, storage_options=place.options)
    assert not report.ok and report.mismatched == ["2.bias"]


def test_convert_shards_and_diff(place: Place) -> None:
    model = tied()
    source = place.put("legacy.pt", torch_bytes(model.state_dict()))
    place.makedirs("out")
    out = place.path("out/model.safetensors")
    report = mk.convert(source, out, shard_size=200, verify=True, storage_options=place.options)
    assert report.verified and len(report.outputs) > 2 and report.outputs[-1].endswith(".index.json")
    index = json.loads(place.get("out/model.safetensors.index.json"))
    assert set(index["weight_map"]) == set(model.state_dict())
    folder = place.path("out")
    state = mk.load_state_dict(folder, storage_options=place.options)
    assert same(state, model) and state["3.weight"] is state["2.weight"]
    assert mk.diff(source, folder, storage_options=place.options).equal
    other = place.path("other.safetensors")
    mk.save_weights(tied(seed=5), other, storage_options=place.options)
    differ = mk.diff(folder, other, storage_options=place.options)
    assert not differ.equal and {t.name for t in differ.differing} == set(model.state_dict())


def test_checkpointer(place: Place) -> None:
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(3, 4)).sum().backward()
    optimizer.step()
    directory = place.path("run")
    ckpt = mk.Checkpointer(directory, keep_last=2, storage_options=place.options)
    for step in range(3):
        ckpt.save(step, model=model, optimizer=optimizer, metrics={"loss": 1.0 / (step + 1)})
    ckpt.wait()
    assert ckpt.steps() == [1, 2]
    fresh = mlp(seed=1)
    fresh_opt = torch.optim.SGD(fresh.parameters(), lr=0.1, momentum=0.9)
    restored = ckpt.restore(model=fresh, optimizer=fresh_opt)
    assert restored.step == 2 and same(fresh, model)
    assert fresh_opt.state_dict()["state"][0]["momentum_buffer"].equal(
        optimizer.state_dict()["state"][0]["momentum_buffer"])
    step_file = ckpt.path(2)
    weights = mk.load_state_dict(step_file, storage_options=place.options)  # a checkpoint's model
    assert same(weights, model)
    assert mk.read(step_file, storage_options=place.options)["step"] == 2


def test_create_with_named_weights_from_a_location(place: Place, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("MODELKEEP_CACHE", str(tmp_path / "mk-cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    torch.manual_seed(0)
    reference = torchvision.models.squeezenet1_1().eval()
    weights_file = place.put("squeezenet1_1.pth", torch_bytes(reference.state_dict()))
    registered = dict(pretrained._REGISTRY)
    # torchvision's own entry under its real name, with our bytes at a location: no download
    pretrained.register_weights("torchvision:squeezenet1_1", "IMAGENET1K_V1", url="http://127.0.0.1:9/squeezenet1_1.pth")
    try:
        model = mk.create("torchvision:squeezenet1_1", weights="IMAGENET1K_V1", weights_file=weights_file,
                          storage_options=place.options)
    finally:
        pretrained._REGISTRY.clear()
        pretrained._REGISTRY.update(registered)
    assert not model.training and same(model, reference)


def test_cli_commands(place: Place, tmp_path_factory) -> None:
    """The CLI takes URLs where it takes paths (in-process, so ``memory://`` is shared)."""
    runner = CliRunner()
    path = place.path("w.safetensors")
    mk.save_weights(mlp(), path, storage_options=place.options)
    place.put("clean.pt", torch_bytes(mlp(1).state_dict()))
    assert runner.invoke(cli.main, ["inspect", path, "--json"]).exit_code == 0
    assert runner.invoke(cli.main, ["verify", path]).exit_code == 0
    assert runner.invoke(cli.main, ["scan", place.path("clean.pt")]).exit_code == 0
    converted = place.path("c.safetensors")
    assert runner.invoke(cli.main, ["convert", place.path("clean.pt"), converted]).exit_code == 0
    result = runner.invoke(cli.main, ["diff", place.path("clean.pt"), converted, "--json"])
    assert result.exit_code == 0 and json.loads(result.output)["equal"] is True
    assert runner.invoke(cli.main, ["diff", path, converted]).exit_code == 1
    model_path = place.path("m.safetensors")
    mk.save(mlp(), model_path, storage_options=place.options)
    inputs = str(tmp_path_factory.mktemp("inputs") / "x.safetensors")  # inputs are local files
    mk.save_weights({"x": torch.randn(2, 4)}, inputs)
    result = runner.invoke(cli.main, ["predict", model_path, inputs, "--topk", "2", "--json"])
    assert result.exit_code == 0 and len(json.loads(result.output)["predictions"]) == 2


def test_checkpoint_import_and_extract(place: Place) -> None:
    model = mlp()
    source = place.put("train.pt", torch_bytes({"model_state_dict": model.state_dict(), "epoch": 7}))
    ckpt = mk.Checkpointer(place.path("run"), storage_options=place.options)
    assert ckpt.import_torch_checkpoint(source, storage_options=place.options) == 7
    assert ckpt.steps() == [7]
    out = place.path("extracted.safetensors")
    mk.checkpoint.extract_weights(ckpt.path(7), out, storage_options=place.options)
    assert same(mk.load_state_dict(out, storage_options=place.options), model)


def test_missing_files_are_storage_errors_naming_the_location(place: Place) -> None:
    missing = place.path("missing.safetensors")
    for call in (
        lambda: mk.load_state_dict(missing, storage_options=place.options),
        lambda: mk.read(missing, storage_options=place.options),
        lambda: mk.inspect(missing, storage_options=place.options),
        lambda: mk.load(missing, storage_options=place.options),
    ):
        with pytest.raises(mk.StorageError) as caught:
            call()
        assert missing in str(caught.value) and isinstance(caught.value, OSError)


def test_cli_storage_options_reach_the_file_system(place: Place, monkeypatch) -> None:
    seen: list[dict[str, Any] | None] = []
    real = mk.inspect

    def spy(path, *, storage_options=None):  # noqa: ANN001
        seen.append(storage_options)
        return real(path, storage_options=storage_options)

    monkeypatch.setattr(mk, "inspect", spy)
    path = place.path("w.safetensors")
    mk.save_weights(mlp(), path, storage_options=place.options)
    runner = CliRunner()
    assert runner.invoke(cli.main, ["inspect", path]).exit_code == 0
    assert seen == [None]
    runner.invoke(cli.main, ["inspect", path, "--storage-option", "use_listings_cache=false",
                             "--storage-option", "region=eu"])
    assert seen[-1] == {"use_listings_cache": False, "region": "eu"}  # JSON values decoded
    assert runner.invoke(cli.main, ["inspect", path, "--storage-option", "novalue"]).exit_code == 2
