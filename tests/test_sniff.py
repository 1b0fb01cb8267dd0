"""One answer to "what kind of file is this?" for every reader, on every backend."""

from __future__ import annotations

import io
import json
import struct

import pytest
import torch
from hypothesis import given, strategies as st

import modelkeep as mk
from modelkeep import format, sniff, storage
from places import Place


def _torch(value, **kwargs) -> bytes:  # noqa: ANN001
    buffer = io.BytesIO()
    torch.save(value, buffer, **kwargs)
    return buffer.getvalue()


def _safetensors(header_length: int) -> bytes:
    header = json.dumps({"__metadata__": {}}).encode().ljust(header_length)
    return struct.pack("<Q", len(header)) + header


@pytest.mark.parametrize("head, kind", [
    (b"PK\x03\x04rest", "zip"),
    (b"PK\x05\x06" + b"\0" * 18, "zip"),
    (b"\x80\x02}q\x00.", "pickle"),
    (b"(lp0\n.", "pickle"),
    (b"\0" * 257 + b"ustar\x0000" + b"\0" * 200, "tar"),
    (_safetensors(384), "safetensors"),  # 384 = 0x180: the length's first byte looks like a pickle
    (b"", None),
    (b"hello world", None),
])
def test_kind_of_head(head: bytes, kind: str | None) -> None:
    assert sniff.kind_of_head(head) == kind


@given(st.integers(min_value=2, max_value=4096))
def test_any_plausible_safetensors_length_wins_over_pickle_opcodes(length: int) -> None:
    assert sniff.kind_of_head(_safetensors(length)) == "safetensors"


def test_too_long_a_header_is_not_called_safetensors() -> None:
    head = struct.pack("<Q", format.MAX_HEADER_BYTES + 1) + b"{"
    assert sniff.kind_of_head(head) is None


def test_every_kind_on_every_backend(place: Place) -> None:
    mk.save_weights({"w": torch.ones(2)}, place.path("w.safetensors"), storage_options=place.options)
    place.put("zip.pt", _torch({"w": torch.ones(2)}))
    place.put("stream.pt", _torch({"w": torch.ones(2)}, _use_new_zipfile_serialization=False))
    place.put("m.safetensors.index.json", b"{}")
    place.put("junk.bin", b"\x00\x01\x02 unknown binary")
    store, root = storage.resolve(place.root, place.options)
    kinds = {name: sniff.sniff(store.join(root, name), store) for name in store.list_names(root)}
    assert kinds == {"w.safetensors": "safetensors", "zip.pt": "zip", "stream.pt": "pickle",
                     "m.safetensors.index.json": "index", "junk.bin": "safetensors"}  # the strict reader says
    assert sniff.sniff(root, store) == "folder"
    place.put("notes.txt", b"not a model")
    with pytest.raises(mk.FormatError, match="it looks like text"):
        sniff.sniff(store.join(root, "notes.txt"), store)


def test_a_missing_file_is_a_storage_error(place: Place) -> None:
    store, root = storage.resolve(place.root, place.options)
    with pytest.raises(mk.StorageError) as caught:
        sniff.sniff(store.join(root, "missing.pt"), store)
    assert "missing.pt" in str(caught.value)
