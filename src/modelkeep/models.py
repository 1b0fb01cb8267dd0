"""Whole models without pickle: ``save``, ``load`` and ``create``.

The tutorial's ``torch.save(model)`` / ``torch.load(path, weights_only=False)`` pickles the module,
needs its class at load time and lets the file run code. ``save`` writes a safetensors file whose
``modelkeep.architecture`` record says how to rebuild the module (a trusted factory call, a tree of
``torch.nn`` layers, or a ``torch.export`` graph) and whose tensors are the state dict; ``load``
rebuilds the module on the meta device (no random init), reads the tensors straight into it and
returns it in ``eval()``. Nothing from the file is imported or unpickled.
"""

from __future__ import annotations

import importlib
import os
from typing import Any, Mapping

import torch

from modelkeep import api, atomic, errors, format
from modelkeep import sniff as sniffing
from modelkeep.arch import factories, graph, modules, rebuild, records, verify

STRATEGIES = records.STRATEGIES
RECIPE_ATTR = "_modelkeep_recipe"
INFERENCE_ATTR = "_modelkeep_inference"

_OPTIONS = (
    "options: (1) build it with modelkeep.create('torchvision:resnet18', ...) or pass "
    "factory='torchvision.models.resnet18' (or a builder registered with "
    "@modelkeep.register_factory); (2) build it only from torch.nn layers and containers; "
    "(3) pass example_inputs=(tensor, ...) to store a torch.export graph; or save only the "
    "weights with modelkeep.save_weights"
)


# --------------------------------------------------------------------------------------------
# create


def create(name: str, *, weights: Any = None, **kwargs: Any) -> torch.nn.Module:
    """Build a model from a trusted factory and remember the recipe, so ``save`` needs no hints.

    ``name`` is ``"torchvision:vgg16"``, ``"torchvision.models.vgg16"``, ``"timm:resnet18"`` or a
    registered name. ``weights="IMAGENET1K_V1"`` loads named pretrained weights (and their
    inference spec) instead of a random init.
    """
    canonical = factories.canonical_name(name)
    try:
        builder = factories.resolve(canonical)
    except errors.UnsafeContentError as e:
        raise errors.ArchitectureError(
            "unknown factory", item=name, fix=f"use one of: {factories.known_names()}"
        ) from e
    if kwargs.get("weights_backbone") is not None:
        raise errors.ArchitectureError(
            "create() loads named weights for the whole model only",
            item="weights_backbone",
            fix="pass weights=... for the whole model, or build with torchvision yourself and "
            "save(model, path, factory={'factory': ..., 'kwargs': {...}})",
        )
    call_kwargs = dict(kwargs)
    weights_label = None
    if weights is not None:
        weights_label = _weights_label(canonical, weights)
        if canonical.startswith(factories.TORCHVISION):
            call_kwargs["weights"] = weights_label
        model = rebuild.construct(
            lambda: factories.call(canonical, builder, call_kwargs), expected=None, what=canonical
        )
        from modelkeep import pretrained

        spec = pretrained.load_named_weights(model, factory=canonical, weights=weights_label.rsplit(".", 1)[-1])
        left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
        if left:
            raise errors.ArchitectureError(
                f"named weights {weights_label} left {len(left)} tensors unfilled: {left[:5]}",
                item=canonical,
                fix="the weights do not match this architecture",
            )
        if spec is not None:
            object.__setattr__(model, INFERENCE_ATTR, spec)
    else:
        model = factories.call(canonical, builder, call_kwargs)
    try:
        encoded = {k: records.encode_value(v, item=f"kwargs.{k}") for k, v in call_kwargs.items()}
        recipe: dict[str, Any] = {"factory": canonical, "kwargs": encoded}
    except errors.ArchitectureError as e:
        recipe = {"factory": canonical, "error": str(e)}
    object.__setattr__(model, RECIPE_ATTR, recipe)
    return model


def _weights_label(canonical: str, weights: Any) -> str:
    """A stable name for named weights: ``VGG16_Weights.IMAGENET1K_V1`` for torchvision (so
    ``"DEFAULT"`` is pinned to what it means today)."""
    if not canonical.startswith(factories.TORCHVISION):
        return str(getattr(weights, "name", weights))
    from torchvision import models

    registry_name = factories.torchvision_registry_name(canonical)
    if registry_name is None:
        raise errors.ArchitectureError(
            "named weights exist for torchvision builders only, not for model classes",
            item=canonical,
            fix="use a builder such as torchvision:vit_b_16, or load weights with load_weights",
        )
    try:
        member = models.get_model_weights(registry_name).verify(weights)
    except (KeyError, ValueError, TypeError) as e:
        raise errors.ArchitectureError(
            f"torchvision has no weights {weights!r} for {registry_name}",
            item=canonical,
            fix="see torchvision.models.get_model_weights(name) for the names",
        ) from e
    return factories.weights_name(member)


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
        return {"factory": factories.canonical_name(factory), "kwargs": {}}
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
            "factory": factories.canonical_name(factory["factory"]),
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
                "strategy='factory' needs factory=... or a model built by modelkeep.create",
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
                f"{' ...' if len(problems) > 3 else ''})",
                item="architecture",
                fix=_OPTIONS,
            )
        record = _modules_record(model)
    buffers = rebuild.nonpersistent_buffers(model)
    record["buffers"] = {fqn: rebuild.BUFFER_PREFIX + fqn for fqn in buffers}
    extras = [(rebuild.BUFFER_PREFIX + fqn, tensor.detach()) for fqn, tensor in buffers.items()]
    return record, model.state_dict(), extras


def _inference_value(inference: Any) -> Any:
    if inference is None:
        return None
    if hasattr(inference, "to_json"):
        inference = inference.to_json()
    if not isinstance(inference, Mapping):
        raise errors.UnsupportedValueError(
            f"inference spec must be a dict or have .to_json(), not {type(inference).__name__}",
            item="inference",
            fix="pass a JSON-able dict",
        )
    try:
        format.dumps(inference)
    except (TypeError, ValueError) as e:
        raise errors.UnsupportedValueError(
            f"inference spec is not JSON-able: {e}", item="inference", fix="use numbers, strings, lists and dicts"
        ) from e
    return dict(inference)


def save(
    model: torch.nn.Module,
    path: str | os.PathLike[str],
    *,
    example_inputs: Any = None,
    factory: Any = None,
    inference: Any = None,
    metadata: Mapping[str, str] | None = None,
    strategy: str | None = None,
) -> dict[str, str]:
    """Save a whole model, without pickle, so that ``load(path)`` rebuilds it with no class
    definition and no code from the file. Returns the per-tensor digests.

    The architecture is recorded by the first strategy that fits (or ``strategy=``): ``factory``
    (a model from ``create`` or ``factory=``), ``modules`` (only torch.nn layers), ``graph``
    (``torch.export`` with ``example_inputs``). Every record is proven at save by rebuilding it.
    """
    path = os.fspath(path)
    model = _unwrap(model)
    record, state, extras = _plan(model, example_inputs=example_inputs, factory=factory, strategy=strategy)
    clashes = [name for name in state if name.startswith(records.EXTRA_PREFIX)]
    if clashes:
        raise errors.ArchitectureError(
            "state dict names may not start with 'modelkeep.'", item=clashes[0], fix="rename the submodule"
        )
    stored, aliases = api.split_aliases(api.state_dict_of(state))
    header = api.check_user_metadata(metadata)
    header.update(api.modelkeep_metadata("model", aliases))
    header[format.KEY_ARCHITECTURE] = format.dumps(record)
    spec = _inference_value(inference if inference is not None else getattr(model, INFERENCE_ATTR, None))
    if spec is not None:
        header[format.KEY_INFERENCE] = format.dumps(spec)
    return atomic.write_file(path, stored + extras, header)


# --------------------------------------------------------------------------------------------
# load


def load(
    path: str | os.PathLike[str],
    *,
    device: torch.device | str | None = None,
    trust: tuple[str, ...] | list[str] = (),
    mmap: bool = False,
) -> torch.nn.Module:
    """A ready ``nn.Module`` in ``eval()`` from a file written by ``save``.

    Nothing is unpickled and nothing outside the trusted namespaces is imported: a file naming a
    factory that is neither registered, torchvision/timm, nor under a module named in ``trust`` is
    refused before any import. torch.save files of whole modules go through the legacy reader.

    By default the bytes are copied into memory the engine allocates with huge pages (see
    ``modelkeep.io.buffers.allocate``), which keeps outputs bit-identical to the saved model's. ``mmap=True``
    (CPU) maps the file copy-on-write instead: a little faster to the first prediction, but
    tensors then sit at the file's offsets, whose alignment can change the last bits of some
    kernels' results, and the file must not be truncated in place while the model lives
    (modelkeep's own saves replace files atomically, which is safe).
    """
    path = os.fspath(path)
    trust = factories.check_trust_names(trust)
    if sniffing.sniff(path) != "safetensors":
        return _load_legacy(path, device=device, trust=trust)
    header = format.read_header_file(path)
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
    model, extras = rebuild.build_model(record, header, trust=trust)
    rebuild.fill(model, header, extras, device=device, mmap=mmap)
    if record.get("strategy") == "factory":  # so that a loaded model saves again without hints
        object.__setattr__(model, RECIPE_ATTR, {"factory": record["factory"], "kwargs": record["kwargs"]})
    spec = _inference_of(header)
    if spec is not None:
        object.__setattr__(model, INFERENCE_ATTR, spec)
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


def read_inference(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The stored inference spec (input signature, preprocessing, labels), from the header alone."""
    return _inference_of(api.open_header(path))


def _load_legacy(path: str, *, device: Any, trust: tuple[str, ...]) -> torch.nn.Module:
    """A torch.save'd whole module, through the safe legacy reader when it is installed."""
    try:
        legacy = importlib.import_module("modelkeep.legacy")
    except ImportError:
        legacy = None
    reader = getattr(legacy, "read_module", None)
    if reader is None:
        raise errors.FormatError(
            "is a torch.save file; rebuilding a whole pickled module needs modelkeep's legacy "
            "reader, which is not available",
            path=path,
            fix="read its tensors with modelkeep.load_state_dict(path), or convert it with "
            "`modelkeep convert`",
        )
    model = reader(path, trust=trust)
    if not isinstance(model, torch.nn.Module):
        raise errors.FormatError(
            f"holds a {type(model).__name__}, not a whole model",
            path=path,
            fix="read it with modelkeep.read(path)",
        )
    model.eval()
    if device is not None:
        model.to(device)
    return model
