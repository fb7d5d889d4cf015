"""The task interface: what the model's outputs mean, how they are trained and evaluated.

A task owns its head (it builds the model on a backbone), the batch target it needs from the
input pipeline (``target``: the key the data provides, ``label`` or ``label_map``), its loss,
its clu metrics and their exact summary over an evaluation split, and its prediction output.
The train and eval steps, the loop, checkpoints and the optimizer are the same for every task.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import flax.linen as nn
import jax
from clu import metrics

Batch = Mapping[str, jax.Array]


class Task(abc.ABC):
    """One task: subclasses are frozen dataclasses whose fields are the task's settings."""

    name: ClassVar[str]
    target: ClassVar[str]  # the batch key holding the targets
    headline: ClassVar[str]  # the metric that sums up an evaluation (``eval/<headline>``)
    train_metrics: ClassVar[type[metrics.Collection]]

    @classmethod
    def from_config(cls, section: Any, config: Any) -> Task:
        """The task from ``config.task`` (unset keys take the dataclass defaults) and the
        top-level ``loss`` / ``label_smoothing``; keys the task does not use stay unread, so
        setting them is an error."""
        fields = {f.name for f in dataclasses.fields(cls)} - {"loss", "label_smoothing"}
        kwargs = {k: section.get(k) for k in fields if section.get(k) is not None}
        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
        return cls(loss=config.loss, label_smoothing=float(config.label_smoothing), **kwargs)

    @abc.abstractmethod
    def build_model(self, model_name: str, num_classes: int, **model_kwargs: Any) -> nn.Module:
        """The model for this task on the registered backbone ``model_name``."""

    @abc.abstractmethod
    def train_loss(self, outputs: Any, batch: Batch) -> tuple[jax.Array, dict[str, jax.Array]]:
        """(mean training loss, the other outputs of :attr:`train_metrics` except
        ``loss`` and ``grad_norm``)."""

    @abc.abstractmethod
    def eval_metrics(self, outputs: Any, batch: Batch) -> metrics.Collection:
        """Metrics of one padded eval batch (``batch["mask"] == 0`` rows count for nothing)."""

    @abc.abstractmethod
    def summarize(
        self, collection: metrics.Collection, class_names: Sequence[str], prefix: str
    ) -> dict[str, float]:
        """``{prefix + name: value}`` of metrics merged over a whole split, plus
        ``{prefix}examples``."""

    @abc.abstractmethod
    def predict(self, outputs: Any) -> dict[str, jax.Array]:
        """What a prediction returns for a batch of model outputs."""
