"""Errors that lead somewhere: each message below was met by a new user, and now says what the
file is, which argument to use, and what to do next."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from click.testing import CliRunner

import modelkeep as mk
from modelkeep import cli, download

NOT_MODELS = {
    "photo.jpg": (b"\xff\xd8\xff\xe0\x00\x10JFIF" + bytes(range(256)) * 4, "a JPEG image"),
    "image.safetensors": (b"\x89PNG\r\n\x1a\n" + bytes(300), "a PNG image"),
    "notes.safetensors": (b"hello world, these are notes\n" * 5, "text"),
    "train.py": (b"import torch\nprint('hi')\n", "text"),
    "page.pth": (b"<!DOCTYPE html><html><body>Not Found</body></html>", "an HTML or XML page"),
    "lfs.bin": (b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 12\n", "a Git LFS pointer"),
}


@pytest.mark.parametrize("name", sorted(NOT_MODELS))
def test_files_that_are_not_models_are_called_what_they_look_like(tmp_path, name) -> None:
    content, looks = NOT_MODELS[name]
    path = tmp_path / name
    path.write_bytes(content)
    for operation in (mk.read, mk.load_state_dict, mk.inspect, mk.verify):
        with pytest.raises(mk.FormatError, match=f"it looks like {looks}") as caught:
            operation(path)
        assert caught.value.path == str(path) and caught.value.fix
    result = CliRunner().invoke(cli.main, ["inspect", str(path)])
    assert result.exit_code != 0 and looks in result.output


def test_text_that_starts_like_a_pickle_names_the_file_and_what_it_looks_like(tmp_path) -> None:
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"Invalid content here\n")  # 'I' is a pickle opcode
    with pytest.raises(mk.FormatError) as caught:
        mk.read(path)
    assert caught.value.path == str(path) and "looks like text" in str(caught.value)
    with pytest.raises(mk.FormatError, match="looks like text"):
        mk.inspect(path)


def test_the_offline_create_error_names_weights_file(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.setenv("MODELKEEP_CACHE", str(tmp_path / "cache"))

    def offline(url, *args, **kwargs):
        raise mk.StorageError("download kept failing after 5 attempts", path=url, fix="check the network")

    monkeypatch.setattr(download, "download", offline)
    with pytest.raises(mk.StorageError) as caught:
        mk.create("torchvision:squeezenet1_1", weights="IMAGENET1K_V1")
    fix = caught.value.fix
    assert "weights_file=" in fix and "path=" not in fix.replace("weights_file=", "")
    assert "squeezenet1_1-b8a52dc0.pth" in fix and "checkpoints" in fix


def _checkpoint(path) -> torch.nn.Module:
    model = torch.nn.Linear(2, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.ones(1, 2)).sum().backward()
    optimizer.step()
    torch.save({"epoch": 3, "model_state_dict": model.state_dict(), "optimizer_state_dict": optimizer.state_dict(),
                "args": argparse.Namespace(lr=0.1)}, path)
    return model


def test_convert_of_a_training_checkpoint_says_what_it_left_out(tmp_path) -> None:
    src, dst = tmp_path / "ckpt.pt", tmp_path / "w.safetensors"
    model = _checkpoint(src)
    report = mk.convert(src, dst)
    assert report.left_out == ["epoch", "optimizer_state_dict", "args"]
    assert torch.equal(mk.load_state_dict(dst)["weight"], model.weight)
    result = CliRunner().invoke(cli.main, ["convert", str(src), str(tmp_path / "w2.safetensors")])
    assert result.exit_code == 0, result.output
    assert "left out (not weights): epoch, optimizer_state_dict, args" in result.output
    assert "import_torch_checkpoint" in result.output


class Unknown:
    pass


def test_cli_convert_takes_trust_and_on_unknown(tmp_path) -> None:
    src = tmp_path / "mixed.pt"
    model = torch.nn.Linear(2, 2)
    torch.save({"state_dict": model.state_dict(), "extra": Unknown()}, src)
    refused = CliRunner().invoke(cli.main, ["convert", str(src), str(tmp_path / "a.safetensors")])
    assert refused.exit_code != 0
    assert "--on-unknown placeholder" in refused.output and "on_unknown=" not in refused.output
    assert f"--trust {__name__}" in refused.output
    rescued = CliRunner().invoke(cli.main, ["convert", str(src), str(tmp_path / "b.safetensors"),
                                            "--on-unknown", "placeholder"])
    assert rescued.exit_code == 0, rescued.output
    assert torch.equal(mk.load_state_dict(tmp_path / "b.safetensors")["weight"], model.weight)
    trusted = CliRunner().invoke(cli.main, ["convert", str(src), str(tmp_path / "c.safetensors"),
                                            "--trust", f"{__name__}.Unknown"])
    assert trusted.exit_code == 0, trusted.output


def test_scan_says_what_to_do_next(tmp_path) -> None:
    needs_trust = tmp_path / "needs.pt"
    torch.save({"x": Unknown()}, needs_trust)
    evil = tmp_path / "evil.pt"
    evil.write_bytes(b"\x80\x02cos\nsystem\nq\x00X\x02\x00\x00\x00idq\x01\x85q\x02Rq\x03.")
    fine = tmp_path / "fine.pt"
    torch.save({"w": torch.ones(1)}, fine)
    by_path = {r.path: r for r in mk.scan([str(needs_trust), str(evil), str(fine)])}
    assert by_path[str(fine)].next_step is None
    step = by_path[str(needs_trust)].next_step
    assert f"trust=('{__name__}',)" in step and "--on-unknown placeholder" in step
    assert "never load it with weights_only=False" in by_path[str(evil)].next_step
    result = CliRunner().invoke(cli.main, ["scan", "--json", str(needs_trust)])
    assert json.loads(result.output)["files"][0]["next_step"] == step
    text = CliRunner().invoke(cli.main, ["scan", str(needs_trust)]).output
    assert "--on-unknown placeholder" in text.replace("\n", " ")
