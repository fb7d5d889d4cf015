"""A task of one's own written from the base class (``vision_jax.tasks.base.Task``, not a
library task): its mistakes are found before the run trains, with the task's own words."""

# No ``from __future__ import annotations``: clu reads the metric collections' annotations.
import dataclasses

import flax
import jax.numpy as jnp
import pytest
from clu import metrics
from test_train import small_config

from vision_jax import tasks
from vision_jax.models import create_model
from vision_jax.tasks.base import Task
from vision_jax.train import train_and_evaluate


@flax.struct.dataclass
class TrainMetrics(metrics.Collection):
    loss: metrics.Average.from_output("loss")
    grad_norm: metrics.Average.from_output("grad_norm")


@flax.struct.dataclass
class EvalMetrics(metrics.Collection):
    mse: metrics.Average.from_output("mse")
    mae: metrics.Average.from_output("mae")


@dataclasses.dataclass(frozen=True)
class Regression(Task):
    """The digit's value (times ``scale``) from its image: MSE loss, MAE headline."""

    scale: float = 1.0

    name = "test_regression"
    target = "label"
    headline = "mae"
    headline_mode = "min"
    metric_names = ("mse", "mae", "examples")
    train_metrics = TrainMetrics
    per_example = ("value",)

    def build_model(self, model_name, num_classes, **model_kwargs):
        return create_model(model_name, num_classes=1, **model_kwargs)

    def error(self, outputs, batch):
        return outputs[..., 0].astype(jnp.float32) - batch["label"] * self.scale

    def train_loss(self, outputs, batch, normalisers=None):
        return jnp.mean(self.error(outputs, batch) ** 2), {}

    def eval_metrics(self, outputs, batch):
        e = self.error(outputs, batch)
        return EvalMetrics.single_from_model_output(
            mse=e**2, mae=jnp.abs(e), mask=batch["mask"] > 0
        )

    def summarize(self, collection, source, prefix):
        out = {f"{prefix}{k}": float(v) for k, v in collection.compute().items()}
        out[f"{prefix}examples"] = float(collection.mae.count)
        return out

    def predict(self, outputs, image_hw):
        return {"value": outputs[..., 0].astype(jnp.float32)}


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
