"""Part 1 of ``modelkeep demo``: the tutorial's own steps with vgg16, each beside its torch code.

vgg16 gets its named IMAGENET1K_V1 weights when a local copy exists, random weights otherwise
(said plainly: its labels then mean nothing, and part 3 shows a real pretrained model).

Every pair is timed like against like, each figure the median of ``REPEATS`` runs: both saves are
flushed to disk (modelkeep's save fsyncs and renames; the torch side gets an ``fsync`` after
``torch.save``, or its unflushed writes would slow whatever runs next), and both loads build the
fresh vgg16 the same way, on the meta device (no random init), torch's with ``assign=True``.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from rich.console import Console

from modelkeep import reading
from modelkeep.demo import common, scripts

VGG = "torchvision:vgg16"
VGG_WEIGHTS = "IMAGENET1K_V1"
TOPK = 3


def same_top(ours: list[Any], theirs: list[Any], tolerance: float = 1e-6) -> bool:
    """Same classes in the same order, probabilities within ``tolerance``, for every input."""
    return all(
        [r[1] for r in a] == [r[1] for r in b] and all(abs(r[2] - s[2]) <= tolerance for r, s in zip(a, b))
        for a, b in zip(ours, theirs)
    )


class Tutorial(common.Part):
    """The tutorial's seven steps with vgg16."""

    def __init__(
        self, console: Console, workdir: str, result: common.Result, *, quick: bool, weights_path: str | None
    ) -> None:
        super().__init__(console, workdir, result)
        self.quick = quick
        self.weights_path = weights_path
        self.repeats = 1 if quick else common.REPEATS
        self.threads = torch.get_num_threads()

    def build_vgg16(self) -> tuple[torch.nn.Module, common.Step]:
        import torchvision

        from modelkeep import creation, pretrained

        entry = pretrained.resolve(VGG, VGG_WEIGHTS)
        local = pretrained.local_source(VGG, VGG_WEIGHTS, self.weights_path)
        if local is not None and self.weights_path is not None and reading.open_source(local).kind != "safetensors":
            pretrained.fetch(entry, local)  # hash-checked and cached in modelkeep format once
        named = local is not None
        with self.status("building vgg16"), common.timed() as ours:
            model = creation.create(VGG, weights=VGG_WEIGHTS if named else None)
        with self.status("building vgg16 with torchvision"), common.timed(skip=self.quick) as theirs:
            if self.quick:
                pass
            elif named and self.weights_path is None:
                torchvision.models.vgg16(weights=VGG_WEIGHTS)
            elif named:
                torchvision.models.vgg16().load_state_dict(torch.load(self.weights_path, weights_only=True))
            else:
                torchvision.models.vgg16()
        note = (
            f"named weights {VGG_WEIGHTS} from the local copy {local}"
            if named
            else "[yellow]no local copy of vgg16's IMAGENET1K_V1 weights, so vgg16 has RANDOM weights: its "
            "labels below are ImageNet's names, the scores mean nothing; part 3 shows a real pretrained "
            f"model[/yellow] (put {entry.file_name} in {os.path.join(torch.hub.get_dir(), 'checkpoints')} "
            "or pass --weights FILE)"
        )
        ours_code = f'mk.create("{VGG}"' + (f', weights="{VGG_WEIGHTS}")' if named else ")")
        if named and self.weights_path is not None:
            theirs_code = "vgg16().load_state_dict(torch.load(file, weights_only=True))"
        else:
            theirs_code = f'vgg16(weights="{VGG_WEIGHTS}")' if named else "vgg16()"
        return model, common.Step("build vgg16", ours_code, ours.seconds, theirs_code, theirs.seconds, note)

    def timed_pair(self, ours: Any, theirs: Any) -> tuple[float, float | None]:
        """Medians of modelkeep's and torch's side, interleaved (torch's skipped with --quick)."""
        if self.quick:
            return common.medians(ours, repeats=self.repeats)[0], None
        ours_s, theirs_s = common.medians(ours, theirs, repeats=self.repeats)
        return ours_s, theirs_s

    def run(self) -> None:
        import torchvision

        import modelkeep as mk
        from modelkeep import models
        from modelkeep.inference import spec as spec_module

        self.console.rule("[bold]Part 1: the tutorial, with vgg16")
        model, built = self.build_vgg16()
        steps = [built]
        spec = spec_module.InferenceSpec.from_torchvision(torchvision.models.VGG16_Weights.IMAGENET1K_V1)
        weights_file, torch_weights = self.file("vgg16.weights.safetensors"), self.file("model_weights.pth")

        with self.status("saving the weights"):
            ours_s, theirs_s = self.timed_pair(
                lambda: mk.save_weights(model, weights_file),
                lambda: common.flushed_torch_save(model.state_dict(), torch_weights),
            )
        steps.append(common.Step(
            "save the weights", "mk.save_weights(model, path)", ours_s,
            "torch.save(model.state_dict(), f); os.fsync(f)", theirs_s,
            f"a {self.megabytes('vgg16.weights.safetensors')} safetensors file with a digest per tensor; both "
            "sides flushed to disk (modelkeep also renames atomically: a crash never leaves a torn file)"))

        def load_ours() -> torch.nn.Module:
            with torch.device("meta"):
                fresh = torchvision.models.vgg16()
            mk.load_weights(fresh, weights_file)
            return fresh

        def load_theirs() -> None:
            with torch.device("meta"):
                fresh = torchvision.models.vgg16()
            fresh.load_state_dict(torch.load(torch_weights, weights_only=True), assign=True)

        with self.status("loading the weights into a fresh model"):
            ours_s, theirs_s = self.timed_pair(load_ours, load_theirs)
        steps.append(common.Step(
            "load into a fresh model", "vgg16() on meta; mk.load_weights(model, path)", ours_s,
            "vgg16() on meta; load_state_dict(torch.load(path, weights_only=True), assign=True)", theirs_s,
            "both build on the meta device (no random init); modelkeep reads straight into the parameters "
            "and checks every name and shape first"))
        fresh = load_ours()
        same = all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))
        with common.timed() as theirs:
            fresh.eval()
        steps.append(common.Step("eval()", "(load_weights leaves it in eval)", 0.0, "model.eval()", theirs.seconds))
        del fresh

        model_file, torch_model = self.file("vgg16.model.safetensors"), self.file("model.pth")
        with self.status("saving the whole model"):
            ours_s, theirs_s = self.timed_pair(
                lambda: models.save(model, model_file, inference=spec),
                lambda: common.flushed_torch_save(model, torch_model),
            )
        steps.append(common.Step(
            "save the whole model", "mk.save(model, path)", ours_s, "torch.save(model, f); os.fsync(f)", theirs_s,
            "architecture, weights, preprocessing and labels in one safetensors file; both flushed"))
        del model

        ours_report, ours_s, theirs_report, theirs_s = self.fresh_processes(model_file, torch_model)
        steps.append(common.Step(
            "fresh process: load + predict", "mk.load(path); mk.predict(model, photos)", ours_s,
            "torch.load(path, weights_only=False) + transforms", theirs_s,
            common.breakdown("modelkeep", ours_report)
            + ("; " + common.breakdown("torch", theirs_report) if theirs_report else "")
            + " (medians; both import torch and torchvision first)"))
        self.show("vgg16: each step with modelkeep and with torch" + ("" if self.quick else
                  f" (median of {self.repeats} runs each)"), steps)
        self.check(same, "weights loaded into the fresh model are identical to the saved ones")
        count = ours_report["pickle_globals"]
        self.check(count == 0, f"the fresh process loaded the whole model with {count} pickle globals resolved"
                   + (f" (torch.load: {theirs_report['pickle_globals']}, each a callable the file chooses)"
                      if theirs_report else ""))
        if theirs_report is not None:
            self.check(same_top(ours_report["top"], theirs_report["top"]),
                       "its predictions equal torchvision's (same classes, probabilities within 1e-6)")
        self.show_top("vgg16's predictions on photos that scikit-learn ships", common.photos(),
                      [[(label, p) for label, _, p in top] for top in ours_report["top"]])

    def fresh_processes(
        self, model_file: str, torch_model: str
    ) -> tuple[dict[str, Any], float, dict[str, Any] | None, float | None]:
        """Load + predict in fresh interpreters, ``repeats`` times each side, the two sides
        interleaved so that neither inherits the other's disk or cache state: the report of each
        side's median run and its wall time."""
        params = dict(threads=self.threads, photos=common.photos(), topk=TOPK)
        ours_script = scripts.VGG_MODELKEEP.format(path=model_file, **params)
        theirs_script = scripts.VGG_TORCH.format(path=torch_model, **params)
        ours, theirs = [], []
        with self.status("loading the whole model in fresh processes and predicting"):
            for _ in range(self.repeats):
                ours.append(common.fresh_process(ours_script))
                if not self.quick:
                    theirs.append(common.fresh_process(theirs_script))
        ours_report, ours_s = _median_run(ours)
        if not theirs:
            return ours_report, ours_s, None, None
        theirs_report, theirs_s = _median_run(theirs)
        return ours_report, ours_s, theirs_report, theirs_s


def _median_run(runs: list[tuple[dict[str, Any], float]]) -> tuple[dict[str, Any], float]:
    """The run of median wall time."""
    ordered = sorted(runs, key=lambda run: run[1])
    return ordered[len(ordered) // 2]
