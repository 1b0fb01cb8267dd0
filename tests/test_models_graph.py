"""The graph strategy: a custom class saved as a torch.export program, loaded in a process that
cannot import the class, and crafted programs that try to run code refused before torch sees them."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import modelkeep as mk
from modelkeep import api, format, reading, storage


class GatedNet(nn.Module):
    """Custom forward: a residual gate, a non-persistent buffer and a tensor constant."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.norm = nn.BatchNorm2d(6)
        self.head = nn.Linear(6, 4)
        self.register_buffer("temperature", torch.tensor(0.5), persistent=False)
        self.offset = torch.tensor([0.25, -0.5, 1.0, 0.0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(self.conv(x))
        y = y * torch.sigmoid(y) + x.mean(1, keepdim=True)
        pooled = y.flatten(2).amax(-1)
        return self.head(pooled) / self.temperature + self.offset


@pytest.fixture(scope="module")
def gated(tmp_path_factory):
    torch.manual_seed(0)
    model = GatedNet().eval()
    model.norm.running_var.uniform_(0.5, 2.0)
    folder = tmp_path_factory.mktemp("graph")
    path = folder / "gated.mk"
    mk.save(model, path, example_inputs=(torch.randn(2, 3, 8, 8),))
    return model, path, folder


def _rewrite_record(source, destination, change) -> None:
    """Write ``destination`` as ``source`` with its architecture record passed through ``change``."""
    header = reading.read_header(source)
    tensors = api.load_state_dict(source)
    metadata = {k: v for k, v in header.metadata.items() if k != format.KEY_HASHES}
    record = json.loads(metadata[format.KEY_ARCHITECTURE])
    change(record)
    metadata[format.KEY_ARCHITECTURE] = json.dumps(record)
    storage.LOCAL.write_tensor_file(str(destination), list(tensors.items()), metadata)


def _nodes(record) -> list[dict]:
    return record["program"]["graph_module"]["graph"]["nodes"]


def test_graph_record_has_no_pickle_and_dynamic_batch(gated) -> None:
    model, path, _ = gated
    header = reading.read_header(path)
    record = json.loads(header.metadata[format.KEY_ARCHITECTURE])
    assert record["strategy"] == "graph"
    assert record["inputs"] == [{"tensor": "modelkeep.input.0", "dynamic": [0]}]
    assert set(record["constants"]) == {"temperature", "offset"}
    assert set(header.entries) == set(model.state_dict()) | {
        "modelkeep.input.0", "modelkeep.constant.temperature", "modelkeep.constant.offset"
    }
    raw = path.read_bytes()
    assert b"PK\x03\x04" not in raw and b"\x80\x02" not in raw[: 8 + len(header.metadata)]


def test_custom_class_loads_where_it_cannot_be_imported(gated) -> None:
    model, path, folder = gated
    torch.manual_seed(3)
    inputs = {f"x{b}": torch.randn(b, 3, 8, 8) for b in (1, 5)}
    with torch.no_grad():
        expected = {f"y{b}": model(inputs[f"x{b}"]) for b in (1, 5)}
    mk.save_weights({**inputs, **expected}, folder / "io.safetensors")
    script = textwrap.dedent(
        f"""
        import importlib.util, json, sys
        import torch, modelkeep
        model = modelkeep.load({str(path)!r})
        io = modelkeep.load_state_dict({str(folder / 'io.safetensors')!r})
        result = {{"importable": importlib.util.find_spec("test_models_graph") is not None,
                  "loaded_test_module": any("test_models" in m for m in sys.modules),
                  "training": model.training}}
        with torch.no_grad():
            for b in (1, 5):
                out = model(io[f"x{{b}}"])
                result[f"equal{{b}}"] = bool(torch.equal(out, io[f"y{{b}}"]))
                result[f"close{{b}}"] = float((out - io[f"y{{b}}"]).abs().max())
        print(json.dumps(result))
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=folder, env=env, capture_output=True, text=True, timeout=240
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["importable"] is False and result["loaded_test_module"] is False
    assert result["training"] is False
    for b in (1, 5):  # the exported graph may order ops differently from eager
        assert result[f"close{b}"] <= 1e-6, result


def test_loaded_graph_stays_in_eval_mode(gated) -> None:
    _, path, _ = gated
    loaded = mk.load(path)
    assert loaded.eval() is loaded and not loaded.training
    with pytest.raises(mk.ArchitectureError, match="eval mode"):
        loaded.train()
    with pytest.raises(RuntimeError, match=r"shape\[2\] to be equal to 8, but got 9"):
        loaded(torch.randn(2, 3, 9, 9))  # only the batch dimension is dynamic


def test_no_pickle_anywhere_on_load(gated, tmp_path, monkeypatch) -> None:
    """Loading every strategy works with pickle and torch.load disabled."""
    _, graph_path, _ = gated
    tree = tmp_path / "tree.mk"
    mk.save(nn.Sequential(nn.Linear(3, 2)), tree)
    factory = tmp_path / "factory.mk"
    mk.save(mk.create("torchvision:squeezenet1_1", num_classes=3), factory)

    def refuse(*args, **kwargs):
        raise AssertionError("unpickling attempted")

    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    for path in (graph_path, tree, factory):
        assert not mk.load(path).training


def test_fixed_batch_and_unexportable_models_are_refused(tmp_path) -> None:
    class FixedBatch(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + torch.ones(2, 3)  # broadcasting pins the batch to 2

    class DataDependent(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * 2 if x.sum() > 0 else x

    with pytest.raises(mk.ArchitectureError, match="batch"):
        mk.save(FixedBatch(), tmp_path / "m.mk", example_inputs=(torch.randn(2, 3),))
    with pytest.raises(mk.ArchitectureError, match="torch.export"):
        mk.save(DataDependent(), tmp_path / "m.mk", example_inputs=(torch.randn(2, 3),))
    with pytest.raises(mk.ArchitectureError, match="example_inputs"):
        mk.save(DataDependent(), tmp_path / "m.mk", example_inputs=[1, 2])
    assert not (tmp_path / "m.mk").exists()


# --------------------------------------------------------------------------------------------
# Crafted programs


def _set_target(record, target):
    node = next(n for n in _nodes(record) if n["target"].startswith("torch.ops.aten."))
    node["target"] = target


def _set_expression(record, text):
    def walk(value):
        if isinstance(value, dict):
            for key in value:
                if key == "expr_str":
                    value[key] = text
                else:
                    walk(value[key])
        elif isinstance(value, list):
            for item in value:
                walk(item)

    walk(record["program"])


def _set_parameter_name(record, name):
    for spec in record["program"]["graph_module"]["signature"]["input_specs"]:
        if "parameter" in spec:
            spec["parameter"]["parameter_name"] = name
            return


def _set_forward_names(record, name):
    record["program"]["graph_module"]["module_call_graph"][0]["signature"]["forward_arg_names"] = [name]


def _custom_object(record):
    record["program"]["graph_module"]["graph"]["custom_obj_values"] = {"obj": {"name": "obj", "class_fqn": "os.system"}}


def _operator_argument(record):
    node = next(n for n in _nodes(record) if n["target"].startswith("torch.ops.aten."))
    node["inputs"].append({"name": "op", "arg": {"as_operator": "torch.hub.load"}, "kind": 1})


CRAFTED = {
    "torch.load": lambda r, m: _set_target(r, "torch.load"),
    "builtins.exec": lambda r, m: _set_target(r, "builtins.exec"),
    "hub": lambda r, m: _set_target(r, "torch.hub.load"),
    "from_file": lambda r, m: _set_target(r, "torch.ops.aten.from_file.default"),
    "sympy-eval": lambda r, m: _set_expression(r, f"__import__('pathlib').Path({str(m)!r}).touch()"),
    "sympy-attribute": lambda r, m: _set_expression(r, "Symbol('s0').func"),
    "sympy-power": lambda r, m: _set_expression(r, "Pow(Integer(10), Integer(1000000000))"),
    "fx-attribute": lambda r, m: _set_parameter_name(r, f'a"); __import__("pathlib").Path({str(m)!r}).touch(); ("'),
    "fx-signature": lambda r, m: _set_forward_names(r, f"x=__import__('pathlib').Path({str(m)!r}).touch()"),
    "custom-object": lambda r, m: _custom_object(r),
    "operator-argument": lambda r, m: _operator_argument(r),
}


@pytest.mark.parametrize("attack", sorted(CRAFTED))
def test_crafted_programs_are_refused_before_running(gated, tmp_path, attack) -> None:
    _, path, _ = gated
    marker = tmp_path / "ran"
    crafted = tmp_path / "crafted.mk"
    _rewrite_record(path, crafted, lambda record: CRAFTED[attack](record, marker))
    with pytest.raises(mk.UnsafeContentError):
        mk.load(crafted)
    assert not marker.exists()


def test_guard_code_and_node_metadata_are_dropped(gated, tmp_path) -> None:
    model, path, _ = gated
    marker = tmp_path / "ran"
    payload = f"__import__('pathlib').Path({str(marker)!r}).touch()"

    def inject(record):
        record["program"]["guards_code"] = [payload]
        for node in _nodes(record):
            node["metadata"] = {"stack_trace": f'File "x", line 1, in f\n{payload}\r{payload}', "custom": payload}

    crafted = tmp_path / "crafted.mk"
    _rewrite_record(path, crafted, inject)
    loaded = mk.load(crafted)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert (loaded(x) - model(x)).abs().max() <= 1e-6
    print(loaded.code)  # generating source must not run anything either
    assert not marker.exists()


def test_program_checker_accepts_what_torch_writes() -> None:
    from modelkeep.arch import programs

    assert programs.check_expression("Symbol('s77', positive=True, integer=True)", path=None)
    assert programs.check_expression("Add(Mul(Integer(2), Symbol('s0', integer=True)), Integer(-1))", path=None)
    for bad in ("Symbol('s0').__class__", "lambda: 0", "s0 ** 2", "[s0]", "Symbol('os.system')", "x;y"):
        with pytest.raises(mk.UnsafeContentError):
            programs.check_expression(bad, path=None)
