"""The report's figures, drawn with matplotlib's Agg backend (no display needed)."""

from __future__ import annotations

import dataclasses
import functools
import math
import pathlib
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

from vision_jax.drawing import font_characters

if TYPE_CHECKING:
    from matplotlib.figure import Figure

COUNTS_UP_TO = 20  # classes: write the counts in the confusion matrix's cells
NAMES_UP_TO = 60  # classes: name every row and column
BY_INDEX = "class index: names in {}"  # the note of a figure that shows classes by index


@dataclasses.dataclass(frozen=True)
class Thumb:
    """One example for the hardest-examples grid: an RGB uint8 image and its title;
    ``indexed``: the title with class indices for names, shown when a name has a character
    the figures' font lacks (empty: the title names no class)."""

    image: np.ndarray
    title: str
    indexed: str = ""


def _figure(**kwargs) -> Figure:
    """A matplotlib Figure (imported at the first figure: a run that never draws one does not
    pay for the import); without pyplot it draws with Agg and holds no global state."""
    from matplotlib.figure import Figure

    return Figure(**kwargs)


def drawable(texts: Iterable[str]) -> bool:
    """Whether matplotlib's font for text (with its fallback fonts) has every character of
    ``texts``: one it lacks is drawn as a box, with a "Glyph ... missing" warning on stderr."""
    from matplotlib import font_manager

    props = font_manager.FontProperties()  # rcParams' family, as the figures' text
    find = getattr(font_manager.fontManager, "_find_fonts_by_props", None)  # with fallbacks
    fonts = find(props) if find is not None else [font_manager.findfont(props)]
    needed = {ord(c) for text in texts for c in text if not c.isspace()}
    return needed <= _glyphs(tuple(fonts))


@functools.cache
def _glyphs(fonts: tuple[str, ...]) -> frozenset[int]:
    """The characters that one of ``fonts`` (files) has."""
    return frozenset().union(*(font_characters(f) for f in fonts))


def _save(figure: Figure, path: pathlib.Path) -> None:
    figure.savefig(path, dpi=100, bbox_inches="tight")


def _count(value: int) -> str:
    """A short count: 7, 1234, 12.3k, 4.5M."""
    if value < 10_000:
        return str(value)
    return f"{value / 1e3:.1f}k" if value < 1_000_000 else f"{value / 1e6:.1f}M"


def confusion_figure(matrix: np.ndarray, class_names: Sequence[str], path: pathlib.Path) -> None:
    """A heat map of ``matrix[true, predicted]``, coloured by the share of each true class."""
    matrix = np.asarray(matrix)
    k = len(class_names)
    rows = matrix.sum(1, keepdims=True)
    share = matrix / np.maximum(rows, 1)
    side = min(max(4.0, 0.45 * k + 2.0), 30.0)
    figure = _figure(figsize=(side + 1.2, side))
    ax = figure.add_subplot()
    shown = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    figure.colorbar(shown, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    named = k <= NAMES_UP_TO and drawable(class_names)  # else by index, not as boxes
    where = "" if named else f" ({BY_INDEX.format('confusion_matrix.csv')})"
    ax.set_xlabel(f"predicted{where}")
    ax.set_ylabel(f"true{where}")
    if named:
        turned = k > 5 or max(map(len, class_names)) > 8
        ax.set_xticks(
            range(k), class_names, rotation=45 if turned else 0, ha="right" if turned else "center"
        )
        ax.set_yticks(range(k), class_names)
    if k <= COUNTS_UP_TO:
        for (i, j), value in np.ndenumerate(matrix):
            colour = "white" if share[i, j] > 0.5 else "black"
            ax.text(j, i, _count(int(value)), ha="center", va="center", color=colour, fontsize=8)
    _save(figure, path)


def hardest_figure(thumbs: Sequence[Thumb], path: pathlib.Path) -> None:
    """The examples in a grid, each with its title (all with class indices where a title has
    a character the font lacks)."""
    named = drawable(thumb.title for thumb in thumbs)
    columns = min(len(thumbs), 4 if len(thumbs) <= 16 else 8)
    rows = math.ceil(len(thumbs) / columns)
    height, width = thumbs[0].image.shape[:2]
    figure = _figure(figsize=(2.3 * columns * max(width / height, 1.0), 2.5 * rows))
    for i, thumb in enumerate(thumbs):
        ax = figure.add_subplot(rows, columns, i + 1)
        ax.imshow(thumb.image, interpolation="nearest")
        ax.set_title(thumb.title if named else thumb.indexed or thumb.title, fontsize=8)
        ax.axis("off")
    if not named:
        figure.suptitle(f"({BY_INDEX.format('hardest_examples.csv')})", fontsize=8)
    figure.tight_layout()
    _save(figure, path)


def curves_figure(
    panels: Mapping[str, Mapping[str, tuple]], path: pathlib.Path, xlabel: str = "step"
) -> None:
    """One panel per title, one line per ``label: (steps, values)`` in it, against ``xlabel``
    (a legend unless the panel's one line is named as the panel). The panels share the x axis:
    one with a single point (one evaluation) is on the others' range, not one of its own."""
    figure = _figure(figsize=(4.6 * len(panels), 3.4))
    first = None
    for i, (title, lines) in enumerate(panels.items()):
        ax = figure.add_subplot(1, len(panels), i + 1, sharex=first)
        first = first or ax
        for label, (steps, values) in lines.items():
            ax.plot(steps, values, marker="." if len(steps) < 30 else None, label=label)
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        if list(lines) != [title]:
            ax.legend(fontsize=8)
    figure.tight_layout()
    _save(figure, path)
