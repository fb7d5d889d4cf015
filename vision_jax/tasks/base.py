"""The task interface: what the model's outputs mean, how they are trained and evaluated.

A task owns its head (it builds the model on a backbone), the batch target it needs from the
input pipeline (``target``: the key the data provides, ``label``, ``label_map``, ``boxes``, or
a per-example column of one's own such as ``targets``), its loss,
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

from vision_jax.models import create_model
from vision_jax.models.pyramid import check_coarser
from vision_jax.models.registry import family, stage_taps
from vision_jax.selection import ABSENT
from vision_jax.specs import ConfigError, as_tuples, takes_none

Batch = Mapping[str, jax.Array]
TOP_LEVEL = frozenset({"loss", "label_smoothing"})  # task settings kept at the config's root


def class_key(name: str) -> str:
    """A class name as its per-class results name it (``iou/<key>``): a '/' becomes '_' (it
    separates a result name's parts)."""
    return name.replace("/", "_")


def feature_backbone(
    model_name: str, taps: Sequence[int] | None, *, last_only: bool = False, **model_kwargs: Any
) -> nn.Module:
    """The registered backbone ``model_name`` returning feature maps at ``taps``. By default
    (``taps`` None): its last map when ``last_only`` or when all its maps share one stride (a
    ViT's blocks: its last block, for the simple pyramid), else every stage (a CNN's pyramid)."""
    if taps is None:
        plain = create_model(model_name, num_classes=0)
        available = family(plain).feature_taps(plain)
        single = last_only or len({t.stride for t in available}) == 1
        taps = (-1,) if single else tuple(range(len(available)))
    return create_model(model_name, num_classes=0, feature_taps=tuple(taps), **model_kwargs)


def pyramid_strides(backbone: nn.Module, model_name: str, head: str) -> tuple[int, ...] | None:
    """The strides of the maps ``backbone``'s ``feature_taps`` feed to the pyramid of ``head``,
    as its family declares them (None for a backbone of no registered family: the head reads
    them from the maps' sizes, :func:`~vision_jax.models.pyramid.feature_strides`). Refuses
    maps not each at a coarser stride than the one before
    (:func:`~vision_jax.models.pyramid.check_coarser`)."""
    taps = getattr(backbone, "feature_taps", None)
    if not taps:
        return None
    try:
        fam = family(backbone)
    except ValueError:  # not a registered family: the head's feature_strides refuses at init
        return None
    declared = fam.feature_taps(backbone)
    indices = stage_taps(taps, len(declared), 0, owner=model_name, family=fam.name)
    strides = tuple(declared[i].stride for i in indices)
    check_coarser(strides, f"feature_taps {tuple(taps)} of {model_name}", taps, f"the {head}")
    return strides


class Task(abc.ABC):
    """One task: subclasses are frozen dataclasses whose fields are the task's settings."""

    name: ClassVar[str]
    # the batch key holding the targets: "label", "label_map", "boxes", or the name of a column
    # of one's own data (numbers of a fixed shape per example: :func:`vision_jax.data.load_source`)
    target: ClassVar[str]
    headline: ClassVar[str]  # the metric that sums up an evaluation (``eval/<headline>``)
    # "min" where a lower headline is better (an error), "max" where higher; None: "min" for a
    # name ending in "loss", else "max" (what model selection keeps)
    headline_mode: ClassVar[str | None] = None
    train_metrics: ClassVar[type[metrics.Collection]]
    # ``predict``'s outputs an evaluation returns, each with the batch axis first (a report's
    # figures are made of them); none: the eval step does not call ``predict``.
    per_example: ClassVar[tuple[str, ...]] = ()
    # The names :meth:`summarize` returns (without the prefix), and those it returns per class
    # as ``<name>/<class>`` (where defined), so that a run checks ``early_stopping.metric`` and
    # the headline before it trains; None: not declared (checked at the first evaluation).
    metric_names: ClassVar[tuple[str, ...] | None] = None
    per_class_metrics: ClassVar[tuple[str, ...]] = ()
    # Why a validation may leave a per-class result out (the model selection's warning)
    per_class_absent: ClassVar[str] = ABSENT
    # Whether :meth:`train_loss` reads the batch's ``soft_label`` (the label distributions
    # mixup and cutmix make of the labels of the images they mix): a run of a task that does
    # not is refused mixing (its images would be mixed, its targets not).
    reads_soft_label: ClassVar[bool] = False

    @classmethod
    def declared_metrics(cls) -> tuple[tuple[str, ...], tuple[str, ...]] | None:
        """(:attr:`metric_names`, :attr:`per_class_metrics`) where they describe the results
        this class reports: declared by the class that defines its :meth:`summarize` and
        :meth:`eval_metrics`, or by a subclass of both (inherited too); None where not
        declared, or declared above a subclass's summarize or eval_metrics of its own (it may
        report other names)."""
        if cls.metric_names is None:
            return None
        declaring = lambda name: next(c for c in cls.__mro__ if name in c.__dict__)  # noqa: E731
        names = declaring("metric_names")
        if not all(issubclass(names, declaring(m)) for m in ("summarize", "eval_metrics")):
            return None
        return cls.metric_names, cls.per_class_metrics

    @classmethod
    def from_config(cls, section: Any, config: Any) -> Task:
        """The task from ``config.task`` and the top-level ``loss`` / ``label_smoothing``: an
        unset key, or a None (the library's task keys are None placeholders), takes the field's
        default, as in every config section; a field without a default needs a value. Keys the
        task does not use stay unread, so setting them is an error."""
        kwargs = {}
        for f in [f for f in dataclasses.fields(cls) if f.init]:  # (not __post_init__'s)
            where, key = (config, f.name) if f.name in TOP_LEVEL else (section, f"task.{f.name}")
            value, missing = where.get(f.name), dataclasses.MISSING
            if value is None and (f.default is not missing or f.default_factory is not missing):
                continue
            if value is None and not takes_none(f):
                raise ConfigError(
                    f"{key} needs a value ({cls.__name__}.{f.name} has no default): set "
                    f"config.{key} (c.{key} = ... in the config file)."
                )
            kwargs[f.name] = as_tuples(value)
        return cls(**kwargs)

    def unmeasurable(self, name: str, source: Any) -> str | None:
        """Why the split ``source`` can never give the result ``name`` (without its prefix),
        as its ground truth tells before training; None where it may."""
        return None

    def check_train_split(self, source: Any, image_size: int) -> None:
        """What the task can tell of its training split ``source`` before the steps compile, at
        ``image_size`` inputs: a DataError, or warnings; nothing by default."""
        del source, image_size

    def batch_args(self) -> dict[str, Any]:
        """Keyword arguments the task adds to the input pipeline's batching (e.g. detection's
        ``max_boxes``)."""
        return {}

    @abc.abstractmethod
    def build_model(self, model_name: str, num_classes: int, **model_kwargs: Any) -> nn.Module:
        """The model for this task on the registered backbone ``model_name``."""

    def loss_normalisers(self, batch: Batch) -> dict[str, jax.Array]:
        """The batch's loss denominators that depend on its targets alone (valid pixels,
        positive locations): gradient accumulation passes the whole batch's (divided by the
        number of micro-batches) to :meth:`train_loss` of each micro-batch, so that the
        update is the whole batch's. Empty where the loss is a mean over examples."""
        return {}

    @abc.abstractmethod
    def train_loss(
        self, outputs: Any, batch: Batch, normalisers: dict[str, jax.Array] | None = None
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """(training loss, the other outputs of :attr:`train_metrics` except ``loss`` and
        ``grad_norm``); the loss's denominators are ``normalisers`` when given, else this
        batch's :meth:`loss_normalisers`."""

    @abc.abstractmethod
    def eval_metrics(self, outputs: Any, batch: Batch) -> metrics.Collection:
        """Metrics of one padded eval batch (``batch["mask"] == 0`` rows count for nothing)."""

    def evaluate_batch(
        self, outputs: Any, batch: Batch
    ) -> tuple[metrics.Collection, dict[str, jax.Array]]:
        """:meth:`eval_metrics` of the batch and its predictions per example (the
        :attr:`per_example` outputs of :meth:`predict`; padding rows included)."""
        if not self.per_example:
            return self.eval_metrics(outputs, batch), {}
        found = self.predict_batch(outputs, batch)
        missing = [k for k in self.per_example if k not in found]
        if missing:
            raise ValueError(
                f"{type(self).__name__}.per_example names {missing}, which its predict does not "
                f"return (it returns {sorted(found)})."
            )
        return self.eval_metrics(outputs, batch), {k: found[k] for k in self.per_example}

    def summarize(
        self, collection: metrics.Collection, source: Any, prefix: str
    ) -> dict[str, float]:
        """``{prefix + name: value}`` of metrics merged over the whole split ``source`` (a
        :class:`vision_jax.data.Source`: its class names, and ground truth where the metric
        needs it), plus ``{prefix}examples``. By default each metric of the collection as a
        number, and the examples its first ``Average`` counted: a task whose metrics are not
        numbers, or not one value per example (per pixel, say), summarizes them itself."""
        averages = [m for m in vars(collection).values() if isinstance(m, metrics.Average)]
        if not averages:
            raise TypeError(
                f"{type(self).__name__}'s eval_metrics has no Average metric for Task.summarize "
                "to count the examples with: give the task a summarize of its own."
            )
        out = {f"{prefix}{k}": float(v) for k, v in collection.compute().items()}
        out[f"{prefix}examples"] = float(averages[0].count)
        return out

    @abc.abstractmethod
    def predict(self, outputs: Any, image_hw: tuple[int, int]) -> dict[str, jax.Array]:
        """What a prediction returns for a batch of model outputs on ``image_hw`` inputs."""

    def predict_batch(self, outputs: Any, batch: Batch) -> dict[str, jax.Array]:
        """:meth:`predict` of the model's outputs on a preprocessed ``batch``: what its
        evaluation predicts (detection clips each image's boxes to its part of the input)."""
        return self.predict(outputs, batch["image"].shape[1:3])
