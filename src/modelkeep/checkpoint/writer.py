"""Saving in the background: one writer thread that writes and commits snapshots.

Jobs run one at a time in submission order, so checkpoints commit in the order they were saved.
At most ``max_in_flight`` jobs exist at once; a further ``submit`` waits. A job's failure is kept
and raised by the next ``reserve`` or ``wait``: never lost. Pending jobs are flushed at interpreter
exit.
"""

from __future__ import annotations

import atexit
import collections
import dataclasses
import sys
import threading
import weakref
from typing import Callable

from modelkeep import errors


@dataclasses.dataclass
class Job:
    """One background save. ``run`` writes and commits; ``cleanup`` always follows it; ``after``
    (retention) runs once the commit is done, off the path of a caller waiting for the commit."""

    label: str
    run: Callable[[], None]
    cleanup: Callable[[], None] = lambda: None
    after: Callable[[], None] = lambda: None
    finished: threading.Event = dataclasses.field(default_factory=threading.Event)
    error: BaseException | None = None


class AsyncWriter:
    """A lazily started writer thread with a bounded number of jobs in flight."""

    def __init__(self, max_in_flight: int = 1) -> None:
        if isinstance(max_in_flight, bool) or not isinstance(max_in_flight, int) or max_in_flight < 1:
            raise errors.InvalidArgumentError(
                f"must be a positive integer, not {max_in_flight!r}", item="max_in_flight",
                fix="pass 1 (default) or more saves to keep in flight",
            )
        self.max_in_flight = max_in_flight
        self._cond = threading.Condition()
        self._queue: collections.deque[Job] = collections.deque()
        self._running: Job | None = None
        self._thread: threading.Thread | None = None
        self._errors: list[BaseException] = []
        _register_for_exit(self)

    @property
    def in_flight(self) -> int:
        with self._cond:
            return len(self._queue) + (self._running is not None)

    def _raise_errors(self) -> None:
        """Raise (once) the first failure of finished jobs; later ones ride along as notes."""
        if not self._errors:
            return
        first, *others = self._errors
        self._errors = []
        for other in others:
            first.add_note(f"another background save also failed: {other!r}")
        raise first

    def reserve(self) -> None:
        """Wait until another job may start; raise any failure of the jobs before it."""
        with self._cond:
            self._raise_errors()
            while len(self._queue) + (self._running is not None) >= self.max_in_flight:
                self._cond.wait()
            self._raise_errors()

    def submit(self, job: Job) -> None:
        with self._cond:
            self._queue.append(job)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._work, name="modelkeep-checkpoint-writer", daemon=True
                )
                self._thread.start()

    def wait_for(self, job: Job) -> None:
        """Block until ``job`` has committed (or failed); raise its failure."""
        job.finished.wait()
        if job.error is not None:
            with self._cond:
                if job.error in self._errors:
                    self._errors.remove(job.error)
            raise job.error

    def wait(self) -> None:
        """Block until every job has finished; raise the first failure among them."""
        with self._cond:
            while self._queue or self._running is not None:
                self._cond.wait()
            self._raise_errors()

    def _work(self) -> None:
        while True:
            with self._cond:
                if not self._queue:
                    self._thread = None  # exit when idle; the next submit starts a new thread
                    return
                job = self._running = self._queue.popleft()
            try:
                self._step(job, job.run, committing=True)
                if job.error is None:
                    self._step(job, job.after, committing=False)
            finally:
                with self._cond:
                    self._running = None
                    self._cond.notify_all()

    def _step(self, job: Job, action: Callable[[], None], *, committing: bool) -> None:
        try:
            action()
        except BaseException as e:  # kept for the caller: a failure is never lost
            e.add_note(f"raised by the background save of {job.label}")
            with self._cond:
                self._errors.append(e)
            if committing:
                job.error = e
        finally:
            if committing:
                try:
                    job.cleanup()
                finally:
                    job.finished.set()


_LIVE: "weakref.WeakSet[AsyncWriter]" = weakref.WeakSet()
_REGISTERED = False
_REGISTER_LOCK = threading.Lock()


def _register_for_exit(writer: AsyncWriter) -> None:
    """Flush at exit, early enough that thread pools still accept work: threading's own exit
    hooks run before ``atexit`` and in reverse order, and concurrent.futures shuts its pools in
    one of them, so ours is registered after it (``atexit`` stays as the fallback)."""
    global _REGISTERED
    with _REGISTER_LOCK:
        _LIVE.add(writer)
        if not _REGISTERED:
            import concurrent.futures.thread  # noqa: F401  (registers its exit hook first)

            register_early = getattr(threading, "_register_atexit", None)
            if register_early is not None:
                register_early(flush_all)
            atexit.register(flush_all)
            _REGISTERED = True


def flush_all() -> None:
    """Finish every pending background save (runs at interpreter exit)."""
    for writer in list(_LIVE):
        try:
            writer.wait()
        except BaseException as e:  # nobody is left to raise to: say it loudly
            print(f"modelkeep: a background checkpoint save failed before exit: {e!r}", file=sys.stderr)
