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
    result = subprocess.run(
        [sys.executable, "-m", harness, "-max_total_time=8", "-rss_limit_mb=4096", str(corpus)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Done" in result.stderr
    assert any(corpus.iterdir())
