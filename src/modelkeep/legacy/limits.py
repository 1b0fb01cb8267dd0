"""Bounds on what one file may make the reader do (see ``vm`` and ``graph``); defined with the
other read options in :mod:`modelkeep.options`."""

from modelkeep.options import DEFAULT_LIMITS, Limits

__all__ = ["DEFAULT_LIMITS", "Limits"]
