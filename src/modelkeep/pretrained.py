"""Named pretrained weights: ``create("torchvision:vgg16", weights="IMAGENET1K_V1")``.

A name resolves to a weights entry (torchvision's weights enums, or entries registered with
``register_weights``): the checkpoint's URL, the sha256 prefix in its file name, and the
inference spec (preprocessing and labels). The checkpoint is taken from a file the caller names,
from torch's hub cache, or downloaded (``download``); its hash is checked, it is read with
modelkeep's safe reader (never unpickled), and it is cached in modelkeep format, so every later
load is a plain, fast, pickle-free read straight into the model.

Environment: ``MODELKEEP_CACHE`` (cache folder, default ``~/.cache/modelkeep``),
``MODELKEEP_WEIGHTS_MIRROR`` (a base URL that replaces the folder of every weights URL).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
from typing import Any, Iterator, Mapping

import torch

from modelkeep import api, download, errors, hashing, reading
from modelkeep import storage
from modelkeep.sources import torchsave
from modelkeep.sources.safetensors import named_entries
from modelkeep.arch import names

CACHE_ENV = "MODELKEEP_CACHE"
MIRROR_ENV = "MODELKEEP_WEIGHTS_MIRROR"
HASH_REGEX = re.compile(r"-([a-f0-9]*)\.")  # torch.hub's convention: name-<sha256 prefix>.ext
DROPPABLE_PREFIXES = ("aux1.", "aux2.", "AuxLogits.")  # auxiliary heads builders drop after loading
_DENSENET_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$"
)


@dataclasses.dataclass(frozen=True)
class WeightsEntry:
    """Where a named checkpoint lives and what it means."""

    factory: str  # e.g. "torchvision.models.vgg16"
    name: str  # e.g. "IMAGENET1K_V1"
    url: str
    inference: Mapping[str, Any] | None = None
    kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def file_name(self) -> str:
        return self.url.rstrip("/").rsplit("/", 1)[-1].split("?", 1)[0]

    @property
    def hash_prefix(self) -> str | None:
        match = HASH_REGEX.search(self.file_name)
        return match.group(1) if match else None

    @property
    def download_url(self) -> str:
        """The URL fetched: the entry's own, or the same file name under the configured mirror."""
        mirror = os.environ.get(MIRROR_ENV)
        if mirror:
            return mirror.rstrip("/") + "/" + self.file_name
        return self.url

    @property
    def cache_name(self) -> str:
        stem = self.file_name.rsplit(".", 1)[0] if "." in self.file_name else self.file_name
        return f"{stem}.safetensors"


_REGISTRY: dict[tuple[str, str], WeightsEntry] = {}


def register_weights(
    factory: str,
    name: str,
    *,
    url: str,
    inference: Any = None,
    kwargs: Mapping[str, Any] | None = None,
) -> WeightsEntry:
    """Make ``create(factory, weights=name)`` fetch the checkpoint at ``url``.

    Name the file ``<anything>-<sha256 prefix>.<ext>`` to have its hash checked, as torch.hub does.
    ``inference`` (an InferenceSpec or its dict) is recorded with models built from it.

    Args:
        factory: the builder, in any spelling ``modelkeep.arch.names.parse`` accepts (entries are
            keyed on the qualified name, as ``create`` looks them up).
        name: the weights' name, as passed to ``create(factory, weights=name)``.
        url: where the checkpoint is downloaded from.
        inference: an InferenceSpec or its JSON dict, or None.
        kwargs: constructor arguments the weights need (``num_classes``, ...).

    Returns:
        The registered entry.

    Raises:
        ArchitectureError: for a factory name no spelling fits.
        UnsupportedValueError: for an invalid inference spec.
    """
    from modelkeep.inference import spec as spec_module

    spec = spec_module.coerce(inference)
    entry = WeightsEntry(
        names.parse(factory).qualified,
        name,
        url,
        spec.to_json() if spec is not None else None,
        dict(kwargs or {}),
    )
    _REGISTRY[(entry.factory, name)] = entry
    return entry


def registered_only(factory: str, weights: Any) -> bool:
    """Whether ``weights`` were registered for ``factory`` under a name torchvision's own weights
    enum lacks (so a torchvision builder must not be passed ``weights=``).

    Args:
        factory: the builder's name, in any spelling ``names.parse`` accepts.
        weights: the weights' name.

    Returns:
        True for a registered name that is not also a torchvision weights name.
    """
    parsed = names.parse(factory)
    if not isinstance(weights, str) or (parsed.qualified, weights) not in _REGISTRY:
        return False
    if parsed.namespace != "torchvision":
        return True
    import torchvision

    try:
        torchvision.models.get_model_weights(parsed.name).verify(weights)
    except (KeyError, ValueError, TypeError):
        return True
    return False


def _torchvision_kwargs(builder: str, weights: Any) -> dict[str, Any]:
    """The constructor arguments torchvision's builder sets when it loads these weights."""
    kwargs: dict[str, Any] = {}
    categories = weights.meta.get("categories")
    if categories:
        kwargs["num_classes"] = len(categories)
    if builder in ("googlenet", "inception_v3"):
        kwargs["transform_input"] = True
    if builder.startswith("vit_") and weights.meta.get("min_size"):
        kwargs["image_size"] = int(weights.meta["min_size"][0])
    return kwargs


def resolve(factory: str, weights: str) -> WeightsEntry:
    """The entry for ``weights`` of ``factory``: registered ones first, then torchvision's enums.

    ``weights`` may be a name (``"IMAGENET1K_V1"``), ``"DEFAULT"``, or the enum's full name
    (``"VGG16_Weights.IMAGENET1K_V1"``).
    """
    parsed = names.parse(factory)
    factory = parsed.qualified
    if (factory, weights) in _REGISTRY:
        return _REGISTRY[(factory, weights)]
    builder = parsed.name if parsed.namespace == "torchvision" else None
    if builder is None:
        known = sorted(f"{f}:{n}" for f, n in _REGISTRY)
        raise errors.ArchitectureError(
            "no named weights are known for this factory",
            item=f"{factory}:{weights}",
            fix="use a torchvision model, or register_weights(...) first"
            + (f"; registered: {', '.join(known)}" if known else ""),
        )
    import torchvision

    try:
        enum = torchvision.models.get_model_weights(builder)
    except (ValueError, KeyError) as e:
        raise errors.ArchitectureError(
            "torchvision has no weights for this builder",
            item=factory,
            fix="check the model name against torchvision.models.list_models()",
        ) from e
    short = weights.split(".", 1)[1] if weights.startswith(enum.__name__ + ".") else weights
    try:
        member = enum[short]
    except KeyError as e:
        known = ", ".join(["DEFAULT", *(m.name for m in enum)])
        raise errors.ArchitectureError(
            f"{enum.__name__} has no weights named {weights!r}",
            item=f"{factory}:{weights}",
            fix=f"use one of {known}",
        ) from e
    from modelkeep.inference import spec as spec_module

    inference = spec_module.from_torchvision(member).to_json()
    return WeightsEntry(factory, member.name, member.url, inference, _torchvision_kwargs(builder, member))


def builder_kwargs(factory: str, weights: str) -> dict[str, Any]:
    """Constructor arguments a model needs so these weights fit it (``num_classes``, ...)."""
    return dict(resolve(factory, weights).kwargs)


# --------------------------------------------------------------------------------------------
# Where checkpoints are


def cache_dir() -> str:
    configured = os.environ.get(CACHE_ENV)
    if configured:
        return os.path.abspath(os.path.expanduser(configured))
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "modelkeep")


def cached_path(entry: WeightsEntry) -> str:
    """Where the modelkeep copy of the entry's checkpoint is (or will be) kept."""
    return os.path.join(cache_dir(), "weights", entry.cache_name)


def hub_cache_file(entry: WeightsEntry) -> str | None:
    """torch.hub's downloaded copy of the checkpoint, when one exists."""
    candidate = os.path.join(torch.hub.get_dir(), "checkpoints", entry.file_name)
    return candidate if os.path.isfile(candidate) else None


def local_source(factory: str, weights: str, path: str | os.PathLike[str] | None = None) -> str | None:
    """The local file that would be used for these weights without a download, or None."""
    entry = resolve(factory, weights)
    if path is not None:
        return os.fspath(path) if os.path.isfile(path) else None
    cached = cached_path(entry)
    if os.path.isfile(cached):
        return cached
    return hub_cache_file(entry)


def check_hash(path: str, entry: WeightsEntry, *, source: str) -> str:
    """The file's sha256, or an IntegrityError when it does not start with the entry's prefix."""
    digest = hashing.file_sha256(path)
    prefix = entry.hash_prefix
    if prefix and not digest.startswith(prefix):
        raise errors.IntegrityError(
            f"sha256 {digest[:16]}... does not start with {prefix!r} as {entry.file_name} requires",
            path=path,
            item=f"{entry.factory}:{entry.name}",
            fix=f"the {source} is damaged or is another file: delete it and load again",
        )
    return digest


# --------------------------------------------------------------------------------------------
# Fetching and caching


@contextlib.contextmanager
def _locked(path: str) -> Iterator[None]:
    """One process at a time fetches and converts a given checkpoint."""
    import fcntl

    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".lock", "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _fit_keys(state: dict[str, torch.Tensor], factory: str) -> dict[str, torch.Tensor]:
    """Key renames torchvision's builders apply when loading old checkpoints (densenet)."""
    if not factory.rsplit(".", 1)[-1].startswith("densenet"):
        return state
    fitted = {}
    for key, value in state.items():
        match = _DENSENET_KEY.match(key)
        fitted[match.group(1) + match.group(2) if match else key] = value
    return fitted


def _convert(source: str, destination: str, entry: WeightsEntry, digest: str | None) -> None:
    """Read a checkpoint safely and write it as a modelkeep weights file."""
    state = api.load_state_dict(source)
    state = _fit_keys(state, entry.factory)
    metadata = {"weights": f"{entry.factory}:{entry.name}", "source_url": entry.url}
    if digest is not None:
        metadata["source_sha256"] = digest
    api.save_weights(state, destination, metadata=metadata)


def fetch(
    entry: WeightsEntry,
    path: str | os.PathLike[str] | None = None,
    *,
    progress: bool = True,
    timeout: float | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> str:
    """The modelkeep copy of the entry's checkpoint, made from ``path``, the hub cache or a download.

    ``path`` may be an fsspec URL (with ``storage_options``): its bytes are copied, checked and
    converted into the cache like a download's.
    """
    cached = cached_path(entry)
    if path is None and os.path.isfile(cached):
        return cached
    with _locked(cached):
        if path is None and os.path.isfile(cached):  # another process made it meanwhile
            return cached
        if path is not None and storage.is_url(os.fspath(path)):
            store, where = storage.resolve(path, storage_options)
            with torchsave.local_copy(store, where) as local:
                _convert(local, cached, entry, check_hash(local, entry, source="file given as URL"))
            return cached
        if path is not None:
            source = os.fspath(path)
            if not os.path.isfile(source):
                raise errors.MissingFileError("no such file", path=source, fix="check the weights path")
            if reading.open_source(source).kind == "safetensors":
                return source  # already in the safe format: read it in place
            _convert(source, cached, entry, check_hash(source, entry, source="file given as path"))
            return cached
        hub = hub_cache_file(entry)
        if hub is not None:
            _convert(hub, cached, entry, check_hash(hub, entry, source="torch hub cache file"))
            return cached
        downloads = os.path.join(cache_dir(), "downloads")
        os.makedirs(downloads, exist_ok=True)
        target = os.path.join(downloads, entry.file_name)
        try:
            fetched = download.download(
                entry.download_url,
                target,
                hash_prefix=entry.hash_prefix,
                progress=progress,
                timeout=timeout if timeout is not None else download.DEFAULT_TIMEOUT,
            )
        except errors.StorageError as e:  # offline: say where a copy of the file can come from
            e.fix = (
                f"{e.fix}; or get {entry.file_name} elsewhere and pass it as weights_file=PATH, or put "
                f"it in {os.path.join(torch.hub.get_dir(), 'checkpoints')} (torch's hub cache)"
            )
            e.args = (e._message(),)
            raise
        try:
            _convert(fetched.path, cached, entry, fetched.sha256)
        finally:
            with contextlib.suppress(OSError):
                os.unlink(fetched.path)
    return cached


def _check_fits(model: torch.nn.Module, file: str, entry: WeightsEntry) -> None:
    """Refuse before any byte moves when the checkpoint cannot fill the model."""
    shapes = {name: e.shape for name, e in named_entries(reading.read_header(file)).items()}
    problems = []
    for name, tensor in model.state_dict().items():
        if name not in shapes:
            if not name.endswith("num_batches_tracked"):
                problems.append(f"  missing in checkpoint: {name}")
        elif tuple(tensor.shape) != shapes[name]:
            problems.append(f"  shape differs: {name}: checkpoint {list(shapes[name])}, model {list(tensor.shape)}")
    model_names = set(model.state_dict())
    for name in shapes:
        if name not in model_names and not name.startswith(DROPPABLE_PREFIXES):
            problems.append(f"  not in model: {name}")
    if problems:
        hint = ", ".join(f"{k}={v!r}" for k, v in entry.kwargs.items())
        raise errors.KeyMismatchError(
            f"{len(problems)} differences between model and checkpoint:\n" + "\n".join(problems[:40]) + "\n",
            path=file,
            item=f"{entry.factory}:{entry.name}",
            fix=f"build the model with the arguments these weights need ({hint})"
            if hint
            else "build the model these weights were made for",
        )


def load_named_weights(
    model: torch.nn.Module,
    *,
    factory: str,
    weights: str,
    path: str | os.PathLike[str] | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Load the named weights into ``model`` (left in eval()); return their inference-spec dict.

    The dict is empty when the entry records no spec. A model on the meta device is
    materialised without random init.
    """
    entry = resolve(factory, weights)
    file = fetch(entry, path, storage_options=storage_options)
    _check_fits(model, file, entry)
    had_meta = any(t.is_meta for t in model.state_dict().values())
    api.load_weights(model, file, strict=False)
    if had_meta:  # counters the checkpoint leaves out would hold uninitialised memory
        stored = reading.read_header(file).entries
        with torch.no_grad():
            for name, buffer in model.named_buffers():
                if name.endswith("num_batches_tracked") and name not in stored:
                    buffer.zero_()
    return dict(entry.inference or {})
