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
from typing import Mapping

import torch

from modelkeep import api, atomic, errors
from modelkeep import sniff as sniffing

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
    source: str
    outputs: list[str]
    tensors: int
    bytes: int
    verified: bool | None = None


def read_source(path: str) -> tuple[dict[str, torch.Tensor], str]:
    """The tensors of any readable input and the kind of file they should become.

    A checkpoint contributes its model weights; everything else its (possibly nested) state dict.
    """
    if os.path.isfile(path) and sniffing.sniff(path) == "safetensors":
        header = api.open_header(path)
        if header.kind == "checkpoint":
            from modelkeep import checkpoint

            return checkpoint.model_weights(path), "weights"
    return api.load_state_dict(path), "weights"


def convert(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    shard_size: int | str | None = None,
    verify: bool = False,
    metadata: Mapping[str, str] | None = None,
) -> ConvertReport:
    """Rewrite ``src`` as a modelkeep weights file at ``dst`` (or shards beside ``dst``)."""
    src, dst = os.fspath(src), os.fspath(dst)
    if os.path.abspath(src) == os.path.abspath(dst):
        raise errors.UnsupportedValueError(
            "source and destination are the same file", path=src, fix="choose another destination"
        )
    tensors, _kind = read_source(src)
    stored, aliases = api.split_aliases(api.state_dict_of(tensors))
    user = api.check_user_metadata(metadata)
    limit = parse_size(shard_size) if isinstance(shard_size, str) else shard_size
    total = sum(t.numel() * t.element_size() for _, t in stored)
    if limit is None or total <= limit:
        outputs = [_write(dst, stored, aliases, user)]
    else:
        outputs = _write_shards(dst, stored, aliases, user, limit, total)
    report = ConvertReport(source=src, outputs=outputs, tensors=len(tensors), bytes=total)
    if verify:
        report.verified = verify_conversion(tensors, outputs)
        if not report.verified:
            raise errors.IntegrityError(
                "converted tensors differ from the source",
                path=dst,
                fix="report this as a modelkeep bug; the source file is unchanged",
            )
    return report


def _write(
    path: str, stored: list[tuple[str, torch.Tensor]], aliases: dict[str, str], user: dict[str, str]
) -> str:
    metadata = dict(user)
    metadata.update(api.modelkeep_metadata("weights", aliases))
    atomic.write_file(path, stored, metadata)
    return path


def shard_names(dst: str, count: int) -> tuple[list[str], str]:
    """Shard file paths and the index path for a destination like ``out/model.safetensors``."""
    folder, name = os.path.split(dst)
    stem = name[: -len(".safetensors")] if name.endswith(".safetensors") else name
    shards = [os.path.join(folder, f"{stem}-{i:05d}-of-{count:05d}.safetensors") for i in range(1, count + 1)]
    return shards, os.path.join(folder, f"{stem}.safetensors.index.json")


def _write_shards(
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
    paths, index_path = shard_names(dst, len(groups))
    weight_map: dict[str, str] = {}
    for path, group in zip(paths, groups):
        names = {name for name, _ in group}
        shard_aliases = {a: t for a, t in aliases.items() if t in names}
        _write(path, group, shard_aliases, user)
        for name in [*names, *shard_aliases]:
            weight_map[name] = os.path.basename(path)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    with atomic.atomic_file(index_path) as fd:
        os.write(fd, json.dumps(index, indent=2).encode("utf-8"))
    return [*paths, index_path]


def verify_conversion(expected: Mapping[str, torch.Tensor], outputs: list[str]) -> bool:
    """Read every output back and compare each tensor bit for bit with the source."""
    seen: dict[str, torch.Tensor] = {}
    for path in outputs:
        if path.endswith(".json"):
            continue
        seen.update(api.load_state_dict(path))
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

