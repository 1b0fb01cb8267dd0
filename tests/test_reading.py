"""The one read dispatch: every kind of file becomes a TensorSource, on every backend."""

from __future__ import annotations

import io
import json

import pytest
import torch
from torch import nn

import modelkeep as mk
from modelkeep import reading
from modelkeep.sources.base import TensorSource
from places import Place


def _torch(value) -> bytes:  # noqa: ANN001
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def _state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {"a": torch.randn(3, 2), "b": torch.arange(4)}


def _files(place: Place) -> dict[str, str]:
    """One file of each kind holding ``_state()`` (the checkpoint as its model)."""
    state = _state()
    mk.save_weights(state, place.path("w.safetensors"), storage_options=place.options)
    place.put("w.pt", _torch({"state_dict": state, "epoch": 1}))
    place.makedirs("shards")
    mk.convert(place.path("w.safetensors"), place.path("shards/model.safetensors"), shard_size=16,
               storage_options=place.options)
    place.makedirs("single")
    mk.save_weights(state, place.path("single/model.safetensors"), storage_options=place.options)
    model = nn.Module()
    model.register_buffer("a", state["a"].clone())
    model.register_buffer("b", state["b"].clone())
    ckpt = mk.Checkpointer(place.path("run"), storage_options=place.options, async_save=False)
    ckpt.save(0, model=model)
    return {
        "safetensors": place.path("w.safetensors"),
        "torch.save": place.path("w.pt"),
        "sharded": place.path("shards"),
        "index": place.path("shards/model.safetensors.index.json"),
        "single-file folder": place.path("single"),
        "checkpoint": ckpt.path(0),
    }


KINDS = {"safetensors": "safetensors", "torch.save": "torch.save", "sharded": "sharded",
         "index": "sharded", "single-file folder": "safetensors", "checkpoint": "checkpoint"}


def test_every_kind_is_one_interface(place: Place) -> None:
    expected = _state()
    for label, location in _files(place).items():
        source = reading.open_source(location, storage_options=place.options)
        assert isinstance(source, TensorSource) and source.kind == KINDS[label], label
        entries = source.entries()
        assert {n: tuple(e.shape) for n, e in entries.items()} == {n: tuple(t.shape) for n, t in expected.items()}
        tensors = source.tensors()
        assert all(torch.equal(tensors[n], expected[n]) for n in expected), label
        into = {n: torch.zeros(t.shape, dtype=torch.float64) for n, t in expected.items()}
        source.read_into([(entries[n], into[n]) for n in expected])
        assert all(torch.equal(into[n], expected[n].double()) for n in expected), label


def test_read_returns_each_kind_of_data(place: Place) -> None:
    files = _files(place)
    assert mk.read(files["torch.save"], storage_options=place.options)["epoch"] == 1
    state = mk.read(files["checkpoint"], storage_options=place.options)
    assert state["step"] == 0 and torch.equal(state["model"]["a"], _state()["a"])
    assert set(mk.read(files["sharded"], storage_options=place.options)) == {"a", "b"}


def test_read_header_says_what_a_file_is_instead(place: Place) -> None:
    files = _files(place)
    for label in ("torch.save", "sharded", "index"):
        with pytest.raises(mk.FormatError) as caught:
            reading.read_header(files[label], storage_options=place.options)
        assert caught.value.fix and files[label] in str(caught.value)


def test_a_crafted_index_cannot_leave_its_folder(place: Place) -> None:
    place.put("evil/model.safetensors.index.json", json.dumps({"weight_map": {"a": "../w.safetensors"}}).encode())
    with pytest.raises(mk.FormatError, match="outside its folder"):
        mk.load_state_dict(place.path("evil"), storage_options=place.options)
    place.put("gone/model.safetensors.index.json", json.dumps({"weight_map": {"a": "x.safetensors"}}).encode())
    with pytest.raises(mk.FormatError, match="missing"):
        mk.load_state_dict(place.path("gone"), storage_options=place.options)


def test_an_empty_folder_says_what_it_lacks(place: Place) -> None:
    place.makedirs("empty")
    place.put("empty/readme.txt", b"hello")
    with pytest.raises(mk.FormatError, match="index.json"):
        mk.load_state_dict(place.path("empty"), storage_options=place.options)


def test_errors_in_a_torch_save_file_name_its_location(place: Place) -> None:
    data = _torch({"w": torch.ones(4)})
    path = place.put("broken.pt", data[: len(data) - 30])  # the end of the central directory is gone
    with pytest.raises(mk.FormatError) as caught:
        mk.load_state_dict(path, storage_options=place.options)
    assert caught.value.path == path and ".spool" not in str(caught.value)


def test_open_in_is_the_only_place_that_asks_what_kind_of_file_this_is() -> None:
    """Every operation gets a TensorSource from ``reading.open_in`` and branches on nothing.
    Allowed besides: ``sniff`` itself; ``scanning``, which classifies any file, model or not
    (plain zip bundles, indexes it must not open); and the legacy loader's own entry points, which
    find the container themselves only when a direct caller does not pass the one the dispatch
    found. (The sources are parsed in a fresh interpreter: CPython 3.11's ast can fail with
    "recursion depth mismatch" in a process where an earlier test caught a RecursionError.)"""
    import json
    import pathlib
    import subprocess
    import sys

    package = pathlib.Path(__file__).resolve().parents[1] / "src" / "modelkeep"
    allowed = {("reading.py", "open_in"), ("scanning.py", "scan_file"), ("legacy/loader.py", "_read_contents"),
               ("legacy/loader.py", "sniff")}
    script = """
import ast, json, pathlib, sys
package = pathlib.Path(sys.argv[1])
found = set()
for path in package.rglob("*.py"):
    name = path.relative_to(package).as_posix()
    if name == "sniff.py" or name.startswith("inference/"):  # inputs (images, .npy) are sniffed apart
        continue
    for function in ast.walk(ast.parse(path.read_text())):
        if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(function):
            if isinstance(node, ast.Call):
                callee = node.func
                called = callee.attr if isinstance(callee, ast.Attribute) else getattr(callee, "id", None)
                owner = getattr(callee.value, "id", None) if isinstance(callee, ast.Attribute) else None
                if (called == "sniff" and owner in ("sniff", "sniffing", None)) or called == "kind_of_head":
                    found.add((name, function.name))
print(json.dumps(sorted(found)))
"""
    done = subprocess.run([sys.executable, "-c", script, str(package)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    found = {tuple(pair) for pair in json.loads(done.stdout)}
    assert found <= allowed, (sorted(found - allowed), sorted(found))
    assert ("reading.py", "open_in") in found, sorted(found)
