"""Part 2 of ``modelkeep demo``: a small CNN trained on scikit-learn's digits in seconds, saved,
loaded in a fresh process, with logits and accuracy checked identical (no downloads needed)."""

from __future__ import annotations

import torch

from modelkeep.demo import common, scripts

DIGITS_THREADS = 1  # a tiny CNN is fastest on one thread; more only wait on each other


def train_digits() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor, float]:
    """A CNN trained for 12 epochs (seeded): the model, the held-out images and labels, seconds."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(digits.target)
    generator = torch.Generator().manual_seed(0)
    order = torch.randperm(len(labels), generator=generator)
    train, test = order[:1437], order[1437:]
    torch.manual_seed(0)
    nn = torch.nn
    model = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10),
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    with common.timed() as took:
        for _ in range(12):
            shuffled = train[torch.randperm(len(train), generator=generator)]
            for start in range(0, len(shuffled), 32):
                batch = shuffled[start : start + 32]
                loss = nn.functional.cross_entropy(model(images[batch]), labels[batch])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
    model.eval()
    return model, images[test].contiguous(), labels[test], took.seconds or 0.0


class Digits(common.Part):
    """Train, save, load in a fresh process, compare."""

    def run(self) -> None:
        import numpy as np

        import modelkeep as mk
        from modelkeep import models

        self.console.rule("[bold]Part 2: a small CNN trained on scikit-learn's digits")
        with self.status("training"), common.threads(DIGITS_THREADS):
            model, inputs, labels, trained_s = train_digits()
            with torch.no_grad():
                before = model(inputs)
        accuracy_before = (before.argmax(1) == labels).float().mean().item()
        np.save(self.file("digits_test.npy"), inputs.numpy())
        spec = mk.InferenceSpec(input_shape=("batch", 1, 8, 8), labels=[str(d) for d in range(10)])
        steps = [common.Step("train 12 epochs on 1437 digits", "(plain torch)", trained_s, "", None,
                             f"test accuracy {accuracy_before:.2%} on {len(labels)} held-out digits")]
        with common.timed() as ours:
            models.save(model, self.file("digits.model.safetensors"), inference=spec)
        with common.timed() as theirs:
            common.flushed_torch_save(model, self.file("digits.pth"))
        steps.append(common.Step("save the whole model", "mk.save(model, path)", ours.seconds,
                                 "torch.save(model, f); os.fsync(f)", theirs.seconds,
                                 "built-in torch.nn layers only: stored as a tree of layers, no code; both "
                                 "flushed"))
        params = dict(threads=DIGITS_THREADS, inputs=self.file("digits_test.npy"))
        with self.status("loading in fresh processes"):
            ours_report, ours_wall = common.fresh_process(scripts.DIGITS_MODELKEEP.format(
                path=self.file("digits.model.safetensors"), out=self.file("digits_logits.safetensors"), **params))
            theirs_report, theirs_wall = common.fresh_process(scripts.DIGITS_TORCH.format(
                path=self.file("digits.pth"), out=self.file("digits_logits_torch.npy"), **params))
        steps.append(common.Step("fresh process: load + predict", "mk.load(path); mk.predict(model, test.npy)",
                                 ours_wall, "torch.load(path, weights_only=False)", theirs_wall,
                                 common.breakdown("modelkeep", ours_report) + "; "
                                 + common.breakdown("torch", theirs_report)))
        self.show("digits CNN: each step with modelkeep and with torch", steps)
        after = mk.load_state_dict(self.file("digits_logits.safetensors"))["logits"]
        after_torch = torch.from_numpy(np.load(self.file("digits_logits_torch.npy")))
        accuracy_after = (after.argmax(1) == labels).float().mean().item()
        self.check(torch.equal(before, after), "logits after loading in a fresh process are identical (torch.equal)")
        self.check(torch.equal(before, after_torch), "and identical to torch.load's")
        self.check(accuracy_before == accuracy_after,
                   f"accuracy before save {accuracy_before:.2%}, after load {accuracy_after:.2%}")
        self.check(ours_report["pickle_globals"] == 0,
                   f"pickle globals resolved: modelkeep {ours_report['pickle_globals']}, "
                   f"torch.load {theirs_report['pickle_globals']}")
        self.result.accuracy_before, self.result.accuracy_after = accuracy_before, accuracy_after
