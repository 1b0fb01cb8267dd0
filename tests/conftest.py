"""Shared test settings and fixtures: slow tests run only on demand, torch stays on few threads
so the suite fits a 2-core machine, and ``place`` runs a test once per storage backend."""

from __future__ import annotations

import os
from typing import Iterator

import pytest
import torch

from places import BACKENDS, Place, make_place

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get("MODELKEEP_SLOW") == "1":
        return
    skip_slow = pytest.mark.skip(reason="slow: set MODELKEEP_SLOW=1 to run")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip_slow)


@pytest.fixture(params=BACKENDS)
def place(request: pytest.FixtureRequest, tmp_path) -> Iterator[Place]:  # noqa: ANN001
    """A fresh folder on each storage backend in turn (see ``places``)."""
    yield from make_place(request.param, tmp_path)
