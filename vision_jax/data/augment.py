"""Image augmentations in TensorFlow, all stateless: each takes an explicit ``seed`` (a [2]
int tensor), so results depend only on the seed.

Per-example ops work on float32 HWC images (pixels 0..255 before normalisation); label maps are
uint8 [H, W, 1], decoded from index PNGs by :func:`decode_index_png` and resized with
:func:`resize_nearest`. ``mix_batch`` (mixup / cutmix) works on a normalised batch and produces
soft labels.
"""

from __future__ import annotations

import io
import math
import struct
import zlib
from collections.abc import Sequence

from vision_jax.tf_without_keras import tf

import numpy as np
from PIL import Image

from vision_jax.data import exif, randaugment

# What :func:`decode` does, in words: the export manifest's ``input.decode``, for serving code
# that reproduces it.
DECODING = {
    "orientation": "JPEGs upright by their EXIF orientation (PIL's ImageOps.exif_transpose)",
    "channels": "grey repeated to RGB; alpha dropped, not composited; palette and CMYK to RGB",
    "bit_depth": "16-bit PNGs and 16-bit grey TIFFs to 8 bits as value // 256; 32-bit "
    "integer and float images refused",
    "jpeg": "libjpeg's accurate integer DCT, as PIL decodes",
    "other_formats": "GIF, BMP, WebP and any other format PIL reads (TIFF, ...) as PIL's "
    "Image.convert('RGB') reads them (the first frame of an animation, on its whole canvas)",
}
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def decode(data: tf.Tensor) -> tf.Tensor:
    """Encoded JPEG/PNG/GIF/BMP/WebP bytes, or a uint8 HWC/HW array, to uint8 RGB [H, W, 3].

    Grayscale, CMYK, palette, alpha and 16-bit images all come out as 8-bit RGB. JPEGs take
    libjpeg's accurate integer DCT, as PIL decodes them (TensorFlow's default, the fast one,
    is up to 5 levels off PIL's pixels, which timm's transforms read), and are turned upright
    by their EXIF orientation (:mod:`.exif`), as viewers and labelling tools show them. Other
    formats than JPEG and PNG go through PIL (:func:`_decode_with_pil`): TensorFlow's decoders
    read a palette BMP's indices as grey, refuse 1-, 4- and 16-bit BMPs and animated WebPs,
    paint a GIF's transparent colour black and return a GIF's first frame without its canvas.
    """
    image = data
    if data.dtype == tf.string:
        jpeg = lambda: tf.io.decode_jpeg(data, channels=3, dct_method="INTEGER_ACCURATE")
        png = lambda: tf.io.decode_png(data, channels=3, dtype=tf.uint8)
        is_jpeg = tf.io.is_jpeg(data)
        is_png = tf.strings.substr(data, 0, len(_PNG_SIGNATURE)) == _PNG_SIGNATURE
        exif_jpeg_or_other = lambda: tf.cond(
            is_jpeg,
            lambda: exif.decode_upright(data),
            lambda: tf.cond(is_png, png, lambda: _decode_with_pil(data)),
        )
        image = tf.cond(is_jpeg & ~exif.may_have_exif(data), jpeg, exif_jpeg_or_other)
    if image.shape.rank == 2:
        image = image[..., None]
    if image.shape[-1] == 1:
        image = tf.image.grayscale_to_rgb(image)
    return tf.ensure_shape(image, [None, None, 3])


def _decode_with_pil(data: tf.Tensor) -> tf.Tensor:
    """Encoded bytes of another format than JPEG or PNG to uint8 RGB [H, W, 3], as PIL's
    ``Image.convert("RGB")`` reads them (one op, a Python call)."""

    def read(data: tf.Tensor) -> tuple[np.ndarray, str]:
        try:
            with Image.open(io.BytesIO(data.numpy())) as image:
                image.seek(0)  # an animation's first frame
                return _rgb_of(image), ""
        except Image.UnidentifiedImageError:
            return np.zeros((0, 0, 3), np.uint8), "not an image file of a known format"
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            return np.zeros((0, 0, 3), np.uint8), f"{type(e).__name__}: {e}"

    image, problem = tf.py_function(read, [data], (tf.uint8, tf.string))
    readable = tf.debugging.Assert(tf.equal(problem, ""), [problem])  # one line, no traceback
    with tf.control_dependencies([readable]):
        return tf.ensure_shape(tf.identity(image), [None, None, 3])


def _rgb_of(image: Image.Image) -> np.ndarray:
    """An open PIL image as uint8 RGB: 16-bit grey (a TIFF's) as value // 256, as 16-bit PNGs
    decode, other modes as ``convert("RGB")`` reads them; 32-bit integer and float pixels
    (which that conversion clips to 255) are refused."""
    if image.mode.startswith("I;16"):
        grey = (np.asarray(image).astype(np.uint16) // 256).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=-1)
    if image.mode in ("I", "F"):
        raise ValueError(f"{image.mode!r} pixels (32-bit integer or float) have no 8-bit reading")
    return np.asarray(image.convert("RGB"))


def resize(image: tf.Tensor, size: tf.Tensor, method: str) -> tf.Tensor:
    """A float32 image of whole levels (0..255) resized to ``size`` [h, w] by ``method``
    ("bilinear" or "bicubic") as PIL resamples an 8-bit image: the width, then the height (the
    height first when it loses more than twice as many pixels as the width, as Pillow orders
    them), each pass antialiased when it shrinks and rounded to whole levels in 0..255 (PIL's
    8-bit intermediate and result); a pass whose side does not change is skipped. Bilinear
    enlarging takes the plain kernel (the same result, several times faster); plain bicubic is
    not PIL's, so bicubic is always antialiased."""
    shape = tf.shape(image)[:2]

    def passes() -> tf.Tensor:
        lost = shape - size  # pixels each side loses
        height_first = (lost[0] > 0) & (lost[0] > 2 * lost[1])
        first = tf.where(height_first, tf.stack([size[0], shape[1]]), tf.stack([shape[0], size[1]]))
        return _resize_pass(_resize_pass(image, first, method), size, method)

    # One branch op per decision: each costs as much as resizing a small image.
    return tf.cond(tf.reduce_all(shape == size), lambda: image, passes)


def _resize_pass(image: tf.Tensor, size: tf.Tensor, method: str) -> tf.Tensor:
    shape = tf.shape(image)[:2]
    antialiased = lambda: _levels(tf.image.resize(image, size, method, antialias=True))
    plain = antialiased if method == "bicubic" else lambda: _levels(tf.image.resize(image, size))
    kind = tf.where(tf.reduce_all(shape == size), 0, tf.where(tf.reduce_any(shape > size), 1, 2))
    return tf.switch_case(kind, [lambda: image, antialiased, plain])


def clamp(image: tf.Tensor, method: str) -> tf.Tensor:
    """A resized 0..255 image clamped to that range where ``method`` overshoots (bicubic)."""
    return tf.clip_by_value(image, 0.0, 255.0) if method == "bicubic" else image


def _levels(image: tf.Tensor) -> tf.Tensor:
    """Resampled pixels rounded to whole levels in 0..255, as PIL stores a pass's result."""
    return tf.floor(tf.clip_by_value(image, 0.0, 255.0) + 0.5)


def scaled_shape(shape: tf.Tensor, shorter: float | tf.Tensor) -> tf.Tensor:
    """[h, w] of ``shape`` scaled so the shorter side is ``shorter``, the longer rounded down
    (at least 1), as torchvision's ``Resize`` computes it (in float64: ``int(size * long /
    short)``)."""
    shape = tf.cast(shape[:2], tf.float64)
    scaled = tf.floor(shape * tf.cast(shorter, tf.float64) / tf.reduce_min(shape))
    return tf.maximum(tf.cast(scaled, tf.int32), 1)


def resize_shorter(image: tf.Tensor, size: int, method: str) -> tf.Tensor:
    """Resizes so the shorter side is ``size``, keeping the aspect ratio."""
    return resize(image, tf.maximum(scaled_shape(tf.shape(image), size), size), method)


def resize_nearest(label_map: tf.Tensor, size: tf.Tensor) -> tf.Tensor:
    """Nearest-neighbour resize of a label map [H, W, 1] to ``size`` [h, w], keeping its dtype."""
    return tf.image.resize(label_map, size, method="nearest")


def center_crop(image: tf.Tensor, size: int) -> tf.Tensor:
    """The central ``size`` x ``size`` window (the image must be at least that large); an odd
    margin is split as torchvision's ``CenterCrop`` splits it (``round(margin / 2)``, halves to
    even)."""
    margins = tf.cast(tf.shape(image)[:2] - size, tf.float32)
    top, left = tf.unstack(tf.cast(tf.round(margins / 2), tf.int32))
    return tf.ensure_shape(image[top : top + size, left : left + size], [size, size, 3])


def pad(image: tf.Tensor, padding: int, min_size: int, fill: float | int = 0) -> tf.Tensor:
    """Pads ``padding`` pixels of ``fill`` on each side, then at the bottom and right up to at
    least ``min_size`` x ``min_size``."""
    shape = tf.shape(image)
    grow = tf.maximum(min_size - (shape[:2] + 2 * padding), 0)
    paddings = [[padding, padding + grow[0]], [padding, padding + grow[1]], [0, 0]]
    return tf.pad(image, paddings, constant_values=tf.cast(fill, image.dtype))


def sample_inception_box(
    shape: tf.Tensor, scale: Sequence[float], ratio: Sequence[float], seed: tf.Tensor
) -> tf.Tensor:
    """A random crop window ``[top, left, height, width]`` covering a fraction in ``scale`` of the
    area with aspect ratio (w/h) in ``ratio``: the Inception / big_vision crop (TF's
    sample_distorted_bounding_box; 10 tries, then the whole image). It draws the crop's height
    uniformly, so its crops are smaller on average than timm's RandomResizedCrop, which draws
    the area uniformly (at scale (0.08, 1) and the default ratios: 0.41 of a square image on
    average against 0.48)."""
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.cast(shape[:3], tf.int32),
        bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
        seed=seed,
        min_object_covered=0.0,
        aspect_ratio_range=tuple(ratio),
        area_range=tuple(scale),
        max_attempts=10,
        use_image_if_no_bounding_boxes=True,
    )
    return tf.stack([begin[0], begin[1], size[0], size[1]])


def decode_inception_crop(
    data: tf.Tensor, size: int, scale: Sequence[float], ratio: Sequence[float], seed: tf.Tensor,
    method: str,
) -> tf.Tensor:  # fmt: skip
    """Random-resized ("inception") crop to ``size`` x ``size`` float32 (resized by ``method``),
    decoding only the crop window of JPEG bytes (of upright ones: others are decoded whole and
    turned first)."""

    def crop_decoded(image: tf.Tensor) -> tf.Tensor:
        box = sample_inception_box(tf.shape(image), scale, ratio, seed)
        return image[box[0] : box[0] + box[2], box[1] : box[1] + box[3]]

    if data.dtype == tf.string:

        def jpeg() -> tf.Tensor:
            shape = tf.image.extract_jpeg_shape(data)
            box = sample_inception_box(shape, scale, ratio, seed)
            image = tf.image.decode_and_crop_jpeg(
                data, box, channels=3, dct_method="INTEGER_ACCURATE"
            )
            return tf.ensure_shape(image, [None, None, 3])

        stored_upright = tf.io.is_jpeg(data) & (exif.exif_orientation(data) == 1)
        image = tf.cond(stored_upright, jpeg, lambda: crop_decoded(decode(data)))
    else:
        image = crop_decoded(decode(data))
    image = resize(tf.cast(image, tf.float32), [size, size], method)
    return tf.ensure_shape(image, [size, size, 3])


def _grey_plte_chunk(entries: int) -> bytes:
    body = b"PLTE" + bytes(v for i in range(entries) for v in (i, i, i))
    return struct.pack(">I", len(body) - 4) + body + struct.pack(">I", zlib.crc32(body))


_GREY_PLTE = [_grey_plte_chunk(n) for n in range(257)]  # by number of palette entries


def _chunk_length(data: tf.Tensor, at: tf.Tensor) -> tf.Tensor:
    """The data length of the PNG chunk that starts at byte ``at`` (4 bytes, big-endian), at
    most the file's size (a damaged length would overflow int32 and walk backwards)."""
    length = tf.cast(tf.io.decode_raw(tf.strings.substr(data, at, 4), tf.uint8), tf.int32)
    length = tf.reduce_sum(length * tf.constant([1 << 24, 1 << 16, 1 << 8, 1]))
    size = tf.strings.length(data)
    return tf.where((length < 0) | (length > size), size, length)


def _grey_palette(data: tf.Tensor, depth: tf.Tensor) -> tf.Tensor:
    """A palette PNG of bit ``depth`` with its palette replaced by the grey ramp (i, i, i) of
    every index the depth can hold (a file's palette may be shorter than the indices its pixels
    use, such as VOC's 255 "void" past a 21-colour palette: decoders read those as 0), so that
    ``decode_png(channels=1)`` returns the indices (TensorFlow always expands palettes). The
    PLTE chunk is found by walking the chunks (length, type, data, CRC) after the signature:
    a text chunk before it may hold the bytes "PLTE"."""
    size = tf.strings.length(data)
    kind = lambda at: tf.strings.substr(data, tf.minimum(at + 4, size), 4)  # "" past the end
    not_plte = lambda at: (at + 8 <= size) & (kind(at) != "PLTE")
    (at,) = tf.while_loop(
        not_plte, lambda at: (at + 12 + _chunk_length(data, at),), (tf.constant(8),)
    )

    def replaced() -> tf.Tensor:
        length = _chunk_length(data, at)
        after = tf.minimum(at + 12 + length, size)  # past its CRC
        entries = tf.bitwise.left_shift(1, tf.minimum(tf.cast(depth, tf.int32), 8))
        plte = tf.gather(tf.constant(_GREY_PLTE), entries)
        rest = tf.strings.substr(data, after, size - after)
        return tf.strings.join([tf.strings.substr(data, 0, at), plte, rest])

    # No PLTE chunk (a damaged file): as it is, for decode_png to refuse.
    return tf.cond(at + 8 <= size, replaced, lambda: data)


def decode_index_png(data: tf.Tensor) -> tf.Tensor:
    """A grayscale or palette PNG (bit depth <= 8) to its sample values / palette indices,
    uint8 [H, W, 1]; any other file fails when run. A 1-, 2- or 4-bit grayscale PNG holds its
    values as they are (a 1-bit mask is 0 and 1), not stretched to 8 bits as images are."""
    header = tf.io.decode_raw(tf.strings.substr(data, 0, 26), tf.uint8)
    header = tf.pad(header, [[0, 26 - tf.shape(header)[0]]])
    signature = tf.constant(list(b"\x89PNG\r\n\x1a\n"), tf.uint8)
    depth, colour = header[24], header[25]
    is_png = tf.debugging.Assert(
        tf.reduce_all(header[:8] == signature),
        ["A label map must be a grayscale or palette PNG; this file is not a PNG."],
    )
    with tf.control_dependencies([is_png]):
        check = tf.debugging.Assert(
            (depth <= 8) & ((colour == 0) | (colour == 3)),
            ["A label map must be a grayscale or palette PNG of at most 8 bits; this PNG's "
             "colour type (0 grey, 2 RGB, 3 palette, 4 grey + alpha, 6 RGBA) and bit depth:",
             colour, depth],
        )  # fmt: skip
    with tf.control_dependencies([check]):
        data = tf.cond(colour == 3, lambda: _grey_palette(data, depth), lambda: data)
    values = tf.ensure_shape(tf.io.decode_png(data, channels=1), [None, None, 1])
    levels = tf.bitwise.left_shift(tf.constant(1, tf.int32), tf.cast(depth, tf.int32)) - 1
    stretch = tf.where((colour == 0) & (depth < 8), 255 // tf.maximum(levels, 1), 1)
    return values // tf.cast(stretch, tf.uint8)  # decode_png made 1-bit 1 into 255


def color_jitter(image: tf.Tensor, strength: float, seed: tf.Tensor) -> tf.Tensor:
    """timm's ``--color-jitter`` (torchvision's ``ColorJitter(s, s, s)`` on a PIL image):
    brightness, contrast and saturation, each by a factor drawn from ``U[max(0, 1 - s), 1 + s]``,
    in a random order, each as PIL's ``ImageEnhance`` computes it on whole levels. ``image``:
    float32 [H, W, 3] of whole levels 0..255."""
    return jitter_colors(image, *color_jitter_draw(strength, seed))


def color_jitter_draw(strength: float, seed: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """The brightness, contrast and saturation factors and their order (a permutation of
    0, 1, 2) that :func:`color_jitter` draws for ``seed``."""
    seeds = tf.random.experimental.stateless_split(seed, 2)
    factors = tf.random.stateless_uniform([3], seeds[0], max(0.0, 1.0 - strength), 1.0 + strength)
    return factors, tf.argsort(tf.random.stateless_uniform([3], seeds[1]))


def jitter_colors(image: tf.Tensor, factors: tf.Tensor, order: tf.Tensor) -> tf.Tensor:
    """Brightness, contrast and saturation by ``factors``, in ``order``, as PIL's."""
    ops = [randaugment.brightness, randaugment.contrast, randaugment.saturation]
    for k in range(3):
        branches = [lambda i=i, im=image: ops[i](im, factors[i]) for i in range(3)]
        image = tf.ensure_shape(tf.switch_case(order[k], branches), image.shape)
    return image


_ERASE_TRIES = 10


def random_erase(image: tf.Tensor, probability: float, seed: tf.Tensor) -> tf.Tensor:
    """timm's RandomErasing (mode "pixel") on a normalised image: with ``probability``, a box of
    2%..33% of the area and aspect ratio in [0.3, 3.3] is replaced by standard-normal noise. As
    timm, up to 10 boxes are drawn and the first that fits inside the image is erased (none
    if none fits)."""
    seeds = tf.random.experimental.stateless_split(seed, 5)
    h, w = image.shape[0], image.shape[1]
    area = h * w * tf.random.stateless_uniform([_ERASE_TRIES], seeds[0], 0.02, 1 / 3)
    log_ratio = tf.random.stateless_uniform(
        [_ERASE_TRIES], seeds[1], math.log(0.3), math.log(1 / 0.3)
    )
    heights = tf.maximum(tf.cast(tf.round(tf.sqrt(area * tf.exp(log_ratio))), tf.int32), 1)
    widths = tf.maximum(tf.cast(tf.round(tf.sqrt(area / tf.exp(log_ratio))), tf.int32), 1)
    fits = (heights < h) & (widths < w)
    first = tf.argmax(tf.cast(fits, tf.int32), output_type=tf.int32)
    eh, ew = tf.minimum(heights[first], h), tf.minimum(widths[first], w)
    corner = tf.random.stateless_uniform([2], seeds[2], 0, 1 << 30, tf.int32)
    top, left = corner[0] % (h - eh + 1), corner[1] % (w - ew + 1)

    def erased() -> tf.Tensor:
        noise = tf.random.stateless_normal([eh, ew, image.shape[2]], seeds[3])
        return tf.raw_ops.TensorStridedSliceUpdate(
            input=image,
            begin=tf.stack([top, left, 0]),
            end=tf.stack([top + eh, left + ew, image.shape[2]]),
            strides=[1, 1, 1],
            value=noise,
        )

    erase = (tf.random.stateless_uniform([], seeds[4]) < probability) & tf.reduce_any(fits)
    return tf.cond(erase, erased, lambda: image)


def _beta(alpha: float, seed: tf.Tensor) -> tf.Tensor:
    seeds = tf.random.experimental.stateless_split(seed, 2)
    a = tf.random.stateless_gamma([], seeds[0], alpha)
    b = tf.random.stateless_gamma([], seeds[1], alpha)
    return a / (a + b)


def cutmix_box(h: int, w: int, lam: tf.Tensor, cy: tf.Tensor, cx: tf.Tensor) -> tuple:
    """(top, bottom, left, right) of the box about ``1 - lam`` of the area centred at
    (``cy``, ``cx``), clipped to the image: timm's ``rand_bbox``."""
    cut = tf.sqrt(1.0 - lam)
    ch, cw = tf.cast(h * cut, tf.int32), tf.cast(w * cut, tf.int32)
    top, bottom = tf.maximum(cy - ch // 2, 0), tf.minimum(cy + (ch + 1) // 2, h)
    left, right = tf.maximum(cx - cw // 2, 0), tf.minimum(cx + (cw + 1) // 2, w)
    return top, bottom, left, right


def _cutmix_mask(h: int, w: int, lam: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """A [h, w, 1] float mask, 1 outside a box of about ``1 - lam`` of the area (clipped)."""
    centre = tf.random.stateless_uniform([2], seed, 0, 1 << 30, tf.int32)
    top, bottom, left, right = cutmix_box(h, w, lam, centre[0] % h, centre[1] % w)
    rows, cols = tf.range(h)[:, None, None], tf.range(w)[None, :, None]
    inside = (rows >= top) & (rows < bottom) & (cols >= left) & (cols < right)
    return 1.0 - tf.cast(inside, tf.float32)


def mix_batch(
    batch: dict[str, tf.Tensor],
    *,
    num_classes: int,
    mixup_alpha: float,
    cutmix_alpha: float,
    prob: float,
    switch_prob: float,
    seed: tf.Tensor,
) -> dict[str, tf.Tensor]:
    """timm's batch-mode Mixup/CutMix: with probability ``prob`` the batch is blended with its
    reverse using one ``lam ~ Beta(alpha, alpha)``; cutmix (chosen with ``switch_prob`` when both
    alphas are set) pastes a box instead and sets ``lam`` to the kept area. Adds
    ``soft_label`` [B, num_classes] = lam * one_hot(label) + (1 - lam) * one_hot(reversed label);
    ``label`` stays the integer label of the un-mixed example."""
    seeds = tf.random.experimental.stateless_split(seed, 4)
    images, labels = batch["image"], batch["label"]
    h, w = images.shape[1], images.shape[2]
    use_cutmix = tf.constant(cutmix_alpha > 0 and mixup_alpha <= 0)
    if cutmix_alpha > 0 and mixup_alpha > 0:
        use_cutmix = tf.random.stateless_uniform([], seeds[0]) < switch_prob
    lam_mixup = _beta(mixup_alpha, seeds[1]) if mixup_alpha > 0 else tf.constant(1.0)
    lam_cutmix = _beta(cutmix_alpha, seeds[1]) if cutmix_alpha > 0 else tf.constant(1.0)
    lam = tf.where(use_cutmix, lam_cutmix, lam_mixup)
    keep = _cutmix_mask(h, w, lam, seeds[2])
    apply = tf.random.stateless_uniform([], seeds[3]) < prob
    label_lam = tf.where(apply, tf.where(use_cutmix, tf.reduce_mean(keep), lam), 1.0)
    other = tf.reverse(images, [0])

    def mixed() -> tf.Tensor:
        return tf.cond(
            use_cutmix,
            lambda: tf.where(keep > 0, images, other),
            lambda: lam * images + (1.0 - lam) * other,
        )

    one_hot = tf.one_hot(labels, num_classes)
    return {
        **batch,
        "image": tf.cond(apply, mixed, lambda: images),
        "soft_label": label_lam * one_hot + (1.0 - label_lam) * tf.reverse(one_hot, [0]),
    }
