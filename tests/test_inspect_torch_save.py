"""``inspect`` and ``verify`` on torch.save files: tensors by their path in the saved structure,
the globals the pickles name (nothing built or run), and zip archives' CRC-32s checked."""

from __future__ import annotations

import argparse
import json
import struct
import zipfile

import pytest
import torch
from click.testing import CliRunner

import modelkeep as mk
from modelkeep import cli


def checkpoint(path, zipped: bool = True) -> None:
    model = torch.nn.Linear(2, 3)
    torch.save({"epoch": 1, "model": model.state_dict(), "args": argparse.Namespace(lr=0.1)}, path,
               _use_new_zipfile_serialization=zipped)


@pytest.mark.parametrize("zipped", [True, False])
def test_inspect_lists_tensors_and_globals(tmp_path, zipped) -> None:
    path = tmp_path / "ckpt.pth"
    checkpoint(path, zipped)
    info = mk.inspect(path)
    assert info.kind == ("torch.save (zip)" if zipped else "torch.save (stream)")
    assert [(t.name, t.dtype, t.shape, t.nbytes) for t in info.tensors] == [
        ("model.weight", "F32", (3, 2), 24), ("model.bias", "F32", (3,), 12)]
    assert "argparse.Namespace" in info.globals and "torch._utils._rebuild_tensor_v2" in info.globals
    assert info.to_json()["globals"] == info.globals
    result = CliRunner().invoke(cli.main, ["inspect", str(path)])
    assert result.exit_code == 0 and "model.weight" in result.output and "argparse.Namespace" in result.output


def test_inspect_describes_untrusted_classes_without_building_them(tmp_path) -> None:
    path = tmp_path / "evil.pt"
    path.write_bytes(b"\x80\x02cos\nsystem\nq\x00X\x02\x00\x00\x00idq\x01\x85q\x02Rq\x03.")
    assert mk.inspect(path).globals == ["os.system"]  # described; nothing ran


def test_verify_checks_zip_crcs_and_finds_a_flipped_bit(tmp_path) -> None:
    path = tmp_path / "ckpt.pt"
    checkpoint(path)
    report = mk.verify(path)
    assert report.ok and report.algorithm == "crc32 (zip)"
    assert report.checked == ["model.weight", "model.bias"]
    with zipfile.ZipFile(path) as archive:
        member = next(i for i in archive.infolist() if i.filename.endswith("data/0"))
    data = bytearray(path.read_bytes())
    name_length, extra_length = struct.unpack_from("<HH", data, member.header_offset + 26)  # local header
    data[member.header_offset + 30 + name_length + extra_length + 4] ^= 0x01  # one bit of the weight
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes(bytes(data))
    report = mk.verify(damaged)
    assert not report.ok and report.mismatched and set(report.mismatched) <= {"model.weight", "model.bias"}
    result = CliRunner().invoke(cli.main, ["verify", str(damaged)])
    assert result.exit_code == 1
    with pytest.raises(mk.FormatError, match="CRC-32"):
        mk.load_state_dict(damaged)  # never loaded silently


def test_verify_of_a_stream_file_says_there_is_nothing_to_check(tmp_path) -> None:
    path = tmp_path / "old.pt"
    checkpoint(path, zipped=False)
    report = mk.verify(path)
    assert not report.ok and report.algorithm is None and report.unhashed == ["model.weight", "model.bias"]
    assert json.loads(json.dumps(mk.inspect(path).to_json()))["hashes"] == {"algorithm": None, "count": 0}
