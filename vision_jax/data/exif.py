"""EXIF orientation: read from the header of JPEG bytes, and images turned upright by it.

Cameras store a photo as the sensor saw it and record how to turn it for display (EXIF tag
0x0112, values 1-8); viewers and labelling tools show it turned, so masks and boxes are drawn on
the turned image. Decoding turns images the same way, as ``PIL.ImageOps.exif_transpose`` does.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

from vision_jax.tf_without_keras import tf

logger = logging.getLogger(__name__)

_HEAD = 1 << 17  # the APP1 segment (at most 64 KiB) follows SOI and at most a few others
_EXIF_TAG = b"Exif\0\0"
JPEG_FORMATS = ("JPEG", "MPO")  # PIL's names: MPO is a JPEG holding more pictures (phones)
_ORIENTATION = 0x0112
_HAS_EXIF = r"\C*Exif\x00\x00\C*"  # \C: any byte (the bytes are not UTF-8)
CHECKED = 10_000  # JPEG headers read per split for turned images (evenly spaced; ~0.2 ms each)


def may_have_exif(data: tf.Tensor) -> tf.Tensor:
    """Whether the first bytes of ``data`` hold an EXIF header (one cheap pass: files without
    one need not be parsed)."""
    return tf.strings.regex_full_match(tf.strings.substr(data, 0, _HEAD), _HAS_EXIF)


def exif_orientation(data: tf.Tensor) -> tf.Tensor:
    """The EXIF orientation (int32, 1-8; 1 when absent or unreadable) of JPEG bytes."""

    def parsed() -> tf.Tensor:
        return tf.ensure_shape(tf.py_function(parse_orientation, [data], tf.int32), [])

    return tf.cond(may_have_exif(data), parsed, lambda: tf.constant(1))


def decode_upright(data: tf.Tensor) -> tf.Tensor:
    """JPEG bytes decoded (as PIL decodes) and turned upright, in one op (a Python call): as
    graph ops, the parser's branch slowed the decoding of every other image by a fifth
    (tf.data's control flow passes through the untaken branch's every op)."""

    def decode(data: tf.Tensor) -> tf.Tensor:
        image = tf.io.decode_jpeg(data, channels=3, dct_method="INTEGER_ACCURATE")
        orientation = parse_orientation(data)
        return image if orientation == 1 else upright(image, tf.constant(orientation))

    return tf.ensure_shape(tf.py_function(decode, [data], tf.uint8), [None, None, 3])


def parse_orientation(data: bytes | tf.Tensor) -> int:
    """The orientation tag of the first APP1 "Exif" segment of JPEG bytes (or an eager string
    tensor), or 1: plain Python over the header's bytes (TensorFlow ops run eagerly in a
    Python call took ~40 ms an image). The marker segments after SOI are walked (at most 64,
    stopping at SOS) to the first "Exif\\0\\0" APP1; its TIFF header's byte order ("II", else
    "MM") reads the first IFD's offset and its entries (at most 256) for tag 0x0112, a SHORT.
    Reads outside the header see zeros."""
    if not isinstance(data, bytes | bytearray):
        data = data.numpy()
    head = memoryview(data)[:_HEAD]
    size = len(head)
    pos, tiff = 2, -1
    for _ in range(64):
        if not (pos + 10 < size and head[pos] == 0xFF and head[pos + 1] != 0xDA):
            break
        if head[pos + 1] == 0xE1 and head[pos + 4 : pos + 10] == _EXIF_TAG:
            tiff = pos + 10
            break
        pos += 2 + head[pos + 2] * 256 + head[pos + 3]
    if tiff < 0:
        return 1

    def at(i: int) -> int:
        return head[i] if 0 <= i < size else 0

    little = at(tiff) == 0x49 and at(tiff + 1) == 0x49  # "II", else "MM"

    def u16(i: int) -> int:
        return at(i) + 256 * at(i + 1) if little else 256 * at(i) + at(i + 1)

    high, low = (u16(tiff + 6), u16(tiff + 4)) if little else (u16(tiff + 4), u16(tiff + 6))
    ifd = tiff + 65536 * high + low  # the first IFD's offset: a 32-bit word
    entries = [ifd + 2 + 12 * k for k in range(min(u16(ifd), 256))]
    values = [u16(e + 8) for e in entries if u16(e) == _ORIENTATION]  # a SHORT: field's start
    value = max(values, default=0)
    return value if 1 <= value <= 8 else 1


def upright(image: tf.Tensor, orientation: tf.Tensor) -> tf.Tensor:
    """``image`` [H, W, C] turned for display by its EXIF ``orientation``, as PIL's
    ``exif_transpose`` turns it."""
    transposed = lambda: tf.transpose(image, [1, 0, 2])
    branches = [
        lambda: image,
        lambda: image[:, ::-1],  # 2: mirrored
        lambda: image[::-1, ::-1],  # 3: upside down
        lambda: image[::-1],  # 4: mirrored upside down
        transposed,  # 5
        lambda: transposed()[:, ::-1],  # 6: turned a quarter clockwise
        lambda: transposed()[::-1, ::-1],  # 7
        lambda: transposed()[::-1],  # 8: turned a quarter anticlockwise
    ]
    return tf.switch_case(tf.clip_by_value(orientation, 1, 8) - 1, branches)


def upright_size(image: Any) -> tuple[int, int]:
    """(width, height) of an open PIL image once turned upright, as decoding turns JPEGs."""
    width, height = image.size
    return (height, width) if orientation_in(image) >= 5 else (width, height)


def turned_by_exif(path: str) -> bool:
    """Whether the JPEG ``path`` is turned a quarter by its EXIF orientation when decoded."""
    return orientation_of(path) >= 5


def orientation_of(path: str) -> int:
    """The EXIF orientation (1-8) of the JPEG file ``path`` from its header (no decoding); 1
    for other files, and files that cannot be opened (the pipeline names those)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            return orientation_in(image)
    except (OSError, ValueError, Image.DecompressionBombError):
        return 1


def orientation_in(image: Any) -> int:
    """The EXIF orientation (1-8) of an open PIL image: 1 but for a JPEG that records 2-8."""
    if image.format not in JPEG_FORMATS:
        return 1
    orientation = image.getexif().get(_ORIENTATION, 1)
    return orientation if orientation in range(1, 9) else 1


def warn_of_turned(
    paths: Sequence[str], what: str, where: str, known: Mapping[str, int] | None = None
) -> None:
    """Warns once (per split: ``where``) of the JPEGs among ``paths`` (at most :data:`CHECKED`
    of them, evenly spaced) that decoding turns or mirrors by their EXIF orientation (2-8):
    their ``what`` (boxes, label maps) are taken in the upright frame, and annotations made
    on the stored pixels would not fit, in silence where the size stays (2-4; 5-8 if square).
    ``known``: orientations already read (a path's header is not read again). PIL's warnings
    of damaged EXIF data are silenced during the scan (the pipeline decodes such files)."""
    jpegs = [str(p) for p in paths if str(p).lower().endswith((".jpg", ".jpeg"))]
    checked = jpegs[:: -(-len(jpegs) // CHECKED) or 1]
    known = known or {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        turned = [p for p in checked if (known[p] if p in known else orientation_of(p)) != 1]
    if not turned:
        return
    share = f"of the {len(checked)} JPEGs checked" if len(checked) < len(jpegs) else "JPEG(s)"
    logger.warning(
        "%s: %d %s are stored turned or mirrored (EXIF orientation 2-8), such as %s: they are "
        "decoded upright, as viewers show them, and their %s are taken in that upright frame "
        "(annotate the upright image, or save it upright).",
        where, len(turned), share, ", ".join(turned[:2]), what,
    )  # fmt: skip
