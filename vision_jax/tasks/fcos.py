"""FCOS (Tian et al. 2019, with its later improvements): a one-stage, anchor-free detector head.

Every location of every pyramid level predicts class scores (sigmoid per class), its distances
to the four sides of a box (left, top, right, bottom, in units of the level's stride) and a
centerness. Targets are assigned inside the jitted step from fixed-size, padded ground truth: a
location is positive for the smallest box that contains it, whose centre region (``radius``
strides) contains it, and whose largest side distance falls in the level's size range
``(4 s, 8 s]`` (the finest level from 0, the coarsest to infinity), FCOS's ``[0, 64, 128, 256,
512, inf]`` for strides 8..128. Losses: sigmoid focal loss over all locations (normalised by the
number of positives), GIoU loss on positives weighted by the centerness target, and binary
cross-entropy of the centerness. Locations inside a crowd region that are not positive count
for nothing.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from vision_jax.metrics import nan_lowest
from vision_jax.models import precision
from vision_jax.models.pyramid import (
    FPN,
    SIMPLE_SCALES,
    SimpleFeaturePyramid,
    conv,
    feature_strides,
)
from vision_jax.tasks.boxes import generalized_iou, nms_first, top_k

PRIOR_PROBABILITY = 0.01  # initial foreground probability of the class logits (RetinaNet)


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where the locations of a pyramid are: centres ``points`` [L, 2] (x, y in input pixels),
    ``strides`` [L] and size ranges ``lower`` / ``upper`` [L], all levels concatenated."""

    points: np.ndarray
    strides: np.ndarray
    lower: np.ndarray
    upper: np.ndarray

    @property
    def level_sizes(self) -> tuple[int, ...]:
        """Each level's number of locations, finest first (the strides increase)."""
        return tuple(int(n) for n in np.unique(self.strides, return_counts=True)[1])


def layout(image_hw: Sequence[int], strides: Sequence[int]) -> Layout:
    """The locations of levels with ``strides`` on an ``image_hw`` input (level ``i`` has
    ``ceil(h / s) x ceil(w / s)`` positions, centres at ``(k + 0.5) s``)."""
    points, level_strides, lower, upper = [], [], [], []
    for i, s in enumerate(strides):
        h, w = math.ceil(image_hw[0] / s), math.ceil(image_hw[1] / s)
        ys, xs = np.meshgrid((np.arange(h) + 0.5) * s, (np.arange(w) + 0.5) * s, indexing="ij")
        points.append(np.stack([xs.ravel(), ys.ravel()], -1))
        n = h * w
        level_strides.append(np.full(n, s, np.float32))
        lower.append(np.full(n, 0.0 if i == 0 else 4.0 * s, np.float32))
        upper.append(np.full(n, np.inf if i == len(strides) - 1 else 8.0 * s, np.float32))
    cat = lambda xs: np.concatenate(xs).astype(np.float32)
    return Layout(cat(points), cat(level_strides), cat(lower), cat(upper))


class FCOSHead(nn.Module):
    """Pyramid (ViTDet's simple pyramid on one map, FPN on several) at ``strides`` (levels past
    the coarsest by 2x subsampling), then towers shared by all levels: ``num_convs`` 3x3
    convolutions + GroupNorm + ReLU for classes and for boxes; centerness on the box tower.

    Returns float32 ``logits`` [B, L, C], ``distances`` [B, L, 4] (left, top, right, bottom in
    pixels) and ``centerness`` [B, L] (logits), locations ordered as :func:`layout`.

    ``feature_strides``: the strides of the maps it is given, as the backbone's family declares
    them (None: read from the maps' sizes, :func:`feature_strides`).
    """

    num_classes: int
    strides: tuple[int, ...] = (8, 16, 32, 64)
    width: int = 64
    num_convs: int = 2
    dtype: Any = jnp.float32
    feature_strides: tuple[int, ...] | None = None

    @nn.compact
    def __call__(self, features: Sequence[jax.Array], image_hw: Sequence[int], *, train: bool):
        del train
        levels = self._levels(features, image_hw)
        towers = {name: self._tower(name) for name in ("class_tower", "box_tower")}
        cls_out = self._conv(self.num_classes, "class_logits", -math.log(1 / PRIOR_PROBABILITY - 1))
        box_out, ctr_out = self._conv(4, "box_distances", 0.0), self._conv(1, "centerness", 0.0)
        logits, distances, centerness = [], [], []
        for i, (stride, level) in enumerate(zip(self.strides, levels, strict=True)):
            c, b = level, level
            for layer in towers["class_tower"]:
                c = layer(c)
            for layer in towers["box_tower"]:
                b = layer(b)
            scale = self.param(f"box_scale{i}", nn.initializers.ones, (), jnp.float32)
            flat = lambda x: x.reshape(x.shape[0], -1, x.shape[-1]).astype(jnp.float32)
            logits.append(flat(cls_out(c)))
            distances.append(jax.nn.relu(flat(box_out(b)) * scale) * stride)
            centerness.append(flat(ctr_out(b))[..., 0])
        cat = lambda xs: jnp.concatenate(xs, axis=1)
        return {"logits": cat(logits), "distances": cat(distances), "centerness": cat(centerness)}

    def _levels(self, features: Sequence[jax.Array], image_hw: Sequence[int]) -> list[jax.Array]:
        """The pyramid's maps at ``strides``: only the levels used are built; strides past the
        coarsest built level by stride-2 subsampling (ViTDet's ``LastLevelMaxPool``), each cut
        to the :func:`layout`'s ``ceil(h / s) x ceil(w / s)`` (a rounded-up map, upsampled,
        reaches past the image)."""
        strides = list(self.feature_strides or feature_strides(features, image_hw))
        if len(features) == 1:
            (s,) = strides
            scales = tuple(s / t for t in self.strides if s / 4 <= t <= 2 * s) or (0.5,)
            maps = SimpleFeaturePyramid(self.width, self.dtype, scales, name="pyramid")(features[0])
            built = [int(s / scale) for scale in SIMPLE_SCALES if scale in scales]
        else:
            keep = tuple(i for i, t in enumerate(strides) if t in self.strides)
            keep = keep or (len(features) - 1,)
            maps = FPN(self.width, self.dtype, keep, name="pyramid")(features)
            built = [strides[i] for i in keep]
        by_stride = dict(zip(built, maps, strict=True))
        coarsest = max(by_stride)
        levels = []
        for s in self.strides:
            while s > coarsest:
                coarsest *= 2
                by_stride[coarsest] = by_stride[coarsest // 2][:, ::2, ::2]
            if s not in by_stride:
                raise ValueError(
                    f"task.strides {self.strides}: the pyramid has no level at stride {s} "
                    f"(levels: {sorted(by_stride)}); use powers of two from {min(by_stride)}."
                )
            levels.append(by_stride[s][:, : -(-image_hw[0] // s), : -(-image_hw[1] // s)])
        return levels

    def _tower(self, name: str) -> list:
        groups = math.gcd(32, self.width)
        layers = []
        for k in range(self.num_convs):
            layers += [
                conv(self.width, 3, self.dtype, f"{name}{k}"),
                nn.GroupNorm(
                    groups, dtype=self.dtype, param_dtype=jnp.float32, name=f"{name}{k}_norm"
                ),  # fmt: skip
                nn.relu,
            ]
        return layers

    def _conv(self, features: int, name: str, bias: float) -> nn.Conv:
        """An output convolution: float32 results in any ``dtype``, the bias added to the
        float32 accumulator (:func:`precision.conv_layer`; the distances keep float32 pixels)."""
        return nn.Conv(
            features, (3, 3), padding="SAME", dtype=self.dtype, param_dtype=jnp.float32,
            kernel_init=nn.initializers.normal(0.01), bias_init=nn.initializers.constant(bias),
            conv_general_dilated=precision.conv_layer(self.dtype), name=name,
        )  # fmt: skip


@flax.struct.dataclass
class Targets:
    """Per-location targets of one image (or a batch, with a leading axis)."""

    positive: jax.Array  # [L] bool
    ignore: jax.Array  # [L] bool: inside a crowd region and not positive
    classes: jax.Array  # [L] int32 (meaningful where positive)
    boxes: jax.Array  # [L, 4] the assigned box (meaningful where positive)
    centerness: jax.Array  # [L] in [0, 1] (0 where not positive)


def assign(
    where: Layout, boxes: jax.Array, classes: jax.Array, valid: jax.Array, crowd: jax.Array,
    radius: float = 1.5,
) -> Targets:  # fmt: skip
    """FCOS targets of one image's padded ground truth (``boxes`` [M, 4], ``classes``,
    ``valid``, ``crowd`` [M]) at the locations ``where`` (see the module docstring)."""
    sides, inside, positive, best = _match(where, boxes, valid, radius)
    chosen = jnp.take_along_axis(sides, best[:, None, None], axis=1)[:, 0]  # [L, 4]
    lr, tb = chosen[:, 0::2], chosen[:, 1::2]
    ratio = lambda d: d.min(-1) / jnp.maximum(d.max(-1), 1e-6)
    centerness = jnp.sqrt(jnp.clip(ratio(lr) * ratio(tb), 0.0, 1.0))
    return Targets(
        positive=positive,
        ignore=~positive & (inside & (crowd[None, :] > 0)).any(1),
        classes=classes[best],
        boxes=boxes[best],
        centerness=jnp.where(positive, centerness, 0.0),
    )


def _match(
    where: Layout, boxes: jax.Array, valid: jax.Array, radius: float
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """:func:`assign`'s side distances [L, M, 4], whether each location is inside each box
    [L, M], whether it is positive [L], and the box it is positive for [L]: the smallest of its
    candidates."""
    px, py = where.points[:, 0:1], where.points[:, 1:2]  # [L, 1]
    x0, y0, x1, y1 = (boxes[None, :, k] for k in range(4))  # [1, M]
    sides = jnp.stack([px - x0, py - y0, x1 - px, y1 - py], -1)  # [L, M, 4]
    inside = sides.min(-1) > 0
    reach = radius * where.strides[:, None]
    near_centre = (jnp.abs(px - (x0 + x1) / 2) < reach) & (jnp.abs(py - (y0 + y1) / 2) < reach)
    largest = sides.max(-1)
    in_range = (largest > where.lower[:, None]) & (largest <= where.upper[:, None])
    candidate = inside & near_centre & in_range & (valid[None, :] > 0)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    best = jnp.argmin(jnp.where(candidate, area[None, :], jnp.inf), axis=1)  # [L]
    return sides, inside, candidate.any(1), best


def reached(where: Layout, boxes: jax.Array, valid: jax.Array, radius: float = 1.5) -> jax.Array:
    """bool [M]: which of one image's boxes (as :func:`assign` takes them) some location is
    positive for; a valid box that none is for is never trained on."""
    _, _, positive, best = _match(where, boxes, valid, radius)
    return jnp.zeros(boxes.shape[0], jnp.int32).at[best].add(positive.astype(jnp.int32)) > 0


def decode(points: jax.Array, distances: jax.Array) -> jax.Array:
    """Boxes (x0, y0, x1, y1) from locations [L, 2] and side distances [..., L, 4]."""
    return jnp.concatenate([points - distances[..., :2], points + distances[..., 2:]], -1)


def loss_normalisers(targets: Targets) -> dict[str, jax.Array]:
    """The batch's loss denominators: its positive locations (``positives``, at least 1) and
    their centerness targets summed (``centerness``, the box loss's weights)."""
    positive = targets.positive.astype(jnp.float32)
    return {
        "positives": jnp.maximum(positive.sum(), 1.0),
        "centerness": jnp.maximum((targets.centerness * positive).sum(), 1e-6),
    }


def losses(
    outputs: dict[str, jax.Array], targets: Targets, points: jax.Array, *,
    alpha: float = 0.25, gamma: float = 2.0, normalisers: dict[str, jax.Array] | None = None,
) -> dict[str, jax.Array]:  # fmt: skip
    """``class``, ``box`` and ``centerness`` losses of a batch (targets with a batch axis),
    each normalised over the whole batch (see the module docstring; ``normalisers``: those of
    :func:`loss_normalisers`, by default this batch's)."""
    positive = targets.positive.astype(jnp.float32)
    normalisers = normalisers or loss_normalisers(targets)
    num_positive = normalisers["positives"]
    logits = outputs["logits"]
    one_hot = jax.nn.one_hot(targets.classes, logits.shape[-1]) * positive[..., None]
    focal = optax.sigmoid_focal_loss(logits, one_hot, alpha=alpha, gamma=gamma)
    keep = 1.0 - targets.ignore.astype(jnp.float32)
    class_loss = (focal.sum(-1) * keep).sum() / num_positive
    weight = targets.centerness * positive
    giou = generalized_iou(decode(points, outputs["distances"]), targets.boxes)
    box_loss = ((1.0 - giou) * weight).sum() / normalisers["centerness"]
    ctr = optax.sigmoid_binary_cross_entropy(outputs["centerness"], targets.centerness)
    centerness_loss = (ctr * positive).sum() / num_positive
    return {"class": class_loss, "box": box_loss, "centerness": centerness_loss}


def postprocess(
    outputs: dict[str, jax.Array], where: Layout, image_hw: Sequence[int], *,
    score_threshold: float, iou_threshold: float, pre_nms: int, max_detections: int,
    extents: jax.Array | None = None,
) -> dict[str, jax.Array]:  # fmt: skip
    """Detections of a batch, a fixed number per image: the ``pre_nms`` best (location, class)
    pairs of each level of the outputs' :class:`Layout` ``where``, by
    ``sqrt(sigmoid(class) * sigmoid(centerness))``
    above ``score_threshold``, as torchvision's FCOS (``topk_candidates``), the official FCOS
    and detectron2 take them (one top-k over all levels would let the many fine-level locations
    on one object fill every place and drop the coarse levels' objects); their boxes clipped
    to the image (``extents`` [B, 2]: each image's height and width in input pixels, the rest
    padding; None: the input ``image_hw``), per-class NMS over all levels' candidates, then the
    ``max_detections`` best (torchvision's FCOS clips before its NMS too; the NMS,
    :func:`nms_first`, stops once it has kept them). Returns ``boxes`` [B, D, 4], ``scores``
    [B, D] (0 for empty slots) and ``classes`` [B, D] int32 (-1 for empty slots)."""
    input_hw = jnp.asarray(image_hw, jnp.float32)
    batch = outputs["logits"].shape[0]
    extents = jnp.broadcast_to(input_hw if extents is None else extents, (batch, 2))
    points, level_sizes = jnp.asarray(where.points), where.level_sizes
    starts = np.cumsum([0, *level_sizes[:-1]]).tolist()

    def one_image(
        logits: jax.Array, distances: jax.Array, centerness: jax.Array, extent: jax.Array
    ) -> tuple:
        height, width = jnp.minimum(extent.astype(jnp.float32), input_hw)
        corner = jnp.stack([width, height, width, height])
        num_classes = logits.shape[-1]
        scores = jnp.sqrt(jax.nn.sigmoid(logits) * jax.nn.sigmoid(centerness)[:, None])
        scores = nan_lowest(scores)  # a NaN score takes no place among the pre_nms best
        level_scores, level_index = [], []
        for start, size in zip(starts, level_sizes, strict=True):
            flat = scores[start : start + size].reshape(-1)
            best, index = top_k(flat, min(pre_nms, flat.size))
            level_scores.append(best)
            level_index.append(index + start * num_classes)
        # NMS takes its candidates by decreasing score: all levels' in one order (ties in
        # location order, as one top-k over all levels would rank them).
        k = sum(int(s.shape[0]) for s in level_scores)
        top_scores, order = top_k(jnp.concatenate(level_scores), k)
        flat_index = jnp.concatenate(level_index)[order]
        location, cls = flat_index // num_classes, flat_index % num_classes
        boxes = jnp.clip(decode(points[location], distances[location]), 0.0, corner)
        valid = top_scores > score_threshold
        # Per-class NMS in one pass: boxes of different classes moved apart, so they never overlap.
        offset = (cls * (jnp.abs(boxes).max() + 1.0))[:, None]
        d = min(max_detections, k)
        # The first d boxes greedy NMS keeps (valid is a prefix: the scores are sorted).
        keep = nms_first(boxes + offset, valid, iou_threshold, d)
        kept_scores = jnp.where(keep, top_scores, 0.0)
        out_scores, best = top_k(kept_scores, d)
        filled = out_scores > 0
        return (
            jnp.where(filled[:, None], boxes[best], 0.0),
            out_scores,
            jnp.where(filled, cls[best], -1).astype(jnp.int32),
        )

    boxes, scores, classes = jax.vmap(one_image)(
        outputs["logits"], outputs["distances"], outputs["centerness"], extents
    )
    return {"boxes": boxes, "scores": scores, "classes": classes}
