"""Hostile and damaged files: every reader answers with a FormatError and nothing else.

Each case goes through every public reader (header only, inspect, verify, load_state_dict,
load_weights), because each touches a different part of the header. No case may produce a bare
KeyError, struct/JSON/Recursion error, a torch error, a crash, a hang or a huge allocation.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import modelkeep as mk
from modelkeep import errors, format, reading

from helpers import entry, file_bytes, write


class _Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(4, 3)
        self.head = nn.Linear(3, 4, bias=False)
        self.head.weight = self.emb.weight
        self.norm = nn.LayerNorm(3)


READERS: dict[str, Callable[[str], Any]] = {
    "read_header_file": format.read_header_file,
    "open_header": reading.read_header,
    "inspect": mk.inspect,
    "verify": mk.verify,
    "load_state_dict": mk.load_state_dict,
    "load_weights": lambda path: mk.load_weights(_Tied(), path),
    "load_weights_loose": lambda path: mk.load_weights(nn.Module(), path, strict=False),
}
HEADER_READERS = ("read_header_file", "open_header")


def assert_format_error(path: str, readers=tuple(READERS)) -> None:
    for name in readers:
        with pytest.raises(errors.FormatError) as caught:
            READERS[name](path)
        assert caught.value.path == path, name
        assert caught.value.fix, name


def assert_only_modelkeep_errors(path: str) -> None:
    for name, reader in READERS.items():
        try:
            reader(path)
        except errors.ModelkeepError:
            pass


@pytest.fixture(scope="module")
def good_file(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("good") / "tied.safetensors")
    model = _Tied()
    mk.save_weights(model, path, metadata={"note": "x"})
    return path


def _read(path: str) -> bytes:
    with open(path, "rb") as stream:
        return stream.read()


# --------------------------------------------------------------------------------------------
# Truncation


def test_good_file_is_good(good_file):
    for reader in READERS.values():
        reader(good_file)
    assert mk.verify(good_file).ok


def test_truncated_at_every_byte(good_file, tmp_path):
    content = _read(good_file)
    assert len(content) < 2000
    path = str(tmp_path / "cut.safetensors")
    for cut in range(len(content)):
        write(path, content[:cut])
        assert_format_error(path)


def test_truncated_at_every_structural_boundary(tmp_path):
    state = {"a": torch.randn(1000), "b": torch.zeros(0, 4), "c": torch.randn(300, 7).double()}
    source = str(tmp_path / "big.safetensors")
    mk.save_weights(state, source)
    content = _read(source)
    header = format.read_header_file(source)
    cuts = {0, 1, 7, 8, 9, header.data_start - 1, header.data_start, header.data_start + 1}
    for item in header.entries.values():
        cuts |= {item.begin - 1, item.begin, item.begin + 1, item.end - 1, item.end}
    cuts = sorted(c for c in cuts if 0 <= c < len(content))
    path = str(tmp_path / "cut.safetensors")
    for cut in cuts:
        write(path, content[:cut])
        assert_format_error(path)


# --------------------------------------------------------------------------------------------
# The length prefix


def test_header_length_beyond_file(tmp_path):
    path = write(tmp_path / "x", file_bytes(b"{}      ", length=4096))
    assert_format_error(path)


def test_header_length_all_ones(tmp_path):
    path = write(tmp_path / "x", b"\xff" * 8 + b"{}      ")
    assert_format_error(path)


def test_header_length_over_100_mb_in_a_file_that_big(tmp_path):
    """The bound holds even when the file is long enough: a 100 MB+ header is never read."""
    path = str(tmp_path / "x")
    with open(path, "wb") as stream:
        stream.write((format.MAX_HEADER_BYTES + 8).to_bytes(8, "little") + b"{")
        stream.truncate(format.MAX_HEADER_BYTES + 64)  # sparse: costs no disk
    assert_format_error(path)
    with pytest.raises(errors.FormatError, match="limit"):
        format.read_header_file(path)


@pytest.mark.parametrize("content", [b"", b"\x00", b"\x08\x00\x00", b"\x00" * 8, b"\x08" + b"\x00" * 7 + b" " * 8])
def test_tiny_files(tmp_path, content):
    assert_format_error(write(tmp_path / "x", content))


# --------------------------------------------------------------------------------------------
# Header text


@pytest.mark.parametrize(
    "raw",
    [
        b'{"\xff":1}',  # not UTF-8
        b'{"a\xc0\xaf":{}}',  # overlong encoding
        b'{"\xed\xa0\x80":{}}',  # an encoded surrogate
        b"\xef\xbb\xbf{}",  # a byte-order mark
        b"{",  # bad JSON
        b'{"a":}',
        b"{}}",
        b"{} x",
        b"{\x00}",
        b"[]",  # not an object
        b'"text"',
        b"12",
        b"null",
        b"true",
        b"[" * 200_000,  # deep nesting: RecursionError must not escape
        b'{"a":' * 100_000,
        b'{"a":{"dtype":' + b"[" * 100_000 + b"]" * 100_000 + b"}}",
        b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,' + b"9" * 5000 + b"]}}",  # int too long
        b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,NaN]}}',
        b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,Infinity]}}',
        b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,1e400]}}',
    ],
)
def test_bad_header_text(tmp_path, raw):
    assert_format_error(write(tmp_path / "x", file_bytes(raw, b"\0" * 4)))


@pytest.mark.parametrize(
    "raw",
    [
        '{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}',
        '{"a":{"dtype":"F32","dtype":"F32","shape":[1],"data_offsets":[0,4]}}',
        '{"__metadata__":{"k":"v"},"__metadata__":{"k":"v"},"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}',
        '{"__metadata__":{"k":"v","k":"w"},"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}',
    ],
)
def test_duplicate_keys(tmp_path, raw):
    path = write(tmp_path / "x", file_bytes(raw, b"\0" * 8))
    assert_format_error(path)
    with pytest.raises(errors.FormatError, match="twice"):
        format.read_header_file(path)


@pytest.mark.parametrize(
    "raw",
    [
        '{"\\ud800":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}',
        '{"__metadata__":{"\\udfff":"v"},"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}',
        '{"__metadata__":{"k":"\\ud83d"},"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}',
    ],
)
def test_lone_surrogate_escapes(tmp_path, raw):
    """JSON can spell strings that no UTF-8 holds; they would break printing and re-saving."""
    assert_format_error(write(tmp_path / "x", file_bytes(raw, b"\0" * 4)))


# --------------------------------------------------------------------------------------------
# Tensor entries

F32_1 = entry("F32", [1], 0, 4)


@pytest.mark.parametrize(
    "header, data_size",
    [
        # offsets: overlap, the same range twice, holes, out of range, trailing bytes
        ({"a": entry("F32", [2], 0, 8), "b": entry("F32", [2], 4, 12)}, 12),
        ({"a": entry("F32", [2], 0, 8), "b": entry("F32", [2], 0, 8)}, 8),
        ({"a": entry("F32", [2], 0, 8), "z": entry("F32", [0], 4, 4)}, 8),
        ({"a": entry("F32", [1], 0, 4), "b": entry("F32", [1], 8, 12)}, 12),
        ({"a": entry("F32", [1], 4, 8)}, 8),
        ({"a": entry("F32", [2], 0, 8)}, 4),
        ({"a": entry("F32", [1], 2**64, 2**64 + 4)}, 4),
        ({"a": entry("U8", [2**40], 0, 2**40)}, 4),
        ({"a": F32_1}, 8),
        ({}, 4),
        ({"a": entry("F32", [1], 0, 4), "b": entry("F32", [1], 2, 6)}, 8),
        # offsets of the wrong type or form
        ({"a": entry("F32", [1], 0.0, 4.0)}, 4),
        ({"a": entry("F32", [1], False, 4)}, 4),
        ({"a": entry("BOOL", [1], False, True)}, 1),
        ({"a": entry("F32", [1], "0", "4")}, 4),
        ({"a": entry("F32", [1], None, 4)}, 4),
        ({"a": entry("F32", [1], 4, 0)}, 4),
        ({"a": entry("F32", [1], -4, 0)}, 4),
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0]}}, 4),
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4, 8]}}, 4),
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": {"0": 4}}}, 4),
        # dtypes
        ({"a": entry("F128", [1], 0, 4)}, 4),
        ({"a": entry("f32", [1], 0, 4)}, 4),
        ({"a": entry("", [1], 0, 4)}, 4),
        ({"a": entry(4, [1], 0, 4)}, 4),
        ({"a": entry(None, [1], 0, 4)}, 4),
        ({"a": entry("F6_E2M3", [1], 0, 1)}, 1),
        ({"a": entry("C128", [1], 0, 16)}, 16),
        # shapes: overflowing, negative, non-integer, not matching the bytes
        ({"a": entry("F32", [2**40, 2**40], 0, 0)}, 0),
        ({"a": entry("F32", [2**40, 2**40], 0, 4)}, 4),
        ({"a": entry("U8", [2**61, 8], 0, 0)}, 0),
        ({"a": entry("U8", [0, 2**64], 0, 0)}, 0),
        ({"a": entry("F32", [0, 2**62], 0, 0)}, 0),
        ({"a": entry("F32", [-1], 0, 4)}, 4),
        ({"a": entry("F32", [-1, -1], 0, 4)}, 4),
        ({"a": entry("F32", [-2, 0], 0, 0)}, 0),
        ({"a": entry("F32", [1.0], 0, 4)}, 4),
        ({"a": entry("F32", [True], 0, 4)}, 4),
        ({"a": entry("F32", ["1"], 0, 4)}, 4),
        ({"a": entry("F32", [None], 0, 4)}, 4),
        ({"a": entry("F32", 1, 0, 4)}, 4),
        ({"a": entry("F32", None, 0, 4)}, 4),
        ({"a": entry("F32", [1] * 65, 0, 4)}, 4),
        ({"a": entry("F32", [2], 0, 4)}, 4),
        ({"a": entry("F32", [], 0, 0)}, 0),
        ({"a": entry("F4", [3], 0, 2)}, 2),  # odd count of 4-bit values
        ({"a": entry("F4", [], 0, 1)}, 1),
        ({"a": entry("F4", [2], 0, 2)}, 2),
        # entries of the wrong form
        ({"a": [1, 2]}, 4),
        ({"a": "F32"}, 4),
        ({"a": None}, 4),
        ({"a": {"dtype": "F32", "shape": [1]}}, 4),
        ({"a": {**F32_1, "extra": 1}}, 4),
    ],
)
def test_bad_entries(tmp_path, header, data_size):
    assert_format_error(write(tmp_path / "x", file_bytes(header, b"\0" * data_size)))


def test_zero_size_tensors_with_huge_dimensions_are_fine(tmp_path):
    """A zero dimension makes any other dimension legal (within int64), and costs no memory."""
    path = write(tmp_path / "x", file_bytes({"a": entry("U8", [0, 2**62], 0, 0), **{"b": entry("F32", [1], 0, 4)}}, b"\0" * 4))
    loaded = mk.load_state_dict(path)
    assert loaded["a"].shape == (0, 2**62) and loaded["a"].dtype == torch.uint8


# --------------------------------------------------------------------------------------------
# Metadata


@pytest.mark.parametrize(
    "metadata",
    [
        {"k": 1},
        {"k": None},
        {"k": {"a": "b"}},
        {"k": ["a"]},
        {"k": True},
        ["k", "v"],
        "k",
        12,
    ],
)
def test_metadata_must_map_strings_to_strings(tmp_path, metadata):
    assert_format_error(write(tmp_path / "x", file_bytes({"__metadata__": metadata, "a": F32_1}, b"\0" * 4)))


def test_null_metadata_is_accepted(tmp_path):
    path = write(tmp_path / "x", file_bytes({"__metadata__": None, "a": F32_1}, b"\0" * 4))
    assert mk.inspect(path).metadata == {}


ALIAS_READERS = ("inspect", "load_state_dict", "load_weights", "load_weights_loose")


@pytest.mark.parametrize(
    "aliases",
    [
        '{"b":"missing"}',  # points at no tensor
        '{"a":"a"}',  # hides a stored tensor
        '{"c":"b","b":"a"}',  # a chain
        '{"b":3}',
        '["a"]',
        '"a"',
        "not json",
        '{"b":"a","b":"a"}',
        "[" * 100_000,  # RecursionError inside a metadata value
    ],
)
def test_bad_aliases(tmp_path, aliases):
    path = write(tmp_path / "x", file_bytes({"__metadata__": {"modelkeep.aliases": aliases}, "a": F32_1}, b"\0" * 4))
    assert_format_error(path, ALIAS_READERS)


HASH_READERS = ("inspect", "verify")


@pytest.mark.parametrize(
    "hashes",
    [
        '["xxh3-128"]',
        '{"tensors":{"a":"00"}}',
        '{"algorithm":3,"tensors":{}}',
        '{"algorithm":"xxh3-128","tensors":["a"]}',
        '{"algorithm":"xxh3-128","tensors":{"a":1}}',
        '{"algorithm":"xxh3-128"',
        "{" * 100_000,
    ],
)
def test_bad_hash_records(tmp_path, hashes):
    path = write(tmp_path / "x", file_bytes({"__metadata__": {"modelkeep.hashes": hashes}, "a": F32_1}, b"\0" * 4))
    assert_format_error(path, HASH_READERS)


def test_unknown_hash_algorithm(tmp_path):
    hashes = '{"algorithm":"md5","tensors":{"a":"00"}}'
    path = write(tmp_path / "x", file_bytes({"__metadata__": {"modelkeep.hashes": hashes}, "a": F32_1}, b"\0" * 4))
    assert mk.inspect(path).hash_algorithm == "md5"
    with pytest.raises(errors.FormatError, match="md5"):
        mk.verify(path)


@pytest.mark.parametrize("kind", ['"blob"', "7", "not json"])
def test_bad_kind(tmp_path, kind):
    path = write(tmp_path / "x", file_bytes({"__metadata__": {"modelkeep.kind": kind}, "a": F32_1}, b"\0" * 4))
    assert_format_error(path, ("inspect",))


# --------------------------------------------------------------------------------------------
# Not safetensors at all


def test_other_files(tmp_path):
    write(tmp_path / "text.txt", b"hello world, this is not a model\n")
    write(tmp_path / "zeros", b"\0" * 64)
    write(tmp_path / "brace", b"\x10" + b"\0" * 7 + b"{" + b"\0" * 15)
    for name in ("text.txt", "zeros", "brace"):
        assert_format_error(str(tmp_path / name))


def test_torch_save_files_are_not_safetensors_files(tmp_path):
    """The safetensors readers name a torch.save file as such (loading it is the legacy
    reader's job, and never runs code from it)."""
    torch.save({"a": torch.ones(2)}, tmp_path / "zip.pt")
    torch.save({"a": torch.ones(2)}, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    for name in ("zip.pt", "legacy.pt"):
        with pytest.raises(errors.FormatError, match="torch.save"):
            READERS["open_header"](str(tmp_path / name))
        with pytest.raises(errors.FormatError):
            format.read_header_file(str(tmp_path / name))
    # verify checks a zip archive's CRC-32s; a stream file has none to check
    assert mk.verify(tmp_path / "zip.pt").ok and mk.verify(tmp_path / "zip.pt").algorithm == "crc32 (zip)"
    assert mk.verify(tmp_path / "legacy.pt").unhashed == ["a"]


def test_missing_files_are_storage_errors(tmp_path):
    a_file = write(tmp_path / "file", b"x")
    for path in (
        str(tmp_path / "missing.safetensors"),
        os.path.join(a_file, "inside"),  # NotADirectoryError
        str(tmp_path / ("n" * 300)),  # ENAMETOOLONG
    ):
        for name, reader in READERS.items():
            with pytest.raises(errors.StorageError):
                reader(path)


def test_a_folder_is_a_modelkeep_error(tmp_path):
    """A folder is not a file (the loaders also take folders of shards, which this is not)."""
    for name, reader in READERS.items():
        with pytest.raises((errors.StorageError, errors.FormatError)):
            reader(str(tmp_path))


def test_unreadable_file_is_a_storage_error(tmp_path, monkeypatch):
    """Permission denied (simulated: the tests may run as root, who reads everything)."""
    import builtins
    import errno

    path = str(tmp_path / "w.safetensors")
    mk.save_weights({"a": torch.ones(1)}, path)
    real_open, real_os_open = builtins.open, os.open

    def denied(file, *args, **kwargs):
        if os.fspath(file) == path:
            raise PermissionError(errno.EACCES, "Permission denied", path)
        return real_open(file, *args, **kwargs)

    def os_denied(file, *args, **kwargs):
        if os.fspath(file) == path:
            raise PermissionError(errno.EACCES, "Permission denied", path)
        return real_os_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", denied)
    monkeypatch.setattr(os, "open", os_denied)
    for reader in READERS.values():
        with pytest.raises(errors.StorageError) as caught:
            reader(path)
        assert caught.value.path == path


# --------------------------------------------------------------------------------------------
# Random damage


mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 10**6), st.integers(1, 255)),
    st.tuples(st.just("set"), st.integers(0, 10**6), st.integers(0, 255)),
    st.tuples(st.just("cut"), st.integers(0, 10**6), st.just(0)),
    st.tuples(st.just("insert"), st.integers(0, 10**6), st.integers(0, 255)),
    st.tuples(st.just("delete"), st.integers(0, 10**6), st.just(0)),
)


def _mutate(content: bytes, steps: list[tuple[str, int, int]]) -> bytes:
    data = bytearray(content)
    for kind, position, value in steps:
        if not data and kind != "insert":
            continue
        where = position % max(len(data), 1)
        if kind == "flip":
            data[where] ^= value
        elif kind == "set":
            data[where] = value
        elif kind == "cut":
            del data[where:]
        elif kind == "insert":
            data.insert(where, value)
        else:
            del data[where]
    return bytes(data)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(mutation, min_size=1, max_size=4))
def test_random_damage_gives_only_modelkeep_errors(good_file, tmp_path_factory, steps):
    path = str(tmp_path_factory.getbasetemp() / "damaged.safetensors")
    write(path, _mutate(_read(good_file), steps))
    assert_only_modelkeep_errors(path)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.integers(0, 10**6), st.binary(min_size=1, max_size=8))
def test_random_header_bytes_give_only_format_errors(good_file, tmp_path_factory, position, replacement):
    """Damage inside the header text: a FormatError, or (rarely) a still-valid file."""
    content = bytearray(_read(good_file))
    length = int.from_bytes(content[:8], "little")
    where = 8 + position % length
    content[where : where + len(replacement)] = replacement
    path = str(tmp_path_factory.getbasetemp() / "damaged-header.safetensors")
    write(path, bytes(content))
    for name in HEADER_READERS:
        try:
            READERS[name](path)
        except errors.FormatError:
            pass


# Headers built from plausible pieces, so the fuzzing reaches the layout rules rather than
# stopping at the JSON parser.
_DIMS = st.one_of(st.integers(0, 6), st.integers(-3, 2**65), st.sampled_from([1.0, True, None, "2"]))
_OFFSET = st.one_of(st.integers(0, 64), st.integers(-2, 2**65), st.sampled_from([0.0, False, None]))
_ENTRY = st.fixed_dictionaries(
    {
        "dtype": st.one_of(st.sampled_from(sorted(format._DTYPE_NAMES)), st.sampled_from(["F128", "", 3])),
        "shape": st.one_of(st.lists(_DIMS, max_size=3), st.just(5)),
        "data_offsets": st.one_of(st.lists(_OFFSET, min_size=2, max_size=2), st.lists(_OFFSET, max_size=3)),
    }
)
_META = st.one_of(
    st.none(),
    st.dictionaries(
        st.sampled_from(["note", "modelkeep.aliases", "modelkeep.hashes", "modelkeep.kind"]),
        st.one_of(st.text(max_size=6), st.sampled_from(['{"b":"a"}', '{"a":"b"}', '"weights"', "{}", "[]"])),
        max_size=3,
    ),
    st.integers(),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.dictionaries(st.sampled_from(["a", "b", "c", "é"]), _ENTRY, max_size=3),
    _META,
    st.integers(0, 80),
)
def test_structured_random_headers(tmp_path_factory, tensors, metadata, data_size):
    header: dict[str, Any] = {} if metadata is None else {"__metadata__": metadata}
    header.update(tensors)
    path = str(tmp_path_factory.getbasetemp() / "structured.safetensors")
    write(path, file_bytes(header, bytes(range(data_size))))
    try:
        parsed = format.read_header_file(path)
    except errors.FormatError:
        assert_format_error(path)
        return
    # A header that passes is consistent: entries tile the data and sizes match shapes.
    offset = parsed.data_start
    for item in sorted(parsed.entries.values(), key=lambda e: (e.begin, e.end)):
        assert item.begin == offset and item.nbytes == item.torch_dtype.itemsize * _count(item.shape)
        offset = item.end
    assert offset == parsed.file_size
    assert_only_modelkeep_errors(path)
    try:
        state = mk.load_state_dict(path)
    except errors.FormatError:  # bad aliases
        return
    for name, item in parsed.entries.items():
        assert tuple(state[name].shape) == item.shape and state[name].dtype == item.torch_dtype


def _count(shape: tuple[int, ...]) -> int:
    total = 1
    for dim in shape:
        total *= dim
    return total


@st.composite
def _near_valid(draw):
    """A consistent header, then at most one small defect in one place."""
    count = draw(st.integers(0, 4))
    entries, offset = {}, 0
    for i in range(count):
        dtype = draw(st.sampled_from(sorted(format._DTYPE_NAMES)))
        shape = draw(st.lists(st.integers(0, 3), min_size=1 if dtype == "F4" else 0, max_size=3))
        if dtype == "F4":
            shape[-1] *= 2
        size = _count(tuple(shape)) * format.itemsize(dtype) // (2 if dtype == "F4" else 1)
        entries[f"t{i}"] = entry(dtype, shape, offset, offset + size)
        offset += size
    data_size = offset
    defect = draw(st.sampled_from(["none", "begin", "end", "dim", "data", "swap", "dtype"]))
    delta = draw(st.sampled_from([-1, 1, 2**63, -(2**63), 2**64]))
    if entries and defect != "none":
        victim = entries[draw(st.sampled_from(sorted(entries)))]
        if defect == "begin":
            victim["data_offsets"][0] += delta
        elif defect == "end":
            victim["data_offsets"][1] += delta
        elif defect == "dim" and victim["shape"]:
            victim["shape"][0] += delta
        elif defect == "data":
            data_size = max(0, data_size + delta % 3 - 1)
        elif defect == "swap":
            victim["data_offsets"].reverse()
        elif defect == "dtype":
            victim["dtype"] = draw(st.sampled_from(sorted(format._DTYPE_NAMES)))
    return entries, data_size


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(_near_valid())
def test_near_valid_headers(tmp_path_factory, case):
    entries, data_size = case
    path = str(tmp_path_factory.getbasetemp() / "near-valid.safetensors")
    write(path, file_bytes(entries, bytes(i % 251 for i in range(data_size))))
    try:
        parsed = format.read_header_file(path)
    except errors.FormatError:
        assert_format_error(path)
        return
    state = mk.load_state_dict(path)
    for name, item in parsed.entries.items():
        assert tuple(state[name].shape) == item.shape and state[name].dtype == item.torch_dtype
        with open(path, "rb") as stream:
            stream.seek(item.begin)
            assert stream.read(item.nbytes) == state[name].contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    assert_only_modelkeep_errors(path)
