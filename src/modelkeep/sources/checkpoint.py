"""modelkeep training checkpoints (kind ``checkpoint``) read from any storage.

A checkpoint file's nested state is JSON in ``modelkeep.state`` with tensor leaves stored by
name. Reading it builds nothing but plain data and tensors, so it is safe on any file, and it
lives here, below the operations, so that ``modelkeep.read`` returns a checkpoint's state and
``load_weights``/``load_state_dict``/``convert``/``diff`` see a checkpoint's model weights
(:class:`CheckpointSource`) without knowing about ``modelkeep.checkpoint``.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from modelkeep import errors, format, hashing
from modelkeep.io import buffers, placement
from modelkeep.sources import ranges, state_tree
from modelkeep.storage import Storage

STATE_VERSION = 1
KIND = "checkpoint"


def _bad(path: str, what: str, item: str = format.KEY_STATE) -> errors.FormatError:
    return errors.FormatError(what, path=path, item=item,
                              fix="the file is damaged or not a modelkeep checkpoint; use an intact one")


def is_checkpoint(header: format.Header) -> bool:
    """Whether ``header`` is a modelkeep checkpoint's (kind ``checkpoint`` with a state)."""
    return header.kind == KIND and format.KEY_STATE in header.metadata


def state_tree_of(header: format.Header) -> Any:
    """The raw (still tagged) tree of a checkpoint's header.

    Raises:
        FormatError: the file is not a checkpoint, or its state record is malformed or newer.
    """
    if header.kind != KIND:
        raise errors.FormatError(
            f"is a {header.kind!r} file, not a checkpoint", path=header.path, item=format.KEY_KIND,
            fix="load weights with modelkeep.load_weights; checkpoints come from modelkeep.Checkpointer",
        )
    document = header.modelkeep_value(format.KEY_STATE)
    if not isinstance(document, dict) or set(document) != {"version", "tree"}:
        raise _bad(header.path, "checkpoint state must be {version, tree}")
    if document["version"] != STATE_VERSION:
        raise errors.FormatError(
            f"checkpoint state version {document['version']!r} is not supported", path=header.path,
            item=format.KEY_STATE, fix="upgrade modelkeep to read this checkpoint",
        )
    return document["tree"]


def verify_tensors(header: format.Header, tensors: Mapping[str, torch.Tensor]) -> None:
    """Compare the bytes read with the digests recorded at save time.

    Raises:
        IntegrityError: a tensor has no digest or its bytes differ.
        FormatError: the hash record is malformed.
    """
    record = hashing.read_record(header)
    if record is None:
        return
    digests = record.tensors
    for name, tensor in tensors.items():
        expected = digests.get(name)
        if expected is None:
            raise errors.IntegrityError("tensor has no recorded digest", path=header.path, item=name,
                                        fix="the file was edited; use an intact checkpoint")
        if hashing.digest(buffers.tensor_bytes(tensor)) != expected:
            raise errors.IntegrityError(
                "bytes do not match the digest recorded when the checkpoint was saved",
                path=header.path, item=name,
                fix="the file is corrupt; restore an earlier checkpoint",
            )


def read_checkpoint(
    store: Storage,
    path: str,
    *,
    header: format.Header | None = None,
    verify: bool = True,
    device: torch.device | str = "cpu",
) -> tuple[format.Header, Any]:
    """A checkpoint's header and its nested state with every tensor in memory.

    Args:
        store: the storage holding ``path``.
        path: the checkpoint file.
        header: its header when already read.
        verify: check every tensor against its recorded digest.
        device: where the tensors go.

    Returns:
        ``(header, state)``: dicts, lists, numbers, strings, tensors and numpy arrays.

    Raises:
        FormatError: not a checkpoint, or a malformed one.
        IntegrityError: ``verify`` found a tensor whose bytes changed.
        StorageError: reading failed.
    """
    header = header if header is not None else store.read_header(path)
    raw = state_tree_of(header)
    tensors = ranges.read_tensors(store, path, list(header.entries.values()))
    if verify:
        verify_tensors(header, tensors)
    tensors = placement.move(tensors, torch.device(device))
    return header, state_tree.decode(raw, tensors, path=path)


def _model_tree(header: format.Header, path: str) -> dict[str, Any]:
    raw = state_tree_of(header)
    model = raw.get("model") if isinstance(raw, dict) else None
    if not isinstance(model, dict) or not all(
        isinstance(v, dict) and set(v) <= {"$tensor", "device"} for v in model.values()
    ):
        raise errors.KeyMismatchError(
            "checkpoint holds no model weights", path=path, item="model",
            fix="save the checkpoint with save(step, model=...)",
        )
    missing = sorted(n for n in state_tree.tensor_names(model) if n not in header.entries)
    if missing:
        raise _bad(path, f"model state names tensors the file does not hold: {missing[:5]}")
    return model


class CheckpointSource:
    """The model state dict of a modelkeep checkpoint as a tensor source.

    Entries are named as in the model's state dict (``0.weight``), each the header entry of the
    stored tensor it refers to, so tied weights saved once read once. Digests are checked for
    every tensor ``tensors`` reads; ``read_into`` fills a model's memory directly, as for weights
    files (``modelkeep verify`` checks a file's digests on demand).
    """

    kind = "checkpoint"
    source_key: str | None = "model"

    def __init__(self, store: Storage, path: str, header: format.Header) -> None:
        self.store = store
        self.location = path
        self.header = header
        self._model_names: dict[str, str] | None = None

    @property
    def _names(self) -> dict[str, str]:
        """The model's tensor names -> stored names (found on first use: ``data`` needs none)."""
        if self._model_names is None:
            self._model_names = {
                name: node["$tensor"] for name, node in _model_tree(self.header, self.location).items()
            }
        return self._model_names

    def entries(self) -> dict[str, Any]:
        return {name: self.header.entries[stored] for name, stored in self._names.items()}

    def read_into(self, pairs: Sequence[tuple[Any, torch.Tensor]], *, threads: int | None = None) -> int:
        return ranges.read_into(self.store, self.location, pairs, threads=threads)

    def tensors(self, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        return self._tensors(device, verify=True)

    def data(self) -> Any:
        """The checkpoint's nested state, every tensor checked against its digest."""
        return read_checkpoint(self.store, self.location, header=self.header)[1]

    def metadata(self) -> format.Header:
        return self.header

    def digests(self) -> dict[str, str]:
        """``{stored name: digest}`` recorded at save time."""
        from modelkeep.sources.safetensors import recorded_digests

        return recorded_digests(self.header)

    def tensors_unverified(self, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """:meth:`tensors` without the digest check (to rescue a damaged checkpoint)."""
        return self._tensors(device, verify=False)

    def _tensors(self, device: torch.device | str, *, verify: bool) -> dict[str, torch.Tensor]:
        stored = sorted(set(self._names.values()))
        tensors = ranges.read_tensors(self.store, self.location, [self.header.entries[n] for n in stored])
        if verify:
            verify_tensors(self.header, tensors)
        tensors = placement.move(tensors, torch.device(device))
        return {name: tensors[stored_name] for name, stored_name in self._names.items()}
