"""One measured operation in a fresh process: ``python -m bench.child '<json spec>'``.

The process builds the workload's model (real, touched memory), imports every library, then
times exactly one save or load and prints one ``BENCH-RESULT {json}`` line: seconds, peak RSS
above the baseline taken after the model exists (``VmHWM`` after resetting it through
``/proc/self/clear_refs``; ``ru_maxrss`` where that is not possible), and whether the values
really landed (every tensor's XXH3-128 against the digests in the modelkeep file's header).
"""

from __future__ import annotations

import gc
import json
import os
import resource
import sys
import time
from typing import Any, Callable

import numpy as np
import safetensors.torch
import torch
import xxhash

import modelkeep
from bench import workloads
from modelkeep import format
from modelkeep.io import reads, writes

MARKER = "BENCH-RESULT "
PAGE = 4096


# --------------------------------------------------------------------------------------------
# Memory


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


class PeakRss:
    """Peak resident memory of this process during one operation, above the RSS before it."""

    def __init__(self) -> None:
        self.before = _status_kb("VmRSS") * 1024
        try:
            with open("/proc/self/clear_refs", "w") as clear:
                clear.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
            self.method = "VmHWM"
        except OSError:
            self.method = "ru_maxrss"
            self.maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def extra(self) -> int:
        if self.method == "VmHWM":
            return max(0, _status_kb("VmHWM") * 1024 - self.before)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return max(0, peak - max(self.before, self.maxrss_before))


# --------------------------------------------------------------------------------------------
# Byte views used by the raw references and the checks


def byte_view(tensor: torch.Tensor) -> np.ndarray:
    """The tensor's own bytes as a uint8 numpy array (no copy)."""
    flat = tensor.detach().reshape(-1)
    if flat.numel() == 0:
        return np.empty(0, dtype=np.uint8)
    return flat.view(torch.uint8).numpy()


def distinct_tensors(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    seen: set[int] = set()
    out = []
    for name, tensor in model.state_dict().items():
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        out.append((name, tensor))
    return out


def check_values(model: torch.nn.Module, reference: str) -> tuple[bool, str]:
    """Every tensor of the model has the bytes recorded (as digests) in the reference file."""
    header = format.read_header_file(reference)
    expected = header.modelkeep_value(format.KEY_HASHES)["tensors"]
    aliases = header.aliases
    state = model.state_dict()
    bad = []
    for name, tensor in state.items():
        stored = aliases.get(name, name)
        digest = xxhash.xxh3_128(byte_view(tensor.contiguous())).hexdigest()
        if expected.get(stored) != digest:
            bad.append(name)
    missing = set(expected) - set(aliases.get(n, n) for n in state)
    if bad or missing:
        return False, f"{len(bad)} tensors differ (e.g. {bad[:3]}), {len(missing)} not loaded"
    return True, f"{len(state)} tensors match"


def touch_pages(model: torch.nn.Module) -> None:
    """Read one byte of every 4 KB page of every tensor: what a first forward pass must fault in.

    Only the lazy contender (torch.load(mmap=True) + assign) needs it, since its load reads no
    weight bytes. When all its tensors lie in one mapping of the file, one strided pass covers
    them (so the per-tensor Python cost of this check does not count against it).
    """
    tensors = [t for t in model.state_dict().values() if t.numel()]
    lows = [t.data_ptr() for t in tensors]
    highs = [t.data_ptr() + t.numel() * t.element_size() for t in tensors]
    low, high = min(lows), max(highs)
    if _one_mapping(low, high):
        import ctypes

        region = np.ctypeslib.as_array((ctypes.c_uint8 * (high - low)).from_address(low))
        int(region[::PAGE].sum())
        int(region[-1])
        return
    for tensor in tensors:
        view = byte_view(tensor)
        int(view[::PAGE].sum())
        int(view[-1])


def _one_mapping(low: int, high: int) -> bool:
    with open("/proc/self/maps") as maps:
        for line in maps:
            start, end = (int(x, 16) for x in line.split()[0].split("-"))
            if start <= low and high <= end:
                return True
    return False


# --------------------------------------------------------------------------------------------
# Contenders


def apply_options(options: dict[str, Any]) -> None:
    """Engine variants for the engine experiments: ``modelkeep:threads=8,chunk=4M`` sets the
    reader threads and ``reads.CHUNK_BYTES``; ``fsync=0`` makes os.fsync a no-op (to show what
    durability costs); any other key sets the ``modelkeep.io.reads`` or ``writes`` constant of
    that name (``read_advice=random`` -> ``reads.READ_ADVICE``)."""
    for key, value in options.items():
        if key == "threads":
            os.environ["MODELKEEP_IO_THREADS"] = str(value)
            continue
        if key == "fsync":  # diagnostic: the save without its durability (never a product mode)
            if str(value) == "0":
                os.fsync = lambda fd: None  # type: ignore[assignment]
            continue
        name = "CHUNK_BYTES" if key == "chunk" else key.upper()
        module = next((m for m in (reads, writes) if hasattr(m, name)), None)
        if module is None:
            raise SystemExit(f"unknown engine option {key}")
        current = getattr(module, name)
        if isinstance(current, bool):
            value = str(value).lower() in ("1", "true", "yes")
        setattr(module, name, type(current)(value))


def load_op(contender: str, model: torch.nn.Module, files: dict[str, str]) -> tuple[Callable[[], Any], bool]:
    """The timed call, and whether it is lazy (its weights still need their first read)."""
    if contender == "modelkeep":
        return (lambda: modelkeep.load_weights(model, files["mk"])), False
    if contender == "torch":
        return (lambda: model.load_state_dict(torch.load(files["pt"], weights_only=True))), False
    if contender == "torch-mmap":
        return (
            lambda: model.load_state_dict(
                torch.load(files["pt"], weights_only=True, mmap=True), assign=True
            )
        ), True
    if contender == "safetensors":
        return (lambda: safetensors.torch.load_model(model, files["mk"])), False
    raise SystemExit(f"unknown load contender {contender}")


def raw_read(path: str) -> tuple[Callable[[], Any], Any]:
    size = os.path.getsize(path)
    buffer = np.empty(size, dtype=np.uint8)
    buffer.fill(1)  # touched: the reference reads into memory that already exists
    view = memoryview(buffer)

    def run() -> int:
        done = 0
        with open(path, "rb", buffering=0) as stream:
            while done < size:
                count = stream.readinto(view[done:])
                if not count:
                    raise RuntimeError("short read")
                done += count
        return done

    return run, buffer


def raw_write(model: torch.nn.Module, path: str, sync: bool, chunk: int | None = 1 << 20) -> Callable[[], Any]:
    """Write the tensors' bytes to a new file: ``chunk``-byte write calls (1 MB: the fastest
    pattern measured here), or with ``chunk=None`` one writev per run of whole tensors."""
    views = [byte_view(t) for _, t in distinct_tensors(model)]
    views = [v for v in views if len(v)]
    if chunk is None:
        calls = [views[start : start + 1024] for start in range(0, len(views), 1024)]
    else:
        calls, current, size = [], [], 0
        for view in views:
            for cut in range(0, len(view), chunk):
                piece = view[cut : cut + chunk]
                if size + len(piece) > chunk or len(current) == 1024:
                    calls.append(current)
                    current, size = [], 0
                current.append(piece)
                size += len(piece)
        if current:
            calls.append(current)

    def run() -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            for batch in calls:
                total = sum(len(v) for v in batch)
                written = os.writev(fd, batch)
                if written != total:  # rare: finish the batch one buffer at a time
                    for v in batch:
                        skip = min(written, len(v))
                        written -= skip
                        rest = memoryview(v)[skip:]
                        while len(rest):
                            rest = rest[os.write(fd, rest) :]
            if sync:
                os.fsync(fd)
        finally:
            os.close(fd)

    return run


def save_op(contender: str, model: torch.nn.Module, out: str, tied: bool) -> Callable[[], Any]:
    if contender == "modelkeep":
        return lambda: modelkeep.save_weights(model, out)
    if contender == "torch":
        return lambda: torch.save(model.state_dict(), out)
    if contender == "safetensors":
        if tied:  # save_file refuses shared tensors; save_model is safetensors' answer to that
            return lambda: safetensors.torch.save_model(model, out)
        return lambda: safetensors.torch.save_file(model.state_dict(), out)
    if contender == "raw":
        return raw_write(model, out, sync=False)
    if contender == "raw+fsync":
        return raw_write(model, out, sync=True)
    if contender == "raw-whole":
        return raw_write(model, out, sync=False, chunk=None)
    raise SystemExit(f"unknown save contender {contender}")


class FsyncClock:
    """Time spent in os.fsync during the operation (part of an atomic save, reported apart)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._fsync = os.fsync
        os.fsync = self._timed  # type: ignore[assignment]

    def _timed(self, fd: int) -> None:
        started = time.perf_counter()
        try:
            self._fsync(fd)
        finally:
            self.seconds += time.perf_counter() - started


# --------------------------------------------------------------------------------------------


def setup(spec: dict[str, Any]) -> dict[str, Any]:
    """Write the workload's reference files (seeded values) and flush them to disk."""
    model = workloads.WORKLOADS[spec["workload"]].build()
    workloads.fill(model)
    files = spec["files"]
    modelkeep.save_weights(model, files["mk"])
    torch.save(model.state_dict(), files["pt"])
    for path in files.values():
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    state = model.state_dict()
    return {
        "description": workloads.WORKLOADS[spec["workload"]].description,
        "model_bytes": workloads.model_bytes(model),
        "tensors": len(state),
        "stored_tensors": len(distinct_tensors(model)),
        "file_bytes": {key: os.path.getsize(path) for key, path in files.items()},
    }


def main(spec: dict[str, Any]) -> dict[str, Any]:
    name, op = spec["workload"], spec["op"]
    if op == "setup":
        return setup(spec)
    contender, _, option_text = spec["contender"].partition(":")
    options = dict(item.split("=", 1) for item in option_text.split(",") if item)
    for key, value in list(options.items()):
        if value[-1:] in "KMG" and value[:-1].isdigit():
            options[key] = int(value[:-1]) * {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[value[-1]]
    apply_options(options)
    result: dict[str, Any] = {"pid": os.getpid()}

    if op == "load" and contender == "raw":
        run, _buffer = raw_read(spec["files"]["mk"])
        lazy = False
        model = None
    else:
        model = workloads.WORKLOADS[name].build()
        if op == "load":
            run, lazy = load_op(contender, model, spec["files"])
        else:
            workloads.pattern(model)
            tied = len(distinct_tensors(model)) != len(model.state_dict())
            run, lazy = save_op(contender, model, spec["out"], tied), False
    clock = FsyncClock() if op == "save" else None
    gc.collect()
    rss = PeakRss()
    started = time.perf_counter()
    returned = run()
    called = time.perf_counter()
    if lazy:
        touch_pages(model)
    finished = time.perf_counter()
    result.update(
        seconds=finished - started,
        call_seconds=called - started,
        extra_rss=rss.extra(),
        rss_method=rss.method,
        baseline_rss=rss.before,
    )
    if clock is not None:
        result["fsync_seconds"] = clock.seconds
    if op == "load" and model is not None:
        result["ok"], result["check"] = check_values(model, spec["files"]["mk"])
    elif op == "save":
        size = os.path.getsize(spec["out"]) if os.path.exists(spec["out"]) else 0
        result["ok"], result["check"] = size > 0, f"{size} bytes written"
        if contender == "modelkeep" and size:
            report = modelkeep.verify(spec["out"])
            result["ok"] = not report.mismatched and not report.unhashed
            result["check"] += f", digests {'verified' if result['ok'] else 'WRONG'}"
    else:
        size = os.path.getsize(spec["files"]["mk"])
        result["ok"], result["check"] = returned == size, f"read {returned} of {size} bytes"
    return result


if __name__ == "__main__":
    outcome = main(json.loads(sys.argv[1]))
    sys.stdout.write(MARKER + json.dumps(outcome) + "\n")
    sys.stdout.flush()
