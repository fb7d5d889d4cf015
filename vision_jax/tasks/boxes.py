"""Box arithmetic in JAX for detection: areas, IoU, generalised IoU, and non-maximum suppression
with a fixed number of boxes (jittable, vmappable).

Boxes are ``(x0, y0, x1, y1)`` in pixels, float32, in the last axis.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np

_top_k_by_sort = contextvars.ContextVar("top_k_by_sort", default=False)


@contextlib.contextmanager
def top_k_by_sort() -> Iterator[None]:
    """Inside, :func:`top_k` sorts: for export (``lax.top_k`` is serialised as a StableHLO
    composite that TensorFlow 2.21's loader does not know; a sort is plain StableHLO)."""
    token = _top_k_by_sort.set(True)
    try:
        yield
    finally:
        _top_k_by_sort.reset(token)


def top_k(x: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """``lax.top_k`` of a 1-D ``x``: its ``k`` largest values and their indices, ties in index
    order; inside :func:`top_k_by_sort`, from a stable sort (the same values and indices for
    inputs without NaN or -0.0, such as detection scores)."""
    if not _top_k_by_sort.get():
        return jax.lax.top_k(x, k)
    negated, order = jax.lax.sort((-x, jnp.arange(x.shape[0])), num_keys=1, is_stable=True)
    return -negated[:k], order[:k]


def _numpy_or_jax(*arrays):
    """numpy for host (numpy) arrays, as the report's boxes: no transfer to the device and no
    compilation for each new shape; else jax.numpy (traced, device arrays)."""
    return np if all(isinstance(a, np.ndarray) for a in arrays) else jnp


def box_area(boxes: jax.Array) -> jax.Array:
    """Areas of ``boxes`` [..., 4] (0 for empty or inverted boxes); a numpy array's in numpy."""
    wh = _numpy_or_jax(boxes).maximum(boxes[..., 2:] - boxes[..., :2], 0.0)
    return wh[..., 0] * wh[..., 1]


def pairwise_intersection(a: jax.Array, b: jax.Array) -> jax.Array:
    """Intersection area of every box of ``a`` [N, 4] with every box of ``b`` [M, 4]: [N, M];
    of numpy arrays (the report's), in numpy."""
    xp = _numpy_or_jax(a, b)
    top_left = xp.maximum(a[:, None, :2], b[None, :, :2])
    bottom_right = xp.minimum(a[:, None, 2:], b[None, :, 2:])
    return box_area(xp.concatenate([top_left, bottom_right], -1))


def pairwise_iou(a: jax.Array, b: jax.Array) -> jax.Array:
    """IoU of every box of ``a`` [N, 4] with every box of ``b`` [M, 4]: [N, M] (0 where the
    union is empty); of numpy arrays (the report's), in numpy."""
    xp = _numpy_or_jax(a, b)
    inter = pairwise_intersection(a, b)
    union = box_area(a)[:, None] + box_area(b)[None, :] - inter
    return xp.where(union > 0, inter / xp.where(union > 0, union, 1.0), 0.0)


def generalized_iou(a: jax.Array, b: jax.Array, eps: float = 1e-7) -> jax.Array:
    """Elementwise generalised IoU (Rezatofighi et al. 2019) of ``a`` and ``b`` [..., 4]:
    ``IoU - (hull - union) / hull``, in [-1, 1]."""
    inter = box_area(jnp.concatenate([jnp.maximum(a[..., :2], b[..., :2]),
                                      jnp.minimum(a[..., 2:], b[..., 2:])], -1))  # fmt: skip
    union = box_area(a) + box_area(b) - inter
    hull = box_area(jnp.concatenate([jnp.minimum(a[..., :2], b[..., :2]),
                                     jnp.maximum(a[..., 2:], b[..., 2:])], -1))  # fmt: skip
    iou = inter / (union + eps)
    return iou - (hull - union) / (hull + eps)


def nms_keep(boxes: jax.Array, valid: jax.Array, iou_threshold: float) -> jax.Array:
    """Greedy non-maximum suppression of ``boxes`` [K, 4] sorted by decreasing score: which
    are kept ([K] bool). A box is kept iff it is ``valid`` and no kept box before it overlaps it
    with IoU above ``iou_threshold``.

    Computed as the fixed point of ``keep[i] = valid[i] and not any(keep[j] and overlap[j, i]
    for j < i)`` from ``keep = valid``: after pass ``t`` the first ``t`` entries are final, so it
    converges to the greedy result, usually in a few passes of parallel work.
    """
    k = boxes.shape[0]
    earlier = jnp.arange(k)[:, None] < jnp.arange(k)[None, :]
    suppresses = (pairwise_iou(boxes, boxes) > iou_threshold) & earlier

    def one_pass(keep: jax.Array) -> jax.Array:
        return valid & ~jnp.any(suppresses & keep[:, None], axis=0)

    def not_done(carry: tuple[jax.Array, jax.Array]) -> jax.Array:
        keep, previous = carry
        return jnp.any(keep != previous)

    def body(carry: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        keep, _ = carry
        return one_pass(keep), keep

    keep, _ = jax.lax.while_loop(not_done, body, (one_pass(valid), valid))
    return keep


def nms_first(
    boxes: jax.Array, valid: jax.Array, iou_threshold: float, max_keep: int, block: int = 256
) -> jax.Array:
    """The first ``max_keep`` boxes that greedy NMS (:func:`nms_keep`) keeps of ``boxes``
    [K, 4] sorted by decreasing score, as a [K] bool mask; the greedy NMS's later kept boxes
    are left out. ``valid`` must be a prefix (all True, then all False: the candidates above a
    score threshold, in score order).

    Works through ``block`` candidates at a time: those of a block that a box kept before it
    suppresses are dropped, then :func:`nms_keep` within the block. It stops at the first block
    with no valid candidate or once ``max_keep`` are kept, so its work is about the candidates
    it needs, not the ``K x K`` IoU matrix of :func:`nms_keep` (4000 candidates: 16M pairs).
    """
    k = boxes.shape[0]
    if k == 0:  # no candidate (no while loop: it would read the first of zero blocks)
        return jnp.zeros(0, bool)
    block = max(1, min(block, k))
    blocks = -(-k // block)
    pad = blocks * block - k
    boxes = jnp.pad(boxes, ((0, pad), (0, 0)))
    valid = jnp.pad(valid, (0, pad))
    max_keep = min(max_keep, k)

    def not_done(state: tuple) -> jax.Array:
        i, _, _, _, count = state
        return (i < blocks) & (count < max_keep) & valid[jnp.minimum(i, blocks - 1) * block]

    def body(state: tuple) -> tuple:
        i, keep, kept, filled, count = state
        start = i * block
        chunk = jax.lax.dynamic_slice_in_dim(boxes, start, block)
        candidate = jax.lax.dynamic_slice_in_dim(valid, start, block)
        overlap = (pairwise_iou(chunk, kept) > iou_threshold) & filled[None, :]
        chunk_keep = nms_keep(chunk, candidate & ~overlap.any(1), iou_threshold)
        slot = count + jnp.cumsum(chunk_keep) - 1
        chunk_keep = chunk_keep & (slot < max_keep)
        slot = jnp.where(chunk_keep, slot, max_keep)  # out of range: dropped
        kept = kept.at[slot].set(chunk, mode="drop")
        filled = filled.at[slot].set(True, mode="drop")
        keep = jax.lax.dynamic_update_slice_in_dim(keep, chunk_keep, start, 0)
        return i + 1, keep, kept, filled, count + chunk_keep.sum()

    state = (
        jnp.zeros((), jnp.int32), jnp.zeros(blocks * block, bool),
        jnp.zeros((max_keep, 4), boxes.dtype), jnp.zeros(max_keep, bool), jnp.zeros((), jnp.int32),
    )  # fmt: skip
    _, keep, _, _, _ = jax.lax.while_loop(not_done, body, state)
    return keep[:k]
