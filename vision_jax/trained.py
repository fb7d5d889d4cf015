"""A trained run, loaded for use after training: prediction, reports and export.

``load_trained(workdir)`` rebuilds what the run trained from its record alone (the task and its
settings, the model, the class names and the input it used); its variables (the best step; the
newest of a run without a validation split or cut short before its first; LoRA adapters merged,
frozen parameters put back) are read at their first use. A run that kept an EMA of its
parameters (``config.ema_decay``) gives them with ``ema=True``; by default a run whose model
selection measured them (``early_stopping.metric`` an ``*_ema/`` metric) gives those.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from vision_jax import data as data_lib
from vision_jax import specs
from vision_jax.config import TrackedConfig, saved_with_defaults
from vision_jax.models.registry import REMAT_DEFAULTS
from vision_jax.steps import fetched_one_behind
from vision_jax.weights.files import WeightFormatError
from vision_jax.weights.run_dir import (
    RunRecord,
    check_not_removed,
    latest_step_dir,
    read_record,
    read_variables,
    selects_ema,
    warn_if_unfinished,
)


@dataclasses.dataclass
class Trained:
    """A trained model with everything needed to run it as its evaluation did."""

    record: RunRecord
    spec: specs.RunSpec
    model: nn.Module
    input: data_lib.InputSpec  # the run's input (size, mean, std after its input contract)
    step: int  # the step whose variables these are
    step_dir: str
    ema: bool = False  # the step's EMA parameters instead of its trained ones

    @functools.cached_property
    def variables(self) -> dict[str, Any]:
        """The step's model variables, read at first use."""
        try:
            return read_variables(self.step_dir, ema=self.ema)
        except WeightFormatError:
            check_not_removed(self.step_dir)  # a run training there replaced it since
            raise

    @property
    def task(self) -> Any:
        """The run's task (classification, segmentation or detection)."""
        return self.spec.task

    @property
    def class_names(self) -> list[str]:
        """The run's class names, in label order."""
        return list(self.record.class_names or ())

    def predict_batches(
        self, batches: Iterable[dict[str, np.ndarray]]
    ) -> Iterator[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]]:
        """``(batch, predictions)`` for each preprocessed batch (e.g. of
        :func:`vision_jax.data.eval_batches`), predictions on the host as the task's
        :meth:`~vision_jax.tasks.base.Task.predict_batch` returns them (classification:
        ``probabilities``); padding rows (``batch["mask"] == 0``) are left in."""

        def dispatched() -> Iterator[tuple[dict[str, np.ndarray], dict[str, jax.Array]]]:
            for batch in batches:
                arrays = {k: v for k, v in batch.items() if np.asarray(v).dtype.kind in "biuf"}
                yield batch, self._predict_batch(self.variables, arrays)

        return fetched_one_behind(dispatched())

    @functools.cached_property
    def _predict_batch(self) -> Any:
        """The task's :meth:`~vision_jax.tasks.base.Task.predict_batch`, jitted."""
        model, task = self.model, self.task

        def predict(variables: Any, batch: dict[str, jax.Array]) -> dict:
            return task.predict_batch(model.apply(variables, batch["image"], train=False), batch)

        return jax.jit(predict)


def jitted_predict(model: nn.Module, task: Any, image_size: int) -> Any:
    """``predict(variables, images, keys=None)``, jitted: the task's
    :meth:`~vision_jax.tasks.base.Task.predict` of the model's outputs (only ``keys``, a static
    tuple, when given: less to fetch from the device)."""

    def predict(variables: Any, images: jax.Array, keys: tuple[str, ...] | None = None) -> dict:
        found = task.predict(model.apply(variables, images, train=False), (image_size,) * 2)
        return found if keys is None else {k: found[k] for k in keys}

    return jax.jit(predict, static_argnames="keys")


def load_trained(
    path: str | os.PathLike, *, which: str = "best", ema: bool | None = None
) -> Trained:
    """The run in ``path`` (a workdir, its checkpoints folder or a step folder): ``which`` is
    ``"best"`` (the best step; the newest of a run without a validation split or cut short
    before its first; an error for a run whose validations gave no best) or ``"latest"``; ``ema``:
    the step's EMA parameters (True) or its trained ones (False); None: the ones the run's
    model selection measured (EMA when ``early_stopping.metric`` is an ``*_ema/`` metric)."""
    from vision_jax.run import task_model  # run imports the training stack

    step_dir = latest_step_dir(path, which)
    record = read_record(step_dir)
    warn_if_unfinished(step_dir)  # (the newest step of a run stopped early, or still training)
    try:
        with specs.saved_config():
            spec = specs.run_spec(TrackedConfig(saved_with_defaults(record.config)))
            input_spec = dataclasses.replace(
                spec.input, image_size=record.image_size, mean=record.mean, std=record.std,
                interpolation=record.interpolation or spec.input.interpolation,
                crop_mode=record.crop_mode or spec.input.crop_mode,
            )  # fmt: skip
    except ValueError as e:  # its config cannot be read today (a task module not found, say)
        raise WeightFormatError(f"Cannot read the run in {step_dir}: {e}") from e
    # remat shapes only a backward pass, which no reader runs (and an earlier version's run may
    # hold a rule for blocks that never run, refused since)
    overrides = {k: v for k, v in spec.model_overrides.items() if k not in REMAT_DEFAULTS}
    spec = dataclasses.replace(spec, model_overrides=overrides)
    model = task_model(spec, len(record.class_names or ()))
    ema = selects_ema(record.config) if ema is None else ema
    step = int(step_dir.name)
    return Trained(record, spec, model, input_spec, step, str(step_dir), ema=ema)


def load_split(
    trained: Trained,
    split: str,
    *,
    data: specs.DataSpec | None = None,
    arrays: Mapping[str, Any] | None = None,
) -> data_lib.Source:
    """The split ``split`` of ``trained``'s data (``data``: its ``spec.data``, another root
    say), labelled as the run's outputs are: a CSV split by the run's classes (not those of
    every CSV file now beside it), a split lacking some of the run's classes by name
    (:func:`~vision_jax.data.as_classes`); a split whose classes or target column are not the
    run's is refused. What evaluation, the report and export read."""
    given = trained.spec.data if data is None else data
    data = _trained_version(trained, given)
    try:
        return _load_split(trained, split, data, arrays)
    except data_lib.DataError as e:
        if data.name == given.name:
            raise
        raise data_lib.DataError(
            f"{e} (The run trained on tfds dataset {data.name}, which is read where data.name "
            "names no version: set data.name to read another.)"
        ) from e


def _load_split(
    trained: Trained, split: str, data: specs.DataSpec, arrays: Mapping[str, Any] | None
) -> data_lib.Source:
    """:func:`load_split` of ``data``."""
    task = trained.task
    column = data_lib.is_column_target(task.target)
    if data.classes is not None and task.target == "label" and trained.class_names:
        return _check_classes(trained, _selected_by_name(trained, data, split, arrays), split)
    if data.source == "csv" and data.class_names is None and trained.class_names and not column:
        # The run's classes, not those of every CSV file now beside the split's.
        data = dataclasses.replace(data, class_names=tuple(trained.class_names))
    source = data_lib.load_source(data, split, arrays=arrays, target=task.target)
    if column:
        _check_column(trained, source, split)
        names = trained.class_names
        if data.source == "csv" and data.class_names is None and names != source.class_names:
            # Its columns <target>/<name> matched to the run's values by name (or refused)
            data = dataclasses.replace(data, class_names=tuple(names))
            source = data_lib.load_source(data, split, arrays=arrays, target=task.target)
    return _check_classes(trained, source, split)


def _trained_version(trained: Trained, data: specs.DataSpec) -> specs.DataSpec:
    """``data`` reading the tfds dataset version that the run trained on (its record's
    ``train_data``) where ``data.name`` names that dataset without a version: tfds reads the
    newest prepared, and one prepared since would be read instead."""
    dataset = (trained.record.train_data or {}).get("dataset")
    if data.source != "tfds" or not dataset or not data.name or ":" in data.name:
        return data
    pinned = data_lib.pinned_tfds_name(dataset)
    named = pinned.partition(":")[0]
    if data.name != named and not named.startswith(f"{data.name}/"):  # another dataset
        return data
    return dataclasses.replace(data, name=pinned)


def _selected_by_name(
    trained: Trained, data: specs.DataSpec, split: str, arrays: Mapping[str, Any] | None
) -> data_lib.Source:
    """The split of a run that set ``data.classes``: its examples of the run's classes, kept by
    name (the run's class names are those it selected), so that neither the train split on
    disk nor the positions into its classes are needed (a copy holding only this split)."""
    source = data_lib.load_source(
        dataclasses.replace(data, classes=None), split, arrays=arrays, target="label"
    )
    selected = data_lib.select_by_name(source, trained.class_names)
    if not selected.num_examples:
        raise data_lib.DataError(
            f"The split {split!r} holds no examples of the run's classes "
            f"{', '.join(trained.class_names[:8])}{', ...' if trained.class_names[8:] else ''}."
        )
    return selected


def _check_classes(trained: Trained, source: data_lib.Source, split: str) -> data_lib.Source:
    """``source``, labelled by the run's classes where it lacks some of them (by name,
    :func:`~vision_jax.data.as_classes`); refuses a split whose classes are not the run's, in
    the run's order (its labels would mean other classes than the model's outputs)."""
    if trained.class_names and list(source.class_names) != trained.class_names:
        if (mapped := data_lib.as_classes(source, trained.class_names, split)) is not None:
            return mapped
        raise data_lib.DataError(
            f"The split {split!r} has the classes {', '.join(source.class_names[:8])}"
            f"{', ...' if len(source.class_names) > 8 else ''}; the run was trained on "
            f"{', '.join(trained.class_names[:8])}"
            f"{', ...' if len(trained.class_names) > 8 else ''} (these, in this order)."
        )
    return source


def _check_column(trained: Trained, source: data_lib.Source, split: str) -> None:
    """Refuses a split whose target column of one's own differs in shape or dtype from the one
    the run trained on (as its record says; older runs: only the number of values, that of
    its class names)."""
    shape, dtype = source.column_spec
    record, target = trained.record, source.target
    held = f"{np.dtype(dtype).name} {tuple(shape)}"
    if record.target_dtype is not None:
        trained_on = f"{record.target_dtype} {tuple(record.target_shape)}"
        if held != trained_on:
            raise data_lib.DataError(
                f"The split {split!r} holds {target!r} values of {held} per example; the run "
                f"trained on {trained_on}."
            )
    elif trained.class_names and math.prod(shape) != len(trained.class_names):
        raise data_lib.DataError(
            f"The split {split!r} holds {target!r} values of shape {tuple(shape)} per example; "
            f"the run trained on {len(trained.class_names)} values per example."
        )
