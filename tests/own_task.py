"""A task of one's own for the tests, written from the base class (not a library task's
subclass): the digit's value regressed from its image, one output."""

# No ``from __future__ import annotations``: clu reads the metric collections' annotations.
import dataclasses
from typing import Any

import flax
import jax.numpy as jnp
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
        return outputs[..., 0].astype(jnp.float32) - batch["label"] * self.scale

    def train_loss(self, outputs, batch, normalisers=None):
        return jnp.mean(self.error(outputs, batch) ** 2), {}

    def eval_metrics(self, outputs, batch):
        e = self.error(outputs, batch)
        return EvalMetrics.single_from_model_output(
            mse=e**2, mae=jnp.abs(e), mask=batch["mask"] > 0
        )

    def predict(self, outputs, image_hw):
        return {"value": outputs[..., 0].astype(jnp.float32)}
