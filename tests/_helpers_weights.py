"""Small models, tensors of every dtype, bit-exact comparison and hand-built files for the
weights/format tests."""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

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
    tensor = tensor.detach().cpu().resolve_conj().resolve_neg().contiguous().reshape(-1)
    return tensor.view(torch.uint8)


def assert_same(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Same dtype, shape and bytes."""
    assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
    assert tuple(actual.shape) == tuple(expected.shape), (actual.shape, expected.shape)
    assert torch.equal(bits(actual), bits(expected))


def assert_state_same(actual: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> None:
    assert set(actual) == set(expected), set(actual) ^ set(expected)
    for name in expected:
        assert_same(actual[name], expected[name])


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
