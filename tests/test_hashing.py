"""The digest record and file digests (modelkeep.hashing)."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from modelkeep import errors, format, hashing
from modelkeep.io import reads


def _header(tmp_path, metadata: dict[str, str]) -> format.Header:
    planned = [format.PlannedTensor("w", "U8", (4,))]
    path = tmp_path / "h.safetensors"
    path.write_bytes(format.encode_header(planned, metadata) + b"\x01\x02\x03\x04")
    return format.read_header_file(path)


def test_algorithm_and_digests_are_xxh3_128():
    assert hashing.HASH_ALGORITHM == "xxh3-128"
    assert hashing.digest(b"abc") == xxhash.xxh3_128_hexdigest(b"abc")
    assert len(hashing.digest(b"abc")) == hashing.HASH_HEX_LENGTH
    assert hashing.EMPTY_DIGEST == xxhash.xxh3_128_hexdigest(b"")
    hasher = hashing.new_hasher()
    hasher.update(b"ab")
    hasher.update(b"c")
    assert hasher.hexdigest() == hashing.digest(b"abc")


def test_record_round_trip(tmp_path):
    digests = {"w": hashing.digest(b"\x01\x02\x03\x04")}
    encoded = hashing.encode_record(digests)
    assert json.loads(encoded) == {"algorithm": "xxh3-128", "tensors": digests}
    record = hashing.read_record(_header(tmp_path, {format.KEY_HASHES: encoded}))
    assert record == hashing.HashRecord("xxh3-128", digests) and record.known


def test_placeholder_record_has_the_final_length():
    names = ["a", "b", "ç"]
    placeholder = hashing.placeholder_record(names)
    final = hashing.encode_record({n: hashing.digest(n.encode()) for n in names})
    assert len(placeholder) == len(final)


def test_no_record_is_none(tmp_path):
    assert hashing.read_record(_header(tmp_path, {"k": "v"})) is None


@pytest.mark.parametrize("value", [
    [1, 2],
    {"algorithm": "xxh3-128"},
    {"algorithm": 3, "tensors": {}},
    {"algorithm": "xxh3-128", "tensors": []},
    {"algorithm": "xxh3-128", "tensors": {"w": 5}},
])
def test_malformed_records_are_format_errors_naming_the_file(tmp_path, value):
    header = _header(tmp_path, {format.KEY_HASHES: json.dumps(value)})
    for require_known in (True, False):
        with pytest.raises(errors.FormatError) as caught:
            hashing.read_record(header, require_known=require_known)
        assert caught.value.path == header.path
        assert caught.value.item == format.KEY_HASHES


def test_unknown_algorithm_is_refused_unless_only_reported(tmp_path):
    header = _header(tmp_path, {format.KEY_HASHES: json.dumps({"algorithm": "md5", "tensors": {"w": "00"}})})
    with pytest.raises(errors.FormatError) as caught:
        hashing.read_record(header)
    assert "md5" in str(caught.value) and caught.value.path == header.path
    record = hashing.read_record(header, require_known=False)
    assert record.algorithm == "md5" and not record.known and dict(record.tensors) == {"w": "00"}


@settings(max_examples=50, deadline=None)
@given(data=st.binary(max_size=5000), begin=st.integers(0, 5000), length=st.integers(0, 5000),
       chunk=st.integers(1, 700))
def test_digest_range_equals_the_digest_of_the_slice(tmp_path_factory, data, begin, length, chunk):
    path = str(tmp_path_factory.mktemp("d") / "f")
    with open(path, "wb") as stream:
        stream.write(data)
    begin = min(begin, len(data))
    end = min(len(data), begin + length)
    fd = os.open(path, os.O_RDONLY)
    try:
        assert reads.digest_range(fd, begin, end, path, chunk_bytes=chunk) == hashing.digest(data[begin:end])
    finally:
        os.close(fd)


def test_digest_range_past_the_end_is_a_format_error(tmp_path):
    path = str(tmp_path / "f")
    (tmp_path / "f").write_bytes(b"x" * 10)
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(errors.FormatError) as caught:
            reads.digest_range(fd, 0, 20, path)
        assert caught.value.path == path
    finally:
        os.close(fd)


def test_file_sha256(tmp_path):
    data = os.urandom(3 * 1024 + 5)
    (tmp_path / "f").write_bytes(data)
    assert hashing.file_sha256(tmp_path / "f", chunk_bytes=1000) == hashlib.sha256(data).hexdigest()
    assert hashing.file_sha256(str(tmp_path / "f")) == hashlib.sha256(data).hexdigest()
