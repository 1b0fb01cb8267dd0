"""Predictions from a model or a saved file alone: the inference spec (``spec``), input reading
and preprocessing (``preprocess``), and the batched run with labels and top-k (``pipeline``).

``modelkeep.predict`` at the top level is the function ``pipeline.predict``; import this
package's modules by their full names (``from modelkeep.predict import spec``).
"""

from modelkeep.predict.pipeline import Prediction, Ranked, predict
from modelkeep.predict.spec import ImagePreprocess, InferenceSpec

__all__ = ["ImagePreprocess", "InferenceSpec", "Prediction", "Ranked", "predict"]
