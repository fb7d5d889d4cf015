"""Per-example preprocessing in TensorFlow: read, decode, crop, flip, RandAugment, normalise,
random erasing.

Random choices use stateless ops seeded by ``(seed, example_index)``, so an example's
augmentation depends only on the run seed and its position in the stream (resumable).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import tensorflow as tf

from vision_jax.data import augment
from vision_jax.data.randaugment import randaugment

Example = dict[str, tf.Tensor]


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """How images enter the model: size, normalisation, and training augmentations.

    Evaluation (and training without a random crop) resizes the shorter side to ``resize_size``
    (or ``image_size / crop_fraction``, timm's crop_pct; default ``image_size``) and takes the
    central ``image_size`` square. Training crops are, in order of precedence: ``inception_crop``
    (random-resized crop, area fraction ``inception_scale``, aspect ratio ``inception_ratio``),
    ``random_crop`` (a random square of the resized image, after zero-padding ``crop_padding``
    pixels: CIFAR-style), or the centre crop. Then: ``flip``, RandAugment with
    ``randaugment_layers`` ops at ``randaugment_magnitude`` (0..10), normalisation by
    ``mean``/``std`` (fractions of 255), random erasing with probability ``random_erasing``.
    Batch-level mixup/cutmix (``mixup_alpha``, ``cutmix_alpha``, applied with ``mix_prob``,
    cutmix chosen with ``mix_switch_prob`` when both are on) adds ``soft_label`` to batches.
    """

    image_size: int
    mean: Sequence[float] = (0.5, 0.5, 0.5)
    std: Sequence[float] = (0.5, 0.5, 0.5)
    resize_size: int | None = None
    crop_fraction: float | None = None
    random_crop: bool = False
    crop_padding: int = 0
    inception_crop: bool = False
    inception_scale: Sequence[float] = (0.08, 1.0)
    inception_ratio: Sequence[float] = (3 / 4, 4 / 3)
    flip: bool = False
    randaugment_layers: int = 0
    randaugment_magnitude: float = 9.0
    random_erasing: float = 0.0
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    mix_prob: float = 1.0
    mix_switch_prob: float = 0.5

    def __post_init__(self) -> None:
        if self.resize_size is not None and self.crop_fraction is not None:
            raise ValueError("Set at most one of input.resize_size and input.crop_fraction.")
        if self.crop_fraction is not None and not 0 < self.crop_fraction <= 1:
            raise ValueError(f"input.crop_fraction must lie in (0, 1]; got {self.crop_fraction}.")
        if self.resize < self.image_size:
            raise ValueError(f"input.resize_size {self.resize} < input.image_size.")
        if self.inception_crop and self.random_crop:
            raise ValueError("input.inception_crop and input.random_crop exclude each other.")
        if self.crop_padding and not self.random_crop:
            raise ValueError("input.crop_padding needs input.random_crop = True.")
        if min(self.mixup_alpha, self.cutmix_alpha) < 0:
            raise ValueError("input.mixup_alpha and input.cutmix_alpha must be >= 0.")

    @property
    def resize(self) -> int:
        """The shorter side before the centre (or random) crop."""
        if self.crop_fraction is not None:
            return int(self.image_size / self.crop_fraction)
        return self.resize_size or self.image_size

    @property
    def mixes(self) -> bool:
        """Whether training batches are mixed (and carry ``soft_label``)."""
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0


def _raw_image(example: Example) -> tf.Tensor:
    """Encoded bytes (read from ``example["path"]`` if given) or a decoded uint8 array."""
    if "path" in example:
        return tf.io.read_file(example["path"])
    return example["image"]


def make_preprocess(
    spec: InputSpec, *, train: bool, seed: int
) -> Callable[[tf.Tensor, Example], Example]:
    """Returns ``fn(index, example) -> {"image": float32 HWC, "label": int32, "index": int64}``."""
    size = spec.image_size

    def fn(index: tf.Tensor, example: Example) -> Example:
        rng = tf.stack([tf.constant(seed, tf.int64), tf.cast(index, tf.int64)])
        crop_rng, flip_rng, ra_rng, erase_rng = tf.unstack(
            tf.random.experimental.stateless_split(rng, 4)
        )
        raw = _raw_image(example)
        if train and spec.inception_crop:
            image = augment.decode_inception_crop(
                raw, size, spec.inception_scale, spec.inception_ratio, crop_rng
            )
        else:
            image = tf.cast(augment.decode(raw), tf.float32)
            image = augment.resize_shorter(image, spec.resize)
            if train and spec.random_crop:
                image = augment.pad_random_crop(image, size, spec.crop_padding, crop_rng)
            else:
                image = augment.center_crop(image, size)
        if train and spec.flip:
            image = tf.image.stateless_random_flip_left_right(image, seed=flip_rng)
        if train and spec.randaugment_layers:
            image = randaugment(
                tf.round(image), spec.randaugment_layers, spec.randaugment_magnitude, ra_rng
            )
        image = normalise(image, spec)
        if train and spec.random_erasing:
            image = augment.random_erase(image, spec.random_erasing, erase_rng)
        return {
            "image": image,
            "label": tf.cast(example["label"], tf.int32),
            "index": tf.cast(index, tf.int64),
        }

    return fn


def normalise(image: tf.Tensor, spec: InputSpec) -> tf.Tensor:
    """(pixels - 255 mean) / (255 std), float32."""
    mean = tf.constant(spec.mean, tf.float32) * 255.0
    std = tf.constant(spec.std, tf.float32) * 255.0
    return (tf.cast(image, tf.float32) - mean) / std
