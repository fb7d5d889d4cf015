"""Model selection: validation splits, early stopping, the best checkpoint and its test figure."""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
import re
import shutil

import jax
import numpy as np
import pytest
from test_train import small_config

from vision_jax import checkpoint as checkpoint_lib
from vision_jax import data as data_lib
from vision_jax import run as run_lib
from vision_jax import specs, train, weights
from vision_jax.checkpoint import CheckpointError
from vision_jax.config import TrackedConfig
from vision_jax.models import create_model
from vision_jax.report import FinalEvaluation
from vision_jax.selection import Selection
from vision_jax.tasks import Classification, Detection
from vision_jax.train import train_and_evaluate
from vision_jax.weights.run_dir import read_variables

# val/top1 at evaluations 1, 2, ...: the best is the 2nd (0.7); the 3rd-5th do not beat it by
# more than min_delta=0.02 (0.71 is within it), so patience 3 stops training at the 5th.
SCRIPT = [0.5, 0.7, 0.6, 0.71, 0.65, 0.9, 0.9]


TWO_CLASSES = data_lib.Source(None, 0, ["0", "1"])


def selecting_config(**overrides):
    c = small_config(total_steps=14, eval_every_steps=2, checkpoint_every_steps=2, **overrides)
    c.keep_checkpoints = 10
    c.data.train_split = "train[:90%]"
    c.data.val_split = "train[90%:]"
    c.early_stopping.patience = 3
    c.early_stopping.min_delta = 0.02
    return c


@pytest.fixture
def scripted_validation(monkeypatch):
    """Validation results follow SCRIPT; the test-split evaluation is real and records the
    parameters it evaluated."""
    real, calls = train.run_evaluation, {"val": 0, "eval": []}

    def run_evaluation(run, state, source=None, split="eval", observe=None, interrupt=None):
        if split == "val":
            value = SCRIPT[calls["val"]]
            calls["val"] += 1
            return {"val/top1": value, "val/loss": 1.0 - value, "val/examples": 144.0}
        calls["eval"].append(np.asarray(state.params["head"]["kernel"]))
        return real(run, state, source, split, observe, interrupt)

    monkeypatch.setattr(train, "run_evaluation", run_evaluation)
    return calls


def steps(workdir: pathlib.Path) -> list[int]:
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def meta(workdir: pathlib.Path, step: int, folder: str = "checkpoints") -> dict:
    return json.loads((workdir / folder / str(step) / "meta" / "metadata").read_text())


def test_early_stopping_stops_at_the_right_evaluation_and_tests_the_best(
    tmp_path, scripted_validation, caplog
):
    final = FinalEvaluation()
    result = train_and_evaluate(selecting_config(), str(tmp_path), final=final)
    assert steps(tmp_path) == [2, 4, 6, 8, 10]  # stopped at the 5th evaluation, saved there
    assert scripted_validation["val"] == 5
    assert meta(tmp_path, 10)["stopped_early"] and meta(tmp_path, 10)["final"]
    assert meta(tmp_path, 10)["selection"]["stopped_at"] == 10
    assert [p.name for p in (tmp_path / "best").iterdir()] == ["4"]  # orbax kept one: the best
    assert result["best/step"] == 4 and result["best/val/top1"] == 0.7
    # The test split was evaluated once, with the best (step 4) parameters.
    step4 = read_variables(tmp_path / "checkpoints" / "4")["params"]["head"]["kernel"]
    (tested,) = scripted_validation["eval"]
    np.testing.assert_array_equal(tested, step4)
    assert not np.array_equal(tested, read_variables(tmp_path)["params"]["head"]["kernel"])
    np.testing.assert_array_equal(
        read_variables(tmp_path, "best")["params"]["head"]["kernel"], step4
    )
    # Weights read from the workdir (init.path) are the best step's; from its checkpoints
    # folder, the newest's.
    network = create_model("cifar_resnet20", num_classes=10)
    newest = read_variables(tmp_path / "checkpoints" / "10")["params"]["head"]["kernel"]
    for path, want in [(tmp_path, step4), (tmp_path / "checkpoints", newest)]:
        got = weights.read_variables(path, network)["params"]["head"]["kernel"]
        np.testing.assert_array_equal(got, want)
    with caplog.at_level(logging.INFO):  # the log names the step folder read
        init = weights.read_variables(tmp_path, network)
        weights.load_pretrained(tmp_path, model=network, variables=init)
    assert f"Pretrained weights from {tmp_path / 'best' / '4'}:" in caplog.text
    assert result["eval/examples"] == 360 and 0 <= result["eval/top1"] <= 1
    # The report's figures came from that evaluation: of step 4, the best.
    assert final.step_dir == str((tmp_path / "best" / "4").resolve())
    assert final.evaluation(tmp_path / "best" / "4").headline == pytest.approx(result["eval/top1"])

    # Resuming a run that stopped early reports the best's test figures; it does not train on.
    again = train_and_evaluate(selecting_config(), str(tmp_path))
    assert scripted_validation["val"] == 5
    assert steps(tmp_path) == [2, 4, 6, 8, 10]
    assert again["eval/top1"] == result["eval/top1"] and again["best/step"] == 4
    changed = selecting_config()
    changed.optimizer.learning_rate = 0.5  # a sweep reusing the workdir: it would train nothing
    with pytest.raises(CheckpointError, match=r"has stopped early; with the changed recipe "
                       r"\(optimizer.learning_rate"):  # fmt: skip
        train_and_evaluate(changed, str(tmp_path))
    changed = selecting_config()
    changed.early_stopping.metric = "val/loss"  # its best was chosen on val/top1
    with pytest.raises(CheckpointError, match=r"has stopped early; its best was chosen by another "
                       r"selection \(early_stopping.metric val/top1 -> val/loss; "
                       "early_stopping.mode max -> min\\)"):  # fmt: skip
        train_and_evaluate(changed, str(tmp_path))
    spelled = selecting_config()
    spelled.early_stopping.metric = "top1"  # the same selection: val/top1, the default
    assert train_and_evaluate(spelled, str(tmp_path))["eval/top1"] == result["eval/top1"]
    dropped = selecting_config()  # without selection, its last step would be reported
    dropped.data.val_split = dropped.early_stopping.patience = None
    dropped.early_stopping.min_delta = 0.0
    with pytest.raises(CheckpointError, match=r'changed recipe \(data.val_split "train\[90%:\]" '
                       r"-> null\)"):  # fmt: skip
        train_and_evaluate(dropped, str(tmp_path))

    # A best step that lost its state is not replaced by the newest step without a word.
    shutil.rmtree(tmp_path / "best" / "4" / "state")
    with pytest.raises(weights.WeightFormatError, match=r"best checkpoint .* is incomplete; "
                       "--which=latest"):  # fmt: skip
        read_variables(tmp_path, "best")
    # Nor is a best folder removed altogether (predict, report and export read "best").
    shutil.rmtree(tmp_path / "best")
    gone = (r"best checkpoint \(step 4, val/top1\) is not in .*; --which=latest reads the "
            r"newest checkpoint \(step 10\)")  # fmt: skip
    with pytest.raises(weights.WeightFormatError, match=gone):
        read_variables(tmp_path, "best")
    assert read_variables(tmp_path, "latest")["params"]["head"]["kernel"].shape == step4.shape


@pytest.mark.parametrize("every", [3, 2])
def test_early_stopping_writes_the_open_train_window(tmp_path, scripted_validation, caplog, every):
    """Early stopping at step 10 with windows of 3 steps: steps 10's window is written (it was
    lost: the run ended before the window's end); the last progress line says the run stops
    (with windows of 2, after the window's own line, which gave a time to go)."""
    from vision_jax.report.curves import read_scalars

    config = selecting_config()
    config.log_every_steps = every
    with caplog.at_level(logging.INFO):
        result = train_and_evaluate(config, str(tmp_path))
    progress = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Step ")]
    assert progress[-1].startswith("Step 10 of 14 (71%)") and "stopping early" in progress[-1]
    assert "to go" in progress[0] and len(progress) == (4 if every == 3 else 6)
    assert result["best/step"] == 4 and scripted_validation["val"] == 5
    steps_logged, losses = read_scalars(tmp_path)["train/loss"]
    assert list(steps_logged) == ([3, 6, 9, 10] if every == 3 else [2, 4, 6, 8, 10])
    assert result["train/loss"] == pytest.approx(losses[-1])


def test_a_finished_run_without_a_best_says_so_to_another_selection(tmp_path, monkeypatch):
    """No validation gave a finite val/top1: the run ends without a best, and a rerun selecting
    on another metric is told that, not that its best was chosen by another selection."""
    nan = {"val/top1": float("nan"), "val/loss": float("nan"), "val/examples": 144.0}
    monkeypatch.setattr(train, "run_evaluation", lambda *args, **kwargs: nan)
    cfg = selecting_config()
    cfg.early_stopping.patience = None
    with pytest.raises(CheckpointError, match="no validation gave a finite val/top1"):
        train_and_evaluate(cfg, str(tmp_path))
    # Its best is asked for (predict, evaluate, report, export, init.path): an error, not the
    # newest step read as the best.
    none = (r"The run has no best checkpoint: no validation gave a finite val/top1; "
            r"--which=latest reads the newest checkpoint \(step 14\)")  # fmt: skip
    with pytest.raises(weights.WeightFormatError, match=none):
        read_variables(tmp_path, "best")
    with pytest.raises(weights.WeightFormatError, match=none):
        weights.read_variables(tmp_path, create_model("cifar_resnet20", num_classes=2))
    assert read_variables(tmp_path, "latest")["params"]
    cfg.early_stopping.metric = "val/loss"
    told = ("has finished without a best (no validation gave a finite val/top1); another "
            "selection (early_stopping.metric val/top1 -> val/loss; early_stopping.mode max -> "
            "min) has no validations to choose from. Use another --workdir")  # fmt: skip
    with pytest.raises(CheckpointError, match=re.escape(told)):
        train_and_evaluate(cfg, str(tmp_path))


def test_best_of_a_run_without_one_is_an_error_unless_it_selects_none(tmp_path, caplog):
    """``which="best"`` reads the newest step of a run without a validation split, and (with a
    warning) of a run cut short before its first validation (init.path has no --which); of a
    run whose validations gave no best, it is an error naming ``--which=latest``, not the
    newest step read as the best."""
    from vision_jax.weights.run_dir import REQUIRED_FILES, latest_step_dir

    def step(workdir, selection):
        folder = workdir / "checkpoints" / "6"
        for name in REQUIRED_FILES:
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_text("{}")
        (folder / "meta" / "metadata").write_text(json.dumps({"selection": selection}))
        return folder

    newest = step(tmp_path / "none", None)
    assert latest_step_dir(tmp_path / "none", "best") == newest
    selection = {"metric": "val/top1", "best_step": None, "bad_evaluations": 0}
    newest = step(tmp_path / "0", selection)  # no validation yet
    with caplog.at_level(logging.WARNING):
        assert latest_step_dir(tmp_path / "0", "best") == newest
    yet = "no validation has chosen one by val/top1 yet; reading its newest checkpoint (step 6)"
    assert f"The run has no best checkpoint: {yet}" in caplog.text
    workdir = tmp_path / "2"
    newest = step(workdir, {**selection, "bad_evaluations": 2})
    told = ("The run has no best checkpoint: no validation gave a finite val/top1; "
            "--which=latest reads the newest checkpoint (step 6) instead (as init.path or "
            f"--weights: {newest.parent}).")  # fmt: skip
    with pytest.raises(weights.WeightFormatError, match=re.escape(told)):
        latest_step_dir(workdir, "best")
    assert latest_step_dir(workdir) == newest


@pytest.mark.slow
def test_a_longer_run_selects_as_an_uninterrupted_one(tmp_path, scripted_validation):
    """The last step's checkpoint records its own validation: a run extended from it
    (``total_steps`` 4 -> 14) keeps the best and the patience count, and stops and tests as
    the uninterrupted run above does."""
    shorter = selecting_config()
    shorter.total_steps = 4
    first = train_and_evaluate(shorter, str(tmp_path))
    assert first["best/step"] == 4 and meta(tmp_path, 4)["selection"]["best_step"] == 4
    longer = train_and_evaluate(selecting_config(), str(tmp_path))
    assert scripted_validation["val"] == 5
    assert steps(tmp_path) == [2, 4, 6, 8, 10]
    assert longer["best/step"] == 4 and longer["best/val/top1"] == 0.7


@pytest.mark.slow
def test_a_resume_with_another_validation_split_selects_anew(tmp_path, scripted_validation, caplog):
    """A run resumed (here: made longer) with another ``data.val_split`` starts its selection
    anew: the best so far and the patience count were measured on the old split. SCRIPT from
    the 3rd validation on: 0.6 (step 6), 0.71, 0.65, 0.9 (step 12), 0.9; kept, the old best
    0.7 (step 4) would have stopped the run at step 10."""
    shorter = selecting_config()
    shorter.total_steps = 4
    assert train_and_evaluate(shorter, str(tmp_path))["best/step"] == 4
    longer = selecting_config()
    longer.data.val_split = "train[95%:]"
    with caplog.at_level(logging.WARNING):
        result = train_and_evaluate(longer, str(tmp_path))
    assert 'another validation split (data.val_split "train[90%:]" -> "train[95%:]")' in caplog.text
    assert result["best/step"] == 12 and scripted_validation["val"] == 7


@pytest.mark.slow
def test_a_selection_started_anew_keeps_no_best_of_the_old_split(tmp_path, scripted_validation,
                                                                  monkeypatch):  # fmt: skip
    """The old split's best checkpoint goes with its selection: a resumed run whose new split
    never gives a finite value has no best, as a fresh run would (it reported the old split's
    best step 4 as its own)."""
    shorter = selecting_config()
    shorter.total_steps = 4
    assert train_and_evaluate(shorter, str(tmp_path))["best/step"] == 4
    scripted = train.run_evaluation

    def no_finite_validation(run, state, source=None, split="eval", observe=None,
                             interrupt=None):  # fmt: skip
        if split == "val":
            return {"val/top1": float("nan"), "val/loss": float("nan"), "val/examples": 72.0}
        return scripted(run, state, source, split, observe, interrupt)

    monkeypatch.setattr(train, "run_evaluation", no_finite_validation)
    longer = selecting_config()
    longer.total_steps = 8
    longer.data.val_split = "train[95%:]"
    with pytest.raises(CheckpointError, match="no validation gave a finite val/top1"):
        train_and_evaluate(longer, str(tmp_path))
    assert not [p for p in (tmp_path / "best").iterdir() if p.name.isdigit()]


@pytest.mark.slow
@pytest.mark.parametrize(
    "cut, total", [(3, 14), (5, 14), (2, 4)]
)  # a validation on the way; the one that stops early; the last step's, a new best
def test_a_signal_during_a_validation_stops_it_and_the_rerun_validates_that_step_first(
    tmp_path, scripted_validation, monkeypatch, cut, total
):
    """A stop signal during a validation ends it at the next batch (a long validation could
    outlast a preemption's grace period); the step is saved with its validation pending, and
    the rerun does that validation first and records it in that step's meta: it selects, stops
    early and tests as the uninterrupted run (SCRIPT: the 5th validation, step 10, stops it;
    the best is step 4), and a run started again after it reports the same without
    validating again."""
    import os
    import signal
    import time

    from vision_jax.signals import StopRequested

    scripted = train.run_evaluation

    def signal_during_validation(run, state, source=None, split="eval", observe=None,
                                 interrupt=None):  # fmt: skip
        if split == "val" and scripted_validation["val"] == cut - 1:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.2)  # the signal thread takes note
            interrupt()  # before the next batch, as run_evaluation calls it
            raise AssertionError("the validation was not interrupted")
        return scripted(run, state, source, split, observe, interrupt)

    config = selecting_config()
    config.total_steps = total
    config.log_every_steps = 3  # the early stop (step 10) cuts a log window
    monkeypatch.setattr(train, "run_evaluation", signal_during_validation)
    with pytest.raises(StopRequested, match=f"stopped at step {2 * cut} .SIGTERM."):
        train_and_evaluate(config, str(tmp_path))
    assert steps(tmp_path)[-1] == 2 * cut and scripted_validation["val"] == cut - 1
    saved = meta(tmp_path, 2 * cut)
    assert saved["evaluation_pending"] and not saved["stopped_early"]
    assert "train/loss" in saved["reported"] and "val/top1" not in saved["reported"]

    def slow_first(run, state, source=None, split="eval", observe=None, interrupt=None):
        if split == "val" and scripted_validation["val"] == cut - 1:
            time.sleep(1.0)  # the pending validation's time is not the next window's
        return scripted(run, state, source, split, observe, interrupt)

    monkeypatch.setattr(train, "run_evaluation", slow_first)
    result = train_and_evaluate(config, str(tmp_path))
    monkeypatch.setattr(train, "run_evaluation", scripted)
    if cut == 3:  # training went on after it: the next window's rate is its steps' own
        from vision_jax.report.curves import read_scalars

        steps_logged, rates = read_scalars(tmp_path)["train/images_per_sec"]
        assert list(steps_logged) == [3, 6, 9, 10] and 0 < rates[-2] < 1e5, rates
    validations = min(5, total // 2)
    assert scripted_validation["val"] == validations  # each validation once, the cut one again
    assert steps(tmp_path) == list(range(2, 2 * validations + 1, 2))
    assert result["best/step"] == 4 and result["best/val/top1"] == 0.7
    assert [p.name for p in (tmp_path / "best").iterdir() if p.name.isdigit()] == ["4"]
    assert len(scripted_validation["eval"]) == 1  # the best tested once
    recorded = meta(tmp_path, 2 * cut)
    assert "evaluation_pending" not in recorded
    assert recorded["selection"]["best_step"] == 4
    assert recorded["stopped_early"] == (cut == 5)
    assert recorded["final"] == (cut == 5 or 2 * cut == total)  # rotation keeps a run's end
    if cut == 5:  # the window the early stop cut is written, as the uninterrupted run does
        from vision_jax.report.curves import read_scalars

        steps_logged, losses = read_scalars(tmp_path)["train/loss"]
        assert list(steps_logged) == [3, 6, 9, 10]
        assert result["train/loss"] == pytest.approx(losses[-1])
    again = train_and_evaluate(config, str(tmp_path))  # finished: reported, not validated
    assert scripted_validation["val"] == validations
    assert again["best/step"] == 4 and "train/loss" in again and "val/top1" in again


def test_a_step_checkpoint_is_saved_after_the_best_it_names_is_complete(
    tmp_path, scripted_validation, monkeypatch
):
    """The best and the step checkpoints are two asynchronous savers: a step's save starts
    only once the best save before it is complete, so a crash never leaves a step whose
    selection names a best that is not on disk."""
    from vision_jax import checkpoint

    events = []
    for cls, name in [(checkpoint.BestCheckpoint, "save"), (checkpoint.BestCheckpoint, "wait"),
                      (checkpoint.Checkpointer, "save")]:  # fmt: skip
        real = getattr(cls, name)

        def record(self, *args, _real=real, _what=f"{cls.__name__}.{name}", **kwargs):
            events.append(_what)
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(cls, name, record)
    config = selecting_config()
    config.total_steps = 4
    train_and_evaluate(config, str(tmp_path))
    saves = [i for i, e in enumerate(events) if e == "Checkpointer.save"]
    assert len(saves) == 2 and events.count("BestCheckpoint.save") == 2
    for i in saves:
        last_best = max(j for j in range(i) if events[j] == "BestCheckpoint.save")
        assert "BestCheckpoint.wait" in events[last_best + 1 : i], events


@pytest.mark.slow
def test_a_resume_keeps_the_best_its_selection_names(tmp_path, scripted_validation, caplog):
    """Best checkpoints left by a crash: an unfinished save of the best (its step checkpoint
    committed) is saved again from that step; a best of an earlier run is removed (orbax kept
    it, not knowing its score, and the run ended with two full states); a best that is gone
    when no validation is left is an error, not the newest other one."""
    config = selecting_config()
    config.total_steps = 4
    train_and_evaluate(config, str(tmp_path))
    best = tmp_path / "best"
    assert [p.name for p in best.iterdir()] == ["4"]
    (best / "4").rename(best / "4.orbax-checkpoint-tmp-1")  # the crash: not committed
    shutil.copytree(tmp_path / "checkpoints" / "2", best / "2")  # an earlier best
    with caplog.at_level("WARNING"):
        again = train_and_evaluate(config, str(tmp_path))
    assert "best checkpoint of step 4 was not complete" in caplog.text
    assert again["best/step"] == 4 and again["best/val/top1"] == 0.7
    assert sorted(p.name for p in best.iterdir() if p.name.isdigit()) == ["4"]
    want = read_variables(tmp_path / "checkpoints" / "4")["params"]["head"]["kernel"]
    np.testing.assert_array_equal(read_variables(tmp_path, "best")["params"]["head"]["kernel"],
                                  want)  # fmt: skip

    shutil.copytree(tmp_path / "checkpoints" / "2", best / "2")  # left by an earlier run
    longer = train_and_evaluate(selecting_config(), str(tmp_path))  # on to step 10
    assert longer["best/step"] == 4 and steps(tmp_path) == [2, 4, 6, 8, 10]
    assert sorted(p.name for p in best.iterdir() if p.name.isdigit()) == ["4"]

    shutil.rmtree(best / "4")
    with pytest.raises(checkpoint_lib.CheckpointError, match=r"best checkpoint of step 4 "
                       r"\(val/top1 0.7\) is not in .*no validation left"):  # fmt: skip
        train_and_evaluate(selecting_config(), str(tmp_path))


@pytest.mark.slow
@pytest.mark.parametrize(
    "script, every, total",
    [
        ([0.5, 0.7], 2, 4),  # the restored step's best is gone: it is saved again
        ([0.5, 0.6, 0.8, 0.7], 4, 8),  # a best between two checkpoints stays best
        ([0.7, 0.6, 0.8, 0.75], 4, 8),  # the restored step's selection names step 2
    ],
)  # fmt: skip
def test_a_best_after_the_restored_step_is_an_earlier_runs(
    tmp_path, scripted_validation, monkeypatch, script, every, total
):
    """A crash after an improvement's best save, before the step checkpoint that follows it
    (``eval_every_steps`` < ``checkpoint_every_steps``, or a kill between the two saves of
    one step), leaves a best of a step after the one a resume restores: it is an earlier
    run's, and the resumed run, which computes that step again, saves it as its own (it kept
    the restored step's best again and reported that one). The outcome is the
    uninterrupted run's: the same best step, parameters and test figures."""
    monkeypatch.setitem(globals(), "SCRIPT", script)
    config = selecting_config()
    config.total_steps, config.checkpoint_every_steps = total, every
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    uninterrupted = train_and_evaluate(config, str(whole))
    shutil.copytree(whole, cut)
    shutil.rmtree(cut / "checkpoints" / str(total))  # the crash: the last step is not saved
    scripted_validation["val"] = max([0] + steps(cut)) // 2
    resumed = train_and_evaluate(config, str(cut))
    best = int(uninterrupted["best/step"])
    assert resumed["best/step"] == best
    assert [p.name for p in (cut / "best").iterdir() if p.name.isdigit()] == [str(best)]
    jax.tree.map(np.testing.assert_array_equal, read_variables(cut, "best"),
                 read_variables(whole, "best"))  # the same parameters, bit for bit  # fmt: skip
    figures = {k: v for k, v in uninterrupted.items() if k.startswith(("test/", "eval/", "best/"))}
    assert figures and {k: resumed[k] for k in figures} == figures


@pytest.mark.slow
def test_a_best_gone_before_the_restored_step_is_chosen_again(
    tmp_path, scripted_validation, caplog
):
    """The best the selection names is gone and the restored step is a later one: the best
    is chosen again from the next validations, and bests of earlier runs do not stay."""
    config = selecting_config()
    config.total_steps = 6  # validations 0.5, 0.7 (best, step 4), 0.6
    train_and_evaluate(config, str(tmp_path))
    best = tmp_path / "best"
    shutil.rmtree(best / "4")
    shutil.copytree(tmp_path / "checkpoints" / "2", best / "2")
    config.total_steps = 8  # one more validation: 0.71
    with caplog.at_level("WARNING"):
        result = train_and_evaluate(config, str(tmp_path))
    assert "best checkpoint of step 4 (val/top1 0.7) is not in" in caplog.text
    assert result["best/step"] == 8 and result["best/val/top1"] == 0.71
    assert sorted(p.name for p in best.iterdir() if p.name.isdigit()) == ["8"]


def test_selection_progress_is_checkpointed_for_an_exact_resume():
    s = Selection("val/top1", "max", patience=3, min_delta=0.02)
    for step, value in zip(range(2, 12, 2), SCRIPT, strict=False):
        s.update(step, {"val/top1": value})
    assert (s.best_step, s.best_value, s.bad_evaluations, s.should_stop) == (4, 0.7, 3, True)
    fresh = Selection("val/top1", "max", patience=3, min_delta=0.02)
    assert fresh.resumed(json.loads(json.dumps(s.to_json()))) == s
    loss = Selection.from_spec(specs.EarlyStoppingSpec(metric="loss"), "top1")
    assert (loss.metric, loss.mode) == ("val/loss", "min")
    assert loss.update(2, {"val/loss": 1.0}) and loss.update(4, {"val/loss": 0.5})
    assert not loss.update(6, {"val/loss": float("nan")})  # never the best, counts as no gain
    first = Selection("val/top1", "max", patience=1, min_delta=0.0)
    assert not first.update(2, {"val/top1": float("nan")}) and not first.should_stop  # no best yet
    assert first.update(4, {"val/top1": 0.5}) and first.bad_evaluations == 0
    assert not first.update(6, {"val/top1": float("nan")}) and first.should_stop
    with pytest.raises(specs.ConfigError, match="'val/accuracy' is not an evaluation.*val/loss"):
        Selection.from_spec(specs.EarlyStoppingSpec("accuracy"), "top1").update(2, {"val/loss": 1})


def test_a_per_class_metric_is_selected_by_its_metric_and_may_be_absent(caplog):
    """``val/iou/<class>``: the mode is IoU's, whatever the class is called (a class named
    "dental floss" is not a loss), and a validation where the class had nothing to score (its
    IoU left out, as AP for a class without ground truth) counts as no improvement, as a NaN
    does; a result that is not per class is still a config error when missing."""
    spec = specs.EarlyStoppingSpec
    for name in ("iou/dental floss", "iou/hair_loss", "ap/gloss"):
        selection = Selection.from_spec(spec(f"val/{name}"), "miou", "max", ("iou", "ap"))
        assert (selection.mode, selection.per_class) == ("max", True), name
    assert Selection.from_spec(spec("val/loss"), "miou", None, ("iou",)).mode == "min"
    assert not Selection.from_spec(spec("val/iou"), "miou", None, ("iou",)).per_class
    s = Selection.from_spec(spec("val/iou/Sneaker", patience=1), "miou", "max", ("iou",))
    with caplog.at_level("WARNING"):
        assert not s.update(5, {"val/miou": 0.2}) and not s.should_stop  # no best yet
        s.update(7, {"val/miou": 0.2}, Detection.per_class_absent)  # the task's reason
    assert "No val/iou/Sneaker at step 5: its class had nothing to score in the" in caplog.text
    assert ("No val/iou/Sneaker at step 7: no (non-crowd) ground-truth box of that class in the "
            "validation split; counted as no improvement.") in caplog.text  # fmt: skip
    assert s.update(10, {"val/iou/Sneaker": 0.4, "val/miou": 0.3})
    assert not s.update(15, {"val/miou": 0.5}) and s.should_stop and s.best_step == 10
    with pytest.raises(specs.ConfigError, match="'val/mious' is not an evaluation result"):
        Selection.from_spec(spec("val/mious"), "miou", None, ("iou",)).update(5, {"val/miou": 1})


def test_a_task_whose_headline_is_an_error_selects_its_lowest(
    tmp_path, scripted_validation, monkeypatch
):
    """A task declares its headline's direction (``headline_mode``): the selection keeps the
    lowest validation of an error metric without early_stopping.mode being set."""
    import dataclasses

    from vision_jax import tasks
    from vision_jax.tasks.classification import Classification

    @dataclasses.dataclass(frozen=True)
    class LowerIsBetter(Classification):
        name = "lower_is_better"
        headline_mode = "min"

    monkeypatch.setitem(tasks.TASKS, "lower_is_better", LowerIsBetter)
    assert Selection.from_spec(specs.EarlyStoppingSpec(), "top1", "min").mode == "min"
    assert Selection.from_spec(specs.EarlyStoppingSpec("val/loss"), "top1", "max").mode == "min"
    assert Selection.from_spec(specs.EarlyStoppingSpec(), "recon_loss").mode == "min"
    with pytest.raises(specs.ConfigError, match="headline_mode is 'min' or 'max'; got 'lower'"):
        Selection.from_spec(specs.EarlyStoppingSpec(), "mae", "lower")
    config = selecting_config()
    config.task.name = "lower_is_better"
    result = train_and_evaluate(config, str(tmp_path))
    # SCRIPT 0.5 (step 2), then 0.7, 0.6, 0.71: no lower value for 3 validations.
    assert result["best/step"] == 2 and result["best/val/top1"] == 0.5
    assert steps(tmp_path)[-1] == 8 and meta(tmp_path, 8)["stopped_early"]


def test_a_setup_error_leaves_no_best_folder(tmp_path, monkeypatch):
    """An error while the run is built (here: compiling its steps) leaves neither the
    ``checkpoints`` nor the ``best`` folder behind, and the workdir unlocked."""

    def fail(*args, **kwargs):
        raise RuntimeError("compilation failed")

    monkeypatch.setattr(run_lib, "_compile_steps", fail)
    with pytest.raises(RuntimeError, match="compilation failed"):
        run_lib.build_run(selecting_config(), str(tmp_path))
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "best").exists()
    monkeypatch.undo()
    run_lib.build_run(selecting_config(), str(tmp_path)).close()  # the lock was released


@pytest.mark.parametrize(
    "overrides, match",
    [
        (
            {"early_stopping.patience": 2},
            "early_stopping.patience only applies with data.val_split",
        ),
        ({"data.val_split": "test"}, "must differ from train_split and eval_split"),
        ({"data.val_split": "train[90%:]", "early_stopping.mode": "up"}, "'max' or 'min'"),
        (
            {"data.val_split": "train[90%:]", "early_stopping.metric": "val_ema/top1"},
            "'val_ema/top1' measures the EMA parameters: set ema_decay",
        ),
    ],
)
def test_selection_config_errors(overrides, match):
    with pytest.raises(specs.ConfigError, match=match):
        specs.run_spec(TrackedConfig(small_config(**overrides)))


@pytest.mark.parametrize(
    "overrides, match",
    [
        (  # found at the first validation, after its steps, before their save: they were lost
            {"early_stopping.metric": "val/top_1"},
            r"early_stopping.metric 'val/top_1' is not a validation result of a classification "
            r"run \(closest: val/top1, val/top5\); valid: val/loss, val/top1, val/top5, ",
        ),
        ({"early_stopping.min_delta": -1.0}, r"early_stopping.min_delta must lie in \[0, inf\)"),
    ],
)
def test_selection_settings_that_would_act_wrongly_are_refused_before_training(
    tmp_path, overrides, match
):
    cfg = selecting_config()
    for key, value in overrides.items():
        section, _, name = key.rpartition(".")
        (cfg[section] if section else cfg)[name] = value
    with pytest.raises(specs.ConfigError, match=match):
        run_lib.build_run(cfg, str(tmp_path))
    assert not (tmp_path / "checkpoints").exists()


def test_a_patience_that_cannot_stop_the_run_is_warned_of(tmp_path, caplog):
    """One validation, at the end: patience 3 cannot stop the run (a longer run resumed from
    it may: a warning, not an error)."""
    cfg = selecting_config()
    cfg.eval_every_steps = 0
    with caplog.at_level(logging.WARNING):
        run_lib.build_run(cfg, str(tmp_path)).close()
    assert ("early_stopping.patience=3 cannot stop this run: it needs 4 validations before the "
            "last step, and eval_every_steps=0 gives 0 of 14 steps.") in caplog.text  # fmt: skip


def test_a_subclass_of_a_library_task_may_select_on_a_metric_of_its_own(tmp_path):
    """metric_names is checked for the summarize and eval_metrics it declares: a Classification
    subclass with a summarize, or eval_metrics, of its own may report more, checked at its first
    validation (one with its own eval_metrics was refused before training)."""

    class WithF1(Classification):
        def summarize(self, collection, source, prefix):
            return {**super().summarize(collection, source, prefix), f"{prefix}f1": 0.0}

    class WithTop2(Classification):  # the base summarize reports every metric it computes
        headline = "top2"

        def eval_metrics(self, outputs, batch):
            return super().eval_metrics(outputs, batch)

    class Top2Headline(Classification):
        headline = "top2"

    spec = specs.run_spec(TrackedConfig(selecting_config(**{"early_stopping.metric": "val/f1"})))
    with pytest.raises(specs.ConfigError, match="'val/f1' is not a validation result"):
        run_lib._check_selection(spec, TWO_CLASSES, 14, fresh=True)
    for task in (WithF1(), WithTop2()):
        run_lib._check_selection(dataclasses.replace(spec, task=task), TWO_CLASSES, 14, fresh=True)
        run_lib._check_headline(task)
    with pytest.raises(ValueError, match="headline 'top2' is not among its metric_names"):
        run_lib._check_headline(Top2Headline())


@pytest.mark.parametrize(
    "metric, crowd, why_not",
    [
        ("val/ap/yellow", 0, " of class 'yellow'"),
        ("val/ap_large", 0, " of ap_large's areas (9216-1e+10 px)"),
        ("val/ar_medium", 0, " of ar_medium's areas (1024-9216 px)"),
        (None, 1, ""),  # the default val/map; crowds only
    ],
)
def test_a_detection_metric_the_validation_split_cannot_give_is_refused_before_training(
    tmp_path, metric, crowd, why_not
):
    """pycocotools leaves ``ap/<class>`` out without a box of the class, and gives NaN for a
    figure without a box of its areas (all of them without any box): no validation would give
    a best, found only at the end of training; the split's ground truth tells before it."""
    from test_det_data import write_coco
    from test_detection_train import det_config, random_scenes

    write_coco(tmp_path, random_scenes(32, 0), "train")  # classes 0-2 of NAMES, small boxes
    write_coco(tmp_path, random_scenes(4, 1), "test")
    scenes = [(h, w, [(*box[:5], crowd) for box in boxes]) for h, w, boxes in random_scenes(4, 2)]
    write_coco(tmp_path, scenes, "val")
    cfg = det_config(tmp_path, **{"data.val_split": "val", "early_stopping.metric": metric})
    why = f"{metric or 'val/map'}' can never be measured on the validation split 'val': it holds "
    with pytest.raises(specs.ConfigError, match=re.escape(f"{why}no (non-crowd) box{why_not}.")):
        run_lib.build_run(cfg, str(tmp_path / "run"))
    assert not (tmp_path / "run" / "checkpoints").exists()
    if not crowd:  # a class with boxes, or a figure of the areas they have, passes
        for ok in ("val/ap/red", "val/ap_small"):
            cfg.early_stopping.metric = ok
            spec = specs.run_spec(TrackedConfig(cfg))
            source = data_lib.load_source(spec.data, "val", target="boxes")
            run_lib._check_selection(spec, source, 14, fresh=True)


def test_a_segmentation_class_the_validation_split_lacks_is_refused_before_training(tmp_path):
    """``iou/<class>`` of a class no validation label map holds is 0 where the model predicts
    it, else left out: no validation would give a best, found only at the end of training (as
    detection's ``ap/<class>`` without a box); the split's label maps tell before it."""
    from test_segmentation_train import seg_config, squares

    images, maps = squares(8, seed=2)
    no_blue = {"val": (images, np.where(maps == 3, 2, maps).astype(np.uint8))}
    arrays = {"train": squares(64), "test": squares(8, seed=1), **no_blue}
    cfg = seg_config(**{"data.val_split": "val", "early_stopping.metric": "val/iou/blue"})
    why = ("early_stopping.metric 'val/iou/blue' can never be measured on the validation split "
           "'val': no label map of it holds a pixel of class 'blue' (its IoU is 0 where the "
           "model predicts it, else left out).")  # fmt: skip
    with pytest.raises(specs.ConfigError, match=re.escape(why)):
        run_lib.build_run(cfg, str(tmp_path / "run"), arrays=arrays)
    assert not (tmp_path / "run" / "checkpoints").exists()
    for ok in ("val/iou/green", "val/miou"):  # a class with pixels, or the mean, passes
        cfg.early_stopping.metric = ok
        spec = specs.run_spec(TrackedConfig(cfg))
        source = data_lib.load_source(spec.data, "val", arrays=arrays, target="label_map")
        run_lib._check_selection(spec, source, 14, fresh=True)


def test_no_early_stop_at_the_last_step(tmp_path, scripted_validation):
    """A validation at the planned last step that exhausts the patience ends the run as
    planned: not "stopped early" (a longer run resumes from it)."""
    cfg = selecting_config()
    cfg.total_steps = 10  # the 5th validation, at step 10, exhausts patience 3
    train_and_evaluate(cfg, str(tmp_path))
    meta = json.loads((tmp_path / "checkpoints" / "10" / "meta" / "metadata").read_text())
    assert meta["stopped_early"] is False


def rows(source: data_lib.Source) -> set[bytes]:
    images, labels = source.columns["image"], source.columns["label"]
    return {image.tobytes() + bytes([int(y)]) for image, y in zip(images, labels, strict=True)}


def test_sliced_splits_partition_a_split_and_keep_every_class():
    data = specs.run_spec(TrackedConfig(small_config())).data
    whole = data_lib.load_source(data, "train")
    head, tail = (data_lib.load_source(data, f"train[{s}]") for s in (":90%", "90%:"))
    assert head.num_examples + tail.num_examples == whole.num_examples
    assert tail.num_examples == round(0.1 * whole.num_examples)
    assert rows(head) | rows(tail) == rows(whole) and not rows(head) & rows(tail)
    first = data_lib.load_source(data, "train[:20]")
    assert first.num_examples == 20 and rows(first) <= rows(head)
    # A class-sorted split (as image folders list their files): a slice still holds every class.
    labels = np.repeat(np.arange(5), 40)
    images = np.random.default_rng(0).integers(0, 255, (200, 8, 8, 3), np.uint8)
    arrays = specs.run_spec(TrackedConfig(small_config(**{"data.source": "arrays"}))).data
    tail = data_lib.load_source(arrays, "train[90%:]", arrays={"train": (images, labels)})
    assert tail.num_examples == 20 and set(tail.columns["label"]) == set(range(5))
    with pytest.raises(data_lib.DataError, match="Cannot parse split 'train\\[1:2'"):
        data_lib.load_source(data, "train[1:2")
    with pytest.raises(data_lib.DataError, match=r"slice \[50%:50%\] of 1437 examples holds none"):
        data_lib.load_source(data, "train[50%:50%]")
