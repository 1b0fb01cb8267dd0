"""Building modules without random init, and filling them from a file.

Construction runs under ``torch.device("meta")`` with ``torch.nn.init`` switched off: no memory is
touched and no initialiser runs, so even a record that asks for absurd sizes costs nothing before
its shapes are compared with the file. Some builders compute real tensors while they construct
(detection anchors, regnet widths); for those the build is repeated with only the *parameters*
sent to the meta device as they are registered, so computed attributes keep their values.

Loading is then ``build_model`` (record -> module on meta) and ``fill`` (``weights.load_into`` into
it, plus the tensors a state dict leaves out: non-persistent buffers and graph constants).
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Callable, Iterator, Mapping

import torch

from modelkeep import errors, format, weights
from modelkeep.sources import ranges
from modelkeep.sources.safetensors import SafetensorsSource, named_entries
from modelkeep.arch import factories, graph, modules, records, verify

_hook_lock = threading.RLock()


# --------------------------------------------------------------------------------------------
# Construction


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Send every parameter this thread registers while active to the meta device (a global
    torch hook: builds are serialised, other threads are left alone)."""

    builder = threading.get_ident()

    def to_meta(module: torch.nn.Module, name: str, param: Any) -> Any:
        if threading.get_ident() != builder or type(param) is not torch.nn.Parameter or param.is_meta:
            return None
        return torch.nn.Parameter(torch.empty_like(param, device="meta"), requires_grad=param.requires_grad)

    with _hook_lock:
        handle = torch.nn.modules.module.register_module_parameter_registration_hook(to_meta)
        try:
            yield
        finally:
            handle.remove()


@contextlib.contextmanager
def _initialisers_skipped() -> Iterator[None]:
    """Make ``torch.nn.init`` functions no-ops (on the meta device they compute nothing, yet
    their Python meta kernels are most of a meta build's time)."""
    init = torch.nn.init
    names = [n for n in dir(init) if n.endswith("_") and not n.startswith("_") and callable(getattr(init, n))]

    builder = threading.get_ident()

    def skipping(original: Callable[..., Any]) -> Callable[..., Any]:
        def skip(tensor: Any, *args: Any, **kwargs: Any) -> Any:
            if threading.get_ident() != builder:  # other threads initialise as usual
                return original(tensor, *args, **kwargs)
            return tensor

        return skip

    with _hook_lock:
        saved = {name: getattr(init, name) for name in names}
        for name in names:
            setattr(init, name, skipping(saved[name]))
        try:
            yield
        finally:
            for name, function in saved.items():
                setattr(init, name, function)


def has_meta_attributes(model: torch.nn.Module) -> bool:
    """True when a module holds meta tensors outside its parameters and buffers (values that the
    file does not carry and a meta build could not compute)."""
    for module in model.modules():
        for value in vars(module).values():
            items = value if isinstance(value, (list, tuple)) else (value,)
            if any(isinstance(v, torch.Tensor) and v.is_meta for v in items):
                return True
    return False


def construct(
    build: Callable[[], torch.nn.Module],
    *,
    expected: Mapping[str, tuple[int, ...]] | None,
    what: str,
    path: str | None = None,
    fallback: bool = True,
) -> torch.nn.Module:
    """Call ``build`` so that parameters end up on the meta device, uninitialised.

    ``expected`` (names -> shapes) is compared after the cheap meta build, before a build that
    allocates real memory, so a record cannot make us allocate more than its file holds. Without
    ``fallback`` (built-in layers never need it) only the meta build is tried.
    """
    meta_model: Any = None
    try:
        with torch.device("meta"), _initialisers_skipped():
            meta_model = build()
    except Exception as e:  # builders that compute with tensor values while constructing; a
        if not fallback:  # real error repeats below and is reported from there
            if isinstance(e, errors.ModelkeepError):
                raise
            raise errors.ArchitectureError(
                f"building {what} failed: {type(e).__name__}: {e}", path=path, fix="re-save the model"
            ) from e
        meta_model = None
    if isinstance(meta_model, torch.nn.Module):
        if expected is not None:
            verify.check_shapes(verify.shapes_of(meta_model), expected, what=what, path=path)
        if not has_meta_attributes(meta_model) or not fallback:
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
    record: dict[str, Any], source: SafetensorsSource, *, trust: tuple[str, ...]
) -> tuple[torch.nn.Module, dict[str, str]]:
    """The module a record describes, parameters on the meta device, and ``{fqn: stored name}``
    of the tensors to put back after the state dict is filled (non-persistent buffers,
    constants)."""
    header = source.header
    path = source.location
    strategy = records.check_envelope(record, path=path)
    stored = _stored(header)
    state_shapes = {n: shape for n, (shape, _) in stored.items() if not n.startswith(records.EXTRA_PREFIX)}
    if strategy == "graph":
        def read(names: list[str]) -> dict[str, torch.Tensor]:
            entries = source.entries()
            return ranges.read_tensors(source.store, path, [entries[n] for n in dict.fromkeys(names)])

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
            fallback=False,
        )
    return model, extras


def _stored(header: format.Header) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    return {name: (entry.shape, entry.torch_dtype) for name, entry in named_entries(header).items()}


def fill(
    model: torch.nn.Module,
    source: SafetensorsSource,
    extras: Mapping[str, str],
    *,
    device: torch.device | str | None,
    mmap: bool = False,
    verify_digests: bool = False,
) -> None:
    """Fill ``model`` from the file (``load_weights`` semantics: names and shapes checked first,
    bytes straight into the parameters, digests checked with ``verify_digests``), put back the extra
    tensors, leave it in eval().

    With ``mmap`` (CPU only) the tensors become copy-on-write views of a private mapping of the
    file: nothing is copied up front, pages arrive as the first forward pass touches them."""
    header = source.header
    entries = source.entries()
    state_shapes = {n: e.shape for n, e in entries.items() if not n.startswith(records.EXTRA_PREFIX)}
    verify.check_shapes(
        verify.shapes_of(model), state_shapes, what="the architecture record", path=header.path,
        error=errors.KeyMismatchError,
    )
    missing = [stored for stored in extras.values() if stored not in entries]
    if missing:
        raise records.bad_record(header.path, f"tensors {missing[:5]} are named but not stored", "buffers")
    adopt_dtypes(model, {n: e.torch_dtype for n, e in entries.items()})
    _tie(model, header.aliases)
    values = ranges.read_tensors(
        source.store, source.location, [entries[s] for s in dict.fromkeys(extras.values())],
        device=device or "cpu",
    )
    _put_extras(model, extras, values, header.path)  # so that no meta tensor is left unfilled
    on_cpu = device is None or torch.device(device).type == "cpu"
    local = source.store.local_path(source.location)
    if not (mmap and on_cpu and local is not None and _map_into(model, header, entries, local)):
        weights.load_into(model, source, strict=False, device=device, verify=verify_digests)
    _put_extras(model, extras, values, header.path)  # materialising replaced them with empty memory
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise errors.ArchitectureError(
            f"{len(left)} tensors were not filled from the file: {left[:5]}",
            path=header.path,
            fix="re-save the model with modelkeep.save",
        )
    model.eval()


def _map_into(
    model: torch.nn.Module, header: format.Header, entries: Mapping[str, format.TensorEntry], local: str
) -> bool:
    """Replace every state-dict tensor by a view of a private mapping of the file. False (and
    nothing changed) when some name is not a plain parameter/buffer or some entry is not
    aligned for its dtype; the caller then copies."""
    slots: dict[str, tuple[dict[str, Any], str, torch.Tensor]] = {}
    for kind, named in (("_parameters", model.named_parameters), ("_buffers", model.named_buffers)):
        for name, tensor in named(remove_duplicate=False):
            owner, attr = owner_of(model, name)
            slots[name] = (getattr(owner, kind), attr, tensor)
    state = model.state_dict(keep_vars=True)
    if any(name not in slots for name in state):
        return False
    for name, tensor in state.items():
        entry = entries[name]
        if entry.torch_dtype != tensor.dtype or entry.begin % entry.torch_dtype.itemsize:
            return False
    storage = torch.UntypedStorage.from_file(local, shared=False, nbytes=header.file_size)
    views: dict[int, torch.Tensor] = {}
    for name, tensor in state.items():
        if id(tensor) not in views:
            entry = entries[name]
            view = torch.empty(0, dtype=entry.torch_dtype)
            if entry.nbytes:
                view.set_(storage, entry.begin // entry.torch_dtype.itemsize, entry.shape)
            else:
                view = torch.empty(entry.shape, dtype=entry.torch_dtype)
            if isinstance(tensor, torch.nn.Parameter):
                view = torch.nn.Parameter(view, requires_grad=tensor.requires_grad)
            views[id(tensor)] = view
        table, attr, _ = slots[name]
        table[attr] = views[id(tensor)]
    for name, (table, attr, tensor) in slots.items():  # tied names outside the state dict
        if id(tensor) in views:
            table[attr] = views[id(tensor)]
    return True


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
