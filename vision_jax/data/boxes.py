"""Boxes of detection sources: the ground-truth table the pipeline reads, and the box-aware
geometry (flip, scale and window, clip, drop, pad) applied to an image and its boxes alike.

A detection source's ``annotations`` (COCO format, original pixels) is the one truth: batches
take their boxes from :func:`box_table`, built from it. Example ``row`` of a source is
``annotations["images"][row]``. Geometry works in float pixels: an image is resampled once,
with one uniform ``scale`` and a window ``offset`` (model-input pixels, may be negative), so a
box ``b`` lands exactly at ``b * scale - offset``.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Sequence

from vision_jax.tf_without_keras import tf

import numpy as np

from vision_jax.data import augment
from vision_jax.data.sources import DataError, Source
from vision_jax.specs import InputSpec


@dataclasses.dataclass(frozen=True)
class BoxTable:
    """A box source's ground truth as flat arrays: image ``row``'s boxes are entries
    ``start[row]`` to ``start[row] + count[row]`` of ``boxes``, ``classes`` and ``crowd``."""

    image_id: np.ndarray  # [N] int32
    size: np.ndarray  # [N, 2] int32: height, width
    start: np.ndarray  # [N] int32
    count: np.ndarray  # [N] int32
    boxes: np.ndarray  # [T, 4] float32: x0, y0, x1, y1 in original pixels, clipped to the image
    classes: np.ndarray  # [T] int32: class index
    crowd: np.ndarray  # [T] int32: 1 for iscrowd regions

    def tensors(self) -> dict[str, tf.Tensor]:
        """The arrays as constants, for the pipeline's map functions."""
        return {f.name: tf.constant(getattr(self, f.name)) for f in dataclasses.fields(self)}


def box_table(annotations: dict, category_ids: Sequence[int]) -> BoxTable:
    """:class:`BoxTable` of COCO ``annotations`` (already validated); ``category_ids[i]`` is the
    COCO category id of class index ``i``."""
    images = annotations["images"]
    row_of = {image["id"]: row for row, image in enumerate(images)}
    class_of = {category: i for i, category in enumerate(category_ids)}
    anns = sorted(annotations["annotations"], key=lambda a: row_of[a["image_id"]])
    rows = np.array([row_of[a["image_id"]] for a in anns], np.int64)
    count = np.bincount(rows, minlength=len(images)).astype(np.int32)
    size = np.array([[im["height"], im["width"]] for im in images], np.int32).reshape(-1, 2)
    xywh = np.array([a["bbox"] for a in anns], np.float64).reshape(-1, 4)
    limit = np.tile(size[rows][:, ::-1], 2)  # width, height, width, height
    boxes = np.clip(np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1), 0, limit)
    return BoxTable(
        image_id=np.array([im["id"] for im in images], np.int32),
        size=size,
        start=(np.cumsum(count) - count).astype(np.int32),
        count=count,
        boxes=boxes.astype(np.float32),
        classes=np.array([class_of[a["category_id"]] for a in anns], np.int32),
        crowd=np.array([int(bool(a["iscrowd"])) for a in anns], np.int32),
    )


def boxes_per_image(annotations: dict) -> collections.Counter:
    """Image id -> number of annotations (crowd regions included)."""
    return collections.Counter(a["image_id"] for a in annotations["annotations"])


def check_max_boxes(source: Source, max_boxes: int) -> None:
    """A DataError naming the image with the most boxes if it holds more than ``max_boxes``."""
    counts = boxes_per_image(source.annotations)
    if not counts or max(counts.values()) <= max_boxes:
        return
    image_id, most = counts.most_common(1)[0]
    over = sum(c > max_boxes for c in counts.values())
    row = [im["id"] for im in source.annotations["images"]].index(image_id)
    name = _image_name(source, row)
    raise DataError(
        f"{name} (image id {image_id}) holds {most} boxes (crowd regions included), more than "
        f"max_boxes={max_boxes}; {over} image(s) of the split do. Raise task.max_boxes to at "
        f"least {most}."
    )


def _image_name(source: Source, row: int) -> str:
    """The file of a box source's example ``row`` (its path, or the tfds file name)."""
    if source.columns is not None and "path" in source.columns:
        return str(source.columns["path"][row])
    return str(source.annotations["images"][row]["file_name"])


# In the pipeline (TensorFlow).


def lookup(table: dict[str, tf.Tensor], row: tf.Tensor) -> dict[str, tf.Tensor]:
    """Example ``row``'s ``boxes`` [K, 4], ``classes`` [K] and ``crowd`` [K] from
    :meth:`BoxTable.tensors`."""
    start, count = table["start"][row], table["count"][row]
    return {k: table[k][start : start + count] for k in ("boxes", "classes", "crowd")}


def random_flip(
    image: tf.Tensor, found: dict[str, tf.Tensor], seed: tf.Tensor
) -> tuple[tf.Tensor, dict[str, tf.Tensor]]:
    """With probability 1/2, the image and its boxes mirrored left-right."""
    flip = tf.random.stateless_uniform([], seed) < 0.5
    boxes = found["boxes"]
    width = tf.cast(tf.shape(image)[1], tf.float32)
    mirrored = tf.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], 1)
    image = tf.cond(flip, lambda: image[:, ::-1], lambda: image)
    return image, {**found, "boxes": tf.where(flip, mirrored, boxes)}


def sample_window(
    spec: InputSpec, shape: tf.Tensor, train: bool, seed: tf.Tensor
) -> tuple[tf.Tensor, tf.Tensor]:
    """``(scale, offset)``: model-input pixels per original pixel, and the (y, x) corner of the
    ``image_size`` window in the scaled image.

    Letterbox (evaluation; training without a crop): the longer side scaled to ``image_size``,
    offset 0. ``scale_jitter``: the longer side scaled to ``image_size * U(lo, hi)``;
    ``random_crop``: the shorter side to ``spec.resize`` with ``crop_padding`` around it. Then
    a uniformly random window, at 0 along sides shorter than it (padded at the bottom/right).
    """
    size = float(spec.image_size)
    hw = tf.cast(shape[:2], tf.float32)
    if not train or not (spec.random_crop or spec.scale_jitter):
        return size / tf.reduce_max(hw), tf.zeros([2])
    scale_seed, offset_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    padding = float(spec.crop_padding)
    if spec.random_crop:
        scale = spec.resize / tf.reduce_min(hw)
    else:
        jitter = tf.random.stateless_uniform([], scale_seed, *spec.scale_jitter)
        scale = size * jitter / tf.reduce_max(hw)
    room = tf.maximum(hw * scale + 2 * padding, size) - size
    return scale, tf.random.stateless_uniform([2], offset_seed) * room - padding


KERNELS = {"bilinear": "triangle", "bicubic": "keyscubic"}  # tf.image.resize's, antialiased


def resample(
    image: tf.Tensor, scale: tf.Tensor, offset: tf.Tensor, size: int, method: str
) -> tuple[tf.Tensor, tf.Tensor]:
    """The ``size`` x ``size`` window at ``offset`` of the image scaled by ``scale`` (one
    antialiased resampling by ``method``), and where it holds the image: bool [size, size, 1]."""
    out = tf.raw_ops.ScaleAndTranslate(
        images=image[None],
        size=[size, size],
        scale=tf.stack([scale, scale]),
        translation=-offset,
        kernel_type=KERNELS[method],
        antialias=True,
    )[0]
    extent = tf.cast(tf.shape(image)[:2], tf.float32) * scale
    centres = tf.range(size, dtype=tf.float32)[None] + 0.5 + offset[:, None]  # [2, size]
    covered = (centres >= 0) & (centres < extent[:, None])
    inside = covered[0][:, None, None] & covered[1][None, :, None]
    return tf.ensure_shape(augment.clamp(out, method), [size, size, 3]), inside


def place(
    found: dict[str, tf.Tensor],
    scale: tf.Tensor,
    offset: tf.Tensor,
    size: int,
    max_boxes: int,
    min_size: float,
) -> dict[str, tf.Tensor]:
    """Boxes moved into the window and clipped to it; those narrower or lower than
    ``min_size`` (any without area when 0) dropped; the rest first, the first ``max_boxes`` of
    them (training checks that an image holds no more: :func:`check_max_boxes`), padded with
    zero rows to ``max_boxes``: ``boxes`` [M, 4] float32, ``classes``, ``valid``, ``crowd`` [M]
    int32."""
    shift = tf.stack([offset[1], offset[0], offset[1], offset[0]])
    boxes = tf.clip_by_value(found["boxes"] * scale - shift, 0.0, float(size))
    extent = boxes[:, 2:] - boxes[:, :2]
    keep = tf.reduce_all(extent >= min_size if min_size else extent > 0, axis=1)
    index = tf.where(keep)[:max_boxes, 0]

    def fit(x: tf.Tensor) -> tf.Tensor:
        x = tf.gather(x, index)
        padding = [[0, max_boxes - tf.shape(x)[0]]] + [[0, 0]] * (x.shape.rank - 1)
        return tf.ensure_shape(tf.pad(x, padding), [max_boxes, *x.shape[1:]])

    crowd = fit(found["crowd"])
    return {
        "boxes": fit(boxes),
        "classes": fit(found["classes"]),
        "valid": fit(tf.ones_like(found["crowd"])) - crowd,
        "crowd": crowd,
    }
