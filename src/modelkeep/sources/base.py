"""The one interface every kind of file offers to the operations: named tensors and their bytes.

A :class:`TensorSource` is what ``open_source`` returns for a safetensors/modelkeep file, a
sharded folder or its index, a modelkeep training checkpoint (its model's state dict) and a
torch.save file (its state dict, found without running anything). Operations above this layer
(``load_weights``, ``load_state_dict``, ``convert``, ``diff``, ``predict``) branch on nothing:
they ask for ``entries()`` to plan (names, shapes, dtypes, without reading a tensor byte) and
then for ``read_into`` or ``tensors``; ``read`` asks for ``data()``, and ``load``/``inspect`` for
``metadata()`` (the header), or a torch.save source's ``module()``/``describe()``.
"""

from __future__ import annotations

from typing import Any, Protocol, Sequence, runtime_checkable

import torch


@runtime_checkable
class TensorEntryLike(Protocol):
    """What planning needs of one tensor: its shape, dtypes and size, before any byte is read."""

    shape: tuple[int, ...]

    @property
    def torch_dtype(self) -> torch.dtype: ...

    @property
    def nbytes(self) -> int: ...


@runtime_checkable
class TensorSource(Protocol):
    """Named tensors of one file or folder.

    Attributes:
        location: the path or URL the caller named (for messages and reports).
        kind: ``"safetensors"``, ``"sharded"``, ``"checkpoint"`` or ``"torch.save"``.
        source_key: the key of a torch.save checkpoint dict that held the state dict, if any.
    """

    location: str
    kind: str
    source_key: str | None

    def entries(self) -> dict[str, Any]:
        """``{name: entry}`` of every tensor (aliases and tied names included), no data read."""
        ...

    def read_into(self, pairs: Sequence[tuple[Any, torch.Tensor]], *, threads: int | None = None) -> int:
        """Fill each destination (the entry's shape, any dtype/device) with the entry's values;
        return the bytes read."""
        ...

    def tensors(self, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """Every tensor by name; names that are one tensor in the file share one tensor."""
        ...

    def data(self) -> Any:
        """What ``torch.load`` would return for the file, built safely: a torch.save file's
        object, a checkpoint's nested state, or the state dict (``modelkeep.read``)."""
        ...

    def metadata(self) -> Any:
        """The validated ``format.Header`` of a safetensors/modelkeep file; None for other kinds."""
        ...

    def digests(self) -> dict[str, str]:
        """``{entry name: digest}`` recorded when the file was written (empty when none: a
        torch.save zip archive's CRC-32s are checked as its storages are read instead)."""
        ...
