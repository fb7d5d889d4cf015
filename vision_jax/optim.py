"""Optimizers, schedules and parameter control from ``config.optimizer`` and ``config.schedule``.

Every per-parameter choice goes through the one regex helper of :mod:`vision_jax.masks`:

* **what trains**: ``optimizer.trainable`` presets (``all``, ``head`` = linear probe,
  ``last:N`` = head + last N blocks/stages, ``bitfit`` = biases + norms + head) and
  ``optimizer.frozen_params``. Frozen parameters are split off the train state
  (:func:`partition`): they get no gradient, no update and no optimizer state.
* **how fast**: ``optimizer.lr_mults`` ((regex, multiplier) pairs) times layer-wise decay
  ``optimizer.layer_decay`` (ViT blocks, ResNet stages): ``decay ** (last group - group)``.
* **what decays**: ``optimizer.decay_params`` (default: kernels only; never norms, biases,
  position embeddings or the class token). With AdamW weight decay is decoupled: each step
  subtracts ``lr_t * weight_decay * param``. big_vision's ``wd`` is not multiplied by the base
  learning rate (only by the schedule's relative value), so big_vision ``wd`` equals
  ``learning_rate * weight_decay`` here. With SGD it is L2, added to the gradient before
  momentum (``torch.optim.SGD``'s and timm's). Learning-rate multipliers scale the decay with
  the update (timm's and BEiT's parameter groups; big_vision keeps ``wd_mults`` apart).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from vision_jax.masks import check_multiplier_rules, rules_table, tree_map_by_rules, tree_mask
from vision_jax.models.precision import DTYPES
from vision_jax.models.registry import backbone_of, family, stage_taps
from vision_jax.models.task_model import head_pattern
from vision_jax.specs import OptimizerSpec, ScheduleSpec
from vision_jax.trees import count_params, flatten_dict, tree_bytes

logger = logging.getLogger(__name__)

DEFAULT_DECAY_PARAMS = r"(.*/)?kernel"
TRAINABLE_PRESETS = ("all", "head", "last:N", "bitfit")


# --------------------------------------------------------------------------------------------
# schedules


def schedule_numbers(
    schedule: ScheduleSpec, *, base_lr: float, total_steps: int, steps_per_epoch: int | None
) -> dict[str, np.ndarray]:
    """The numbers :func:`schedule_value` reads (float32 scalars; ``step_at``: the steps of the
    ``step`` decay's boundaries), checked against the length of training."""
    warmup, cooldown = schedule.lengths(total_steps, steps_per_epoch)
    numbers = {
        "learning_rate": base_lr, "warmup_steps": warmup, "cooldown_steps": cooldown,
        "total_steps": total_steps,
    }  # fmt: skip
    if schedule.decay in ("cosine", "linear"):
        numbers["end_factor"] = schedule.end_factor
    if schedule.decay == "rsqrt":
        numbers["rsqrt_timescale"] = schedule.rsqrt_timescale
    if schedule.decay == "step":
        numbers["step_factor"] = schedule.step_factor
        at = lambda fraction: math.floor(float(fraction) * total_steps + 0.5)  # half up
        numbers["step_at"] = [at(b) for b in schedule.step_boundaries]
    return {k: np.asarray(v, np.float32) for k, v in numbers.items()}


def schedule_value(decay: str, numbers: Mapping[str, Any], step: Any) -> jax.Array:
    """The learning rate at ``step``: linear warmup from 0, then the ``decay`` shape, then an
    optional linear cooldown to 0. ``numbers`` (:func:`schedule_numbers`) may be traced.

    ``decay``: ``cosine`` and ``linear`` go to ``end_factor`` (0 by default) at the end of
    training (timm's ``lr_min + (lr - lr_min) * shape``), ``constant`` stays,
    ``rsqrt`` is ``1 / sqrt(1 + t / rsqrt_timescale)`` (t counted after warmup), ``step``
    multiplies by ``step_factor`` at each of ``step_boundaries`` (fractions of training).
    """
    t = jnp.asarray(step, jnp.float32)
    keys = ("warmup_steps", "cooldown_steps", "total_steps")
    warmup, cooldown, total = (numbers[k] for k in keys)
    frac = jnp.clip((t - warmup) / jnp.maximum(total - warmup, 1.0), 0.0, 1.0)
    after_warmup = jnp.maximum(t - warmup, 0.0)
    shape = {
        "cosine": lambda: 0.5 * (1.0 + jnp.cos(jnp.pi * frac)),
        "linear": lambda: 1.0 - frac,
        "constant": lambda: jnp.ones_like(t),
        "rsqrt": lambda: jax.lax.rsqrt(1.0 + after_warmup / numbers["rsqrt_timescale"]),
        "step": lambda: (
            numbers["step_factor"] ** jnp.sum(t >= numbers["step_at"], dtype=jnp.float32)
        ),
    }[decay]()
    if "end_factor" in numbers:
        shape = numbers["end_factor"] + (1.0 - numbers["end_factor"]) * shape
    shape *= jnp.where(warmup > 0, jnp.minimum(t / jnp.maximum(warmup, 1.0), 1.0), 1.0)
    shape *= jnp.where(cooldown > 0, jnp.clip((total - t) / jnp.maximum(cooldown, 1.0), 0, 1), 1)
    return numbers["learning_rate"] * shape


_jitted_schedule_value = jax.jit(schedule_value, static_argnums=0)  # the decay is structure


# --------------------------------------------------------------------------------------------
# which parameters train, and how fast


def layer_groups(model: Any) -> tuple[list[tuple[str, int]], int]:
    """Rules mapping parameter paths to depth groups, and the number of groups (the model
    family's ``layer_groups``; a task head falls in the last group with the final norm). A
    backbone with feature taps ends at its last tapped block or stage (timm's
    ``prune_intermediate_layers``): those after it, which never run, are group -1, and
    ``last:N`` and layer decay count from the last one that runs."""
    backbone, fam = backbone_of(model), family(model)
    rules, n_groups = fam.layer_groups(backbone)
    if getattr(backbone, "feature_taps", None) is not None:
        declared = len(fam.feature_taps(backbone))
        if n_groups - 2 != declared:  # group i + 1 is tap i: the last tap's group ends the run
            raise ValueError(
                f"Family {fam.name!r}: layer_groups gives {n_groups} groups ({n_groups - 2} "
                f"between the stem and the head) but feature_taps declares {declared} taps: "
                "group i + 1 must be feature tap i (group 0 the stem, the last the head)."
            )
    taps = stage_taps(
        getattr(backbone, "feature_taps", None), n_groups - 2, 0,
        owner=type(backbone).__name__, family=fam.name,
    )  # fmt: skip
    if not taps:
        return rules, n_groups
    last, head = max(taps) + 1, n_groups - 1
    regroup = lambda g: -1 if last < g < head else last + 1 if g == head else g
    after = fam.after_last_stage
    skipped = [(after, -1)] if after and last < head - 1 else []  # runs with the last stage only
    return skipped + [(regex, regroup(group)) for regex, group in rules], last + 2


def never_run(model: Any) -> str | None:
    """Regex of the parameters ``model`` never runs (the blocks after its last feature tap):
    they get no gradient, and train in no preset (weight decay alone would shrink them)."""
    unused = [regex for regex, group in layer_groups(model)[0] if group < 0]
    return "|".join(f"(?:{regex})" for regex in unused) or None


def trainable_rules(preset: str, model: Any) -> list[tuple[str, bool]]:
    """(regex, trainable) rules of a ``optimizer.trainable`` preset."""
    if preset == "all":
        return [(".*", True)]
    if preset == "none":  # LoRA without the head: only the adapters train
        return [(".*", False)]
    if preset == "head":
        return [(head_pattern(model), True)]
    if preset == "bitfit":
        norms = _norm_scales(family(model).norm_modules)
        return [(rf"{head_pattern(model)}|(.*/)?bias|{norms}", True)]
    if preset.startswith("last:") and preset[5:].isdigit():
        rules, n_groups = layer_groups(model)
        keep = int(preset[5:])
        if not 0 <= keep <= n_groups - 2:
            raise ValueError(f"trainable={preset!r}: the model runs {n_groups - 2} blocks.")
        return [(regex, group >= n_groups - 1 - keep) for regex, group in rules]
    raise ValueError(
        f"Unknown optimizer.trainable {preset!r}; valid: {', '.join(TRAINABLE_PRESETS)}."
    )


def trainable_mask(
    params: Any, model: Any, *, preset: str, frozen: str | None = None, extra: str | None = None
) -> Any:
    """Boolean tree: True where a parameter trains. ``extra`` (LoRA adapters) trains whatever
    the preset says; the ``frozen`` regex wins over both."""
    _check_family_regexes(params, model, preset)
    mask = tree_map_by_rules(trainable_rules(preset, model), params, default=False)
    if extra:
        mask = jax.tree.map(lambda m, e: m or e, mask, tree_mask(extra, params))
    if unused := never_run(model):  # before frozen_params, which may name them too
        mask = jax.tree.map(lambda m, u: m and not u, mask, tree_mask(unused, params))
    if frozen:
        frozen_mask = tree_mask(frozen, params, what="optimizer.frozen_params")
        owner = "LoRA" if extra else f"optimizer.trainable={preset!r}"
        _check_frozen_changes(frozen, frozen_mask, mask, unused, owner)
        mask = jax.tree.map(lambda m, f: m and not f, mask, frozen_mask)
    if not any(jax.tree.leaves(mask)):
        raise ValueError("No parameter is trainable: check optimizer.trainable / frozen_params.")
    return mask


def _norm_scales(norm_modules: str) -> str:
    """The parameter paths of the scales of a family's ``norm_modules`` (what ``bitfit``
    trains beside the biases)."""
    return rf"(.*/)?({norm_modules})/scale"


def _check_family_regexes(params: Any, model: Any, preset: str) -> None:
    """The family's ``norm_modules`` (read by ``bitfit``) and ``after_last_stage`` (idle with
    an earlier last tap) must each match some parameter: a typo would train no norm, or train
    the final norm that never runs, without a word. ``norm_modules=""``: no norm modules."""
    fam, paths = family(model), list(flatten_dict(params))
    regexes = [("after_last_stage", fam.after_last_stage, fam.after_last_stage)]
    if preset == "bitfit" and fam.norm_modules:
        regexes.append(("norm_modules", fam.norm_modules, _norm_scales(fam.norm_modules)))
    for field, regex, scope in regexes:
        if regex and not any(re.fullmatch(scope, p) for p in paths):
            raise ValueError(
                f"Family {fam.name!r}: {field} {regex!r} matches no parameter of the model "
                f"(such as {paths[0]!r}, ..., {paths[-1]!r})."
            )


def _check_frozen_changes(
    frozen: str, frozen_mask: Any, mask: Any, unused: str | None, owner: str
) -> None:
    """Raises unless the ``frozen`` regex (``optimizer.frozen_params``, its ``frozen_mask``)
    freezes a parameter that ``mask`` trains: it would change nothing where it matches only
    parameters that ``owner`` (the preset, or LoRA) freezes already, or that never run
    (``unused``: the blocks after the last feature tap)."""
    pairs = zip(jax.tree.leaves(mask), jax.tree.leaves(frozen_mask), strict=True)
    if any(m and f for m, f in pairs):
        return
    idle = re.compile(unused) if unused else None
    held = [p for p, f in flatten_dict(frozen_mask).items() if f]
    if idle and all(idle.fullmatch(p) for p in held):
        raise ValueError(
            f"optimizer.frozen_params {frozen!r} matches only parameters that never run (such "
            f"as {held[0]!r}: the blocks after the last feature tap, which train in no "
            "preset): it would change nothing."
        )
    raise ValueError(
        f"optimizer.frozen_params {frozen!r} matches only parameters that {owner} freezes "
        "already: it would change nothing."
    )


def lr_multipliers(
    params: Any,
    model: Any,
    *,
    rules: Any = None,
    layer_decay: float | None = None,
    frozen: Sequence[str] = (),
) -> Any:
    """Float tree of per-parameter learning-rate multipliers (1.0 where nothing applies);
    ``frozen``: the paths of the parameters that do not train, for a rule's error."""
    what = "optimizer.lr_mults rule"
    check_multiplier_rules(rules or (), what=what)
    mults = tree_map_by_rules(
        list(rules or ()), params, what=what, default=1.0,
        each_rule_applies=True, frozen=frozen,
    )  # fmt: skip
    if layer_decay is not None:
        if not 0 < layer_decay <= 1:
            raise ValueError(f"optimizer.layer_decay must lie in (0, 1], got {layer_decay}.")
        group_rules, n_groups = layer_groups(model)
        if n_groups < 3 and layer_decay != 1:  # decay ** (depth below the head): all 1.0
            raise ValueError(
                f"optimizer.layer_decay={layer_decay}: family {family(model).name!r} declares "
                f"no block groups (layer_groups gives {n_groups}: group 0 the stem, 1..L the "
                "blocks or stages, L + 1 the head); leave layer_decay unset."
            )
        groups = tree_map_by_rules(group_rules, params, what="layer groups")
        mults = jax.tree.map(
            lambda m, g: float(m) * layer_decay ** (n_groups - 1 - g), mults, groups
        )
    return jax.tree.map(float, mults)


def scale_by_tree(mults: Any) -> optax.GradientTransformation:
    """Multiplies each update by its multiplier (stateless)."""

    def update(updates, state, params=None):
        del params
        return jax.tree.map(lambda u, m: u * jnp.asarray(m, u.dtype), updates, mults), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


# --------------------------------------------------------------------------------------------
# the optimizer


@dataclasses.dataclass(frozen=True)
class Optimizer:
    """A run's optimizer, its structure apart from its numbers.

    ``numbers``: the learning rate, the schedule's lengths, the betas or momentum, the weight
    decay, the clipping norm and the learning-rate multipliers, as float32 scalars.
    ``transform(numbers)`` builds the optax transformation from them, traced or not: a train
    step that takes the numbers as an input is the same program for every value, so runs
    that differ only in them (a sweep) share one compiled step.
    """

    numbers: dict[str, Any]
    transform: Callable[[Mapping[str, Any]], optax.GradientTransformation]
    schedule_decay: str  # config.schedule.decay: the schedule's shape

    @property
    def tx(self) -> optax.GradientTransformation:
        """The transformation with the numbers as constants."""
        return self.transform(self.numbers)

    def schedule(self, step: Any) -> jax.Array:
        """The learning rate at ``step``, as one compiled program (eagerly, each of its dozen
        scalar operations would compile on its own)."""
        return _jitted_schedule_value(self.schedule_decay, self.numbers["schedule"], step)


def build_optimizer(
    opt: OptimizerSpec,
    schedule_spec: ScheduleSpec,
    params: Any,
    model: Any,
    *,
    total_steps: int,
    steps_per_epoch: int | None = None,
    log: bool = True,
    frozen: Sequence[str] = (),
) -> Optimizer:
    """The optimizer for the *trainable* ``params`` (``frozen``: the paths of the others, named
    when a rule matches only them).

    ``opt.name`` is ``sgd`` (momentum, nesterov; L2 weight decay added to the gradient) or
    ``adamw`` (b1, b2, eps; decoupled weight decay). ``steps_per_epoch`` is needed only by a
    schedule given in epochs. ``mu_dtype`` stores first moments (or the SGD momentum) in e.g.
    bfloat16. Gradients are clipped by global norm first.
    """
    if opt.mu_dtype is not None and opt.mu_dtype not in DTYPES:
        raise ValueError(
            f"Unknown optimizer.mu_dtype {opt.mu_dtype!r}; valid: {', '.join(DTYPES)}."
        )
    schedule = schedule_numbers(
        schedule_spec, base_lr=float(opt.learning_rate), total_steps=total_steps,
        steps_per_epoch=steps_per_epoch,
    )  # fmt: skip
    mults = lr_multipliers(
        params, model, rules=opt.lr_mults, layer_decay=opt.layer_decay, frozen=frozen
    )
    numbers = _numbers(opt, schedule, mults)
    decay_params = opt.decay_params or DEFAULT_DECAY_PARAMS
    decay_mask = tree_mask(
        decay_params, params, what=opt.decay_params and "optimizer.decay_params", frozen=frozen
    )
    transform = functools.partial(_transform, opt, schedule_spec.decay, decay_mask)
    if log and jax.process_index() == 0:
        wd = numbers["weight_decay"]
        logger.info("Weight decay %g on:\n%s", wd, rules_table([(decay_params, True)], params))
        if opt.lr_mults or opt.layer_decay is not None:
            logger.info("Learning-rate multipliers:\n%s", _value_table(mults))
    return Optimizer(numbers, transform, schedule_spec.decay)


def _numbers(opt: OptimizerSpec, schedule: dict, mults: Any) -> dict[str, Any]:
    """:attr:`Optimizer.numbers` (float32). ``grad_clip_norm`` and ``lr_mults`` are present
    only when their part of the chain is (clipping set, some multiplier other than 1)."""
    numbers: dict[str, Any] = {"schedule": schedule, "weight_decay": opt.weight_decay or 0.0}
    if opt.grad_clip_norm:
        numbers["grad_clip_norm"] = opt.grad_clip_norm
    if opt.name == "sgd":
        numbers["momentum"] = opt.momentum
    if opt.name == "adamw":
        numbers.update(b1=opt.b1, b2=opt.b2, eps=opt.eps)
    if any(m != 1.0 for m in jax.tree.leaves(mults)):
        numbers["lr_mults"] = mults
    return jax.tree.map(lambda x: np.asarray(x, np.float32), numbers)


def _transform(
    opt: OptimizerSpec, schedule_decay: str, decay_mask: Any, numbers: Mapping[str, Any]
) -> optax.GradientTransformation:
    """The optax chain of ``opt`` with ``numbers`` (:func:`_numbers`; traced or not)."""
    schedule = functools.partial(schedule_value, schedule_decay, numbers["schedule"])
    mu_dtype = DTYPES.get(opt.mu_dtype)
    parts = []
    if "grad_clip_norm" in numbers:
        parts.append(optax.clip_by_global_norm(numbers["grad_clip_norm"]))
    if opt.name == "sgd":
        if opt.weight_decay:  # structure: SGD's decay is a member of the chain only when set
            parts.append(optax.add_decayed_weights(numbers["weight_decay"], mask=decay_mask))
        momentum, nesterov = numbers["momentum"], opt.nesterov
        parts.append(optax.sgd(schedule, momentum, nesterov, accumulator_dtype=mu_dtype))
    else:  # adamw (the spec allows no other)
        parts.append(
            optax.adamw(
                schedule,
                b1=numbers["b1"],
                b2=numbers["b2"],
                eps=numbers["eps"],
                weight_decay=numbers["weight_decay"],
                mask=decay_mask,
                mu_dtype=mu_dtype,
            )  # fmt: skip
        )
    if "lr_mults" in numbers:
        parts.append(scale_by_tree(numbers["lr_mults"]))
    return optax.chain(*parts)


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
