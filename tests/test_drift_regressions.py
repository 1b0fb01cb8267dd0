"""Regression tests for the rules that were written twice and drifted apart (issue 8).

Each test failed on main: a checkpoint restored ``x.conj()`` as ``x``; ``load_weights`` refused a
``{"model_state": ...}`` file that ``import_torch_checkpoint`` accepted; weights registered for a
torchvision detection builder were not found by ``create``.
"""

from __future__ import annotations

import hashlib
import io

import pytest
import torch
import torchvision

import modelkeep as mk
from modelkeep import pretrained
from modelkeep.inference import spec as spec_module
from test_pretrained import isolated_caches  # noqa: F401 - autouse: private caches, registry cleared

DETECTION = "torchvision:fasterrcnn_mobilenet_v3_large_320_fpn"


# --------------------------------------------------------------------------------------------
# Tensor identity: x and x.conj() share memory, not values


class Holder(torch.nn.Module):
    """A module whose buffers are views of one memory with different lazy bits."""

    def __init__(self, views: dict[str, torch.Tensor]) -> None:
        super().__init__()
        for name, tensor in views.items():
            self.register_buffer(name, tensor)


def _views() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    x = torch.randn(4, dtype=torch.complex64)
    real = torch.randn(5)
    views = {"x": x, "x_conj": x.conj(), "real": real}
    if hasattr(torch, "_neg_view"):
        views["x_neg"] = torch._neg_view(x)
        views["real_neg"] = torch._neg_view(real)
    return views


def test_checkpoint_keeps_conjugate_and_negative_views_apart(tmp_path) -> None:
    views = _views()
    assert views["x_conj"].is_conj() and views["x_conj"].untyped_storage().data_ptr() == views["x"].untyped_storage().data_ptr()
    expected = {name: t.resolve_conj().resolve_neg().clone() for name, t in views.items()}
    with mk.Checkpointer(tmp_path / "ckpt") as ckpt:
        ckpt.save(1, model=Holder(views), extra={"nested": [views["x"], views["x_conj"]]}, rng=False)
        state = ckpt.read(1)
        target = Holder({name: torch.zeros_like(t.resolve_conj().resolve_neg()) for name, t in views.items()})
        ckpt.restore(1, model=target, restore_rng=False)
    for name, value in expected.items():
        assert torch.equal(state["model"][name].resolve_conj().resolve_neg(), value), name
        assert torch.equal(getattr(target, name), value), name
    first, second = state["extra"]["nested"]
    assert torch.equal(first, expected["x"]) and torch.equal(second.resolve_conj(), expected["x_conj"])
    assert not torch.equal(expected["x"], expected["x_conj"])  # the test can tell them apart


def test_weights_file_keeps_conjugate_views_apart(tmp_path) -> None:
    views = _views()
    path = tmp_path / "w.safetensors"
    mk.save_weights(views, path)
    loaded = mk.load_state_dict(path)
    for name, tensor in views.items():
        assert torch.equal(loaded[name], tensor.resolve_conj().resolve_neg()), name


# --------------------------------------------------------------------------------------------
# Which key of a torch.save dict holds the model


def _net(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))


def test_model_state_key_loads_with_load_weights_and_imports_as_a_checkpoint(tmp_path) -> None:
    source = _net(0)
    path = tmp_path / "train.pt"
    optimizer = torch.optim.SGD(source.parameters(), lr=0.1, momentum=0.9)
    source(torch.randn(2, 3)).sum().backward()
    optimizer.step()
    torch.save({"model_state": source.state_dict(), "optimizer_state": optimizer.state_dict(), "epoch": 7}, path)

    target = _net(1)
    mk.load_weights(target, path)  # FormatError on main
    for name, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[name], value), name

    with mk.Checkpointer(tmp_path / "ckpt") as ckpt:
        assert ckpt.import_torch_checkpoint(path) == 7
        state = ckpt.read(7)
    assert set(state["model"]) == set(source.state_dict())
    assert torch.equal(state["model"]["0.weight"], source.state_dict()["0.weight"])
    assert state["optimizer"]["param_groups"][0]["lr"] == 0.1 and state["extra"] == {"epoch": 7}


# --------------------------------------------------------------------------------------------
# Factory names: weights registered for a detection builder are found by create()


def test_weights_registered_for_a_detection_builder_are_found_by_every_spelling() -> None:
    entry = pretrained.register_weights(DETECTION, "COCO_V1", url="http://127.0.0.1:9/det-0123456789.pth")
    for spelling in (
        DETECTION,
        "torchvision.models.fasterrcnn_mobilenet_v3_large_320_fpn",
        "torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn",
        "torchvision:detection.fasterrcnn_mobilenet_v3_large_320_fpn",
    ):
        assert pretrained.resolve(spelling, "COCO_V1") is entry, spelling
    assert entry.factory == "torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn"


def test_create_loads_weights_registered_for_a_detection_builder(tmp_path) -> None:
    torch.manual_seed(0)
    reference = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn(
        num_classes=3, weights_backbone=None
    ).eval()
    buffer = io.BytesIO()
    torch.save(reference.state_dict(), buffer)
    data = buffer.getvalue()
    name = f"det-{hashlib.sha256(data).hexdigest()[:10]}.pth"
    hub = tmp_path / "torch-home" / "hub" / "checkpoints"  # no network: torch hub's cache holds it
    hub.mkdir(parents=True)
    (hub / name).write_bytes(data)
    pretrained.register_weights(
        DETECTION, "TINY", url=f"http://127.0.0.1:9/unreachable/{name}",
        inference=mk.InferenceSpec(labels=("background", "cat", "dog"), output="raw"),
    )

    model = mk.create(DETECTION, weights="TINY", num_classes=3)  # ArchitectureError on main
    for key, value in reference.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    assert spec_module.attached(model).labels == ("background", "cat", "dog")
    with pytest.raises(mk.ArchitectureError):
        mk.create(DETECTION, weights="NOT_REGISTERED", num_classes=3)


def test_the_collector_is_paused_while_a_model_fills(tmp_path, monkeypatch) -> None:
    """The pause belongs on the fill (``weights.load_into``), which ``mk.load`` uses too."""
    import gc

    from modelkeep.sources import safetensors as safetensors_source

    seen: list[bool] = []
    original = safetensors_source.SafetensorsSource.read_into

    def spy(self, *args, **kwargs):
        seen.append(gc.isenabled())
        return original(self, *args, **kwargs)

    monkeypatch.setattr(safetensors_source.SafetensorsSource, "read_into", spy)
    path = tmp_path / "m.safetensors"
    mk.save(torch.nn.Sequential(torch.nn.Linear(2, 2)), path)
    mk.load(path)
    mk.load_weights(torch.nn.Sequential(torch.nn.Linear(2, 2)), path)
    assert seen == [False, False] and gc.isenabled()
