"""Compare ``modelkeep scan`` with picklescan, modelscan and fickling on one corpus.

The corpus is the adversarial suite of the tests (``tests/adversarial.py``: gadgets in many
styles, container attacks, resource bombs) plus benign files users really save. Each scanner runs
in its own child process over every file, with a per-file time limit, and its answer is reduced
to ``flagged`` (it would stop the file), ``clean``, ``error`` (it could not decide; a CI gate
would stop too) or ``timeout``. The report lists where each scanner differs from what the file
is, and writes ``bench/SCANNERS.md``.

    python -m bench.scanners [--out bench/SCANNERS.md]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
import textwrap
from collections import OrderedDict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCANNERS = ("modelkeep", "picklescan", "modelscan", "fickling")
PER_FILE_SECONDS = 20

CHILD = textwrap.dedent(
    """
    import json, os, signal, sys, logging, io, contextlib
    logging.disable(logging.CRITICAL)
    tool, folder = sys.argv[1], sys.argv[2]
    names = json.loads(sys.argv[3])

    def modelkeep(path):
        from modelkeep import scanning as scan
        verdicts = {r.verdict for r in scan.scan(path)}
        if verdicts & {"dangerous", "needs-trust"}:
            return "flagged"
        return "error" if "unreadable" in verdicts else "clean"

    def picklescan(path):
        from picklescan.scanner import scan_file_path, scan_directory_path
        result = scan_directory_path(path) if os.path.isdir(path) else scan_file_path(path)
        if result.infected_files or result.issues_count:
            return "flagged"
        return "error" if result.scan_err else "clean"

    def modelscan(path):
        from modelscan.modelscan import ModelScan
        with contextlib.redirect_stdout(io.StringIO()):
            result = ModelScan().scan(path)
        if result.get("issues"):
            return "flagged"
        if result.get("errors"):
            return "error"
        summary = result.get("summary", {})
        scanned = summary.get("scanned", {}).get("total_scanned", 1)
        return "clean" if scanned else "skipped"

    def fickling(path):
        import fickling
        if os.path.isdir(path):
            return "skipped"
        return "clean" if fickling.is_likely_safe(path) else "flagged"

    scanner = {"modelkeep": modelkeep, "picklescan": picklescan, "modelscan": modelscan, "fickling": fickling}[tool]

    def alarm(*_):
        raise TimeoutError()

    signal.signal(signal.SIGALRM, alarm)
    for name in names:
        signal.alarm(%d)
        try:
            verdict = scanner(os.path.join(folder, name))
        except TimeoutError:
            verdict = "timeout"
        except BaseException as e:
            verdict = "error"
        finally:
            signal.alarm(0)
        print(json.dumps({"name": name, "verdict": verdict}), flush=True)
    """
    % PER_FILE_SECONDS
)


def benign_corpus(folder: str) -> list[dict]:
    """Files honest users save: weights, checkpoints with optimizer state, whole modules."""
    import torch

    import modelkeep as mk

    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(), torch.nn.LazyLinear(2))
    net(torch.randn(1, 3, 8, 8))
    optimizer = torch.optim.AdamW(net.parameters())
    net(torch.randn(2, 3, 8, 8)).sum().backward()
    optimizer.step()
    import argparse as _argparse
    import numpy as np

    cases = {
        "benign_state_dict.pt": net.state_dict(),
        "benign_checkpoint.pth": {
            "epoch": 7,
            "model_state_dict": net.state_dict(),
            "optimizer_state_dict": optimizer.state_dict(),
            "loss": 0.125,
            "args": _argparse.Namespace(lr=0.1, depth=3),
            "best": np.float64(0.5),
        },
        "benign_whole_module.pt": torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU()),
    }
    written = []
    for name, value in cases.items():
        torch.save(value, os.path.join(folder, name))
        written.append({"name": name, "family": "benign", "expect": "clean", "dangerous": False})
    torch.save(OrderedDict(w=torch.ones(3)), os.path.join(folder, "benign_stream.pt"), _use_new_zipfile_serialization=False)
    written.append({"name": "benign_stream.pt", "family": "benign", "expect": "clean", "dangerous": False})
    mk.save_weights(net.state_dict(), os.path.join(folder, "benign_weights.safetensors"))
    written.append({"name": "benign_weights.safetensors", "family": "benign", "expect": "clean", "dangerous": False})
    return written


def run_scanner(tool: str, folder: str, names: list[str]) -> dict[str, str]:
    results: dict[str, str] = {}
    try:
        done = subprocess.run(
            [sys.executable, "-c", CHILD, tool, folder, json.dumps(names)],
            capture_output=True,
            text=True,
            timeout=PER_FILE_SECONDS * len(names) + 120,
            cwd=ROOT,
        )
        lines = done.stdout.splitlines()
    except subprocess.TimeoutExpired as e:
        lines = (e.stdout or b"").decode().splitlines() if isinstance(e.stdout, bytes) else (e.stdout or "").splitlines()
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        results[row["name"]] = row["verdict"]
    for name in names:
        results.setdefault(name, "crashed")
    return results


def expected(case: dict) -> str:
    """What a gate should do: stop anything dangerous or malformed, pass what is clean."""
    if case["expect"] == "clean":
        return "clean"
    return "flagged"


def correct(case: dict, verdict: str) -> bool:
    if expected(case) == "clean":
        return verdict == "clean"
    if case.get("dangerous"):
        return verdict == "flagged" or (case["expect"] == "format" and verdict in ("error", "flagged"))
    return verdict in ("flagged", "error", "timeout")


def report(cases: list[dict], verdicts: dict[str, dict[str, str]]) -> str:
    lines = [
        "# Scanner comparison",
        "",
        "Generated by `python -m bench.scanners`: the adversarial corpus of the tests plus benign",
        "files, each scanned by every tool in a child process (per-file limit "
        f"{PER_FILE_SECONDS} s). `flagged` = the tool would stop the file; `error` = it could not",
        "decide (a gate stops too); a case is *right* when dangerous files are flagged, malformed",
        "ones flagged or errored, and benign ones clean.",
        "",
        "## Summary",
        "",
        "| scanner | right | dangerous flagged | dangerous missed | benign passed | benign stopped | errors/timeouts |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for tool in SCANNERS:
        got = verdicts[tool]
        right = sum(correct(c, got[c["name"]]) for c in cases)
        dangerous = [c for c in cases if c.get("dangerous")]
        benign = [c for c in cases if c["expect"] == "clean"]
        lines.append(
            f"| {tool} | {right}/{len(cases)} | {sum(got[c['name']] == 'flagged' for c in dangerous)}/{len(dangerous)} "
            f"| {sum(got[c['name']] == 'clean' for c in dangerous)} "
            f"| {sum(got[c['name']] == 'clean' for c in benign)}/{len(benign)} "
            f"| {sum(got[c['name']] != 'clean' for c in benign)} "
            f"| {sum(got[c['name']] in ('error', 'timeout', 'crashed') for c in cases)} |"
        )
    by_family: dict[str, list[dict]] = collections.defaultdict(list)
    for case in cases:
        by_family[case["family"]].append(case)
    lines += ["", "## By family (cases right / total)", "", "| family | cases | " + " | ".join(SCANNERS) + " |",
              "|---|---:|" + "---:|" * len(SCANNERS)]
    for family, members in sorted(by_family.items()):
        cells = [f"{sum(correct(c, verdicts[t][c['name']]) for c in members)}" for t in SCANNERS]
        lines.append(f"| {family} | {len(members)} | " + " | ".join(cells) + " |")
    lines += ["", "## Where the scanners differ", "", "| case | family | should | " + " | ".join(SCANNERS) + " |",
              "|---|---|---|" + "---|" * len(SCANNERS)]
    for case in cases:
        row = [verdicts[t][case["name"]] for t in SCANNERS]
        if len(set(row)) > 1 or not all(correct(case, v) for v in row):
            marked = [v if correct(case, v) else f"**{v}**" for v in row]
            lines.append(f"| {case['name']} | {case['family']} | {expected(case)} | " + " | ".join(marked) + " |")
    lines += ["", "Bold: the verdict a gate would get wrong.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(ROOT, "bench", "SCANNERS.md"))
    args = parser.parse_args()
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import adversarial

    with tempfile.TemporaryDirectory(prefix="modelkeep-scanners-") as folder:
        marker = os.path.join(folder, "MARKER")
        cases = [dict(c.__dict__) for c in adversarial.write_corpus(folder, marker=marker)]
        cases += benign_corpus(folder)
        names = [c["name"] for c in cases]
        verdicts = {}
        for tool in SCANNERS:
            print(f"scanning {len(names)} cases with {tool} ...", flush=True)
            verdicts[tool] = run_scanner(tool, folder, names)
        if os.path.exists(marker):
            print("WARNING: a scanner ran a gadget (the marker file exists)")
        text = report(cases, verdicts)
    with open(args.out, "w") as stream:
        stream.write(text)
    print(text.split("## By family")[0])


if __name__ == "__main__":
    main()
