"""Temporary names, stale-temp cleanup, the atomic commit and the hashed writer (modelkeep.atomic)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import modelkeep as mk
from modelkeep import atomic, errors, format, hashing, storage


def _dead_pid() -> int:
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True, check=True)
    return int(finished.stdout)


@pytest.mark.parametrize("name", ["model", "model.v2.safetensors", "a.", "x-1.2-3", "ünï.bin"])
def test_temp_name_round_trip(name):
    written = atomic.temp_name(name, pid=4321, token="0123abcd")
    assert written == f".{name}.4321-0123abcd{atomic.TEMP_SUFFIX}"
    assert atomic.parse_temp_name(written) == (name, 4321)
    assert storage.temp_owner_pid(written) == 4321


def test_long_names_are_shortened_within_name_max_and_still_parse():
    name = "w" * 240 + ".safetensors"
    written = atomic.temp_name(name, pid=99, token="ffffffff")
    assert len(written.encode()) <= 255
    stem, pid = atomic.parse_temp_name(written)
    assert pid == 99 and stem == atomic.temp_stem(name) and stem != name
    assert stem.startswith("w" * 100 + "~")
    other = "w" * 240 + ".safetensorz"  # same first 100 characters, other name
    assert atomic.temp_stem(other) != stem
    multibyte = "é" * 150  # 300 UTF-8 bytes in 150 characters
    assert len(atomic.temp_name(multibyte).encode()) <= 255


@settings(max_examples=200, deadline=None)
@given(
    name=st.text(st.characters(blacklist_characters="/\x00", blacklist_categories=("Cs",)), min_size=1, max_size=300),
    pid=st.integers(0, 2**22),
    token=st.text("0123456789abcdef", min_size=8, max_size=8),
)
def test_temp_name_round_trip_property(name, pid, token):
    written = atomic.temp_name(name, pid=pid, token=token)
    assert atomic.parse_temp_name(written) == (atomic.temp_stem(name), pid)


def test_default_temp_name_is_this_process_and_random():
    first, second = atomic.temp_name("m"), atomic.temp_name("m")
    assert first != second
    assert atomic.parse_temp_name(first) == ("m", os.getpid())


@pytest.mark.parametrize("name", [
    "model", ".model", "model.mk-tmp", ".model.12-0123abcd", ".model.12-notours.mk-tmp",
    ".model.12-0123ABCD.mk-tmp", ".model.x12-0123abcd.mk-tmp", ".model.12-0123abc.mk-tmp",
    "..12-0123abcd.mk-tmp", ".12-0123abcd.mk-tmp", ".model.١٢-0123abcd.mk-tmp",
])
def test_other_names_do_not_parse(name):
    assert atomic.parse_temp_name(name) is None
    assert storage.temp_owner_pid(name) is None


def test_bad_tokens_and_pids_are_refused():
    with pytest.raises(ValueError):
        atomic.temp_name("m", token="xyz")
    with pytest.raises(ValueError):
        atomic.temp_name("m", pid=-1)


def test_stale_temps_of_other_files_and_live_writers_are_kept(tmp_path):
    """Only temp files of this destination whose writer is gone are removed (moved here from
    test_atomic_save)."""
    path = str(tmp_path / "model")
    dead = _dead_pid()
    stale = atomic.temp_name("model", pid=dead, token="0123abcd")
    live = atomic.temp_name("model", pid=os.getppid(), token="0123abcd")  # our parent is alive
    mine = atomic.temp_name("model", token="0123abcd")  # this process
    other_file = atomic.temp_name("model.v2", pid=dead, token="0123abcd")  # a temp of "model.v2"
    odd = f".model.{dead}-notours{atomic.TEMP_SUFFIX}"
    for name in (stale, live, mine, other_file, odd):
        (tmp_path / name).write_bytes(b"partial")
    mk.save_weights({"w": torch.ones(2)}, path)
    assert sorted(os.listdir(tmp_path)) == sorted(["model", live, mine, other_file, odd])
    assert atomic.remove_stale_temps(path) == []


def test_stale_temps_of_long_names_are_removed(tmp_path):
    path = str(tmp_path / ("n" * 230))
    stale = atomic.temp_name("n" * 230, pid=_dead_pid())
    (tmp_path / stale).write_bytes(b"partial")
    assert atomic.remove_stale_temps(path) == [stale]
    assert os.listdir(tmp_path) == []


def test_process_alive():
    assert atomic.process_alive(os.getpid())
    assert atomic.process_alive(os.getppid())
    assert not atomic.process_alive(_dead_pid())


def test_atomic_file_commits_keeps_permissions_and_writes_through_symlinks(tmp_path):
    target = tmp_path / "real"
    target.write_bytes(b"old")
    os.chmod(target, 0o600)
    link = tmp_path / "link"
    link.symlink_to(target)
    with storage.atomic_write(storage.LOCAL, str(link)) as temp:
        os.write(temp.stream, b"new bytes")
    assert link.is_symlink() and target.read_bytes() == b"new bytes"
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o600
    assert sorted(os.listdir(tmp_path)) == ["link", "real"]


def test_atomic_file_failure_leaves_the_old_file_and_no_temp(tmp_path):
    target = tmp_path / "f"
    target.write_bytes(b"old")
    with pytest.raises(ZeroDivisionError):
        with storage.atomic_write(storage.LOCAL, str(target)) as temp:
            os.write(temp.stream, b"partial")
            raise ZeroDivisionError
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["f"]


def test_atomic_file_missing_folder_is_a_storage_error(tmp_path):
    with pytest.raises(errors.StorageError) as caught:
        with storage.atomic_write(storage.LOCAL, str(tmp_path / "absent" / "f")):
            pass
    assert "create" in caught.value.fix


@pytest.mark.parametrize("with_hashes", [True, False])
def test_write_file_records_digests_of_the_bytes(tmp_path, with_hashes):
    tensors = [("a", torch.arange(12, dtype=torch.float32).reshape(3, 4)), ("b", torch.ones(5, 2).t()),
               ("c", torch.empty(0))]
    path = str(tmp_path / "w.safetensors")
    digests = storage.LOCAL.write_tensor_file(path, tensors, {"k": "v"}, with_hashes=with_hashes)
    header = format.read_header_file(path)
    with open(path, "rb") as stream:
        data = stream.read()
    for name, tensor in tensors:
        entry = header.entries[name]
        expected = tensor.contiguous().numpy().tobytes()
        assert data[entry.begin : entry.end] == expected
        assert digests[name] == hashing.digest(expected)
    assert header.metadata["k"] == "v"
    record = hashing.read_record(header)
    if with_hashes:
        assert record is not None and dict(record.tensors) == digests
    else:
        assert record is None
