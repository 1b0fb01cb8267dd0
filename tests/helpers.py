"""Shared test helpers: the one exact comparison (``assert_same``/``same``), small models,
tensors of every dtype and hand-built files."""

from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from modelkeep import format

# Every dtype a weights file can hold, in a stable order, with a representative shape.
ALL_DTYPES: tuple[torch.dtype, ...] = format.supported_dtypes()


class TinyGPT(nn.Module):
    """A GPT-2-shaped model whose output head is tied to the token embedding."""

    def __init__(self, vocab: int = 97, dim: int = 16, context: int = 8, layers: int = 2) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, dim)
        self.wpe = nn.Embedding(context, dim)
        self.h = nn.ModuleList(
            nn.TransformerEncoderLayer(dim, 2, 2 * dim, dropout=0.0, batch_first=True)
            for _ in range(layers)
        )
        self.ln_f = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[-1])
        x = self.wte(tokens) + self.wpe(positions)
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))


class SmallCNN(nn.Module):
    """Convolutions with batch norm: float parameters plus float and int64 buffers."""

    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),
        )
        self.classifier = nn.Linear(32, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


def trained_like(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every float parameter and buffer distinct non-default values (running stats too)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if tensor.is_floating_point():
                values = torch.randn(tensor.shape, generator=generator)
                tensor.copy_(values.abs() + 0.5 if name.endswith("running_var") else values)
            elif tensor.dtype == torch.int64:
                tensor.fill_(7)
    return model


def random_tensor(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """A tensor of ``dtype`` whose bytes are random (every bit pattern, NaNs included)."""
    generator = torch.Generator().manual_seed(seed)
    count = 1
    for dim in shape:
        count *= dim
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=generator).bool()
    raw = torch.randint(0, 256, (count * dtype.itemsize,), dtype=torch.uint8, generator=generator)
    return raw.view(dtype).reshape(shape)


def bits(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's values as C-ordered bytes, so NaNs and float8/float4 compare exactly."""
    tensor = tensor.detach().cpu().resolve_conj().resolve_neg()
    flat = torch.empty(tensor.shape, dtype=tensor.dtype)  # fresh C-ordered memory, any strides in
    flat.copy_(tensor)
    return flat.reshape(-1).view(torch.uint8)


def assert_same(actual: Any, expected: Any, where: str = "value") -> None:
    """The one exact comparison of the tests: ``actual`` equals ``expected`` in type and value.

    Tensors: same dtype, shape and bytes (so NaN payloads, -0.0 and float8 compare exactly);
    numpy arrays and scalars: same dtype, shape and bytes; floats: NaN equals NaN and -0.0 is not
    0.0; dicts: the same keys in the same order; lists and tuples: the same type and length;
    a module (on either side) stands for its state dict, names in any order. ``where`` names
    the item in the message.
    """
    if isinstance(expected, torch.nn.Module) or isinstance(actual, torch.nn.Module):
        # a module stands for its state dict; key order is the model's business
        state_a = actual.state_dict() if isinstance(actual, torch.nn.Module) else actual
        state_b = expected.state_dict() if isinstance(expected, torch.nn.Module) else expected
        assert set(state_a) == set(state_b), f"{where}: names differ: {sorted(set(state_a) ^ set(state_b))}"
        for name in state_b:
            assert_same(state_a[name], state_b[name], f"{where}[{name!r}]")
        return
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor), f"{where}: {type(actual).__name__} is not a tensor"
        assert actual.dtype == expected.dtype, (where, actual.dtype, expected.dtype)
        assert tuple(actual.shape) == tuple(expected.shape), (where, actual.shape, expected.shape)
        assert torch.equal(bits(actual), bits(expected)), f"{where}: values differ"
        return
    if isinstance(expected, (np.ndarray, np.generic)):
        assert type(actual) is type(expected) and actual.dtype == expected.dtype, (where, actual, expected)
        assert actual.shape == expected.shape and actual.tobytes() == expected.tobytes(), where
        return
    assert type(actual) is type(expected), f"{where}: {type(actual).__name__} vs {type(expected).__name__}"
    if isinstance(expected, float):
        assert (math.isnan(actual) and math.isnan(expected)) or (
            actual == expected and math.copysign(1, actual) == math.copysign(1, expected)), (where, actual, expected)
    elif isinstance(expected, Mapping):
        assert list(actual) == list(expected), f"{where}: keys {list(actual)} vs {list(expected)}"
        for key in expected:
            assert_same(actual[key], expected[key], f"{where}[{key!r}]")
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), f"{where}: length {len(actual)} vs {len(expected)}"
        for index, (a, b) in enumerate(zip(actual, expected)):
            assert_same(a, b, f"{where}[{index}]")
    else:
        assert actual == expected, f"{where}: {actual!r} vs {expected!r}"


def same(actual: Any, expected: Any) -> bool:
    """:func:`assert_same` as a boolean, for ``assert not same(...)`` and filters."""
    try:
        assert_same(actual, expected)
    except AssertionError:
        return False
    return True


def assert_state_same(actual: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> None:
    """Two state dicts hold the same names (in any order) with the same tensors."""
    assert set(actual) == set(expected), set(actual) ^ set(expected)
    for name in expected:
        assert_same(actual[name], expected[name], name)


def file_bytes(header: Any, data: bytes = b"", *, pad: bool = True, length: int | None = None) -> bytes:
    """A file built by hand: a header (dict, str or raw bytes), its 8-byte length, then ``data``."""
    if isinstance(header, (dict, list)):
        raw = json.dumps(header, separators=(",", ":")).encode()
    elif isinstance(header, str):
        raw = header.encode()
    else:
        raw = header
    if pad:
        raw += b" " * (-len(raw) % 8)
    prefix = (len(raw) if length is None else length).to_bytes(8, "little")
    return prefix + raw + data


def write(path: str | os.PathLike[str], content: bytes) -> str:
    with open(path, "wb") as stream:
        stream.write(content)
    return os.fspath(path)


def entry(dtype: str, shape: list[Any], begin: Any, end: Any) -> dict[str, Any]:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}
