"""``Checkpointer``: when and which training checkpoints are written, kept and restored.

A directory holds one file per step, ``step-<step>.safetensors``. A step is committed, and only
then visible to ``steps()``/``restore``, when its file has its final name: bytes go to a
temporary name, are fsynced, and are renamed (object stores: written whole, then moved). A crashed
save leaves only a temporary file, which the next ``Checkpointer`` on the directory removes. Old
checkpoints are deleted by the retention policy only after a newer one has committed.

A synchronous save is an asynchronous save plus ``wait()``: the same job on the same writer
thread; it only skips the snapshot copy, because training is blocked while it runs.
"""

from __future__ import annotations

import functools
import os
import re
import threading
from typing import Any, Literal, Mapping

from modelkeep import errors, reading
from modelkeep import storage as stores
from modelkeep.checkpoint import capture, files, writer
from modelkeep.sources import state_tree as tree
from modelkeep.checkpoint import snapshot as snapshot_mod
from modelkeep.checkpoint import retention as keep

STEP_FILE = re.compile(r"^step-(\d{1,19})\.safetensors$")
StepArg = int | Literal["latest", "best"]


def step_file_name(step: int) -> str:
    return f"step-{step:010d}.safetensors"


class Restored(dict):
    """What ``restore`` returns: the step, ``extra`` and ``metrics`` of the checkpoint (also
    readable as attributes), and its path."""

    @property
    def step(self) -> int:
        return self["step"]

    @property
    def extra(self) -> Any:
        return self.get("extra")

    @property
    def metrics(self) -> dict[str, float]:
        return self.get("metrics", {})

    @property
    def path(self) -> str:
        return self["path"]


class Checkpointer:
    """Save, keep and restore training checkpoints in ``directory`` (a path or an fsspec URL).

    Retention: ``keep_last`` newest, ``keep_best`` best by ``metric`` (``mode`` "min"/"max"),
    every ``keep_every``-th step; or any ``retention`` policy (``KeepLast(3) | KeepBest(...)``).
    All None keeps everything. The newest checkpoint is always kept.

    With ``async_save`` (default) ``save`` returns once the state is snapshotted and a background
    thread writes it; ``max_in_flight`` bounds the saves pending at once. ``snapshot="overlap"``
    (default) copies parameters and optimizer state while the next forward/backward pass runs
    and holds the next ``optimizer.step()`` until the copy is done; ``snapshot="copy"`` copies
    everything before ``save`` returns. ``storage`` replaces the backend chosen from
    ``directory``.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        keep_last: int | None = 3,
        keep_best: int | None = None,
        keep_every: int | None = None,
        metric: str | None = None,
        mode: str = "min",
        retention: keep.Policy | None = None,
        async_save: bool = True,
        max_in_flight: int = 1,
        snapshot: Literal["overlap", "copy"] = "overlap",
        storage: stores.Storage | None = None,
        storage_options: Mapping[str, Any] | None = None,
    ) -> None:
        if storage is None:
            self.storage, self.directory = _open(directory, storage_options)
        else:
            self.storage, self.directory = storage, os.fspath(directory)
        self.policy = retention if retention is not None else _policy(
            keep_last, keep_best, keep_every, metric, mode)
        self.metric, self.mode = metric, mode
        if mode not in ("min", "max"):
            raise errors.InvalidArgumentError(
                f"must be 'min' or 'max', not {mode!r}", item="mode",
                fix="mode='min' when lower is better (a loss), 'max' when higher is (accuracy)",
            )
        if snapshot not in ("overlap", "copy"):
            raise errors.InvalidArgumentError(
                f"must be 'overlap' or 'copy', not {snapshot!r}", item="snapshot",
                fix="snapshot='overlap' (default) or snapshot='copy'",
            )
        self.async_save, self.snapshot_mode = async_save, snapshot
        self.blocked_seconds = 0.0  # time optimizer.step() waited for background snapshot copies
        self._writer = writer.AsyncWriter(max_in_flight)
        self._pool = snapshot_mod.SnapshotPool()
        self._holds: list[tuple[Any, snapshot_mod.Snapshot]] = []  # optimizer hooks, main thread
        self._infos: dict[int, keep.CheckpointInfo] = {}
        self._pending: set[int] = set()
        self._lock = threading.Lock()
        self.storage.makedirs(self.directory)
        self.removed_on_start = self.storage.remove_stale_temps(self.directory)

    # ---------------------------------------------------------------- listing

    def path(self, step: int) -> str:
        return self.storage.join(self.directory, step_file_name(step))

    def steps(self) -> list[int]:
        """Committed steps, oldest first. Saves still in flight are not listed."""
        found = []
        for name in self.storage.list_names(self.directory):
            match = STEP_FILE.match(name)
            if match:
                found.append(int(match.group(1)))
        return sorted(set(found))

    def latest(self) -> int | None:
        steps = self.steps()
        return steps[-1] if steps else None

    def info(self, step: int) -> keep.CheckpointInfo:
        """Step, path, metrics and time of a committed checkpoint (from its header only)."""
        with self._lock:
            cached = self._infos.get(step)
        if cached is not None:
            return cached
        path = self.path(step)
        header = self.storage.read_header(path)
        state = files.state_tree(header)
        state = state if isinstance(state, dict) else {}
        metrics = capture.metric_values(
            tree.decode(state.get("metrics"), header.entries, path=path, resolve=lambda entry: None))
        when = state.get("time")
        info = keep.CheckpointInfo(step, path, metrics, when if isinstance(when, float) else None)
        with self._lock:
            self._infos[step] = info
        return info

    def best(self, metric: str | None = None, mode: str | None = None) -> int | None:
        """The committed step with the best ``metric`` (default: the one given at construction)."""
        metric = metric or self.metric
        if metric is None:
            raise errors.InvalidArgumentError(
                "best() needs a metric", item="metric",
                fix="Checkpointer(..., metric='val_loss') or best('val_loss')",
            )
        ranked = keep.KeepBest(1, metric, mode or self.mode).ranked(self._infos_of_steps())
        return ranked[0].step if ranked else None

    def _infos_of_steps(self) -> list[keep.CheckpointInfo]:
        """Infos of the committed steps; an unreadable file is listed without metrics."""
        infos = []
        for step in self.steps():
            try:
                infos.append(self.info(step))
            except errors.ModelkeepError:
                infos.append(keep.CheckpointInfo(step, self.path(step)))
        return infos

    def _resolve(self, step: StepArg) -> int:
        if step == "latest":
            found = self.latest()
        elif step == "best":
            found = self.best()
        elif isinstance(step, int) and not isinstance(step, bool):
            found = step if step in self.steps() else None
            if found is None:
                raise errors.StepNotFoundError(
                    f"no committed checkpoint for step {step}", path=self.directory,
                    fix=f"choose one of {self.steps()[-10:]}",
                )
        else:
            raise errors.InvalidArgumentError(
                f"must be an int, 'latest' or 'best', not {step!r}", item="step",
                fix="pass a saved step number, 'latest' or 'best'",
            )
        if found is None:
            raise errors.StepNotFoundError(
                f"no checkpoint to restore ({step})", path=self.directory,
                fix="save one first; check `checkpointer.latest() is not None` before restoring",
            )
        return found

    # ---------------------------------------------------------------- saving

    def save(
        self,
        step: int,
        *,
        model: Any,
        optimizer: Any = None,
        scheduler: Any = None,
        scaler: Any = None,
        extra: Any = None,
        metrics: Mapping[str, Any] | None = None,
        rng: bool = True,
        overwrite: bool = False,
    ) -> str:
        """Save the training state of ``step``; return the path it commits to.

        With ``async_save`` this returns as soon as training may go on (see ``snapshot`` in the
        class docstring) and the file is written in the background; any failure surfaces on the
        next ``save`` or ``wait``. ``extra`` is any nested user state (numbers, strings, lists,
        dicts, tensors, numpy arrays); ``metrics`` are numbers that ``keep_best`` and ``best()``
        rank by. ``rng=False`` leaves the global RNG states out.
        """
        state = capture.capture(
            self._check_step(step, overwrite), model=model, optimizer=optimizer,
            scheduler=scheduler, scaler=scaler, extra=extra, metrics=metrics, rng=rng,
        )
        return self._save_state(step, state, optimizer)

    def _check_step(self, step: int, overwrite: bool) -> int:
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise errors.InvalidArgumentError(
                f"must be a non-negative integer, not {step!r}", item="step",
                fix="pass the training step (0, 1, 2, ...)",
            )
        if not overwrite and (step in self._pending or step in self.steps()):
            raise errors.StepExistsError(
                f"step {step} is already saved", path=self.path(step),
                fix="pass overwrite=True to replace it, or save a new step",
            )
        return step

    def _save_state(self, step: int, state: Mapping[str, Any], optimizer: Any = None) -> str:
        metadata, tensors = files.encode_state(state)  # validates every value before any waiting
        self._writer.reserve()
        self._release_holds()
        optimizers = [o for o in (optimizer if isinstance(optimizer, (list, tuple)) else [optimizer])
                      if hasattr(o, "register_step_pre_hook")]
        if not self.async_save:
            snap = snapshot_mod.Snapshot(tensors)  # training waits for the write: nothing to copy
            snap.copied.set()
        elif self.snapshot_mode == "overlap" and optimizers:
            snap = self._pool.take(tensors, defer=snapshot_mod.guarded_views(optimizers))
            if not snap.copied.is_set():
                hold = functools.partial(self._hold_step, snap)
                self._holds += [(o.register_step_pre_hook(hold), snap) for o in optimizers]
        else:
            snap = self._pool.take(tensors)
        path = self.path(step)
        info = keep.CheckpointInfo(step, path, capture.metric_values(state.get("metrics")),
                                        state.get("time"))
        self._pending.add(step)

        def run() -> None:
            snap.ready()
            try:
                self.storage.write_tensor_file(path, snap.tensors, metadata)
            except OSError as e:  # a storage may raise plain OSErrors; callers get StorageError
                if isinstance(e, errors.ModelkeepError):
                    raise
                raise errors.storage_error(e, path, "writing") from e
            with self._lock:
                self._infos[step] = info

        def cleanup() -> None:
            self._pending.discard(step)
            self._pool.release(snap)

        job = writer.Job(f"step {step} ({path})", run, cleanup, lambda: self._apply_retention(step))
        self._writer.submit(job)
        if not self.async_save:
            self._writer.wait_for(job)  # committed: the failure of this save is raised here
            self._writer.wait()  # and retention applied, so steps() is final when save returns
        return path

    def _apply_retention(self, committed: int) -> None:
        for info in keep.to_delete(self.policy, self._infos_of_steps()):
            if info.step >= committed or info.step in self._pending:
                continue
            try:
                self.storage.delete(info.path)
            except OSError as e:
                error = errors.storage_error(e, info.path, "deleting")
                error.add_note(f"step {committed} was committed; only removing old step {info.step} failed")
                raise error from (None if error is e else e)
            with self._lock:
                self._infos.pop(info.step, None)

    def _hold_step(self, snap: snapshot_mod.Snapshot, *_: Any) -> None:
        """Optimizer step pre-hook: the step waits until the snapshot's copies are done."""
        self.blocked_seconds += snap.wait_copied()

    def _release_holds(self) -> None:
        """Remove the optimizer hooks of snapshots whose copies are done (main thread only, so
        no hook list changes while a step runs them)."""
        keep_holds = []
        for handle, snap in self._holds:
            if snap.copied.is_set():
                handle.remove()
            else:
                keep_holds.append((handle, snap))
        self._holds = keep_holds

    def wait(self) -> None:
        """Block until every pending save is committed; raise a background failure if any."""
        try:
            self._writer.wait()
        finally:
            self._release_holds()

    def close(self) -> None:
        """Flush pending saves and free the snapshot buffers."""
        try:
            self.wait()
        finally:
            self._pool.clear()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    # ---------------------------------------------------------------- restoring

    def read(self, step: StepArg = "latest", *, verify: bool = True) -> dict[str, Any]:
        """The whole nested state of a checkpoint (model, optimizer, rng, extra, ...).
        Pending saves are committed first, so "latest" includes them."""
        self.wait()
        return self._read(self._resolve(step), verify)

    def _read(self, step: int, verify: bool) -> dict[str, Any]:
        path = self.path(step)
        _, state = files.load(self.storage, path, verify=verify)
        if not isinstance(state, dict):
            raise errors.FormatError("checkpoint state is not a dict", path=path,
                                     fix="use an intact checkpoint")
        return state

    def restore(
        self,
        step: StepArg = "latest",
        *,
        model: Any,
        optimizer: Any = None,
        scheduler: Any = None,
        scaler: Any = None,
        restore_rng: bool = True,
        strict: bool = True,
        verify: bool = True,
    ) -> Restored:
        """Load a checkpoint into the given objects (and the global RNGs, unless
        ``restore_rng=False``); return its step, extra and metrics. ``step`` is an int,
        "latest" or "best". Pending saves are committed first."""
        self.wait()
        found = self._resolve(step)
        state = self._read(found, verify)
        path = self.path(found)
        capture.apply(state, path=path, model=model, optimizer=optimizer, scheduler=scheduler,
                      scaler=scaler, restore_rng=restore_rng, strict=strict)
        return Restored(step=found, extra=state.get("extra"),
                        metrics=capture.metric_values(state.get("metrics")), path=path)

    # ---------------------------------------------------------------- rescue

    def import_torch_checkpoint(
        self,
        source: str | os.PathLike[str],
        step: int | None = None,
        *,
        trust: tuple[str, ...] = (),
        on_unknown: str = "error",
        overwrite: bool = False,
        storage_options: Mapping[str, Any] | None = None,
    ) -> int:
        """Import a ``torch.save`` training checkpoint, read without running its pickle, as a
        committed step of this directory; return the step. Its model, optimizer, scheduler and
        scaler states go to their roles, everything else to ``extra``."""
        source = os.fspath(source)
        data = reading.read(source, trust=trust, on_unknown=on_unknown, storage_options=storage_options)
        step, state = files.state_from_torch(data, step, source)
        self._check_step(step, overwrite)
        self._save_state(step, state)
        self.wait()
        return step


def _open(
    directory: str | os.PathLike[str], storage_options: Mapping[str, Any] | None
) -> tuple[stores.Storage, str]:
    store, folder = stores.resolve(directory, storage_options)
    return store, (os.path.abspath(folder) if store.local_path(folder) is not None else folder)


def _policy(keep_last: int | None, keep_best: int | None, keep_every: int | None,
            metric: str | None, mode: str) -> keep.Policy:
    return keep.from_options(keep_last, keep_best, keep_every, metric, mode)
