"""``modelkeep demo``: PyTorch's "Save and Load the Model" tutorial end to end, done safely.

Part 1 walks the tutorial with vgg16 (named IMAGENET1K_V1 weights when a local copy exists,
random weights otherwise, said plainly), timing each modelkeep step beside its torch equivalent,
which runs too. The whole model is loaded in a fresh process that counts every pickle global it
resolves, and predicts on photos that scikit-learn ships. Part 2 trains a small CNN on
scikit-learn's digits in seconds, saves it, loads it in a fresh process, and checks that logits
and accuracy are identical. The child processes' code is in ``demo_scripts``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any, Iterator

import torch
from rich.console import Console
from rich.panel import Panel
from rich.table import Table

from modelkeep import demo_scripts, errors
from modelkeep import sniff as sniffing

VGG = "torchvision:vgg16"
VGG_WEIGHTS = "IMAGENET1K_V1"
PHOTOS = ("china.jpg", "flower.jpg")
TOPK = 3
DIGITS_THREADS = 1  # a tiny CNN is fastest on one thread; more only wait on each other
MIN_WIDTH = 132  # when the output is not a terminal (a log, a README), keep the tables whole


@dataclasses.dataclass
class Result:
    """What the demo found: every check's outcome, and the digits accuracy around the save."""

    ok: bool = True
    checks: list[tuple[bool, str]] = dataclasses.field(default_factory=list)
    accuracy_before: float | None = None
    accuracy_after: float | None = None
    seconds: float = 0.0


@dataclasses.dataclass
class Step:
    title: str
    ours: str
    ours_s: float | None
    theirs: str = ""
    theirs_s: float | None = None
    note: str = ""


class _Clock:
    seconds: float | None = None


@contextlib.contextmanager
def _timed(skip: bool = False) -> Iterator[_Clock]:
    clock = _Clock()
    started = time.perf_counter()
    yield clock
    if not skip:
        clock.seconds = time.perf_counter() - started


@contextlib.contextmanager
def _threads(count: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _fresh_process(script: str) -> tuple[dict[str, Any], float]:
    """Run ``script`` in a new interpreter: its JSON report and the wall time."""
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, check=False)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise errors.ModelkeepError(
            f"the fresh process failed:\n{result.stderr[-3000:]}", fix="see the error above; report it if it persists"
        )
    return json.loads(result.stdout.strip().splitlines()[-1]), wall


def photos() -> list[str]:
    """The sample photos scikit-learn ships (real JPEG files)."""
    import sklearn.datasets

    folder = os.path.join(os.path.dirname(sklearn.datasets.__file__), "images")
    return [os.path.join(folder, name) for name in PHOTOS]


def _ratio(step: Step) -> str:
    """How many times faster modelkeep was; blank where a step is too short to compare."""
    if step.ours_s is None or step.theirs_s is None or min(step.ours_s, step.theirs_s) < 0.05:
        return ""
    return f"{step.theirs_s / step.ours_s:.1f}×"


class Demo:
    """The two parts of the demo, printing as they go."""

    def __init__(self, console: Console, workdir: str, quick: bool, weights_path: str | None) -> None:
        self.console = console
        self.workdir = workdir
        self.quick = quick
        self.weights_path = weights_path
        self.threads = torch.get_num_threads()
        self.result = Result()

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
        table.add_column("modelkeep", style="cyan")
        table.add_column("time", justify="right", style="bold green")
        table.add_column("torch", style="magenta")
        table.add_column("time", justify="right")
        table.add_column("speed-up", justify="right", style="bold")
        for number, step in enumerate(steps, 1):
            table.add_row(
                str(number), step.title, step.ours, _seconds(step.ours_s), step.theirs,
                _seconds(step.theirs_s), _ratio(step),
            )
        self.console.print(table)
        for number, step in enumerate(steps, 1):
            if step.note:
                self.console.print(f"  [dim]{number}.[/dim] {step.note}")

    def check(self, passed: bool, text: str) -> None:
        self.result.ok = self.result.ok and passed
        self.result.checks.append((passed, text))
        self.console.print(f"  {'[green]✓[/green]' if passed else '[red]✗[/red]'} {text}")

    # ----------------------------------------------------------------------------------------
    # Part 1: the tutorial with vgg16

    def build_vgg16(self) -> tuple[torch.nn.Module, Step]:
        import torchvision

        from modelkeep import creation, pretrained

        entry = pretrained.resolve(VGG, VGG_WEIGHTS)
        local = pretrained.local_source(VGG, VGG_WEIGHTS, self.weights_path)
        if local is not None and self.weights_path is not None and sniffing.sniff(local) != "safetensors":
            pretrained.fetch(entry, local)  # hash-checked and cached in modelkeep format once
        named = local is not None
        with self.status("building vgg16"), _timed() as ours:
            model = creation.create(VGG, weights=VGG_WEIGHTS if named else None)
        with self.status("building vgg16 with torchvision"), _timed(skip=self.quick) as theirs:
            if self.quick:
                pass
            elif named and self.weights_path is None:
                torchvision.models.vgg16(weights=VGG_WEIGHTS)
            elif named:
                torchvision.models.vgg16().load_state_dict(torch.load(self.weights_path, weights_only=True))
            else:
                torchvision.models.vgg16()
        note = (
            f"named weights {VGG_WEIGHTS} from the local copy {local}"
            if named
            else "[yellow]no local copy of vgg16's IMAGENET1K_V1 weights, so vgg16 has RANDOM weights: the "
            "labels below are ImageNet's names, the scores mean nothing[/yellow] (put "
            f"{entry.file_name} in {os.path.join(torch.hub.get_dir(), 'checkpoints')} or pass --weights FILE)"
        )
        ours_code = f'mk.create("{VGG}"' + (f', weights="{VGG_WEIGHTS}")' if named else ")")
        if named and self.weights_path is not None:
            theirs_code = "vgg16().load_state_dict(torch.load(file, weights_only=True))"
        else:
            theirs_code = f'vgg16(weights="{VGG_WEIGHTS}")' if named else "vgg16()"
        return model, Step("build vgg16", ours_code, ours.seconds, theirs_code, theirs.seconds, note)

    def part_one(self) -> None:
        import torchvision

        import modelkeep as mk
        from modelkeep import models
        from modelkeep.inference import spec as spec_module

        self.console.rule("[bold]Part 1: the tutorial, with vgg16")
        model, built = self.build_vgg16()
        steps = [built]
        skip = self.quick
        spec = spec_module.InferenceSpec.from_torchvision(torchvision.models.VGG16_Weights.IMAGENET1K_V1)

        with self.status("saving the weights"), _timed() as ours:
            mk.save_weights(model, self.file("vgg16.weights.safetensors"))
        with self.status("torch.save of the state dict"), _timed(skip) as theirs:
            if not skip:
                torch.save(model.state_dict(), self.file("model_weights.pth"))
        steps.append(Step("save the weights", "mk.save_weights(model, path)", ours.seconds,
                          "torch.save(model.state_dict(), path)", theirs.seconds,
                          f"a {self.megabytes('vgg16.weights.safetensors')} safetensors file with a digest per tensor"))

        with self.status("loading the weights into a fresh model"), _timed() as ours:
            with torch.device("meta"):
                fresh = torchvision.models.vgg16()
            mk.load_weights(fresh, self.file("vgg16.weights.safetensors"))
        with self.status("torch.load of the state dict"), _timed(skip) as theirs:
            if not skip:
                torchvision.models.vgg16().load_state_dict(torch.load(self.file("model_weights.pth"), weights_only=True))
        steps.append(Step("load into a fresh model", "mk.load_weights(vgg16() on meta, path)", ours.seconds,
                          "vgg16().load_state_dict(torch.load(path, weights_only=True))", theirs.seconds,
                          "modelkeep builds on the meta device (no random init) and reads straight into the parameters"))
        same = all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))
        with _timed() as theirs:
            fresh.eval()
        steps.append(Step("eval()", "(load_weights leaves it in eval)", 0.0, "model.eval()", theirs.seconds))
        del fresh

        with self.status("saving the whole model"), _timed() as ours:
            models.save(model, self.file("vgg16.model.safetensors"), inference=spec)
        with self.status("torch.save of the whole model"), _timed(skip) as theirs:
            if not skip:
                torch.save(model, self.file("model.pth"))
        steps.append(Step("save the whole model", "mk.save(model, path)", ours.seconds, "torch.save(model, path)",
                          theirs.seconds, "architecture, weights, preprocessing and labels in one safetensors file"))
        del model

        params = dict(threads=self.threads, photos=photos(), topk=TOPK)
        with self.status("loading the whole model in a fresh process and predicting"):
            ours_report, ours_wall = _fresh_process(
                demo_scripts.VGG_MODELKEEP.format(path=self.file("vgg16.model.safetensors"), **params))
        theirs_report, theirs_wall = None, None
        if not skip:
            with self.status("torch.load of the whole model in a fresh process"):
                theirs_report, theirs_wall = _fresh_process(
                    demo_scripts.VGG_TORCH.format(path=self.file("model.pth"), **params))
        steps.append(Step("fresh process: load + predict", "mk.load(path); mk.predict(model, photos)", ours_wall,
                          "torch.load(path, weights_only=False) + transforms", theirs_wall,
                          _breakdown("modelkeep", ours_report) + (
                              "; " + _breakdown("torch", theirs_report) if theirs_report else "")))
        self.show("vgg16: each step with modelkeep and with torch", steps)
        self.check(same, "weights loaded into the fresh model are identical to the saved ones")
        count = ours_report["pickle_globals"]
        self.check(count == 0, f"the fresh process loaded the whole model with {count} pickle globals resolved"
                   + (f" (torch.load: {theirs_report['pickle_globals']}, each a callable the file chooses)"
                      if theirs_report else ""))
        if theirs_report is not None:
            self.check(_same_top(ours_report["top"], theirs_report["top"]),
                       "its predictions equal torchvision's (same classes, probabilities within 1e-6)")
        table = Table(title="predictions on photos that scikit-learn ships", title_justify="left", title_style="bold")
        table.add_column("photo")
        for rank in range(1, TOPK + 1):
            table.add_column(f"top {rank}")
        for photo, top in zip(photos(), ours_report["top"]):
            table.add_row(os.path.basename(photo), *(f"{label} ({p:.1%})" for label, _, p in top))
        self.console.print(table)

    # ----------------------------------------------------------------------------------------
    # Part 2: a model whose predictions mean something, without downloads

    def train_digits(self) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor, float]:
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
        labels = torch.tensor(digits.target)
        generator = torch.Generator().manual_seed(0)
        order = torch.randperm(len(labels), generator=generator)
        train, test = order[:1437], order[1437:]
        torch.manual_seed(0)
        nn = torch.nn
        model = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10),
        )
        optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
        with _timed() as took:
            for _ in range(12):
                shuffled = train[torch.randperm(len(train), generator=generator)]
                for start in range(0, len(shuffled), 32):
                    batch = shuffled[start : start + 32]
                    loss = nn.functional.cross_entropy(model(images[batch]), labels[batch])
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
        model.eval()
        return model, images[test].contiguous(), labels[test], took.seconds or 0.0

    def part_two(self) -> None:
        import numpy as np

        import modelkeep as mk
        from modelkeep import models

        self.console.rule("[bold]Part 2: a small CNN trained on scikit-learn's digits")
        with self.status("training"), _threads(DIGITS_THREADS):
            model, inputs, labels, trained_s = self.train_digits()
            with torch.no_grad():
                before = model(inputs)
        accuracy_before = (before.argmax(1) == labels).float().mean().item()
        np.save(self.file("digits_test.npy"), inputs.numpy())
        spec = mk.InferenceSpec(input_shape=("batch", 1, 8, 8), labels=[str(d) for d in range(10)])
        steps = [Step("train 12 epochs on 1437 digits", "(plain torch)", trained_s, "", None,
                      f"test accuracy {accuracy_before:.2%} on {len(labels)} held-out digits")]
        with _timed() as ours:
            models.save(model, self.file("digits.model.safetensors"), inference=spec)
        with _timed() as theirs:
            torch.save(model, self.file("digits.pth"))
        steps.append(Step("save the whole model", "mk.save(model, path)", ours.seconds, "torch.save(model, path)",
                          theirs.seconds, "built-in torch.nn layers only: stored as a tree of layers, no code"))
        params = dict(threads=DIGITS_THREADS, inputs=self.file("digits_test.npy"))
        with self.status("loading in fresh processes"):
            ours_report, ours_wall = _fresh_process(demo_scripts.DIGITS_MODELKEEP.format(
                path=self.file("digits.model.safetensors"), out=self.file("digits_logits.safetensors"), **params))
            theirs_report, theirs_wall = _fresh_process(demo_scripts.DIGITS_TORCH.format(
                path=self.file("digits.pth"), out=self.file("digits_logits_torch.npy"), **params))
        steps.append(Step("fresh process: load + predict", "mk.load(path); mk.predict(model, test.npy)", ours_wall,
                          "torch.load(path, weights_only=False)", theirs_wall,
                          _breakdown("modelkeep", ours_report) + "; " + _breakdown("torch", theirs_report)))
        self.show("digits CNN: each step with modelkeep and with torch", steps)
        after = mk.load_state_dict(self.file("digits_logits.safetensors"))["logits"]
        after_torch = torch.from_numpy(np.load(self.file("digits_logits_torch.npy")))
        accuracy_after = (after.argmax(1) == labels).float().mean().item()
        self.check(torch.equal(before, after), "logits after loading in a fresh process are identical (torch.equal)")
        self.check(torch.equal(before, after_torch), "and identical to torch.load's")
        self.check(accuracy_before == accuracy_after,
                   f"accuracy before save {accuracy_before:.2%}, after load {accuracy_after:.2%}")
        self.check(ours_report["pickle_globals"] == 0,
                   f"pickle globals resolved: modelkeep {ours_report['pickle_globals']}, "
                   f"torch.load {theirs_report['pickle_globals']}")
        self.result.accuracy_before, self.result.accuracy_after = accuracy_before, accuracy_after


def _seconds(value: float | None) -> str:
    return "[dim]-[/dim]" if value is None else f"{value:.2f} s"


def _breakdown(who: str, report: dict[str, Any]) -> str:
    return f"{who}: import {report['import']:.2f} s, load {report['load']:.2f} s, predict {report['predict']:.2f} s"


def _same_top(ours: list[Any], theirs: list[Any]) -> bool:
    return all(
        [r[1] for r in a] == [r[1] for r in b] and all(abs(r[2] - s[2]) <= 1e-6 for r, s in zip(a, b))
        for a, b in zip(ours, theirs)
    )


def run(
    *,
    quick: bool = False,
    weights_path: str | None = None,
    workdir: str | None = None,
    console: Console | None = None,
    parts: tuple[int, ...] = (1, 2),
) -> Result:
    """Run the demo and say what it found (``result.ok``: every check passed). Files go to
    ``workdir`` (kept) or a temporary folder (removed)."""
    import torchvision

    import modelkeep

    if console is None:
        console = Console()
        if not console.is_terminal:
            console = Console(width=max(console.width, MIN_WIDTH))
    folder = os.path.abspath(workdir) if workdir else tempfile.mkdtemp(prefix="modelkeep-demo-")
    os.makedirs(folder, exist_ok=True)
    demo = Demo(console, folder, quick, weights_path)
    console.print(Panel.fit(
        "[bold]modelkeep demo[/bold]: PyTorch's \"Save and Load the Model\" tutorial, every step safe\n"
        f"modelkeep {modelkeep.__version__} · torch {torch.__version__} · torchvision {torchvision.__version__} · "
        f"{demo.threads} CPU threads · files in {folder}"
        + ("\n[dim]--quick: the torch side of the vgg16 steps is skipped[/dim]" if quick else "")))
    started = time.perf_counter()
    try:
        if 1 in parts:
            demo.part_one()
        if 2 in parts:
            demo.part_two()
    finally:
        if workdir is None:
            shutil.rmtree(folder, ignore_errors=True)
    demo.result.seconds = time.perf_counter() - started
    verdict = "[green]all checks passed[/green]" if demo.result.ok else "[red]some checks failed[/red]"
    console.print(f"\n{verdict} in {demo.result.seconds:.1f} s")
    if workdir is not None and 1 in parts:
        console.print(f"try: modelkeep predict {demo.file('vgg16.model.safetensors')} {' '.join(photos())}",
                      highlight=False, soft_wrap=True)
    return demo.result
