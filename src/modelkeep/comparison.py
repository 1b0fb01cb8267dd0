"""Compare the tensors of two files, name by name, without building anything from them.

Tensors are read one pair at a time where the file allows it (safetensors/modelkeep files), so
comparing two large files needs memory for one tensor pair, not for both models.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Iterable, Iterator, Mapping

import torch

from modelkeep import format, options, reading
from modelkeep.io import buffers
from modelkeep.sources.base import TensorSource


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


def _fetch(source: TensorSource, entries: dict[str, Any], name: str) -> torch.Tensor:
    """One tensor of ``source``, read alone (memory for one tensor pair at a time)."""
    entry = entries[name]
    tensor = buffers.allocate(tuple(entry.shape), entry.torch_dtype)
    source.read_into([(entry, tensor)], threads=1)
    return tensor


def _describe(entry: Any, name: str) -> tuple[str, tuple[int, ...]]:
    return format.name_from_dtype(entry.torch_dtype, item=name), tuple(entry.shape)


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


def diff(
    path_a: str | os.PathLike[str],
    path_b: str | os.PathLike[str],
    *,
    trust: Iterable[str] | str = (),
    storage_options: Mapping[str, Any] | None = None,
) -> DiffReport:
    """Compare every tensor of two files by name, one tensor pair in memory at a time.

    Args:
        path_a: any file modelkeep reads (a checkpoint contributes its model): path or URL.
        path_b: the same for the other side.
        trust: classes of torch.save files that may be rebuilt (see ``modelkeep.read``).
        storage_options: for the fsspec file system of URLs.

    Returns:
        A DiffReport: names only in A or B, and each common tensor's dtypes, shapes and max
        absolute/relative difference.

    Raises:
        FormatError, StorageError: a file cannot be read.
    """
    path_a, path_b = os.fspath(path_a), os.fspath(path_b)
    read_options = options.read_options(trust)
    a = reading.open_source(path_a, read_options, storage_options=storage_options)
    b = reading.open_source(path_b, read_options, storage_options=storage_options)
    entries_a, entries_b = a.entries(), b.entries()
    names_a, names_b = list(entries_a), set(entries_b)
    report = DiffReport(
        path_a=path_a,
        path_b=path_b,
        only_a=[n for n in names_a if n not in names_b],
        only_b=[n for n in entries_b if n not in entries_a],
    )
    for name in _common(names_a, names_b):
        (dtype_a, shape_a), (dtype_b, shape_b) = _describe(entries_a[name], name), _describe(entries_b[name], name)
        max_abs = max_rel = None
        if shape_a == shape_b:
            max_abs, max_rel = compare_tensors(_fetch(a, entries_a, name), _fetch(b, entries_b, name))
        report.tensors.append(TensorDiff(name, dtype_a, dtype_b, shape_a, shape_b, max_abs, max_rel))
    return report


def _common(names_a: list[str], names_b: set[str]) -> Iterator[str]:
    return (name for name in names_a if name in names_b)
