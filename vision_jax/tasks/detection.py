"""Object detection: an FCOS head (:mod:`vision_jax.tasks.fcos`) on a feature pyramid over any
backbone, COCO-style mAP from pycocotools.

Batches carry fixed-size, padded ground truth (``boxes`` [B, M, 4] in input pixels,
``classes``, ``valid``, ``crowd`` [B, M], M = ``max_boxes``), so the step compiles once;
targets are assigned inside the step. Evaluation runs the jitted post-processing (score
threshold, top-k, per-class NMS, a fixed number of detections per image), maps the boxes back
to original image pixels (``batch["scale"]``), collects every image of the split once on the
host and scores them with ``COCOeval`` against the split's ground truth.
"""

# No ``from __future__ import annotations``: clu reads the metric collections' annotations.
import dataclasses
import logging
from collections import Counter
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
from clu import metrics

from vision_jax.models.task_model import TaskModel
from vision_jax.specs import ConfigError, is_integer
from vision_jax.tasks import fcos
from vision_jax.tasks.base import Batch, Task, class_key, feature_backbone, pyramid_strides
from vision_jax.tasks.coco_eval import (
    PADDING_ID,
    STAT_NAMES,
    Detections,
    area_range,
    coco_metrics,
    coco_results,
    warn_if_all_zero_area,
)

logger = logging.getLogger(__name__)

UNREACHED_SHARE = 0.1  # of the train split's boxes without a positive location: a warning
UNREACHED_SAMPLE = 512  # images of a larger split checked


@flax.struct.dataclass
class TrainMetrics(metrics.Collection):
    loss: metrics.Average.from_output("loss")
    class_loss: metrics.Average.from_output("class_loss")
    box_loss: metrics.Average.from_output("box_loss")
    positives: metrics.Average.from_output("positives")  # positive locations per image
    grad_norm: metrics.Average.from_output("grad_norm")


@flax.struct.dataclass
class EvalMetrics(metrics.Collection):
    detections: Detections


class CoverageError(ValueError):
    """An evaluation did not see every image of the split exactly once."""


def check_strides(strides: Any) -> None:
    """Refuses ``task.strides`` that are not strictly increasing positive integers (fine to
    coarse: the size ranges go by position, the finest level's from 0 and the coarsest's to
    infinity, so a reversed order sends the small boxes to the coarsest level; a repeated stride
    builds one level twice), naming the value and the sorted one."""
    values = tuple(strides) if isinstance(strides, (tuple, list)) else (strides,)
    integral = all(is_integer(s) for s in values)
    ordered = all(a < b for a, b in zip(values[:-1], values[1:], strict=True))
    if values and integral and ordered and values[0] > 0:
        return
    number = lambda s: isinstance(s, (int, float, np.number)) and not isinstance(s, bool)
    fixed = sorted({int(s) for s in values if number(s) and s >= 1 and float(s).is_integer()})
    hint = f" e.g. {tuple(fixed)}" if fixed else ""
    raise ConfigError(
        f"task.strides {strides!r} must be strictly increasing positive integers, fine to coarse "
        f"(the levels' size ranges go by position):{hint}."
    )


@dataclasses.dataclass(frozen=True)
class Detection(Task):
    """``strides``: pyramid levels the head predicts from; ``decoder_width``: pyramid and head
    channels; ``head_convs``: convolutions per tower; ``max_boxes``: ground-truth boxes per
    image (padded); ``center_radius``: FCOS centre sampling, in strides; ``focal_alpha`` /
    ``focal_gamma``; post-processing: ``score_threshold``, ``nms_iou``, ``pre_nms_topk``
    (candidates per level, as torchvision's ``topk_candidates``; NMS runs over all levels'),
    ``max_detections`` (per image)."""

    loss: str = "focal_giou"
    head: str = "fcos"
    strides: tuple[int, ...] = (8, 16, 32, 64)
    decoder_width: int = 64
    head_convs: int = 2
    feature_taps: tuple[int, ...] | None = None
    max_boxes: int = 32
    center_radius: float = 1.5
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    score_threshold: float = 0.05
    nms_iou: float = 0.6
    pre_nms_topk: int = 1000
    max_detections: int = 100

    name = "detection"
    target = "boxes"
    headline = "map"
    metric_names = (*STAT_NAMES, "examples")
    per_class_metrics = ("ap",)
    per_class_absent = "no (non-crowd) ground-truth box of that class in the validation split"
    train_metrics = TrainMetrics
    per_example = ("boxes", "scores", "classes")

    def __post_init__(self) -> None:
        if self.loss != "focal_giou":
            raise ValueError(f"Detection trains with loss='focal_giou', not {self.loss!r}.")
        if self.head != "fcos":
            raise ValueError(f"Unknown task.head {self.head!r} for detection; valid: 'fcos'.")
        if self.max_boxes < 1 or self.max_detections < 1:
            raise ValueError("task.max_boxes and task.max_detections must be at least 1.")
        if self.pre_nms_topk < 1:
            raise ValueError(
                f"task.pre_nms_topk {self.pre_nms_topk} must be at least 1 (candidates per level "
                "kept for NMS)."
            )
        check_strides(self.strides)

    def unmeasurable(self, name: str, source: Any) -> str | None:
        """pycocotools scores (non-crowd) boxes of the split: without any, every figure is NaN;
        ``ap/<class>`` is left out without one of its class, ``ap_small`` (and the other
        figures of an area range) NaN without one of that area."""
        of_class = name.startswith("ap/")
        if name not in STAT_NAMES and not of_class:
            return None
        boxes = [a for a in source.annotations["annotations"] if not a["iscrowd"]]
        if not boxes:
            return "it holds no (non-crowd) box"
        classes = zip(source.class_names, source.category_ids, strict=True)
        category = {class_key(n): (n, i) for n, i in classes}.get(name[3:]) if of_class else None
        if category and not any(a["category_id"] == category[1] for a in boxes):
            return f"it holds no (non-crowd) box of class {category[0]!r}"
        area = area_range(name)
        if area and not any(area[0] <= a["area"] <= area[1] for a in boxes):
            return f"it holds no (non-crowd) box of {name}'s areas ({area[0]:g}-{area[1]:g} px)"
        return None

    def batch_args(self) -> dict[str, Any]:
        return {"max_boxes": self.max_boxes}

    def check_train_split(self, source: Any, image_size: int) -> None:
        """An image with more boxes than ``max_boxes`` is an error now, not once the steps have
        compiled (the batches check it too); boxes no location is positive for are warned of."""
        from vision_jax.data import boxes as boxes_lib  # (TensorFlow)

        boxes_lib.check_max_boxes(source, self.max_boxes)
        self.warn_of_unreached_boxes(source, image_size)

    def warn_of_unreached_boxes(self, source: Any, image_size: int) -> None:
        """Warns when over ``UNREACHED_SHARE`` of the non-crowd boxes of ``source`` (the
        training split; a sample of its images when it is large) get no positive location
        (:func:`fcos.reached`) at ``strides`` on ``image_size`` inputs, the boxes at the
        letterbox's scale (training's without a crop or scale jitter; those under a pixel, which
        training drops, unreached): the detector never trains on them."""
        from vision_jax.data import boxes as boxes_lib  # (TensorFlow)

        table = boxes_lib.box_table(source.annotations, source.category_ids)
        rows = np.flatnonzero(table.count)
        sampled = len(rows) > UNREACHED_SAMPLE
        if sampled:
            rows = np.sort(np.random.default_rng(0).choice(rows, UNREACHED_SAMPLE, replace=False))
        if not len(rows):
            return
        boxes = np.zeros((len(rows), int(table.count[rows].max()), 4), np.float32)
        valid = np.zeros(boxes.shape[:2], bool)
        for i, row in enumerate(rows):
            part = slice(table.start[row], table.start[row] + table.count[row])
            boxes[i, : table.count[row]] = table.boxes[part] * image_size / table.size[row].max()
            valid[i, : table.count[row]] = table.crowd[part] == 0
        extent = boxes[..., 2:] - boxes[..., :2]
        kept = valid & (extent >= 1.0).all(-1)  # training drops boxes under a pixel
        where = fcos.layout((image_size, image_size), self.strides)
        one = lambda image: fcos.reached(where, *image, self.center_radius)
        hit = np.asarray(jax.jit(lambda b, v: jax.lax.map(one, (b, v)))(boxes, kept)) & kept
        total, missed = int(valid.sum()), int(valid.sum() - hit.sum())
        if missed <= UNREACHED_SHARE * total:
            return
        sides = extent.max(-1)[valid & ~hit]
        logger.warning(
            "%d of the %d non-crowd boxes of the train split%s (%.0f%%) get no positive location "
            "at task.strides=%s on %d px inputs (letterboxed; their longer side %.1f px at the "
            "median): the detector never trains on them. Finer task.strides (down to 4: README, "
            "Object detection) or a larger input.image_size reach smaller boxes.",
            missed, total, f" (a sample of {len(rows)} images)" if sampled else "",
            100 * missed / total, tuple(self.strides), image_size, float(np.median(sides)),
        )  # fmt: skip

    def build_model(self, model_name: str, num_classes: int, **model_kwargs: Any) -> TaskModel:
        backbone = feature_backbone(model_name, self.feature_taps, **model_kwargs)
        taps_strides = pyramid_strides(backbone, model_name, "detection head (FCOS)")
        head = fcos.FCOSHead(
            num_classes, tuple(self.strides), self.decoder_width, self.head_convs, backbone.dtype,
            feature_strides=taps_strides,
        )  # fmt: skip
        return TaskModel(backbone, head)

    def _layout(self, batch: Batch, outputs: dict[str, jax.Array]) -> fcos.Layout:
        where = fcos.layout(batch["image"].shape[1:3], self.strides)
        found = outputs["logits"].shape[1]
        if len(where.points) != found:
            raise ValueError(
                f"The head predicts at {found} locations, the layout of strides {self.strides} "
                f"on {batch['image'].shape[1:3]} images has {len(where.points)}: the image "
                f"size must be divisible by the backbone's strides."
            )
        return where

    def targets(self, batch: Batch, where: fcos.Layout) -> fcos.Targets:
        """FCOS targets of a batch (leading batch axis on every field)."""
        assign = lambda b, c, v, k: fcos.assign(where, b, c, v, k, self.center_radius)
        return jax.vmap(assign)(batch["boxes"], batch["classes"], batch["valid"], batch["crowd"])

    def loss_normalisers(self, batch: Batch) -> dict[str, jax.Array]:
        where = fcos.layout(batch["image"].shape[1:3], self.strides)
        return fcos.loss_normalisers(self.targets(batch, where))

    def train_loss(
        self, outputs: dict[str, jax.Array], batch: Batch, normalisers: dict | None = None
    ) -> tuple[jax.Array, dict]:
        where = self._layout(batch, outputs)
        targets = self.targets(batch, where)
        parts = fcos.losses(
            outputs, targets, jnp.asarray(where.points), alpha=self.focal_alpha,
            gamma=self.focal_gamma, normalisers=normalisers,
        )  # fmt: skip
        loss = parts["class"] + parts["box"] + parts["centerness"]
        positives = targets.positive.sum(-1).astype(jnp.float32)
        return loss, {
            "class_loss": parts["class"],
            "box_loss": parts["box"],
            "positives": positives,
        }

    def detect(
        self, outputs: dict[str, jax.Array], image_hw: tuple[int, int],
        extents: jax.Array | None = None,
    ) -> dict:  # fmt: skip
        """Post-processed detections in input pixels (see :func:`fcos.postprocess`; ``extents``:
        each image's height and width in the input, None: all of it)."""
        where = fcos.layout(image_hw, self.strides)
        return fcos.postprocess(
            outputs, where, image_hw, score_threshold=self.score_threshold,
            iou_threshold=self.nms_iou, pre_nms=self.pre_nms_topk,
            max_detections=self.max_detections, extents=extents,
        )  # fmt: skip

    def eval_metrics(self, outputs: dict[str, jax.Array], batch: Batch) -> EvalMetrics:
        return self.evaluate_batch(outputs, batch)[0]

    def evaluate_batch(
        self, outputs: dict[str, jax.Array], batch: Batch
    ) -> tuple[EvalMetrics, dict[str, jax.Array]]:
        """The metrics hold the detections in the source images' pixels (divided by the batch's
        ``scale``); the per-example predictions are in input pixels, as
        :meth:`predict_batch`'s."""
        self._layout(batch, outputs)
        found = self.predict_batch(outputs, batch)
        real = batch["mask"] > 0
        scale = jnp.where(real, batch["scale"], 1.0)[:, None, None]
        collection = EvalMetrics.single_from_model_output(
            boxes=found["boxes"] / scale,
            scores=found["scores"],
            classes=found["classes"],
            image_ids=jnp.where(real, batch["image_id"], PADDING_ID).astype(jnp.int32),
        )
        return collection, {k: found[k] for k in self.per_example}

    def summarize(self, collection: EvalMetrics, source: Any, prefix: str) -> dict[str, float]:
        found = collection.detections.compute()
        seen = self._check_coverage(found["image_ids"], source)
        tally = Counter()  # the report converts the same predictions again: it stays quiet
        results = coco_results(found, source.category_ids, source.annotations["images"], tally)
        warn_if_all_zero_area(tally, "this evaluation")
        figures = coco_metrics(source.annotations, results, seen, source.class_names)
        out = {f"{prefix}{k}": v for k, v in figures.items()}
        out[f"{prefix}examples"] = float(len(seen))
        return out

    @staticmethod
    def _check_coverage(image_ids: np.ndarray, source: Any) -> list[int]:
        """The evaluated image ids; an error unless each image of the split came once (images
        skipped as unreadable with ``skip_corrupt`` are left out, with a warning)."""
        counts = Counter(int(i) for i in image_ids if i != PADDING_ID)
        twice = sorted(i for i, n in counts.items() if n > 1)
        expected = {int(image["id"]) for image in source.annotations["images"]}
        unknown, missing = sorted(set(counts) - expected), sorted(expected - set(counts))
        if twice or unknown or (missing and not source.skip_corrupt):
            raise CoverageError(
                f"Evaluation must see every image once: {len(twice)} seen twice {twice[:5]}, "
                f"{len(missing)} missing {missing[:5]}, {len(unknown)} unknown {unknown[:5]}."
            )
        if missing:
            logger.warning("Evaluated %d images; %d unreadable ones skipped.", len(counts),
                           len(missing))  # fmt: skip
        return sorted(counts)

    def predict(self, outputs: dict[str, jax.Array], image_hw: tuple[int, int]) -> dict:
        return self.detect(outputs, image_hw)

    def predict_batch(self, outputs: dict[str, jax.Array], batch: Batch) -> dict:
        """:meth:`detect` with each image's boxes clipped to its part of the input (the
        batch's ``extent``: the letterbox's padding left out)."""
        real, image_hw = batch["mask"] > 0, batch["image"].shape[1:3]
        extents = batch.get("extent")
        if extents is not None:  # padding rows: the whole input
            extents = jnp.where(real[:, None], extents, jnp.asarray(image_hw, jnp.float32))
        return self.detect(outputs, image_hw, extents)
