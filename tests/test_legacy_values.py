"""Everything users put in torch.save files reads back exactly as torch.load returns it, in every
layout (zip, stream) and pickle protocol, without running anything from the file."""

from __future__ import annotations

import argparse
import collections
import datetime
import decimal
import fractions
import pathlib
import random
import types

import numpy as np
import pytest
import torch
from torch import nn

import modelkeep as mk
from modelkeep import errors, legacy
from test_legacy_support import bits, same, shares_storage

pytestmark = pytest.mark.filterwarnings("ignore:.*(TypedStorage|ComplexHalf).*:UserWarning")

PROTOCOLS = [1, 2, 3, 4, 5]
LAYOUTS = ["zip", "stream"]


def save(obj, path, layout: str, protocol: int) -> str:
    torch.save(obj, path, pickle_protocol=protocol, _use_new_zipfile_serialization=layout == "zip")
    return str(path)


def training_checkpoint() -> dict:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 2)
    loss = model(torch.randn(2, 3, 8, 8)).square().mean()
    loss.backward()
    optimizer.step()
    scheduler.step()
    return {
        "epoch": 7,
        "step": 2**40,
        "loss": loss.item(),
        "losses": [1.5, 0.25, float("inf")],
        "model_state_dict": model.state_dict(),
        "optimizer_state_dict": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "args": argparse.Namespace(lr=1e-3, name="run", layers=[1, 2], out=pathlib.PurePosixPath("/tmp/x")),
        "np_scalar": np.float64(0.5),
        "np_int": np.int64(-3),
        "np_bool": np.bool_(True),
        "np_float32": np.float32(1.25),
        "np_array": np.arange(6, dtype=np.float32).reshape(2, 3),
        "torch_rng": torch.get_rng_state(),
        "numpy_rng": np.random.RandomState(0).get_state(),
        "python_rng": random.Random(0).getstate(),
        "best": None,
        "done": False,
        "tags": {"a", "b"},
        "frozen": frozenset({1, 2}),
        "complex": 1 + 2j,
        "bytes": b"\x00\xff",
        "bytearray": bytearray(b"ab"),
        "text": "naïve ✓",
        "when": datetime.datetime(2024, 5, 6, 7, 8, 9, 10, tzinfo=datetime.timezone.utc),
        "day": datetime.date(2024, 1, 2),
        "duration": datetime.timedelta(seconds=90),
        "dtype": torch.bfloat16,
        "device": torch.device("cuda", 1),
        "size": torch.Size([1, 2]),
        "layout": torch.strided,
        "memory_format": torch.channels_last,
        "ordered": collections.OrderedDict(b=1, a=2),
        "defaults": collections.defaultdict(list, {"x": [1]}),
        "counter": collections.Counter("aab"),
        "queue": collections.deque([1, 2], maxlen=5),
        "decimal": decimal.Decimal("1.25"),
        "fraction": fractions.Fraction(1, 3),
        "simple": types.SimpleNamespace(x=1),
        "range": range(1, 9, 2),
        "slice": slice(1, None, 2),
        "nested": {"deep": [{"deeper": (1, [2, {3: "x"}])}]},
        "int_keys": {1: "a", -2**70: "b", (1, 2): "c"},
    }


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_training_checkpoint_reads_exactly(tmp_path, layout, protocol):
    checkpoint = training_checkpoint()
    if protocol < 4:
        del checkpoint["memory_format"]  # torch pickles memory formats only with protocol 4+
    path = save(checkpoint, tmp_path / "ckpt.pt", layout, protocol)
    ours = mk.read(path)
    same(ours, torch.load(path, weights_only=False))
    same(ours, checkpoint)
    assert ours["args"].lr == 1e-3  # records read as attributes too


def test_protocol_0_files_read_although_torch_cannot(tmp_path):
    """torch.save with protocol 0 writes text persistent ids that torch.load rejects."""
    checkpoint = {"w": torch.arange(6.0).reshape(2, 3), "args": argparse.Namespace(a=1), "np": np.arange(3)}
    for layout in LAYOUTS:
        path = save(checkpoint, tmp_path / f"p0-{layout}.pt", layout, 0)
        with pytest.raises(Exception):
            torch.load(path, weights_only=False)
        same(mk.read(path), checkpoint)


def tensor_zoo() -> dict:
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    big = torch.arange(1000, dtype=torch.int64)
    tagged = torch.ones(2)
    tagged.note = "kept"
    param = nn.Parameter(torch.randn(3))
    param.tag = 5
    frozen = nn.Parameter(torch.randn(2), requires_grad=False)
    return {
        "base": base,
        "same": base,  # one object twice
        "row": base[1],  # view with an offset
        "block": base[1:3, 2:5],  # view with offset and strides
        "transposed": base.t(),  # non-contiguous
        "every_other": base[:, ::2],
        "offset": big[100:110],
        "expanded": torch.zeros(1).expand(5),
        "scalar": torch.tensor(3.5),
        "empty": torch.empty(0, 3),
        "conj": torch.tensor([1 + 2j, 3 - 1j]).conj(),
        "neg": torch.tensor([1 + 2j]).conj().imag,
        "grad": torch.ones(2, requires_grad=True),
        "param": param,
        "frozen_param": frozen,
        "tagged": tagged,
        "sparse": torch.sparse_coo_tensor([[0, 1], [2, 0]], [3.0, 4.0], (2, 3), check_invariants=True).coalesce(),
        "meta": torch.empty(2, 3, device="meta"),
        "channels_last": torch.randn(1, 3, 2, 2).to(memory_format=torch.channels_last),
        "storage": torch.arange(5, dtype=torch.uint8).untyped_storage(),
    }


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("protocol", [2, 5])
def test_tensor_structures(tmp_path, layout, protocol):
    zoo = tensor_zoo()
    if layout == "stream":
        del zoo["storage"]  # torch's stream loader cannot read untyped storages
    path = save(zoo, tmp_path / "zoo.pt", layout, protocol)
    reference = torch.load(path, weights_only=False)
    ours = legacy.read(path)
    for key in zoo:
        if key == "storage":
            assert bytes(ours[key]) == bytes(reference[key])
            continue
        same(ours[key], reference[key], key)
    assert ours["same"] is ours["base"]
    for key in ("row", "block", "transposed", "every_other"):
        assert shares_storage(ours[key], ours["base"]), key
    assert ours["offset"].storage_offset() == 100 and ours["offset"].untyped_storage().nbytes() == 8000
    assert ours["param"].tag == 5 and isinstance(ours["param"], nn.Parameter)


ALL_DTYPES = [
    torch.float16, torch.float32, torch.float64, torch.bfloat16, torch.complex64, torch.complex128,
    torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8, torch.uint16, torch.uint32, torch.uint64,
    torch.bool, torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e4m3fnuz, torch.float8_e5m2fnuz,
    torch.float8_e8m0fnu, torch.complex32,
]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_dtype(tmp_path, layout):
    generator = torch.Generator().manual_seed(1)
    zoo = {}
    for dtype in ALL_DTYPES:
        raw = torch.randint(0, 256, (4, 3 * dtype.itemsize), dtype=torch.uint8, generator=generator)
        zoo[str(dtype)] = raw.view(dtype)
        zoo[str(dtype) + "_t"] = raw.view(dtype).t()
    path = save(zoo, tmp_path / "dtypes.pt", layout, 2)
    ours = mk.read(path)
    same(ours, zoo)
    if layout == "zip":  # torch's stream loader cannot read the dtypes stored as untyped storages
        same(ours, torch.load(path, weights_only=False))
    state = mk.load_state_dict(path)
    for key, value in zoo.items():
        assert state[key].dtype == value.dtype
        assert torch.equal(bits(state[key]), bits(value)), key


NUMPY_VALUES = {
    "f8": np.linspace(0, 1, 5),
    "f2": np.arange(4, dtype=np.float16),
    "big_endian": np.arange(3, dtype=">i4"),
    "c16": np.array([1 + 2j, -1j]),
    "bool": np.array([True, False]),
    "u64": np.array([2**64 - 1], dtype=np.uint64),
    "text": np.array(["ab", "c"]),
    "bytes": np.array([b"xy", b"z"]),
    "objects": np.array([1, "x", None, [2]], dtype=object),
    "datetime": np.array(["2024-01-02T03:04:05"], dtype="datetime64[ns]"),
    "timedelta": np.array([5], dtype="timedelta64[s]"),
    "fortran": np.asfortranarray(np.arange(6.0).reshape(2, 3)),
    "zero_d": np.array(7),
    "empty": np.zeros((0, 4)),
    "void": np.zeros(2, dtype="V4"),
    "scalars": [np.float16(1.5), np.int8(-3), np.uint32(7), np.complex64(1j), np.str_("s"), np.datetime64("2024-01-01")],
    "dtype": np.dtype(">f4"),
}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_numpy_data(tmp_path, layout, protocol):
    path = save(NUMPY_VALUES, tmp_path / "np.pt", layout, protocol)
    same(mk.read(path), torch.load(path, weights_only=False))


def test_structured_numpy_dtype_is_refused(tmp_path):
    path = save({"rec": np.zeros(2, dtype=[("a", "i4"), ("b", "f8")])}, tmp_path / "rec.pt", "zip", 2)
    with pytest.raises(errors.FormatError) as caught:
        mk.read(path)
    assert not isinstance(caught.value, errors.UnsafeContentError)


def test_shared_and_cyclic_containers_keep_identity(tmp_path):
    shared = [1, 2]
    cyclic: list = [0]
    cyclic.append(cyclic)
    path = save({"a": shared, "b": shared, "cyclic": cyclic}, tmp_path / "shared.pt", "zip", 2)
    ours = mk.read(path)
    assert ours["a"] is ours["b"] and ours["cyclic"][1] is ours["cyclic"]


def test_plain_pickle_of_tensors(tmp_path):
    """pickle.dump of tensors nests a stream-format torch.save of each storage (_load_from_bytes)."""
    import pickle

    base = torch.arange(4.0)
    path = tmp_path / "plain.pkl"
    path.write_bytes(pickle.dumps({"w": base, "v": base[1:]}, protocol=4))
    reference = pickle.loads(path.read_bytes())
    same(mk.read(path), reference)
    state = mk.load_state_dict(path)
    assert torch.equal(state["v"], base[1:])
    assert shares_storage(state["w"], state["v"]) == shares_storage(reference["w"], reference["v"])
    path.write_bytes(pickle.dumps({"n": np.ones(2), "t": torch.ones(2, dtype=torch.float16)}, protocol=2))
    same(mk.read(path), pickle.loads(path.read_bytes()))


def test_namespaces_come_back_as_themselves(tmp_path):
    """argparse.Namespace (in most training checkpoints) is plain data: rebuilt as the real class."""
    path = tmp_path / "ckpt.pt"
    args = argparse.Namespace(lr=0.1, layers=[1, 2], name="run")
    torch.save({"args": args, "ns": types.SimpleNamespace(a=1)}, path)
    value = mk.read(path)
    assert type(value["args"]) is argparse.Namespace and value["args"] == args
    assert vars(value["args"]) == {"lr": 0.1, "layers": [1, 2], "name": "run"}
    assert type(value["ns"]) is types.SimpleNamespace and value["ns"].a == 1


class Unknown(dict):
    """A dict subclass from a library the reader does not trust."""


class Config:
    def __init__(self) -> None:
        self.lr = 0.5
        self.weights = {"w": torch.ones(2)}


def test_placeholders_behave_like_what_they_held(tmp_path):
    path = tmp_path / "rescue.pt"
    held = Unknown(weight=torch.arange(3.0), bias=torch.zeros(1))
    torch.save({"model": held, "config": Config()}, path)
    with pytest.raises(mk.UnsafeContentError):
        mk.read(path)
    value = mk.read(path, on_unknown="placeholder")
    model, config = value["model"], value["config"]
    assert set(model.keys()) == {"weight", "bias"} and "weight" in model and "other" not in model
    assert torch.equal(model["weight"], torch.arange(3.0)) and dict(model.items())["bias"].shape == (1,)
    assert config.lr == 0.5 and torch.equal(config.weights["w"], torch.ones(2)) and config["lr"] == 0.5
    with pytest.raises(AttributeError):
        config.missing
    with pytest.raises(AttributeError):
        config.__deepcopy__  # dunders are never looked up in the file's data
    state = mk.load_state_dict(path, on_unknown="placeholder")  # found inside the placeholder
    assert set(state) == {"weight", "bias"} and torch.equal(state["weight"], torch.arange(3.0))
