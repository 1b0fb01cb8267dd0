"""How a file may be read: one frozen value, checked once at the public boundary.

Every public reading operation (``read``, ``load_weights``, ``load_state_dict``, ``load``,
``scan``, ...) takes ``trust`` and ``on_unknown`` as keyword arguments, builds a
:class:`ReadOptions` from them with :func:`read_options` and hands that one value down. Nothing
below the boundary validates these again, and nothing below it can receive an unchecked value:
an invalid ``on_unknown`` used to be accepted silently for safetensors files, because only the
legacy pickle reader looked at it.
"""

from __future__ import annotations

import codecs
import dataclasses
import re
from typing import Any, Iterable, Literal

from modelkeep import errors

OnUnknown = Literal["error", "placeholder"]
ON_UNKNOWN_CHOICES: tuple[str, ...] = ("error", "placeholder")
_DOTTED = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")


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


@dataclasses.dataclass(frozen=True)
class ReadOptions:
    """What a reader may do with a file's contents.

    Attributes:
        trust: extra dotted namespaces or class names whose pickled objects may be rebuilt
            (``torch.nn``, ``torchvision.models`` and ``torchvision.ops`` always are).
        on_unknown: ``"error"`` refuses a file naming any other global; ``"placeholder"`` keeps
            such objects as inert placeholders so the tensors can still be rescued.
        limits: bounds on the work one file may cause.
        encoding: how Python 2 byte strings in old pickles become text (pickle's and torch.load's
            ``encoding=``): a codec name, or ``"bytes"`` to keep them as bytes.
        mmap: tensor data of torch.save zip files on disk is a private mapping of the file
            (torch.load's ``mmap=True``) instead of a copy in memory.
        map_location: where torch.save files' storages go (torch.load's ``map_location``),
            applied per storage with the location the file recorded.
    """

    trust: tuple[str, ...] = ()
    on_unknown: OnUnknown = "error"
    limits: Limits = DEFAULT_LIMITS
    encoding: str = "utf-8"
    mmap: bool = False
    map_location: Any = None  # torch.load's, checked by ``io.placement.check`` at the boundary

    def __post_init__(self) -> None:
        for name in self.trust:
            if not isinstance(name, str) or not _DOTTED.fullmatch(name):
                raise errors.UnsupportedValueError(
                    f"trust entry {name!r} is not a dotted module or class name",
                    item="trust",
                    fix="pass names such as trust=('mypackage',) or trust=('mypackage.models.Net',)",
                )
        if self.on_unknown not in ON_UNKNOWN_CHOICES:
            raise errors.UnsupportedValueError(
                f"on_unknown={self.on_unknown!r} is not one of {', '.join(ON_UNKNOWN_CHOICES)}",
                item="on_unknown",
                fix='pass on_unknown="error" (refuse unknown globals) or "placeholder" (keep them inert)',
            )
        if not isinstance(self.encoding, str) or (self.encoding != "bytes" and not _is_codec(self.encoding)):
            raise errors.InvalidArgumentError(
                f"encoding={self.encoding!r} is not a text codec", item="encoding",
                fix="pass encoding='utf-8' (default), 'latin1', 'ASCII' or 'bytes'",
            )
        if not isinstance(self.mmap, bool):
            raise errors.InvalidArgumentError(
                f"mmap must be True or False, not {type(self.mmap).__name__}", item="mmap", fix="pass mmap=True"
            )
        if not isinstance(self.limits, Limits):
            raise errors.UnsupportedValueError(
                f"limits must be a modelkeep.options.Limits, not {type(self.limits).__name__}",
                item="limits",
                fix="pass limits=modelkeep.options.Limits(max_pickle_bytes=...)",
            )


def _is_codec(name: str) -> bool:
    try:
        return codecs.lookup(name)._is_text_encoding  # type: ignore[attr-defined]
    except LookupError:
        return False


DEFAULT_READ_OPTIONS = ReadOptions()


def torch_safe_globals() -> tuple[str, ...]:
    """The dotted names of what ``torch.serialization.add_safe_globals`` (or the
    ``safe_globals`` context manager) allowed in this process: modelkeep trusts them too."""
    import sys

    serialization = sys.modules.get("torch.serialization")
    if serialization is None:
        return ()
    names = []
    for entry in serialization.get_safe_globals():
        if isinstance(entry, tuple) and len(entry) == 2 and isinstance(entry[1], str):
            names.append(entry[1])  # (object, "the.name.files.use")
        else:
            module, qualname = getattr(entry, "__module__", None), getattr(entry, "__qualname__", None)
            if isinstance(module, str) and isinstance(qualname, str):
                names.append(f"{module}.{qualname}")
    return tuple(name for name in names if _DOTTED.fullmatch(name))


def read_options(
    trust: Iterable[str] | str = (),
    on_unknown: str = "error",
    limits: Limits | None = None,
    *,
    encoding: str = "utf-8",
    mmap: bool = False,
    map_location: Any = None,
) -> ReadOptions:
    """The checked :class:`ReadOptions` for a public function's keyword arguments.

    Args:
        trust: one dotted name or an iterable of them.
        on_unknown: ``"error"`` or ``"placeholder"``.
        limits: bounds on the reader's work; the defaults when None.
        encoding: pickle's ``encoding=`` for Python 2 strings (a codec name or ``"bytes"``).
        mmap: map torch.save zip files' tensor data instead of copying it.
        map_location: torch.load's, for torch.save files (checked by the caller).

    Returns:
        A frozen ReadOptions (the shared default instance when every argument is a default).

    Raises:
        UnsupportedValueError: ``trust``, ``on_unknown`` or ``limits`` is not an accepted value.
        InvalidArgumentError: ``encoding`` or ``mmap`` is not.
    """
    names = (trust,) if isinstance(trust, str) else tuple(trust)
    if (not names and on_unknown == "error" and limits is None and encoding == "utf-8" and mmap is False
            and map_location is None):
        return DEFAULT_READ_OPTIONS
    return ReadOptions(
        names, on_unknown, limits if limits is not None else DEFAULT_LIMITS,  # type: ignore[arg-type]
        encoding=encoding, mmap=mmap, map_location=map_location,
    )
