"""Factory names: every spelling a caller or a file may use, parsed in one place.

``create``, named weights (``register_weights``, ``pretrained.resolve``), the factory registry and
the architecture record all name builders; they agree because they all call ``parse`` and key on
``FactoryName.qualified``. (Two normalisers used to disagree on torchvision's detection models, so
weights registered for ``torchvision:fasterrcnn_mobilenet_v3_large_320_fpn`` were not found.)

Parsing is pure spelling: it never imports anything but torchvision's model index (to place a
builder in its family), and it does not check that the builder exists; ``factories.resolve`` does.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any

from modelkeep import errors
from modelkeep.arch import records

TORCHVISION = "torchvision.models."
TIMM = "timm."
FAMILIES = ("detection", "segmentation", "video", "optical_flow", "quantization")
SHORT_PREFIXES = {"torchvision:": "torchvision", "timm:": "timm"}
NAMESPACES = ("torchvision", "timm", "python")
_TIMM_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*")
_TORCHVISION_REST = re.compile(r"(?:(?:" + "|".join(FAMILIES) + r")\.)?[A-Za-z_][A-Za-z0-9_]*")


@dataclasses.dataclass(frozen=True)
class FactoryName:
    """A parsed factory name.

    Attributes:
        namespace: ``"torchvision"``, ``"timm"`` or ``"python"`` (a registered builder, or a
            ``module.function`` under a trusted module).
        name: the namespace's own name: torchvision's registry name for a builder
            (``"quantized_resnet18"``, what ``torchvision.models.get_model`` takes) or the class
            path under ``torchvision.models`` for a model class (``"VisionTransformer"``); timm's
            model name (``"resnet18"``, ``"vit_base_patch16_224.augreg_in21k"``); the dotted name
            itself for ``python``.
        qualified: the one spelling recorded in files and used as a key everywhere
            (``"torchvision.models.detection.fasterrcnn_resnet50_fpn"``, ``"timm.resnet18"``,
            ``"mylib.tiny_cnn"``).
    """

    namespace: str
    name: str
    qualified: str

    def __str__(self) -> str:
        return self.qualified


@functools.lru_cache(maxsize=1)
def torchvision_index() -> tuple[dict[str, str], dict[str, str]]:
    """``{qualified name: torchvision registry name}`` and the reverse, for every builder.

    Returns:
        Two dicts; both empty when torchvision is not installed.
    """
    try:
        from torchvision import models
    except ImportError:
        return {}, {}
    by_qualified: dict[str, str] = {}
    for registry_name in models.list_models():
        builder = models.get_model_builder(registry_name)
        parts = builder.__module__.split(".")
        family = parts[2] if len(parts) > 3 and parts[2] in FAMILIES else None
        by_qualified[TORCHVISION + (f"{family}." if family else "") + builder.__name__] = registry_name
    return by_qualified, {v: k for k, v in by_qualified.items()}


def _bad(name: Any, what: str, path: str | None) -> errors.ModelkeepError:
    if path is not None:  # the name came from a file
        return records.bad_record(path, f"factory name {name!r} {what}", "factory")
    return errors.ArchitectureError(
        f"factory name {what}",
        item=repr(name),
        fix="use 'torchvision:vgg16', 'torchvision.models.vgg16', 'timm:resnet18', 'timm.resnet18' "
        "or a registered name such as 'mylib.tiny_cnn'",
    )


def parse(name: Any, *, path: str | None = None) -> FactoryName:
    """Parse every accepted spelling of a factory name into one ``FactoryName``.

    Accepted spellings (``qualified`` after the arrow):

    - ``"torchvision:vgg16"``, ``"torchvision.models.vgg16"`` -> ``torchvision.models.vgg16``
    - a registry name of another family, in either form: ``"torchvision:fasterrcnn_resnet50_fpn"``,
      ``"torchvision.models.fasterrcnn_resnet50_fpn"`` ->
      ``torchvision.models.detection.fasterrcnn_resnet50_fpn``; ``"torchvision:quantized_resnet18"``
      -> ``torchvision.models.quantization.resnet18``; ``"torchvision:raft_small"`` ->
      ``torchvision.models.optical_flow.raft_small``
    - the family spelled out: ``"torchvision:detection.fasterrcnn_resnet50_fpn"``,
      ``"torchvision.models.detection.fasterrcnn_resnet50_fpn"`` -> unchanged
    - a model class: ``"torchvision.models.VisionTransformer"``,
      ``"torchvision:detection.FasterRCNN"`` -> ``torchvision.models[.family].<Class>``
    - ``"timm:resnet18"``, ``"timm.resnet18"`` -> ``timm.resnet18`` (timm names may hold ``.``
      and ``-``: ``"timm:vit_base_patch16_224.augreg_in21k"``)
    - any other dotted Python name, bare or not (``"mylib.tiny_cnn"``, ``"tiny"``) -> unchanged,
      namespace ``python``: a builder registered with ``register_factory`` or a function under a
      module passed in ``trust``. A bare ``"vgg16"`` is therefore a registered name, never
      torchvision's builder: spell the namespace.

    Args:
        name: the name as given.
        path: the file the name was read from, if any (changes the error type).

    Returns:
        The parsed name.

    Raises:
        ArchitectureError: for a name that is not a string or fits no spelling above, when
            ``path`` is None.
        FormatError: for the same, naming ``path``, when the name came from a file.
    """
    if not isinstance(name, str):
        raise _bad(name, f"must be a string, not {type(name).__name__}", path)
    namespace, rest = None, name
    for short, space in SHORT_PREFIXES.items():
        if name.startswith(short):
            namespace, rest = space, name[len(short) :]
    if namespace is None and name.startswith(TORCHVISION):
        namespace, rest = "torchvision", name[len(TORCHVISION) :]
    elif namespace is None and name.startswith(TIMM):
        namespace, rest = "timm", name[len(TIMM) :]
    if namespace == "torchvision":
        return _torchvision(name, rest, path)
    if namespace == "timm":
        if not _TIMM_NAME.fullmatch(rest):
            raise _bad(name, "is not a timm model name (letters, digits, '_', '.', '-')", path)
        return FactoryName("timm", rest, TIMM + rest)
    if not records.DOTTED_NAME.fullmatch(name):
        raise _bad(name, "is not 'torchvision:<name>', 'timm:<name>' or a dotted Python name", path)
    return FactoryName("python", name, name)


def _torchvision(name: str, rest: str, path: str | None) -> FactoryName:
    if not _TORCHVISION_REST.fullmatch(rest):
        raise _bad(name, "is not a torchvision model name ('vgg16', 'detection.fasterrcnn_resnet50_fpn')", path)
    by_qualified, by_registry = torchvision_index()
    qualified = TORCHVISION + rest
    if qualified in by_qualified:
        return FactoryName("torchvision", by_qualified[qualified], qualified)
    if rest in by_registry:
        return FactoryName("torchvision", rest, by_registry[rest])
    return FactoryName("torchvision", rest, qualified)  # a model class, or no such builder
