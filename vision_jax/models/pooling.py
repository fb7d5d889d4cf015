"""Max pooling as a running maximum over strided slices.

The forward result equals ``flax.linen.max_pool``. The backward pass is different: the gradient
of ``lax.reduce_window`` is a ``select_and_scatter``, which XLA's CPU backend lowers to a scatter
with iota index arrays; the gradient of a chain of ``jnp.maximum`` is elementwise selects that
XLA fuses (for a ResNet stem about 4x faster: README, Benchmarks).

Ties: where several inputs of a window share the maximum, each ``jnp.maximum`` of the chain
halves the gradient between its tied operands, where torch and Flax send it all to the first.
The window's total is the same. After a ReLU the common tie is at zero, where the ReLU passes no
gradient either way.

bfloat16 and float16 inputs are pooled in float32 and the result cast back (exact: the maximum
commutes with the conversion): XLA's CPU backend runs the bfloat16 chain's gradient many times
slower than the float32 one (README, Benchmarks); tied halves add up in float32.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp


def max_pool(
    x: jax.Array,
    window: Sequence[int],
    strides: Sequence[int],
    padding: Sequence[tuple[int, int]] = ((0, 0), (0, 0)),
) -> jax.Array:
    """Max pooling of NHWC ``x`` over ``window`` (kh, kw) with ``strides`` and ``-inf`` padding
    ``((top, bottom), (left, right))``, as ``nn.max_pool`` with explicit padding."""
    if jnp.issubdtype(x.dtype, jnp.floating) and jnp.finfo(x.dtype).bits < 32:
        return _running_max(x.astype(jnp.float32), window, strides, padding).astype(x.dtype)
    return _running_max(x, window, strides, padding)


def _running_max(
    x: jax.Array,
    window: Sequence[int],
    strides: Sequence[int],
    padding: Sequence[tuple[int, int]],
) -> jax.Array:
    if x.ndim != 4:
        raise ValueError(f"max_pool expects NHWC inputs, got shape {x.shape}.")
    (kh, kw), (sh, sw) = window, strides
    (top, bottom), (left, right) = padding
    if any((top, bottom, left, right)):
        pad = ((0, 0), (top, bottom), (left, right), (0, 0))
        x = jnp.pad(x, pad, constant_values=-jnp.inf)
    out_h, out_w = (x.shape[1] - kh) // sh + 1, (x.shape[2] - kw) // sw + 1
    if out_h < 1 or out_w < 1:
        raise ValueError(f"max_pool window {tuple(window)} is larger than the padded input.")
    out = None
    for i in range(kh):
        for j in range(kw):
            tap = x[:, i : i + sh * (out_h - 1) + 1 : sh, j : j + sw * (out_w - 1) + 1 : sw]
            out = tap if out is None else jnp.maximum(out, tap)
    return out
