"""Semantic segmentation: a per-pixel classifier on backbone feature maps.

Heads (``task.head``):

* ``linear``: a per-token (per-position) linear classifier on the last feature map, logits
  upsampled bilinearly to the image: the standard linear-probe baseline for ViT features;
* ``fpn``: a light decoder: a feature pyramid (ViTDet's simple pyramid on a single map, an FPN
  on CNN stage outputs), each level through a 3x3 convolution, upsampled to the finest level and
  summed (Panoptic-FPN's semantic branch), then the linear classifier and upsampling.

Loss: per-pixel softmax cross-entropy over pixels whose label is not ``IGNORE_LABEL`` (255),
optionally class-weighted (``sum w_y l / sum w_y``, torch's weighted mean) and label-smoothed
(each class's share of the smoothed target weighted by its own weight, as torch does).
Evaluation: one confusion matrix over every valid pixel of the split (padded examples count for
nothing), giving mIoU, pixel accuracy and per-class IoU exactly: never an average of per-batch
figures.
"""

# No ``from __future__ import annotations``: clu reads the metric collections' annotations.
import dataclasses
from collections.abc import Sequence
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from clu import metrics

from vision_jax.metrics import ConfusionMatrix, iou_summary, nan_lowest
from vision_jax.models import precision
from vision_jax.models.pyramid import (
    FPN,
    SIMPLE_SCALES,
    SimpleFeaturePyramid,
    channel_norm,
    conv,
    feature_strides,
    upsample_by,
    upsample_to,
)
from vision_jax.models.task_model import TaskModel
from vision_jax.selection import ABSENT
from vision_jax.specs import IGNORE_LABEL, check_interval, only_when
from vision_jax.tasks.base import Batch, Task, class_key, feature_backbone, pyramid_strides

HEADS = ("linear", "fpn")


def _classifier(num_classes: int, dtype: Any) -> nn.Dense:
    """The per-pixel classifier: float32 logits in any ``dtype``, the bias added to the float32
    product (:func:`precision.dot_general`), so its gradient sums float32 over the pixels."""
    return nn.Dense(
        num_classes, kernel_init=nn.initializers.normal(0.01), dtype=dtype,
        param_dtype=jnp.float32, dot_general=precision.dot_general(dtype), name="classifier",
    )  # fmt: skip


class LinearHead(nn.Module):
    """Per-position linear classifier on the last feature map, upsampled to the image."""

    num_classes: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, features: Sequence[jax.Array], image_hw: Sequence[int], *, train: bool):
        del train
        logits = _classifier(self.num_classes, self.dtype)(features[-1])
        return upsample_to(logits.astype(jnp.float32), image_hw)


class FPNHead(nn.Module):
    """Pyramid (simple on one map, FPN on several), a 3x3 conv + norm + ReLU per level, summed at
    the finest level, linear classifier, upsampled to the image. ``feature_strides``: the
    strides of the maps it is given, as the backbone's family declares them (None: read from
    the maps' sizes, :func:`feature_strides`)."""

    num_classes: int
    width: int = 64
    dtype: Any = jnp.float32
    feature_strides: tuple[int, ...] | None = None

    @nn.compact
    def __call__(self, features: Sequence[jax.Array], image_hw: Sequence[int], *, train: bool):
        del train
        if len(features) == 1:
            levels = SimpleFeaturePyramid(self.width, self.dtype, name="pyramid")(features[0])
            strides = [int(SIMPLE_SCALES[0] / scale) for scale in SIMPLE_SCALES]  # 1, 2, 4, 8
        else:  # (the simple pyramid's are relative to its finest level: only ratios are used)
            levels = FPN(self.width, self.dtype, name="pyramid")(features)
            strides = self.feature_strides or feature_strides(features, image_hw)
        finest = levels[0].shape[1:3]
        fused = 0.0
        for i, level in enumerate(levels):
            y = conv(self.width, 3, self.dtype, f"fuse{i}")(level)
            y = nn.relu(channel_norm(self.dtype, f"fuse{i}_norm")(y))
            fused = fused + upsample_by(y, strides[i] // strides[0], finest)
        logits = _classifier(self.num_classes, self.dtype)(fused)
        return upsample_to(logits.astype(jnp.float32), image_hw)


def pixel_weights(label_map: jax.Array, class_weights: jax.Array | None = None) -> jax.Array:
    """Each pixel's weight in the loss: its class's weight (1 without ``class_weights``), 0
    where the label is ignored."""
    valid = label_map != IGNORE_LABEL
    weight = valid.astype(jnp.float32)
    if class_weights is not None:
        weight = weight * class_weights[jnp.where(valid, label_map, 0)]
    return weight


def _pixel_normalisers(weights: jax.Array, label_map: jax.Array) -> dict[str, jax.Array]:
    """The loss's denominator, the pixels' weights summed (at least 1e-6), and the pixel
    accuracy's, the valid pixels (at least 1): the whole batch's under accumulation."""
    valid = (label_map != IGNORE_LABEL).sum()
    return {"pixels": jnp.maximum(weights.sum(), 1e-6), "valid": jnp.maximum(valid, 1)}


def pixel_losses(
    logits: jax.Array, label_map: jax.Array, *, label_smoothing: float = 0.0,
    class_weights: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:  # fmt: skip
    """Per-pixel (weighted cross-entropy, weight); both 0 where the label is ignored. As
    torch's ``cross_entropy(weight=w, label_smoothing=e)``: each class's share of the smoothed
    target is weighted by that class's weight (the label's alone without smoothing)."""
    valid = label_map != IGNORE_LABEL
    targets = jax.nn.one_hot(jnp.where(valid, label_map, 0), logits.shape[-1])
    targets = optax.smooth_labels(targets, label_smoothing)
    if class_weights is not None:
        targets = targets * class_weights
    xent = optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)
    return jnp.where(valid, xent, 0.0), pixel_weights(label_map, class_weights)


@flax.struct.dataclass
class TrainMetrics(metrics.Collection):
    loss: metrics.Average.from_output("loss")
    pixel_accuracy: metrics.Average.from_output("pixel_accuracy")
    grad_norm: metrics.Average.from_output("grad_norm")


def predicted_classes(outputs: jax.Array, label_map: jax.Array | None = None) -> jax.Array:
    """Each pixel's class: the argmax of its logits with NaN ranked lowest (``argmax`` alone
    takes a NaN as the highest). Given the labels, a pixel whose best logit is NaN (all NaN) is
    booked as a miss, predicted as the class after its label: a NaN logit is never correct."""
    predicted = nan_lowest(outputs).argmax(-1)
    if label_map is None:
        return predicted
    best = jnp.take_along_axis(outputs, predicted[..., None], axis=-1)[..., 0]
    return jnp.where(jnp.isnan(best), (label_map + 1) % outputs.shape[-1], predicted)


def _counted_loss(loss: jax.Array, counted: jax.Array, **_: Any) -> dict[str, jax.Array]:
    """The images' losses, averaged over those with a pixel that weighs: valid (not ignored)
    and of a class whose weight is not 0 (an image that is all ignore has no loss)."""
    return {"values": loss, "mask": counted}


@flax.struct.dataclass
class EvalMetrics(metrics.Collection):
    loss: metrics.Average.from_fun(_counted_loss)  # per image: mean over its valid pixels
    images: metrics.Average.from_output("images")  # its count: the real images
    confusion: ConfusionMatrix


@dataclasses.dataclass(frozen=True)
class Segmentation(Task):
    """``head``: ``linear`` or ``fpn``; ``decoder_width``: channels of the ``fpn`` decoder;
    ``feature_taps``: backbone taps (default: the last ViT block, or every CNN stage);
    ``class_weights``: one loss weight per class."""

    loss: str = "softmax_xent"
    label_smoothing: float = 0.0
    head: str = "linear"
    decoder_width: int = 64
    feature_taps: tuple[int, ...] | None = None
    class_weights: tuple[float, ...] | None = None

    name = "segmentation"
    target = "label_map"
    headline = "miou"
    metric_names = ("loss", "miou", "pixel_accuracy", "examples")
    per_class_metrics = ("iou",)
    per_class_absent = f"{ABSENT} (neither in the targets nor predicted)"
    train_metrics = TrainMetrics
    per_example = ("label_map",)

    def __post_init__(self) -> None:
        if self.loss != "softmax_xent":
            raise ValueError(f"Segmentation trains with loss='softmax_xent', not {self.loss!r}.")
        if self.head not in HEADS:
            raise ValueError(f"Unknown task.head {self.head!r}; valid: {', '.join(HEADS)}.")
        if self.head == "linear" and self.feature_taps is not None and len(self.feature_taps) > 1:
            raise ValueError(
                f"task.feature_taps {tuple(self.feature_taps)}: the linear head reads one feature "
                "map; give one tap, or task.head='fpn' to merge several."
            )
        check_interval("label_smoothing", self.label_smoothing, "[0, 1)")
        only_when("task", self, ("decoder_width",), self.head == "fpn", "to task.head='fpn'")

    def unmeasurable(self, name: str, source: Any) -> str | None:
        """``iou/<class>`` of a split whose label maps hold no pixel of the class is 0 where the
        model predicts the class, else left out: never a best. The label maps as stored tell (a
        class only in what the evaluation's crop cuts off passes); with maps that cannot be read,
        it is left to their error (:func:`~vision_jax.data.pipeline.check_examples`), unless
        ``skip_corrupt`` leaves them out of the validation too."""
        base, _, key = name.partition("/")
        classes = {class_key(n): (c, n) for c, n in enumerate(source.class_names)}
        if base not in self.per_class_metrics or key not in classes:
            return None
        from vision_jax.data.pipeline import label_map_pixels

        c, class_name = classes[key]
        pixels, unread = label_map_pixels(source)
        if pixels[c] or (unread and not source.skip_corrupt):  # the data's error comes first
            return None  # (check_examples names the maps, before the first validation)
        return (
            f"no label map of it holds a pixel of class {class_name!r} (its IoU is 0 where the "
            "model predicts it, else left out)"
        )

    def build_model(self, model_name: str, num_classes: int, **model_kwargs: Any) -> TaskModel:
        if self.class_weights is not None and len(self.class_weights) != num_classes:
            raise ValueError(
                f"task.class_weights has {len(self.class_weights)} entries for "
                f"{num_classes} classes."
            )
        backbone = feature_backbone(
            model_name, self.feature_taps, last_only=self.head == "linear", **model_kwargs
        )
        dtype = backbone.dtype
        if self.head == "linear":
            head = LinearHead(num_classes, dtype)
        else:
            taps_strides = pyramid_strides(backbone, model_name, "fpn head")
            head = FPNHead(num_classes, self.decoder_width, dtype, taps_strides)
        return TaskModel(backbone, head)

    def _weights(self) -> jax.Array | None:
        if self.class_weights is None:
            return None
        return jnp.asarray(self.class_weights, jnp.float32)

    def loss_normalisers(self, batch: Batch) -> dict[str, jax.Array]:
        label_map = batch["label_map"]
        return _pixel_normalisers(pixel_weights(label_map, self._weights()), label_map)

    def train_loss(
        self, outputs: jax.Array, batch: Batch, normalisers: dict | None = None
    ) -> tuple[jax.Array, dict]:
        label_map = batch["label_map"]
        losses, weights = pixel_losses(
            outputs, label_map, label_smoothing=self.label_smoothing,
            class_weights=self._weights(),
        )  # fmt: skip
        normalisers = normalisers or _pixel_normalisers(weights, label_map)
        loss = losses.sum() / normalisers["pixels"]
        correct = (predicted_classes(outputs, label_map) == label_map) & (label_map != IGNORE_LABEL)
        return loss, {"pixel_accuracy": correct.sum() / normalisers["valid"]}

    def eval_metrics(self, outputs: jax.Array, batch: Batch) -> EvalMetrics:
        label_map, real = batch["label_map"], batch["mask"] > 0
        losses, weights = pixel_losses(outputs, label_map, class_weights=self._weights())
        per_image = losses.sum((1, 2)) / jnp.maximum(weights.sum((1, 2)), 1e-6)
        valid = (label_map != IGNORE_LABEL) & real[:, None, None]
        return EvalMetrics.single_from_model_output(
            loss=per_image,
            counted=real & (weights.sum((1, 2)) > 0),
            images=real.astype(jnp.float32),
            mask=real,
            labels=jnp.where(valid, label_map, 0),
            predictions=predicted_classes(outputs, label_map),
            valid=valid,
            num_classes=outputs.shape[-1],
        )

    def summarize(self, collection: EvalMetrics, source: Any, prefix: str) -> dict[str, float]:
        summary = iou_summary(collection.confusion.compute())
        out = {
            f"{prefix}loss": float(collection.loss.compute()),
            f"{prefix}miou": summary["miou"],
            f"{prefix}pixel_accuracy": summary["pixel_accuracy"],
            f"{prefix}examples": float(collection.images.count),
        }
        for name, iou in zip(source.class_names, summary["iou"], strict=True):
            if not np.isnan(iou):
                out[f"{prefix}iou/{class_key(name)}"] = float(iou)
        return out

    def predict(self, outputs: jax.Array, image_hw: tuple[int, int]) -> dict[str, jax.Array]:
        del image_hw  # the label map from the logits, as the evaluation's (no softmax needed)
        probs = jax.nn.softmax(outputs.astype(jnp.float32))
        return {"label_map": predicted_classes(outputs), "probabilities": probs}
