"""Shared test settings: slow tests run only on demand, and torch stays on few threads so the
suite fits a 2-core machine."""

from __future__ import annotations

import os

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get("MODELKEEP_SLOW") == "1":
        return
    skip_slow = pytest.mark.skip(reason="slow: set MODELKEEP_SLOW=1 to run")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip_slow)
