"""A small deterministic training run for the checkpoint crash and resume tests.

``python checkpoint_child.py zygote`` imports torch once and then, for every JSON line on stdin,
forks a fresh child that resumes the run in a directory, trains and saves a checkpoint per step,
until the parent kills it with SIGKILL (or it finishes). The zygote reports on stdout::

    {"pid": N}                      a child was started
    ready N START                   (from the child) restored and about to train from step START
    done N                          (from the child) finished without being killed
    {"exit": N, "status": S}        the child is gone

Forking from a process that has imported torch but run nothing keeps each trial to a fraction of
a second, so the crash test can afford many of them.
"""

from __future__ import annotations

import json
import os
import random
import sys
import traceback

import numpy as np
import torch

import modelkeep as mk

IN_FEATURES, HIDDEN, CLASSES, BATCH = 64, 384, 8, 32
KEEP_LAST = 3


def build() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The model and optimizer with fixed initial values (restore overwrites them anyway)."""
    torch.manual_seed(1234)
    model = torch.nn.Sequential(
        torch.nn.Linear(IN_FEATURES, HIDDEN), torch.nn.Tanh(), torch.nn.Dropout(0.1),
        torch.nn.Linear(HIDDEN, HIDDEN), torch.nn.Tanh(), torch.nn.Linear(HIDDEN, CLASSES),
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    return model, optimizer


def seed_run() -> None:
    """The RNG state at step 0 of every run (restore replaces it on resume)."""
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> float:
    """One step whose data depends on all three global RNGs, so all three must be restored."""
    model.train()
    x = torch.randn(BATCH, IN_FEATURES) + torch.from_numpy(
        np.random.standard_normal((BATCH, IN_FEATURES)).astype(np.float32)) * 0.1
    y = torch.randint(0, CLASSES, (BATCH,))
    scale = 1.0 + random.random() * 0.1
    loss = torch.nn.functional.cross_entropy(model(x) * scale, y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.item()


def fingerprint(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[bytes]:
    """Exact bytes of every parameter and momentum buffer."""
    out = [p.detach().numpy().tobytes() for p in model.parameters()]
    for p in model.parameters():
        buffer = optimizer.state.get(p, {}).get("momentum_buffer")
        out.append(b"" if buffer is None else buffer.numpy().tobytes())
    return out


def say(line: str) -> None:
    """One line in one write(2): a SIGKILL can never leave half of it in the shared pipe."""
    os.write(1, (line + "\n").encode())


def run(directory: str, steps: int) -> None:
    """Resume from the latest checkpoint (or start) and train ``steps`` more steps."""
    torch.set_num_threads(1)
    checkpointer = mk.Checkpointer(directory, keep_last=KEEP_LAST)
    model, optimizer = build()
    start = 0
    if checkpointer.latest() is None:
        seed_run()
    else:
        start = checkpointer.restore(model=model, optimizer=optimizer).step + 1
    say(f"ready {os.getpid()} {start}")
    for step in range(start, start + steps):
        loss = train_step(model, optimizer)
        checkpointer.save(step, model=model, optimizer=optimizer, extra={"loss": loss})
    checkpointer.wait()
    say(f"done {os.getpid()}")


def zygote() -> None:
    import torch._dynamo  # noqa: F401  (creating an optimizer imports it: once here, not per child)

    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                run(request["directory"], request["steps"])
            except BaseException:
                traceback.print_exc()
                code = 1
            finally:
                os._exit(code)
        say(json.dumps({"pid": pid}))
        _, status = os.waitpid(pid, 0)
        say(json.dumps({"exit": pid, "status": status}))


if __name__ == "__main__":
    zygote()
