"""The weights core: what a state dict is, how it is stored, and how a model is filled.

``modelkeep.api`` is the thin public face over this module (it resolves locations and options);
``arch`` (whole models) and the checkpoint code use this core directly, so no operation calls a
public function of another.
"""

from __future__ import annotations

import dataclasses
import difflib
import time
from typing import Any, Mapping

import torch

from modelkeep import conventions, errors, format, statetree
from modelkeep.io import buffers
from modelkeep._version import __version__
from modelkeep.sources import ranges
from modelkeep.sources.base import TensorSource



# --------------------------------------------------------------------------------------------
# Saving


def state_dict_of(model_or_state_dict: Any) -> dict[str, torch.Tensor]:
    """The name -> tensor mapping to save, with every value checked to be a saveable tensor."""
    if isinstance(model_or_state_dict, torch.nn.Module):
        state = model_or_state_dict.state_dict()
    elif isinstance(model_or_state_dict, Mapping):
        state = model_or_state_dict
    else:
        raise errors.UnsupportedValueError(
            f"expected an nn.Module or a mapping of names to tensors, got "
            f"{type(model_or_state_dict).__name__}",
            fix="pass model or model.state_dict()",
        )
    checked: dict[str, torch.Tensor] = {}
    for name, value in state.items():
        if not isinstance(name, str):
            raise errors.UnsupportedValueError(
                f"state dict key {name!r} is not a string", fix="use string keys"
            )
        if not isinstance(value, torch.Tensor):
            raise errors.UnsupportedValueError(
                f"value of type {type(value).__name__} is not a tensor",
                item=name,
                fix="weights files hold tensors only; save training state with "
                "modelkeep.Checkpointer, or drop this entry",
            )
        if value.is_meta or value.layout != torch.strided or value.is_quantized:
            raise errors.UnsupportedValueError(
                f"cannot save a {'meta' if value.is_meta else str(value.layout)} tensor",
                item=name,
                fix="materialise the tensor (to_empty + init, to_dense, dequantize) first",
            )
        format.name_from_dtype(value.dtype, item=name)
        checked[name] = value
    return checked


def split_aliases(
    state: Mapping[str, torch.Tensor],
) -> tuple[list[tuple[str, torch.Tensor]], dict[str, str]]:
    """Tensors to store, and ``{alias: stored name}`` for names that are the same view of memory.

    safetensors refuses shared tensors; tied embeddings are the common case, so they are stored
    once under their first name. "The same view" is ``statetree.identity_key``, the rule the
    checkpoint writer uses too.

    Args:
        state: ``{name: tensor}`` in the order to store.

    Returns:
        ``(name, tensor)`` pairs to store, and ``{alias: stored name}``.
    """
    stored: list[tuple[str, torch.Tensor]] = []
    aliases: dict[str, str] = {}
    first_name: dict[tuple[Any, ...], str] = {}
    for name, tensor in state.items():
        key = statetree.identity_key(tensor)
        if key is not None and key in first_name:
            aliases[name] = first_name[key]
            continue
        if key is not None:
            first_name[key] = name
        stored.append((name, tensor))
    return stored, aliases


def check_user_metadata(metadata: Mapping[str, str] | None) -> dict[str, str]:
    if metadata is None:
        return {}
    if not isinstance(metadata, Mapping):
        raise errors.UnsupportedValueError(
            f"metadata must be a mapping of strings to strings, got {type(metadata).__name__}",
            fix="pass a dict such as {'epoch': '3'}",
        )
    for key, value in metadata.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise errors.UnsupportedValueError(
                "metadata must map strings to strings",
                item=str(key),
                fix="convert values with str() or json.dumps()",
            )
        if key.startswith(format.PREFIX) or key == format.METADATA_KEY:
            raise errors.UnsupportedValueError(
                "metadata key is reserved for modelkeep", item=key, fix="choose another key"
            )
    return dict(metadata)


def producer() -> str:
    return format.dumps({"modelkeep": __version__, "torch": torch.__version__})


def modelkeep_metadata(kind: str, aliases: Mapping[str, str]) -> dict[str, str]:
    metadata = {
        format.KEY_FORMAT: format.dumps(format.FORMAT_VERSION),
        format.KEY_KIND: format.dumps(kind),
    }
    if aliases:
        metadata[format.KEY_ALIASES] = format.dumps(dict(aliases))
    metadata[format.KEY_PRODUCER] = producer()
    return metadata


# --------------------------------------------------------------------------------------------
# Loading


@dataclasses.dataclass
class LoadReport:
    """What ``load_weights`` did: which names matched, which did not, bytes and time."""

    path: str
    loaded: list[str] = dataclasses.field(default_factory=list)
    missing: list[str] = dataclasses.field(default_factory=list)
    unexpected: list[str] = dataclasses.field(default_factory=list)
    shape_mismatches: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = dataclasses.field(
        default_factory=list
    )
    dtype_conversions: list[tuple[str, str, str]] = dataclasses.field(default_factory=list)
    verified: int = 0  # tensors whose bytes were checked against the file's digests on load
    renamed_prefix: str | None = None
    uninitialized: list[str] = dataclasses.field(default_factory=list)  # meta tensors not in the file
    bytes_read: int = 0
    seconds: float = 0.0
    source_key: str | None = None  # checkpoint key that held the state dict ("model", ...)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.shape_mismatches or self.uninitialized)

    def __str__(self) -> str:
        speed = self.bytes_read / self.seconds / 1e9 if self.seconds else 0.0
        text = (
            f"loaded {len(self.loaded)} tensors ({self.bytes_read / 1e6:.1f} MB) from {self.path} "
            f"in {self.seconds:.3f} s ({speed:.2f} GB/s)"
        )
        if self.source_key is not None:
            text += f"; state dict found under {self.source_key!r}"
        for label, items in (
            ("missing", self.missing),
            ("unexpected", self.unexpected),
            ("shape mismatches", self.shape_mismatches),
            ("converted dtypes", self.dtype_conversions),
            ("left uninitialized", self.uninitialized),
        ):
            if items:
                text += f"; {len(items)} {label}"
        return text


def _wrapper_prefix_map(model_names: list[str], file_names: list[str]) -> dict[str, str] | None:
    """``{file name: model name}`` when the two sides differ only by DDP/compile prefixes."""
    if set(model_names) & set(file_names):
        return None
    model_by_core = {conventions.strip_wrapper_prefixes(name): name for name in model_names}
    mapping = {}
    for name in file_names:
        core = conventions.strip_wrapper_prefixes(name)
        if core in model_by_core:
            mapping[name] = model_by_core[core]
    return mapping if mapping else None


def _named_tensors(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Every parameter and buffer under every name, non-persistent buffers included."""
    return [
        *model.named_parameters(remove_duplicate=False),
        *model.named_buffers(remove_duplicate=False),
    ]


def _tied_groups(
    model: torch.nn.Module, named: list[tuple[str, torch.Tensor]] | None = None
) -> list[list[str]]:
    """Names of parameters/buffers that are one object (tied), so loading keeps them one."""
    by_id: dict[int, list[str]] = {}
    for name, tensor in named if named is not None else _named_tensors(model):
        by_id.setdefault(id(tensor), []).append(name)
    return [names for names in by_id.values() if len(names) > 1]


def _unfilled(model: torch.nn.Module, filled: list[torch.Tensor]) -> list[str]:
    """Meta tensors the file will not fill: materialising gives them uninitialised memory."""
    filled_ids = {id(tensor) for tensor in filled}
    return [
        name for name, tensor in _named_tensors(model) if tensor.is_meta and id(tensor) not in filled_ids
    ]


def _unfilled_error(path: str, unfilled: list[str]) -> errors.KeyMismatchError:
    shown = ", ".join(unfilled[:10]) + (f" and {len(unfilled) - 10} more" if len(unfilled) > 10 else "")
    return errors.KeyMismatchError(
        f"the model is on the meta device and the file does not fill {shown} "
        "(non-persistent buffers are not saved; they would hold uninitialised memory)",
        path=path,
        item="state dict",
        fix="build the model on a real device (its own initialisation then fills them), or pass "
        "strict=False and set the names in report.uninitialized yourself",
    )


def _materialize(
    model: torch.nn.Module, named: list[tuple[str, torch.Tensor]], device: torch.device | str
) -> None:
    """Give every meta parameter and buffer uninitialised memory on ``device``, to be filled.

    One new tensor per old object, set under every name, so tied names stay tied; strides are
    kept (channels_last stays channels_last). Unlike ``Module.to_empty`` this imports nothing:
    ``empty_like`` on meta tensors pulls in sympy on first use, a second of a fresh process.
    """
    replaced: dict[int, torch.Tensor] = {}
    for name, tensor in named:
        if not tensor.is_meta:
            continue
        new = replaced.get(id(tensor))
        if new is None:
            data = buffers.allocate(tensor.shape, tensor.dtype, stride=tensor.stride(), device=device)
            if isinstance(tensor, torch.nn.Parameter):
                new = torch.nn.Parameter(data, requires_grad=tensor.requires_grad)
            else:
                new = data
            replaced[id(tensor)] = new
        owner, attr = _owner(model, name)
        if isinstance(new, torch.nn.Parameter):
            owner._parameters[attr] = new
        else:
            owner._buffers[attr] = new


def _owner(model: torch.nn.Module, name: str) -> tuple[torch.nn.Module, str]:
    module_path, _, attr = name.rpartition(".")
    return (model.get_submodule(module_path) if module_path else model), attr


def _mismatch_error(path: str, report: LoadReport, file_names: list[str]) -> errors.KeyMismatchError:
    lines = []
    model_side = report.loaded + report.missing
    for name in report.missing:
        close = difflib.get_close_matches(name, report.unexpected or file_names, n=1, cutoff=0.6)
        lines.append(f"  missing in file: {name}" + (f" (closest in file: {close[0]})" if close else ""))
    for name in report.unexpected:
        close = difflib.get_close_matches(name, model_side, n=1, cutoff=0.6)
        lines.append(f"  not in model: {name}" + (f" (closest in model: {close[0]})" if close else ""))
    for name, file_shape, model_shape in report.shape_mismatches:
        lines.append(f"  shape differs: {name}: file {list(file_shape)}, model {list(model_shape)}")
    shown = lines[:40] + ([f"  ... and {len(lines) - 40} more"] if len(lines) > 40 else [])
    prefixes = _wrapper_prefix_map(model_side, file_names)
    if prefixes:
        file_name, model_name = next(iter(prefixes.items()))
        fix = (
            "the names differ only by the 'module.'/'_orig_mod.' prefix that DataParallel/DDP or "
            f"torch.compile add (file {file_name!r} is model {model_name!r}): pass fix_prefixes=True"
        )
    else:
        fix = "load into the matching architecture, or pass strict=False to load what matches"
    return errors.KeyMismatchError(
        f"{len(report.missing)} missing, {len(report.unexpected)} unexpected, "
        f"{len(report.shape_mismatches)} shape mismatches:\n" + "\n".join(shown) + "\n",
        path=path,
        item="state dict",
        fix=fix,
        report=report,
    )


def check_dtype(dtype: torch.dtype | None) -> None:
    """Refuse a ``dtype=`` that would turn a model's weights into integers or booleans."""
    if dtype is not None and not (dtype.is_floating_point or dtype.is_complex):
        raise errors.UnsupportedValueError(
            f"dtype={dtype} would convert a model to a non-floating-point type",
            item="dtype",
            fix="pass a floating-point dtype such as torch.float16 or torch.bfloat16",
        )


@buffers.gc_paused()  # ~10^5 short-lived objects for a 20,000-tensor model: see buffers.gc_paused
def load_into(
    model: torch.nn.Module,
    source: TensorSource,
    *,
    strict: bool = True,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    fix_prefixes: bool = False,
    eval_mode: bool = True,
    threads: int | None = None,
    started: float | None = None,
    verify: bool = False,
) -> LoadReport:
    """Fill ``model``'s own parameters and buffers from ``source`` (the core of ``load_weights``).

    Every name and shape is compared before a byte moves; with ``strict`` every difference is
    raised at once. ``device``/``dtype`` move/cast the model first (a model on the meta device is
    materialised without random init). Tied parameters stay tied.

    Args:
        model: the module to fill.
        source: any tensor source (see ``modelkeep.reading.open_source``).
        strict, device, dtype, fix_prefixes, eval_mode, threads, verify: as ``modelkeep.load_weights``.
        started: ``time.perf_counter()`` when the caller's operation began (for the report).

    Returns:
        The LoadReport.

    Raises:
        KeyMismatchError: ``strict`` and names or shapes differ.
        UnsupportedValueError: ``dtype`` is not floating point.
    """
    started = time.perf_counter() if started is None else started
    path = source.location
    check_dtype(dtype)
    by_name: dict[str, Any] = source.entries()  # safetensors: header entries and aliases

    targets = {
        name: value
        for name, value in model.state_dict(keep_vars=True).items()
        if isinstance(value, torch.Tensor)
    }
    report = LoadReport(path=path, source_key=source.source_key)
    if fix_prefixes:
        mapping = _wrapper_prefix_map(list(targets), list(by_name))
        if mapping:
            by_name = {mapping.get(name, name): entry for name, entry in by_name.items()}
            report.renamed_prefix = "module./_orig_mod."
    named = _named_tensors(model)
    groups = _tied_groups(model, named)
    for names in groups:  # files that drop tied copies (safetensors' save_model, transformers)
        stored = next((name for name in names if name in by_name), None)
        if stored is not None:
            for name in names:
                if name in targets and name not in by_name:
                    by_name[name] = by_name[stored]

    for name, tensor in targets.items():
        entry = by_name.get(name)
        if entry is None:
            report.missing.append(name)
        elif tensor.shape != entry.shape:
            report.shape_mismatches.append((name, entry.shape, tuple(tensor.shape)))
        else:
            report.loaded.append(name)
    report.unexpected = [name for name in by_name if name not in targets]
    if strict and not report.ok:
        raise _mismatch_error(path, report, list(by_name))

    if any(t.is_meta for _, t in named):
        report.uninitialized = _unfilled(model, [targets[name] for name in report.loaded])
        if strict and report.uninitialized:
            raise _unfilled_error(path, report.uninitialized)
        _materialize(model, named, device or "cpu")
        targets = dict(model.state_dict(keep_vars=True))
    if device is not None or dtype is not None:
        model.to(device=device, dtype=dtype)
        targets = dict(model.state_dict(keep_vars=True))

    pairs = []
    seen: set[int] = set()
    for name in report.loaded:
        tensor, entry = targets[name], by_name[name]
        if tensor.dtype != entry.torch_dtype:
            report.dtype_conversions.append((name, entry.dtype, str(tensor.dtype)))
        if id(tensor) not in seen:
            seen.add(id(tensor))
            pairs.append((entry, tensor))  # the engine writes bytes only, never autograd history
    with torch.no_grad():
        report.bytes_read = source.read_into(pairs, threads=threads)  # local files: io.tensors.read_into
    digests = source.digests() if verify else {}
    if digests:
        report.verified = ranges.check_filled(pairs, digests, path, threads=threads)
    if eval_mode:
        model.eval()
    report.seconds = time.perf_counter() - started
    return report


