"""save_weights -> load_weights / load_state_dict round trips: real models, every dtype, odd
layouts, tied weights, meta models, conversions, and the errors of a mismatched model."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import modelkeep as mk
from modelkeep import errors, format

from helpers import (
    ALL_DTYPES,
    SmallCNN,
    TinyGPT,
    assert_same,
    assert_state_same,
    random_tensor,
    trained_like,
)


def _file(tmp_path, name="w.safetensors") -> str:
    return str(tmp_path / name)


# --------------------------------------------------------------------------------------------
# torchvision vgg16: the tutorial's model, once


def test_vgg16_round_trip(tmp_path):
    """The tutorial's steps 2-4 on a 553 MB model: save, load into a fresh model built on the
    meta device (no random init), eval(), same outputs; and as a plain state dict."""
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.vgg16(weights=None)
    path = _file(tmp_path, "vgg16.safetensors")
    digests = mk.save_weights(model, path)
    expected = model.state_dict()
    assert len(digests) == len(expected) == 32
    assert os.path.getsize(path) > 553_000_000

    with torch.device("meta"):
        fresh = torchvision.models.vgg16(weights=None)
    fresh.train()
    report = mk.load_weights(fresh, path)
    assert report.ok and sorted(report.loaded) == sorted(expected)
    assert report.bytes_read == sum(t.nbytes for t in expected.values())
    assert not fresh.training and all(not m.training for m in fresh.modules())
    assert_state_same(fresh.state_dict(), expected)
    model.eval()
    image = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(fresh(image), model(image))
    del fresh

    state = mk.load_state_dict(path)
    assert_state_same(state, expected)


# --------------------------------------------------------------------------------------------
# Tied weights


def test_gpt_tied_embeddings(tmp_path):
    torch.manual_seed(1)
    model = TinyGPT()
    path = _file(tmp_path)
    mk.save_weights(model, path)

    info = mk.inspect(path)
    stored = [t.name for t in info.tensors]
    assert "wte.weight" in stored and "lm_head.weight" not in stored
    assert info.aliases == {"lm_head.weight": "wte.weight"}
    assert info.total_bytes == sum(t.nbytes for n, t in model.state_dict().items() if n != "lm_head.weight")

    fresh = TinyGPT()
    report = mk.load_weights(fresh, path)
    assert report.ok and "lm_head.weight" in report.loaded
    assert fresh.lm_head.weight is fresh.wte.weight  # still one Parameter
    assert_state_same(fresh.state_dict(), model.state_dict())
    tokens = torch.randint(0, 97, (2, 8))
    model.eval()
    with torch.no_grad():
        assert torch.equal(fresh(tokens), model(tokens))

    state = mk.load_state_dict(path)
    assert state["lm_head.weight"] is state["wte.weight"]
    assert_state_same(state, model.state_dict())


def test_tied_model_on_meta_stays_tied(tmp_path):
    model = trained_like(TinyGPT(), seed=2)
    path = _file(tmp_path)
    mk.save_weights(model, path)
    with torch.device("meta"):
        fresh = TinyGPT()
    mk.load_weights(fresh, path)
    assert fresh.lm_head.weight is fresh.wte.weight
    assert fresh.wte.weight.device.type == "cpu"
    assert_state_same(fresh.state_dict(), model.state_dict())


def test_file_without_the_tied_copy_loads_into_a_tied_model(tmp_path):
    """safetensors' save_model and transformers drop one name of a tied pair."""
    model = trained_like(TinyGPT(), seed=3)
    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    path = _file(tmp_path)
    mk.save_weights(state, path)
    fresh = TinyGPT()
    report = mk.load_weights(fresh, path)
    assert report.ok and not report.missing
    assert fresh.lm_head.weight is fresh.wte.weight
    assert_state_same(fresh.state_dict(), model.state_dict())


def test_untied_model_from_tied_file(tmp_path):
    model = trained_like(TinyGPT(), seed=4)
    path = _file(tmp_path)
    mk.save_weights(model, path)
    fresh = TinyGPT()
    fresh.lm_head.weight = nn.Parameter(torch.zeros_like(fresh.wte.weight))  # untie
    mk.load_weights(fresh, path)
    assert fresh.lm_head.weight is not fresh.wte.weight
    assert torch.equal(fresh.lm_head.weight, model.wte.weight)


def test_views_of_one_buffer_are_not_aliases(tmp_path):
    base = torch.arange(12, dtype=torch.float32)
    state = {
        "all": base,
        "front": base[:6],
        "back": base[6:],
        "matrix": base.view(3, 4),
        "again": base,
        "int_view": base.view(torch.int32),
    }
    path = _file(tmp_path)
    mk.save_weights(state, path)
    assert mk.inspect(path).aliases == {"again": "all"}
    loaded = mk.load_state_dict(path)
    assert_state_same(loaded, state)


def test_conjugate_and_negative_views(tmp_path):
    """x.conj() shares x's memory with a lazy flag: it is neither x's bytes nor an alias of x."""
    x = torch.randn(4, dtype=torch.complex64)
    state = {"x": x, "conj": x.conj(), "neg_imag": x.conj().imag}
    assert state["conj"].is_conj() and state["neg_imag"].is_neg()
    path = _file(tmp_path)
    mk.save_weights(state, path)
    assert mk.inspect(path).aliases == {}
    loaded = mk.load_state_dict(path)
    assert torch.equal(loaded["conj"], x.conj())
    assert torch.equal(loaded["neg_imag"], -x.imag)
    assert not loaded["conj"].is_conj()


# --------------------------------------------------------------------------------------------
# dtypes and shapes


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=[format.name_from_dtype(d) for d in ALL_DTYPES])
def test_every_dtype(tmp_path, dtype):
    shapes = [(3, 5), (7,), (2, 0, 3), (0,)]
    if dtype != torch.float4_e2m1fn_x2:
        shapes.append(())  # safetensors has no 0-d 4-bit shape
    state = {f"t{i}": random_tensor(dtype, shape, seed=i) for i, shape in enumerate(shapes)}
    path = _file(tmp_path)
    mk.save_weights(state, path)
    header = format.read_header_file(path)
    assert {e.dtype for e in header.entries.values()} == {format.name_from_dtype(dtype)}
    assert_state_same(mk.load_state_dict(path), state)

    module = nn.Module()
    for name, tensor in state.items():
        module.register_buffer(name, torch.zeros_like(tensor) if dtype.itemsize > 1 or dtype == torch.bool
                               else torch.empty_like(tensor))
    report = mk.load_weights(module, path)
    assert report.ok and not report.dtype_conversions
    for name, tensor in state.items():
        assert_same(getattr(module, name), tensor)
    assert mk.verify(path).ok


def test_zero_size_and_zero_d(tmp_path):
    state = {
        "scalar": torch.tensor(3.25),
        "int_scalar": torch.tensor(-7, dtype=torch.int64),
        "bool_scalar": torch.tensor(True),
        "empty": torch.zeros(0),
        "empty_matrix": torch.zeros(4, 0),
        "empty_3d": torch.zeros(0, 2, 0, dtype=torch.bfloat16),
    }
    path = _file(tmp_path)
    mk.save_weights(state, path)
    assert_state_same(mk.load_state_dict(path), state)
    module = nn.Module()
    for name, tensor in state.items():
        module.register_buffer(name, torch.ones_like(tensor))
    mk.load_weights(module, path)
    for name, tensor in state.items():
        assert_same(getattr(module, name), tensor)


def test_non_contiguous_tensors(tmp_path):
    torch.manual_seed(5)
    base = torch.randn(6, 8)
    state = {
        "transposed": base.t(),
        "strided": base[::2, 1::3],
        "expanded": torch.randn(3, 1).expand(3, 4),
        "permuted": torch.randn(2, 3, 4).permute(2, 0, 1),
        "channels_last": torch.randn(4, 3, 5, 5).to(memory_format=torch.channels_last),
        "flipped_bf16": torch.randn(5, 4).to(torch.bfloat16).t(),
    }
    assert not any(t.is_contiguous() for t in state.values())
    path = _file(tmp_path)
    mk.save_weights(state, path)
    loaded = mk.load_state_dict(path)
    assert_state_same(loaded, state)
    assert all(t.is_contiguous() for t in loaded.values())  # stored in C order


def test_channels_last_model_stays_channels_last(tmp_path):
    model = trained_like(SmallCNN(), seed=6).to(memory_format=torch.channels_last)
    path = _file(tmp_path)
    mk.save_weights(model, path)
    fresh = SmallCNN().to(memory_format=torch.channels_last)
    mk.load_weights(fresh, path)
    conv = fresh.features[0].weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    assert_state_same(fresh.state_dict(), model.state_dict())
    plain = SmallCNN()
    mk.load_weights(plain, path)
    assert plain.features[0].weight.is_contiguous()
    image = torch.randn(2, 3, 8, 8)
    model.eval()
    with torch.no_grad():
        assert torch.allclose(plain(image), model(image), atol=1e-5)
        assert torch.equal(fresh(image), model(image))


# --------------------------------------------------------------------------------------------
# Meta models, conversions


def test_meta_model_is_materialised_without_init(tmp_path, monkeypatch):
    model = trained_like(SmallCNN(), seed=7)
    path = _file(tmp_path)
    mk.save_weights(model, path)
    with torch.device("meta"):
        fresh = SmallCNN()

    def no_init(*args, **kwargs):
        raise AssertionError("random init ran")

    monkeypatch.setattr(nn.Conv2d, "reset_parameters", no_init)
    monkeypatch.setattr(nn.Linear, "reset_parameters", no_init)
    report = mk.load_weights(fresh, path)
    assert report.ok
    assert all(t.device.type == "cpu" for t in fresh.state_dict().values())
    assert_state_same(fresh.state_dict(), model.state_dict())


def test_meta_model_with_tensors_the_file_lacks(tmp_path):
    """Uninitialised memory must never pass as loaded weights."""
    path = _file(tmp_path)
    mk.save_weights(trained_like(SmallCNN(), seed=8), path)

    class WithMask(SmallCNN):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("mask", torch.ones(3), persistent=False)

    with torch.device("meta"):
        fresh = WithMask()
    with pytest.raises(errors.KeyMismatchError, match="mask"):
        mk.load_weights(fresh, path)
    assert fresh.mask.is_meta  # nothing was materialised
    report = mk.load_weights(fresh, path, strict=False)  # the caller takes over the rest
    assert report.uninitialized == ["mask"] and not report.ok and not report.missing
    assert "1 left uninitialized" in str(report)
    with torch.device("meta"):
        bigger = SmallCNN(classes=9)
    report = mk.load_weights(bigger, path, strict=False)
    assert report.uninitialized == ["classifier.weight", "classifier.bias"]
    assert [name for name, _, _ in report.shape_mismatches] == ["classifier.weight", "classifier.bias"]


def test_dtype_and_device_conversion(tmp_path):
    model = trained_like(SmallCNN(), seed=9)
    path = _file(tmp_path)
    mk.save_weights(model, path)
    fresh = SmallCNN()
    report = mk.load_weights(fresh, path, device="cpu", dtype=torch.float16)
    expected = model.state_dict()
    for name, tensor in fresh.state_dict().items():
        if expected[name].is_floating_point():
            assert tensor.dtype == torch.float16
            assert torch.equal(tensor, expected[name].half())
        else:
            assert_same(tensor, expected[name])  # num_batches_tracked stays int64
    converted = {name for name, _, _ in report.dtype_conversions}
    assert converted == {n for n, t in expected.items() if t.is_floating_point()}
    assert ("classifier.weight", "F32", "torch.float16") in report.dtype_conversions

    with torch.device("meta"):
        meta = SmallCNN()
    mk.load_weights(meta, path, dtype=torch.bfloat16)
    assert torch.equal(meta.classifier.weight, expected["classifier.weight"].bfloat16())

    state = mk.load_state_dict(path, device="cpu")
    assert_state_same(state, expected)
    with pytest.raises(errors.UnsupportedValueError):
        mk.load_weights(SmallCNN(), path, dtype=torch.int8)


def test_model_in_half_loads_float_file(tmp_path):
    model = trained_like(SmallCNN(), seed=10)
    path = _file(tmp_path)
    mk.save_weights(model, path)
    fresh = SmallCNN().to(torch.bfloat16)
    mk.load_weights(fresh, path)
    assert torch.equal(fresh.classifier.bias, model.classifier.bias.bfloat16())


def test_eval_mode(tmp_path):
    path = _file(tmp_path)
    mk.save_weights(SmallCNN(), path)
    fresh = SmallCNN().train()
    mk.load_weights(fresh, path)
    assert not any(m.training for m in fresh.modules())
    kept = SmallCNN().train()
    mk.load_weights(kept, path, eval_mode=False)
    assert all(m.training for m in kept.modules())


# --------------------------------------------------------------------------------------------
# Mismatches


class _Renamed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8))
        self.head = nn.Linear(32, 5)  # was "classifier"
        self.extra = nn.Linear(2, 2)


def test_strict_mismatch_is_one_error_listing_everything(tmp_path):
    path = _file(tmp_path)
    mk.save_weights(SmallCNN(), path)
    model = _Renamed()
    model.features[0] = nn.Conv2d(3, 8, 5, padding=1)  # shape differs
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(errors.KeyMismatchError) as caught:
        mk.load_weights(model, path)
    error = caught.value
    assert isinstance(error, KeyError) and error.path == path
    text = str(error)
    assert "4 missing, 9 unexpected, 1 shape mismatches" in text
    for name in ("head.weight", "head.bias", "extra.weight", "extra.bias"):
        assert f"missing in file: {name}" in text
    assert "missing in file: head.weight (closest in file: features.3.weight)" not in text
    for name in ("classifier.weight", "classifier.bias", "features.3.weight", "features.4.running_mean"):
        assert f"not in model: {name}" in text
    assert "shape differs: features.0.weight: file [8, 3, 3, 3], model [8, 3, 5, 5]" in text
    assert "strict=False" in text
    assert_state_same(model.state_dict(), before)  # nothing was loaded


def test_closest_name_suggestions(tmp_path):
    path = _file(tmp_path)
    mk.save_weights({"encoder.layer1.weight": torch.zeros(2), "decoder.bias": torch.zeros(2)}, path)
    model = nn.Module()
    model.register_buffer("encoder_layer1_weight", torch.ones(2))
    with pytest.raises(errors.KeyMismatchError) as caught:
        mk.load_weights(model, path)
    text = str(caught.value)
    assert "missing in file: encoder_layer1_weight (closest in file: encoder.layer1.weight)" in text
    assert "not in model: encoder.layer1.weight (closest in model: encoder_layer1_weight)" in text
    assert "not in model: decoder.bias\n" in text


def test_non_strict_report(tmp_path):
    source = trained_like(SmallCNN(), seed=11)
    path = _file(tmp_path)
    mk.save_weights(source, path)
    model = _Renamed()
    model.features[0] = nn.Conv2d(3, 8, 5, padding=1)
    untouched = model.features[0].weight.clone()
    report = mk.load_weights(model, path, strict=False)
    assert not report.ok
    assert sorted(report.missing) == ["extra.bias", "extra.weight", "head.bias", "head.weight"]
    assert sorted(report.unexpected) == sorted(
        ["classifier.weight", "classifier.bias"]
        + [f"features.{i}.{n}" for i in (3,) for n in ("weight", "bias")]
        + [f"features.4.{n}" for n in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")]
    )
    assert report.shape_mismatches == [("features.0.weight", (8, 3, 3, 3), (8, 3, 5, 5))]
    assert sorted(report.loaded) == sorted(
        ["features.0.bias"] + [f"features.1.{n}" for n in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")]
    )
    assert torch.equal(model.features[1].running_var, source.features[1].running_var)
    assert torch.equal(model.features[0].bias, source.features[0].bias)
    assert torch.equal(model.features[0].weight, untouched)
    assert report.bytes_read == sum(source.state_dict()[n].nbytes for n in report.loaded)
    assert "5 missing" not in str(report) and "4 missing" in str(report)


def test_data_parallel_prefix(tmp_path):
    model = trained_like(SmallCNN(), seed=12)
    wrapped = nn.DataParallel(model)
    path = _file(tmp_path)
    mk.save_weights(wrapped, path)
    assert all(t.name.startswith("module.") for t in mk.inspect(path).tensors)
    fresh = SmallCNN()
    with pytest.raises(errors.KeyMismatchError) as caught:
        mk.load_weights(fresh, path)
    assert "fix_prefixes=True" in str(caught.value) and "(file 'module.features.0.weight' is model 'features.0.weight')" in str(
        caught.value
    )
    report = mk.load_weights(fresh, path, fix_prefixes=True)
    assert report.ok and report.renamed_prefix
    assert_state_same(fresh.state_dict(), model.state_dict())

    # and the other way: a plain file into a wrapped model
    plain = _file(tmp_path, "plain.safetensors")
    mk.save_weights(model, plain)
    target = nn.DataParallel(SmallCNN())
    with pytest.raises(errors.KeyMismatchError, match="fix_prefixes"):
        mk.load_weights(target, plain)
    mk.load_weights(target, plain, fix_prefixes=True)
    assert_state_same(target.module.state_dict(), model.state_dict())


def test_torch_compile_prefix(tmp_path):
    model = trained_like(TinyGPT(), seed=13)
    compiled = torch.compile(model)  # not run: only its names matter
    path = _file(tmp_path)
    mk.save_weights(compiled, path)
    info = mk.inspect(path)
    assert info.aliases == {"_orig_mod.lm_head.weight": "_orig_mod.wte.weight"}
    fresh = TinyGPT()
    with pytest.raises(errors.KeyMismatchError) as caught:
        mk.load_weights(fresh, path)
    assert "_orig_mod." in str(caught.value) and "fix_prefixes=True" in str(caught.value)
    mk.load_weights(fresh, path, fix_prefixes=True)
    assert fresh.lm_head.weight is fresh.wte.weight
    assert_state_same(fresh.state_dict(), model.state_dict())


# --------------------------------------------------------------------------------------------
# What may be saved


def test_non_tensor_values_are_refused(tmp_path):
    path = _file(tmp_path)
    for value in (3, "text", [torch.zeros(1)], {"nested": torch.zeros(1)}, None):
        with pytest.raises(errors.UnsupportedValueError) as caught:
            mk.save_weights({"ok": torch.zeros(1), "bad": value}, path)
        assert caught.value.item == "bad" and "Checkpointer" in str(caught.value)
    with pytest.raises(errors.UnsupportedValueError):
        mk.save_weights({1: torch.zeros(1)}, path)
    with pytest.raises(errors.UnsupportedValueError):
        mk.save_weights([torch.zeros(1)], path)
    with pytest.raises(errors.UnsupportedValueError, match="meta"):
        mk.save_weights({"m": torch.empty(2, device="meta")}, path)
    with pytest.raises(errors.UnsupportedValueError):
        mk.save_weights({"s": torch.zeros(2, 2).to_sparse()}, path)
    with pytest.raises(errors.UnsupportedValueError):
        mk.save_weights({"c": torch.zeros(2, dtype=torch.complex128)}, path)
    assert os.listdir(tmp_path) == []


def test_user_metadata(tmp_path):
    path = _file(tmp_path)
    metadata = {"epoch": "3", "note": "ünïcode ✓", "json": '{"a": [1, 2]}', "": "empty key"}
    mk.save_weights(SmallCNN(), path, metadata=metadata)
    info = mk.inspect(path)
    assert info.metadata == metadata
    header = format.read_header_file(path)
    assert {k: v for k, v in header.metadata.items() if k in metadata} == metadata
    assert header.kind == "weights" and header.modelkeep_value(format.KEY_FORMAT) == "1"
    producer = header.modelkeep_value(format.KEY_PRODUCER)
    assert producer == {"modelkeep": mk.__version__, "torch": torch.__version__}


@pytest.mark.parametrize(
    "metadata",
    [
        {"modelkeep.kind": '"model"'},
        {"modelkeep.anything": "x"},
        {"__metadata__": "x"},
        {"epoch": 3},
        {3: "epoch"},
        {"epoch": None},
        [("epoch", "3")],
        "epoch=3",
    ],
)
def test_bad_user_metadata(tmp_path, metadata):
    with pytest.raises(errors.UnsupportedValueError):
        mk.save_weights({"a": torch.zeros(1)}, _file(tmp_path), metadata=metadata)
    assert os.listdir(tmp_path) == []


# --------------------------------------------------------------------------------------------
# Random state dicts

DTYPES = st.sampled_from([d for d in ALL_DTYPES if d != torch.float4_e2m1fn_x2])
SHAPES = st.lists(st.integers(0, 4), max_size=3).map(tuple)
NAMES = st.text(min_size=1, max_size=10).filter(lambda s: s != "__metadata__")


@st.composite
def state_dicts(draw):
    items = draw(st.lists(st.tuples(NAMES, DTYPES, SHAPES, st.integers(0, 2**16)), max_size=6,
                          unique_by=lambda item: item[0]))
    state = {name: random_tensor(dtype, shape, seed) for name, dtype, shape, seed in items}
    names = list(state)
    ties = draw(st.lists(st.tuples(NAMES, st.integers(0, 100)), max_size=3, unique_by=lambda t: t[0]))
    for alias, index in ties:
        if names and alias not in state:
            state[alias] = state[names[index % len(names)]]
    return state


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(state_dicts())
def test_random_state_dicts_round_trip(tmp_path_factory, state):
    path = str(tmp_path_factory.getbasetemp() / "random.safetensors")
    mk.save_weights(state, path)
    loaded = mk.load_state_dict(path)
    stored, aliased, seen = [], [], set()  # names in saved order; a tie's later names after them
    for name, tensor in state.items():
        tied = tensor.numel() and id(tensor) in seen
        (aliased if tied else stored).append(name)
        seen.add(id(tensor))
    assert list(loaded) == stored + aliased
    assert_state_same(loaded, state)
    for a in state:  # a tie survives exactly when the tensors were one non-empty view
        for b in state:
            if a != b and state[a] is state[b] and state[a].numel():
                assert loaded[a] is loaded[b]
    assert mk.verify(path).ok
