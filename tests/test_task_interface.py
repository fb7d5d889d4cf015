"""A task of one's own written from the base class (``vision_jax.tasks.base.Task``, not a
library task): its mistakes are found before the run trains, with the task's own words."""

# No ``from __future__ import annotations``: clu reads the metric collections' annotations.
import dataclasses
import logging

import flax
import jax.numpy as jnp
import pytest
from clu import metrics
from own_task import DigitValue, EvalMetrics
from test_train import small_config

from vision_jax import specs, tasks
from vision_jax.config import TrackedConfig, UnreadConfigKeysError
from vision_jax.data import DataError
from vision_jax.main import _summaries
from vision_jax.run import build_run
from vision_jax.tasks.base import Task
from vision_jax.train import train_and_evaluate


@dataclasses.dataclass(frozen=True)
class Regression(DigitValue):
    """The digit's value from its image: MSE loss, MAE headline."""

    name = "test_regression"


def regression_config(task: type[Task], **overrides):
    """Two steps of ``task`` (registered for the test) on the digits."""
    config = small_config(total_steps=2, checkpoint_every_steps=1, **overrides)
    config.task.name = task.name
    return config


@pytest.fixture
def register(monkeypatch):
    """register_task for one test."""
    monkeypatch.setattr(tasks, "TASKS", dict(tasks.TASKS))
    return tasks.register_task


def steps_saved(workdir) -> list[str]:
    return sorted(p.name for p in (workdir / "checkpoints").glob("[0-9]*"))


@dataclasses.dataclass(frozen=True)
class ReadsAMissingKey(Regression):
    name = "reads_a_missing_key"

    def eval_metrics(self, outputs, batch):
        e = outputs[..., 0] - batch["value"]
        return EvalMetrics.single_from_model_output(mse=e**2, mae=jnp.abs(e), mask=batch["mask"])


@dataclasses.dataclass(frozen=True)
class NamesAMissingOutput(Regression):
    name = "names_a_missing_output"
    per_example = ("values",)


@pytest.mark.parametrize(
    "task, error, match",
    [
        (ReadsAMissingKey, KeyError, "'value'"),
        (
            NamesAMissingOutput,
            ValueError,
            r"NamesAMissingOutput.per_example names \['values'\], which its predict does not "
            r"return \(it returns \['value'\]\)",
        ),
    ],
)
def test_an_error_in_the_eval_step_stops_the_run_before_it_trains(
    tmp_path, register, task, error, match
):
    """The eval step is traced before the first step, not at the first evaluation: without a
    validation split that was after all training (its steps spent, then a traceback)."""
    register(task)
    with pytest.raises(error, match=match):
        train_and_evaluate(regression_config(task), str(tmp_path))
    assert steps_saved(tmp_path) == []  # not one step trained


@dataclasses.dataclass(frozen=True)
class Misheadlined(Regression):
    """Its headline is not a name its (inherited) summarize returns."""

    name = "misheadlined"
    headline = "MAE"


@dataclasses.dataclass(frozen=True)
class MisheadlinedUndeclared(Misheadlined):
    name = "misheadlined_undeclared"
    metric_names = None


@dataclasses.dataclass(frozen=True)
class Inherits(Regression):
    name = "inherits"


def test_a_headline_outside_the_declared_metric_names_is_refused_before_training(
    tmp_path, register
):
    """A subclass inherits its base's metric_names with its summarize: its headline (and an
    early_stopping.metric) is checked against them before training, whether or not there is a
    validation split (without one, nothing was said; with one, early_stopping.metric, which
    the user never set, was blamed)."""
    register(Misheadlined)
    match = (
        r"Misheadlined.headline 'MAE' is not among its metric_names \(mse, mae, examples\): "
        "the headline is the result of its summarize"
    )
    for val_split in (None, "train[90%:]"):
        config = regression_config(Misheadlined, **{"data.val_split": val_split})
        with pytest.raises(ValueError, match=match):
            train_and_evaluate(config, str(tmp_path))
        assert steps_saved(tmp_path) == []
    register(Inherits)
    config = regression_config(Inherits, **{"data.val_split": "train[90%:]"})
    config.early_stopping.metric = "val/f1"
    with pytest.raises(specs.ConfigError, match="'val/f1' is not a validation result of a"):
        build_run(config, str(tmp_path)).close()


@pytest.mark.parametrize("val_split", [None, "train[90%:]"])
def test_a_summarize_without_the_headline_is_named_at_the_first_evaluation(
    tmp_path, register, val_split
):
    """Undeclared, the names summarize returns are known at the first evaluation: one without
    the headline is refused there, naming the task's summarize (the selection, the report and
    the run's last lines read the headline)."""
    register(MisheadlinedUndeclared)
    config = regression_config(MisheadlinedUndeclared, **{"data.val_split": val_split})
    split = "val" if val_split else "eval"
    with pytest.raises(
        ValueError,
        match=rf"Task.summarize returned no {split}/MAE, the headline of "
        rf"MisheadlinedUndeclared \('MAE'\); it returned {split}/examples, {split}/mae, "
        rf"{split}/mse\.",
    ):
        train_and_evaluate(config, str(tmp_path))


def test_the_summary_lines_skip_a_missing_headline(register, caplog):
    """The command's last lines after training leave out a headline the results lack (a
    KeyError there ended a finished run with exit 1 and no report)."""
    register(MisheadlinedUndeclared)
    results = {"eval/mae": 1.0, "eval/examples": 360.0, "best/step": 2.0, "best/val/mae": 0.9}
    with caplog.at_level(logging.WARNING):
        assert _summaries(results, MisheadlinedUndeclared.name) == []
    assert "No eval/MAE (the task's headline) in the results" in caplog.text
    register(Regression)
    assert _summaries(results, Regression.name) == [
        "best checkpoint: step 2 (val/mae 0.9000); its mae on the eval split 1.0000 (360 examples)"
    ]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Settings(Regression):
    name = "settings"
    huber_delta: float | None = 1.0  # None: the squared error
    offset: float  # no default


def settings_config(**task_keys):
    config = regression_config(Settings)
    for key, value in task_keys.items():
        config.task[key] = value
    return TrackedConfig(config)


def test_a_tasks_settings_come_from_its_config_keys(register):
    """``config.task.<field>``: unset, or None (as every config key: the library's task keys
    are None placeholders, which must not replace a subclass's default), the field's default; a
    field without a default needs a value (it was a TypeError from the constructor); a
    mistyped key's hint names the task's own fields, the unset ones too."""
    register(Settings)
    task = tasks.create_task(settings_config(offset=0.5))
    assert (task.scale, task.huber_delta, task.offset) == (1.0, 1.0, 0.5)
    task = tasks.create_task(settings_config(offset=0.5, huber_delta=None, scale=None))
    assert (task.scale, task.huber_delta, task.offset) == (1.0, 1.0, 0.5)
    assert tasks.create_task(settings_config(offset=0.5, huber_delta=2.0)).huber_delta == 2.0
    match = (
        r"task.offset needs a value \(Settings.offset has no default\): set config.task.offset "
        r"\(c.task.offset = ... in the config file\)."
    )
    for config in (settings_config(), settings_config(offset=None)):
        with pytest.raises(specs.ConfigError, match=match):
            tasks.create_task(config)
    config = settings_config(offset=0.5, scael=2.0)
    specs.run_spec(config)
    with pytest.raises(UnreadConfigKeysError, match=r"task.scael \(closest: task.scale\)$"):
        config.check_all_read()


@flax.struct.dataclass
class Collected(metrics.CollectingMetric.from_outputs(("value",))):
    pass


@flax.struct.dataclass
class CollectedMetrics(metrics.Collection):
    collected: Collected


def test_the_base_summarize_gives_each_metric_and_the_examples():
    """Task.summarize: each metric as a number, and the examples its first Average counted
    (padding rows masked out); without an Average, it says to write one's own."""
    task = Regression()
    batch = {"label": jnp.array([1, 2, 3]), "mask": jnp.array([1, 1, 0])}
    collection = task.eval_metrics(jnp.array([[1.0], [4.0], [9.0]]), batch)
    summary = task.summarize(collection, None, "eval/")
    assert summary == {"eval/mse": 2.0, "eval/mae": 1.0, "eval/examples": 2.0}
    collected = CollectedMetrics.single_from_model_output(value=jnp.zeros(3))
    with pytest.raises(TypeError, match="Regression's eval_metrics has no Average metric for "):
        task.summarize(collected, None, "eval/")


@dataclasses.dataclass(frozen=True)
class ReadsPoints(Regression):
    name = "reads_points"
    target = "points"


class ReadsTheMask(Regression):
    name = "reads_the_mask"
    target = "mask"


@pytest.mark.parametrize(
    "task, match",
    [
        (ReadsPoints, r"data.source='digits' has no column 'points', the task's target \(its "
                      r"columns: image, label\); columns of one's own come from data.source "
                      r"'arrays' or 'csv'\.$"),
        (ReadsTheMask, r"A task's target 'mask' \(the batch key it reads\) is neither one the "
                       r"input pipeline makes \('label', 'label_map', 'boxes'\) nor a column "
                       r"name of one's own"),
    ],
)  # fmt: skip
def test_a_target_the_data_does_not_provide_is_named_as_the_tasks(tmp_path, register, task, match):
    register(task)
    with pytest.raises(DataError, match=match):
        build_run(regression_config(task), str(tmp_path))


def test_a_task_of_ones_own_reading_boxes_needs_no_detection_fields(monkeypatch):
    """The run asked every boxes task for Detection's max_boxes and its unreached-box warning
    (AttributeError for a task of one's own): the training split's checks are the task's
    (Task.check_train_split, nothing by default)."""
    import types

    from vision_jax import data as data_lib
    from vision_jax import run as run_lib

    class OwnBoxTask(tasks.Classification):
        target = "boxes"

    task = OwnBoxTask()
    source = types.SimpleNamespace(num_classes=3, class_names=("a", "b", "c"), column_spec=None)
    splits = types.SimpleNamespace(train_split="train", eval_split="test", val_split=None)
    spec = types.SimpleNamespace(task=task, data=splits)
    monkeypatch.setattr(data_lib, "load_source", lambda *a, **k: source)
    train, evaluation, _ = run_lib._load_data(spec, None)
    assert train is source and evaluation is source
    assert task.check_train_split(source, 32) is None
