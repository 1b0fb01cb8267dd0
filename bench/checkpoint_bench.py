"""How long a training loop stalls per checkpoint: modelkeep async, modelkeep sync, torch.save.

    python -m bench.checkpoint_bench [--rounds 7] [--locations /tmp,/dev/shm] [--out PATH]

A real training loop (an MLP of a few hundred MB trained with AdamW) saves model + optimizer
state every few steps. Each round measures, in a rotating order:

* **async stall**: time inside ``Checkpointer.save`` with ``async_save=True`` (snapshot, then the
  write runs in the background while training continues);
* **sync save**: time inside ``Checkpointer.save`` with ``async_save=False`` (written, fsynced,
  renamed: durable when it returns);
* **torch.save**: time of ``torch.save`` of the equivalent dict (model and optimizer state dicts,
  step, RNG state) to a fresh path; no fsync, as users call it. A fsync afterwards is timed
  separately for reference.

Each location is measured on its own: by default the temp folder's disk (where a durable save
waits for the disk) and ``/dev/shm``, a memory file system (where it does not, which shows the
cost of the software alone).

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
from modelkeep.io import buffers

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
        x = torch.randn(8, width)
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


def run(location: str, rounds: int, layers: int, width: int, steps_between: int) -> str:
    """Measure every variant in a fresh folder under ``location``; return the report section."""
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    model, optimizer = build(layers, width)
    train(model, optimizer, 1, width)  # optimizer state exists from here on
    workdir = Path(tempfile.mkdtemp(prefix="mk-ckpt-bench-", dir=location))
    asynchronous = mk.Checkpointer(workdir / "async", keep_last=1, async_save=True)
    copying = mk.Checkpointer(workdir / "async-copy", keep_last=1, async_save=True, snapshot="copy")
    synchronous = mk.Checkpointer(workdir / "sync", keep_last=1, async_save=False)
    torch_dir = workdir / "torch"
    torch_dir.mkdir()
    size = state_bytes(model, optimizer)
    step_time = train(model, optimizer, 2, width) / 2
    step = 0

    def checkpointer_save(checkpointer: mk.Checkpointer) -> dict[str, float]:
        nonlocal step
        step += 1
        blocked = checkpointer.blocked_seconds
        started = time.perf_counter()
        checkpointer.save(step, model=model, optimizer=optimizer)
        call = time.perf_counter() - started
        trained = train(model, optimizer, steps_between, width)  # an async write overlaps this
        held = checkpointer.blocked_seconds - blocked  # optimizer.step() waiting for the snapshot
        pending = checkpointer._writer.in_flight  # noqa: SLF001  (bench-only look inside)
        checkpointer.wait()  # not timed: in a real loop the next save is far away
        return {"stall": call + held, "call": call, "held": held, "pending": pending,
                "training": trained}

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
        trained = train(model, optimizer, steps_between, width)
        for old in sorted(torch_dir.iterdir(), key=lambda p: p.stat().st_mtime)[:-1]:
            old.unlink()
        return {"stall": stall, "fsync_after": fsync, "training": trained}

    def raw_write() -> dict[str, float]:
        """The floor for any writer: the same bytes, one os.write each, no hash, no fsync."""
        tensors = [t for t in model.state_dict().values()]
        tensors += [t for state in optimizer.state.values() for t in state.values()
                    if isinstance(t, torch.Tensor)]
        path = workdir / "raw.bin"
        started = time.perf_counter()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            for tensor in tensors:
                view = buffers.tensor_bytes(tensor)
                while len(view):
                    view = view[os.write(fd, view):]
        finally:
            os.close(fd)
        seconds = time.perf_counter() - started
        path.unlink()
        return {"stall": seconds}

    variants = {
        "async": lambda: checkpointer_save(asynchronous),
        "async_copy": lambda: checkpointer_save(copying),
        "sync": lambda: checkpointer_save(synchronous),
        "torch": torch_save,
        "raw": raw_write,
    }
    order = list(variants)
    # Warm-up: the first async saves allocate their reusable snapshot buffers; report apart.
    settle()
    first_async = variants["async"]()["stall"]
    settle()
    variants["async_copy"]()
    settle()
    records: list[dict[str, dict[str, float]]] = []
    for index in range(rounds):
        record = {}
        shift = index % len(order)
        for name in order[shift:] + order[:shift]:
            settle()
            record[name] = variants[name]()
        records.append(record)
        print(f"round {index + 1}/{rounds}: " + ", ".join(
            f"{k} {v['stall']:.3f}s" for k, v in record.items()), flush=True)
    copying.close()
    asynchronous.close()
    synchronous.close()
    checkpoint_size = os.path.getsize(synchronous.path(synchronous.latest()))
    shutil.rmtree(workdir, ignore_errors=True)
    return report(records, size, checkpoint_size, step_time, steps_between, first_async,
                  layers, width, location)


def describe_location(location: str) -> str:
    """The file system under ``location``, from /proc/mounts (longest matching mount point)."""
    best = ("?", "?")
    try:
        with open("/proc/mounts") as mounts:
            for line in mounts:
                device, point, kind = line.split()[:3]
                if location.startswith(point) and len(point) >= len(best[0]):
                    best = (point, f"{kind} on {device}")
    except OSError:
        pass
    return best[1]


def report(records: list[dict[str, dict[str, float]]], size: int, file_size: int, step_time: float,
           steps_between: int, first_async: float, layers: int, width: int, location: str) -> str:
    med = statistics.median
    col = {name: [r[name]["stall"] for r in records] for name in records[0]}
    a, c, s, t, w = col["async"], col["async_copy"], col["sync"], col["torch"], col["raw"]
    f = [r["torch"]["fsync_after"] for r in records]
    held = [r["async"]["held"] for r in records]
    async_ratio = [x / y for x, y in zip(a, s)]
    copy_ratio = [x / y for x, y in zip(c, s)]
    speedup = [y / x for x, y in zip(s, t)]
    speedup_fsync = [(y + z) / x for x, y, z in zip(s, t, f)]
    train = {name: med([r[name]["training"] for r in records]) for name in records[0] if name != "raw"}
    lines = [
        f"## Checkpoints in `{location}` ({describe_location(location)})",
        "",
        "Produced by `python -m bench.checkpoint_bench`. A training loop (MLP of "
        f"{layers} x Linear({width}, {width}) + GELU, AdamW, batch 8) saves model + optimizer "
        f"state: {size / 1e6:.0f} MB of tensors (the model itself {size / 3e6:.0f} MB), checkpoint "
        f"file {file_size / 1e6:.0f} MB. One training step takes about {step_time:.2f} s; after "
        f"each save {steps_between} training steps run (an async write overlaps them).",
        "",
        f"Machine: {os.cpu_count()} CPUs shared with other jobs (load average at the end "
        f"{os.getloadavg()[0]:.2f}), Python {platform.python_version()}, torch {torch.__version__}, "
        f"modelkeep {mk.__version__}. Variants run in a rotating order each round, after `os.sync()`; "
        f"{len(records)} rounds.",
        "",
        "* **async**: `Checkpointer.save` with `async_save=True` (default `snapshot='overlap'`): "
        "stall = time inside `save` + time the next `optimizer.step()` was held waiting for the "
        "background copy of parameters and optimizer state (that copy overlaps the next "
        "forward/backward). The write, fsync and rename run in the background.",
        "* **async copy**: the same with `snapshot='copy'`: every tensor is copied into a reused "
        "buffer before `save` returns.",
        "* **sync**: `Checkpointer.save` with `async_save=False`: written, hashed, fsynced and "
        "renamed (durable) when it returns.",
        "* **torch.save**: `torch.save({'model': ..., 'optimizer': ..., 'step': ..., 'rng': ...})` "
        "to a new path, not fsynced (as usually called); `+fsync` adds the fsync that would make "
        "it durable.",
        "* **raw write**: the floor for any writer: the same tensor bytes with one `os.write` each "
        "into a new file, no header, no hashing, no fsync.",
        "",
        "| round | async stall (s) | of which step held (s) | async copy stall (s) | sync save (s) "
        "| torch.save (s) | torch.save +fsync (s) | raw write (s) | async / sync | async copy / sync "
        "| torch.save / sync | (torch.save+fsync) / sync | async write still pending |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for i, r in enumerate(records):
        lines.append(
            f"| {i + 1} | {a[i]:.3f} | {held[i]:.3f} | {c[i]:.3f} | {s[i]:.3f} | {t[i]:.3f} | "
            f"{t[i] + f[i]:.3f} | {w[i]:.3f} | {async_ratio[i]:.1%} | {copy_ratio[i]:.1%} | {speedup[i]:.2f}x | "
            f"{speedup_fsync[i]:.2f}x | {'yes' if r['async']['pending'] else 'no'} |")
    lines += [
        f"| **median** | **{med(a):.3f}** | {med(held):.3f} | **{med(c):.3f}** | **{med(s):.3f}** | "
        f"**{med(t):.3f}** | **{med([x + y for x, y in zip(t, f)]):.3f}** | **{med(w):.3f}** | "
        f"**{med(async_ratio):.1%}** | "
        f"**{med(copy_ratio):.1%}** | **{med(speedup):.2f}x** | **{med(speedup_fsync):.2f}x** | |",
        "",
        f"First async save (allocates the snapshot buffer, reused afterwards): {first_async:.3f} s.",
        "",
        f"Median time of the {steps_between} training steps after each save: after async "
        f"{train['async']:.2f} s, after async copy {train['async_copy']:.2f} s, after sync "
        f"{train['sync']:.2f} s, after torch.save {train['torch']:.2f} s (the background copy and "
        "write share the CPUs and memory bandwidth with training).",
        "",
        "Targets: async stall <= 25% of the sync save: "
        f"**{'met' if med(async_ratio) <= 0.25 else 'NOT met'}** (median {med(async_ratio):.1%}, "
        f"{sum(x <= 0.25 for x in async_ratio)}/{len(records)} rounds; with `snapshot='copy'` "
        f"median {med(copy_ratio):.1%}); sync save >= 2x faster than torch.save: "
        f"**{'met' if med(speedup) >= 2 else 'NOT met'}** (median {med(speedup):.2f}x, "
        f"{sum(x >= 2 for x in speedup)}/{len(records)} rounds; against a durable torch.save "
        f"median {med(speedup_fsync):.2f}x). torch.save takes {med([y / x for x, y in zip(w, t)]):.2f}x "
        "as long as a plain write of the same bytes (median of rounds): that ratio bounds what any "
        "writer, durable or not, can gain over torch.save on this machine.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--layers", type=int, default=18)
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--steps-between", type=int, default=2)
    parser.add_argument("--locations", default=f"{tempfile.gettempdir()},/dev/shm",
                        help="comma-separated folders to save in (default: the temp dir's disk, "
                        "then /dev/shm, a memory file system, to separate software from disk)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    sections = []
    for location in args.locations.split(","):
        if not os.path.isdir(location):
            print(f"skipping {location}: not a folder")
            continue
        sections.append(run(location, args.rounds, args.layers, args.width, args.steps_between))
        print(f"done with {location}", flush=True)
    args.out.write_text("# Checkpoint save stalls\n\n" + "\n".join(sections))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
