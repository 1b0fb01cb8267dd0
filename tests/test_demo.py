"""``modelkeep demo``: the tutorial end to end. The quick run keeps every modelkeep step and the
whole digits part (fresh processes included); the full run adds the torch side of vgg16."""

from __future__ import annotations

import io
import os

import pytest
from click.testing import CliRunner
from rich.console import Console

from modelkeep import cli, demo


def run_demo(tmp_path, **kwargs) -> tuple[demo.Result, str]:
    buffer = io.StringIO()
    console = Console(file=buffer, width=160, force_terminal=False, color_system=None)
    result = demo.run(workdir=str(tmp_path / "demo"), console=console, **kwargs)
    return result, buffer.getvalue()


def test_quick_demo_keeps_predictions_and_accuracy_identical(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))  # no local vgg16 weights here
    monkeypatch.setenv("MODELKEEP_CACHE", str(tmp_path / "mk-cache"))
    result, text = run_demo(tmp_path, quick=True)
    assert result.ok, text
    assert result.accuracy_before is not None and result.accuracy_before > 0.9
    assert result.accuracy_after == result.accuracy_before
    passed = [line for ok, line in result.checks if ok]
    assert any("identical (torch.equal)" in line for line in passed)
    assert any("0 pickle globals resolved" in line for line in passed)
    assert "RANDOM weights" in text  # said plainly
    for photo in ("china.jpg", "flower.jpg"):
        assert photo in text
    for step in ("build vgg16", "save the weights", "load into a fresh model", "eval()",
                 "save the whole model", "fresh process: load + predict"):
        assert step in text
    folder = tmp_path / "demo"
    assert {"vgg16.model.safetensors", "digits.model.safetensors", "digits_test.npy"} <= set(os.listdir(folder))
    assert "model.pth" not in os.listdir(folder)  # --quick skips the torch side of vgg16


@pytest.mark.parametrize(("ok", "code"), [(True, 0), (False, 1)])
def test_cli_demo_passes_options_and_exit_code(tmp_path, monkeypatch, ok: bool, code: int) -> None:
    calls = []

    def fake_run(**kwargs):
        calls.append(kwargs)
        return demo.Result(ok=ok)

    monkeypatch.setattr(demo, "run", fake_run)
    weights = tmp_path / "vgg16-397923af.pth"
    weights.write_bytes(b"x")
    result = CliRunner().invoke(cli.main, ["demo", "--quick", "--weights", str(weights), "--workdir", str(tmp_path)])
    assert result.exit_code == code, result.output
    assert calls == [{"quick": True, "weights_path": str(weights), "workdir": str(tmp_path)}]


@pytest.mark.slow
def test_full_demo(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.setenv("MODELKEEP_CACHE", str(tmp_path / "mk-cache"))
    result, text = run_demo(tmp_path)
    assert result.ok, text
    assert any("equal torchvision's" in line for ok, line in result.checks if ok)
    assert result.accuracy_after == result.accuracy_before
