"""ReadOptions: built and checked once at the public boundary, passed down as one value."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import modelkeep as mk
from modelkeep import errors, legacy, options


def test_defaults_are_one_shared_value() -> None:
    assert options.read_options() is options.DEFAULT_READ_OPTIONS
    assert options.read_options("mypkg").trust == ("mypkg",)
    assert options.read_options(["a.b", "c"], "placeholder").on_unknown == "placeholder"


@pytest.mark.parametrize("kwargs, item", [
    ({"trust": ["not a name!"]}, "trust"),
    ({"trust": [3]}, "trust"),
    ({"trust": ["os..path"]}, "trust"),
    ({"on_unknown": "ignore"}, "on_unknown"),
    ({"on_unknown": None}, "on_unknown"),
    ({"limits": {"max_objects": 3}}, "limits"),
])
def test_bad_values_are_refused_with_the_item(kwargs: dict, item: str) -> None:
    with pytest.raises(errors.UnsupportedValueError) as caught:
        options.read_options(**kwargs)
    assert caught.value.item == item and caught.value.fix


def test_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.DEFAULT_READ_OPTIONS.on_unknown = "placeholder"  # type: ignore[misc]


def test_an_invalid_on_unknown_is_refused_for_every_kind_of_file(tmp_path) -> None:
    """It used to be accepted silently for safetensors files, which never looked at it."""
    weights = tmp_path / "w.safetensors"
    mk.save_weights({"w": torch.ones(2)}, weights)
    pickled = tmp_path / "w.pt"
    torch.save({"w": torch.ones(2)}, pickled)
    for path in (weights, pickled, tmp_path):
        for call in (mk.read, mk.load_state_dict, lambda p, **kw: mk.load_weights(torch.nn.Module(), p, **kw)):
            with pytest.raises(errors.UnsupportedValueError) as caught:
                call(path, on_unknown="bogus")
            assert caught.value.item == "on_unknown"


def test_limits_reach_the_pickle_reader(tmp_path) -> None:
    path = tmp_path / "many.pt"
    torch.save(list(range(500)), path)
    assert mk.read(path) == list(range(500))
    with pytest.raises(errors.FormatError, match="more than 100"):
        mk.read(path, limits=legacy.Limits(max_objects=100))
