"""Per-example preprocessing in TensorFlow: read, decode, crop, flip, RandAugment, normalise,
random erasing; for segmentation, label maps cropped, resized (nearest) and flipped with their
images; for detection, boxes flipped, scaled and cropped with their images (letterboxed).

Random choices use stateless ops seeded by ``(seed, example_index)``, so an example's
augmentation depends only on the run seed and its position in the stream (resumable).
"""

from __future__ import annotations

from collections.abc import Callable

from vision_jax.tf_without_keras import tf

import numpy as np

from vision_jax.data import augment, boxes
from vision_jax.data.randaugment import randaugment
from vision_jax.data.sources import IGNORE_LABEL, check_target, is_column_target, map_values
from vision_jax.specs import InputSpec

Example = dict[str, "tf.Tensor"]


# Augmentations that label maps and boxes cannot follow (mixed labels, made-up pixels).
_IMAGE_ONLY = ("randaugment_layers", "random_erasing", "mixup_alpha", "cutmix_alpha")


def check_label_map_spec(spec: InputSpec) -> None:
    """Training with label maps: only geometric augmentations (applied to image and map alike)."""
    _refuse(spec, _IMAGE_ONLY, "label maps (only crops and flips are)")
    _refuse_unread_resize(spec, "label maps")


def check_box_spec(spec: InputSpec) -> None:
    """Training with boxes: only flips, ``scale_jitter`` and ``random_crop`` (boxes move along)."""
    keys = (*_IMAGE_ONLY, "inception_crop", "color_jitter")
    _refuse(spec, keys, "boxes (only flip, scale_jitter and random_crop are)")
    _refuse_unread_resize(spec, "boxes")


def _refuse_unread_resize(spec: InputSpec, what: str) -> None:
    """With label maps or boxes evaluation resizes the whole image: ``crop_mode`` is read by
    nothing, ``resize_size`` and ``crop_fraction`` only by ``random_crop`` (its resize)."""
    unread = ["input.crop_mode"] if spec.crop_mode != InputSpec.crop_mode else []  # its default
    if not spec.random_crop:
        unread += [f"input.{k}" for k in ("resize_size", "crop_fraction") if getattr(spec, k)]
    if unread:
        raise ValueError(
            f"{', '.join(unread)}: not read with {what} (evaluation resizes the whole image; "
            "resize_size or crop_fraction only size random_crop's resize); remove."
        )


def _refuse(spec: InputSpec, keys: tuple[str, ...], what: str) -> None:
    on = [f"input.{k}" for k in keys if getattr(spec, k)]
    if on:
        raise ValueError(f"{', '.join(on)}: not for {what}; turn off.")


def _raw_image(example: Example) -> tf.Tensor:
    """Encoded bytes (read from ``example["path"]`` if given) or a decoded uint8 array."""
    if "path" in example:
        return tf.io.read_file(example["path"])
    return example["image"]


def raw_label_map(example: Example, values: np.ndarray | None = None) -> tf.Tensor:
    """uint8 [H, W, 1] class ids, read from ``example["label_map_path"]`` if given (its raw
    values mapped through the table ``values``, :func:`~vision_jax.data.sources.value_table`)."""
    if "label_map_path" in example:
        raw = augment.decode_index_png(tf.io.read_file(example["label_map_path"]))
        return map_values(raw, values)
    label_map = tf.cast(example["label_map"], tf.uint8)
    if label_map.shape.rank == 2:
        label_map = label_map[..., None]
    return tf.ensure_shape(label_map, [None, None, 1])


def _decode_pair(
    example: Example, num_classes: int, table: np.ndarray | None = None
) -> tuple[tf.Tensor, tf.Tensor]:
    """The float32 image and its uint8 label map, failing (when run) if their sizes differ or
    the map holds values outside ``[0, num_classes)`` other than IGNORE_LABEL."""
    image = tf.cast(augment.decode(_raw_image(example)), tf.float32)
    label_map = raw_label_map(example, table)
    values = tf.reshape(tf.cast(label_map, tf.int32), [-1])
    bad = tf.unique(tf.boolean_mask(values, (values >= num_classes) & (values != IGNORE_LABEL))).y
    checks = [
        tf.debugging.Assert(
            tf.reduce_all(tf.shape(image)[:2] == tf.shape(label_map)[:2]),
            [
                "Label map size",
                tf.shape(label_map)[:2],
                "differs from its image's",
                tf.shape(image),
            ],
        ),
        tf.debugging.Assert(
            tf.size(bad) == 0,
            [f"Label map values outside [0, {num_classes}) (not {IGNORE_LABEL}, ignore):", bad],
            summarize=10,
        ),
    ]
    with tf.control_dependencies(checks):
        return tf.identity(image), tf.identity(label_map)


def _joint(
    op: Callable[[tf.Tensor], tf.Tensor], image: tf.Tensor, label_map: tf.Tensor | None
) -> tuple[tf.Tensor, tf.Tensor | None]:
    """A geometric ``op`` (crop, flip) applied to the image and, as a 4th channel, its label map,
    so both move alike."""
    if label_map is None:
        return op(image), None
    out = op(tf.concat([image, tf.cast(label_map, tf.float32)], -1))
    return out[..., :3], tf.cast(out[..., 3:], tf.uint8)


def _resize_pair(
    spec: InputSpec, image: tf.Tensor, label_map: tf.Tensor | None, size: tf.Tensor
) -> tuple[tf.Tensor, tf.Tensor | None]:
    """Image by ``spec.interpolation`` (antialiased when shrinking), label map nearest."""
    image = augment.resize(image, size, spec.interpolation)
    return image, None if label_map is None else augment.resize_nearest(label_map, size)


def _random_crop(
    spec: InputSpec, image: tf.Tensor, label_map: tf.Tensor | None, rng: tf.Tensor
) -> tuple[tf.Tensor, tf.Tensor | None]:
    """``random_crop``: the shorter side resized to ``spec.resize``, ``crop_padding`` added;
    ``scale_jitter``: the shorter side resized to ``image_size * U(lo, hi)``. Then padding up
    to ``image_size`` (image 0, label map IGNORE_LABEL) and a random ``image_size`` square."""
    size, padding = spec.image_size, spec.crop_padding
    if spec.random_crop:
        shape = tf.maximum(augment.scaled_shape(tf.shape(image), spec.resize), spec.resize)
    else:
        scale_rng = tf.random.experimental.stateless_fold_in(rng, 1)
        scale = tf.random.stateless_uniform([], scale_rng, *spec.scale_jitter)
        shape = augment.scaled_shape(tf.shape(image), size * scale)
    image, label_map = _resize_pair(spec, image, label_map, shape)
    image = augment.pad(image, padding, size)
    if label_map is not None:
        label_map = augment.pad(label_map, padding, size, IGNORE_LABEL)

    def crop(x: tf.Tensor) -> tf.Tensor:
        return tf.image.stateless_random_crop(x, [size, size, x.shape[-1]], seed=rng)

    return _joint(crop, image, label_map)


def _image(spec: InputSpec, raw: tf.Tensor, train: bool, rng: tf.Tensor) -> tf.Tensor:
    """Classification: the cropped float32 image (see :class:`InputSpec`)."""
    size = spec.image_size
    if train and spec.inception_crop:
        return augment.decode_inception_crop(
            raw, size, spec.inception_scale, spec.inception_ratio, rng, spec.interpolation
        )
    image = tf.cast(augment.decode(raw), tf.float32)
    if train and (spec.random_crop or spec.scale_jitter):
        return _random_crop(spec, image, None, rng)[0]
    if spec.crop_mode == "squash":
        resized = augment.resize(image, tf.constant([spec.resize] * 2), spec.interpolation)
    else:
        resized = augment.resize_shorter(image, spec.resize, spec.interpolation)
    return augment.center_crop(resized, size)


def _image_and_map(
    spec: InputSpec,
    example: Example,
    num_classes: int,
    train: bool,
    rng: tf.Tensor,
    values: np.ndarray | None,
) -> tuple[tf.Tensor, tf.Tensor]:
    """Segmentation: the image and label map cropped alike; without a training crop, the whole
    image resized to ``image_size`` x ``image_size`` (every pixel evaluated)."""
    image, label_map = _decode_pair(example, num_classes, values)
    if train and (spec.random_crop or spec.scale_jitter):
        return _random_crop(spec, image, label_map, rng)
    if train and spec.inception_crop:
        box = augment.sample_inception_box(
            tf.shape(image), spec.inception_scale, spec.inception_ratio, rng
        )
        window = (slice(box[0], box[0] + box[2]), slice(box[1], box[1] + box[3]))
        image, label_map = image[window], label_map[window]
    return _resize_pair(spec, image, label_map, [spec.image_size, spec.image_size])


def _decode_sized(example: Example, size: tf.Tensor) -> tf.Tensor:
    """The float32 image, failing (when run) unless its [height, width] is ``size``."""
    image = tf.cast(augment.decode(_raw_image(example)), tf.float32)
    check = tf.debugging.Assert(
        tf.reduce_all(tf.shape(image)[:2] == size),
        ["Image size", tf.shape(image)[:2], "differs from its annotation's (height, width)", size],
    )
    with tf.control_dependencies([check]):
        return tf.identity(image)


def _image_and_boxes(
    spec: InputSpec,
    example: Example,
    table: dict[str, tf.Tensor],
    train: bool,
    rngs: tuple[tf.Tensor, tf.Tensor],
    max_boxes: int,
) -> Example:
    """Detection: the image and its boxes flipped, scaled and windowed alike (see
    :mod:`vision_jax.data.boxes`); the image normalised, 0 where the window is off the image.
    Evaluation adds ``image_id``, ``scale`` and ``extent``."""
    row = example["row"]
    image = _decode_sized(example, table["size"][row])
    found = boxes.lookup(table, row)
    crop_rng, flip_rng = rngs
    if train and spec.flip:
        image, found = boxes.random_flip(image, found, flip_rng)
    scale, offset = boxes.sample_window(spec, tf.shape(image), train, crop_rng)
    image, inside = boxes.resample(image, scale, offset, spec.image_size, spec.interpolation)
    min_size = 1.0 if train else 0.0  # training drops boxes cut under a pixel
    out = boxes.place(found, scale, offset, spec.image_size, max_boxes, min_size)
    out["image"] = tf.where(inside, normalise(image, spec), 0.0)
    if not train:  # extent: the image's height and width in the input (the rest is padding)
        extent = tf.cast(table["size"][row], tf.float32) * scale
        out.update(image_id=table["image_id"][row], scale=scale, extent=extent)
    return out


def make_preprocess(
    spec: InputSpec,
    *,
    train: bool,
    seed: int,
    target: str = "label",
    num_classes: int | None = None,
    box_table: boxes.BoxTable | None = None,
    max_boxes: int | None = None,
    label_values: np.ndarray | None = None,
    column: tuple[tuple[int, ...], type] | None = None,
) -> Callable[[tf.Tensor, Example], Example]:
    """Returns ``fn(index, example) -> {"image": float32 HWC, "label": int32, "index": int64}``;
    with ``target="label_map"`` (``num_classes`` required) ``"label_map"`` (int32 [S, S]) in
    place of ``"label"``. Label maps take the same crops and flips as their images; read from
    files, their raw values go through ``label_values`` (a source's table) when given.

    With ``target="boxes"`` (``box_table`` and ``max_boxes`` required; examples hold ``row``):
    ``boxes`` (float32 [M, 4], x0 y0 x1 y1 in model-input pixels), ``classes``, ``valid`` and
    ``crowd`` (int32 [M]), zero rows after the boxes; evaluation adds ``image_id`` (int32),
    ``scale`` (float32, model-input pixels per original pixel) and ``extent`` (float32 [2], the
    image's height and width in model-input pixels).

    A ``target`` of one's own (a column of the source, ``column`` its (shape, dtype) per
    example, required) is passed through as it is, as ``"label"`` is: image-level, the crops
    and flips do not change it.
    """
    if check_target(target) == "label_map":
        if num_classes is None:
            raise ValueError("Label maps need num_classes.")
        if train:
            check_label_map_spec(spec)
    table = None
    if target == "boxes":
        if box_table is None or max_boxes is None:
            raise ValueError("Boxes need box_table and max_boxes.")
        if train:
            check_box_spec(spec)
        table = box_table.tensors()
    if is_column_target(target) and column is None:
        raise ValueError(f"A target of one's own ({target!r}) needs its column's shape and dtype.")
    size = spec.image_size

    def fn(index: tf.Tensor, example: Example) -> Example:
        rng = tf.stack([tf.constant(seed, tf.int64), tf.cast(index, tf.int64)])
        crop_rng, flip_rng, ra_rng, erase_rng, jitter_rng = tf.unstack(
            tf.random.experimental.stateless_split(rng, 5)
        )
        if target == "boxes":
            out = _image_and_boxes(spec, example, table, train, (crop_rng, flip_rng), max_boxes)
            return {**out, "index": tf.cast(index, tf.int64)}
        if target == "label_map":
            image, label_map = _image_and_map(
                spec, example, num_classes, train, crop_rng, label_values
            )
        else:
            image, label_map = _image(spec, _raw_image(example), train, crop_rng), None
        if train and spec.flip:
            image, label_map = _joint(
                lambda x: tf.image.stateless_random_flip_left_right(x, seed=flip_rng),
                image,
                label_map,
            )
        if train and spec.randaugment_layers:
            image = randaugment(
                tf.round(image), spec.randaugment_layers, spec.randaugment_magnitude, ra_rng,
                magnitude_std=spec.randaugment_magnitude_std,
                increasing=spec.randaugment_increasing,
                fill=tuple(min(255.0, round(255 * m)) for m in spec.mean),
            )  # fmt: skip
        if train and spec.color_jitter:  # after RandAugment, as timm's secondary transforms
            image = augment.color_jitter(tf.round(image), spec.color_jitter, jitter_rng)
        image = normalise(image, spec)
        if train and spec.random_erasing:
            image = augment.random_erase(image, spec.random_erasing, erase_rng)
        out = {"image": tf.ensure_shape(image, [size, size, 3]), "index": tf.cast(index, tf.int64)}
        if column is not None:
            shape, dtype = column
            out[target] = tf.ensure_shape(tf.cast(example[target], tf.as_dtype(dtype)), shape)
        elif label_map is None:
            out["label"] = tf.cast(example["label"], tf.int32)
        else:
            out["label_map"] = tf.ensure_shape(tf.cast(label_map[..., 0], tf.int32), [size, size])
        return out

    return fn


def normalise(image: tf.Tensor, spec: InputSpec) -> tf.Tensor:
    """(pixels - 255 mean) / (255 std), float32."""
    mean = tf.constant(spec.mean, tf.float32) * 255.0
    std = tf.constant(spec.std, tf.float32) * 255.0
    return (tf.cast(image, tf.float32) - mean) / std
