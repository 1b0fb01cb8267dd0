"""Trusted factories: names, registration, trust, an untrusted factory refused before it is
imported, and every torchvision builder's architecture rebuilt on the meta device."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from torch import nn

import modelkeep as mk
from modelkeep import api, format, models, reading, storage
from modelkeep.arch import factories, rebuild, records, verify


def test_torchvision_names_are_listed_once() -> None:
    names = factories.torchvision_names()
    assert len(names) == len(set(names)) > 100
    assert "torchvision.models.video.r3d_18" in names
    assert "torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn" in names


def tiny(width: int = 2) -> nn.Module:
    return nn.Linear(width, width)


def test_register_factory_forms() -> None:
    assert mk.register_factory(tiny) is tiny  # plain decorator: named module.qualname
    default_name = f"{tiny.__module__}.tiny"

    @mk.register_factory("tests.factories.other")
    def other() -> nn.Module:
        return nn.ReLU()

    try:
        assert factories.resolve(default_name) is tiny
        assert mk.create(default_name, width=3).in_features == 3
        assert factories.resolve("tests.factories.other") is other
        assert isinstance(mk.create("tests.factories.other"), nn.ReLU)
        with pytest.raises(mk.ArchitectureError, match="already registered"):
            mk.register_factory(tiny, name="tests.factories.other")
        with pytest.raises(mk.ArchitectureError):
            mk.register_factory(tiny, name="torchvision.models.evil")

        def nested() -> nn.Module:
            return nn.ReLU()

        with pytest.raises(mk.ArchitectureError, match="dotted"):
            mk.register_factory(nested)  # '<locals>' is no name a file could use
    finally:
        factories.unregister_factory(default_name)
        factories.unregister_factory("tests.factories.other")
    with pytest.raises(mk.ArchitectureError, match="unknown factory"):
        mk.create("tests.factories.other")


def _registered_module_name_factory():
    return nn.Sequential(nn.Linear(3, 2))


def test_registered_factory_roundtrip_and_kwargs(tmp_path) -> None:
    mk.register_factory(_registered_module_name_factory, name="tests.factories.seq")
    try:
        model = mk.create("tests.factories.seq")
        path = tmp_path / "m.mk"
        mk.save(model, path)
        record = json.loads(reading.read_header(path).metadata[format.KEY_ARCHITECTURE])
        assert record["strategy"] == "factory" and record["factory"] == "tests.factories.seq"
        loaded = mk.load(path)
        assert torch.equal(loaded[0].weight, model[0].weight)
    finally:
        factories.unregister_factory("tests.factories.seq")
    with pytest.raises(mk.UnsafeContentError, match="not trusted"):
        mk.load(path)


def test_torchvision_kwargs_are_recorded(tmp_path) -> None:
    model = mk.create("torchvision:squeezenet1_1", num_classes=5, dropout=0.25)
    path = tmp_path / "sq.mk"
    mk.save(model, path)
    record = json.loads(reading.read_header(path).metadata[format.KEY_ARCHITECTURE])
    assert record["kwargs"] == {"num_classes": 5, "dropout": 0.25}
    loaded = mk.load(path)
    assert loaded.classifier[1].out_channels == 5 and loaded.classifier[0].p == 0.25


def test_save_with_factory_name_for_a_directly_built_model(tmp_path) -> None:
    import torchvision

    model = torchvision.models.squeezenet1_1(num_classes=4)
    path = tmp_path / "sq.mk"
    with pytest.raises(mk.ArchitectureError, match="shape differs"):
        mk.save(model, path, factory="torchvision.models.squeezenet1_1")
    mk.save(model, path, factory={"factory": "torchvision.models.squeezenet1_1", "kwargs": {"num_classes": 4}})
    assert torch.equal(mk.load(path).classifier[1].weight, model.classifier[1].weight)


def test_named_weights_shape_the_architecture_without_downloading() -> None:
    """Pretrained detection weights freeze the backbone's batch norm; the rebuild must know."""
    name = "torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn"
    builder = factories.resolve(name)
    plain = rebuild.construct(lambda: factories.call(name, builder, {}), expected=None, what=name)
    pretrained = rebuild.construct(
        lambda: factories.call(name, builder, {"weights": "DEFAULT"}), expected=None, what=name
    )
    frozen = [m for m in pretrained.modules() if type(m).__name__ == "FrozenBatchNorm2d"]
    assert frozen and not [m for m in plain.modules() if type(m).__name__ == "FrozenBatchNorm2d"]
    with pytest.raises(mk.ArchitectureError, match="num_batches_tracked"):
        verify.check_same_structure(pretrained, plain, what=name)
    assert torch.nn.Module.load_state_dict.__name__ == "load_state_dict"  # patch undone


def _crafted_factory_file(tmp_path, factory: str) -> str:
    """A valid model file whose record names ``factory`` (it builds nn.Sequential(nn.Linear(2, 2)))."""
    source = tmp_path / "source.mk"
    mk.save(nn.Sequential(nn.Linear(2, 2)), source)
    header = reading.read_header(source)
    metadata = {k: v for k, v in header.metadata.items() if k != format.KEY_HASHES}
    metadata[format.KEY_ARCHITECTURE] = format.dumps(
        records.new_record("factory", factory=factory, kwargs={}, buffers={})
    )
    crafted = tmp_path / "crafted.mk"
    storage.LOCAL.write_tensor_file(str(crafted), list(api.load_state_dict(source).items()), metadata)
    return str(crafted)


def test_untrusted_factory_is_refused_before_import(tmp_path) -> None:
    package = tmp_path / "pkgs"
    package.mkdir()
    marker = tmp_path / "imported"
    (package / "mk_evil_factory.py").write_text(
        textwrap.dedent(
            f"""
            import pathlib
            pathlib.Path({str(marker)!r}).write_text("imported")
            import torch
            def build():
                return torch.nn.Sequential(torch.nn.Linear(2, 2))
            """
        )
    )
    crafted = _crafted_factory_file(tmp_path, "mk_evil_factory.build")
    script = textwrap.dedent(
        f"""
        import json, sys, modelkeep
        result = {{}}
        try:
            modelkeep.load({crafted!r})
            result["untrusted"] = "loaded"
        except modelkeep.UnsafeContentError as e:
            result["untrusted"] = "refused"
            result["message"] = str(e)
        result["imported_after_refusal"] = "mk_evil_factory" in sys.modules
        model = modelkeep.load({crafted!r}, trust=("mk_evil_factory",))
        result["trusted"] = type(model).__name__
        print(json.dumps(result))
        """
    )
    env = dict(os.environ, PYTHONPATH=str(package))
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["untrusted"] == "refused"
    assert "mk_evil_factory.build" in result["message"] and "trust=" in result["message"]
    assert result["imported_after_refusal"] is False
    # Trusting the module by name is what imports it (the marker proves the import mechanism).
    assert result["trusted"] == "Sequential" and marker.read_text() == "imported"


def test_untrusted_factory_in_process_names_no_import(tmp_path) -> None:
    crafted = _crafted_factory_file(tmp_path, "os.system")
    with pytest.raises(mk.UnsafeContentError, match="not trusted"):
        mk.load(crafted)
    with pytest.raises(mk.FormatError):
        mk.load(_crafted_factory_file(tmp_path, "os.system; rm"))
    with pytest.raises(mk.UnsupportedValueError) as caught:  # checked once, by ReadOptions
        mk.load(crafted, trust=("os system",))
    assert caught.value.item == "trust"
    with pytest.raises(mk.ArchitectureError, match="no such model"):
        mk.load(_crafted_factory_file(tmp_path, "torchvision.models.not_a_model"))


# --------------------------------------------------------------------------------------------
# Every torchvision builder rebuilds its own architecture on the meta device


def _meta_roundtrip(name: str) -> None:
    """Build on meta, record, take the record through JSON and rebuild it from the record alone."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        builder = factories.resolve(name)
        model = rebuild.construct(lambda: factories.call(name, builder, {}), expected=None, what=name)
        assert all(p.is_meta for p in model.parameters())
        object.__setattr__(model, models.RECIPE_ATTR, {"factory": name, "kwargs": {}})
        record, state, _ = models._plan(model, example_inputs=None, factory=None, strategy=None)
        record = json.loads(format.dumps(record))
        assert records.check_envelope(record, path="mem") == "factory"
        assert record["factory"] == name
        kwargs = {k: records.decode_value(v, path="mem", item=k) for k, v in record["kwargs"].items()}
        rebuilt = rebuild.construct(
            lambda: factories.call(record["factory"], factories.resolve(record["factory"]), kwargs),
            expected=verify.shapes_of(model),
            what=name,
        )
    verify.check_same_structure(model, rebuilt, what=name)
    assert set(rebuilt.state_dict()) == set(state)


# Runs in the normal suite: every builder on meta takes about 15 s on 2 cores (--durations).
@pytest.mark.parametrize("name", factories.torchvision_names())
def test_every_torchvision_builder_roundtrips_on_meta(name) -> None:
    _meta_roundtrip(name)


def test_meta_roundtrip_fails_for_a_factory_that_cannot_be_rebuilt() -> None:
    """The every-builder test can fail: a builder whose second build differs is caught."""
    calls = []

    @mk.register_factory("tests.factories.drifting")
    def drifting() -> nn.Module:
        calls.append(1)
        return nn.Linear(2, 2 + len(calls))

    try:
        with pytest.raises(mk.ArchitectureError):
            _meta_roundtrip("tests.factories.drifting")
    finally:
        factories.unregister_factory("tests.factories.drifting")


def test_detection_model_file_roundtrip(tmp_path) -> None:
    """Anchors are computed tensors, not parameters: they must survive a meta-device load."""
    torch.manual_seed(0)
    model = mk.create(
        "torchvision:fasterrcnn_mobilenet_v3_large_320_fpn", num_classes=3, min_size=96, max_size=128
    ).eval()
    path = tmp_path / "det.mk"
    mk.save(model, path)
    loaded = mk.load(path)
    images = [torch.rand(3, 96, 128), torch.rand(3, 64, 64)]
    with torch.no_grad():
        expected, actual = model(images), loaded(images)
    for left, right in zip(expected, actual):
        assert left.keys() == right.keys()
        for key in left:
            assert torch.equal(left[key], right[key]), key


def test_timm_is_optional(tmp_path) -> None:
    if factories.timm_available():
        model = mk.create("timm:resnet18", num_classes=3)
        path = tmp_path / "t.mk"
        mk.save(model, path)
        assert torch.equal(mk.load(path).fc.weight, model.fc.weight)
    else:
        with pytest.raises(mk.ArchitectureError, match="pip install timm"):
            mk.create("timm:resnet18")
