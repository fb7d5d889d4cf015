"""Segmentation runs end to end: learning, exact evaluation over a padded split, exact resume,
and the parameter-efficient options (LoRA, freezing) on a segmentation model."""

from __future__ import annotations

import logging
import os
import shutil

import jax
import numpy as np
import pytest
from helpers import assert_declared_metrics
from test_train import small_config

from vision_jax.tasks import IGNORE_LABEL, Segmentation
from vision_jax.train import train_and_evaluate
from vision_jax.trees import flatten_dict
from vision_jax.weights.run_dir import latest_step_dir, read_variables
from vision_jax.weights.run_dir import restore_on_one_device as _restore_on_one_device

COLOURS = np.array([[230, 40, 40], [40, 230, 40], [40, 40, 230]], np.uint8)


def squares(n: int, size: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Noise with one coloured square per image: class 1..3 by colour, 0 elsewhere; a few
    pixels ignored."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 90, (n, size, size, 3)).astype(np.uint8)
    maps = np.zeros((n, size, size), np.uint8)
    for i in range(n):
        k, side = rng.integers(3), rng.integers(size // 3, size // 2 + 1)
        top, left = rng.integers(0, size - side + 1, 2)
        images[i, top : top + side, left : left + side] = COLOURS[k]
        maps[i, top : top + side, left : left + side] = k + 1
    maps[:, 0, :2] = IGNORE_LABEL
    return images, maps


def seg_config(**overrides):
    cfg = small_config(**{
        "task.name": "segmentation", "data.source": "arrays", "eval_batch_size": 8,
        "data.class_names": ("background", "red", "green", "blue"), **overrides,
    })  # fmt: skip
    cfg.input.flip = True
    return cfg


ARRAYS = {"train": squares(64), "test": squares(20, seed=1)}  # 20 = 2.5 eval batches


@pytest.mark.slow
def test_segmentation_learns_and_evaluates_every_pixel(tmp_path):
    """mIoU rises; the reported figures equal scikit-learn's confusion matrix of the trained
    model's predictions on every pixel of the 20 test images (2.5 eval batches)."""
    from sklearn.metrics import confusion_matrix

    cfg = seg_config(**{"task.head": "fpn", "total_steps": 40, "eval_before_training": True,
                        "optimizer.learning_rate": 0.1})  # fmt: skip
    result = train_and_evaluate(cfg, str(tmp_path), arrays=ARRAYS)
    assert result["eval/examples"] == 20
    assert result["eval/miou"] > result["eval_before/miou"] + 0.2
    assert result["eval/pixel_accuracy"] > 0.8
    assert {"eval/iou/background", "train/pixel_accuracy"} <= result.keys()
    assert_declared_metrics(result, Segmentation)

    model = Segmentation(head="fpn").build_model("cifar_resnet20", 4)
    images, maps = ARRAYS["test"]
    logits = model.apply(read_variables(str(tmp_path)), (images - 127.5) / 127.5)
    valid = maps != IGNORE_LABEL
    matrix = confusion_matrix(maps[valid], np.argmax(logits, -1)[valid], labels=range(4))
    tp, union = np.diag(matrix), matrix.sum(0) + matrix.sum(1) - np.diag(matrix)
    assert result["eval/miou"] == pytest.approx(np.mean(tp / union), abs=2e-3)
    assert result["eval/pixel_accuracy"] == pytest.approx(tp.sum() / matrix.sum(), abs=1e-3)


@pytest.mark.slow
def test_accumulation_ema_and_bfloat16_with_segmentation(tmp_path):
    cfg = seg_config(**{"grad_accum_steps": 2, "ema_decay": 0.9, "model.dtype": "bfloat16",
                        "optimizer.layer_decay": 0.8, "task.head": "fpn"})  # fmt: skip
    result = train_and_evaluate(cfg, str(tmp_path), arrays=ARRAYS)
    assert np.isfinite(result["eval/loss"]) and np.isfinite(result["eval_ema/loss"])
    assert 0 <= result["eval_ema/miou"] <= 1 and result["eval_ema/examples"] == 20


@pytest.mark.slow
def test_segmentation_resumes_exactly(tmp_path):
    cfg = seg_config(**{"total_steps": 4, "checkpoint_every_steps": 2, "keep_checkpoints": 5})
    cfg.input.scale_jitter = (0.75, 1.5)  # augmentation randomness must resume too
    full, interrupted = tmp_path / "full", tmp_path / "interrupted"
    train_and_evaluate(cfg, str(full), arrays=ARRAYS)
    train_and_evaluate(cfg, str(interrupted), arrays=ARRAYS)
    shutil.rmtree(interrupted / "checkpoints" / "4")
    train_and_evaluate(cfg, str(interrupted), arrays=ARRAYS)
    a, b = read_variables(str(full)), read_variables(str(interrupted))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


def _trained_names(workdir) -> set[str]:
    state = _restore_on_one_device(os.path.join(latest_step_dir(str(workdir)), "state"))
    return set(flatten_dict(state["params"]))


@pytest.mark.slow  # the detection tests cover LoRA and freezing on a task model
def test_lora_and_linear_probe_on_a_segmentation_model(tmp_path):
    vit = {"model.name": "vit_ti16", "input.image_size": 32, "total_steps": 2,
           "optimizer.name": "adamw", "optimizer.learning_rate": 1e-3}  # fmt: skip
    arrays = {k: (np.repeat(np.repeat(x, 2, 1), 2, 2), np.repeat(np.repeat(y, 2, 1), 2, 2))
              for k, (x, y) in ARRAYS.items()}  # fmt: skip
    result = train_and_evaluate(
        seg_config(**vit, **{"lora.rank": 2}), str(tmp_path / "lora"), arrays=arrays
    )
    assert np.isfinite(result["eval/loss"])
    trained = _trained_names(tmp_path / "lora")
    adapters = {k for k in trained if k.rsplit("/", 1)[-1] in ("lora_a", "lora_b")}
    assert len(adapters) == 12 * 2 * 2
    assert trained - adapters == {"task_head/classifier/kernel", "task_head/classifier/bias"}
    train_and_evaluate(
        seg_config(**vit, **{"optimizer.trainable": "head"}), str(tmp_path / "probe"),
        arrays=arrays,
    )  # fmt: skip
    assert _trained_names(tmp_path / "probe") == {
        "task_head/classifier/kernel", "task_head/classifier/bias"
    }  # fmt: skip


@pytest.mark.parametrize(
    "overrides,match",
    [
        ({"task.head": "unet"}, "Unknown task.head 'unet'"),
        ({"loss": "sigmoid_xent"}, "softmax_xent"),
        ({"task.class_weights": (1.0, 2.0)}, "2 entries for 4 classes"),
        ({"task.name": "detection3d"}, "Unknown task.name"),
        (
            {"data.class_names": ("background", "a/b", "a_b", "blue")},
            "The classes 'a/b' and 'a_b' would both report as iou/a_b",
        ),
    ],
)
def test_segmentation_config_errors(tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        train_and_evaluate(seg_config(**overrides), str(tmp_path), arrays=ARRAYS)


def test_a_segmentation_key_with_classification_is_an_error(tmp_path):
    from vision_jax.config import UnreadConfigKeysError

    with pytest.raises(UnreadConfigKeysError, match="task.head"):
        train_and_evaluate(small_config(**{"task.head": "fpn"}), str(tmp_path))


def test_a_classifier_starts_from_a_segmentation_run(tmp_path, caplog):
    """A segmentation run's backbone as a classifier's init: its task head is dropped, named in
    the load table (its arrays were unexpected keys, a WeightMismatchError, and neither
    replace_head nor dont_load, which matches the model's variables, could leave them out)."""
    train_and_evaluate(seg_config(total_steps=1), str(tmp_path / "seg"), arrays=ARRAYS)
    cfg = small_config(total_steps=1)
    cfg.init.path = str(tmp_path / "seg")
    with caplog.at_level(logging.INFO):
        train_and_evaluate(cfg, str(tmp_path / "cls"))
    assert "dropped (2 arrays: the model has none)" in caplog.text, caplog.text


def test_a_new_task_head_frozen_at_its_random_init_is_named(tmp_path, caplog):
    """A segmentation model from a classifier's weights: its task head is new and random;
    frozen (here by optimizer.frozen_params; LoRA with train_head=False likewise) it would stay
    so without a word, where a classifier's new (zero) head frozen is an error."""
    from vision_jax import run, sharding, specs
    from vision_jax.config import TrackedConfig

    train_and_evaluate(small_config(total_steps=1), str(tmp_path / "cls"))

    def warnings(**overrides) -> str:
        cfg = seg_config(**{"init.path": str(tmp_path / "cls"), **overrides})
        spec = specs.run_spec(TrackedConfig(cfg))
        model, mesh = run.task_model(spec, 4), sharding.create_mesh(spec.mesh)
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            run.create_variables(spec, model, spec.input, mesh, jax.random.key(0))
        return caplog.text

    text = warnings(**{"optimizer.frozen_params": "task_head/.*"})
    assert "2 new parameter(s) that init.path does not hold stay frozen" in text, text
    assert "task_head/classifier/kernel" in text
    assert "stay frozen" not in warnings(**{"optimizer.frozen_params": "conv1/.*"})
    lora = {"model.name": "vit_ti16", "init.path": None, "lora.rank": 2}
    train_and_evaluate(seg_config(total_steps=1, **lora), str(tmp_path / "vit"), arrays=ARRAYS)
    text = warnings(**{**lora, "init.path": str(tmp_path / "vit"), "lora.train_head": False,
                       "init.dont_load": ("task_head/.*",)})  # fmt: skip
    assert "task_head/classifier/kernel" in text, text


def test_a_run_whose_blocks_after_the_last_tap_trained_names_the_version(tmp_path, monkeypatch):
    """A run written by the version that trained the blocks after the last feature tap (they
    never run; this one freezes them) cannot restore into this layout: said so, with what to
    do, not 'did the config change?'."""
    from vision_jax import optim
    from vision_jax.checkpoint import CheckpointMismatchError

    cfg = seg_config(total_steps=1, **{"task.feature_taps": (0,)})
    with monkeypatch.context() as old_version:
        old_version.setattr(optim, "never_run", lambda model: None)
        train_and_evaluate(cfg, str(tmp_path), arrays=ARRAYS)
    cfg.total_steps = 2
    with pytest.raises(CheckpointMismatchError, match="this version no longer trains them"):
        train_and_evaluate(cfg, str(tmp_path), arrays=ARRAYS)


def _adapted_blocks(params) -> set[str]:
    return {k.split("/")[1] for k in flatten_dict(params) if k.endswith("/lora_a")}


def test_lora_puts_no_adapters_on_blocks_that_never_run(tmp_path):
    """With feature taps the blocks after the last tapped one never run: LoRA adds no adapters
    there (it added frozen ones, which nothing read or trained, saved with the frozen params),
    and targets that match only such kernels are an error, not a run with nothing to train."""
    from vision_jax import run, sharding, specs
    from vision_jax.config import TrackedConfig

    def adapted(**overrides):
        cfg = seg_config(**{"model.name": "vit_ti16", "input.image_size": 32, "lora.rank": 2,
                            "task.feature_taps": (1,), **overrides})  # fmt: skip
        cfg.model.depth = 4
        spec = specs.run_spec(TrackedConfig(cfg))
        model, mesh = run.task_model(spec, 4), sharding.create_mesh(spec.mesh)
        variables, *_ = run.create_variables(spec, model, spec.input, mesh, jax.random.key(0))
        return variables["params"]

    assert _adapted_blocks(adapted()) == {"encoderblock_0", "encoderblock_1"}
    with pytest.raises(ValueError, match="matches only kernels that never run"):
        adapted(**{"lora.targets": "Transformer/encoderblock_[23]/.*/(query|value)/kernel"})


def test_a_lora_run_with_adapters_on_blocks_that_never_run_resumes(tmp_path, monkeypatch):
    """A LoRA run of an earlier version, whose frozen parameters hold adapters on the blocks
    after the last feature tap, resumes in that layout (its frozen parameters restore as
    saved) and trains on."""
    from vision_jax import lora

    arrays = {k: (np.repeat(np.repeat(x, 2, 1), 2, 2), np.repeat(np.repeat(y, 2, 1), 2, 2))
              for k, (x, y) in ARRAYS.items()}  # fmt: skip
    cfg = seg_config(**{"model.name": "vit_ti16", "input.image_size": 32, "lora.rank": 2,
                        "task.feature_taps": (1,), "total_steps": 1})  # fmt: skip
    cfg.model.depth = 4
    everywhere = lora.add_adapters
    with monkeypatch.context() as old_version:
        old_version.setattr(lora, "add_adapters", lambda p, s, r, **_: everywhere(p, s, r))
        train_and_evaluate(cfg, str(tmp_path), arrays=arrays)
    cfg.total_steps = 2
    train_and_evaluate(cfg, str(tmp_path), arrays=arrays)
    assert os.path.basename(latest_step_dir(str(tmp_path))) == "2"
    frozen = _restore_on_one_device(os.path.join(tmp_path, "frozen_params"))
    assert _adapted_blocks(frozen) == {"encoderblock_2", "encoderblock_3"}
