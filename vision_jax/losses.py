"""Classification losses on target distributions (per example; callers average)."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import optax


def targets_of(
    batch: Mapping[str, jax.Array], num_classes: int, label_smoothing: float
) -> jax.Array:
    """The batch's target distribution: ``soft_label`` (mixup/cutmix) if present, else the
    one-hot ``label``; then smoothed towards uniform (after mixing, as timm does)."""
    if "soft_label" in batch:
        targets = batch["soft_label"].astype(jnp.float32)
    else:
        targets = jax.nn.one_hot(batch["label"], num_classes)
    return optax.smooth_labels(targets, label_smoothing)


def softmax_xent(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Softmax cross-entropy against a target distribution."""
    return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)


def sigmoid_xent(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Per-class sigmoid cross-entropy summed over classes (big_vision's ``sigmoid_xent``)."""
    return optax.sigmoid_binary_cross_entropy(logits.astype(jnp.float32), targets).sum(-1)


LOSSES = {"softmax_xent": softmax_xent, "sigmoid_xent": sigmoid_xent}


def get_loss(name: str) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """The loss function called ``name``."""
    if name not in LOSSES:
        raise ValueError(f"Unknown loss {name!r}; valid: {', '.join(LOSSES)}.")
    return LOSSES[name]
