"""Zip end records (issue 8, item 8): an archive whose end-of-central-directory record, zip64
end record or locator disagrees with its central directory (counts, size, offset, disks, bytes
before or after) is refused by the readers and unreadable to ``scan``; real torch.save archives,
zip64 ones included, still load."""

from __future__ import annotations

import io
import struct
import zipfile

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import modelkeep as mk
from modelkeep import errors

from test_legacy_support import same

from modelkeep import scanning

def end_offsets(data: bytes) -> tuple[int, int, int]:
    """(end record, zip64 locator, zip64 end record) offsets of a torch.save archive."""
    eocd = data.rindex(b"PK\x05\x06")
    locator = eocd - 20
    assert data[locator : locator + 4] == b"PK\x06\x07"
    zip64 = struct.unpack_from("<Q", data, locator + 8)[0]
    assert data[zip64 : zip64 + 4] == b"PK\x06\x06"
    return eocd, locator, zip64


def patched(data: bytes, *changes: tuple[int, str, int]) -> bytes:
    out = bytearray(data)
    for offset, fmt, value in changes:
        struct.pack_into(fmt, out, offset, value)
    return bytes(out)


@pytest.fixture
def torch_zip(tmp_path):
    state = {f"layer{k}.weight": torch.randn(3, 2) for k in range(5)}
    path = tmp_path / "model.pt"
    torch.save(state, path)
    return path, state, path.read_bytes()


def _count(data: bytes) -> int:
    return struct.unpack_from("<H", data, data.rindex(b"PK\x05\x06") + 10)[0]


def _mutations(data: bytes) -> dict[str, bytes]:
    eocd, locator, zip64 = end_offsets(data)
    n = _count(data)
    size, offset = struct.unpack_from("<2L", data, eocd + 12)
    return {
        # fewer entries counted than headers present, in every record: zipfile still lists them all
        "hidden entry": patched(data, (eocd + 8, "<H", n - 1), (eocd + 10, "<H", n - 1),
                                (zip64 + 24, "<Q", n - 1), (zip64 + 32, "<Q", n - 1)),
        "end count only": patched(data, (eocd + 10, "<H", n + 1)),
        "disk count only": patched(data, (eocd + 8, "<H", n - 1)),
        "zip64 counts only": patched(data, (zip64 + 24, "<Q", n + 3), (zip64 + 32, "<Q", n + 3)),
        "end size only": patched(data, (eocd + 12, "<L", size - 1)),
        "directory offset": patched(data, (eocd + 16, "<L", offset + 4), (zip64 + 48, "<Q", offset + 4)),
        "locator offset": patched(data, (locator + 8, "<Q", zip64 - 8)),
        "two disks": patched(data, (eocd + 4, "<H", 1), (zip64 + 16, "<L", 1)),
        "bytes after the end": data + b"\0" * 64,
    }


MUTATIONS = ["hidden entry", "end count only", "disk count only", "zip64 counts only", "end size only",
             "directory offset", "locator offset", "two disks", "bytes after the end"]


@pytest.mark.parametrize("case", MUTATIONS)
def test_zip_end_records_that_disagree_are_refused(tmp_path, torch_zip, case):
    path, _, data = torch_zip
    bad = tmp_path / "bad.pt"
    bad.write_bytes(_mutations(data)[case])
    for reader in (mk.read, mk.load_state_dict):
        with pytest.raises(errors.FormatError) as caught:
            reader(bad)
        assert caught.value.path == str(bad) and "re-save" in caught.value.fix
        assert caught.value.item == "end of central directory", str(caught.value)
    (result,) = scanning.scan(bad)
    assert result.verdict == "unreadable" and scanning.exit_code([result]) == 2


def test_hidden_entry_is_invisible_to_zipfile(tmp_path, torch_zip):
    """Why the check is needed: zipfile walks the directory by size and ignores the counts, and
    torch's own reader accepts the file too, while a reader trusting the counts sees one entry
    less. Every mutation above that zipfile accepts is refused by modelkeep's own check."""
    _, state, data = torch_zip
    bad = tmp_path / "bad.pt"
    bad.write_bytes(_mutations(data)["hidden entry"])
    with zipfile.ZipFile(bad) as archive:
        assert len(archive.infolist()) == _count(data)
    same(torch.load(bad, weights_only=True), state)
    for case in MUTATIONS:
        with zipfile.ZipFile(io.BytesIO(_mutations(data)[case])) as archive:
            assert len(archive.infolist()) == _count(data), case
    with pytest.raises(errors.FormatError, match=f"counts {_count(data) - 1} entries but the central directory holds {_count(data)}"):
        mk.read(bad)


def test_real_torch_zips_still_load(tmp_path, torch_zip):
    path, state, data = torch_zip
    end_offsets(data)  # torch writes a zip64 end record and locator even for small files
    same(mk.read(path), torch.load(path, weights_only=True))
    # what torch (miniz) writes once offsets pass 4 GiB: the short record's fields saturate
    eocd, _, _ = end_offsets(data)
    large = tmp_path / "large.pt"
    large.write_bytes(patched(data, (eocd + 4, "<H", 0xFFFF), (eocd + 6, "<H", 0xFFFF), (eocd + 8, "<H", 0xFFFF),
                              (eocd + 10, "<H", 0xFFFF), (eocd + 12, "<L", 0xFFFFFFFF), (eocd + 16, "<L", 0xFFFFFFFF)))
    reference = torch.load(large, weights_only=True)
    same(mk.read(large), reference)
    same(mk.load_state_dict(large), state)
    many = {f"block{k}.weight": torch.full((2,), float(k)) for k in range(3000)}
    torch.save(many, tmp_path / "many.pt")
    same(mk.load_state_dict(tmp_path / "many.pt"), torch.load(tmp_path / "many.pt", weights_only=True))
    # rewritten by Python's zipfile (no zip64 record), with and without an archive comment
    for comment in (b"", b"a comment PK"):
        copy = tmp_path / "copy.pt"
        with zipfile.ZipFile(path) as src, zipfile.ZipFile(copy, "w") as dst:
            for info in src.infolist():
                dst.writestr(info.filename, src.read(info.filename))
            dst.comment = comment
        same(mk.load_state_dict(copy), state)


def test_end_record_signature_inside_the_comment_is_refused(tmp_path, torch_zip):
    path, _, _ = torch_zip
    copy = tmp_path / "copy.pt"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(copy, "w") as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info.filename))
    with zipfile.ZipFile(copy) as archive:
        assert len(archive.infolist()) == 11 and mk.load_state_dict(copy)
    for comment, message in ((b"PK\x05\x06" + bytes(18), "do not end where the end records begin"),
                             (b"PK\x05\x06" + bytes(18) + b"x", "does not end the file")):
        data = copy.read_bytes()
        fake = tmp_path / "fake.pt"  # a second end record inside the comment: zipfile takes it
        fake.write_bytes(data[:-2] + struct.pack("<H", len(comment)) + comment)
        with zipfile.ZipFile(fake) as archive:
            assert archive.infolist() == []
        with pytest.raises(errors.FormatError, match=message):
            mk.read(fake)


def test_bundle_zip_with_a_hidden_member_is_unreadable_to_scan(tmp_path, torch_zip):
    path, _, _ = torch_zip
    bundle = tmp_path / "bundle.zip"
    with zipfile.ZipFile(bundle, "w") as archive:
        archive.write(path, "models/a.pt")
        archive.writestr("README.md", "two members")
    data = bundle.read_bytes()
    eocd = data.rindex(b"PK\x05\x06")
    bundle.write_bytes(patched(data, (eocd + 8, "<H", 1), (eocd + 10, "<H", 1)))
    results = scanning.scan(bundle)
    assert [(r.verdict, "1 entries but the central directory holds 2" in (r.error or "")) for r in results] == [("unreadable", True)]
    assert scanning.exit_code(results) == 2


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(deltas=st.tuples(*[st.integers(-2, 2)] * 4))
def test_any_count_change_is_refused_and_none_is_accepted(tmp_path, torch_zip, deltas):
    path, state, data = torch_zip
    eocd, _, zip64 = end_offsets(data)
    n = _count(data)
    here, total, z_here, z_total = (n + d for d in deltas)
    candidate = tmp_path / "candidate.pt"
    candidate.write_bytes(patched(data, (eocd + 8, "<H", here), (eocd + 10, "<H", total),
                                  (zip64 + 24, "<Q", z_here), (zip64 + 32, "<Q", z_total)))
    if deltas == (0, 0, 0, 0):
        same(mk.load_state_dict(candidate), state)
    else:
        with pytest.raises(errors.FormatError, match="entries"):
            mk.load_state_dict(candidate)
