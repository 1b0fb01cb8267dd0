"""``modelkeep scan``: every global a file names, classified without running or importing it."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import textwrap
import zipfile
from collections import OrderedDict

import pytest
import torch
from click.testing import CliRunner

import modelkeep as mk
from modelkeep import cli
from modelkeep import scanning as scan

import adversarial

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _Evil:
    """Pickles as a call of os.system: the classic gadget."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _benign_files(folder) -> dict[str, str]:
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    net(torch.randn(2, 3)).sum().backward()
    optimizer.step()
    paths = {
        "state_dict.pt": net.state_dict(),
        "checkpoint.pth": {"epoch": 3, "model": net.state_dict(), "optimizer": optimizer.state_dict()},
        "whole_module.pt": net,
    }
    written = {}
    for name, value in paths.items():
        path = os.path.join(folder, name)
        torch.save(value, path)
        written[name] = path
    legacy = os.path.join(folder, "stream.pt")
    torch.save(OrderedDict(w=torch.ones(2)), legacy, _use_new_zipfile_serialization=False)
    written["stream.pt"] = legacy
    modern = os.path.join(folder, "weights.safetensors")
    mk.save_weights(net, modern)
    written["weights.safetensors"] = modern
    return written


def test_benign_files_are_safe(tmp_path) -> None:
    for name, path in _benign_files(tmp_path).items():
        (result,) = scan.scan(path)
        assert result.verdict == "safe", (name, result.to_json())
        assert result.error is None
    results = scan.scan(str(tmp_path))
    assert {os.path.basename(r.path) for r in results} == set(_benign_files(tmp_path))
    assert scan.exit_code(results) == 0


def test_os_system_gadget_is_dangerous_and_never_runs(tmp_path) -> None:
    marker = tmp_path / "MARKER"
    path = tmp_path / "evil.pt"
    torch.save({"model": OrderedDict(w=torch.ones(2)), "x": _Evil(str(marker))}, path)
    (result,) = scan.scan(path)
    assert result.verdict == "dangerous"
    names = {g.name for g in result.findings}
    assert names == {"posix.system"} or names == {"os.system"}
    assert all(g.position > 0 for g in result.findings)
    assert not marker.exists()


def test_unknown_classes_need_trust_and_are_not_imported(tmp_path) -> None:
    package = tmp_path / "pkg"
    package.mkdir()
    marker = tmp_path / "IMPORTED"
    (package / "recorder.py").write_text(
        f"open({str(marker)!r}, 'w').close()\n\nclass Thing:\n    pass\n"
    )
    script = textwrap.dedent(
        f"""
        import sys, torch
        sys.path.insert(0, {str(package)!r})
        import recorder
        torch.save({{"thing": recorder.Thing(), "w": torch.ones(1)}}, {str(tmp_path / "custom.pt")!r})
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True)
    marker.unlink()
    checker = textwrap.dedent(
        f"""
        import json, sys
        sys.path.insert(0, {str(package)!r})
        from modelkeep import scanning as scan
        (result,) = scan.scan({str(tmp_path / "custom.pt")!r})
        print(json.dumps(result.to_json()))
        print("recorder" in sys.modules)
        """
    )
    output = subprocess.run([sys.executable, "-c", checker], capture_output=True, text=True, check=True, cwd=ROOT)
    document, imported = output.stdout.strip().splitlines()
    result = json.loads(document)
    assert result["verdict"] == "needs-trust"
    assert [g["name"] for g in result["globals"] if g["verdict"] == "needs-trust"] == ["recorder.Thing"]
    assert imported == "False" and not marker.exists()


def test_stack_global_and_nested_pickles_are_seen(tmp_path) -> None:
    # STACK_GLOBAL naming builtins.eval through memoised strings, inside a plain pickle.
    body = (
        b"\x80\x04\x8c\x08builtins\x94\x8c\x04eval\x94\x93\x94\x8c\x041+1\x94\x85\x94R\x94."
    )
    path = tmp_path / "stack_global.pkl"
    path.write_bytes(body)
    (result,) = scan.scan(path)
    assert result.verdict == "dangerous"
    assert [g.name for g in result.findings] == ["builtins.eval"]


def test_zip_bundles_are_scanned_member_by_member(tmp_path) -> None:
    (tmp_path / "benign").mkdir()
    files = _benign_files(tmp_path / "benign")
    evil = tmp_path / "evil.pt"
    torch.save({"x": _Evil(str(tmp_path / "MARKER"))}, evil)
    bundle = tmp_path / "bundle.zip"
    with zipfile.ZipFile(bundle, "w") as archive:
        archive.write(files["state_dict.pt"], "models/good.pt")
        archive.write(evil, "models/evil.pt")
        archive.writestr("README.md", "not a model")
    results = {r.path: r.verdict for r in scan.scan(bundle)}
    assert results[f"{bundle}!models/good.pt"] == "safe"
    assert results[f"{bundle}!models/evil.pt"] == "dangerous"


def test_cli_exit_codes_and_json(tmp_path) -> None:
    clean = tmp_path / "clean"
    clean.mkdir()
    _benign_files(clean)
    (clean / "config.json").write_text('{"hidden_size": 8}')
    runner = CliRunner()
    ok = runner.invoke(cli.main, ["scan", str(clean)])
    assert ok.exit_code == 0, ok.output
    assert "5 safe" in ok.output
    torch.save({"x": _Evil(str(tmp_path / "MARKER"))}, clean / "evil.pt")
    found = runner.invoke(cli.main, ["scan", str(clean), "--json"])
    assert found.exit_code == 1
    document = json.loads(found.output)
    verdicts = {os.path.basename(f["path"]): f["verdict"] for f in document["files"]}
    assert verdicts["evil.pt"] == "dangerous" and verdicts["state_dict.pt"] == "safe"
    assert "config.json" not in verdicts
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"PK\x03\x04 truncated")
    assert runner.invoke(cli.main, ["scan", str(broken)]).exit_code == 2
    assert not (tmp_path / "MARKER").exists()


SCANNER = textwrap.dedent(
    """
    import json, os, resource, sys
    from modelkeep import scanning as scan
    folder = sys.argv[1]
    with open("/proc/self/status") as status:
        size = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize"))
    resource.setrlimit(resource.RLIMIT_AS, (size + (1536 << 20), size + (1536 << 20)))
    for case in json.load(open(os.path.join(folder, "corpus.json"))):
        results = scan.scan(os.path.join(folder, case["name"]))
        verdicts = sorted({r.verdict for r in results})
        print(json.dumps({"name": case["name"], "verdicts": verdicts}), flush=True)
    """
)


def test_adversarial_corpus_every_gadget_is_flagged(tmp_path) -> None:
    marker = tmp_path / "MARKER"
    cases = {c.name: c for c in adversarial.write_corpus(str(tmp_path), marker=str(marker))}
    output = subprocess.run(
        [sys.executable, "-c", SCANNER, str(tmp_path)], capture_output=True, text=True, timeout=300, cwd=ROOT
    )
    assert output.returncode == 0, output.stderr[-3000:]
    seen = [json.loads(line) for line in output.stdout.splitlines()]
    assert len(seen) == len(cases)
    for outcome in seen:
        case = cases[outcome["name"]]
        if case.dangerous and case.expect == "unsafe":
            assert "dangerous" in outcome["verdicts"], outcome
        elif case.dangerous:  # malformed containers: refused as a whole, failing a CI gate too
            assert outcome["verdicts"] != ["safe"], outcome
        elif case.expect == "unsafe":  # unknown, not known-dangerous globals
            assert outcome["verdicts"] != ["safe"], outcome
    assert not marker.exists()


def test_shard_index_naming_files_outside_its_folder_is_unreadable(tmp_path) -> None:
    folder = tmp_path / "sharded"
    folder.mkdir()
    mk.save_weights({"w": torch.ones(2)}, folder / "model-00001-of-00001.safetensors")
    index = {"metadata": {"total_size": 8}, "weight_map": {"w": "../../outside.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    results = {os.path.basename(r.path): r for r in scan.scan(folder)}
    assert results["model.safetensors.index.json"].verdict == "unreadable"
    assert results["model-00001-of-00001.safetensors"].verdict == "safe"
    assert scan.exit_code(list(results.values())) == 2
