"""A short run of each fuzzing harness, so CI notices when a harness breaks or finds a crash at once.

The long runs are on demand: ``python -m fuzz.header -max_total_time=600 CORPUS`` (and
``fuzz.pickle_reader``).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("atheris")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HARNESSES = ["fuzz.header", "fuzz.pickle_reader"]


@pytest.mark.parametrize("harness", HARNESSES)
def test_harness_runs_clean(harness: str, tmp_path) -> None:
    corpus = tmp_path / "corpus"
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    result = subprocess.run(
        [sys.executable, "-m", harness, "-max_total_time=8", "-rss_limit_mb=4096",
         f"-artifact_prefix={tmp_path}/", str(corpus)],
        cwd=ROOT,
        env={**os.environ, "TMPDIR": str(scratch)},  # the harness's scratch files stay in tmp_path
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Done" in result.stderr
    assert any(corpus.iterdir())
    assert not [name for name in os.listdir(ROOT) if name.startswith("crash-")]
