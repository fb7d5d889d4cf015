"""RandAugment (Cubuk et al. 2019) in TensorFlow, stateless: timm's ``rand-mM-nN`` (its 15 ops,
their magnitudes and probabilities), with timm's ``mstd`` and ``inc1`` options.

Each of ``num_layers`` layers picks one of the ops uniformly (with replacement) and applies it
with probability 0.5 at magnitude ``magnitude`` (0..10), or, with ``magnitude_std`` > 0, at a
magnitude drawn for that layer from N(magnitude, magnitude_std) (``inf``: uniform in [0,
magnitude]) and clipped to [0, 10]. Rotate, shear and translate take a random sign; at level
``l = M / 10``: 30 l degrees, a shear of 0.3 l, a shift of 0.45 l of the image; what they move
in is the normalisation's mean colour, as timm fills.

The colour ops take one of timm's two forms. By default (timm's ``rand-mM``, as TensorFlow's
EfficientNet and big_vision's RandAugment) Posterize keeps ``floor(4 l)`` bits, Solarize inverts
pixels at or above ``floor(256 l)``, and Color, Contrast, Brightness and Sharpness blend with
the factor ``0.1 + 1.8 l`` (1.0, no change, at M = 5). With ``increasing`` (timm's ``inc1``,
DeiT's recipe ``rand-m9-mstd0.5-inc1``) each gets stronger as M grows: ``4 - floor(4 l)`` bits,
a threshold of ``256 - floor(256 l)``, and a factor of ``max(0.1, 1 +- 0.9 l)`` with a random
sign. SolarizeAdd adds ``floor(110 l)`` to pixels under 128 in both.

Images are float32 HWC with pixels in 0..255.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from vision_jax.tf_without_keras import tf

Fill = tuple[float, float, float]  # RGB of pixels that geometric ops move in from outside
GREY: Fill = (128.0, 128.0, 128.0)


def _blend(degenerate: tf.Tensor, image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
    """PIL's ``Image.blend`` of 8-bit images (``ImageEnhance``): in float32, truncated."""
    return tf.clip_by_value(tf.floor(degenerate + factor * (image - degenerate)), 0.0, 255.0)


def _grey(image: tf.Tensor) -> tf.Tensor:
    """PIL's ``convert("L")`` of (rounded) RGB levels, [H, W, 1]."""
    r, g, b = tf.unstack(tf.cast(tf.round(image), tf.int32), axis=-1)
    grey = tf.bitwise.right_shift(19595 * r + 38470 * g + 7471 * b + 0x8000, 16)
    return tf.cast(grey, tf.float32)[..., None]


def brightness(image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
    """PIL's ``ImageEnhance.Brightness``."""
    return _blend(tf.zeros_like(image), image, factor)


def contrast(image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
    """PIL's ``ImageEnhance.Contrast``: towards the grey image's rounded mean."""
    return _blend(tf.floor(tf.reduce_mean(_grey(image)) + 0.5), image, factor)


def saturation(image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
    """PIL's ``ImageEnhance.Color``: towards the grey image."""
    return _blend(_grey(image), image, factor)


def _affine(image: tf.Tensor, transform: list, fill: Fill) -> tf.Tensor:
    """Output pixel (x, y) samples input ((a0 x + a1 y + a2), (b0 x + b1 y + b2)); ``fill``
    where it falls outside (blended at the edge, as the image's own pixels are)."""
    transform = tf.cast(tf.stack([*transform, 0.0, 0.0])[None], tf.float32)
    inside = tf.ones_like(image[..., :1])
    out = tf.raw_ops.ImageProjectiveTransformV3(
        images=tf.concat([image, inside], -1)[None],
        transforms=transform,
        output_shape=tf.shape(image)[:2],
        fill_value=0.0,
        interpolation="BILINEAR",
        fill_mode="CONSTANT",
    )[0]
    blended = out[..., :-1] + (1.0 - out[..., -1:]) * tf.constant(fill, tf.float32)
    return tf.reshape(blended, tf.shape(image))


def _rotate(image: tf.Tensor, level: tf.Tensor, fill: Fill) -> tf.Tensor:
    angle = level * (30.0 * math.pi / 180.0)
    cos, sin = tf.cos(angle), tf.sin(angle)
    cy = (tf.cast(tf.shape(image)[0], tf.float32) - 1) / 2
    cx = (tf.cast(tf.shape(image)[1], tf.float32) - 1) / 2
    return _affine(
        image, [cos, -sin, cx - cos * cx + sin * cy, sin, cos, cy - sin * cx - cos * cy], fill
    )


def _translate(image: tf.Tensor, level: tf.Tensor, axis: int, fill: Fill) -> tf.Tensor:
    shift = level * 0.45 * tf.cast(tf.shape(image)[1 - axis], tf.float32)
    dx, dy = (shift, 0.0) if axis == 0 else (0.0, shift)
    return _affine(image, [1.0, 0.0, dx, 0.0, 1.0, dy], fill)


def _shear(image: tf.Tensor, level: tf.Tensor, axis: int, fill: Fill) -> tf.Tensor:
    s = level * 0.3
    sx, sy = (s, 0.0) if axis == 0 else (0.0, s)
    # PIL's affine maps pixel centres (x + 0.5, y + 0.5): the half-pixel term keeps its result
    return _affine(image, [1.0, sx, 0.5 * sx, sy, 1.0, 0.5 * sy], fill)


def _autocontrast(image: tf.Tensor) -> tf.Tensor:
    lo = tf.reduce_min(image, [0, 1], keepdims=True)
    hi = tf.reduce_max(image, [0, 1], keepdims=True)
    scaled = (image - lo) * (255.0 / tf.maximum(hi - lo, 1e-3))
    return tf.where(hi > lo, scaled, image)


def _equalize_channel(channel: tf.Tensor) -> tf.Tensor:
    """PIL's ImageOps.equalize on one channel of integer-valued pixels."""
    values = tf.cast(tf.clip_by_value(channel, 0.0, 255.0), tf.int32)
    histo = tf.histogram_fixed_width(values, [0, 255], nbins=256)
    nonzero = tf.boolean_mask(histo, histo > 0)
    step = (tf.reduce_sum(nonzero) - nonzero[-1]) // 255

    def equalized() -> tf.Tensor:
        lut = (tf.cumsum(histo) + step // 2) // tf.maximum(step, 1)
        lut = tf.clip_by_value(tf.concat([[0], lut[:-1]], 0), 0, 255)
        return tf.cast(tf.gather(lut, values), tf.float32)

    return tf.cond(step > 0, equalized, lambda: tf.cast(values, tf.float32))


def _equalize(image: tf.Tensor) -> tf.Tensor:
    return tf.stack([_equalize_channel(image[..., c]) for c in range(3)], -1)


def _sharpness(image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
    kernel = tf.constant([[1, 1, 1], [1, 5, 1], [1, 1, 1]], tf.float32) / 13.0
    kernel = tf.tile(kernel[:, :, None, None], [1, 1, 3, 1])
    smooth = tf.nn.depthwise_conv2d(image[None], kernel, [1, 1, 1, 1], "VALID")[0]
    inner = tf.pad(tf.ones_like(smooth), [[1, 1], [1, 1], [0, 0]]) > 0  # PIL keeps the border
    degenerate = tf.where(inner, tf.pad(smooth, [[1, 1], [1, 1], [0, 0]]), image)
    return _blend(degenerate, image, factor)


def _whole(x: tf.Tensor) -> tf.Tensor:
    """``floor(x)`` of a level product, as timm's ``int()`` of the same product in float64."""
    return tf.floor(x + 1e-4)


def _posterize(image: tf.Tensor, bits: tf.Tensor) -> tf.Tensor:
    """PIL's posterize keeping ``bits`` (0..8) high bits."""
    step = tf.pow(2.0, 8.0 - tf.clip_by_value(bits, 0.0, 8.0))
    return tf.floor(image / step) * step


def _solarize(image: tf.Tensor, threshold: tf.Tensor) -> tf.Tensor:
    return tf.where(image < threshold, image, 255.0 - image)


Op = Callable[["tf.Tensor", "tf.Tensor"], "tf.Tensor"]  # (image, signed level in [-1, 1]) -> image


def _enhancements(factor: Callable[[tf.Tensor], tf.Tensor]) -> dict[str, Op]:
    """Color, Contrast, Brightness and Sharpness, blending with ``factor(level)``."""
    return {
        "Color": lambda im, lv: saturation(im, factor(lv)),
        "Contrast": lambda im, lv: contrast(im, factor(lv)),
        "Brightness": lambda im, lv: brightness(im, factor(lv)),
        "Sharpness": lambda im, lv: _sharpness(im, factor(lv)),
    }


def operations(increasing: bool = False, fill: Fill = GREY) -> dict[str, Op]:
    """timm's RandAugment ops in its order (``increasing``: its ``inc1`` colour ops; ``fill``:
    the colour geometric ops move in). Each takes the image and the level ``M / 10`` with its
    random sign; unsigned ops ignore the sign."""
    if increasing:
        bits = lambda lv: 4.0 - _whole(4.0 * tf.abs(lv))
        threshold = lambda lv: 256.0 - _whole(256.0 * tf.abs(lv))
        factor = lambda lv: tf.maximum(0.1, 1.0 + 0.9 * lv)
    else:
        bits = lambda lv: _whole(4.0 * tf.abs(lv))
        threshold = lambda lv: _whole(256.0 * tf.abs(lv))
        factor = lambda lv: 0.1 + 1.8 * tf.abs(lv)
    return {
        "AutoContrast": lambda im, lv: _autocontrast(im),
        "Equalize": lambda im, lv: _equalize(im),
        "Invert": lambda im, lv: 255.0 - im,
        "Rotate": lambda im, lv: _rotate(im, lv, fill),
        "Posterize": lambda im, lv: _posterize(im, bits(lv)),
        "Solarize": lambda im, lv: _solarize(im, threshold(lv)),
        "SolarizeAdd": lambda im, lv: tf.where(
            im < 128.0, tf.minimum(im + _whole(110.0 * tf.abs(lv)), 255.0), im
        ),
        **_enhancements(factor),
        "ShearX": lambda im, lv: _shear(im, lv, 0, fill),
        "ShearY": lambda im, lv: _shear(im, lv, 1, fill),
        "TranslateX": lambda im, lv: _translate(im, lv, 0, fill),
        "TranslateY": lambda im, lv: _translate(im, lv, 1, fill),
    }


def layer_magnitude(magnitude: float, magnitude_std: float, seed: tf.Tensor) -> tf.Tensor:
    """One layer's magnitude: ``magnitude``, or drawn from N(magnitude, magnitude_std)
    (``inf``: uniform in [0, magnitude]); clipped to [0, 10]."""
    if magnitude_std == math.inf:
        drawn = tf.random.stateless_uniform([], seed, 0.0, magnitude)
    elif magnitude_std > 0:
        drawn = magnitude + magnitude_std * tf.random.stateless_normal([], seed)
    else:
        drawn = tf.constant(magnitude, tf.float32)
    return tf.clip_by_value(drawn, 0.0, 10.0)


def _layer(
    image: tf.Tensor, seed: tf.Tensor, ops: list[Op], magnitude: float, magnitude_std: float
) -> tf.Tensor:
    """With probability 0.5, one uniformly chosen op at its layer's magnitude, random sign."""
    seeds = tf.random.experimental.stateless_split(seed, 4)
    op = tf.random.stateless_uniform([], seeds[0], 0, len(ops), tf.int32)
    sign = tf.where(tf.random.stateless_uniform([], seeds[1]) < 0.5, -1.0, 1.0)
    level = sign * layer_magnitude(magnitude, magnitude_std, seeds[3]) / 10.0
    branches = [lambda f=f: f(image, level) for f in ops]
    apply = tf.random.stateless_uniform([], seeds[2]) < 0.5
    out = tf.cond(apply, lambda: tf.switch_case(op, branches), lambda: image)
    return tf.ensure_shape(out, image.shape)


def randaugment(
    image: tf.Tensor, num_layers: int, magnitude: float, seed: tf.Tensor, *,
    magnitude_std: float = 0.0, increasing: bool = False, fill: Fill = GREY,
) -> tf.Tensor:  # fmt: skip
    """``num_layers`` random ops at ``magnitude`` (0..10), seeded statelessly by ``seed`` (see
    the module docstring for ``magnitude_std`` and ``increasing``); geometric ops fill with
    ``fill`` (timm: the normalisation's mean, as 0..255 levels)."""
    ops = list(operations(increasing, fill).values())
    for layer_seed in tf.unstack(tf.random.experimental.stateless_split(seed, num_layers)):
        image = _layer(image, layer_seed, ops, magnitude, magnitude_std)
    return image
