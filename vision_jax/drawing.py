"""Boxes drawn on an image, each outlined on the pixels it covers and labelled in a font that
has accented letters: predict's ``--draw`` and the detection report's hardest examples. PIL
and matplotlib are imported at the first drawing."""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

PALETTE = (
    (255, 64, 64), (64, 200, 64), (64, 128, 255), (255, 200, 0), (255, 64, 255), (0, 220, 220),
    (255, 128, 0), (160, 96, 255), (128, 255, 128), (255, 255, 255),
)  # fmt: skip


@functools.cache
def _font_file() -> str | None:
    """DejaVu Sans' file, matplotlib's own font, found through its font manager (None: not
    found)."""
    try:
        from matplotlib import font_manager

        return font_manager.findfont("DejaVu Sans", fallback_to_default=False)
    except (ImportError, ValueError):
        return None


@functools.cache
def label_font(size: int) -> Any:
    """DejaVu Sans (:func:`_font_file`) at ``size`` pixels for the labels of drawn boxes:
    Pillow's default font draws every character outside its small set (é, ü) as the same box.
    Pillow's default if that cannot be loaded."""
    from PIL import ImageFont

    try:
        if (found := _font_file()) is not None:
            return ImageFont.truetype(found, size)
    except OSError:
        pass
    return ImageFont.load_default(size)


def labels_drawable(texts: Iterable[str]) -> bool:
    """Whether :func:`label_font` has every character of ``texts``: one it lacks (猫, 犬) is
    drawn as the same empty box, so such names are labelled by index instead. Pillow's default
    font: printable ASCII only."""
    needed = {c for text in texts for c in text if not c.isspace()}
    found = _font_file()
    try:
        if found is not None:
            return {ord(c) for c in needed} <= font_characters(found)
    except OSError:
        pass
    return all(" " < c <= "~" for c in needed)


@functools.cache
def font_characters(path: str) -> frozenset[int]:
    """The characters (code points) the font file ``path`` has."""
    from matplotlib import font_manager

    return frozenset(font_manager.get_font(path).get_charmap())


def label_size(height: int, width: int) -> int:
    """The labels' font size in pixels for an image of ``height`` x ``width``: 11 up to
    about 440 pixels on the short side, then growing with it."""
    return max(11, round(min(height, width) / 40))


def box_pixels(bbox: Sequence[float]) -> tuple[int, int, int, int]:
    """COCO ``[x, y, w, h]`` (pixel edges) as the first and last pixel it covers, inclusive, for
    Pillow's ``rectangle``: its edges rounded half up (Python's ``round``, half to even, drew a
    box at x 2.5 one pixel wider than the same box at 3.5), so ``[5, 8, 24, 32]`` covers columns
    5..28 and rows 8..39 (at least one pixel)."""
    x, y, w, h = bbox
    edge = lambda v: math.floor(v + 0.5)
    left, top = edge(x), edge(y)
    return left, top, max(left, edge(x + w) - 1), max(top, edge(y + h) - 1)


def draw_boxes(
    image: np.ndarray, boxes: Iterable[tuple[Sequence[float], tuple, str]], width: int = 2,
    label_below: bool = False,
) -> np.ndarray:  # fmt: skip
    """RGB uint8 ``image`` with each of ``boxes`` (COCO ``[x, y, w, h]``, colour, label) in
    turn (one with a non-finite coordinate left out) outlined ``width`` pixels inward on the
    pixels it covers (:func:`box_pixels`) and
    labelled inside its top-left corner (``label_below``: under its bottom-left corner, or
    inside it where the image ends below the box), in :func:`label_font` sized to the image."""
    from PIL import Image, ImageDraw

    drawn = Image.fromarray(np.asarray(image, np.uint8))
    draw = ImageDraw.Draw(drawn)
    font = label_font(label_size(*drawn.size[::-1]))
    for bbox, colour, label in boxes:
        if not all(math.isfinite(v) for v in bbox):
            continue  # a NaN or infinite edge: nothing to draw
        left, top, right, bottom = box_pixels(bbox)
        draw.rectangle([left, top, right, bottom], outline=colour, width=width)
        corner = _label_corner(draw, font, label, (left, top, bottom), drawn.height, label_below)
        draw.text(corner, label, fill=colour, font=font)
    return np.asarray(drawn)


def _label_corner(
    draw: Any, font: Any, label: str, edges: tuple[int, int, int], height: int, below: bool
) -> tuple[int, int]:
    """Where a box's label starts: inside its top-left corner, or (``below``) under its
    bottom-left corner, inside the box where the image (``height`` rows) has no room under it."""
    left, top, bottom = edges
    if not below:
        return left + 2, top + 1
    text = draw.textbbox((0, 0), label, font=font)[3]
    if bottom + 1 + text <= height:
        return left + 2, bottom + 1
    return left + 2, max(top + 1, bottom - text - 1)
