"""Byte I/O (modelkeep.io): reads of byte ranges, the tensors helper, buffers and streaming writes.

Freshly written files are always in the page cache, so without care every read test exercises the
warm path only. The cold tests here drop the file from the page cache (fsync, then
posix_fadvise(DONTNEED)) and check with mincore that it is really gone before reading, and every
read method is forced once (MODELKEEP_READ_METHOD=mmap / preadv / auto), so breaking the preadv
readers, the mapping copy or the staged reader fails this module.
"""

from __future__ import annotations

import mmap
import os

import numpy as np
import pytest
import torch

from modelkeep import errors, format, hashing
from modelkeep.io import buffers, reads, residency, writes
from modelkeep.io import tensors as tensor_io

# Sizes that cover: one byte, odd sizes, a page, above the 4 MB mapping window and the 1 MB
# write chunk, misaligned ends.
SIZES = (1, 7, 4096, 1024 * 1024 + 3, 5 * 1024 * 1024 + 13)
METHODS = ("mmap", "preadv", "auto")


def _write(path: str, data: bytes) -> str:
    with open(path, "wb") as stream:
        stream.write(data)
    return path


def drop_cache(path: str) -> None:
    """Evict ``path`` from the page cache and check that it is gone (skip if the kernel refuses)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)  # dirty pages cannot be dropped
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    size = os.path.getsize(path)
    resident = residency.resident_fraction(path, 0, size)
    if resident is None:
        pytest.skip("mincore is not available here")
    if resident > 0:
        pytest.skip(f"the kernel kept {resident:.0%} of the file cached after DONTNEED")


def warm_cache(path: str) -> None:
    with open(path, "rb") as stream:
        while stream.read(1 << 20):
            pass
    assert residency.resident_fraction(path, 0, os.path.getsize(path)) == 1.0


def _set_cache(path: str, cache: str) -> None:
    if cache == "cold":
        drop_cache(path)
    else:
        warm_cache(path)


def _misaligned(nbytes: int, offset: int, skew: int = 8) -> np.ndarray:
    """A writable uint8 buffer of ``nbytes`` whose address differs from ``offset`` by ``skew``
    modulo 32, so that the mapping copy (not the aligned kernel copy) takes it when warm."""
    base = np.empty(nbytes + 64, dtype=np.uint8)
    shift = (base.ctypes.data - offset + skew) % reads.KERNEL_COPY_ALIGNMENT
    start = (reads.KERNEL_COPY_ALIGNMENT - shift) % reads.KERNEL_COPY_ALIGNMENT
    view = base[start : start + nbytes]
    assert (offset - view.ctypes.data) % reads.KERNEL_COPY_ALIGNMENT == skew % reads.KERNEL_COPY_ALIGNMENT
    return view


@pytest.fixture
def pattern_file(tmp_path):
    """A file of random bytes with pieces of every size at misaligned (8-byte) offsets."""
    rng = np.random.default_rng(7)
    layout = []
    offset = 8  # like a safetensors data section: 8-aligned, not 32-aligned
    for size in SIZES:
        layout.append((offset, size))
        offset += size + 8 + (-(offset + size)) % 8
    data = rng.integers(0, 256, offset + 16, dtype=np.uint8).tobytes()
    return _write(str(tmp_path / "pattern.bin"), data), data, layout


@pytest.mark.parametrize("cache", ["cold", "warm"])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("threads", [1, 8])
def test_read_ranges_fills_every_size_exactly(pattern_file, monkeypatch, method, cache, threads):
    path, data, layout = pattern_file
    monkeypatch.setenv(reads.READ_METHOD_VARIABLE, method)
    monkeypatch.setattr(reads, "MIN_STREAM_BYTES", 64 * 1024)  # several reader runs on a small file
    destinations = [_misaligned(size, offset) for offset, size in layout]
    _set_cache(path, cache)
    seen: list[int] = []
    total = reads.read_ranges(
        path, list(zip((o for o, _ in layout), destinations)), threads=threads, progress=seen.append
    )
    assert total == sum(SIZES)
    assert sum(seen) == total
    for (offset, size), destination in zip(layout, destinations):
        assert destination.tobytes() == data[offset : offset + size]


@pytest.mark.parametrize("cache", ["cold", "warm"])
@pytest.mark.parametrize("method", METHODS)
def test_read_ranges_into_tensors_bytearrays_and_small_chunks(pattern_file, monkeypatch, method, cache):
    """Tensors (made buffers by the reader threads) and plain bytearrays; a chunk size smaller
    than the pieces cuts each into several calls; pieces in any order."""
    path, data, layout = pattern_file
    monkeypatch.setenv(reads.READ_METHOD_VARIABLE, method)
    targets = [torch.empty(size, dtype=torch.uint8) if i % 2 else bytearray(size) for i, (_, size) in enumerate(layout)]
    _set_cache(path, cache)
    pieces = list(zip((o for o, _ in layout), targets))[::-1]
    assert reads.read_ranges(path, pieces, threads=3, chunk_bytes=64 * 1024) == sum(SIZES)
    for (offset, size), target in zip(layout, targets):
        got = bytes(target.numpy().tobytes()) if isinstance(target, torch.Tensor) else bytes(target)
        assert got == data[offset : offset + size]


@pytest.mark.parametrize("cache", ["cold", "warm"])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("threads", [1, 4])
def test_many_small_pieces_cross_iov_max(tmp_path, monkeypatch, method, cache, threads):
    """3,000 consecutive tensors of 1-97 bytes: scattered in calls of at most IOV_MAX buffers."""
    monkeypatch.setenv(reads.READ_METHOD_VARIABLE, method)
    monkeypatch.setattr(reads, "MIN_STREAM_BYTES", 16 * 1024)
    count = 3000
    assert count > 2 * buffers.IOV_MAX
    sizes = [1 + (i * 37) % 97 for i in range(count)]
    data = np.random.default_rng(1).integers(0, 256, 24 + sum(sizes), dtype=np.uint8).tobytes()
    path = _write(str(tmp_path / "small.bin"), data)
    offsets = list(np.cumsum([24] + sizes[:-1]))
    destinations = [torch.empty(size, dtype=torch.uint8) for size in sizes]
    _set_cache(path, cache)
    total = reads.read_ranges(path, list(zip(map(int, offsets), destinations)), threads=threads)
    assert total == sum(sizes)
    calls = reads.plan_calls([(int(o), s, d) for o, s, d in zip(offsets, sizes, destinations)], reads.CHUNK_BYTES)
    assert len(calls) == -(-count // buffers.IOV_MAX)
    assert all(len(call[1]) <= buffers.IOV_MAX for call in calls)
    joined = b"".join(d.numpy().tobytes() for d in destinations)
    assert joined == data[24:]


def test_auto_picks_preadv_cold_and_the_mapping_warm(pattern_file, monkeypatch):
    path, _, _ = pattern_file
    monkeypatch.setenv(reads.READ_METHOD_VARIABLE, "auto")
    size = os.path.getsize(path)
    drop_cache(path)
    assert reads.read_method(path, 0, size) == "preadv"
    warm_cache(path)
    assert reads.read_method(path, 0, size) == "mmap"
    monkeypatch.setenv(reads.READ_METHOD_VARIABLE, "preadv")
    assert reads.read_method(path, 0, size) == "preadv"


@pytest.mark.parametrize("method", ["mmap", "preadv"])
def test_a_file_shorter_than_its_ranges_is_a_format_error(tmp_path, monkeypatch, method):
    monkeypatch.setenv(reads.READ_METHOD_VARIABLE, method)
    path = _write(str(tmp_path / "short.bin"), b"x" * 100)
    with pytest.raises(errors.FormatError) as caught:
        reads.read_ranges(path, [(8, _misaligned(5000, 8))])
    assert caught.value.path == path


def test_a_missing_file_is_a_storage_error(tmp_path):
    with pytest.raises(errors.StorageError):
        reads.read_ranges(str(tmp_path / "absent"), [(0, bytearray(4))])


# --------------------------------------------------------------------------------------------
# The tensors helper: entries into destinations of any dtype, layout or contiguity


def _tensor_file(tmp_path, tensors: dict[str, torch.Tensor]) -> tuple[str, format.Header]:
    from modelkeep import storage

    path = str(tmp_path / "tensors.safetensors")
    storage.LOCAL.write_tensor_file(path, list(tensors.items()), {})
    return path, format.read_header_file(path)


@pytest.mark.parametrize("cache", ["cold", "warm"])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("threads", [1, 8])
def test_read_into_direct_and_staged_destinations(tmp_path, monkeypatch, method, cache, threads):
    monkeypatch.setenv(reads.READ_METHOD_VARIABLE, method)
    generator = torch.Generator().manual_seed(3)
    values = {
        "big": torch.randn(1100, 1000, generator=generator),  # 4.4 MB: cut into windows/calls
        "odd": torch.randn(7, generator=generator).to(torch.float16),
        "ints": torch.arange(-50, 50, dtype=torch.int64),
        "matrix": torch.randn(64, 48, generator=generator),
        "half": torch.randn(300, generator=generator).to(torch.bfloat16),
        "empty": torch.empty(0, 3),
    }
    path, header = _tensor_file(tmp_path, values)
    destinations = {
        "big": torch.empty(1100, 1000),  # direct
        "odd": torch.empty(7, dtype=torch.float16),  # direct
        "ints": torch.empty(100, dtype=torch.float64),  # staged: another dtype
        "matrix": torch.empty(48, 64).t(),  # staged: non-contiguous
        "half": torch.empty(300, dtype=torch.float32),  # staged: another dtype
        "empty": torch.empty(0, 3),
    }
    pairs = [(header.entries[name], destinations[name]) for name in values]
    assert tensor_io.accepts_raw_bytes(destinations["big"], header.entries["big"])
    assert not tensor_io.accepts_raw_bytes(destinations["matrix"], header.entries["matrix"])
    assert not tensor_io.accepts_raw_bytes(destinations["ints"], header.entries["ints"])
    _set_cache(path, cache)
    seen: list[int] = []
    total = tensor_io.read_into(path, pairs, threads=threads, progress=seen.append)
    expected_bytes = sum(e.nbytes for e in header.entries.values())
    assert total == expected_bytes
    assert sum(seen) == expected_bytes
    for name, value in values.items():
        assert torch.equal(destinations[name], value.to(destinations[name].dtype)), name
    assert torch.equal(destinations["big"].view(torch.int32), values["big"].view(torch.int32))  # bits


@pytest.mark.parametrize("cache", ["cold", "warm"])
def test_read_tensors_allocates_and_returns_every_entry(tmp_path, cache):
    values = {"a": torch.randn(2048, 1024), "b": torch.arange(10, dtype=torch.int16)}
    path, header = _tensor_file(tmp_path, values)
    _set_cache(path, cache)
    out = tensor_io.read_tensors(path, header.entries.values())
    assert set(out) == {"a", "b"}
    for name, value in values.items():
        assert out[name].dtype == value.dtype and torch.equal(out[name], value)


def test_a_cold_load_through_the_public_api_is_exact(tmp_path, monkeypatch):
    import modelkeep as mk

    monkeypatch.setenv(reads.READ_METHOD_VARIABLE, "auto")
    model = torch.nn.Sequential(torch.nn.Linear(300, 700), torch.nn.Linear(700, 5))
    path = str(tmp_path / "model.safetensors")
    mk.save_weights(model, path)
    drop_cache(path)
    loaded = mk.load_state_dict(path)
    for name, value in model.state_dict().items():
        assert torch.equal(loaded[name], value), name


# --------------------------------------------------------------------------------------------
# Buffers and writes


def test_tensor_bytes_views_the_tensors_own_memory():
    tensor = torch.zeros(4, dtype=torch.float32)
    view = buffers.tensor_bytes(tensor)
    assert view.nbytes == 16
    view[0:4] = np.float32(1.5).tobytes()
    assert tensor[0].item() == 1.5
    assert buffers.tensor_bytes(torch.empty(0)).nbytes == 0
    bf16 = torch.ones(3, dtype=torch.bfloat16)  # a dtype numpy lacks
    assert bytes(buffers.tensor_bytes(bf16)) == bf16.view(torch.int16).numpy().tobytes()


def test_cpu_contiguous_resolves_lazy_views_and_copies_only_when_needed():
    plain = torch.arange(6.0).reshape(2, 3)
    assert buffers.cpu_contiguous(plain).data_ptr() == plain.data_ptr()
    transposed = buffers.cpu_contiguous(plain.t())
    assert transposed.is_contiguous() and torch.equal(transposed, plain.t())
    complex_values = torch.tensor([1 + 2j, 3 - 4j])
    resolved = buffers.cpu_contiguous(complex_values.conj())
    assert not resolved.is_conj() and torch.equal(resolved, torch.tensor([1 - 2j, 3 + 4j]))
    negative = buffers.cpu_contiguous(torch._neg_view(plain))
    assert not negative.is_neg() and torch.equal(negative, -plain)


def test_allocate_large_tensors_get_a_mapping_with_the_right_layout():
    big = buffers.allocate((1024, 2048), torch.float32)
    assert big.shape == (1024, 2048) and big.stride() == (2048, 1) and big.dtype == torch.float32
    big.fill_(2.0)
    assert big.sum().item() == 2.0 * 1024 * 2048
    strided = buffers.allocate((4, 3), torch.int64, stride=(1, 4))
    assert strided.stride() == (1, 4)


@pytest.mark.parametrize(("balloon", "forced", "expected"), [
    (False, None, True), (True, None, False), (True, "1", True), (False, "0", False),
])
def test_huge_pages_only_where_memory_is_the_machines_own(tmp_path, monkeypatch, balloon, forced, expected):
    for name, device in [("virtio1", "0x0002"), ("virtio0", "0x0005" if balloon else "0x0001")]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "device").write_text(device + "\n")
    monkeypatch.setattr(buffers, "VIRTIO_DEVICES", str(tmp_path))
    buffers._memory_is_ballooned.cache_clear()
    monkeypatch.delenv(buffers.HUGE_PAGES_VARIABLE, raising=False)
    if forced is not None:
        monkeypatch.setenv(buffers.HUGE_PAGES_VARIABLE, forced)
    try:
        assert buffers.huge_pages() is expected
        big = buffers.allocate((1024, 1024 + 1), torch.float32)  # over HUGE_PAGE_MIN_BYTES
        # a huge-page tensor lives in its own page-aligned mapping; torch's allocator aligns to 64
        assert (big.data_ptr() % mmap.PAGESIZE == 0) or not expected
        big.fill_(1.0)
        assert big.sum().item() == 1024 * 1025
    finally:
        buffers._memory_is_ballooned.cache_clear()


def test_gc_paused_restores_the_collector_state():
    import gc

    assert gc.isenabled()
    with buffers.gc_paused():
        assert not gc.isenabled()
        with buffers.gc_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()
    assert gc.isenabled()


def test_write_tensors_streams_bytes_and_digests(tmp_path, monkeypatch):
    monkeypatch.setattr(writes, "WRITEBACK_BYTES", 1024 * 1024)  # exercise early writeback
    tensors = [
        torch.arange(10, dtype=torch.int32),
        torch.empty(0),
        torch.randn(3 * 1024 * 1024 // 4 + 5),  # larger than one write chunk
        torch.randn(5, 4).t(),  # non-contiguous: copied alone
        *[torch.full((3,), float(i)) for i in range(1500)],  # more than IOV_MAX in a run
    ]
    path = str(tmp_path / "out.bin")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.write(fd, b"HEAD")
        digests = writes.write_tensors(fd, tensors)
    finally:
        os.close(fd)
    expected = [bytes(buffers.tensor_bytes(buffers.cpu_contiguous(t))) for t in tensors]
    with open(path, "rb") as stream:
        assert stream.read() == b"HEAD" + b"".join(expected)
    assert digests == [hashing.digest(b) for b in expected]
    assert digests[1] == hashing.EMPTY_DIGEST
