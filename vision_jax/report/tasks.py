"""The task-specific part of a report: an evaluator per task turns the trained model's
predictions on the evaluation split into an :class:`Evaluation` (headline, per-class table,
confusion matrix, hardest examples). A task plugs in with one entry in :data:`EVALUATORS`."""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Iterable, Sequence

import numpy as np

from vision_jax import data as data_lib
from vision_jax.metrics import iou_summary
from vision_jax.report.figures import Thumb
from vision_jax.report.tables import Table, classification_table, confusion, segmentation_table
from vision_jax.tasks.coco_eval import coco_metrics, coco_results
from vision_jax.trained import Trained

Pairs = Iterable[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]]


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """What a task's evaluator found on the split: the headline metric, the number of
    examples, and optionally a per-class table, a confusion matrix (``unit``: what it counts)
    and the hardest examples (thumbnails, a table of them and a caption saying what they
    show)."""

    headline: float
    examples: int
    table: Table | None = None
    confusion: np.ndarray | None = None
    unit: str = "examples"
    hardest: list[Thumb] = dataclasses.field(default_factory=list)
    hardest_table: Table | None = None
    hardest_caption: str = ""
    notes: list[str] = dataclasses.field(default_factory=list)


class Lowest:
    """The ``n`` examples with the lowest score seen so far (ties: the earlier one), each as
    ``make(i)`` = (thumbnail, table row) of row ``i`` of the batch offered."""

    def __init__(self, n: int):
        self.n, self.seen, self.kept = n, 0, []

    def offer(self, scores: np.ndarray, make: Callable[[int], tuple[Thumb, list]]) -> None:
        for i in np.argsort(scores, kind="stable")[: self.n]:
            self.kept.append((float(scores[i]), self.seen + int(i), *make(int(i))))
        self.kept = sorted(self.kept, key=lambda k: k[:2])[: self.n]
        self.seen += len(scores)

    def thumbs(self) -> list[Thumb]:
        return [thumb for _, _, thumb, _ in self.kept]

    def table(self, columns: Sequence[str]) -> Table:
        """The kept examples' rows, each led by its position in the split."""
        return Table(("index", *columns), [[index, *row] for _, index, _, row in self.kept], [])


def pixels(image: np.ndarray, spec: data_lib.InputSpec) -> np.ndarray:
    """A normalised model input back to RGB uint8, with the run's mean and std."""
    rgb = (np.asarray(image, np.float32) * np.asarray(spec.std) + np.asarray(spec.mean)) * 255
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def _real(batch: dict[str, np.ndarray], outputs: dict[str, np.ndarray]) -> tuple[dict, dict]:
    """The batch and outputs without padding rows."""
    keep = np.asarray(batch["mask"]) > 0
    real = lambda arrays: {k: np.asarray(v)[keep] for k, v in arrays.items()}
    return real(batch), real(outputs)


def _class_example(batch, probs, names, spec, i) -> tuple[Thumb, list]:
    true, guess = int(batch["label"][i]), int(probs[i].argmax())
    p_true, p_guess = float(probs[i, true]), float(probs[i, guess])
    title = f"true {names[true]} ({p_true:.2f})\npredicted {names[guess]} ({p_guess:.2f})"
    row = [names[true], names[guess], p_true, p_guess]
    return Thumb(pixels(batch["image"][i], spec), title), row


def classification(trained: Trained, source: data_lib.Source, pairs: Pairs, n: int) -> Evaluation:
    """Per-class precision / recall / F1, the confusion matrix over examples, and the examples
    with the lowest probability on their true label."""
    names = trained.class_names
    matrix = np.zeros((len(names), len(names)), np.int64)
    lowest = Lowest(n)
    for batch, outputs in pairs:
        batch, outputs = _real(batch, outputs)
        probs, labels = outputs["probabilities"], batch["label"].astype(np.int64)
        matrix += confusion(labels, probs.argmax(-1), len(names))
        make = functools.partial(_class_example, batch, probs, names, trained.input)
        lowest.offer(probs[np.arange(len(labels)), labels], make)
    columns = ("true", "predicted", "probability of true", "probability of predicted")
    return Evaluation(
        headline=float(np.trace(matrix) / max(matrix.sum(), 1)), examples=int(matrix.sum()),
        table=classification_table(matrix, names), confusion=matrix,
        hardest=lowest.thumbs(), hardest_table=lowest.table(columns),
        hardest_caption="The examples with the lowest probability on their true label: true "
        "and predicted class, with their probabilities.",
    )  # fmt: skip


def _pixel_example(batch, found, valid, accuracy, spec, i) -> tuple[Thumb, list]:
    """The image beside its errors: dark where right, red where wrong, grey where ignored."""
    image = pixels(batch["image"][i], spec)
    errors = np.full_like(image, 128)
    errors[valid[i]] = 30
    errors[valid[i] & (found[i] != batch["label_map"][i])] = (220, 30, 30)
    gap = np.full((image.shape[0], max(1, image.shape[1] // 16), 3), 255, np.uint8)
    thumb = Thumb(np.concatenate([image, gap, errors], 1), f"pixel accuracy {accuracy[i]:.2f}")
    return thumb, [float(accuracy[i]), int(valid[i].sum())]


def segmentation(trained: Trained, source: data_lib.Source, pairs: Pairs, n: int) -> Evaluation:
    """Per-class IoU and accuracy, the confusion matrix over every valid pixel, and the images
    with the lowest pixel accuracy, each beside its errors."""
    names = trained.class_names
    matrix = np.zeros((len(names), len(names)), np.int64)
    lowest, examples = Lowest(n), 0
    for batch, outputs in pairs:
        batch, outputs = _real(batch, outputs)
        truth, found = batch["label_map"], outputs["label_map"]
        valid = truth != data_lib.IGNORE_LABEL
        matrix += confusion(truth[valid], found[valid], len(names))
        right, counted = ((truth == found) & valid).sum((1, 2)), valid.sum((1, 2))
        accuracy = np.where(counted > 0, right / np.maximum(counted, 1), 1.0)
        lowest.offer(
            accuracy,
            functools.partial(_pixel_example, batch, found, valid, accuracy, trained.input),
        )
        examples += len(truth)
    return Evaluation(
        headline=iou_summary(matrix)["miou"], examples=examples,
        table=segmentation_table(matrix, names), confusion=matrix,
        unit="pixels", hardest=lowest.thumbs(),
        hardest_table=lowest.table(("pixel accuracy", "pixels")),
        hardest_caption="The images with the lowest pixel accuracy, each beside its errors "
        "(dark: right, red: wrong, grey: ignored).",
    )  # fmt: skip


def detection(trained: Trained, source: data_lib.Source, pairs: Pairs, n: int) -> Evaluation:
    """Per-class COCO AP@[.5:.95] by pycocotools on the split's ground truth."""
    del trained, n
    parts = {"boxes": [], "scores": [], "classes": [], "image_ids": []}
    for batch, outputs in pairs:
        batch, outputs = _real(batch, outputs)
        parts["boxes"].append(outputs["boxes"] / batch["scale"][:, None, None])
        parts["scores"].append(outputs["scores"])
        parts["classes"].append(outputs["classes"])
        parts["image_ids"].append(batch["image_id"])
    found = {k: np.concatenate(v) for k, v in parts.items()}
    seen = sorted({int(i) for i in found["image_ids"]})
    results = coco_results(found, source.category_ids)
    figures = coco_metrics(source.annotations, results, seen, source.class_names)
    rows = [
        [name, figures.get(f"ap/{name.replace('/', '_')}", math.nan)] for name in source.class_names
    ]
    table = Table(("class", "ap"), rows, [["mean (mAP)", figures["map"]]])
    note = "No confusion matrix or hardest examples for detection; AP is empty for classes "
    note += "without ground truth in the split."
    return Evaluation(figures["map"], len(seen), table=table, notes=[note])


EVALUATORS: dict[str, Callable[[Trained, data_lib.Source, Pairs, int], Evaluation]] = {
    "classification": classification,
    "segmentation": segmentation,
    "detection": detection,
}


def evaluate(trained: Trained, source: data_lib.Source, n: int) -> Evaluation | None:
    """The task's evaluation of ``trained`` on ``source`` (None: the task has no evaluator),
    with ``n`` hardest examples."""
    evaluator = EVALUATORS.get(trained.task.name)
    if evaluator is None:
        return None
    batches = data_lib.eval_batches(
        source, trained.input, global_batch=trained.spec.eval_batch_size,
        **trained.task.batch_args(),
    )  # fmt: skip
    return evaluator(trained, source, trained.predict_batches(batches), n)
