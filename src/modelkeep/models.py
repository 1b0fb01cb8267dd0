"""Whole models without pickle: ``save``, ``load`` and ``create``.

The tutorial's ``torch.save(model)`` / ``torch.load(path, weights_only=False)`` pickles the module,
needs its class at load time and lets the file run code. ``save`` writes a safetensors file whose
``modelkeep.architecture`` record says how to rebuild the module (a trusted factory call, a tree of
``torch.nn`` layers, or a ``torch.export`` graph) and whose tensors are the state dict; ``load``
rebuilds the module on the meta device (no random init), reads the tensors straight into it and
returns it in ``eval()``. Nothing from the file is imported or unpickled.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Mapping

import torch

from modelkeep import errors, format, options, reading, storage, weights
from modelkeep.arch import factories, graph, modules, names, rebuild, recognize, records, verify
from modelkeep.inference import spec as spec_module

STRATEGIES = records.STRATEGIES
RECIPE_ATTR = "_modelkeep_recipe"
_log = logging.getLogger("modelkeep")

_OPTIONS = (
    "options: (1) build it with modelkeep.create('torchvision:resnet18', ...) or pass "
    "factory='torchvision.models.resnet18' (or a builder registered with "
    "@modelkeep.register_factory); (2) build it only from torch.nn layers and containers; "
    "(3) pass example_inputs=(tensor, ...) to store a torch.export graph; or save only the "
    "weights with modelkeep.save_weights"
)


# --------------------------------------------------------------------------------------------
# save


def _unwrap(model: Any) -> torch.nn.Module:
    """The module inside DataParallel/DDP and torch.compile wrappers."""
    for _ in range(4):
        if isinstance(model, (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)):
            model = model.module
        elif type(model).__name__ == "OptimizedModule" and isinstance(
            getattr(model, "_orig_mod", None), torch.nn.Module
        ):
            model = model._orig_mod
    if not isinstance(model, torch.nn.Module):
        raise errors.ArchitectureError(
            f"expected an nn.Module, got {type(model).__name__}",
            fix="pass the model; for a state dict use modelkeep.save_weights",
        )
    return model


def _factory_recipe(model: torch.nn.Module, factory: Any) -> dict[str, Any] | None:
    if factory is None:
        return getattr(model, RECIPE_ATTR, None)
    if isinstance(factory, str):
        return {"factory": names.parse(factory).qualified, "kwargs": {}}
    if (
        isinstance(factory, Mapping)
        and isinstance(factory.get("factory"), str)
        and set(factory) <= {"factory", "kwargs"}
    ):
        raw = dict(factory.get("kwargs") or {})
        if "weights" in raw:
            raw["weights"] = factories.weights_name(raw["weights"])
        if "weights_backbone" in raw:
            raw["weights_backbone"] = factories.weights_name(raw["weights_backbone"])
        return {
            "factory": names.parse(factory["factory"]).qualified,
            "kwargs": {k: records.encode_value(v, item=f"kwargs.{k}") for k, v in raw.items()},
        }
    raise errors.ArchitectureError(
        "factory must be a name or {'factory': name, 'kwargs': {...}}",
        item="factory",
        fix="pass factory='torchvision.models.vgg16'",
    )


def _factory_record(model: torch.nn.Module, recipe: Mapping[str, Any]) -> dict[str, Any]:
    if "error" in recipe:
        raise errors.ArchitectureError(
            f"the model's recipe cannot be recorded: {recipe['error']}", item="factory", fix=_OPTIONS
        )
    name = recipe["factory"]
    try:
        builder = factories.resolve(name)
    except errors.UnsafeContentError as e:
        raise errors.ArchitectureError(
            "factory is not registered", item=name, fix="decorate it with @modelkeep.register_factory"
        ) from e
    kwargs = {k: records.decode_value(v, path=None, item=f"kwargs.{k}") for k, v in recipe["kwargs"].items()}
    what = f"factory {name}"
    rebuilt = rebuild.construct(
        lambda: factories.call(name, builder, kwargs), expected=verify.shapes_of(model), what=what
    )
    verify.check_same_structure(model, rebuilt, what=what)
    return records.new_record("factory", factory=name, kwargs=dict(recipe["kwargs"]))


def _modules_record(model: torch.nn.Module) -> dict[str, Any]:
    root = modules.record_tree(model)
    rebuilt = rebuild.construct(
        lambda: modules.build_tree(root, path=None),
        expected=verify.shapes_of(model),
        what="the module tree",
        fallback=False,
    )
    verify.check_same_structure(model, rebuilt, what="the module tree")
    return records.new_record("modules", root=root)


def _several(recognized: list[recognize.Recognized]) -> str:
    """The message part naming builders that all rebuild the model (none of them is chosen)."""
    if len(recognized) < 2:
        return ""
    return "; several trusted builders rebuild it, so none was chosen: " + ", ".join(
        r.factory for r in recognized
    )


def _check_storable(model: torch.nn.Module) -> None:
    for name, value in model.state_dict().items():
        if not isinstance(value, torch.Tensor) or value.is_quantized:
            raise errors.ArchitectureError(
                "quantized models cannot be stored in safetensors",
                item=name,
                fix="save the float model (e.g. quantize=False) and quantize after loading",
            )


def _plan(
    model: torch.nn.Module, *, example_inputs: Any, factory: Any, strategy: str | None
) -> tuple[dict[str, Any], dict[str, torch.Tensor], list[tuple[str, torch.Tensor]]]:
    """``(record, state dict, extra tensors)`` by the first strategy that applies (or the one
    asked for)."""
    if strategy is not None and strategy not in STRATEGIES:
        raise errors.ArchitectureError(
            f"unknown strategy {strategy!r}", item="strategy", fix=f"use one of {', '.join(STRATEGIES)} or None"
        )
    _check_storable(model)
    recipe = _factory_recipe(model, factory) if strategy in (None, "factory") else None
    recognized: list[recognize.Recognized] = []
    if recipe is None and strategy in (None, "factory"):
        found, recognized = recognize.recognize(model)
        if found is not None:  # built by torchvision's or timm's own builder: record that builder
            recipe = _factory_recipe(model, found.recipe())
            _log.info("recorded factory %s(%s)", found.factory,
                      ", ".join(f"{k}={v!r}" for k, v in found.kwargs.items()))
    automatic_graph = (
        strategy is None and recipe is None and example_inputs is not None and modules.unsupported(model)
    )
    if strategy == "graph" or automatic_graph:
        if example_inputs is None:
            raise errors.ArchitectureError(
                "the graph strategy needs example_inputs", item="example_inputs",
                fix="pass example_inputs=(torch.randn(2, ...),) with a batch of 2 or more",
            )
        record, program, inputs = graph.export(model, example_inputs)
        state, extras = graph.tensors_to_store(record, program, inputs)
        return record, state, extras
    if strategy == "factory" or recipe is not None:
        if recipe is None:
            raise errors.ArchitectureError(
                "strategy='factory' needs factory=..., a model built by modelkeep.create, or one that "
                "exactly one trusted builder rebuilds" + _several(recognized),
                item="factory",
                fix=_OPTIONS,
            )
        record = _factory_record(model, recipe)
    else:
        problems = modules.unsupported(model)
        if problems:
            raise errors.ArchitectureError(
                f"cannot record how to rebuild {type(model).__qualname__}: it is not from a trusted "
                f"factory and not made only of torch.nn layers ({'; '.join(problems[:3])}"
                f"{' ...' if len(problems) > 3 else ''})" + _several(recognized),
                item="architecture",
                fix=_OPTIONS,
            )
        record = _modules_record(model)
    buffers = rebuild.nonpersistent_buffers(model)
    record["buffers"] = {fqn: rebuild.BUFFER_PREFIX + fqn for fqn in buffers}
    extras = [(rebuild.BUFFER_PREFIX + fqn, tensor.detach()) for fqn, tensor in buffers.items()]
    return record, model.state_dict(), extras


def _inference_spec(inference: Any) -> spec_module.InferenceSpec | None:
    """The InferenceSpec of what a caller passes as ``inference=`` (a spec, its JSON dict, or an
    object with ``to_json()``)."""
    if inference is not None and not isinstance(inference, (spec_module.InferenceSpec, Mapping)):
        if not hasattr(inference, "to_json"):
            raise errors.UnsupportedValueError(
                f"inference spec must be an InferenceSpec or its dict, not {type(inference).__name__}",
                item="inference",
                fix="pass modelkeep.InferenceSpec(...) or its to_json() dict",
            )
        inference = inference.to_json()
    return spec_module.coerce(inference)


def save(
    model: torch.nn.Module,
    path: str | os.PathLike[str],
    *,
    example_inputs: Any = None,
    factory: Any = None,
    inference: Any = None,
    metadata: Mapping[str, str] | None = None,
    strategy: str | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> dict[str, str]:
    """Save a whole model, without pickle, so that ``load(path)`` rebuilds it with no class
    definition and no code from the file. Returns the per-tensor digests.

    The architecture is recorded by the first strategy that fits (or ``strategy=``): ``factory``
    (a model from ``create``, ``factory=``, or one built by torchvision's or timm's own builders:
    ``torchvision.models.vgg16(weights=...)`` is recognised as the one registered builder that
    rebuilds it, arguments such as ``num_classes`` inferred from the shapes, and the name is
    logged on the ``modelkeep`` logger), ``modules`` (only torch.nn layers), ``graph``
    (``torch.export`` with ``example_inputs``). Every record is proven at save by rebuilding it.

    Args:
        model: the module to save (DataParallel/DDP/compile wrappers are unwrapped).
        path: a local path or an fsspec URL.
        example_inputs: a tuple of example tensors for the ``graph`` strategy.
        factory: the factory that built the model: a dotted name or ``{"factory": ..., "kwargs": ...}``.
        inference: an InferenceSpec (or its dict) to record; taken from the model when it has one.
        metadata: extra ``{str: str}`` for the header.
        strategy: ``"factory"``, ``"modules"`` or ``"graph"`` instead of the first that fits.
        storage_options: for the fsspec file system of a URL.

    Returns:
        ``{name: hex digest}`` of every stored tensor.

    Raises:
        ArchitectureError: no strategy can record the model (the message lists the options).
        UnsupportedValueError: a value cannot be stored.
        StorageError: writing failed; a file already at ``path`` is untouched.
    """
    model = _unwrap(model)
    record, state, extras = _plan(model, example_inputs=example_inputs, factory=factory, strategy=strategy)
    clashes = [name for name in state if name.startswith(records.EXTRA_PREFIX)]
    if clashes:
        raise errors.ArchitectureError(
            "state dict names may not start with 'modelkeep.'", item=clashes[0], fix="rename the submodule"
        )
    stored, aliases = weights.split_aliases(weights.state_dict_of(state))
    header = weights.check_user_metadata(metadata)
    header.update(weights.modelkeep_metadata("model", aliases))
    header[format.KEY_ARCHITECTURE] = format.dumps(record)
    spec = _inference_spec(inference) if inference is not None else spec_module.attached(model)
    if spec is not None:
        header[format.KEY_INFERENCE] = spec_module.encode(spec)
    store, where = storage.resolve(path, storage_options)
    return store.write_tensor_file(where, stored + extras, header)


# --------------------------------------------------------------------------------------------
# load


def load(
    path: str | os.PathLike[str],
    *,
    device: torch.device | str | None = None,
    trust: tuple[str, ...] | list[str] = (),
    mmap: bool = False,
    verify: bool = False,
    storage_options: Mapping[str, Any] | None = None,
) -> torch.nn.Module:
    """A ready ``nn.Module`` in ``eval()`` from a file written by ``save``.

    Nothing is unpickled and nothing outside the trusted namespaces is imported: a file naming a
    factory that is neither registered, torchvision/timm, nor under a module named in ``trust`` is
    refused before any import. torch.save files of whole modules go through the legacy reader.

    By default the bytes are copied into fresh memory (huge pages where they help: see
    ``io.buffers.allocate``), at least as aligned as torch's own allocator, which keeps outputs
    bit-identical to the saved model's. ``mmap=True``
    (CPU) maps the file copy-on-write instead: a little faster to the first prediction, but
    tensors then sit at the file's offsets, whose alignment can change the last bits of some
    kernels' results, and the file must not be truncated in place while the model lives
    (modelkeep's own saves replace files atomically, which is safe).

    Args:
        path: a local path or an fsspec URL.
        device: where the model goes.
        trust: extra dotted namespaces whose factories (or pickled classes) may be used.
        mmap: map a local file copy-on-write instead of copying (CPU only).
        verify: check every tensor read against the file's digests (see ``load_weights``; a
            mapped file is not read up front, so ``mmap=True`` leaves the check to ``verify``).
        storage_options: for the fsspec file system of a URL.

    Returns:
        The module, in ``eval()``.

    Raises:
        UnsafeContentError: the file names an untrusted factory or class.
        ArchitectureError: the record cannot be rebuilt into the stored tensors.
        FormatError: not a whole-model file, or an invalid one.
        StorageError: the file cannot be read.
    """
    path = os.fspath(path)
    read_options = options.read_options(trust)  # trust is checked here, once
    trust = read_options.trust
    store, where = storage.resolve(path, storage_options)
    opened = reading.open_file_in(store, where, read_options)
    header = opened.metadata()
    if header is None:  # a torch.save file of a whole pickled module
        return _load_legacy(opened, device=device)
    if header.kind != "model":
        raise errors.FormatError(
            f"is a {header.kind} file, not a whole model",
            path=path,
            fix="build the model, then modelkeep.load_weights(model, path)",
        )
    record = header.modelkeep_value(format.KEY_ARCHITECTURE)
    if record is None:
        raise errors.FormatError(
            "has no architecture record",
            path=path,
            item=format.KEY_ARCHITECTURE,
            fix="re-save it with modelkeep.save",
        )
    model, extras = rebuild.build_model(record, opened, trust=trust)  # a SafetensorsSource
    rebuild.fill(model, opened, extras, device=device, mmap=mmap, verify_digests=verify)
    if record.get("strategy") == "factory":  # so that a loaded model saves again without hints
        object.__setattr__(model, RECIPE_ATTR, {"factory": record["factory"], "kwargs": record["kwargs"]})
    spec_module.attach(model, spec_module.from_header(header))
    return model


def _inference_of(header: format.Header) -> dict[str, Any] | None:
    spec = header.modelkeep_value(format.KEY_INFERENCE)
    if spec is not None and not isinstance(spec, dict):
        raise errors.FormatError(
            "inference spec is not a JSON object",
            path=header.path,
            item=format.KEY_INFERENCE,
            fix="re-save the model",
        )
    return spec


def read_inference(
    path: str | os.PathLike[str], *, storage_options: Mapping[str, Any] | None = None
) -> dict[str, Any] | None:
    """The stored inference spec (input signature, preprocessing, labels), from the header alone."""
    return _inference_of(reading.read_header(path, storage_options=storage_options))


def _load_legacy(source: Any, *, device: Any) -> torch.nn.Module:
    """A torch.save'd whole module, rebuilt by the safe legacy reader from trusted classes."""
    model = source.module()
    model.eval()
    if device is not None:
        model.to(device)
    return model
