"""Recognising the trusted builder that made a model, so ``save`` records a factory with no hints.

The tutorial builds ``torchvision.models.vgg16(weights=...)`` and then saves the model; that model
never went through ``modelkeep.create``, yet torchvision's own builder made it. ``recognize`` finds
that builder from the model alone:

1. candidates are the builders registered by torchvision (and timm, when installed) whose return
   type is exactly the model's class (``vgg11`` ... ``vgg19_bn`` for a ``VGG``);
2. each candidate is built on the meta device (nothing allocated or initialised) with its default
   arguments; where only sizes differ by one value (``num_classes=10`` turns the default 1000 into
   10), the class's integer arguments whose default is that value are tried with the model's
   value; where only settings differ (an ``Inception3`` built for pretrained weights has
   ``transform_input=True``), each of the builder's named weights is tried;
3. a candidate matches when the rebuilt model has the same parameter and buffer names and shapes,
   submodule classes and settings (``verify.check_same_structure``).

Exactly one matching builder is recorded (its first matching arguments); none or several is
``None``, and ``save`` then refuses with the list of options.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import inspect
import typing
import warnings
from typing import Any, Callable, Iterator

import torch

from modelkeep import errors
from modelkeep.arch import factories, names, rebuild, verify

Builder = Callable[..., torch.nn.Module]


@dataclasses.dataclass(frozen=True)
class Recognized:
    """The builder that rebuilds a model: its qualified name and the keyword arguments."""

    factory: str
    kwargs: dict[str, Any]

    def recipe(self) -> dict[str, Any]:
        """The ``{"factory": ..., "kwargs": ...}`` form ``save(factory=...)`` takes."""
        return {"factory": self.factory, "kwargs": dict(self.kwargs)}


def _return_class(builder: Builder) -> Any:
    try:
        return typing.get_type_hints(builder).get("return")
    except Exception:  # an annotation that does not resolve: not a candidate
        return None


@functools.lru_cache(maxsize=1)
def _torchvision_by_class() -> dict[type, list[str]]:
    """``{model class: [qualified builder names]}`` for every torchvision builder."""
    from torchvision import models

    by_class: dict[type, list[str]] = collections.defaultdict(list)
    for qualified, registry_name in sorted(names.torchvision_index()[0].items()):
        cls = _return_class(models.get_model_builder(registry_name))
        if isinstance(cls, type):
            by_class[cls].append(qualified)
    return dict(by_class)


@functools.lru_cache(maxsize=1)
def _timm_by_class() -> dict[type, list[str]]:
    """``{model class: [qualified names]}`` for every timm model whose entrypoint names its class."""
    import timm
    from timm.models import model_entrypoint

    by_class: dict[type, list[str]] = collections.defaultdict(list)
    for model_name in timm.list_models():
        cls = _return_class(model_entrypoint(model_name))
        if isinstance(cls, type):
            by_class[cls].append(names.TIMM + model_name)
    return dict(by_class)


def candidates(model: torch.nn.Module) -> list[str]:
    """Qualified names of the trusted builders whose return type is exactly ``type(model)``."""
    cls = type(model)
    module = cls.__module__
    if module.startswith("torchvision.models"):
        return list(_torchvision_by_class().get(cls, []))
    if module.startswith("timm.") and factories.timm_available():
        return list(_timm_by_class().get(cls, []))
    return []


def _build(name: str, builder: Builder, kwargs: dict[str, Any]) -> torch.nn.Module:
    """A candidate on the meta device; its builder's warnings (about initialisation a meta
    build skips anyway) are not the user's business."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return rebuild.construct(lambda: factories.call(name, builder, kwargs), expected=None, what=name)


def _size_overrides(
    model: torch.nn.Module, default: torch.nn.Module, builder: Builder
) -> Iterator[dict[str, Any]]:
    """Arguments that would turn ``default``'s sizes into ``model``'s: where every differing
    dimension is the same pair (default value d, model value n), each integer argument of the
    model's class (or the builder) whose default is d, set to n."""
    ours, theirs = verify.shapes_of(model), verify.shapes_of(default)
    if set(ours) != set(theirs):
        return
    pairs = set()
    for name, shape in ours.items():
        other = theirs[name]
        if len(shape) != len(other):
            return
        pairs.update((d, n) for n, d in zip(shape, other) if n != d)
    if len(pairs) != 1:
        return
    ((was, now),) = pairs
    seen = set()
    for function in (builder, type(model).__init__):
        try:
            parameters = inspect.signature(function).parameters.values()
        except (TypeError, ValueError):
            continue
        for parameter in parameters:
            if (
                parameter.name not in seen
                and type(parameter.default) is int
                and parameter.default == was
            ):
                seen.add(parameter.name)
                yield {parameter.name: now}


def _weights_options(name: str, builder: Builder) -> Iterator[dict[str, Any]]:
    """``{"weights": "<Enum>.<member>"}`` for each named weights of a torchvision builder."""
    if not name.startswith(names.TORCHVISION):
        return
    from torchvision import models

    registry_name = factories.torchvision_registry_name(name)
    if registry_name is None:
        return
    try:
        enum = models.get_model_weights(registry_name)
    except Exception:  # a builder without named weights
        return
    for member in enum:
        yield {"weights": factories.weights_name(member)}


def _matches(model: torch.nn.Module, rebuilt: torch.nn.Module, name: str) -> bool:
    try:
        verify.check_same_structure(model, rebuilt, what=name)
    except errors.ArchitectureError:
        return False
    return True


def match(model: torch.nn.Module, name: str) -> Recognized | None:
    """The first arguments with which the builder ``name`` rebuilds ``model``, or None."""
    builder = factories.resolve(name)
    try:
        default = _build(name, builder, {})
    except errors.ModelkeepError:
        return None
    if _matches(model, default, name):
        return Recognized(name, {})
    tried: list[dict[str, Any]] = list(_size_overrides(model, default, builder))
    if verify.shapes_of(model) == verify.shapes_of(default):
        tried += list(_weights_options(name, builder))
    for kwargs in tried:
        try:
            rebuilt = _build(name, builder, kwargs)
        except errors.ModelkeepError:
            continue
        if _matches(model, rebuilt, name):
            return Recognized(name, kwargs)
    return None


def recognize(model: torch.nn.Module) -> tuple[Recognized | None, list[Recognized]]:
    """The one trusted builder that rebuilds ``model``, and every builder that does.

    Args:
        model: a module, typically built by torchvision's or timm's own builders.

    Returns:
        ``(recognized, matches)``: ``recognized`` is the single match (None when no builder or
        several builders rebuild the model); ``matches`` lists every match, for messages.

    Example:
        >>> import torchvision
        >>> found, _ = recognize(torchvision.models.vgg16(num_classes=10))
        >>> found.factory, found.kwargs
        ('torchvision.models.vgg16', {'num_classes': 10})
    """
    found = [m for m in (match(model, name) for name in candidates(model)) if m is not None]
    return (found[0] if len(found) == 1 else None), found
