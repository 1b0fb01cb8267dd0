"""Building modules without random init, and proving that a record rebuilds the model it came from.

Construction runs under ``torch.device("meta")`` first: no memory is touched and no initialiser
runs, so even a record that asks for absurd sizes costs nothing before its shapes are compared with
the file. Some builders compute real tensors while they construct (detection anchors, regnet
widths); for those the build is repeated with only the *parameters* sent to the meta device as they
are registered, so computed attributes keep their values.

Verification compares what a state dict cannot show as well as what it can: every parameter and
buffer name and shape, and per submodule its class, ``extra_repr()`` and plain public attributes
(an ``Inception3`` built for pretrained weights differs only in ``transform_input``).
"""

from __future__ import annotations

import contextlib
import enum
import functools
import threading
import types
from typing import Any, Callable, Iterator, Mapping

import torch

from modelkeep import api, engine, errors, format
from modelkeep.arch import factories, graph, modules, records

_hook_lock = threading.RLock()
MAX_SHOWN = 12


# --------------------------------------------------------------------------------------------
# Construction


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Send every parameter registered while active to the meta device (global torch hook, so
    builds are serialised)."""

    def to_meta(module: torch.nn.Module, name: str, param: Any) -> Any:
        if type(param) is not torch.nn.Parameter or param.is_meta:
            return None
        return torch.nn.Parameter(torch.empty_like(param, device="meta"), requires_grad=param.requires_grad)

    with _hook_lock:
        handle = torch.nn.modules.module.register_module_parameter_registration_hook(to_meta)
        try:
            yield
        finally:
            handle.remove()


def has_meta_attributes(model: torch.nn.Module) -> bool:
    """True when a module holds meta tensors outside its parameters and buffers (values that the
    file does not carry and a meta build could not compute)."""
    for module in model.modules():
        for value in vars(module).values():
            items = value if isinstance(value, (list, tuple)) else (value,)
            if any(isinstance(v, torch.Tensor) and v.is_meta for v in items):
                return True
    return False


def shapes_of(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {name: tuple(t.shape) for name, t in model.state_dict(keep_vars=True).items() if isinstance(t, torch.Tensor)}


def construct(
    build: Callable[[], torch.nn.Module],
    *,
    expected: Mapping[str, tuple[int, ...]] | None,
    what: str,
    path: str | None = None,
) -> torch.nn.Module:
    """Call ``build`` so that parameters end up on the meta device, uninitialised.

    ``expected`` (names -> shapes) is compared after the cheap meta build, before a build that
    allocates real memory, so a record cannot make us allocate more than its file holds.
    """
    meta_model: torch.nn.Module | None = None
    try:
        with torch.device("meta"):
            meta_model = build()
    except Exception:  # builders that compute with tensor values while constructing; a real
        meta_model = None  # error repeats below and is reported from there
    if meta_model is not None:
        if expected is not None:
            check_shapes(shapes_of(meta_model), expected, what=what, path=path)
        if not has_meta_attributes(meta_model):
            return meta_model
    try:
        with _parameters_on_meta():
            model = build()
    except errors.ModelkeepError:
        raise
    except Exception as e:
        raise errors.ArchitectureError(
            f"building {what} failed: {type(e).__name__}: {e}",
            path=path,
            fix="check the recorded arguments; re-save the model if the file was edited",
        ) from e
    if not isinstance(model, torch.nn.Module):
        raise errors.ArchitectureError(
            f"{what} returned {type(model).__name__}, not an nn.Module", path=path, fix="fix the factory"
        )
    return model


# --------------------------------------------------------------------------------------------
# Verification


def check_shapes(
    actual: Mapping[str, tuple[int, ...]],
    expected: Mapping[str, tuple[int, ...]],
    *,
    what: str,
    path: str | None = None,
    error: type[errors.ModelkeepError] = errors.ArchitectureError,
) -> None:
    lines = [f"  only in the rebuilt model: {n}" for n in actual if n not in expected]
    lines += [f"  missing from the rebuilt model: {n}" for n in expected if n not in actual]
    lines += [
        f"  shape differs: {n}: rebuilt {list(actual[n])}, expected {list(expected[n])}"
        for n in expected
        if n in actual and tuple(actual[n]) != tuple(expected[n])
    ]
    if lines:
        raise error(
            f"{what} does not rebuild the same parameters and buffers ({len(lines)} differences):\n"
            + "\n".join(_shown(lines))
            + "\n",
            path=path,
            item="modelkeep.architecture",
            fix="record the arguments the model was built with, or save with strategy='graph' and "
            "example_inputs",
        )


_SKIP = object()


def _plain(value: Any, depth: int = 0) -> Any:
    """A comparable form of an attribute value, or _SKIP for values that are not configuration."""
    if depth > 8:
        return _SKIP
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, enum.Enum):
        return f"{type(value).__name__}.{value.name}"
    if isinstance(value, torch.dtype):
        return str(value)
    if isinstance(value, (types.FunctionType, types.BuiltinFunctionType)):
        return f"function {getattr(value, '__module__', '')}.{getattr(value, '__qualname__', '')}"
    if isinstance(value, functools.partial):
        return _plain(value.func, depth + 1)
    if isinstance(value, (list, tuple)):
        items = [_plain(v, depth + 1) for v in value]
        return _SKIP if any(v is _SKIP for v in items) else items
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        pairs = {k: _plain(v, depth + 1) for k, v in value.items()}
        return _SKIP if any(v is _SKIP for v in pairs.values()) else pairs
    return _SKIP


def fingerprint(model: torch.nn.Module) -> dict[str, dict[str, Any]]:
    """Per submodule: class, ``extra_repr()`` and plain public attributes (no tensors)."""
    out: dict[str, dict[str, Any]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        cls = type(module)
        entry: dict[str, Any] = {"class": f"{cls.__module__}.{cls.__qualname__}"}
        try:
            entry["extra_repr"] = module.extra_repr()
        except Exception:  # extra_repr of an exotic module reading tensor values on meta
            entry["extra_repr"] = "?"
        for key, value in vars(module).items():
            if key.startswith("_") or key == "training":
                continue
            plain = _plain(value)
            if plain is not _SKIP:
                entry[key] = plain
        out[name or "(root)"] = entry
    return out


def check_same_structure(
    original: torch.nn.Module, rebuilt: torch.nn.Module, *, what: str, path: str | None = None
) -> None:
    """ArchitectureError unless ``rebuilt`` has the names, shapes, classes and settings of
    ``original``."""
    check_shapes(shapes_of(rebuilt), shapes_of(original), what=what, path=path)
    left, right = fingerprint(original), fingerprint(rebuilt)
    lines = [f"  only in the saved model: {n}" for n in left if n not in right]
    lines += [f"  only in the rebuilt model: {n}" for n in right if n not in left]
    for name, attrs in left.items():
        other = right.get(name)
        if other is None:
            continue
        for key in sorted(set(attrs) | set(other)):
            if attrs.get(key, "<absent>") != other.get(key, "<absent>"):
                lines.append(
                    f"  {name}: {key}: saved {attrs.get(key, '<absent>')!r}, rebuilt "
                    f"{other.get(key, '<absent>')!r}"
                )
    if lines:
        raise errors.ArchitectureError(
            f"{what} rebuilds a different model ({len(lines)} differences):\n"
            + "\n".join(_shown(lines))
            + "\n",
            path=path,
            item="modelkeep.architecture",
            fix="record the arguments the model was built with (factory={'factory': ..., "
            "'kwargs': {...}}), or save with strategy='graph' and example_inputs",
        )


def _shown(lines: list[str]) -> list[str]:
    if len(lines) <= MAX_SHOWN:
        return lines
    return lines[:MAX_SHOWN] + [f"  ... and {len(lines) - MAX_SHOWN} more"]


# --------------------------------------------------------------------------------------------
# Tensors outside the state dict, and dtypes


def nonpersistent_buffers(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Buffers registered with ``persistent=False``: not in the state dict, yet needed to run."""
    found: dict[str, torch.Tensor] = {}
    for prefix, module in model.named_modules():
        for name in sorted(module._non_persistent_buffers_set):
            buffer = module._buffers.get(name)
            if buffer is not None:
                found[f"{prefix}.{name}" if prefix else name] = buffer
    return found


def owner_of(model: torch.nn.Module, fqn: str) -> tuple[torch.nn.Module, str]:
    module_path, _, attr = fqn.rpartition(".")
    return (model.get_submodule(module_path) if module_path else model), attr


def set_tensor(model: torch.nn.Module, fqn: str, value: torch.Tensor) -> None:
    """Put ``value`` where ``fqn`` points: a buffer stays a buffer, a plain attribute stays one."""
    owner, attr = owner_of(model, fqn)
    if attr in owner._buffers:
        owner._buffers[attr] = value
    elif attr in owner._parameters:
        owner._parameters[attr] = torch.nn.Parameter(value, requires_grad=owner._parameters[attr].requires_grad)
    else:
        setattr(owner, attr, value)


def adopt_dtypes(model: torch.nn.Module, dtypes: Mapping[str, torch.dtype]) -> None:
    """Give meta parameters/buffers the dtype the file stores (a saved ``.half()`` model loads
    as half). Tied tensors stay one object."""
    replaced: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id -> (original, replacement)
    for kind in ("_parameters", "_buffers"):
        for prefix, module in model.named_modules(remove_duplicate=False):
            table = getattr(module, kind)
            for attr, tensor in list(table.items()):
                if tensor is None:
                    continue
                fqn = f"{prefix}.{attr}" if prefix else attr
                wanted = dtypes.get(fqn)
                if wanted is None or wanted == tensor.dtype or not tensor.is_meta:
                    continue
                if id(tensor) not in replaced:
                    fresh = torch.empty(tensor.shape, dtype=wanted, device="meta")
                    if isinstance(tensor, torch.nn.Parameter):
                        grad = tensor.requires_grad and (wanted.is_floating_point or wanted.is_complex)
                        fresh = torch.nn.Parameter(fresh, requires_grad=grad)
                    replaced[id(tensor)] = (tensor, fresh)
                table[attr] = replaced[id(tensor)][1]


# --------------------------------------------------------------------------------------------
# Loading: record -> module on meta -> tensors from the file

BUFFER_PREFIX = "modelkeep.buffer."


def build_model(
    record: dict[str, Any], header: format.Header, *, trust: tuple[str, ...]
) -> tuple[torch.nn.Module, dict[str, str]]:
    """The module a record describes, parameters on the meta device, and ``{fqn: stored name}``
    of the tensors to put back after the state dict is filled (non-persistent buffers,
    constants)."""
    path = header.path
    strategy = records.check_envelope(record, path=path)
    stored = _stored(header)
    state_shapes = {n: shape for n, (shape, _) in stored.items() if not n.startswith(records.EXTRA_PREFIX)}
    if strategy == "graph":
        def read(names: list[str]) -> dict[str, torch.Tensor]:
            entries = _entries(header)
            return engine.read_tensors(path, [entries[n] for n in dict.fromkeys(names)])

        model = graph.build(record, path=path, shapes=stored, read=read)
        extras = records.string_map(record, "constants", path=path, names=records.FQN_PATTERN)
        return model, extras

    extras = records.string_map(record, "buffers", path=path, names=records.FQN_PATTERN)
    if strategy == "factory":
        name = records.require(record, "factory", str, path=path)
        encoded = records.require(record, "kwargs", dict, path=path)
        builder = factories.resolve(name, trust=trust, path=path)
        kwargs = {
            key: records.decode_value(value, path=path, item=f"kwargs.{key}") for key, value in encoded.items()
        }
        model = construct(
            lambda: factories.call(name, builder, kwargs, path=path),
            expected=state_shapes,
            what=f"factory {name}",
            path=path,
        )
    else:
        root = record.get("root")
        model = construct(
            lambda: modules.build_tree(root, path=path),
            expected=state_shapes,
            what="the module tree",
            path=path,
        )
    return model, extras


def _entries(header: format.Header) -> dict[str, format.TensorEntry]:
    entries = dict(header.entries)
    for alias, target in header.aliases.items():
        entries[alias] = header.entries[target]
    return entries


def _stored(header: format.Header) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    return {name: (entry.shape, entry.torch_dtype) for name, entry in _entries(header).items()}


def fill(
    model: torch.nn.Module,
    header: format.Header,
    extras: Mapping[str, str],
    *,
    device: torch.device | str | None,
) -> None:
    """Fill ``model`` from the file (``load_weights`` semantics: names and shapes checked first,
    bytes straight into the parameters), put back the extra tensors, leave it in eval()."""
    entries = _entries(header)
    state_shapes = {n: e.shape for n, e in entries.items() if not n.startswith(records.EXTRA_PREFIX)}
    check_shapes(
        shapes_of(model), state_shapes, what="the architecture record", path=header.path,
        error=errors.KeyMismatchError,
    )
    missing = [stored for stored in extras.values() if stored not in entries]
    if missing:
        raise records.bad_record(header.path, f"tensors {missing[:5]} are named but not stored", "buffers")
    adopt_dtypes(model, {n: e.torch_dtype for n, e in entries.items()})
    _tie(model, header.aliases)
    values = engine.read_tensors(
        header.path, [entries[s] for s in dict.fromkeys(extras.values())], device=device or "cpu"
    )
    _put_extras(model, extras, values, header.path)  # so that no meta tensor is left unfilled
    api.load_weights(model, header.path, strict=False, device=device)
    _put_extras(model, extras, values, header.path)  # materialising replaced them with empty memory
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise errors.ArchitectureError(
            f"{len(left)} tensors were not filled from the file: {left[:5]}",
            path=header.path,
            fix="re-save the model with modelkeep.save",
        )
    model.eval()


def _tie(model: torch.nn.Module, aliases: Mapping[str, str]) -> None:
    """Names the file stored once were one tensor when saved: make them one object again (a
    module tree or factory may build tied weights as two)."""
    for alias, target in aliases.items():
        try:
            owner, attr = owner_of(model, alias)
            source_owner, source_attr = owner_of(model, target)
        except AttributeError:
            continue
        for table in ("_parameters", "_buffers"):
            shared = getattr(source_owner, table).get(source_attr)
            if shared is not None and attr in getattr(owner, table):
                getattr(owner, table)[attr] = shared


def _put_extras(
    model: torch.nn.Module, extras: Mapping[str, str], values: Mapping[str, torch.Tensor], path: str
) -> None:
    for fqn, stored in extras.items():
        try:
            set_tensor(model, fqn, values[stored])
        except (AttributeError, KeyError) as e:
            raise records.bad_record(path, f"no place for tensor {fqn!r} in the model", "buffers") from e
