"""Optimizer control: schedules, trainable presets, lr multipliers and layer decay, LoRA merging,
the memory report. The training-loop side (frozen leaves unchanged, accumulation, EMA) is in
tests/test_finetune.py."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vision_jax import lora, optim, specs, trees
from vision_jax.config import TrackedConfig, default_config
from vision_jax.masks import tree_mask
from vision_jax.models import create_model
from vision_jax.trees import flatten_dict, unflatten_dict


def shapes_of(name: str, size: int = 32, **kw):
    model = create_model(name, num_classes=10, **kw)
    return model, jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, size, size, 3)))


def build_optimizer(c, params, model):
    t = TrackedConfig(c)
    return optim.build_optimizer(
        specs.optimizer_spec(t.optimizer), specs.schedule_spec(t.schedule), params, model,
        total_steps=10, steps_per_epoch=1,
    )  # fmt: skip


def schedule_of(total: int = 100, steps_per_epoch: int = 10, **overrides):
    c = default_config()
    for k, v in overrides.items():
        c.schedule[k] = v
    spec = specs.schedule_spec(TrackedConfig(c).schedule)
    numbers = optim.schedule_numbers(
        spec, base_lr=2.0, total_steps=total, steps_per_epoch=steps_per_epoch
    )
    return functools.partial(optim.schedule_value, spec.decay, numbers)


@pytest.mark.parametrize(
    "overrides, reference",
    [
        ({"decay": "cosine", "warmup_steps": 10},
         lambda t: 2.0 * min(t / 10, 1) * 0.5 * (1 + np.cos(np.pi * np.clip((t - 10) / 90, 0, 1)))),
        ({"decay": "linear", "warmup_epochs": 2.0},
         lambda t: 2.0 * min(t / 20, 1) * (1 - np.clip((t - 20) / 80, 0, 1))),
        ({"decay": "constant", "warmup_fraction": 0.05, "cooldown_fraction": 0.2},
         lambda t: 2.0 * min(t / 5, 1) * np.clip((100 - t) / 20, 0, 1)),
        ({"decay": "rsqrt", "rsqrt_timescale": 25, "warmup_steps": 4, "cooldown_steps": 10},
         lambda t: 2.0 * min(t / 4, 1) / np.sqrt(1 + max(t - 4, 0) / 25)
         * np.clip((100 - t) / 10, 0, 1)),
        ({"decay": "step", "step_boundaries": (0.3, 0.6), "step_factor": 0.5},
         lambda t: 2.0 * 0.5 ** ((t >= 30) + (t >= 60))),
        ({"decay": "linear", "end_factor": 0.1, "cooldown_steps": 10},
         lambda t: 2.0 * (0.1 + 0.9 * (1 - t / 100)) * np.clip((100 - t) / 10, 0, 1)),
    ],
)  # fmt: skip
def test_schedules_match_numpy_reference(overrides, reference):
    """On the host, and compiled with the schedule's numbers as inputs (as a run's step)."""
    fn = schedule_of(**overrides)
    traced = jax.jit(optim.schedule_value, static_argnums=0)
    for t in [0, 1, 3, 4, 5, 9, 10, 19, 20, 29, 30, 50, 59, 60, 85, 95, 99, 100]:
        assert float(fn(t)) == pytest.approx(reference(t), abs=1e-6), (t, overrides)
        assert float(traced(fn.args[0], fn.args[1], t)) == pytest.approx(reference(t), abs=1e-6)


def test_optimizer_schedule_is_one_program_for_every_step():
    """The learning rate a run logs: the schedule's value, compiled once for all steps (not a
    dozen eager scalar operations, each compiled on its own the first time)."""
    model, shapes = shapes_of("cifar_resnet20", size=8)
    c = default_config()
    c.schedule.update({"decay": "cosine", "warmup_steps": 2})
    opt = build_optimizer(c, shapes["params"], model)
    optim._jitted_schedule_value.clear_cache()
    for step in range(11):
        want = optim.schedule_value("cosine", opt.numbers["schedule"], step)
        assert float(opt.schedule(step)) == pytest.approx(float(want), abs=1e-7)
    assert optim._jitted_schedule_value._cache_size() == 1


@pytest.mark.parametrize(
    "name, schedule", [("adamw", {"decay": "cosine"}), ("sgd", {"decay": "step"}),
                       ("sgd", {"decay": "rsqrt", "cooldown_steps": 2})],
)  # fmt: skip
def test_optimizer_numbers_are_inputs_of_one_program(name, schedule):
    """Two optimizers that differ only in their numbers compile to the same update program
    when the numbers are passed in, and give each its own updates; clipping on or off is
    structure, another program."""
    model, shapes = shapes_of("cifar_resnet20", size=8)
    params = jax.tree.map(lambda s: jnp.full(s.shape, 0.5), shapes["params"])
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.1), params)

    def built(**changes):
        c = default_config()
        c.optimizer.name, c.optimizer.layer_decay = name, 0.8
        c.optimizer.update({"grad_clip_norm": 1.0, "weight_decay": 1e-3, **changes})
        c.schedule.update(schedule)
        return build_optimizer(c, params, model)

    def program(opt):
        update = lambda n, g, s, p: opt.transform(n).update(g, s, p)[0]
        args = (opt.numbers, grads, opt.tx.init(params), params)
        lowered = jax.jit(update).lower(*args)
        return lowered.as_text(), lowered.compile()(*args)

    other = {"learning_rate": 0.3, "weight_decay": 0.02, "grad_clip_norm": 5.0, "layer_decay": 0.5}
    other |= {"b1": 0.7} if name == "adamw" else {"momentum": 0.5}
    (text, updates), (other_text, other_updates) = program(built()), program(built(**other))
    assert text == other_text
    for got, want in ((updates, built().tx), (other_updates, built(**other).tx)):
        state = want.init(params)
        expected = want.update(grads, state, params)[0]
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-6)
    assert not np.allclose(jax.tree.leaves(updates)[0], jax.tree.leaves(other_updates)[0])
    assert program(built(grad_clip_norm=None))[0] != text


@pytest.mark.parametrize(
    "changes, layout",
    [({"name": "adamw", "grad_clip_norm": 1.0, "layer_decay": 0.8},
      ["1/0/count", "1/0/mu", "1/0/nu", "1/2/count"]),
     ({"name": "sgd", "grad_clip_norm": 1.0, "weight_decay": 1e-4}, ["2/0/trace", "2/1/count"]),
     ({"name": "sgd", "grad_clip_norm": None, "weight_decay": 0.0}, ["0/0/trace", "0/1/count"])],
)  # fmt: skip
def test_optimizer_state_keeps_the_layout_checkpoints_hold(changes, layout):
    """The optimizer state's paths (chain member / its state / field), as the checkpoints of
    earlier versions hold them: a change here makes their runs unresumable."""
    from vision_jax.masks import path_to_str

    model, shapes = shapes_of("cifar_resnet20", size=8)
    c = default_config()
    c.optimizer.update(changes)
    state = jax.eval_shape(build_optimizer(c, shapes["params"], model).tx.init, shapes["params"])
    paths = jax.tree_util.tree_flatten_with_path(state)[0]
    assert sorted({"/".join(path_to_str(p).split("/")[:3]) for p, _ in paths}) == layout


def test_cosine_with_an_end_factor_is_timms_cosine_with_min_lr(timm):
    """timm's CosineLRScheduler (warmup from 0 before the decay, ``warmup_prefix=True``,
    ``lr_min``) step by step: ``end_factor`` = lr_min / lr."""
    import torch
    from timm.scheduler import CosineLRScheduler

    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=2.0)
    reference = CosineLRScheduler(optimizer, t_initial=90, lr_min=0.3, warmup_t=10,
                                  warmup_lr_init=0.0, warmup_prefix=True)  # fmt: skip
    fn = schedule_of(decay="cosine", warmup_steps=10, end_factor=0.15)
    for t in range(101):
        assert float(fn(t)) == pytest.approx(reference._get_lr(t)[0], abs=1e-6), t


def test_schedule_errors():
    with pytest.raises(ValueError, match="at most one of schedule.warmup"):
        schedule_of(warmup_steps=5, warmup_fraction=0.1)
    with pytest.raises(ValueError, match="Warmup 60 \\+ cooldown 50"):
        schedule_of(warmup_steps=60, cooldown_steps=50)
    with pytest.raises(ValueError, match=r"warmup_steps=-5 is negative: set 0 or more"):
        schedule_of(warmup_steps=-5)
    with pytest.raises(ValueError, match=r"cooldown_fraction=-0.1 is negative"):
        schedule_of(cooldown_fraction=-0.1)
    with pytest.raises(ValueError, match=r"warmup_steps=200 is 200 steps; training has 100"):
        schedule_of(warmup_steps=200)
    with pytest.raises(ValueError, match="Unknown schedule.decay 'exp'"):
        schedule_of(decay="exp")
    with pytest.raises(ValueError, match=r"schedule.end_factor must lie in \[0, 1\]; got 1.5"):
        schedule_of(end_factor=1.5)
    with pytest.raises(ValueError, match="end_factor"):
        schedule_of(decay="constant", end_factor=0.1)


def trained(mask) -> set[str]:
    return {k for k, v in flatten_dict(mask).items() if v}


def test_trainable_presets_vit():
    model, shapes = shapes_of("vit_ti16")
    params = shapes["params"]
    all_paths = set(flatten_dict(params))
    assert trained(optim.trainable_mask(params, model, preset="all", frozen=None)) == all_paths
    head = trained(optim.trainable_mask(params, model, preset="head", frozen=None))
    assert head == {"head/kernel", "head/bias"}
    last2 = trained(optim.trainable_mask(params, model, preset="last:2", frozen=None))
    assert last2 == {p for p in all_paths if p.startswith(
        ("head/", "Transformer/encoder_norm/", "Transformer/encoderblock_10/",
         "Transformer/encoderblock_11/"))}  # fmt: skip
    bitfit = trained(optim.trainable_mask(params, model, preset="bitfit", frozen=None))
    assert "Transformer/encoderblock_3/LayerNorm_2/scale" in bitfit
    assert "Transformer/encoderblock_3/MlpBlock_3/Dense_0/bias" in bitfit
    assert "Transformer/encoderblock_3/MlpBlock_3/Dense_0/kernel" not in bitfit
    assert "Transformer/posembed_input/pos_embedding" not in bitfit and "cls" not in bitfit
    assert bitfit == {p for p in all_paths if p.endswith("bias") or p.endswith("scale")
                      or p.startswith("head/")}  # fmt: skip
    frozen = trained(optim.trainable_mask(params, model, preset="all", frozen=r"embedding/.*"))
    assert frozen == all_paths - {"embedding/kernel", "embedding/bias"}
    with pytest.raises(ValueError, match="No parameter is trainable"):
        optim.trainable_mask(params, model, preset="head", frozen="head/.*")
    with pytest.raises(ValueError, match="Unknown optimizer.trainable 'probe'"):
        optim.trainable_mask(params, model, preset="probe", frozen=None)


def test_trainable_presets_resnet_use_stages():
    model, shapes = shapes_of("resnet18", 64)
    params = {"params": shapes["params"]}["params"]
    last1 = trained(optim.trainable_mask(params, model, preset="last:1", frozen=None))
    assert last1 == {p for p in flatten_dict(params) if p.startswith(("layer4/", "head/"))}
    bitfit = trained(optim.trainable_mask(params, model, preset="bitfit", frozen=None))
    assert "layer2/0/downsample_bn/scale" in bitfit and "bn1/bias" in bitfit
    assert not any(p.endswith("kernel") and not p.startswith("head") for p in bitfit)


def test_blocks_after_the_last_feature_tap_train_in_no_preset():
    """A backbone tapped at block 5 never runs blocks 6..11 (timm's prune_intermediate_layers):
    they train in no preset (weight decay alone would shrink them), and ``last:N`` and layer
    decay count from block 5, where they counted blocks the task head never reads."""
    from vision_jax.tasks import Segmentation

    model = Segmentation(head="linear", feature_taps=(5,)).build_model("vit_ti16", 3)
    params = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
    paths = set(flatten_dict(params))
    unused = {p for p in paths if any(f"encoderblock_{i}/" in p for i in range(6, 12))}
    assert unused and trained(optim.trainable_mask(params, model, preset="all")) == paths - unused
    last2 = trained(optim.trainable_mask(params, model, preset="last:2"))
    assert last2 == {p for p in paths if p.startswith(
        ("task_head/", "Transformer/encoder_norm/", "Transformer/encoderblock_4/",
         "Transformer/encoderblock_5/"))}  # fmt: skip
    with_adapters = trained(optim.trainable_mask(params, model, preset="none", extra=".*/kernel"))
    assert with_adapters and not with_adapters & unused
    with pytest.raises(ValueError, match="runs 6 blocks"):
        optim.trainable_mask(params, model, preset="last:7")
    trainable = {k: v for k, v in flatten_dict(params).items() if k not in unused}
    mults = flatten_dict(optim.lr_multipliers(unflatten_dict(trainable), model, layer_decay=0.5))
    assert mults["Transformer/encoderblock_5/MlpBlock_3/Dense_0/kernel"] == 0.5
    assert mults["task_head/classifier/kernel"] == mults["Transformer/encoder_norm/scale"] == 1.0
    assert mults["embedding/kernel"] == 0.5**7
    blocks_after = r"Transformer/encoderblock_(6|7|8|9|10|11)/.*"
    also = rf"{blocks_after}|Transformer/encoderblock_5/.*"  # named with blocks that run: taken
    assert trained(optim.trainable_mask(params, model, preset="all", frozen=also)) == (
        paths - unused - {p for p in paths if p.startswith("Transformer/encoderblock_5/")}
    )
    # Only those: a rule that changes nothing, an error naming it (it passed without a word),
    # as a learning-rate multiplier's or a weight decay's
    with pytest.raises(ValueError, match=r"frozen_params .*encoderblock_\(6.* matches only param"
                       r"eters that never run \(such as 'Transformer/encoderblock_"):  # fmt: skip
        optim.trainable_mask(params, model, preset="all", frozen=blocks_after)
    held = sorted(unused)
    with pytest.raises(ValueError, match=r"lr_mults rule .*encoderblock_\(6.* matches only froz"):
        optim.lr_multipliers(unflatten_dict(trainable), model, rules=[(blocks_after, 2.0)],
                             frozen=held)  # fmt: skip
    with pytest.raises(ValueError, match=r"decay_params .*encoderblock_\(6.* matches only froz"):
        tree_mask(blocks_after, unflatten_dict(trainable), what="optimizer.decay_params",
                  frozen=held)  # fmt: skip
    bit = Segmentation(head="linear", feature_taps=(1,)).build_model("bit_r50x1", 3)
    bit_params = jax.eval_shape(bit.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
    bit_trained = trained(optim.trainable_mask(bit_params, bit, preset="all"))
    assert not any(p.startswith(("norm-pre-head/", "block3/", "block4/")) for p in bit_trained)
    assert any(p.startswith("block2/") for p in bit_trained)


def test_layer_decay_multiplies_the_right_leaves():
    model, shapes = shapes_of("vit_ti16")
    mults = flatten_dict(optim.lr_multipliers(
        shapes["params"], model, rules=[(r".*/bias", 2.0)], layer_decay=0.5))  # fmt: skip
    # 14 groups: stem 0, blocks 1..12, head/final norm 13.
    assert mults["head/kernel"] == 1.0 and mults["head/bias"] == 2.0
    assert mults["Transformer/encoder_norm/scale"] == 1.0
    assert mults["Transformer/encoderblock_11/MlpBlock_3/Dense_0/kernel"] == 0.5
    assert mults["Transformer/encoderblock_11/MlpBlock_3/Dense_0/bias"] == 1.0
    assert mults["Transformer/encoderblock_0/LayerNorm_0/scale"] == 0.5**12
    assert mults["embedding/kernel"] == mults["cls"] == 0.5**13
    assert mults["Transformer/posembed_input/pos_embedding"] == 0.5**13
    resnet, rs = shapes_of("resnet50", 64)
    rmults = flatten_dict(optim.lr_multipliers(rs["params"], resnet, layer_decay=0.1))
    assert rmults["layer4/2/conv3/kernel"] == pytest.approx(0.1)
    assert rmults["layer1/0/conv1/kernel"] == pytest.approx(1e-4)
    assert rmults["conv1/kernel"] == pytest.approx(1e-5)


def test_lr_multipliers_scale_the_updates_exactly():
    model, shapes = shapes_of("vit_ti16")
    params = jax.tree.map(lambda s: jnp.ones(s.shape), shapes["params"])
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.1), params)
    c = default_config()
    c.optimizer.name = "sgd"
    c.optimizer.weight_decay = 0.0
    c.optimizer.grad_clip_norm = None
    c.optimizer.momentum = 0.0
    c.optimizer.layer_decay = 0.5
    c.schedule.decay = "constant"
    tx = build_optimizer(c, params, model).tx
    updates, _ = tx.update(grads, tx.init(params), params)
    u = flatten_dict(updates)
    assert float(u["head/kernel"][0, 0]) == pytest.approx(-1e-3 * 0.1)
    assert float(u["embedding/kernel"][0, 0, 0, 0]) == pytest.approx(-1e-3 * 0.1 * 0.5**13)


def test_decay_mask_defaults_to_kernels_and_decoupled_semantics():
    model, shapes = shapes_of("vit_ti16")
    params = jax.tree.map(lambda s: jnp.ones(s.shape), shapes["params"])
    zero = jax.tree.map(jnp.zeros_like, params)
    c = default_config()
    c.optimizer.weight_decay = 0.1
    c.schedule.decay = "constant"
    tx = build_optimizer(c, params, model).tx
    updates = flatten_dict(tx.update(zero, tx.init(params), params)[0])
    for path, u in updates.items():
        expected = -1e-3 * 0.1 if path.endswith("kernel") else 0.0  # lr * wd * param
        np.testing.assert_allclose(u, expected, rtol=1e-6, err_msg=path)


def _apply_rule(key: str, value, model, params) -> None:
    """Builds what ``optimizer.<key> = value`` configures: the trainable mask or the optimizer."""
    if key == "frozen_params":
        optim.trainable_mask(params, model, preset="all", frozen=value)
        return
    c = default_config()
    c.optimizer[key] = value
    build_optimizer(c, params, model)


@pytest.mark.parametrize(
    "key, value, named, good",
    [
        ("frozen_params", "conv1",
         "optimizer.frozen_params 'conv1' matches no parameter: a rule matches whole paths such ",
         "head/.*"),
        ("lr_mults", ((".*", 1.0), ("head", 2.0)),
         "optimizer.lr_mults rule 'head' matches no parameter: a rule matches whole paths such as ",
         (("head/.*", 2.0),)),
        # Shadowed: '.*' takes every parameter first, so the head's rule would do nothing.
        ("lr_mults", ((".*", 1.0), ("head/.*", 2.0)),
         r"optimizer.lr_mults rule 'head/\.\*' matches only parameters that the earlier rule "
         r"'\.\*' takes \(the first match wins\): put it before that rule",
         (("head/.*", 2.0), (".*", 1.0))),
        ("decay_params", "kernel",
         "optimizer.decay_params 'kernel' matches no parameter: a rule matches whole paths",
         ".*kernel"),
    ],
)  # fmt: skip
def test_a_rule_that_matches_no_parameter_is_an_error(key, value, named, good):
    """Rules match whole paths: 'head' matches none of head/kernel, head/bias, and would have
    left the head's multiplier at 1 without a word; the same rules written to apply pass."""
    model, shapes = shapes_of("cifar_resnet20")
    params = jax.tree.map(lambda s: jnp.ones(s.shape), shapes["params"])
    with pytest.raises(ValueError, match=f"^{named}"):
        _apply_rule(key, value, model, params)
    _apply_rule(key, good, model, params)


def test_the_default_lora_targets_on_a_cnn_say_what_to_set():
    """The default targets are a ViT's: on a CNN the error says so (its hint doubled '.*')."""
    _, shapes = shapes_of("cifar_resnet20")
    params = jax.tree.map(lambda s: jnp.ones(s.shape), shapes["params"])
    spec = lora.LoraSpec(rank=4, alpha=8.0)
    with pytest.raises(
        ValueError,
        match=r"\('\.\*/MultiHeadDotProductAttention_1/\(query\|value\)"
        r"/kernel\.\*' matches anywhere .* set lora.targets to its Dense or 1x1",
    ):
        lora.add_adapters(params, spec, jax.random.key(0))  # fmt: skip


@pytest.mark.parametrize(
    "name, targets, size",
    [
        ("vit_ti16", r".*/(query|key|value|out|Dense_0|Dense_1)/kernel", 32),
        pytest.param(
            "resnet50", r"layer.*/(conv1|conv3|downsample_conv)/kernel", 64, marks=pytest.mark.slow
        ),
    ],
)
def test_lora_merge_is_exact(name, targets, size):
    model = create_model(name, num_classes=5)
    x = jax.random.normal(jax.random.key(1), (2, size, size, 3))
    variables = model.init(jax.random.key(0), x)
    head = variables["params"]["head"]
    head["kernel"] = jax.random.normal(jax.random.key(3), head["kernel"].shape)  # non-zero logits
    spec = lora.LoraSpec(rank=4, alpha=8.0, targets=targets)
    params = lora.add_adapters(variables["params"], spec, jax.random.key(2))
    with lora.apply_adapters(spec, train=False):  # b == 0: the adapted net equals the base net
        np.testing.assert_allclose(
            model.apply({**variables, "params": params}, x), model.apply(variables, x), atol=1e-6
        )
    noise = lambda p, k: p + 0.02 * jax.random.normal(jax.random.key(k), p.shape)
    flat = flatten_dict(params)
    for i, path in enumerate(lora.adapter_paths(params)):  # train the adapters (b != 0)
        flat[path] = noise(flat[path], i)
    params = unflatten_dict(flat)
    with lora.apply_adapters(spec, train=False):
        adapted = model.apply({**variables, "params": params}, x)
    merged = lora.merge(params, spec)
    assert not lora.adapter_paths(merged)
    assert jax.tree.structure(merged) == jax.tree.structure(variables["params"])
    plain = model.apply({**variables, "params": merged}, x)
    base = model.apply(variables, x)
    scale = float(jnp.abs(adapted).max())
    assert float(jnp.abs(adapted - base).max()) > 1e-3 * scale  # the adapters matter
    np.testing.assert_allclose(plain, adapted, rtol=1e-5, atol=1e-5 * scale)


def test_lora_errors():
    model, shapes = shapes_of("vit_ti16")
    params = jax.tree.map(lambda s: jnp.zeros(s.shape), shapes["params"])
    with pytest.raises(ValueError, match="matches no parameter"):
        lora.add_adapters(params, lora.LoraSpec(4, 4.0, targets="nothing/.*"), jax.random.key(0))
    with pytest.raises(ValueError, match="embedding/kernel is a 16x16 convolution"):
        lora.add_adapters(params, lora.LoraSpec(4, 4.0, targets="embedding/kernel"),
                          jax.random.key(0))  # fmt: skip
    with pytest.raises(ValueError, match="rank must be positive"):
        lora.LoraSpec(0, 1.0)


def test_lora_refuses_the_kernels_its_family_names_by_path():
    """The family's ``lora_unmergeable`` modules (BiT's StdConv) are found while the model is
    initialised; a target among them is refused by its full path, other kernels adapt."""
    model = create_model("bit_r50x1", num_classes=3, stage_sizes=(1, 1, 1, 1))
    with lora.refused_kernels() as refused:
        shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    assert refused["block1/unit01/conv1/kernel"] == "StdConv"
    assert "head/kernel" not in refused
    params = jax.tree.map(lambda s: jnp.zeros(s.shape), shapes["params"])
    spec = lora.LoraSpec(2, 2.0, targets=r"block\d/unit\d+/conv1/kernel")
    with pytest.raises(ValueError, match=r"cannot adapt block1/unit01/conv1/kernel \(StdConv\)"):
        lora.add_adapters(params, spec, jax.random.key(0), refused=refused)
    spec = lora.LoraSpec(2, 2.0, targets="head/kernel")
    assert lora.adapter_paths(lora.add_adapters(params, spec, jax.random.key(0), refused=refused))


def test_frozen_params_that_freeze_nothing_more_are_an_error():
    model, shapes = shapes_of("vit_ti16")
    params = jax.tree.map(lambda s: jnp.zeros(s.shape), shapes["params"])
    match = r"'embedding/.\*' matches only parameters that optimizer.trainable='head' freezes"
    with pytest.raises(ValueError, match=match):
        optim.trainable_mask(params, model, preset="head", frozen="embedding/.*")
    params = lora.add_adapters(params, lora.LoraSpec(rank=2, alpha=2.0), jax.random.key(0))
    with pytest.raises(ValueError, match=r"'embedding/.\*' matches only parameters that LoRA"):
        optim.trainable_mask(params, model, preset="head", frozen="embedding/.*",
                             extra=r".*/lora_[ab]")  # fmt: skip


def test_frozen_params_freeze_lora_adapters_too():
    """``optimizer.frozen_params`` wins over the adapters LoRA adds, as over the preset."""
    model, shapes = shapes_of("vit_ti16")
    params = jax.tree.map(lambda s: jnp.zeros(s.shape), shapes["params"])
    params = lora.add_adapters(params, lora.LoraSpec(rank=2, alpha=2.0), jax.random.key(0))
    mask = optim.trainable_mask(params, model, preset="head", frozen=r".*/query/lora_[ab]",
                                extra=r".*/lora_[ab]")  # fmt: skip
    trained = {k for k, m in trees.flatten_dict(mask).items() if m}
    assert trained == {"head/kernel", "head/bias"} | {
        f"Transformer/encoderblock_{i}/MultiHeadDotProductAttention_1/value/lora_{ab}"
        for i in range(12)
        for ab in "ab"
    }


def test_a_multiplier_for_a_kernel_that_lora_freezes_names_its_adapters():
    params = {"query": {"lora_a": jnp.zeros((4, 2)), "lora_b": jnp.zeros((2, 4))}}
    with pytest.raises(ValueError, match=r"or name its LoRA adapters \('query/lora_a'\)"):
        optim.lr_multipliers(params, None, rules=((".*query/kernel", 2.0),),
                             frozen=["query/kernel"])  # fmt: skip


def test_memory_report_matches_the_pytrees():
    model, shapes = shapes_of("vit_ti16")
    params = jax.tree.map(lambda s: jnp.zeros(s.shape), shapes["params"])
    spec = lora.LoraSpec(rank=8, alpha=8.0)
    params = lora.add_adapters(params, spec, jax.random.key(0))
    mask = optim.trainable_mask(params, model, preset="head", frozen=None, extra=r".*/lora_[ab]")
    trainable, frozen = trees.partition(params, mask)
    tx = optax.adamw(1e-3)
    opt_state = tx.init(trainable)
    report = optim.memory_report(trainable, frozen, opt_state)
    n_adapters = 12 * 2 * (192 * 8 + 8 * 192)
    assert report["trainable_params"] == n_adapters + 192 * 10 + 10
    # ViT-Ti/16 without its 1000-way head, at 32 px (5 position embeddings instead of 197).
    assert report["frozen_params"] == 5_717_416 - (192 * 1000 + 1000) - (197 - 5) * 192
    assert report["trainable_bytes"] == 4 * report["trainable_params"]
    # Adam: two moments per trainable parameter plus a step count.
    assert report["optimizer_state_bytes"] == 2 * report["trainable_bytes"] + 4
    np.testing.assert_equal(
        sum(x.nbytes for x in jax.tree.leaves(opt_state)), report["optimizer_state_bytes"]
    )
    assert trees.combine(trainable, frozen).keys() == params.keys()
    assert flatten_dict(trees.combine(trainable, frozen)).keys() == flatten_dict(params).keys()


def test_bfloat16_first_moments_and_global_norm_clipping():
    model, shapes = shapes_of("vit_ti16")
    params = jax.tree.map(lambda s: jnp.ones(s.shape), shapes["params"])
    c = default_config()
    c.optimizer.mu_dtype = "bfloat16"
    c.optimizer.grad_clip_norm = 0.5
    c.optimizer.weight_decay = 0.0
    c.schedule.decay = "constant"
    tx = build_optimizer(c, params, model).tx
    state = tx.init(params)
    adam = [
        s for s in jax.tree.leaves(state, is_leaf=lambda x: hasattr(x, "mu")) if hasattr(s, "mu")
    ]
    assert {x.dtype for x in jax.tree.leaves(adam[0].mu)} == {jnp.dtype(jnp.bfloat16)}
    assert {x.dtype for x in jax.tree.leaves(adam[0].nu)} == {jnp.dtype(jnp.float32)}
    # Clipping: gradients of global norm 50 are scaled to norm 0.5 before Adam (so Adam's first
    # moment holds (1 - b1) * clipped gradient).
    grads = jax.tree.map(jnp.ones_like, params)
    norm = float(optax.global_norm(grads))
    grads = jax.tree.map(lambda g: g * 50.0 / norm, grads)
    _, new_state = tx.update(grads, state, params)
    adam = [s for s in jax.tree.leaves(new_state, is_leaf=lambda x: hasattr(x, "mu"))
            if hasattr(s, "mu")]  # fmt: skip
    mu_norm = float(optax.global_norm(jax.tree.map(lambda m: m.astype(jnp.float32), adam[0].mu)))
    assert mu_norm == pytest.approx(0.1 * 0.5, rel=1e-2)


def test_library_callers_need_no_epochs_or_frozen_regex():
    """From one's own loop: a schedule in steps needs no steps_per_epoch, one in epochs names
    it; trainable_mask needs no frozen regex."""
    model, shapes = shapes_of("cifar_resnet20", size=8)
    opt_spec = specs.OptimizerSpec("adamw", 1e-3, weight_decay=0.0, grad_clip_norm=None,
                                   trainable="all")  # fmt: skip
    schedule = specs.ScheduleSpec("cosine", warmup_steps=2)
    opt = optim.build_optimizer(opt_spec, schedule, shapes["params"], model, total_steps=10)
    assert float(opt.schedule(1)) == pytest.approx(opt_spec.learning_rate / 2)
    with pytest.raises(ValueError, match="warmup_epochs needs the steps per epoch"):
        epochs = specs.ScheduleSpec("cosine", warmup_epochs=1.0)
        optim.build_optimizer(opt_spec, epochs, shapes["params"], model, total_steps=10)
    mask = optim.trainable_mask(shapes["params"], model, preset="head")
    assert {k for k, v in flatten_dict(mask).items() if v} == {"head/kernel", "head/bias"}


def test_multiplier_rules_take_numpy_numbers_and_refuse_infinity():
    from vision_jax.masks import check_multiplier_rules

    check_multiplier_rules([("head/.*", np.float32(10)), ("x", np.int64(0))], what="rule")
    with pytest.raises(ValueError, match=r"rule \('head/\.\*', inf\): the value must be a finite"):
        check_multiplier_rules([("head/.*", float("inf"))], what="rule")
