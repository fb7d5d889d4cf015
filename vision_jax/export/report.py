"""What quantisation costs: each TFLite form of a run on its evaluation split, against float32.

For each form (float32, float16, dynamic-range int8, full-integer int8): the flatbuffer's size,
its accuracy (top-1; pixel accuracy for segmentation, and its mean IoU, which shows damage to
small classes that pixel accuracy hides) and the change from float32, the share of predictions
(images, or pixels) equal to float32's, and the median latency of one batch.
"""

from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING

import jax
import numpy as np

from vision_jax.data import IGNORE_LABEL
from vision_jax.export.images import split_images
from vision_jax.export.serving import ExportError, Servable
from vision_jax.export.tflite import (
    QUANTIZATIONS,
    TFLiteModel,
    calibration_count,
    in_float32,
    to_tflite,
)
from vision_jax.metrics import argmax_nan_lowest, iou_summary
from vision_jax.tasks import Task, library_kind

if TYPE_CHECKING:
    from vision_jax.trained import Trained

FORM_NAMES = {
    "none": "float32",
    "float16": "float16",
    "dynamic_int8": "dynamic-range int8",
    "full_int8": "full-integer int8",
}


@dataclasses.dataclass(frozen=True)
class FormResult:
    quantize: str
    size_bytes: int
    accuracy: float
    accuracy_change: float  # against float32
    agreement: float  # predictions equal to float32's
    latency_ms: float  # median, one batch
    miou: float | None = None  # segmentation: mean IoU over the split's pixels
    miou_change: float | None = None  # against float32


def _predict(model: TFLiteModel, images: np.ndarray) -> tuple[np.ndarray, float]:
    """Class predictions (argmax of the probabilities, NaN lowest) for ``images`` in batches of
    the model's size (the last one padded), and the median milliseconds per batch."""
    predictions, times = [], []
    for start in range(0, len(images), model.batch):
        chunk = images[start : start + model.batch]
        padding = np.zeros((model.batch - len(chunk), *images.shape[1:]), images.dtype)
        padded = np.concatenate([chunk, padding])
        t0 = time.perf_counter()
        probabilities = model(padded)["probabilities"]
        times.append(time.perf_counter() - t0)
        predictions.append(argmax_nan_lowest(probabilities[: len(chunk)]))  # NaN lowest
    return np.concatenate(predictions), 1e3 * float(np.median(times))


class _FloatModel:
    """The float model ``servable`` run in JAX on batches of ``batch`` images, called as
    :class:`TFLiteModel` is (its float32 TFLite form computes the same to 1e-4)."""

    def __init__(self, servable: Servable, batch: int):
        self.batch, self._variables = batch, servable.variables
        self._apply = jax.jit(servable.apply)

    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
        return jax.tree.map(np.asarray, self._apply(self._variables, images))


def _agreement(predictions: np.ndarray, reference: np.ndarray) -> float:
    """The share of ``predictions`` (image classes, or pixel labels) equal to ``reference``'s."""
    return float(np.mean(predictions == reference))


def float_agreement(servable: Servable, content: bytes, images: np.ndarray) -> float:
    """The agreement of the TFLite flatbuffer ``content`` (a quantised ``servable``) with the
    float32 ``servable`` on ``images``: the share of top-1 classes (segmentation: of pixel
    labels) equal, as :func:`quantization_report` measures it against float32 TFLite."""
    model = TFLiteModel(content)
    quantised, _ = _predict(model, images)
    reference, _ = _predict(_FloatModel(servable, model.batch), images)
    return _agreement(quantised, reference)


def _accuracy(predictions: np.ndarray, targets: np.ndarray) -> float:
    counted = targets != IGNORE_LABEL if targets.ndim > 1 else np.ones(targets.shape, bool)
    return float(np.mean(predictions[counted] == targets[counted]))


def _miou(predictions: np.ndarray, targets: np.ndarray, num_classes: int) -> float:
    """Mean IoU of label-map ``predictions`` against ``targets`` (ignored pixels left out), as
    the segmentation evaluation computes it (:func:`vision_jax.metrics.iou_summary`)."""
    counted = targets != IGNORE_LABEL
    pairs = num_classes * targets[counted].astype(np.int64) + predictions[counted]
    matrix = np.bincount(pairs, minlength=num_classes**2).reshape(num_classes, num_classes)
    return float(iou_summary(matrix)["miou"])


@dataclasses.dataclass(frozen=True)
class QuantizationReport:
    rows: list[FormResult]
    batch: int
    examples: int

    def table(self) -> str:
        """The rows as a text table."""
        segmentation = self.rows[0].miou is not None
        miou_header = f" {'mIoU':>7} {'change':>8}" if segmentation else ""
        lines = [
            f"{'form':<20} {'size MiB':>9} {'accuracy':>9} {'change':>8} {'agreement':>10} "
            f"{f'ms/batch of {self.batch}':>16}{miou_header}"
        ]
        for r in self.rows:
            lines.append(
                f"{FORM_NAMES[r.quantize]:<20} {r.size_bytes / 2**20:>9.2f} {r.accuracy:>9.4f} "
                f"{r.accuracy_change:>+8.4f} {r.agreement:>10.4f} {r.latency_ms:>16.2f}"
                + (f" {r.miou:>7.4f} {r.miou_change:>+8.4f}" if segmentation else "")
            )
        lines.append(
            f"({self.examples} evaluation examples; change: accuracy minus float32's; "
            "agreement: share of predictions equal to float32's)"
        )
        return "\n".join(lines)


def check_comparable(task: Task) -> None:
    """Raises for a task whose TFLite forms :func:`quantization_report` cannot compare: one of
    one's own (accuracy and agreement count classes, or pixel labels, of a library task)."""
    if library_kind(task) is None:
        raise ExportError(
            f"Comparing TFLite quantisations (--evaluate) counts right and agreeing top-1 "
            f"classes (segmentation: pixel labels); the task {task.name!r} is one of your own, "
            "whose outputs it cannot read: compare its forms' outputs yourself "
            "(vision_jax.export.TFLiteModel runs one)."
        )


def quantization_report(
    trained: Trained,
    *,
    batch: int = 1,
    examples: int | None = None,
    calibration: int | None = None,
    threads: int | None = None,
) -> QuantizationReport:
    """Every TFLite form of the run ``trained`` (a :class:`vision_jax.trained.Trained`) at
    ``batch`` images, on its evaluation split (all of it, or ``examples`` drawn at random);
    full-integer ranges calibrated on ``calibration`` images of its training split (by default
    as the export calibrates: :func:`vision_jax.export.tflite.calibration_count`); a task of
    one's own is refused (:func:`check_comparable`)."""
    check_comparable(trained.task)
    trained = in_float32(trained)  # as exported to TFLite
    servable = Servable.from_trained(trained)
    data = trained.spec.data
    images, targets = split_images(trained, data.eval_split, count=examples)
    if calibration is None:
        calibration = calibration_count(batch)
    representative, _ = split_images(trained, data.train_split, count=calibration)
    forms = []
    for quantize in QUANTIZATIONS:
        content = to_tflite(servable, batch=batch, quantize=quantize, representative=representative)
        predictions, latency = _predict(TFLiteModel(content, threads=threads), images)
        forms.append((quantize, len(content), predictions, latency))
    reference = forms[0][2]
    base = _accuracy(reference, targets)
    miou = None
    if library_kind(trained.task) == "segmentation":
        miou = lambda predictions: _miou(predictions, targets, len(trained.class_names))
        base_miou = miou(reference)
    rows = []
    for quantize, size, predictions, latency in forms:
        accuracy, agreement = _accuracy(predictions, targets), _agreement(predictions, reference)
        ious = (None, None)
        if miou is not None:
            value = miou(predictions)
            ious = (value, value - base_miou)
        rows.append(
            FormResult(quantize, size, accuracy, accuracy - base, agreement, latency, *ious)
        )
    return QuantizationReport(rows, batch, len(images))
