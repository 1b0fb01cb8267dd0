"""Checkpoint files and the Checkpointer: state encoding, file contract, storage backends,
asynchronous saves, inspection, weight extraction and import, and hostile files."""

from __future__ import annotations

import errno
import json
import math
import os
import subprocess
import sys
import textwrap
import threading
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import modelkeep as mk
from helpers import same
from modelkeep import format, storage, weights
from modelkeep.checkpoint import files
from modelkeep.io import buffers
from modelkeep.sources import state_tree as tree

# ------------------------------------------------------------------------------------------
# Helpers


def round_trip(value: Any) -> Any:
    """encode -> JSON text -> decode, as a file would do it."""
    encoded = tree.encode(value)
    text = format.dumps(encoded.tree)
    tensors = {name: buffers.cpu_contiguous(t).clone() for name, t in encoded.tensors}
    return tree.decode(json.loads(text), tensors, path="memory")


def write_checkpoint(path: Path, state_json: Any, tensors: dict[str, torch.Tensor] | None = None,
                     raw: str | None = None) -> None:
    metadata = weights.modelkeep_metadata("checkpoint", {})
    metadata[format.KEY_STATE] = raw if raw is not None else json.dumps(state_json)
    storage.LOCAL.write_tensor_file(str(path), list((tensors or {}).items()), metadata)


# ------------------------------------------------------------------------------------------
# Tree encoding

leaves = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8), st.binary(max_size=8),
    st.sampled_from([torch.float32, torch.int8, torch.bfloat16]),
    st.lists(st.integers(0, 5), max_size=3).map(torch.Size),
    st.sampled_from(["float32", "int64", "uint8", "bool", "float16"]).flatmap(
        lambda dtype: st.lists(st.integers(0, 100), max_size=4).map(lambda v: np.array(v, dtype=dtype))),
    st.sampled_from([np.float32(1.5), np.int64(-3), np.bool_(True), np.float64(math.inf)]),
    st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.bool]).flatmap(
        lambda dtype: st.lists(st.integers(0, 50), max_size=5).map(
            lambda v: torch.tensor(v).to(dtype))),
)
keys = st.one_of(st.text(max_size=6), st.integers(-3, 3), st.tuples(st.integers(0, 2), st.text(max_size=2)))
nested = st.recursive(
    leaves,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.lists(children, max_size=3).map(tuple),
        st.dictionaries(st.text(max_size=6), children, max_size=4),
        st.dictionaries(keys, children, max_size=4),
        st.sets(st.integers(-5, 5), max_size=4),
    ),
    max_leaves=20,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(nested)
def test_tree_round_trip(value: Any) -> None:
    assert same(round_trip(value), value)


def test_shared_tensors_are_stored_once_and_stay_shared() -> None:
    weight = torch.randn(4, 4)
    value = {"a": weight, "b": [weight, weight.t()], "c": weight[1:]}
    encoded = tree.encode(value)
    assert [name for name, _ in encoded.tensors] == ["a", "b/1", "c"]
    decoded = tree.decode(encoded.tree, dict(encoded.tensors), path="memory")
    assert decoded["a"] is decoded["b"][0]
    assert torch.equal(decoded["b"][1], weight.t()) and torch.equal(decoded["c"], weight[1:])


def test_keys_that_look_like_tags_are_plain_keys() -> None:
    value = {"$tensor": "not a tensor", "$dict": 1, "x": {"$float": "nan"}}
    assert same(round_trip(value), value)


@pytest.mark.parametrize(
    "value, item",
    [
        ({"opt": {"fn": object()}}, "opt/fn"),
        ({"a": [1, {"b": lambda: 0}]}, "a/1/b"),
        ({"t": torch.zeros(2, dtype=torch.complex128)}, "t"),
        ({"s": "\ud800"}, "s"),
        ({"k": {"\udc80": 1}}, "k/\udc80"),
        ({"arr": np.array(["a"], dtype=object)}, "arr"),
        ({"m": torch.empty(2, device="meta")}, "m"),
    ],
)
def test_unsupported_values_name_their_path(value: Any, item: str) -> None:
    with pytest.raises(mk.UnsupportedValueError) as caught:
        tree.encode(value)
    assert caught.value.item == item and caught.value.fix


def test_cycles_and_depth_are_refused() -> None:
    cycle: list[Any] = [1]
    cycle.append(cycle)
    with pytest.raises(mk.UnsupportedValueError, match="cycle"):
        tree.encode(cycle)
    deep: list[Any] = []
    for _ in range(tree.MAX_DEPTH + 5):
        deep = [deep]
    with pytest.raises(mk.UnsupportedValueError, match="deeper"):
        tree.encode(deep)


# ------------------------------------------------------------------------------------------
# Saving and restoring


def tiny() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 6)).sum().backward()
    optimizer.step()
    return model, optimizer


def test_checkpoint_file_contract(tmp_path: Path) -> None:
    """A checkpoint is a safetensors file of kind checkpoint; every tensor is in it and the
    nested structure is JSON in modelkeep.state."""
    model, optimizer = tiny()
    checkpointer = mk.Checkpointer(tmp_path)
    path = checkpointer.save(4, model=model, optimizer=optimizer, extra={"epoch": 2, "note": "x"},
                             metrics={"loss": torch.tensor(0.5)})
    checkpointer.wait()
    assert path == str(tmp_path / "step-0000000004.safetensors")
    header = format.read_header_file(path)
    assert header.kind == "checkpoint" and mk.verify(path).ok
    state = json.loads(header.metadata[format.KEY_STATE])
    assert state["version"] == 1
    assert state["tree"]["model"]["0.weight"] == {"$tensor": "model/0.weight"}
    assert state["tree"]["optimizer"]["param_groups"][0]["params"] == [0, 1, 2, 3]
    assert state["tree"]["metrics"] == {"loss": 0.5} and state["tree"]["step"] == 4
    import safetensors.torch

    other = safetensors.torch.load_file(path)  # the ecosystem reads it as plain tensors
    assert torch.equal(other["model/0.weight"], model[0].weight)
    assert torch.equal(other["optimizer/state/0/momentum_buffer"],
                       optimizer.state[model[0].weight]["momentum_buffer"])

    data = mk.checkpoint.read_state(path)
    assert data["extra"] == {"epoch": 2, "note": "x"} and data["step"] == 4
    assert torch.equal(data["model"]["2.bias"], model[2].bias)


def test_restore_fills_objects_and_returns_extra(tmp_path: Path) -> None:
    model, optimizer = tiny()
    checkpointer = mk.Checkpointer(tmp_path, async_save=False)
    checkpointer.save(1, model=model, optimizer=optimizer, extra={"epoch": 3, "best": None})
    fresh, fresh_opt = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(),
                                           torch.nn.Linear(5, 3)), None
    fresh_opt = torch.optim.SGD(fresh.parameters(), lr=0.5, momentum=0.1)
    restored = checkpointer.restore(model=fresh, optimizer=fresh_opt)
    assert (restored.step, restored.extra, restored.metrics) == (1, {"epoch": 3, "best": None}, {})
    assert restored.path.endswith("step-0000000001.safetensors")
    for a, b in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(a, b)
        assert torch.equal(optimizer.state[a]["momentum_buffer"], fresh_opt.state[b]["momentum_buffer"])
    assert fresh_opt.param_groups[0]["lr"] == 0.1


def test_restore_errors_are_typed(tmp_path: Path) -> None:
    checkpointer = mk.Checkpointer(tmp_path, async_save=False)
    model, _ = tiny()
    with pytest.raises(mk.StorageError, match="no checkpoint"):
        checkpointer.restore(model=model)
    checkpointer.save(0, model=model)
    with pytest.raises(mk.StorageError, match="step 5"):
        checkpointer.restore(5, model=model)
    with pytest.raises(mk.KeyMismatchError) as caught:
        checkpointer.restore(model=torch.nn.Linear(6, 3))
    assert "missing in checkpoint: weight" in str(caught.value)
    with pytest.raises(mk.KeyMismatchError, match="no optimizer"):
        checkpointer.restore(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=1))
    with pytest.raises(mk.StorageError, match="already saved"):
        checkpointer.save(0, model=model)
    checkpointer.save(0, model=model, overwrite=True)
    with pytest.raises(ValueError):
        checkpointer.save(-1, model=model)
    with pytest.raises(mk.UnsupportedValueError) as unsupported:
        checkpointer.save(1, model=model, extra={"cb": print})
    assert unsupported.value.item == "extra/cb" and checkpointer.steps() == [0]


def test_lists_of_optimizers_and_state_dicts(tmp_path: Path) -> None:
    model, optimizer = tiny()
    second = torch.optim.Adam(model.parameters())
    checkpointer = mk.Checkpointer(tmp_path, async_save=False)
    checkpointer.save(0, model=model.state_dict(), optimizer=[optimizer, second])
    target = {k: torch.zeros_like(v) for k, v in model.state_dict().items()}
    restored_opts = [torch.optim.SGD(model.parameters(), lr=1, momentum=0.5),
                     torch.optim.Adam(model.parameters())]
    checkpointer.restore(model=target, optimizer=restored_opts)
    assert all(torch.equal(target[k], v) for k, v in model.state_dict().items())
    assert restored_opts[0].param_groups[0]["momentum"] == 0.9


# ------------------------------------------------------------------------------------------
# Storage backends: one contract, every backend


@pytest.fixture(params=["local", "memory"])
def location(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "local":
        yield str(tmp_path / "ckpts")
        return
    url = f"memory://mk-{uuid.uuid4().hex}/ckpts"
    yield url
    import fsspec

    fsspec.filesystem("memory").rm(url.removeprefix("memory://").split("/")[0], recursive=True)


def test_checkpointer_on_every_backend(location: str) -> None:
    model, optimizer = tiny()
    checkpointer = mk.Checkpointer(location, keep_last=2)
    for step in range(4):
        checkpointer.save(step, model=model, optimizer=optimizer, metrics={"loss": 1.0 / (step + 1)})
    checkpointer.wait()
    assert checkpointer.steps() == [2, 3]
    fresh, fresh_opt = tiny()
    assert checkpointer.restore(model=fresh, optimizer=fresh_opt).metrics == {"loss": 0.25}
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), fresh.parameters()))
    data = mk.checkpoint.read_state(checkpointer.path(3))
    assert torch.equal(data["model"]["0.weight"], model[0].weight)


def test_fsspec_write_failure_is_storage_error(tmp_path: Path) -> None:
    import fsspec

    class FullMemory(fsspec.implementations.memory.MemoryFileSystem):
        def _open(self, path, mode="rb", **kwargs):
            if "w" in mode:
                raise OSError(errno.ENOSPC, "No space left on device")
            return super()._open(path, mode, **kwargs)

    store = storage.FsspecStorage(FullMemory())
    checkpointer = mk.Checkpointer(f"/mk-{uuid.uuid4().hex}", storage=store, async_save=False)
    with pytest.raises(mk.StorageError, match="No space left"):
        checkpointer.save(0, model=torch.nn.Linear(2, 2))
    assert checkpointer.steps() == []


# ------------------------------------------------------------------------------------------
# Asynchronous saves


class GatedStorage(storage.LocalStorage):
    """Local storage whose writes wait for the test to open the gate."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.writing = threading.Event()

    def write_tensor_file(self, path, tensors, metadata):
        self.writing.set()
        if not self.gate.wait(timeout=60):
            raise TimeoutError("test gate never opened")
        return super().write_tensor_file(path, tensors, metadata)


@pytest.mark.parametrize("mode", ["overlap", "copy"])
def test_async_save_returns_after_snapshot(tmp_path: Path, mode: str) -> None:
    gated = GatedStorage()
    checkpointer = mk.Checkpointer(tmp_path, storage=gated, snapshot=mode)
    model, optimizer = tiny()
    model[0].register_buffer("seen", torch.zeros(3))  # a buffer: always copied before return
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    momentum = optimizer.state[model[0].weight]["momentum_buffer"].clone()
    checkpointer.save(0, model=model, optimizer=optimizer)  # returns although the write waits
    assert gated.writing.wait(timeout=60) and checkpointer.steps() == []
    # training goes on: forward/backward, buffers change, then the optimizer step (which, in
    # overlap mode, first waits for the snapshot's copies)
    model[0].seen.add_(1)
    model(torch.randn(2, 6)).sum().backward()
    optimizer.step()
    if mode == "copy":
        with torch.no_grad():
            for p in model.parameters():
                p.add_(100)
    assert not torch.equal(model[0].weight, expected["0.weight"])
    gated.gate.set()
    checkpointer.wait()
    data = mk.checkpoint.read_state(checkpointer.path(0))
    assert all(torch.equal(data["model"][k], v) for k, v in expected.items())
    assert torch.equal(data["optimizer"]["state"][0]["momentum_buffer"], momentum)
    assert not optimizer._optimizer_step_pre_hooks  # the hold is removed once done


def test_overlap_refuses_a_torn_snapshot(tmp_path: Path, monkeypatch) -> None:
    """A parameter changed in place outside optimizer.step() while its copy is pending makes the
    save fail loudly (nothing written) instead of writing a mix of two states."""
    from modelkeep.checkpoint import snapshot

    release = threading.Event()
    copy = snapshot.Snapshot.copy_deferred

    def delayed_copy(self):
        release.wait(60)
        copy(self)

    monkeypatch.setattr(snapshot.Snapshot, "copy_deferred", delayed_copy)
    checkpointer = mk.Checkpointer(tmp_path)
    model, optimizer = tiny()
    checkpointer.save(0, model=model, optimizer=optimizer)
    with torch.no_grad():
        model[2].bias.mul_(2)  # not through optimizer.step()
    release.set()
    with pytest.raises(mk.UnsupportedValueError) as caught:
        checkpointer.wait()
    assert caught.value.item == "model/2.bias" and "snapshot='copy'" in caught.value.fix
    assert checkpointer.steps() == []
    release.clear()
    with pytest.raises(mk.UnsupportedValueError):  # the optimizer state is guarded the same way
        checkpointer.save(1, model=model, optimizer=optimizer)
        optimizer.state[model[0].weight]["momentum_buffer"].zero_()
        release.set()
        checkpointer.wait()


def test_overlap_holds_the_next_step_until_copied(tmp_path: Path, monkeypatch) -> None:
    from modelkeep.checkpoint import snapshot

    release, started = threading.Event(), threading.Event()
    copy = snapshot.Snapshot.copy_deferred

    def delayed_copy(self):
        started.set()
        release.wait(60)
        copy(self)

    monkeypatch.setattr(snapshot.Snapshot, "copy_deferred", delayed_copy)
    checkpointer = mk.Checkpointer(tmp_path)
    model, optimizer = tiny()
    before = model[0].weight.detach().clone()
    checkpointer.save(0, model=model, optimizer=optimizer)
    model(torch.randn(2, 6)).sum().backward()  # forward/backward overlap the copy
    stepper = threading.Thread(target=optimizer.step)
    stepper.start()
    assert started.wait(60)
    stepper.join(timeout=0.5)
    assert stepper.is_alive() and torch.equal(model[0].weight, before)  # held by the pre-hook
    release.set()
    stepper.join(timeout=60)
    assert not stepper.is_alive() and not torch.equal(model[0].weight, before)
    checkpointer.wait()
    assert torch.equal(mk.checkpoint.read_state(checkpointer.path(0))["model"]["0.weight"], before)
    assert checkpointer.blocked_seconds > 0


@pytest.mark.parametrize("max_in_flight", [1, 2])
def test_in_flight_bound(tmp_path: Path, max_in_flight: int) -> None:
    gated = GatedStorage()
    checkpointer = mk.Checkpointer(tmp_path, storage=gated, max_in_flight=max_in_flight)
    model, _ = tiny()
    checkpointer.save(0, model=model)
    second = threading.Thread(target=checkpointer.save, args=(1,), kwargs={"model": model})
    second.start()
    second.join(timeout=0.5)
    assert second.is_alive() == (max_in_flight == 1)  # with one in flight, save 1 must wait
    gated.gate.set()
    second.join(timeout=60)
    assert not second.is_alive()
    checkpointer.wait()
    assert checkpointer.steps() == [0, 1]


class BrokenStorage(storage.LocalStorage):
    def __init__(self) -> None:
        self.failures = 1

    def write_tensor_file(self, path, tensors, metadata):
        if self.failures:
            self.failures -= 1
            raise OSError(errno.EIO, "Input/output error")
        return super().write_tensor_file(path, tensors, metadata)


def test_background_failure_is_raised_on_next_save(tmp_path: Path) -> None:
    checkpointer = mk.Checkpointer(tmp_path, storage=BrokenStorage())
    model, _ = tiny()
    checkpointer.save(0, model=model)
    with pytest.raises(mk.StorageError) as caught:
        checkpointer.save(1, model=model)
    assert any("background save of step 0" in note for note in caught.value.__notes__)
    assert checkpointer.steps() == []  # step 1 was not started: the caller decides
    checkpointer.save(1, model=model)
    checkpointer.wait()  # the error was raised once, not again
    assert checkpointer.steps() == [1]


def test_sync_failure_is_raised_by_save_only(tmp_path: Path) -> None:
    checkpointer = mk.Checkpointer(tmp_path, storage=BrokenStorage(), async_save=False)
    model, _ = tiny()
    with pytest.raises(mk.StorageError, match="Input/output error"):
        checkpointer.save(0, model=model)
    checkpointer.wait()
    checkpointer.save(0, model=model)
    assert checkpointer.steps() == [0]


EXIT_SCRIPT = textwrap.dedent(
    """
    import sys, time, torch
    import modelkeep as mk
    from modelkeep import storage

    class Slow(storage.LocalStorage):  # the write is still pending when the script ends
        def write_tensor_file(self, *args):
            time.sleep(0.5)
            return super().write_tensor_file(*args)
    class Broken(storage.LocalStorage):
        def write_tensor_file(self, *args):
            time.sleep(0.5)
            raise OSError(28, "No space left on device")

    good = mk.Checkpointer(sys.argv[1], storage=Slow())
    bad = mk.Checkpointer(sys.argv[2], storage=Broken())
    torch.manual_seed(0)
    model = torch.nn.Linear(16, 16)
    good.save(7, model=model)
    bad.save(7, model=model)
    torch.save(model.state_dict(), sys.argv[3])
    print("leaving with", good.steps(), flush=True)
    """
)


def test_pending_save_is_flushed_at_interpreter_exit(tmp_path: Path) -> None:
    good, bad, reference = tmp_path / "good", tmp_path / "bad", tmp_path / "ref.pt"
    result = subprocess.run([sys.executable, "-c", EXIT_SCRIPT, str(good), str(bad), str(reference)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "leaving with []" in result.stdout
    assert os.listdir(good) == ["step-0000000007.safetensors"]
    state = torch.load(reference, weights_only=True)
    fresh = torch.nn.Linear(16, 16)
    mk.Checkpointer(good).restore(model=fresh)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in state.items())
    assert "background checkpoint save failed before exit" in result.stderr
    assert "No space left on device" in result.stderr and os.listdir(bad) == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_state_snapshot_and_rng(tmp_path: Path) -> None:
    model = torch.nn.Linear(64, 64).cuda()
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(8, 64, device="cuda")).sum().backward()
    optimizer.step()
    expected = {k: v.cpu() for k, v in model.state_dict().items()}
    checkpointer = mk.Checkpointer(tmp_path)
    cuda_rng = torch.cuda.get_rng_state()
    checkpointer.save(0, model=model, optimizer=optimizer)
    with torch.no_grad():
        model.weight.add_(1)
    torch.cuda.manual_seed(5)
    restored_into = torch.nn.Linear(64, 64).cuda()
    checkpointer.restore(model=restored_into, optimizer=torch.optim.AdamW(restored_into.parameters()))
    assert all(torch.equal(restored_into.state_dict()[k].cpu(), v) for k, v in expected.items())
    assert torch.equal(torch.cuda.get_rng_state(), cuda_rng)


# ------------------------------------------------------------------------------------------
# Inspect, extract, convert, import


def test_inspect_shows_the_nested_state(tmp_path: Path) -> None:
    from modelkeep import cli

    model, optimizer = tiny()
    checkpointer = mk.Checkpointer(tmp_path, async_save=False)
    path = checkpointer.save(3, model=model, optimizer=optimizer, extra={"epoch": 1, "hist": (1.5, math.inf)})
    info = mk.inspect(path)
    assert info.kind == "checkpoint"
    assert info.state["optimizer"]["state"]["0"]["momentum_buffer"] == "tensor F32[5, 6]"
    assert info.state["extra"] == {"epoch": 1, "hist": [1.5, "inf"]}
    result = CliRunner().invoke(cli.main, ["inspect", path])
    assert result.exit_code == 0, result.output
    assert "checkpoint state:" in result.output and "momentum_buffer" in result.output
    assert "param_groups:" in result.output and "lr: 0.1" in result.output
    as_json = CliRunner().invoke(cli.main, ["inspect", "--json", path])
    assert json.loads(as_json.output)["state"]["step"] == 3


class Tied(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(10, 4)
        self.head = torch.nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight


def test_extract_weights_keeps_ties(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Tied()
    checkpointer = mk.Checkpointer(tmp_path / "c", async_save=False)
    path = checkpointer.save(0, model=model, optimizer=torch.optim.SGD(model.parameters(), lr=1))
    header = format.read_header_file(path)
    assert "model/head.weight" not in header.entries  # stored once in the checkpoint too
    mk.checkpoint.extract_weights(path, tmp_path / "w.safetensors")
    info = mk.inspect(tmp_path / "w.safetensors")
    assert info.kind == "weights" and info.aliases == {"head.weight": "embed.weight"}
    fresh = Tied()
    mk.load_weights(fresh, tmp_path / "w.safetensors")
    assert torch.equal(fresh.embed.weight, model.embed.weight) and fresh.head.weight is fresh.embed.weight
    weights = mk.checkpoint.model_weights(path)
    assert weights["head.weight"] is weights["embed.weight"]
    with pytest.raises(mk.KeyMismatchError, match="no model weights"):
        mk.checkpoint.extract_weights(mk.Checkpointer(tmp_path / "n", async_save=False)
                                      .save(0, model=None), tmp_path / "x.safetensors")


def test_convert_takes_model_weights_of_a_checkpoint(tmp_path: Path) -> None:
    from modelkeep import conversion as convert

    model, optimizer = tiny()
    path = mk.Checkpointer(tmp_path, async_save=False).save(0, model=model, optimizer=optimizer)
    convert.convert(path, tmp_path / "w.safetensors")
    loaded = mk.load_state_dict(tmp_path / "w.safetensors")
    assert sorted(loaded) == sorted(model.state_dict())
    assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())


def test_import_torch_checkpoint(tmp_path: Path) -> None:
    model, optimizer = tiny()
    legacy = tmp_path / "legacy.pt"
    torch.save({"epoch": 5, "model_state_dict": model.state_dict(),
                "optimizer_state_dict": optimizer.state_dict(), "loss": torch.tensor(0.25)}, legacy)
    checkpointer = mk.Checkpointer(tmp_path / "ckpts")
    assert checkpointer.import_torch_checkpoint(legacy) == 5
    assert checkpointer.import_torch_checkpoint(legacy, step=9) == 9
    fresh, fresh_opt = tiny()
    restored = checkpointer.restore(5, model=fresh, optimizer=fresh_opt)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), fresh.parameters()))
    assert torch.equal(fresh_opt.state[fresh[0].weight]["momentum_buffer"],
                       optimizer.state[model[0].weight]["momentum_buffer"])
    assert restored.extra["epoch"] == 5 and torch.equal(restored.extra["loss"], torch.tensor(0.25))


def test_safe_read_returns_the_nested_state(tmp_path: Path) -> None:
    from modelkeep import reading

    model, optimizer = tiny()
    path = mk.Checkpointer(tmp_path, async_save=False).save(2, model=model, optimizer=optimizer,
                                                           extra={"epoch": (1, 2)})
    data = reading.read(path)
    assert data["step"] == 2 and data["extra"] == {"epoch": (1, 2)}
    assert torch.equal(data["optimizer"]["state"][3]["momentum_buffer"],
                       optimizer.state[model[2].bias]["momentum_buffer"])


def test_torch_checkpoint_mapping() -> None:
    weights = {"w": torch.zeros(2)}
    step, state = files.state_from_torch(
        {"global_step": 40, "epoch": 2, "state_dict": weights, "optimizer_states": [{"state": {}}],
         "lr_schedulers": [{}], "callbacks": {}}, None, "x.ckpt")
    assert step == 40 and state["model"] is weights and state["optimizer"] == [{"state": {}}]
    assert state["scheduler"] == [{}] and state["extra"] == {"global_step": 40, "epoch": 2, "callbacks": {}}
    assert files.state_from_torch(weights, 3, "x.pt")[1]["model"] is weights
    with pytest.raises(mk.UnsupportedValueError, match="records no step"):
        files.state_from_torch({"model": weights}, None, "x.pt")
    with pytest.raises(mk.UnsupportedValueError):
        files.state_from_torch([1, 2], 1, "x.pt")


# ------------------------------------------------------------------------------------------
# Hostile and damaged files


def nested_lists(depth: int) -> str:
    return "[" * depth + "]" * depth


@pytest.mark.parametrize(
    "state, raw",
    [
        (None, "{not json"),
        ({"version": 2, "tree": {}}, None),
        ([], None),
        ({"version": 1, "tree": {}, "more": 1}, None),
        ({"version": 1, "tree": {"$tensor": "nope"}}, None),
        ({"version": 1, "tree": {"$bogus": 1}}, None),
        ({"version": 1, "tree": {"$tensor": "t", "$tuple": []}}, None),
        ({"version": 1, "tree": {"$tensor": "t", "shape": [1]}}, None),
        ({"version": 1, "tree": {"$dict": [[1]]}}, None),
        ({"version": 1, "tree": {"$dict": [[[1, 2], 3]]}}, None),
        ({"version": 1, "tree": {"$dict": "x"}}, None),
        ({"version": 1, "tree": {"$set": [[1]]}}, None),
        ({"version": 1, "tree": {"$tuple": 5}}, None),
        ({"version": 1, "tree": {"$float": "1.0"}}, None),
        ({"version": 1, "tree": {"$np": "object", "value": 1}}, None),
        ({"version": 1, "tree": {"$np": "int8", "value": 1000}}, None),
        ({"version": 1, "tree": {"$np": "int8", "value": "x"}}, None),
        ({"version": 1, "tree": {"$bytes": "!!"}}, None),
        ({"version": 1, "tree": {"$dtype": "Tensor"}}, None),
        ({"version": 1, "tree": {"$device": "quantum:9"}}, None),
        ({"version": 1, "tree": {"$size": [1, "a"]}}, None),
        ({"version": 1, "tree": {"$ndarray": "bf"}}, None),
        (None, '{"version": 1, "tree": ' + nested_lists(tree.MAX_DEPTH + 10) + "}"),
        (None, '{"version": 1, "tree": ' + nested_lists(200_000) + "}"),
    ],
)
def test_hostile_state_is_a_format_error(tmp_path: Path, state: Any, raw: str | None) -> None:
    path = tmp_path / "bad.safetensors"
    write_checkpoint(path, state, {"t": torch.zeros(2), "bf": torch.zeros(2, dtype=torch.bfloat16)}, raw)
    with pytest.raises(mk.FormatError) as caught:
        mk.checkpoint.read_state(path)
    assert caught.value.path and caught.value.fix
    with pytest.raises(mk.FormatError):
        mk.inspect(path)


def test_damaged_files_are_refused(tmp_path: Path) -> None:
    model, _ = tiny()
    checkpointer = mk.Checkpointer(tmp_path, async_save=False)
    path = checkpointer.save(0, model=model)
    data = bytearray(Path(path).read_bytes())
    data[-3] ^= 0xFF  # the last tensor's bytes
    Path(path).write_bytes(bytes(data))
    with pytest.raises(mk.IntegrityError) as caught:
        checkpointer.restore(model=model)
    assert caught.value.item == "rng/python/state"
    assert mk.checkpoint.read_state(path, verify=False)["step"] == 0
    Path(path).write_bytes(bytes(data[:-100]))
    with pytest.raises(mk.FormatError, match="truncated"):
        checkpointer.restore(model=model)
    weights = tmp_path / "w.safetensors"
    mk.save_weights(model, weights)
    with pytest.raises(mk.FormatError, match="not a checkpoint"):
        mk.checkpoint.read_state(weights)
    with pytest.raises(mk.StorageError):
        mk.checkpoint.read_state(tmp_path / "missing.safetensors")


def test_public_surface() -> None:
    assert mk.Checkpointer is mk.checkpoint.Checkpointer
    for name in ("KeepLast", "KeepBest", "KeepEvery", "KeepIf", "KeepAll"):
        assert getattr(mk, name) is getattr(mk.checkpoint, name)
