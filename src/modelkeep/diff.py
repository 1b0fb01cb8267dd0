"""Compare the tensors of two files, name by name, without building anything from them.

Tensors are read one pair at a time where the file allows it (safetensors/modelkeep files), so
comparing two large files needs memory for one tensor pair, not for both models.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Iterator

import torch

from modelkeep import api, format
from modelkeep.io import tensors as tensor_io
from modelkeep import sniff as sniffing


@dataclasses.dataclass(frozen=True)
class TensorDiff:
    """How one tensor differs. ``max_abs``/``max_rel`` are None where shapes or kinds differ."""

    name: str
    dtype_a: str
    dtype_b: str
    shape_a: tuple[int, ...]
    shape_b: tuple[int, ...]
    max_abs: float | None
    max_rel: float | None

    @property
    def equal(self) -> bool:
        return (
            self.dtype_a == self.dtype_b
            and self.shape_a == self.shape_b
            and self.max_abs is not None
            and self.max_abs == 0.0
        )


@dataclasses.dataclass
class DiffReport:
    path_a: str
    path_b: str
    only_a: list[str] = dataclasses.field(default_factory=list)
    only_b: list[str] = dataclasses.field(default_factory=list)
    tensors: list[TensorDiff] = dataclasses.field(default_factory=list)

    @property
    def differing(self) -> list[TensorDiff]:
        return [t for t in self.tensors if not t.equal]

    @property
    def equal(self) -> bool:
        return not (self.only_a or self.only_b or self.differing)

    def summary(self) -> str:
        if self.equal:
            return f"equal: {len(self.tensors)} tensors identical"
        return (
            f"different: {len(self.only_a)} only in A, {len(self.only_b)} only in B, "
            f"{len(self.differing)} of {len(self.tensors)} common tensors differ"
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "a": self.path_a,
            "b": self.path_b,
            "equal": self.equal,
            "summary": self.summary(),
            "only_a": self.only_a,
            "only_b": self.only_b,
            "tensors": [
                {
                    "name": t.name,
                    "equal": t.equal,
                    "dtype": [t.dtype_a, t.dtype_b],
                    "shape": [list(t.shape_a), list(t.shape_b)],
                    "max_abs": t.max_abs,
                    "max_rel": t.max_rel,
                }
                for t in self.tensors
            ],
        }


@dataclasses.dataclass(frozen=True)
class _Source:
    """Names, dtypes and shapes of a file's tensors, and a way to fetch one tensor."""

    names: list[str]
    describe: Callable[[str], tuple[str, tuple[int, ...]]]
    fetch: Callable[[str], torch.Tensor]


def open_source(path: str) -> _Source:
    """A lazy view of a safetensors/modelkeep file, or an eager one of anything else readable."""
    if os.path.isfile(path) and sniffing.sniff(path) == "safetensors":
        header = api.open_header(path)
        by_name = dict(header.entries)
        for alias, target in header.aliases.items():
            by_name[alias] = header.entries[target]

        def fetch(name: str) -> torch.Tensor:
            entry = by_name[name]
            return tensor_io.read_tensors(path, [entry], threads=1)[entry.name]

        return _Source(
            names=list(by_name),
            describe=lambda name: (by_name[name].dtype, by_name[name].shape),
            fetch=fetch,
        )
    state = api.load_state_dict(path)

    def describe(name: str) -> tuple[str, tuple[int, ...]]:
        tensor = state[name]
        return format.name_from_dtype(tensor.dtype, item=name), tuple(tensor.shape)

    return _Source(names=list(state), describe=describe, fetch=state.__getitem__)


def _as_comparable(tensor: torch.Tensor) -> torch.Tensor:
    if tensor.is_complex():
        return tensor.to(torch.complex128)
    if tensor.dtype == torch.bool:
        return tensor.to(torch.int64).to(torch.float64)
    return tensor.to(torch.float64)


def compare_tensors(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """Max absolute and max relative difference (relative to the largest magnitude in ``a``).

    NaNs in the same places count as equal; a NaN against a number is an infinite difference.
    """
    if a.numel() == 0:
        return 0.0, 0.0
    x, y = _as_comparable(a), _as_comparable(b)
    delta = (x - y).abs()
    both_nan = torch.isnan(x.abs()) & torch.isnan(y.abs())
    delta = torch.where(both_nan, torch.zeros_like(delta), delta)
    delta = torch.nan_to_num(delta, nan=float("inf"))
    max_abs = float(delta.max())
    scale = float(torch.nan_to_num(x.abs(), nan=0.0).max())
    max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else float("inf"))
    return max_abs, max_rel


def diff(path_a: str | os.PathLike[str], path_b: str | os.PathLike[str]) -> DiffReport:
    """Compare every tensor of two files by name."""
    path_a, path_b = os.fspath(path_a), os.fspath(path_b)
    a, b = open_source(path_a), open_source(path_b)
    names_b = set(b.names)
    report = DiffReport(
        path_a=path_a,
        path_b=path_b,
        only_a=[n for n in a.names if n not in names_b],
        only_b=[n for n in b.names if n not in set(a.names)],
    )
    for name in _common(a.names, names_b):
        (dtype_a, shape_a), (dtype_b, shape_b) = a.describe(name), b.describe(name)
        max_abs = max_rel = None
        if shape_a == shape_b:
            max_abs, max_rel = compare_tensors(a.fetch(name), b.fetch(name))
        report.tensors.append(TensorDiff(name, dtype_a, dtype_b, shape_a, shape_b, max_abs, max_rel))
    return report


def _common(names_a: list[str], names_b: set[str]) -> Iterator[str]:
    return (name for name in names_a if name in names_b)
