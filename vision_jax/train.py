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
from jax.experimental import multihost_utils

from vision_jax import data as data_lib
from vision_jax import sharding
from vision_jax.metrics import scalars
from vision_jax.run import Run, build_run
from vision_jax.signals import StopRequested, StopSignals
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
            run.eval_source, run.input, global_batch=run.spec.eval_batch_size,
            **run.task.batch_args(),
        )  # fmt: skip
        total = evaluate(eval_step, state, run.frozen, batches, run.mesh)
        result.update(run.task.summarize(total, run.eval_source, prefix))
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

    SIGTERM or SIGINT saves a checkpoint at the next step (agreed by every process) and raises
    :class:`~vision_jax.signals.StopRequested`; a non-finite update raises
    :class:`NonFiniteError` as ``config.on_nonfinite`` says. The final state is saved before
    the final evaluation.
    """
    with StopSignals() as stop:
        run = build_run(config, workdir, arrays=arrays)
        try:
            return _train(run, workdir, stop)
        finally:
            run.close()


class NonFiniteError(RuntimeError):
    """Training stopped on non-finite losses or gradients (``config.on_nonfinite``)."""


class _Guard:
    """The loop's side of the non-finite guard: reads ``state.skips`` where the loop already
    waits for the device (metrics, checkpoints) and applies ``config.on_nonfinite``."""

    def __init__(self, run: Run, state: TrainState):
        self.run, self.spec = run, run.spec
        counts = self._fetch(state)
        self.start_total = self.logged = counts["total"]

    @staticmethod
    def _fetch(state: TrainState) -> dict[str, int]:
        return {k: int(v) for k, v in jax.device_get(state.skips).__dict__.items()}

    def check(self, state: TrainState) -> int:
        """Raises :class:`NonFiniteError` when the policy says stop; the skips so far."""
        c = self._fetch(state)
        new = c["total"] - self.start_total
        if self.spec.on_nonfinite == "stop" and new > 0:
            self._fail(  # "first" restarts with every run (_fresh_skips)
                f"Non-finite loss or gradients at step {c['first']}; the update was not applied "
                "(on_nonfinite='stop')"
            )
        if c["longest"] >= self.spec.max_consecutive_skips:
            self._fail(
                f"{c['longest']} updates in a row had non-finite loss or gradients and were "
                f"skipped, the latest at step {c['last']} (max_consecutive_skips="
                f"{self.spec.max_consecutive_skips})"
            )
        if c["total"] > self.logged:
            logging.warning(
                "Skipped %d update(s) with non-finite loss or gradients (latest at step %d); "
                "%d in this run.", c["total"] - self.logged, c["last"], new,
            )  # fmt: skip
            self.logged = c["total"]
        return c["total"]

    def _fail(self, what: str) -> None:
        ckpt = self.run.checkpointer
        ckpt.wait()
        latest = ckpt.latest_step()
        where = f"{ckpt.directory}/{latest}" if latest is not None else "none"
        hint = (
            "set on_nonfinite='skip'"
            if self.spec.on_nonfinite == "stop"
            else "raise max_consecutive_skips"
        )
        raise NonFiniteError(
            f"{what}. Nothing non-finite was saved; last good checkpoint: {where}. Lower the "
            f"learning rate, or {hint}."
        )


def _fresh_skips(state: TrainState) -> TrainState:
    """``state`` with the skip counts' ``first`` and ``longest`` restarted (a resumed run
    reports and limits its own skips; ``total`` keeps counting)."""
    skips = state.skips
    zero = lambda x: jax.device_put(np.zeros((), np.int32), x.sharding)
    return state.replace(skips=skips.replace(first=zero(skips.first), longest=zero(skips.longest)))


def _save_due(spec: Any, step: int, total_steps: int) -> bool:
    every = spec.checkpoint_every_steps
    return step == total_steps or (every > 0 and step % every == 0)


def _train(run: Run, workdir: str, stop: StopSignals) -> dict[str, float]:
    if stop.stop_before(run.start_step):  # during setup: nothing new to save
        raise StopRequested(run.start_step, stop.reason, run.checkpointer.directory)
    data_lib.check_examples(run.eval_source, run.input)  # before training, not at its end
    is_main = jax.process_index() == 0
    writer = metric_writers.create_default_writer(workdir, just_logging=not is_main)
    try:
        if is_main:
            writer.write_hparams(_flat_hparams(run.meta["config"]))
            _log_start(run)
        return _loop(run, _fresh_skips(run.state), writer, stop)
    finally:
        writer.flush()
        writer.close()


def _loop(
    run: Run, state: TrainState, writer: metric_writers.MetricWriter, stop: StopSignals
) -> dict[str, float]:
    spec, total_steps, guard = run.spec, run.total_steps, _Guard(run, state)
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
        start_step=run.start_step, start_position=run.start_position, **run.task.batch_args(),
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
            summary["train/skipped_steps"] = guard.check(state)
            writer.write_scalars(step, summary)
            results.update(summary)
            train_metrics, window_start, window_images = None, time.perf_counter(), 0
        stopping = stop.should_stop(step)
        if stopping or _save_due(spec, step, total_steps):
            guard.check(state)  # nothing is saved past a non-finite step under "stop"
            run.checkpointer.save(
                step, state, run.meta, force=stopping or step == total_steps,
                data_position=train_iter.next_position,
            )  # fmt: skip
        if stopping:
            run.checkpointer.wait()
            if jax.process_count() > 1:  # every save committed before any process exits
                multihost_utils.sync_global_devices("vision_jax_stop")
            raise StopRequested(step, stop.reason, run.checkpointer.directory)
        if step == total_steps or (eval_every > 0 and step % eval_every == 0):
            results.update(run_eval(step))  # after the save: a failed eval costs no steps

    if run.start_step >= total_steps:  # already finished: report the final evaluation again
        results.update(run_eval(total_steps))
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
