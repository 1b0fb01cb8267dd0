"""The ``modelkeep`` command: thin commands over the public API.

Every command calls ``modelkeep``'s public names only (``mk.inspect``, ``mk.scan``, ...) and
``modelkeep.errors``, so whatever the command line can do, a user's script can do the same way.
Two modules are imported beyond that, both presentation rather than operations:
``modelkeep.progress`` (the one look of progress bars, shared with downloads) and ``modelkeep.demo``
(the tutorial the ``demo`` command runs: a script to watch, not a function a user calls, so it is
not exported).

Exit codes: 0 success, 1 a finding (mismatch, difference), 2 the input could not be read.
"""

from __future__ import annotations

import contextlib
import json
import re
import sys
from typing import Any, Callable, Iterator

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

import modelkeep as mk
from modelkeep import errors, progress

EXIT_OK, EXIT_FINDINGS, EXIT_UNREADABLE = 0, 1, 2
PROGRESS_MIN_BYTES = 256 * 1024 * 1024  # below this an operation takes well under a second

console = Console()
error_console = Console(stderr=True, soft_wrap=True)  # paths stay whole, never wrapped


def human_bytes(count: int) -> str:
    value = float(count)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{count} B"


@contextlib.contextmanager
def byte_progress(description: str, total: int) -> Iterator[Callable[[int], None] | None]:
    """A progress bar for operations over about a second; a no-op callback for small ones."""
    if total < PROGRESS_MIN_BYTES:
        yield None
        return
    with progress.byte_bar(description, total, error_console) as shown:
        if shown is None:
            yield None
        else:
            bar, task = shown
            yield lambda n: bar.advance(task, n)


def outline(description: Any, *, max_items: int = 8, max_lines: int = 400) -> str:
    """An indented outline of a checkpoint's described state (``FileInfo.state``), long lists
    shortened, so ``inspect`` shows what a checkpoint holds without flooding the terminal.

    Args:
        description: the nested dicts and lists of ``mk.inspect(path).state``.
        max_items: list items shown before "... N more".
        max_lines: lines shown before the outline is cut with "...".

    Returns:
        The outline, one line per key or list item.
    """
    lines: list[str] = []

    def short(value: Any) -> str:
        text = json.dumps(value, ensure_ascii=False)
        return text if len(text) <= 120 else text[:117] + "..."

    def nested(value: Any) -> bool:  # a list of scalars stays on one line
        return isinstance(value, (dict, list)) and bool(value) and not (
            isinstance(value, list) and all(not isinstance(v, (dict, list)) for v in value))

    def walk(value: Any, indent: str) -> None:
        if len(lines) >= max_lines:
            return
        if isinstance(value, dict):
            children = [(f"{key}", child) for key, child in value.items()]
        elif isinstance(value, list):
            children = [(f"[{index}]", child) for index, child in enumerate(value[:max_items])]
        else:
            return
        for label, child in children:
            if nested(child):
                lines.append(f"{indent}{label}:")
                walk(child, indent + "  ")
            else:
                lines.append(f"{indent}{label}: {short(child)}")
        if isinstance(value, list) and len(value) > max_items:
            lines.append(f"{indent}... {len(value) - max_items} more")

    walk(description, "")
    if len(lines) >= max_lines:
        lines.append("...")
    return "\n".join(lines)


def scan_exit_code(results: list[mk.FileScan]) -> int:
    """The scan's exit code for CI gates: 1 when any file has findings, else 2 when any is
    unreadable, else 0.

    Args:
        results: what ``mk.scan`` returned.

    Returns:
        ``EXIT_FINDINGS``, ``EXIT_UNREADABLE`` or ``EXIT_OK``.
    """
    if any(r.findings for r in results):
        return EXIT_FINDINGS
    if any(r.error is not None for r in results):
        return EXIT_UNREADABLE
    return EXIT_OK


def _parse_storage_options(
    _ctx: click.Context, _param: click.Parameter, pairs: tuple[str, ...]
) -> dict[str, Any] | None:
    """``KEY=VALUE`` pairs as fsspec options; a VALUE that is JSON (``true``, ``3``, ``{...}``) is
    decoded, anything else stays a string."""
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{pair!r} is not KEY=VALUE", param_hint="--storage-option")
        try:
            options[key] = json.loads(value)
        except ValueError:
            options[key] = value
    return options or None


storage_option = click.option(
    "--storage-option", "storage_options", multiple=True, callback=_parse_storage_options,
    metavar="KEY=VALUE",
    help="An fsspec option for URL locations (s3://...), e.g. endpoint_url=http://127.0.0.1:8333; repeatable.",
)


def fail(error: errors.ModelkeepError) -> None:
    error_console.print(f"[red]error:[/red] {escape(str(error))}", markup=True, highlight=False)
    sys.exit(EXIT_UNREADABLE)


@click.group()
@click.version_option(package_name="modelkeep")
def main() -> None:
    """Inspect, verify, scan, convert, compare and predict with PyTorch model files, safely."""


@main.command("inspect")
@storage_option
@click.argument("file")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON document instead of tables.")
def inspect_command(file: str, as_json: bool, storage_options: dict[str, Any] | None) -> None:
    """Show the tensors, totals, metadata, aliases and digests of FILE."""
    try:
        info = mk.inspect(file, storage_options=storage_options)
    except errors.ModelkeepError as e:
        fail(e)
        return
    if as_json:
        click.echo(json.dumps(info.to_json(), indent=2))
        return
    table = Table(title=escape(f"{info.path} ({info.kind})"), show_lines=False)
    for column in ("name", "dtype", "shape", "size"):
        table.add_column(column, justify="right" if column == "size" else "left")
    for t in info.tensors:
        table.add_row(escape(t.name), t.dtype, str(list(t.shape)), human_bytes(t.nbytes))
    console.print(table)
    console.print(
        f"{len(info.tensors)} tensors, {info.total_elements:,} elements, "
        f"{human_bytes(info.total_bytes)} of data, file {human_bytes(info.file_size)}"
    )
    if info.aliases:
        console.print(
            "aliases (stored once): "
            + escape(", ".join(f"{a} -> {t}" for a, t in info.aliases.items()))
        )
    if info.hash_algorithm:
        console.print(f"digests: {escape(info.hash_algorithm)} for {info.hashed_tensors} tensors")
    else:
        console.print("digests: none (not written by modelkeep; `verify` cannot check it)")
    for key, value in info.modelkeep.items():
        if key == "modelkeep.state" and info.state is not None:
            continue  # shown below as an outline
        console.print(escape(f"{key}: {json.dumps(value)[:200]}"), highlight=False)
    if info.state is not None:
        console.print("checkpoint state:")
        console.print(escape(outline(info.state)), highlight=False)
    for key, value in info.metadata.items():
        console.print(escape(f"metadata {key}: {value[:200]}"), highlight=False)
    if info.globals is not None:
        console.print("globals its pickles name (none imported or run): " + escape(", ".join(info.globals)),
                      highlight=False)


@main.command("verify")
@storage_option
@click.argument("file")
def verify_command(file: str, storage_options: dict[str, Any] | None) -> None:
    """Recompute every tensor's digest. Exit 0 ok, 1 mismatch or no digests, 2 unreadable."""
    try:
        info = mk.inspect(file, storage_options=storage_options)
        with byte_progress("verifying", info.total_bytes) as advance:
            report = mk.verify(file, progress=advance, storage_options=storage_options)
    except errors.ModelkeepError as e:
        fail(e)
        return
    if report.algorithm is None:
        console.print(f"{escape(file)}: no digests recorded; nothing to verify")
        sys.exit(EXIT_FINDINGS)
    for name in report.mismatched:
        console.print(f"[red]MISMATCH[/red] {escape(name)}")
    for name in report.unhashed:
        console.print(f"[yellow]no digest[/yellow] {escape(name)}")
    if report.ok:
        console.print(f"{escape(file)}: OK, {len(report.checked)} tensors match their {report.algorithm} digests")
        sys.exit(EXIT_OK)
    console.print(f"{escape(file)}: {len(report.mismatched)} of {len(report.checked) + len(report.mismatched)} tensors differ")
    sys.exit(EXIT_FINDINGS)


@main.command("scan")
@storage_option
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print a JSON document instead of a table.")
def scan_command(paths: tuple[str, ...], as_json: bool, storage_options: dict[str, Any] | None) -> None:
    """Find the code model files would run, without running it. Exit 0 clean, 1 findings, 2 unreadable.

    PATHS are files or folders (scanned recursively, plain zip archives member by member).
    """
    results = mk.scan(list(paths), storage_options=storage_options)
    code = scan_exit_code(results)
    if as_json:
        click.echo(json.dumps({"files": [r.to_json() for r in results], "exit_code": code}, indent=2))
        sys.exit(code)
    colours = {"safe": "green", "needs-trust": "yellow", "dangerous": "red", "unreadable": "magenta"}
    table = Table(title="modelkeep scan")
    for column in ("file", "container", "verdict", "findings"):
        table.add_column(column)
    for result in results:
        distinct = list(dict.fromkeys(f"{g.name} [{g.verdict}]" for g in result.findings))
        details = ", ".join(distinct[:6]) + (" ..." if len(distinct) > 6 else "")
        if result.error and not details:
            details = result.error[:200]
        verdict = result.verdict
        table.add_row(
            escape(result.path), result.container, f"[{colours[verdict]}]{verdict}[/]", escape(details)
        )
    console.print(table)
    for result in results:
        if result.next_step:
            console.print(f"{escape(result.path)}: {escape(result.next_step)}", highlight=False)
    counts = {v: sum(r.verdict == v for r in results) for v in colours}
    console.print(", ".join(f"{n} {v}" for v, n in counts.items() if n) or "no model files found")
    sys.exit(code)


@main.command("convert")
@storage_option
@click.argument("src")
@click.argument("dst")
@click.option("--verify", "check", is_flag=True, help="Read the output back and compare every tensor.")
@click.option("--shard-size", default=None, help="Split into shards of at most this size, e.g. 5GB.")
@click.option("--trust", "trust", multiple=True, metavar="NAME",
              help="A module or class whose pickled objects may be rebuilt (repeatable).")
@click.option("--on-unknown", type=click.Choice(["error", "placeholder"]), default="error", show_default=True,
              help="placeholder: rescue the weights of a file naming other classes (kept inert, never run).")
def convert_command(src: str, dst: str, check: bool, shard_size: str | None, trust: tuple[str, ...],
                    on_unknown: str, storage_options: dict[str, Any] | None) -> None:
    """Rewrite any readable model file SRC as a modelkeep file DST (or shards with an index)."""
    try:
        report = mk.convert(src, dst, shard_size=shard_size, verify=check, trust=trust, on_unknown=on_unknown,
                            storage_options=storage_options)
    except errors.ModelkeepError as e:
        if e.fix:  # say the options as this command takes them
            e.fix = re.sub(r"trust=\('([\w.]+)',\)", r"--trust \1",
                           e.fix.replace("on_unknown='placeholder'", "--on-unknown placeholder"))
            e.args = (e._message(),)
        fail(e)
        return
    console.print(
        f"wrote {report.tensors} tensors ({human_bytes(report.bytes)}) to "
        + escape(", ".join(report.outputs)),
        highlight=False,
    )
    if report.verified:
        console.print("verified: every tensor matches the source bit for bit")
    if report.left_out:
        console.print(
            f"left out (not weights): {escape(', '.join(report.left_out))}; keep them with "
            "modelkeep.read(SRC), or Checkpointer(DIR).import_torch_checkpoint(SRC)",
            highlight=False,
        )


@main.command("diff")
@storage_option
@click.argument("a")
@click.argument("b")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON document instead of a table.")
def diff_command(a: str, b: str, as_json: bool, storage_options: dict[str, Any] | None) -> None:
    """Compare the tensors of A and B by name. Exit 0 equal, 1 different, 2 unreadable."""
    try:
        report = mk.diff(a, b, storage_options=storage_options)
    except errors.ModelkeepError as e:
        fail(e)
        return
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2))
    else:
        for name in report.only_a:
            console.print(f"only in A: {escape(name)}", highlight=False)
        for name in report.only_b:
            console.print(f"only in B: {escape(name)}", highlight=False)
        differing = report.differing
        if differing:
            table = Table(title="differing tensors")
            for column in ("name", "dtype A/B", "shape A/B", "max abs", "max rel"):
                table.add_column(column)
            for t in differing:
                table.add_row(
                    escape(t.name),
                    t.dtype_a if t.dtype_a == t.dtype_b else f"{t.dtype_a}/{t.dtype_b}",
                    str(list(t.shape_a)) if t.shape_a == t.shape_b else f"{list(t.shape_a)}/{list(t.shape_b)}",
                    "-" if t.max_abs is None else f"{t.max_abs:.3g}",
                    "-" if t.max_rel is None else f"{t.max_rel:.3g}",
                )
            console.print(table)
        console.print(report.summary())
    sys.exit(EXIT_OK if report.equal else EXIT_FINDINGS)


@main.command("predict")
@storage_option
@click.argument("model")
@click.argument("inputs", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--topk", default=5, show_default=True, type=click.IntRange(min=1), help="Classes to show per input.")
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(min=1))
@click.option("--json", "as_json", is_flag=True, help="Print a JSON document instead of tables.")
def predict_command(model: str, inputs: tuple[str, ...], topk: int, batch_size: int, as_json: bool, storage_options: dict[str, Any] | None) -> None:
    """Predict with the saved MODEL on INPUT files: JPEG/PNG images (through the model's recorded
    preprocessing) or .npy/.safetensors tensors."""
    try:
        predictions = mk.predict(model, list(inputs), topk=topk, batch_size=batch_size, storage_options=storage_options)
    except errors.ModelkeepError as e:
        fail(e)
        return
    if as_json:
        click.echo(json.dumps({"model": model, "predictions": [p.to_json() for p in predictions]}, indent=2))
        return
    table = Table(title=model, title_justify="left")
    table.add_column("input")
    table.add_column("#", justify="right")
    table.add_column("label")
    table.add_column("probability", justify="right")
    for prediction in predictions:
        if not prediction.top:
            console.print(f"{prediction.source}: {prediction.to_json()['output']}", highlight=False)
            continue
        table.add_section()
        for rank, ranked in enumerate(prediction.top, 1):
            table.add_row(prediction.source if rank == 1 else "", str(rank), ranked.label, f"{ranked.probability:.2%}")
    if table.rows:
        console.print(table)


@main.command("demo")
@click.option("--quick", is_flag=True, help="Skip the torch side of the vgg16 steps (the digits part stays whole).")
@click.option(
    "--weights",
    "weights_path",
    type=click.Path(dir_okay=False, exists=True),
    help="A local copy of vgg16's IMAGENET1K_V1 checkpoint (vgg16-397923af.pth).",
)
@click.option("--workdir", type=click.Path(file_okay=False), help="Keep the demo's files here.")
def demo_command(quick: bool, weights_path: str | None, workdir: str | None) -> None:
    """The save-and-load tutorial end to end, each step timed beside its torch equivalent."""
    from modelkeep import demo  # the one operation module the CLI imports: see the module docstring

    try:
        result = demo.run(quick=quick, weights_path=weights_path, workdir=workdir)
    except errors.ModelkeepError as e:
        fail(e)
        return
    sys.exit(EXIT_OK if result.ok else EXIT_FINDINGS)


if __name__ == "__main__":
    main()
