"""Optimizers, schedules and parameter control from ``config.optimizer`` and ``config.schedule``.

Every per-parameter choice goes through the one regex helper of :mod:`vision_jax.masks`:

* **what trains**: ``optimizer.trainable`` presets (``all``, ``head`` = linear probe,
  ``last:N`` = head + last N blocks/stages, ``bitfit`` = biases + norms + head) and
  ``optimizer.frozen_params``. Frozen parameters are split off the train state
  (:func:`partition`): they get no gradient, no update and no optimizer state.
* **how fast**: ``optimizer.lr_mults`` ((regex, multiplier) pairs) times layer-wise decay
  ``optimizer.layer_decay`` (ViT blocks, ResNet stages): ``decay ** (last group - group)``.
* **what decays**: ``optimizer.decay_params`` (default: kernels only; never norms, biases,
  position embeddings or the class token). Weight decay is decoupled with AdamW semantics:
  each step subtracts ``lr_t * weight_decay * param``. big_vision's ``wd`` is not multiplied by
  the base learning rate (only by the schedule's relative value), so big_vision ``wd`` equals
  ``learning_rate * weight_decay`` here.
"""

from __future__ import annotations

import logging
from typing import Any

import jax
import jax.numpy as jnp
import optax

from vision_jax.masks import rules_table, tree_map_by_rules, tree_mask
from vision_jax.models.precision import DTYPES
from vision_jax.models.registry import backbone_of, family
from vision_jax.models.task_model import head_pattern
from vision_jax.specs import OptimizerSpec, ScheduleSpec
from vision_jax.trees import count_params, flatten_dict, tree_bytes

DEFAULT_DECAY_PARAMS = r"(.*/)?kernel"
TRAINABLE_PRESETS = ("all", "head", "last:N", "bitfit")


# --------------------------------------------------------------------------------------------
# schedules


def _duration(spec: ScheduleSpec, name: str, total: int, steps_per_epoch: int) -> int:
    """``{name}_steps``, ``{name}_epochs`` or ``{name}_fraction`` (of training) as steps."""
    given = {
        unit: getattr(spec, f"{name}_{unit}")
        for unit in ("steps", "epochs", "fraction")
        if getattr(spec, f"{name}_{unit}") is not None
    }
    if len(given) > 1:
        raise ValueError(f"Set at most one of schedule.{name}_{{steps,epochs,fraction}}: {given}.")
    if not given:
        return 0
    unit, value = next(iter(given.items()))
    steps = {
        "steps": lambda v: int(v),
        "epochs": lambda v: round(v * steps_per_epoch),
        "fraction": lambda v: round(v * total),
    }[unit](value)
    if not 0 <= steps <= total:
        raise ValueError(f"schedule.{name}_{unit}={value} is {steps} steps; training has {total}.")
    return steps


def build_schedule(
    schedule: ScheduleSpec, *, base_lr: float, total_steps: int, steps_per_epoch: int
) -> optax.Schedule:
    """Linear warmup from 0, then the ``decay`` shape, then an optional linear cooldown to 0.

    ``decay``: ``cosine`` and ``linear`` go to 0 at the end of training, ``constant`` stays,
    ``rsqrt`` is ``1 / sqrt(1 + t / rsqrt_timescale)`` (t counted after warmup), ``step``
    multiplies by ``step_factor`` at each of ``step_boundaries`` (fractions of training).
    """
    warmup = _duration(schedule, "warmup", total_steps, steps_per_epoch)
    cooldown = _duration(schedule, "cooldown", total_steps, steps_per_epoch)
    if warmup + cooldown > total_steps:
        raise ValueError(f"Warmup {warmup} + cooldown {cooldown} > {total_steps} training steps.")
    kind = schedule.decay
    timescale = float(schedule.rsqrt_timescale)
    boundaries = tuple(float(b) for b in schedule.step_boundaries)
    factor = float(schedule.step_factor)
    decay_steps = max(total_steps - warmup, 1)
    step_at = [round(b * total_steps) for b in boundaries]

    def fn(step):
        t = jnp.asarray(step, jnp.float32)
        frac = jnp.clip((t - warmup) / decay_steps, 0.0, 1.0)
        shape = {
            "cosine": lambda: 0.5 * (1.0 + jnp.cos(jnp.pi * frac)),
            "linear": lambda: 1.0 - frac,
            "constant": lambda: jnp.ones_like(t),
            "rsqrt": lambda: jax.lax.rsqrt(1.0 + jnp.maximum(t - warmup, 0.0) / timescale),
            "step": lambda: factor ** sum((t >= s).astype(jnp.float32) for s in step_at),
        }[kind]()
        if warmup:
            shape = shape * jnp.minimum(t / warmup, 1.0)
        if cooldown:
            shape = shape * jnp.clip((total_steps - t) / cooldown, 0.0, 1.0)
        return base_lr * shape

    return fn


# --------------------------------------------------------------------------------------------
# which parameters train, and how fast


def layer_groups(model: Any) -> tuple[list[tuple[str, int]], int]:
    """Rules mapping parameter paths to depth groups, and the number of groups (the model
    family's ``layer_groups``; a task head falls in the last group with the final norm)."""
    return family(model).layer_groups(backbone_of(model))


def trainable_rules(preset: str, model: Any) -> list[tuple[str, bool]]:
    """(regex, trainable) rules of a ``optimizer.trainable`` preset."""
    if preset == "all":
        return [(".*", True)]
    if preset == "none":  # LoRA without the head: only the adapters train
        return [(".*", False)]
    if preset == "head":
        return [(head_pattern(model), True)]
    if preset == "bitfit":
        norms = family(model).norm_modules
        return [(rf"{head_pattern(model)}|(.*/)?bias|(.*/)?({norms})/scale", True)]
    if preset.startswith("last:") and preset[5:].isdigit():
        rules, n_groups = layer_groups(model)
        keep = int(preset[5:])
        if not 0 <= keep <= n_groups - 2:
            raise ValueError(f"trainable={preset!r}: the model has {n_groups - 2} blocks.")
        return [(regex, group >= n_groups - 1 - keep) for regex, group in rules]
    raise ValueError(
        f"Unknown optimizer.trainable {preset!r}; valid: {', '.join(TRAINABLE_PRESETS)}."
    )


def trainable_mask(
    params: Any, model: Any, *, preset: str, frozen: str | None, extra: str | None = None
) -> Any:
    """Boolean tree: True where a parameter trains. ``frozen`` regex wins over the preset;
    ``extra`` (LoRA adapters) trains regardless."""
    mask = tree_map_by_rules(trainable_rules(preset, model), params, default=False)
    if frozen:
        mask = jax.tree.map(lambda m, f: m and not f, mask, tree_mask(frozen, params))
    if extra:
        mask = jax.tree.map(lambda m, e: m or e, mask, tree_mask(extra, params))
    if not any(jax.tree.leaves(mask)):
        raise ValueError("No parameter is trainable: check optimizer.trainable / frozen_params.")
    return mask


def lr_multipliers(
    params: Any, model: Any, *, rules: Any = None, layer_decay: float | None = None
) -> Any:
    """Float tree of per-parameter learning-rate multipliers (1.0 where nothing applies)."""
    mults = tree_map_by_rules(list(rules or ()), params, what="lr_mults", default=1.0)
    if layer_decay is not None:
        if not 0 < layer_decay <= 1:
            raise ValueError(f"optimizer.layer_decay must lie in (0, 1], got {layer_decay}.")
        group_rules, n_groups = layer_groups(model)
        groups = tree_map_by_rules(group_rules, params, what="layer groups")
        mults = jax.tree.map(
            lambda m, g: float(m) * layer_decay ** (n_groups - 1 - g), mults, groups
        )
    return jax.tree.map(float, mults)


def scale_by_tree(mults: Any) -> optax.GradientTransformation:
    """Multiplies each update by its constant multiplier (stateless)."""

    def update(updates, state, params=None):
        del params
        return jax.tree.map(lambda u, m: u * jnp.asarray(m, u.dtype), updates, mults), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


# --------------------------------------------------------------------------------------------
# the optimizer


def build_optimizer(
    opt: OptimizerSpec,
    schedule_spec: ScheduleSpec,
    params: Any,
    model: Any,
    *,
    total_steps: int,
    steps_per_epoch: int,
    log: bool = True,
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The optax transformation for the *trainable* ``params`` and its learning-rate schedule.

    ``opt.name`` is ``sgd`` (momentum, nesterov; L2 weight decay added to the gradient) or
    ``adamw`` (b1, b2, eps; decoupled weight decay). ``mu_dtype`` stores first moments (or the
    SGD momentum) in e.g. bfloat16. Gradients are clipped by global norm first.
    """
    schedule = build_schedule(
        schedule_spec,
        base_lr=float(opt.learning_rate),
        total_steps=total_steps,
        steps_per_epoch=steps_per_epoch,
    )
    wd = float(opt.weight_decay or 0.0)
    decay_params = opt.decay_params or DEFAULT_DECAY_PARAMS
    decay_mask = tree_mask(decay_params, params)
    mu_dtype = opt.mu_dtype
    if mu_dtype is not None and mu_dtype not in DTYPES:
        raise ValueError(f"Unknown optimizer.mu_dtype {mu_dtype!r}; valid: {', '.join(DTYPES)}.")
    mu_dtype = DTYPES.get(mu_dtype)
    mults = lr_multipliers(params, model, rules=opt.lr_mults, layer_decay=opt.layer_decay)
    parts = []
    if opt.grad_clip_norm:
        parts.append(optax.clip_by_global_norm(float(opt.grad_clip_norm)))
    name = opt.name
    if name == "sgd":
        if wd:
            parts.append(optax.add_decayed_weights(wd, mask=decay_mask))
        parts.append(
            optax.sgd(
                schedule,
                momentum=opt.momentum,
                nesterov=opt.nesterov,
                accumulator_dtype=mu_dtype,
            )
        )
    else:  # adamw (the spec allows no other)
        parts.append(
            optax.adamw(
                schedule,
                b1=opt.b1,
                b2=opt.b2,
                eps=opt.eps,
                weight_decay=wd,
                mask=decay_mask,
                mu_dtype=mu_dtype,
            )
        )
    if any(m != 1.0 for m in jax.tree.leaves(mults)):
        parts.append(scale_by_tree(mults))
    if log and jax.process_index() == 0:
        logging.info("Weight decay %s on:\n%s", wd, rules_table([(decay_params, True)], params))
        if opt.lr_mults or opt.layer_decay is not None:
            logging.info("Learning-rate multipliers:\n%s", _value_table(mults))
    return optax.chain(*parts), schedule


def _value_table(tree: Any) -> str:
    rows = [f"  {path}: {value:g}" for path, value in flatten_dict(tree).items()]
    return "\n".join(rows)


# --------------------------------------------------------------------------------------------
# memory report


def memory_report(trainable: Any, frozen: Any, opt_state: Any) -> dict[str, int]:
    """Parameter counts and bytes of the trainable and frozen parameters and optimizer state."""
    return {
        "trainable_params": count_params(trainable),
        "frozen_params": count_params(frozen),
        "trainable_bytes": tree_bytes(trainable),
        "frozen_bytes": tree_bytes(frozen),
        "optimizer_state_bytes": tree_bytes(opt_state),
    }
