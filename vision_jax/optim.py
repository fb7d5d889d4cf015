"""Optimizers and learning-rate schedules from ``config.optimizer`` and ``config.schedule``."""

from __future__ import annotations

from typing import Any

import jax
import optax

from vision_jax.config import TrackedConfig
from vision_jax.masks import tree_mask

# By default weight decay touches kernels only: never norms, biases, position embeddings, cls.
DEFAULT_DECAY_PARAMS = r"(.*/)?kernel"


def build_schedule(
    schedule: TrackedConfig, *, base_lr: float, total_steps: int, steps_per_epoch: int
) -> optax.Schedule:
    """Linear warmup from 0, then ``cosine``, ``linear`` (both to 0) or ``constant`` decay."""
    warmup_steps = schedule.get("warmup_steps")
    warmup_epochs = schedule.get("warmup_epochs")
    if warmup_steps is not None and warmup_epochs is not None:
        raise ValueError("Set schedule.warmup_steps or schedule.warmup_epochs, not both.")
    if warmup_epochs is not None:
        warmup_steps = round(warmup_epochs * steps_per_epoch)
    warmup_steps = int(warmup_steps or 0)
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"Warmup of {warmup_steps} steps does not fit in {total_steps} steps.")
    decay_steps = max(total_steps - warmup_steps, 1)
    kind = schedule.decay
    if kind == "cosine":
        decay = optax.cosine_decay_schedule(base_lr, decay_steps)
    elif kind == "linear":
        decay = optax.linear_schedule(base_lr, 0.0, decay_steps)
    elif kind == "constant":
        decay = optax.constant_schedule(base_lr)
    else:
        raise ValueError(f"Unknown schedule.decay {kind!r}; valid: cosine, linear, constant.")
    if warmup_steps == 0:
        return decay
    warmup = optax.linear_schedule(0.0, base_lr, warmup_steps)
    return optax.join_schedules([warmup, decay], [warmup_steps])


def build_optimizer(
    config: TrackedConfig, params: Any, *, total_steps: int, steps_per_epoch: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The optax transformation described by ``config.optimizer`` and its learning-rate schedule.

    ``optimizer.name`` is ``sgd`` (momentum, nesterov; weight decay added to the gradient) or
    ``adamw`` (b1, b2, eps; decoupled weight decay scaled by the learning rate, as in optax).
    ``optimizer.decay_params`` is the regex of parameters that get weight decay.
    """
    opt = config.optimizer
    schedule = build_schedule(
        config.schedule,
        base_lr=float(opt.learning_rate),
        total_steps=total_steps,
        steps_per_epoch=steps_per_epoch,
    )
    wd = float(opt.get("weight_decay") or 0.0)
    decay_mask = tree_mask(opt.get("decay_params") or DEFAULT_DECAY_PARAMS, params)
    parts = []
    if opt.get("grad_clip_norm"):
        parts.append(optax.clip_by_global_norm(float(opt.grad_clip_norm)))
    name = opt.name
    if name == "sgd":
        if wd:
            parts.append(optax.add_decayed_weights(wd, mask=decay_mask))
        parts.append(
            optax.sgd(
                schedule,
                momentum=_default(opt.get("momentum"), 0.9),
                nesterov=bool(opt.get("nesterov")),
            )
        )
    elif name == "adamw":
        parts.append(
            optax.adamw(
                schedule,
                b1=_default(opt.get("b1"), 0.9),
                b2=_default(opt.get("b2"), 0.999),
                eps=_default(opt.get("eps"), 1e-8),
                weight_decay=wd,
                mask=decay_mask,
            )
        )
    else:
        raise ValueError(f"Unknown optimizer.name {name!r}; valid: sgd, adamw.")
    return optax.chain(*parts), schedule


def _default(value: Any, default: Any) -> Any:
    return default if value is None else value


def count_params(tree: Any) -> int:
    """Number of scalars in a pytree of arrays."""
    return sum(int(x.size) for x in jax.tree_util.tree_leaves(tree))
