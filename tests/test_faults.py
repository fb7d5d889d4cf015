"""Fault injection: non-finite steps, signals, dead peers, corrupt eval images, config errors.

Fast tests poison a batch or send a signal from inside the loop (a wrapped train step); slow
ones (``-m slow``) drive ``python -m vision_jax.main`` and ``launch/local.sh`` in subprocesses,
kill them, and time how long the survivors take to exit.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_train import small_config

from vision_jax import data as data_lib
from vision_jax import main as vj_main
from vision_jax import specs, train
from vision_jax.config import TrackedConfig, UnreadConfigKeysError, default_config
from vision_jax.signals import EXIT_STOPPED, StopRequested
from vision_jax.train import NonFiniteError, train_and_evaluate
from vision_jax.watchdog import EXIT_PEER_LOST
from vision_jax.weights.run_dir import read_variables

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
    """A persistent compilation cache for this module (and its subprocesses): every run after
    the first reuses the same executables (a run then takes ~4 s instead of ~20 s)."""
    from jax._src import compilation_cache as cache

    values = {
        "jax_compilation_cache_dir": str(tmp_path_factory.mktemp("jax_cache")),
        "jax_persistent_cache_min_compile_time_secs": 0,
        "jax_persistent_cache_min_entry_size_bytes": 0,
    }
    old = {name: getattr(jax.config, name) for name in values}
    with pytest.MonkeyPatch.context() as env:
        for name, value in values.items():
            jax.config.update(name, value)
            env.setenv(name.upper(), str(value))
        cache.reset_cache()
        yield
    for name, value in old.items():
        jax.config.update(name, value)
    cache.reset_cache()


def config(**overrides):
    """``small_config`` with a constant learning rate (runs here that differ in ``total_steps``
    compile the same steps either way: the schedule's numbers are inputs of the step)."""
    return small_config(**{"schedule.decay": "constant", **overrides})


def wrap_step(monkeypatch, action) -> None:
    """Runs ``action(step, batch) -> batch`` before every train step of the next runs (``step``
    counts from 1 over the whole run, like the loop's)."""
    real = train.build_run

    def build(*args, **kwargs):
        run = real(*args, **kwargs)
        step_fn, count = run.train_step, [run.start_step]

        def step(state, frozen, batch, settings):
            count[0] += 1
            return step_fn(state, frozen, action(count[0], batch), settings)

        step.lower = step_fn.lower  # the loop traces the jitted step before its first call
        run.train_step = step
        return run

    monkeypatch.setattr(train, "build_run", build)


def poison(steps: set[int]):
    """An action that makes the images of the batches of ``steps`` NaN."""
    return lambda step, batch: (
        {**batch, "image": batch["image"] * jnp.nan} if step in steps else batch
    )


def leaves(path) -> list[np.ndarray]:
    return jax.tree_util.tree_leaves(read_variables(str(path)))


def step_dirs(workdir: pathlib.Path) -> dict[int, pathlib.Path]:
    """The step folders of a workdir's checkpoints (none: a run that saved nothing leaves no
    checkpoints folder)."""
    folder = workdir / "checkpoints"
    if not folder.is_dir():
        return {}
    return {int(p.name): p for p in folder.iterdir() if p.name.isdigit()}


def assert_all_finite(workdir: pathlib.Path) -> None:
    for step, path in step_dirs(workdir).items():
        assert all(np.isfinite(x).all() for x in leaves(path)), f"step {step} is not finite"


def same(a, b) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(leaves(a), leaves(b), strict=True))


# --- the non-finite guard ---------------------------------------------------------------------


@pytest.mark.slow
def test_nonfinite_stop_names_the_step_and_saves_nothing_after_it(tmp_path, monkeypatch):
    wrap_step(monkeypatch, poison({3}))
    cfg = config(total_steps=6, checkpoint_every_steps=2, log_every_steps=5)
    with pytest.raises(NonFiniteError, match=r"at step 3;.*checkpoints/2\b"):
        train_and_evaluate(cfg, str(tmp_path))
    assert sorted(step_dirs(tmp_path)) == [2]  # the save boundary at step 4 saw the skip
    assert_all_finite(tmp_path)


def test_nonfinite_skip_keeps_the_previous_state_and_counts(tmp_path, monkeypatch):
    wrap_step(monkeypatch, poison({3, 7, 8}))
    cfg = config(total_steps=5, checkpoint_every_steps=1, keep_checkpoints=10, on_nonfinite="skip")
    result = train_and_evaluate(cfg, str(tmp_path))
    assert result["train/skipped_steps"] == 1 and np.isfinite(result["eval/loss"])
    dirs = step_dirs(tmp_path)
    assert same(dirs[3], dirs[2])  # step 3 changed nothing (BatchNorm statistics included)
    assert not same(dirs[4], dirs[3])
    # Resumed with a longer schedule: two skips in a row reach max_consecutive_skips=2.
    cfg = config(
        total_steps=10, checkpoint_every_steps=1, keep_checkpoints=10, on_nonfinite="skip",
        max_consecutive_skips=2,
    )  # fmt: skip
    with pytest.raises(NonFiniteError, match=r"2 updates in a row.*step 8.*checkpoints/7\b"):
        train_and_evaluate(cfg, str(tmp_path))
    assert sorted(step_dirs(tmp_path)) == [1, 2, 3, 4, 5, 6, 7]
    assert_all_finite(tmp_path)


def test_a_save_failed_in_a_collective_asks_the_watchdog_for_a_lost_peer():
    """A peer killed during a joint save fails the save with CPU collectives' ValueError: the
    run names the lost peer (status 69) as after a failed step, not a save error (status 1)."""
    from vision_jax.checkpoint import CheckpointSaveError

    try:
        try:
            raise ValueError("UNKNOWN: Gloo AllGather failed: [...] Connection reset by peer")
        except ValueError as gloo:
            raise CheckpointSaveError("Saving the checkpoint of step 40 failed") from gloo
    except CheckpointSaveError as e:
        assert vj_main._may_mean_a_lost_peer(e)
    assert vj_main._may_mean_a_lost_peer(jax.errors.JaxRuntimeError("INTERNAL: all-reduce"))
    assert not vj_main._may_mean_a_lost_peer(ValueError("batch_size 64 is not divisible by 3"))
    assert not vj_main._may_mean_a_lost_peer(None)


def test_a_lost_peer_found_by_two_threads_is_one_line(monkeypatch, capsys):
    """The watchdog's thread and the main thread (its failed collective) both find process 1
    lost: the first ends the process with one line; the second waits for that end."""
    import threading

    from vision_jax import watchdog

    class Client:
        def key_value_set(self, *args, **kwargs) -> None:
            pass

        def key_value_dir_get(self, prefix: str) -> list:
            return []

    exits, ended = [], threading.Event()

    def exit_once(code: int) -> None:
        exits.append(code)
        ended.set()
        threading.Event().wait()  # as os._exit: never returns

    monkeypatch.setattr(watchdog.os, "_exit", exit_once)
    monkeypatch.setattr(watchdog.logging, "shutdown", lambda: None)  # pytest's capture stays
    dog = watchdog.PeerWatchdog(Client(), 0, 2, timeout=0.4)
    lost = "lost process 1 of 2: no heartbeat for 33 s"
    for _ in range(2):
        threading.Thread(target=dog.exit, args=(lost,), daemon=True).start()
    assert ended.wait(10)
    threading.Event().wait(1.0)  # time for a second line, were one printed
    assert exits == [EXIT_PEER_LOST]
    assert capsys.readouterr().err.count("vision_jax: error: lost process 1 of 2") == 1


def test_the_logged_learning_rate_is_the_one_applied_after_a_skip(tmp_path, monkeypatch, caplog):
    """A skipped update does not advance the optimizer (as ``optax.apply_if_finite``): with
    linear warmup from 0 over all 4 steps and step 2 skipped, the last update (step 4) was the
    optimizer's third, at 2/4 of the peak rate (not 3/4); nor does it count in the window's
    train metrics."""
    wrap_step(monkeypatch, poison({2}))
    cfg = config(
        total_steps=4, log_every_steps=4, on_nonfinite="skip", **{"schedule.warmup_steps": 4}
    )
    result = train_and_evaluate(cfg, str(tmp_path))
    assert result["train/skipped_steps"] == 1
    # The window of steps 1-4 averages the three applied steps only (its loss read NaN).
    assert np.isfinite(result["train/loss"]) and np.isfinite(result["train/grad_norm"])
    peak = cfg.optimizer.learning_rate
    assert result["train/learning_rate"] == pytest.approx(peak * 2 / 4)
    # Resumed with a longer warmup: the next update is the optimizer's fourth, at 3/8 of the
    # peak under the new schedule and 3/4 under the saved one (not 4/8 and the peak).
    longer = config(total_steps=9, log_every_steps=9, on_nonfinite="skip",
                    **{"schedule.warmup_steps": 8})  # fmt: skip
    with caplog.at_level(logging.WARNING):
        train_and_evaluate(longer, str(tmp_path))
    assert (f"learning rate of step 5 is {peak * 3 / 8:.4g} under this run's schedule, where the "
            f"saved run's would have given {peak * 3 / 4:.4g} ") in caplog.text  # fmt: skip


class _DeepMlp(nn.Module):
    """Many small parameter leaves (the guard's cost grows with their number), BatchNorm state."""

    @nn.compact
    def __call__(self, x, train: bool):
        x = x.reshape(x.shape[0], -1)
        for _ in range(12):
            x = nn.relu(nn.Dense(8)(x))
        x = nn.BatchNorm(use_running_average=not train)(x)
        return nn.Dense(3)(x)


def _guarded_step(tx):
    """A jitted train step of a small model with the non-finite guard, and its arguments."""
    from vision_jax.steps import SkipCounts, StepSettings, TrainState, make_train_step
    from vision_jax.tasks import Classification

    model = _DeepMlp()
    batch = {"image": jnp.ones((4, 4, 4, 3)), "label": jnp.arange(4) % 3}
    variables = model.init(jax.random.key(0), batch["image"], train=False)
    params, model_state = variables["params"], {"batch_stats": variables["batch_stats"]}
    zeros = SkipCounts.filled(jnp.zeros((), jnp.int32))
    state = TrainState(jnp.array(0), params, model_state, tx.init(params), skips=zeros)
    step = make_train_step(model, tx, Classification())
    return jax.jit(step), (state, {}, batch, StepSettings(jax.random.key(1)))


def test_nonfinite_new_parameters_are_skipped_even_with_a_finite_loss_and_gradients():
    import optax

    # Finite loss and gradients; infinite updates make the new parameters non-finite.
    step, (state, frozen, batch, settings) = _guarded_step(optax.scale(np.inf))
    new, metrics = step(state, frozen, batch, settings)
    assert int(new.step) == 1 and int(new.skips.total) == 1
    assert int(metrics.loss.count) == 0 and float(metrics.grad_norm.total) == 0.0  # not counted
    for got, want in zip(jax.tree.leaves(new.params), jax.tree.leaves(state.params), strict=True):
        np.testing.assert_array_equal(got, want)


def test_the_guard_adds_little_to_the_compiled_step(monkeypatch):
    """The finiteness flag is computed once, not copied into each guarded leaf's select."""
    import optax

    from vision_jax import steps

    def size() -> int:
        step, args = _guarded_step(optax.adam(1e-3))
        return step.lower(*args).compile().as_text().count("\n")

    guarded = size()
    monkeypatch.setattr(steps, "_all_finite", lambda tree: jnp.bool_(True))
    assert guarded < 1.5 * size()


def test_final_metrics_are_valid_json():
    from vision_jax.metrics import json_line

    line = json_line({"train/loss": float("nan"), "eval/top1": 0.5, "x": float("inf"),
                  "train/learning_rate": 1.97327123e-05, "big": 1234567.8,
                  "eval/examples": 12345678.0})  # fmt: skip
    assert json.loads(line) == {"eval/top1": 0.5, "train/loss": None, "x": None,
                                "train/learning_rate": 1.97327e-05, "big": 1234570.0,
                                "eval/examples": 12345678.0}  # fmt: skip


def test_the_best_checkpoint_line_gives_the_selected_parameters_figure():
    """Selected on an EMA metric, the summary's eval figure is the EMA parameters' (the ones
    predict, report and export read); otherwise the trained parameters'."""
    from vision_jax.main import _summaries

    results = {"best/step": 20.0, "eval/top1": 0.82, "eval_ema/top1": 0.81, "eval/examples": 100.0}
    ema = _summaries({**results, "best/val_ema/top1": 0.9167}, "classification")
    assert ema == [
        "best checkpoint: step 20 (val_ema/top1 0.9167); its top-1 accuracy (EMA parameters) on "
        "the eval split 0.8100 (100 examples)"
    ]
    plain = _summaries({**results, "best/val/top1": 0.9}, "classification")
    assert plain[0].endswith("its top-1 accuracy on the eval split 0.8200 (100 examples)")


def test_the_summary_names_a_headline_in_words_for_library_tasks_only(monkeypatch):
    """A task of one's own whose headline is ``map`` printed it as "COCO mAP@[.5:.95]" (the
    words were keyed by metric name); it prints the metric's name, as does a subclass that
    changes its headline; a library task's subclass that keeps it keeps the words."""
    from own_task import DigitValue

    from vision_jax import tasks
    from vision_jax.main import _summaries

    mine = type("Tagged", (DigitValue,), {"name": "tagged", "headline": "map"})
    topk = type("Top5", (tasks.Classification,), {"name": "top5", "headline": "top5"})
    kept = type("Kept", (tasks.Detection,), {"name": "kept"})
    for cls in (mine, topk, kept):
        monkeypatch.setitem(tasks.TASKS, cls.name, cls)
    results = {"best/step": 4.0, "best/val/x": 0.5, "eval/examples": 10.0}
    said = lambda task, headline: _summaries({**results, f"eval/{headline}": 0.25}, task)[0]
    assert said("tagged", "map").endswith("its map on the eval split 0.2500 (10 examples)")
    assert said("top5", "top5").endswith("its top5 on the eval split 0.2500 (10 examples)")
    assert "its COCO mAP@[.5:.95] on the eval split" in said("kept", "map")


# --- signals ------------------------------------------------------------------------------------


def test_tensorboard_shows_the_steps_a_crash_lost_once(tmp_path, monkeypatch):
    """A crash after logging step 3 (checkpoint at 2): the rerun writes step 3 again, after
    TensorBoard's restart marker at it, so that TensorBoard drops the first run's step 3 (it
    drew both, a line back from step 3 to 2 and on again; a crash at step 1900 after a
    checkpoint at 1000 drew the whole stretch twice)."""
    from vision_jax.tf_without_keras import load

    cfg = config(total_steps=4, checkpoint_every_steps=2, log_every_steps=1)

    def crash_at_4(step, batch):
        if step == 4:
            raise RuntimeError("the host went away")
        return batch

    wrap_step(monkeypatch, crash_at_4)
    with pytest.raises(RuntimeError, match="the host went away"):
        train_and_evaluate(cfg, str(tmp_path))
    assert sorted(step_dirs(tmp_path)) == [2]
    monkeypatch.undo()
    train_and_evaluate(cfg, str(tmp_path))
    load()  # (before TensorBoard, which imports TensorFlow)
    from tensorboard.backend.event_processing import plugin_event_accumulator

    written = [  # every event file's steps of train/loss, as written
        e.step
        for path in sorted(tmp_path.glob("events.out.tfevents.*"))
        for e in load().compat.v1.train.summary_iterator(str(path))
        if any(v.tag == "train/loss" for v in e.summary.value)
    ]
    assert written == [1, 2, 3, 3, 4]
    shown = plugin_event_accumulator.EventAccumulator(str(tmp_path))  # TensorBoard's reader
    shown.Reload()
    assert [e.step for e in shown.Tensors("train/loss")] == [1, 2, 3, 4]


def test_sigterm_saves_at_the_next_step_and_the_rerun_resumes_exactly(tmp_path, monkeypatch):
    cfg = config(total_steps=6, checkpoint_every_steps=100)
    full = tmp_path / "full"
    train_and_evaluate(cfg, str(full))

    def sigterm_at_3(step, batch):
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.2)  # the signal thread takes note before the step ends
        return batch

    wrap_step(monkeypatch, sigterm_at_3)
    stopped = tmp_path / "stopped"
    with pytest.raises(StopRequested, match="stopped at step 3 .SIGTERM.") as info:
        train_and_evaluate(cfg, str(stopped))
    assert info.value.step == 3 and sorted(step_dirs(stopped)) == [3]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored
    monkeypatch.undo()
    train_and_evaluate(cfg, str(stopped))
    assert sorted(step_dirs(stopped)) == [3, 6]
    assert same(full, stopped)


def test_sigterm_during_a_fresh_runs_setup_says_nothing_was_saved(tmp_path, monkeypatch):
    import vision_jax.train as train_lib

    build = train_lib.build_run

    def build_after_sigterm(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.2)
        return build(*args, **kwargs)

    monkeypatch.setattr(train_lib, "build_run", build_after_sigterm)
    with pytest.raises(StopRequested) as info:
        train_and_evaluate(config(total_steps=2), str(tmp_path))
    assert str(info.value) == (
        "stopped before the first step (SIGTERM); nothing was saved. Run the same command "
        "again to start."
    )
    assert not step_dirs(tmp_path)


@pytest.mark.slow
def test_sigterm_in_the_final_evaluation_stops_it_and_the_rerun_evaluates(tmp_path, monkeypatch):
    """The last step is saved before the final evaluation: a signal during it stops the run at
    the next batch (a long evaluation could outlast a preemption's grace), and the rerun
    evaluates the saved step again."""
    cfg = config(total_steps=2)
    full = train_and_evaluate(cfg, str(tmp_path / "full"))
    real = data_lib.eval_batches

    def sigterm_after_the_first_batch(*args, **kwargs):
        for i, batch in enumerate(real(*args, **kwargs)):
            if i == 1:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.2)  # the signal thread takes note
            yield batch

    monkeypatch.setattr(data_lib, "eval_batches", sigterm_after_the_first_batch)
    stopped = tmp_path / "stopped"
    with pytest.raises(StopRequested, match="stopped at step 2 .SIGTERM.") as info:
        train_and_evaluate(cfg, str(stopped))
    assert info.value.step == 2 and sorted(step_dirs(stopped)) == [2]
    assert not list((stopped / "checkpoints").glob("*tmp*"))  # the save finished
    monkeypatch.undo()
    again = train_and_evaluate(cfg, str(stopped))
    assert {k: v for k, v in again.items() if k.startswith("eval/")} == {
        k: v for k, v in full.items() if k.startswith("eval/")
    }


@pytest.mark.slow
def test_sigterm_in_a_periodic_evaluation_stops_it_and_the_rerun_evaluates_first(
    tmp_path, monkeypatch
):
    """A signal during an evaluation before the last step stops it at the next batch; the
    step is saved (though no save was due) with the evaluation pending, and the rerun
    evaluates it first, then trains on as the uninterrupted run."""
    cfg = config(total_steps=4, eval_every_steps=2, checkpoint_every_steps=4)
    full = train_and_evaluate(cfg, str(tmp_path / "full"))
    real, evaluated = data_lib.eval_batches, []

    def sigterm_in_the_first(*args, **kwargs):
        evaluated.append(1)
        for i, batch in enumerate(real(*args, **kwargs)):
            if i == 1 and len(evaluated) == 1:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.2)  # the signal thread takes note
            yield batch

    monkeypatch.setattr(data_lib, "eval_batches", sigterm_in_the_first)
    stopped = tmp_path / "stopped"
    with pytest.raises(StopRequested, match="stopped at step 2 .SIGTERM."):
        train_and_evaluate(cfg, str(stopped))
    assert sorted(step_dirs(stopped)) == [2]
    meta = json.loads((step_dirs(stopped)[2] / "meta" / "metadata").read_text())
    assert meta["evaluation_pending"]
    again = train_and_evaluate(cfg, str(stopped))
    assert len(evaluated) == 3  # the cut evaluation, step 2's again, the final one
    assert sorted(step_dirs(stopped)) == [2, 4] and same(tmp_path / "full", stopped)
    assert {k: v for k, v in again.items() if k.startswith("eval/")} == {
        k: v for k, v in full.items() if k.startswith("eval/")
    }


def test_a_signal_in_the_final_evaluation_reports_a_failed_last_save_not_a_stop():
    """Stopping the final evaluation waits for the last step's save first: when that save
    failed, its error is raised (the rerun would otherwise trust a step that is not there)."""
    from types import SimpleNamespace

    from vision_jax.checkpoint import CheckpointSaveError

    def failed_save():
        raise CheckpointSaveError("Saving the checkpoint of step 6 failed: EFBIG")

    run = SimpleNamespace(checkpointer=SimpleNamespace(wait=failed_save, directory="ckpt"))
    stop = SimpleNamespace(received="SIGTERM", reason="SIGTERM")
    interrupt = train._stop_evaluating(run, stop, 6)
    with pytest.raises(CheckpointSaveError, match="step 6 failed"):
        interrupt()
    run.checkpointer.wait = lambda: None  # saved: the signal stops the evaluation
    with pytest.raises(StopRequested, match="stopped at step 6"):
        interrupt()
    stop.received = None  # no signal: the evaluation goes on
    interrupt()


# --- the end of a run -----------------------------------------------------------------------------


def _image_folder(root: pathlib.Path, corrupt_eval: bool) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 4), ("test", 1)):
        for c in "abcdefghij":  # 10 classes, as digits: the same compiled steps
            folder = root / split / c
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 255, (12, 12, 3), np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    if corrupt_eval:
        (root / "test" / "b" / "bad.png").write_bytes(b"not a png")


@pytest.mark.slow
def test_a_corrupt_eval_image_stops_the_run_before_training(tmp_path):
    data = tmp_path / "data"
    _image_folder(data, corrupt_eval=True)
    cfg = config(**{"data.source": "imagefolder", "data.root": str(data)})
    with pytest.raises(
        ValueError, match=r"Bad example\(s\): cannot read image .*test/b/bad\.png.*skip_corrupt"
    ):
        train_and_evaluate(cfg, str(tmp_path / "run"))
    assert not step_dirs(tmp_path / "run")
    cfg.data.skip_corrupt = True  # skipped and counted
    assert train_and_evaluate(cfg, str(tmp_path / "run"))["eval/examples"] == 10


@pytest.mark.parametrize("split", ["train", "test"])
def test_a_split_without_one_usable_example_is_an_error_with_skip_corrupt(tmp_path, split):
    """data.skip_corrupt with every example of a split bad: an error naming the files (a
    training stream of bad examples alone waited forever for a good one; an eval split of them
    reported eval/examples 0 and exit status 0)."""
    data = tmp_path / "data"
    _image_folder(data, corrupt_eval=False)
    for image in (data / split).rglob("*.png"):
        image.write_bytes(b"not a png")
    cfg = config(**{"data.source": "imagefolder", "data.root": str(data)})
    cfg.data.skip_corrupt = True
    count, drawn = (40, "drawn at random ") if split == "train" else (10, "")
    match = rf"None of the {count} examples {drawn}of the split can be used: cannot read image "
    with pytest.raises(ValueError, match=match):
        train_and_evaluate(cfg, str(tmp_path / "run"))
    assert not step_dirs(tmp_path / "run")


def test_the_eval_split_is_read_while_the_first_step_compiles(tmp_path, monkeypatch):
    """The check of the eval split runs on its own thread, beside the first step (whose call
    compiles it); the loop waits for it before the step's checkpoint."""
    data = tmp_path / "data"
    _image_folder(data, corrupt_eval=True)
    events, check, stepped = [], train.data_lib.check_examples, threading.Event()

    def slow_check(source, spec):
        events.append(("check starts", threading.current_thread().name))
        stepped.wait(timeout=60)  # a check that ran before the step would wait here in vain
        try:
            return check(source, spec)
        finally:
            events.append(("check ends", threading.current_thread().name))

    def first_step(step, batch):
        events.append((f"step {step}", threading.current_thread().name))
        stepped.set()
        return batch

    monkeypatch.setattr(train.data_lib, "check_examples", slow_check)
    wrap_step(monkeypatch, first_step)
    cfg = config(**{"data.source": "imagefolder", "data.root": str(data)})
    cfg.checkpoint_every_steps = 1
    with pytest.raises(ValueError, match=r"Bad example\(s\): cannot read image .*test/b/bad\.png"):
        train_and_evaluate(cfg, str(tmp_path / "run"))
    main = threading.current_thread().name
    assert [e for e, _ in events] == ["check starts", "step 1", "check ends"]
    assert [t == main for _, t in events] == [False, True, False]
    assert not step_dirs(tmp_path / "run")  # the error came before step 1 was saved


def test_a_resume_does_not_read_an_unchanged_eval_split_again(tmp_path, monkeypatch, caplog):
    """The eval split's check (every image read: minutes for ImageNet's 50,000) runs once per
    run: a resume reads it again only when its examples changed."""
    from PIL import Image

    data, run = tmp_path / "data", str(tmp_path / "run")
    _image_folder(data, corrupt_eval=False)
    checked, check = [], train.data_lib.check_examples

    def spy(source, spec):
        checked.append(source.num_examples)
        return check(source, spec)

    monkeypatch.setattr(train.data_lib, "check_examples", spy)
    cfg = lambda steps: config(
        total_steps=steps, **{"data.source": "imagefolder", "data.root": str(data)}
    )
    train_and_evaluate(cfg(2), run)
    assert checked == [10]  # a fresh run reads it
    with caplog.at_level(logging.INFO, logger="vision_jax.train"):
        train_and_evaluate(cfg(3), run)
    assert checked == [10]  # the resume does not
    assert "The eval split was read when the run started" in caplog.text
    Image.new("RGB", (12, 12)).save(data / "test" / "c" / "new.png")
    train_and_evaluate(cfg(4), run)
    assert checked == [10, 11]  # another eval split: read again
    train_and_evaluate(cfg(5), run)
    assert checked == [10, 11]


def test_the_final_state_is_saved_before_the_final_evaluation(tmp_path, monkeypatch):
    def fail(*args):
        raise ValueError("evaluation failed")

    monkeypatch.setattr(train, "run_evaluation", fail)
    with pytest.raises(ValueError, match="evaluation failed"):
        train_and_evaluate(config(total_steps=3, checkpoint_every_steps=100), str(tmp_path))
    assert sorted(step_dirs(tmp_path)) == [3]


# --- config errors ------------------------------------------------------------------------------


def main_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "vision_jax.main", *args], cwd=ROOT, capture_output=True,
        text=True, timeout=timeout, env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )  # fmt: skip


def run_python(code: str) -> subprocess.CompletedProcess:
    """``code`` run by a new interpreter in the repository root, on the CPU."""
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )  # fmt: skip


def main_with(tmp_path, function: str, body: str, *flags: str) -> str:
    """Code running ``python -m vision_jax.main`` on the quickstart config in ``tmp_path``
    (and ``flags``) with ``vision_jax.train.<function>`` replaced by one running ``body``."""
    argv = ", ".join(repr(a) for a in ("main", "--config=configs/digits_pretrain.py",
                                       f"--workdir={tmp_path}", *flags))  # fmt: skip
    return (
        "import runpy, sys, jax, numpy, vision_jax.train as train\n"
        "def replaced(*args, **kwargs):\n"
        f"    {body}\n"
        f"train.{function} = replaced\n"
        f"sys.argv = [{argv}]\n"
        "runpy.run_module('vision_jax.main', run_name='__main__')\n"
    )


def test_unknown_config_key_on_the_command_line_is_one_line_with_the_closest_keys(tmp_path):
    proc = main_cli(
        "--config=configs/digits_pretrain.py", f"--workdir={tmp_path}",
        "--config.optimizer.lrr=0.1",
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "vision_jax: error: Unknown config key 'optimizer.lrr' (closest: "
        "optimizer.learning_rate, optimizer.lr_mults, optimizer.layer_decay)."
    ]


def test_the_closest_keys_are_only_close_ones():
    """A key of that name elsewhere is named alone (where the key went, not the keys of the
    section alike in name); a name like none of the keys names none, a long one even when
    somewhat like some (the looser cutoff is a short name's: lrr)."""
    from vision_jax.config import unknown_key

    assert unknown_key(default_config(), "optimzer.learning_rate") == (
        "Unknown config key 'optimzer.learning_rate': optimizer.learning_rate has that name."
    )
    assert unknown_key(default_config(), "learning_rate") == (
        "Unknown config key 'learning_rate': optimizer.learning_rate has that name."
    )
    assert unknown_key(default_config(), "xyz") == "Unknown config key 'xyz'."
    assert unknown_key(default_config(), "compile_cache") == "Unknown config key 'compile_cache'."


def test_a_value_of_another_type_on_the_command_line_names_the_key(tmp_path):
    """``--config.total_steps=60.0`` gave Python's "invalid literal for int() with base 10":
    one line naming the key, what it takes and the value (how to write a whole number)."""
    proc = main_cli(
        "--config=configs/digits_pretrain.py", f"--workdir={tmp_path}", "--config.total_steps=60.0"
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "vision_jax: error: config.total_steps must be an integer; got 60.0 "
        "(--config.total_steps=60)."
    ]
    for absl, message in [  # absl's messages, as the command line gave them
        ("flag --config.lora.rank=2.5: invalid literal for int() with base 10: '2.5'",
         "config.lora.rank must be an integer; got 2.5."),
        ("flag --config.seed=1e3: invalid literal for int() with base 10: '1e3'",
         "config.seed must be an integer; got 1e3 (--config.seed=1000)."),
        ("flag --config.input.random_erasing=often: could not convert string to float: 'often'",
         "config.input.random_erasing must be a number; got often."),
        ("flag --config.input.flip=maybe: ('Non-boolean argument to boolean flag', 'maybe')",
         "config.input.flip must be True or False; got maybe."),
    ]:  # fmt: skip
        assert vj_main._bad_override_value(absl) == message
    assert vj_main._bad_override_value("flag --workdir=x: invalid literal for int()") is None


def test_a_value_of_another_type_in_a_config_file_names_the_key_as_the_command_line(tmp_path):
    """``c.total_steps = 60.0`` in a config file gave ml_collections' "Could not override field
    'total_steps' (reference). 60.0 is of original type <class 'float'> and cannot be casted
    ...": the command line's line, with how to write it in a file."""
    config_file = tmp_path / "float_steps.py"
    config_file.write_text(
        "from vision_jax.config import default_config\n\n\n"
        "def get_config(arg=None):\n"
        "    c = default_config()\n"
        "    c.total_steps = 60.0\n"
        "    return c\n"
    )
    proc = main_cli(f"--config={config_file}", f"--workdir={tmp_path / 'run'}")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"vision_jax: error: --config={config_file}: config.total_steps must be an integer; got "
        "60.0 (config.total_steps = 60)."
    ]
    config = default_config()
    for key, value, message in [
        ("schedule.warmup_steps", 2.5, "config.schedule.warmup_steps must be an integer; got 2.5."),
        ("input.random_erasing", "often",
         "config.input.random_erasing must be a number; got 'often'."),
        ("input.flip", "maybe", "config.input.flip must be True or False; got 'maybe'."),
        ("mesh", 3, "config.mesh must be a string; got 3."),
    ]:  # fmt: skip
        section, _, leaf = key.rpartition(".")
        with pytest.raises(TypeError, match=f"^{re.escape(message)}$"):
            setattr(config[section] if section else config, leaf, value)


@pytest.mark.slow
def test_none_on_the_command_line_unsets_an_optional_key(tmp_path):
    """absl parses ``--config.ema_decay=None`` as a float and fails: such overrides are taken
    out (also from sys.argv, which ml_collections reads) and applied as None, the last override
    of a key winning; unknown keys and sections are named."""
    argv = ["main", "--config=c.py", "--config.ema_decay=None", "--config.batch_size=8",
            "--config.schedule.warmup_steps", "None", "--config.seed=None",
            "--config.seed=3"]  # fmt: skip
    kept, unset = vj_main._unset_overrides(argv)
    assert kept == ["main", "--config=c.py", "--config.batch_size=8", "--config.seed=3"]
    assert unset == ["ema_decay", "schedule.warmup_steps"]
    config = default_config()
    config.ema_decay, config.schedule.warmup_steps = 0.999, 20
    vj_main._apply_unset(config, unset)
    assert config.ema_decay is None and config.schedule.warmup_steps is None
    for bad, message in [
        ("schedule.warmup_stps", "Unknown config key 'schedule.warmup_stps' (closest: "
         "schedule.warmup_steps"),
        ("batch_size.x", "Unknown config key 'batch_size.x': 'batch_size' is a value"),
        ("init", "config.init is a section: unset its keys one by one."),
    ]:  # fmt: skip
        proc = main_cli(
            "--config=configs/digits_pretrain.py", f"--workdir={tmp_path}", f"--config.{bad}=None"
        )
        assert proc.returncode == 2
        assert proc.stderr.strip().splitlines()[-1].startswith(f"vision_jax: error: {message}")
    # Through absl: the config's warmup_steps=20 unset, the fraction is the only warmup set.
    run = ("--config=configs/digits_pretrain.py", "--config.schedule.warmup_fraction=0.5",
           "--config.total_steps=2", "--report=false")  # fmt: skip
    proc = main_cli(*run, f"--workdir={tmp_path / 'both'}")
    assert proc.returncode == 1 and "Set at most one of schedule.warmup_" in proc.stderr
    proc = main_cli(*run, f"--workdir={tmp_path / 'one'}", "--config.schedule.warmup_steps=None")
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.parametrize("key", ["batch_size", "model.name", "input.image_size",
                                 "optimizer.learning_rate", "data.train_split"])  # fmt: skip
def test_a_required_key_unset_is_named(key):
    """``--config.<key>=None`` on a key that needs a value: one line naming it (it crashed
    later, in whatever first used the value, without naming it)."""
    config = small_config()
    *parents, leaf = key.split(".")
    node = config
    for name in parents:
        node = node[name]
    node[leaf] = None
    with pytest.raises(specs.ConfigError, match=rf"^{re.escape(key)} needs a value: it is None"):
        specs.run_spec(TrackedConfig(config))
    if key in ("batch_size", "data.train_split"):  # a saved run's record is read as it ran
        with specs.saved_config():
            specs.run_spec(TrackedConfig(config))


def test_config_variants_and_keys_inside_values_are_one_line_errors(tmp_path):
    """A config without variants given one, and a key inside a string value: usage errors."""
    for args, message in [
        (("--config=configs/digits_pretrain.py:foo",), "this config has no variants; got 'foo'"),
        (("--config=configs/digits_pretrain.py", "--config.optimizer.name.x=1"),
         "Unknown config key 'optimizer.name.x': 'optimizer.name' is a value"),
    ]:  # fmt: skip
        proc = main_cli(*args, f"--workdir={tmp_path}")
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert message in proc.stderr.strip().splitlines()[-1]


def test_a_key_in_another_section_is_named():
    """``--config.eval_split``: the key of that name in another section."""
    from vision_jax.config import unknown_key

    message = unknown_key(default_config(), "eval_split")
    assert message == "Unknown config key 'eval_split': data.eval_split has that name."
    assert unknown_key(default_config(), "data.eval_split") is None


def test_a_workdir_that_cannot_be_one_is_one_line_before_any_setup(tmp_path):
    """A workdir that is a file or a broken symbolic link was "Cannot lock .../vision_jax.lock:
    [Errno 17] File exists"; one whose name is not UTF-8 failed after the whole setup, in the
    event files' writer ("Error converting unicode string"). Each is one line naming it, before
    JAX starts (the command line) or before anything is read (Python: the workdir's lock)."""
    from vision_jax.lock import LockError, WorkdirLock

    afile, dangling = tmp_path / "afile", tmp_path / "dangling"
    afile.write_text("not a folder")
    dangling.symlink_to(tmp_path / "gone")
    bad = os.fsdecode(os.fsencode(tmp_path) + b"/bad\xffname")
    cases = {
        str(afile): f"{afile} is a file, not a folder: name a folder (it is made if missing).",
        str(dangling): f"{dangling} is a broken symbolic link (to {tmp_path / 'gone'}): remove "
        "it, or make the folder it names.",
        bad: f"{tmp_path}/bad\\xffname has a name that is not UTF-8 (TensorFlow's event "
        "files need one): choose another.",
    }  # fmt: skip
    for workdir, message in cases.items():
        proc = main_cli("--config=configs/digits_pretrain.py", f"--workdir={workdir}")
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert proc.stderr.strip() == f"vision_jax: error: --workdir {message}"
        # stderr is that line alone: no setup ran before it (TensorFlow's import notices, the
        # run's log lines; the non-UTF-8 name failed in the event writer after 15 s of it)
        with pytest.raises(LockError) as error:
            WorkdirLock(workdir).acquire()
        assert str(error.value) == f"Workdir {message}"
    assert afile.read_text() == "not a folder" and not os.path.lexists(bad)
    assert not (tmp_path / "gone").exists()


def test_missing_config_file_is_reported_before_jax_starts(tmp_path):
    start = time.perf_counter()
    proc = main_cli("--config=configs/nope.py:arg", f"--workdir={tmp_path}")
    assert proc.returncode == 2
    assert proc.stderr.strip() == "vision_jax: error: config file configs/nope.py not found."
    proc = main_cli("--config=configs/scenes_detection.py:vitt", f"--workdir={tmp_path}")
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "vision_jax: error: --config=configs/scenes_detection.py:vitt: Unknown variant 'vitt'; "
        "valid: vit, vit_scratch, resnet, resnet_scratch."
    )
    broken = tmp_path / "broken.py"  # a syntax error: one line, not a 54-line traceback
    broken.write_text("def get_config():\n    return dict(batch_size=16))\n")
    proc = main_cli(f"--config={broken}", f"--workdir={tmp_path}")
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        f"vision_jax: error: config file {broken}, line 2: unmatched ')': "
        "return dict(batch_size=16))"
    )
    assert time.perf_counter() - start < 45


def test_a_key_set_in_python_and_never_read_names_the_closest_keys():
    cfg = default_config()
    cfg.optimizer.lrr = 0.1
    tracked = TrackedConfig(cfg)
    specs.run_spec(tracked)
    with pytest.raises(UnreadConfigKeysError, match=r"optimizer\.lrr \(closest: optimizer\.lea"):
        tracked.check_all_read()


@pytest.mark.slow
def test_an_unexpected_error_prints_its_traceback_and_exits_1(tmp_path):
    """A bug (an exception of no expected type) raised while the steps compile in the
    background: its traceback and a one-line error, then exit 1 (the interpreter's teardown
    under a running compilation aborted: exit 134)."""
    proc = run_python(main_with(tmp_path, "_loop", "raise KeyError('boom')"))
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" in proc.stderr and "in replaced" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "vision_jax: error: KeyError: 'boom'"


def test_an_expected_error_after_start_up_is_one_line(tmp_path):
    """A ValueError from the run (a bad weights file, a missing data folder): one line on
    stderr (absl's E line said it before it too); the traceback with --verbosity=1."""
    failing = "raise ValueError('data folder /nowhere does not exist')"
    proc = run_python(main_with(tmp_path, "train_and_evaluate", failing))
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert [line for line in proc.stderr.splitlines() if "/nowhere" in line] == [
        "vision_jax: error: data folder /nowhere does not exist"
    ]
    verbose = run_python(main_with(tmp_path, "train_and_evaluate", failing, "--verbosity=1"))
    assert verbose.returncode == 1 and "in replaced" in verbose.stderr, verbose.stderr[-3000:]
    assert verbose.stderr.strip().splitlines()[-1].endswith("/nowhere does not exist")


@pytest.mark.parametrize(
    "allocate, error",
    [
        (
            "jax.jit(lambda: jax.numpy.ones(2**50, 'uint8'))().block_until_ready()",
            "RESOURCE_EXHAUSTED: Out of memory allocating 1125899906842624 bytes.",
        ),  # past the 47-bit address space: refused under any overcommit setting
        pytest.param("numpy.empty(2**50)", "Unable to allocate 8.00 PiB", marks=pytest.mark.slow),
        ("raise MemoryError()", "error: MemoryError (out of memory: "),  # no message of its own
    ],
)
def test_out_of_memory_says_what_to_change(tmp_path, allocate, error):
    """Device (XLA) and host (numpy) memory running out: one line with the error and what to
    change (it was XLA's bare line; numpy's MemoryError went down the bug path, a traceback)."""
    proc = run_python(main_with(tmp_path, "_loop", allocate, "--config.batch_size=24"))
    assert proc.returncode == 1, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("vision_jax: error: ") and error in last, last
    assert "(out of memory: lower batch_size (24; grad_accum_steps keeps the batch" in last
    assert "model.remat='block' (now 'none')" in last and "Traceback" not in proc.stderr


def test_out_of_memory_from_python_notes_what_to_change(tmp_path, monkeypatch):
    """From Python the advice that the command line's error line ends with was missing: the
    error raised carries it as a note (shown under its traceback); other errors carry none."""
    errors = iter([
        RuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 1125899906842624 bytes."),
        RuntimeError("RESOURCE_EXHAUSTED: the disk is full"),
    ])  # fmt: skip

    def allocate(*args, **kwargs):
        raise next(errors)

    monkeypatch.setattr(train, "build_run", allocate)
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    with pytest.raises(RuntimeError, match="Out of memory allocating") as caught:
        train_and_evaluate(small_config(batch_size=24), str(tmp_path))
    (note,) = caught.value.__notes__
    assert note.startswith("out of memory: lower batch_size (24; grad_accum_steps keeps the")
    assert "model.remat='block' (now 'none')" in note and "VISION_JAX_HUGE_PAGES" not in note
    with pytest.raises(RuntimeError, match="the disk is full") as caught:
        train_and_evaluate(small_config(batch_size=24), str(tmp_path))
    assert not getattr(caught.value, "__notes__", None)


@pytest.mark.slow
def test_a_finished_command_has_written_everything_when_it_exits(tmp_path):
    """A single-process run ends without the interpreter's teardown (``main._exit_written``):
    by then its checkpoint is complete, its event file holds the final evaluation, its report
    is saved and its workdir is free for the next command."""
    proc = main_cli(
        "--config=configs/digits_pretrain.py", f"--workdir={tmp_path}",
        "--config.total_steps=2", "--config.schedule.warmup_steps=0",
        "--config.checkpoint_every_steps=2",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads(proc.stdout.splitlines()[0])
    assert "Final metrics of process 0" in proc.stderr  # the log flushed before the exit
    assert sorted(step_dirs(tmp_path)) == [2]
    assert read_variables(step_dirs(tmp_path)[2])["params"]
    from vision_jax.report.curves import read_scalars

    assert read_scalars(tmp_path)["eval/top1"][1][-1] == pytest.approx(metrics["eval/top1"])
    assert "<img" in (tmp_path / "report" / "report.html").read_text()
    again = main_cli(
        "--config=configs/digits_pretrain.py", f"--workdir={tmp_path}",
        "--config.total_steps=2", "--config.schedule.warmup_steps=0", "--report=false",
    )  # fmt: skip
    assert again.returncode == 0, again.stderr[-3000:]  # the lock was released
    closed = subprocess.run(  # stdout closed at once (as `| head -0`): no BrokenPipeError
        f"{sys.executable} -m vision_jax.main --config=configs/digits_pretrain.py "
        f"--workdir={tmp_path} --config.total_steps=2 --config.schedule.warmup_steps=0 "
        "--report=false | true", shell=True, cwd=ROOT, capture_output=True, text=True,
        timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"}, executable="/bin/bash",
    )  # fmt: skip
    assert "BrokenPipeError" not in closed.stderr, closed.stderr[-3000:]
    assert "Final metrics of process 0" in closed.stderr
    evaluated = json.loads(again.stdout.splitlines()[0])  # the finished run, evaluated again
    assert evaluated == metrics  # its train metrics as they were reported


# --- slow: the command line, one and two processes ----------------------------------------------

DIGITS = [
    "--config=configs/digits_pretrain.py", "--config.total_steps=80", "--config.log_every_steps=5",
    "--config.checkpoint_every_steps=1000",
]  # fmt: skip
TRAINING = re.compile(r"\[(\d+)\] train/")


class Proc:
    """A subprocess whose merged output is collected by a thread."""

    def __init__(self, argv: list[str], **env: str):
        self.popen = subprocess.Popen(
            argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, "JAX_PLATFORMS": "cpu", **env}, start_new_session=True,
        )  # fmt: skip
        self.lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.popen.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_for(self, pattern: re.Pattern, timeout: float = 300) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if match := pattern.search(line):
                    return match
            assert self.popen.poll() is None, f"exited {self.popen.returncode}:\n{self.output}"
            time.sleep(0.1)
        raise AssertionError(f"no {pattern.pattern!r} within {timeout} s:\n{self.output[-3000:]}")

    def wait(self, timeout: float = 300) -> tuple[int, float]:
        """(exit status, seconds it took)."""
        start = time.monotonic()
        code = self.popen.wait(timeout)
        time.sleep(0.2)  # let the reader thread drain the pipe
        return code, time.monotonic() - start

    def kill_group(self) -> None:
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, signal.SIGKILL)


@pytest.fixture
def procs():
    """Started :class:`Proc` objects, killed (with their process groups) after the test."""
    started: list[Proc] = []
    yield lambda *argv, **env: started.append(Proc(list(argv), **env)) or started[-1]
    for proc in started:
        proc.kill_group()


def main_argv(workdir, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "vision_jax.main", *DIGITS, f"--workdir={workdir}", "--report=false",
        *extra,
    ]  # fmt: skip


def local_argv(workdir, *extra: str) -> list[str]:
    return [
        "bash",
        "launch/local.sh",
        "-n",
        "2",
        "-d",
        "1",
        *DIGITS,
        f"--workdir={workdir}",
        *extra,
    ]


def children(pid: int) -> dict[int, str]:
    """{pid: command line} of the vision_jax.main processes started by ``pid``."""
    out = subprocess.run(["ps", "-ww", "-o", "pid=,args=", "--ppid", str(pid)],
                         capture_output=True, text=True).stdout  # fmt: skip
    rows = [line.strip().split(None, 1) for line in out.splitlines() if line.strip()]
    return {int(p): args for p, args in rows if "vision_jax.main" in args}


def descendants(pid: int) -> list[int]:
    """The vision_jax.main processes below ``pid``: each process and its stderr reader."""
    found = list(children(pid))
    return found + [c for p in found for c in descendants(p)]


def running(pids: list[int], within: float = 5.0) -> list[int]:
    """Those of ``pids`` still running (not ended, not a zombie) after up to ``within`` s."""
    deadline = time.monotonic() + within
    while True:
        left = []
        for pid in pids:
            try:
                state = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except (FileNotFoundError, ProcessLookupError):
                continue
            if state != "Z":
                left.append(pid)
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


def process_pid(launcher: Proc, index: int) -> int:
    pids = [p for p, args in children(launcher.popen.pid).items() if f"process_id={index}" in args]
    assert len(pids) == 1, launcher.output[-2000:]
    return pids[0]


@pytest.mark.slow
def test_sigterm_one_process_saves_exits_75_and_resumes_exactly(tmp_path, procs):
    full = procs(*main_argv(tmp_path / "full"))
    assert full.wait()[0] == 0, full.output[-3000:]
    run = procs(*main_argv(tmp_path / "stopped"))
    run.wait_for(TRAINING)
    run.popen.send_signal(signal.SIGTERM)
    code, seconds = run.wait()
    print(f"one process: exit {code} {seconds:.1f} s after SIGTERM")
    assert code == EXIT_STOPPED, run.output[-3000:]
    assert seconds < 10
    assert re.search(r"vision_jax: stopped at step \d+ \(SIGTERM\)", run.output)
    (step,) = step_dirs(tmp_path / "stopped")
    assert 5 <= step < 80
    rerun = procs(*main_argv(tmp_path / "stopped"))
    assert rerun.wait()[0] == 0, rerun.output[-3000:]
    assert f"Resumed from {tmp_path / 'stopped'}" in rerun.output
    assert same(tmp_path / "full", tmp_path / "stopped")


@pytest.mark.slow
def test_second_ctrl_c_exits_at_once(tmp_path, procs):
    run = procs(*main_argv(tmp_path, "--config.total_steps=100000"))
    run.wait_for(TRAINING)
    run.popen.send_signal(signal.SIGINT)
    time.sleep(0.05)
    run.popen.send_signal(signal.SIGINT)
    code, seconds = run.wait(60)
    print(f"second SIGINT: exit {code} after {seconds:.2f} s")
    assert code == 128 + signal.SIGINT and seconds < 3
    assert "second signal (SIGINT): exiting now, without saving" in run.output


@pytest.mark.slow
def test_a_second_signal_to_a_python_caller_raises_keyboard_interrupt(tmp_path):
    """train_and_evaluate called from Python (a notebook): a second SIGINT raises
    KeyboardInterrupt in the caller, whose process lives on with its handlers back."""
    code = (
        "import os, signal, time\n"
        "from vision_jax import signals\n"
        "import importlib.util\n"
        "from vision_jax.train import train_and_evaluate\n"
        "before = signals.StopSignals.should_stop\n"
        "def should_stop(self, step):\n"
        "    if step == 3:\n"
        "        os.kill(os.getpid(), signal.SIGINT)\n"
        "        time.sleep(0.2)\n"
        "        os.kill(os.getpid(), signal.SIGINT)\n"
        "        time.sleep(5)\n"
        "    return before(self, step)\n"
        "signals.StopSignals.should_stop = should_stop\n"
        "spec = importlib.util.spec_from_file_location('c', 'configs/digits_pretrain.py')\n"
        "module = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(module)\n"
        "config = module.get_config()\n"
        "config.total_steps = 1000\n"
        "try:\n"
        f"    train_and_evaluate(config, {str(tmp_path)!r})\n"
        "except KeyboardInterrupt:\n"
        "    restored = signal.getsignal(signal.SIGINT) is signal.default_int_handler\n"
        "    time.sleep(1)\n"  # no interrupt comes after the call returned
        "    print('interrupted', restored)\n"
    )
    proc = run_python(code)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "interrupted True", proc.stderr[-3000:]
    assert proc.stderr.count("second signal (SIGINT): KeyboardInterrupt in the caller") == 1


def test_every_signal_after_the_first_interrupts_a_python_caller():
    """The third Ctrl-C and later ones raise KeyboardInterrupt too (only the second did); in
    an uninterrupted() block (a save handed to orbax's threads) it comes as the block ends."""
    from vision_jax import signals

    def interrupted(seconds: float = 5.0) -> None:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(seconds)  # the handler raises in the main thread at once

    with signals.StopSignals() as stop:
        interrupted(0.0)
        deadline = time.monotonic() + 5
        while stop.received is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert stop.received == "SIGINT"  # the first: a flag, no exception
        for _ in range(3):
            with pytest.raises(KeyboardInterrupt):
                interrupted()
        ended = []
        with pytest.raises(KeyboardInterrupt):
            with signals.uninterrupted():
                interrupted(0.2)
                ended.append(True)
        assert ended  # the block ran to its end
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def _received(stop, deadline_s: float = 5.0) -> None:
    """Waits until the signal thread of ``stop`` took note of the first signal."""
    deadline = time.monotonic() + deadline_s
    while stop.received is None and time.monotonic() < deadline:
        time.sleep(0.01)


@pytest.mark.parametrize("exit_on_second", [True, False])
def test_a_repeated_sigterm_is_the_same_stop_and_only_ctrl_c_ends_it(
    exit_on_second, monkeypatch, capfd
):
    """Two SIGTERMs 50 ms apart (a supervisor that signals the process group and the child)
    exited at once, without the save the first asked for: a repeated SIGTERM is one line and
    the stop goes on; a Ctrl-C after it still exits at once (or interrupts a Python caller)."""
    from vision_jax import signals

    exits = []
    monkeypatch.setattr(signals.os, "_exit", exits.append)
    with signals.StopSignals(exit_on_second) as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        _received(stop)
        for _ in range(2):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.3)  # neither exits nor interrupts
        assert stop.received == "SIGTERM" and not exits
        if exit_on_second:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.3)
        else:
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(5)
            time.sleep(0.3)  # the signal thread's line
    assert exits == ([128 + signal.SIGINT] if exit_on_second else [])
    error = capfd.readouterr().err
    assert error.count("SIGTERM again: still stopping at the next step") == 1, error
    assert "second signal (SIGINT)" in error


@pytest.mark.parametrize("sig", ["SIGUSR1", "SIGUSR2", "SIGHUP"])
def test_usr1_usr2_and_hup_stop_as_sigterm_and_a_callers_own_handler_is_kept(sig):
    """SLURM's --signal=USR1@90 (Lightning), submitit's USR2, a closed ssh session's HUP ended
    the run with no save and no line: they stop it as SIGTERM does; a handler of the caller's
    own (submitit's) keeps them, and the default is back after the run."""
    from vision_jax import signals

    signum = getattr(signal, sig)
    with signals.StopSignals() as stop:
        os.kill(os.getpid(), signum)
        _received(stop)
        assert stop.received == sig
        assert stop.should_stop(1)
    assert signal.getsignal(signum) is signal.SIG_DFL
    own = []
    previous = signal.signal(signum, lambda number, frame: own.append(number))
    try:
        with signals.StopSignals() as stop:
            os.kill(os.getpid(), signum)
            time.sleep(0.3)
            assert stop.received is None and own == [signum]
    finally:
        signal.signal(signum, previous)


def test_a_c_level_handler_faulthandlers_usr1_is_left_alone_and_put_back():
    """faulthandler.register(SIGUSR1) (dump the stacks on USR1) is a C-level handler that
    signal.getsignal reports as SIG_DFL: a run took USR1 over and at its end put a real SIG_DFL
    back, so the next USR1 killed the caller's process. USR1 is left to it now, and a C-level
    SIGTERM handler, taken during the run, is back after it (as are the commands' and the
    report's)."""
    code = (
        "import faulthandler, os, signal, sys, time\n"
        "from vision_jax import signals\n"
        "faulthandler.register(signal.SIGUSR1, all_threads=False)\n"
        "faulthandler.register(signal.SIGTERM, all_threads=False)\n"
        "with signals.StopSignals() as stop:\n"
        "    taken = sorted(signal.Signals(s).name for s in stop._previous)\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    time.sleep(0.3)\n"
        "    received = stop.received\n"
        "print(taken, received, signals.command(lambda: 0, 'x', '') == 0, flush=True)\n"
        "for sig in (signal.SIGUSR1, signal.SIGTERM):\n"
        "    os.kill(os.getpid(), sig)\n"  # faulthandler's: the stacks, and the process goes on
        "    time.sleep(0.2)\n"
        "print('survived', flush=True)\n"
    )
    proc = run_python(code)
    assert proc.returncode == 0, proc.stderr[-3000:]
    taken = "['SIGHUP', 'SIGINT', 'SIGTERM', 'SIGUSR2'] SIGTERM True"
    assert proc.stdout.split("\n")[:2] == [taken, "survived"], proc.stderr[-3000:]
    assert proc.stderr.count("Stack (most recent call first)") == 2, proc.stderr[-3000:]


@pytest.mark.slow
def test_sigterm_two_processes_one_or_the_launcher_then_resume_exactly(tmp_path, procs):
    full = procs(*local_argv(tmp_path / "full"))
    code, _ = full.wait()
    assert code == 0, full.output[-4000:]
    workdir = tmp_path / "stopped"
    steps = []
    for target in ("process 1", "launcher"):
        run = procs(*local_argv(workdir))
        run.wait_for(re.compile(r"\[p0\].*\[(\d+)\] train/"))
        pid = process_pid(run, 1) if target == "process 1" else run.popen.pid
        pids = descendants(run.popen.pid)
        os.kill(pid, signal.SIGTERM)
        code, seconds = run.wait()
        print(f"two processes, SIGTERM to {target}: exit {code} after {seconds:.1f} s")
        assert code == EXIT_STOPPED, run.output[-4000:]
        assert seconds < 20
        assert len(re.findall(r"\[p\d\] vision_jax: stopped at step", run.output)) == 2
        assert "no such job" not in run.output
        assert not running(pids)  # no orphans
        steps.append(max(step_dirs(workdir)))
    assert steps[0] < steps[1] < 80
    final = procs(*local_argv(workdir))
    assert final.wait()[0] == 0, final.output[-4000:]
    assert same(tmp_path / "full", workdir)


@pytest.mark.slow
@pytest.mark.parametrize(
    "victim, survivor, message",
    [
        (1, 0, "vision_jax: error: lost process 1 of 2: no heartbeat for"),
        # JAX's client aborts a process whose coordinator (in process 0) vanished, at once: its
        # stderr reader (vision_jax.abort_notice) says so instead.
        (
            0,
            1,
            "vision_jax: error: lost the coordinator (process 0 of 2): JAX's distributed "
            "service ended process 1",
        ),
    ],
)
def test_a_dead_peer_stops_the_others_in_bounded_time(tmp_path, procs, victim, survivor, message):
    run = procs(*local_argv(tmp_path, "--config.total_steps=100000"))
    run.wait_for(re.compile(r"\[p0\].*\[(\d+)\] train/"))
    pids = descendants(run.popen.pid)
    os.kill(process_pid(run, victim), signal.SIGKILL)
    code, seconds = run.wait(120)
    print(f"kill -9 process {victim}: launcher exit {code} after {seconds:.1f} s")
    assert code == 128 + signal.SIGKILL and seconds < 30  # the default --peer_timeout is 30 s
    lines = [line for line in run.lines if line.startswith(f"[p{survivor}]") and message in line]
    assert len(lines) == 1, run.output[-4000:]
    assert victim == 0 or f"(exit {EXIT_PEER_LOST})" in lines[0]
    assert "Terminating process" not in run.output and "stack trace" not in run.output
    assert not running(pids)  # no orphans
    assert "no such job" not in run.output


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_lr_1e6_on_a_finished_run_keeps_its_good_checkpoints(tmp_path, policy):
    args = ["--config=configs/digits_pretrain.py", f"--workdir={tmp_path}"]
    done = main_cli(*args, "--config.total_steps=20", "--config.checkpoint_every_steps=10")
    assert done.returncode == 0, done.stderr[-3000:]
    json.loads(done.stdout.splitlines()[0])  # the final metrics are valid JSON
    good = {step: leaves(path) for step, path in step_dirs(tmp_path).items()}
    proc = main_cli(
        *args, "--config.total_steps=200", "--config.checkpoint_every_steps=5",
        "--config.optimizer.learning_rate=1e6", f"--config.on_nonfinite={policy}",
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr[-3000:]
    (error,) = [line for line in proc.stderr.splitlines() if line.startswith("vision_jax:")]
    assert "Nothing non-finite was saved; newest checkpoint:" in error
    assert re.search(r"at step 2\d;" if policy == "stop" else r"1\d updates in a row", error)
    assert_all_finite(tmp_path)
    for step, before in good.items():  # the finished run's checkpoints survive, unchanged
        if step == 20 or policy == "stop":
            after = leaves(step_dirs(tmp_path)[step])
            assert all(np.array_equal(a, b) for a, b in zip(before, after, strict=True))


def test_the_compilation_cache_folder_and_its_threshold(tmp_path, monkeypatch, caplog):
    """--compilation_cache: the folder ('auto': jax_cache beside the workdir), and a cache that
    keeps programs of any compile time unless JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS is set."""
    from jax._src import compilation_cache as cache

    from vision_jax.compilation_cache import compilation_cache_dir, configure_compilation_cache

    assert compilation_cache_dir("/runs/a/", "auto") == "/runs/jax_cache"
    assert compilation_cache_dir(pathlib.Path("/runs/a"), "auto") == "/runs/jax_cache"
    assert compilation_cache_dir("/runs/a", "Auto") == "/runs/jax_cache"  # not a folder Auto
    assert compilation_cache_dir("gs://b/runs/a", "auto") == "gs://b/runs/jax_cache"
    assert compilation_cache_dir("gs://b/a/", "auto") == "gs://b/jax_cache"
    for root in ("gs://b", "gs://b/"):  # a bucket's root: in it (it was gs:/jax_cache)
        assert compilation_cache_dir(root, "auto") == "gs://b/jax_cache"
    assert compilation_cache_dir("/", "auto") == "/jax_cache"  # not the current folder's
    assert compilation_cache_dir("/runs/a", "off") is None
    assert compilation_cache_dir("/runs/a", "/c") == "/c"
    assert compilation_cache_dir("/runs/a", "c") == os.path.abspath("c")  # the same after chdir
    assert compilation_cache_dir("/runs/a", "~/c") == os.path.expanduser("~/c")
    assert compilation_cache_dir("/runs/a", "gs://b/c") == "gs://b/c"
    for off in ("false", "None", "no", "0", "OFF"):  # absl habits: off, not a folder "false"
        assert compilation_cache_dir("/runs/a", off) is None
    with pytest.raises(ValueError, match="--compilation_cache is empty"):
        compilation_cache_dir("/runs/a", " ")
    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
             "jax_persistent_cache_enable_xla_caches")  # fmt: skip
    before = {name: getattr(jax.config, name) for name in names}
    try:
        monkeypatch.delenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", raising=False)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
        configure_compilation_cache(str(tmp_path / "run"), str(tmp_path / "c"))
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "c")
        assert jax.config.jax_persistent_cache_min_compile_time_secs == 0
        monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "2")
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 2.0)
        configure_compilation_cache(tmp_path / "run", "AUTO")  # JAX's setting wins
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "c")
        configure_compilation_cache(tmp_path / "run", "off")  # a Path, as README's call
        assert jax.config.jax_compilation_cache_dir is None
        assert jax.config.jax_persistent_cache_min_compile_time_secs == 2
        (tmp_path / "a_file").write_text("")  # a folder that cannot be made: off, warned
        with caplog.at_level(logging.WARNING):
            configure_compilation_cache(str(tmp_path / "run"), str(tmp_path / "a_file" / "c"))
        assert jax.config.jax_compilation_cache_dir is None
        assert f"compilation cache {tmp_path / 'a_file' / 'c'} cannot be written (" in caplog.text
        with caplog.at_level(logging.WARNING):  # the file itself named as the cache
            configure_compilation_cache(str(tmp_path / "run"), str(tmp_path / "a_file"))
        assert jax.config.jax_compilation_cache_dir is None
        assert "(it is a file, not a folder): it is off" in caplog.text
    finally:
        for name, value in before.items():
            jax.config.update(name, value)
        cache.reset_cache()


def test_a_cache_on_a_full_disk_is_read_only_and_its_empty_entries_removed(
    tmp_path, monkeypatch, caplog
):
    """On a full disk JAX wrote empty entries (a warning each), and the next start read,
    deleted and compiled each again, a warning each: the empty entries are removed at the
    start in one line (not one written just now: a sibling run sharing the cache may be
    writing it), and a cache on a filesystem with little free space is only read for the run."""
    from jax._src import compilation_cache as cache

    from vision_jax import compilation_cache as vj_cache

    folder = tmp_path / "c"
    folder.mkdir()
    for name in ("jit_a-1", "jit_b-2"):  # cut short by a full disk, one with its access time
        (folder / f"{name}-cache").write_bytes(b"")
    (folder / "jit_a-1-atime").write_bytes(b"\0" * 8)
    (folder / "jit_c-3-cache").write_bytes(b"whole")
    old = time.time() - vj_cache.CACHE_EMPTY_ENTRY_AGE_S - 5
    for name in ("jit_a-1", "jit_b-2"):
        os.utime(folder / f"{name}-cache", (old, old))
    (folder / "jit_d-4-cache").write_bytes(b"")  # being written by a sibling run
    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
             "jax_persistent_cache_enable_xla_caches")  # fmt: skip
    before = {name: getattr(jax.config, name) for name in names}
    try:
        monkeypatch.setattr(vj_cache, "_free_bytes", lambda _: vj_cache.CACHE_MIN_FREE_BYTES)
        with caplog.at_level(logging.INFO):
            vj_cache.configure_compilation_cache(str(tmp_path / "run"), str(folder))
        assert jax.config.jax_compilation_cache_dir == str(folder)
        assert sorted(p.name for p in folder.iterdir()) == ["jit_c-3-cache", "jit_d-4-cache"]
        removed = [r.getMessage() for r in caplog.records if "empty compilation" in r.message]
        assert removed == [f"Removed 2 empty compilation cache entries (cut short by a full "
                           f"disk) from {folder}: their programs compile again."]  # fmt: skip
        caplog.clear()
        monkeypatch.setattr(vj_cache, "_free_bytes", lambda _: 100 * 2**20)
        with caplog.at_level(logging.INFO):
            vj_cache.configure_compilation_cache(str(tmp_path / "run"), str(folder))
        assert jax.config.jax_compilation_cache_dir == str(folder)
        assert [(r.levelname, r.getMessage()) for r in caplog.records] == [(
            "WARNING", f"The compilation cache {folder} is only read for this run: its "
            "filesystem has 100 MiB free, under 256 MiB (on a full disk, JAX writes empty "
            "entries)."
        )]  # fmt: skip
    finally:
        for name, value in before.items():
            jax.config.update(name, value)
        cache.reset_cache()


def test_a_script_with_flags_of_its_own_configures_the_cache(tmp_path):
    """A big_vision- or scenic-style script defines absl flags --config and --workdir of its
    own: importing the cache's module defines none (vision_jax.main's, a DuplicateFlagError)."""
    script = """
import sys
from absl import app, flags
flags.DEFINE_string("config", None, "the script's own")
flags.DEFINE_string("workdir", None, "the script's own")
from vision_jax.compilation_cache import configure_compilation_cache
def main(argv):
    configure_compilation_cache(flags.FLAGS.workdir, "auto")
    import jax
    print(jax.config.jax_compilation_cache_dir, "vision_jax.main" in sys.modules)
app.run(main)
"""
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    done = subprocess.run(
        [sys.executable, "-c", script, "--config=c.py", f"--workdir={tmp_path / 'run'}"],
        cwd=ROOT, env={**env, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == [str(tmp_path / "jax_cache"), "False"]


def test_a_cache_on_a_full_disk_gets_no_xla_gpu_caches(tmp_path, monkeypatch):
    """On a GPU XLA's kernel and autotuning caches write into the cache's folder: one only read
    for the run (a nearly full disk) turns them off too; one with space keeps JAX's default."""
    from jax._src import compilation_cache as cache

    from vision_jax import compilation_cache as vj_cache

    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
             "jax_persistent_cache_enable_xla_caches")  # fmt: skip
    before = {name: getattr(jax.config, name) for name in names}
    monkeypatch.delenv("JAX_PERSISTENT_CACHE_ENABLE_XLA_CACHES", raising=False)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    try:
        for free, want in ((100 * 2**20, "none"), (2**40, before[names[2]])):
            jax.config.update(names[2], before[names[2]])
            monkeypatch.setattr(vj_cache, "_free_bytes", lambda _, free=free: free)
            vj_cache.configure_compilation_cache(str(tmp_path / "run"), str(tmp_path / "c"))
            assert jax.config.jax_persistent_cache_enable_xla_caches == want, free
        assert before[names[2]] != "none"
    finally:
        for name, value in before.items():
            jax.config.update(name, value)
        cache.reset_cache()


def test_a_cache_on_a_full_disk_is_read_and_not_written(tmp_path):
    """A cache whose filesystem is nearly full keeps its entries for the run (the programs it
    holds load) and gets no new ones (JAX would write empty entries)."""
    _cached_programs(tmp_path, tmp_path / "e")
    entries = sorted(p.name for p in (tmp_path / "e").iterdir())
    stderr = _cached_programs(tmp_path, tmp_path / "e", "full", "5")
    assert "is only read for this run" in stderr
    assert sorted(p.name for p in (tmp_path / "e").iterdir()) == entries  # n=5 not written
    assert "Error" not in stderr


# Two small programs through configure_compilation_cache(workdir, folder), in a process of
# their own (JAX settles on its cache at the first compilation).
CACHED_PROGRAMS = """
import sys
import jax, jax.numpy as jnp
from vision_jax import compilation_cache
if "full" in sys.argv[3:]:  # a nearly full disk
    compilation_cache._free_bytes = lambda _: 0
compilation_cache.configure_compilation_cache(sys.argv[1], sys.argv[2])
for n in (3, 4, *(int(a) for a in sys.argv[3:] if a.isdigit())):
    jax.jit(lambda x: jnp.sin(x) @ x.T + n)(jnp.ones((n, n))).block_until_ready()
"""


def _cached_programs(tmp_path: pathlib.Path, folder: str | os.PathLike, *args: str) -> str:
    """Runs CACHED_PROGRAMS with the cache in ``folder`` (on CPU; ``args``: "full", more
    sizes); returns its stderr."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("JAX_PERSISTENT_CACHE_ENABLE_XLA_CACHES", None)
    proc = subprocess.run(
        [sys.executable, "-c", CACHED_PROGRAMS, str(tmp_path / "run"), str(folder), *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stderr


def test_a_copied_compilation_cache_hits(tmp_path):
    """JAX's GPU autotune cache (on by default, on CPU too) put the folder's path into every
    key: a cache copied, moved or reached by another path never hit."""
    _cached_programs(tmp_path, tmp_path / "a")
    entries = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert any(name.startswith("jit_") for name in entries)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    _cached_programs(tmp_path, tmp_path / "b")
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == entries  # nothing new


def test_a_truncated_compilation_cache_entry_is_written_again(tmp_path):
    """An entry cut short (a full disk, a process killed while writing) was never repaired: JAX
    skips a key that has a file, so its program compiled, with a warning, at every start."""
    _cached_programs(tmp_path, tmp_path / "c")
    entry = max((tmp_path / "c").glob("jit_*"), key=lambda p: p.stat().st_size)
    whole = entry.read_bytes()
    entry.write_bytes(whole[: len(whole) // 2])
    assert "Error reading persistent compilation cache entry" in _cached_programs(
        tmp_path, tmp_path / "c"
    )
    assert entry.stat().st_size > len(whole) // 2  # written again by the compile
    assert "Error reading" not in _cached_programs(tmp_path, tmp_path / "c")


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc")
def test_a_read_only_compilation_cache_warns_once(tmp_path):
    """JAX warned (two lines) for every program it could not write to a read-only cache."""
    err = _cached_programs(tmp_path, "/proc/self")  # a folder nobody can write, root included
    assert err.count("cannot be written") == 1, err
    assert "it is only read" in err and "Error writing" not in err


@pytest.mark.slow
def test_a_second_run_of_a_config_reuses_the_compiled_steps(tmp_path):
    """--compilation_cache=auto: jax_cache beside the workdir, and a sibling run hits it, for
    the programs that compile in well under a second too (an RNG split), although it is a
    sweep member (another seed, learning rate, weight decay and length). The first run writes
    its report at the end (--report, default on), the second does not."""
    env = {k: v for k, v in os.environ.items() if k != "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"}
    env |= {"JAX_DEBUG_LOG_MODULES": "jax._src.compiler", "JAX_COMPILATION_CACHE_DIR": "",
            "JAX_PLATFORMS": "cpu"}  # fmt: skip
    args = ["-m", "vision_jax.main", "--config=configs/digits_pretrain.py",
            "--config.total_steps=1", "--config.schedule.warmup_steps=0"]  # fmt: skip
    logs = []
    member = ["--config.seed=3", "--config.optimizer.learning_rate=0.05",
              "--config.optimizer.weight_decay=1e-3", "--config.total_steps=2"]  # fmt: skip
    for name, extra in (("first", ["--report=true"]), ("second", ["--report=false", *member])):
        proc = subprocess.run(
            [sys.executable, *args, f"--workdir={tmp_path / name}", *extra], cwd=ROOT,
            capture_output=True, text=True, timeout=300, env=env,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-2000:]
        logs.append(proc.stderr)
    for name in ("jit_train_step", "jit_eval_step"):
        assert f"cache hit for '{name}'" not in logs[0]
        assert f"cache hit for '{name}'" in logs[1]
    assert any((tmp_path / "jax_cache").iterdir())
    assert "cache hit for 'jit__threefry_split'" in logs[1]
    assert "<img" in (tmp_path / "first" / "report" / "report.html").read_text()
    assert not (tmp_path / "second" / "report").exists()


def test_a_url_workdir_gets_no_report_at_the_end_of_training(monkeypatch, caplog, tmp_path):
    """A gs:// workdir: the report (written through pathlib, to a local folder) is skipped in
    one warning saying how to write it, not written into a local folder gs:/... ."""
    from vision_jax import report

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(report, "write_report", lambda *a, **k: pytest.fail("written"))
    with caplog.at_level(logging.WARNING):
        vj_main._report("gs://b/run", None)
    assert [r.getMessage() for r in caplog.records] == [
        "No report at the end of training: it is written to a local folder, and the workdir "
        "gs://b/run is a URL: python -m vision_jax.report --workdir=gs://b/run "
        "--output=<local folder> writes it."
    ]
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_a_stop_signal_while_the_report_is_written_says_how_to_write_it(tmp_path, sig):
    """The run is complete when its report is written: a stop signal then ends the command
    with one line naming the report command (it exited 143 silently, or with a traceback)."""
    script = f"""
import os, signal, time
from vision_jax import main, report
def interrupted(workdir, final=None):
    os.kill(os.getpid(), signal.{sig})
    time.sleep(60)
report.write_report = interrupted
main._report({str(tmp_path)!r}, None)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert done.returncode == EXIT_STOPPED, done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        f"{sig} while writing the report; the run is saved: python -m vision_jax.report "
        f"--workdir={tmp_path} writes it."
    )
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(
    "call, status",
    [
        ("signals.command(lambda: hup() or 0, 'vision_jax.predict', 'left.')", 128 + 1),
        ("main._report('.', None)", EXIT_STOPPED),
        ("main._exit(75, 'stopped at step 3', None)", EXIT_STOPPED),
    ],
)
def test_a_sighup_that_closed_the_terminal_leaves_the_documented_status(call, status):
    """A SIGHUP that closes the terminal: the one line went to a closed stderr, and its OSError
    turned the status (129; 75 for a stopped training, saved) into 1 (a multi-host process then
    skipped the shutdown barrier). The line is dropped; the status stays."""
    script = (
        "import os, signal, sys, time\n"
        "from vision_jax import main, report, signals\n"
        "def hup(*args, **kwargs):\n"
        "    os.kill(os.getpid(), signal.SIGHUP)\n"
        "    time.sleep(5)\n"
        "report.write_report = hup\n"
        f"sys.exit({call})\n"
    )
    read, write = os.pipe()
    os.close(read)  # the terminal is gone
    try:
        done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, stderr=write,
                              timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})  # fmt: skip
    finally:
        os.close(write)
    assert done.returncode == status
