"""Benchmark harness: ``python -m bench.run [--workloads vgg16,gpt2,small,big] [--reps 5] [--quick]``.

For each workload it writes the reference files once (seeded values; a modelkeep file and a
torch.save file) in a temporary folder outside the repository, then runs rounds. A round runs
every contender once, each in a fresh process (``bench.child``), in an order rotated from round
to round; loads run warm (file fully in the page cache, checked with mincore) and cold (evicted
with posix_fadvise DONTNEED, checked the same way). Ratios are taken inside each round and their
median reported, so a noisy neighbour slows both sides of a ratio. Writes ``bench/RESULTS.md``
and the raw measurements as JSON under ``bench/out/``. This process never imports torch, so the
children have the machine's memory.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

from bench import cache, report

WORKLOADS = ("vgg16", "gpt2", "small", "big")
LOAD_CONTENDERS = ("modelkeep", "safetensors", "torch-mmap", "torch", "raw")
NO_DURABILITY = "modelkeep:fsync=0;writeback_bytes=0"  # diagnostic: the save minus its durability
SAVE_CONTENDERS = ("modelkeep", NO_DURABILITY, "safetensors", "torch", "raw", "raw+fsync", "raw-whole")
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help="comma-separated: " + ",".join(WORKLOADS))
    parser.add_argument("--reps", type=int, default=5, help="rounds per workload (default 5)")
    parser.add_argument("--quick", action="store_true", help="3 rounds (2 for the 4 GB workload)")
    parser.add_argument("--ops", default="load,save", help="load,save")
    parser.add_argument("--cache", default="warm,cold", help="page cache states for loads: warm,cold")
    parser.add_argument("--load-contenders", default=",".join(LOAD_CONTENDERS),
                        help="load contenders; engine variants as modelkeep:threads=2;chunk=4M")
    parser.add_argument("--save-contenders", default=",".join(SAVE_CONTENDERS))
    parser.add_argument("--tmpdir", default=None, help="where the files go (default: the system temp folder)")
    parser.add_argument("--output", default=os.path.join(HERE, "RESULTS.md"))
    parser.add_argument("--json", default=None, help="raw results (default bench/out/results-<time>.json)")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per child process")
    args = parser.parse_args(argv)
    if args.quick:
        args.reps = min(args.reps, 3)
    return args


def split(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def contender_spec(name: str) -> str:
    """``modelkeep:threads=2;chunk=4M`` on the command line -> the child's comma form."""
    return name.replace(";", ",")


def run_child(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    command = [sys.executable, "-m", "bench.child", json.dumps(spec)]
    try:
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"timed out after {timeout:.0f} s"}
    for line in done.stdout.splitlines():
        if line.startswith("BENCH-RESULT "):
            return json.loads(line[len("BENCH-RESULT ") :])
    tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
    return {"ok": False, "error": f"exit {done.returncode}: " + " | ".join(tail)}


def reads_from(contender: str, files: dict[str, str]) -> str:
    return files["pt"] if contender.startswith("torch") else files["mk"]


def set_cache(path: str, state: str) -> float:
    """Cold: evicted. Warm: evicted, then read once sequentially, so every warm run finds the
    same page cache (how the pages got there, e.g. the folio sizes readahead chose, changes how
    fast they can be mapped and copied: left to the previous run, it favoured some readers)."""
    cache.evict(path)
    if state == "warm":
        cache.warm(path)
    return cache.residency(path)


def rounds_for(workload: str, args: argparse.Namespace) -> int:
    return 2 if args.quick and workload == "big" else args.reps


def log(text: str) -> None:
    sys.stderr.write(time.strftime("%H:%M:%S ") + text + "\n")
    sys.stderr.flush()


def bench_workload(name: str, folder: str, args: argparse.Namespace, results: list[dict[str, Any]]) -> dict[str, Any]:
    files = {"mk": os.path.join(folder, f"{name}.safetensors"), "pt": os.path.join(folder, f"{name}.pt")}
    log(f"{name}: writing reference files")
    info = run_child({"workload": name, "op": "setup", "contender": "setup", "files": files}, args.timeout)
    if "error" in info:
        raise SystemExit(f"setup of {name} failed: {info['error']}")
    info["eviction"] = cache.eviction_check(files["mk"])
    log(f"{name}: {info['model_bytes'] / 1e6:.0f} MB, eviction check {info['eviction']}")
    ops = split(args.ops)
    groups: list[tuple[str, str, list[str]]] = []
    if "load" in ops:
        groups += [("load", state, split(args.load_contenders)) for state in split(args.cache)]
    if "save" in ops:
        groups.append(("save", "-", split(args.save_contenders)))
    for round_index in range(rounds_for(name, args)):
        for op, state, contenders in groups:
            shift = round_index % len(contenders)
            for contender in contenders[shift:] + contenders[:shift]:
                spec: dict[str, Any] = {
                    "workload": name,
                    "op": op,
                    "contender": contender_spec(contender),
                    "files": files,
                }
                record = {"workload": name, "op": op, "cache": state, "contender": contender, "round": round_index}
                if op == "load":
                    record["residency"] = set_cache(reads_from(contender, files), state)
                else:
                    spec["out"] = os.path.join(folder, f"out-{name}.bin")
                record.update(run_child(spec, args.timeout))
                if op == "save":
                    with_out = spec["out"]
                    if os.path.exists(with_out):
                        os.unlink(with_out)  # its dirty pages go with it: no writeback into the next run
                results.append(record)
                shown = f"{record['seconds']:.3f} s" if "seconds" in record else record.get("error", "?")
                log(f"{name} {op} {state} r{round_index} {contender}: {shown}"
                    + ("" if record.get("ok") else f"  NOT OK: {record.get('check', '')}"))
    return info


def machine() -> dict[str, Any]:
    memory = 0
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemTotal:"):
                memory = int(line.split()[1]) * 1024
    cpu = "?"
    with open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    versions = subprocess.run(
        [sys.executable, "-c", "import torch, safetensors, numpy, xxhash, modelkeep; "
         "print(torch.__version__, safetensors.__version__, numpy.__version__, xxhash.VERSION, modelkeep.__version__)"],
        capture_output=True, text=True, cwd=ROOT,
    ).stdout.split()
    return {
        "cpus": os.cpu_count(),
        "cpu": cpu,
        "memory_gb": memory / 2**30,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "versions": dict(zip(("torch", "safetensors", "numpy", "xxhash", "modelkeep"), versions)),
        "loadavg_start": os.getloadavg(),
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    names = split(args.workloads)
    unknown = [n for n in names if n not in WORKLOADS]
    if unknown:
        raise SystemExit(f"unknown workloads {unknown}; choose from {WORKLOADS}")
    info = machine()
    started = time.time()
    folder = tempfile.mkdtemp(prefix="modelkeep-bench-", dir=args.tmpdir)
    results: list[dict[str, Any]] = []
    workloads: dict[str, Any] = {}
    try:
        for name in names:
            workloads[name] = bench_workload(name, folder, args, results)
            for entry in os.listdir(folder):  # free the disk and page cache before the next one
                os.unlink(os.path.join(folder, entry))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    info["loadavg_end"] = os.getloadavg()
    info["minutes"] = (time.time() - started) / 60
    info["reps"] = {name: rounds_for(name, args) for name in names}
    info["command"] = "python -m bench.run " + " ".join(argv if argv is not None else sys.argv[1:])
    raw_path = args.json or os.path.join(HERE, "out", time.strftime("results-%Y%m%d-%H%M%S.json"))
    os.makedirs(os.path.dirname(raw_path), exist_ok=True)
    with open(raw_path, "w") as stream:
        json.dump({"machine": info, "workloads": workloads, "results": results}, stream, indent=1)
    text = report.render(info, workloads, results)
    with open(args.output, "w") as stream:
        stream.write(text)
    log(f"wrote {args.output} and {raw_path}")
    sys.stdout.write(text)


if __name__ == "__main__":
    main()
