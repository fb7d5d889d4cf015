"""Per-class tables of a confusion matrix (classification, segmentation) and their CSV files."""

from __future__ import annotations

import csv
import dataclasses
import math
import pathlib
from collections.abc import Sequence

import numpy as np

from vision_jax.metrics import iou_summary


@dataclasses.dataclass(frozen=True)
class Table:
    """Rows of ``[name, value, ...]`` under ``columns``; ``totals`` are the summary rows (averages,
    accuracy) below them. A value is a float (NaN: undefined, an empty CSV cell) or None."""

    columns: tuple[str, ...]
    rows: list[list]
    totals: list[list]


def confusion(labels: np.ndarray, predicted: np.ndarray, num_classes: int) -> np.ndarray:
    """``matrix[true, predicted]`` counts (int64) of equal-length integer arrays."""
    index = np.asarray(labels, np.int64) * num_classes + np.asarray(predicted, np.int64)
    counts = np.bincount(index.reshape(-1), minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def _ratio(top: np.ndarray, bottom: np.ndarray) -> np.ndarray:
    """``top / bottom``, 0 where ``bottom`` is 0 (scikit-learn's ``zero_division=0``)."""
    return np.where(bottom > 0, top / np.maximum(bottom, 1), 0.0)


def classification_table(matrix: np.ndarray, class_names: Sequence[str]) -> Table:
    """Precision, recall, F1 and support per class, their macro and support-weighted averages
    and the accuracy, laid out as scikit-learn's ``classification_report`` (the accuracy row
    holds the accuracy under ``f1-score`` and the total support). A class neither in the
    labels nor predicted has no scores and stays out of the macro average, as scikit-learn's
    default ``labels`` leave it out (and torchmetrics' macro average)."""
    matrix = np.asarray(matrix, np.float64)
    tp, support, predicted = np.diag(matrix), matrix.sum(1), matrix.sum(0)
    precision, recall = _ratio(tp, predicted), _ratio(tp, support)
    f1 = _ratio(2 * tp, support + predicted)
    total, seen = support.sum(), (support + predicted) > 0
    weights = support / total if total else np.zeros_like(support)
    rows = [
        [name, *((p, r, f) if present else (None,) * 3), int(s)]
        for name, p, r, f, s, present in zip(
            class_names, precision, recall, f1, support, seen, strict=True
        )
    ]
    macro = [float(v[seen].mean()) if seen.any() else 0.0 for v in (precision, recall, f1)]
    totals = [
        ["accuracy", None, None, float(tp.sum() / total) if total else 0.0, int(total)],
        ["macro avg", *macro, int(total)],
        ["weighted avg", weights @ precision, weights @ recall, weights @ f1, int(total)],
    ]
    return Table(("class", "precision", "recall", "f1-score", "support"), rows, totals)


def segmentation_table(matrix: np.ndarray, class_names: Sequence[str]) -> Table:
    """IoU, accuracy (the share of the class's pixels predicted as it) and pixel count per
    class; the mean over classes present (mIoU) and the pixel accuracy over all pixels."""
    summary = iou_summary(matrix)
    matrix = np.asarray(matrix, np.float64)
    support = matrix.sum(1)
    accuracy = np.where(support > 0, np.diag(matrix) / np.maximum(support, 1), np.nan)
    rows = [
        [name, iou, acc, int(s)]
        for name, iou, acc, s in zip(class_names, summary["iou"], accuracy, support, strict=True)
    ]
    mean_acc = float(np.nanmean(accuracy)) if (support > 0).any() else 0.0
    totals = [
        ["mean", summary["miou"], mean_acc, int(support.sum())],
        ["all pixels", None, summary["pixel_accuracy"], int(support.sum())],
    ]
    return Table(("class", "iou", "accuracy", "pixels"), rows, totals)


def csv_cell(value: object) -> object:
    """A CSV cell: floats at full precision, NaN and None empty."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return repr(float(value)) if isinstance(value, float | np.floating) else value


def write_table(table: Table, path: pathlib.Path) -> None:
    with path.open("w", newline="", encoding="utf-8", errors="surrogateescape") as f:
        writer = csv.writer(f)
        writer.writerow(table.columns)
        for row in table.rows + table.totals:
            writer.writerow([csv_cell(v) for v in row])


def write_confusion(matrix: np.ndarray, class_names: Sequence[str], path: pathlib.Path) -> None:
    """The matrix with the class names as row (true) and column (predicted) headers."""
    with path.open("w", newline="", encoding="utf-8", errors="surrogateescape") as f:
        writer = csv.writer(f)
        writer.writerow(["true \\ predicted", *class_names])
        for name, row in zip(class_names, np.asarray(matrix), strict=True):
            writer.writerow([name, *(int(v) for v in row)])
