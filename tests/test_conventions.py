"""Model-dict keys and wrapper prefixes: one list (``modelkeep.conventions``), every reader."""

from __future__ import annotations

import pytest
import torch

import modelkeep as mk
from modelkeep import conventions
from modelkeep.checkpoint import files
from modelkeep.legacy import reader, statedict

# The lists each reader kept before they were merged: none of their keys may be lost.
OLD_LISTS = {
    "legacy.statedict": ("state_dict", "model_state_dict", "model", "module", "net", "network", "ema",
                         "model_ema", "state_dict_ema", "weights", "params"),
    "legacy.reader": ("model", "module", "net", "network", "ema", "model_ema"),
    "checkpoint.files": ("model_state_dict", "state_dict", "model", "model_state", "net", "network"),
}


def test_one_list_is_used_by_every_reader() -> None:
    assert statedict.STATE_DICT_KEYS is conventions.MODEL_KEYS
    assert reader.MODULE_KEYS is conventions.MODEL_KEYS
    assert files._ROLE_KEYS is conventions.ROLE_KEYS
    assert conventions.ROLE_KEYS["model"] is conventions.MODEL_KEYS
    for owner, keys in OLD_LISTS.items():
        assert set(keys) <= set(conventions.MODEL_KEYS), owner
    assert len(set(conventions.MODEL_KEYS)) == len(conventions.MODEL_KEYS)
    roles = [key for keys in conventions.ROLE_KEYS.values() for key in keys]
    assert len(roles) == len(set(roles))  # no key belongs to two roles


def test_state_dict_keys_come_before_ema_copies() -> None:
    order = conventions.MODEL_KEYS
    for plain in ("state_dict", "model_state_dict", "model_state", "model"):
        for ema in ("ema", "model_ema", "state_dict_ema"):
            assert order.index(plain) < order.index(ema)


@pytest.mark.parametrize(
    "name, core",
    [
        ("module.fc.weight", "fc.weight"),
        ("_orig_mod.fc.weight", "fc.weight"),
        ("module._orig_mod.module.fc.weight", "fc.weight"),
        ("fc.module.weight", "fc.module.weight"),  # only leading prefixes
        ("modules.0.weight", "modules.0.weight"),
        ("module.", ""),
    ],
)
def test_strip_wrapper_prefixes(name, core) -> None:
    assert conventions.strip_wrapper_prefixes(name) == core


def _net(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))


@pytest.mark.parametrize("key", conventions.MODEL_KEYS)
def test_every_model_key_loads_and_imports_alike(key, tmp_path) -> None:
    source = _net(0)
    path = tmp_path / "train.pt"
    torch.save({key: source.state_dict(), "step": 3, "note": "kept"}, path)
    target = _net(1)
    mk.load_weights(target, path)
    for name, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[name], value), (key, name)
    with mk.Checkpointer(tmp_path / "ckpt") as ckpt:
        assert ckpt.import_torch_checkpoint(path) == 3
        state = ckpt.read(3)
    assert set(state["model"]) == set(source.state_dict())
    assert state["step"] == 3 and state["extra"] == {"step": 3, "note": "kept"}


def test_whole_module_under_any_model_key(tmp_path) -> None:
    source = _net(0)
    path = tmp_path / "whole.pt"
    torch.save({"model_state": source}, path)
    module = reader.read_module(path)
    assert torch.equal(module[0].weight, source[0].weight)


def test_wrapped_names_load_into_an_unwrapped_model(tmp_path) -> None:
    source = _net(0)
    path = tmp_path / "ddp.safetensors"
    mk.save_weights({f"module._orig_mod.{k}": v for k, v in source.state_dict().items()}, path)
    target = _net(1)
    with pytest.raises(mk.KeyMismatchError):
        mk.load_weights(target, path)
    report = mk.load_weights(target, path, fix_prefixes=True)
    assert report.renamed_prefix == "module./_orig_mod."
    assert torch.equal(target[1].weight, source[1].weight)
