"""Reading any supported file: safetensors/modelkeep files, torch.save files, sharded folders.

``read`` is the safe ``torch.load``. ``open_source`` gives ``api.load_weights`` and
``api.load_state_dict`` one interface over every kind of file: the tensors by name (with shape
and dtype) and a way to read them into destination tensors. For safetensors files that is the
header and ``tensor_io.read_into``, unchanged; for torch.save files the state dict found by
``legacy.open_weights``; for Hugging Face sharded folders the union of the shards named by the
index.
"""

from __future__ import annotations

import importlib.util
import json
import os
from typing import Any, Iterable, Sequence

import torch

from modelkeep import errors, format
from modelkeep.io import tensors as tensor_io
from modelkeep import sniff as sniffing

INDEX_NAMES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
SINGLE_NAMES = ("model.safetensors", "pytorch_model.bin")
MAX_INDEX_BYTES = 64 << 20


sniff = sniffing.sniff  # one answer for every reader: see modelkeep.sniff


# ---------------------------------------------------------------------------------------------
# Sources of named tensors


class SafetensorsSource:
    """A safetensors/modelkeep file: header entries (aliases included) read by the engine."""

    source_key: str | None = None

    def __init__(self, path: str) -> None:
        self.path = path
        self.header = format.read_header_file(path)

    def entries(self) -> dict[str, Any]:
        by_name: dict[str, Any] = dict(self.header.entries)
        for alias, target in self.header.aliases.items():
            by_name[alias] = self.header.entries[target]
        return by_name

    def read_into(self, pairs: Sequence[tuple[Any, torch.Tensor]], *, threads: int | None = None) -> int:
        return tensor_io.read_into(self.path, pairs, threads=threads)

    def tensors(self, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        out = tensor_io.read_tensors(self.path, list(self.header.entries.values()), device=device)
        for alias, target in self.header.aliases.items():
            out[alias] = out[target]
        return out


class ShardedSource:
    """A folder of shards with a Hugging Face index (``weight_map``: tensor name -> shard)."""

    source_key: str | None = None

    def __init__(self, index_path: str, *, trust: Iterable[str] | str, on_unknown: str) -> None:
        self.path = index_path
        folder = os.path.dirname(index_path)
        weight_map = index_weight_map(index_path)
        self.shards: dict[str, Any] = {}
        self._entries: dict[str, Any] = {}
        self._owner: dict[int, Any] = {}
        for shard_name in dict.fromkeys(weight_map.values()):
            if not os.path.isfile(os.path.join(folder, shard_name)):
                raise errors.FormatError(
                    f"the index names shard {shard_name!r}, which is missing from the folder",
                    path=index_path, fix="download every shard the index lists",
                )
            shard = open_source(os.path.join(folder, shard_name), trust=trust, on_unknown=on_unknown)
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


def index_weight_map(index_path: str) -> dict[str, str]:
    """The validated ``weight_map`` of a sharded checkpoint's index (shards stay in its folder)."""
    try:
        with open(index_path, "rb") as stream:
            raw = stream.read(MAX_INDEX_BYTES + 1)
    except FileNotFoundError as e:
        raise errors.StorageError("no such index file", path=index_path, fix="check the path") from e
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
            or shard != os.path.basename(shard)
            or shard in (".", "..")
            or "\\" in shard
            or "\x00" in shard
        ):
            raise errors.FormatError(
                "the index names a shard outside its folder", path=index_path, item=name,
                fix="the index is damaged or crafted; shards must be file names in the same folder",
            )
    return weight_map


def _index_of(folder: str) -> str:
    for name in INDEX_NAMES:
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    raise errors.FormatError(
        "the folder has no model.safetensors.index.json or pytorch_model.bin.index.json",
        path=folder,
        fix="name a model file, or a folder of shards with their index",
    )


def _single_file(folder: str) -> str | None:
    for name in SINGLE_NAMES:
        candidate = os.path.join(folder, name)
        if os.path.isfile(candidate):
            return candidate
    return None


def open_source(
    path: str | os.PathLike[str],
    *,
    trust: Iterable[str] | str = (),
    on_unknown: str = "error",
) -> Any:
    """The named tensors of any supported file or sharded folder (see module docstring)."""
    path = os.fspath(path)
    kind = sniff(path)
    if kind == "folder":
        index = next((os.path.join(path, n) for n in INDEX_NAMES if os.path.isfile(os.path.join(path, n))), None)
        single = _single_file(path)
        if index is None and single is not None:
            return open_source(single, trust=trust, on_unknown=on_unknown)
        return ShardedSource(index or _index_of(path), trust=trust, on_unknown=on_unknown)
    if kind == "index":
        return ShardedSource(path, trust=trust, on_unknown=on_unknown)
    if kind == "safetensors":
        return SafetensorsSource(path)
    from modelkeep import legacy  # imported on first use: keeps `import modelkeep` light

    return legacy.open_weights(path, trust=trust, on_unknown=on_unknown)


# ---------------------------------------------------------------------------------------------
# read


def read(
    path: str | os.PathLike[str],
    *,
    trust: Iterable[str] | str = (),
    on_unknown: str = "error",
) -> Any:
    """The safe ``torch.load``: the data of any supported file, with nothing from it run.

    * torch.save files (zip, stream, pre-1.0 tar, plain pickles): what ``torch.load`` would
      return: nested dicts, lists, numbers, strings, tensors, numpy arrays, records for
      ``argparse.Namespace``; whole modules only of trusted classes (``torch.nn``,
      ``torchvision.models``, ``torchvision.ops`` and those named in ``trust``). Other globals
      raise UnsafeContentError listing each with its byte position, or become inert
      placeholders with ``on_unknown="placeholder"``.
    * TorchScript archives: ``{"data": <module record>, "constants": <tuple>}``; code is never run.
    * safetensors/modelkeep files and sharded folders: the state dict. A modelkeep checkpoint
      file is handed to ``modelkeep.checkpoint.read_state`` when that exists.
    """
    path = os.fspath(path)
    kind = sniff(path)
    if kind in ("folder", "index"):
        return open_source(path, trust=trust, on_unknown=on_unknown).tensors()
    if kind == "safetensors":
        source = SafetensorsSource(path)
        header = source.header
        if header.kind == "checkpoint" and format.KEY_STATE in header.metadata:
            read_state = _checkpoint_reader()
            if read_state is not None:
                return read_state(path, header)
        return source.tensors()
    from modelkeep import legacy

    return legacy.read(path, trust=trust, on_unknown=on_unknown)


def _checkpoint_reader() -> Any:
    """``modelkeep.checkpoint.read_state`` when the checkpoint module provides it."""
    if importlib.util.find_spec("modelkeep.checkpoint") is None:
        return None
    module = importlib.import_module("modelkeep.checkpoint")
    return getattr(module, "read_state", None)
