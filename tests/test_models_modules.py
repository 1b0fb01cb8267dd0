"""The module-tree strategy across torch.nn: every layer family rebuilds with its own settings,
verified against the original (class, extra_repr, attributes, state dict), and runs identically."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import modelkeep as mk
from modelkeep import format, reading
from modelkeep.arch import modules, verify


def _roundtrip(model: nn.Module, tmp_path) -> nn.Module:
    path = tmp_path / "tree.mk"
    mk.save(model, path)
    record = json.loads(reading.read_header(path).metadata[format.KEY_ARCHITECTURE])
    assert record["strategy"] == "modules"
    loaded = mk.load(path)
    verify.check_same_structure(model, loaded, what="test")
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    return loaded


# Chains that take one tensor: (model, input shape)
RUNNABLE = {
    "conv1d-pool": (
        nn.Sequential(nn.Conv1d(2, 4, 5, stride=2, dilation=2, groups=2, padding_mode="circular", padding=2),
                      nn.MaxPool1d(2, ceil_mode=True), nn.LPPool1d(2, 2), nn.AdaptiveMaxPool1d(3)),
        (2, 20),
    ),
    "conv3d": (nn.Sequential(nn.Conv3d(1, 2, (1, 3, 3)), nn.BatchNorm3d(2), nn.AvgPool3d(2), nn.Flatten()), (1, 4, 6, 6)),
    "transpose-upsample": (
        nn.Sequential(nn.ConvTranspose2d(2, 3, 3, stride=2, output_padding=1), nn.InstanceNorm2d(3, affine=True,
                      track_running_stats=True), nn.Upsample(scale_factor=1.5, mode="bilinear", align_corners=False),
                      nn.PixelShuffle(1), nn.ZeroPad2d((1, 0, 2, 0)), nn.ReflectionPad2d(1)),
        (2, 5, 5),
    ),
    "norms-activations": (
        nn.Sequential(nn.Linear(6, 12, bias=False), nn.LayerNorm(12, eps=1e-3, elementwise_affine=True, bias=False),
                      nn.LeakyReLU(0.2), nn.Unflatten(1, (3, 4)), nn.GroupNorm(3, 3), nn.Hardtanh(-0.5, 0.5),
                      nn.Softplus(beta=2.0, threshold=10.0), nn.Flatten(), nn.RMSNorm(12, eps=1e-5), nn.PReLU(1),
                      nn.ELU(alpha=0.5), nn.SiLU(), nn.Mish(), nn.Hardswish(), nn.Dropout(0.3), nn.Softmax(dim=-1)),
        (6,),
    ),
    "embedding": (nn.Sequential(nn.Embedding(10, 4, padding_idx=0, max_norm=None), nn.Flatten(), nn.Linear(12, 2)), None),
    "lstm": (nn.Sequential(nn.LSTM(3, 5, num_layers=2, batch_first=True, bidirectional=True, proj_size=2)), (4, 3)),
    "gru-rnn": (nn.ModuleList([nn.GRU(3, 4, bias=False), nn.RNN(3, 4, nonlinearity="relu")]), None),
    "transformer-encoder": (
        nn.Sequential(
            nn.TransformerEncoder(
                nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True),
                num_layers=2, norm=nn.LayerNorm(8), enable_nested_tensor=False,
            )
        ),
        (5, 8),
    ),
}

STRUCTURE_ONLY = {
    "attention": nn.ModuleDict({"mha": nn.MultiheadAttention(8, 2, bias=False, add_bias_kv=True, kdim=6, vdim=4)}),
    "transformer": nn.Sequential(nn.Transformer(d_model=8, nhead=2, num_encoder_layers=1, num_decoder_layers=2,
                                                dim_feedforward=16, activation="relu", batch_first=True)),
    "decoder": nn.Sequential(nn.TransformerDecoder(nn.TransformerDecoderLayer(8, 2, 16, bias=False), 1)),
    "cells": nn.ModuleList([nn.LSTMCell(3, 4), nn.GRUCell(3, 4, bias=False), nn.RNNCell(3, 4, nonlinearity="relu")]),
    "bilinear-bag": nn.ModuleDict({"bil": nn.Bilinear(2, 3, 4), "bag": nn.EmbeddingBag(10, 3, mode="max")}),
}


@pytest.mark.parametrize("case", sorted(RUNNABLE))
def test_layer_families_run_identically(case, tmp_path) -> None:
    torch.manual_seed(0)
    model, shape = RUNNABLE[case]
    for module in model.modules():
        for buffer_name, buffer in module.named_buffers(recurse=False):
            if buffer.is_floating_point():
                buffer.uniform_(0.5, 1.5)
    model.eval()
    loaded = _roundtrip(model, tmp_path)
    if case == "embedding":
        inputs = [torch.tensor([[1, 0, 3], [9, 2, 2]])]
    elif case == "gru-rnn":
        x = torch.randn(5, 2, 3)
        for left, right in zip(model, loaded):
            assert torch.equal(left(x)[0], right(x)[0])
        return
    else:
        inputs = [torch.randn(b, *shape) for b in (1, 3)]
    with torch.no_grad():
        for x in inputs:
            expected, actual = model(x), loaded(x)
            if isinstance(expected, tuple):
                expected, actual = expected[0], actual[0]
            assert torch.equal(expected, actual)


@pytest.mark.parametrize("case", sorted(STRUCTURE_ONLY))
def test_layer_families_rebuild_exactly(case, tmp_path) -> None:
    torch.manual_seed(0)
    _roundtrip(STRUCTURE_ONLY[case], tmp_path)


def test_record_is_plain_json_with_tagged_tuples() -> None:
    node = modules.record_tree(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Dropout(0.5)))
    conv = node["children"]["0"]
    assert conv["class"] == "torch.nn.Conv2d"
    assert conv["args"]["kernel_size"] == {"$tuple": [3, 3]}
    assert conv["args"]["bias"] is True
    assert node["children"]["1"] == {"class": "torch.nn.Dropout", "args": {"p": 0.5, "inplace": False}}


def test_named_children_of_sequential_are_kept(tmp_path) -> None:
    from collections import OrderedDict

    model = nn.Sequential(OrderedDict(stem=nn.Linear(2, 3), act=nn.ReLU(), head=nn.Linear(3, 1)))
    loaded = _roundtrip(model, tmp_path)
    assert [name for name, _ in loaded.named_children()] == ["stem", "act", "head"]


def test_tied_weights_stay_tied(tmp_path) -> None:
    embed, head = nn.Embedding(7, 4), nn.Linear(4, 7, bias=False)
    head.weight = embed.weight
    model = nn.ModuleDict({"embed": embed, "head": head})
    path = tmp_path / "tied.mk"
    mk.save(model, path)
    assert reading.read_header(path).aliases == {"head.weight": "embed.weight"}
    for mapped in (False, True):
        loaded = mk.load(path, mmap=mapped)
        assert loaded["head"].weight is loaded["embed"].weight
        assert torch.equal(loaded["head"].weight, model["head"].weight)


def test_mapped_load_copies_what_it_cannot_map(tmp_path) -> None:
    """A 6-byte bfloat16 tensor leaves the next float32 tensor unaligned: that file is copied."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(3, 1).to(torch.bfloat16), nn.Linear(1, 2))
    path = tmp_path / "odd.mk"
    mk.save(model, path)
    assert reading.read_header(path).entries["1.weight"].begin % 4 != 0
    loaded = mk.load(path, mmap=True)
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor)
        assert loaded.state_dict()[name].untyped_storage().nbytes() < path.stat().st_size
