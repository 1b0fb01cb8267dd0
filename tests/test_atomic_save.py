"""Saving is atomic: a crash, an exception or a full disk leaves the previous file or the new
one, never a torn file, and no temporary file that a later save would trip on.

The crash tests run a fresh Python that saves over a good file and kill it with SIGKILL at given
moments: the child wraps the os-level write/fsync/rename calls and stops at a named moment, so
each moment is hit deterministically (no sleeps decide what is tested).
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

import modelkeep as mk
from modelkeep import atomic, errors

from helpers import assert_state_same

TENSORS = 24
ELEMENTS = 1 << 18  # 1 MB of float32 per tensor: 24 MB per file


def version(k: int) -> dict[str, torch.Tensor]:
    """State dict number ``k``: every value encodes k, so a file shows which version it holds."""
    return {f"layer{i}.weight": torch.full((ELEMENTS,), float(k * 1000 + i)) for i in range(TENSORS)}


CHILD = textwrap.dedent(
    """
    import os, sys, time
    import torch
    import modelkeep as mk

    path, stop_at, k = sys.argv[1], sys.argv[2], int(sys.argv[3])
    state = {f"layer{i}.weight": torch.full((%(elements)d,), float(k * 1000 + i)) for i in range(%(tensors)d)}
    total = sum(t.nbytes for t in state.values())
    written = 0

    def stop(moment):
        if moment == stop_at:
            sys.stdout.write("at " + moment + "\\n")
            sys.stdout.flush()
            time.sleep(600)

    def counting(original):
        def wrapper(fd, data, *rest):
            global written
            count = original(fd, data, *rest)
            written += count if isinstance(count, int) else 0
            stop("first-write")
            if written >= total // 2:
                stop("half")
            return count
        return wrapper

    for name in ("write", "pwrite", "writev", "pwritev"):
        if hasattr(os, name):
            setattr(os, name, counting(getattr(os, name)))
    real_fsync, real_fdatasync = os.fsync, os.fdatasync
    real_replace, real_rename = os.replace, os.rename

    def fsync(fd):
        stop("before-fsync")
        return real_fsync(fd)

    def fdatasync(fd):
        stop("before-fsync")
        return real_fdatasync(fd)

    def replace(src, dst, *rest, **kw):
        stop("before-rename")
        real_replace(src, dst, *rest, **kw)
        stop("after-rename")

    def rename(src, dst, *rest, **kw):
        stop("before-rename")
        real_rename(src, dst, *rest, **kw)
        stop("after-rename")

    os.fsync, os.fdatasync, os.replace, os.rename = fsync, fdatasync, replace, rename
    sys.stdout.write("saving\\n")
    sys.stdout.flush()
    if stop_at == "loop":
        while True:
            k += 1
            state = {name: t.fill_(float(k * 1000 + i)) for i, (name, t) in enumerate(state.items())}
            mk.save_weights(state, path)
    mk.save_weights(state, path)
    sys.stdout.write("done\\n")
    """
) % {"elements": ELEMENTS, "tensors": TENSORS}

MOMENTS = ["first-write", "half", "before-fsync", "before-rename", "after-rename"]


def _start(path: str, moment: str, k: int) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, path, moment, str(k)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def _temps(folder) -> list[str]:
    return sorted(name for name in os.listdir(folder) if name.endswith(atomic.TEMP_SUFFIX))


def _held_version(path: str) -> int:
    """Which complete version the file holds; fails on anything torn or mixed."""
    assert mk.verify(path).ok
    state = mk.load_state_dict(path)
    k = int(state["layer0.weight"][0].item()) // 1000
    assert_state_same(state, version(k))
    return k


def test_kill_at_each_moment_of_a_save(tmp_path):
    children = {}
    for moment in MOMENTS:
        folder = tmp_path / moment
        folder.mkdir()
        path = str(folder / "model.safetensors")
        mk.save_weights(version(1), path)
        children[moment] = (path, _start(path, moment, 2))
    try:
        for moment, (path, child) in children.items():
            assert child.stdout.readline() == "saving\n", child.stderr.read()
            line = child.stdout.readline()
            assert line == f"at {moment}\n", (
                f"the save never reached {moment!r} (got {line!r}); stderr: {child.stderr.read()[-2000:]}"
            )
            child.send_signal(signal.SIGKILL)
            child.wait(timeout=60)
    finally:
        for _, child in children.values():
            if child.poll() is None:
                child.kill()
                child.wait()
            child.stdout.close()
            child.stderr.close()

    for moment, (path, _) in children.items():
        folder = os.path.dirname(path)
        expected = 2 if moment == "after-rename" else 1
        assert _held_version(path) == expected, moment
        if moment != "after-rename":
            assert len(_temps(folder)) == 1, moment  # the dead writer's temp file
        # A later save succeeds and clears what the killed one left behind.
        mk.save_weights(version(3), path)
        assert _held_version(path) == 3
        assert _temps(folder) == [], moment
        assert sorted(os.listdir(folder)) == ["model.safetensors"]


def test_kill_a_saving_loop_at_random_moments(tmp_path):
    """Repeated saves over one file, killed after varying delays: whatever the moment, the file
    is one complete version."""
    runs = []
    for delay in (0.1, 0.4):
        folder = tmp_path / f"delay-{delay}"
        folder.mkdir()
        path = str(folder / "model.safetensors")
        mk.save_weights(version(1), path)
        runs.append((path, delay, _start(path, "loop", 1)))
    try:
        for path, delay, child in runs:
            assert child.stdout.readline() == "saving\n", child.stderr.read()
        for path, delay, child in runs:
            try:
                child.wait(timeout=delay)
            except subprocess.TimeoutExpired:
                pass
            child.send_signal(signal.SIGKILL)
            child.wait(timeout=60)
    finally:
        for _, _, child in runs:
            if child.poll() is None:
                child.kill()
                child.wait()
            child.stdout.close()
            child.stderr.close()
    for path, _, _ in runs:
        assert _held_version(path) >= 1
        mk.save_weights(version(5), path)
        assert _held_version(path) == 5
        assert os.listdir(os.path.dirname(path)) == ["model.safetensors"]


# --------------------------------------------------------------------------------------------
# Failures inside this process


def _good(tmp_path) -> tuple[str, bytes]:
    path = str(tmp_path / "model.safetensors")
    mk.save_weights(version(1), path)
    with open(path, "rb") as stream:
        return path, stream.read()


def _unchanged(path: str, content: bytes) -> None:
    with open(path, "rb") as stream:
        assert stream.read() == content
    assert _temps(os.path.dirname(path)) == []


class _FailsWhenRead(torch.Tensor):
    """A tensor that passes every check but fails when its bytes are taken."""

    folder = ""
    temps_at_failure: list[str] = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in {"detach", "contiguous", "data_ptr", "numpy", "cpu", "to", "clone", "view"}:
            cls.temps_at_failure = _temps(cls.folder)
            raise RuntimeError("boom: tensor failed mid-stream")
        return super().__torch_function__(func, types, args, kwargs or {})


def test_exception_mid_stream_leaves_destination_untouched(tmp_path):
    path, content = _good(tmp_path)
    state = dict(version(2))
    state["zzz.bad"] = torch.ones(4).as_subclass(_FailsWhenRead)
    _FailsWhenRead.folder = str(tmp_path)
    with pytest.raises(RuntimeError, match="boom"):
        mk.save_weights(state, path)
    assert len(_FailsWhenRead.temps_at_failure) == 1  # it failed while streaming
    _unchanged(path, content)


def _fail_writes_beyond(monkeypatch, limit: int, error: BaseException) -> list[int]:
    """Make every os-level write fail once the file would pass ``limit`` bytes (a disk that fills
    up, or a device that fails), whichever write call the engine uses. Returns the bytes that
    were written before the failure, as a one-element list."""
    written = [0]

    def size_of(name, args):
        if name in ("writev", "pwritev"):
            return sum(memoryview(b).nbytes for b in args[1])
        return memoryview(args[1]).nbytes

    def wrap(name, original):
        def wrapper(*args):
            if written[0] + size_of(name, args) > limit:
                raise error
            count = original(*args)
            written[0] += count
            return count

        return wrapper

    for name in ("write", "writev", "pwrite", "pwritev"):
        if hasattr(os, name):
            monkeypatch.setattr(os, name, wrap(name, getattr(os, name)))
    return written


def test_write_error_mid_stream_leaves_destination_untouched(tmp_path, monkeypatch):
    path, content = _good(tmp_path)
    written = _fail_writes_beyond(monkeypatch, 4 << 20, RuntimeError("boom: interrupted"))
    with pytest.raises(RuntimeError, match="boom"):
        mk.save_weights(version(2), path)
    monkeypatch.undo()
    assert written[0] > 0  # the header (at least) went out before the failure
    _unchanged(path, content)


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT, errno.EIO])
def test_disk_full_is_a_storage_error(tmp_path, monkeypatch, code):
    path, content = _good(tmp_path)
    written = _fail_writes_beyond(monkeypatch, 4 << 20, OSError(code, os.strerror(code)))
    with pytest.raises(errors.StorageError) as caught:
        mk.save_weights(version(2), path)
    monkeypatch.undo()
    assert written[0] > 0
    assert isinstance(caught.value, OSError)
    assert caught.value.path == path and caught.value.fix
    if code == errno.ENOSPC:
        assert "untouched" in str(caught.value)
    _unchanged(path, content)
    assert _held_version(path) == 1


def test_fsync_failure_is_a_storage_error(tmp_path, monkeypatch):
    path, content = _good(tmp_path)

    def failing_fsync(fd):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(errors.StorageError):
        mk.save_weights(version(2), path)
    monkeypatch.undo()
    _unchanged(path, content)


def test_missing_folder(tmp_path):
    path = str(tmp_path / "no" / "such" / "model.safetensors")
    with pytest.raises(errors.StorageError) as caught:
        mk.save_weights(version(1), path)
    assert caught.value.path == path and "folder" in str(caught.value)
    assert os.listdir(tmp_path) == []


def test_destination_is_a_folder(tmp_path):
    target = tmp_path / "model.safetensors"
    target.mkdir()
    (target / "keep").write_text("x")
    with pytest.raises(errors.StorageError):
        mk.save_weights(version(1), str(target))
    assert os.listdir(target) == ["keep"]
    assert os.listdir(tmp_path) == ["model.safetensors"]


def test_replacing_keeps_permissions_and_writes_through_symlinks(tmp_path) -> None:
    import os
    import stat

    import torch

    import modelkeep as mk

    target = tmp_path / "real.safetensors"
    mk.save_weights({"a": torch.ones(2)}, target)
    os.chmod(target, 0o600)
    link = tmp_path / "link.safetensors"
    link.symlink_to(target)
    mk.save_weights({"a": torch.zeros(2)}, link)
    assert link.is_symlink()
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o600
    assert torch.equal(mk.load_state_dict(target)["a"], torch.zeros(2))


def test_very_long_file_names_save(tmp_path) -> None:
    import torch

    import modelkeep as mk

    path = tmp_path / ("w" * 240 + ".safetensors")
    mk.save_weights({"a": torch.ones(3)}, path)
    mk.save_weights({"a": torch.full((3,), 2.0)}, path)
    assert torch.equal(mk.load_state_dict(path)["a"], torch.full((3,), 2.0))
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
