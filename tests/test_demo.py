"""``modelkeep demo``: the tutorial end to end. The quick run keeps every modelkeep step and the
whole digits part (fresh processes included); the full run adds the torch side of vgg16."""

from __future__ import annotations

import io
import os
import pathlib

import pytest
from click.testing import CliRunner
from rich.console import Console

from modelkeep import cli, demo


def run_demo(tmp_path, **kwargs) -> tuple[demo.Result, str]:
    buffer = io.StringIO()
    console = Console(file=buffer, width=160, force_terminal=False, color_system=None)
    result = demo.run(workdir=str(tmp_path / "demo"), console=console, **kwargs)
    return result, buffer.getvalue()


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory) -> tuple[demo.Result, str, pathlib.Path]:
    """One quick run of the whole demo, shared by the tests that read its output."""
    tmp_path = tmp_path_factory.mktemp("quick-demo")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))  # no local vgg16 weights here
        patch.setenv("MODELKEEP_CACHE", str(tmp_path / "mk-cache"))
        result, text = run_demo(tmp_path, quick=True)
    return result, text, tmp_path


def test_quick_demo_keeps_predictions_and_accuracy_identical(quick_demo) -> None:
    result, text, tmp_path = quick_demo
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
    assert {"vgg16.model.safetensors", "digits.model.safetensors", "digits_test.npy",
            "efficientnet-lite0.model.safetensors"} <= set(os.listdir(folder))
    assert "model.pth" not in os.listdir(folder)  # --quick skips the torch side of vgg16


def test_quick_demo_ends_on_a_real_pretrained_model(quick_demo) -> None:
    result, text, _ = quick_demo
    china, flower = result.pretrained_top
    assert china[0][0] == "palace" and flower[0][0] == "daisy"
    assert len(china) == 5 and 0.2 < china[0][1] < 1 and 0.2 < flower[0][1] < 1  # real probabilities
    passed = [line for ok, line in result.checks if ok]
    for check in ("scan verdict of the .pth: safe", "equal torch.load(weights_only=True)'s",
                  "without efficientnet_lite_pytorch (imported there: none)", "equal the original model's",
                  "modelkeep predict gives the same top-5"):
        assert any(check in line for line in passed), check
    # the last table a newcomer sees holds real labels, not vgg16's random ones
    titles = [line.strip() for line in text.splitlines() if "predictions on photos" in line]
    assert titles[0].startswith("vgg16's") and titles[-1].startswith("EfficientNet-Lite0's")
    last_table = text[text.rindex("predictions on photos"):]
    assert "palace" in last_table and "daisy" in last_table


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
