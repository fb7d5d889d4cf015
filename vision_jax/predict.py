"""Predicting with a trained run, or a pretrained classifier file, on image files.

``python -m vision_jax.predict (--workdir=RUN [--which=best|latest] [--ema|--no-ema] |
--weights=FILE --model=NAME [--class_names=a,b,...]) --input=DIR|FILE|GLOB
--output=preds.jsonl|.csv|.json [--top_k=5] [--batch_size=16] [--draw=DIR] [--draw_threshold=0.5]
[--coco_annotations=FILE]``

Classification writes a record per image: ``file``, its class (``label``, ``class_name``,
``probability``) and its ``top_k`` classes. Segmentation writes a PNG label map per image (class
ids at the image's size) into the folder named as the output without its extension, and a
record per image: ``file``, ``label_map`` (the PNG) and ``class_fractions`` (of its pixels);
the maps are the argmax of the model's scores resized bilinearly to each image's size.
Detection writes COCO results (``bbox`` [x, y, w, h] in image pixels, ``score``,
``category_id``) with ``file_name`` and ``category_name``, and with ``--draw`` the images with
their boxes; their ``image_id`` is 1, 2, ... in file order, or with ``--coco_annotations`` the id
of the file in that COCO file (so pycocotools scores the results against it). The output's
extension picks its format: ``.jsonl`` (a record a line), ``.csv`` (a record a row, nested
fields flattened: ``top_k_1_label``, ``bbox_1``; a task of one's own's values named as its run
recorded them, ``probabilities/<name>``) or ``.json`` (a list). Each batch's records
and label maps are written as soon as it is predicted, then let go (memory for a batch, not
for every image): a run stopped midway leaves the lines or rows (and PNGs) of the batches done,
whole; a ``.json`` list replaces an earlier file only once complete. A folder of PNGs (label
maps, drawings) gets a hidden marker file (:data:`MARKER`) listing those predict wrote there: a
rerun may replace them, and refuses to replace any other PNG (:func:`claim_pngs`).

Images go through the evaluation pipeline (:func:`vision_jax.data.eval_batches`, with the run's
recorded input size, crop, mean and std, or the weight file's input contract) in batches and the
task's jitted prediction, so predictions equal what the evaluation scored. Files the pipeline's
decoder cannot read are reported by name and skipped.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import functools
import glob
import itertools
import json
import logging
import os
import posixpath
import sys
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

from vision_jax.tf_without_keras import tf

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict

from vision_jax import data as data_lib
from vision_jax import weights
from vision_jax.data import augment
from vision_jax.data.coco import from_image_files, image_ids_by_file
from vision_jax.data.folders import IMAGE_EXTENSIONS, files_under, is_image_file
from vision_jax.data.pipeline import decode_file, parallel_map
from vision_jax.data.sources import tensor_column
from vision_jax.drawing import PALETTE, draw_boxes, labels_drawable
from vision_jax.metrics import argmax_nan_lowest, nan_lowest_np
from vision_jax.models import create_model, list_models, model_spec
from vision_jax.models.registry import backbone_of
from vision_jax.output_errors import (
    failed_write,
    file_problem,
    folder_problem,
    local_only,
    why_and_what_to_do,
    written_whole,
)
from vision_jax.run_options import add_run_options
from vision_jax.signals import command
from vision_jax.specs import is_integer
from vision_jax.steps import fetched_one_behind
from vision_jax.tasks import IGNORE_LABEL, Classification, Task, library_kind
from vision_jax.tasks.coco_eval import coco_results, warn_if_all_zero_area
from vision_jax.trained import jitted_predict, load_trained
from vision_jax.weights.files import read_once
from vision_jax.weights.surgery import PATCH

logger = logging.getLogger(__name__)

FORMATS = (".jsonl", ".csv", ".json")
TOP_K = 5  # classes per classification record, unless asked for more or fewer
# The last sentence of the error naming a file that fails once predicting (read at the start):
CHANGED_SINCE_LISTED = "It was read when predict began: it changed or went since; predict stopped."
# Segmentation's label maps come from log_softmax of the logits, not the task's probabilities
# (which underflow to 0 past logit gaps of about 87; see upsampled_argmax).
LOG_PROBABILITIES = "log_probabilities"

Sized = tuple[str, tuple[int, int]]  # a file and its (height, width)


def image_files(pattern: str) -> list[str]:
    """The image files of a folder and its subfolders (sorted; hidden files and folders left
    out and symbolic links followed, as training's listings do), a glob pattern (``**`` for any
    depth), or one file. A folder's or a pattern's files without an image extension
    (:data:`~vision_jax.data.folders.IMAGE_EXTENSIONS`, as training lists) are left out,
    named in a warning."""
    if os.path.isfile(pattern):  # before the glob: a file name may hold "[", "*" or "?"
        return [pattern]
    if os.path.isdir(pattern):
        found = [os.path.join(pattern, *inside.split("/")) for inside in files_under(pattern)
                 if not posixpath.basename(inside).startswith(".")]  # fmt: skip
    elif glob.has_magic(pattern):
        found = [f for f in glob.glob(pattern, recursive=True) if os.path.isfile(f)]
    else:
        raise FileNotFoundError(f"{pattern!r} does not exist (an image file, a folder or a glob).")
    files = sorted(f for f in found if is_image_file(os.path.basename(f)))
    if others := sorted(set(found) - set(files)):
        logger.warning(
            "Left out %d file(s) of %s without an image extension (%s): %s%s.", len(others),
            pattern, "/".join(IMAGE_EXTENSIONS), ", ".join(others[:3]),
            " ..." if others[3:] else "",
        )  # fmt: skip
    if not files:
        raise FileNotFoundError(f"No image files ({'/'.join(IMAGE_EXTENSIONS)}) at {pattern!r}.")
    return files


def _check_batch_size(batch_size: Any) -> None:
    """Raises unless ``batch_size`` is an integer >= 1 (0 divided by zero, -1 failed in TF)."""
    if not is_integer(batch_size) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}.")


def _listed(paths: Sequence[str | os.PathLike] | str | os.PathLike) -> list[str]:
    """``paths`` as a list of file names: one path alone is a folder or glob pattern that
    :func:`image_files` expands, or a file that stays itself (a 0-d array of a string too)."""
    if getattr(paths, "ndim", None) == 0 and getattr(paths, "dtype", None) is not None:
        item = paths.item()
        paths = item if isinstance(item, str | os.PathLike) else paths
    if isinstance(paths, str | os.PathLike):
        path = str(paths) if isinstance(paths, str) else os.fspath(paths)  # np.str_: str
        expands = os.path.isdir(path) or (glob.has_magic(path) and not os.path.isfile(path))
        return image_files(path) if expands else [path]
    # An array (or pandas Series) of strings holds paths; any other array is pixels.
    named = getattr(getattr(paths, "dtype", None), "kind", None) in ("U", "S", "O")
    image = not (named and getattr(paths, "ndim", None) == 1) and (
        hasattr(paths, "__array_interface__") or hasattr(paths, "shape")  # numpy, JAX, PIL
    )
    listed = [] if image or not isinstance(paths, Iterable) else list(paths)
    held = next((p for p in listed if not isinstance(p, str | bytes | os.PathLike)), None)
    if image or not isinstance(paths, Iterable) or held is not None:
        kind = type(paths if held is None else held)
        module = "" if kind.__module__ == "builtins" else f"{kind.__module__}."
        what = f"{module}{kind.__qualname__}"
        raise TypeError(
            f"predict takes image files (paths, a folder or a glob pattern); got "
            f"{'a list holding ' * (held is not None)}a {what}: "
            "predict images in memory with predict_arrays (a batch [N, H, W, C]; one PIL image: "
            "np.asarray(image)[None])."
        )
    return [str(p) if isinstance(p, str) else os.fspath(p) for p in listed]  # np.str_: str


class Progress:
    """The count of images done and images per second on stderr: one line rewritten as they are
    done on a terminal, the final count only in a log."""

    def __init__(self, total: int):
        self.total, self.done, self.start = total, 0, time.perf_counter()

    def update(self, count: int) -> None:
        self.done += count
        if sys.stderr.isatty():
            print(f"\r{self._line()}", end="", file=sys.stderr)

    def close(self) -> None:
        print("" if sys.stderr.isatty() else self._line(), file=sys.stderr)

    def _line(self) -> str:
        rate = self.done / max(time.perf_counter() - self.start, 1e-9)
        return f"{self.done}/{self.total} images, {rate:.1f} images/s"


class Predictor:
    """A model ready to predict on image files or arrays as its evaluation did.

    ``Predictor(workdir)`` is a trained run (its task, model, class names and input; ``ema``
    as :func:`~vision_jax.trained.load_trained` takes it);
    :meth:`from_weights` a pretrained classifier file. :meth:`predict` takes image files,
    :meth:`predict_arrays` images in memory.
    """

    task: Task
    model: nn.Module
    variables: dict[str, Any]
    input: data_lib.InputSpec
    class_names: list[str]
    category_ids: list[int]  # detection: the COCO id of each class
    batch_size: int

    def __init__(
        self,
        workdir: str | os.PathLike,
        *,
        which: str = "best",
        ema: bool | None = None,
        batch_size: int = 16,
    ):
        _check_batch_size(batch_size)
        trained = load_trained(workdir, which=which, ema=ema)
        self._bind(
            trained.task,
            trained.model,
            trained.variables,
            trained.input,
            trained.class_names,
            trained.record.category_ids,
            batch_size,
        )

    @classmethod
    def from_weights(
        cls,
        path: str | os.PathLike,
        *,
        model: str,
        class_names: Sequence[str] | None = None,
        batch_size: int = 16,
    ) -> Predictor:
        """The classifier in the weight file ``path`` (any format :mod:`vision_jax.weights`
        reads) on the registered backbone ``model``, fed as the file's input contract says (its
        size, crop, interpolation, mean and std); its classes
        ``class_names``, else those the file records (a run's, a Hugging Face ``id2label``,
        ``export_safetensors(..., class_names=...)``'s), else ``class_0`` .. ``class_{n-1}``.
        A ViT of another patch size than ``model``'s is refused naming the model to use
        (:func:`~vision_jax.weights.load_pretrained` resizes its patch kernel for fine-tuning:
        another network than the file's)."""
        _check_batch_size(batch_size)
        if isinstance(class_names, str):  # its characters would be the classes
            raise ValueError(
                f"class_names must be a sequence of names, got the string {class_names!r} (a "
                "list: ['cat', 'dog'])."
            )
        with read_once():  # its contract, variables and class names: one read of a file
            contract = weights.input_contract(path, inference=True)
            _check_square(path, model, contract.image_size)
            network, variables = _pretrained_classifier(path, model, contract.image_size)
            count = network.num_classes
            recorded = (weights.class_names(path) or ()) if class_names is None else ()
        if class_names is None and len(recorded) == count:
            class_names = recorded
        names = list(class_names or (f"class_{i}" for i in range(count)))
        if len(names) != count:
            raise ValueError(f"{path} classifies {count} classes; got {len(names)} class names.")
        spec = data_lib.InputSpec(
            contract.image_size, contract.mean, contract.std, crop_fraction=contract.crop_fraction,
            interpolation=contract.interpolation, crop_mode=contract.crop_mode,
        )  # fmt: skip
        predictor = cls.__new__(cls)
        predictor._bind(Classification(), network, variables, spec, names, None, batch_size)
        return predictor

    def _bind(
        self,
        task: Task,
        model: nn.Module,
        variables: dict,
        spec: data_lib.InputSpec,
        class_names: Sequence[str],
        category_ids: Sequence[int] | None,
        batch_size: int,
    ) -> None:
        self.task, self.model, self.variables, self.input = task, model, variables, spec
        self.class_names, self.batch_size = list(class_names), batch_size
        self.category_ids = list(category_ids or range(1, len(self.class_names) + 1))

        def detections(variables: Any, batch: dict[str, jax.Array]) -> Any:
            outputs = model.apply(variables, batch["image"], train=False)
            return task.eval_metrics(outputs, batch)  # what the evaluation scores

        def log_probabilities(variables: Any, images: jax.Array) -> dict[str, jax.Array]:
            outputs = model.apply(variables, images, train=False)
            return {LOG_PROBABILITIES: jax.nn.log_softmax(outputs.astype(jnp.float32))}

        self._predict = jitted_predict(model, task, spec.image_size)
        self._detections = jax.jit(detections)
        self._log_probabilities = jax.jit(log_probabilities)

    def predict(
        self, paths: Sequence[str | os.PathLike] | str | os.PathLike, *, top_k: int = TOP_K,
        progress: bool = False,
    ) -> tuple[list[dict], list[tuple[str, str]]]:  # fmt: skip
        """Records of the readable files of ``paths`` (in order; one path may be given alone,
        or a folder or glob pattern as :func:`image_files` expands it; see the module
        docstring: segmentation's ``label_map`` is a uint8 array here), and the unreadable files
        as (path, reason). ``top_k``: classes per classification record; ``progress``: a
        progress line on stderr. :meth:`iter_predict` gives them a batch at a time."""
        unreadable: list[tuple[str, str]] = []
        batches = self.iter_predict(paths, top_k=top_k, progress=progress, unreadable=unreadable)
        return [record for batch in batches for record in batch], unreadable

    def iter_predict(
        self, paths: Sequence[str | os.PathLike] | str | os.PathLike, *, top_k: int = TOP_K,
        progress: bool = False, unreadable: list[tuple[str, str]] | None = None,
    ) -> Iterator[list[dict]]:  # fmt: skip
        """:meth:`predict`'s records a batch at a time, each as soon as it is predicted (so a
        caller can write them and let them go: memory for one batch, not for every image);
        ``unreadable`` (a list) gets the unreadable files as they are found: before the first
        batch, and for detection also after the last (files that fail when decoded)."""
        paths = _listed(paths)
        unreadable = [] if unreadable is None else unreadable
        if not paths:
            return
        if library_kind(self.task) == "detection":
            yield from self._detect(paths, progress, unreadable)
            return
        if top_k < 1:
            raise ValueError(f"top_k must be at least 1; got {top_k}.")
        files, skipped = decoded_sizes(paths)
        unreadable += skipped
        source = unlabelled_files(files, self.task.target, self.class_names)
        kind = library_kind(self.task)
        keys = None if kind is None else ("probabilities",)  # None: a task of the user's own
        if kind == "segmentation":
            keys = (LOG_PROBABILITIES,)
        bar = Progress(len(files)) if progress else None
        left = iter(files)
        for rows in self._rows(source, keys, bar, self._batch_size(len(files))):
            done = itertools.islice(left, len(rows))
            yield [self._record(path, size, row, top_k)
                   for (path, size), row in zip(done, rows, strict=True)]  # fmt: skip

    def _batch_size(self, count: int) -> int:
        """The batch size to predict ``count`` images with: the power of two at or above
        ``count`` if that is smaller than the batch size (the last batch is padded to it: one
        image in a batch of 16 cost 16 forward passes; powers of two: calls with other counts
        reuse a few compiled sizes), and for segmentation scores of at most 256 MB."""
        batch = min(self.batch_size, 1 << max(count - 1, 0).bit_length())
        if library_kind(self.task) != "segmentation":
            return batch
        per_image = self.input.image_size**2 * len(self.class_names) * 4  # float32 scores
        return max(1, min(batch, 2**28 // per_image))

    @property
    def value_names(self) -> list[str] | None:
        """The names of the values of a task of one's own when its run recorded them
        (``data.class_names``, or a CSV's ``<target>/<name>`` columns); None for a library
        task, or the default names ``"0"`` .. ``"K-1"`` (a CSV then numbers its columns)."""
        names = self.class_names
        if library_kind(self.task) is not None or names == [str(i) for i in range(len(names))]:
            return None
        return names

    def _record(self, path: str, size: tuple[int, int], row: dict, top_k: int) -> dict:
        """The record of the file ``path`` of ``size`` (height, width) with the predictions
        ``row``; a task of the user's own gets its predictions as they come, at the model's
        input."""
        kind, names = library_kind(self.task), self.class_names
        if kind == "classification":
            return classification_record(path, row["probabilities"], names, top_k)
        if kind == "segmentation":
            return segmentation_record(path, row[LOG_PROBABILITIES], size, names)
        return {"file": path, **{k: v.tolist() for k, v in row.items()}}

    def predict_arrays(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """The task's predictions (:meth:`~vision_jax.tasks.base.Task.predict`: classification
        ``probabilities`` [N, classes]; segmentation ``label_map`` [N, S, S] and
        ``probabilities``, at the model's input size S) of images as training takes arrays:
        [N, H, W], [N, H, W, 1] or [N, H, W, 3], uint8 or float in [0, 1]. A 3-D array of last
        axis 1 or 3 is one [H, W, C] image (model.apply refuses it too), not a grey batch."""
        images = np.asarray(images)
        if images.ndim not in (3, 4):
            raise ValueError(
                f"Images must be [N, H, W], [N, H, W, 1] or [N, H, W, 3]; got {images.shape}."
            )
        if images.ndim == 3 and images.shape[-1] in (1, 3):
            raise ValueError(
                f"Images of shape {images.shape} are one [H, W, C] image, not a batch: add the "
                f"batch axis (images[None]); grey images {images.shape[-1]} pixels wide: "
                "images[..., None]."
            )
        if library_kind(self.task) == "detection":
            raise ValueError("Detection predicts on files (predict): boxes map back to each file.")
        if not len(images):
            raise ValueError(f"No images to predict: got an array of shape {images.shape}.")
        target = self.task.target
        if target == "label_map":
            targets = np.full(images.shape[:3], IGNORE_LABEL, np.uint8)
        else:  # image-level (data_lib.is_image_level; boxes: a task of one's own): a label 0
            target, targets = "label", np.zeros(len(images), np.int32)
        source = data_lib.from_arrays(images, targets, self.class_names, target=target)
        batch_size = self._batch_size(len(images))
        rows = [row for batch in self._rows(source, None, None, batch_size) for row in batch]
        return {k: np.stack([r[k] for r in rows]) for k in rows[0]}

    def _rows(
        self, source: data_lib.Source, keys: tuple[str, ...] | None, bar: Progress | None,
        batch_size: int,
    ) -> Iterator[list[dict[str, np.ndarray]]]:  # fmt: skip
        """The task's predictions ``keys`` (None: all; ``(LOG_PROBABILITIES,)``: segmentation's
        log-probabilities) of each example of ``source``, in order, a list for each batch of
        ``batch_size``."""
        batches = data_lib.eval_batches(
            source, self.input, global_batch=batch_size, advice=CHANGED_SINCE_LISTED
        )

        def predict(images: np.ndarray) -> dict[str, jax.Array]:
            if keys == (LOG_PROBABILITIES,):
                return self._log_probabilities(self.variables, images)
            return self._predict(self.variables, images, keys=keys)

        dispatched = ((b, predict(b["image"])) for b in batches)
        for batch, found in fetched_one_behind(dispatched):
            count = int(batch["mask"].sum())  # padding rows come last
            if bar is not None:
                bar.update(count)
            yield [{k: v[i] for k, v in found.items()} for i in range(count)]
        if bar is not None:
            bar.close()

    def _detect(
        self, paths: Sequence[str], progress: bool, unreadable: list[tuple[str, str]]
    ) -> Iterator[list[dict]]:
        """COCO results of the readable files (with ``file_name`` and ``category_name``), a
        list for each batch; the unreadable files (path, reason) go into ``unreadable``."""
        source, skipped = from_image_files(paths, self.class_names, self.category_ids)
        # the decoder's reason, as the other tasks give (not that of PIL reading the header)
        unreadable += [(path, _reason(path, header)) for path, header in skipped]
        batch_size = self._batch_size(source.num_examples)
        batches = data_lib.eval_batches(source, self.input, global_batch=batch_size, max_boxes=1)
        bar = Progress(source.num_examples) if progress else None
        images = {im["id"]: im["file_name"] for im in source.annotations["images"]}
        names = dict(zip(self.category_ids, self.class_names, strict=True))
        seen, tally = set(), Counter()
        dispatched = ((b, self._detections(self.variables, b)) for b in batches)
        for batch, found in fetched_one_behind(dispatched):
            found = found.detections.compute()
            seen.update(found["image_ids"].tolist())
            if bar is not None:
                bar.update(int(batch["mask"].sum()))
            results = coco_results(
                found, self.category_ids, source.annotations["images"], tally=tally
            )
            for r in results:
                r["file_name"] = images[r["image_id"]]
                r["category_name"] = names[r["category_id"]]
            yield results
        if bar is not None:
            bar.close()
        warn_if_all_zero_area(tally, "this prediction")
        unreadable += [(images[i], _reason(images[i])) for i in sorted(set(images) - seen)]


def _check_square(
    path: str | os.PathLike, model_name: str, image_size: int | tuple[int, int] | None
) -> None:
    """Refuses a ViT of an oblong grid (``image_size`` its (height, width) as its file records
    it; None: rows of no square grid, the grid not recorded): predictions are square."""
    if isinstance(image_size, int):
        return
    if image_size is None:
        what, grid = "position embeddings of no square grid (the file does not record it)", None
    else:
        grid = weights.recorded_grid(path)
        what = f"a ViT for {image_size[0]}x{image_size[1]} images (its {grid[0]}x{grid[1]} grid)"
    named = "(rows, columns)" if grid is None else str(grid)
    its_grid = ", checkpoint_grid=(rows, columns)" if grid is None else ""
    raise ValueError(
        f"{path} holds {what}; Predictor.from_weights predicts at a square size. Load it into "
        f"create_model({model_name!r}, num_classes=..., posemb_grid={named}) initialised at "
        f"its size with load_pretrained(path, model=..., variables=...{its_grid}) and apply "
        "that."
    )


def _pretrained_classifier(
    path: str | os.PathLike, model_name: str, image_size: int
) -> tuple[nn.Module, dict]:
    """The registered model ``model_name`` with the classifier head of the weight file ``path``
    (its class count), and the file's weights loaded into it."""
    probe = create_model(model_name, num_classes=1)
    read = weights.read_variables(path, probe)
    _check_patch_size(path, model_name, getattr(backbone_of(probe), "patch_size", None), read)
    head = read.get("params", {}).get("head", {}).get("kernel")
    if head is None:
        raise weights.WeightFormatError(f"{path} holds no classifier head to predict with.")
    model = create_model(model_name, num_classes=int(np.shape(head)[-1]))
    dummy = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), dummy, train=False))
    # Zeros of the model's shapes: the strict merge takes every value from the file.
    template = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
    return model, weights.load_pretrained(
        path, model=model, variables=template, image_size=image_size
    )


def _check_patch_size(
    path: str | os.PathLike, model_name: str, patch: int | None, read: dict
) -> None:
    """Refuses a ViT of another patch size than ``model_name``'s (``patch``): loading resizes
    its patch kernel (FlexiViT's pseudo-inverse, a start for fine-tuning), another network than
    the file's to predict with."""
    kernel = flatten_dict(read, sep="/").get(PATCH)
    if patch is None or kernel is None or tuple(np.shape(kernel)[:2]) == (patch, patch):
        return
    rows, columns = np.shape(kernel)[:2]
    spec = model_spec(model_name)
    same = {**spec.defaults, "patch_size": int(rows)}
    fits = [n for n in list_models(spec.family) if model_spec(n).defaults == same]
    use = f"use {fits[0]}" if fits and rows == columns else "no registered model has them"
    raise weights.WeightMismatchError(
        f"{path} holds a ViT with {rows}x{columns} patches; {model_name} has {patch}x{patch}: "
        f"{use}."
    )


def decoded_sizes(paths: Sequence[str]) -> tuple[list[Sized], list[tuple[str, str]]]:
    """The files of ``paths`` that the pipeline's decoder reads, with their (height, width);
    and the others, with the decoder's error."""

    def size(index: tf.Tensor, path: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        return index, tf.shape(augment.decode(tf.io.read_file(path)))[:2]

    ds = tf.data.Dataset.from_tensor_slices(tensor_column(np.array(paths, dtype=str)))
    ds = ds.enumerate()
    ds = parallel_map(ds, size).ignore_errors()
    ds = ds.batch(256).with_options(data_lib.pipeline_options())
    found = {int(i): (int(h), int(w)) for rows, sizes in ds.as_numpy_iterator()
             for i, (h, w) in zip(rows, sizes, strict=True)}  # fmt: skip
    unreadable = [(p, _reason(p)) for i, p in enumerate(paths) if i not in found]
    if not found:
        listed = "; ".join(f"{p}: {reason}" for p, reason in unreadable[:3])
        more = f" (and {len(unreadable) - 3} more)" if len(unreadable) > 3 else ""
        raise data_lib.DataError(
            f"None of the {len(paths)} image file(s) can be read: {listed}{more}."
        )
    return [(p, found[i]) for i, p in enumerate(paths) if i in found], unreadable


def _reason(path: str, otherwise: str = "cannot be decoded") -> str:
    """Why the pipeline's decoder cannot read ``path`` (``otherwise``: if it can)."""
    error = decode_file(path, augment.decode)
    return error if isinstance(error, str) else otherwise


def unlabelled_files(
    files: Sequence[Sized], target: str, class_names: Sequence[str]
) -> data_lib.Source:
    """A source over image files without ground truth, for the evaluation pipeline: its target
    is a placeholder nothing reads (label 0, or a label map all IGNORE_LABEL at the image's
    size)."""
    paths = np.array([p for p, _ in files], dtype=str)
    if data_lib.is_image_level(target):  # a label, or a column of one's own
        labels = np.zeros(len(paths), np.int32)
        return data_lib.from_columns({"path": paths, "label": labels}, class_names)
    heights, widths = (np.array(v, np.int32) for v in zip(*(s for _, s in files), strict=True))
    columns = {"path": tensor_column(paths), "height": heights, "width": widths}
    ds = tf.data.Dataset.from_tensor_slices(columns)

    def placeholder(example: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        shape = tf.stack([example["height"], example["width"]])
        ignore = tf.fill(shape, tf.constant(IGNORE_LABEL, tf.uint8))
        return {"path": example["path"], "label_map": ignore}

    ds = ds.map(placeholder)
    return data_lib.Source(ds, len(paths), list(class_names), {"path": paths}, target=target)


def classification_record(
    path: str, probabilities: np.ndarray, class_names: Sequence[str], top_k: int
) -> dict:
    """``file``, the most probable class (``label``, ``class_name``, ``probability``) and the
    ``top_k`` most probable (ties in class order)."""
    order = np.argsort(-nan_lowest_np(probabilities), kind="stable")[:top_k]  # NaN last
    top = [{"label": int(i), "class_name": class_names[i], "probability": float(probabilities[i])}
           for i in order]  # fmt: skip
    return {"file": path, **top[0], "top_k": top}


def segmentation_record(
    path: str, scores: np.ndarray, size: tuple[int, int], class_names: Sequence[str]
) -> dict:
    """``file``, its ``label_map`` (uint8 class ids at the image's ``size``: the argmax of the
    model's ``scores`` at its input, its log-probabilities, :func:`upsampled_argmax`) and
    ``class_fractions`` (the fraction of its pixels in each class)."""
    full = upsampled_argmax(scores, size)
    fractions = np.bincount(full.ravel(), minlength=len(class_names)) / full.size
    return {"file": path, "label_map": full,
            "class_fractions": dict(zip(class_names, fractions.tolist(), strict=True))}  # fmt: skip


def _bilinear_taps(out: int, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The two source samples of each of ``out`` samples of a bilinear resize from ``size``,
    and the second one's weight: half-pixel centres, edges clamped (torch's
    ``interpolate(align_corners=False)``)."""
    where = np.clip((np.arange(out) + 0.5) * size / out - 0.5, 0, size - 1)
    low = np.floor(where).astype(np.int64)
    return low, np.minimum(low + 1, size - 1), (where - low).astype(np.float32)


def upsampled_argmax(scores: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The uint8 class map at ``size`` (height, width) of [h, w, classes] ``scores``, logits or
    log-probabilities (``log_softmax``: the logits up to a per-pixel shift, which leaves the
    argmax alone), resized bilinearly, then the argmax, as mmseg and Hugging Face's segmentation
    post-processing resize logits. (Not the log of probabilities: those underflow to 0 past
    logit gaps of about 87, moving class boundaries.) In bands of output rows, each from the
    few input rows it needs, so a large image needs little memory."""
    scores = np.asarray(scores, np.float32)
    left, right, across = _bilinear_taps(size[1], scores.shape[1])
    top, bottom, down = _bilinear_taps(size[0], scores.shape[0])
    across = across[:, None]
    out = np.empty(size, np.uint8)
    band = max(1, 2**22 // (size[1] * scores.shape[2]))
    for start in range(0, size[0], band):
        rows = slice(start, start + band)
        used = np.unique(np.concatenate([top[rows], bottom[rows]]))  # two a row at most
        needed = scores[used]  # [used input rows, w, classes]
        columns = needed[:, left] * (1 - across) + needed[:, right] * across
        upper, lower = np.searchsorted(used, top[rows]), np.searchsorted(used, bottom[rows])
        weight = down[rows, None, None]
        resized = columns[upper] * (1 - weight) + columns[lower] * weight
        out[rows] = argmax_nan_lowest(resized)  # a NaN score never wins, as in the metrics
    return out


def unique_pngs(paths: Sequence[str], folder: str) -> list[str]:
    """``folder/<stem>.png`` for each of ``paths``; a name already taken (by an earlier path,
    or one that another path's stem will take) gets ``_2``, ``_3``... until it is free."""
    stems = [os.path.splitext(os.path.basename(path))[0] for path in paths]
    reserved, taken, last = set(stems), set(), {}
    out = []
    for stem in stems:
        name = stem
        if name in taken:
            n = last.get(stem, 1)  # where this stem's suffixes stopped: linear in all
            while name in taken or name in reserved:
                n += 1
                name = f"{stem}_{n}"
            last[stem] = n
        taken.add(name)
        out.append(os.path.join(folder, f"{name}.png"))
    return out


MARKER = ".vision_jax_predict.json"  # in a folder of predict's PNGs: the ones it wrote there


class OutputError(Exception):
    """An output that predict refuses to write: it would replace a file predict did not
    write."""


def written_before(folder: str) -> set[str]:
    """The names of the PNGs that predict wrote into ``folder``, as its marker file lists them
    (none without one; an unreadable marker vouches for none; entries other than plain PNG
    names are not taken)."""
    try:
        with open(os.path.join(folder, MARKER), encoding="utf-8") as f:
            names = json.load(f)
    except (OSError, ValueError):
        return set()
    if not isinstance(names, list):
        return set()
    return {n for n in names if isinstance(n, str) and n.endswith(".png")
            and n == os.path.basename(n) and not n.startswith(".")}  # fmt: skip


def claim_pngs(folder: str, paths: Iterable[str], flag: str) -> None:
    """Readies ``folder`` for predict's PNGs ``paths`` (in it): a file of one of their names
    that predict did not write (its marker does not list it) is an :class:`OutputError` naming
    it (``flag``: the option that chose the folder), raised before anything changes; the marker
    then lists them too. Nothing is removed: PNGs of earlier runs that this one does not
    write stay (their records list them)."""
    earlier, names = written_before(folder), {os.path.basename(p) for p in paths}
    for name in sorted(names - earlier):
        if os.path.lexists(os.path.join(folder, name)):
            raise OutputError(
                f"{flag}: {folder} holds {name}, which its marker ({MARKER}) does not list as "
                "predict's: choose another folder, or remove the file (predict replaces only "
                "files it wrote)."
            )
    os.makedirs(folder, exist_ok=True)
    with written_whole(os.path.join(folder, MARKER)) as partial, open(partial, "w") as f:
        json.dump(sorted(earlier | names), f)


def save_label_maps(records: list[dict], folder: str, names: Mapping[str, str]) -> None:
    """Writes each record's ``label_map`` to a PNG in ``folder`` and puts its path in its
    place: class ids as the pixels of a palette image with PASCAL VOC's colours (as VOC's
    ``SegmentationClass`` files: viewers show the classes; PIL, or any reader of the PNG's one
    channel, gets the ids). ``names``: each file's PNG in ``folder`` (:func:`unique_pngs` of
    every file predicted, as records come a batch at a time)."""
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    for record in records:
        out = names[record["file"]]
        image = Image.fromarray(record["label_map"])  # uint8 class ids
        image.putpalette(voc_palette())
        image.save(out)
        record["label_map"] = out


@functools.cache
def voc_palette() -> list[int]:
    """PASCAL VOC's 256 colours, flat RGB: class ``c``'s bits spread over R, G and B from the
    high bit down (1 dark red, 2 dark green, 3 olive, ...)."""
    palette = []
    for c in range(256):
        rgb = [0, 0, 0]
        for bit in range(8):
            for channel in range(3):
                rgb[channel] |= ((c >> (3 * bit + channel)) & 1) << (7 - bit)
        palette += rgb
    return palette


def flat(
    record: Mapping[str, Any], prefix: str = "", names: Sequence[str] | None = None
) -> dict[str, Any]:
    """``record`` with nested mappings and lists spread into columns (``top_k_1_label``); a
    field of ``len(names)`` numbers (a task of one's own's values, ``names`` those the run
    recorded) into a column per name, ``<field>/<name>``."""
    out: dict[str, Any] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if _named_values(value, names):
            out.update({f"{name}/{n}": v for n, v in zip(names, value, strict=True)})
            continue
        if isinstance(value, list):
            value = {str(i): v for i, v in enumerate(value, 1)}
        if isinstance(value, Mapping):
            out.update(flat(value, f"{name}_"))
        else:
            out[name] = value
    return out


def _named_values(value: Any, names: Sequence[str] | None) -> bool:
    """Whether ``value`` is a list of as many numbers as ``names``."""
    if names is None or not isinstance(value, list) or len(value) != len(names):
        return False
    return all(isinstance(v, int | float) for v in value)


class RecordWriter:
    """Writes records to ``path`` as its extension says (``.jsonl``: a record a line; ``.csv``:
    a row, its columns those of the first records written; ``.json``: a list), a batch at a
    time, each flushed as it comes. JSON lines and CSV rows go straight to ``path`` (opened at
    the first batch): whatever stops the writing leaves those of the batches written. A JSON
    list, whole only at its end, goes to a temporary name that replaces ``path`` once complete
    (a file already there stays whole until then). A context manager: the file is completed
    on leaving it, and only without an exception. ``names``: the value names of a task of
    one's own, for a CSV's columns (:func:`flat`; :attr:`Predictor.value_names`)."""

    def __init__(self, path: str, names: Sequence[str] | None = None):
        self.path, self.kind = path, os.path.splitext(path)[1].lower()
        self.names = names
        self.count = 0  # records written
        self._file: Any = None
        self._csv: csv.DictWriter | None = None
        self._open = contextlib.ExitStack()

    def __enter__(self) -> RecordWriter:
        return self

    def __exit__(self, *error: Any) -> None:
        if error[0] is not None:  # closed; a JSON list's temporary file removed
            self._open.__exit__(*error)
            return
        with self._open:
            self._finish()

    def write(self, records: Sequence[Mapping[str, Any]]) -> None:
        f = self._file or self._start()
        if self.kind == ".jsonl":
            f.write("".join(json.dumps(r) + "\n" for r in records))
        elif self.kind == ".json":
            f.write("".join((", " if self.count + i else "") + json.dumps(r)
                            for i, r in enumerate(records)))  # fmt: skip
        elif rows := [flat(r, names=self.names) for r in records]:
            if self._csv is None:
                self._header(list(dict.fromkeys(k for row in rows for k in row)))
            self._csv.writerows(rows)
        f.flush()
        self.count += len(records)

    def _start(self) -> Any:
        """The file opened (``.json``: its temporary file, with the list's opening bracket)."""
        path = self.path
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)  # checked before
        if self.kind == ".json":
            path = self._open.enter_context(written_whole(path))
        newline = "" if self.kind == ".csv" else None
        self._file = self._open.enter_context(  # names that are not UTF-8 keep their bytes
            open(path, "w", newline=newline, encoding="utf-8", errors="surrogateescape")
        )
        if self.kind == ".json":
            self._file.write("[")
        return self._file

    def _header(self, columns: list[str]) -> None:
        self._csv = csv.DictWriter(self._file, columns, restval="")
        self._csv.writeheader()

    def _finish(self) -> None:
        """The end of the file: a JSON list's closing bracket, a CSV header without records."""
        if self._file is None:
            self._start()
        if self.kind == ".json":
            self._file.write("]")
        elif self.kind == ".csv" and self._csv is None:
            self._header([])


def write_records(
    records: Sequence[Mapping[str, Any]], path: str, names: Sequence[str] | None = None
) -> None:
    """``records`` as the extension of ``path`` says: ``.jsonl``, ``.csv`` or ``.json`` (see
    :class:`RecordWriter`)."""
    with RecordWriter(path, names) as writer:
        writer.write(records)


def draw_detections(
    path: str, detections: list[dict], out_path: str, threshold: float, named: bool | None = None
) -> None:
    """``path`` as the model read it (decoded as training decodes: upright, RGB, 8 bits) with
    the boxes of ``detections`` scoring at least ``threshold`` drawn, labelled with class name
    and score (:func:`~vision_jax.drawing.draw_boxes`), saved to ``out_path``. ``named``
    False (None: whether the label font has every character of their names): labelled
    ``#category_id`` instead, as the records name it. A file that cannot be decoded is not drawn
    (predict names it as skipped)."""
    from PIL import Image

    pixels = decode_file(path, augment.decode)
    if isinstance(pixels, str):
        return
    shown = sorted((d for d in detections if d["score"] >= threshold), key=lambda d: d["score"])
    if named is None:
        named = labels_drawable(d["category_name"] for d in shown)
    label = lambda d: d["category_name"] if named else f"#{d['category_id']}"
    boxes = [(d["bbox"], PALETTE[d["category_id"] % len(PALETTE)],
              f"{label(d)} {d['score']:.2f}") for d in shown]  # fmt: skip
    Image.fromarray(draw_boxes(pixels, boxes)).save(out_path)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m vision_jax.predict", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--workdir", help="a trained run's workdir")
    add_run_options(parser, which_default=None)  # None: not given (with --weights, an error)
    parser.add_argument("--weights", help="a pretrained classifier file (instead of --workdir)")
    parser.add_argument("--model", help="the registered model of --weights (e.g. vit_ti16)")
    parser.add_argument("--class_names", help="--weights' classes, comma-separated")
    parser.add_argument("--input", required=True, help="an image folder, file or glob pattern")
    parser.add_argument("--output", required=True, help="records to write: .jsonl, .csv, .json")
    parser.add_argument(
        "--top_k", type=int, help=f"classes per classification record (default {TOP_K})"
    )
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument(
        "--coco_annotations",
        help="detection: a COCO file whose image ids the results take (by file name), for "
        "pycocotools' loadRes against it (default: 1, 2, ... in file order)",
    )  # fmt: skip
    parser.add_argument("--draw", help="detection: folder for the images with their boxes drawn")
    parser.add_argument(
        "--draw_threshold", type=float, default=0.5,
        help="detection: --draw draws the boxes scoring at least this (inclusive; default 0.5)",
    )  # fmt: skip
    return parser


def _predictor(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Predictor:
    if bool(args.workdir) == bool(args.weights):
        parser.error("give either --workdir or --weights (with --model).")
    if args.workdir:
        stray = [f"--{k}" for k in ("model", "class_names") if getattr(args, k)]
        if stray:
            parser.error(f"{', '.join(stray)}: for --weights (a run records its own).")
        return Predictor(
            args.workdir, which=args.which or "best", ema=args.ema, batch_size=args.batch_size
        )
    if not args.model:
        parser.error("--weights needs --model (the registered model the file fits).")
    if args.which or args.ema is not None:
        parser.error("--which and --ema pick the parameters of --workdir, not of --weights.")
    names = args.class_names.split(",") if args.class_names else None
    try:
        return Predictor.from_weights(
            args.weights, model=args.model, class_names=names, batch_size=args.batch_size
        )
    except (weights.WeightFormatError, weights.WeightMismatchError):
        raise  # the file's problem: an error line, exit 1
    except ValueError as e:  # the flags' (a class count, a model name)
        parser.error(str(e))


def _inside(path: str, folders: Sequence[str | None]) -> bool:
    """Whether ``path`` lies in one of ``folders`` (None: no folder)."""
    where = os.path.realpath(path)
    return any(f and where.startswith(os.path.realpath(f) + os.sep) for f in folders)


def _outside_outputs(
    paths: list[str], args: argparse.Namespace, task: str, parser: argparse.ArgumentParser
) -> list[str]:
    """``paths`` without the images this command writes (a rerun's label maps or drawings
    inside the input folder); an input inside such a folder is an error."""
    folders = [args.draw] + ([os.path.splitext(args.output)[0]] if task == "segmentation" else [])
    for folder in filter(None, folders):
        same = os.path.realpath(args.input) == os.path.realpath(folder)
        if same or _inside(args.input, [folder]):
            parser.error(f"--input {args.input} lies in {folder}, where this command writes its "
                         "images: choose another --output or --draw.")  # fmt: skip
    kept = [p for p in paths if not _inside(p, folders)]
    if len(kept) < len(paths):
        logger.warning("Left out %d image(s) in the output folder(s) %s.", len(paths) - len(kept),
                       ", ".join(f for f in folders if f))  # fmt: skip
    return kept


def _check_outputs(args: argparse.Namespace, task: str, parser: argparse.ArgumentParser) -> None:
    """The outputs' paths checked before predicting, not after: the records file can be written
    (:func:`~vision_jax.output_errors.file_problem`, as evaluate's ``--output``), the PNGs'
    folder (segmentation's, ``--draw``) is not a file and can be made
    (:func:`~vision_jax.output_errors.folder_problem`); they are made when written, so a
    failed prediction leaves no empty folder behind."""
    if problem := file_problem(args.output):
        parser.error(f"--output {args.output}: {problem}.")
    if task == "segmentation":
        _make_png_folder(os.path.splitext(args.output)[0], f"--output {args.output}", parser)
    if args.draw:
        _make_png_folder(args.draw, "--draw", parser)


def _make_png_folder(folder: str, flag: str, parser: argparse.ArgumentParser) -> None:
    if os.path.lexists(folder) and not os.path.isdir(folder):
        parser.error(f"{flag}: {folder}, the folder for its PNGs, is a file.")
    if problem := folder_problem(folder):  # made by claim_pngs, once there is a prediction
        parser.error(f"{flag}: the folder {folder} for its PNGs: {problem}.")


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    for flag in ("top_k", "batch_size"):
        if (value := getattr(args, flag)) is not None and value < 1:
            parser.error(f"--{flag} must be at least 1, got {value}.")
    if os.path.splitext(args.output)[1].lower() not in FORMATS:
        parser.error(f"--output {args.output}: the extension must be one of {', '.join(FORMATS)}.")
    for flag, path in (("--output", args.output), ("--draw", args.draw)):
        if path and (problem := local_only(path, f"predict's {flag}")):  # (not gs:/... here)
            parser.error(f"{flag} {path}: {problem}.")
    logging.basicConfig(level=logging.WARNING)
    try:
        paths = image_files(args.input)
    except FileNotFoundError as e:
        parser.error(str(e))
    task, drawing = None, False
    try:
        predictor = _predictor(args, parser)
        task = library_kind(predictor.task)  # a subclass of a library task is predicted as it
        for flag, kind in (("draw", "detection"), ("coco_annotations", "detection"),
                           ("top_k", "classification")):  # fmt: skip
            if getattr(args, flag) and task != kind:
                run = predictor.task.name
                parser.error(f"--{flag} is for {kind}: {args.workdir} is a {run} run.")
        paths = _outside_outputs(paths, args, task, parser)
        _check_outputs(args, task, parser)  # before the predictions, not after them
        ids = None  # before the predictions: a file the annotations miss is an error
        if args.coco_annotations:
            categories = dict(zip(predictor.category_ids, predictor.class_names, strict=True))
            ids = image_ids_by_file(args.coco_annotations, paths, categories)
        unreadable: list[tuple[str, str]] = []
        batches = predictor.iter_predict(
            paths, top_k=args.top_k or TOP_K, progress=True, unreadable=unreadable
        )
        count, detections, drawn = _write_batches(
            batches, args, task, ids, paths, unreadable, predictor.value_names
        )
        for path, reason in unreadable:
            print(f"skipped {path}: {reason}", file=sys.stderr)
        drawing = True
        _draw_all(detections, drawn, unreadable, args.draw_threshold)
    except (data_lib.DataError, weights.WeightFormatError, weights.WeightMismatchError,
            OutputError) as e:  # fmt: skip
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # a failed write (a full disk) midway: one line, not a traceback
        if (line := _failed_output(e, args, task, drawing)) is None:
            raise  # not a write of the outputs
        after = "\n" if sys.stderr.isatty() else ""  # after the progress line
        print(f"{after}error: {line}", file=sys.stderr)
        return 1
    print(json.dumps({"images": len(paths) - len(unreadable), "skipped": len(unreadable),
                      "records": count, "output": args.output}))  # fmt: skip
    return 0


def _failed_output(
    error: OSError, args: argparse.Namespace, task: str | None, drawing: bool
) -> str | None:
    """The line for ``error`` when it is a failed write of one of the outputs (the records,
    segmentation's label maps, ``--draw``'s drawings, ``drawing`` once the records are whole)
    or of the disk, saying why where known (a full disk: the reason and what to do that a failed
    checkpoint save gives, :func:`~vision_jax.output_errors.why_and_what_to_do`) and what is left
    incomplete; None for other errors."""
    places = [args.output] + [p for p in (args.draw,) if p]
    places += [os.path.splitext(args.output)[0]] if task == "segmentation" else []
    if all(failed_write(error, "predictions", place) is None for place in places):
        return None
    if drawing:
        left = f"the drawings in {args.draw} are incomplete ({args.output} is whole)"
    elif os.path.splitext(args.output)[1].lower() == ".json":
        left = (f"the predictions are incomplete: {args.output}, a JSON list, is written only "
                "once whole (an earlier one stays)")  # fmt: skip
    else:
        left = (f"the predictions are incomplete: {args.output} holds only the records of the "
                "batches written before")  # fmt: skip
    path = error.filename or args.output
    why, advice = why_and_what_to_do(error, path)
    return f"cannot write {path}{why}: {error.strerror or error}; {left}.{advice}"


def _write_batches(
    batches: Iterator[list[dict]], args: argparse.Namespace, task: str,
    ids: Mapping[str, int] | None, paths: list[str], unreadable: list[tuple[str, str]],
    names: Sequence[str] | None = None,
) -> tuple[int, list[dict], dict[str, str]]:  # fmt: skip
    """Writes each batch's records (and segmentation's label maps, which then go) as soon as it
    is predicted (a CSV's columns of the values ``names``: :class:`RecordWriter`); the count of
    records, the detections that ``--draw`` draws, and the drawing of each file. The PNGs'
    folders are claimed (:func:`claim_pngs`) at the first batch, when the readable files are
    known, before anything is written."""
    folder, pngs, drawn, kept = os.path.splitext(args.output)[0], {}, {}, []
    with RecordWriter(args.output, names) as writer:
        for i, records in enumerate(batches):
            if i == 0:
                pngs, drawn = _claimed(args, task, _readable(paths, unreadable))
            for record in records if ids is not None else ():
                record["image_id"] = ids[record["file_name"]]
            if task == "segmentation":
                save_label_maps(records, folder, pngs)
            writer.write(records)
            kept += records if args.draw else ()
    return writer.count, kept, drawn


def _claimed(
    args: argparse.Namespace, task: str, readable: list[str]
) -> tuple[dict[str, str], dict[str, str]]:
    """The label map and the drawing of each of the ``readable`` files (none where the task
    or the flags write none), their folders claimed."""
    pngs, drawn = {}, {}
    if task == "segmentation":  # its unreadable files are known by its first batch
        pngs = _png_names(readable, os.path.splitext(args.output)[0])
        claim_pngs(os.path.splitext(args.output)[0], pngs.values(), f"--output {args.output}")
    if args.draw:  # detection's files that fail when decoded are not drawn
        drawn = _png_names(readable, args.draw)
        claim_pngs(args.draw, drawn.values(), "--draw")
    return pngs, drawn


def _png_names(paths: list[str], folder: str) -> dict[str, str]:
    """Each of ``paths`` with its PNG in ``folder`` (:func:`unique_pngs`)."""
    return dict(zip(paths, unique_pngs(paths, folder), strict=True))


def _readable(paths: list[str], unreadable: list[tuple[str, str]]) -> list[str]:
    skipped = {path for path, _ in unreadable}
    return [p for p in paths if p not in skipped]


def _draw_all(
    detections: list[dict], drawn: Mapping[str, str], skipped: list[tuple[str, str]],
    threshold: float,
) -> None:  # fmt: skip
    """Each file of ``drawn`` but the ``skipped`` with its ``detections`` drawn, into its
    drawing there."""
    by_file: dict[str, list[dict]] = {}
    for d in detections:
        by_file.setdefault(d["file_name"], []).append(d)
    left_out = {path for path, _ in skipped}
    named = labels_drawable({d["category_name"] for d in detections})  # one choice for all
    for path, out in drawn.items():
        if path not in left_out:
            draw_detections(path, by_file.get(path, []), out, threshold, named)


def _command() -> int:
    """:func:`main` as a command: Ctrl-C or SIGTERM ends it with one line and status 128 + the
    signal (130, as training's command exits at a second Ctrl-C), not a traceback
    (:func:`vision_jax.signals.command`); a Python caller of :func:`main` gets the
    KeyboardInterrupt."""
    return command(
        main, "vision_jax.predict",
        "the output holds the batches written (a .json list only once whole).",
    )  # fmt: skip


if __name__ == "__main__":
    sys.exit(_command())
