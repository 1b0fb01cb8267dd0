"""The benchmark's workloads: models whose tensors are laid out like the cases the targets name.

Each workload builds its model without torch's random init (on the meta device, then real memory
that is written once, so every page is touched, as in a model that exists before it is loaded
into). ``fill`` puts seeded random values in it for the reference files.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Callable

import torch
from torch import nn


@dataclasses.dataclass(frozen=True)
class Workload:
    name: str
    description: str
    build: Callable[[], nn.Module]
    heavy: bool = False  # needs several GB per process: fewer reps under --quick


def _materialise(model: nn.Module, tie: Callable[[nn.Module], None] | None = None) -> nn.Module:
    """Give a meta-device model real, touched memory (zeros), restoring tied parameters."""
    model.to_empty(device="cpu")
    if tie is not None:
        tie(model)
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            tensor.zero_()
    return model


def build_vgg16() -> nn.Module:
    import torchvision

    with torch.device("meta"):
        model = torchvision.models.vgg16()
    return _materialise(model)


class Block(nn.Module):
    """A GPT-2 transformer block's parameters (attention and MLP as in GPT-2 small)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.ModuleDict(
            {"c_attn": nn.Linear(width, 3 * width), "c_proj": nn.Linear(width, width)}
        )
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.ModuleDict(
            {"c_fc": nn.Linear(width, 4 * width), "c_proj": nn.Linear(4 * width, width)}
        )


class GPT2Like(nn.Module):
    """GPT-2 small's tensors: 124M parameters, the output head tied to the token embedding."""

    def __init__(self, vocab: int = 50257, context: int = 1024, width: int = 768, layers: int = 12) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, width)
        self.wpe = nn.Embedding(context, width)
        self.h = nn.ModuleList(Block(width) for _ in range(layers))
        self.ln_f = nn.LayerNorm(width)
        self.lm_head = nn.Linear(width, vocab, bias=False)
        self.tie()

    def tie(self) -> None:
        self.lm_head.weight = self.wte.weight


def build_gpt2() -> nn.Module:
    with torch.device("meta"):
        model = GPT2Like()
    return _materialise(model, tie=lambda m: m.tie())


class Small(nn.Module):
    """One submodule of the many-small-tensors workload: ten parameters of 1-64 KB."""

    def __init__(self, sizes: list[int]) -> None:
        super().__init__()
        for index, size in enumerate(sizes):
            self.register_parameter(f"w{index}", nn.Parameter(torch.empty(size)))


def build_many_small(modules: int = 2000, per_module: int = 10, seed: int = 0) -> nn.Module:
    """20,000 float32 tensors of 1-64 KB in 2,000 submodules of one flat container."""
    rng = random.Random(seed)
    sizes = [[rng.randint(256, 16384) for _ in range(per_module)] for _ in range(modules)]
    with torch.device("meta"):
        model = nn.ModuleList(Small(s) for s in sizes)
    return _materialise(model)


class Big(nn.Module):
    """Sixteen 256 MB parameters: 4 GB."""

    def __init__(self, count: int = 16, elements: int = 64 * 1024 * 1024) -> None:
        super().__init__()
        self.weights = nn.ParameterList(nn.Parameter(torch.empty(elements)) for _ in range(count))


def build_big() -> nn.Module:
    with torch.device("meta"):
        model = Big()
    return _materialise(model)


WORKLOADS: dict[str, Workload] = {
    w.name: w
    for w in (
        Workload("vgg16", "torchvision vgg16, 138M float32 parameters (553 MB)", build_vgg16),
        Workload("gpt2", "GPT-2-small-like, 124M parameters, lm_head tied to wte (498 MB)", build_gpt2),
        Workload("small", "20,000 tensors of 1-64 KB in 2,000 submodules of one ModuleList", build_many_small),
        Workload("big", "4 GB state dict: 16 x 256 MB float32", build_big, heavy=True),
    )
}


def fill(model: nn.Module, seed: int = 0) -> None:
    """Seeded values in every tensor (distinct from the zeros that ``build`` leaves)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        seen: set[int] = set()
        for tensor in [*model.parameters(), *model.buffers()]:
            if id(tensor) in seen:
                continue
            seen.add(id(tensor))
            if tensor.is_floating_point():
                tensor.normal_(generator=generator)
            else:
                tensor.random_(0, 100, generator=generator)


def pattern(model: nn.Module) -> None:
    """Cheap non-zero values, for save runs where the values do not matter (only the bytes)."""
    with torch.no_grad():
        for index, tensor in enumerate(model.parameters()):
            tensor.fill_(1.0 + index % 7)


def model_bytes(model: nn.Module) -> int:
    """Bytes of the model's distinct tensors (a tied tensor counts once)."""
    seen: set[int] = set()
    total = 0
    for tensor in model.state_dict().values():
        key = tensor.data_ptr()
        if key in seen:
            continue
        seen.add(key)
        total += tensor.numel() * tensor.element_size()
    return total
