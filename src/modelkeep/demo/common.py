"""What every part of ``modelkeep demo`` shares: timing, fresh processes, the step tables and the
checks that decide the demo's verdict."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Iterator

import torch
from rich.console import Console
from rich.table import Table

from modelkeep import errors

PHOTOS = ("china.jpg", "flower.jpg")
REPEATS = 3  # every timed figure in the tables is the median of this many runs


@dataclasses.dataclass
class Result:
    """What the demo found: every check's outcome, the digits accuracy around the save, and the
    pretrained model's top-5 per photo (``[(label, probability), ...]``)."""

    ok: bool = True
    checks: list[tuple[bool, str]] = dataclasses.field(default_factory=list)
    accuracy_before: float | None = None
    accuracy_after: float | None = None
    pretrained_top: list[list[tuple[str, float]]] | None = None
    seconds: float = 0.0


@dataclasses.dataclass
class Step:
    """One row of a table: a modelkeep step beside its torch equivalent."""

    title: str
    ours: str
    ours_s: float | None
    theirs: str = ""
    theirs_s: float | None = None
    note: str = ""


class Clock:
    """The seconds a ``timed`` block took (``None`` when skipped)."""

    seconds: float | None = None


@contextlib.contextmanager
def timed(skip: bool = False) -> Iterator[Clock]:
    clock = Clock()
    started = time.perf_counter()
    yield clock
    if not skip:
        clock.seconds = time.perf_counter() - started


def medians(*actions: Callable[[], Any], repeats: int = REPEATS) -> list[float]:
    """The median wall time of each action over ``repeats`` rounds. Each round runs every action
    once, in turn, so that no side always runs first (after the other's writes, or on a cold
    cache) and one noisy run does not decide a row."""
    times: list[list[float]] = [[] for _ in actions]
    for _ in range(repeats):
        for action, taken in zip(actions, times):
            started = time.perf_counter()
            action()
            taken.append(time.perf_counter() - started)
    return [statistics.median(taken) for taken in times]


@contextlib.contextmanager
def threads(count: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def flushed_torch_save(obj: Any, path: str) -> None:
    """``torch.save`` made as durable as modelkeep's save: the bytes reach the disk."""
    with open(path, "wb") as stream:
        torch.save(obj, stream)
        stream.flush()
        os.fsync(stream.fileno())


def modelkeep_command() -> list[str]:
    """The ``modelkeep`` command of this interpreter's environment (the module where it has no script)."""
    script = os.path.join(os.path.dirname(sys.executable), "modelkeep")
    return [script] if os.path.isfile(script) else [sys.executable, "-m", "modelkeep.cli"]


def fresh_process(script: str) -> tuple[dict[str, Any], float]:
    """Run ``script`` in a new interpreter: its JSON report (its last line) and the wall time."""
    return run_json([sys.executable, "-c", script])


def run_json(command: list[str]) -> tuple[dict[str, Any], float]:
    """Run ``command``: the JSON document it prints last and the wall time."""
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise errors.ModelkeepError(
            f"the fresh process failed:\n{result.stderr[-3000:]}", fix="see the error above; report it if it persists"
        )
    text = result.stdout.strip()
    try:
        return json.loads(text), wall  # a command's whole output (``modelkeep predict --json``)
    except json.JSONDecodeError:
        return json.loads(text.splitlines()[-1]), wall  # a script's report line, after any prints


def photos() -> list[str]:
    """The sample photos scikit-learn ships (real JPEG files)."""
    import sklearn.datasets

    folder = os.path.join(os.path.dirname(sklearn.datasets.__file__), "images")
    return [os.path.join(folder, name) for name in PHOTOS]


def seconds(value: float | None) -> str:
    return "[dim]-[/dim]" if value is None else f"{value:.2f} s"


def ratio(step: Step) -> str:
    """How many times faster modelkeep was; blank where a step is too short to compare."""
    if step.ours_s is None or step.theirs_s is None or min(step.ours_s, step.theirs_s) < 0.05:
        return ""
    return f"{step.theirs_s / step.ours_s:.1f}×"


def breakdown(who: str, report: dict[str, Any]) -> str:
    return f"{who}: import {report['import']:.2f} s, load {report['load']:.2f} s, predict {report['predict']:.2f} s"


class Part:
    """A part of the demo: where its files go, how it prints, and the shared verdict."""

    def __init__(self, console: Console, workdir: str, result: Result) -> None:
        self.console = console
        self.workdir = workdir
        self.result = result

    def file(self, name: str) -> str:
        return os.path.join(self.workdir, name)

    def megabytes(self, name: str) -> str:
        return f"{os.path.getsize(self.file(name)) / 1e6:.0f} MB"

    def status(self, text: str) -> Any:
        return self.console.status(f"[dim]{text}…[/dim]")

    def show(self, title: str, steps: list[Step]) -> None:
        table = Table(title=title, title_justify="left", title_style="bold")
        table.add_column("#", justify="right", style="dim")
        table.add_column("step")
        table.add_column("modelkeep", style="cyan", overflow="fold")
        table.add_column("time", justify="right", style="bold green")
        table.add_column("torch", style="magenta", overflow="fold")
        table.add_column("time", justify="right")
        table.add_column("speed-up", justify="right", style="bold")
        for number, step in enumerate(steps, 1):
            table.add_row(
                str(number), step.title, step.ours, seconds(step.ours_s), step.theirs,
                seconds(step.theirs_s), ratio(step),
            )
        self.console.print(table)
        for number, step in enumerate(steps, 1):
            if step.note:
                self.console.print(f"  [dim]{number}.[/dim] {step.note}")

    def show_top(self, title: str, sources: list[str], tops: list[list[tuple[str, float]]]) -> None:
        """One row per input: its ranked labels with their probabilities."""
        table = Table(title=title, title_justify="left", title_style="bold")
        table.add_column("photo")
        for rank in range(1, max(len(top) for top in tops) + 1):
            table.add_column(f"top {rank}")
        for source, top in zip(sources, tops):
            table.add_row(os.path.basename(source), *(f"{label} ({p:.1%})" for label, p in top))
        self.console.print(table)

    def check(self, passed: bool, text: str) -> None:
        self.result.ok = self.result.ok and passed
        self.result.checks.append((passed, text))
        self.console.print(f"  {'[green]✓[/green]' if passed else '[red]✗[/red]'} {text}")
