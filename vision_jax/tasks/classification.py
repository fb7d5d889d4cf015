"""Image classification: a classifier head on pooled backbone features, softmax or sigmoid
cross-entropy on (mixed, smoothed) label distributions, top-1 / top-5."""

# No ``from __future__ import annotations``: clu reads the metric collections' annotations.
import dataclasses
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
from clu import metrics

from vision_jax import losses
from vision_jax.metrics import nan_lowest
from vision_jax.models import create_model
from vision_jax.specs import check_interval
from vision_jax.tasks.base import Batch, Task


def topk_correct(logits: jax.Array, labels: jax.Array, k: int) -> jax.Array:
    """1.0 where the label is among the ``k`` highest logits (``lax.top_k`` order on ties: the
    lower class index first). A NaN logit ranks lowest and is never correct: an example whose
    logits are all NaN counts as wrong."""
    _, top = jax.lax.top_k(nan_lowest(logits), min(k, logits.shape[-1]))
    label = jnp.arange(logits.shape[-1]) == labels[:, None]
    label_is_nan = jnp.any(label & jnp.isnan(logits), axis=-1)
    return (jnp.any(top == labels[:, None], axis=-1) & ~label_is_nan).astype(jnp.float32)


@flax.struct.dataclass
class TrainMetrics(metrics.Collection):
    loss: metrics.Average.from_output("loss")
    accuracy: metrics.Average.from_output("top1")
    grad_norm: metrics.Average.from_output("grad_norm")


@flax.struct.dataclass
class EvalMetrics(metrics.Collection):
    loss: metrics.Average.from_output("loss")
    top1: metrics.Average.from_output("top1")
    top5: metrics.Average.from_output("top5")


@dataclasses.dataclass(frozen=True)
class Classification(Task):
    """``loss``: ``softmax_xent`` or ``sigmoid_xent``; ``label_smoothing`` towards uniform."""

    loss: str = "softmax_xent"
    label_smoothing: float = 0.0

    name = "classification"
    target = "label"
    headline = "top1"
    metric_names = ("loss", "top1", "top5", "examples")
    train_metrics = TrainMetrics
    per_example = ("probabilities",)
    reads_soft_label = True  # losses.targets_of

    def __post_init__(self) -> None:
        losses.get_loss(self.loss)  # validates the name
        check_interval("label_smoothing", self.label_smoothing, "[0, 1)")

    def build_model(self, model_name: str, num_classes: int, **model_kwargs: Any) -> nn.Module:
        return create_model(model_name, num_classes=num_classes, **model_kwargs)

    def train_loss(
        self, outputs: jax.Array, batch: Batch, normalisers: dict | None = None
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        targets = losses.targets_of(batch, outputs.shape[-1], self.label_smoothing)
        loss = losses.get_loss(self.loss)(outputs, targets).mean()
        return loss, {"top1": topk_correct(outputs, batch["label"], 1)}

    def eval_metrics(self, outputs: jax.Array, batch: Batch) -> EvalMetrics:
        targets = jax.nn.one_hot(batch["label"], outputs.shape[-1])
        return EvalMetrics.single_from_model_output(
            loss=losses.get_loss(self.loss)(outputs, targets),
            top1=topk_correct(outputs, batch["label"], 1),
            top5=topk_correct(outputs, batch["label"], 5),
            mask=batch["mask"] > 0,
        )

    def predict(self, outputs: jax.Array, image_hw: tuple[int, int]) -> dict[str, jax.Array]:
        del image_hw
        probs = (jax.nn.sigmoid if self.loss == "sigmoid_xent" else jax.nn.softmax)(
            outputs.astype(jnp.float32)
        )
        return {"probabilities": probs}
