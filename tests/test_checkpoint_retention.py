"""Retention: each policy, their combinations, and deletion only after a newer commit."""

from __future__ import annotations

import errno
import math
import os
from pathlib import Path

import pytest
import torch

import modelkeep as mk
from modelkeep import atomic, storage
from modelkeep.checkpoint import AllOf, AnyOf, CheckpointInfo, KeepAll, retention

LOSSES = {0: 5.0, 1: 3.0, 2: 4.0, 3: 1.0, 4: 2.0, 5: 6.0, 6: math.nan, 7: 1.5}


def infos(metrics: dict[int, float] | None = None) -> list[CheckpointInfo]:
    metrics = LOSSES if metrics is None else metrics
    return [CheckpointInfo(step, f"step-{step}", {"loss": value}) for step, value in metrics.items()]


@pytest.mark.parametrize(
    "policy, kept",
    [
        (mk.KeepLast(3), {5, 6, 7}),
        (mk.KeepLast(100), set(LOSSES)),
        (mk.KeepBest(2, "loss"), {3, 7}),
        (mk.KeepBest(2, "loss", mode="max"), {5, 0}),
        (mk.KeepBest(1, "missing"), set()),
        (mk.KeepEvery(3), {0, 3, 6}),
        (mk.KeepIf(lambda info: info.metrics["loss"] < 2.5), {3, 4, 7}),
        (KeepAll(), set(LOSSES)),
        (mk.KeepLast(2) | mk.KeepBest(1, "loss"), {3, 6, 7}),
        (mk.KeepEvery(2) & mk.KeepLast(4), {4, 6}),
        (mk.KeepEvery(4) | mk.KeepBest(1, "loss", "max") | mk.KeepLast(1), {0, 4, 5, 7}),
        ((mk.KeepLast(5) & mk.KeepEvery(2)) | mk.KeepBest(1, "loss"), {3, 4, 6}),
    ],
)
def test_policy_selects(policy: retention.Policy, kept: set[int]) -> None:
    assert policy.select(infos()) == kept


def test_combinations_flatten_and_nan_is_never_best() -> None:
    combined = mk.KeepLast(1) | mk.KeepEvery(2) | mk.KeepBest(1, "loss")
    assert isinstance(combined, AnyOf) and len(combined.policies) == 3
    assert isinstance(mk.KeepLast(1) & mk.KeepEvery(2) & mk.KeepAll(), AllOf)
    assert mk.KeepBest(8, "loss").select(infos()) == set(LOSSES) - {6}


def test_ties_prefer_newer_and_newest_always_survives() -> None:
    tied = infos({1: 1.0, 2: 1.0, 3: 9.0})
    assert mk.KeepBest(1, "loss").select(tied) == {2}
    deleted = [i.step for i in retention.to_delete(mk.KeepBest(1, "loss"), tied)]
    assert deleted == [1]  # step 3 is worst but newest: kept until a newer one commits


@pytest.mark.parametrize("bad", [lambda: mk.KeepLast(0), lambda: mk.KeepEvery(-1),
                                 lambda: mk.KeepBest(1, "loss", mode="median"),
                                 lambda: mk.KeepLast(True), lambda: mk.KeepLast(1) | 3])
def test_bad_policies_are_refused(bad) -> None:
    with pytest.raises((ValueError, TypeError)):
        bad()


def test_keep_best_needs_a_metric(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="metric"):
        mk.Checkpointer(tmp_path, keep_best=2)


def save_steps(checkpointer: mk.Checkpointer, losses: dict[int, float]) -> None:
    model = torch.nn.Linear(2, 2)
    for step, loss in losses.items():
        checkpointer.save(step, model=model, metrics={"loss": loss}, rng=False)
    checkpointer.wait()


@pytest.mark.parametrize(
    "options, survivors",
    [
        ({"keep_last": 2}, [6, 7]),
        ({"keep_last": None, "keep_best": 2, "metric": "loss"}, [3, 7]),
        ({"keep_last": 1, "keep_every": 4}, [0, 4, 7]),
        ({"keep_last": 1, "keep_best": 1, "metric": "loss", "mode": "max"}, [5, 7]),
        ({"keep_last": None}, list(range(8))),
        ({"retention": mk.KeepIf(lambda i: i.step % 3 == 1) | mk.KeepLast(1)}, [1, 4, 7]),
    ],
)
def test_checkpointer_applies_retention(tmp_path: Path, options: dict, survivors: list[int]) -> None:
    checkpointer = mk.Checkpointer(tmp_path, **options)
    save_steps(checkpointer, LOSSES)
    assert checkpointer.steps() == survivors
    assert sorted(os.listdir(tmp_path)) == [f"step-{s:010d}.safetensors" for s in survivors]


def test_best_and_info(tmp_path: Path) -> None:
    checkpointer = mk.Checkpointer(tmp_path, keep_last=None, metric="loss")
    save_steps(checkpointer, LOSSES)
    assert checkpointer.best() == 3
    assert checkpointer.best("loss", "max") == 5
    reopened = mk.Checkpointer(tmp_path, keep_last=None, metric="loss")  # metrics from headers
    assert reopened.best() == 3 and reopened.info(7).metrics == {"loss": 1.5}
    assert math.isnan(LOSSES[6]) and reopened.info(6).metrics == {}
    model = torch.nn.Linear(2, 2)
    assert reopened.restore("best", model=model).step == 3


class FailingWrites(storage.LocalStorage):
    def __init__(self, fail_from: int) -> None:
        self.fail_from, self.calls = fail_from, 0

    def write_tensor_file(self, path, tensors, metadata):
        self.calls += 1
        if self.calls > self.fail_from:
            raise OSError(errno.ENOSPC, "No space left on device")
        return super().write_tensor_file(path, tensors, metadata)


def test_nothing_is_deleted_unless_a_newer_step_committed(tmp_path: Path) -> None:
    checkpointer = mk.Checkpointer(tmp_path, storage=FailingWrites(fail_from=2), keep_last=1,
                                   async_save=False)
    model = torch.nn.Linear(2, 2)
    checkpointer.save(0, model=model)
    checkpointer.save(1, model=model)
    assert checkpointer.steps() == [1]
    for step in (2, 3):
        with pytest.raises(mk.StorageError):
            checkpointer.save(step, model=model)
        assert checkpointer.steps() == [1]  # the only good checkpoint survives every failure


def test_retention_waits_for_pending_saves(tmp_path: Path) -> None:
    """With several saves in flight, a step is never deleted before it is superseded."""
    checkpointer = mk.Checkpointer(tmp_path, keep_last=1, max_in_flight=3)
    model = torch.nn.Linear(8, 8)
    for step in range(6):
        checkpointer.save(step, model=model)
    checkpointer.wait()
    assert checkpointer.steps() == [5]
    assert not [n for n in os.listdir(tmp_path) if n.endswith(atomic.TEMP_SUFFIX)]
