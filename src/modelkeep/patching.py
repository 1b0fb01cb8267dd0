"""``patch_torch_load()``: every ``torch.load`` in the process goes through ``modelkeep.read``.

The ``torch.load`` call that matters often sits inside a library (a model zoo, a metric, a
pipeline), where neither ``weights_only`` nor ``add_safe_globals`` can be reached, so people pass
``weights_only=False`` and run whatever the file says. Under the patch, ``torch.load`` keeps its
signature (``map_location``, ``pickle_module``, ``weights_only``, ``mmap``, ``encoding``, paths, file
objects, zip members) and its exceptions (a missing file is a ``FileNotFoundError``, a refused
global a ``pickle.UnpicklingError``), but the file is read by modelkeep's own interpreter whatever
``weights_only`` says: nothing in it runs, torch's unpickler is never used, trusted classes
(``torch.nn``, ``torchvision.models``, ``torchvision.ops``, ``trust=`` given to the patch, and
torch's own ``add_safe_globals``/``safe_globals`` entries) are rebuilt, anything else is refused
with the list of globals and the ``trust=`` that would allow it.

Patches nest: each adds its ``trust`` to the ones active, and the original ``torch.load`` comes
back when the last one is undone. Installing and undoing are thread-safe.
"""

from __future__ import annotations

import threading
from typing import Any, Iterable

from modelkeep import options, reading

_lock = threading.Lock()
_active: list["Patch"] = []
_original: Any = None


class Patch:
    """An active patch of ``torch.load``: ``undo()`` it, or use it as a context manager.

    Attributes:
        trust: the dotted names this patch trusts (added to every other active patch's).
        on_unknown: ``"error"`` (refuse other globals) or ``"placeholder"`` (keep them inert).
    """

    def __init__(self, trust: tuple[str, ...], on_unknown: str) -> None:
        self.trust = trust
        self.on_unknown = on_unknown
        self._undone = False

    def undo(self) -> None:
        """Remove this patch; ``torch.load`` is torch's own again once no patch is left."""
        global _original
        import torch

        with _lock:
            if self._undone:
                return
            self._undone = True
            _active.remove(self)
            if not _active and _original is not None:
                torch.load = _original
                _original = None

    def __enter__(self) -> "Patch":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.undo()


def _settings() -> tuple[tuple[str, ...], str]:
    """The union of the active patches' trust, and the most permissive ``on_unknown``."""
    with _lock:
        patches = list(_active)
    trust = tuple(dict.fromkeys(name for patch in patches for name in patch.trust))
    rescue = any(patch.on_unknown == "placeholder" for patch in patches)
    return trust, "placeholder" if rescue else "error"


def safe_load(
    f: Any,
    map_location: Any = None,
    pickle_module: Any = None,
    *,
    weights_only: bool | None = None,
    mmap: bool | None = None,
    **pickle_load_args: Any,
) -> Any:
    """``torch.load``'s signature, read by ``modelkeep.read`` with the active patches' trust.

    Args:
        f: what ``torch.load`` takes (a path, a file object, bytes too).
        map_location: as torch's.
        pickle_module: accepted and ignored (modelkeep never unpickles).
        weights_only: accepted and ignored (nothing in the file ever runs).
        mmap: as torch's.
        **pickle_load_args: ``encoding`` as torch's; others are pickle's and have no effect.

    Returns:
        What ``torch.load`` returns, built without running the file.

    Raises:
        FileNotFoundError: no such file (a ``modelkeep.MissingFileError``).
        pickle.UnpicklingError: the file names a global that is not trusted (an
            ``UnsafeContentError`` listing them and the ``trust=`` that would allow them).
    """
    trust, on_unknown = _settings()
    return reading.read(
        f, map_location, pickle_module, weights_only=weights_only, mmap=mmap,
        encoding=pickle_load_args.get("encoding", "utf-8"), trust=trust, on_unknown=on_unknown,
    )


def patch_torch_load(trust: Iterable[str] | str = (), *, on_unknown: str = "error") -> Patch:
    """Route every ``torch.load`` in this process through ``modelkeep.read``, until undone.

    Args:
        trust: extra dotted module or class names whose pickled objects may be rebuilt (never run).
        on_unknown: ``"error"`` refuses a file naming other globals; ``"placeholder"`` keeps them
            as inert placeholders so the tensors can be rescued.

    Returns:
        The Patch: call ``undo()``, or use it in a ``with`` block.

    Raises:
        UnsupportedValueError: ``trust`` or ``on_unknown`` is invalid.

    Example:
        >>> import modelkeep as mk
        >>> with mk.patch_torch_load():  # doctest: +SKIP
        ...     model = third_party.load_pretrained("weights.pth")  # its torch.load runs nothing
    """
    global _original
    import torch

    checked = options.read_options(trust, on_unknown)  # validated once, here
    patch = Patch(checked.trust, checked.on_unknown)
    with _lock:
        if not _active:
            _original = torch.load
            torch.load = safe_load
        _active.append(patch)
    return patch
