"""``patch_torch_load()`` and ``python -m modelkeep.run``: a ``torch.load(weights_only=False)`` inside
code you do not own reads the file with modelkeep, so a malicious file is refused with nothing run
and a benign one loads as torch would load it."""

from __future__ import annotations

import io
import os
import pickle
import subprocess
import sys
import textwrap
import threading

import pytest
import torch

import modelkeep as mk
from modelkeep import patching
from test_legacy_support import same


def evil_bytes(marker: str) -> bytes:
    """A pickle whose loading creates ``marker`` (os.system), as a hostile checkpoint would."""

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    return pickle.dumps({"state_dict": Evil()}, protocol=2)


@pytest.fixture
def third_party(tmp_path, monkeypatch):
    """A library that calls torch.load(..., weights_only=False) itself, as many do."""
    (tmp_path / "somelib.py").write_text(textwrap.dedent("""
        import torch

        def load_checkpoint(path):
            return torch.load(path, map_location="cpu", weights_only=False)
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib

    return importlib.import_module("somelib")


def test_a_malicious_file_is_refused_and_a_benign_one_loads(tmp_path, third_party) -> None:
    marker = tmp_path / "RAN"
    evil = tmp_path / "evil.pth"
    evil.write_bytes(evil_bytes(str(marker)))
    good = tmp_path / "good.pth"
    model = torch.nn.Linear(3, 2)
    torch.save({"state_dict": model.state_dict(), "epoch": 3}, good)
    original = torch.load
    with mk.patch_torch_load():
        assert torch.load is not original
        with pytest.raises(pickle.UnpicklingError, match="posix.system|os.system") as caught:
            third_party.load_checkpoint(evil)
        assert isinstance(caught.value, mk.UnsafeContentError) and not marker.exists()
        assert "no trust= makes it safe" in caught.value.fix and "trust=('posix'" not in caught.value.fix
        loaded = third_party.load_checkpoint(good)
    assert torch.load is original
    same(loaded, torch.load(good, weights_only=True))
    with pytest.raises(FileNotFoundError), mk.patch_torch_load():
        third_party.load_checkpoint(tmp_path / "missing.pth")


class Point:
    def __init__(self, x: int) -> None:
        self.x = x


def test_trust_safe_globals_and_nesting(tmp_path) -> None:
    path = tmp_path / "point.pt"
    torch.save({"p": Point(4), "w": torch.ones(2)}, path)
    patch = mk.patch_torch_load()
    try:
        with pytest.raises(pickle.UnpicklingError, match=f"trust=\\('{__name__}',\\)"):
            torch.load(path, weights_only=False)  # the message names the trust= that allows it
        with mk.patch_torch_load(trust=(f"{__name__}.Point",)):  # nested: trust adds up
            assert torch.load(path, weights_only=False)["p"].x == 4
        with pytest.raises(pickle.UnpicklingError):
            torch.load(path)  # the inner patch's trust is gone with it
        with torch.serialization.safe_globals([Point]):
            assert torch.load(path)["p"].x == 4  # torch's own allowlist counts
    finally:
        patch.undo()
    patch.undo()  # twice is harmless


def test_torch_load_arguments_pass_through(tmp_path) -> None:
    stream = io.BytesIO()
    torch.save({"w": torch.arange(4.0)}, stream)
    with mk.patch_torch_load():
        stream.seek(0)
        out = torch.load(stream, map_location="meta", weights_only=True, mmap=False, encoding="latin1")
    assert out["w"].device.type == "meta" and out["w"].shape == (4,)


def test_patches_from_many_threads_leave_torch_load_as_it_was() -> None:
    original = torch.load
    errors = []

    def work() -> None:
        try:
            for _ in range(50):
                with mk.patch_torch_load():
                    assert torch.load is patching.safe_load
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and torch.load is original and not patching._active


def test_modelkeep_run_patches_a_whole_program(tmp_path) -> None:
    marker = tmp_path / "RAN"
    evil = tmp_path / "evil.pth"
    evil.write_bytes(evil_bytes(str(marker)))
    good = tmp_path / "good.pth"
    torch.save({"w": torch.ones(3)}, good)
    script = tmp_path / "program.py"
    script.write_text("import sys, torch\nprint(torch.load(sys.argv[1], weights_only=False)['w'].sum().item())\n")
    ran = subprocess.run([sys.executable, "-m", "modelkeep.run", str(script), str(good)],
                         capture_output=True, text=True, timeout=120)
    assert ran.returncode == 0 and ran.stdout.strip() == "3.0", ran.stderr[-2000:]
    refused = subprocess.run([sys.executable, "-m", "modelkeep.run", str(script), str(evil)],
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0 and "UnsafeContentError" in refused.stderr and not marker.exists()
    (tmp_path / "prog_module.py").write_text(script.read_text())
    as_module = subprocess.run([sys.executable, "-m", "modelkeep.run", "-m", "prog_module", str(good)],
                               capture_output=True, text=True, timeout=120, cwd=tmp_path,
                               env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert as_module.returncode == 0 and as_module.stdout.strip() == "3.0", as_module.stderr[-2000:]


def test_on_a_real_library_lpips(tmp_path, monkeypatch) -> None:
    """lpips.LPIPS loads its shipped linear-layer weights with its own torch.load (no weights_only)."""
    lpips = pytest.importorskip("lpips")
    read_by_modelkeep = []
    original_read = patching.reading.read
    monkeypatch.setattr(patching.reading, "read", lambda f, *a, **k: read_by_modelkeep.append(f) or original_read(f, *a, **k))

    def build(**kwargs):
        torch.manual_seed(0)  # pnet_rand: a random backbone, so that nothing is downloaded
        return lpips.LPIPS(net="alex", pnet_rand=True, verbose=False, **kwargs)

    plain = build()
    with mk.patch_torch_load():
        patched = build()
    same(patched.state_dict(), plain.state_dict())
    assert any(name.startswith("lin") for name in patched.state_dict())
    assert [os.path.basename(f) for f in read_by_modelkeep] == ["alex.pth"]  # lpips's own weights file
    marker = tmp_path / "RAN"
    evil = tmp_path / "alex.pth"
    evil.write_bytes(evil_bytes(str(marker)))
    with mk.patch_torch_load(), pytest.raises(pickle.UnpicklingError):
        build(model_path=str(evil))
    assert not marker.exists()
