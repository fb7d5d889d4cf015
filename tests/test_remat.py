"""Activation checkpointing (``model.remat``, ``model.remat_rules``): the same loss, gradients
and batch statistics as without it, with less memory kept for the backward pass (XLA's own memory
analysis), and only in the blocks the rules name."""

from __future__ import annotations

import contextlib
import io
import json
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from vision_jax import create_model, specs
from vision_jax.compile_options import step_compiler_options
from vision_jax.config import TrackedConfig, default_config
from vision_jax.models.registry import backbone_of
from vision_jax.models.remat import REMAT_POLICIES, block_policies, recomputes
from vision_jax.run import task_model

SMALL = {
    "vit_ti16": {"depth": 3},
    "resnet18": {"stage_sizes": (1, 1, 1, 1)},
    "bit_r50x1": {"stage_sizes": (1, 1, 1, 1)},
    "cifar_resnet20": {"stage_sizes": (2, 1, 1)},
}
# Per-block rules mixing both policies, with blocks that keep everything; and how many blocks
# of the SMALL model they recompute.
RULES = {
    "vit_ti16": (
        (("Transformer/encoderblock_0", "block"), ("Transformer/encoderblock_1", "dots")),
        2,
    ),
    "resnet18": ((("layer1/0", "block"), ("layer(3|4)/0", "dots")), 3),
    "bit_r50x1": ((("block1/unit01", "block"), ("block3/.*", "dots")), 2),
    "cifar_resnet20": ((("layer1/1", "block"), ("layer2/.*", "dots")), 2),
}


def recomputed_blocks(model, variables: dict, images: jax.Array) -> int:
    """How many ``jax.checkpoint`` regions a training forward of ``model`` has."""
    apply = lambda v: model.apply(
        v, images, train=True, rngs={"dropout": jax.random.key(1)}, mutable=["batch_stats"]
    )
    names = [eqn.primitive.name for eqn in jax.make_jaxpr(apply)(variables).eqns]
    return names.count(jax.make_jaxpr(jax.checkpoint(jnp.sin))(1.0).eqns[0].primitive.name)


def loss_and_grads(
    name: str, remat: str, images: jax.Array, rules: tuple = (), sizes: dict | None = None
):
    """Loss, parameter gradients and updated batch statistics of one training forward (of the
    ``SMALL`` model, or with ``sizes`` instead)."""
    sizes = SMALL[name] if sizes is None else sizes
    model = create_model(name, num_classes=7, remat=remat, remat_rules=rules, **sizes)
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
        results[remat] = step(params)
    rules, recomputed = RULES[name]
    step, params = loss_and_grads(name, "none", images, rules)
    results["rules"] = step(params)
    model = create_model(name, num_classes=7, remat_rules=rules, **SMALL[name])
    variables = jax.eval_shape(model.init, jax.random.key(0), images[:1])
    assert recomputed_blocks(model, variables, images) == recomputed
    (loss, stats), grads = results.pop("none")
    for (other_loss, other_stats), other_grads in results.values():
        np.testing.assert_allclose(other_loss, loss, rtol=1e-6)
        # Recomputed activations may fuse in another order: float32 rounding of the largest.
        close = lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4 * np.abs(b).max())
        jax.tree.map(close, (other_stats, other_grads), (stats, grads))


def step_cost(
    remat: str, images: jax.Array, rules: tuple = (), name: str = "vit_ti16", sizes=None
) -> tuple[int, float]:
    """(temporary bytes, flops) of a training step (of the ``SMALL`` ViT-Ti by default), with
    the train step's compiler options (on CPU they keep jax.checkpoint's barriers)."""
    step, params = loss_and_grads(name, remat, images, rules, sizes)
    options = step_compiler_options(jnp.float32, remat=recomputes(remat, rules))
    compiled = jax.jit(step, compiler_options=options).lower(params).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return compiled.memory_analysis().temp_size_in_bytes, cost["flops"]


@pytest.mark.slow
def test_remat_keeps_less_for_the_backward_pass():
    images = jax.random.normal(jax.random.key(2), (8, 64, 64, 3))
    temp = {remat: step_cost(remat, images)[0] for remat in REMAT_POLICIES}
    assert max(temp["block"], temp["dots"]) < 0.5 * temp["none"], temp


def test_remat_keeps_less_for_a_convolutional_network():
    """The same for a ResNet (convolutions, BatchNorm with batch statistics): the whole CIFAR
    ResNet-20 at batch 16 keeps 24.3 MiB of temporaries without remat, 18.5 MiB with "dots",
    11.0 MiB with "block" (compiled without the train step's options, 24.3, 34.5 and 24.3 MiB
    on CPU: XLA merges the recomputation back into the forward pass)."""
    images = jax.random.normal(jax.random.key(2), (16, 32, 32, 3))
    full = {"stage_sizes": (3, 3, 3)}
    temp = {r: step_cost(r, images, name="cifar_resnet20", sizes=full)[0] for r in REMAT_POLICIES}
    assert temp["block"] < 0.6 * temp["none"] and temp["dots"] < 0.9 * temp["none"], temp


def test_rules_recompute_only_the_blocks_they_name():
    """Of 3 ViT blocks: recomputing block 0 alone keeps less than nothing recomputed and more
    than all three; all but the last keeps as little as all three (the backward pass rebuilds
    the last block's activations at once anyway) for less compute."""
    images = jax.random.normal(jax.random.key(2), (8, 64, 64, 3))
    none, every = step_cost("none", images), step_cost("block", images)
    first = step_cost("none", images, (("Transformer/encoderblock_0", "block"),))
    all_but_last = step_cost("none", images, (("Transformer/encoderblock_[01]", "block"),))
    assert every[0] < first[0] < none[0], (every, first, none)
    assert all_but_last[0] <= 1.01 * every[0] and all_but_last[1] < every[1], (all_but_last, every)
    blocks = [f"layer{i}/{j}" for i in (1, 2) for j in (0, 1)]
    policies = block_policies("dots", (("layer1/.*", "block"), (".*/0", "none")), blocks)
    assert policies == {"layer1/0": "block", "layer1/1": "block", "layer2/0": "none",
                        "layer2/1": "dots"}  # fmt: skip


@pytest.mark.parametrize(
    "rules, message",
    [
        ((("encoderblock_0", "block"),), "'encoderblock_0' matches no block; blocks: Transformer/"),
        ((("Transformer/.*", "all"),), "Unknown remat policy 'all' in remat_rules"),
        (("Transformer/.*",), "remat_rules: a rule must be a \\(regex, value\\) pair, got 'Tr"),
        ((("(", "block"),), "Invalid regex '\\(' in remat_rules"),
        ("Transformer/.*", "remat_rules: a sequence of \\(regex, value\\) pairs, got 'Tr"),
        (((1, "block"),), "remat_rules: a regex must be a string, got 1"),
    ],
)
def test_bad_remat_rules_are_errors_naming_the_rule(rules, message):
    model = create_model("vit_ti16", num_classes=2, remat_rules=rules, depth=2)
    with pytest.raises(ValueError, match=message):
        model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))


@pytest.mark.parametrize(
    "name, taps, idle, running",
    [
        ("vit_ti16", (0,), "Transformer/encoderblock_(1|2)", "Transformer/encoderblock_0"),
        ("resnet18", (1,), "layer(3|4)/0", "layer1/0"),
        ("bit_r50x1", (2,), "block4/.*", "block3/unit01"),
        ("cifar_resnet20", (0,), "layer(2|3)/.*", "layer1/1"),
    ],
)
def test_a_rule_for_blocks_that_never_run_is_an_error(name, taps, idle, running):
    """With feature taps the blocks after the last tapped one never run: a rule that matches
    only those would change nothing, an error as one that matches no block (it passed without
    a word); a rule that matches some block that runs is taken."""
    images = jnp.zeros((1, 32, 32, 3))
    build = lambda rules: create_model(name, num_classes=0, feature_taps=taps,
                                       remat_rules=rules, **SMALL[name])  # fmt: skip
    with pytest.raises(ValueError, match=f"'{re.escape(idle)}' matches only blocks that never"):
        build(((idle, "block"),)).init(jax.random.key(0), images)
    model = build(((running, "block"),))
    assert recomputed_blocks(model, model.init(jax.random.key(0), images), images) == 1


def test_a_run_with_a_rule_for_blocks_that_never_run_is_still_read(tmp_path, monkeypatch):
    """A run of an earlier version whose rule matched only blocks that never run (refused
    since) is still read, evaluated and exported: readers run no backward pass, so the model
    they build has no remat."""
    from test_segmentation_train import ARRAYS, seg_config

    from vision_jax.models import remat
    from vision_jax.train import train_and_evaluate
    from vision_jax.trained import load_trained

    unchecked = remat.block_policies
    with monkeypatch.context() as old_version:  # the version that let the rule pass
        old_version.setattr(remat, "block_policies", lambda *args: unchecked(*args[:3]))
        cfg = seg_config(
            total_steps=1,
            **{"task.feature_taps": (0,), "model.remat_rules": (("layer3/.*", "block"),)},
        )
        train_and_evaluate(cfg, str(tmp_path), arrays=ARRAYS)
    trained = load_trained(tmp_path)
    outputs = trained.model.apply(trained.variables, jnp.zeros((1, 16, 16, 3)))
    assert np.all(np.isfinite(outputs)) and backbone_of(trained.model).remat_rules == ()


def test_an_unknown_policy_names_the_valid_ones():
    model = create_model("vit_ti16", num_classes=2, remat="everything", depth=1)
    with pytest.raises(ValueError, match="Unknown remat policy 'everything'; valid: none, block"):
        model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))


def test_config_rules_reach_a_task_models_backbone():
    """``model.remat_rules`` of a segmentation run: the ViT backbone under the task head
    recomputes the two blocks named by their parameter paths, and the run knows to compile its
    step with remat's compiler options."""
    config = default_config()
    config.task.name = "segmentation"
    config.model.remat_rules = (("Transformer/encoderblock_(0|1)", "block"),)
    spec = specs.run_spec(TrackedConfig(config))
    model, images = task_model(spec, num_classes=3), jnp.zeros((1, 32, 32, 3))
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), images))
    assert {"Transformer", "task_head"} <= set(variables["params"])
    assert recomputed_blocks(model, variables, images) == 2
    backbone = backbone_of(model)  # what the run reads to set remat's compiler options
    assert backbone.remat_rules == config.model.remat_rules
    assert recomputes(backbone.remat, backbone.remat_rules)
    assert not recomputes("none", ((".*", "none"),)) and recomputes("dots", ())
    # A saved run's record holds the rules as JSON lists: its model gets the same tuples back.
    saved = ml_collections.ConfigDict(json.loads(json.dumps(spec.config)))
    assert saved.model.remat_rules == [list(rule) for rule in config.model.remat_rules]
    again = task_model(specs.run_spec(TrackedConfig(saved)), num_classes=3)
    assert backbone_of(again).remat_rules == config.model.remat_rules
    assert hash(again) == hash(model)


def kept_products(name: str, remat: str, dtype: str) -> list[str]:
    """The products (matrix products, convolutions) whose outputs a training forward of a
    depth-1 ``name`` keeps for the backward pass (JAX's ``print_saved_residuals``)."""
    small = {"vit_ti16": {"depth": 1}, "resnet18": {"stage_sizes": (1, 1, 1, 1)}}[name]
    model = create_model(name, num_classes=5, remat=remat, dtype=dtype, **small)
    images = jnp.ones((2, 32, 32, 3))
    variables = model.init(jax.random.key(0), images)

    def loss(params):
        out = model.apply({**variables, "params": params}, images, train=True,
                          mutable=["batch_stats"], rngs={"dropout": jax.random.key(1)})  # fmt: skip
        return jnp.sum(out[0].astype(jnp.float32))

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        jax.ad_checkpoint.print_saved_residuals(loss, variables["params"])
    named = "named '(low_precision_dot|nhwc_convolution)'"
    product = rf"(output of (dot_general|conv_general_dilated)|{named})"
    return [line for line in printed.getvalue().splitlines() if re.search(product, line)]


@pytest.mark.parametrize("name", ["vit_ti16", "resnet18"])
def test_dots_keeps_the_products_in_bfloat16_and_convolutions(name):
    """``remat="dots"`` keeps the same products in bfloat16 as in float32 (bfloat16 products
    are a custom_vjp, whose dot JAX's policy did not see: "dots" kept what "block" keeps), and
    the convolutions (JAX's policy keeps matrix products only: a ResNet's 3x3 convolutions were
    recomputed)."""
    import jax.ad_checkpoint  # noqa: F401  (print_saved_residuals)

    float32, bfloat16 = (kept_products(name, "dots", dtype) for dtype in ("float32", "bfloat16"))
    outside_blocks = len(kept_products(name, "block", "bfloat16"))  # ResNet's stem
    assert len(bfloat16) == len(float32) > outside_blocks + 4
    if name == "resnet18":
        assert sum("nhwc_convolution" in line for line in float32) >= 5  # stem, 3x3s over 4x4+
