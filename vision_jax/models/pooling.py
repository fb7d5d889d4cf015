"""Max pooling as a running maximum over strided slices, with a gradient from the index of each
window's first maximum.

The result equals ``flax.linen.max_pool``'s and so does the gradient (to float32 rounding where
windows overlap and their shares add in another order; ties included: the gradient goes to the
first maximum of a window, in row-major window order, as in Flax and torch). Neither pass
uses ``lax.reduce_window``, whose gradient is a ``select_and_scatter`` that XLA's CPU backend
lowers to a scatter with iota index arrays:

- forward: the maximum over the window's ``kh * kw`` strided slices, keeping the index of the
  first maximum (int8) for the backward pass;
- backward: for each window position, the cotangent where that position holds the maximum,
  padded back to the input's strided layout, summed. It reads the cotangent and the index only,
  where the gradient of a ``jnp.maximum`` chain recomputes the chain (and the stem's BatchNorm
  and ReLU before it) for every input pixel: in a ResNet-50 train step that one fusion took 6%
  of the step (benchmarks/RESULTS.md).

NaN propagates as in ``jnp.maximum``. bfloat16 and float16 inputs are pooled in float32 and the
result cast back (exact: the maximum commutes with the conversion); XLA's CPU backend runs
bfloat16 selects many times slower than float32 ones.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

Padding = tuple[tuple[int, int], tuple[int, int]]


def max_pool(
    x: jax.Array,
    window: Sequence[int],
    strides: Sequence[int],
    padding: Sequence[tuple[int, int]] = ((0, 0), (0, 0)),
) -> jax.Array:
    """Max pooling of NHWC ``x`` over ``window`` (kh, kw) with ``strides`` and ``-inf`` padding
    ``((top, bottom), (left, right))``, as ``nn.max_pool`` with explicit padding."""
    if x.ndim != 4:
        raise ValueError(f"max_pool expects NHWC inputs, got shape {x.shape}.")
    (kh, kw), (sh, sw) = window, strides  # exactly two of each
    window, strides = (int(kh), int(kw)), (int(sh), int(sw))
    (top, bottom), (left, right) = padding
    pads: Padding = ((int(top), int(bottom)), (int(left), int(right)))
    for size, k, s, (low, high) in zip(x.shape[1:3], window, strides, pads, strict=True):
        if (size + low + high - k) // s + 1 < 1:
            raise ValueError(f"max_pool window {window} is larger than the padded input.")
    if jnp.issubdtype(x.dtype, jnp.floating) and jnp.finfo(x.dtype).bits < 32:
        return _pool(x.astype(jnp.float32), window, strides, pads).astype(x.dtype)
    return _pool(x, window, strides, pads)


def _taps(x: jax.Array, window: tuple[int, int], strides: tuple[int, int], padding: Padding):
    """The window's strided slices of the padded ``x``, in row-major window order."""
    (kh, kw), (sh, sw) = window, strides
    if any(p for pair in padding for p in pair):
        x = jnp.pad(x, ((0, 0), *padding, (0, 0)), constant_values=-jnp.inf)
    out_h, out_w = (x.shape[1] - kh) // sh + 1, (x.shape[2] - kw) // sw + 1
    return [
        x[:, i : i + sh * (out_h - 1) + 1 : sh, j : j + sw * (out_w - 1) + 1 : sw]
        for i in range(kh)
        for j in range(kw)
    ]


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _pool(x: jax.Array, window: tuple[int, int], strides: tuple[int, int], padding: Padding):
    """The maximum alone (what inference and export trace)."""
    return functools.reduce(jnp.maximum, _taps(x, window, strides, padding))


def _pool_fwd(x, window, strides, padding):
    """The maximum (equal to ``_pool``'s) and the index of each window's first maximum."""
    taps = _taps(x, window, strides, padding)
    index_dtype = jnp.int8 if len(taps) <= 127 else jnp.int32
    out, first = taps[0], jnp.zeros(taps[0].shape, index_dtype)
    for k, tap in enumerate(taps[1:], 1):
        later_max = (tap > out) | jnp.isnan(tap)  # ties keep the first; NaN wins, as in max
        out = jnp.where(later_max, tap, out)
        first = jnp.where(later_max, jnp.asarray(k, index_dtype), first)
    return out, (first, x.shape[1:3])


def _pool_bwd(window, strides, padding, residuals, g):
    first, (height, width) = residuals
    (kh, kw), (sh, sw) = window, strides
    (top, bottom), (left, right) = padding
    padded_h, padded_w = height + top + bottom, width + left + right
    span_h, span_w = sh * (g.shape[1] - 1) + 1, sw * (g.shape[2] - 1) + 1
    zero = jnp.zeros((), g.dtype)
    total = None
    for k in range(kh * kw):
        i, j = divmod(k, kw)
        placed = lax.pad(
            jnp.where(first == k, g, zero),
            zero,
            ((0, 0, 0), (i, padded_h - i - span_h, sh - 1), (j, padded_w - j - span_w, sw - 1),
             (0, 0, 0)),
        )  # fmt: skip
        total = placed if total is None else total + placed
    return (total[:, top : top + height, left : left + width],)


_pool.defvjp(_pool_fwd, _pool_bwd)
