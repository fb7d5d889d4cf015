"""Parameter-efficient fine-tuning in the training loop: frozen parameters, LoRA, gradient
accumulation, EMA and soft (mixup) targets."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from test_checkpoint_faults import flip_a_stored_bit
from test_train import small_config

from vision_jax import losses, optim, trees
from vision_jax.models import create_model
from vision_jax.report import FinalEvaluation
from vision_jax.steps import StepSettings, TrainState, make_train_step
from vision_jax.tasks import Classification, Detection, Segmentation
from vision_jax.train import train_and_evaluate
from vision_jax.trees import flatten_dict
from vision_jax.weights.files import WeightFormatError
from vision_jax.weights.run_dir import latest_step_dir, read_variables
from vision_jax.weights.run_dir import restore_on_one_device as _restore_on_one_device


def lora_vit_config():
    """Three AdamW steps of a ViT-Ti/16 with rank-4 LoRA on query/value, on digits."""
    return small_config(**{
        "model.name": "vit_ti16", "optimizer.name": "adamw", "optimizer.learning_rate": 1e-2,
        "lora.rank": 4, "lora.alpha": 8.0, "total_steps": 3,
    })  # fmt: skip


def _init_params(cfg, num_classes=10):
    model = create_model(cfg.model.name, num_classes=num_classes)
    init_rng, _ = jax.random.split(jax.random.key(cfg.seed))
    size = cfg.input.image_size
    v = model.init({"params": init_rng}, jnp.zeros((1, size, size, 3)), train=False)
    return flatten_dict(jax.tree.map(np.asarray, v["params"]))


def test_linear_probe_trains_only_the_head(tmp_path):
    cfg = small_config(**{"optimizer.trainable": "head", "total_steps": 3})
    init = _init_params(cfg)
    train_and_evaluate(cfg, str(tmp_path))
    after = flatten_dict(read_variables(str(tmp_path))["params"])
    assert after.keys() == init.keys()
    # (jit and eager initialisers differ in the last bits: compare with a tight tolerance)
    changed = {k for k in init if not np.allclose(init[k], after[k], rtol=1e-6, atol=1e-7)}
    assert changed == {"head/kernel", "head/bias"}
    # The step checkpoint holds only the head and its optimizer state; the frozen backbone is
    # stored once beside the checkpoints.
    state = _restore_on_one_device(os.path.join(latest_step_dir(str(tmp_path)), "state"))
    assert set(flatten_dict(state["params"])) == {"head/kernel", "head/bias"}
    opt_leaves = [x for x in jax.tree.leaves(state["opt_state"]) if np.ndim(x)]
    assert sorted(x.shape for x in opt_leaves) == [(10,), (64, 10)]  # SGD momentum: head only
    assert os.path.isdir(tmp_path / "frozen_params")
    # A flipped bit in the frozen backbone's stored bytes is named when the run is read.
    flipped = flip_a_stored_bit(tmp_path / "frozen_params")
    with pytest.raises(WeightFormatError, match=f"frozen_params is damaged: {flipped} holds other"):
        read_variables(str(tmp_path))


def test_damaged_or_missing_frozen_params_are_named(tmp_path):
    """Reading the run (predict, export, report) and resuming it refuse frozen parameters whose
    values changed, whose digests are damaged, or that are gone, in one line each."""
    from vision_jax.checkpoint import CheckpointError

    cfg = small_config(**{"optimizer.trainable": "head", "total_steps": 2})
    train_and_evaluate(cfg, str(tmp_path))
    frozen = tmp_path / "frozen_params"
    flip_a_stored_bit(frozen)
    longer = small_config(**{"optimizer.trainable": "head", "total_steps": 4})
    with pytest.raises(CheckpointError, match=r"frozen parameters in .*frozen_params cannot be "
                       r"used \(.* holds other values"):  # fmt: skip
        train_and_evaluate(longer, str(tmp_path))
    (frozen / "digest.json").write_text('{"layer1/0')
    with pytest.raises(WeightFormatError, match=r"digest.json is damaged: JSONDecodeError"):
        read_variables(str(tmp_path))
    frozen.rename(tmp_path / "elsewhere")
    with pytest.raises(WeightFormatError, match=r"frozen_params is missing: the run froze"):
        read_variables(str(tmp_path))


@pytest.mark.slow
def test_frozen_params_read_from_init_path_again_must_be_those_the_run_began_with(tmp_path):
    """frozen_params moved aside (as the error above advises): the resume reads them from
    init.path again and checks them against the digests each checkpoint records; weights
    changed since the run began are refused (they trained on silently)."""
    from safetensors.numpy import load_file, save_file

    from vision_jax.checkpoint import CheckpointError
    from vision_jax.weights import export_safetensors

    model = create_model("cifar_resnet20", num_classes=10)
    variables = model.init(jax.random.key(5), jnp.zeros((1, 16, 16, 3)), train=False)
    weights = tmp_path / "pretrained.safetensors"
    export_safetensors(jax.tree.map(np.asarray, variables), model, weights)
    run = tmp_path / "run"
    settings = {"optimizer.trainable": "head", "init.path": str(weights)}
    train_and_evaluate(small_config(**settings, total_steps=2), str(run))
    (run / "frozen_params").rename(tmp_path / "aside")
    original = load_file(str(weights))
    changed = dict(original)
    changed["layer1.0.conv1.weight"] = original["layer1.0.conv1.weight"] + 0.5
    save_file(changed, str(weights))
    with pytest.raises(CheckpointError, match=r"read from init.path again are not those the run "
                       r"began with: layer1/.* holds other values"):  # fmt: skip
        train_and_evaluate(small_config(**settings, total_steps=4), str(run))
    assert not (run / "frozen_params").exists()  # the changed weights were not saved
    save_file(original, str(weights))
    train_and_evaluate(small_config(**settings, total_steps=4), str(run))
    assert (run / "frozen_params").is_dir()


def test_a_resume_with_another_trainable_set_names_the_change(tmp_path):
    """The frozen params beside the checkpoints are another split than the config's: the
    error names the config change (as the state's does), and nothing is rewritten."""
    from vision_jax.checkpoint import CheckpointMismatchError

    train_and_evaluate(small_config(**{"optimizer.trainable": "head", "total_steps": 2}),
                       str(tmp_path))  # fmt: skip
    before = sorted(p.stat().st_mtime_ns for p in (tmp_path / "frozen_params").rglob("*"))
    other = small_config(**{"optimizer.trainable": "last:1", "total_steps": 4})
    with pytest.raises(CheckpointMismatchError, match=r"changed since: optimizer.trainable"):
        train_and_evaluate(other, str(tmp_path))
    assert sorted(p.stat().st_mtime_ns for p in (tmp_path / "frozen_params").rglob("*")) == before


@pytest.mark.slow
def test_a_run_that_froze_nothing_resumed_with_a_frozen_part_is_refused_quietly(tmp_path, caplog):
    """No warning about frozen parameters read from init.path (there is none): the refusal."""
    from vision_jax.checkpoint import CheckpointMismatchError

    train_and_evaluate(small_config(total_steps=2), str(tmp_path))
    head = small_config(**{"optimizer.trainable": "head", "total_steps": 4})
    with caplog.at_level("WARNING"), pytest.raises(CheckpointMismatchError, match="trainable"):
        train_and_evaluate(head, str(tmp_path))
    assert "No frozen parameters beside" not in caplog.text


@pytest.mark.slow
def test_lora_trains_only_adapters_and_head_and_exports_merged(tmp_path):
    cfg = lora_vit_config()
    init = _init_params(cfg)
    final = FinalEvaluation()
    result = train_and_evaluate(cfg, str(tmp_path), final=final)
    assert np.isfinite(result["eval/loss"])
    assert final.step_dir is None  # a report predicts with the merged model, as it was saved
    state = _restore_on_one_device(os.path.join(latest_step_dir(str(tmp_path)), "state"))
    trained = set(flatten_dict(state["params"]))
    adapters = {k for k in trained if k.rsplit("/", 1)[-1] in ("lora_a", "lora_b")}
    assert trained - adapters == {"head/kernel", "head/bias"}
    assert len(adapters) == 12 * 2 * 2  # query and value of 12 blocks, a and b each
    # Adam moments (mu, nu) for the trainable leaves only.
    n_trainable = sum(np.size(x) for x in jax.tree.leaves(state["params"]))
    opt = sum(np.size(x) for x in jax.tree.leaves(state["opt_state"]) if np.ndim(x))
    assert opt == 2 * n_trainable
    # read_variables merges the adapters: the plain model's structure, with changed q/v kernels.
    merged = flatten_dict(read_variables(str(tmp_path))["params"])
    assert merged.keys() == init.keys()
    q = "Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel"
    k = "Transformer/encoderblock_0/MultiHeadDotProductAttention_1/key/kernel"
    assert not np.allclose(merged[q], init[q], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(merged[k], init[k], rtol=1e-6, atol=1e-7)


def test_lora_and_trainable_preset_conflict(tmp_path):
    cfg = small_config(**{"model.name": "vit_ti16", "lora.rank": 2, "optimizer.trainable": "head"})
    with pytest.raises(ValueError, match="both choose what trains"):
        train_and_evaluate(cfg, str(tmp_path))


def _vit_step_inputs(batch_size=8, depth=12):
    model = create_model("vit_ti16", num_classes=5, depth=depth)
    x = jax.random.normal(jax.random.key(0), (batch_size, 32, 32, 3))
    y = jax.random.randint(jax.random.key(1), (batch_size,), 0, 5)
    params = model.init(jax.random.key(2), x[:1])["params"]
    params["head"]["kernel"] = 0.1 * jax.random.normal(jax.random.key(3), (192, 5))
    return model, {"image": x, "label": y}, params


def _one_step_each(model, tx, task, params, batch, accum: int) -> list[tuple]:
    """(new state, metrics) of one train step on ``batch``, without and with ``accum``
    micro-batches, at the highest matmul precision."""
    state = TrainState(jnp.array(0, jnp.int32), params, {}, tx.init(params))
    results = []
    for k in (1, accum):
        step = jax.jit(make_train_step(model, tx, task, accum_steps=k))
        with jax.default_matmul_precision("highest"):
            new_state, metrics = step(state, {}, batch, StepSettings(jax.random.key(0)))
        results.append((new_state, metrics.compute()))
    return results


@pytest.mark.parametrize("accum", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_gradient_accumulation_equals_the_large_batch(accum):
    model, batch, params = _vit_step_inputs(depth=2)
    # SGD is linear in the gradient, so parameter equality is gradient equality (Adam's first
    # step is about lr * sign(g) and would amplify rounding in near-zero gradients).
    tx = optax.sgd(1.0, momentum=0.9)
    (big, big_m), (acc, acc_m) = _one_step_each(model, tx, Classification(), params, batch, accum)
    assert float(acc_m["loss"]) == pytest.approx(float(big_m["loss"]), abs=1e-5)
    assert float(acc_m["accuracy"]) == pytest.approx(float(big_m["accuracy"]), abs=1e-6)
    assert float(acc_m["grad_norm"]) == pytest.approx(float(big_m["grad_norm"]), rel=1e-5)
    for a, b in zip(jax.tree.leaves(acc.params), jax.tree.leaves(big.params), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_micro_batches_that_do_not_divide_the_batch_are_named():
    model, batch, params = _vit_step_inputs(batch_size=4, depth=1)
    tx = optax.sgd(0.1)
    state = TrainState(jnp.array(0, jnp.int32), params, {}, tx.init(params))
    step = jax.jit(make_train_step(model, tx, Classification(), accum_steps=3))
    with pytest.raises(ValueError, match="batch of 4 examples cannot be split into 3 micro"):
        step(state, {}, batch, StepSettings(jax.random.key(0)))


def _dense_batch(task_name: str, batch_size: int = 4, size: int = 32) -> dict:
    """A batch whose examples have very different loss denominators: segmentation label maps
    mostly ignored in some images, detection images with 0 to 3 boxes."""
    rng = np.random.default_rng(0)
    batch = {"image": rng.standard_normal((batch_size, size, size, 3)).astype(np.float32)}
    if task_name == "segmentation":
        labels = rng.integers(0, 3, (batch_size, size, size))
        for i in range(batch_size):
            labels[i, : size * i // batch_size + 2] = 255  # ignored rows: more in later images
        batch["label_map"] = labels.astype(np.int32)
        return batch
    boxes = np.zeros((batch_size, 3, 4), np.float32)
    valid = np.zeros((batch_size, 3), bool)
    for i in range(batch_size):
        for j in range(i % 4):
            x0, y0 = rng.uniform(0, size / 2, 2)
            boxes[i, j] = [x0, y0, x0 + rng.uniform(6, size / 2), y0 + rng.uniform(6, size / 2)]
            valid[i, j] = True
    batch.update(boxes=boxes, valid=valid, classes=rng.integers(0, 3, (batch_size, 3)),
                 crowd=np.zeros((batch_size, 3), bool))  # fmt: skip
    return batch


@pytest.mark.parametrize(
    "task",
    [Segmentation(), pytest.param(Detection(strides=(8, 16)), marks=pytest.mark.slow)],
    ids=lambda t: t.name,
)
def test_gradient_accumulation_equals_the_large_batch_for_dense_tasks(task):
    """Losses normalised by valid pixels or positive locations: every micro-batch divides by
    the whole batch's count (a micro-batch's own count weighted its few pixels as many)."""
    model = task.build_model("vit_ti16", 3, depth=1)
    batch = jax.tree.map(jnp.asarray, _dense_batch(task.name))
    params = model.init(jax.random.key(2), batch["image"][:1], train=False)["params"]
    params = jax.tree.map(
        lambda p: p + 0.05 * jax.random.normal(jax.random.key(3), p.shape), params
    )
    (big, big_m), (acc, acc_m) = _one_step_each(model, optax.sgd(1.0), task, params, batch, 2)
    assert float(acc_m["loss"]) == pytest.approx(float(big_m["loss"]), rel=1e-5)
    assert float(acc_m["grad_norm"]) == pytest.approx(float(big_m["grad_norm"]), rel=1e-4)
    for key in big_m:  # every training metric, e.g. the pixel accuracy over the valid pixels
        assert float(acc_m[key]) == pytest.approx(float(big_m[key]), rel=1e-5, abs=1e-7), key
    for a, b in zip(jax.tree.leaves(acc.params), jax.tree.leaves(big.params), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.slow  # test_ema_is_evaluated_alongside covers EMA in the default run
def test_ema_tracks_the_params():
    model, batch, params = _vit_step_inputs()
    tx = optax.sgd(0.1)
    state = TrainState(jnp.array(0, jnp.int32), params, {}, tx.init(params),
                       jax.tree.map(jnp.copy, params))  # fmt: skip
    step = jax.jit(make_train_step(model, tx, Classification()))
    settings = StepSettings(jax.random.key(0), ema_step=jnp.float32(0.1))
    history = [params]
    for _ in range(3):
        state, _ = step(state, {}, batch, settings)
        history.append(state.params)
    expected = history[0]
    for p in history[1:]:
        expected = jax.tree.map(lambda e, q: 0.9 * e + 0.1 * q, expected, p)
    for a, b in zip(jax.tree.leaves(state.ema_params), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_ema_warmup_is_timms_model_ema_v3(timm, caplog):
    """``ema_warmup``: each step's decay is timm's ``ModelEmaV3(use_warmup=True).get_decay``
    (timm's step = updates made, ours 1 more), so the EMA starts from the first updated
    weights; without it, ``ema_decay`` throughout, and a run too short for it is warned."""
    import logging
    from types import SimpleNamespace

    from timm.utils.model_ema import ModelEmaV3
    from torch import nn

    from vision_jax import run, specs
    from vision_jax.config import TrackedConfig
    from vision_jax.steps import EMA_WARMUP_POWER, ema_step_size

    steps = np.array([0, 1, 2, 5, 30, 31, 100, 5000, 31621, 31622, 10**6])
    for decay in (0.999, 0.9998):
        timms = ModelEmaV3(nn.Linear(1, 1), decay=decay, use_warmup=True)
        expected = [timms.get_decay(int(t) + 1) for t in steps]
        sizes = [ema_step_size(jnp.int32(t), np.float32(1 - decay), np.float32(EMA_WARMUP_POWER))
                 for t in steps]  # fmt: skip
        np.testing.assert_allclose(1 - np.array(sizes), expected, atol=2e-7)
        assert ema_step_size(jnp.int32(7), np.float32(1 - decay), None) == np.float32(1 - decay)

    model, batch, params = _vit_step_inputs(depth=1)
    tx = optax.sgd(0.1)
    state = TrainState(jnp.array(0, jnp.int32), params, {}, tx.init(params),
                       jax.tree.map(jnp.copy, params))  # fmt: skip
    step = jax.jit(make_train_step(model, tx, Classification()))
    settings = StepSettings(jax.random.key(0), ema_step=jnp.float32(0.1),
                            ema_warmup=jnp.float32(EMA_WARMUP_POWER))  # fmt: skip
    state, _ = step(state, {}, batch, settings)
    for a, b in zip(jax.tree.leaves(state.ema_params), jax.tree.leaves(state.params), strict=True):
        np.testing.assert_array_equal(a, b)  # decay 0 at the first update
    first = state.params
    state, _ = step(state, {}, batch, settings)
    d = ModelEmaV3(nn.Linear(1, 1), decay=0.9, use_warmup=True).get_decay(2)
    expected = jax.tree.map(lambda e, q: d * e + (1 - d) * q, first, state.params)
    for a, b in zip(jax.tree.leaves(state.ema_params), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)

    with pytest.raises(specs.ConfigError, match="ema_warmup warms up the EMA of the parameters"):
        specs.run_spec(TrackedConfig(small_config(ema_warmup=True)))
    spec = specs.run_spec(TrackedConfig(small_config(ema_warmup=True, ema_decay=0.999)))
    assert spec.ema_warmup and spec.config["ema_warmup"] is True and run._in_recipe("ema_warmup")
    with caplog.at_level(logging.WARNING):
        run._warn_of_a_slow_ema(SimpleNamespace(ema_decay=0.999, ema_warmup=True), 100)
        run._warn_of_a_slow_ema(SimpleNamespace(ema_decay=0.999, ema_warmup=False), 1000)
    assert not caplog.text
    with caplog.at_level(logging.WARNING):
        run._warn_of_a_slow_ema(SimpleNamespace(ema_decay=0.999, ema_warmup=False), 100)
    assert ("ema_decay=0.999 over 100 steps: the EMA weights would still be 90% the initial "
            "weights at the end (ema_decay ** total_steps = 0.905); set ema_warmup=True"
            ) in caplog.text  # fmt: skip


def test_ema_is_evaluated_alongside(tmp_path):
    """The EMA is evaluated beside the trained parameters; ``init.ema`` starts a new run from
    the run's EMA (parameters and BatchNorm statistics) or its trained ones, None from the
    ones its selection measured (here the trained: it selected on nothing). Only with
    ``init.path``, of a run (a file holds one set of weights)."""
    from vision_jax import run, sharding, specs
    from vision_jax.config import TrackedConfig

    result = train_and_evaluate(small_config(ema_decay=0.5, total_steps=2), str(tmp_path))
    assert {"eval_ema/top1", "eval_ema/loss", "eval/top1"} <= set(result)
    assert result["eval_ema/examples"] == result["eval/examples"] == 360

    def initial(**init):
        spec = specs.run_spec(TrackedConfig(small_config(**{"init.path": str(tmp_path), **init})))
        model, mesh = run.task_model(spec, 10), sharding.create_mesh(spec.mesh)
        variables, *_ = run.create_variables(spec, model, spec.input, mesh, jax.random.key(1))
        return flatten_dict(jax.device_get(variables))

    trained, ema = (flatten_dict(read_variables(tmp_path, ema=e)) for e in (False, True))
    assert not np.allclose(trained["params/head/kernel"], ema["params/head/kernel"])
    for init, expected in ({}, trained), ({"init.ema": False}, trained), ({"init.ema": True}, ema):
        got = initial(**init)
        assert got.keys() == expected.keys() and any("batch_stats" in k for k in got), init
        for key, value in got.items():
            np.testing.assert_array_equal(value, expected[key], err_msg=f"{init} {key}")
    np.savez(tmp_path / "w.npz", **{"head/kernel": trained["params/head/kernel"]})
    with pytest.raises(WeightFormatError, match=r"w.npz \(npz\) holds one set of weights: "
                       r"ema=True \(init.ema\) chooses"):  # fmt: skip
        initial(**{"init.path": str(tmp_path / "w.npz"), "init.ema": True})
    with pytest.raises(specs.ConfigError, match=r"init.ema only applies with init.path"):
        specs.run_spec(TrackedConfig(small_config(**{"init.ema": True})))


def test_the_ema_averages_batchnorm_statistics_and_evaluates_with_them():
    """As timm's EMA averages a model's buffers: the EMA of the BatchNorm statistics is the
    same average as the parameters' (a numpy reference over 3 steps), and the EMA evaluation
    applies the EMA parameters with those statistics."""
    from vision_jax.steps import evaluated_weights, make_eval_step

    model = create_model("cifar_resnet20", num_classes=10)
    rng = np.random.default_rng(0)
    batch = {"image": jnp.asarray(rng.normal(size=(8, 16, 16, 3)), jnp.float32),
             "label": jnp.asarray(rng.integers(0, 10, 8), jnp.int32),
             "mask": jnp.ones(8, jnp.float32)}  # fmt: skip
    variables = model.init(jax.random.key(0), batch["image"], train=False)
    params = variables["params"]
    model_state = {k: v for k, v in variables.items() if k != "params"}
    tx = optax.sgd(0.1)
    copy = lambda tree: jax.tree.map(jnp.copy, tree)
    state = TrainState(jnp.array(0, jnp.int32), params, model_state, tx.init(params),
                       copy(params), ema_model_state=copy(model_state))  # fmt: skip
    step = jax.jit(make_train_step(model, tx, Classification()))
    settings = StepSettings(jax.random.key(0), ema_step=jnp.float32(0.25))
    expected = jax.tree.map(np.asarray, model_state)
    for _ in range(3):
        state, _ = step(state, {}, batch, settings)
        expected = jax.tree.map(lambda e, x: 0.75 * e + 0.25 * np.asarray(x), expected,
                                state.model_state)  # fmt: skip
    for a, b in zip(jax.tree.leaves(state.ema_model_state), jax.tree.leaves(expected),
                    strict=True):  # fmt: skip
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    stats = flatten_dict(state.ema_model_state)
    assert any(not np.allclose(v, flatten_dict(state.model_state)[k]) for k, v in stats.items())
    _, predictions = jax.jit(make_eval_step(model, Classification()))(
        *evaluated_weights(state, ema=True), {}, batch
    )
    logits = model.apply({"params": state.ema_params, **state.ema_model_state}, batch["image"],
                         train=False)  # fmt: skip
    np.testing.assert_allclose(predictions["probabilities"], jax.nn.softmax(logits), atol=1e-6)


def test_frozen_params_get_no_gradient_or_update():
    model, batch, params = _vit_step_inputs()
    mask = optim.trainable_mask(params, model, preset="last:1", frozen=None)
    trainable, frozen = trees.partition(params, mask)
    tx = optax.adam(1e-2)
    state = TrainState(jnp.array(0, jnp.int32), trainable, {}, tx.init(trainable))
    step = jax.jit(make_train_step(model, tx, Classification()))
    new_state, _ = step(state, frozen, batch, StepSettings(jax.random.key(0)))
    assert set(flatten_dict(new_state.params)) == set(flatten_dict(trainable))
    assert all(k.startswith(("head/", "Transformer/encoder_norm/", "Transformer/encoderblock_11/"))
               for k in flatten_dict(new_state.params))  # fmt: skip
    moments = [x.shape for x in jax.tree.leaves(new_state.opt_state) if np.ndim(x)]
    assert sorted(moments) == sorted(2 * [x.shape for x in jax.tree.leaves(trainable)])
    assert any(not np.allclose(a, b) for a, b in zip(
        jax.tree.leaves(new_state.params), jax.tree.leaves(trainable), strict=True))  # fmt: skip


def test_soft_targets_replace_labels_and_smooth_after_mixing():
    batch = {"label": jnp.array([0, 2]),
             "soft_label": jnp.array([[0.7, 0.3, 0.0], [0.0, 0.4, 0.6]])}  # fmt: skip
    t = losses.targets_of(batch, 3, 0.3)
    np.testing.assert_allclose(t, 0.7 * batch["soft_label"] + 0.1, atol=1e-7)
    hard = losses.targets_of({"label": batch["label"]}, 3, 0.0)
    np.testing.assert_array_equal(hard, jax.nn.one_hot(batch["label"], 3))
    logits = jnp.array([[2.0, 1.0, 0.0], [0.0, 1.0, 3.0]])
    ref = -np.sum(np.asarray(t) * np.asarray(jax.nn.log_softmax(logits)), axis=-1)
    np.testing.assert_allclose(losses.softmax_xent(logits, t), ref, rtol=1e-6)


def test_the_state_takes_over_the_trainable_parameters_buffers():
    """The fresh train state holds the initialised trainable parameters in their own buffers
    (donated, not copied: one copy of the model while the state is built); the frozen ones
    stay outside the state, readable, and the memory report still counts both."""
    from vision_jax import run, sharding, specs
    from vision_jax.config import TrackedConfig

    spec = specs.run_spec(TrackedConfig(small_config(**{"optimizer.frozen_params": "conv1/.*"})))
    model, mesh = run.task_model(spec, 10), sharding.create_mesh(spec.mesh)
    variables, shardings, _ = run.create_variables(spec, model, spec.input, mesh, jax.random.key(0))
    pointers = {k: v.unsafe_buffer_pointer() for k, v in flatten_dict(variables["params"]).items()}
    frozen_before = jax.device_get(variables["params"]["conv1"])
    setup = run.create_train_state(
        spec, model, variables, shardings, mesh, total_steps=4, steps_per_epoch=11
    )
    trainable = flatten_dict(setup.state.params)
    assert trainable and all(v.unsafe_buffer_pointer() == pointers[k] for k, v in trainable.items())
    inputs = flatten_dict(variables["params"])
    assert all(inputs[k].is_deleted() for k in trainable)
    frozen = flatten_dict(setup.frozen)
    assert set(frozen) == {"conv1/kernel"} and not inputs["conv1/kernel"].is_deleted()
    np.testing.assert_array_equal(setup.frozen["conv1"]["kernel"], frozen_before["kernel"])
    assert setup.memory["frozen_params"] == frozen_before["kernel"].size
    assert setup.memory["trainable_params"] == sum(v.size for v in trainable.values())


def test_the_ema_averages_floating_state_and_keeps_counters_new():
    """A model state may hold an integer counter: the EMA takes its new value (averaging it
    would change its dtype, which the step's branches refuse)."""
    from vision_jax.steps import _average

    new = {"mean": jnp.array([1.0, 3.0]), "count": jnp.array(7, jnp.int32)}
    old = {"mean": jnp.array([3.0, 3.0]), "count": jnp.array(5, jnp.int32)}
    out = jax.jit(_average)(new, old, jnp.float32(0.25))
    np.testing.assert_allclose(out["mean"], [2.5, 3.0])
    assert out["count"].dtype == jnp.int32 and int(out["count"]) == 7
