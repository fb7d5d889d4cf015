"""COCO-style detection metrics, computed by pycocotools (never by hand).

:class:`Detections` collects a split's fixed-size detections on the host (a clu metric that
concatenates); :func:`coco_results` turns them into COCO's results format in original image
coordinates; :func:`coco_metrics` runs ``COCOeval`` against the split's ground truth.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import flax
import jax
import numpy as np
from clu import metrics

from vision_jax.tasks.base import class_key

logger = logging.getLogger(__name__)

PADDING_ID = -1  # the image id of a padding row (COCO ids may be 0)
# COCOeval's stats, in its order.
STAT_NAMES = (
    "map", "ap50", "ap75", "ap_small", "ap_medium", "ap_large",
    "ar1", "ar10", "ar100", "ar_small", "ar_medium", "ar_large",
)  # fmt: skip


def area_range(name: str) -> tuple[float, float] | None:
    """The box areas that the COCO figure ``name`` (of :data:`STAT_NAMES`) counts, pycocotools'
    range (``ap_small``: 0 to 32**2); None for a figure of every area."""
    from pycocotools.cocoeval import Params

    params = Params("bbox")
    ranges = dict(zip(params.areaRngLbl[1:], params.areaRng[1:], strict=True))
    return ranges.get(name.rpartition("_")[2]) if name in STAT_NAMES else None


@flax.struct.dataclass
class Detections(metrics.Metric):
    """A split's detections: ``boxes`` [N, D, 4] (x0, y0, x1, y1 in original image pixels),
    ``scores`` [N, D] (0: empty slot), ``classes`` [N, D] (class index, -1: empty slot) and
    ``image_ids`` [N] (:data:`PADDING_ID`: a padding row). Merged on the host: each field then
    holds the batches' arrays (a tuple), concatenated once by :meth:`compute` (concatenating at
    each merge copied every detection so far again: quadratic in the split's size)."""

    boxes: jax.Array
    scores: jax.Array
    classes: jax.Array
    image_ids: jax.Array

    @classmethod
    def from_model_output(
        cls, *, boxes: jax.Array, scores: jax.Array, classes: jax.Array, image_ids: jax.Array,
        **_,
    ) -> Detections:  # fmt: skip
        return cls(boxes, scores, classes, image_ids)

    def merge(self, other: Detections) -> Detections:
        chunks = lambda field: field if isinstance(field, tuple) else (np.asarray(field),)
        return type(self)(
            *(chunks(a) + chunks(b) for a, b in zip(self._fields(), other._fields(), strict=True))
        )

    def _fields(self) -> tuple:
        return self.boxes, self.scores, self.classes, self.image_ids

    def compute(self) -> dict[str, np.ndarray]:
        names = ("boxes", "scores", "classes", "image_ids")
        whole = lambda field: (
            np.concatenate(field) if isinstance(field, tuple) else np.asarray(field)
        )
        return {name: whole(v) for name, v in zip(names, self._fields(), strict=True)}


def coco_results(
    found: Mapping[str, np.ndarray], category_ids: Sequence[int], images: Sequence[Mapping],
    tally: Counter | None = None,
) -> list[dict]:  # fmt: skip
    """COCO results (``image_id``, ``category_id``, ``bbox`` [x, y, w, h], ``score``) of the
    filled slots of real rows, the boxes clipped to their image (``images``: the COCO image
    records, with ``width`` and ``height``; torchvision's detectors clip theirs, before their
    NMS); a box left without width or height (wholly off the image) is dropped.

    ``tally``: where given, its ``detections`` and ``zero_area`` (those dropped) grow by this
    call's, for the caller to warn once per evaluation or command with
    :func:`warn_if_all_zero_area`."""
    boxes, scores = np.asarray(found["boxes"], np.float64), np.asarray(found["scores"])
    classes, image_ids = np.asarray(found["classes"]), np.asarray(found["image_ids"])
    rows, slots = np.nonzero((classes >= 0) & (image_ids[:, None] != PADDING_ID))
    ids = np.asarray(category_ids)
    sizes = {
        int(im["id"]): np.asarray([im["width"], im["height"]] * 2, np.float64) for im in images
    }
    results = []
    for r, s in zip(rows, slots, strict=True):
        box = np.clip(boxes[r, s], 0, sizes[int(image_ids[r])])
        if not (box[2:] > box[:2]).all():
            continue
        results.append({
            "image_id": int(image_ids[r]),
            "category_id": int(ids[classes[r, s]]),
            "bbox": [float(v) for v in (*box[:2], *(box[2:] - box[:2]))],
            "score": float(scores[r, s]),
        })  # fmt: skip
    if tally is not None:
        tally.update(detections=len(rows), zero_area=len(rows) - len(results))
    return results


def warn_if_all_zero_area(tally: Mapping[str, int], what: str) -> bool:
    """One warning when every detection counted in ``tally`` (:func:`coco_results`'s) had zero
    area: FCOS's box branch (a ReLU) then predicts zero distances everywhere, its gradient is
    zero and it never recovers. True when it warned."""
    detections = tally.get("detections", 0)
    if not detections or tally.get("zero_area", 0) < detections:
        return False
    logger.warning(
        "All %d detections of %s have zero width or height and are left out of the COCO "
        "results (mAP 0, no records): the box branch predicts zero distances everywhere (a dead "
        "ReLU: train/box_loss stuck at 1.0, with no gradient to revive it). Train again from "
        "the pretrained backbone with a lower learning rate or a longer warmup.",
        detections, what,
    )  # fmt: skip
    return True


@contextlib.contextmanager
def _quiet():
    """pycocotools prints progress to stdout; keep it out of the logs."""
    with contextlib.redirect_stdout(io.StringIO()):
        yield


def coco_metrics(
    annotations: Mapping[str, Any], results: list[dict], image_ids: Sequence[int],
    class_names: Sequence[str],
) -> dict[str, float]:  # fmt: skip
    """COCOeval ``bbox`` figures of ``results`` on the images ``image_ids`` of the ground truth
    ``annotations`` (a COCO dataset dict): :data:`STAT_NAMES` (NaN where pycocotools says -1,
    undefined: no large objects, say; as detectron2 reports it) and ``ap/<class>`` (AP@[.5:.95]
    per category with ground truth)."""
    return coco_figures(coco_evaluation(annotations, results, image_ids), class_names)


def coco_evaluation(
    annotations: Mapping[str, Any], results: list[dict], image_ids: Sequence[int]
) -> Any:
    """pycocotools' ``COCOeval`` (``bbox``) of ``results`` on the images ``image_ids`` of the
    ground truth ``annotations``, evaluated, accumulated and summarised."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    evaluated = set(int(i) for i in image_ids)
    if not any(int(a["image_id"]) in evaluated and not a.get("iscrowd")
               for a in annotations.get("annotations", ())):  # fmt: skip
        logger.warning("The %d evaluated images hold no (non-crowd) annotation: every COCO "
                       "figure is undefined (NaN).", len(evaluated))  # fmt: skip
    with _quiet():
        truth = COCO()
        truth.dataset = copy.deepcopy(dict(annotations))
        truth.createIndex()
        found = truth.loadRes(results) if results else COCO()
        if not results:  # loadRes refuses an empty list: an empty result set
            found.dataset = {"images": truth.dataset["images"], "annotations": [],
                             "categories": truth.dataset["categories"]}  # fmt: skip
            found.createIndex()
        evaluation = COCOeval(truth, found, "bbox")
        evaluation.params.imgIds = sorted(int(i) for i in image_ids)
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return evaluation


def coco_figures(evaluation: Any, class_names: Sequence[str]) -> dict[str, float]:
    """:func:`coco_metrics`' figures of a summarised ``COCOeval``."""
    out = {
        name: float(v) if v >= 0 else math.nan
        for name, v in zip(STAT_NAMES, evaluation.stats, strict=True)
    }
    precision = evaluation.eval["precision"]  # [iou, recall, category, area, max_dets]
    for k, name in enumerate(class_names):
        p = precision[:, :, k, 0, -1]
        if (p > -1).any():
            out[f"ap/{class_key(name)}"] = float(p[p > -1].mean())
    return out


def precision_at_50(evaluation: Any) -> tuple[np.ndarray, np.ndarray]:
    """pycocotools' precision-recall curves of a summarised ``COCOeval`` at IoU 0.5, every
    area, 100 detections: its recall thresholds [R] and ``eval["precision"]`` there [R,
    category] (-1: a category without ground truth)."""
    params = evaluation.params
    iou = int(np.flatnonzero(np.isclose(params.iouThrs, 0.5))[0])
    area, most = params.areaRngLbl.index("all"), params.maxDets.index(100)
    return np.asarray(params.recThrs), evaluation.eval["precision"][iou, :, :, area, most]
