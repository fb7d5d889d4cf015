"""Fine-tuning: one training loop for every task, model, dataset, mesh and parameter-efficient
method.

``train_and_evaluate(config, workdir)`` builds the run (:func:`vision_jax.run.build_run`: data,
model, pretrained sharded variables, optimizer, state resumed from ``workdir``, jitted steps),
then trains, evaluates every ``eval_every_steps`` and at the end, and checkpoints.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Protocol

import jax
import ml_collections
import numpy as np
from clu import parameter_overview
from jax.experimental import multihost_utils

from vision_jax import data as data_lib
from vision_jax import host_memory, sharding
from vision_jax.checkpoint import CheckpointError
from vision_jax.metrics import scalars
from vision_jax.run import Run, abstract_state, build_run, note_continuation, restore_into
from vision_jax.selection import Selection
from vision_jax.signals import StopRequested, StopSignals
from vision_jax.steps import TrainState, evaluate, evaluated_weights
from vision_jax.trees import count_params, tree_bytes
from vision_jax.writer import MetricWriter

logger = logging.getLogger(__name__)


def parameter_table(params: Any) -> str:
    """clu's overview of ``params`` (name, shape, dtype, size and sharding; no statistics:
    they would fetch other hosts' shards), its total counted in integers
    (:func:`~vision_jax.trees.count_params`): clu sums ``np.prod(shape)``, the float 1.0 for a
    parameter of shape () (a detection model's), and printed ``Total: 5,863,027.0``."""
    table = parameter_overview.get_parameter_overview(params, include_stats="sharding")
    rows = table.rsplit("\nTotal: ", 1)[0]  # clu's last line
    return f"{rows}\nTotal: {count_params(params):,} -- {tree_bytes(params):,} bytes"


def _log_start(run: Run) -> None:
    spec = run.spec
    table = parameter_table(run.state.params)
    logger.info("Trainable parameters of %s\n%s", spec.model_name, table)
    _log_memory(run.setup.memory)
    logger.info(
        "Training %s for %s on %d examples (%d classes) for %d steps of %d images; mesh %s.",
        spec.model_name, run.task.name, run.train_source.num_examples,
        run.train_source.num_classes, run.total_steps, spec.batch_size, dict(run.mesh.shape),
    )  # fmt: skip
    if note := host_memory.advice(jax.default_backend()):
        logger.info(note)


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
    logger.info("Memory report:\n  %s", "\n  ".join(lines))


def run_evaluation(
    run: Run,
    state: TrainState,
    source: data_lib.Source | None = None,
    split: str = "eval",
    observe: Callable[[dict, dict], None] | None = None,
    interrupt: Callable[[], None] | None = None,
) -> dict[str, float]:
    """Every eval step (parameters, EMA) over the whole ``source`` (default: the eval split),
    summarised by the task as ``{split}/...`` and ``{split}_ema/...``; ``observe`` sees the
    parameters' predictions (:func:`vision_jax.steps.evaluate`); ``interrupt`` is called
    before each batch (it raises to stop the evaluation)."""
    source = run.eval_source if source is None else source
    result = {}
    for kind, ema in run.evaluations.items():
        batches = data_lib.eval_batches(
            source, run.input, global_batch=run.spec.eval_batch_size, **run.task.batch_args()
        )
        if interrupt is not None:
            batches = _interruptible(batches, interrupt)
        seen = observe if kind == "" else None
        with contextlib.closing(batches):  # stopped or failed: its pipeline released now
            weights = evaluated_weights(state, ema)
            total = evaluate(run.eval_step, weights, run.frozen, batches, run.mesh, seen)
        summary = run.task.summarize(total, source, f"{split}{kind}/")
        _check_headline_returned(run.task, summary, f"{split}{kind}/")
        result.update(summary)
    return result


def _check_headline_returned(task: Any, summary: dict[str, float], prefix: str) -> None:
    """Refuses a ``summary`` without the task's headline (the model selection, the report and
    the run's last lines read it), at the first evaluation: naming the task's summarize, not
    the ``early_stopping.metric`` the headline defaults to."""
    if f"{prefix}{task.headline}" not in summary:
        raise ValueError(
            f"{type(task).summarize.__qualname__} returned no {prefix}{task.headline}, the "
            f"headline of {type(task).__name__} ({task.headline!r}); it returned "
            f"{', '.join(sorted(summary))}."
        )


def _interruptible(batches: Iterator[dict], interrupt: Callable[[], None]) -> Iterator[dict]:
    with contextlib.closing(batches):
        for batch in batches:
            interrupt()
            yield batch


def train_and_evaluate(
    config: ml_collections.ConfigDict | Mapping[str, Any],
    workdir: str | os.PathLike,
    *,
    arrays: Mapping[str, tuple[np.ndarray, np.ndarray] | Mapping[str, np.ndarray]] | None = None,
    final: FinalObserver | None = None,
    exit_on_second_signal: bool = False,
    exit_on_lost_lock: bool = False,
) -> dict[str, float]:
    """Fine-tunes as ``config`` says, in ``workdir``; returns the final evaluation metrics.

    ``arrays`` feeds in-memory data when ``config.data.source == "arrays"``: ``{"train": (images,
    targets), "test": (images, targets)}`` keyed by split name (targets: labels, or label maps for
    segmentation), or per split a dict of columns, ``{"image": images, "label": labels}`` (a target
    column of one's own by its name). With ``config.ema_decay`` set, the EMA parameters are
    evaluated too (``eval_ema/...``). ``final`` (single-process runs) sees the predictions of the
    final evaluation of the eval split, the one of the step a report shows (the best step with a
    validation split, else the last), e.g. a :class:`vision_jax.report.FinalEvaluation`, so that the
    report does not predict again; not in LoRA runs, whose evaluation applies the adapters unmerged
    where the saved model has them merged (in bfloat16 their predictions differ).

    SIGTERM or SIGINT (or SIGUSR1, SIGUSR2, SIGHUP where the caller has no handler of its own
    for them) saves a checkpoint at the next step (agreed by every process) and raises
    :class:`~vision_jax.signals.StopRequested`; a Ctrl-C after it (and any later one) raises
    KeyboardInterrupt without saving more (``exit_on_second_signal``: ends the process at
    once, as the command line does, even inside a long step or compilation); a non-finite
    update raises :class:`NonFiniteError` as ``config.on_nonfinite`` says. The final state is
    saved before the final evaluation. Another run that took over the workdir's lock (this
    run's heartbeat had not reached it for ``lock.STALE_AFTER_S``) raises
    :class:`~vision_jax.lock.LockError` at the next step or save, nothing more saved
    (``exit_on_lost_lock``: ends the process at once, as the command line does). Running out
    of memory adds a note to the error (shown under its traceback) that says what to change.
    """
    workdir = os.fspath(workdir)
    try:
        with StopSignals(exit_on_second_signal) as stop:
            run = build_run(config, workdir, arrays=arrays, exit_on_lost_lock=exit_on_lost_lock)
            run.final = final if jax.process_count() == 1 else None
            try:
                results = _train(run, workdir, stop)
            except BaseException:
                _close_after_error(run)
                raise
            run.close()
            return results
    except (MemoryError, RuntimeError) as e:  # (JAX's errors are RuntimeErrors)
        if advice := out_of_memory_advice(e, config):
            e.add_note(advice)
        raise


# XLA's (CPU, GPU, TPU) and TensorFlow's words for an allocation that failed (not a disk full)
_OUT_OF_MEMORY = re.compile(
    r"RESOURCE_EXHAUSTED:[^\n]*\b(Out of memory|Ran out of memory|Failed to allocate)\b"
    r"|OOM when allocating"
)


def out_of_memory_advice(
    error: BaseException, config: Mapping[str, Any], command_line: bool = False
) -> str:
    """What to change when ``error`` is running out of (device or host) memory, else "";
    ``command_line``: for ``python -m vision_jax.main``, which keeps freed host memory for the
    next step (:mod:`vision_jax.host_memory`)."""
    if not isinstance(error, MemoryError) and not _OUT_OF_MEMORY.search(str(error)):
        return ""
    changes = [
        f"lower batch_size ({config['batch_size']}; grad_accum_steps keeps the batch and "
        f"computes it in parts) or eval_batch_size ({config['eval_batch_size']})"
    ]
    if config["model"]["remat"] != "block":
        changes.append(f"set model.remat='block' (now {config['model']['remat']!r})")
    if isinstance(error, MemoryError) or jax.default_backend() == "cpu":
        if command_line:
            changes.append(
                "VISION_JAX_HUGE_PAGES=0 (main keeps freed host memory for the next step)"
            )
        elif "mmap_max=0" in os.environ.get("GLIBC_TUNABLES", ""):
            changes.append(
                "start Python without GLIBC_TUNABLES' heap reuse (vision_jax.host_memory)"
            )
    return (
        f"out of memory: {', '.join(changes)}; the log's 'memory per device' lines say what "
        "each step needs"
    )


def _close_after_error(run: Run) -> None:
    """Closes ``run`` while an error propagates: a failure to close (a pending save that
    failed) is logged, and the error that stopped the run stays the one raised."""
    try:
        run.close()
    except Exception as e:  # noqa: BLE001  (logged; the run's own error follows)
        logger.error("While stopping after the error below: %s", e)


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
            logger.warning(
                "Skipped %d update(s) with non-finite loss or gradients (latest at step %d); "
                "%d in this run.", c["total"] - self.logged, c["last"], new,
            )  # fmt: skip
            self.logged = c["total"]
        return c["total"]

    def _fail(self, what: str) -> None:
        ckpt = self.run.checkpointer
        ckpt.wait()
        latest = ckpt.newest_complete_step()
        where = f"{ckpt.directory}/{latest}" if latest is not None else "none"
        hint = (
            "set on_nonfinite='skip'"
            if self.spec.on_nonfinite == "stop"
            else "raise max_consecutive_skips"
        )
        raise NonFiniteError(
            f"{what}. Nothing non-finite was saved; newest checkpoint: {where} (finite; the "
            "finite updates before the failure may already have diverged: compare its loss "
            f"with an earlier one's). Lower the learning rate, or {hint}."
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


class _Background:
    """``work()`` on a daemon thread (a run that fails before waiting exits without it);
    :meth:`wait` joins it and raises its error."""

    def __init__(self, name: str, work: Callable[[], None]):
        self._error: BaseException | None = None

        def run() -> None:
            try:
                work()
            except BaseException as e:  # noqa: BLE001  (raised by wait)
                self._error = e

        self._thread = threading.Thread(target=run, name=name, daemon=True)
        self._thread.start()

    def wait(self) -> None:
        self._thread.join()
        if self._error is not None:
            raise self._error

    def join(self) -> None:
        """Waits for the work to end, whatever its outcome."""
        self._thread.join()


TRAIN_SAMPLE = 256  # training examples read before training when bad ones are skipped


def _check_examples(run: Run) -> tuple[_Background, dict[str, Any]]:
    """Reads the evaluation and validation splits once (:func:`data.check_examples`) in the
    background: a bad file stops the run before it trains, not at its end, and the reading
    overlaps the first step's compilation. The loop waits before anything is evaluated or
    saved. A resume does not read again a split its checkpoint records as checked
    (``checked_data``) with the same examples (:func:`_check_key`): minutes for ImageNet's
    50,000 at every resume. Also returns what the check found, filled by the thread once every
    split passed (the loop records it in ``run.meta`` when it has waited)."""
    splits = [(n, s) for n, s in (("eval", run.eval_source), ("val", run.val_source)) if s]
    checked_before = run.restored_meta.get("checked_data") or {}
    passed: dict[str, Any] = {}

    def check() -> None:
        keys = {}
        for name, source in splits:
            keys[name] = _check_key(run, source)
            if checked_before.get(name) == keys[name]:
                logger.info("The %s split was read when the run started (its examples unchanged "
                            "since): not read again.", name)  # fmt: skip
                continue
            data_lib.check_examples(source, run.input)
        passed.update(keys)

    return _Background("check_examples", check), passed


def _check_key(run: Run, source: data_lib.Source) -> dict[str, Any]:
    """What a split's check depends on, as JSON: its examples (``Source.fingerprint``: their
    number, names and labels, a tfds split's records), how they are read (the input spec) and
    whether bad ones are skipped."""
    spec = hashlib.sha256(repr(run.input).encode()).hexdigest()[:16]
    return {"data": source.fingerprint(), "input": spec, "skip_corrupt": source.skip_corrupt}


def _compile_ahead(run: Run) -> tuple[_Background, _Background, _Background]:
    """Compiles the train step, and the eval steps, in the background against the shapes of
    their inputs, while the loop starts TensorFlow, the writer and the input pipeline: the first
    step waits only for what is left of its compilation, the first evaluation not at all. The
    train step is traced here, on the calling thread (tracings contend for the interpreter;
    XLA's compilation does not), so an error in it is raised here; the eval step is traced in
    the background, and the first step waits for that too (the first result): a task's
    eval_metrics or predict would otherwise fail at the first evaluation, after all training
    without a validation split. A failure to compile is left for the step's own call to raise."""
    rows_split, args = sharding.batch_sharding(run.mesh), run.task.batch_args()

    def batch(shapes: dict, rows: int) -> dict[str, jax.ShapeDtypeStruct]:
        return {
            k: jax.ShapeDtypeStruct((rows, *shape), dtype, sharding=rows_split)
            for k, (shape, dtype) in shapes.items()
        }

    state = abstract_state(run.state)
    train_batch = batch(data_lib.train_example_shapes(run.train_source, run.input, **args),
                        run.spec.batch_size)  # fmt: skip
    eval_batch = batch(data_lib.eval_example_shapes(run.eval_source, run.input, **args),
                       run.spec.eval_batch_size)  # fmt: skip
    lowered = run.train_step.lower(state, run.frozen, train_batch, run.settings)
    lowered_eval = []

    def trace_eval() -> None:  # one program for the trained and the EMA parameters
        weights = evaluated_weights(state, ema=False)
        lowered_eval.append(run.eval_step.lower(*weights, run.frozen, eval_batch))

    def compile_eval() -> None:
        traced.wait()
        _quietly(lambda: _log_step_memory("Eval step", lowered_eval[0].compile()))

    def compile_train() -> None:
        _quietly(lambda: _log_step_memory("Train step", lowered.compile()))

    traced = _Background("trace_eval", trace_eval)
    return (
        traced,
        _Background("compile_train", compile_train),
        _Background("compile_eval", compile_eval),
    )


def _log_step_memory(name: str, compiled: Any) -> None:
    """What XLA planned for ``compiled``: its arguments, outputs and temporaries per device (an
    out-of-memory error names no step; this line says which needs what)."""
    analysis = compiled.memory_analysis()
    if analysis is None:  # a backend that does not say
        return
    mib = lambda b: f"{b / 2**20:,.0f} MiB"
    logger.info(
        "%s memory per device (XLA's plan): %s of temporaries, %s of arguments, %s of outputs.",
        name, mib(analysis.temp_size_in_bytes), mib(analysis.argument_size_in_bytes),
        mib(analysis.output_size_in_bytes),
    )  # fmt: skip


def _quietly(compile_step: Callable[[], Any]) -> None:
    """``compile_step()``; a failure is logged at DEBUG (the step's call compiles again and
    raises it)."""
    try:
        compile_step()
    except Exception as e:  # noqa: BLE001
        logger.debug("Step not compiled ahead: %s", e)


class _StartUp:
    """What runs in the background while training starts: the train step's compilation and the
    eval step's tracing, which the first step waits for, and the eval step's compilation and the
    eval splits' check, which the first evaluation (or the first step's end) waits for."""

    def __init__(self, run: Run):
        self.before_training, eval_compile = [], None
        if not _finished(run):
            eval_trace, train_compile, eval_compile = _compile_ahead(run)
            self.before_training = [train_compile, eval_trace]
        check, self._checked = _check_examples(run)
        self.run, self.before_evaluating = run, [b for b in (check, eval_compile) if b]

    def wait_for_train_step(self) -> None:
        for background in self.before_training:
            background.wait()
        self.before_training = []

    def wait_before_evaluating(self) -> None:
        """Waits for the eval step's compilation and the splits' check; the checkpoints saved
        from then on record the checked splits (a resume does not read them again)."""
        for background in self.before_evaluating:
            background.wait()
        if self.before_evaluating:
            self.run.meta["checked_data"] = dict(self._checked)
        self.before_evaluating = []

    def finish(self) -> None:
        """Joins what still runs, its errors dropped (a run that failed before waiting for it):
        a process must not end while XLA compiles on a thread (it aborts at exit)."""
        for background in (*self.before_training, *self.before_evaluating):
            background.join()


def _train(run: Run, workdir: str, stop: StopSignals) -> dict[str, float]:
    if stop.stop_before(run.start_step):  # during setup: nothing new to save
        saved = run.checkpointer.directory if run.start_step else None
        raise StopRequested(run.start_step, stop.reason, saved)
    startup = _StartUp(run)
    is_main = jax.process_index() == 0
    writer = MetricWriter(workdir if is_main else None)
    try:
        if is_main:
            writer.write_start(run.start_step + 1)
            writer.write_hparams(_flat_hparams(run.meta["config"]))
            _log_start(run)
        _resume_best(run)
        results = _loop(run, _fresh_skips(run.state), writer, stop, startup)
        if run.selection is not None:
            results.update(_test_best(run, writer, stop))
        return results
    finally:
        startup.finish()
        writer.flush()
        writer.close()


def _resume_best(run: Run) -> None:
    """A resumed run's best checkpoint is the one its selection names: others (kept by an
    earlier run, past the restored step too: a crash after an improvement's best save, before
    the step checkpoint after it; this run computes that step again and saves its own) are
    removed; a missing one (a crash cut its save short) is saved again from the restored state
    when it is that state, else chosen again from here on. A selection without a best (none
    yet, or started anew on another validation split) keeps none."""
    selection = run.selection
    if selection is None or run.start_step == 0:
        return
    if selection.best_step is None:  # none yet, or chosen anew (another validation split)
        run.best.keep_only(None)
        return
    best_step = selection.best_step
    if run.best.has(best_step):
        run.best.keep_only(best_step)
    elif best_step == run.start_step:
        logger.warning("The best checkpoint of step %d was not complete in %s; saving it again "
                       "from that step's checkpoint.", best_step, run.best.directory)  # fmt: skip
        run.best.keep_only(None)  # a later best is an earlier run's: this run saves its own
        run.best.save(best_step, run.state, _meta(run, False), selection.best_value)
    elif _finished(run):
        raise CheckpointError(
            f"The best checkpoint of step {best_step} ({selection.metric} "
            f"{selection.best_value:.6g}) is not in {run.best.directory}, and the run has no "
            "validation left to choose another; its step checkpoints are intact (predict and "
            "export read the newest with --which=latest)."
        )
    else:
        logger.warning(
            "The best checkpoint of step %d (%s %.6g) is not in %s; the best is chosen again "
            "from the validations after step %d.", best_step, selection.metric,
            selection.best_value, run.best.directory, run.start_step,
        )  # fmt: skip
        selection.best_value = selection.best_step = None
        selection.bad_evaluations = 0
        run.best.keep_only(None)  # not this run's best: the next improvement is


def _finished(run: Run) -> bool:
    stopped_early = run.selection is not None and run.selection.stopped_at is not None
    return run.start_step >= run.total_steps or stopped_early


def _loop(
    run: Run, state: TrainState, writer: MetricWriter, stop: StopSignals, startup: _StartUp
) -> dict[str, float]:
    """Trains from ``run.start_step`` to the end (or early stopping); returns the last metrics
    of each kind."""
    spec, guard = run.spec, _Guard(run, state)
    results: dict[str, float] = {}
    evaluate_first = spec.eval_before_training and run.start_step == 0
    if evaluate_first or _finished(run):
        startup.wait_before_evaluating()
    if evaluate_first:  # its results go into every checkpoint's meta: a resume reports them
        split, _ = run.periodic_source
        before = _evaluate(run, state, 0, writer)
        run.meta["evaluated_before"] = {
            k.replace(split, f"{split}_before", 1): v for k, v in before.items()
        }
    results.update(run.meta.get("evaluated_before") or {})
    log = _TrainLog(run, guard, writer)
    if run.evaluation_pending and not (_finished(run) and run.selection is None):
        startup.wait_before_evaluating()  # (a final evaluation follows anyway)
        results.update(_evaluate_pending(run, state, writer, stop, log))
        log.restart_clock()  # the window's time starts with its training
    if _finished(run):  # already finished: report the final evaluation again
        logger.info("This run finished at step %d: reporting its evaluation again, training "
                    "nothing.", run.start_step)  # fmt: skip
        note_continuation(run)  # (an earlier longer resume's note goes)
        results.update(run.reported or {})  # its last train (and validation) metrics
        if run.selection is None:
            results.update(_evaluate(run, state, run.total_steps, writer, stop))
        return results

    if run.train_source.skip_corrupt:  # a stream of bad examples alone would wait forever
        data_lib.check_examples(run.train_source, run.input, sample=TRAIN_SAMPLE)
    train_iter = data_lib.train_batches(
        run.train_source, run.input, global_batch=spec.batch_size, seed=spec.seed,
        start_step=run.start_step, start_position=run.start_position,
        shuffle_buffer=run.spec.data.shuffle_buffer, **run.task.batch_args(),
    )  # fmt: skip
    try:
        for step in range(run.start_step + 1, run.total_steps + 1):
            run.checkpointer.check_lock()  # another run took the workdir over: stop here
            batch = sharding.to_global_batch(next(train_iter), run.mesh)
            startup.wait_for_train_step()
            state, metrics = run.train_step(state, run.frozen, batch, run.settings)
            if step == run.start_step + 1:  # setup succeeded: the restored step is not the end
                note_continuation(run)
            startup.wait_before_evaluating()  # at once after the first step
            results.update(log.add(step, metrics, state))
            evaluated, done = _end_step(run, state, step, writer, stop, log, train_iter)
            results.update(evaluated)
            if done:
                break
    finally:
        train_iter.close()
    return results


class _TrainLog:
    """Training scalars per ``log_every_steps`` window: metrics merged on the device, fetched
    at the window's end with the learning rate, throughput and skip count, and written."""

    def __init__(self, run: Run, guard: _Guard, writer: MetricWriter):
        self.run, self.guard, self.writer = run, guard, writer
        self.last: dict[str, float] = {}  # the newest window's scalars
        self._reset()
        self.metrics = self._resumed_window()

    def _reset(self) -> None:
        self.metrics, self.start, self.images = None, time.perf_counter(), 0
        self.paused_s = 0.0  # evaluating and saving: not training time
        self.first_s: float | None = None  # setup, compilation and the run's first step

    def restart_clock(self) -> None:
        """Times the open window from now (work before the first step, a pending evaluation,
        is neither training time nor the first step's)."""
        self.start, self.paused_s = time.perf_counter(), 0.0

    @contextlib.contextmanager
    def paused(self, state: TrainState) -> Iterator[None]:
        """The block's time (an evaluation, a save) does not count as training time."""
        jax.block_until_ready(state.step)  # the step before it counts, once it has finished
        start = time.perf_counter()
        try:
            yield
        finally:
            self.paused_s += time.perf_counter() - start

    def window(self) -> list | None:
        """The open window's merged metrics (their leaves, as JSON), for a checkpoint: a run
        resumed from it reports that window as the uninterrupted run does."""
        return None if self.metrics is None else [np.asarray(x).tolist() for x in
                                                  jax.tree.leaves(self.metrics)]  # fmt: skip

    def _resumed_window(self) -> Any:
        """The window the restored checkpoint saved open (None: none, or another task's)."""
        saved, template = self.run.train_window, self.run.task.train_metrics.empty()
        leaves, tree = jax.tree.flatten(template)
        if saved is None or len(saved) != len(leaves):
            return None
        replicated = sharding.replicated(self.run.mesh)
        values = [jax.device_put(np.asarray(v, x.dtype).reshape(x.shape), replicated)
                  for v, x in zip(saved, leaves, strict=True)]  # fmt: skip
        return jax.tree.unflatten(tree, values)

    def add(self, step: int, metrics: Any, state: TrainState) -> dict[str, float]:
        """Adds a step's metrics; the window's scalars at its end, else ``{}``."""
        if step == self.run.start_step + 1:  # one wait, for the time to the first step
            jax.block_until_ready(metrics)
            logger.info(
                "First step (%d) done %.1f s after the run started (setup and compilation).",
                step, time.perf_counter() - self.run.started,
            )  # fmt: skip
            self.first_s = time.perf_counter() - self.start
        self.metrics = metrics if self.metrics is None else self.metrics.merge(metrics)
        self.images += self.run.spec.batch_size
        if step % self.run.spec.log_every_steps and step != self.run.total_steps:
            return {}
        return self.write(step, state)

    def write(self, step: int, state: TrainState, stopping: bool = False) -> dict[str, float]:
        """The open window's scalars, written at ``step`` (``stopping``: training ends there,
        early). Throughput counts the training steps' time: not evaluations or saves, nor the
        first step's setup and compilation (unless the window holds only that step)."""
        summary = scalars(self.metrics, "train/")
        elapsed, images = time.perf_counter() - self.start - self.paused_s, self.images
        if self.first_s is not None and images > self.run.spec.batch_size:
            elapsed, images = elapsed - self.first_s, images - self.run.spec.batch_size
        skipped = self.guard.check(state)  # skipped updates do not advance the optimizer's count
        learning_rate = self.run.setup.optimizer.schedule(step - 1 - skipped)
        summary["train/learning_rate"] = float(learning_rate)
        if images:  # (none: a window a resumed run restored and closes before any step)
            summary["train/images_per_sec"] = images / max(elapsed, 1e-9)
        summary["train/skipped_steps"] = skipped
        self.writer.write_scalars(step, summary)
        steps = images / self.run.spec.batch_size  # the ETA counts evaluations and saves too
        rate = steps / max(elapsed + self.paused_s, 1e-9) if images else None
        self._progress(step, rate, stopping)
        self._reset()
        self.last = summary
        return summary

    def stop_early(self, step: int, state: TrainState) -> dict[str, float]:
        """Training stops early at ``step``: the open window's scalars written, or (the window
        closed at this step, its line printed a time to go) a line saying so."""
        if self.metrics is not None:
            return self.write(step, state, stopping=True)
        self._progress(step, None, stopping=True)
        return {}

    def _progress(self, step: int, steps_per_sec: float | None, stopping: bool) -> None:
        """The progress line at ``step``: the rate (None: no window to measure) and the time to
        go, or that training stops there."""
        total = self.run.total_steps
        line = f"Step {step} of {total} ({100 * step / total:.0f}%)"
        if steps_per_sec is not None:
            line += f", {steps_per_sec:.2f} steps/s"
        if stopping:
            logger.info("%s; stopping early.", line)
            return
        eta = round((total - step) / max(steps_per_sec, 1e-9))
        logger.info("%s, %d:%02d:%02d to go.", line, eta // 3600, eta // 60 % 60, eta % 60)


def _end_step(
    run: Run, state: TrainState, step: int, writer: MetricWriter,
    stop: StopSignals, log: _TrainLog, train_iter: Any,
) -> tuple[dict[str, float], bool]:  # fmt: skip
    """After ``step``'s update: evaluation, selection, checkpoint (with the train log's open
    window), stop signal. Returns the evaluation's results (if any) and whether training ends
    here (early stopping)."""
    guard = log.guard
    selection, last, every = run.selection, step == run.total_steps, run.spec.eval_every_steps
    evaluating = last or (every > 0 and step % every == 0)
    stopping = stop.should_stop(step)
    results: dict[str, float] = {}
    # Evaluate before the save (it records the selection's progress, also on a stop signal,
    # for an exact resume or a longer run), except the final evaluation without selection: the
    # last step is saved first, so that a failed final evaluation costs no steps.
    final_after_save = last and selection is None
    pending = False  # a stop signal cut this step's evaluation short: the resumed run does it
    if evaluating and not final_after_save:
        guard.check(state)  # a non-finite state is neither evaluated nor kept as the best
        try:
            with log.paused(state):
                results = _evaluate(run, state, step, writer, interrupt=_stop_periodic(stop))
        except _EvaluationStopped:
            pending = stopping = True
        if selection is not None and selection.should_stop and not pending and not last:
            selection.stopped_at = step  # (at the last step the run ends anyway: not early)
    early = selection is not None and selection.stopped_at == step
    if early:  # the open window ends here too
        results = {**log.stop_early(step, state), **results}
    if stopping or early or _save_due(run.spec, step, run.total_steps):
        guard.check(state)  # nothing is saved past a non-finite step under "stop"
        meta = {**_meta(run, early), "train_window": log.window(),
                "stream_order": data_lib.STREAM_ORDER}  # fmt: skip
        if early or last or pending:  # what a finished run started again reports (a pending
            meta["reported"] = {**log.last, **results}  # evaluation may finish the run)
        if pending:
            meta["evaluation_pending"] = True
        with log.paused(state):
            if run.best is not None:  # the best a step's meta names is complete before it
                run.best.wait()
            run.checkpointer.save(
                step, state, meta, force=stopping or early or last,
                data_position=train_iter.next_position,
            )  # fmt: skip
    if stopping:
        run.checkpointer.wait()
        if jax.process_count() > 1:  # every save committed before any process exits
            multihost_utils.sync_global_devices("vision_jax_stop")
        raise StopRequested(step, stop.reason, run.checkpointer.directory)
    if early:
        _log_early_stop(selection, step)
        return results, True
    if evaluating and final_after_save:
        results = _evaluate(run, state, step, writer, stop)
    return results, False


def _meta(run: Run, stopped_early: bool) -> dict:
    """What a checkpoint records besides the state: the run record, whether frozen params lie
    beside the checkpoints, and the selection progress."""
    meta = {**run.meta, "frozen": run.checkpointer.has_frozen}
    if run.checkpointer.frozen_digest is not None:  # to check them if read from init.path again
        meta["frozen_digest"] = run.checkpointer.frozen_digest
    if run.selection is None:
        return meta
    return {**meta, "selection": run.selection.to_json(), "stopped_early": stopped_early}


def _evaluate(
    run: Run, state: TrainState, step: int, writer: MetricWriter,
    stop: StopSignals | None = None, interrupt: Callable[[], None] | None = None,
) -> dict[str, float]:  # fmt: skip
    """The periodic evaluation (validation split if any, else eval split), written; with a
    validation split it updates the selection and keeps an improvement as the best state.
    ``stop``: the final evaluation (of a saved step) stops on a signal; ``interrupt``: called
    before each batch (it raises to stop the evaluation)."""
    split, source = run.periodic_source
    final = step == run.total_steps and split == "eval" and run.selection is None
    observe = None
    if final:
        observe = _final_observer(run, run.checkpointer.directory, step)
        interrupt = _stop_evaluating(run, stop, step)
    result = run_evaluation(run, state, source, split, observe, interrupt)
    writer.write_scalars(step, result)
    selection = run.selection
    absent = run.task.per_class_absent
    if selection is not None and step > 0 and selection.update(step, result, absent):
        run.best.save(step, state, _meta(run, False), selection.best_value)
        logger.info("New best %s %.6g at step %d.", selection.metric, selection.best_value, step)
    return result


def _test_best(run: Run, writer: MetricWriter, stop: StopSignals) -> dict[str, float]:
    """The best state, evaluated once on the eval (test) split: ``eval/...``, plus
    ``best/step`` and ``best/<metric>`` (its validation figure)."""
    steps = []

    def read(abstract: Any) -> tuple[Any, dict]:
        step, values, meta = run.best.restore(abstract, run.checkpointer.step_dir)
        steps.append(step)
        return values, meta

    state, meta = restore_into(read, run.state)
    step = steps[-1]
    selection = run.selection.resumed(meta.get("selection"))
    observe = _final_observer(run, run.best.directory, step)
    interrupt = _stop_evaluating(run, stop, run.selection.stopped_at or run.total_steps)
    result = run_evaluation(run, state, observe=observe, interrupt=interrupt)
    writer.write_scalars(step, {f"best/{k}": v for k, v in result.items()})
    logger.info(
        "Best %s %.6g at step %d; on the %s split: %s.", selection.metric,
        selection.best_value, step, run.spec.data.eval_split, result,
    )  # fmt: skip
    return {**result, "best/step": float(step), f"best/{selection.metric}": selection.best_value}


def _stop_evaluating(run: Run, stop: StopSignals | None, step: int) -> Callable[[], None] | None:
    """For the final evaluation (training ended at ``step``, saved): in a single-process run a
    stop signal stops it at the next batch (the run exits as stopped; run again, it evaluates
    again), where a long evaluation could outlast a preemption's grace period. Processes of a
    multi-process run finish it (stopping one of them alone would leave the others waiting)."""
    if stop is None or jax.process_count() > 1:
        return None

    def interrupt() -> None:
        if stop.received is not None:
            run.checkpointer.wait()  # a failed save of the last step is the error, not a stop
            raise StopRequested(step, stop.reason, run.checkpointer.directory)

    return interrupt


class _EvaluationStopped(Exception):
    """A stop signal arrived during a periodic evaluation (:func:`_stop_periodic`)."""


def _stop_periodic(stop: StopSignals) -> Callable[[], None] | None:
    """For a periodic evaluation (a validation, or the eval split's before the last step), in
    a single-process run: a stop signal ends it at the next batch (a long evaluation could
    outlast a preemption's grace period); the step is then saved with its evaluation pending,
    which the resumed run does first. Processes of a multi-process run finish it and stop
    together after the save."""
    if jax.process_count() > 1:
        return None

    def interrupt() -> None:
        if stop.received is not None:
            raise _EvaluationStopped

    return interrupt


def _evaluate_pending(
    run: Run, state: TrainState, writer: MetricWriter, stop: StopSignals, log: _TrainLog
) -> dict[str, float]:
    """The periodic evaluation of the restored step that a stop signal cut short (a selection
    sees it, and may stop the run early there: the train ``log``'s window that the checkpoint
    saved open is written then), recorded in that step's meta as the save after an evaluation
    records it; stopped again, the checkpoint keeps it pending."""
    step, selection = run.start_step, run.selection
    logger.info("Evaluating step %d first: a stop signal cut its evaluation short.", step)
    try:
        results = _evaluate(run, state, step, writer, interrupt=_stop_periodic(stop))
    except _EvaluationStopped:
        raise StopRequested(step, stop.reason, run.checkpointer.directory) from None
    early = selection is not None and selection.should_stop and step < run.total_steps
    if early:
        selection.stopped_at = step
        results = {**log.stop_early(step, state), **results}
        _log_early_stop(selection, step)
    saved = run.checkpointer.read_meta(step) or {}
    saved.pop("evaluation_pending", None)
    if early or step == run.total_steps:
        run.reported = saved["reported"] = {**(saved.get("reported") or {}), **results}
    if run.best is not None:  # the best a step's meta names is complete before the step
        run.best.wait()
    run.checkpointer.update_meta(step, {**saved, **_meta(run, early)})
    return results


def _log_early_stop(selection: Selection, step: int) -> None:
    logger.warning(
        "Early stopping at step %d: %s has not improved on %.6g (step %d) for %d evaluations.",
        step, selection.metric, selection.best_value, selection.best_step,
        selection.bad_evaluations,
    )  # fmt: skip


class FinalObserver(Protocol):
    """What ``train_and_evaluate``'s ``final`` is asked: at the start of the final evaluation
    (of the state saved in ``step_dir``), for a function that sees each batch with its
    predictions (None: nothing to observe)."""

    def begin(
        self, step_dir: str, task: Any, input_spec: data_lib.InputSpec, source: data_lib.Source
    ) -> Callable[[dict, dict], None] | None: ...


def _final_observer(run: Run, directory: str, step: int) -> Callable[[dict, dict], None] | None:
    """The ``final`` observer's function for the evaluation of ``step`` (saved in
    ``directory``) on the eval split."""
    if run.final is None or run.spec.lora is not None:  # see train_and_evaluate
        return None
    step_dir = os.path.join(directory, str(step))
    return run.final.begin(step_dir, run.task, run.input, run.eval_source)


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
