"""Reports about files that never build anything from them: inspect and verify.

``inspect`` reads the header only; ``verify`` re-reads every tensor's bytes and compares them with
the digests recorded when the file was written.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
from typing import Any, Callable

from modelkeep import api, format, hashing
from modelkeep.io import reads


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int


@dataclasses.dataclass(frozen=True)
class FileInfo:
    """What a file holds, from its header alone."""

    path: str
    file_size: int
    kind: str
    format_version: str | None
    tensors: list[TensorInfo]
    aliases: dict[str, str]
    hash_algorithm: str | None
    hashed_tensors: int
    metadata: dict[str, str]  # the user's own keys
    modelkeep: dict[str, Any]  # decoded modelkeep.* keys (hashes summarised, not listed)
    state: Any = None  # a checkpoint's nested state, tensors shown as "tensor F32[8, 4]"

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def total_elements(self) -> int:
        total = 0
        for t in self.tensors:
            count = 1
            for dim in t.shape:
                count *= dim
            total += count
        return total

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "file_size": self.file_size,
            "kind": self.kind,
            "format_version": self.format_version,
            "tensor_count": len(self.tensors),
            "total_bytes": self.total_bytes,
            "total_elements": self.total_elements,
            "tensors": [
                {"name": t.name, "dtype": t.dtype, "shape": list(t.shape), "nbytes": t.nbytes}
                for t in self.tensors
            ],
            "aliases": self.aliases,
            "hashes": {"algorithm": self.hash_algorithm, "count": self.hashed_tensors},
            "metadata": self.metadata,
            "modelkeep": self.modelkeep,
            **({"state": self.state} if self.state is not None else {}),
        }


def _hash_record(header: format.Header) -> tuple[str | None, dict[str, str]]:
    record = hashing.read_record(header, require_known=False)
    return (None, {}) if record is None else (record.algorithm, dict(record.tensors))


def inspect(path: str | os.PathLike[str]) -> FileInfo:
    """Describe a modelkeep or safetensors file from its header."""
    path = os.fspath(path)
    header = api.open_header(path)
    algorithm, digests = _hash_record(header)
    decoded = {
        key: header.modelkeep_value(key)
        for key in header.metadata
        if key.startswith(format.PREFIX) and key not in (format.KEY_HASHES, format.KEY_STATE)
    }
    return FileInfo(
        path=path,
        file_size=header.file_size,
        kind=header.kind,
        format_version=decoded.get(format.KEY_FORMAT),
        tensors=[TensorInfo(e.name, e.dtype, e.shape, e.nbytes) for e in header.entries.values()],
        aliases=header.aliases,
        hash_algorithm=algorithm,
        hashed_tensors=len(digests),
        metadata={k: v for k, v in header.metadata.items() if not k.startswith(format.PREFIX)},
        modelkeep=decoded,
        state=_checkpoint_state(header),
    )


def _checkpoint_state(header: format.Header) -> Any:
    if header.kind != "checkpoint":
        return None
    from modelkeep.checkpoint import files

    return files.describe_state(header)


@dataclasses.dataclass
class VerifyReport:
    """Result of recomputing every digest: ``ok`` when all recorded digests match."""

    path: str
    algorithm: str | None
    checked: list[str] = dataclasses.field(default_factory=list)
    mismatched: list[str] = dataclasses.field(default_factory=list)
    unhashed: list[str] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.algorithm is not None and not self.mismatched and not self.unhashed


def verify(
    path: str | os.PathLike[str], *, progress: Callable[[int], None] | None = None
) -> VerifyReport:
    """Recompute each tensor's digest and compare it with the one recorded at save time."""
    path = os.fspath(path)
    header = api.open_header(path)
    algorithm, digests = _hash_record(header)
    report = VerifyReport(path=path, algorithm=algorithm)
    if algorithm is None:
        report.unhashed = list(header.entries)
        return report
    hashing.read_record(header)  # refuses an algorithm this modelkeep cannot recompute
    fd = os.open(path, os.O_RDONLY)
    try:

        def check(entry: format.TensorEntry) -> tuple[str, bool | None]:
            expected = digests.get(entry.name)
            if expected is None:
                return entry.name, None
            actual = hashing.digest_range(fd, entry.begin, entry.end, path)
            if progress is not None:
                progress(entry.nbytes)
            return entry.name, actual == expected

        with concurrent.futures.ThreadPoolExecutor(reads.io_threads()) as pool:
            for name, matched in pool.map(check, header.entries.values()):
                if matched is None:
                    report.unhashed.append(name)
                elif matched:
                    report.checked.append(name)
                else:
                    report.mismatched.append(name)
    finally:
        os.close(fd)
    return report
