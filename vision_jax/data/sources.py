"""Where examples come from: tfds datasets by name, or in-memory arrays.

A :class:`Source` holds an un-batched ``tf.data.Dataset`` of ``{"image", "label"}`` examples
(images uint8 HWC or encoded bytes) or ``{"path", "label"}`` examples (image files, read and
decoded in the pipeline), with its size and class names. Segmentation sources (``target ==
"label_map"``) carry a per-pixel ``"label_map"`` (uint8 HxW class ids, :data:`IGNORE_LABEL` for
pixels that count for nothing) or a ``"label_map_path"`` (an index PNG) instead of ``"label"``.
Detection sources (``target == "boxes"``, :mod:`vision_jax.data.coco`) carry a ``"row"`` into
their COCO ``annotations`` instead. Sources of a task's target of one's own (``target`` a column
name, :func:`is_column_target`) carry that column (numbers of a fixed shape per example)
instead of ``"label"``. Sources held as columns (arrays, file lists) also allow
random access, which lets the training stream be a pure function of the seed and the step.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import os
import re
import threading
from collections.abc import Callable, Mapping, Sequence

from vision_jax.tf_without_keras import load as load_tensorflow
from vision_jax.tf_without_keras import load_if_url, tf

import numpy as np
from etils import epath

from vision_jax.output_errors import is_url
from vision_jax.specs import IGNORE_LABEL

TARGETS = ("label", "label_map", "boxes")
# The pipeline's own batch keys, which a column of one's own (a task's target) may not be named
RESERVED_KEYS = frozenset({
    "image", "path", "index", "mask", "row", "soft_label", "label_map_path", "image_id",
    "scale", "extent", "classes", "valid", "crowd", "filename",
})  # fmt: skip
FILE_NAME = "image/filename"  # the tfds feature of an example's image file name (tfds's own)
_COLUMN_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_DIGESTED_BYTES = 2**26  # at most this much of a column goes into a source's fingerprint
_ALIGNMENT = 64  # bytes: where TensorFlow's CPU kernels need a buffer to start (Eigen)
_VARIABLES_LOCK = threading.Lock()
logger = logging.getLogger(__name__)


class DataError(ValueError):
    """A dataset could not be loaded or does not fit the config."""


@dataclasses.dataclass
class Source:
    """One split of a dataset, before preprocessing.

    ``columns``, when present, holds the same examples as :attr:`dataset` as numpy arrays
    (``"image"`` or ``"path"``, and ``"label"``, ``"label_map"`` or ``"label_map_path"``) for
    random access. ``skip_corrupt`` makes the pipeline skip (and count) images that cannot be
    decoded, or whose label maps do not fit them, instead of failing. ``target`` is "label"
    (one class per image), "label_map" (one class per pixel; ``class_names`` then lists every
    id the maps use, 0 first) or "boxes" (objects: ``annotations`` holds the split's COCO ground
    truth in original pixels, its images in row order, and ``category_ids[i]`` is the COCO
    category id of class ``i``; ``class_names`` are the category names in id order), or the
    name of a column of one's own (:func:`column_source`; ``class_names`` name its values).
    A column source's dataset is made at first use (:attr:`dataset`), over the columns held
    once in TensorFlow (:attr:`column_variables`, shared with the training stream): a copy with
    other ``columns`` (``dataclasses.replace``) sets ``examples=None`` too.
    """

    examples: tf.data.Dataset | None  # None: made from ``columns`` at first use (:attr:`dataset`)
    num_examples: int
    class_names: list[str]
    columns: dict[str, np.ndarray] | None = None
    skip_corrupt: bool = False
    target: str = "label"
    annotations: dict | None = None
    category_ids: list[int] | None = None
    # Label maps read from files (``label_map_path``): their raw value -> class id table
    # (:func:`value_table`, ``data.label_map_values``), applied as they are read
    label_values: np.ndarray | None = None
    # What the split is, for messages about examples that have no file (a tfds split's)
    origin: str | None = None
    # What tells a split not held as columns from another beyond its count, for
    # :meth:`fingerprint`: a tfds split's resolved dataset and records (:func:`tfds_split`)
    provenance: dict[str, str] | None = None
    # A tfds split's image file names (its ``image/filename`` feature, as text), one per
    # example in order, where it has them: what the report names its hardest examples by
    file_names: tf.data.Dataset | None = None
    # ``columns`` as TensorFlow holds them (:attr:`column_variables`), made at first use
    _variables: dict | None = dataclasses.field(default=None, init=False, repr=False, compare=False)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def column_spec(self) -> tuple[tuple[int, ...], type] | None:
        """For a target of one's own (:func:`is_column_target`): the shape and dtype of one
        example's values (``()`` for a number, ``(K,)`` for a vector; int32 or float32); else
        None."""
        if not is_column_target(self.target):
            return None
        values = self.columns[self.target]
        return tuple(values.shape[1:]), values.dtype.type

    @property
    def dataset(self) -> tf.data.Dataset:
        """The examples; a column source makes its dataset here, at first use, so that listing
        files does not import TensorFlow."""
        if self.examples is None:
            variables = self.column_variables

            def row(index: tf.Tensor) -> dict[str, tf.Tensor]:
                return gather_rows(variables, index)

            rows = tf.data.Dataset.range(self.num_examples)
            self.examples = rows.map(tf.autograph.experimental.do_not_convert(row))
        return self.examples

    @property
    def column_variables(self) -> dict[str, tf.Variable]:
        """``columns`` in TensorFlow, made at first use and shared by every pipeline over them
        (rows: :func:`gather_rows`): each a CPU variable that holds the numpy column's own
        memory where TensorFlow can take it (numbers at a 64-byte boundary, as its kernels
        need: ``columns`` then holds such a copy of a column that was not).

        Not constants: ``tf.constant`` copies an array twice (numpy's copy, then an aligned
        one), and tf.data copies every tensor a pipeline captures when it rewrites (optimises)
        the pipeline at each iterator; a variable is captured as a handle."""
        with _VARIABLES_LOCK:  # pipelines made in two threads share one copy too
            if self._variables is None:
                columns, variables = {}, {}
                with tf.device("/device:CPU:0"):
                    for key, values in self.columns.items():
                        if np.dtype(values.dtype).kind in "iuf" and values.size:
                            values = _aligned(values)  # shared, not copied (DLPack)
                            value = tf.experimental.dlpack.from_dlpack(values.__dlpack__())
                        else:
                            value = tensor_column(values)
                        variables[key] = tf.Variable(value, trainable=False, name=key)
                        columns[key] = values
                self.columns, self._variables = columns, variables
            return self._variables

    def fingerprint(self) -> dict[str, int | str]:
        """What tells these examples from others, for a resume to notice changed data: their
        number, the number of ground-truth boxes (detection) and, for a source held as columns,
        a digest of them (file paths relative to the folder they share, labels, arrays; of an
        image or label-map array over 64 MiB, rows spread evenly over it, so that a start stays
        quick); of a tfds split, the dataset it resolved to (``name/config/version``) and a
        digest of its records as the dataset's info lists them (:func:`tfds_split`)."""
        out: dict[str, int | str] = {"examples": int(self.num_examples), **(self.provenance or {})}
        if self.annotations is not None:
            out["boxes"] = len(self.annotations.get("annotations", ()))
        if self.columns is not None:
            digest = hashlib.sha256()
            for key in sorted(self.columns):
                values = self.columns[key]
                if values.dtype.kind in "OSU":  # file paths, wherever the folder now lies
                    names = [str(v) for v in values.tolist()]
                    cut = os.path.commonprefix(names).rfind("/") + 1 if len(names) > 1 else 0
                    joined = "\n".join(n[cut:] for n in names)
                    values = np.frombuffer(os.fsencode(joined), np.uint8)
                elif values.ndim > 1:  # images, label maps: rows spread evenly over them
                    values = values[:: max(1, -(-values.nbytes // _DIGESTED_BYTES))]
                digest.update(f"{key}{values.dtype}{values.shape}".encode())
                digest.update(np.ascontiguousarray(values).tobytes())
            out["digest"] = digest.hexdigest()[:16]
        return out


def file_path(path: str) -> epath.Path:
    """``path`` on its filesystem: local paths through the OS (TensorFlow not needed), URLs
    (``gs://``, ``s3://``, ``az://``, ``hf://``) through etils' backends (TensorFlow's gfile,
    loaded here without Keras)."""
    load_if_url(path)
    try:
        return epath.Path(path)
    except KeyError:  # epath's message is the bare scheme
        raise DataError(
            f"{path}: not a local path or a gs://, s3://, az:// or hf:// URL (etils.epath)."
        ) from None


def list_names(folder: str) -> list[str]:
    """The names in ``folder`` (local: ``os.listdir``, 20x faster than making a path of each;
    URLs: :func:`file_path`)."""
    if not is_url(folder):
        return os.listdir(folder)
    return [entry.name for entry in file_path(folder).iterdir()]


def from_columns(
    columns: dict[str, np.ndarray], class_names: Sequence[str] | None, target: str | None = None
) -> Source:
    """A random-access source over numpy columns of equal length (one row per example).

    A ``"label"`` column makes a classification source; ``"label_map"`` (integer [N, H, W],
    checked here) or ``"label_map_path"`` (checked in the pipeline) a segmentation one. A
    ``target`` of one's own (:func:`is_column_target`) makes a source of that column
    (:func:`column_source`).
    """
    if target is not None and is_column_target(check_target(target)):
        return column_source(columns, target, class_names)
    if "label" in columns:
        labels = columns["label"]
        if not np.issubdtype(labels.dtype, np.integer):
            raise DataError(f"Labels must be integers; got dtype {labels.dtype}.")
        if len(labels) and (labels.min() < 0 or labels.max() >= len(class_names)):
            raise DataError(
                f"Labels must lie in [0, {len(class_names)}); got [{labels.min()}, {labels.max()}]."
            )
        columns, target = {**columns, "label": labels.astype(np.int32)}, "label"
    else:
        check_label_map_classes(class_names)
        if "label_map" in columns:
            columns = {
                **columns,
                "label_map": _checked_label_maps(columns["label_map"], class_names),
            }
        target = "label_map"
    return Source(None, num_rows(columns), list(class_names), columns, target=target)


def num_rows(columns: dict[str, np.ndarray]) -> int:
    """The number of examples (rows) in ``columns``."""
    return len(next(iter(columns.values())))


def check_label_map_classes(class_names: Sequence[str]) -> None:
    """Label maps are 8-bit with :data:`IGNORE_LABEL` reserved: at most 255 classes."""
    if not 0 < len(class_names) <= IGNORE_LABEL:
        raise DataError(
            f"Label maps need 1 to {IGNORE_LABEL} class names ({IGNORE_LABEL} means ignore); "
            f"got {len(class_names)}."
        )


def _checked_label_maps(maps: np.ndarray, class_names: Sequence[str]) -> np.ndarray:
    """``maps`` as uint8, or a DataError naming the first map with a value outside
    ``[0, num_classes)`` other than :data:`IGNORE_LABEL`."""
    if not np.issubdtype(maps.dtype, np.integer):
        raise DataError(f"Label maps must be integers; got dtype {maps.dtype}.")
    bad = ((maps < 0) | (maps >= len(class_names))) & (maps != IGNORE_LABEL)
    if bad.any():
        index = int(np.argmax(bad.reshape(len(maps), -1).any(1)))
        values = sorted(set(maps[index][bad[index]].tolist()))[:5]
        raise DataError(
            f"label_maps[{index}] holds values {values} outside [0, {len(class_names)}) "
            f"({IGNORE_LABEL} = ignore)."
        )
    return maps.astype(np.uint8, copy=False)


def from_arrays(
    images: np.ndarray,
    labels: np.ndarray,
    class_names: Sequence[str] | None = None,
    *,
    target: str = "label",
) -> Source:
    """A source over in-memory arrays: images (N,H,W[,C]) uint8 or float in [0,1], and labels
    (N,) or, with ``target="label_map"``, integer label maps (N,H,W). Without ``class_names``
    the classes are those of :func:`label_classes`.

    The pipelines read uint8 images in place where they can (held once,
    :attr:`Source.column_variables`): change them in place while the source is in use and the
    pipelines see the change."""
    images, labels = checked_images(images), np.asarray(labels)
    key = check_target(target)
    if key == "boxes":
        raise DataError("Boxes come from COCO files or tfds (data.source 'coco' or 'tfds').")
    if is_column_target(key):
        return column_source({"image": images, key: labels}, key, class_names)
    if labels.dtype == np.bool_:
        labels = labels.astype(np.int32)  # binary labels: 0 and 1
    if not np.issubdtype(labels.dtype, np.integer):
        what = "Label maps" if key == "label_map" else "Labels"
        one_hot = key == "label" and labels.ndim == 2
        hint = (
            " (one-hot labels [N, K]: labels.argmax(-1); soft targets: a task of one's own "
            "with a target column)" if one_hot else ""
        )  # fmt: skip
        raise DataError(f"{what} must be integers; got dtype {labels.dtype}{hint}.")
    shape = images.shape[:3] if key == "label_map" else images.shape[:1]
    if labels.shape != shape:
        raise DataError(
            f"{key} arrays must have shape {shape} (as the images); got {labels.shape}."
        )
    if class_names is None:
        class_names = label_classes(labels, key)
    return from_columns({"image": images, key: labels}, class_names)


def checked_images(images: np.ndarray) -> np.ndarray:
    """In-memory images (N,H,W[,C]) uint8, or float in [0, 1] (rounded to uint8), as
    (N,H,W,C); else a DataError."""
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        first = images.ndim == 4 and images.shape[1] in (1, 3)
        hint = " (channels-first, torch's NCHW: images.transpose(0, 2, 3, 1))" if first else ""
        raise DataError(
            f"Images must be (N,H,W), (N,H,W,1) or (N,H,W,3); got {images.shape}{hint}."
        )
    if images.dtype != np.uint8 and not np.issubdtype(images.dtype, np.floating):
        raise DataError(f"Images must be uint8 (0..255) or float in [0, 1]; got {images.dtype}.")
    if images.dtype != np.uint8:
        finite = np.isfinite(images)
        if not finite.all():
            first = tuple(int(i) for i in np.argwhere(~finite)[0])
            count = int(np.size(finite) - finite.sum())
            raise DataError(
                f"Images hold {count} non-finite value{'s' * (count > 1)} (the first at index "
                f"{first}: {images[first]})."
            )
        if images.min() < 0 or images.max() > 1:
            raise DataError("Float images must lie in [0, 1]; pass uint8 for 0..255 pixels.")
        images = np.round(images * 255).astype(np.uint8)
    return images


def is_column_target(target: str) -> bool:
    """Whether a task's ``target`` is a per-example column of one's own (numbers of a fixed
    shape per example, passed through the pipeline as they are) rather than one of
    :data:`TARGETS`."""
    return target not in TARGETS


def is_image_level(target: str) -> bool:
    """Whether a task's ``target`` holds one value (or one fixed-shape vector) per image: a
    label or a column of one's own, which crops and flips leave alone and whose images
    evaluation crops as classification does; not a label map or boxes (placed on the image)."""
    return target not in ("label_map", "boxes")


def column_values(
    values: np.ndarray,
    name: str,
    where: str = "The data",
    row_text: Callable[[int], str] | None = None,
) -> np.ndarray:
    """A target column of one's own as the pipeline holds it: finite numbers of one shape per
    example (N, ...), floats as float32, integers and booleans as int32; else a DataError
    naming it, ``where`` it is (``arrays['train']``, a CSV file) and the first bad row: as
    ``row_text`` names it with its values (a CSV file's line), else ``row <i>: <values>``."""
    held_in = row_text or (lambda row: f"row {row}: {values[row].tolist()}")
    try:
        values = np.asarray(values)
    except ValueError as e:  # a ragged list
        raise DataError(
            f"{where}: the column {name!r} must hold numbers of one shape per example ({e})."
        ) from None
    if values.ndim == 0:
        raise DataError(f"{where}: the column {name!r} must hold a row per example; got a single "
                        "value.")  # fmt: skip
    if values.dtype == np.bool_:
        return values.astype(np.int32)
    if np.issubdtype(values.dtype, np.integer):
        outside = (values < -(2**31)) | (values >= 2**31)
        if outside.any():
            row = int(np.argwhere(outside)[0][0])
            raise DataError(
                f"{where}: the column {name!r} holds integers outside int32's range "
                f"({held_in(row)})."
            )
        return values.astype(np.int32, copy=False)
    if np.issubdtype(values.dtype, np.floating):
        with np.errstate(over="ignore"):  # beyond float32's range: refused below
            held = values.astype(np.float32, copy=False)
        finite = np.isfinite(held)
        if not finite.all():
            row = int(np.argwhere(~finite)[0][0])
            raise DataError(
                f"{where}: the column {name!r} holds a value that is not a finite float32 "
                f"({held_in(row)}): NaN, infinity or beyond float32's range."
            )
        return held
    raise DataError(
        f"{where}: the column {name!r} must hold numbers (integers, floats or booleans); got "
        f"dtype {values.dtype}."
    )


def column_source(
    columns: dict[str, np.ndarray],
    target: str,
    class_names: Sequence[str] | None,
    where: str = "The data",
    row_text: Callable[[int], str] | None = None,
) -> Source:
    """A source whose target is the column ``target`` of one's own (numbers of a fixed shape
    per example: a scalar or a vector), beside ``"image"`` ((N,H,W,C) uint8, checked) or
    ``"path"``; other columns are left out. ``class_names`` name the values of an example (as
    many as it holds: a multi-hot vector's labels); without them ``"0"`` .. ``"K-1"``.
    ``where`` names the data in errors (``arrays['train']``, a CSV file), ``row_text`` a row
    (:func:`column_values`)."""
    if target not in columns:
        raise DataError(missing_column(target, columns, where))
    image_key = "image" if "image" in columns else "path"
    if image_key not in columns:
        raise DataError(f"{where} has no 'image' column (its columns: {_names(columns)}).")
    values = column_values(columns[target], target, where, row_text)
    images = columns[image_key]
    if image_key == "image":
        images = checked_images(images)
    if len(values) != len(images):
        raise DataError(
            f"{where}: the column {target!r} has {len(values)} rows, the images {len(images)}."
        )
    size = math.prod(values.shape[1:])
    if not size:
        raise DataError(
            f"{where}: the column {target!r} holds no value per example ({values.shape})."
        )
    if class_names is None:
        class_names = [str(i) for i in range(size)]
    elif len(class_names) != size:
        raise DataError(
            f"data.class_names names {len(class_names)} values; the column {target!r} holds "
            f"{size} per example (shape {values.shape[1:]})."
        )
    held = {image_key: images, target: values}
    return Source(None, len(values), list(class_names), held, target=target)


def _names(columns: Sequence[str]) -> str:
    return ", ".join(map(str, columns)) or "none"


def missing_column(target: str, columns: Sequence[str], where: str = "The data") -> str:
    """The message for a task's ``target`` column missing from the data's ``columns``."""
    return f"{where} has no column {target!r}, the task's target (its columns: {_names(columns)})."


def label_classes(labels: np.ndarray, target: str = "label") -> list[str]:
    """The classes of integer ``labels`` (label maps with ``target="label_map"``): ``"0"`` ..
    the largest label (not counting :data:`IGNORE_LABEL` in maps)."""
    counted = labels != IGNORE_LABEL if target == "label_map" else True  # in place: no copy
    return [str(i) for i in range(int(np.max(labels, where=counted, initial=0)) + 1)]


def gather_rows(variables: dict[str, tf.Variable], rows: tf.Tensor) -> dict[str, tf.Tensor]:
    """``rows`` of :attr:`Source.column_variables`: gathered from each variable's value, which
    is its memory (a gather from the variable itself would copy all of a shared one first)."""
    return {k: tf.gather(v.value(), rows) for k, v in variables.items()}


def _aligned(values: np.ndarray) -> np.ndarray:
    """``values``, or a copy of them, C-contiguous, writable and in the machine's byte order at
    a 64-byte boundary (Eigen's widest: TensorFlow's kernels check it, and take such an array
    without copying it)."""
    flags, native = values.flags, values.dtype.isnative
    if flags.c_contiguous and flags.writeable and native and values.ctypes.data % _ALIGNMENT == 0:
        return values
    buffer = np.empty(values.nbytes + _ALIGNMENT, np.uint8)
    start = -buffer.ctypes.data % _ALIGNMENT
    dtype = values.dtype.newbyteorder("=")  # DLPack takes the machine's byte order only
    out = buffer[start : start + values.nbytes].view(dtype).reshape(values.shape)
    out[...] = values
    return out


def tensor_column(values: np.ndarray) -> np.ndarray:
    """A column as TensorFlow takes it: text (file paths) as the file system's bytes, so that a
    name that is not UTF-8 (as in a zip made on Windows; Python holds it with surrogate
    escapes) reads the file it names."""
    if values.dtype.kind != "U":
        return values
    return np.array([os.fsencode(v) for v in values.tolist()], dtype=object)


def check_target(target: str) -> str:
    """``target`` if it is one of :data:`TARGETS` or could name a column of one's own (a
    Python identifier, not one of the pipeline's :data:`RESERVED_KEYS`), else a DataError."""
    if target in TARGETS:
        return target
    if (
        not isinstance(target, str)
        or not _COLUMN_NAME.fullmatch(target)
        or (target in RESERVED_KEYS)
    ):
        raise DataError(
            f"A task's target {target!r} (the batch key it reads) is neither one the input "
            f"pipeline makes ({', '.join(map(repr, TARGETS))}) nor a column name of one's own "
            "(letters, digits and '_', not a digit first; not one of the pipeline's keys "
            f"{', '.join(sorted(RESERVED_KEYS))})."
        )
    return target


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


def from_tfds(
    name: str,
    split: str,
    data_dir: str | None = None,
    *,
    target: str = "label",
    class_names: Sequence[str] | None = None,
    label_map_values: Sequence[Sequence[int]] | None = None,
) -> Source:
    """A tfds dataset by name (already prepared under ``data_dir``; nothing is downloaded).

    ``split`` may be sliced (``"train[:90%]"``). Images stay encoded; the pipeline decodes them.
    With ``target="label_map"`` the dataset's ``segmentation_mask`` feature is the label map:
    ``class_names`` is required, and ``label_map_values`` ((raw value, class id) pairs, e.g.
    ``((1, 1), (2, 0), (3, 255))`` for oxford_iiit_pet's trimaps) maps the raw mask values; a
    raw value missing from the table is an error when the pipeline meets it. Without the table
    raw values are the class ids. Image labels are the ``label`` feature: a ClassLabel (its names
    are the classes), or integers named by ``class_names``; a label outside the classes is an
    error when the pipeline meets it.
    """
    if check_target(target) == "boxes":
        raise DataError("tfds boxes are read by vision_jax.data.coco.from_tfds_boxes.")
    features, ds, provenance = tfds_split(name, split, data_dir)
    if target == "label_map":
        if "segmentation_mask" not in features:
            raise DataError(
                f"tfds dataset {name!r} has no 'segmentation_mask' feature for label maps "
                f"(features: {sorted(features)})."
            )
        if not class_names:
            raise DataError(f"Label maps of tfds dataset {name!r} need data.class_names.")
        check_label_map_classes(class_names)
    origin = tfds_origin(name, split)
    num_examples = int(ds.cardinality())
    if num_examples < 0:  # unknown cardinality: count once
        num_examples = sum(1 for _ in ds.map(lambda ex: 0).as_numpy_iterator())
    if target == "label_map":
        table = value_table(label_map_values, len(class_names))
        ds = ds.map(
            lambda ex: {
                "image": ex["image"],
                "label_map": map_values(ex["segmentation_mask"], table),
            }
        )
        return Source(
            ds, num_examples, list(class_names), target="label_map", origin=origin,
            provenance=provenance,
        )  # fmt: skip
    names, named_by = _tfds_classes(name, features, class_names)
    count = len(names)
    file_names = None
    if FILE_NAME in features:  # (build_tfds_from_folder's, as most tfds image datasets')
        file_names = ds.map(lambda ex: ex[FILE_NAME])
    ds = ds.map(
        lambda ex: {"image": ex["image"], "label": _checked_label(ex["label"], count, named_by)}
    )
    return Source(
        ds, num_examples, names, origin=origin, provenance=provenance, file_names=file_names
    )


def _feature_names(features: Mapping[str, object]) -> str:
    """A tfds dataset's features and their kinds, for messages: ``img (Image), ...``."""
    return ", ".join(f"{key} ({type(features[key]).__name__})" for key in sorted(features))


def _tfds_classes(
    name: str, features: Mapping[str, object], class_names: Sequence[str] | None
) -> tuple[list[str], str]:
    """The class names of a tfds dataset's ``label`` feature (a ClassLabel's, or for integer
    labels ``data.class_names``), and what names them (for :func:`_checked_label`); else a
    DataError naming its features and what classification needs."""
    what = f"tfds dataset {name!r}"
    needs = "classification reads one integer 'label' per example (a ClassLabel)"
    if "label" not in features:
        hint = ""
        if "objects" in features:
            hint = "; its objects are boxes: task.name='detection' trains on them"
        elif "segmentation_mask" in features:
            hint = (
                "; its segmentation_mask is a label map: task.name='segmentation' (with "
                "data.class_names) trains on it"
            )
        raise DataError(
            f"{what} has no 'label' feature (its features: {_feature_names(features)}): "
            f"{needs}{hint}."
        )
    label = features["label"]
    names = getattr(label, "names", None)  # a ClassLabel
    if names is not None:
        if class_names is not None and list(class_names) != list(names):
            raise DataError(
                f"{what} names its classes in its label feature ({', '.join(names[:8])}"
                f"{', ...' if names[8:] else ''}); data.class_names differs: remove it."
            )
        return list(names), (
            f"the label feature (a ClassLabel) of tfds dataset {name} names (its features do not "
            "fit its examples)"
        )
    dtype = getattr(label, "tf_dtype", None) or getattr(label, "dtype", None)
    shape = getattr(label, "shape", None)
    if dtype is None or not tf.as_dtype(dtype).is_integer or shape is None or tuple(shape):
        raise DataError(
            f"{what}: its 'label' feature is a {type(label).__name__} of {dtype} {shape}; {needs}."
        )
    if not class_names:
        raise DataError(
            f"{what}: its 'label' feature holds integers without class names (a "
            f"{type(label).__name__}, not a ClassLabel): set data.class_names to the names of "
            "its labels (0, 1, ... in order)."
        )
    return list(class_names), "data.class_names names"


def _checked_label(value: tf.Tensor, count: int, named_by: str) -> tf.Tensor:
    """A tfds example's label as int32, failing (when run) outside its ``count`` classes (that
    ``named_by`` names), as every other source's labels are checked when loaded
    (:func:`from_columns`): one-hot targets of zeros, miscounted evaluations and a report that
    fails at its end otherwise."""
    value = tf.cast(value, tf.int32)
    message = tf.strings.format(
        f"label {{}} is outside [0, {count}), the {count} classes that {named_by}",
        value,
    )
    check = tf.debugging.Assert(tf.logical_and(value >= 0, value < count), [message])
    with tf.control_dependencies([check]):
        return tf.identity(value)


def tfds_origin(name: str, split: str) -> str:
    """:attr:`Source.origin` of a tfds split."""
    return f"tfds dataset {name!r} split {split!r}"


def pinned_tfds_name(dataset: str) -> str:
    """The ``data.name`` that reads the tfds dataset ``dataset`` (a resolved
    ``name[/config]/version``, :attr:`Source.provenance`) at its version:
    ``name[/config]:version``."""
    name, _, version = dataset.rpartition("/")
    return f"{name}:{version}" if name else dataset


def tfds_split(
    name: str, split: str, data_dir: str | None
) -> tuple[dict, tf.data.Dataset, dict[str, str]]:
    """The features and (in order, images left encoded) examples of a prepared tfds split, and
    its :attr:`Source.provenance`: the dataset ``name`` resolved to (``tfds.builder`` reads the
    newest version prepared where ``name`` names none) and a digest of the split's records (the
    shards, their lengths and the split's bytes its dataset info lists; not where the data_dir
    lies)."""
    load_tensorflow()  # first: tfds imports TensorFlow
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except Exception as e:  # tfds raises several types for unknown names
        where = data_dir or "tfds's default data_dir ($TFDS_DATA_DIR, ~/tensorflow_datasets)"
        if holder := _holder_of(name, data_dir):
            raise DataError(
                f"data.data_dir {data_dir} is a folder of tfds dataset {name!r} itself: "
                f"data.data_dir is the folder that holds {_base_name(name)}/ ({holder})."
            ) from e
        raise DataError(
            f"Unknown tfds dataset {name!r}: neither prepared in {where} (data.data_dir) nor "
            f"a tfds builder ({_first_line(e)})."
        ) from e
    if "image" not in builder.info.features:
        raise DataError(
            f"tfds dataset {name!r} has no 'image' feature (its features: "
            f"{_feature_names(builder.info.features)}): vision_jax reads each example's image "
            "from a feature named 'image' (build_tfds_from_folder writes one from image files)."
        )
    try:
        ds = builder.as_dataset(
            split=split, shuffle_files=False, decoders={"image": tfds.decode.SkipDecoding()}
        )
    except Exception as e:  # not prepared (AssertionError), bad split (ValueError), ...
        where = f"tfds dataset {name!r} in {builder.data_dir}"
        # prepared: its info file is there (a registered builder's splits may come from tfds's
        # bucket without it)
        if not (epath.Path(builder.data_dir) / "dataset_info.json").exists():
            raise DataError(
                f"{where} is not prepared: prepare it first (`tfds build {name}`, or "
                "vision_jax.data.build_tfds_from_folder); nothing is downloaded at training time."
            ) from e
        raise DataError(
            f"Cannot read split {split!r} of {where} (splits: {', '.join(builder.info.splits)}): "
            f"{_first_line(e)}."
        ) from e
    return builder.info.features, ds, _tfds_provenance(builder.info, split)


def _tfds_provenance(info: object, split: str) -> dict[str, str]:
    """:func:`tfds_split`'s provenance of ``split`` from the dataset's ``info``."""
    digest = hashlib.sha256(f"{info.full_name} {split}\n".encode())
    try:
        for part in info.splits[split].file_instructions:
            shard = os.path.basename(os.fspath(part.filename))
            digest.update(f"{shard} {part.skip} {part.take} {part.examples_in_shard}\n".encode())
        for base in (b.strip() for b in re.sub(r"\[[^\]]*\]", "", split).split("+")):
            if base in info.splits:
                digest.update(f"{base} {int(info.splits[base].num_bytes)}\n".encode())
    except (AttributeError, KeyError, TypeError, ValueError):  # info without its splits (mocked)
        pass
    return {"dataset": str(info.full_name), "records": digest.hexdigest()[:16]}


def _base_name(name: str) -> str:
    """A tfds ``data.name``'s dataset name (``name[/config][:version]``): its folder's."""
    return name.partition(":")[0].partition("/")[0]


def _holder_of(name: str, data_dir: str | None) -> str | None:
    """The folder that holds dataset ``name``'s folder where ``data_dir`` is that folder or one
    of its version folders (``.../name`` or ``.../name/1.0.0``), else None (also where
    ``data_dir`` holds a ``name`` folder itself: another cause, such as a version not there)."""
    if not data_dir:
        return None
    path = file_path(data_dir)
    if (path / _base_name(name)).is_dir():
        return None
    for folder in (path, path.parent):
        if folder.name == _base_name(name):
            return str(folder.parent)
    return None


def _first_line(error: Exception) -> str:
    """The first line of an error's message without its closing full stops."""
    lines = str(error).strip().splitlines()
    return lines[0].rstrip(".") if lines else type(error).__name__


def value_table(pairs: Sequence[Sequence[int]] | None, num_classes: int) -> np.ndarray | None:
    """``data.label_map_values`` as a 256-entry lookup from raw mask value to class id (-1 where
    unmapped), or None (raw values are class ids) without pairs."""
    if pairs is None:
        return None
    table = np.full(256, -1, np.int32)
    for pair in pairs:
        raw, label = (int(v) for v in pair)
        if not 0 <= raw <= 255 or table[raw] >= 0:
            raise DataError(f"data.label_map_values: raw value {raw} is not a new value in 0..255.")
        if not (0 <= label < num_classes or label == IGNORE_LABEL):
            raise DataError(
                f"data.label_map_values: class {label} (for raw {raw}) is outside "
                f"[0, {num_classes}) and not {IGNORE_LABEL} (ignore)."
            )
        table[raw] = label
    return table


def map_values(mask: tf.Tensor, table: np.ndarray | None) -> tf.Tensor:
    """A raw uint8 mask mapped through :func:`value_table`'s ``table``, failing (when run) on raw
    values the table misses."""
    if table is None:
        return mask
    raw = tf.cast(mask, tf.int32)
    mapped = tf.gather(tf.constant(table), raw)
    missing = tf.unique(tf.boolean_mask(raw, mapped < 0)).y
    message = tf.strings.format(
        "label map holds raw values {} missing from data.label_map_values (add them, with "
        f"their class ids or {IGNORE_LABEL} to ignore them)",
        tf.sort(missing),
        summarize=10,
    )
    check = tf.debugging.Assert(tf.size(missing) == 0, [message])
    with tf.control_dependencies([check]):
        return tf.cast(mapped, tf.uint8)


def checked_classes(classes: Sequence[int], num_classes: int) -> list[int]:
    """``data.classes`` as ints, refused unless distinct labels of ``num_classes`` classes."""
    classes = [int(c) for c in classes]
    bad = [c for c in classes if not 0 <= c < num_classes]
    if bad or len(set(classes)) != len(classes):
        raise DataError(f"data.classes {classes} must be distinct labels in [0, {num_classes}).")
    return classes


def select_classes(source: Source, classes: Sequence[int]) -> Source:
    """Keeps only ``classes`` (original label ids) and relabels them 0..len(classes)-1."""
    if source.target != "label":
        raise DataError(
            "data.classes selects whole-image classes; it does not apply to label maps or boxes."
        )
    classes = checked_classes(classes, source.num_classes)
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
        file_names = source.file_names
        if file_names is not None:  # the names of the examples kept
            file_names = tf.data.Dataset.zip((source.dataset, file_names))
            file_names = file_names.filter(lambda ex, _: table_tf[ex["label"]] >= 0)
            file_names = file_names.map(lambda _, name: name)
        selected = Source(
            ds, count, names, origin=source.origin, provenance=source.provenance,
            file_names=file_names,
        )  # fmt: skip
    return dataclasses.replace(selected, skip_corrupt=source.skip_corrupt)


def select_by_name(source: Source, names: Sequence[str]) -> Source:
    """``source`` with the examples of the classes ``names`` that it holds (by name; those it
    lacks are left out), as :func:`select_classes` keeps them."""
    held = [source.class_names.index(n) for n in names if n in source.class_names]
    return select_classes(source, held)


def as_classes(source: Source, class_names: Sequence[str], split: str) -> Source | None:
    """``source`` (of a ``label`` column) labelled by ``class_names``, which hold its classes
    and more, matched by name: a split (a small test set) that lacks some of the run's classes,
    named in a warning; None where its classes are not such a subset (or it has no labels)."""
    names = list(class_names)
    if source.target != "label" or source.columns is None or "label" not in source.columns:
        return None
    if not set(source.class_names) < set(names):
        return None
    lacking = [n for n in names if n not in source.class_names]
    logger.warning(
        "The split %r lacks %d of the run's %d classes: %s (no examples of them); its labels "
        "are the run's, matched by class name.", split, len(lacking), len(names),
        ", ".join(lacking[:10]) + (", ..." if lacking[10:] else ""),
    )  # fmt: skip
    table = np.array([names.index(n) for n in source.class_names], np.int32)
    columns = {**source.columns, "label": table[source.columns["label"]]}
    return dataclasses.replace(source, class_names=names, columns=columns, examples=None)
