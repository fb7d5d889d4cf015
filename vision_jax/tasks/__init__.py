"""Tasks: what a model is trained for (classification, semantic segmentation, object
detection), behind one interface (:class:`~vision_jax.tasks.base.Task`); ``config.task.name``
selects one."""

from __future__ import annotations

from typing import Any

from vision_jax.specs import check_registered_again, import_own_module
from vision_jax.tasks.base import Task
from vision_jax.tasks.classification import Classification
from vision_jax.tasks.detection import Detection
from vision_jax.tasks.segmentation import IGNORE_LABEL, Segmentation

TASKS: dict[str, type[Task]] = {
    "classification": Classification,
    "segmentation": Segmentation,
    "detection": Detection,
}
_LIBRARY_TASKS = dict(TASKS)


def library_kind(task: Task) -> str | None:
    """The library's task that ``task`` is or subclasses ("classification", "segmentation" or
    "detection"), or None (a task of one's own written from the base class): the report,
    predict and export treat a subclass as its library task."""
    return next((n for n, c in _LIBRARY_TASKS.items() if isinstance(task, c)), None)


def register_task(cls: type[Task]) -> type[Task]:
    """Registers a task class of one's own under its ``name`` (usable as a decorator); a
    config selects it with ``task.name``, and ``task.module`` names the module that registers
    it, so that the training command and, from the saved config, report, predict and export
    import it."""
    check_registered_again("Task", cls.name, TASKS.get(cls.name), cls, _LIBRARY_TASKS)
    TASKS[cls.name] = cls
    return cls


def create_task(config: Any) -> Task:
    """The task of ``config.task`` (a TrackedConfig or ConfigDict of the whole run); for a
    name not registered yet, ``task.module`` is imported first (it registers the task)."""
    name, module = config.task.name, config.task.get("module")
    hint = import_own_module("task", name, module, _LIBRARY_TASKS, lambda: TASKS)
    if hint is not None:
        raise ValueError(f"Unknown task.name {name!r} ({hint}); valid: {', '.join(TASKS)}.")
    return TASKS[name].from_config(config.task, config)


__all__ = [
    "IGNORE_LABEL",
    "TASKS",
    "Classification",
    "Detection",
    "Segmentation",
    "Task",
    "create_task",
    "library_kind",
    "register_task",
]
