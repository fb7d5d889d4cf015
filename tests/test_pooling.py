"""Max pooling as a maximum over strided slices with a first-maximum gradient, against Flax's
``reduce_window`` pooling."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vision_jax.models.pooling import max_pool


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize(
    "hw, window, strides, padding",
    [
        (12, (3, 3), (2, 2), ((1, 1), (1, 1))),  # the ResNet stem
        (13, (3, 3), (2, 2), ((0, 0), (0, 0))),  # BiT's root (after its zero padding)
        (9, (2, 2), (2, 2), ((0, 0), (0, 0))),  # the simple pyramid, odd size floors
        (7, (3, 2), (1, 2), ((2, 0), (0, 1))),  # asymmetric everything
    ],
)
def test_max_pool_matches_flax_values_and_gradients(hw, window, strides, padding, ties):
    # Distinct values, or few distinct values (many windows with tied maxima).
    x = jax.random.permutation(jax.random.key(0), 2 * hw * hw * 3).reshape(2, hw, hw, 3) / 10.0
    x = (jnp.round(x / 5) if ties else x).astype(jnp.float32)
    weights = jax.random.normal(jax.random.key(1), max_pool(x, window, strides, padding).shape)

    def loss(pool):
        return lambda x: jnp.sum(pool(x) * weights)

    def flax_pool(x):
        return nn.max_pool(x, window, strides=strides, padding=padding)

    np.testing.assert_array_equal(max_pool(x, window, strides, padding), flax_pool(x))
    # Overlapping windows add their shares in another order: equal to float32 rounding.
    np.testing.assert_allclose(
        jax.grad(loss(lambda x: max_pool(x, window, strides, padding)))(x),
        jax.grad(loss(flax_pool))(x),
        rtol=1e-6,
        atol=1e-6,
    )


def test_max_pool_gradient_goes_to_the_first_maximum_without_a_scatter():
    """Tied maxima: the whole gradient goes to the window's first (as Flax and torch); the
    compiled gradient has no scatter or reduce-window."""
    x = jnp.zeros((1, 4, 4, 1))
    grad = jax.grad(lambda x: jnp.sum(max_pool(x, (2, 2), (2, 2))))
    want = np.zeros((4, 4))
    want[::2, ::2] = 1
    np.testing.assert_array_equal(np.asarray(grad(x))[0, :, :, 0], want)
    hlo = jax.jit(grad).lower(x).compile().as_text()
    assert " scatter(" not in hlo and " reduce-window(" not in hlo
    assert " select-and-scatter(" not in hlo


def test_max_pool_propagates_nan_like_flax():
    x = jnp.array([1.0, jnp.nan, 0.0, 2.0, 3.0, 1.0, 0.0, 0.0]).reshape(1, 2, 4, 1)
    got = max_pool(x, (2, 2), (2, 2))
    np.testing.assert_array_equal(got, nn.max_pool(x, (2, 2), strides=(2, 2)))
    assert np.isnan(got[0, 0, 0, 0]) and got[0, 0, 1, 0] == 2.0


def test_bfloat16_max_pool_runs_in_float32_and_equals_flax():
    """bfloat16 inputs: Flax's values exactly, bfloat16 in and out, and every comparison and
    select of the pooling and its gradient in float32 (XLA's CPU backend runs bfloat16 selects
    far slower)."""
    # Distinct integers and integer weights: exact in bfloat16, so both gradients are exact.
    x = jax.random.permutation(jax.random.key(0), 2 * 8 * 8 * 2).reshape(2, 8, 8, 2)
    x = x.astype(jnp.bfloat16)
    pool = lambda x: max_pool(x, (3, 3), (2, 2), ((1, 1), (1, 1)))  # noqa: E731
    ref = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    assert pool(x).dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(pool(x), np.float32), np.asarray(ref, np.float32))
    weights = jax.random.randint(jax.random.key(1), ref.shape, -4, 5).astype(jnp.bfloat16)
    grad = jax.grad(lambda x: jnp.sum((pool(x) * weights).astype(jnp.float32)))
    flax_grad = jax.grad(
        lambda x: jnp.sum(
            (nn.max_pool(x, (3, 3), (2, 2), ((1, 1), (1, 1))) * weights).astype(jnp.float32)
        )
    )
    assert grad(x).dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(grad(x)), np.asarray(flax_grad(x)))
    equations = jax.make_jaxpr(grad)(x).jaxpr.eqns
    pooling = [e for e in equations if e.primitive.name in ("gt", "select_n", "eq", "pad")]
    assert pooling and all(
        v.aval.dtype in (jnp.float32, jnp.bool_, jnp.int8)  # int8: the first maximum's index
        for e in pooling
        for v in e.invars
        if hasattr(v, "aval") and v.aval.ndim == 4
    ), [(e.primitive.name, [v.aval for v in e.invars]) for e in pooling]


def test_max_pool_rejects_bad_shapes():
    with pytest.raises(ValueError, match="NHWC"):
        max_pool(jnp.zeros((4, 4, 1)), (2, 2), (2, 2))
    with pytest.raises(ValueError, match="larger than the padded input"):
        max_pool(jnp.zeros((1, 2, 2, 1)), (3, 3), (1, 1))
