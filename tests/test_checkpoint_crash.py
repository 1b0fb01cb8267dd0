"""Crash safety: a training child is killed with SIGKILL at random moments; after every kill the
latest committed step restores bit-exactly and validates, no partial step is visible, and the
next run cleans up the leftovers and continues from there.

A CI-sized run is part of the normal suite; the full run (>= 100 kills) is marked slow
(MODELKEEP_SLOW=1). Storage failures (a real EFBIG from a file size limit, and injected ENOSPC/EIO
through the storage layer) surface as StorageError with earlier checkpoints intact.
"""

from __future__ import annotations

import errno
import json
import os
import queue
import random
import re
import resource
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

import modelkeep as mk
from modelkeep import atomic, storage
from modelkeep.checkpoint import manager

sys.path.insert(0, str(Path(__file__).parent))
import checkpoint_child as child  # noqa: E402

CHILD = Path(__file__).with_name("checkpoint_child.py")


class Reference:
    """The uninterrupted run, step by step: exact parameter/momentum bytes and losses."""

    def __init__(self) -> None:
        previous = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            self.model, self.optimizer = child.build()
            child.seed_run()
            self.rng = self._save_rng()
        finally:
            torch.set_num_threads(previous)
        self.fingerprints: list[list[bytes]] = []
        self.losses: list[float] = []

    @staticmethod
    def _save_rng() -> tuple:
        import numpy as np

        return torch.get_rng_state(), np.random.get_state(), random.getstate()

    @staticmethod
    def _load_rng(state: tuple) -> None:
        import numpy as np

        torch.set_rng_state(state[0])
        np.random.set_state(state[1])
        random.setstate(state[2])

    def upto(self, step: int) -> None:
        """Extend the reference to include ``step``, on the run's own RNG stream."""
        if len(self.losses) > step:
            return
        outer, previous = self._save_rng(), torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            self._load_rng(self.rng)
            while len(self.losses) <= step:
                self.losses.append(child.train_step(self.model, self.optimizer))
                self.fingerprints.append(child.fingerprint(self.model, self.optimizer))
            self.rng = self._save_rng()
        finally:
            self._load_rng(outer)
            torch.set_num_threads(previous)


class Zygote:
    """The forking parent of the training children, with a reader thread for its output."""

    def __init__(self) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
        self.process = subprocess.Popen(
            [sys.executable, str(CHILD)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, env=env,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.pending: list[str] = []  # lines read while looking for another one
        threading.Thread(target=self._read, daemon=True).start()
        self.errors: list[str] = []
        threading.Thread(target=self._read_errors, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:  # type: ignore[union-attr]
            self.lines.put(line.strip())

    def _read_errors(self) -> None:
        for line in self.process.stderr:  # type: ignore[union-attr]
            self.errors.append(line)

    def next_line(self) -> str:
        try:
            return self.lines.get(timeout=120)
        except queue.Empty:
            raise AssertionError("training child went silent: " + "".join(self.errors[-30:])) from None

    def start(self, directory: Path, steps: int) -> int:
        self.process.stdin.write(json.dumps({"directory": str(directory), "steps": steps}) + "\n")  # type: ignore[union-attr]
        self.process.stdin.flush()  # type: ignore[union-attr]
        return self.expect(lambda line: line.startswith('{"pid"'))["pid"]

    def expect(self, match) -> dict:
        while True:
            line = self.next_line()
            if match(line):
                return json.loads(line) if line.startswith("{") else {"line": line}
            self.pending.append(line)

    def close(self) -> None:
        self.process.stdin.close()  # type: ignore[union-attr]
        self.process.wait(timeout=60)


def committed_files(directory: Path) -> dict[int, Path]:
    return {int(m.group(1)): directory / name for name in os.listdir(directory)
            if (m := manager.STEP_FILE.match(name))}


def temp_files(directory: Path) -> list[str]:
    return [name for name in os.listdir(directory) if name.endswith(atomic.TEMP_SUFFIX)]


def validate(directory: Path, reference: Reference) -> int | None:
    """Every visible step verifies; the latest restores to exactly the uninterrupted run."""
    files = committed_files(directory)
    assert len(files) <= child.KEEP_LAST + 1, sorted(files)
    for step, path in files.items():
        report = mk.verify(path)
        assert report.ok, (step, report)
    if not files:
        return None
    latest = max(files)
    reference.upto(latest)
    model, optimizer = child.build()
    restored = _read_only(directory).restore(model=model, optimizer=optimizer, restore_rng=False)
    assert restored.step == latest
    assert child.fingerprint(model, optimizer) == reference.fingerprints[latest]
    assert restored.extra == {"loss": reference.losses[latest]}
    return latest


def _read_only(directory: Path) -> mk.Checkpointer:
    """A Checkpointer on ``directory`` that does not clean up, so the test sees what the next
    run has to deal with."""

    class NoCleanup(storage.LocalStorage):
        def remove_stale_temps(self, folder: str) -> list[str]:
            return []

    return mk.Checkpointer(str(directory), storage=NoCleanup(), keep_last=None)


def crash_trials(tmp_path: Path, trials: int, seed: int) -> dict[str, int]:
    rng = random.Random(seed)
    reference = Reference()
    directory = tmp_path / "run"
    directory.mkdir()
    zygote = Zygote()
    counts = {"kills": 0, "mid_write": 0, "before_ready": 0, "finished": 0, "resumed": 0}
    killed: list[int] = []
    latest: int | None = None
    try:
        for trial in range(trials):
            # Most runs would train forever and die by SIGKILL at a random moment; every sixth
            # is short and may also end normally.
            pid = zygote.start(directory, steps=5 if trial % 6 == 5 else 10**9)
            delay = rng.uniform(0.0, 0.4)
            start_step: list[int] = []
            timer = threading.Timer(delay, _kill, (pid,))
            timer.start()
            while True:
                line = zygote.pending.pop(0) if zygote.pending else zygote.next_line()
                if line.startswith(f"ready {pid} "):
                    start_step.append(int(line.split()[2]))
                    # the new run removed every leftover of the runs killed before it
                    leftovers = [n for n in temp_files(directory)
                                 if storage.temp_owner_pid(n) in killed]
                    assert not leftovers, leftovers
                elif line.startswith('{"exit"') and json.loads(line)["exit"] == pid:
                    status = json.loads(line)["status"]
                    break
            timer.cancel()
            assert not zygote.errors, "".join(zygote.errors)
            if start_step:
                assert start_step[0] == (0 if latest is None else latest + 1)
                counts["resumed"] += latest is not None
            else:
                counts["before_ready"] += 1
            if os.WIFSIGNALED(status):
                assert os.WTERMSIG(status) == signal.SIGKILL
                counts["kills"] += 1
                killed.append(pid)
                counts["mid_write"] += any(storage.temp_owner_pid(n) == pid for n in temp_files(directory))
            else:
                assert os.WEXITSTATUS(status) == 0
                counts["finished"] += 1
            new_latest = validate(directory, reference)
            assert latest is None or (new_latest is not None and new_latest >= latest)
            latest = new_latest
    finally:
        zygote.close()
    counts["last_step"] = latest if latest is not None else -1
    print(f"crash trials: {counts}")
    return counts


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def test_crash_safety_ci(tmp_path: Path) -> None:
    counts = crash_trials(tmp_path, trials=12, seed=5)
    assert counts["kills"] >= 10
    assert counts["last_step"] > 0


@pytest.mark.slow
def test_crash_safety_full(tmp_path: Path) -> None:
    counts = crash_trials(tmp_path, trials=125, seed=11)
    assert counts["kills"] >= 100
    assert counts["mid_write"] > 0


# ------------------------------------------------------------------------------------------
# Storage failures


def small_state(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Linear(32, 16)


def test_file_size_limit_surfaces_storage_error(tmp_path: Path) -> None:
    """A real EFBIG from the kernel (RLIMIT_FSIZE) mid-write: StorageError, nothing partial."""
    checkpointer = mk.Checkpointer(tmp_path, keep_last=1, async_save=False)
    model = small_state(0)
    checkpointer.save(0, model=model, extra={"pad": torch.zeros(1000)})
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, hard))
    try:
        with pytest.raises(mk.StorageError) as caught:
            checkpointer.save(1, model=small_state(1), extra={"pad": torch.zeros(200_000)})
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert caught.value.path.endswith("step-0000000001.safetensors")
    assert isinstance(caught.value.__cause__, OSError) and caught.value.__cause__.errno == errno.EFBIG
    assert checkpointer.steps() == [0] and not temp_files(tmp_path)
    fresh = small_state(9)
    checkpointer.restore(model=fresh)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in expected.items())
    checkpointer.save(1, model=model)  # the limit gone, saving works again and retention runs
    checkpointer.wait()
    assert checkpointer.steps() == [1]


class FaultyStorage(storage.LocalStorage):
    """Local storage that fails chosen operations the way a full or broken disk does: a write
    fails with ENOSPC after part of the file is on disk (inside the engine's real atomic
    commit, which must clean up), a delete with EIO."""

    def __init__(self) -> None:
        self.fail_writes = 0
        self.fail_deletes = 0

    def write_tensor_file(self, path, tensors, metadata):
        if self.fail_writes:
            self.fail_writes -= 1
            with storage.atomic_write(storage.LOCAL, path) as temp:
                os.write(temp.stream, b"\0" * 4096)
                raise OSError(errno.ENOSPC, "No space left on device")
        return super().write_tensor_file(path, tensors, metadata)

    def delete(self, path):
        if self.fail_deletes:
            self.fail_deletes -= 1
            raise mk.errors.storage_error(OSError(errno.EIO, "Input/output error"), path, "deleting")
        return super().delete(path)


@pytest.mark.parametrize("async_save", [False, True])
def test_disk_full_keeps_earlier_checkpoints(tmp_path: Path, async_save: bool) -> None:
    faulty = FaultyStorage()
    checkpointer = mk.Checkpointer(tmp_path, storage=faulty, keep_last=1, async_save=async_save)
    model = small_state(0)
    checkpointer.save(0, model=model)
    checkpointer.wait()
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    faulty.fail_writes = 1
    with torch.no_grad():
        model.weight.add_(1)
    if async_save:
        checkpointer.save(1, model=model)  # the failure happens in the background ...
        with pytest.raises(mk.StorageError) as caught:
            checkpointer.wait()  # ... and is raised here, once
        checkpointer.wait()
    else:
        with pytest.raises(mk.StorageError) as caught:
            checkpointer.save(1, model=model)
    assert "No space left" in str(caught.value) and "free disk space" in str(caught.value)
    assert checkpointer.steps() == [0]  # nothing partial visible, nothing deleted
    fresh = small_state(5)
    checkpointer.restore(model=fresh)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in saved.items())
    assert not temp_files(tmp_path)
    checkpointer.save(1, model=model)  # the disk has room again
    checkpointer.wait()
    assert checkpointer.steps() == [1]


def test_failed_delete_is_reported_and_checkpoints_stay(tmp_path: Path) -> None:
    faulty = FaultyStorage()
    checkpointer = mk.Checkpointer(tmp_path, storage=faulty, keep_last=1)
    model = small_state(0)
    checkpointer.save(0, model=model)
    faulty.fail_deletes = 1
    checkpointer.save(1, model=model)
    with pytest.raises(mk.StorageError) as caught:
        checkpointer.save(2, model=model)  # raised on the next save, which is not started
    assert any("only removing old step 0 failed" in note for note in caught.value.__notes__)
    assert checkpointer.steps() == [0, 1]
    checkpointer.save(2, model=model)
    checkpointer.wait()
    assert checkpointer.steps() == [2]


def test_commit_is_atomic_under_interrupted_rename(tmp_path: Path, monkeypatch) -> None:
    """If the process dies between the write and the rename, the step is simply absent."""
    checkpointer = mk.Checkpointer(tmp_path, async_save=False)
    model = small_state(0)
    checkpointer.save(0, model=model)

    def no_rename(src, dst):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "replace", no_rename)
    with pytest.raises(mk.StorageError):
        checkpointer.save(1, model=model)
    monkeypatch.undo()
    assert checkpointer.steps() == [0] and not temp_files(tmp_path)
    assert re.fullmatch(r"step-\d{10}\.safetensors", os.listdir(tmp_path)[0])
