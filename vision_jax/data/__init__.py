"""Input data: sources (tfds, image folders, CSV, COCO files, arrays), augmentation, host-local
batching.

Targets are image labels (classification), label maps (segmentation) or boxes (detection): see
:func:`load_source`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

from vision_jax.data.boxes import check_max_boxes
from vision_jax.data.coco import from_coco, from_tfds_boxes
from vision_jax.data.folders import (
    apply_slice,
    from_csv,
    from_image_folder,
    image_folder_classes,
    parse_split,
    sliced,
)
from vision_jax.data.idx import from_idx
from vision_jax.data.pipeline import (
    STREAM_ORDER,
    Batch,
    Batches,
    check_examples,
    eval_batches,
    eval_example_shapes,
    pipeline_options,
    train_batches,
    train_example_shapes,
    warn_of_absent_classes,
)
from vision_jax.data.preprocess import InputSpec
from vision_jax.data.sources import (
    IGNORE_LABEL,
    DataError,
    Source,
    as_classes,
    check_target,
    checked_classes,
    column_source,
    digits,
    from_arrays,
    from_columns,
    from_tfds,
    is_column_target,
    is_image_level,
    label_classes,
    missing_column,
    pinned_tfds_name,
    select_by_name,
    select_classes,
)
from vision_jax.data.tfds_build import build_tfds_from_folder

if TYPE_CHECKING:
    from vision_jax.specs import DataSpec


def load_source(
    data: DataSpec, split: str, *, arrays: dict | None = None, target: str = "label"
) -> Source:
    """The split named ``split`` of the dataset described by ``data`` (``config.data``).

    Every source takes sliced splits like ``"train[:90%]"`` or ``"train[1000:]"`` (tfds its
    own; the others a fixed shuffled order, so that ``[:90%]`` and ``[90%:]`` partition a split
    and each holds every class in about its share: a random draw, not stratified, so a rare
    class may be missing from a small slice). ``data.source`` is "tfds" (``data.name``,
    ``data.data_dir``), "imagefolder" (``data.root``/<split>/<class>/<image>), "csv"
    (``data.root``/<split>.csv with ``filename,label`` rows; ``data.class_names`` optional),
    "idx" (MNIST-style ``data.root``/{train,t10k}-*-ubyte.gz), "digits" (scikit-learn's digits)
    or "arrays" (``arrays[split] = (images, labels)`` passed from Python; ``data.class_names``
    optional: without it "0" .. the largest label of every split passed).
    ``data.classes`` optionally keeps a subset of classes, relabelled in the given order.
    ``data.skip_corrupt`` skips unreadable images (counted and logged) instead of failing.
    A split that holds no examples (after ``data.classes``) is a DataError naming it and why.

    ``target="label_map"`` loads per-pixel class ids (segmentation) instead of image labels,
    from "imagefolder" (``data.root``/<split>/images/<image> with index PNGs
    ``data.root``/<split>/masks/<stem>.png; classes from ``data.class_names`` or
    ``data.root``/classes.txt), "tfds" (the ``segmentation_mask`` feature; ``data.class_names``
    required) or "arrays" (``arrays[split] = (images, label_maps)``, maps
    (N, H, W)). Id 255 (``IGNORE_LABEL``) marks pixels that count for nothing. The masks of
    image folders and tfds may hold raw values instead: ``data.label_map_values``, pairs (raw,
    class id), maps them (a raw value missing from it is an error).

    ``target="boxes"`` loads objects (detection) from "coco" (the JSON ``data.root`` /
    ``data.coco_annotations`` with images under ``data.root`` / ``data.coco_images``; the
    scenes generator's output with ``coco_images="{split}/images"``) or "tfds" (the ``objects``
    feature, e.g. ``coco/2017``); the source's ``annotations`` then hold the split's COCO ground
    truth (see :mod:`vision_jax.data.coco`).

    Any other ``target`` names a column of one's own (a task's target: numbers of a fixed shape
    per example, passed through as they are), from "arrays" (``arrays[split]`` a dict of
    columns, ``{"image": images, target: values}``) or "csv" (a column of the split's CSV:
    :func:`~vision_jax.data.folders.csv_target_rows`); ``data.class_names`` optionally names
    the values. A source without that column is a DataError naming the columns it has.
    """
    check_target(target)
    _check_keys(data, target)
    kind = data.source
    if arrays is not None and kind != "arrays":
        raise DataError(
            f"Arrays were passed, but data.source is {kind!r}: set data.source='arrays' to "
            "train on them."
        )
    skip_corrupt = bool(data.skip_corrupt)
    if kind == "coco" and target != "boxes":
        raise DataError("data.source='coco' holds boxes: it is for detection (target 'boxes').")
    if is_column_target(target):
        source = _column_target_source(data, split, arrays, target)
        return _not_empty(dataclasses.replace(source, skip_corrupt=skip_corrupt), split, kind)
    if target == "boxes":
        return _not_empty(_box_source(data, split, skip_corrupt), split, kind)
    if target == "label_map":
        source = _label_map_source(data, split, arrays, skip_corrupt)
    elif kind == "tfds":
        source = from_tfds(data.name, split, data.data_dir, class_names=data.class_names)
    elif kind == "imagefolder":
        source = from_image_folder(_root(data), split, skip_corrupt=skip_corrupt)
    elif kind == "csv":
        source = from_csv(_root(data), split, class_names=data.class_names)
    elif kind == "idx":
        source = from_idx(_root(data), split, class_names=data.class_names)
    elif kind == "digits":
        name, where = parse_split(split)
        source = sliced(digits(name), where)
    elif kind == "arrays":
        name, where = parse_split(split)
        class_names = _arrays_classes(arrays, data.class_names, target)
        try:
            arrays_source = from_arrays(*_arrays(arrays, name, key=target), class_names=class_names)
        except DataError as e:  # which of the splits passed
            raise DataError(f"arrays[{name!r}]: {e}") from None
        source = sliced(arrays_source, where)
    else:
        raise DataError(
            f"Unknown data.source {kind!r}; valid: 'tfds', 'imagefolder', 'csv', 'idx', "
            "'digits', 'arrays', 'coco'."
        )
    source = dataclasses.replace(source, skip_corrupt=skip_corrupt)
    classes = data.classes
    if classes is not None and source.num_examples:
        selected = _select(source, classes, data, split)
        if not selected.num_examples:
            held = "none of its examples has one of these labels"
            if source.columns is not None:
                labels = np.unique(source.columns["label"])
                held = f"its labels: {', '.join(map(str, labels[:10]))}"
                held += ", ..." if len(labels) > 10 else ""
            raise DataError(
                f"The split {split!r} holds no examples of data.classes={tuple(classes)} ({held})."
            )
        source = selected
    return _not_empty(source, split, kind)


def _select(source: Source, classes: Sequence[int], data: DataSpec, split: str) -> Source:
    """``source`` with ``data.classes`` kept: positions into the train split's classes, so
    that an image-folder split lacking some of train's classes (each folder split lists its own)
    keeps the same classes by name, those it holds (the run's labels then matched by name)."""
    same = parse_split(split)[0] == parse_split(data.train_split)[0]
    if data.source != "imagefolder" or source.target != "label" or same:
        return select_classes(source, classes)
    names = image_folder_classes(_root(data), data.train_split)
    if names is None or names == source.class_names:
        return select_classes(source, classes)
    return select_by_name(source, [names[c] for c in checked_classes(classes, len(names))])


_EMPTY = {  # why a split of each source holds no examples
    "arrays": "its arrays have 0 rows",
    "csv": "its CSV file has no rows",
    "imagefolder": "its class folders hold no images",
    "tfds": "the tfds split is empty",
    "idx": "its files hold no images",
}


def _not_empty(source: Source, split: str, kind: str) -> Source:
    """``source``, or a DataError when it holds no examples (a run, an evaluation or a
    quantization would fail later, on an empty batch or a division by zero)."""
    if source.num_examples:
        return source
    why = _EMPTY.get(kind)
    raise DataError(f"The split {split!r} holds no examples{f' ({why})' if why else ''}.")


def _label_map_source(
    data: DataSpec, split: str, arrays: dict | None, skip_corrupt: bool
) -> Source:
    kind, class_names, values = data.source, data.class_names, data.label_map_values
    if kind == "tfds":
        return from_tfds(
            data.name,
            split,
            data.data_dir,
            target="label_map",
            class_names=class_names,
            label_map_values=values,
        )
    if kind == "imagefolder":
        return from_image_folder(
            _root(data),
            split,
            skip_corrupt=skip_corrupt,
            target="label_map",
            class_names=class_names,
            label_map_values=values,
        )
    if kind == "arrays":
        name, where = parse_split(split)
        images, label_maps = _arrays(arrays, name, "label_maps", key="label_map")
        class_names = _arrays_classes(arrays, class_names, target="label_map")
        return sliced(from_arrays(images, label_maps, class_names, target="label_map"), where)
    raise DataError(
        f"data.source={kind!r} has no label maps; use 'imagefolder', 'tfds' or 'arrays'."
    )


# The columns of the sources that have no columns of one's own (what their examples hold)
_FIXED_COLUMNS = {
    "tfds": ("image", "label"), "imagefolder": ("path", "label"), "idx": ("image", "label"),
    "digits": ("image", "label"),
}  # fmt: skip


def _column_target_source(data: DataSpec, split: str, arrays: dict | None, target: str) -> Source:
    """The split of a source that carries the column ``target`` of one's own: in-memory arrays
    (``arrays[split]`` a dict of columns) or a CSV file (a column of the split's CSV)."""
    kind = data.source
    if kind == "arrays":
        name, where = parse_split(split)
        columns = _array_columns(arrays, name, target)
        held = f"arrays[{name!r}]"
        if target not in columns:
            raise DataError(missing_column(target, list(columns), held))
        return sliced(column_source(columns, target, data.class_names, held), where)
    if kind == "csv":
        run_splits = (data.train_split, data.eval_split, data.val_split)
        return from_csv(
            _root(data), split, class_names=data.class_names, target=target,
            splits=[s for s in run_splits if s is not None],
        )  # fmt: skip
    if kind in _FIXED_COLUMNS:
        message = missing_column(target, _FIXED_COLUMNS[kind], f"data.source={kind!r}")
        raise DataError(
            f"{message[:-1]}; columns of one's own come from data.source 'arrays' or 'csv'."
        )
    raise DataError(
        f"Unknown data.source {kind!r} for the task's target {target!r} (a column of one's own): "
        "use 'arrays' or 'csv'."
    )


def _box_source(data: DataSpec, split: str, skip_corrupt: bool) -> Source:
    kind = data.source
    if kind == "coco":
        return from_coco(
            _root(data),
            split,
            annotations=data.coco_annotations,
            images=data.coco_images,
            skip_corrupt=skip_corrupt,
        )
    if kind == "tfds":
        return from_tfds_boxes(data.name, split, data.data_dir, skip_corrupt=skip_corrupt)
    hint = " (COCO JSON + image folder)" if kind == "imagefolder" else ""
    raise DataError(f"data.source={kind!r} has no boxes; use 'coco'{hint} or 'tfds'.")


# The optional data.* keys that each source reads, per target (other pairs have no such data).
_KEYS_READ = {
    ("tfds", "label"): ("name", "data_dir", "class_names", "classes"),  # names: integer labels
    ("tfds", "label_map"): ("name", "data_dir", "class_names", "label_map_values"),
    ("tfds", "boxes"): ("name", "data_dir"),
    ("imagefolder", "label"): ("root", "classes"),
    ("imagefolder", "label_map"): ("root", "class_names", "label_map_values"),
    ("csv", "label"): ("root", "class_names", "classes"),
    ("idx", "label"): ("root", "class_names", "classes"),
    ("digits", "label"): ("classes",),
    ("arrays", "label"): ("class_names", "classes"),
    ("arrays", "label_map"): ("class_names",),
    ("coco", "boxes"): ("root",),  # and coco_annotations, coco_images: specs checks those
    ("csv", "column"): ("root", "class_names"),  # a target of one's own: the values' names
    ("arrays", "column"): ("class_names",),
}
_HINTS = {
    "class_names": "class names come from the data",
    "label_map_values": "only tfds and image-folder label maps hold raw values",
    "classes": "it selects whole-image classes",
}


def _check_keys(data: DataSpec, target: str) -> None:
    """Raises when a data key is set that this source and target do not read."""
    kind = "column" if is_column_target(target) else target
    reads = _KEYS_READ.get((data.source, kind))
    if reads is None:
        return  # no such data: load_source says so
    optional = {key for keys in _KEYS_READ.values() for key in keys}
    stray = sorted(key for key in optional - set(reads) if getattr(data, key) is not None)
    if stray:
        hints = "; ".join(f"{key}: {_HINTS[key]}" for key in stray if key in _HINTS)
        raise DataError(
            f"{', '.join('data.' + key for key in stray)} not read by data.source="
            f"{data.source!r} with {target} targets{f' ({hints})' if hints else ''}; remove "
            f"{'it' if len(stray) == 1 else 'them'}."
        )


def _arrays_entry(arrays: dict | None, split: str, example: str) -> object:
    """``arrays[split]``, else a DataError naming the split (``example``: what it holds)."""
    if not arrays or split not in arrays:
        passed = ", ".join(map(repr, arrays or ())) or "none"
        raise DataError(
            f"data.source='arrays' needs arrays={{'{split}': {example}, ...}}: the split "
            f"{split!r} is not among those passed ({passed})."
        )
    return arrays[split]


def _arrays(arrays: dict | None, split: str, what: str = "labels", key: str = "label") -> tuple:
    """(images, ``key``'s values) of ``arrays[split]``: a pair, or a dict of columns."""
    entry = _arrays_entry(arrays, split, f"(images, {what})")
    if isinstance(entry, Mapping):
        missing = [k for k in ("image", key) if k not in entry]
        if missing:
            raise DataError(missing_column(missing[-1], list(entry), f"arrays[{split!r}]"))
        return entry["image"], entry[key]
    return entry


def _array_columns(arrays: dict | None, split: str, target: str) -> dict:
    """The columns of ``arrays[split]``: a dict of columns (``"image"`` and the target column
    of one's own), or a pair (images, labels): columns ``image`` and ``label``."""
    entry = _arrays_entry(arrays, split, f"{{'image': images, '{target}': values}}")
    if isinstance(entry, Mapping):
        return dict(entry)
    images, labels = entry
    return {"image": images, "label": labels}


def _arrays_classes(
    arrays: dict | None, class_names: Sequence[str] | None, target: str
) -> Sequence[str] | None:
    """``class_names``, else the classes of the integer labels of every split of ``arrays``
    together (:func:`label_classes`): a small split may lack the largest label."""
    if class_names is not None or not arrays:
        return class_names
    labels = [
        np.asarray(entry[target] if isinstance(entry, Mapping) else entry[1])
        for entry in arrays.values()
        if not isinstance(entry, Mapping) or target in entry
    ]
    whole = [x for x in labels if np.issubdtype(x.dtype, np.integer) or x.dtype == np.bool_]
    return max((label_classes(x, target) for x in whole), key=len, default=None)


ROOT_SOURCES = ("imagefolder", "csv", "idx", "coco")  # the sources read from data.root


def _root(data: DataSpec) -> str:
    root = data.root
    if not root:
        raise DataError(f"data.source={data.source!r} needs data.root (the image directory).")
    return root


__all__ = [
    "IGNORE_LABEL",
    "ROOT_SOURCES",
    "STREAM_ORDER",
    "Batch",
    "Batches",
    "DataError",
    "InputSpec",
    "Source",
    "apply_slice",
    "as_classes",
    "build_tfds_from_folder",
    "check_examples",
    "check_max_boxes",
    "digits",
    "eval_batches",
    "eval_example_shapes",
    "from_arrays",
    "from_coco",
    "from_columns",
    "from_csv",
    "from_image_folder",
    "from_tfds",
    "from_tfds_boxes",
    "is_column_target",
    "is_image_level",
    "load_source",
    "pinned_tfds_name",
    "pipeline_options",
    "select_by_name",
    "select_classes",
    "train_batches",
    "train_example_shapes",
    "warn_of_absent_classes",
]
