"""Per-example preprocessing in TensorFlow: decode, resize, crop, flip, normalise.

Random choices use stateless ops seeded by ``(seed, example_index)``, so an example's
augmentation depends only on the run seed and its position in the stream (resumable).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import tensorflow as tf

Example = dict[str, tf.Tensor]


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """How images enter the model: size, normalisation, and training augmentations."""

    image_size: int
    mean: Sequence[float] = (0.5, 0.5, 0.5)
    std: Sequence[float] = (0.5, 0.5, 0.5)
    resize_size: int | None = None  # shorter side before the crop; None = image_size
    random_crop: bool = False
    flip: bool = False


def _to_rgb_uint8(image: tf.Tensor) -> tf.Tensor:
    if image.dtype == tf.string:
        image = tf.io.decode_image(image, channels=3, expand_animations=False)
    if image.shape.rank == 2:
        image = image[..., None]
    if image.shape[-1] == 1:
        image = tf.image.grayscale_to_rgb(image)
    return tf.ensure_shape(image, [None, None, 3])


def _resize_shorter(image: tf.Tensor, size: int) -> tf.Tensor:
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    scale = size / tf.reduce_min(shape)
    new = tf.cast(tf.round(shape * scale), tf.int32)
    new = tf.maximum(new, size)
    return tf.image.resize(image, new, method="bilinear", antialias=True)


def _normalise(image: tf.Tensor, spec: InputSpec) -> tf.Tensor:
    mean = tf.constant(spec.mean, tf.float32) * 255.0
    std = tf.constant(spec.std, tf.float32) * 255.0
    return (tf.cast(image, tf.float32) - mean) / std


def make_preprocess(
    spec: InputSpec, *, train: bool, seed: int
) -> Callable[[tf.Tensor, Example], Example]:
    """Returns ``fn(index, example) -> {"image": float32 HWC, "label": int32}``."""
    resize = spec.resize_size or spec.image_size
    if resize < spec.image_size:
        raise ValueError(f"input.resize_size {resize} < input.image_size {spec.image_size}.")

    def fn(index: tf.Tensor, example: Example) -> Example:
        rng = tf.stack([tf.constant(seed, tf.int64), tf.cast(index, tf.int64)])
        crop_rng, flip_rng = tf.unstack(tf.random.experimental.stateless_split(rng, 2))
        image = tf.cast(_to_rgb_uint8(example["image"]), tf.float32)
        image = _resize_shorter(image, resize)
        size = [spec.image_size, spec.image_size, 3]
        if train and spec.random_crop:
            image = tf.image.stateless_random_crop(image, size, seed=crop_rng)
        else:
            image = _center_crop(image, spec.image_size)
        if train and spec.flip:
            image = tf.image.stateless_random_flip_left_right(image, seed=flip_rng)
        return {"image": _normalise(image, spec), "label": tf.cast(example["label"], tf.int32)}

    return fn


def _center_crop(image: tf.Tensor, size: int) -> tf.Tensor:
    shape = tf.shape(image)
    top = (shape[0] - size) // 2
    left = (shape[1] - size) // 2
    return tf.ensure_shape(image[top : top + size, left : left + size], [size, size, 3])
