"""Matrix products for low-precision compute: bfloat16 operands, float32 accumulation.

``lax.dot_general`` on two bfloat16 operands accumulates and returns bfloat16. Asking XLA for a
float32 result (``preferred_element_type``) accumulates in float32: more accurate, and on CPUs
with AVX512-BF16 the fast path (about 330 GFLOP/s on this 2-core Zen4 against about 160 for
bfloat16 accumulation). The layer adds its bias to that float32 result and the model casts the
output back to bfloat16, so activations still travel in bfloat16. For float32 both are the plain
``lax`` functions.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

# Compute (and optimizer-moment) dtypes by config name.
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def dot_general(dtype: Any) -> Callable[..., jax.Array]:
    """A ``lax.dot_general`` for Flax's ``dot_general=`` field in compute dtype ``dtype``.

    For a low-precision ``dtype`` the product is returned in float32, so the layer adds its bias
    in float32 and the caller casts the layer's output to ``dtype``. That keeps the bias
    gradient a float32 reduction: XLA's CPU backend rewrites a bfloat16 reduction into a
    reduce-window tree about 7x slower (``benchmarks/profile_step.py`` shows it).
    """
    if jnp.dtype(dtype) == jnp.float32:
        return lax.dot_general

    def accumulate_in_f32(lhs, rhs, dimension_numbers, precision=None, **kwargs):
        kwargs.pop("preferred_element_type", None)
        return lax.dot_general(
            lhs, rhs, dimension_numbers, precision, preferred_element_type=jnp.float32, **kwargs
        )

    return accumulate_in_f32


def pointwise_as_dot(lhs: jax.Array, rhs: jax.Array, window_strides: Sequence[int],
                     padding: str | Sequence[tuple[int, int]], lhs_dilation: Any = None,
                     rhs_dilation: Any = None, dimension_numbers: Any = None,
                     feature_group_count: int = 1, batch_group_count: int = 1,
                     precision: Any = None, preferred_element_type: Any = None
                     ) -> jax.Array:  # fmt: skip
    """``lax.conv_general_dilated``, computing 1x1 NHWC convolutions as a strided slice and a
    ``dot_general`` over channels.

    The result is the same; the gain is in the backward pass. XLA's CPU backend computes a
    convolution's kernel gradient as a convolution over transposed activations and fuses the
    producers of those activations (BatchNorm, residual adds, ReLU) into the transpose, which
    then dominates a ResNet step; a dot's kernel gradient is a plain transposed matmul.
    """
    nhwc = lax.conv_dimension_numbers(lhs.shape, rhs.shape, ("NHWC", "HWIO", "NHWC"))
    no_padding = isinstance(padding, str) or all(tuple(p) == (0, 0) for p in padding)
    pointwise = (
        rhs.shape[:2] == (1, 1)
        and no_padding  # "SAME" pads nothing for a 1x1 kernel
        and dimension_numbers in (nhwc, ("NHWC", "HWIO", "NHWC"))
        and feature_group_count == 1
        and batch_group_count == 1
        and all(d == 1 for d in (*(lhs_dilation or ()), *(rhs_dilation or ())))
    )
    if not pointwise:
        return lax.conv_general_dilated(
            lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
            feature_group_count, batch_group_count, precision, preferred_element_type,
        )  # fmt: skip
    sh, sw = window_strides
    x = lhs[:, ::sh, ::sw, :] if (sh, sw) != (1, 1) else lhs
    return lax.dot_general(
        x, rhs[0, 0], (((3,), (0,)), ((), ())), precision,
        preferred_element_type=preferred_element_type,
    )  # fmt: skip


def conv_general_dilated(dtype: Any) -> Callable[..., jax.Array]:
    """``lax.conv_general_dilated`` for Flax's ``conv_general_dilated=`` field, returning float32
    for a low-precision ``dtype`` (as ``dot_general``)."""
    if jnp.dtype(dtype) == jnp.float32:
        return lax.conv_general_dilated
    return functools.partial(lax.conv_general_dilated, preferred_element_type=jnp.float32)
