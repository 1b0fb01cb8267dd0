"""A safetensors/modelkeep file as a tensor source: its header entries, tied names resolved
through ``modelkeep.aliases``, bytes read by :mod:`modelkeep.sources.ranges`."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from modelkeep import format, hashing
from modelkeep.sources import ranges
from modelkeep.storage import Storage


def named_entries(header: format.Header) -> dict[str, format.TensorEntry]:
    """Every name a file holds: its stored entries plus each alias mapped to its target's entry.

    This is the one place that resolves ``modelkeep.aliases``; every reader uses it.
    """
    by_name: dict[str, format.TensorEntry] = dict(header.entries)
    for alias, target in header.aliases.items():
        by_name[alias] = header.entries[target]
    return by_name


class SafetensorsSource:
    """The tensors of one safetensors/modelkeep file on any storage."""

    kind = "safetensors"
    source_key: str | None = None

    def __init__(self, store: Storage, path: str, header: format.Header | None = None) -> None:
        self.store = store
        self.location = path
        self.header = header if header is not None else store.read_header(path)

    def entries(self) -> dict[str, Any]:
        return named_entries(self.header)

    def read_into(self, pairs: Sequence[tuple[Any, torch.Tensor]], *, threads: int | None = None) -> int:
        return ranges.read_into(self.store, self.location, pairs, threads=threads)

    def tensors(self, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        out = ranges.read_tensors(self.store, self.location, list(self.header.entries.values()), device=device)
        for alias, target in self.header.aliases.items():
            out[alias] = out[target]
        return out

    def data(self) -> dict[str, torch.Tensor]:
        return self.tensors()

    def digests(self) -> dict[str, str]:
        """``{stored name: digest}`` recorded at save time (empty when there is none)."""
        return recorded_digests(self.header)

    def metadata(self) -> format.Header:
        return self.header


def recorded_digests(header: format.Header) -> dict[str, str]:
    """The digests a file recorded, when modelkeep can recompute them; else none."""
    record = hashing.read_record(header, require_known=False)
    return dict(record.tensors) if record is not None and record.known else {}
