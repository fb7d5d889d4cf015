"""Fine-tuning: one training loop for every model, dataset and mesh.

``train_and_evaluate(config, workdir)`` builds the data, model, optimizer and train state from the
config, resumes from the latest checkpoint in ``workdir`` if there is one, trains with a jitted
step over a device mesh, evaluates every ``eval_every_steps`` and at the end, and checkpoints.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import time
from collections.abc import Callable, Mapping
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from clu import metric_writers, parameter_overview, periodic_actions

from vision_jax import data as data_lib
from vision_jax import losses, optim, sharding
from vision_jax.checkpoint import Checkpointer
from vision_jax.config import TrackedConfig
from vision_jax.metrics import EvalMetrics, TrainMetrics, scalars, topk_correct
from vision_jax.models import create_model
from vision_jax.weights import load_pretrained

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training. The per-step RNG is derived, not stored."""

    step: jax.Array
    params: Any
    model_state: Any  # non-trainable collections, e.g. {"batch_stats": ...}
    opt_state: Any


def make_train_step(
    model: nn.Module, tx: optax.GradientTransformation, loss_fn: Callable, rng: jax.Array
) -> Callable[[TrainState, dict], tuple[TrainState, TrainMetrics]]:
    """A pure train step: forward, loss, gradients, optimizer update, metrics."""

    def step(state: TrainState, batch: dict) -> tuple[TrainState, TrainMetrics]:
        step_rng = jax.random.fold_in(rng, state.step)
        mutable = list(state.model_state)

        def loss_of(params):
            logits, new_model_state = model.apply(
                {"params": params, **state.model_state},
                batch["image"],
                train=True,
                rngs={"dropout": step_rng},
                mutable=mutable,
            )
            per_example = loss_fn(logits, batch["label"])
            return per_example.mean(), (logits, new_model_state)

        (loss, (logits, new_model_state)), grads = jax.value_and_grad(loss_of, has_aux=True)(
            state.params
        )
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = TrainMetrics.single_from_model_output(
            loss=loss,
            top1=topk_correct(logits, batch["label"], 1),
            grad_norm=optax.global_norm(grads),
        )
        new_state = state.replace(
            step=state.step + 1,
            params=params,
            model_state=dict(new_model_state),
            opt_state=opt_state,
        )
        return new_state, metrics

    return step


def make_eval_step(
    model: nn.Module, loss_fn: Callable
) -> Callable[[TrainState, dict], EvalMetrics]:
    """Loss, top-1 and top-5 on a padded batch; padding (``mask == 0``) is not counted."""

    def step(state: TrainState, batch: dict) -> EvalMetrics:
        logits = model.apply(
            {"params": state.params, **state.model_state}, batch["image"], train=False
        )
        return EvalMetrics.single_from_model_output(
            loss=loss_fn(logits, batch["label"]),
            top1=topk_correct(logits, batch["label"], 1),
            top5=topk_correct(logits, batch["label"], 5),
            mask=batch["mask"] > 0,
        )

    return step


def evaluate(
    eval_step: Callable, state: TrainState, batches: Any, mesh: jax.sharding.Mesh
) -> dict[str, float]:
    """Runs ``eval_step`` over every batch and returns exact averages over real examples."""
    total = None
    for batch in batches:
        m = eval_step(state, sharding.to_global_batch(batch, mesh))
        total = m if total is None else total.merge(m)
    if total is None:
        raise data_lib.DataError("The evaluation split is empty.")
    out = scalars(total, "eval/")
    out["eval/examples"] = float(total.top1.count)
    return out


def _total_steps(cfg: TrackedConfig, steps_per_epoch: int) -> int:
    steps, epochs = cfg.get("total_steps"), cfg.get("total_epochs")
    if (steps is None) == (epochs is None):
        raise ValueError("Set exactly one of total_steps and total_epochs.")
    total = int(steps) if steps is not None else math.ceil(epochs * steps_per_epoch)
    if total <= 0:
        raise ValueError(f"Training must last at least one step, got {total}.")
    return total


def _model_kwargs(model_cfg: TrackedConfig) -> dict[str, Any]:
    kwargs = {k: v for k, v in model_cfg.items() if k not in ("name", "dtype")}
    if model_cfg.dtype not in DTYPES:
        raise ValueError(f"Unknown model.dtype {model_cfg.dtype!r}; valid: {', '.join(DTYPES)}.")
    return {"dtype": DTYPES[model_cfg.dtype], **kwargs}


def train_and_evaluate(
    config: ml_collections.ConfigDict | Mapping[str, Any],
    workdir: str,
    *,
    arrays: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None,
) -> dict[str, float]:
    """Fine-tunes as ``config`` says, in ``workdir``; returns the final evaluation metrics.

    ``arrays`` feeds in-memory data when ``config.data.source == "arrays"``:
    ``{"train": (images, labels), "test": (images, labels)}`` keyed by split name.
    """
    cfg = TrackedConfig(config)
    is_main = jax.process_index() == 0
    mesh = sharding.create_mesh(cfg.mesh)

    # Data.
    train_source = data_lib.load_source(cfg.data, cfg.data.train_split, arrays=arrays)
    eval_source = data_lib.load_source(cfg.data, cfg.data.eval_split, arrays=arrays)
    if eval_source.class_names != train_source.class_names:
        raise data_lib.DataError("The train and eval splits have different classes.")
    spec = data_lib.input_spec(cfg.input)
    batch_size, eval_batch_size = int(cfg.batch_size), int(cfg.eval_batch_size)
    for name, size in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
        if size % sharding.data_parallel_size(mesh):
            raise ValueError(
                f"{name} {size} is not divisible by the {sharding.data_parallel_size(mesh)} "
                f"data-parallel devices of mesh {dict(mesh.shape)}."
            )
    steps_per_epoch = max(train_source.num_examples // batch_size, 1)
    total_steps = _total_steps(cfg, steps_per_epoch)

    # Model and variables.
    model = create_model(
        cfg.model.name, num_classes=train_source.num_classes, **_model_kwargs(cfg.model)
    )
    seed = int(cfg.seed)
    init_rng, step_rng = jax.random.split(jax.random.key(seed))
    dummy = jnp.zeros((1, spec.image_size, spec.image_size, 3), jnp.float32)
    replicated = sharding.replicated(mesh)
    variables = jax.jit(functools.partial(model.init, train=False), out_shardings=replicated)(
        {"params": init_rng}, dummy
    )
    variables = flax.core.unfreeze(variables)
    init_path = cfg.init.get("path")
    replace_head = bool(cfg.init.get("replace_head"))
    if init_path:
        loaded = load_pretrained(
            init_path, model=model, variables=variables, replace_head=replace_head
        )
        variables = jax.device_put(loaded, replicated)
    params = variables.pop("params")

    tx, schedule = optim.build_optimizer(
        cfg, params, total_steps=total_steps, steps_per_epoch=steps_per_epoch
    )
    state = jax.jit(
        lambda p, ms: TrainState(jnp.array(0, jnp.int32), p, ms, tx.init(p)),
        out_shardings=replicated,
    )(params, variables)

    # Checkpoints and resume.
    ckpt = Checkpointer(
        workdir,
        every_steps=int(cfg.checkpoint_every_steps),
        keep=int(cfg.keep_checkpoints),
    )
    start_step = 0
    if ckpt.latest_step() is not None:
        abstract = jax.tree_util.tree_map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
        )
        state, _ = ckpt.restore(abstract)
        start_step = int(state.step)
        logging.info("Resumed from %s at step %d.", ckpt.directory, start_step)

    loss_fn = functools.partial(
        losses.get_loss(cfg.loss), label_smoothing=float(cfg.label_smoothing)
    )
    log_every = int(cfg.log_every_steps)
    eval_every = int(cfg.eval_every_steps)
    eval_before = bool(cfg.eval_before_training)
    meta = {"config": cfg.to_dict(), "class_names": train_source.class_names}
    cfg.check_all_read()

    # Steps.
    train_step = jax.jit(
        make_train_step(model, tx, loss_fn, step_rng),
        donate_argnums=0,
        out_shardings=(replicated, replicated),
    )
    eval_step = jax.jit(make_eval_step(model, loss_fn), out_shardings=replicated)

    writer = metric_writers.create_default_writer(workdir, just_logging=not is_main)
    if is_main:
        writer.write_hparams(_flat_hparams(meta["config"]))
        parameter_overview.log_parameter_overview(
            state.params, msg=f"Parameters of {cfg.model.name}"
        )
        logging.info(
            "Training %s on %d examples (%d classes) for %d steps of %d images; mesh %s.",
            cfg.model.name, train_source.num_examples, train_source.num_classes,
            total_steps, batch_size, dict(mesh.shape),
        )  # fmt: skip
    report = periodic_actions.ReportProgress(
        num_train_steps=total_steps, writer=writer, every_steps=log_every, every_secs=None
    )

    def run_eval(step: int) -> dict[str, float]:
        batches = data_lib.eval_batches(eval_source, spec, global_batch=eval_batch_size)
        result = evaluate(eval_step, state, batches, mesh)
        writer.write_scalars(step, result)
        return result

    results: dict[str, float] = {}
    if eval_before and start_step == 0:
        before = run_eval(0)
        results.update({k.replace("eval/", "eval_before/"): v for k, v in before.items()})

    train_iter = data_lib.train_batches(
        train_source, spec, global_batch=batch_size, seed=seed, start_step=start_step
    )
    train_metrics, window_start, window_images = None, time.perf_counter(), 0
    for step in range(start_step + 1, total_steps + 1):
        batch = sharding.to_global_batch(next(train_iter), mesh)
        state, metrics = train_step(state, batch)
        train_metrics = metrics if train_metrics is None else train_metrics.merge(metrics)
        window_images += batch_size
        report(step)
        if step % log_every == 0 or step == total_steps:
            summary = scalars(train_metrics, "train/")
            elapsed = time.perf_counter() - window_start
            summary["train/learning_rate"] = float(schedule(step - 1))
            summary["train/images_per_sec"] = window_images / max(elapsed, 1e-9)
            writer.write_scalars(step, summary)
            results.update(summary)
            train_metrics, window_start, window_images = None, time.perf_counter(), 0
        if step == total_steps or (eval_every > 0 and step % eval_every == 0):
            results.update(run_eval(step))
        ckpt.save(step, state, meta, force=step == total_steps)

    if start_step >= total_steps:  # already finished: report the final evaluation again
        results.update(run_eval(total_steps))
    ckpt.wait()
    ckpt.close()
    writer.flush()
    writer.close()
    return results


def _flat_hparams(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in config.items():
        if isinstance(v, Mapping):
            out.update(_flat_hparams(v, f"{prefix}{k}."))
        elif isinstance(v, (int, float, str, bool)):
            out[prefix + k] = v
        else:
            out[prefix + k] = json.dumps(v)
    return out
