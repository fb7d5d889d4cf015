"""Metrics shared by the tasks (clu), and turning computed collections into scalars."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping

import flax
import jax
import jax.numpy as jnp
import numpy as np
from clu import metrics


def nan_lowest(x: jax.Array) -> jax.Array:
    """``x`` with NaN as -inf, before ranking scores or logits (``argmax`` takes any NaN as the
    highest, ``lax.top_k`` a NaN whose sign bit is clear), so a NaN never beats a number."""
    return jnp.where(jnp.isnan(x), -jnp.inf, x)


def nan_lowest_np(x: np.ndarray) -> np.ndarray:
    """:func:`nan_lowest` in numpy, for rankings on the host (predict, the report, the export's
    report), so that they agree with the jitted metrics."""
    x = np.asarray(x)
    return np.where(np.isnan(x), -np.inf, x)


def argmax_nan_lowest(x: np.ndarray, labels: np.ndarray | None = None) -> np.ndarray:
    """The argmax over the last axis with NaN ranked lowest (numpy's ``argmax`` takes a NaN as
    the highest: an all-NaN softmax row was class 0). Given ``labels``, a row whose best is NaN
    (all NaN) is booked as a miss, the class after its label, as the eval metrics count it
    (:func:`vision_jax.tasks.segmentation.predicted_classes`)."""
    x = np.asarray(x)
    predicted = nan_lowest_np(x).argmax(-1)
    if labels is None:
        return predicted
    best = np.take_along_axis(x, predicted[..., None], axis=-1)[..., 0]
    return np.where(np.isnan(best), (np.asarray(labels) + 1) % x.shape[-1], predicted)


@flax.struct.dataclass
class ConfusionMatrix(metrics.Metric):
    """Counts ``matrix[true, predicted]`` over every valid pixel (or example) seen.

    Per batch the counts are int32 (inside the jitted step); merged on the host they are int64,
    so a whole split is counted exactly. ``compute()`` returns the matrix.
    """

    matrix: jax.Array

    @classmethod
    def from_model_output(
        cls, *, labels: jax.Array, predictions: jax.Array, valid: jax.Array, num_classes: int,
        **_,
    ) -> ConfusionMatrix:  # fmt: skip
        index = jnp.where(valid, labels * num_classes + predictions, 0).reshape(-1)
        counts = jnp.zeros(num_classes * num_classes, jnp.int32)
        counts = counts.at[index].add(valid.reshape(-1).astype(jnp.int32))
        return cls(counts.reshape(num_classes, num_classes))

    def merge(self, other: ConfusionMatrix) -> ConfusionMatrix:
        return type(self)(np.asarray(self.matrix, np.int64) + np.asarray(other.matrix, np.int64))

    def compute(self) -> np.ndarray:
        return np.asarray(self.matrix, np.int64)


def iou_summary(matrix: np.ndarray) -> dict[str, object]:
    """Mean IoU, pixel accuracy and per-class IoU of a confusion matrix (rows: truth).

    IoU of class c is ``TP / (TP + FP + FN)``; classes that neither occur nor are predicted
    (union 0) have no IoU and are left out of the mean (mmsegmentation's ``nanmean``).
    """
    matrix = np.asarray(matrix, np.float64)
    tp = np.diag(matrix)
    union = matrix.sum(0) + matrix.sum(1) - tp
    present = union > 0
    iou = np.where(present, tp / np.maximum(union, 1), np.nan)
    total = matrix.sum()
    return {
        "miou": float(iou[present].mean()) if present.any() else 0.0,
        "pixel_accuracy": float(tp.sum() / total) if total else 0.0,
        "iou": iou,
    }


def scalars(collection: metrics.Collection, prefix: str) -> dict[str, float]:
    """``{prefix + name: float}`` of a computed collection, for writers and logs."""
    return {f"{prefix}{k}": float(v) for k, v in collection.compute().items()}


def json_line(results: Mapping[str, float]) -> str:
    """Metrics as one line of valid JSON, to 6 significant digits (counts exact; non-finite
    values as null): what the commands print."""

    def clean(v: float) -> float | None:
        if not math.isfinite(v):
            return None
        return v if v.is_integer() else float(f"{v:.6g}")

    return json.dumps({k: clean(float(v)) for k, v in sorted(results.items())})
