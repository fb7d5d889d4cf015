"""Model selection on the validation split: the best evaluation so far and early stopping.

:class:`Selection` is plain data, saved with every checkpoint (``meta["selection"]``) so that a
resumed run continues its count exactly; the loop feeds it each validation result.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping
from typing import Any

from vision_jax.specs import ConfigError, EarlyStoppingSpec

logger = logging.getLogger(__name__)

# Why a validation left a per-class result out, unless the task says (Task.per_class_absent)
ABSENT = "its class had nothing to score in the validation split"


@dataclasses.dataclass
class Selection:
    """The best value of ``metric`` so far (``mode`` "max" or "min"), its step, and how many
    evaluations since then did not improve on it by more than ``min_delta``."""

    metric: str
    mode: str
    patience: int | None
    min_delta: float
    best_value: float | None = None
    best_step: int | None = None
    bad_evaluations: int = 0
    stopped_at: int | None = None  # the step where early stopping ended training
    # A per-class result (``val/iou/<class>``), which an evaluation leaves out where the class
    # has nothing to score: such an evaluation counts as no improvement, as a NaN does.
    per_class: bool = False

    @classmethod
    def from_spec(
        cls,
        spec: EarlyStoppingSpec,
        headline: str,
        headline_mode: str | None = None,
        per_class_metrics: tuple[str, ...] = (),
    ) -> Selection:
        """The selection ``spec`` asks for; unset, the metric is ``val/<headline>`` and the
        mode ``headline_mode`` for the task's headline (either parameters') if the task gives
        one, else "min" for a loss, else "max". ``per_class_metrics``: the task's results per
        class (``iou`` for ``val/iou/<class>``), whose mode is the metric's, not the class's."""
        if headline_mode not in (None, "min", "max"):
            raise ConfigError(f"A task's headline_mode is 'min' or 'max'; got {headline_mode!r}.")
        metric = spec.metric or f"val/{headline}"
        if "/" not in metric:
            metric = f"val/{metric}"
        name = metric.split("/", 1)[1]
        base, _, of_class = name.partition("/")
        per_class = bool(of_class) and base in per_class_metrics
        default = "min" if (base if per_class else name).endswith("loss") else "max"
        if name == headline and headline_mode is not None:
            default = headline_mode
        mode = spec.mode or default
        return cls(metric, mode, spec.patience, float(spec.min_delta), per_class=per_class)

    def improves(self, value: float) -> bool:
        """Whether ``value`` beats the best so far by more than ``min_delta``."""
        if not math.isfinite(value):
            return False
        if self.best_value is None:
            return True
        gain = value - self.best_value if self.mode == "max" else self.best_value - value
        return gain > self.min_delta

    def update(self, step: int, results: Mapping[str, float], absent: str = ABSENT) -> bool:
        """Records the evaluation ``results`` of ``step``; whether it is the new best.
        ``absent``: why a per-class result may be left out (the task's, for the warning)."""
        if self.metric not in results and not self.per_class:
            valid = ", ".join(sorted(k for k in results if k.startswith("val")))
            raise ConfigError(
                f"early_stopping.metric {self.metric!r} is not an evaluation result; valid: "
                f"{valid}."
            )
        if self.metric not in results:
            logger.warning(
                "No %s at step %d: %s; counted as no improvement.", self.metric, step, absent
            )
        value = float(results.get(self.metric, math.nan))
        if self.improves(value):
            self.best_value, self.best_step, self.bad_evaluations = value, step, 0
            return True
        self.bad_evaluations += 1
        return False

    @property
    def should_stop(self) -> bool:
        """Patience used up since the best; never before a best exists (validations without a
        finite value, a NaN at the first one, say: stopping would leave nothing to keep)."""
        patience_spent = self.patience is not None and self.bad_evaluations >= self.patience
        return patience_spent and self.best_step is not None

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def resumed(self, saved: Mapping[str, Any] | None) -> Selection:
        """This selection with the progress saved in a checkpoint's ``meta["selection"]`` (the
        settings stay this run's own)."""
        if not saved or saved.get("metric") != self.metric or saved.get("mode") != self.mode:
            return self
        keys = ("best_value", "best_step", "bad_evaluations", "stopped_at")
        return dataclasses.replace(self, **{k: saved[k] for k in keys if k in saved})
