"""A run's images as its exported models take them: uint8 at the input size, resized and
cropped as its evaluation does, not normalised (the models normalise inside)."""

from __future__ import annotations

import dataclasses

from vision_jax.tf_without_keras import tf

import numpy as np

from vision_jax import data as data_lib
from vision_jax import specs
from vision_jax.export.serving import ExportError
from vision_jax.tasks import library_kind
from vision_jax.trained import Trained, load_split


def _subset(source: data_lib.Source, count: int, seed: int) -> data_lib.Source:
    """``count`` examples of ``source`` drawn at random (kept in their order); a source held as
    columns keeps those rows of them, so that the pipeline names an unreadable file it skips."""
    rows = np.sort(np.random.default_rng(seed).choice(source.num_examples, count, replace=False))
    keep = tf.constant(rows, tf.int64)
    dataset = source.dataset.enumerate().filter(lambda i, _: tf.reduce_any(i == keep))
    columns = None if source.columns is None else {k: v[rows] for k, v in source.columns.items()}
    return dataclasses.replace(
        source, examples=dataset.map(lambda _, ex: ex), num_examples=count, columns=columns
    )


def split_images(
    trained: Trained, split: str, *, count: int | None = None, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images [N, S, S, 3] and their targets (labels [N], or label maps [N, S, S]) of the
    run's split ``split``: all of it, or ``count`` examples drawn at random."""
    task = trained.task
    if library_kind(task) == "detection":
        raise ExportError("Evaluating exported models takes labels or label maps, not boxes.")
    source = load_split(trained, split)
    if count is not None and count < source.num_examples:
        source = _subset(source, count, seed)
    # Normalising with mean 0 and std 1/255 leaves the pixels as they are (a saved run's spec:
    # values a later version refuses stay, as load_trained kept them, and warned of).
    with specs.saved_config(warn=False):
        spec = dataclasses.replace(trained.input, mean=(0.0,) * 3, std=(1 / 255,) * 3)
    images, targets = [], []
    for batch in data_lib.eval_batches(source, spec, global_batch=128):
        real = batch["mask"] > 0
        images.append(np.clip(np.round(batch["image"][real]), 0, 255).astype(np.uint8))
        targets.append(batch[task.target][real])
    return np.concatenate(images), np.concatenate(targets)
