"""Process start to first prediction for vgg16: modelkeep.load against the tutorial's ways.

    python -m bench.first_prediction [--reps 7] [--workdir DIR] [--out bench/FIRST_PREDICTION.md]

Each measurement is a fresh Python process that imports what it needs, gets a vgg16 with the
same (random-init) weights ready, and classifies one 224x224 image; the time is from just before
the process is spawned to the moment the prediction exists (the child reads CLOCK_MONOTONIC,
which the parent shares, so interpreter teardown is not counted). Scenarios, run interleaved in a
rotating order so that drift on a shared machine hits each one alike:

* ``modelkeep.load``: ``modelkeep.load("vgg16.mk")`` (factory record, meta-device build, bytes
  read straight into the parameters);
* ``modelkeep.load(mmap=True)``: the same, the parameters copy-on-write views of the file;
* ``torch.load pickle``: ``torch.load("vgg16.pt", weights_only=False)`` of ``torch.save(model)``;
* ``torch.export.load``: the ``.pt2`` of ``torch.export.save``, then ``.module()``;
* ``random init + load_state_dict``: ``vgg16()`` then ``load_state_dict(torch.load(...))``;
* ``meta + mmap + assign``: meta-device ``vgg16()``, ``torch.load(mmap=True)``, ``assign=True``;
* ``floor``: import torch and torchvision, a meta-device ``vgg16()`` given empty memory, one
  forward pass: everything except reading weights;
* ``import torch`` / ``import torch + modelkeep``: what importing modelkeep adds.

The files are read once before timing, so every run reads from the page cache (warm). Medians
are reported with min/max and every run. Besides wall time, each child reports its CPU time
(``time.process_time()``, all threads) up to the prediction: on a shared machine wall time mostly
measures the neighbours, CPU time measures the work.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time

INPUT = "torch.manual_seed(0); x = torch.randn(1, 3, 224, 224)"
STAMP = (
    "import time, json; stamps = {}; cpu = {}\n"
    "def mark(key):\n"
    "    stamps[key] = time.monotonic()\n"
    "    cpu[key] = time.process_time()"
)
PREDICT = "with torch.inference_mode(): y = model(x)\nmark('predicted')"
REPORT = "print('RESULT ' + json.dumps({'stamps': stamps, 'cpu': cpu, 'top1': int(y.argmax()), 'sum': float(y.double().sum())}))"

SCENARIOS: dict[str, str] = {
    "modelkeep.load": """
        import torch, modelkeep
        mark('imported')
        model = modelkeep.load(FILES['mk'])
        mark('loaded')
    """,
    "modelkeep.load(mmap=True)": """
        import torch, modelkeep
        mark('imported')
        model = modelkeep.load(FILES['mk'], mmap=True)
        mark('loaded')
    """,
    "torch.load pickle (weights_only=False)": """
        import torch
        mark('imported')
        model = torch.load(FILES['pickle'], weights_only=False)
        model.eval()
        mark('loaded')
    """,
    "torch.export.load": """
        import torch
        mark('imported')
        model = torch.export.load(FILES['pt2']).module()
        mark('loaded')
    """,
    "vgg16() + load_state_dict(torch.load)": """
        import torch, torchvision
        mark('imported')
        model = torchvision.models.vgg16()
        model.load_state_dict(torch.load(FILES['state'], weights_only=True))
        model.eval()
        mark('loaded')
    """,
    "meta + mmap + assign=True": """
        import torch, torchvision
        mark('imported')
        with torch.device('meta'):
            model = torchvision.models.vgg16()
        model.load_state_dict(torch.load(FILES['state'], mmap=True, weights_only=True), assign=True)
        model.eval()
        mark('loaded')
    """,
    "floor: import + forward, no weights read": """
        import torch, torchvision
        mark('imported')
        with torch.device('meta'):
            model = torchvision.models.vgg16()
        model.to_empty(device='cpu').eval()
        mark('loaded')
    """,
}
IMPORTS: dict[str, str] = {
    "import torch": "import torch\nmark('imported')",
    "import torch + modelkeep": "import torch\nimport modelkeep\nmark('imported')",
}
FLOOR = "floor: import + forward, no weights read"


def child_code(body: str, files: dict[str, str], *, predict: bool) -> str:
    lines = [STAMP, f"FILES = {files!r}", textwrap.dedent(body).strip()]
    if predict:
        lines += [INPUT, PREDICT, REPORT]
    else:
        lines.append("print('RESULT ' + json.dumps({'stamps': stamps, 'cpu': cpu}))")
    return "\n".join(lines) + "\n"


def run_child(code: str, env: dict[str, str]) -> dict:
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"child failed:\n{done.stderr[-4000:]}")
    line = next(l for l in done.stdout.splitlines() if l.startswith("RESULT "))
    result = json.loads(line[len("RESULT ") :])
    result["times"] = {key: stamp - started for key, stamp in result["stamps"].items()}
    return result


def prepare(workdir: str) -> dict[str, str]:
    """Write vgg16 (one random init, seed 0) in every format; not timed."""
    import torch
    import torchvision

    import modelkeep

    torch.manual_seed(0)
    model = torchvision.models.vgg16().eval()
    files = {
        "mk": os.path.join(workdir, "vgg16.mk"),
        "pickle": os.path.join(workdir, "vgg16_pickle.pt"),
        "pt2": os.path.join(workdir, "vgg16.pt2"),
        "state": os.path.join(workdir, "vgg16_state_dict.pt"),
    }
    modelkeep.save(model, files["mk"], factory="torchvision.models.vgg16")
    torch.save(model, files["pickle"])
    torch.save(model.state_dict(), files["state"])
    example = (torch.randn(1, 3, 224, 224),)
    torch.export.save(torch.export.export(model, example), files["pt2"])
    return files


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def write_report(path: str, runs: dict[str, list[dict]], files: dict[str, str], meta: dict) -> str:
    floor = median([r["times"]["predicted"] for r in runs[FLOOR]])
    lines = [
        "# First prediction: process start to a vgg16 prediction",
        "",
        f"Measured {meta['date']} with `python -m bench.first_prediction --reps {meta['reps']}` on "
        f"{meta['machine']}; {meta['cpus']} CPUs (torch uses {meta['threads']} threads), "
        f"load average {meta['load_before']} before and {meta['load_after']} after (the machine is "
        "shared with other work, so compare medians and look at the spread). "
        f"Python {meta['python']}, torch {meta['torch']}, torchvision {meta['torchvision']}.",
        "",
        "Each run is a fresh process: spawn, imports, getting vgg16 (138 M parameters, "
        f"{os.path.getsize(files['mk']) / 1e6:.0f} MB) ready, one 1x3x224x224 forward pass. Files "
        "are in the page cache (warm). Runs were interleaved, rotating the order each round. CPU is "
        "the child's own CPU time (all threads) up to the prediction, which other load on the "
        "machine disturbs far less than wall time.",
        "",
        "| scenario | wall median (s) | min | max | wall - floor | CPU median (s) | CPU - floor | imports done (s) | model ready (s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    floor_cpu = median([r["cpu"]["predicted"] for r in runs[FLOOR]])
    for name, results in runs.items():
        if name in IMPORTS:
            continue
        total = [r["times"]["predicted"] for r in results]
        cpu = median([r["cpu"]["predicted"] for r in results])
        lines.append(
            f"| {name} | {median(total):.3f} | {min(total):.3f} | {max(total):.3f} | "
            f"{median(total) - floor:+.3f} | {cpu:.3f} | {cpu - floor_cpu:+.3f} | "
            f"{median([r['times']['imported'] for r in results]):.3f} | "
            f"{median([r['times']['loaded'] for r in results]):.3f} |"
        )
    lines += [
        "",
        "| imports only | wall median (s) | min | max | CPU median (s) |",
        "|---|---:|---:|---:|---:|",
    ]
    for name in IMPORTS:
        total = [r["times"]["imported"] for r in runs[name]]
        cpu = median([r["cpu"]["imported"] for r in runs[name]])
        lines.append(f"| {name} | {median(total):.3f} | {min(total):.3f} | {max(total):.3f} | {cpu:.3f} |")
    agree = {name: {(r["top1"], round(r["sum"], 3)) for r in results} for name, results in runs.items() if name not in IMPORTS and name != FLOOR}
    lines += [
        "",
        "Predictions (top-1 class, sum of logits) per scenario, to show every path computed the same: "
        + "; ".join(f"{name}: {sorted(values)}" for name, values in agree.items()),
        "",
        "Every run (seconds to first prediction, in run order):",
        "",
    ]
    for name, results in runs.items():
        key = "imported" if name in IMPORTS else "predicted"
        lines.append(f"- {name}: " + ", ".join(f"{r['times'][key]:.3f}" for r in results))
    text = "\n".join(lines) + "\n"
    with open(path, "w", encoding="utf-8") as stream:
        stream.write(text)
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--workdir", default=None, help="where the model files go (default: a temp folder)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "FIRST_PREDICTION.md"))
    parser.add_argument("--keep", action="store_true", help="keep the model files")
    args = parser.parse_args(argv)

    import torch
    import torchvision

    workdir = args.workdir or tempfile.mkdtemp(prefix="mk-first-prediction-")
    os.makedirs(workdir, exist_ok=True)
    env = dict(os.environ)
    source = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (source, env.get("PYTHONPATH")) if p)
    try:
        print(f"writing vgg16 files to {workdir} ...", flush=True)
        files = prepare(workdir)
        scenarios = {name: child_code(body, files, predict=True) for name, body in SCENARIOS.items()}
        scenarios.update({name: child_code(body, files, predict=False) for name, body in IMPORTS.items()})
        load_before = os.getloadavg()[0]
        for name, code in scenarios.items():  # warm the page cache and the bytecode caches
            run_child(code, env)
        names = list(scenarios)
        runs: dict[str, list[dict]] = {name: [] for name in names}
        for rep in range(args.reps):
            order = names[rep % len(names) :] + names[: rep % len(names)]
            for name in order:
                result = run_child(scenarios[name], env)
                runs[name].append(result)
                key = "imported" if name in IMPORTS else "predicted"
                print(f"round {rep + 1}/{args.reps}  {name:45s} {result['times'][key]:.3f} s", flush=True)
        meta = {
            "date": datetime.date.today().isoformat(),
            "reps": args.reps,
            "machine": f"{platform.system()} {platform.machine()}",
            "cpus": os.cpu_count(),
            "threads": torch.get_num_threads(),
            "load_before": f"{load_before:.1f}",
            "load_after": f"{os.getloadavg()[0]:.1f}",
            "python": platform.python_version(),
            "torch": torch.__version__,
            "torchvision": torchvision.__version__,
        }
        print(write_report(args.out, runs, files, meta))
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
