"""Saving and loading weights: the safe, fast replacement of the tutorial's steps 2-4.

``save_weights`` writes a state dict (tied tensors once, as aliases); ``load_weights`` reads a file
straight into a model's own parameters and buffers, checks every name and shape first, and leaves
the model in ``eval()``; ``load_state_dict`` returns plain tensors. Each resolves its location
(a path or an fsspec URL) and options here, then hands over to the weights core
(:mod:`modelkeep.weights`) and the reading layer.
"""

from __future__ import annotations

import os
import time
from typing import Any, Iterable, Mapping

import torch

from modelkeep import options, reading, storage, weights
from modelkeep.io import buffers, placement
from modelkeep.sources import ranges
from modelkeep.weights import LoadReport

__all__ = ["LoadReport", "load_state_dict", "load_weights", "save_weights"]


@buffers.gc_paused()  # see load_weights
def save_weights(
    model_or_state_dict: torch.nn.Module | Mapping[str, torch.Tensor],
    path: str | os.PathLike[str],
    *,
    metadata: Mapping[str, str] | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> dict[str, str]:
    """Save a model's state dict (or a state dict) as a modelkeep weights file, atomically.

    Tied tensors are stored once and recorded as aliases; every tensor's digest is recorded.

    Args:
        model_or_state_dict: an ``nn.Module`` or a ``{name: tensor}`` mapping.
        path: a local path or an fsspec URL.
        metadata: extra ``{str: str}`` for the header (keys may not start with ``modelkeep.``).
        storage_options: for the fsspec file system of a URL.

    Returns:
        ``{name: xxh3-128 hex digest}`` of every stored tensor.

    Raises:
        UnsupportedValueError: a value is not a saveable tensor, or the metadata is invalid.
        StorageError: writing failed; a file already at ``path`` is untouched.
    """
    state = weights.state_dict_of(model_or_state_dict)
    stored, aliases = weights.split_aliases(state)
    header_metadata = weights.check_user_metadata(metadata)
    header_metadata.update(weights.modelkeep_metadata("weights", aliases))
    store, where = storage.resolve(path, storage_options)
    return store.write_tensor_file(where, stored, header_metadata)


@buffers.gc_paused()  # ~10^5 short-lived objects for a 20,000-tensor model: see buffers.gc_paused
def load_weights(
    model: torch.nn.Module,
    path: str | os.PathLike[str],
    *,
    strict: bool = True,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    fix_prefixes: bool = False,
    eval_mode: bool = True,
    threads: int | None = None,
    trust: Iterable[str] | str = (),
    on_unknown: str = "error",
    verify: bool = False,
    storage_options: Mapping[str, Any] | None = None,
) -> LoadReport:
    """Read the weights at ``path`` straight into ``model``'s own parameters and buffers.

    Every name and shape is compared before a byte moves; with ``strict`` every difference is
    raised at once. ``device``/``dtype`` move/cast the model first (a model on the meta device is
    materialised without random init). Tied parameters stay tied. The model is left in
    ``eval()`` unless ``eval_mode=False``.

    Any supported file works: torch.save files (a checkpoint holding the state dict under a key
    such as ``state_dict`` or ``model`` is found and reported in ``source_key``), TorchScript
    archives, sharded folders and modelkeep checkpoints (their model).

    Args:
        model: the module to fill; its own parameter and buffer memory receives the bytes.
        path: a file, model folder or shard index: a local path or an fsspec URL.
        strict: raise on any missing, unexpected or mis-shaped name.
        device: move the model here first (``"cuda"`` reads through pinned staging).
        dtype: cast the model's floating-point tensors first.
        fix_prefixes: strip ``module.``/``_orig_mod.`` wrappers the file has and the model lacks.
        eval_mode: leave the model in ``eval()``.
        threads: reader threads (the engine's default when None).
        trust: classes of a torch.save file that may be rebuilt (see ``modelkeep.read``).
        on_unknown: ``"error"`` or ``"placeholder"`` for other globals (see ``modelkeep.read``).
        verify: recompute each tensor's digest in memory after the read and compare it with the
            file's record (modelkeep files; torch.save zip archives are always CRC-checked). Off
            by default: it cost 7-12 % of a vgg16 load in a fresh process (20 % for ``load``),
            more than the 10 % a default may cost; ``modelkeep verify FILE`` checks a file alone.
        storage_options: for the fsspec file system of a URL.

    Returns:
        A LoadReport: names loaded, missing, unexpected, mis-shaped, converted, verified; bytes
        and time.

    Raises:
        KeyMismatchError: ``strict`` and the names or shapes differ (all listed at once).
        IntegrityError: ``verify`` found bytes that differ from the file's digests.
        FormatError: the file is invalid (UnsafeContentError: it names untrusted code).
        StorageError: the file cannot be read.
        UnsupportedValueError: an argument is invalid.
    """
    started = time.perf_counter()
    weights.check_dtype(dtype)
    source = reading.open_source(
        path, options.read_options(trust, on_unknown), storage_options=storage_options
    )
    return weights.load_into(
        model, source, strict=strict, device=device, dtype=dtype, fix_prefixes=fix_prefixes,
        eval_mode=eval_mode, threads=threads, started=started, verify=verify,
    )


def load_state_dict(
    path: str | os.PathLike[str],
    *,
    device: torch.device | str = "cpu",
    trust: Iterable[str] | str = (),
    on_unknown: str = "error",
    verify: bool = False,
    storage_options: Mapping[str, Any] | None = None,
) -> dict[str, torch.Tensor]:
    """All tensors of a file's state dict as ``{name: tensor}``; aliased names share one tensor.

    Any supported file works (see ``load_weights``); nothing from a torch.save file is run.

    Args:
        path: a file, model folder or shard index: a local path or an fsspec URL.
        device: where the tensors go.
        trust: classes of a torch.save file that may be rebuilt (see ``modelkeep.read``).
        on_unknown: ``"error"`` or ``"placeholder"`` for other globals.
        verify: check every tensor against the file's digests after the read (see ``load_weights``).
        storage_options: for the fsspec file system of a URL.

    Returns:
        ``{name: tensor}``.

    Raises:
        FormatError, StorageError, UnsupportedValueError, IntegrityError: as ``load_weights``.
    """
    read_options = options.read_options(trust, on_unknown)
    source = reading.open_source(path, read_options, storage_options=storage_options)
    digests = source.digests() if verify else {}
    if not digests:
        return source.tensors(device)
    tensors = source.tensors("cpu")  # checked where they were read, then moved
    entries = source.entries()
    ranges.check_filled([(entries[name], t) for name, t in tensors.items() if name in entries], digests,
                        source.location)
    return placement.move(tensors, torch.device(device))
