"""Tasks: what a model is trained for (classification, semantic segmentation, object
detection), behind one interface (:class:`~vision_jax.tasks.base.Task`); ``config.task.name``
selects one."""

from __future__ import annotations

from typing import Any

from vision_jax.tasks.base import Task
from vision_jax.tasks.classification import Classification
from vision_jax.tasks.detection import Detection
from vision_jax.tasks.segmentation import IGNORE_LABEL, Segmentation

TASKS: dict[str, type[Task]] = {
    "classification": Classification,
    "segmentation": Segmentation,
    "detection": Detection,
}


def create_task(config: Any) -> Task:
    """The task of ``config.task`` (a TrackedConfig or ConfigDict of the whole run)."""
    name = config.task.name
    if name not in TASKS:
        raise ValueError(f"Unknown task.name {name!r}; valid: {', '.join(TASKS)}.")
    return TASKS[name].from_config(config.task, config)


__all__ = [
    "IGNORE_LABEL",
    "TASKS",
    "Classification",
    "Detection",
    "Segmentation",
    "Task",
    "create_task",
]
