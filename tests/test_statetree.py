"""The one tagged-JSON codec and the one tensor-identity key (``modelkeep.statetree``)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from modelkeep import format, statetree
from modelkeep.arch import records
from modelkeep.sources import state_tree as tree
from helpers import same


class Refused(Exception):
    def __init__(self, where: str, what: str) -> None:
        super().__init__(f"{where}: {what}")
        self.where = where


def roundtrip(value, **kwargs):
    encoded = statetree.encode(value, fail=Refused, **kwargs)
    return statetree.decode(json.loads(format.dumps(encoded)), fail=Refused)


# --------------------------------------------------------------------------------------------
# identity_key


def test_identity_key_is_equal_for_the_same_view_only() -> None:
    x = torch.arange(12.0).reshape(3, 4)
    assert statetree.identity_key(x) == statetree.identity_key(x.view(3, 4))
    assert statetree.identity_key(x) == statetree.identity_key(x[:])
    others = [x.t(), x[1:], x.reshape(12), x.view(torch.int32), x.clone(), x[:, :2]]
    keys = {statetree.identity_key(t) for t in [x, *others]}
    assert len(keys) == 1 + len(others)


def test_identity_key_tells_lazy_conjugate_and_negative_views_apart() -> None:
    z = torch.randn(3, dtype=torch.complex64)
    assert z.conj().untyped_storage().data_ptr() == z.untyped_storage().data_ptr()
    keys = {statetree.identity_key(z), statetree.identity_key(z.conj())}
    if hasattr(torch, "_neg_view"):
        keys.add(statetree.identity_key(torch._neg_view(z)))
        keys.add(statetree.identity_key(torch._neg_view(z.conj())))
    assert len(keys) == (4 if hasattr(torch, "_neg_view") else 2)


def test_identity_key_is_none_where_memory_means_nothing() -> None:
    assert statetree.identity_key(torch.empty(0)) is None
    assert statetree.identity_key(torch.empty(3, device="meta")) is None
    assert statetree.identity_key(torch.eye(3).to_sparse()) is None
    assert statetree.identity_key(torch.ones(1)) is not None


def test_weights_and_checkpoints_share_one_identity_rule() -> None:
    from modelkeep import weights

    z = torch.randn(3, dtype=torch.complex64)
    stored, aliases = weights.split_aliases({"a": z, "b": z.conj(), "c": z})
    assert [name for name, _ in stored] == ["a", "b"] and aliases == {"c": "a"}
    encoded = tree.encode({"a": z, "b": z.conj(), "c": z})
    assert [name for name, _ in encoded.tensors] == ["a", "b"]
    assert encoded.tree["c"] == {"$tensor": "a"}


# --------------------------------------------------------------------------------------------
# The codec


def test_tags_have_one_shape() -> None:
    value = {"t": (1, 2), "s": {3, 1}, "f": -math.inf, "b": b"\x00\xff", "d": torch.bfloat16,
             "dev": torch.device("cpu"), "size": torch.Size([2, 3]), "np": np.float32(0.5),
             "keys": {1: "one"}, "tagged": {"$tuple": 1}}
    assert statetree.encode(value, fail=Refused) == {
        "t": {"$tuple": [1, 2]},
        "s": {"$set": [1, 3]},
        "f": {"$float": "-inf"},
        "b": {"$bytes": "AP8="},
        "d": {"$dtype": "bfloat16"},
        "dev": {"$device": "cpu"},
        "size": {"$size": [2, 3]},
        "np": {"$np": "float32", "value": 0.5},
        "keys": {"$dict": [[1, "one"]]},
        "tagged": {"$dict": [["$tuple", 1]]},
    }


def test_both_old_dict_shapes_still_decode() -> None:
    checkpoint_shape = '{"$dict": [[0, {"$tuple": [1, 2]}], ["$x", "y"], [{"$tuple": [1, 2]}, 3]]}'
    record_shape = '{"$dict": {"kernel": {"$tuple": [3, 3]}, "inner": {"$dict": {"a": 1}}}}'
    assert statetree.decode(json.loads(checkpoint_shape), fail=Refused) == {0: (1, 2), "$x": "y", (1, 2): 3}
    assert statetree.decode(json.loads(record_shape), fail=Refused) == {"kernel": (3, 3), "inner": {"a": 1}}
    # ... through both callers, as files written by main spell them
    assert records.decode_value(json.loads(record_shape), path="f", item="x") == {
        "kernel": (3, 3), "inner": {"a": 1}
    }
    assert tree.decode(json.loads(checkpoint_shape), {}, path="f") == {0: (1, 2), "$x": "y", (1, 2): 3}


def test_architecture_records_now_write_plain_dicts() -> None:
    assert records.encode_value({"a": (1, 2)}, item="x") == {"a": {"$tuple": [1, 2]}}
    assert records.encode_value({2: "b"}, item="x") == {"$dict": [[2, "b"]]}


def test_nan_survives() -> None:
    assert math.isnan(roundtrip(math.nan))
    assert math.isnan(roundtrip([{"x": math.nan}])[0]["x"])


hashable = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=5)
    | st.floats(allow_nan=False),
    lambda inner: st.lists(inner, max_size=3).map(tuple),
    max_leaves=6,
)
leaves = (
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70) | st.text(max_size=6)
    | st.floats(allow_nan=False) | st.binary(max_size=6)
    | st.sampled_from([torch.float16, torch.int8, torch.bool, torch.complex64, torch.float8_e4m3fn])
    | st.lists(st.integers(0, 9), max_size=3).map(torch.Size)
    | st.sampled_from(["cpu", "cuda:1", "meta"]).map(torch.device)
    | st.sampled_from(["$dict", "$tensor", "$", "a$"])
)
values = st.recursive(
    leaves,
    lambda inner: st.lists(inner, max_size=3)
    | st.lists(inner, max_size=3).map(tuple)
    | st.dictionaries(st.text(max_size=4) | st.sampled_from(["$dict", "$tuple", "$"]), inner, max_size=3)
    | st.dictionaries(hashable, inner, max_size=3)
    | st.sets(hashable, max_size=3),
    max_leaves=16,
)


@settings(max_examples=300, deadline=None)
@given(values)
def test_encode_decode_roundtrips_nested_plain_values(value) -> None:
    assert same(roundtrip(value), value)


@settings(max_examples=100, deadline=None)
@given(values)
def test_both_callers_roundtrip_plain_values(value) -> None:
    encoded = tree.encode(value)
    assert encoded.tensors == []
    assert same(tree.decode(json.loads(format.dumps(encoded.tree)), {}, path="f"), value)
    as_record = json.loads(format.dumps(records.encode_value(value, item="x")))
    assert same(records.decode_value(as_record, path="f", item="x"), value)


# --------------------------------------------------------------------------------------------
# Refusals


@pytest.mark.parametrize(
    "node, what",
    [
        ({"$nope": 1}, "unknown tag"),
        ({"$tuple": [], "$set": []}, "unknown tag"),
        ({"$tuple": [], "extra": 1}, "unexpected keys"),
        ({"$tuple": 1}, "must hold a list"),
        ({"$float": "1e9"}, "nan, inf or -inf"),
        ({"$dtype": "onnx"}, "invalid"),  # a torch attribute, and one torch imports lazily
        ({"$dtype": "Tensor"}, "invalid"),
        ({"$size": [-1]}, "invalid"),
        ({"$bytes": "***"}, "invalid"),
        ({"$device": "nowhere"}, "invalid"),
        ({"$np": "object", "value": 1}, "numpy scalar"),
        ({"$np": "int8", "value": 1000}, "does not fit"),
        ({"$dict": [[[1], 2]]}, "unhashable"),
        ({"$dict": [[1]]}, "pairs"),
        ({"$set": [[1]]}, "unhashable"),
        ({"a": [{"$module": {}}]}, "unknown tag"),  # only a caller's hook owns $module
    ],
)
def test_decode_refuses_and_names_the_path(node, what) -> None:
    with pytest.raises(Refused, match=what):
        statetree.decode({"outer": [node]}, fail=Refused)


def test_depth_cycles_and_types_are_refused_with_their_path() -> None:
    nested: list = []
    for _ in range(20):
        nested = [nested]
    with pytest.raises(Refused, match="deeper than 10"):
        statetree.encode(nested, fail=Refused, max_depth=10)
    with pytest.raises(Refused, match="deeper than 10"):
        statetree.decode(json.loads(json.dumps(nested)), fail=Refused, max_depth=10)
    cycle: dict = {}
    cycle["self"] = [cycle]
    with pytest.raises(Refused, match="cycle"):
        statetree.encode(cycle, fail=Refused)
    with pytest.raises(Refused) as info:
        statetree.encode({"a": [1, object()]}, fail=Refused)
    assert info.value.where == "a/1"
    with pytest.raises(Refused, match="surrogate"):
        statetree.encode({"k": "\udc80"}, fail=Refused)


def test_hooks_add_a_callers_tags() -> None:
    class Marker:
        pass

    def hook(value, where, encode_child):
        if isinstance(value, Marker):
            return {"$marker": where, "payload": encode_child((1, 2), where)}
        return statetree.NOT_HANDLED

    encoded = statetree.encode({"m": [Marker()]}, fail=Refused, hook=hook)
    assert encoded == {"m": [{"$marker": "m/0", "payload": {"$tuple": [1, 2]}}]}
    decoded = statetree.decode(
        encoded, fail=Refused,
        hooks={"$marker": lambda node, where, child: ("marker", where, child(node["payload"], where))},
        tag_keys={"$marker": frozenset({"payload"})},
    )
    assert decoded == {"m": [("marker", "m/0", (1, 2))]}
    with pytest.raises(Refused, match="unexpected keys"):
        statetree.decode(encoded, fail=Refused, hooks={"$marker": lambda *a: None})
