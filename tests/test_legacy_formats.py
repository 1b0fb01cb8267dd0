"""Every container torch has written: zip (any folder name, byte order, with and without CRCs,
recompressed), the stream format, the pre-1.0 tar format, TorchScript archives, Hugging Face
``pytorch_model.bin`` and sharded folders."""

from __future__ import annotations

import json
import os
import zipfile

import pytest
import torch
from torch import nn

import modelkeep as mk
from modelkeep import errors, legacy
from test_legacy_support import same, shares_storage, to_big_endian, write_tar

pytestmark = pytest.mark.filterwarnings("ignore:.*(deprecated|TypedStorage).*")


def sample() -> dict:
    torch.manual_seed(3)
    base = torch.randn(4, 5)
    return {
        "weight": base,
        "tied": base,
        "rows": base[1:3],
        "transposed": base.t(),
        "ints": torch.arange(7, dtype=torch.int64),
        "half": torch.randn(3, dtype=torch.float16),
        "complex": torch.randn(2, dtype=torch.complex64),
        "flags": torch.tensor([True, False]),
    }


def test_tar_format(tmp_path):
    value = sample()
    value["list"] = [value["weight"], {"epoch": 3}]
    path = str(tmp_path / "old.pt")
    write_tar(path, value)
    reference = torch.load(path, weights_only=False)  # torch's own legacy_load still reads it
    ours = mk.read(path)
    same(ours, reference)
    same(ours, value)
    assert ours["tied"] is ours["weight"] and shares_storage(ours["rows"], ours["weight"])
    sd_path = str(tmp_path / "sd.pt")
    write_tar(sd_path, {k: v for k, v in value.items() if isinstance(v, torch.Tensor)})
    state = mk.load_state_dict(sd_path)
    for key, tensor in value.items():
        if isinstance(tensor, torch.Tensor):
            same(state[key], tensor, key)


@pytest.mark.parametrize("folder", ["archive", "my model.v2", "x"])
def test_any_archive_folder_name(tmp_path, folder):
    path = str(tmp_path / "f.pt")
    torch.save(sample(), path)
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(str(tmp_path / "g.pt"), "w") as dst:
        for info in src.infolist():
            dst.writestr(folder + "/" + info.filename.split("/", 1)[1], src.read(info))
    same(mk.read(str(tmp_path / "g.pt")), torch.load(path, weights_only=False))


def test_big_endian_archive(tmp_path):
    value = sample()
    little, big = str(tmp_path / "little.pt"), str(tmp_path / "big.pt")
    torch.save(value, little)
    to_big_endian(little, big)
    same(torch.load(big, weights_only=False), value)  # torch agrees the conversion is faithful
    same(mk.read(big), value)
    state = mk.load_state_dict(big)
    same(state["weight"], value["weight"])
    model = nn.Linear(5, 4)
    torch.save(model.state_dict(), little)
    to_big_endian(little, big)
    fresh = nn.Linear(5, 4)
    mk.load_weights(fresh, big)
    assert torch.equal(fresh.weight, model.weight) and torch.equal(fresh.bias, model.bias)


def test_archive_written_without_checksums(tmp_path):
    import torch.utils.serialization.config as config

    path = str(tmp_path / "nocrc.pt")
    config.save.compute_crc32 = False
    try:
        torch.save(sample(), path)
    finally:
        config.save.compute_crc32 = True
    with zipfile.ZipFile(path) as archive:
        assert all(info.CRC == 0 for info in archive.infolist())
    same(mk.read(path), sample())


def test_recompressed_archive(tmp_path):
    """An archive re-zipped with deflate (torch itself stores entries uncompressed)."""
    path, packed = str(tmp_path / "f.pt"), str(tmp_path / "deflated.pt")
    torch.save(sample(), path)
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(packed, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info))
    same(mk.read(packed), sample())
    model = nn.Linear(5, 4)
    torch.save(model.state_dict(), path)
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(packed, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info))
    fresh = nn.Linear(5, 4)
    mk.load_weights(fresh, packed)
    assert torch.equal(fresh.weight, model.weight)


class Scripted(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.register_buffer("running", torch.arange(2.0))
        self.extra = torch.tensor([5.0])  # a tensor attribute, not in the state dict

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) + self.running + self.extra


def test_torchscript_archives(tmp_path):
    torch.manual_seed(0)
    scripted = torch.jit.script(Scripted())
    path = str(tmp_path / "scripted.pt")
    scripted.save(path)
    reference = torch.jit.load(path).state_dict()
    state = mk.load_state_dict(path)
    assert list(state) == list(reference)
    for key in reference:
        same(state[key], reference[key].detach(), key)
    contents = mk.read(path)
    assert contents["data"].qualname.endswith("Scripted") and contents["constants"] == ()
    fresh = Scripted()
    report = mk.load_weights(fresh, path)
    assert report.ok and torch.equal(fresh.lin.weight, scripted.lin.weight)

    constant = torch.arange(3.0)
    traced = torch.jit.trace(lambda x: x * constant, torch.ones(3))
    trace_path = str(tmp_path / "traced.pt")
    traced.save(trace_path)
    constants = mk.read(trace_path)["constants"]
    assert len(constants) == 1 and torch.equal(constants[0], constant)


def test_torchscript_code_is_never_run(tmp_path):
    """An archive whose code text would create a file if anything compiled or ran it."""
    marker = tmp_path / "MARKER"
    source, path = str(tmp_path / "scripted.pt"), str(tmp_path / "hostile.pt")
    torch.jit.script(Scripted()).save(source)
    payload = f"\nimport os\nos.system('touch {marker}')\n__import__('os').system('touch {marker}')\n"
    with zipfile.ZipFile(source) as src, zipfile.ZipFile(path, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if "/code/" in info.filename and info.filename.endswith(".py"):
                data = payload.encode() + data
            dst.writestr(info.filename, data)
    assert set(mk.load_state_dict(path)) == {"running", "lin.weight", "lin.bias"}
    mk.read(path)
    assert not marker.exists()


def test_hugging_face_checkpoints(tmp_path):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10))
    model[1].weight = model[0].weight  # tied
    state = model.state_dict()
    folder = tmp_path / "single"
    folder.mkdir()
    torch.save(state, folder / "pytorch_model.bin")
    fresh = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10))
    fresh[1].weight = fresh[0].weight
    mk.load_weights(fresh, str(folder))  # a folder holding pytorch_model.bin
    assert torch.equal(fresh[0].weight, model[0].weight) and fresh[1].weight is fresh[0].weight
    loaded = mk.load_state_dict(str(folder / "pytorch_model.bin"))
    assert shares_storage(loaded["0.weight"], loaded["1.weight"])  # tied stays tied, as in torch.load


@pytest.mark.parametrize("kind", ["bin", "safetensors", "mixed"])
def test_sharded_folders(tmp_path, kind):
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    state = model.state_dict()
    names = list(state)
    shards = {"a": names[:2], "b": names[2:]}
    weight_map = {}
    for label, keys in shards.items():
        as_safetensors = kind == "safetensors" or (kind == "mixed" and label == "b")
        file_name = f"model-{label}.safetensors" if as_safetensors else f"pytorch_model-{label}.bin"
        part = {k: state[k] for k in keys}
        if as_safetensors:
            mk.save_weights(part, str(tmp_path / file_name))
        else:
            torch.save(part, tmp_path / file_name)
        weight_map.update({k: file_name for k in keys})
    index = "model.safetensors.index.json" if kind == "safetensors" else "pytorch_model.bin.index.json"
    (tmp_path / index).write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    for target in (str(tmp_path), str(tmp_path / index)):
        loaded = mk.load_state_dict(target)
        assert list(sorted(loaded)) == sorted(state)
        for key in state:
            same(loaded[key], state[key], key)
        fresh = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        assert mk.load_weights(fresh, target).ok
        assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), state.values()))
    same(mk.read(str(tmp_path)), dict(state))


def test_sharded_index_mismatch(tmp_path):
    torch.save({"a": torch.ones(1)}, tmp_path / "one.bin")
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {"b": "one.bin"}}))
    with pytest.raises(errors.FormatError, match="does not hold it"):
        mk.load_state_dict(str(tmp_path))
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {"a": "missing.bin"}}))
    with pytest.raises(errors.FormatError, match="missing"):
        mk.load_state_dict(str(tmp_path))


def test_sniff_and_not_a_model_file(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello, this is not a model")
    with pytest.raises(errors.FormatError):
        mk.read(str(path))
    torch.save({"a": 1}, tmp_path / "z.pt")
    assert legacy.sniff(str(tmp_path / "z.pt")) == "zip"
    torch.save({"a": 1}, tmp_path / "s.pt", _use_new_zipfile_serialization=False)
    assert legacy.sniff(str(tmp_path / "s.pt")) == "pickle"
    assert mk.read(str(tmp_path / "s.pt")) == {"a": 1}
    with pytest.raises(errors.StorageError):
        mk.read(str(tmp_path / "absent.pt"))
    assert os.path.exists(tmp_path / "z.pt")
