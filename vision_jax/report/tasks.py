"""The task-specific part of a report: an evaluator per task turns the trained model's
predictions on the evaluation split, batch by batch, into an :class:`Evaluation` (headline,
per-class table, confusion matrix, hardest examples). A task plugs in with one entry in
:data:`EVALUATORS`. The predictions come from the saved model (:func:`evaluate`) or from the
training run's own final evaluation (:class:`FinalEvaluation`)."""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from vision_jax import data as data_lib
from vision_jax.data.boxes import box_table
from vision_jax.drawing import draw_boxes, labels_drawable
from vision_jax.metrics import argmax_nan_lowest, iou_summary, nan_lowest_np
from vision_jax.report.figures import Thumb
from vision_jax.report.tables import Table, classification_table, confusion, segmentation_table
from vision_jax.tasks import library_kind
from vision_jax.tasks.base import class_key
from vision_jax.tasks.boxes import box_area, pairwise_intersection, pairwise_iou
from vision_jax.tasks.coco_eval import (
    coco_evaluation,
    coco_figures,
    coco_results,
    precision_at_50,
)
from vision_jax.trained import Trained

logger = logging.getLogger(__name__)

Arrays = dict[str, np.ndarray]


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
    # detection's precision-recall curves, (recall, precision): the mean over the classes with
    # ground truth, and class name -> its curve (kept apart: a class may be named "mean")
    pr_mean: tuple[np.ndarray, np.ndarray] | None = None
    pr_curves: dict[str, tuple[np.ndarray, np.ndarray]] = dataclasses.field(default_factory=dict)


class Lowest:
    """The ``n`` examples with the lowest score seen so far (ties: the earlier one), each as
    ``make(i)`` = (thumbnail, table row) of row ``i`` of the batch offered, made only for an
    example that is kept when offered (a detection thumbnail takes ~0.1 s to draw)."""

    def __init__(self, n: int, source: Any = None):
        self.n, self.kept = n, []
        columns = getattr(source, "columns", None) or {}
        self.paths = columns.get("path")  # files of a file source, by source row
        self.file_names = getattr(source, "file_names", None)  # a tfds split's, where it has them

    def offer(
        self, scores: np.ndarray, rows: np.ndarray, make: Callable[[int], tuple[Thumb, list]]
    ) -> None:
        """``scores`` of a batch's examples (a NaN lowest), ``rows``: their rows in the source."""
        scores = nan_lowest_np(np.asarray(scores, np.float64))
        offered = [((float(scores[i]), int(rows[i])), int(i)) for i in range(len(scores))]
        kept = [(k[:2], k) for k in self.kept]
        merged = sorted(kept + offered, key=lambda entry: entry[0])[: self.n]  # scores first
        self.kept = [k if isinstance(k, tuple) else (*key, *make(k)) for key, k in merged]

    def thumbs(self) -> list[Thumb]:
        return [thumb for _, _, thumb, _ in self.kept]

    def table(self, columns: Sequence[str]) -> Table:
        """The kept examples' rows, each led by its row in the split and, for a file source,
        its file."""
        paths = self.paths
        if paths is None and self.file_names is not None and self.kept:
            paths = self._tfds_names()
        if paths is None:
            return Table(("index", *columns), [[i, *row] for _, i, _, row in self.kept], [])
        rows = [[i, str(paths[i]), *row] for _, i, _, row in self.kept]
        return Table(("index", "file", *columns), rows, [])

    def _tfds_names(self) -> dict[int, str]:
        """The kept rows' file names from a tfds split's ``image/filename`` feature, read up to
        the last of them."""
        wanted, names = {i for _, i, _, _ in self.kept}, {}
        for i, name in enumerate(self.file_names.take(max(wanted) + 1).as_numpy_iterator()):
            if i in wanted:
                names[i] = name.decode("utf-8", "replace")
        return names


def pixels(image: np.ndarray, spec: data_lib.InputSpec) -> np.ndarray:
    """A normalised model input back to RGB uint8, with the run's mean and std."""
    rgb = (np.asarray(image, np.float32) * np.asarray(spec.std) + np.asarray(spec.mean)) * 255
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def _real(batch: dict[str, np.ndarray], outputs: dict[str, np.ndarray]) -> tuple[dict, dict]:
    """The batch and outputs without padding rows."""
    keep = np.asarray(batch["mask"]) > 0
    real = lambda arrays: {k: np.asarray(v)[keep] for k, v in arrays.items()}
    return real(batch), real(outputs)


TITLE_NAME_CHARS = 20  # a class name in a thumbnail's title (the tables hold it whole)


def _short(name: str) -> str:
    """``name`` cut to fit a thumbnail's title (long names overlapped the next thumbnail)."""
    return name if len(name) <= TITLE_NAME_CHARS else name[: TITLE_NAME_CHARS - 1] + "…"


def _class_example(batch, probs, predicted, names, spec, i) -> tuple[Thumb, list]:
    true, guess = int(batch["label"][i]), int(predicted[i])  # as the confusion matrix books it
    p_true, p_guess = float(probs[i, true]), float(probs[i, guess])
    title = (f"true {_short(names[true])} ({p_true:.2f})\n"
             f"predicted {_short(names[guess])} ({p_guess:.2f})")  # fmt: skip
    indexed = f"true #{true} ({p_true:.2f})\npredicted #{guess} ({p_guess:.2f})"
    row = [names[true], names[guess], p_true, p_guess]
    return Thumb(pixels(batch["image"][i], spec), title, indexed), row


class Classification:
    """Per-class precision / recall / F1, the confusion matrix over examples, and the examples
    with the lowest probability on their true label."""

    def __init__(self, names: list[str], spec: data_lib.InputSpec, source: Any, n: int):
        self.names, self.spec = names, spec
        self.matrix = np.zeros((len(names), len(names)), np.int64)
        self.lowest = Lowest(n, source)

    def add(self, batch: Arrays, outputs: Arrays) -> None:
        batch, outputs = _real(batch, outputs)
        probs, labels = outputs["probabilities"], batch["label"].astype(np.int64)
        predicted = argmax_nan_lowest(probs, labels)  # all NaN: a miss, as the eval metrics
        self.matrix += confusion(labels, predicted, len(self.names))
        make = functools.partial(_class_example, batch, probs, predicted, self.names, self.spec)
        self.lowest.offer(probs[np.arange(len(labels)), labels], batch["row"], make)

    def result(self) -> Evaluation:
        matrix = self.matrix
        columns = ("true", "predicted", "probability of true", "probability of predicted")
        return Evaluation(
            headline=float(np.trace(matrix) / max(matrix.sum(), 1)), examples=int(matrix.sum()),
            table=classification_table(matrix, self.names), confusion=matrix,
            hardest=self.lowest.thumbs(), hardest_table=self.lowest.table(columns),
            hardest_caption="The examples with the lowest probability on their true label, as "
            "the model saw them (its input: resized and centre-cropped as evaluation does): true "
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


class Segmentation:
    """Per-class IoU and accuracy, the confusion matrix over every valid pixel, and the images
    with the lowest pixel accuracy, each beside its errors."""

    def __init__(self, names: list[str], spec: data_lib.InputSpec, source: Any, n: int):
        self.names, self.spec = names, spec
        self.matrix = np.zeros((len(names), len(names)), np.int64)
        self.lowest, self.examples = Lowest(n, source), 0

    def add(self, batch: Arrays, outputs: Arrays) -> None:
        batch, outputs = _real(batch, outputs)
        truth, found = batch["label_map"], outputs["label_map"]
        valid = truth != data_lib.IGNORE_LABEL
        self.matrix += confusion(truth[valid], found[valid], len(self.names))
        right, counted = ((truth == found) & valid).sum((1, 2)), valid.sum((1, 2))
        accuracy = np.where(counted > 0, right / np.maximum(counted, 1), 1.0)
        make = functools.partial(_pixel_example, batch, found, valid, accuracy, self.spec)
        self.lowest.offer(accuracy, batch["row"], make)
        self.examples += len(truth)

    def result(self) -> Evaluation:
        return Evaluation(
            headline=iou_summary(self.matrix)["miou"], examples=self.examples,
            table=segmentation_table(self.matrix, self.names), confusion=self.matrix,
            unit="pixels", hardest=self.lowest.thumbs(),
            hardest_table=self.lowest.table(("pixel accuracy", "pixels")),
            hardest_caption="The images with the lowest pixel accuracy, as the model saw them "
            "(its input: resized as evaluation does), each beside its errors (dark: right, red: "
            "wrong, grey: ignored).",
        )  # fmt: skip


FOUND_AT = 0.5  # a detection's score: drawn, and finding a ground-truth box it overlaps
MATCH_IOU = 0.5  # the overlap with a ground-truth box of its class that finds it
TRUTH_COLOUR, FOUND_COLOUR = (0, 255, 0), (255, 64, 64)
PR_CLASSES_UP_TO = 10  # classes with ground truth: a curve each, beside the mean


def _xywh(box: np.ndarray) -> list[float]:
    return [*box[:2], *(box[2:] - box[:2])]


@dataclasses.dataclass(frozen=True)
class _Image:
    """One image's ground truth (non-crowd), its crowd regions and its detections scoring at
    least :data:`FOUND_AT`, in model-input pixels: which boxes none of them found, and which of
    them found nothing."""

    truth: np.ndarray  # [T, 4]
    truth_classes: np.ndarray  # [T]
    found: np.ndarray  # [F, 4]
    found_classes: np.ndarray  # [F]
    scores: np.ndarray  # [F]
    crowd: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros((0, 4), np.float32))
    crowd_classes: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int64))

    @functools.cached_property
    def _matched(self) -> tuple[np.ndarray, np.ndarray]:
        """(each ground-truth box found, each detection that found one), matched as COCO
        matches: each detection, the highest-scoring first, finds the unfound box of its class
        it overlaps most (IoU >= :data:`MATCH_IOU`), so one detection over two boxes finds one."""
        same = self.truth_classes[:, None] == self.found_classes[None, :]
        ious = np.where(same, pairwise_iou(self.truth, self.found), 0.0)
        found, finding = np.zeros(len(self.truth), bool), np.zeros(len(self.found), bool)
        for j in np.argsort(-self.scores, kind="stable"):
            open_ious = np.where(found, 0.0, ious[:, j])
            if open_ious.size and open_ious.max() >= MATCH_IOU:
                found[open_ious.argmax()] = finding[j] = True
        return found, finding

    @property
    def missed(self) -> np.ndarray:
        """The ground-truth boxes no detection found."""
        return ~self._matched[0]

    @functools.cached_property
    def false(self) -> np.ndarray:
        """The detections that found no box and do not lie on a crowd region of their class
        (at least :data:`MATCH_IOU` of their area on it: COCO ignores those)."""
        area = np.maximum(box_area(self.found), 1e-12)[:, None]
        share = pairwise_intersection(self.found, self.crowd) / area
        same = self.found_classes[:, None] == self.crowd_classes[None, :]
        return ~self._matched[1] & ~(same & (share >= MATCH_IOU)).any(1)

    @property
    def recall(self) -> float:
        return 1.0 - float(self.missed.mean()) if len(self.truth) else 1.0

    @property
    def f1(self) -> float:
        """2 x found / (2 x found + missed + false): 1 for an image without errors."""
        errors = int(self.missed.sum() + self.false.sum())
        hits = 2 * int((~self.missed).sum())
        return hits / (hits + errors) if errors else 1.0


def _box_example(batch, images, names, named, spec, i) -> tuple[Thumb, list]:
    """The image as the model saw it with its detections (red, class and score) and its ground
    truth (green, class below), titled with the boxes found, the false detections and the
    classes missed; not ``named``: classes by index (``#k``) in the image and its title."""
    image = images[i]
    label = lambda c: names[c] if named else f"#{c}"
    found = zip(image.found, image.found_classes, image.scores, strict=True)
    found = [(_xywh(b), FOUND_COLOUR, f"{label(c)} {s:.2f}") for b, c, s in found]
    truth = [(_xywh(b), TRUTH_COLOUR, label(c))
             for b, c in zip(image.truth, image.truth_classes, strict=True)]  # fmt: skip
    drawn = draw_boxes(draw_boxes(pixels(batch["image"][i], spec), found), truth, 1, True)
    missed = sorted({int(c) for c in image.truth_classes[image.missed]})
    head = f"found {len(image.truth) - image.missed.sum()} of {len(image.truth)}"
    head += f", {image.false.sum()} false" if image.false.any() else ""
    title = head + (f"\nmissed {_short(', '.join(names[c] for c in missed))}" if missed else "")
    indexed = head + (f"\nmissed {', '.join(f'#{c}' for c in missed)}" if missed else "")
    row = [int(batch["image_id"][i]), len(image.truth), int(image.missed.sum()),
           int(image.false.sum()), image.recall, image.f1,
           "; ".join(names[c] for c in missed)]  # fmt: skip
    return Thumb(drawn, title if named else indexed, indexed), row


class Detection:
    """Per-class COCO AP@[.5:.95] by pycocotools on the split's ground truth, its
    precision-recall curves at IoU 0.5, and the images with the most errors: the lowest F1 of
    ground-truth boxes found (by a detection of the class scoring at least :data:`FOUND_AT` at
    IoU >= :data:`MATCH_IOU`) against boxes missed and false detections."""

    def __init__(self, names: list[str], spec: data_lib.InputSpec, source: Any, n: int):
        # the split's categories, in its category ids' order (pycocotools' and the table's)
        self.source, self.spec, self.names = source, spec, source.class_names
        self.table = box_table(source.annotations, source.category_ids)
        self.lowest = Lowest(n, source)
        self.parts: dict[str, list] = {"boxes": [], "scores": [], "classes": [], "image_ids": []}
        self.named = labels_drawable(self.names)  # else classes by index: not as empty boxes

    def add(self, batch: Arrays, outputs: Arrays) -> None:
        batch, outputs = _real(batch, outputs)
        self.parts["boxes"].append(outputs["boxes"] / batch["scale"][:, None, None])
        self.parts["scores"].append(outputs["scores"])
        self.parts["classes"].append(outputs["classes"])
        self.parts["image_ids"].append(batch["image_id"])
        images = [self._image(batch, outputs, i) for i in range(len(batch["row"]))]
        make = functools.partial(_box_example, batch, images, self.names, self.named, self.spec)
        # An image without ground truth or false detections has nothing to show: not ranked.
        ranked = [i for i, image in enumerate(images) if len(image.truth) or image.false.any()]
        ranked = np.asarray(ranked, np.int64)
        f1 = np.asarray([images[i].f1 for i in ranked], np.float64)
        self.lowest.offer(f1, batch["row"][ranked], lambda j: make(int(ranked[j])))

    def _image(self, batch: Arrays, outputs: Arrays, i: int) -> _Image:
        """Example ``i``'s ground truth from the source's annotations (a batch holds at most
        ``max_boxes`` of them), scaled into the model's input as the pipeline scales it."""
        t = self.table
        row = int(batch["row"][i])
        part = slice(t.start[row], t.start[row] + t.count[row])
        single = t.crowd[part] == 0  # crowd regions are not boxes to find
        kept = (outputs["scores"][i] >= FOUND_AT) & (outputs["classes"][i] >= 0)
        boxes, classes = t.boxes[part] * batch["scale"][i], t.classes[part]
        return _Image(
            boxes[single], classes[single],
            outputs["boxes"][i][kept], outputs["classes"][i][kept], outputs["scores"][i][kept],
            boxes[~single], classes[~single],
        )  # fmt: skip

    def result(self) -> Evaluation:
        source = self.source
        found = {k: np.concatenate(v) for k, v in self.parts.items()}
        seen = sorted({int(i) for i in found["image_ids"]})
        results = coco_results(found, source.category_ids, source.annotations["images"])
        evaluation = coco_evaluation(source.annotations, results, seen)
        figures = coco_figures(evaluation, source.class_names)
        rows = [
            [name, figures.get(f"ap/{class_key(name)}", math.nan)] for name in source.class_names
        ]
        table = Table(("class", "ap"), rows, [["mean (mAP)", figures["map"]]])
        note = "No confusion matrix for detection; AP is empty for classes without ground "
        note += "truth in the split."
        notes, curves = [note], self._pr_curves(evaluation)
        if not curves:
            notes.append("No precision-recall curves: the images evaluated have no "
                         "ground-truth boxes (crowd regions aside).")  # fmt: skip
        columns = ("image_id", "ground-truth boxes", "missed", "false detections", "recall",
                   "f1", "classes missed")  # fmt: skip
        return Evaluation(
            figures["map"], len(seen), table=table, notes=notes,
            hardest=self.lowest.thumbs(), hardest_table=self.lowest.table(columns),
            hardest_caption="The images with the most errors, by the lowest F1 of ground-truth "
            f"boxes found (by a detection of the class scoring at least {FOUND_AT} at IoU >= "
            f"{MATCH_IOU}, each detection finding one box) against boxes missed and false "
            "detections (scoring at least as much, finding no box, not on a crowd region of "
            "their class; images with neither left out), as the model saw them: ground truth "
            "in green "
            f"(class below), detections scoring at least {FOUND_AT} in red (class and score)."
            + ("" if self.named else " Classes by index (#k: the k-th row of per_class.csv, "
               "from 0): a class name has a character the labels' font lacks."),
            **curves,
        )  # fmt: skip

    def _pr_curves(self, evaluation: Any) -> dict[str, Any]:
        """pycocotools' precision at each recall threshold, IoU 0.5: the mean over the classes
        with ground truth (``pr_mean``), and each of them where they are few (``pr_curves``)."""
        recall, precision = precision_at_50(evaluation)
        measured = [k for k in range(precision.shape[1]) if (precision[:, k] > -1).any()]
        if not measured:
            return {}
        curves = {}
        if len(measured) <= PR_CLASSES_UP_TO:
            curves = {self.names[k]: (recall, precision[:, k]) for k in measured}
        return {"pr_mean": (recall, precision[:, measured].mean(1)), "pr_curves": curves}


# library task (tasks.library_kind: subclasses too) -> evaluator(class names, the run's input,
# the split's source, hardest examples)
EVALUATORS: dict[str, Callable[..., Any]] = {
    "classification": Classification,
    "segmentation": Segmentation,
    "detection": Detection,
}


def evaluate(trained: Trained, source: data_lib.Source, n: int) -> Evaluation | None:
    """The task's evaluation of ``trained``'s predictions on ``source`` (None: the task has no
    evaluator), with ``n`` hardest examples."""
    evaluator_type = EVALUATORS.get(library_kind(trained.task))
    if evaluator_type is None:
        return None
    evaluator = evaluator_type(trained.class_names, trained.input, source, n)
    batches = data_lib.eval_batches(
        source, trained.input, global_batch=trained.spec.eval_batch_size,
        **trained.task.batch_args(),
    )  # fmt: skip
    for batch, outputs in trained.predict_batches(batches):
        evaluator.add(batch, outputs)
    return evaluator.result()


class FinalEvaluation:
    """The report's evaluation made from a training run's final evaluation as it runs, so the
    report does not predict the split again: give it to
    :func:`~vision_jax.train.train_and_evaluate` as ``final``, then to
    :func:`~vision_jax.report.write_report`, which uses it for the checkpoint it was made of
    (its step folder). Its failures are warnings (the report then predicts), never the run's."""

    def __init__(self, hardest: int = 16):
        self.hardest = hardest
        self.step_dir: str | None = None
        self._evaluator: Any = None

    def begin(
        self, step_dir: str, task: Any, input_spec: data_lib.InputSpec, source: data_lib.Source
    ) -> Callable[[Arrays, Arrays], None] | None:
        """Starts the evaluation of the state saved in ``step_dir``; returns what sees each
        batch and its predictions (None: the task has no evaluator)."""
        self.step_dir, self._evaluator = None, None
        evaluator_type = EVALUATORS.get(library_kind(task))
        if evaluator_type is None:
            return None
        try:
            self._evaluator = evaluator_type(source.class_names, input_spec, source, self.hardest)
        except Exception as e:  # noqa: BLE001  (the report predicts instead)
            return self._failed(e)
        self.step_dir = os.path.realpath(step_dir)
        return self._add

    def _add(self, batch: Arrays, outputs: Arrays) -> None:
        if self._evaluator is not None:
            try:
                self._evaluator.add(batch, outputs)
            except Exception as e:  # noqa: BLE001
                self._failed(e)

    def _failed(self, error: Exception) -> None:
        logger.warning(
            "The report's evaluation of the final predictions failed (the report will predict "
            "the split again): %s: %s", type(error).__name__, error,
        )  # fmt: skip
        self.step_dir, self._evaluator = None, None

    def evaluation(self, step_dir: str | os.PathLike) -> Evaluation | None:
        """The evaluation of the state in ``step_dir`` (None: none was made of it, or it
        failed)."""
        if self._evaluator is None or os.path.realpath(step_dir) != self.step_dir:
            return None
        try:
            return self._evaluator.result()
        except Exception as e:  # noqa: BLE001
            return self._failed(e)
