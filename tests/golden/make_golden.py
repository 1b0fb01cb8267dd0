"""Regenerate the golden files: ``python tests/golden/make_golden.py``.

The golden files pin modelkeep's on-disk format byte for byte. Regenerate them only for a
deliberate format change (and bump ``modelkeep.format``): a file written by an older modelkeep
must keep loading, so tests/test_format.py also reads the committed bytes back.
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Iterator

import torch

from modelkeep import api, format, weights

HERE = os.path.dirname(os.path.abspath(__file__))
WEIGHTS = os.path.join(HERE, "weights_v1.safetensors")
DTYPES = os.path.join(HERE, "dtypes_v1.safetensors")
PRODUCER = format.dumps({"modelkeep": "golden", "torch": "golden"})
METADATA = {"note": "golden", "ünï": "côdé 名"}


def weights_state() -> dict[str, torch.Tensor]:
    """A tiny state dict touching each feature: dtypes, 0-d, zero-size, unicode, a tied name."""
    weight = torch.arange(6, dtype=torch.float32).reshape(2, 3) / 4
    return {
        "weight": weight,
        "bias": torch.tensor([-1, 2], dtype=torch.int64),
        "scale": torch.tensor(0.5, dtype=torch.bfloat16),
        "empty": torch.zeros(0, 3, dtype=torch.float16),
        "mask": torch.tensor([True, False, True]),
        "ünicode.名": torch.tensor([1, 2, 3], dtype=torch.uint8),
        "head.weight": weight,  # the same tensor: stored once, recorded as an alias
    }


def dtypes_state() -> dict[str, torch.Tensor]:
    """One two-element tensor of every dtype, filled with the bytes 0, 1, 2, ..."""
    state = {}
    for dtype in format.supported_dtypes():
        name = format.name_from_dtype(dtype)
        if dtype == torch.bool:
            state[name] = torch.tensor([False, True])
            continue
        raw = torch.arange(2 * dtype.itemsize, dtype=torch.uint8)
        state[name] = raw.view(dtype)
    return state


@contextlib.contextmanager
def fixed_producer() -> Iterator[None]:
    """The producer record names versions; pin it so the bytes do not change with them."""
    original = weights.producer
    weights.producer = lambda: PRODUCER
    try:
        yield
    finally:
        weights.producer = original


def write(weights_path: str = WEIGHTS, dtypes_path: str = DTYPES) -> None:
    with fixed_producer():
        api.save_weights(weights_state(), weights_path, metadata=METADATA)
        api.save_weights(dtypes_state(), dtypes_path)


if __name__ == "__main__":
    write()
    sys.stdout.write(f"wrote {WEIGHTS} and {DTYPES}\n")
