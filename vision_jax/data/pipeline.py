"""Batching a :class:`Source` into host-local numpy batches for training and evaluation.

Each process reads its own ``process_index`` shard. The training stream is an infinite,
shuffled repetition whose order is a function of the seed alone, so ``start_step`` resumes it
exactly. Evaluation batches are padded (with ``mask == 0``) so every example counts once and all
processes run the same number of batches.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import jax
import numpy as np
import tensorflow as tf

from vision_jax.data.preprocess import InputSpec, make_preprocess
from vision_jax.data.sources import DataError, Source

Batch = dict[str, np.ndarray]


def _local_batch(global_batch: int) -> int:
    if global_batch % jax.process_count():
        raise DataError(
            f"batch_size {global_batch} is not divisible by the {jax.process_count()} processes."
        )
    return global_batch // jax.process_count()


def train_batches(
    source: Source,
    spec: InputSpec,
    *,
    global_batch: int,
    seed: int,
    start_step: int = 0,
    shuffle_buffer: int = 10_000,
) -> Iterator[Batch]:
    """Infinite host-local training batches, starting at ``start_step`` of the seeded stream."""
    local = _local_batch(global_batch)
    if source.num_examples < global_batch:
        raise DataError(
            f"The training split has {source.num_examples} examples, fewer than one global "
            f"batch of {global_batch}."
        )
    ds = source.dataset.shard(jax.process_count(), jax.process_index())
    ds = ds.repeat().shuffle(min(shuffle_buffer, source.num_examples), seed=seed)
    ds = ds.enumerate().skip(start_step * local)
    ds = ds.map(
        make_preprocess(spec, train=True, seed=seed + jax.process_index() * 1_000_003),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
    )
    ds = ds.batch(local, drop_remainder=True).prefetch(2)
    return ds.as_numpy_iterator()


def eval_batches(source: Source, spec: InputSpec, *, global_batch: int) -> Iterator[Batch]:
    """Host-local evaluation batches covering the split exactly once, padded and masked."""
    local = _local_batch(global_batch)
    per_process = math.ceil(source.num_examples / jax.process_count())
    num_batches = math.ceil(per_process / local)
    ds = source.dataset.shard(jax.process_count(), jax.process_index())
    preprocess = make_preprocess(spec, train=False, seed=0)
    ds = ds.enumerate().map(
        lambda i, ex: {**preprocess(i, ex), "mask": tf.constant(1.0)},
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
    )
    ds = ds.batch(local).prefetch(2)
    count = 0
    for batch in ds.as_numpy_iterator():
        count += 1
        yield _pad(batch, local)
    if count > num_batches:
        raise DataError(f"Evaluation produced {count} batches, more than {num_batches} expected.")
    for _ in range(num_batches - count):
        yield _empty_batch(local, spec.image_size)


def _pad(batch: Batch, size: int) -> Batch:
    n = len(batch["label"])
    if n == size:
        return batch
    return {
        k: np.concatenate([v, np.zeros((size - n, *v.shape[1:]), v.dtype)])
        for k, v in batch.items()
    }


def _empty_batch(size: int, s: int) -> Batch:
    """An all-padding batch, for a process whose shard ran out before the others."""
    return {
        "image": np.zeros((size, s, s, 3), np.float32),
        "label": np.zeros((size,), np.int32),
        "mask": np.zeros((size,), np.float32),
    }
