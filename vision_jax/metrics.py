"""Training and evaluation metrics as clu collections, computed inside the jitted steps."""

import flax
import jax
import jax.numpy as jnp
from clu import metrics


def topk_correct(logits: jax.Array, labels: jax.Array, k: int) -> jax.Array:
    """1.0 where the label is among the ``k`` highest logits (``lax.top_k`` order on ties)."""
    _, top = jax.lax.top_k(logits, min(k, logits.shape[-1]))
    return jnp.any(top == labels[:, None], axis=-1).astype(jnp.float32)


@flax.struct.dataclass
class TrainMetrics(metrics.Collection):
    loss: metrics.Average.from_output("loss")
    accuracy: metrics.Average.from_output("top1")
    grad_norm: metrics.Average.from_output("grad_norm")


@flax.struct.dataclass
class EvalMetrics(metrics.Collection):
    loss: metrics.Average.from_output("loss")
    top1: metrics.Average.from_output("top1")
    top5: metrics.Average.from_output("top5")


def scalars(collection: metrics.Collection, prefix: str) -> dict[str, float]:
    """``{prefix + name: float}`` of a computed collection, for writers and logs."""
    return {f"{prefix}{k}": float(v) for k, v in collection.compute().items()}
