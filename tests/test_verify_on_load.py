"""``verify=True`` on loads: every tensor read is checked against the digests the file recorded,
so a bit flipped on disk is never loaded silently (off by default: see ``load_weights``)."""

from __future__ import annotations

import pytest
import torch

import modelkeep as mk
from modelkeep import reading


def flip_a_bit(path, name: str) -> None:
    """Flip one bit inside tensor ``name``'s bytes, leaving the header (and its digests) alone."""
    header = reading.read_header(path)
    entry = header.entries[name]
    data = bytearray(path.read_bytes())
    data[entry.begin + entry.nbytes // 2] ^= 0x10  # begin is a file offset
    path.write_bytes(bytes(data))


def model() -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))


def test_a_flipped_bit_is_caught_by_every_load_when_verify_is_on(tmp_path) -> None:
    weights_file, model_file = tmp_path / "w.safetensors", tmp_path / "m.safetensors"
    mk.save_weights(model(), weights_file)
    mk.save(model(), model_file)
    report = mk.load_weights(model(), weights_file, verify=True)
    assert report.verified == 4
    assert mk.load_state_dict(weights_file, verify=True).keys() == model().state_dict().keys()
    mk.load(model_file, verify=True)
    for path in (weights_file, model_file):
        flip_a_bit(path, "0.weight")
    with pytest.raises(mk.IntegrityError, match="0.weight") as caught:
        mk.load_weights(model(), weights_file, verify=True)
    assert caught.value.path == str(weights_file) and "good copy" in caught.value.fix
    with pytest.raises(mk.IntegrityError, match="0.weight"):
        mk.load_state_dict(weights_file, verify=True, device="meta")
    with pytest.raises(mk.IntegrityError, match="0.weight"):
        mk.load(model_file, verify=True)
    # off by default (it costs more than a default may: see load_weights), and said so by verify
    assert mk.load_weights(model(), weights_file).verified == 0
    assert mk.verify(weights_file).mismatched == ["0.weight"]


def test_converted_tensors_are_left_to_verify(tmp_path) -> None:
    path = tmp_path / "w.safetensors"
    mk.save_weights(model(), path)
    report = mk.load_weights(model(), path, dtype=torch.float64, verify=True)
    assert report.verified == 0  # the bytes in memory are not the file's: nothing to compare
