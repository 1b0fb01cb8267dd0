"""``modelkeep inspect FILE [--json]`` and ``modelkeep verify FILE``, and verify() itself.

Exit codes: 0 ok, 1 a finding (a digest mismatch, or no digests to check), 2 unreadable input.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

import modelkeep as mk
from modelkeep import cli, format

from helpers import TinyGPT, entry, file_bytes, trained_like, write


@pytest.fixture()
def gpt_file(tmp_path) -> str:
    path = str(tmp_path / "gpt.safetensors")
    mk.save_weights(trained_like(TinyGPT(), seed=0), path, metadata={"epoch": "3"})
    return path


class _Result:
    """A CliRunner result whose ``output`` has the console's line wrapping undone."""

    def __init__(self, result) -> None:
        self.exit_code = result.exit_code
        self.exception = result.exception
        self.raw = result.output
        self.output = " ".join(result.output.split())


def run(*args: str) -> _Result:
    return _Result(CliRunner().invoke(cli.main, list(args)))


def _flip_byte_of(path: str, name: str, offset_in_tensor: int = 5) -> None:
    item = format.read_header_file(path).entries[name]
    with open(path, "r+b") as stream:
        stream.seek(item.begin + offset_in_tensor)
        byte = stream.read(1)
        stream.seek(item.begin + offset_in_tensor)
        stream.write(bytes([byte[0] ^ 0x01]))


# --------------------------------------------------------------------------------------------
# verify()


def test_verify_ok(gpt_file):
    report = mk.verify(gpt_file)
    assert report.ok and report.algorithm == "xxh3-128"
    assert sorted(report.checked) == sorted(t.name for t in mk.inspect(gpt_file).tensors)
    assert report.mismatched == [] and report.unhashed == []


@pytest.mark.parametrize("victim", ["wte.weight", "h.1.linear2.bias", "ln_f.weight"])
def test_verify_names_exactly_the_damaged_tensor(gpt_file, victim):
    _flip_byte_of(gpt_file, victim)
    report = mk.verify(gpt_file)
    assert not report.ok
    assert report.mismatched == [victim]
    assert victim not in report.checked and len(report.checked) == len(mk.inspect(gpt_file).tensors) - 1


def test_verify_first_and_last_byte(tmp_path):
    path = str(tmp_path / "w.safetensors")
    mk.save_weights({"a": torch.arange(10.0), "b": torch.arange(3), "c": torch.zeros(0)}, path)
    header = format.read_header_file(path)
    for name, where in (("a", 0), ("b", header.entries["b"].nbytes - 1)):
        mk.save_weights({"a": torch.arange(10.0), "b": torch.arange(3), "c": torch.zeros(0)}, path)
        _flip_byte_of(path, name, where)
        assert mk.verify(path).mismatched == [name]


# --------------------------------------------------------------------------------------------
# inspect


def test_inspect_table(gpt_file):
    result = run("inspect", gpt_file)
    assert result.exit_code == 0, result.output
    out = result.output
    model = TinyGPT()
    stored = [n for n in model.state_dict() if n != "lm_head.weight"]
    for name in ("wte.weight", "ln_f.bias", "h.0.self_attn.in_proj_weight"):
        assert name in out
    assert "F32" in out and "[97, 16]" in out and "6.2 KB" in out
    assert f"{len(stored)} tensors" in out
    total = sum(t.numel() for n, t in model.state_dict().items() if n != "lm_head.weight")
    assert f"{total:,} elements" in out
    assert "aliases (stored once): lm_head.weight -> wte.weight" in out
    assert f"digests: xxh3-128 for {len(stored)} tensors" in out
    assert "metadata epoch: 3" in out
    assert 'modelkeep.kind: "weights"' in out


def test_inspect_json(gpt_file):
    result = run("inspect", gpt_file, "--json")
    assert result.exit_code == 0, result.output
    document = json.loads(result.raw)
    model = TinyGPT()
    stored = {n: t for n, t in model.state_dict().items() if n != "lm_head.weight"}
    assert document["path"] == gpt_file
    assert document["file_size"] == os.path.getsize(gpt_file)
    assert document["kind"] == "weights" and document["format_version"] == "1"
    assert document["tensor_count"] == len(stored)
    assert document["total_bytes"] == sum(t.nbytes for t in stored.values())
    assert document["total_elements"] == sum(t.numel() for t in stored.values())
    tensors = {t["name"]: t for t in document["tensors"]}
    assert list(tensors) == list(stored)
    assert tensors["wte.weight"] == {"name": "wte.weight", "dtype": "F32", "shape": [97, 16], "nbytes": 97 * 16 * 4}
    assert document["aliases"] == {"lm_head.weight": "wte.weight"}
    assert document["hashes"] == {"algorithm": "xxh3-128", "count": len(stored)}
    assert document["metadata"] == {"epoch": "3"}
    assert document["modelkeep"]["modelkeep.producer"]["torch"] == torch.__version__
    assert "modelkeep.hashes" not in document["modelkeep"]


def test_inspect_safetensors_file(tmp_path):
    path = str(tmp_path / "st.safetensors")
    save_file({"x": torch.zeros(2, 3, dtype=torch.bfloat16)}, path)
    result = run("inspect", path)
    assert result.exit_code == 0
    assert "BF16" in result.output and "[2, 3]" in result.output
    assert "digests: none" in result.output
    document = json.loads(run("inspect", "--json", path).raw)
    assert document["hashes"] == {"algorithm": None, "count": 0} and document["aliases"] == {}


def test_names_are_shown_literally(tmp_path):
    """Names and metadata come from the file: they are text, never console markup."""
    path = str(tmp_path / "odd.safetensors")
    state = {"[/bold]": torch.zeros(1), "[red]x[/red]": torch.ones(1)}
    state["[link=x]"] = state["[red]x[/red]"]
    mk.save_weights(state, path, metadata={"[/]": "[bold]"})
    result = run("inspect", path)
    assert result.exit_code == 0, result.output
    for text in ("[/bold]", "[red]x[/red]", "[link=x] -> [red]x[/red]", "metadata [/]: [bold]"):
        assert text in result.output
    _flip_byte_of(path, "[/bold]", 0)
    result = run("verify", path)
    assert result.exit_code == 1, result.output
    assert "MISMATCH [/bold]" in result.output


# --------------------------------------------------------------------------------------------
# verify


def test_verify_exit_codes(gpt_file, tmp_path):
    result = run("verify", gpt_file)
    assert result.exit_code == 0, result.output
    assert "OK" in result.output

    _flip_byte_of(gpt_file, "ln_f.weight")
    result = run("verify", gpt_file)
    assert result.exit_code == 1
    assert "MISMATCH ln_f.weight" in result.output and "1 of" in result.output
    assert result.output.count("MISMATCH") == 1

    plain = str(tmp_path / "plain.safetensors")
    save_file({"x": torch.zeros(3)}, plain)
    result = run("verify", plain)
    assert result.exit_code == 1 and "no digests" in result.output


def test_unreadable_inputs_exit_2(tmp_path):
    damaged = write(tmp_path / "damaged.safetensors", file_bytes({"a": entry("F32", [2], 0, 8)}, b"\0" * 4))
    text = write(tmp_path / "notes.txt", b"not a model at all\n")
    folder = tmp_path / "folder"
    folder.mkdir()
    for command in ("inspect", "verify"):
        for path in (damaged, text, str(tmp_path / "missing.safetensors"), str(folder)):
            result = run(command, path)
            assert result.exit_code == 2, (command, path, result.output)
            assert result.exception is None or isinstance(result.exception, SystemExit)
        assert "damaged.safetensors" in run(command, damaged).output
        assert "tensors end at byte" in run(command, damaged).output
        assert "no such file" in run(command, str(tmp_path / "missing.safetensors")).output


def test_console_script(gpt_file):
    """The installed entry point, in a fresh process."""
    env = dict(os.environ, COLUMNS="200")
    _flip_byte_of(gpt_file, "wpe.weight")
    bad = subprocess.run([sys.executable, "-m", "modelkeep.cli", "verify", gpt_file],
                         capture_output=True, text=True, env=env)
    assert bad.returncode == 1 and "MISMATCH wpe.weight" in bad.stdout
