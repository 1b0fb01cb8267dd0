"""How long a training loop stalls per checkpoint: modelkeep async, modelkeep sync, torch.save.

    python -m bench.checkpoint_bench [--rounds 7] [--layers 18] [--width 2048] [--out PATH]

A real training loop (an MLP of a few hundred MB trained with AdamW) saves model + optimizer
state every few steps. Each round measures, in a rotating order:

* **async stall**: time inside ``Checkpointer.save`` with ``async_save=True`` (snapshot, then the
  write runs in the background while training continues);
* **sync save**: time inside ``Checkpointer.save`` with ``async_save=False`` (written, fsynced,
  renamed: durable when it returns);
* **torch.save**: time of ``torch.save`` of the equivalent dict (model and optimizer state dicts,
  step, RNG state) to a fresh path; no fsync, as users call it. A fsync afterwards is timed
  separately for reference.

Between measurements the page cache is flushed (``os.sync``, not timed) so one variant's
write-back does not land in the next one's time. The machine may be shared and noisy: the
report gives every round, per-round ratios, and medians. Results go to
``bench/CHECKPOINT_RESULTS.md``.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

import modelkeep as mk

RESULTS = Path(__file__).with_name("CHECKPOINT_RESULTS.md")


def build(layers: int, width: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    blocks: list[torch.nn.Module] = []
    for _ in range(layers):
        blocks += [torch.nn.Linear(width, width), torch.nn.GELU()]
    model = torch.nn.Sequential(*blocks)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-4)


def train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, steps: int, width: int) -> float:
    started = time.perf_counter()
    for _ in range(steps):
        x = torch.randn(32, width)
        loss = model(x).pow(2).mean()
        optimizer.zero_grad(set_to_none=False)
        loss.backward()
        optimizer.step()
    return time.perf_counter() - started


def settle() -> None:
    """Flush dirty pages so the next measurement starts with a quiet disk (not timed)."""
    os.sync()
    time.sleep(0.5)


def state_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    total = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    for state in optimizer.state.values():
        total += sum(t.numel() * t.element_size() for t in state.values() if isinstance(t, torch.Tensor))
    return total


def fsync_path(path: str) -> float:
    started = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return time.perf_counter() - started


def run(rounds: int, layers: int, width: int, steps_between: int, out: Path) -> None:
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    model, optimizer = build(layers, width)
    train(model, optimizer, 1, width)  # optimizer state exists from here on
    workdir = Path(tempfile.mkdtemp(prefix="mk-ckpt-bench-", dir=os.environ.get("MK_BENCH_DIR")))
    asynchronous = mk.Checkpointer(workdir / "async", keep_last=2, async_save=True)
    synchronous = mk.Checkpointer(workdir / "sync", keep_last=2, async_save=False)
    torch_dir = workdir / "torch"
    torch_dir.mkdir()
    size = state_bytes(model, optimizer)
    step_time = train(model, optimizer, 2, width) / 2
    step = 0

    def async_save() -> dict[str, float]:
        nonlocal step
        step += 1
        started = time.perf_counter()
        asynchronous.save(step, model=model, optimizer=optimizer)
        stall = time.perf_counter() - started
        trained = train(model, optimizer, steps_between, width)  # the write overlaps this
        pending = asynchronous._writer.in_flight  # noqa: SLF001  (bench-only look inside)
        started = time.perf_counter()
        asynchronous.wait()
        return {"stall": stall, "pending_after_training": pending, "extra_wait": time.perf_counter() - started,
                "training": trained}

    def sync_save() -> dict[str, float]:
        nonlocal step
        step += 1
        started = time.perf_counter()
        synchronous.save(step, model=model, optimizer=optimizer)
        stall = time.perf_counter() - started
        synchronous.wait()  # old checkpoints are removed in the background: not part of the save
        return {"stall": stall}

    def torch_save() -> dict[str, float]:
        nonlocal step
        step += 1
        path = str(torch_dir / f"step-{step}.pt")
        payload = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                   "rng": torch.get_rng_state()}
        started = time.perf_counter()
        torch.save(payload, path)
        stall = time.perf_counter() - started
        fsync = fsync_path(path)
        for old in sorted(torch_dir.iterdir(), key=lambda p: p.stat().st_mtime)[:-2]:
            old.unlink()
        return {"stall": stall, "fsync_after": fsync}

    variants = {"async": async_save, "sync": sync_save, "torch": torch_save}
    order = list(variants)
    # Warm-up: the first async save allocates its reusable snapshot buffer; report it apart.
    train(model, optimizer, 1, width)
    settle()
    first_async = async_save()["stall"]
    settle()
    records: list[dict[str, dict[str, float]]] = []
    for index in range(rounds):
        record = {}
        for name in order[index % 3:] + order[: index % 3]:
            train(model, optimizer, steps_between, width)
            settle()
            record[name] = variants[name]()
            settle()
        records.append(record)
        print(f"round {index + 1}/{rounds}: " + ", ".join(
            f"{k} {v['stall']:.3f}s" for k, v in record.items()), flush=True)
    asynchronous.close()
    synchronous.close()
    checkpoint_size = os.path.getsize(synchronous.path(synchronous.latest()))
    shutil.rmtree(workdir, ignore_errors=True)
    out.write_text(report(records, size, checkpoint_size, step_time, steps_between, first_async,
                          layers, width))
    print(f"wrote {out}")


def report(records: list[dict[str, dict[str, float]]], size: int, file_size: int, step_time: float,
           steps_between: int, first_async: float, layers: int, width: int) -> str:
    a = [r["async"]["stall"] for r in records]
    s = [r["sync"]["stall"] for r in records]
    t = [r["torch"]["stall"] for r in records]
    f = [r["torch"]["fsync_after"] for r in records]
    async_ratio = [x / y for x, y in zip(a, s)]
    speedup = [y / x for x, y in zip(s, t)]
    speedup_fsync = [(y + z) / x for x, y, z in zip(s, t, f)]
    med = statistics.median
    lines = [
        "# Checkpoint save stalls",
        "",
        "Produced by `python -m bench.checkpoint_bench`. A training loop (MLP of "
        f"{layers} x Linear({width}, {width}), AdamW) saves model + optimizer state: "
        f"{size / 1e6:.0f} MB of tensors (the model itself {size / 3e6:.0f} MB), "
        f"checkpoint file {file_size / 1e6:.0f} MB. One training step takes {step_time:.2f} s; "
        f"{steps_between} steps run between saves, and the async write overlaps them.",
        "",
        f"Machine: {os.cpu_count()} CPUs, load average at the end {os.getloadavg()[0]:.2f} "
        f"(shared with other jobs), Python {platform.python_version()}, torch {torch.__version__}, "
        f"modelkeep {mk.__version__}.",
        "",
        "* **async stall**: time inside `Checkpointer.save(async_save=True)` (snapshot into a reused "
        "buffer; the write, fsync and rename run in the background).",
        "* **sync save**: time inside `Checkpointer.save(async_save=False)`: written, hashed, fsynced "
        "and renamed (durable) when it returns.",
        "* **torch.save**: `torch.save({'model': ..., 'optimizer': ..., 'step': ..., 'rng': ...})` "
        "to a new path, not fsynced (as usually called); `+fsync` adds the fsync that would make it "
        "durable.",
        "",
        "| round | async stall (s) | sync save (s) | torch.save (s) | torch.save +fsync (s) "
        "| async / sync | torch.save / sync | (torch.save+fsync) / sync | async write pending after "
        f"{steps_between} steps |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for i, r in enumerate(records):
        lines.append(
            f"| {i + 1} | {a[i]:.3f} | {s[i]:.3f} | {t[i]:.3f} | {t[i] + f[i]:.3f} | "
            f"{async_ratio[i]:.1%} | {speedup[i]:.2f}x | {speedup_fsync[i]:.2f}x | "
            f"{'yes' if r['async']['pending_after_training'] else 'no'} |")
    lines += [
        f"| **median** | **{med(a):.3f}** | **{med(s):.3f}** | **{med(t):.3f}** | "
        f"**{med([x + y for x, y in zip(t, f)]):.3f}** | **{med(async_ratio):.1%}** | "
        f"**{med(speedup):.2f}x** | **{med(speedup_fsync):.2f}x** | |",
        "",
        f"First async save (allocates the snapshot buffer, then reused): {first_async:.3f} s.",
        "",
        "Targets: async stall <= 25% of the sync save: "
        f"**{'met' if med(async_ratio) <= 0.25 else 'NOT met'}** (median {med(async_ratio):.1%}, "
        f"{sum(x <= 0.25 for x in async_ratio)}/{len(records)} rounds); sync save >= 2x faster than "
        f"torch.save: **{'met' if med(speedup) >= 2 else 'NOT met'}** (median {med(speedup):.2f}x, "
        f"{sum(x >= 2 for x in speedup)}/{len(records)} rounds; against a durable torch.save "
        f"median {med(speedup_fsync):.2f}x).",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--layers", type=int, default=18)
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--steps-between", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    run(args.rounds, args.layers, args.width, args.steps_between, args.out)


if __name__ == "__main__":
    main()
