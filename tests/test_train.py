"""The training loop end to end on CPU: steps, multi-device equivalence, exact eval, resume,
TensorBoard logs and clear errors on bad input."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import pathlib
import re
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_declared_metrics

from vision_jax import specs
from vision_jax.checkpoint import CheckpointError
from vision_jax.config import TrackedConfig, UnreadConfigKeysError, default_config
from vision_jax.tasks import Classification
from vision_jax.train import train_and_evaluate
from vision_jax.trees import flatten_dict
from vision_jax.weights import WeightFormatError
from vision_jax.weights.run_dir import (
    latest_step_dir,
    read_record,
    read_variables,
    restore_on_one_device,
)

ROOT = pathlib.Path(__file__).resolve().parents[1]


def small_config(**overrides):
    """A few steps of CIFAR ResNet-20 on 16-pixel digits: fast on 2 cores."""
    c = default_config()
    c.model.name = "cifar_resnet20"
    c.data.source = "digits"
    c.input.image_size = 16
    c.input.random_crop = False
    c.batch_size = 32
    c.eval_batch_size = 48  # 360 test digits = 7.5 batches: the last one is padded
    c.total_epochs = None
    c.total_steps = 4
    c.optimizer.name = "sgd"
    c.optimizer.learning_rate = 0.05
    c.log_every_steps = 2
    c.eval_every_steps = 0
    c.checkpoint_every_steps = 2
    for key, value in overrides.items():
        node = c
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c


def test_train_loop_learns_and_reports(tmp_path):
    cfg = small_config(
        total_steps=40, eval_before_training=True, **{"optimizer.learning_rate": 0.1}
    )
    result = train_and_evaluate(cfg, str(tmp_path))
    assert result["eval/examples"] == 360  # every test digit once, padding excluded
    assert_declared_metrics(result, Classification)
    assert result["eval_before/top1"] < 0.3
    assert result["eval/top1"] > 0.3  # chance is 0.1
    assert result["train/learning_rate"] >= 0
    again = train_and_evaluate(cfg, str(tmp_path))  # started again, it reports the same
    assert again["eval_before/top1"] == result["eval_before/top1"]
    assert again["eval/top1"] == result["eval/top1"]
    # TensorBoard event files hold the scalars.
    from tensorboard.backend.event_processing import event_accumulator

    events = event_accumulator.EventAccumulator(str(tmp_path), size_guidance={"tensors": 0})
    events.Reload()
    tags = set(events.Tags()["tensors"])
    assert {"train/loss", "eval/top1", "train/learning_rate", "train/images_per_sec"} <= tags
    last = events.Tensors("eval/top1")[-1]
    assert last.step == 40
    assert float(
        jax.numpy.asarray(
            np.frombuffer(last.tensor_proto.tensor_content, np.float32)
            if last.tensor_proto.tensor_content
            else last.tensor_proto.float_val
        )[0]
    ) == pytest.approx(result["eval/top1"], abs=1e-6)
    # ... and the config, as TensorBoard's HParams plugin reads it.
    from tensorboard.plugins.hparams import metadata

    content = events.SummaryMetadata(metadata.SESSION_START_INFO_TAG).plugin_data.content
    hparams = metadata.parse_session_start_info_plugin_data(content).hparams
    assert hparams["optimizer.learning_rate"].number_value == pytest.approx(0.1)
    assert hparams["total_steps"].number_value == 40


def test_eval_is_exact_over_every_example(tmp_path):
    """The padded, masked eval equals a plain numpy computation over all test examples."""
    from vision_jax import data as data_lib
    from vision_jax.config import TrackedConfig
    from vision_jax.models import create_model

    cfg = small_config(total_steps=2)
    result = train_and_evaluate(cfg, str(tmp_path))
    variables = read_variables(str(tmp_path))
    tc = TrackedConfig(cfg)
    source = data_lib.load_source(tc.data, "test")
    spec = specs.input_spec(tc.input)
    images, labels = [], []
    for batch in data_lib.eval_batches(source, spec, global_batch=1000):
        keep = batch["mask"] > 0
        images.append(batch["image"][keep])
        labels.append(batch["label"][keep])
    images, labels = np.concatenate(images), np.concatenate(labels)
    model = create_model("cifar_resnet20", num_classes=10)
    logits = np.asarray(model.apply(variables, jnp.asarray(images), train=False))
    top1 = np.mean(logits.argmax(-1) == labels)
    top5 = np.mean(
        [label in np.argsort(-row)[:5] for row, label in zip(logits, labels, strict=True)]
    )
    logp = (
        logits
        - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
        - logits.max(-1, keepdims=True)
    )
    loss = -np.mean(logp[np.arange(len(labels)), labels])
    assert len(labels) == 360
    assert result["eval/top1"] == pytest.approx(top1, abs=1e-6)
    assert result["eval/top5"] == pytest.approx(top5, abs=1e-6)
    assert result["eval/loss"] == pytest.approx(loss, rel=1e-4)


def test_topk_correct_never_counts_a_nan_logit_as_correct():
    """A NaN logit ranks lowest (``lax.top_k`` alone ranks it highest): an example whose label's
    logit is NaN, or whose logits are all NaN, is wrong; ties go to the lower class index."""
    from vision_jax.tasks.classification import topk_correct

    rng = np.random.default_rng(0)
    logits = rng.integers(-2, 3, size=(64, 7)).astype(np.float32)  # many ties
    logits[rng.random(logits.shape) < 0.3] = np.nan
    logits[rng.random(logits.shape) < 0.1] = -np.nan  # lax.top_k ranks -NaN lowest, NaN highest
    logits[:4] = np.nan  # all NaN
    labels = rng.integers(0, 7, size=64).astype(np.int32)
    labels[:4] = 0

    def reference(k):
        own = logits[np.arange(len(labels)), labels][:, None]
        ahead = (logits > own) | ((logits == own) & (np.arange(7) < labels[:, None]))
        return (ahead.sum(-1) < k) & ~np.isnan(own[:, 0])

    for k in (1, 5, 7):
        got = topk_correct(jnp.asarray(logits), jnp.asarray(labels), k)
        np.testing.assert_array_equal(np.asarray(got), reference(k).astype(np.float32))
    assert not np.asarray(topk_correct(jnp.asarray(logits[:4]), jnp.asarray(labels[:4]), 1)).any()


def test_evaluation_fetches_a_batch_once_the_next_is_dispatched(monkeypatch):
    """The host waits for a batch's results only after the next batch's step is queued (an
    accelerator is not left idle between batches); the merged metrics and the predictions each
    batch's observer sees are those of that batch, in order."""
    from clu import metrics as clu_metrics

    from vision_jax import sharding, steps

    Mean = clu_metrics.Collection.create(mean=clu_metrics.Average.from_output("x"))
    events = []

    def eval_step(params, model_state, frozen, batch):
        events.append(f"step {int(batch['i'][0])}")
        return Mean.single_from_model_output(x=batch["x"]), {"x": batch["x"] * 2}

    fetch = jax.device_get
    monkeypatch.setattr(jax, "device_get", lambda tree: events.append("fetch") or fetch(tree))
    values = np.arange(12, dtype=np.float32).reshape(3, 4)
    batches = [{"i": np.full(4, i, np.int32), "x": v} for i, v in enumerate(values)]
    seen = []
    total = steps.evaluate(
        eval_step, (None, None), None, iter(batches),
        sharding.create_mesh("data:1", jax.devices()[:1]),
        observe=lambda batch, found: seen.append((int(batch["i"][0]), found["x"])),
    )  # fmt: skip
    assert events == ["step 0", "step 1", "fetch", "step 2", "fetch", "fetch"]
    assert float(total.compute()["mean"]) == pytest.approx(values.mean())
    assert [i for i, _ in seen] == [0, 1, 2]
    np.testing.assert_array_equal(np.stack([x for _, x in seen]), values * 2)


def _params_of(workdir):
    return jax.tree_util.tree_leaves(read_variables(str(workdir)))


def test_resume_gives_the_same_parameters_as_an_uninterrupted_run(tmp_path):
    cfg = small_config(total_steps=6, checkpoint_every_steps=3, keep_checkpoints=5)
    cfg.input.random_crop = True  # augmentation randomness must resume too
    cfg.input.resize_size = 20
    full = tmp_path / "full"
    train_and_evaluate(cfg, str(full))
    interrupted = tmp_path / "interrupted"
    train_and_evaluate(cfg, str(interrupted))
    # Simulate a preemption after step 3: drop the later checkpoint, then run the same command.
    shutil.rmtree(interrupted / "checkpoints" / "6")
    assert sorted(os.listdir(interrupted / "checkpoints")) == ["3"]
    train_and_evaluate(cfg, str(interrupted))
    for a, b in zip(_params_of(full), _params_of(interrupted), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_an_eval_batch_larger_than_the_splits_is_named(tmp_path, caplog):
    """An eval batch of 2000 for 360 test images padded every evaluation to 2000 rows (a
    MemoryError for 224 px images) without a word; it is named, with the size that is enough."""
    from vision_jax import run

    for eval_batch, warned in ((2000, True), (360, False)):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            built = run.build_run(small_config(eval_batch_size=eval_batch), str(tmp_path / "r"))
            built.checkpointer.close()
        assert built.eval_source.num_examples == 360
        message = ("eval_batch_size 2000 exceeds the 360 examples of the largest split "
                   "evaluated: each batch is padded to 2000 rows (memory and compute); "
                   "eval_batch_size=360 is enough.")  # fmt: skip
        assert (message in caplog.text) == warned, caplog.text


def test_a_run_stopped_before_its_end_is_not_called_finished(tmp_path):
    """A run stopped at step 2 of 4 (a signal; here its later checkpoint removed), started with
    total_steps=2, is refused as a changed recipe that would train nothing, naming it as
    stopped before its end, not as finished. A workdir may be a pathlib.Path (a TypeError)."""
    train_and_evaluate(small_config(total_steps=4), tmp_path)
    shutil.rmtree(tmp_path / "checkpoints" / "4")
    stopped = r"\(step 2\) has stopped before its end \(step 4 of its recipe\); with the changed"
    with pytest.raises(CheckpointError, match=stopped + r" recipe \(total_steps 4 -> 2\)"):
        train_and_evaluate(small_config(total_steps=2), str(tmp_path))


def test_a_finished_run_given_other_training_examples_is_refused_unless_allowed(tmp_path, caplog):
    """A finished run started again on other training arrays would report the run trained on
    the first ones: refused as a resume on them is; with resume_changed_data it reports again
    and trains nothing."""
    rng = np.random.default_rng(0)
    toy = lambda n: (rng.integers(0, 255, (n, 16, 16, 3), np.uint8), rng.integers(0, 3, n))
    test = toy(16)
    names = {"data.source": "arrays", "data.class_names": ("a", "b", "c")}
    config = small_config(total_steps=2, batch_size=8, eval_batch_size=16, **names)
    first = train_and_evaluate(config, str(tmp_path), arrays={"train": toy(32), "test": test})
    other = {"train": toy(32), "test": test}
    refused = r"Cannot report \S+ \(step 2\) again as it trained: the training examples chan"
    with pytest.raises(CheckpointError, match=refused + ".* to report it again anyway"):
        train_and_evaluate(config, str(tmp_path), arrays=other)  # (nothing is resumed)
    config.resume_changed_data = True
    with caplog.at_level(logging.WARNING):
        again = train_and_evaluate(config, str(tmp_path), arrays=other)
    assert "again although the training examples changed" in caplog.text
    assert again["eval/top1"] == first["eval/top1"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("[0-9]*")) == ["2"]


def test_an_integer_key_an_earlier_version_saved_as_a_float_is_no_change():
    """A dict config's total_steps=4.0 ran and was recorded as 4.0 before integer keys refused
    floats: the same run's config now (4) is no change (it was 'total_steps 4.0 -> 4', and a
    finished run so refused had no value left that both versions accept)."""
    import json

    from vision_jax import run, specs

    spec = specs.run_spec(TrackedConfig(small_config(total_steps=4)))
    saved = json.loads(json.dumps(spec.config))
    saved["total_steps"], saved["lora"]["rank"] = 4.0, 0.0
    assert run._config_changes(saved, spec, lambda key: True) == []
    saved["total_steps"] = 5
    assert run._config_changes(saved, spec, lambda key: True) == ["total_steps 5 -> 4"]


def test_a_key_an_earlier_version_did_not_record_is_compared_as_its_default():
    """A run of a version without ema_warmup resumed with ema_warmup=True: the change is named
    as other recipe changes are (keys only one config had were not compared); its default is
    no change; a key whose default is None (resolved later) stays uncompared."""
    import json

    from vision_jax import run, specs

    spec = specs.run_spec(TrackedConfig(small_config(ema_decay=0.99, ema_warmup=True)))
    saved = json.loads(json.dumps(spec.config))
    del saved["ema_warmup"], saved["total_steps"]  # total_steps: default None
    assert run._config_changes(saved, spec, run._in_recipe) == ["ema_warmup false -> true"]
    spec = specs.run_spec(TrackedConfig(small_config(ema_decay=0.99)))
    assert run._config_changes(saved, spec, run._in_recipe) == []


def test_data_paths_are_recorded_absolute_and_an_earlier_relative_one_reads_as_before(
    tmp_path, monkeypatch
):
    """data.root, data.data_dir and init.path given relative to the launch directory are
    recorded absolute (predict, evaluate and report run later from elsewhere); URLs stay as
    given; a saved run of an earlier version that recorded a relative root (or init.path) reads
    it against the current directory, and a resume compares it so (no change from the same
    folder given now)."""
    from vision_jax import run
    from vision_jax.config import saved_with_defaults

    monkeypatch.chdir(tmp_path)
    spec = specs.run_spec(TrackedConfig(small_config(**{"data.source": "csv", "data.root": "d"})))
    assert spec.data.root == spec.config["data"]["root"] == str(tmp_path / "d")
    tfds = small_config(**{"data.source": "tfds", "data.name": "mnist", "data.data_dir": "t"})
    assert specs.run_spec(TrackedConfig(tfds)).config["data"]["data_dir"] == str(tmp_path / "t")
    url = small_config(**{"data.source": "csv", "data.root": "gs://bucket/d"})
    assert specs.run_spec(TrackedConfig(url)).data.root == "gs://bucket/d"
    weights = small_config(**{"data.source": "csv", "data.root": "d", "init.path": "pre/w.npz"})
    spec = specs.run_spec(TrackedConfig(weights))
    assert spec.init.path == spec.config["init"]["path"] == str(tmp_path / "pre" / "w.npz")
    saved = json.loads(json.dumps(spec.config))
    saved["data"]["root"], saved["init"]["path"] = "d", "pre/w.npz"  # an earlier version's
    assert run._config_changes(saved, spec, lambda key: True) == []
    with specs.saved_config():
        read = specs.run_spec(TrackedConfig(saved_with_defaults(saved)))
    assert read.data.root == "d" and read.init.path == "pre/w.npz"


def test_the_log_says_what_memory_each_step_needs(tmp_path, caplog):
    """XLA's memory plan of the train and eval steps, per device, is logged as they compile (an
    out-of-memory error names no step); the figures are the compiled steps' own. The trained
    and the EMA parameters are evaluated by one program (each was compiled on its own)."""
    with caplog.at_level(logging.INFO):
        train_and_evaluate(small_config(total_steps=1, ema_decay=0.9), str(tmp_path))
    lines = [r.getMessage() for r in caplog.records if "memory per device" in r.getMessage()]
    assert sorted(line.split(" memory")[0] for line in lines) == [
        "Eval step", "Train step"
    ]  # fmt: skip
    pattern = r"memory per device \(XLA's plan\): ([\d,]+) MiB of temporaries, ([\d,]+) MiB"
    for line in lines:
        found = re.search(pattern, line).groups()
        temporaries, arguments = (int(v.replace(",", "")) for v in found)
        assert arguments > 0 and temporaries >= 0


def test_the_parameter_table_counts_a_scalar_parameter_as_one_integer():
    """A parameter of shape () (a detection model's learned scale) counts as 1, not clu's
    ``np.prod(())`` (the float 1.0), which made the logged total ``Total: 5,863,027.0``."""
    import flax.linen as nn

    from vision_jax.train import parameter_table

    class Scaled(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(3)(x) * self.param("scale", nn.initializers.ones, ())

    params = Scaled().init(jax.random.PRNGKey(0), jnp.ones((1, 2)))["params"]
    table = parameter_table(params)
    assert table.splitlines()[-1] == "Total: 10 -- 40 bytes", table
    assert "| scale " in table and ".0" not in table, table


@pytest.mark.slow
def test_a_resume_with_a_changed_recipe_names_the_changes(tmp_path, caplog):
    """Training longer, or with another learning rate, resumes; a warning names each change
    since the checkpoint, and only those."""
    train_and_evaluate(small_config(total_steps=2), str(tmp_path))
    longer = small_config(total_steps=4, **{"optimizer.learning_rate": 0.02})
    with caplog.at_level(logging.WARNING):
        train_and_evaluate(longer, str(tmp_path))
    assert "with a changed recipe (training goes on with the new values): " in caplog.text
    assert "optimizer.learning_rate 0.05 -> 0.02; total_steps 2 -> 4." in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        train_and_evaluate(small_config(total_steps=6, **{"optimizer.learning_rate": 0.02}),
                           str(tmp_path))  # fmt: skip
    assert "optimizer.learning_rate" not in caplog.text and "total_steps 4 -> 6" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # the same command again: nothing changed
        train_and_evaluate(small_config(total_steps=6, **{"optimizer.learning_rate": 0.02}),
                           str(tmp_path))  # fmt: skip
    assert "changed recipe" not in caplog.text
    finished = r"step 6\) has finished; with the changed recipe \(optimizer.learning_rate 0.02"
    with pytest.raises(CheckpointError, match=finished + r" -> 0.1\) it would train nothing"):
        train_and_evaluate(small_config(total_steps=6, **{"optimizer.learning_rate": 0.1}),
                           str(tmp_path))  # fmt: skip
    other_input = small_config(total_steps=6, **{"optimizer.learning_rate": 0.02})
    other_input.input.image_size = 24  # the report of the trained model at another size
    with pytest.raises(CheckpointError, match=r"changed recipe \(input.image_size "):
        train_and_evaluate(other_input, str(tmp_path))
    in_bfloat16 = small_config(total_steps=6, **{"optimizer.learning_rate": 0.02})
    in_bfloat16.model.dtype = "bfloat16"  # the trained model reported in another precision
    with pytest.raises(CheckpointError, match=r"changed recipe \(model.dtype "):
        train_and_evaluate(in_bfloat16, str(tmp_path))
    for key, value in (("seed", 1), ("batch_size", 8)):  # a sweep over them, in one workdir
        other = small_config(total_steps=6, resume_changed_data=True,
                             **{"optimizer.learning_rate": 0.02, key: value})  # fmt: skip
        with pytest.raises(CheckpointError, match=rf"changed recipe \({key} \d+ -> {value}\)") as e:
            train_and_evaluate(other, str(tmp_path))
        assert str(e.value).endswith("Use another --workdir to train with it.")


def test_steps_compile_ahead_in_the_background(tmp_path, caplog):
    """The train step compiles once, on a background thread, against the shapes of its inputs
    (while TensorFlow and the input pipeline start); the eval step once on another, for the
    parameters and the EMA alike (each was compiled on its own); the steps and evaluations
    (periodic and final, the last batch padded) run them without compiling again."""
    config = small_config(ema_decay=0.9, eval_every_steps=2)
    logged = jax.config.jax_log_compiles
    jax.config.update("jax_log_compiles", True)  # for every thread (the context is per thread)
    try:
        with caplog.at_level(logging.WARNING):
            result = train_and_evaluate(config, str(tmp_path))
    finally:
        jax.config.update("jax_log_compiles", logged)
    compiled = lambda step: f"Finished XLA compilation of jit({step})"
    threads = lambda step: [
        r.threadName for r in caplog.records if r.getMessage().startswith(compiled(step))
    ]
    assert threads("train_step") == ["compile_train"]
    assert threads("eval_step") == ["compile_eval"]
    assert result["eval/examples"] == result["eval_ema/examples"] == 360


def test_sweep_members_share_one_compiled_train_step(tmp_path):
    """Runs that differ only in numbers (seed, length, learning rate, schedule, betas, weight
    decay, clipping norm, layer decay, EMA decay) lower to the same train step, so a sweep
    member finds it in the compilation cache; turning clipping off is another program."""
    from vision_jax.run import build_run

    def lowered(name, **overrides):
        run = build_run(small_config(**overrides), str(tmp_path / name))
        try:
            batch = {"image": jnp.zeros((32, 16, 16, 3)), "label": jnp.zeros(32, jnp.int32)}
            return run.train_step.lower(run.state, run.frozen, batch, run.settings).as_text()
        finally:
            run.close()

    base = {"optimizer.name": "adamw", "optimizer.grad_clip_norm": 1.0, "ema_decay": 0.9,
            "optimizer.layer_decay": 0.8, "optimizer.weight_decay": 1e-4,
            "schedule.warmup_steps": 1}  # fmt: skip
    member = {"seed": 7, "total_steps": 9, "optimizer.learning_rate": 0.3, "optimizer.b1": 0.8,
              "optimizer.weight_decay": 0.01, "optimizer.grad_clip_norm": 2.0,
              "optimizer.layer_decay": 0.6, "schedule.warmup_steps": 3,
              "ema_decay": 0.99}  # fmt: skip
    text = lowered("base", **base)
    assert lowered("member", **{**base, **member}) == text
    assert lowered("no_clip", **{**base, "optimizer.grad_clip_norm": None}) != text


@pytest.mark.parametrize("batch_norm", [True, False])
def test_an_earlier_ema_layout_warns_only_where_there_are_statistics(caplog, batch_norm):
    """A checkpoint without the EMA's model state restores with the EMA's statistics from the
    restored ones; the warning says so only for a model that has statistics (not a ViT)."""
    from vision_jax.run import restore_into
    from vision_jax.steps import SkipCounts, TrainState

    model_state = {"batch_stats": {"mean": jnp.arange(3.0)}} if batch_norm else {}
    state = TrainState(
        step=jnp.array(0), params={"w": jnp.ones(2)}, model_state=model_state, opt_state=(),
        ema_params={"w": jnp.ones(2)}, skips=SkipCounts.filled(jnp.zeros((), jnp.int32)),
        ema_model_state=jax.tree.map(jnp.zeros_like, model_state),
    )  # fmt: skip
    saved = {"step": jnp.array(5), "params": {"w": jnp.full(2, 2.0)}, "model_state": model_state,
             "opt_state": (), "ema_params": {"w": jnp.full(2, 3.0)},
             "skips": state.skips}  # fmt: skip

    def read(abstract):
        if not isinstance(abstract, dict) or set(abstract) != set(saved):
            raise CheckpointError("Cannot restore checkpoint: the layout differs.")
        return dict(saved), {}

    with caplog.at_level("WARNING"):
        restored, _ = restore_into(read, state)
    assert ("EMA has no model state" in caplog.text) == batch_norm
    assert int(restored.step) == 5
    for a, b in zip(jax.tree.leaves(restored.ema_model_state), jax.tree.leaves(model_state),
                    strict=True):  # fmt: skip
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
@pytest.mark.parametrize(
    "missing, ema",
    [(("skips", "ema_model_state"), None), (("skips", "ema_model_state"), 0.5),
     (("ema_model_state",), 0.5)],
)  # fmt: skip
def test_a_checkpoint_of_an_earlier_layout_resumes(tmp_path, caplog, missing, ema):
    """A checkpoint of a version before the non-finite guard (no ``skips`` in its state) or
    before the EMA of the BatchNorm statistics (no ``ema_model_state``) resumes, with the
    counts at zero and the EMA's statistics from the restored ones; a mismatched one still
    gets the mismatch error."""
    from vision_jax.run import build_run

    cfg = small_config(total_steps=4, ema_decay=ema)
    run = build_run(cfg, str(tmp_path))
    try:
        old = {f.name: getattr(run.state, f.name) for f in dataclasses.fields(run.state)}
        old.update(step=jnp.array(2, jnp.int32))
        for field in missing:  # the state's fields before those versions
            del old[field]
        run.checkpointer.save(2, old, run.meta, force=True)
        run.checkpointer.wait()
    finally:
        run.close()
    with pytest.raises(CheckpointError, match="Cannot restore checkpoint"):
        train_and_evaluate(small_config(total_steps=4, ema_decay=ema,
                                        **{"model.name": "cifar_resnet32"}),
                           str(tmp_path))  # fmt: skip
    with caplog.at_level("INFO"):
        result = train_and_evaluate(cfg, str(tmp_path))
    assert ("no skip counts" in caplog.text) == ("skips" in missing)
    assert ("EMA has no model state" in caplog.text) == (ema is not None)
    assert "at step 2" in caplog.text
    assert result["train/skipped_steps"] == 0 and result["eval/examples"] == 360
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2", "4"]
    if ema is not None:
        stats = read_variables(tmp_path, ema=True)["batch_stats"]
        saved = restore_on_one_device(latest_step_dir(tmp_path) / "state")
        assert saved["ema_model_state"] is not None
        for a, b in zip(jax.tree.leaves(stats), jax.tree.leaves(saved["ema_model_state"]),
                        strict=True):  # fmt: skip
            np.testing.assert_array_equal(a, b)


@pytest.mark.slow
@pytest.mark.parametrize("trainable", ["all", "head"])
def test_a_resume_reads_no_pretrained_weights(tmp_path, monkeypatch, trainable):
    """A resume restores into the state's shapes: the checkpoint replaces what the init and
    the pretrained weights would give, the input contract is the run's recorded one, and
    frozen parameters come from beside the checkpoints. So a resume works when the weights
    it began from are gone (a preempted VM's local disk), and resumes exactly."""
    from vision_jax import run as run_lib

    pretrained = tmp_path / "pretrained"
    train_and_evaluate(small_config(total_steps=2, **{"input.interpolation": "bicubic"}),
                       str(pretrained))  # fmt: skip
    cfg = small_config(total_steps=4, keep_checkpoints=5)
    cfg.init.path, cfg.optimizer.trainable = str(pretrained), trainable
    cfg.init.use_input_contract = True
    full, interrupted = tmp_path / "full", tmp_path / "interrupted"
    train_and_evaluate(cfg, str(full))
    train_and_evaluate(cfg, str(interrupted))
    shutil.rmtree(interrupted / "checkpoints" / "4")
    shutil.rmtree(pretrained)
    loads, load = [], run_lib.load_pretrained
    counted = lambda *args, **kwargs: loads.append(1) or load(*args, **kwargs)
    monkeypatch.setattr(run_lib, "load_pretrained", counted)
    train_and_evaluate(cfg, str(interrupted))
    assert not loads
    assert read_record(interrupted).interpolation == "bicubic"  # the contract, recorded
    for a, b in zip(_params_of(full), _params_of(interrupted), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)
    for a, b in zip(jax.tree.leaves(read_variables(full)),
                    jax.tree.leaves(read_variables(interrupted)), strict=True):  # fmt: skip
        np.testing.assert_array_equal(a, b)  # the frozen ones too


def test_weights_trained_on_another_normalisation_are_named_in_a_warning(tmp_path, caplog):
    """A run started from a run that trained with ImageNet's mean and std, with the config's
    0.5 and init.use_input_contract unset, fed its backbone other pixels in silence (eval top-1
    0.70 against 0.825 in a user's chain): a warning says so; with the contract, none."""
    imagenet = {"input.mean": (0.485, 0.456, 0.406), "input.std": (0.229, 0.224, 0.225)}
    stage1 = tmp_path / "stage1"
    train_and_evaluate(small_config(total_steps=1, **imagenet), str(stage1))
    for use_contract, warned in ((False, True), (True, False)):
        cfg = small_config(total_steps=1)
        cfg.init.path, cfg.init.use_input_contract = str(stage1), use_contract
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            train_and_evaluate(cfg, str(tmp_path / f"stage2_{use_contract}"))
        found = "expects inputs normalised with mean (0.485, 0.456, 0.406)" in caplog.text
        assert found == warned, caplog.text


def test_a_weights_file_trained_on_another_normalisation_is_named_in_a_warning(
    tmp_path, caplog, monkeypatch
):
    """Only folders were checked (a weights file was not read twice for it): fine-tuning from a
    CIFAR ResNet .th file (akamaster's, trained on ImageNet's mean and std) with the config's
    0.5 went unwarned (CIFAR-10 top-1 0.63 against 0.80 with its own). A warning says so once;
    with the contract, or its mean and std set, none; the file is read once either way."""
    import torch
    from safetensors.numpy import load_file

    from vision_jax import create_model
    from vision_jax.weights import export_safetensors

    model = create_model("cifar_resnet20", num_classes=10)
    variables = model.init({"params": jax.random.key(0)}, jnp.zeros((1, 16, 16, 3)), train=False)
    export_safetensors(variables, model, tmp_path / "resnet20.safetensors")
    tensors = {
        k: torch.from_numpy(v) for k, v in load_file(tmp_path / "resnet20.safetensors").items()
    }
    path = tmp_path / "resnet20.th"  # as akamaster saved them: legacy serialisation, wrapped
    torch.save(
        {"state_dict": tensors, "best_prec1": 91.7}, path, _use_new_zipfile_serialization=False
    )
    reads, load = [], torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: reads.append(a) or load(*a, **k))
    imagenet = {"input.mean": (0.485, 0.456, 0.406), "input.std": (0.229, 0.224, 0.225)}
    cases = [({}, 1), ({"init.use_input_contract": True}, 0), (imagenet, 0)]
    for i, (settings, warnings) in enumerate(cases):
        cfg = small_config(total_steps=1, **settings)
        cfg.init.path = str(path)
        reads.clear()
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            train_and_evaluate(cfg, str(tmp_path / f"run{i}"))
        found = caplog.text.count("expects inputs normalised with mean (0.485, 0.456, 0.406)")
        assert found == warnings, caplog.text
        assert len(reads) == 1, reads


def test_a_head_of_as_many_other_classes_is_named_in_a_warning(tmp_path, caplog):
    """A run started from a run of as many classes, named otherwise or in another order, loads
    its head as it is (its outputs meaning the old classes: top-1 0.025 against 0.825 in a
    user's chain, reversed names): a warning names both; with replace_head, none."""
    stage1 = tmp_path / "stage1"
    train_and_evaluate(small_config(total_steps=1), str(stage1))
    names = read_record(stage1).class_names
    for replace, warned in ((False, True), (True, False)):
        cfg = small_config(total_steps=1)
        cfg.data.classes = tuple(range(len(names)))[::-1]  # the same digits, reversed
        cfg.init.path, cfg.init.replace_head = str(stage1), replace
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            train_and_evaluate(cfg, str(tmp_path / f"stage2_{replace}"))
        found = "holds a head for as many classes as the data's, in another order (0, 1, 2, 3"
        assert (found in caplog.text) == warned, caplog.text


def test_weights_of_an_unfinished_run_are_named_in_a_warning(tmp_path, caplog):
    """init.path pointing at a run stopped before its end (preempted, or still training) took
    that step's weights without a word: a warning names the step and the run's end."""
    stage1 = tmp_path / "stage1"
    train_and_evaluate(small_config(total_steps=4, checkpoint_every_steps=2), str(stage1))
    shutil.rmtree(stage1 / "checkpoints" / "4")  # as if stopped after step 2
    cfg = small_config(total_steps=1)
    cfg.init.path = str(stage1)
    with caplog.at_level(logging.WARNING):
        train_and_evaluate(cfg, str(tmp_path / "stage2"))
    assert "checkpoints/2 is step 2 of a run that has not finished (it trains to step 4)" in (
        caplog.text
    )


def test_predict_export_report_and_evaluate_warn_of_an_unfinished_runs_step(tmp_path, caplog):
    """The newest step of a run stopped before its end was used silently by predict, export and
    report (evaluate warned): every reader of a trained run (load_trained) warns, once per
    command (evaluate at another size reads the step twice), each command again."""
    from vision_jax.evaluate import evaluate_run
    from vision_jax.predict import Predictor
    from vision_jax.report import write_report
    from vision_jax.trained import load_trained

    run = tmp_path / "run"
    train_and_evaluate(small_config(total_steps=4, checkpoint_every_steps=2), str(run))
    shutil.rmtree(run / "checkpoints" / "4")  # as if stopped after step 2
    unfinished = "checkpoints/2 is step 2 of a run that has not finished (it trains to step 4)"
    readers = {
        "load_trained (export)": lambda: load_trained(run),
        "predict": lambda: Predictor(run),
        "report": lambda: write_report(run, tmp_path / "report"),
        "evaluate": lambda: evaluate_run(run),
        "evaluate at another size": lambda: evaluate_run(run, image_size=24),
    }
    for name, read in readers.items():
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            read()
        assert caplog.text.count(unfinished) == 1, (name, caplog.text)


def test_a_step_that_ended_a_shorter_recipe_is_unfinished_once_the_run_went_on(tmp_path, caplog):
    """Resumed from its final step 2 with total_steps=3, the run does not end at step 2: with
    step 3 gone its readers warn (step 2's meta said final, of the shorter recipe, and they
    read it silently); started again with the shorter recipe, step 2 ends the run again."""
    from vision_jax.trained import load_trained

    run = tmp_path / "run"
    train_and_evaluate(small_config(total_steps=2), str(run))
    train_and_evaluate(small_config(total_steps=3), str(run))
    shutil.rmtree(run / "checkpoints" / "3")  # as if stopped before its step 3 was saved
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        load_trained(run)
    assert "checkpoints/2 is step 2 of a run that has not finished (it trains to step 3)" in (
        caplog.text
    )
    train_and_evaluate(small_config(total_steps=2), str(run))
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        load_trained(run)
    assert "has not finished" not in caplog.text


def test_a_refused_resume_leaves_the_final_step_finished(tmp_path, caplog):
    """A longer recipe's resume refused during setup (another batch size) trains nothing: the
    final step 2 is not noted as continued (its readers would warn that the run is unfinished)."""
    from vision_jax.trained import load_trained

    run = tmp_path / "run"
    train_and_evaluate(small_config(total_steps=2), str(run))
    with pytest.raises(CheckpointError, match="batch_size 32 -> 16"):
        train_and_evaluate(small_config(total_steps=3, batch_size=16), str(run))
    meta = json.loads((run / "checkpoints" / "2" / "meta" / "metadata").read_text())
    assert meta["final"] and "continued_to" not in meta
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        load_trained(run)
    assert "has not finished" not in caplog.text


def test_a_checkpoint_of_an_earlier_version_resumes_exactly(tmp_path, caplog):
    """Written before digests, frozen_params and the recorded crop mode: the frozen params and
    the input contract are read from init.path once more (then saved), the steps unchecked."""
    pretrained = tmp_path / "pretrained"
    train_and_evaluate(small_config(total_steps=2, **{"input.interpolation": "bicubic"}),
                       str(pretrained))  # fmt: skip
    cfg = small_config(total_steps=4, keep_checkpoints=5, **{"optimizer.trainable": "head"})
    cfg.init.path, cfg.init.use_input_contract = str(pretrained), True
    full, old = tmp_path / "full", tmp_path / "old"
    train_and_evaluate(cfg, str(full))
    train_and_evaluate(cfg, str(old))
    shutil.rmtree(old / "checkpoints" / "4")
    shutil.rmtree(old / "frozen_params")
    meta_file = old / "checkpoints" / "2" / "meta" / "metadata"
    meta = json.loads(meta_file.read_text())
    for key in ("digest", "frozen"):
        del meta[key]
    del meta["input"]["crop_mode"], meta["input"]["interpolation"]  # records of old
    meta_file.write_text(json.dumps(meta))
    with caplog.at_level(logging.WARNING):
        train_and_evaluate(cfg, str(old))
    assert "No frozen parameters beside" in caplog.text and "holds no digests" in caplog.text
    assert read_record(old).interpolation == "bicubic" and (old / "frozen_params").is_dir()
    for a, b in zip(jax.tree.leaves(read_variables(full)), jax.tree.leaves(read_variables(old)),
                    strict=True):  # fmt: skip
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_a_finished_run_of_an_earlier_config_layout_reloads_and_restarts(tmp_path, caplog):
    """An earlier version's record: keys added since missing (on_nonfinite, ...), defaults
    spelled out where today's config leaves None (schedule.rsqrt_timescale, lora.dropout,
    loss, ...). The run loads (load_trained), and the same command restarts it (only
    evaluating), without a changed recipe; a real change is still named."""
    from vision_jax.trained import load_trained

    cfg = small_config(total_steps=2)
    result = train_and_evaluate(cfg, str(tmp_path))
    meta_file = tmp_path / "checkpoints" / "2" / "meta" / "metadata"
    meta = json.loads(meta_file.read_text())
    config = meta["config"]
    for key in ("on_nonfinite", "max_consecutive_skips", "resume_changed_data", "early_stopping"):
        del config[key]
    config["schedule"] |= {"rsqrt_timescale": 10000, "step_factor": 0.1,
                           "step_boundaries": [0.5, 0.75]}  # fmt: skip
    config["lora"] |= {"dropout": 0.0, "train_head": True}
    config |= {"loss": "softmax_xent", "label_smoothing": 0.0}
    meta_file.write_text(json.dumps(meta))
    with caplog.at_level(logging.WARNING):
        trained = load_trained(tmp_path)
    assert "The saved config sets" not in caplog.text  # defaults spelled out are not stray
    assert trained.spec.on_nonfinite == default_config().on_nonfinite
    assert trained.spec.schedule.rsqrt_timescale == 10000
    with caplog.at_level(logging.WARNING):
        again = train_and_evaluate(cfg, str(tmp_path))
    assert "changed recipe" not in caplog.text
    assert again["eval/top1"] == result["eval/top1"]
    with pytest.raises(CheckpointError, match=r"changed recipe \(label_smoothing 0.0 -> 0.1\)"):
        train_and_evaluate(small_config(total_steps=2, label_smoothing=0.1), str(tmp_path))


def test_a_saved_config_keeps_its_model_overrides_and_gains_new_keys():
    import ml_collections

    from vision_jax.config import saved_with_defaults

    saved = small_config().to_dict()
    saved["model"] |= {"name": "vit_ti16", "representation_size": 192, "depth": 2}
    del saved["on_nonfinite"], saved["schedule"]["end_factor"]
    for given in (saved, ml_collections.ConfigDict(saved)):
        merged = saved_with_defaults(given)
        assert merged.model.representation_size == 192 and merged.model.depth == 2
        assert merged.on_nonfinite == default_config().on_nonfinite
        assert "end_factor" in merged.schedule and merged.total_steps == 4


def test_an_unset_key_is_no_change_from_its_spelled_out_default_only():
    """Unset today (None): no change from the spec's default or from a key of a part that is
    off (LoRA at rank 0); a change from another value, or of a key without a spec of its own
    (model.*), is named."""
    from vision_jax import specs
    from vision_jax.config import TrackedConfig
    from vision_jax.run import _config_changes

    spec = specs.run_spec(TrackedConfig(small_config()))
    now = spec.config
    saved = now | {
        "schedule": now["schedule"] | {"rsqrt_timescale": 10000.0, "step_factor": 0.5},
        "lora": now["lora"] | {"dropout": 0.0},
        "model": now["model"] | {"frozen_bn_stats": True},
    }
    assert _config_changes(saved, spec, lambda key: True) == [
        "model.frozen_bn_stats true -> null",
        "schedule.step_factor 0.5 -> null",
    ]


def _logged(records: list, step: int) -> dict[str, str]:
    """The train scalars the log line of ``step`` holds (throughput left out: it is timed)."""
    (line,) = [r.getMessage() for r in records if r.getMessage().startswith(f"[{step}] train/")]
    pairs = dict(item.split("=") for item in line.split("] ", 1)[1].split(", "))
    return {k: v for k, v in pairs.items() if k != "train/images_per_sec"}


@pytest.mark.slow
def test_a_resume_inside_a_log_window_logs_it_as_the_uninterrupted_run(tmp_path, caplog):
    """Checkpoints every 2 steps, a log line every 4: a run resumed at step 2 logs step 4's
    window (steps 1-4) with the saved half of it, the same values as the run not cut."""
    cfg = small_config(total_steps=8, log_every_steps=4, checkpoint_every_steps=2,
                       keep_checkpoints=5)  # fmt: skip
    full, cut = tmp_path / "full", tmp_path / "cut"
    with caplog.at_level(logging.INFO):
        train_and_evaluate(cfg, str(full))
    want = _logged(caplog.records, 4)
    shutil.copytree(full, cut)
    for step in (4, 6, 8):
        shutil.rmtree(cut / "checkpoints" / str(step))
    caplog.clear()
    with caplog.at_level(logging.INFO):
        train_and_evaluate(cfg, str(cut))
    assert "Resumed from" in caplog.text and _logged(caplog.records, 4) == want


def _tree_hash(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    for f in sorted(path.rglob("*")):
        if f.is_file():
            h.update(str(f.relative_to(path)).encode())
            h.update(f.read_bytes())
    return h.hexdigest()


@pytest.mark.parametrize(
    "before, after, match",
    [
        (
            {},
            {"model.name": "cifar_resnet32"},
            r"Cannot restore checkpoint \S+ \(step 2\) into this run: changed since: model.name "
            r"\"cifar_resnet20\" -> \"cifar_resnet32\"\. To train from its weights with these "
            r"settings, use another --workdir with --config.init.path=/\S+\nThe checkpoint was "
            r"left untouched; its arrays that differ: [^;]+; [^;]+ \(and \d+ more\)\.$",
        ),
        (  # a ViT's position embeddings: the change leads, then (at most two of) the arrays
            {"model.name": "vit_ti16", "input.image_size": 16},
            {"input.image_size": 32},
            r"into this run: changed since: input.image_size 16 -> 32\. To train from its weights"
            r".*\nThe checkpoint was left untouched; its arrays that differ: \S+/pos_embedding "
            r"\(1, 2, 192\) in the checkpoint, \(1, 5, 192\) in this run; \S+/pos_embedding "
            r"\(1, 2, 192\) in the checkpoint, \(1, 5, 192\) in this run\.$",
        ),
        (  # a linear probe, then full fine-tuning in the same workdir
            {"optimizer.trainable": "head"},
            {"optimizer.trainable": "all", "total_steps": 4},
            r"changed since: optimizer.trainable \"head\" -> \"all\"\. To train from its weights "
            r"with these settings \(a linear probe, then full fine-tuning\), use another "
            r"--workdir with --config.init.path=/\S+\nThe checkpoint was left untouched; its",
        ),
        (  # no clipping: one member fewer in the optimizer chain
            {},
            {"optimizer.grad_clip_norm": None, "total_steps": 4},
            r"changed since: optimizer.grad_clip_norm 1.0 -> null\. To train from its weights "
            r"with these settings, use another --workdir",
        ),
    ],
)
def test_mismatched_checkpoint_is_a_clear_error_and_left_untouched(tmp_path, before, after, match):
    train_and_evaluate(small_config(total_steps=2, **before), str(tmp_path))
    saved = _tree_hash(tmp_path / "checkpoints")
    with pytest.raises(CheckpointError, match=match):
        train_and_evaluate(small_config(**{**before, **after}), str(tmp_path))
    assert _tree_hash(tmp_path / "checkpoints") == saved


@pytest.mark.slow
def test_a_resume_with_another_lora_scale_names_it(tmp_path, caplog):
    """lora.alpha (the adapters' scale) changed on a resume: named with the recipe's changes."""
    lora = {"model.name": "vit_ti16", "input.image_size": 16, "lora.rank": 2, "lora.alpha": 2.0}
    cfg = small_config(total_steps=2, **lora)
    cfg.model.depth = 1
    train_and_evaluate(cfg, str(tmp_path))
    cfg.total_steps, cfg.lora.alpha = 3, 4.0
    with caplog.at_level(logging.WARNING):
        train_and_evaluate(cfg, str(tmp_path))
    assert "lora.alpha 2.0 -> 4.0; total_steps 2 -> 3." in caplog.text


def test_a_new_head_that_is_frozen_is_an_error(tmp_path):
    """A head replaced for another class count starts at zero: frozen as well, the model's
    output is constant and training would change nothing (it ran, at loss ln(classes))."""
    train_and_evaluate(small_config(total_steps=1), str(tmp_path / "ten"))
    five = small_config(total_steps=1, **{"init.path": str(tmp_path / "ten"),
                                          "data.classes": (0, 1, 2, 3, 4)})  # fmt: skip
    five.optimizer.frozen_params = "head/.*"
    with pytest.raises(ValueError, match=r"classifier head is new \(all zeros\) and frozen"):
        train_and_evaluate(five, str(tmp_path / "five"))


def test_frozen_bn_stats_leave_the_running_statistics_of_a_run(tmp_path):
    """``model.frozen_bn_stats``: a run trains its BatchNorms' scale and bias, and saves the
    running statistics it started from (here the initial 0 and 1)."""
    train_and_evaluate(small_config(total_steps=2, **{"model.frozen_bn_stats": True}),
                       str(tmp_path))  # fmt: skip
    variables = read_variables(str(tmp_path))
    stats = flatten_dict(variables["batch_stats"])
    assert stats and all(np.all(v == (1 if k.endswith("var") else 0)) for k, v in stats.items())
    scales = [v for k, v in flatten_dict(variables["params"]).items() if k.endswith("bn1/scale")]
    assert any(not np.all(v == 1) for v in scales)


@pytest.mark.slow
def test_a_longer_run_warns_of_the_learning_rate_it_resumes_with(tmp_path, caplog):
    """Cosine without warmup: after 4 of 4 steps the rate is 0; over 6 steps, step 5 takes
    0.05 * (1 + cos(2 pi / 3)) / 2 = 0.0125."""
    train_and_evaluate(small_config(total_steps=4), str(tmp_path))
    with caplog.at_level(logging.WARNING):
        train_and_evaluate(small_config(total_steps=6), str(tmp_path))
    want = 0.05 * (1 + np.cos(np.pi * 4 / 6)) / 2
    assert f"learning rate of step 5 is {want:.4g} under this run's schedule" in caplog.text
    assert "saved run's would have given 0 " in caplog.text


@pytest.mark.slow
@pytest.mark.parametrize(
    "length, match",
    [
        ({"total_steps": 2}, r"\(total_steps=2\)"),
        # 1,437 training digits: 44 batches of 32 per epoch; 0.05 epochs = 3 steps.
        ({"total_steps": None, "total_epochs": 0.05}, r"\(total_epochs=0.05: 3 steps of 44 per"),
    ],
)
def test_a_checkpoint_past_total_steps_is_a_clear_error_and_left_untouched(
    tmp_path, length, match, caplog
):
    """Fewer steps than the workdir has trained: not the newest step's metrics labelled as an
    earlier step's. Refused before anything is restored (no "Resumed" line)."""
    train_and_evaluate(small_config(total_steps=4), str(tmp_path))
    before = _tree_hash(tmp_path / "checkpoints")
    caplog.clear()
    with caplog.at_level(logging.INFO):
        with pytest.raises(ValueError, match="at step 4, past the end of this run " + match):
            train_and_evaluate(small_config(**length), str(tmp_path))
    assert _tree_hash(tmp_path / "checkpoints") == before
    assert "Resumed" not in caplog.text


@pytest.mark.parametrize(
    "overrides, error, match",
    [
        ({"model.name": "vit_nope"}, ValueError, "Valid names"),
        (
            {"data.source": "tfds", "data.name": "no_such_dataset_xyz"},
            ValueError,
            "no_such_dataset",
        ),
        (
            {"optimizer.momentum": 0.8, "optimizer.name": "adamw"},
            ValueError,
            r"optimizer.momentum only applies to name='sgd'",
        ),
        ({"schedule.step_factor": 0.5}, ValueError, r"schedule.step_factor only applies"),
        ({"lora.targets": ".*kernel"}, ValueError, r"lora.targets only applies with rank > 0"),
        ({"optimizer.lrr": 0.1}, UnreadConfigKeysError, "optimizer.lrr"),
        ({"batch_size": 5000}, ValueError, "fewer than one global batch"),
        ({"init.path": "/nonexistent/w.npz"}, WeightFormatError, "w.npz does not exist"),
        ({"data.root": "/tmp"}, ValueError, r"data.root not read by data.source='digits'"),
        ({"optimizer.grad_clip_norm": -1.0}, ValueError, r"grad_clip_norm must lie in \[0, inf\)"),
        ({"optimizer.learning_rate": -0.1}, ValueError, r"learning_rate must lie in \(0, inf\)"),
        ({"optimizer.weight_decay": -1.0}, ValueError, r"weight_decay must lie in \[0, inf\)"),
        ({"label_smoothing": 1.5}, ValueError, r"label_smoothing must lie in \[0, 1\); got 1.5"),
        ({"ema_decay": 1.5}, ValueError, r"ema_decay must lie in \[0, 1\)"),
        ({"log_every_steps": 0}, ValueError, r"log_every_steps must lie in \[1, inf\); got 0"),
        ({"eval_every_steps": -3}, ValueError, r"eval_every_steps must lie in \[0, inf\)"),
        ({"grad_accum_steps": -32}, ValueError, r"grad_accum_steps must lie in \[1, inf\)"),
        ({"input.std": (0.5, 0.0, 0.5)}, ValueError, r"input.std must lie in \(0, 1\]; got 0.0"),
        (
            {"input.mean": (123.675, 116.28, 103.53)},  # mmseg's units
            ValueError,
            r"input.mean \(123.675, 116.28, 103.53\) looks like 0-255 units; .* divide by 255",
        ),
        ({"input.mean": (0.5, 0.5)}, ValueError, r"input.mean needs one value per RGB channel"),
        # Non-default values of keys whose branch the run does not take:
        ({"init.replace_head": True}, ValueError, r"init.replace_head only applies with init.pa"),
        ({"init.posemb": "bicubic"}, ValueError, r"init.posemb only applies with init.path"),
        (
            {"task.module": "no.such.module"},
            ValueError,
            r"task.module 'no.such.module' registers a task of your own; task.name 'classif",
        ),
        (
            {"model.module": "no.such.module"},
            ValueError,
            r"model.module 'no.such.module' registers a model of your own; model.name 'cifar_r",
        ),
        (
            {"model.name": "no_such_net"},
            ValueError,
            r"Unknown model 'no_such_net'. Valid names: .* Set model.module to the module that",
        ),
        (
            {"optimizer.weight_decay": 0.0, "optimizer.decay_params": ".*"},
            ValueError,
            r"optimizer.decay_params only applies with weight_decay > 0",
        ),
        (
            {"optimizer.trainable": "head", "optimizer.layer_decay": 0.5},
            ValueError,
            r"optimizer.layer_decay only applies when more than the head trains",
        ),
        (
            {"optimizer.trainable": "last:0", "optimizer.layer_decay": 0.5},  # the head only
            ValueError,
            r"optimizer.layer_decay only applies when more than the head trains",
        ),
        (
            {"max_consecutive_skips": 3},
            ValueError,
            r"max_consecutive_skips only applies with on_nonfinite='skip'; remove it \(or pass "
            r"--config.max_consecutive_skips=10\)",
        ),
        (
            {"data.skip_corrupt": True},
            ValueError,
            r"data.skip_corrupt only applies to sources of image files \(source='digits' holds "
            r"decoded arrays\); remove it \(or pass --config.data.skip_corrupt=False\)",
        ),
        (
            {"task.name": "segmentation", "task.head": "linear", "task.decoder_width": 32},
            ValueError,
            r"task.decoder_width only applies to task.head='fpn'",
        ),
        ({"data.classes": (3,)}, ValueError, r"holds 1 class \(3\): a classifier needs at least 2"),
        ({"lora.rank": 2, "lora.alpha": 0.0}, ValueError, r"lora.alpha must be > 0"),
        (
            {"optimizer.lr_mults": (("head/.*", -1.0),)},
            ValueError,
            r"lr_mults rule \('head/\.\*', -1.0\): the value must be a finite number >= 0",
        ),
        (
            {"optimizer.lr_mults": (("head/.*", "10"),)},
            ValueError,
            r"lr_mults rule \('head/\.\*', '10'\): the value must be a finite number >= 0",
        ),
        (
            {"optimizer.lr_mults": ("head/.*",)},  # as the command line reads "head/.*"
            ValueError,
            r"lr_mults rule: a rule must be a \(regex, value\) pair, got 'head/\.\*'",
        ),
        (
            {"total_epochs": 2.0},
            ValueError,
            r"Set exactly one of total_steps \(\d+\) and total_epochs \(2.0\): unset the other, "
            r"e.g. --config.total_epochs=None",
        ),
        (
            {"schedule.decay": "rsqrt", "schedule.rsqrt_timescale": 0},
            ValueError,
            r"schedule.rsqrt_timescale must lie in \(0, inf\); got 0",
        ),
        (
            {"schedule.decay": "step", "schedule.step_factor": -1.0},
            ValueError,
            r"schedule.step_factor must lie in \(0, inf\); got -1.0",
        ),
        (
            {"optimizer.trainable": "head", "optimizer.lr_mults": (("conv1/.*", 0.1),)},
            ValueError,
            r"lr_mults rule 'conv1/\.\*' matches only frozen parameters \(such as 'conv1/kernel'\)",
        ),
        (
            {"model.name": "vit_ti16", "model.frozen_bn_stats": True},
            ValueError,
            r"Unknown override\(s\) \['frozen_bn_stats'\] for 'vit_ti16' \(VisionTransformer\) "
            r"\(frozen_bn_stats is for cifar_resnet, resnet models\)",
        ),
        (
            {"model.name": "vit_ti16", "input.image_size": 32, "model.posemb_grid": (1, 4)},
            ValueError,
            r"model.posemb_grid \(1, 4\) is not the grid of input.image_size 32 \(2x2 patches of "
            r"16x16 pixels\): a run's images are square, .*leave model.posemb_grid unset",
        ),
        (
            {"model.name": "vit_ti16", "input.image_size": 32, "model.posemb_grid": (1, 1)},
            ValueError,
            r"model.posemb_grid \(1, 1\) is not the grid .*unset \(the square grid of "
            r"input.image_size\) or set input.image_size=16\.",
        ),
        ({"input.mix_prob": 0.5}, ValueError, r"input.mix_prob only applies with mixup_alpha or"),
        (
            {"input.mix_switch_prob": 0.3, "input.mixup_alpha": 0.2},
            ValueError,
            r"input.mix_switch_prob only applies with both mixup_alpha and cutmix_alpha",
        ),
        (
            {"input.randaugment_magnitude": 15},
            ValueError,
            r"input.randaugment_magnitude only applies with randaugment_layers > 0; remove it "
            r"\(or pass --config.input.randaugment_magnitude=9.0\)",
        ),
        (
            {"input.inception_scale": (0.5, 1.0)},
            ValueError,
            r"input.inception_scale only applies with inception_crop=True",
        ),
    ],
)
def test_bad_input_gives_a_clear_error(tmp_path, overrides, error, match):
    with pytest.raises(error, match=match):
        train_and_evaluate(small_config(**overrides), str(tmp_path))
    assert not (tmp_path / "checkpoints").exists()  # nothing left behind


def test_mixing_is_refused_for_a_task_that_reads_no_soft_labels(monkeypatch):
    """A task of one's own trained with mixup or cutmix had its images mixed and its targets
    not (it never reads ``soft_label``), in silence; it is refused before any data is read,
    unless the task declares it reads them (classification does)."""
    from own_task import DigitValue

    from vision_jax import tasks

    reading = type("Reading", (DigitValue,), {"name": "reading", "reads_soft_label": True})
    for cls in (DigitValue, reading):
        monkeypatch.setitem(tasks.TASKS, cls.name, cls)
    mixed = {"input.mixup_alpha": 0.2, "input.cutmix_alpha": 1.0}
    with pytest.raises(specs.ConfigError, match=(
        r"input.mixup_alpha, input.cutmix_alpha: the task 'digit_value' does not read the mixed "
        r"labels \(batch\['soft_label'\]\).*declares reads_soft_label = True"
    )):  # fmt: skip
        specs.run_spec(TrackedConfig(small_config(**mixed, **{"task.name": "digit_value"})))
    assert specs.run_spec(TrackedConfig(small_config(**mixed))).input.mixes
    assert specs.run_spec(TrackedConfig(small_config(**mixed, **{"task.name": "reading"})))
    assert specs.run_spec(TrackedConfig(small_config(**{"task.name": "digit_value"})))


def test_a_saved_config_with_a_key_now_refused_still_loads(tmp_path, caplog):
    """A run saved by a version that accepted a key off its branch (``input.mix_prob`` without
    mixup) loads for predict, export and reports, with a warning; a new run refuses it. Each
    warning is given once: loading rebuilds the input spec, export's images and evaluation at
    another size rebuild it again (they warned twice to four times; the size failed)."""
    import json

    from vision_jax.evaluate import evaluate_run
    from vision_jax.trained import load_trained
    from vision_jax.weights.run_dir import META_FILE

    train_and_evaluate(small_config(total_steps=2), str(tmp_path))
    for meta in (tmp_path / "checkpoints").glob(f"*/{META_FILE}"):
        record = json.loads(meta.read_text())
        record["config"]["input"]["mix_prob"] = 0.5
        # values a later version refuses: a swapped crop scale, means in 0-255 units
        record["config"]["input"].update(inception_crop=True, inception_scale=[1.0, 0.5],
                                         random_crop=False, mean=[123.7, 116.3, 103.5])  # fmt: skip
        record["input"]["mean"] = [123.7, 116.3, 103.5]
        meta.write_text(json.dumps(record))
    with caplog.at_level(logging.WARNING):
        trained = load_trained(tmp_path)
    assert trained.step == 2 and trained.spec.input.mix_prob == 1.0  # reset to the default
    assert "The saved config sets input.mix_prob, which only applies with mixup" in caplog.text
    assert "A saved run's config: input.inception_scale must be (lo, hi)" in caplog.text
    assert trained.input.mean == (123.7, 116.3, 103.5)  # what it was trained with, kept
    from vision_jax.export.images import split_images  # export's calibration and evaluation

    with caplog.at_level(logging.WARNING):
        images, labels = split_images(trained, "test", count=3)
    assert images.shape[0] == len(labels) == 3 and images.dtype == np.uint8
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert evaluate_run(tmp_path, image_size=24)["eval/examples"] == 360
    warnings = [r.getMessage() for r in caplog.records if "saved" in r.getMessage()]
    assert len(warnings) == len(set(warnings)) == 2, warnings  # mix_prob; scale (checked first)
    with pytest.raises(ValueError, match="input.mix_prob only applies"):
        train_and_evaluate(small_config(**{"input.mix_prob": 0.5}), str(tmp_path / "new"))


def test_the_ends_of_the_checked_intervals_are_accepted():
    """Zero where zero means "off" or "none" (clipping, weight decay, momentum, EMA decay, label
    smoothing, periodic evaluation and checkpoints) and one where it is the least."""
    from vision_jax.config import TrackedConfig

    ends = {"optimizer.grad_clip_norm": 0.0, "optimizer.weight_decay": 0.0,
            "optimizer.momentum": 0.0, "optimizer.layer_decay": 1.0, "ema_decay": 0.0,
            "label_smoothing": 0.0, "eval_every_steps": 0, "checkpoint_every_steps": 0,
            "log_every_steps": 1, "batch_size": 1, "eval_batch_size": 1}  # fmt: skip
    spec = specs.run_spec(TrackedConfig(small_config(**ends)))
    assert (spec.optimizer.grad_clip_norm, spec.ema_decay, spec.task.label_smoothing) == (0, 0, 0)
    assert (spec.optimizer.layer_decay, spec.log_every_steps, spec.batch_size) == (1, 1, 1)


def test_a_tfds_checkpoint_of_the_earlier_example_order_resumes_with_one_warning(caplog):
    """tfds epochs were once read in about the same order each: a checkpoint without the new
    order's marker names other examples now, said in one line; other sources kept theirs."""
    from vision_jax import data as data_lib
    from vision_jax import run

    for source, warned in (({"data.source": "tfds", "data.name": "mnist"}, 1), ({}, 0)):
        spec = specs.run_spec(TrackedConfig(small_config(**source)))
        old, new = {"config": spec.config}, {"config": spec.config, "stream_order": 2}
        assert data_lib.STREAM_ORDER == 2
        for meta, lines in ((old, warned), (new, 0)):
            caplog.clear()
            with caplog.at_level(logging.WARNING):
                assert run._resume_position(spec, {**meta, "data_positions": [64]}, None, "w") == 64
                run._resume_position(spec, meta, None, "w", finished=True)  # nothing resumed
            assert caplog.text.count("the resume is not exact") == lines, caplog.text


def test_tfds_source_with_mock_data(tmp_path):
    import tensorflow_datasets as tfds

    cfg = small_config(**{"data.source": "tfds", "data.name": "cifar10", "total_steps": 2})
    with tfds.testing.mock_data(num_examples=100):
        result = train_and_evaluate(cfg, str(tmp_path))
    assert result["eval/examples"] == 100
    meta = json.loads((tmp_path / "checkpoints" / "2" / "meta" / "metadata").read_text())
    assert meta["stream_order"] == 2  # a resume of it is exact
    assert np.isfinite(result["train/loss"])


@pytest.mark.parametrize(
    "model, overrides",
    [
        pytest.param(
            "vit_ti16",
            {"input.image_size": 32, "optimizer.name": "adamw", "model.dtype": "bfloat16"},
            marks=pytest.mark.slow,
        ),
        pytest.param("resnet18", {"input.image_size": 32}, marks=pytest.mark.slow),
        pytest.param(
            "bit_r50x1", {"input.image_size": 32, "batch_size": 8}, marks=pytest.mark.slow
        ),
        ("cifar_resnet20", {}),
    ],
)
def test_one_step_of_each_model_family(tmp_path, model, overrides):
    cfg = small_config(
        **{
            "model.name": model,
            "total_steps": 1,
            "eval_batch_size": 360,
            "checkpoint_every_steps": 1,
            **overrides,
        }
    )
    init = default_variables(cfg)
    result = train_and_evaluate(cfg, str(tmp_path))
    assert np.isfinite(result["train/loss"]) and np.isfinite(result["eval/loss"])
    after = read_variables(str(tmp_path))
    changed = [
        not np.allclose(a, b)
        for a, b in zip(
            jax.tree_util.tree_leaves(init["params"]),
            jax.tree_util.tree_leaves(after["params"]),
            strict=True,
        )
    ]
    assert any(changed)
    assert jax.tree_util.tree_leaves(after["params"])[0].dtype == np.float32
    if "batch_stats" in init:  # updated in training mode only
        assert not all(
            np.allclose(a, b)
            for a, b in zip(
                jax.tree_util.tree_leaves(init["batch_stats"]),
                jax.tree_util.tree_leaves(after["batch_stats"]),
                strict=True,
            )
        )


def default_variables(cfg):
    """The variables a run starts from (same seed and init as train_and_evaluate)."""
    from vision_jax.models import create_model

    model = create_model(cfg.model.name, num_classes=10)
    init_rng, _ = jax.random.split(jax.random.key(cfg.seed))
    size = cfg.input.image_size
    return jax.tree_util.tree_map(
        np.asarray, model.init({"params": init_rng}, jnp.zeros((1, size, size, 3)), train=False)
    )


RUN_ON_DEVICES = """
import json, os, sys
import jax
from vision_jax.trees import flatten_dict
from vision_jax.train import train_and_evaluate
from vision_jax.trees import flatten_dict
from vision_jax.weights.run_dir import read_variables
sys.path.insert(0, {tests!r})
from test_train import small_config
cfg = small_config(**json.loads(sys.argv[2]))
try:
    result = train_and_evaluate(cfg, sys.argv[1])
except ValueError as e:
    print("ERROR", e); sys.exit(3)
params = flatten_dict(read_variables(sys.argv[1])["params"])
print("RESULT", json.dumps({{"devices": jax.device_count(), "loss": result["train/loss"],
      "eval_loss": result["eval/loss"],
      "checksum": {{k: float(abs(v).sum()) for k, v in sorted(params.items())}}}}))
"""


def run_with_devices(n: int, workdir, overrides: dict) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "XLA_FLAGS": f"{os.environ['XLA_FLAGS']} --xla_force_host_platform_device_count={n}",
        "JAX_PLATFORMS": "cpu",
    }
    code = RUN_ON_DEVICES.format(tests=str(ROOT / "tests"))
    return subprocess.run(
        [sys.executable, "-c", code, str(workdir), json.dumps(overrides)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )


def _result(proc):
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT ") :])


@pytest.mark.slow
def test_eight_devices_match_one_device(tmp_path):
    overrides = {"total_steps": 3, "eval_batch_size": 40}
    one = _result(run_with_devices(1, tmp_path / "one", overrides))
    eight = _result(run_with_devices(8, tmp_path / "eight", overrides))
    assert (one["devices"], eight["devices"]) == (1, 8)
    assert eight["loss"] == pytest.approx(one["loss"], abs=1e-5)
    assert eight["eval_loss"] == pytest.approx(one["eval_loss"], abs=1e-5)
    assert eight["checksum"].keys() == one["checksum"].keys()
    np.testing.assert_allclose(
        list(eight["checksum"].values()), list(one["checksum"].values()), rtol=1e-5, atol=1e-6
    )


def test_batch_not_divisible_by_devices_is_a_clear_error(tmp_path):
    proc = run_with_devices(8, tmp_path, {"batch_size": 36})
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "batch_size 36 is not divisible by the 8" in proc.stdout


def test_splits_with_other_classes_are_named(tmp_path):
    """An eval split with a class folder the training split lacks: the error names it."""
    from test_data import make_folder

    from vision_jax.data import DataError

    make_folder(tmp_path, per_class=2, classes=("cat", "dog"))
    shutil.copytree(tmp_path / "test" / "dog", tmp_path / "test" / "fox")
    config = small_config(**{"data.source": "imagefolder", "data.root": str(tmp_path)})
    with pytest.raises(DataError, match=r"classes: only in train: none; only in eval: fox\."):
        train_and_evaluate(config, str(tmp_path / "run"))


def test_an_empty_split_is_named_before_the_model_is_built(tmp_path, monkeypatch):
    """Arrays whose labels are none of data.classes made a train split of 0 rows, which failed
    late with "slice step cannot be zero"; an empty eval split is refused the same way."""
    from vision_jax import run as run_lib
    from vision_jax.data import DataError

    monkeypatch.setattr(run_lib, "task_model", lambda *a: pytest.fail("the model was built"))
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (40, 16, 16, 3), np.uint8), np.arange(40) % 3
    config = small_config(**{"data.source": "arrays", "data.classes": (0, 1)})
    arrays = {"train": (images, labels + 5), "test": (images, labels)}
    with pytest.raises(DataError, match=r"'train' holds no examples of data.classes=\(0, 1\)"):
        train_and_evaluate(config, str(tmp_path / "classes"), arrays=arrays)
    config = small_config(**{"data.source": "arrays"})
    arrays = {"train": (images, labels), "test": (images[:0], labels[:0])}
    with pytest.raises(DataError, match=r"'test' holds no examples \(its arrays have 0 rows\)"):
        train_and_evaluate(config, str(tmp_path / "rows"), arrays=arrays)
    assert not list(tmp_path.glob("*/checkpoints"))


def test_a_lora_target_that_trains_fully_is_an_error(tmp_path):
    """An adapter on the head while the head trains (lora.train_head) would train it twice
    over; with train_head=False the head trains through its adapter alone, even from zero."""
    lora = {"model.name": "vit_ti16", "input.image_size": 16, "lora.rank": 2,
            "lora.targets": r"head/kernel|.*/query/kernel"}  # fmt: skip
    cfg = small_config(total_steps=1, **lora)
    cfg.model.depth = 1
    with pytest.raises(ValueError, match=r"lora.targets matches head/kernel, which trains fully"):
        train_and_evaluate(cfg, str(tmp_path / "both"))
    cfg.lora.train_head = False
    train_and_evaluate(cfg, str(tmp_path / "adapter"))
    head = flatten_dict(read_variables(str(tmp_path / "adapter"))["params"])["head/kernel"]
    assert np.any(head != 0)  # the merged adapter moved the zero head


def test_lora_on_a_kernel_its_family_refuses_names_the_path_at_setup(tmp_path, monkeypatch):
    """BiT's StdConv kernels are standardised (non-linear in the kernel): a LoRA target among
    them is refused by its full path when lora.targets are matched, before any step is built
    (it was named by its module's short name, conv1, while the first step was traced)."""
    import vision_jax.run as run_lib

    def no_step(*args, **kwargs):
        raise AssertionError("the train step was built")

    monkeypatch.setattr(run_lib, "make_train_step", no_step)
    cfg = small_config(total_steps=1, **{
        "model.name": "bit_r50x1", "model.stage_sizes": (1, 1, 1, 1), "lora.rank": 2,
        "lora.targets": r"block\d/unit\d+/conv1/kernel",
    })  # fmt: skip
    match = r"LoRA cannot adapt block1/unit01/conv1/kernel \(StdConv\): its kernel is transformed"
    with pytest.raises(ValueError, match=match):
        train_and_evaluate(cfg, str(tmp_path))


def test_lora_rules_may_name_the_adapters_alone(tmp_path):
    """LoRA+ (a higher learning rate on B) and weight decay on the adapters alone: rules that
    match only adapters are valid (they were applied to the merged tree too, for the memory
    report's full fine-tuning figure, and refused as matching nothing)."""
    cfg = small_config(total_steps=1, **{
        "model.name": "vit_ti16", "input.image_size": 16, "lora.rank": 2,
        "optimizer.lr_mults": ((r".*lora_b", 4.0),), "optimizer.decay_params": r".*/lora_[ab]",
        "optimizer.weight_decay": 0.1,
    })  # fmt: skip
    cfg.model.depth = 1
    result = train_and_evaluate(cfg, str(tmp_path))
    assert np.isfinite(result["eval/loss"])


@pytest.mark.slow
@pytest.mark.parametrize("validation", [False, True])
def test_a_finished_run_started_again_reports_what_it_reported(tmp_path, validation):
    """The final metrics of a finished run started again equal its first report: the last
    train window's and, with a validation split, the last validation's (only the evaluation
    was reported again)."""
    cfg = small_config(total_steps=4, log_every_steps=3, eval_every_steps=2)
    if validation:
        cfg.data.train_split, cfg.data.val_split = "train[:90%]", "train[90%:]"
    first = train_and_evaluate(cfg, str(tmp_path))
    assert "train/loss" in first and ("val/top1" in first) == validation
    assert train_and_evaluate(cfg, str(tmp_path)) == first


def test_an_earlier_versions_recorded_posemb_default_reads_without_a_warning(caplog):
    """Runs of the version before recorded init.posemb="bilinear" (its default) without
    init.path: read back (predict, export, report), that is the default, not a stray key."""
    from vision_jax import specs

    with caplog.at_level(logging.WARNING), specs.saved_config():
        init = specs.InitSpec(posemb="bilinear")
    assert init.posemb is None and "init.posemb" not in caplog.text
    with caplog.at_level(logging.WARNING), specs.saved_config():
        specs.InitSpec(posemb="bicubic")
    assert "The saved config sets init.posemb, which only applies" in caplog.text


def test_a_task_whose_per_example_names_an_output_predict_lacks_is_named():
    """A task of one's own whose ``per_example`` names an output its ``predict`` does not
    return gets an error naming both, not a bare KeyError from the eval step."""
    from vision_jax.tasks.classification import Classification

    @dataclasses.dataclass(frozen=True)
    class Misnamed(Classification):
        per_example = ("probabilities", "scores")

    batch = {"image": jnp.zeros((2, 8, 8, 3)), "label": jnp.zeros(2, jnp.int32),
             "mask": jnp.ones(2)}  # fmt: skip
    with pytest.raises(ValueError, match=r"Misnamed.per_example names \['scores'\], which its "
                       r"predict does not return \(it returns \['probabilities'\]\)"):  # fmt: skip
        Misnamed().evaluate_batch(jnp.zeros((2, 3)), batch)


@pytest.mark.slow
def test_a_python_process_exits_cleanly_after_a_half_read_pipeline_and_a_failed_run(tmp_path):
    """As a notebook would: an eval iterator left half read (its teardown at exit started a
    thread, which never started: the process hung), and a run that fails before its first
    step (its compile threads ran on, and the process aborted at exit)."""
    code = f"""
import sys, threading
sys.path.insert(0, {str(pathlib.Path(__file__).parent)!r})
import numpy as np
from test_train import small_config
from vision_jax import data
from vision_jax.data import InputSpec
from vision_jax.train import train_and_evaluate
source = data.from_arrays(np.zeros((40, 16, 16, 3), np.uint8), np.zeros(40, np.int32), ["a", "b"])
batches = data.eval_batches(source, InputSpec(16, (0.5,) * 3, (0.5,) * 3), global_batch=8)
next(batches)
try:
    train_and_evaluate(small_config(batch_size=2048, eval_batch_size=64), {str(tmp_path)!r})
except ValueError as e:
    print("failed:", e)
print("threads:", sorted(t.name for t in threading.enumerate()))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=240)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "fewer than one global batch of 2048" in done.stdout
    assert "compile_" not in done.stdout and "threads:" in done.stdout


def _tfds_folder_dataset(tmp_path, version, per_class):
    """A tiny two-class tfds dataset ``tiny`` of ``version`` built from image files under
    ``tmp_path``/tfds (``per_class`` train images of each class, two test ones)."""
    from PIL import Image

    from vision_jax import data as data_lib

    root = tmp_path / f"images_{version}"
    rng = np.random.default_rng(int(version.replace(".", "")))  # other pixels in each
    for split, count in (("train", per_class), ("test", 2)):
        for name in ("a", "b"):
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 255, (12, 12, 3), np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{i}.png")
    data_lib.build_tfds_from_folder(str(root), "tiny", str(tmp_path / "tfds"), version=version)


def test_a_tfds_version_prepared_since_is_refused_and_read_after_training_as_trained(tmp_path):
    """tfds reads the newest version prepared: a resume on one prepared since the checkpoint is
    refused, naming both versions and how to pin the recorded one (which resumes), and the
    readers after training read the version the run trained on."""
    from vision_jax.data import DataError
    from vision_jax.trained import load_split, load_trained

    _tfds_folder_dataset(tmp_path, "1.0.0", per_class=4)
    names = {"data.source": "tfds", "data.name": "tiny", "data.data_dir": str(tmp_path / "tfds")}
    workdir = str(tmp_path / "run")
    config = lambda **k: small_config(batch_size=4, eval_batch_size=4, **names, **k)
    train_and_evaluate(config(total_steps=2), workdir)
    assert read_record(workdir).train_data["dataset"] == "tiny/1.0.0"
    _tfds_folder_dataset(tmp_path, "1.0.1", per_class=4)  # as many examples: was not refused
    refused = (r"Cannot resume \S+ \(step 2\) exactly: tfds dataset tiny/1\.0\.0 -> tiny/1\.0\.1 "
               r"\(.*set data\.name='tiny:1\.0\.0'\)")  # fmt: skip
    with pytest.raises(CheckpointError, match=refused):
        train_and_evaluate(config(total_steps=4), workdir)
    with pytest.raises(CheckpointError, match=r"again as it trained: tfds dataset tiny/1\.0\.0"):
        train_and_evaluate(config(total_steps=2), workdir)  # a finished run reported again
    trained = load_trained(workdir, which="latest")
    assert load_split(trained, "test").fingerprint()["dataset"] == "tiny/1.0.0"
    shutil.copytree(tmp_path / "tfds" / "tiny" / "1.0.0", tmp_path / "kept")
    shutil.rmtree(tmp_path / "tfds" / "tiny" / "1.0.0")
    with pytest.raises(DataError, match=r"The run trained on tfds dataset tiny:1\.0\.0, which"):
        load_split(trained, "test")
    shutil.move(tmp_path / "kept", tmp_path / "tfds" / "tiny" / "1.0.0")
    names["data.name"] = "tiny:1.0.0"
    train_and_evaluate(config(total_steps=4), workdir)  # pinned: the same data
