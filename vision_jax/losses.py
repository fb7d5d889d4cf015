"""Classification losses on integer labels (per example; callers average)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def softmax_xent(
    logits: jax.Array, labels: jax.Array, *, label_smoothing: float = 0.0
) -> jax.Array:
    """Softmax cross-entropy against one-hot labels smoothed towards uniform."""
    targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
    return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)


def sigmoid_xent(
    logits: jax.Array, labels: jax.Array, *, label_smoothing: float = 0.0
) -> jax.Array:
    """Per-class sigmoid cross-entropy summed over classes (big_vision's ``sigmoid_xent``)."""
    targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
    return optax.sigmoid_binary_cross_entropy(logits.astype(jnp.float32), targets).sum(-1)


LOSSES = {"softmax_xent": softmax_xent, "sigmoid_xent": sigmoid_xent}


def get_loss(name: str):
    """The loss function called ``name``."""
    if name not in LOSSES:
        raise ValueError(f"Unknown loss {name!r}; valid: {', '.join(LOSSES)}.")
    return LOSSES[name]
