"""Turn the measurements into bench/RESULTS.md: a table per workload and the targets of issue 2."""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Any, Iterable

LABELS = {
    ("load", "modelkeep"): "modelkeep.load_weights",
    ("load", "safetensors"): "safetensors.torch.load_model",
    ("load", "torch-mmap"): "load_state_dict(torch.load(mmap=True), assign=True) + first touch",
    ("load", "torch"): "load_state_dict(torch.load(weights_only=True))",
    ("load", "raw"): "raw readinto of the file into touched memory",
    ("save", "modelkeep"): "modelkeep.save_weights (xxh3 digests, fsync, atomic rename)",
    ("save", "modelkeep excl. fsync"): "modelkeep.save_weights minus its fsync time",
    ("save", "modelkeep:fsync=0;writeback_bytes=0"): "diagnostic: save_weights with fsync and early writeback off (not durable)",
    ("save", "safetensors"): "safetensors.torch.save_file (save_model when tied)",
    ("save", "torch"): "torch.save(state_dict)",
    ("save", "raw"): "raw write of the tensors' bytes in 1 MB calls (no fsync)",
    ("save", "raw+fsync"): "raw write in 1 MB calls + fsync",
    ("save", "raw-whole"): "raw writev of whole tensors (no fsync)",
}


@dataclasses.dataclass(frozen=True)
class Target:
    workloads: tuple[str, ...] | None  # None: every workload
    op: str
    cache: str
    kind: str  # "speedup": anchor time / modelkeep time >= need; "within": modelkeep / anchor <= need; "rss"
    anchor: str
    need: float
    text: str


TARGETS = (
    Target(None, "load", "warm", "speedup", "safetensors", 1.0, "warm load at least as fast as safetensors.load_model"),
    Target(None, "load", "warm", "speedup", "torch-mmap", 1.0, "warm load at least as fast as torch.load(mmap=True)+assign"),
    Target(None, "load", "warm", "speedup", "torch", 5.0, "warm load >= 5x faster than load_state_dict(torch.load)"),
    Target(None, "load", "warm", "rss", "modelkeep", 0.05, "warm load peak extra RSS <= 5% of model bytes"),
    Target(("small",), "load", "warm", "speedup", "torch", 10.0, "many small tensors: >= 10x faster than load_state_dict(torch.load)"),
    Target(("small",), "load", "warm", "speedup", "safetensors", 10.0, "many small tensors: >= 10x faster than safetensors.load_model"),
    Target(None, "load", "cold", "speedup", "safetensors", 1.3, "cold load >= 1.3x faster than safetensors.load_model"),
    Target(None, "load", "cold", "speedup", "torch", 2.0, "cold load >= 2x faster than load_state_dict(torch.load)"),
    Target(None, "save", "-", "within", "raw", 1.3, "save within 1.3x of a raw write (fsync included in save only)"),
    Target(None, "save", "-", "within", "raw+fsync", 1.3, "save within 1.3x of a raw write + fsync (same durability)"),
    Target(None, "save", "-", "speedup", "torch", 4.0, "save >= 4x faster than torch.save"),
    Target(None, "save", "-", "speedup", "safetensors", 1.0, "save at least as fast as safetensors.save_file"),
)
# The same save targets for the diagnostic run without durability (what the save costs apart from
# waiting for the disk, which raw write, torch.save and save_file do not do).
NO_DURABILITY = "modelkeep:fsync=0;writeback_bytes=0"
DIAGNOSTIC_TARGETS = (
    Target(None, "save", "-", "within", "raw", 1.3, "(diagnostic, no fsync) save within 1.3x of a raw write"),
    Target(None, "save", "-", "speedup", "torch", 4.0, "(diagnostic, no fsync) save >= 4x faster than torch.save"),
)


def median(values: Iterable[float]) -> float | None:
    values = list(values)
    return statistics.median(values) if values else None


def _group(results: list[dict[str, Any]], workload: str, op: str, cache: str) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for record in results:
        if (record["workload"], record["op"], record["cache"]) == (workload, op, cache) and "seconds" in record:
            out.setdefault(record["contender"], []).append(record)
            if op == "save" and record["contender"] == "modelkeep" and "fsync_seconds" in record:
                derived = dict(record, seconds=record["seconds"] - record["fsync_seconds"])
                out.setdefault("modelkeep excl. fsync", []).append(derived)
    return out


def _round_ratios(group: dict[str, list[dict[str, Any]]], top: str, bottom: str) -> list[float]:
    """time(top) / time(bottom) within each round that has both."""
    tops = {r["round"]: r["seconds"] for r in group.get(top, [])}
    bottoms = {r["round"]: r["seconds"] for r in group.get(bottom, [])}
    return [tops[k] / bottoms[k] for k in sorted(tops) if k in bottoms and bottoms[k] > 0]


def _fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _table(workload: str, op: str, cache: str, group: dict[str, list[dict[str, Any]]], info: dict[str, Any]) -> list[str]:
    model_bytes = info["model_bytes"]
    lines = [
        "| contender | median s | min-max s | GB/s | time / modelkeep (per-round median) | peak extra RSS MB (% of model) | cache resident | values ok |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for contender, records in group.items():
        seconds = [r["seconds"] for r in records]
        med = median(seconds)
        ratio = median(_round_ratios(group, contender, "modelkeep"))
        rss = median(r.get("extra_rss", 0) for r in records) or 0
        resident = median(r.get("residency", float("nan")) for r in records)
        ok = all(r.get("ok") for r in records)
        label = LABELS.get((op, contender), contender)
        if op == "load" and contender == "torch-mmap":
            calls = median(r["call_seconds"] for r in records)
            label += f" (call alone {calls:.3f} s)"
        speed = model_bytes / med / 1e9 if med else None
        lines.append(
            f"| {label} | {_fmt(med)} | {min(seconds):.3f}-{max(seconds):.3f} | {_fmt(speed, 2)} | "
            f"{_fmt(ratio, 2)} | {rss / 1e6:.0f} ({100 * rss / model_bytes:.1f}%) | "
            f"{'-' if op == 'save' else f'{100 * resident:.0f}%'} | {'yes' if ok else 'NO'} ({len(records)} runs) |"
        )
    if op == "save" and "modelkeep" in group:
        fsync = median(r.get("fsync_seconds", 0.0) for r in group["modelkeep"])
        lines.append("")
        lines.append(f"modelkeep's fsync (file + folder, part of the atomic commit): median {fsync:.3f} s.")
    return lines


def _evaluate(
    target: Target, group: dict[str, list[dict[str, Any]]], model_bytes: int, subject: str = "modelkeep"
) -> tuple[str, str, str]:
    """(measured, verdict, margin) of one target."""
    if target.kind == "rss":
        values = [r.get("extra_rss", 0) / model_bytes for r in group.get("modelkeep", [])]
        measured = median(values)
        if measured is None:
            return "n/a", "not run", ""
        met = measured <= target.need
        return f"{100 * measured:.1f}%", "met" if met else "MISSED", (
            f"{100 * (target.need - measured):.1f} points to spare" if met else f"over by {100 * (measured - target.need):.1f} points"
        )
    if target.kind == "speedup":
        ratio = median(_round_ratios(group, target.anchor, subject))
        if ratio is None:
            return "n/a", "not run", ""
        met = ratio >= target.need
        margin = (
            f"{100 * (ratio / target.need - 1):.0f}% to spare"
            if met
            else f"missed by {100 * (1 - ratio / target.need):.0f}% (needs {target.need / ratio:.2f}x less time)"
        )
        return f"{ratio:.2f}x", "met" if met else "MISSED", margin
    ratio = median(_round_ratios(group, subject, target.anchor))
    if ratio is None:
        return "n/a", "not run", ""
    met = ratio <= target.need
    margin = (
        f"{100 * (target.need / ratio - 1):.0f}% to spare"
        if met
        else f"over by {100 * (ratio / target.need - 1):.0f}%"
    )
    return f"{ratio:.2f}x of {target.anchor}", "met" if met else "MISSED", margin


def target_rows(workloads: dict[str, Any], results: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| workload | target | measured (median of per-round ratios) | verdict | margin |",
        "|---|---|---:|---|---|",
    ]
    for name, info in workloads.items():
        for subject, targets in (("modelkeep", TARGETS), (NO_DURABILITY, DIAGNOSTIC_TARGETS)):
            for target in targets:
                if target.workloads is not None and name not in target.workloads:
                    continue
                group = _group(results, name, target.op, target.cache)
                if not group or subject not in group:
                    continue
                measured, verdict, margin = _evaluate(target, group, info["model_bytes"], subject)
                if verdict == "not run":
                    continue
                lines.append(f"| {name} | {target.text} | {measured} | **{verdict}** | {margin} |")
    return lines


def render(machine: dict[str, Any], workloads: dict[str, Any], results: list[dict[str, Any]]) -> str:
    versions = ", ".join(f"{k} {v}" for k, v in machine.get("versions", {}).items())
    lines = [
        "# modelkeep benchmark results",
        "",
        f"Written by `{machine.get('command', 'python -m bench.run')}` on {time.strftime('%Y-%m-%d %H:%M')} "
        f"({machine.get('minutes', 0):.0f} min). Machine: {machine['cpus']} CPUs ({machine['cpu']}), "
        f"{machine['memory_gb']:.0f} GB RAM, Linux {machine['kernel']}, Python {machine['python']}; {versions}. "
        f"Load average {machine['loadavg_start'][0]:.1f} at the start and {machine.get('loadavg_end', (0,))[0]:.1f} "
        "at the end: the machine is shared, so read the per-round ratios rather than absolute times.",
        "",
        "Method: every operation runs in a fresh process that first builds the model (real, touched memory) "
        "and imports every library; only the call is timed. Contenders run interleaved (order rotated each "
        "round); each ratio is taken inside one round and the median over rounds is shown. Peak extra RSS is "
        "VmHWM (reset through /proc/self/clear_refs right before the call) minus the RSS after the model "
        "exists; for mmap readers it includes the mapped page-cache pages. After every load the child "
        "checks every tensor's XXH3-128 against the digests in the file (\"values ok\"). Warm: right before the "
        "run the file is evicted and read once sequentially, so every warm run finds the same page cache "
        "(fully resident, checked with mincore); cold: evicted with posix_fadvise(DONTNEED) right before the "
        "run (0% resident). "
        "safetensors.load_model and the raw read use the modelkeep file (a plain safetensors file); the torch "
        "contenders use a torch.save file of the same state dict. torch.load(mmap=True)+assign reads no "
        "weight bytes during the call, so its time includes one pass touching every 4 KB page of the weights "
        "(what the first forward pass would pay); its call alone is shown in brackets.",
        "",
        "Saves write a new file each run (deleted afterwards, with its dirty pages). save_weights is durable: "
        "it fsyncs before its atomic rename and starts disk writeback while it writes, so the disk's time is "
        "inside its total; raw write, torch.save and save_file leave the bytes in the page cache. The "
        "like-for-like reference is therefore `raw write + fsync`; the diagnostic row (fsync and early "
        "writeback off) shows what the save costs apart from waiting for the disk. The raw write uses 1 MB "
        "write calls, the fastest pattern here; `raw writev of whole tensors` shows what larger calls cost "
        "on this machine.",
        "",
        "## Targets (issue 2)",
        "",
        *target_rows(workloads, results),
        "",
    ]
    for name, info in workloads.items():
        eviction = info.get("eviction", {})
        lines += [
            f"## {name}: {info.get('description', '')}",
            "",
            f"{info['model_bytes'] / 1e6:.0f} MB in {info['tensors']} tensors ({info['stored_tensors']} stored); "
            f"{machine['reps'].get(name, '?')} rounds. Eviction check on the modelkeep file: "
            f"{100 * eviction.get('warm_residency', 0):.0f}% resident and {eviction.get('warm_gbps', 0):.1f} GB/s "
            f"read warm; after DONTNEED {100 * eviction.get('evicted_residency', 0):.0f}% resident and "
            f"{eviction.get('cold_gbps', 0):.2f} GB/s (single sequential reader).",
            "",
        ]
        for op, cache in (("load", "warm"), ("load", "cold"), ("save", "-")):
            group = _group(results, name, op, cache)
            if not group:
                continue
            lines += [f"### {op} {'' if cache == '-' else cache}".rstrip(), "", *_table(name, op, cache, group, info), ""]
    failures = [r for r in results if not r.get("ok")]
    if failures:
        lines += ["## Failed runs", ""]
        lines += [f"- {r['workload']} {r['op']} {r['cache']} {r['contender']} round {r['round']}: "
                  f"{r.get('error') or r.get('check')}" for r in failures]
        lines.append("")
    return "\n".join(lines)
