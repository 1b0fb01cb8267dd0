"""``create``: a model from a trusted factory, optionally with named pretrained weights.

The tutorial's ``torchvision.models.vgg16(weights="IMAGENET1K_V1")``, the modelkeep way: the
factory name is parsed once (``arch.names``), the weights come from a file, the hub cache or a
download and are read without unpickling (``pretrained``), and the model remembers how it was
built, so ``modelkeep.save`` records it with no hints.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import torch

from modelkeep import errors, models
from modelkeep.arch import factories, names, rebuild, records
from modelkeep.inference import spec as spec_module


def create(
    name: str,
    *,
    weights: Any = None,
    weights_file: str | os.PathLike[str] | None = None,
    storage_options: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> torch.nn.Module:
    """Build a model from a trusted factory and remember the recipe, so ``save`` needs no hints.

    Args:
        name: any spelling ``modelkeep.arch.names.parse`` accepts: ``"torchvision:vgg16"``,
            ``"torchvision.models.vgg16"``, ``"timm:resnet18"`` or a registered name.
        weights: named pretrained weights (``"IMAGENET1K_V1"``), loaded with their inference spec
            instead of a random init.
        weights_file: where those weights' checkpoint is (a path or an fsspec URL); by default
            the modelkeep cache, torch's hub cache, or a download.
        storage_options: for the fsspec file system of a ``weights_file`` URL.
        **kwargs: the factory's own arguments.

    Returns:
        The module (in eval() when weights were loaded), remembering how it was built.

    Raises:
        ArchitectureError: unknown factory or weights, or weights that do not fit.
        IntegrityError: the checkpoint's sha256 does not match its name.
        StorageError: the weights cannot be read or downloaded.
    """
    canonical = names.parse(name).qualified
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
    if weights_file is not None and weights is None:
        raise errors.ArchitectureError(
            "weights_file names where named weights come from, but no weights were named",
            item="weights_file", fix="pass weights='IMAGENET1K_V1' (or the name the file holds) too",
        )
    call_kwargs = dict(kwargs)
    weights_label = None
    if weights is not None:
        from modelkeep import pretrained  # first use only: keeps ``import modelkeep`` light

        registered_only = pretrained.registered_only(canonical, weights)
        weights_label = str(weights) if registered_only else _weights_label(canonical, weights)
        if canonical.startswith(factories.TORCHVISION) and not registered_only:
            call_kwargs["weights"] = weights_label
        model = rebuild.construct(
            lambda: factories.call(canonical, builder, call_kwargs), expected=None, what=canonical
        )
        short = weights_label if registered_only else weights_label.rsplit(".", 1)[-1]
        spec = pretrained.load_named_weights(
            model, factory=canonical, weights=short, path=weights_file, storage_options=storage_options,
        )
        left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
        if left:
            raise errors.ArchitectureError(
                f"named weights {weights_label} left {len(left)} tensors unfilled: {left[:5]}",
                item=canonical,
                fix="the weights do not match this architecture",
            )
        spec_module.attach(model, spec or None)  # {}: the weights record no spec
    else:
        model = factories.call(canonical, builder, call_kwargs)
    try:
        encoded = {k: records.encode_value(v, item=f"kwargs.{k}") for k, v in call_kwargs.items()}
        recipe: dict[str, Any] = {"factory": canonical, "kwargs": encoded}
    except errors.ArchitectureError as e:
        recipe = {"factory": canonical, "error": str(e)}
    object.__setattr__(model, models.RECIPE_ATTR, recipe)
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
