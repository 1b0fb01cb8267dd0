"""The on-disk format: byte-exact golden files, header layout, header encode/parse round trips,
dtype names, and the metadata schema's own validation."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import modelkeep as mk
from modelkeep import errors, format, reading
from modelkeep import sniff as sniffing

from helpers import ALL_DTYPES, assert_same, bits, entry, file_bytes, write

GOLDEN_DIR = os.path.join(os.path.dirname(__file__), "golden")


def _make_golden():
    spec = importlib.util.spec_from_file_location("make_golden", os.path.join(GOLDEN_DIR, "make_golden.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


make_golden = _make_golden()


def _read(path: str) -> bytes:
    with open(path, "rb") as stream:
        return stream.read()


# --------------------------------------------------------------------------------------------
# Golden files: the format is a contract


@pytest.mark.parametrize("name", ["weights_v1.safetensors", "dtypes_v1.safetensors"])
def test_writer_reproduces_golden_bytes(tmp_path, name):
    make_golden.write(str(tmp_path / "weights_v1.safetensors"), str(tmp_path / "dtypes_v1.safetensors"))
    assert _read(str(tmp_path / name)) == _read(os.path.join(GOLDEN_DIR, name)), (
        "the bytes modelkeep writes changed; if deliberate, bump modelkeep.format and run "
        "tests/golden/make_golden.py"
    )


def test_golden_header_layout():
    raw = _read(make_golden.WEIGHTS)
    length = int.from_bytes(raw[:8], "little")
    assert length == 952 and len(raw) == 1008
    assert (8 + length) % 8 == 0  # data buffer starts 8-aligned
    header_text = raw[8 : 8 + length]
    body = header_text.rstrip(b" ")
    assert 0 <= len(header_text) - len(body) < 8 and body.endswith(b"}")
    document = json.loads(body.decode("utf-8"))
    # Compact JSON, metadata first, tensors in state-dict order, the tied name stored once.
    assert body == json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode()
    assert list(document) == ["__metadata__", "weight", "bias", "scale", "empty", "mask", "ünicode.名"]
    assert document["weight"] == {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}
    assert document["bias"] == {"dtype": "I64", "shape": [2], "data_offsets": [24, 40]}
    assert document["scale"] == {"dtype": "BF16", "shape": [], "data_offsets": [40, 42]}
    assert document["empty"] == {"dtype": "F16", "shape": [0, 3], "data_offsets": [42, 42]}
    assert document["mask"] == {"dtype": "BOOL", "shape": [3], "data_offsets": [42, 45]}
    assert document["ünicode.名"] == {"dtype": "U8", "shape": [3], "data_offsets": [45, 48]}
    assert len(raw) - 8 - length == 48  # data buffer exactly tiles the tensors
    metadata = document["__metadata__"]
    assert list(metadata) == [
        "note", "ünï", "modelkeep.format", "modelkeep.kind", "modelkeep.aliases",
        "modelkeep.producer", "modelkeep.hashes",
    ]
    assert metadata["note"] == "golden" and metadata["ünï"] == "côdé 名"
    assert json.loads(metadata["modelkeep.format"]) == "1"
    assert json.loads(metadata["modelkeep.kind"]) == "weights"
    assert json.loads(metadata["modelkeep.aliases"]) == {"head.weight": "weight"}
    hashes = json.loads(metadata["modelkeep.hashes"])
    assert hashes["algorithm"] == "xxh3-128"
    assert list(hashes["tensors"]) == ["weight", "bias", "scale", "empty", "mask", "ünicode.名"]
    assert all(len(h) == 32 and int(h, 16) >= 0 for h in hashes["tensors"].values())
    # The data bytes are the tensors' little-endian, C-ordered bytes.
    data = raw[8 + length :]
    state = make_golden.weights_state()
    assert data[0:24] == bits(state["weight"]).numpy().tobytes()
    assert data[24:40] == (-1).to_bytes(8, "little", signed=True) + (2).to_bytes(8, "little")
    assert data[42:45] == b"\x01\x00\x01"


def test_golden_files_still_load():
    expected = make_golden.weights_state()
    loaded = mk.load_state_dict(make_golden.WEIGHTS)
    assert set(loaded) == set(expected)
    for name in expected:
        assert_same(loaded[name], expected[name])
    assert loaded["head.weight"] is loaded["weight"]
    info = mk.inspect(make_golden.WEIGHTS)
    assert info.metadata == make_golden.METADATA
    assert info.aliases == {"head.weight": "weight"}
    assert mk.verify(make_golden.WEIGHTS).ok

    dtypes = mk.load_state_dict(make_golden.DTYPES)
    expected = make_golden.dtypes_state()
    assert list(dtypes) == list(expected)
    for name in expected:
        assert_same(dtypes[name], expected[name])
    assert mk.verify(make_golden.DTYPES).ok


def test_golden_dtype_names_are_the_safetensors_names():
    header = format.read_header_file(make_golden.DTYPES)
    names = sorted(header.entries)
    assert names == sorted(
        ["BOOL", "U8", "I8", "U16", "I16", "F16", "BF16", "U32", "I32", "F32", "C64", "U64", "I64",
         "F64", "F8_E5M2", "F8_E4M3", "F8_E8M0", "F8_E4M3FNUZ", "F8_E5M2FNUZ", "F4"]
    )
    for name, item in header.entries.items():
        assert item.dtype == name
    # F4 packs two 4-bit values per byte: the file counts values, torch counts bytes.
    raw = _read(make_golden.DTYPES)
    document = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
    assert document["F4"]["shape"] == [4] and header.entries["F4"].shape == (2,)


# --------------------------------------------------------------------------------------------
# Header encode/parse


def test_encode_header_layout_and_padding():
    for name_length in range(1, 20):
        tensors = [format.PlannedTensor("x" * name_length, "F32", (3,))]
        encoded = format.encode_header(tensors, {})
        length = int.from_bytes(encoded[:8], "little")
        assert len(encoded) == 8 + length and length % 8 == 0
        body = encoded[8:].rstrip(b" ")
        assert len(encoded[8:]) - len(body) < 8
        assert json.loads(body) == {"x" * name_length: {"dtype": "F32", "shape": [3], "data_offsets": [0, 12]}}


def test_encode_header_rejects_reserved_and_repeated_names():
    with pytest.raises(errors.UnsupportedValueError, match="reserved"):
        format.encode_header([format.PlannedTensor("__metadata__", "F32", (1,))], {})
    twice = [format.PlannedTensor("a", "F32", (1,)), format.PlannedTensor("a", "F32", (1,))]
    with pytest.raises(errors.UnsupportedValueError, match="two tensors"):
        format.encode_header(twice, {})


def test_save_weights_rejects_the_metadata_name(tmp_path):
    with pytest.raises(errors.UnsupportedValueError):
        mk.save_weights({"__metadata__": torch.zeros(1)}, tmp_path / "w.safetensors")
    assert os.listdir(tmp_path) == []


names = st.text(min_size=0, max_size=12).filter(lambda s: s != "__metadata__")
planned = st.lists(
    st.tuples(names, st.sampled_from(sorted(format._DTYPE_NAMES)), st.lists(st.integers(0, 5), max_size=4)),
    max_size=8,
    unique_by=lambda t: t[0],
)


@settings(max_examples=150, deadline=None)
@given(planned, st.dictionaries(st.text(max_size=8), st.text(max_size=16), max_size=4))
def test_encode_parse_round_trip(items, metadata):
    tensors = []
    for name, dtype, shape in items:
        if dtype == "F4" and not shape:
            shape = [1]
        tensors.append(format.PlannedTensor(name, dtype, tuple(shape)))
    encoded = format.encode_header(tensors, metadata)
    data_bytes = sum(t.nbytes for t in tensors)
    raw = encoded[8:]
    header = format.parse_header(raw, file_size=len(encoded) + data_bytes, path="mem")
    assert header.metadata == metadata
    assert header.data_start == len(encoded) and header.data_start % 8 == 0
    assert list(header.entries) == [t.name for t in tensors]
    offset = header.data_start
    for tensor in tensors:
        item = header.entries[tensor.name]
        assert (item.dtype, item.shape, item.nbytes) == (tensor.dtype, tensor.shape, tensor.nbytes)
        assert item.begin == offset
        offset = item.end
    assert offset == header.file_size


def test_checked_sizes_use_exact_arithmetic():
    assert format._checked_nbytes([], 4) == 4
    assert format._checked_nbytes([0, 2**62], 1) == 0
    assert format._checked_nbytes([2**31, 2**31], 1) == 2**62
    assert format._checked_nbytes([2**31, 2**31], 2) is None  # 2**63 does not fit an int64 offset
    assert format._checked_nbytes([2**31, 2**31], 4) is None
    assert format._checked_nbytes([0, 2**40, 2**40], 1) is None  # torch could not hold the shape
    assert format._checked_nbytes([2**61, 8], 1) is None  # wraps to 0 in 64-bit arithmetic


# --------------------------------------------------------------------------------------------
# dtypes


def test_every_dtype_has_one_name():
    assert len(set(ALL_DTYPES)) == len(ALL_DTYPES) == 20
    for dtype in ALL_DTYPES:
        name = format.name_from_dtype(dtype)
        assert format.dtype_from_name(name) is dtype
        assert format.itemsize(name) == dtype.itemsize


@pytest.mark.parametrize("dtype", [torch.complex128, torch.complex32, torch.quint8, torch.bits8])
def test_unsupported_dtypes_are_a_clear_error(tmp_path, dtype):
    with pytest.raises(errors.UnsupportedValueError) as caught:
        format.name_from_dtype(dtype, item="w")
    assert "'w'" in str(caught.value) and "fix:" in str(caught.value)


def test_float4_file_shape():
    assert format.file_shape("F4", (2, 3)) == (2, 6)
    assert format.file_shape("F32", (2, 3)) == (2, 3)
    assert format.file_shape("F32", ()) == ()
    with pytest.raises(errors.UnsupportedValueError, match="0-d"):
        format.file_shape("F4", (), item="x")


def test_zero_d_float4_is_refused_before_writing(tmp_path):
    scalar = torch.zeros((), dtype=torch.uint8).view(torch.float4_e2m1fn_x2)
    with pytest.raises(errors.UnsupportedValueError):
        mk.save_weights({"x": scalar}, tmp_path / "w.safetensors")
    assert os.listdir(tmp_path) == []


# --------------------------------------------------------------------------------------------
# Metadata schema


def _file_with_metadata(tmp_path, metadata, tensors=("a",)):
    header = {"__metadata__": metadata}
    offset = 0
    for name in tensors:
        header[name] = entry("F32", [1], offset, offset + 4)
        offset += 4
    return write(tmp_path / "m.safetensors", file_bytes(header, b"\0" * offset))


def test_kind_must_be_known(tmp_path):
    header = format.read_header_file(_file_with_metadata(tmp_path, {"modelkeep.kind": '"model"'}))
    assert header.kind == "model"
    assert format.read_header_file(_file_with_metadata(tmp_path, {})).kind == "weights"
    for bad in ['"blob"', "[1]", "3", "{}"]:
        header = format.read_header_file(_file_with_metadata(tmp_path, {"modelkeep.kind": bad}))
        with pytest.raises(errors.FormatError, match="kind"):
            header.kind


def test_modelkeep_values_reject_duplicate_keys(tmp_path):
    path = _file_with_metadata(tmp_path, {"modelkeep.aliases": '{"x":"a","x":"a"}'})
    header = format.read_header_file(path)
    with pytest.raises(errors.FormatError, match="twice") as caught:
        header.aliases
    assert caught.value.item == "modelkeep.aliases"


def test_aliases_are_validated(tmp_path):
    good = format.read_header_file(_file_with_metadata(tmp_path, {"modelkeep.aliases": '{"b":"a"}'}))
    assert good.aliases == {"b": "a"}
    for bad in ['{"b":"missing"}', '{"a":"a"}', '["a"]', '{"b":1}', '"a"', '{"c":"b","b":"a"}']:
        header = format.read_header_file(_file_with_metadata(tmp_path, {"modelkeep.aliases": bad}))
        with pytest.raises(errors.FormatError) as caught:
            header.aliases
        assert caught.value.item == "modelkeep.aliases" and caught.value.path.endswith("m.safetensors")


# --------------------------------------------------------------------------------------------
# Telling formats apart


@pytest.mark.parametrize("target_length", [384, 0x6428, 0x717D, 0x6363, 0x80 + 0x100 * 7])
def test_headers_that_look_like_pickles_still_read(tmp_path, target_length):
    """A header length is arbitrary bytes: 384 starts with 0x80 and 0x6428 spells "(d", which a
    pickle starts with too. Such files are still safetensors files."""
    base = {"a": entry("F32", [1], 0, 4)}
    raw = json.dumps(base, separators=(",", ":"))
    padding = target_length - len(raw) - len(',"__metadata__":{"p":""}')
    base["__metadata__"] = {"p": "x" * padding}
    content = file_bytes(base, b"\0\0\x80\x3f", pad=False)  # older writers did not pad
    assert int.from_bytes(content[:8], "little") == target_length
    path = write(tmp_path / "w.safetensors", content)
    assert sniffing.sniff(path) == "safetensors"
    assert torch.equal(mk.load_state_dict(path)["a"], torch.tensor([1.0]))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.integers(0, 3000))
def test_any_metadata_length_reads_back(tmp_path, extra):
    path = tmp_path / "w.safetensors"
    mk.save_weights({"a": torch.ones(2)}, path, metadata={"pad": "y" * extra})
    assert sniffing.sniff(str(path)) == "safetensors"
    assert torch.equal(mk.load_state_dict(path)["a"], torch.ones(2))


def test_torch_save_files_are_named_as_such(tmp_path):
    zipped = tmp_path / "zip.pt"
    torch.save({"a": torch.ones(2)}, zipped)
    legacy = tmp_path / "legacy.pt"
    torch.save({"a": torch.ones(2)}, legacy, _use_new_zipfile_serialization=False)
    assert sniffing.sniff(str(zipped)) == "zip"
    assert sniffing.sniff(str(legacy)) == "pickle"
    for path in (zipped, legacy):
        with pytest.raises(errors.FormatError, match="torch.save"):
            reading.read_header(path)  # the safetensors reader says what the file is instead
