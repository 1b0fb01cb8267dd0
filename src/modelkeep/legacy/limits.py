"""Bounds on what one file may make the reader do (see ``vm`` and ``graph``)."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Limits:
    """Bounds on what one file may make the reader do. The defaults fit every honest checkpoint
    seen in practice with wide margins; raise them only for files you trust."""

    max_pickle_bytes: int = 1 << 30  # one pickle stream (data.pkl)
    max_objects: int = 10_000_000  # values created while interpreting
    max_memo: int = 10_000_000  # memo entries
    max_depth: int = 400  # nesting of the result
    max_expanded: int = 50_000_000  # nodes of the result counted as a tree (shared parts repeated)
    max_key_weight: int = 4096  # nodes inside one dict key or set element
    max_same_hash: int = 64  # non-string keys of one container sharing a hash
    max_int_bytes: int = 1024  # LONG1/LONG4 payload; text ints are limited to matching digits
    max_line: int = 1 << 20  # one text-protocol line
    max_name: int = 512  # module or attribute name of a global
    max_ndim: int = 64
    max_nested_archives: int = 2  # torch.save bytes inside a pickle inside ...
    max_inflate_ratio: int = 1100  # deflate cannot exceed ~1032:1
    max_inflated_factor: int = 16  # all inflated entries together, times the archive size
    max_entries: int = 1_000_000  # zip or tar members


DEFAULT_LIMITS = Limits()
