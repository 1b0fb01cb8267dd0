"""The storage primitives and the writer above them, the same on every backend."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import modelkeep as mk
from modelkeep import format, storage
from modelkeep.sources import ranges
from places import Place


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


TENSORS = [("a", torch.arange(6, dtype=torch.float32).reshape(2, 3)), ("b", torch.tensor(7)),
           ("c", torch.ones(3, 2, dtype=torch.float16).t())]  # non-contiguous: written in C order


def test_primitives_and_the_writer(place: Place, tmp_path_factory) -> None:
    store, folder = storage.resolve(place.root, place.options)
    assert store.list_names(folder) == [] and store.isdir(folder)
    path = store.join(folder, "x.safetensors")
    assert not store.exists(path)
    digests = store.write_tensor_file(path, TENSORS, {"k": "v"})
    assert store.list_names(folder) == ["x.safetensors"] and store.exists(path) and not store.isdir(path)
    header = store.read_header(path)
    assert header.metadata["k"] == "v" and list(header.entries) == ["a", "b", "c"]
    assert store.size(path) == header.file_size
    read = ranges.read_tensors(store, path, list(header.entries.values()))
    assert all(torch.equal(read[name], tensor) for name, tensor in TENSORS)
    reference = tmp_path_factory.mktemp("reference") / "reference.safetensors"  # every backend writes the same bytes
    assert storage.LOCAL.write_tensor_file(str(reference), TENSORS, {"k": "v"}) == digests
    with store.open_read(path) as stream:
        assert stream.read() == reference.read_bytes()
    assert store.read_head(path, 8) == reference.read_bytes()[:8]
    store.remove(path)
    store.remove(path)  # removing what is gone is not an error
    assert store.list_names(folder) == []


def test_ranged_reads_convert_and_report_progress(place: Place) -> None:
    path = place.path("x.safetensors")
    mk.save_weights(dict(TENSORS), path, storage_options=place.options)
    store, where = storage.resolve(path, place.options)
    entries = store.read_header(where).entries
    into = {"a": torch.empty(2, 3, dtype=torch.float64), "b": torch.empty((), dtype=torch.int64),
            "c": torch.empty(3, 2, dtype=torch.float16).t()}  # another dtype; a strided destination
    seen: list[int] = []
    total = ranges.read_into(store, where, [(entries[n], t) for n, t in into.items()], progress=seen.append)
    assert total == sum(e.nbytes for e in entries.values()) == sum(seen)
    assert all(torch.equal(into[name], tensor.to(into[name].dtype)) for name, tensor in TENSORS)


def test_stale_temps_of_dead_writers_are_removed(place: Place) -> None:
    store, folder = storage.resolve(place.root, place.options)
    stale = store.join(folder, f".x.safetensors.{dead_pid()}-0badcafe.mk-tmp")
    live = store.join(folder, f".x.safetensors.{os.getpid()}-0badcafe.mk-tmp")
    for temp in (stale, live):
        storage.write_bytes(store, temp, b"partial")
    assert store.remove_stale_temps(folder) == [stale.rsplit("/", 1)[-1]]
    assert store.list_names(folder) == [live.rsplit("/", 1)[-1]]


def test_a_failed_write_leaves_nothing_behind(place: Place) -> None:
    store, folder = storage.resolve(place.root, place.options)
    path = store.join(folder, "x.bin")
    storage.write_bytes(store, path, b"old")
    with pytest.raises(ZeroDivisionError):
        with storage.atomic_write(store, path) as temp:
            store.write(temp, [b"new, never committed"])
            raise ZeroDivisionError
    with store.open_read(path) as stream:
        assert stream.read() == b"old"
    assert store.list_names(folder) == ["x.bin"]


def test_unsupported_dtypes_are_refused_before_anything_is_written(place: Place) -> None:
    store, folder = storage.resolve(place.root, place.options)
    with pytest.raises(mk.UnsupportedValueError):
        store.write_tensor_file(store.join(folder, "q.safetensors"),
                                [("q", torch.quantize_per_tensor(torch.ones(2), 0.1, 0, torch.qint8))], {})
    assert store.list_names(folder) == []


@pytest.mark.parametrize("location, kind", [
    ("model.safetensors", storage.LocalStorage),
    ("file:///tmp/model.safetensors", storage.LocalStorage),
    ("memory://bucket/model.safetensors", storage.FsspecStorage),
])
def test_resolve(location: str, kind: type) -> None:
    store, path = storage.resolve(location)
    assert isinstance(store, kind) and not path.startswith("file://")
    assert storage.is_url(location) == (kind is storage.FsspecStorage)


def test_an_unknown_scheme_is_a_storage_error() -> None:
    with pytest.raises(mk.StorageError) as caught:
        storage.resolve("nosuchscheme://bucket/model.safetensors")
    assert "nosuchscheme" in str(caught.value) and caught.value.fix


def test_temp_names_are_parsed_by_the_one_parser() -> None:
    assert storage.temp_owner_pid(f".m.safetensors.{os.getpid()}-0badcafe.mk-tmp") == os.getpid()
    assert storage.temp_owner_pid(".m.safetensors.12-notours.mk-tmp") is None
    assert format.PREFIX == "modelkeep."
