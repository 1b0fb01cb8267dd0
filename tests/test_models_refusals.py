"""What save refuses (ArchitectureError with the options) and what load refuses (typed errors for
damaged or hostile records), plus the JSON value encoding of records."""

from __future__ import annotations

import json
import math
import functools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import modelkeep as mk
from modelkeep import api, format, reading, storage
from modelkeep.arch import records


class Custom(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x).relu()


def test_custom_class_without_example_inputs_lists_the_options(tmp_path) -> None:
    with pytest.raises(mk.ArchitectureError) as caught:
        mk.save(Custom(), tmp_path / "m.mk")
    message = str(caught.value)
    for option in ("Custom", "factory=", "torch.nn layers", "example_inputs", "save_weights"):
        assert option in message
    assert not (tmp_path / "m.mk").exists()


def test_changed_factory_models_are_refused(tmp_path) -> None:
    model = mk.create("torchvision:squeezenet1_1")
    model.classifier[1] = nn.Conv2d(512, 10, 1)  # new head: shapes differ
    with pytest.raises(mk.ArchitectureError, match="classifier.1.weight"):
        mk.save(model, tmp_path / "m.mk")
    model = mk.create("torchvision:squeezenet1_1")
    model.features[1] = nn.GELU()  # same tensors, different layer
    with pytest.raises(mk.ArchitectureError, match="features.1"):
        mk.save(model, tmp_path / "m.mk")
    model = mk.create("torchvision:squeezenet1_1")
    model.classifier[0].p = 0.1  # a setting only the attributes show
    with pytest.raises(mk.ArchitectureError, match="classifier.0: p"):
        mk.save(model, tmp_path / "m.mk")
    mk.save(model, tmp_path / "m.mk", strategy="graph", example_inputs=(torch.randn(2, 3, 32, 32),))


def test_strategy_requests_are_checked(tmp_path) -> None:
    path = tmp_path / "m.mk"
    with pytest.raises(mk.ArchitectureError, match="unknown strategy"):
        mk.save(nn.Linear(2, 2), path, strategy="pickle")
    with pytest.raises(mk.ArchitectureError, match="needs factory"):
        mk.save(nn.Linear(2, 2), path, strategy="factory")
    with pytest.raises(mk.ArchitectureError, match="needs example_inputs"):
        mk.save(nn.Linear(2, 2), path, strategy="graph")
    with pytest.raises(mk.ArchitectureError, match="not made only of torch.nn"):
        mk.save(Custom(), path, strategy="modules")
    with pytest.raises(mk.ArchitectureError, match="factory is not registered"):
        mk.save(nn.Linear(2, 2), path, factory="mylib.linear")
    with pytest.raises(mk.ArchitectureError):
        mk.save({"weight": torch.ones(1)}, path)


def test_hooks_and_replaced_forward_cannot_be_recorded(tmp_path) -> None:
    model = nn.Sequential(nn.Linear(2, 2))
    model[0].register_forward_hook(lambda module, args, out: out * 2)
    with pytest.raises(mk.ArchitectureError, match="0: has hooks"):
        mk.save(model, tmp_path / "m.mk")
    model = nn.Sequential(nn.Linear(2, 2))
    model[0].forward = lambda x: x
    with pytest.raises(mk.ArchitectureError, match="forward replaced"):
        mk.save(model, tmp_path / "m.mk")


def test_unrecordable_arguments_and_quantized_models(tmp_path) -> None:
    model = mk.create("torchvision:resnet18", norm_layer=functools.partial(nn.BatchNorm2d, eps=1e-3))
    with pytest.raises(mk.ArchitectureError, match="partial"):
        mk.save(model, tmp_path / "m.mk")
    quantized = torch.ao.quantization.quantize_dynamic(nn.Sequential(nn.Linear(4, 4)), {nn.Linear}, dtype=torch.qint8)
    with pytest.raises(mk.ArchitectureError, match="quantized"):
        mk.save(quantized, tmp_path / "q.mk")


# --------------------------------------------------------------------------------------------
# Hostile or damaged files


@pytest.fixture(scope="module")
def tree_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("tree") / "tree.mk"
    mk.save(nn.Sequential(nn.Linear(2, 3), nn.ReLU()), path)
    return path


def _with_record(source, destination, record) -> str:
    header = reading.read_header(source)
    metadata = {k: v for k, v in header.metadata.items() if k != format.KEY_HASHES}
    if record is None:
        metadata.pop(format.KEY_ARCHITECTURE)
    else:
        metadata[format.KEY_ARCHITECTURE] = record if isinstance(record, str) else json.dumps(record)
    storage.LOCAL.write_tensor_file(str(destination), list(api.load_state_dict(source).items()), metadata)
    return str(destination)


def _linear(**args):
    return {"class": "torch.nn.Linear", "args": {"in_features": 2, "out_features": 3, **args}}


def _tree(*children):
    return {"version": 1, "strategy": "modules", "buffers": {},
            "root": {"class": "torch.nn.Sequential", "children": {str(i): c for i, c in enumerate(children)}}}


HOSTILE = {
    "no-record": (None, mk.FormatError),
    "not-json": ("{", mk.FormatError),
    "not-object": ([1, 2], mk.FormatError),
    "future-version": ({"version": 99, "strategy": "modules"}, mk.FormatError),
    "unknown-strategy": ({"version": 1, "strategy": "pickle"}, mk.FormatError),
    "os-class": (_tree({"class": "os.system", "args": {}}), mk.UnsafeContentError),
    "module-base": (_tree({"class": "torch.nn.Module", "args": {}}), mk.UnsafeContentError),
    "lazy-layer": (_tree({"class": "torch.nn.LazyLinear", "args": {"out_features": 3}}), mk.UnsafeContentError),
    "bad-tag": (_tree(_linear(bias={"$eval": "1"})), mk.FormatError),
    "two-tags": (_tree(_linear(bias={"$tuple": [], "$dict": {}})), mk.FormatError),
    "bad-arg": (_tree(_linear(color="red")), mk.ArchitectureError),
    "wrong-shape": (_tree(_linear(out_features=4)), mk.ArchitectureError),
    "extra-key": (_tree({"class": "torch.nn.ReLU", "args": {}, "code": "x"}), mk.FormatError),
    "deep": (_tree(functools.reduce(lambda inner, _: {"$tuple": [inner]}, range(200), 1)), mk.FormatError),
    "bad-buffer-name": ({**_tree(_linear(), {"class": "torch.nn.ReLU"}), "buffers": {"a\"b": "modelkeep.buffer.x"}}, mk.FormatError),
    "missing-buffer": ({**_tree(_linear(), {"class": "torch.nn.ReLU"}), "buffers": {"0.x": "modelkeep.buffer.x"}}, mk.FormatError),
    "graph-no-program": ({"version": 1, "strategy": "graph"}, mk.FormatError),
    "factory-no-name": ({"version": 1, "strategy": "factory", "kwargs": {}}, mk.FormatError),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_records_are_typed_errors(tree_file, tmp_path, case) -> None:
    record, error = HOSTILE[case]
    if case == "deep":
        record = _tree(_linear(bias=record))
    path = _with_record(tree_file, tmp_path / "bad.mk", record)
    with pytest.raises(error) as caught:
        mk.load(path)
    assert str(path) in str(caught.value)


def test_torch_save_files_need_the_legacy_reader(tmp_path) -> None:
    path = tmp_path / "model.pt"
    torch.save(nn.Sequential(nn.Linear(2, 2)), path)
    try:
        from modelkeep import legacy

        has_reader = hasattr(legacy, "read_module")
    except ImportError:
        has_reader = False
    if has_reader:
        model = mk.load(path, trust=("torch.nn",))
        assert isinstance(model, nn.Sequential) and not model.training
    else:
        with pytest.raises(mk.FormatError, match="legacy"):
            mk.load(path)


# --------------------------------------------------------------------------------------------
# Values in records


scalars = st.none() | st.booleans() | st.integers(-(2**62), 2**62) | st.text(max_size=8) | st.floats(allow_nan=False)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3)
    | st.lists(inner, max_size=3).map(tuple)
    | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=12,
)


@settings(max_examples=150, deadline=None)
@given(values)
def test_values_roundtrip_through_json(value) -> None:
    encoded = records.encode_value(value, item="x")
    decoded = records.decode_value(json.loads(format.dumps(encoded)), path="f", item="x")
    assert decoded == value and type(decoded) is type(value)
    if isinstance(value, tuple):
        assert isinstance(decoded, tuple)


def test_special_values() -> None:
    for value in (math.inf, -math.inf, torch.float16, (1, [2, (3,)]), {"a": (1, 2)}):
        encoded = json.loads(format.dumps(records.encode_value(value, item="x")))
        assert records.decode_value(encoded, path="f", item="x") == value
    nan = records.decode_value(records.encode_value(math.nan, item="x"), path="f", item="x")
    assert math.isnan(nan)
    with pytest.raises(mk.ArchitectureError, match="object"):
        records.encode_value(object(), item="x")
