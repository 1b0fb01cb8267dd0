"""``modelkeep.read`` takes what ``torch.load`` takes, with torch's meaning: every kind of source
(paths, open files at any position, BytesIO, bytes, zip members, streams that cannot seek) and
every argument form (map_location, mmap, encoding, weights_only, pickle_module), compared with
real torch on files real torch wrote."""

from __future__ import annotations

import io
import os
import pathlib
import pickle
import zipfile

import pytest
import torch

import modelkeep as mk
from modelkeep.legacy import blobs as legacy_blobs
from test_legacy_support import same, write_tar

FORMATS = {"zip": True, "legacy": False}


def state() -> dict:
    torch.manual_seed(0)
    base = torch.randn(4, 3)
    return {"w": base, "view": base[1:], "i": torch.arange(5), "h": torch.randn(2, 2).half(), "n": 3}


def saved(fmt: str) -> bytes:
    stream = io.BytesIO()
    torch.save(state(), stream, _use_new_zipfile_serialization=FORMATS[fmt])
    return stream.getvalue()


class OneWay(io.RawIOBase):
    """A stream that cannot seek (a pipe, a socket, an HTTP body)."""

    def __init__(self, data: bytes) -> None:
        self._data = io.BytesIO(data)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def readinto(self, buffer) -> int:
        return self._data.readinto(buffer)


def sources(tmp_path: pathlib.Path, data: bytes):
    path = tmp_path / "f.pt"
    path.write_bytes(data)
    prefixed = tmp_path / "prefixed.bin"
    prefixed.write_bytes(b"header-bytes" + data)
    archive = tmp_path / "bundle.zip"
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_STORED) as bundle:
        bundle.writestr("model/f.pt", data)
    yield "str", lambda: str(path)
    yield "PathLike", lambda: path
    yield "open file", lambda: open(path, "rb")
    yield "open file at an offset", lambda: _at(open(prefixed, "rb"), 12)
    yield "BytesIO", lambda: io.BytesIO(data)
    yield "bytes", lambda: data
    yield "bytearray", lambda: bytearray(data)
    yield "memoryview", lambda: memoryview(data)
    yield "zip member", lambda: zipfile.ZipFile(archive).open("model/f.pt")
    yield "stream that cannot seek", lambda: io.BufferedReader(OneWay(data))


def _at(stream, offset: int):
    stream.seek(offset)
    return stream


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_every_source_gives_what_torch_load_gives(tmp_path, fmt) -> None:
    data = saved(fmt)
    expected = torch.load(io.BytesIO(data), weights_only=True)
    for kind, make in sources(tmp_path, data):
        ours = mk.read(make())
        same(ours, expected, f"{fmt} from {kind}")
        assert ours["view"].untyped_storage().data_ptr() == ours["w"].untyped_storage().data_ptr(), kind


def test_objects_saved_one_after_another_read_one_after_another(tmp_path) -> None:
    stream = io.BytesIO()
    stream.write(b"prefix")
    objects = [{"a": torch.ones(2)}, [torch.zeros(3), 7], {"c": torch.arange(4)}]
    for value in objects:
        torch.save(value, stream, _use_new_zipfile_serialization=False)
    ends = []
    stream.seek(len(b"prefix"))
    for value in objects:
        same(mk.read(stream), value)
        ends.append(stream.tell())
    theirs = io.BytesIO(stream.getvalue())
    theirs.seek(len(b"prefix"))
    for end in ends:  # positioned exactly where torch.load leaves it
        torch.load(theirs, weights_only=True)
        assert theirs.tell() == end
    assert stream.read() == b""


def test_a_safetensors_file_in_a_stream_leaves_what_follows(tmp_path) -> None:
    path = tmp_path / "w.safetensors"
    mk.save_weights({"x": torch.arange(6.0)}, path)
    stream = io.BytesIO(path.read_bytes() + b"NEXT")
    assert torch.equal(mk.read(stream)["x"], torch.arange(6.0))
    assert stream.read() == b"NEXT"
    stream = io.BytesIO(path.read_bytes())
    assert torch.equal(mk.load_state_dict(stream)["x"], torch.arange(6.0))
    model = torch.nn.Linear(2, 3)
    mk.save_weights(model, path)
    fresh = torch.nn.Linear(2, 3)
    with open(path, "rb") as opened:
        mk.load_weights(fresh, opened)
    assert torch.equal(fresh.weight, model.weight)


def test_load_state_dict_and_load_weights_take_file_objects(tmp_path) -> None:
    model = torch.nn.Linear(3, 2)
    stream = io.BytesIO()
    torch.save(model.state_dict(), stream)
    stream.seek(0)
    fresh = torch.nn.Linear(3, 2)
    mk.load_weights(fresh, stream)
    assert torch.equal(fresh.weight, model.weight)
    assert set(mk.load_state_dict(stream.getvalue())) == {"weight", "bias"}


@pytest.mark.parametrize("fmt", sorted(FORMATS))
@pytest.mark.parametrize(
    "map_location",
    [None, "cpu", torch.device("cpu"), "meta", torch.device("meta"), {"cpu": "meta"}, {"cuda:0": "cpu"},
     lambda storage, location: storage, lambda storage, location: None],
    ids=["None", "cpu", "device-cpu", "meta", "device-meta", "dict-to-meta", "dict-other", "callable", "callable-None"],
)
def test_map_location_forms(fmt, map_location) -> None:
    data = saved(fmt)
    expected = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    ours = mk.read(data, map_location=map_location)
    for name in ("w", "view", "i", "h"):
        assert ours[name].device == expected[name].device, name
        assert ours[name].dtype == expected[name].dtype and ours[name].shape == expected[name].shape
        assert ours[name].stride() == expected[name].stride()
        assert ours[name].storage_offset() == expected[name].storage_offset()
        if expected[name].device.type == "cpu":
            assert torch.equal(ours[name], expected[name])
    # tensors that shared a storage in the file still share one after the move
    assert ours["view"].untyped_storage()._cdata == ours["w"].untyped_storage()._cdata


def test_map_location_mistakes_are_typed_errors() -> None:
    data = saved("zip")
    with pytest.raises(mk.InvalidArgumentError, match="map_location"):
        mk.read(data, map_location=42)
    with pytest.raises(mk.InvalidArgumentError, match="not a storage"):
        mk.read(data, map_location=lambda storage, location: "cpu")
    with pytest.raises(mk.InvalidArgumentError, match="bytes for one of"):
        mk.read(data, map_location=lambda storage, location: torch.UntypedStorage(1))
    if not torch.cuda.is_available():
        with pytest.raises(mk.InvalidArgumentError, match="does not have"):
            mk.read(data, map_location="cuda:0")


def test_mmap_maps_zip_files_instead_of_reading_them(tmp_path, monkeypatch) -> None:
    path = tmp_path / "f.pt"
    path.write_bytes(saved("zip"))
    expected = torch.load(path, mmap=True, weights_only=True)

    copied, read_blob = [], legacy_blobs.read_blob

    def spy(blob, *args, **kwargs):
        copied.append(blob.name)
        return read_blob(blob, *args, **kwargs)

    monkeypatch.setattr(legacy_blobs, "read_blob", spy)
    same(mk.read(path, mmap=True), expected)
    assert copied and not [name for name in copied if "/data/" in name]  # records only, no tensor data



def test_encoding_of_python2_strings() -> None:
    # protocol 2, a Python 2 str (SHORT_BINSTRING) holding latin-1 bytes: {'k': '\xe9t\xe9'}
    data = b"\x80\x02}q\x00U\x01kU\x03\xe9t\xe9s."
    assert mk.read(data, encoding="latin1") == pickle.loads(data, encoding="latin1") == {"k": "été"}
    assert mk.read(data, encoding="bytes") == pickle.loads(data, encoding="bytes") == {b"k": b"\xe9t\xe9"}
    with pytest.raises(mk.FormatError, match="latin1"):
        mk.read(data, encoding="ASCII")  # pickle raises UnicodeDecodeError, a ValueError too
    with pytest.raises(ValueError):
        pickle.loads(data, encoding="ASCII")
    assert mk.read(data) == {"k": b"\xe9t\xe9"}  # default: non-UTF-8 stays bytes
    with pytest.raises(mk.InvalidArgumentError, match="encoding"):
        mk.read(data, encoding="no-such-codec")


def test_weights_only_and_pickle_module_are_accepted_and_change_nothing() -> None:
    data = saved("zip")
    expected = mk.read(data)
    for kwargs in ({"weights_only": False}, {"weights_only": True}, {"pickle_module": pickle}):
        same(mk.read(data, **kwargs), expected)
    evil = b"\x80\x02cos\nsystem\nq\x00X\x02\x00\x00\x00idq\x01\x85q\x02Rq\x03."
    with pytest.raises(mk.UnsafeContentError):
        mk.read(evil, weights_only=False)  # never runs file code, whatever it says


class Point:
    def __init__(self, x: int) -> None:
        self.x = x


def test_torch_safe_globals_are_trusted() -> None:
    stream = io.BytesIO()
    torch.save({"p": Point(3), "t": torch.ones(1)}, stream)
    data = stream.getvalue()
    with pytest.raises(pickle.UnpicklingError):
        mk.read(data)
    with torch.serialization.safe_globals([Point]):
        ours = mk.read(data)
        theirs = torch.load(io.BytesIO(data), weights_only=True)
    assert type(ours["p"]) is Point and ours["p"].x == theirs["p"].x == 3


def test_bad_sources_are_typed_errors(tmp_path) -> None:
    data = saved("legacy")
    with pytest.raises(mk.FormatError):
        mk.read(io.BytesIO(data[: len(data) // 2]))  # a stream that ends early
    path = tmp_path / "f.pt"
    path.write_bytes(data)
    with open(path, encoding="latin1") as text:
        with pytest.raises(mk.InvalidArgumentError, match="binary mode"):
            mk.read(text)
    with pytest.raises(mk.InvalidArgumentError, match="cannot read from a int"):
        mk.read(3)
    with pytest.raises(mk.InvalidArgumentError, match="path or an fsspec URL"):
        mk.save_weights({"x": torch.ones(1)}, io.BytesIO())  # writes take paths and URLs only
    assert os.listdir(tmp_path) == ["f.pt"]


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_device_moves_keep_shared_storages_for_every_source(tmp_path, fmt) -> None:
    path = tmp_path / "f.pt"
    tensors = {k: v for k, v in state().items() if isinstance(v, torch.Tensor)}
    torch.save(tensors, path, _use_new_zipfile_serialization=FORMATS[fmt])
    moved = mk.load_state_dict(path, device="meta")  # the torch.save reader used to split them
    assert moved["w"].device.type == "meta"
    assert moved["view"].untyped_storage()._cdata == moved["w"].untyped_storage()._cdata
    tied = tmp_path / "tied.safetensors"
    embed = torch.randn(4, 2)
    mk.save_weights({"embed": embed, "head": embed}, tied)
    for location in (tied, str(tied)):
        loaded = mk.load_state_dict(location, device="meta")
        assert loaded["head"] is loaded["embed"] and loaded["embed"].device.type == "meta"


@pytest.mark.parametrize("setting", ["LITTLE", "BIG"])
def test_archives_without_a_byteorder_record_follow_torchs_setting(tmp_path, setting) -> None:
    stream = io.BytesIO()
    torch.save({"x": torch.arange(4, dtype=torch.int32)}, stream)
    source = zipfile.ZipFile(io.BytesIO(stream.getvalue()))
    path = tmp_path / "old.pt"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as out:
        for info in source.infolist():
            if not info.filename.endswith("/byteorder"):
                out.writestr(info, source.read(info.filename))
    before = torch.serialization.get_default_load_endianness()
    torch.serialization.set_default_load_endianness(getattr(torch.serialization.LoadEndianness, setting))
    try:
        expected = torch.load(path, weights_only=True)
        ours = mk.read(path)
    finally:
        torch.serialization.set_default_load_endianness(before)
    assert torch.equal(ours["x"], expected["x"])
    assert (ours["x"].tolist() == [0, 1, 2, 3]) == (setting == "LITTLE")


def test_map_location_sees_the_location_the_file_recorded() -> None:
    stream = io.BytesIO()
    torch.save({"w": torch.arange(3.0), "v": torch.arange(2)}, stream, _use_new_zipfile_serialization=False)
    data = stream.getvalue()
    assert data.count(b"X\x03\x00\x00\x00cpu") == 1  # the first storage's location; the second refers back
    data = data.replace(b"X\x03\x00\x00\x00cpu", b"X\x06\x00\x00\x00cuda:0")  # as a GPU machine wrote it
    seen_theirs: list[str] = []
    seen_ours: list[str] = []
    theirs = torch.load(io.BytesIO(data), map_location=lambda s, loc: seen_theirs.append(loc) or s, weights_only=True)
    ours = mk.read(data, map_location=lambda s, loc: seen_ours.append(loc) or s)
    assert sorted(seen_ours) == sorted(seen_theirs) == ["cuda:0", "cuda:0"]
    same(ours, theirs)
    for remap in ({"cuda:0": "cpu"}, {"cuda:0": "meta"}):
        expected = torch.load(io.BytesIO(data), map_location=remap, weights_only=True)
        assert mk.read(data, map_location=remap)["w"].device == expected["w"].device, remap
    if not torch.cuda.is_available():  # torch raises; modelkeep puts the tensors on the CPU
        with pytest.raises(RuntimeError, match="CUDA"):  # a remap that leaves cuda:0 where it was
            torch.load(io.BytesIO(data), map_location={"cpu": "meta"}, weights_only=True)
        with pytest.raises(mk.InvalidArgumentError, match="does not have"):
            mk.read(data, map_location={"cpu": "meta"})
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(io.BytesIO(data), weights_only=True)
        assert mk.read(data)["w"].device.type == "cpu"


def test_bytes_and_file_objects_are_read_in_memory_without_a_temporary_copy(tmp_path, monkeypatch) -> None:
    from modelkeep.sources import torchsave

    def no_spool(*args, **kwargs):
        raise AssertionError("bytes in memory must be read in place")

    monkeypatch.setattr(torchsave, "_spool", no_spool)
    tar = tmp_path / "old.pt"
    write_tar(str(tar), {"w": torch.arange(3.0)})
    for data in (saved("zip"), saved("legacy"), tar.read_bytes()):
        expected = mk.read(tar) if data == tar.read_bytes() else torch.load(io.BytesIO(data), weights_only=True)
        same(mk.read(io.BytesIO(data)), expected)
        assert mk.inspect(tmp_path / "old.pt").tensors  # (a path: read in place as before)
    model = torch.nn.Linear(2, 2)
    stream = io.BytesIO()
    torch.save(model.state_dict(), stream)
    fresh = torch.nn.Linear(2, 2)
    mk.load_weights(fresh, stream.getvalue())
    assert torch.equal(fresh.weight, model.weight)
