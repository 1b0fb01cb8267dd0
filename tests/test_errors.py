"""The exception tree and the one OSError -> StorageError mapping (``modelkeep.errors``)."""

from __future__ import annotations

import builtins
import errno
import importlib
import pickle
import os
import re
from pathlib import Path

import pytest
import torch

import modelkeep as mk
from modelkeep import errors


# ---------------------------------------------------------------------------- the tree


def drawn_tree() -> list[tuple[int, str, str | None]]:
    """(depth, class name, built-in base or None) for each line of the docstring's tree."""
    rows = []
    for line in (errors.__doc__ or "").splitlines():
        match = re.match(r"^ {4}((?:[│ ]   )*)(?:[├└]── )?([A-Z]\w+Error)(?: \(([\w.]+)\))?", line)
        if match:
            depth = len(match.group(1)) // 4 + (1 if "──" in line else 0)
            rows.append((depth, match.group(2), match.group(3)))
    return rows


def test_the_drawn_tree_is_every_class_with_its_bases() -> None:
    rows = drawn_tree()
    classes = {name: value for name, value in vars(errors).items()
               if isinstance(value, type) and issubclass(value, errors.ModelkeepError)}
    assert sorted(name for _, name, _ in rows) == sorted(classes)
    parents: list[str] = []
    for depth, name, builtin in rows:
        parents[depth:] = [name]
        expected: list[type] = [classes[parents[depth - 1]]] if depth else []
        if builtin is not None:  # a built-in, or a dotted name such as pickle.UnpicklingError
            module, _, attr = builtin.rpartition(".")
            expected.append(getattr(importlib.import_module(module) if module else builtins, attr))
        assert list(classes[name].__bases__) == expected, name


def test_the_tree_parser_sees_nesting() -> None:
    rows = {name: (depth, builtin) for depth, name, builtin in drawn_tree()}
    assert rows["ModelkeepError"] == (0, "Exception")
    assert rows["UnsafeContentError"] == (2, "pickle.UnpicklingError")
    assert rows["MissingFileError"] == (2, "FileNotFoundError")
    assert rows["StepNotFoundError"] == (3, None)


def test_every_class_is_exported_at_the_top() -> None:
    for name in errors.__all__:
        value = getattr(errors, name)
        if isinstance(value, type):
            assert getattr(mk, name) is value


def test_errors_inherit_the_builtins_callers_catch() -> None:
    assert issubclass(mk.FormatError, ValueError)
    assert issubclass(mk.StorageError, OSError)
    assert issubclass(mk.KeyMismatchError, KeyError)
    assert issubclass(mk.InvalidArgumentError, ValueError)
    assert issubclass(mk.StepExistsError, FileExistsError) and issubclass(mk.StepExistsError, mk.StorageError)
    assert issubclass(mk.StepNotFoundError, FileNotFoundError) and issubclass(mk.StepNotFoundError, mk.StorageError)


# ---------------------------------------------------------------------------- structured fields


def test_unsafe_content_error_declares_its_globals() -> None:
    error = mk.UnsafeContentError("x", path="f.pt", globals=[("os.system", ["byte 12"])])
    assert error.globals == [("os.system", ["byte 12"])]
    assert mk.UnsafeContentError("x").globals == []
    assert "globals" in mk.UnsafeContentError.__annotations__


def test_key_mismatch_error_carries_the_load_report(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    mk.save_weights(torch.nn.Linear(2, 3), path)
    with pytest.raises(mk.KeyMismatchError) as caught:
        mk.load_weights(torch.nn.Linear(2, 4), path)
    report = caught.value.report
    assert isinstance(report, mk.LoadReport)
    assert sorted(name for name, _, _ in report.shape_mismatches) == ["bias", "weight"]
    assert mk.KeyMismatchError("x").report is None


# ---------------------------------------------------------------------------- the mapping


@pytest.mark.parametrize(
    ("code", "words", "fix", "cls"),
    [
        (errno.ENOENT, "no such file", "check the path", mk.MissingFileError),
        (errno.EISDIR, "is a folder, not a file", "name a file", mk.IsAFolderError),
        (errno.ENOTDIR, "not a folder", "check the path", mk.NotAFolderError),
        (errno.EEXIST, "already exists", "another name", mk.FileExistsStorageError),
        (errno.EACCES, "permission denied", "permissions", mk.PermissionStorageError),
        (errno.EPERM, "not permitted", "permissions", mk.PermissionStorageError),
        (errno.ENOSPC, "No space left", "free disk space", mk.StorageError),
        (errno.EDQUOT, os.strerror(errno.EDQUOT), "free quota", mk.StorageError),
        (errno.EFBIG, os.strerror(errno.EFBIG), "ulimit -f", mk.StorageError),
        (errno.EROFS, "read-only file system", "writable location", mk.StorageError),
        (errno.EIO, "Input/output error", "I/O error", mk.StorageError),
    ],
)
def test_storage_error_says_the_reason_and_fix_per_errno(code: int, words: str, fix: str, cls: type) -> None:
    cause = OSError(code, os.strerror(code))
    error = errors.storage_error(cause, "/data/w.safetensors", "writing")
    assert type(error) is cls  # the most specific class, so the built-in ``except`` clauses work
    assert error.path == "/data/w.safetensors" and error.errno == code
    assert error.what.startswith("writing failed: ") and words in error.what
    assert error.fix is not None and fix in error.fix


def test_an_unknown_errno_keeps_the_os_words() -> None:
    error = errors.storage_error(OSError(errno.ECONNRESET, "Connection reset by peer"), "s3://b/k", "reading")
    assert error.what == "reading failed: Connection reset by peer" and error.errno == errno.ECONNRESET
    assert error.fix


def test_backend_errors_without_errno_are_mapped_by_class() -> None:
    # fsspec backends raise the built-in subclasses with only a message.
    error = errors.storage_error(FileNotFoundError("memory://x/y"), "memory://x/y", "reading")
    assert "no such file" in error.what and error.errno == errno.ENOENT
    assert isinstance(error, FileNotFoundError)


def _os_refuses(path: str) -> bool:
    try:
        with open(path, "rb") as stream:
            stream.read(1)
    except PermissionError:
        return True
    except OSError:
        return False
    return False


def test_code_written_around_torch_load_catches_ours(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        mk.read(tmp_path / "missing.pth")
    with pytest.raises(FileNotFoundError):
        mk.load_state_dict(str(tmp_path / "missing.safetensors"))
    if _os_refuses("/proc/1/mem"):  # refused even to root (another process's memory)
        with pytest.raises(PermissionError):
            mk.read("/proc/1/mem")
    path = tmp_path / "evil.pth"
    path.write_bytes(b"\x80\x02cos\nsystem\nq\x00X\x02\x00\x00\x00idq\x01\x85q\x02Rq\x03.")
    with pytest.raises(pickle.UnpicklingError):  # as torch.load(weights_only=True) raises
        mk.read(path)
    assert "permission denied" in errors.storage_error(PermissionError("no"), "p", "listing").what
    plain = errors.storage_error(RuntimeError("bucket gone"), "s3://b", "listing")
    assert plain.what == "listing failed: bucket gone" and plain.errno is None


def test_modelkeep_errors_pass_through_unchanged() -> None:
    original = mk.StepExistsError("step 3 is already saved", path="p")
    assert errors.storage_error(original, "q", "writing") is original
    with pytest.raises(mk.StepExistsError) as caught:
        with errors.map_os_errors("q", "writing"):
            raise original
    assert caught.value is original
    with pytest.raises(mk.FormatError):
        with errors.map_os_errors("q", "reading"):
            raise mk.FormatError("bad header")


def test_map_os_errors_chains_the_cause_and_leaves_other_errors_alone(tmp_path: Path) -> None:
    missing = tmp_path / "missing.bin"
    with pytest.raises(mk.StorageError) as caught:
        with errors.map_os_errors(missing, "reading"):
            open(missing, "rb")
    assert isinstance(caught.value.__cause__, FileNotFoundError)
    assert caught.value.path == str(missing) and "no such file" in str(caught.value)
    with pytest.raises(ValueError, match="not storage"):
        with errors.map_os_errors(missing, "reading"):
            raise ValueError("not storage")


def test_map_os_errors_maps_the_extra_classes_asked_for() -> None:
    class BackendError(Exception):
        pass

    with pytest.raises(mk.StorageError, match="deleting failed: throttled") as caught:
        with errors.map_os_errors("s3://b/k", "deleting", also=(BackendError,)):
            raise BackendError("throttled")
    assert isinstance(caught.value.__cause__, BackendError)



def test_checkpoint_step_errors_are_typed(tmp_path: Path) -> None:
    checkpointer = mk.Checkpointer(tmp_path, async_save=False)
    model = torch.nn.Linear(2, 2)
    with pytest.raises(FileNotFoundError) as nothing:
        checkpointer.restore(model=model)
    assert type(nothing.value) is mk.StepNotFoundError and "no checkpoint to restore" in str(nothing.value)
    checkpointer.save(1, model=model)
    with pytest.raises(FileExistsError) as exists:
        checkpointer.save(1, model=model)
    assert type(exists.value) is mk.StepExistsError and exists.value.path == checkpointer.path(1)
    with pytest.raises(mk.StepNotFoundError, match="step 7"):
        checkpointer.restore(7, model=model)


@pytest.mark.parametrize(
    ("make", "item"),
    [
        (lambda d: mk.Checkpointer(d, mode="median"), "mode"),
        (lambda d: mk.Checkpointer(d, snapshot="lazy"), "snapshot"),
        (lambda d: mk.Checkpointer(d, max_in_flight=0), "max_in_flight"),
        (lambda d: mk.Checkpointer(d, keep_best=2), "metric"),
        (lambda d: mk.Checkpointer(d).best(), "metric"),
        (lambda d: mk.Checkpointer(d).save(-1, model=torch.nn.Linear(1, 1)), "step"),
        (lambda d: mk.Checkpointer(d).restore("first", model=torch.nn.Linear(1, 1)), "step"),
        (lambda d: mk.KeepLast(0), "KeepLast(n)"),
        (lambda d: mk.KeepBest(1, "loss", mode="median"), "mode"),
    ],
)
def test_bad_checkpoint_arguments_are_invalid_argument_errors(tmp_path: Path, make, item: str) -> None:
    with pytest.raises(mk.InvalidArgumentError) as caught:
        make(tmp_path)
    assert isinstance(caught.value, ValueError)
    assert caught.value.item == item and caught.value.fix


def test_combining_a_policy_with_a_non_policy_is_a_type_error() -> None:
    with pytest.raises(TypeError):
        mk.KeepLast(1) | 3  # type: ignore[operator]
