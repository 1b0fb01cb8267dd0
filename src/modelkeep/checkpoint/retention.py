"""Which checkpoints to keep: small policy objects that compose.

A policy looks at the committed checkpoints (oldest first) and returns the steps it keeps.
``a | b`` keeps what either keeps, ``a & b`` what both keep. Whatever the policy, the newest
committed checkpoint is always kept, so a checkpoint is only ever deleted once a newer one is
safely on disk, and there is always one to resume from.
"""

from __future__ import annotations

import abc
import dataclasses
import math
from typing import Callable, Mapping, Sequence

from modelkeep import errors


@dataclasses.dataclass(frozen=True)
class CheckpointInfo:
    """A committed checkpoint as retention and ``Checkpointer.best()`` see it."""

    step: int
    path: str
    metrics: Mapping[str, float] = dataclasses.field(default_factory=dict)
    time: float | None = None  # seconds since the epoch when the save began


class Policy(abc.ABC):
    """Selects the steps to keep among committed checkpoints."""

    @abc.abstractmethod
    def select(self, infos: Sequence[CheckpointInfo]) -> set[int]:
        """Steps to keep; ``infos`` is sorted by step, oldest first."""

    def __or__(self, other: "Policy") -> "Policy":
        if not isinstance(other, Policy):
            return NotImplemented  # Python then raises its TypeError for the operator
        return AnyOf(self, other)

    def __and__(self, other: "Policy") -> "Policy":
        if not isinstance(other, Policy):
            return NotImplemented
        return AllOf(self, other)


def _positive(value: int, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise errors.InvalidArgumentError(
            f"must be a positive integer, not {value!r}", item=name, fix="pass 1, 2, 3, ..."
        )
    return value


@dataclasses.dataclass(frozen=True)
class KeepAll(Policy):
    """Keep every checkpoint."""

    def select(self, infos: Sequence[CheckpointInfo]) -> set[int]:
        return {info.step for info in infos}


@dataclasses.dataclass(frozen=True)
class KeepLast(Policy):
    """Keep the ``n`` newest checkpoints."""

    n: int

    def __post_init__(self) -> None:
        _positive(self.n, "KeepLast(n)")

    def select(self, infos: Sequence[CheckpointInfo]) -> set[int]:
        return {info.step for info in infos[-self.n :]}


@dataclasses.dataclass(frozen=True)
class KeepBest(Policy):
    """Keep the ``n`` checkpoints with the best value of ``metric`` (``mode`` "min" or "max").

    Checkpoints without the metric, or with a NaN, are never among the best. Ties go to the
    newer checkpoint.
    """

    n: int
    metric: str
    mode: str = "min"

    def __post_init__(self) -> None:
        _positive(self.n, "KeepBest(n)")
        if self.mode not in ("min", "max"):
            raise errors.InvalidArgumentError(
                f"KeepBest mode must be 'min' or 'max', not {self.mode!r}", item="mode",
                fix="mode='min' when lower is better (a loss), 'max' when higher is (accuracy)",
            )
        if not isinstance(self.metric, str) or not self.metric:
            raise errors.InvalidArgumentError(
                "KeepBest needs the name of a metric", item="metric",
                fix="pass a key of save(metrics=...), e.g. KeepBest(3, 'val_loss')",
            )

    def ranked(self, infos: Sequence[CheckpointInfo]) -> list[CheckpointInfo]:
        """Checkpoints that have the metric, best first."""
        scored = [i for i in infos if _finite_or_inf(i.metrics.get(self.metric))]
        sign = 1.0 if self.mode == "min" else -1.0
        return sorted(scored, key=lambda i: (sign * float(i.metrics[self.metric]), -i.step))

    def select(self, infos: Sequence[CheckpointInfo]) -> set[int]:
        return {info.step for info in self.ranked(infos)[: self.n]}


def _finite_or_inf(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)


@dataclasses.dataclass(frozen=True)
class KeepEvery(Policy):
    """Keep checkpoints whose step is a multiple of ``n`` (e.g. a permanent one per 10k steps)."""

    n: int

    def __post_init__(self) -> None:
        _positive(self.n, "KeepEvery(n)")

    def select(self, infos: Sequence[CheckpointInfo]) -> set[int]:
        return {info.step for info in infos if info.step % self.n == 0}


@dataclasses.dataclass(frozen=True)
class KeepIf(Policy):
    """Keep checkpoints for which ``predicate(info)`` is true."""

    predicate: Callable[[CheckpointInfo], bool]

    def select(self, infos: Sequence[CheckpointInfo]) -> set[int]:
        return {info.step for info in infos if self.predicate(info)}


class AnyOf(Policy):
    """Keep what any of the policies keeps (``a | b``)."""

    def __init__(self, *policies: Policy) -> None:
        self.policies = _flatten(policies, AnyOf)

    def select(self, infos: Sequence[CheckpointInfo]) -> set[int]:
        kept: set[int] = set()
        for policy in self.policies:
            kept |= policy.select(infos)
        return kept

    def __repr__(self) -> str:
        return " | ".join(map(repr, self.policies))


class AllOf(Policy):
    """Keep what every policy keeps (``a & b``)."""

    def __init__(self, *policies: Policy) -> None:
        self.policies = _flatten(policies, AllOf)

    def select(self, infos: Sequence[CheckpointInfo]) -> set[int]:
        kept = {info.step for info in infos}
        for policy in self.policies:
            kept &= policy.select(infos)
        return kept

    def __repr__(self) -> str:
        return " & ".join(f"({p!r})" for p in self.policies)


def _flatten(policies: Sequence[Policy], kind: type) -> tuple[Policy, ...]:
    out: list[Policy] = []
    for policy in policies:
        if not isinstance(policy, Policy):
            raise errors.InvalidArgumentError(
                f"retention policies must be Policy objects, not {type(policy).__name__}",
                item="retention", fix="combine KeepLast, KeepBest, KeepEvery, KeepIf or KeepAll",
            )
        out.extend(policy.policies if isinstance(policy, kind) else [policy])  # type: ignore[attr-defined]
    return tuple(out)


def from_options(
    keep_last: int | None,
    keep_best: int | None,
    keep_every: int | None,
    metric: str | None,
    mode: str,
) -> Policy:
    """The policy of ``Checkpointer``'s keyword arguments; all None keeps everything."""
    policies: list[Policy] = []
    if keep_last is not None:
        policies.append(KeepLast(keep_last))
    if keep_best is not None:
        if metric is None:
            raise errors.InvalidArgumentError(
                "keep_best needs a metric", item="metric",
                fix="pass metric=NAME, a key of save(metrics=...)",
            )
        policies.append(KeepBest(keep_best, metric, mode))
    if keep_every is not None:
        policies.append(KeepEvery(keep_every))
    if not policies:
        return KeepAll()
    return policies[0] if len(policies) == 1 else AnyOf(*policies)


def to_delete(policy: Policy, infos: Sequence[CheckpointInfo]) -> list[CheckpointInfo]:
    """Checkpoints the policy drops, never the newest one."""
    ordered = sorted(infos, key=lambda i: i.step)
    if not ordered:
        return []
    kept = policy.select(ordered) | {ordered[-1].step}
    return [info for info in ordered if info.step not in kept]
