"""convert and diff: every tensor survives conversion bit for bit; diff finds each kind of change."""

from __future__ import annotations

import json
import math

import pytest
import safetensors.torch
import torch
from click.testing import CliRunner

import modelkeep as mk
from modelkeep import cli, errors
from modelkeep import comparison as diff
from modelkeep import conversion as convert


def _state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    embed = torch.randn(50, 8, generator=g)
    return {
        "embed.weight": embed,
        "head.weight": embed,  # tied
        "layer.weight": torch.randn(16, 8, generator=g).to(torch.bfloat16),
        "layer.bias": torch.arange(16, dtype=torch.int32),
        "mask": torch.tensor([True, False, True]),
        "scale": torch.tensor(3.5, dtype=torch.float64),
        "empty": torch.empty(0, 4),
    }


def test_convert_safetensors_file_to_modelkeep_with_verify(tmp_path) -> None:
    src = tmp_path / "src.safetensors"
    state = {k: v.clone() for k, v in _state().items()}  # untied: safetensors refuses shared memory
    safetensors.torch.save_file(state, str(src))
    dst = tmp_path / "out.safetensors"
    report = convert.convert(src, dst, verify=True)
    assert report.verified is True and report.outputs == [str(dst)]
    loaded = mk.load_state_dict(dst)
    assert set(loaded) == set(state)
    for name, tensor in state.items():
        assert torch.equal(loaded[name], tensor), name
    assert mk.verify(dst).ok


def test_convert_shards_with_index_readable_by_huggingface_layout(tmp_path) -> None:
    src = tmp_path / "src.safetensors"
    mk.save_weights(_state(), src)
    dst = tmp_path / "sharded" / "model.safetensors"
    dst.parent.mkdir()
    report = convert.convert(src, dst, shard_size=1000, verify=True)
    index_path = dst.parent / "model.safetensors.index.json"
    assert str(index_path) in report.outputs
    index = json.loads(index_path.read_text())
    assert index["metadata"]["total_size"] == report.bytes
    shards = sorted({v for v in index["weight_map"].values()})
    # 1,000-byte shards: the tied 1,600-byte embedding alone, then everything else (331 bytes)
    assert shards == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert {n for n, s in index["weight_map"].items() if s == shards[0]} == {"embed.weight", "head.weight"}
    assert set(index["weight_map"]) == set(_state())
    # The tied pair stays in one shard, and every shard is a plain safetensors file.
    assert index["weight_map"]["head.weight"] == index["weight_map"]["embed.weight"]
    combined: dict[str, torch.Tensor] = {}
    for shard in shards:
        combined.update(safetensors.torch.load_file(str(dst.parent / shard)))
        combined.update(mk.load_state_dict(dst.parent / shard))
    for name, tensor in _state().items():
        assert torch.equal(combined[name], tensor), name


def test_convert_refuses_same_path_and_bad_sizes(tmp_path) -> None:
    src = tmp_path / "a.safetensors"
    mk.save_weights(_state(), src)
    before = src.read_bytes()
    with pytest.raises(errors.UnsupportedValueError):
        convert.convert(src, src)
    with pytest.raises(errors.UnsupportedValueError, match="size"):
        convert.convert(src, tmp_path / "b.safetensors", shard_size="lots")
    assert src.read_bytes() == before


@pytest.mark.parametrize(
    ("text", "size"),
    [("5GB", 5 * 10**9), ("500MiB", 500 * 2**20), ("1000", 1000), ("2.5 gb", 25 * 10**8), ("1KiB", 1024)],
)
def test_parse_size(text: str, size: int) -> None:
    assert convert.parse_size(text) == size


def test_diff_identical_files_are_equal(tmp_path) -> None:
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    mk.save_weights(_state(), a)
    mk.save_weights(_state(), b)
    report = diff.diff(a, b)
    assert report.equal and not report.differing
    assert len(report.tensors) == len(_state())


def test_diff_reports_each_kind_of_difference(tmp_path) -> None:
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    state = {k: v.clone() for k, v in _state().items()}
    mk.save_weights(state, a)
    changed = dict(state)
    changed["embed.weight"] = state["embed.weight"].clone()
    changed["embed.weight"][3, 2] += 0.5
    changed["layer.weight"] = state["layer.weight"].float()  # dtype differs
    changed["layer.bias"] = torch.arange(17, dtype=torch.int32)  # shape differs
    del changed["mask"]
    changed["extra"] = torch.ones(2)
    mk.save_weights(changed, b)
    report = diff.diff(a, b)
    assert not report.equal
    assert report.only_a == ["mask"] and report.only_b == ["extra"]
    by_name = {t.name: t for t in report.tensors}
    embed = by_name["embed.weight"]
    assert embed.max_abs == pytest.approx(0.5, rel=1e-6)
    assert embed.max_rel == pytest.approx(0.5 / float(state["embed.weight"].abs().max()), rel=1e-6)
    assert by_name["layer.weight"].dtype_a == "BF16" and by_name["layer.weight"].dtype_b == "F32"
    assert by_name["layer.weight"].max_abs == 0.0 and not by_name["layer.weight"].equal
    assert by_name["layer.bias"].max_abs is None and by_name["layer.bias"].shape_b == (17,)
    assert by_name["scale"].equal and by_name["empty"].equal


def test_diff_treats_matching_nans_as_equal() -> None:
    a = torch.tensor([1.0, math.nan, 2.0])
    assert diff.compare_tensors(a, a.clone()) == (0.0, 0.0)
    max_abs, _ = diff.compare_tensors(a, torch.tensor([1.0, 0.0, 2.0]))
    assert max_abs == math.inf


def test_cli_diff_exit_codes_and_json(tmp_path) -> None:
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    mk.save_weights(_state(), a)
    mk.save_weights({**_state(), "mask": torch.tensor([True, True, True])}, b)
    runner = CliRunner()
    same = runner.invoke(cli.main, ["diff", str(a), str(a)])
    assert same.exit_code == 0 and "equal" in same.output
    different = runner.invoke(cli.main, ["diff", str(a), str(b), "--json"])
    assert different.exit_code == 1
    document = json.loads(different.output)
    assert document["equal"] is False
    assert [t["name"] for t in document["tensors"] if not t["equal"]] == ["mask"]
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{bad}")
    assert runner.invoke(cli.main, ["diff", str(a), str(broken)]).exit_code == 2


def test_cli_convert(tmp_path) -> None:
    src = tmp_path / "src.safetensors"
    mk.save_weights(_state(), src)
    dst = tmp_path / "dst.safetensors"
    result = CliRunner().invoke(cli.main, ["convert", str(src), str(dst), "--verify"])
    assert result.exit_code == 0, result.output
    assert "verified" in result.output
    assert diff.diff(src, dst).equal
