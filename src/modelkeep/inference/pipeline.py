"""``modelkeep.predict``: inputs in, ranked labels out, from a model or a saved file alone.

Inputs are gathered and preprocessed (``preprocess.py``), checked against the recorded input
signature, run in batches of equal shape under ``inference_mode`` with the model in ``eval()``,
and read as the spec says: softmax over logits and the top-k labels, or raw outputs.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Iterator, Mapping, Sequence

import torch

from modelkeep import errors
from modelkeep.inference import preprocess
from modelkeep.inference import spec as spec_module

DEFAULT_BATCH_SIZE = 32
MAX_JSON_VALUES = 10_000  # raw outputs larger than this are summarised in to_json()


@dataclasses.dataclass(frozen=True)
class Ranked:
    """One of the top-k classes: its label, index and probability."""

    label: str
    index: int
    probability: float


@dataclasses.dataclass
class Prediction:
    """What the model said about one input (one sample).

    ``top`` holds the top-k classes, best first, for classifiers (outputs of shape [batch,
    classes]); ``output`` is the sample's raw output (logits, or whatever the model returns).
    """

    source: str
    top: list[Ranked]
    output: Any

    @property
    def label(self) -> str | None:
        return self.top[0].label if self.top else None

    def to_json(self) -> dict[str, Any]:
        document: dict[str, Any] = {"input": self.source}
        if self.top:
            document["top"] = [dataclasses.asdict(r) for r in self.top]
        else:
            document["output"] = to_jsonable(self.output)
        return document


def to_jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        if value.numel() > MAX_JSON_VALUES:
            return {"shape": list(value.shape), "dtype": str(value.dtype).replace("torch.", "")}
        return value.detach().cpu().tolist()
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


def _resolve_model(
    model_or_path: Any, spec: Any, device: torch.device | str | None,
    storage_options: Mapping[str, Any] | None = None,
) -> tuple[torch.nn.Module, spec_module.InferenceSpec | None]:
    explicit = spec_module.coerce(spec)
    if isinstance(model_or_path, torch.nn.Module):
        model = model_or_path
        if device is not None:
            model.to(device)
        return model, explicit or spec_module.attached(model)
    if isinstance(model_or_path, (str, os.PathLike)):
        from modelkeep import models

        # load attaches the spec a modelkeep file records (torch.save files record none)
        model = models.load(os.fspath(model_or_path), device=device, storage_options=storage_options)
        return model, explicit or spec_module.attached(model)
    raise errors.UnsupportedValueError(
        f"cannot predict with a {type(model_or_path).__name__}",
        item="model",
        fix="pass an nn.Module or the path of a model saved with modelkeep.save",
    )


def _placement(model: torch.nn.Module) -> tuple[torch.device, torch.dtype | None]:
    for tensor in (*model.parameters(), *model.buffers()):
        if tensor.is_floating_point():
            return tensor.device, tensor.dtype
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device, None
    return torch.device("cpu"), None


def _samples(items: list[preprocess.Item]) -> Iterator[tuple[str, torch.Tensor]]:
    for item in items:
        if not item.batched:
            yield item.source, item.tensor
            continue
        if item.tensor.dim() == 0:
            raise errors.FormatError(
                "is a single number, not a batch", path=item.source, fix="give the input a batch dim"
            )
        rows = item.tensor.shape[0]
        for row in range(rows):
            yield (f"{item.source}[{row}]" if rows > 1 else item.source), item.tensor[row]


def _batches(
    samples: Iterator[tuple[str, torch.Tensor]], batch_size: int
) -> Iterator[tuple[list[str], list[torch.Tensor]]]:
    """Consecutive samples of one shape, at most ``batch_size`` at a time, in input order."""
    sources: list[str] = []
    tensors: list[torch.Tensor] = []
    for source, tensor in samples:
        if tensors and (len(tensors) == batch_size or tensor.shape != tensors[0].shape):
            yield sources, tensors
            sources, tensors = [], []
        sources.append(source)
        tensors.append(tensor)
    if tensors:
        yield sources, tensors


def _cast(batch: torch.Tensor, spec: spec_module.InferenceSpec | None, model_dtype: torch.dtype | None) -> torch.Tensor:
    """Float inputs take the model's precision; a spec asking for integers (token ids) gets them."""
    wants_float = spec.torch_dtype.is_floating_point if spec is not None else batch.is_floating_point()
    if not wants_float:
        return batch.to(spec.torch_dtype) if spec is not None else batch
    return batch.to(model_dtype or (spec.torch_dtype if spec is not None else torch.float32))


def _shown(sources: list[str]) -> str:
    return sources[0] if len(sources) == 1 else f"{sources[0]} (and {len(sources) - 1} more)"


def _run(model: torch.nn.Module, batch: torch.Tensor, sources: list[str]) -> Any:
    try:
        return model(batch)
    except (RuntimeError, ValueError, TypeError, IndexError) as e:
        shown = _shown(sources)
        raise errors.FormatError(
            f"the model could not run on input of shape {list(batch.shape)}: {str(e).splitlines()[0]}",
            path=shown,
            fix="pass inputs shaped as the model expects, or record its input shape with "
            "inference=modelkeep.InferenceSpec(input_shape=...)",
        ) from e


def _rows(output: Any, count: int) -> list[Any]:
    if isinstance(output, torch.Tensor) and output.dim() > 0 and output.shape[0] == count:
        return list(output.detach().cpu())
    if isinstance(output, (list, tuple)) and len(output) == count:
        return list(output)
    return [output] * count


def _ranked(
    output: Any, count: int, spec: spec_module.InferenceSpec | None, topk: int
) -> list[list[Ranked]] | None:
    mode = spec.output if spec is not None else "logits"
    if mode == "raw" or not isinstance(output, torch.Tensor) or output.dim() != 2 or output.shape[0] != count:
        return None
    if not output.is_floating_point():
        return None
    scores = output.detach().to("cpu", torch.float32)
    probabilities = scores.softmax(dim=1) if mode == "logits" else scores
    values, indices = probabilities.topk(min(topk, probabilities.shape[1]), dim=1)
    labels = spec.labels if spec is not None and spec.labels is not None else None
    ranked = []
    for row_values, row_indices in zip(values.tolist(), indices.tolist()):
        ranked.append(
            [
                Ranked(labels[i] if labels is not None and i < len(labels) else str(i), i, p)
                for p, i in zip(row_values, row_indices)
            ]
        )
    return ranked


def predict(
    model_or_path: torch.nn.Module | str | os.PathLike[str],
    inputs: Any,
    *,
    topk: int = 5,
    spec: spec_module.InferenceSpec | Mapping[str, Any] | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    device: torch.device | str | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> list[Prediction]:
    """Predict on ``inputs`` with a model or a saved model file; one Prediction per sample.

    ``inputs``: image paths (JPEG/PNG, through the recorded preprocessing), ``.npy`` or
    ``.safetensors`` paths, PIL images, tensors or arrays, or a list of them. The spec comes from
    ``spec=``, the file, or the model (``create`` with named weights attaches one); without one,
    tensors go to the model as they are and a [batch, classes] output is read as logits.

    Args:
        model_or_path: a module, or a file ``modelkeep.save`` wrote (a path or an fsspec URL).
        inputs: one input or a list of them (see above).
        topk: classes ranked per sample, for classifiers.
        spec: an ``InferenceSpec`` (or its JSON document) that replaces the recorded one.
        batch_size: samples run through the model at once (samples of equal shape only).
        device: where the model runs when it is loaded from a path (default: the CPU).
        storage_options: for the fsspec file system of a model URL.

    Returns:
        One ``Prediction`` per sample, in input order: ``top`` holds the ranked classes of a
        classifier, ``output`` the raw output.

    Raises:
        UnsupportedValueError: ``topk`` or ``batch_size`` is not a positive integer, or a model
            (or input) of a kind that cannot be predicted with.
        FormatError: an input is unreadable or does not fit the model's recorded input shape.
        StorageError: an input or the model file cannot be read.
    """
    if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
        raise errors.UnsupportedValueError(f"topk must be a positive integer, got {topk!r}", item="topk")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise errors.UnsupportedValueError(
            f"batch_size must be a positive integer, got {batch_size!r}", item="batch_size"
        )
    model, inference = _resolve_model(model_or_path, spec, device, storage_options)
    items = preprocess.gather(inputs, inference)
    model_device, model_dtype = _placement(model)
    was_training = model.training
    model.eval()
    predictions: list[Prediction] = []
    try:
        with torch.inference_mode():
            for sources, tensors in _batches(_samples(items), batch_size):
                batch = torch.stack(tensors)
                problem = checked_input_shape(inference, tuple(batch.shape))
                if problem is not None:
                    raise errors.FormatError(
                        problem,
                        path=_shown(sources),
                        fix="reshape the input to the model's input shape",
                    )
                batch = _cast(batch, inference, model_dtype).to(model_device)
                output = _run(model, batch, sources)
                ranked = _ranked(output, len(sources), inference, topk)
                for index, (source, row) in enumerate(zip(sources, _rows(output, len(sources)))):
                    predictions.append(Prediction(source, ranked[index] if ranked else [], row))
    finally:
        model.train(was_training)
    return predictions


def checked_input_shape(spec: spec_module.InferenceSpec | None, shape: Sequence[int]) -> str | None:
    """Why ``shape`` (a batch) does not fit the spec's input shape, or None when it fits."""
    if spec is None or spec.input_shape is None:
        return None
    expected = spec.input_shape
    if len(shape) != len(expected) or any(
        isinstance(want, int) and want != got for want, got in zip(expected, shape)
    ):
        dims = ", ".join("?" if d is None else str(d) for d in expected)
        return f"got shape {list(shape)}, the model takes [{dims}]"
    return None
