"""A Hugging Face sharded checkpoint (a folder of shards and ``*.index.json``) as one source.

The index's ``weight_map`` (tensor name -> shard file) is validated before any shard is opened:
shard names must be plain file names in the index's own folder, so a crafted index cannot make
the reader open files elsewhere. Shards may be safetensors or torch.save files.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Sequence

import torch

from modelkeep import errors
from modelkeep.storage import Storage

INDEX_NAMES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
SINGLE_NAMES = ("model.safetensors", "pytorch_model.bin")
MAX_INDEX_BYTES = 64 << 20


def index_weight_map(store: Storage, index_path: str) -> dict[str, str]:
    """The validated ``weight_map`` of a sharded checkpoint's index.

    Args:
        store: the storage holding the index.
        index_path: the ``*.index.json`` file.

    Returns:
        ``{tensor name: shard file name}``.

    Raises:
        StorageError: the index cannot be read.
        FormatError: it is too large, not JSON, has no weight_map or names a shard elsewhere.
    """
    with errors.map_os_errors(index_path, "reading"), store.open_read(index_path) as stream:
        raw = stream.read(MAX_INDEX_BYTES + 1)
    if len(raw) > MAX_INDEX_BYTES:
        raise errors.FormatError("the index is too large", path=index_path, fix="check the file")
    try:
        document = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError, UnicodeDecodeError) as e:
        raise errors.FormatError("the index is not valid JSON", path=index_path, fix="re-download it") from e
    weight_map = document.get("weight_map") if isinstance(document, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise errors.FormatError("the index has no weight_map", path=index_path, item="weight_map",
                                 fix="re-download the index")
    for name, shard in weight_map.items():
        if (
            not isinstance(shard, str)
            or not shard
            or "/" in shard
            or shard in (".", "..")
            or "\\" in shard
            or "\x00" in shard
        ):
            raise errors.FormatError(
                "the index names a shard outside its folder", path=index_path, item=name,
                fix="the index is damaged or crafted; shards must be file names in the same folder",
            )
    return weight_map


def find_in_folder(store: Storage, folder: str) -> tuple[str, str]:
    """What a model folder holds: ``("index", path)`` or ``("single", path)``.

    Raises:
        FormatError: the folder holds neither an index nor a single model file.
    """
    for name in INDEX_NAMES:
        if store.exists(store.join(folder, name)):
            return "index", store.join(folder, name)
    for name in SINGLE_NAMES:
        if store.exists(store.join(folder, name)):
            return "single", store.join(folder, name)
    raise errors.FormatError(
        "the folder has no model.safetensors.index.json or pytorch_model.bin.index.json",
        path=folder,
        fix="name a model file, or a folder of shards with their index",
    )


class ShardedSource:
    """The union of the shards an index names; each tensor is read from its own shard."""

    kind = "sharded"
    source_key: str | None = None

    def __init__(self, store: Storage, index_path: str, open_file: Callable[[str], Any]) -> None:
        """Open every shard with ``open_file`` (the reading layer's ``open_source`` for one file)."""
        self.location = index_path
        folder = store.parent(index_path)
        weight_map = index_weight_map(store, index_path)
        self.shards: dict[str, Any] = {}
        self._entries: dict[str, Any] = {}
        self._owner: dict[int, Any] = {}
        for shard_name in dict.fromkeys(weight_map.values()):
            shard_path = store.join(folder, shard_name)
            if not store.exists(shard_path):
                raise errors.FormatError(
                    f"the index names shard {shard_name!r}, which is missing from the folder",
                    path=index_path, fix="download every shard the index lists",
                )
            shard = open_file(shard_path)
            self.shards[shard_name] = shard
            for name, entry in shard.entries().items():
                if name in self._entries:
                    raise errors.FormatError(
                        "two shards hold the same tensor", path=index_path, item=name,
                        fix="the shards do not belong together; re-download them",
                    )
                self._entries[name] = entry
                self._owner[id(entry)] = shard
        for name, shard_name in weight_map.items():
            if name not in self.shards[shard_name].entries():
                raise errors.FormatError(
                    f"the index places this tensor in {shard_name}, which does not hold it",
                    path=index_path, item=name, fix="re-download the shards and their index",
                )

    def entries(self) -> dict[str, Any]:
        return dict(self._entries)

    def read_into(self, pairs: Sequence[tuple[Any, torch.Tensor]], *, threads: int | None = None) -> int:
        groups: dict[int, tuple[Any, list]] = {}
        for entry, destination in pairs:
            shard = self._owner[id(entry)]
            groups.setdefault(id(shard), (shard, []))[1].append((entry, destination))
        return sum(shard.read_into(group, threads=threads) for shard, group in groups.values())

    def tensors(self, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for shard in self.shards.values():
            out.update(shard.tensors(device))
        return out

    def data(self) -> dict[str, torch.Tensor]:
        return self.tensors()

    def digests(self) -> dict[str, str]:
        """Every shard's recorded digests (names are unique across shards)."""
        out: dict[str, str] = {}
        for shard in self.shards.values():
            out.update(shard.digests())
        return out

    def metadata(self) -> None:
        return None  # an index, not one file: each shard has its own header
