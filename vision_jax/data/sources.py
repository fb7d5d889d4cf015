"""Where examples come from: tfds datasets by name, or in-memory arrays.

A :class:`Source` is an un-batched ``tf.data.Dataset`` of ``{"image", "label"}`` examples
(images uint8 HWC or encoded bytes) or ``{"path", "label"}`` examples (image files, read and
decoded in the pipeline), with its size and class names. Sources held as columns (arrays, file
lists) also allow random access, which lets the training stream be a pure function of the seed
and the step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import tensorflow as tf

# TensorFlow is only the input pipeline here: keep it off accelerators.
tf.config.set_visible_devices([], "GPU")


class DataError(ValueError):
    """A dataset could not be loaded or does not fit the config."""


@dataclasses.dataclass
class Source:
    """One split of a dataset, before preprocessing.

    ``columns``, when present, holds the same examples as ``dataset`` as numpy arrays
    (``"image"`` or ``"path"``, and ``"label"``) for random access. ``skip_corrupt`` makes the
    pipeline skip (and count) images that cannot be decoded instead of failing.
    """

    dataset: tf.data.Dataset
    num_examples: int
    class_names: list[str]
    columns: dict[str, np.ndarray] | None = None
    skip_corrupt: bool = False

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def from_columns(columns: dict[str, np.ndarray], class_names: Sequence[str]) -> Source:
    """A random-access source over numpy columns of equal length (one row per example)."""
    labels = columns["label"]
    if len(labels) and (labels.min() < 0 or labels.max() >= len(class_names)):
        raise DataError(
            f"Labels must lie in [0, {len(class_names)}); got [{labels.min()}, {labels.max()}]."
        )
    columns = {**columns, "label": labels.astype(np.int32)}
    ds = tf.data.Dataset.from_tensor_slices(columns)
    return Source(ds, len(labels), list(class_names), columns)


def from_arrays(
    images: np.ndarray, labels: np.ndarray, class_names: Sequence[str] | None = None
) -> Source:
    """A source over in-memory arrays: images (N,H,W[,C]) uint8 or float in [0,1], labels (N,)."""
    images, labels = np.asarray(images), np.asarray(labels)
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise DataError(f"Images must be (N,H,W), (N,H,W,1) or (N,H,W,3); got {images.shape}.")
    if labels.shape != (images.shape[0],):
        raise DataError(f"Labels must have shape ({images.shape[0]},); got {labels.shape}.")
    if images.dtype != np.uint8:
        if images.min() < 0 or images.max() > 1:
            raise DataError("Float images must lie in [0, 1]; pass uint8 for 0..255 pixels.")
        images = np.round(images * 255).astype(np.uint8)
    if class_names is None:
        class_names = [str(i) for i in range(int(labels.max()) + 1)]
    return from_columns({"image": images, "label": labels}, class_names)


def digits(split: str) -> Source:
    """scikit-learn's bundled handwritten digits (1,797 8x8 images, offline), split 80/20.

    Pixels 0..16 are scaled to uint8 0..255; ``split`` is "train" or "test".
    """
    from sklearn.datasets import load_digits

    if split not in ("train", "test"):
        raise DataError(f"The digits dataset has splits 'train' and 'test', not {split!r}.")
    bunch = load_digits()
    images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)
    order = np.random.default_rng(0).permutation(len(images))
    cut = int(0.8 * len(images))
    index = order[:cut] if split == "train" else order[cut:]
    return from_arrays(images[index], bunch.target[index], [str(d) for d in range(10)])


def from_tfds(name: str, split: str, data_dir: str | None = None) -> Source:
    """A tfds dataset by name (already prepared under ``data_dir``; nothing is downloaded).

    ``split`` may be sliced (``"train[:90%]"``). Images stay encoded; the pipeline decodes them.
    """
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except Exception as e:  # tfds raises several types for unknown names
        raise DataError(f"Unknown tfds dataset {name!r}: {e}") from e
    try:
        ds = builder.as_dataset(
            split=split, shuffle_files=False, decoders={"image": tfds.decode.SkipDecoding()}
        )
    except Exception as e:  # not prepared (AssertionError), bad split (ValueError), ...
        splits = list(builder.info.splits) or "none prepared"
        raise DataError(
            f"Cannot read split {split!r} of tfds dataset {name!r} in {builder.data_dir} "
            f"(splits: {splits}): {e}. Prepare it first with `tfds build {name}`; nothing is "
            "downloaded at training time."
        ) from e
    num_examples = int(ds.cardinality())
    if num_examples < 0:  # unknown cardinality: count once
        num_examples = sum(1 for _ in ds.map(lambda ex: 0).as_numpy_iterator())
    label = builder.info.features["label"]
    ds = ds.map(lambda ex: {"image": ex["image"], "label": tf.cast(ex["label"], tf.int32)})
    return Source(ds, num_examples, list(label.names))


def select_classes(source: Source, classes: Sequence[int]) -> Source:
    """Keeps only ``classes`` (original label ids) and relabels them 0..len(classes)-1."""
    classes = [int(c) for c in classes]
    bad = [c for c in classes if not 0 <= c < source.num_classes]
    if bad or len(set(classes)) != len(classes):
        raise DataError(
            f"data.classes {classes} must be distinct labels in [0, {source.num_classes})."
        )
    table = np.full(source.num_classes, -1, np.int32)
    table[classes] = np.arange(len(classes), dtype=np.int32)
    names = [source.class_names[c] for c in classes]
    if source.columns is not None:
        keep = table[source.columns["label"]] >= 0
        columns = {k: v[keep] for k, v in source.columns.items()}
        columns["label"] = table[columns["label"]]
        selected = from_columns(columns, names)
    else:
        table_tf = tf.constant(table)
        ds = source.dataset.filter(lambda ex: table_tf[ex["label"]] >= 0)
        ds = ds.map(lambda ex: {**ex, "label": table_tf[ex["label"]]})
        count = sum(1 for _ in ds.map(lambda ex: ex["label"]).as_numpy_iterator())
        selected = Source(ds, count, names)
    return dataclasses.replace(selected, skip_corrupt=source.skip_corrupt)
