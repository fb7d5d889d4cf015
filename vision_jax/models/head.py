"""The classification head every model shares."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vision_jax import sharding
from vision_jax.models import precision


def classify(features: jax.Array, num_classes: int, dtype: Any) -> jax.Array:
    """Logits from pooled features through a zero-initialised Dense named ``head`` (the
    vision_transformer / big_vision convention); the features themselves if ``num_classes`` is
    0 (a headless feature extractor). Call inside a compact ``__call__``."""
    if not num_classes:
        return features
    features = sharding.split_by_batch(features)
    logits = nn.Dense(
        num_classes,
        kernel_init=nn.initializers.zeros,
        dtype=dtype,
        param_dtype=jnp.float32,
        dot_general=precision.dot_general(dtype),
        name="head",
    )(features)
    return logits.astype(dtype)
