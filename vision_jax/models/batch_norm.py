"""Batch normalisation with a hand-written backward pass.

Same variables, forward results and running statistics as ``flax.linen.BatchNorm`` (statistics
in float32, ``var = E[x^2] - E[x]^2``). The difference is the train-mode gradient: JAX's own
gradient of that formula reduces the cotangent three times and keeps the intermediate products,
where the closed form needs two sums, ``sum(g)`` and ``sum(g * x)``, and one elementwise pass::

    dx = scale / sigma * (g - (sum(g) + x_hat * sum(g * x_hat)) / n)

(its effect on a ResNet train step: benchmarks/RESULTS.md).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_derivatives import SymbolicZero


def _reduced_axes(x: jax.Array) -> tuple[int, ...]:
    return tuple(range(x.ndim - 1))


def _normalize(x, scale, bias, epsilon):
    axes, x32 = _reduced_axes(x), x.astype(jnp.float32)
    mean, mean_sq = jnp.mean(x32, axes), jnp.mean(x32 * x32, axes)
    var = jnp.maximum(0.0, mean_sq - mean * mean)
    inv_sigma = lax.rsqrt(var + epsilon)
    return ((x32 - mean) * (scale * inv_sigma) + bias, mean, var), inv_sigma


@partial(jax.custom_vjp, nondiff_argnums=(3,))
def batch_normalize(
    x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(y, mean, var)``: ``x`` normalised over all but its last (channel) axis with the batch's
    statistics (float32), then scaled and shifted (``y`` in the dtype of ``scale * x32``)."""
    return _normalize(x, scale, bias, epsilon)[0]


def _forward(x, scale, bias, epsilon):
    x, scale, bias = x.value, scale.value, bias.value  # symbolic_zeros: CustomVJPPrimal
    (y, mean, var), inv_sigma = _normalize(x, scale, bias, epsilon)
    return (y, mean, var), (x, scale, bias, mean, inv_sigma)


def _backward(epsilon, residuals, cotangents):
    x, scale, bias, mean, inv_sigma = residuals
    g, g_mean, g_var = cotangents
    axes, x32 = _reduced_axes(x), x.astype(jnp.float32)
    centred = x32 - mean
    n = x.size // x.shape[-1]
    if isinstance(g, SymbolicZero):
        g = jnp.zeros(x.shape, jnp.float32)
    sum_g = jnp.sum(g, axes)
    # sum(g * x_hat), from sum(g * x): a fused pass with sum(g), and like the variance's
    # E[x^2] - E[x]^2 it loses precision only where |mean| >> std.
    g_scale = inv_sigma * (jnp.sum(g * x32, axes) - mean * sum_g)
    dx = (scale * inv_sigma) * (g - (sum_g + centred * inv_sigma * g_scale) / n)
    # The statistics' own cotangents: symbolic zeros where they only feed running averages.
    if not isinstance(g_mean, SymbolicZero):
        dx = dx + g_mean / n
    if not isinstance(g_var, SymbolicZero):
        dx = dx + 2.0 * g_var * centred / n
    return dx.astype(x.dtype), g_scale.astype(scale.dtype), sum_g.astype(bias.dtype)


batch_normalize.defvjp(_forward, _backward, symbolic_zeros=True)


class BatchNorm(nn.Module):
    """``flax.linen.BatchNorm`` over the last axis (``scale``/``bias`` params, ``batch_stats``
    ``mean``/``var``), with ``batch_normalize``'s backward pass in training. Statistics are
    over the whole (jit-sharded) batch; no ``axis_name`` (pmap) or ``mask``."""

    use_running_average: bool
    momentum: float = 0.9
    epsilon: float = 1e-5
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        channels = (x.shape[-1],)
        ra_mean = self.variable("batch_stats", "mean", jnp.zeros, channels, jnp.float32)
        ra_var = self.variable("batch_stats", "var", jnp.ones, channels, jnp.float32)
        scale = self.param("scale", nn.initializers.ones, channels, jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, channels, jnp.float32)
        if self.use_running_average:
            inv_sigma = lax.rsqrt(ra_var.value + self.epsilon)
            y = (x - ra_mean.value) * (inv_sigma * scale) + bias
        else:
            y, mean, var = batch_normalize(x, scale, bias, self.epsilon)
            if not self.is_initializing():
                m = self.momentum
                ra_mean.value = m * ra_mean.value + (1 - m) * lax.stop_gradient(mean)
                ra_var.value = m * ra_var.value + (1 - m) * lax.stop_gradient(var)
        return jnp.asarray(y, self.dtype)
