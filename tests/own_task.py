"""Tasks of one's own for the tests, written from the base class (not a library task's
subclass): the digit's value regressed from its image, one output; the same regression of a
column of one's own (``value``); and multi-label classification of a multi-hot column
(``targets``: sigmoid binary cross-entropy, mean average precision and macro F1)."""

# No ``from __future__ import annotations``: clu reads the metric collections' annotations.
import dataclasses
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from clu import metrics

from vision_jax.models import create_model
from vision_jax.tasks.base import Task


@flax.struct.dataclass
class TrainMetrics(metrics.Collection):
    loss: metrics.Average.from_output("loss")
    grad_norm: metrics.Average.from_output("grad_norm")


@flax.struct.dataclass
class EvalMetrics(metrics.Collection):
    mse: metrics.Average.from_output("mse")
    mae: metrics.Average.from_output("mae")


@dataclasses.dataclass(frozen=True)
class DigitValue(Task):
    """Mean squared error on the label's value (times ``scale``); headline the mean absolute
    error (lower is better), summarized by ``Task.summarize``; predicts ``value``."""

    scale: float = 1.0

    name = "digit_value"
    target = "label"
    headline = "mae"
    headline_mode = "min"
    metric_names = ("mse", "mae", "examples")
    train_metrics = TrainMetrics
    per_example = ("value",)

    def build_model(self, model_name: str, num_classes: int, **model_kwargs: Any):
        return create_model(model_name, num_classes=1, **model_kwargs)

    def error(self, outputs, batch):
        return outputs[..., 0].astype(jnp.float32) - batch[self.target] * self.scale

    def train_loss(self, outputs, batch, normalisers=None):
        return jnp.mean(self.error(outputs, batch) ** 2), {}

    def eval_metrics(self, outputs, batch):
        e = self.error(outputs, batch)
        return EvalMetrics.single_from_model_output(
            mse=e**2, mae=jnp.abs(e), mask=batch["mask"] > 0
        )

    def predict(self, outputs, image_hw):
        return {"value": outputs[..., 0].astype(jnp.float32)}


@dataclasses.dataclass(frozen=True)
class ColumnValue(DigitValue):
    """:class:`DigitValue` of a float column of one's own, ``value`` (a number per example)."""

    name = "column_value"
    target = "value"


@flax.struct.dataclass
class MultiLabelEvalMetrics(metrics.Collection):
    loss: metrics.Average.from_output("loss")
    found: metrics.CollectingMetric.from_outputs(("probabilities", "targets", "mask"))


def average_precision(scores: np.ndarray, positives: np.ndarray) -> float:
    """The area under one label's precision-recall steps: the precision at each distinct score
    (highest first) weighted by the recall it adds (tied scores are one threshold)."""
    order = np.argsort(-scores, kind="stable")
    scores, positives = scores[order], positives[order]
    last = np.r_[np.flatnonzero(np.diff(scores)), len(scores) - 1]  # each threshold's last row
    tp, seen = np.cumsum(positives)[last], last + 1.0
    recall = tp / tp[-1]
    return float(np.sum(np.diff(np.r_[0.0, recall]) * tp / seen))


@dataclasses.dataclass(frozen=True)
class MultiLabel(Task):
    """Multi-label classification of the multi-hot column ``targets`` (int [K]): sigmoid binary
    cross-entropy; ``map`` (mean over the labels with a positive example of their average
    precision) and ``f1`` (macro F1 at probability ``threshold``), computed over the split in
    ``summarize``; predicts ``probabilities``."""

    threshold: float = 0.5

    name = "multi_label"
    target = "targets"
    headline = "map"
    metric_names = ("loss", "map", "f1", "examples")
    train_metrics = TrainMetrics
    per_example = ("probabilities",)

    def build_model(self, model_name: str, num_classes: int, **model_kwargs: Any):
        return create_model(model_name, num_classes=num_classes, **model_kwargs)

    def losses(self, outputs, batch):
        logits = outputs.astype(jnp.float32)
        targets = batch["targets"].astype(jnp.float32)
        return optax.sigmoid_binary_cross_entropy(logits, targets).mean(-1)

    def train_loss(self, outputs, batch, normalisers=None):
        return self.losses(outputs, batch).mean(), {}

    def eval_metrics(self, outputs, batch):
        return MultiLabelEvalMetrics.single_from_model_output(
            loss=self.losses(outputs, batch),
            probabilities=self.predict(outputs, None)["probabilities"],
            targets=batch["targets"],
            mask=batch["mask"] > 0,
        )

    def summarize(self, collection, source, prefix):
        found = collection.found.compute()
        real = found["mask"]
        probs, targets = found["probabilities"][real], found["targets"][real] > 0
        labelled = [k for k in range(targets.shape[1]) if targets[:, k].any()]
        ap = [average_precision(probs[:, k], targets[:, k]) for k in labelled]
        guess = probs >= self.threshold
        tp, fp, fn = ((a & b).sum(0) for a, b in ((guess, targets), (guess, ~targets),
                                                 (~guess, targets)))  # fmt: skip
        f1 = np.where(tp > 0, 2 * tp / np.maximum(2 * tp + fp + fn, 1), 0.0)
        return {
            f"{prefix}loss": float(collection.loss.compute()),
            f"{prefix}map": float(np.mean(ap)) if ap else float("nan"),
            f"{prefix}f1": float(np.mean(f1)),
            f"{prefix}examples": float(real.sum()),
        }

    def predict(self, outputs, image_hw):
        return {"probabilities": jax.nn.sigmoid(outputs.astype(jnp.float32))}
