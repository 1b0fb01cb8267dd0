"""Format conversion: any file modelkeep reads, into a modelkeep file or a sharded set of them.

Sharded output follows the layout Hugging Face tools read: ``NAME-00001-of-0000N.safetensors``
files plus ``NAME.safetensors.index.json`` with ``{"metadata": {"total_size": N}, "weight_map":
{tensor: file}}``. Tied tensors stay in one shard and keep their alias record there.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Mapping

import torch

from modelkeep import api, errors, options, reading, storage, weights

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)\s*$", re.IGNORECASE)
_PREFIXES = "kmgt"


def parse_size(text: str) -> int:
    """``"5GB"`` -> 5e9, ``"500MiB"`` -> 500 * 2**20, ``"1000"`` -> 1000 bytes."""
    match = _SIZE.match(text)
    if not match:
        raise errors.UnsupportedValueError(
            f"cannot read size {text!r}", item="shard size", fix="write it like 5GB, 500MB or 2GiB"
        )
    number, unit = float(match.group(1)), match.group(2).lower()
    power = _PREFIXES.index(unit[0]) + 1 if unit[:1] and unit[0] in _PREFIXES else 0
    factor = 1024**power if "i" in unit else 1000**power
    size = int(number * factor)
    if size <= 0:
        raise errors.UnsupportedValueError(
            "shard size must be positive", item="shard size", fix="give a size such as 5GB"
        )
    return size


@dataclasses.dataclass
class ConvertReport:
    """What ``convert`` wrote; ``left_out`` names a checkpoint's entries that are not weights
    (optimizer state, epoch, args): ``modelkeep.read(src)`` or
    ``Checkpointer.import_torch_checkpoint(src)`` keeps them."""

    source: str
    outputs: list[str]
    tensors: int
    bytes: int
    verified: bool | None = None
    left_out: list[str] = dataclasses.field(default_factory=list)


def convert(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    shard_size: int | str | None = None,
    verify: bool = False,
    metadata: Mapping[str, str] | None = None,
    trust: tuple[str, ...] | str = (),
    on_unknown: str = "error",
    storage_options: Mapping[str, Any] | None = None,
) -> ConvertReport:
    """Rewrite ``src`` as a modelkeep weights file at ``dst`` (or shards beside ``dst``).

    Any file modelkeep reads works as ``src`` (a checkpoint contributes its model weights). Tied
    tensors stay stored once; every tensor gets its digest.

    Args:
        src: the file, folder or shard index to read: a local path or an fsspec URL.
        dst: the weights file to write (shards and an index beside it with ``shard_size``).
        shard_size: bytes per shard (an int or text like ``"5GB"``); one file when None.
        verify: read the outputs back and compare every tensor bit for bit.
        metadata: extra ``{str: str}`` for each header.
        trust: classes of a torch.save source that may be rebuilt (see ``modelkeep.read``).
        on_unknown: ``"placeholder"`` rescues the weights of a torch.save file that names other
            classes (kept inert, never run); ``"error"`` (default) refuses it.
        storage_options: for the fsspec file system of URLs (``src`` and ``dst``).

    Returns:
        A ConvertReport: outputs written, tensor count, bytes, verification result, and the
        entries of a training checkpoint that are not weights (``left_out``).

    Raises:
        UnsupportedValueError: ``src`` and ``dst`` are the same, or an argument is invalid.
        IntegrityError: ``verify`` found a difference.
        FormatError, StorageError: reading or writing failed (``dst`` is untouched on failure).
    """
    src, dst = os.fspath(src), os.fspath(dst)
    if not storage.is_url(src) and not storage.is_url(dst) and os.path.abspath(src) == os.path.abspath(dst):
        raise errors.UnsupportedValueError(
            "source and destination are the same file", path=src, fix="choose another destination"
        )
    if src == dst:
        raise errors.UnsupportedValueError(
            "source and destination are the same file", path=src, fix="choose another destination"
        )
    source = reading.open_source(src, options.read_options(trust, on_unknown), storage_options=storage_options)
    tensors = source.tensors()
    store, dst = storage.resolve(dst, storage_options)
    stored, aliases = weights.split_aliases(weights.state_dict_of(tensors))
    user = weights.check_user_metadata(metadata)
    limit = parse_size(shard_size) if isinstance(shard_size, str) else shard_size
    total = sum(t.numel() * t.element_size() for _, t in stored)
    if limit is None or total <= limit:
        outputs = [_write(store, dst, stored, aliases, user)]
    else:
        outputs = _write_shards(store, dst, stored, aliases, user, limit, total)
    report = ConvertReport(source=src, outputs=outputs, tensors=len(tensors), bytes=total,
                           left_out=list(getattr(source, "left_out", [])))
    if verify:
        report.verified = verify_conversion(tensors, outputs, storage_options=storage_options)
        if not report.verified:
            raise errors.IntegrityError(
                "converted tensors differ from the source",
                path=dst,
                fix="report this as a modelkeep bug; the source file is unchanged",
            )
    return report


def _write(
    store: storage.Storage, path: str, stored: list[tuple[str, torch.Tensor]], aliases: dict[str, str], user: dict[str, str]
) -> str:
    metadata = dict(user)
    metadata.update(weights.modelkeep_metadata("weights", aliases))
    store.write_tensor_file(path, stored, metadata)
    return path


def shard_names(dst: str, count: int, store: storage.Storage = storage.LOCAL) -> tuple[list[str], str]:
    """Shard file paths and the index path for a destination like ``out/model.safetensors``."""
    folder, name = store.parent(dst), dst[len(store.parent(dst)):].lstrip("/")
    stem = name[: -len(".safetensors")] if name.endswith(".safetensors") else name
    shards = [store.join(folder, f"{stem}-{i:05d}-of-{count:05d}.safetensors") for i in range(1, count + 1)]
    return shards, store.join(folder, f"{stem}.safetensors.index.json")


def _write_shards(
    store: storage.Storage,
    dst: str,
    stored: list[tuple[str, torch.Tensor]],
    aliases: dict[str, str],
    user: dict[str, str],
    limit: int,
    total: int,
) -> list[str]:
    groups: list[list[tuple[str, torch.Tensor]]] = [[]]
    used = 0
    for name, tensor in stored:
        size = tensor.numel() * tensor.element_size()
        if groups[-1] and used + size > limit:
            groups.append([])
            used = 0
        groups[-1].append((name, tensor))
        used += size
    paths, index_path = shard_names(dst, len(groups), store)
    weight_map: dict[str, str] = {}
    for path, group in zip(paths, groups):
        names = {name for name, _ in group}
        shard_aliases = {a: t for a, t in aliases.items() if t in names}
        _write(store, path, group, shard_aliases, user)
        for name in [*names, *shard_aliases]:
            weight_map[name] = path.rsplit("/", 1)[-1]
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    storage.write_bytes(store, index_path, json.dumps(index, indent=2).encode("utf-8"))
    return [*paths, index_path]


def verify_conversion(
    expected: Mapping[str, torch.Tensor], outputs: list[str], *, storage_options: Mapping[str, Any] | None = None
) -> bool:
    """Read every output back and compare each tensor bit for bit with the source."""
    seen: dict[str, torch.Tensor] = {}
    for path in outputs:
        if path.endswith(".json"):
            continue
        seen.update(api.load_state_dict(path, storage_options=storage_options))
    if set(seen) != set(expected):
        return False
    for name, tensor in expected.items():
        other = seen[name]
        if other.dtype != tensor.dtype or other.shape != tensor.shape:
            return False
        if not torch.equal(_bits(other), _bits(tensor.detach().cpu())):
            return False
    return True


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    """A view that compares bit patterns (NaN payloads and -0.0 included)."""
    tensor = tensor.contiguous()
    if tensor.dtype == torch.bool or tensor.numel() == 0:
        return tensor
    return tensor.reshape(-1).view(torch.uint8)

