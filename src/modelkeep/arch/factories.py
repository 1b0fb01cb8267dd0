"""Trusted factories: the names a file may ask us to call, and how each name is resolved.

A factory record names a builder and its JSON keyword arguments. Loading calls only builders that
are trusted, decided from the name alone *before anything is imported*:

1. names registered in this process with ``@modelkeep.register_factory`` (timm's registry
   pattern: the user's own code adds builders, the file only names them);
2. ``torchvision.models[.family].<builder>`` for every builder torchvision lists
   (classification, detection, segmentation, video, optical flow, quantization);
3. ``timm.<model name>`` when timm is installed;
4. ``module.function`` where the caller passed ``trust=("module", ...)`` to ``load``.

Anything else is an UnsafeContentError. torchvision builders that take pretrained weights are
called with the weights *named* (the architecture can depend on them: frozen batch norm in
detection backbones, ``transform_input`` in Inception) while the download is suppressed, because
the tensors come from the file.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import inspect
import threading
from typing import Any, Callable, Iterable, Iterator

import torch

from modelkeep import errors
from modelkeep.arch import names, records

TORCHVISION = names.TORCHVISION
TIMM = names.TIMM
FAMILIES = names.FAMILIES

_registry: dict[str, Callable[..., torch.nn.Module]] = {}
_registry_lock = threading.Lock()
_download_lock = threading.RLock()


def register_factory(
    fn: Callable[..., torch.nn.Module] | str | None = None, *, name: str | None = None
) -> Any:
    """Trust a model builder so that saved models naming it can be loaded.

    Use as ``@register_factory`` (named ``module.qualname``) or ``@register_factory("my.name")``.
    ``modelkeep.create("my.name", **kwargs)`` then builds it, and ``save`` records it.

    Args:
        fn: the builder (a function or class returning a module), or the name to register it
            under when used as ``@register_factory("my.name")``.
        name: the name to register under (default ``fn.__module__ + "." + fn.__qualname__``).

    Returns:
        ``fn`` itself (so it works as a decorator), or a decorator when no builder was given.

    Raises:
        ArchitectureError: ``fn`` is not callable, the name is not a dotted identifier or is in
            the torchvision/timm namespaces, or another builder holds the name.
    """
    if isinstance(fn, str):
        return functools.partial(register_factory, name=fn)
    if fn is None:
        return functools.partial(register_factory, name=name)
    if not callable(fn):
        raise errors.ArchitectureError(
            f"cannot register {type(fn).__name__}: not callable", fix="register a function or class"
        )
    key = name or f"{fn.__module__}.{fn.__qualname__}"
    if not isinstance(key, str) or not records.DOTTED_NAME.fullmatch(key) or names.parse(key).namespace != "python":
        raise errors.ArchitectureError(
            "factory names are dotted Python identifiers outside torchvision.models./timm.",
            item=key,
            fix="pick a name such as 'mylib.tiny_cnn'",
        )
    with _registry_lock:
        existing = _registry.get(key)
        if existing is not None and existing is not fn:
            raise errors.ArchitectureError(
                "a different builder is already registered under this name",
                item=key,
                fix="choose another name, or unregister_factory() the old one first",
            )
        _registry[key] = fn
    return fn


def unregister_factory(name: str) -> None:
    with _registry_lock:
        _registry.pop(name, None)


def registered() -> list[str]:
    with _registry_lock:
        return sorted(_registry)


# --------------------------------------------------------------------------------------------
# torchvision


def torchvision_registry_name(name: str) -> str | None:
    """torchvision's own name (``get_model`` / ``get_model_weights``) of a canonical builder name."""
    return names.torchvision_index()[0].get(name)


def torchvision_names() -> list[str]:
    """Canonical names of every torchvision builder, e.g. ``torchvision.models.vgg16``."""
    return sorted(names.torchvision_index()[0])


def _torchvision_builder(name: str, path: str | None) -> Callable[..., torch.nn.Module]:
    registry_name = names.torchvision_index()[0].get(name)
    if registry_name is None:
        model_class = _torchvision_class(name)
        if model_class is not None:
            return model_class
        raise errors.ArchitectureError(
            "torchvision has no such model builder",
            path=path,
            item=name,
            fix="use a name from torchvision.models.list_models(), e.g. torchvision.models.vgg16 "
            "or torchvision.models.detection.fasterrcnn_resnet50_fpn",
        )
    from torchvision import models

    return models.get_model_builder(registry_name)


def _torchvision_class(name: str) -> type[torch.nn.Module] | None:
    """A model class exported by torchvision.models or one of its families (e.g.
    ``torchvision.models.VisionTransformer``), for configurations no builder names."""
    from torchvision import models

    rest = name[len(TORCHVISION) :].split(".")
    if len(rest) == 2 and rest[0] in FAMILIES:
        namespace = getattr(models, rest[0], None)
    elif len(rest) == 1:
        namespace = models
    else:
        return None
    candidate = getattr(namespace, rest[-1], None) if not rest[-1].startswith("_") else None
    if isinstance(candidate, type) and issubclass(candidate, torch.nn.Module):
        return candidate
    return None


class _SkippedWeights(dict):
    """Stands in for a pretrained state dict whose tensors will come from elsewhere."""


@contextlib.contextmanager
def _weights_named_not_downloaded() -> Iterator[None]:
    """Let torchvision builders see named weights (which shape the architecture) without
    fetching them: ``get_state_dict`` yields a placeholder that ``load_state_dict`` ignores."""
    from torchvision.models import _api

    original_get = _api.WeightsEnum.get_state_dict
    original_load = torch.nn.Module.load_state_dict

    builder = threading.get_ident()

    def get_state_dict(self: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        if threading.get_ident() != builder:  # other threads download as usual
            return original_get(self, *args, **kwargs)
        return _SkippedWeights()

    def load_state_dict(self: torch.nn.Module, state_dict: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(state_dict, _SkippedWeights):
            return torch.nn.modules.module._IncompatibleKeys([], [])
        return original_load(self, state_dict, *args, **kwargs)

    with _download_lock:
        _api.WeightsEnum.get_state_dict = get_state_dict  # type: ignore[method-assign]
        torch.nn.Module.load_state_dict = load_state_dict  # type: ignore[method-assign]
        try:
            yield
        finally:
            _api.WeightsEnum.get_state_dict = original_get  # type: ignore[method-assign]
            torch.nn.Module.load_state_dict = original_load  # type: ignore[method-assign]


def _weights_parameters(builder: Callable[..., Any]) -> dict[str, Any]:
    """The builder's ``weights*`` parameters and their defaults."""
    try:
        parameters = inspect.signature(builder).parameters
    except (TypeError, ValueError):
        return {}
    return {n: p.default for n, p in parameters.items() if n.startswith("weights")}


def weights_name(value: Any) -> Any:
    """``VGG16_Weights.IMAGENET1K_V1`` for a weights enum member; other values unchanged."""
    from enum import Enum

    if isinstance(value, Enum):
        return f"{type(value).__name__}.{value.name}"
    return value


# --------------------------------------------------------------------------------------------
# Resolution


def _is_trusted(name: str, trust: Iterable[str]) -> bool:
    return any(name == t or name.startswith(t + ".") for t in trust)


def resolve(
    name: str, *, trust: Iterable[str] = (), path: str | None = None
) -> Callable[..., torch.nn.Module]:
    """The builder a name (any spelling ``names.parse`` accepts) stands for.

    Args:
        name: the factory name, from a caller or a file.
        trust: module names whose functions may be called.
        path: the file the name came from, for error messages.

    Returns:
        The builder (not called).

    Raises:
        UnsafeContentError: for a name outside every trusted namespace, before anything is imported.
        ArchitectureError: for a trusted name that does not exist.
        FormatError: for a name from a file that is not a factory name at all.
    """
    parsed = names.parse(name, path=path)
    name = parsed.qualified
    with _registry_lock:
        builder = _registry.get(name)
    if builder is not None:
        return builder
    if parsed.namespace == "torchvision":
        return _torchvision_builder(name, path)
    if parsed.namespace == "timm":
        return _timm_builder(name, path)
    trust = (trust,) if isinstance(trust, str) else tuple(trust)  # checked by options.read_options
    if not _is_trusted(name, trust):
        raise errors.UnsafeContentError(
            "the file asks to call a factory that is not trusted; nothing was imported",
            path=path,
            item=name,
            fix="if you trust it: register it with @modelkeep.register_factory before loading, or "
            f"pass trust=({name.rsplit('.', 1)[0]!r},) to modelkeep.load",
        )
    module_name, _, attr = name.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise errors.ArchitectureError(
            f"cannot import trusted module {module_name!r}: {e}", path=path, item=name, fix="install it"
        ) from e
    builder = getattr(module, attr, None)
    if not callable(builder):
        raise errors.ArchitectureError(
            f"{module_name!r} has no callable {attr!r}", path=path, item=name, fix="check the name"
        )
    return builder


def timm_available() -> bool:
    return importlib.util.find_spec("timm") is not None


def _timm_builder(name: str, path: str | None) -> Callable[..., torch.nn.Module]:
    if not timm_available():
        raise errors.ArchitectureError(
            "this model was built with timm, which is not installed",
            path=path,
            item=name,
            fix="pip install timm",
        )
    import timm

    model_name = name[len(TIMM) :]
    if not timm.is_model(model_name.split(".")[0]):
        raise errors.ArchitectureError(
            "timm has no such model", path=path, item=name, fix="check timm.list_models()"
        )
    return functools.partial(timm.create_model, model_name, pretrained=False)


# --------------------------------------------------------------------------------------------
# Calling


def call(
    name: str,
    builder: Callable[..., torch.nn.Module],
    kwargs: dict[str, Any],
    *,
    path: str | None = None,
) -> torch.nn.Module:
    """Call ``builder(**kwargs)``. For torchvision, named weights shape the model but are never
    downloaded, and backbone weights default to none (the tensors come from the file)."""
    kwargs = dict(kwargs)
    named_weights = False
    if name.startswith(TORCHVISION):
        for parameter, default in _weights_parameters(builder).items():
            if parameter not in kwargs and default is not None and default is not inspect.Parameter.empty:
                kwargs[parameter] = None
            named_weights = named_weights or kwargs.get(parameter) is not None
    try:
        if named_weights:
            with _weights_named_not_downloaded():
                model = builder(**kwargs)
        else:
            model = builder(**kwargs)
    except errors.ModelkeepError:
        raise
    except Exception as e:
        raise errors.ArchitectureError(
            f"calling {name}(**{kwargs!r}) failed: {type(e).__name__}: {e}",
            path=path,
            item=name,
            fix="check the keyword arguments",
        ) from e
    if not isinstance(model, torch.nn.Module):
        raise errors.ArchitectureError(
            f"{name} returned {type(model).__name__}, not an nn.Module", path=path, item=name
        )
    return model


def known_names() -> str:
    """A short list of what is trusted, for error messages."""
    extra = registered()
    text = "torchvision.models.* builders"
    if timm_available():
        text += ", timm.* models"
    if extra:
        text += ", registered: " + ", ".join(extra[:8]) + (" ..." if len(extra) > 8 else "")
    return text
