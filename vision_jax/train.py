"""Fine-tuning: one training loop for every task, model, dataset, mesh and parameter-efficient
method.

``train_and_evaluate(config, workdir)`` builds the run (:func:`vision_jax.run.build_run`: data,
model, pretrained sharded variables, optimizer, state resumed from ``workdir``, jitted steps),
then trains, evaluates every ``eval_every_steps`` and at the end, and checkpoints.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
import numpy as np
from clu import metric_writers, parameter_overview, periodic_actions

from vision_jax import data as data_lib
from vision_jax import sharding
from vision_jax.metrics import scalars
from vision_jax.run import Run, build_run
from vision_jax.steps import TrainState, evaluate


def _log_start(run: Run) -> None:
    spec = run.spec
    parameter_overview.log_parameter_overview(  # no stats: they would fetch other hosts' shards
        run.state.params, include_stats="sharding",
        msg=f"Trainable parameters of {spec.model_name}",
    )  # fmt: skip
    _log_memory(run.setup.memory)
    logging.info(
        "Training %s for %s on %d examples (%d classes) for %d steps of %d images; mesh %s.",
        spec.model_name, run.task.name, run.train_source.num_examples,
        run.train_source.num_classes, run.total_steps, spec.batch_size, dict(run.mesh.shape),
    )  # fmt: skip


def _log_memory(memory: dict[str, int]) -> None:
    mb = lambda b: f"{b / 2**20:,.1f} MiB"
    lines = [
        f"trainable parameters: {memory['trainable_params']:,} ({mb(memory['trainable_bytes'])})",
        f"frozen parameters:    {memory['frozen_params']:,} ({mb(memory['frozen_bytes'])})",
        f"optimizer state:      {mb(memory['optimizer_state_bytes'])}",
    ]
    if "full_finetune_optimizer_state_bytes" in memory:
        lines.append(
            "optimizer state of full fine-tuning would be "
            f"{mb(memory['full_finetune_optimizer_state_bytes'])}"
        )
    logging.info("Memory report:\n  %s", "\n  ".join(lines))


def run_evaluation(run: Run, state: TrainState) -> dict[str, float]:
    """Every eval step (parameters, EMA) over the whole eval split, summarised by the task."""
    result = {}
    for prefix, eval_step in run.eval_steps.items():
        batches = data_lib.eval_batches(
            run.eval_source, run.input, global_batch=run.spec.eval_batch_size
        )
        total = evaluate(eval_step, state, run.frozen, batches, run.mesh)
        result.update(run.task.summarize(total, run.eval_source.class_names, prefix))
    return result


def train_and_evaluate(
    config: ml_collections.ConfigDict | Mapping[str, Any],
    workdir: str,
    *,
    arrays: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None,
) -> dict[str, float]:
    """Fine-tunes as ``config`` says, in ``workdir``; returns the final evaluation metrics.

    ``arrays`` feeds in-memory data when ``config.data.source == "arrays"``:
    ``{"train": (images, targets), "test": (images, targets)}`` keyed by split name (targets:
    labels, or label maps for segmentation). With ``config.ema_decay`` set, the EMA parameters
    are evaluated too (``eval_ema/...``).
    """
    run = build_run(config, workdir, arrays=arrays)
    spec, state, total_steps = run.spec, run.state, run.total_steps
    is_main = jax.process_index() == 0
    writer = metric_writers.create_default_writer(workdir, just_logging=not is_main)
    if is_main:
        writer.write_hparams(_flat_hparams(run.meta["config"]))
        _log_start(run)
    log_every, eval_every = spec.log_every_steps, spec.eval_every_steps
    report = periodic_actions.ReportProgress(
        num_train_steps=total_steps, writer=writer, every_steps=log_every, every_secs=None
    )

    def run_eval(step: int) -> dict[str, float]:
        result = run_evaluation(run, state)
        writer.write_scalars(step, result)
        return result

    results: dict[str, float] = {}
    if spec.eval_before_training and run.start_step == 0:
        before = run_eval(0)
        results.update({k.replace("eval", "eval_before", 1): v for k, v in before.items()})

    train_iter = data_lib.train_batches(
        run.train_source, run.input, global_batch=spec.batch_size, seed=spec.seed,
        start_step=run.start_step,
    )  # fmt: skip
    train_metrics, window_start, window_images = None, time.perf_counter(), 0
    for step in range(run.start_step + 1, total_steps + 1):
        batch = sharding.to_global_batch(next(train_iter), run.mesh)
        state, metrics = run.train_step(state, run.frozen, batch)
        train_metrics = metrics if train_metrics is None else train_metrics.merge(metrics)
        window_images += spec.batch_size
        report(step)
        if step % log_every == 0 or step == total_steps:
            summary = scalars(train_metrics, "train/")
            elapsed = time.perf_counter() - window_start
            summary["train/learning_rate"] = float(run.setup.schedule(step - 1))
            summary["train/images_per_sec"] = window_images / max(elapsed, 1e-9)
            writer.write_scalars(step, summary)
            results.update(summary)
            train_metrics, window_start, window_images = None, time.perf_counter(), 0
        if step == total_steps or (eval_every > 0 and step % eval_every == 0):
            results.update(run_eval(step))
        run.checkpointer.save(step, state, run.meta, force=step == total_steps)

    if run.start_step >= total_steps:  # already finished: report the final evaluation again
        results.update(run_eval(total_steps))
    run.checkpointer.wait()
    run.checkpointer.close()
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
