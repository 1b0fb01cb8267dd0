"""One look for every byte-counting progress bar (downloads, verify, long loads).

Bars go to stderr and only when it is a terminal, so piped output and logs stay clean.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TaskID, TimeRemainingColumn, TransferSpeedColumn


@contextlib.contextmanager
def byte_bar(label: str, total: int | None, console: Console | None = None) -> Iterator[tuple[Progress, TaskID] | None]:
    """A transient bar counting bytes, or None when stderr is not a terminal."""
    console = console or Console(stderr=True)
    if not console.is_terminal:
        yield None
        return
    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    ) as bar:
        yield bar, bar.add_task(label, total=total)
