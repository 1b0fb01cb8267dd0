"""Interop with the safetensors package, both ways.

Files written by ``safetensors.torch.save_file``/``save_model`` load in modelkeep, and files
written by modelkeep load in ``safetensors.torch.load_file``/``safe_open``/``load_model``.

One difference is by design: modelkeep stores a tied tensor once and records the other names in
the ``modelkeep.aliases`` metadata entry (safetensors itself refuses shared tensors). safetensors
does not read that entry, so ``load_file``/``safe_open`` return only the stored names: an aliased
name such as ``lm_head.weight`` is absent there and resolves only through modelkeep
(``load_state_dict``/``load_weights``). ``safetensors.torch.load_model`` still fills a tied model,
because it skips names that share memory with a loaded one.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, load_model, save_file, save_model

import modelkeep as mk
from modelkeep import format, storage

from helpers import ALL_DTYPES, SmallCNN, TinyGPT, assert_same, assert_state_same, random_tensor, trained_like


def _every_dtype_state() -> dict[str, torch.Tensor]:
    state = {}
    for i, dtype in enumerate(ALL_DTYPES):
        name = format.name_from_dtype(dtype)
        state[name] = random_tensor(dtype, (3, 4), seed=i)
        state[name + ".empty"] = random_tensor(dtype, (0, 2), seed=i)
        if dtype != torch.float4_e2m1fn_x2:
            state[name + ".scalar"] = random_tensor(dtype, (), seed=i)
    state["strided"] = torch.randn(4, 6)[:, ::2].contiguous()
    return state


def test_safetensors_files_load_in_modelkeep(tmp_path):
    state = _every_dtype_state()
    path = str(tmp_path / "st.safetensors")
    save_file(state, path, metadata={"source": "safetensors"})

    assert_state_same(mk.load_state_dict(path), state)
    info = mk.inspect(path)
    assert info.metadata == {"source": "safetensors"} and info.hash_algorithm is None
    assert info.kind == "weights" and info.format_version is None
    report = mk.verify(path)
    assert not report.ok and report.algorithm is None and sorted(report.unhashed) == sorted(state)

    module = torch.nn.Module()
    for name, tensor in state.items():
        module.register_buffer(name.replace(".", "_"), torch.empty_like(tensor))
    renamed = str(tmp_path / "renamed.safetensors")
    save_file({k.replace(".", "_"): v for k, v in state.items()}, renamed)
    assert mk.load_weights(module, renamed).ok
    for name, tensor in state.items():
        assert_same(getattr(module, name.replace(".", "_")), tensor)


def test_safetensors_dtype_names_match(tmp_path):
    """Each dtype is written under the very name safetensors uses for it."""
    for dtype in ALL_DTYPES:
        path = str(tmp_path / "one.safetensors")
        save_file({"x": random_tensor(dtype, (2, 2))}, path)
        header = format.read_header_file(path)
        assert header.entries["x"].dtype == format.name_from_dtype(dtype)
        assert header.entries["x"].shape == (2, 2)


def test_safetensors_save_model_loads_into_tied_model(tmp_path):
    model = trained_like(TinyGPT(), seed=1)
    path = str(tmp_path / "st.safetensors")
    save_model(model, path)  # drops one name of the tied pair
    names = set(load_file(path))
    assert len(names) == len(model.state_dict()) - 1
    fresh = TinyGPT()
    report = mk.load_weights(fresh, path)
    assert report.ok
    assert fresh.lm_head.weight is fresh.wte.weight
    assert_state_same(fresh.state_dict(), model.state_dict())


def test_modelkeep_files_load_in_safetensors(tmp_path):
    state = _every_dtype_state()
    path = str(tmp_path / "mk.safetensors")
    mk.save_weights(state, path, metadata={"note": "mine"})
    loaded = load_file(path)
    assert_state_same(loaded, state)
    with safe_open(path, framework="pt") as handle:
        metadata = handle.metadata()
        assert metadata["note"] == "mine"
        assert json.loads(metadata["modelkeep.kind"]) == "weights"
        assert sorted(handle.keys()) == sorted(state)
        assert_same(handle.get_tensor("F32"), state["F32"])
        assert_same(handle.get_slice("I64")[1:3], state["I64"][1:3])


def test_aliases_are_modelkeep_only(tmp_path):
    model = trained_like(TinyGPT(), seed=2)
    path = str(tmp_path / "gpt.safetensors")
    mk.save_weights(model, path)
    loaded = load_file(path)
    assert "lm_head.weight" not in loaded  # safetensors does not read modelkeep.aliases
    assert torch.equal(loaded["wte.weight"], model.wte.weight)
    with safe_open(path, framework="pt") as handle:
        assert json.loads(handle.metadata()["modelkeep.aliases"]) == {"lm_head.weight": "wte.weight"}
    # modelkeep resolves it
    state = mk.load_state_dict(path)
    assert state["lm_head.weight"] is state["wte.weight"]
    # safetensors' load_model fills a tied model anyway (it skips names sharing memory)
    fresh = TinyGPT()
    missing, unexpected = load_model(fresh, path)
    assert not missing and not unexpected
    assert fresh.lm_head.weight is fresh.wte.weight
    assert_state_same(fresh.state_dict(), model.state_dict())


def test_load_model_of_modelkeep_cnn(tmp_path):
    model = trained_like(SmallCNN(), seed=3)
    path = str(tmp_path / "cnn.safetensors")
    mk.save_weights(model, path)
    fresh = SmallCNN()
    load_model(fresh, path)
    assert_state_same(fresh.state_dict(), model.state_dict())


def test_writer_matches_safetensors_byte_for_byte(tmp_path):
    """Without modelkeep's own metadata, the writer lays a file out exactly as safetensors."""
    state = {
        "a": torch.arange(5, dtype=torch.int64),
        "b": torch.randn(3, 7),
        "c": torch.zeros(0, dtype=torch.float16),
        "d": torch.tensor(True),
        "e": torch.randn(2, dtype=torch.bfloat16),
    }
    reference = str(tmp_path / "st.safetensors")
    save_file(state, reference, metadata={"k": "v"})
    order = sorted(format.read_header_file(reference).entries.values(), key=lambda e: e.begin)
    mine = str(tmp_path / "mk.safetensors")
    storage.LOCAL.write_tensor_file(mine, [(e.name, state[e.name]) for e in order], {"k": "v"}, with_hashes=False)
    with open(reference, "rb") as a, open(mine, "rb") as b:
        assert a.read() == b.read()


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.bfloat16, torch.complex64, torch.uint16])
def test_modelkeep_file_is_a_safetensors_file_for_safe_open_slices(tmp_path, dtype):
    tensor = random_tensor(dtype, (4, 3), seed=9)
    path = str(tmp_path / "x.safetensors")
    mk.save_weights({"x": tensor}, path)
    with safe_open(path, framework="pt") as handle:
        assert_same(handle.get_slice("x")[2:], tensor[2:])
