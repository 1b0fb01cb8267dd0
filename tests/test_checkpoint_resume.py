"""Resume exactness: restoring the latest checkpoint and continuing gives bit-identical
parameters, optimizer state, scheduler state and losses to a run that never stopped."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch

import modelkeep as mk
from helpers import assert_same

STEPS, STOP = 16, 9


def make_model() -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Linear(12, 32), torch.nn.GELU(), torch.nn.Dropout(0.2), torch.nn.Linear(32, 4)
    )


def sgd_setup() -> tuple[torch.nn.Module, Any, Any, Any]:
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True,
                                weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=4, gamma=0.5)
    return model, optimizer, scheduler, None


def adamw_setup() -> tuple[torch.nn.Module, Any, Any, Any]:
    model = make_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.05)
    warmup = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.1, total_iters=4)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=STEPS)
    scheduler = torch.optim.lr_scheduler.SequentialLR(optimizer, [warmup, cosine], milestones=[4])
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=3)
    return model, optimizer, scheduler, scaler


def train_step(model, optimizer, scheduler, scaler) -> float:
    """A step that draws on torch, numpy and Python RNGs (data, dropout, augmentation)."""
    model.train()
    x = torch.randn(16, 12) * float(np.random.uniform(0.5, 1.5))
    y = torch.randint(0, 4, (16,))
    if random.random() < 0.5:
        x = x.flip(0)
    loss = torch.nn.functional.cross_entropy(model(x), y)
    optimizer.zero_grad()
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()
    scheduler.step()
    return loss.item()


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def snapshot(model, optimizer, scheduler, scaler) -> dict[str, Any]:
    return {
        "model": {k: v.clone() for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
    }


Setup = Callable[[], tuple[torch.nn.Module, Any, Any, Any]]


@pytest.mark.parametrize("setup", [sgd_setup, adamw_setup], ids=["sgd-momentum", "adamw-sched-scaler"])
@pytest.mark.parametrize("async_save", [True, False], ids=["async", "sync"])
def test_resume_is_bit_identical(tmp_path: Path, setup: Setup, async_save: bool) -> None:
    torch.manual_seed(100)
    objects = setup()
    seed_everything(7)
    uninterrupted = [train_step(*objects) for _ in range(STEPS)]
    expected = snapshot(*objects)

    torch.manual_seed(100)
    first = setup()
    seed_everything(7)
    checkpointer = mk.Checkpointer(tmp_path, keep_last=2, async_save=async_save)
    losses = []
    model, optimizer, scheduler, scaler = first
    for step in range(STOP):
        losses.append(train_step(*first))
        checkpointer.save(step, model=model, optimizer=optimizer, scheduler=scheduler,
                          scaler=scaler, extra={"losses": list(losses)})
    for _ in range(3):  # work after the last save is lost, as in a crash
        train_step(*first)
    checkpointer.close()

    torch.manual_seed(999)  # a different initialisation and RNG position: restore must fix all
    second = setup()
    seed_everything(12345)
    resumed = mk.Checkpointer(tmp_path, keep_last=2)
    model, optimizer, scheduler, scaler = second
    restored = resumed.restore(model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler)
    assert restored.step == STOP - 1 and resumed.steps() == [STOP - 2, STOP - 1]
    losses = list(restored.extra["losses"])
    for _ in range(restored.step + 1, STEPS):
        losses.append(train_step(*second))

    assert losses == uninterrupted  # exact float equality, every step
    assert_same(snapshot(*second), expected)


def test_rng_states_round_trip(tmp_path: Path) -> None:
    seed_everything(3)
    checkpointer = mk.Checkpointer(tmp_path, async_save=False)
    checkpointer.save(0, model=None)
    draws = (torch.rand(5), np.random.standard_normal(3), [random.random() for _ in range(3)],
             random.gauss(0, 1), np.random.standard_normal())
    seed_everything(99)
    checkpointer.restore(model=None)
    again = (torch.rand(5), np.random.standard_normal(3), [random.random() for _ in range(3)],
             random.gauss(0, 1), np.random.standard_normal())
    assert torch.equal(draws[0], again[0]) and np.array_equal(draws[1], again[1])
    assert draws[2:] == again[2:]


def test_restore_rng_false_leaves_rngs_alone(tmp_path: Path) -> None:
    checkpointer = mk.Checkpointer(tmp_path, async_save=False)
    seed_everything(1)
    checkpointer.save(0, model=None)
    seed_everything(2)
    before = torch.get_rng_state()
    checkpointer.restore(model=None, restore_rng=False)
    assert torch.equal(torch.get_rng_state(), before)
