"""Activation checkpointing (``model.remat``): the same loss, gradients and batch statistics
as without it, with less memory kept for the backward pass (XLA's own memory analysis)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vision_jax import create_model
from vision_jax.compile_options import step_compiler_options
from vision_jax.models.remat import REMAT_POLICIES

SMALL = {
    "vit_ti16": {"depth": 3},
    "resnet18": {"stage_sizes": (1, 1, 1, 1)},
    "bit_r50x1": {"stage_sizes": (1, 1, 1, 1)},
    "cifar_resnet20": {"stage_sizes": (2, 1, 1)},
}


def loss_and_grads(name: str, remat: str, images: jax.Array):
    """Loss, parameter gradients and updated batch statistics of one training forward."""
    model = create_model(name, num_classes=7, remat=remat, **SMALL[name])
    variables = model.init(jax.random.key(0), images[:1])
    params = jax.tree.map(lambda p: p + 0.01, variables["params"])  # a non-zero head

    def loss(params):
        state = {**variables, "params": params}
        if "batch_stats" in variables:
            logits, new = model.apply(state, images, train=True, mutable=["batch_stats"])
            return jnp.mean(logits**2), new["batch_stats"]
        logits = model.apply(state, images, train=True, rngs={"dropout": jax.random.key(1)})
        return jnp.mean(logits**2), {}

    return jax.jit(jax.value_and_grad(loss, has_aux=True)), params


@pytest.mark.parametrize(
    "name",
    ["cifar_resnet20", "vit_ti16"]
    + [pytest.param(n, marks=pytest.mark.slow) for n in ("bit_r50x1", "resnet18")],
)
def test_every_policy_gives_the_same_loss_gradients_and_statistics(name):
    images = jax.random.normal(jax.random.key(2), (4, 32, 32, 3))
    results = {}
    for remat in REMAT_POLICIES:
        step, params = loss_and_grads(name, remat, images)
        (loss, stats), grads = step(params)
        results[remat] = (loss, stats, grads)
    (loss, stats, grads) = results["none"]
    for remat in ("block", "dots"):
        other_loss, other_stats, other_grads = results[remat]
        np.testing.assert_allclose(other_loss, loss, rtol=1e-6)
        # Recomputed activations may fuse in another order: float32 rounding of the largest.
        close = lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4 * np.abs(b).max())
        jax.tree.map(close, (other_stats, other_grads), (stats, grads))


def test_remat_keeps_less_for_the_backward_pass():
    """With the train step's compiler options (on CPU they keep jax.checkpoint's barriers)."""
    images = jax.random.normal(jax.random.key(2), (8, 64, 64, 3))
    temp = {}
    for remat in REMAT_POLICIES:
        step, params = loss_and_grads("vit_ti16", remat, images)
        options = step_compiler_options(jnp.float32, remat=remat != "none")
        step = jax.jit(step, compiler_options=options)
        temp[remat] = step.lower(params).compile().memory_analysis().temp_size_in_bytes
    assert max(temp["block"], temp["dots"]) < 0.5 * temp["none"], temp


def test_an_unknown_policy_names_the_valid_ones():
    model = create_model("vit_ti16", num_classes=2, remat="everything", depth=1)
    with pytest.raises(ValueError, match="Unknown remat policy 'everything'; valid: none, block"):
        model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
