"""Legacy strictness (issue 8, item 8): pre-1.0 tar files load as torch wrote them, with their
``sys_info`` checked; pickles with bytes after their STOP opcode (polyglots) are refused by the
readers and flagged by ``scan``. The zip end-record checks are in ``test_legacy_zipend``."""

from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import tarfile
import tempfile
import warnings
import zipfile
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import modelkeep as mk
from modelkeep import errors

import adversarial
from adversarial import call, checkpoint, g, i, ordered_dict, p2, s, t
from test_legacy_support import same

from modelkeep import scanning

SYS_INFO = {"protocol_version": 1001, "little_endian": True, "type_sizes": {"short": 2, "int": 4, "long": 8}}
POLYGLOT = "bytes after the pickle's STOP opcode"
TENSOR_TYPES = {torch.float32: "FloatTensor", torch.float64: "DoubleTensor", torch.int64: "LongTensor",
                torch.uint8: "ByteTensor", torch.int32: "IntTensor"}
STORAGE_TYPES = {torch.float32: "FloatStorage", torch.float64: "DoubleStorage", torch.int64: "LongStorage",
                 torch.uint8: "ByteStorage", torch.int32: "IntStorage"}


# ------------------------------------------------------------------------------------------
# torch <= 0.3's torch.save, step by step


def old_torch_save(obj: Any, path: str, *, sys_info: Any = SYS_INFO, storage_views: bool = False,
                   trailing: dict[str, bytes] | None = None, string_storage_keys: bool = False) -> None:
    """The tar layout exactly as torch's ``_save`` of that era wrote it: members ``sys_info``,
    ``pickle``, ``tensors``, ``storages`` in that order, each pickled (protocol 2) into a temporary
    file and added with ``tarfile.add`` to a PAX-format tar (``_add_to_tar``). Tensors are keyed by
    a fake ``_cdata`` pointer; with ``storage_views`` a tensor that starts inside its storage is
    written on a storage view (``storage[offset:]``), as torch did for narrowed storages.
    ``trailing`` appends bytes to members (for the refusal tests); ``string_storage_keys`` keys
    storages (and views) by strings, as files from before torch 0.4 did."""
    tensors: dict[int, torch.Tensor] = {}
    keys: dict[int, int] = {}
    storage_keys: dict[int, int] = {}
    roots: dict[int, torch.Tensor] = {}
    views: list[tuple[int, int, int, int]] = []
    tensor_storage: dict[int, tuple[int, int]] = {}  # tensor key -> (storage key, offset within it)

    def cdata(value: Any) -> int:
        return keys.setdefault(id(value), 0x5600_0000 + 0x40 * len(keys))

    class Pickler(pickle.Pickler):
        def persistent_id(self, value: Any) -> Any:
            if isinstance(value, torch.Tensor):
                tensors[cdata(value)] = value
                return str(cdata(value))
            return None

    def save_sys_info(f: Any) -> None:
        pickle.dump(sys_info, f, protocol=2)

    def pickle_objects(f: Any) -> None:
        Pickler(f, protocol=2).dump(obj)

    def save_tensors(f: Any) -> None:
        pickle.dump(len(tensors), f, protocol=2)
        for key, tensor in tensors.items():
            pointer = tensor.untyped_storage().data_ptr()
            root = storage_keys.setdefault(pointer, 0x7700_0000 + 0x40 * len(storage_keys))
            if string_storage_keys:
                root = str(root)
            roots[root] = tensor
            storage_id, offset = root, tensor.storage_offset()
            if storage_views and offset:
                storage_id = f"{root}v{len(views)}" if string_storage_keys else root + 1 + len(views)
                numel = tensor.untyped_storage().nbytes() // tensor.element_size() - offset
                views.append((storage_id, root, offset, numel))
                offset = 0
            tensor_storage[key] = (storage_id, offset)
            pickle.dump((key, storage_id, getattr(torch, TENSOR_TYPES[tensor.dtype])), f, protocol=2)
            f.write(struct.pack("<q", tensor.dim()))  # ndim as 8 bytes, sizes, strides, offset
            f.write(struct.pack(f"<{tensor.dim()}q", *tensor.shape))
            f.write(struct.pack(f"<{tensor.dim()}q", *tensor.stride()))
            f.write(struct.pack("<q", offset))

    def save_storages(f: Any) -> None:
        pickle.dump(len(roots), f, protocol=2)
        for key, tensor in roots.items():
            pickle.dump((key, "cpu", getattr(torch, STORAGE_TYPES[tensor.dtype])), f, protocol=2)
            raw = bytes(tensor.untyped_storage())
            f.write(struct.pack("<q", len(raw) // tensor.element_size()))  # storage._write_file
            f.write(raw)
        pickle.dump(views, f, protocol=2)

    with tempfile.TemporaryDirectory() as scratch, tarfile.open(path, "w:", format=tarfile.PAX_FORMAT) as tar:
        for name, write in (("sys_info", save_sys_info), ("pickle", pickle_objects), ("tensors", save_tensors),
                            ("storages", save_storages)):
            if name == "sys_info" and sys_info is None:
                continue
            member = os.path.join(scratch, name)
            with open(member, "wb") as f:
                write(f)
                f.write((trailing or {}).get(name, b""))
            tar.add(member, arcname=name)


def sample_state() -> collections.OrderedDict:
    weight = torch.randn(4, 3)
    return collections.OrderedDict(
        [("weight", weight), ("rows", weight[1:]), ("bias", torch.randn(4, dtype=torch.float64)),
         ("steps", torch.arange(6, dtype=torch.int64).reshape(2, 3)), ("mask", torch.tensor([1, 0, 1], dtype=torch.uint8))]
    )


def test_old_torch_tar_has_the_members_torch_wrote(tmp_path):
    path = str(tmp_path / "old.pt")
    old_torch_save(sample_state(), path)
    with tarfile.open(path) as tar:
        assert [m.name for m in tar.getmembers()] == ["sys_info", "pickle", "tensors", "storages"]
        assert pickle.loads(tar.extractfile("sys_info").read()) == SYS_INFO
    with open(path, "rb") as f:
        assert f.read(512)[257:262] == b"ustar"


@pytest.mark.parametrize("storage_views", [False, True])
def test_old_torch_tar_loads_as_torch_wrote_it(tmp_path, storage_views):
    state = sample_state()
    value = {"epoch": 7, "state_dict": state, "history": [state["weight"], 0.5]}
    path = str(tmp_path / "old.pt")
    old_torch_save(value, path, storage_views=storage_views)
    ours = mk.read(path)
    same(ours, value)
    assert ours["history"][0] is ours["state_dict"]["weight"]  # one tensor per key, as torch gives
    rows, weight = ours["state_dict"]["rows"], ours["state_dict"]["weight"]
    assert rows.data_ptr() == weight.data_ptr() + 3 * weight.element_size()  # one storage, as in the file
    loaded = mk.load_state_dict(path)
    assert list(loaded) == list(state)
    for key, tensor in state.items():
        assert loaded[key].dtype == tensor.dtype and torch.equal(loaded[key], tensor), key
    # torch itself refuses this layout with weights_only=True, so the original values are the reference
    with pytest.raises(Exception, match="tar"):
        torch.load(path, weights_only=True)


def test_windows_long_size_and_missing_sys_info_are_accepted(tmp_path):
    state = sample_state()
    windows = dict(SYS_INFO, type_sizes={"short": 2, "int": 4, "long": 4})
    for name, info in (("windows.pt", windows), ("no_info.pt", None)):
        path = str(tmp_path / name)
        old_torch_save(state, path, sys_info=info)
        same(mk.read(path), state)


@pytest.mark.parametrize(
    "info, message",
    [
        (dict(SYS_INFO, little_endian="yes"), "not a flag"),
        (dict(SYS_INFO, type_sizes={"short": 2, "int": 8, "long": 8}), "type sizes"),
        (dict(SYS_INFO, type_sizes={"short": 2, "int": 4}), "type sizes"),
        (dict(SYS_INFO, protocol_version=1000), "protocol version"),
        ({"little_endian": True}, "keys"),
        ([1, 2], "not a dict"),
    ],
)
def test_bad_sys_info_is_refused(tmp_path, info, message):
    path = str(tmp_path / "old.pt")
    old_torch_save(sample_state(), path, sys_info=info)
    for reader in (mk.read, mk.load_state_dict):
        with pytest.raises(errors.FormatError, match=message) as caught:
            reader(path)
        assert caught.value.path == path and caught.value.fix and caught.value.item == "sys_info"


def test_a_stream_flagged_big_endian_reads_as_torch_reads_it(tmp_path):
    """torch stores raw storages little-endian on every machine and ignores the flag."""
    state = sample_state()
    stream = io.BytesIO()
    torch.save(state, stream, _use_new_zipfile_serialization=False)
    good = stream.getvalue()
    little = b"little_endianq\x02\x88"  # the key, its memo slot, then NEWTRUE
    assert good.count(little) == 1
    (tmp_path / "big.pt").write_bytes(good.replace(little, little[:-1] + b"\x89"))  # NEWFALSE
    same(mk.read(tmp_path / "big.pt"), torch.load(tmp_path / "big.pt", weights_only=True))
    same(mk.read(tmp_path / "big.pt"), state)


@pytest.mark.parametrize("storage_views", [False, True])
def test_pre_0_4_tar_files_with_string_storage_keys(tmp_path, storage_views):
    path = str(tmp_path / "old.pt")
    state = sample_state()
    old_torch_save(state, path, string_storage_keys=True, storage_views=storage_views)
    same(mk.read(path), state)
    same(mk.load_state_dict(path), {k: v for k, v in state.items() if isinstance(v, torch.Tensor)})


def test_unexpected_tar_member_is_still_refused(tmp_path):
    path = str(tmp_path / "old.pt")
    old_torch_save(sample_state(), path)
    with tarfile.open(path, "a") as tar:
        info = tarfile.TarInfo("extra")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
    with pytest.raises(errors.FormatError, match="unexpected member"):
        mk.read(path)


@pytest.mark.parametrize("member, message", [
    ("pickle", POLYGLOT), ("sys_info", POLYGLOT), ("tensors", "bytes after the member's last tensor"),
    ("storages", "bytes after the member's storage views"),
])
def test_tar_members_with_trailing_bytes_are_refused_and_flagged(tmp_path, member, message):
    path = str(tmp_path / "old.pt")
    old_torch_save(sample_state(), path, trailing={member: p2(call(g("os", "system"), s("true")))})
    for reader in (mk.read, mk.load_state_dict):
        with pytest.raises(errors.FormatError, match=message) as caught:
            reader(path)
        assert caught.value.item == member and caught.value.path == path
        assert not isinstance(caught.value, errors.UnsafeContentError)
    (result,) = scanning.scan(path)
    assert result.verdict == "dangerous"
    assert [(f.name, f.item) for f in result.findings] == [(f"<{message}>", member)]
    assert scanning.exit_code([result]) == 1


# ------------------------------------------------------------------------------------------
# bytes after STOP


@pytest.fixture
def torch_zip(tmp_path):
    path = tmp_path / "model.pt"
    torch.save({"w": torch.randn(3, 2)}, path)
    return path


def _rewrite(src: Any, dst: Any, name_end: str, extra: bytes) -> None:
    with zipfile.ZipFile(src) as archive, zipfile.ZipFile(dst, "w") as out:
        for info in archive.infolist():
            raw = archive.read(info.filename)
            out.writestr(info.filename, raw + extra if info.filename.endswith(name_end) else raw)


@pytest.mark.parametrize("extra", [b"\0", b"junk after the pickle", p2(call(g("os", "system"), s("touch MARKER")))])
def test_data_pkl_with_trailing_bytes_is_refused_and_flagged(tmp_path, torch_zip, extra):
    path = torch_zip
    bad = tmp_path / "polyglot.pt"
    _rewrite(path, bad, "/data.pkl", extra)
    for reader in (mk.read, mk.load_state_dict):
        with pytest.raises(errors.FormatError, match=f"{len(extra)} {POLYGLOT}") as caught:
            reader(bad)
        assert caught.value.path == str(bad) and caught.value.item == "model/data.pkl" and caught.value.fix
    (result,) = scanning.scan(bad)
    assert result.verdict == "dangerous" and result.error is None
    assert [f.name for f in result.findings] == [f"<{POLYGLOT}>"]
    assert scanning.exit_code([result]) == 1
    assert result.to_json()["globals"][-1]["name"] == f"<{POLYGLOT}>"
    assert not (tmp_path / "MARKER").exists() and not os.path.exists("MARKER")


def test_torchscript_constants_with_trailing_bytes_are_refused(tmp_path):
    module = torch.jit.script(torch.nn.Linear(2, 2))
    path = tmp_path / "script.pt"
    torch.jit.save(module, str(path))
    assert set(mk.read(path)) == {"data", "constants"}
    bad = tmp_path / "bad.pt"
    _rewrite(path, bad, "/constants.pkl", b"\x80")
    with pytest.raises(errors.FormatError, match=POLYGLOT):
        mk.read(bad)


def test_plain_pickle_with_trailing_bytes_is_refused(tmp_path):
    path = tmp_path / "plain.pkl"
    path.write_bytes(pickle.dumps({"w": torch.arange(3.0)}, protocol=4))
    assert torch.equal(mk.load_state_dict(path)["w"], torch.arange(3.0))
    path.write_bytes(path.read_bytes() + b"\x80\x04N.")
    with pytest.raises(errors.FormatError, match=f"4 {POLYGLOT}"):
        mk.read(path)
    (result,) = scanning.scan(path)
    assert result.verdict == "dangerous"


def test_nested_archive_with_trailing_bytes_is_refused(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, (nested,) = torch.arange(4.0).storage().__reduce__()  # what pickle.dump of a tensor nests

    def plain(inner: bytes) -> bytes:
        storage = call(g("torch.storage", "_load_from_bytes"), b"B" + struct.pack("<I", len(inner)) + inner)
        return p2(checkpoint(("w", call(g("torch._utils", "_rebuild_tensor_v2"), storage, i(0), t(i(4)), t(i(1)),
                                        b"\x89", ordered_dict()))))

    (tmp_path / "ok.pkl").write_bytes(plain(nested))
    assert torch.equal(mk.load_state_dict(tmp_path / "ok.pkl")["w"], torch.arange(4.0))
    (tmp_path / "bad.pkl").write_bytes(plain(nested + b"hidden"))
    with pytest.raises(errors.FormatError, match="6 bytes after the nested archive's last storage"):
        mk.read(tmp_path / "bad.pkl")


def test_legacy_stream_sequence_still_loads(tmp_path):
    """The stream format is several pickles in a row and raw storages: not a polyglot."""
    state = sample_state()
    path = tmp_path / "stream.pt"
    torch.save(state, path, _use_new_zipfile_serialization=False)
    reference = torch.load(path, weights_only=True)
    same(mk.read(path), reference)
    loaded = mk.load_state_dict(path)
    for key, tensor in state.items():
        assert torch.equal(loaded[key], tensor), key
    (result,) = scanning.scan(path)
    assert result.verdict == "safe" and result.error is None


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(extra=st.binary(min_size=1, max_size=64))
def test_any_trailing_bytes_after_a_plain_pickle_are_refused(tmp_path, extra):
    path = tmp_path / "plain.pkl"
    path.write_bytes(p2(checkpoint(("epoch", i(3)))) + extra)
    with pytest.raises(errors.FormatError) as caught:
        mk.read(path)
    assert POLYGLOT in str(caught.value) and f"{len(extra)} bytes" in str(caught.value)


def test_python2_sys_info_is_accepted(tmp_path):
    """Python 2's torch pickled the record's keys as byte strings (SHORT_BINSTRING)."""
    def u(text: str) -> bytes:
        return b"U" + bytes([len(text)]) + text.encode()

    py2 = p2(b"}(" + u("protocol_version") + i(1001) + u("little_endian") + b"\x88" + u("type_sizes")
             + b"}(" + u("short") + i(2) + u("int") + i(4) + u("long") + i(8) + b"uu")
    main = p2(checkpoint(("weight", adversarial.tensor(adversarial.storage_pid(stream=True)))))
    good = adversarial.stream_bytes(main)
    ours = pickle.dumps({"protocol_version": 1001, "little_endian": True,
                         "type_sizes": {"short": 2, "int": 4, "long": 4}}, protocol=2)
    path = tmp_path / "py2.pt"
    path.write_bytes(good.replace(ours, py2))
    assert torch.equal(mk.load_state_dict(path)["weight"], torch.zeros(4))
    tar = str(tmp_path / "py2_tar.pt")
    state = sample_state()
    old_torch_save(state, tar)
    with tarfile.open(tar) as src, tarfile.open(str(tmp_path / "copy.pt"), "w:") as dst:
        for member in src.getmembers():
            raw = py2 if member.name == "sys_info" else src.extractfile(member).read()
            member.size = len(raw)
            dst.addfile(member, io.BytesIO(raw))
    same(mk.read(tmp_path / "copy.pt"), state)
