"""Input data: sources (tfds, image folders, CSV, arrays), augmentation, host-local batching."""

from __future__ import annotations

import dataclasses

from vision_jax.config import TrackedConfig
from vision_jax.data.folders import from_csv, from_image_folder
from vision_jax.data.idx import from_idx
from vision_jax.data.pipeline import Batch, Batches, eval_batches, pipeline_options, train_batches
from vision_jax.data.preprocess import InputSpec
from vision_jax.data.sources import (
    DataError,
    Source,
    digits,
    from_arrays,
    from_columns,
    from_tfds,
    select_classes,
)
from vision_jax.data.tfds_build import build_tfds_from_folder


def load_source(data: TrackedConfig, split: str, *, arrays: dict | None = None) -> Source:
    """The split named ``split`` of the dataset described by ``config.data``.

    ``data.source`` is "tfds" (``data.name``, ``data.data_dir``; sliced splits like
    ``"train[:90%]"``), "imagefolder" (``data.root``/<split>/<class>/*.jpg), "csv"
    (``data.root``/<split>.csv with ``filename,label`` rows; ``data.class_names`` optional),
    "idx" (MNIST-style ``data.root``/{train,t10k}-*-ubyte.gz), "digits" (scikit-learn's
    digits) or "arrays" (``arrays[split] = (images, labels)`` passed from Python;
    ``data.class_names`` optional). ``data.classes`` optionally keeps a
    subset of classes, relabelled in the given order. ``data.skip_corrupt`` skips unreadable
    images (counted and logged) instead of failing.
    """
    kind = data.source
    skip_corrupt = bool(data.skip_corrupt)
    if kind == "tfds":
        source = from_tfds(data.name, split, data.get("data_dir"))
    elif kind == "imagefolder":
        source = from_image_folder(_root(data), split, skip_corrupt=skip_corrupt)
    elif kind == "csv":
        source = from_csv(_root(data), split, class_names=data.get("class_names"))
    elif kind == "idx":
        source = from_idx(_root(data), split, class_names=data.get("class_names"))
    elif kind == "digits":
        source = digits(split)
    elif kind == "arrays":
        if not arrays or split not in arrays:
            raise DataError(
                f"data.source='arrays' needs arrays={{'{split}': (images, labels)}} passed to "
                "train_and_evaluate."
            )
        source = from_arrays(*arrays[split], class_names=data.get("class_names"))
    else:
        raise DataError(
            f"Unknown data.source {kind!r}; valid: 'tfds', 'imagefolder', 'csv', 'idx', "
            "'digits', 'arrays'."
        )
    source = dataclasses.replace(source, skip_corrupt=skip_corrupt)
    classes = data.get("classes")
    if classes is not None:
        source = select_classes(source, classes)
    return source


def _root(data: TrackedConfig) -> str:
    root = data.get("root")
    if not root:
        raise DataError(f"data.source={data.source!r} needs data.root (the image directory).")
    return root


def input_spec(config: TrackedConfig) -> InputSpec:
    """The :class:`InputSpec` described by ``config.input``."""
    return InputSpec(**dict(config.items()))


__all__ = [
    "Batch",
    "Batches",
    "DataError",
    "InputSpec",
    "Source",
    "build_tfds_from_folder",
    "digits",
    "eval_batches",
    "from_arrays",
    "from_columns",
    "from_csv",
    "from_image_folder",
    "from_tfds",
    "input_spec",
    "load_source",
    "pipeline_options",
    "select_classes",
    "train_batches",
]
