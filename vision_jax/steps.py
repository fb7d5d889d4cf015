"""The pure, jittable train and eval steps and the train state they carry.

The train state holds only what changes: the *trainable* parameters, the model state (BatchNorm
statistics), the optimizer state, an optional EMA of the trainable parameters, the step, and the
count of updates skipped because they were not finite. Frozen parameters (linear probes, LoRA
base weights) are passed to the steps as a separate, never-donated argument, so they get no
gradient, no update and no optimizer state.

Non-finite guard: when the loss, the gradients' global norm, the new parameters or the new model
state are not all finite, the train step keeps the previous parameters, model state, optimizer
state and EMA (as ``optax.apply_if_finite``) and records the skip in ``state.skips``; the step
counter still advances, so the data stream and the per-step RNG move on past the bad batch. The
loop decides what a skip means (``config.on_nonfinite``). A skipped step's averaged train metrics
count nothing, so a log window's means are over the updates applied.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from clu import metrics as clu_metrics

from vision_jax import sharding
from vision_jax.lora import LoraSpec, apply_adapters
from vision_jax.tasks import Task
from vision_jax.trees import combine

T = TypeVar("T")

Batch = dict[str, jax.Array]


@flax.struct.dataclass
class SkipCounts:
    """Updates skipped by the non-finite guard (int32 scalars; steps count from 1)."""

    total: jax.Array  # skipped so far
    consecutive: jax.Array  # skipped in a row, up to the latest step
    longest: jax.Array  # the longest run of consecutive skips so far
    first: jax.Array  # the step of the first skipped update (0: none)
    last: jax.Array  # the step of the latest skipped update (0: none)

    @classmethod
    def filled(cls, value: Any) -> SkipCounts:
        """Every field ``value`` (zeros: ``filled(jnp.zeros((), jnp.int32))``; shardings)."""
        return cls(value, value, value, value, value)

    def record(self, finite: jax.Array, step: jax.Array) -> SkipCounts:
        """The counts after ``step``, whose update was applied iff ``finite``."""
        bad = jnp.logical_not(finite)
        consecutive = jnp.where(bad, self.consecutive + 1, 0)
        return SkipCounts(
            total=self.total + bad.astype(jnp.int32),
            consecutive=consecutive,
            longest=jnp.maximum(self.longest, consecutive),
            first=jnp.where(bad & (self.first == 0), step, self.first),
            last=jnp.where(bad, step, self.last),
        )


@flax.struct.dataclass
class StepSettings:
    """What a train step reads as inputs rather than constants: runs that differ only in these
    (a seed, a learning rate, an EMA decay) share one compiled step. The EMA's step is computed
    on the host (``1 - decay`` in float32 rounds decays near 1)."""

    rng: jax.Array  # the run's dropout key; each step folds in its count
    optimizer: Any = None  # the numbers of ``make_train_step``'s ``tx`` when it is a function
    ema_step: jax.Array | None = None  # 1 - the EMA decay, set iff the state has ``ema_params``
    ema_warmup: jax.Array | None = None  # the EMA warmup's power (None: no warmup)


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training. The per-step RNG is derived, not stored."""

    step: jax.Array
    params: Any  # trainable parameters only
    model_state: Any  # non-trainable collections, e.g. {"batch_stats": ...}
    opt_state: Any
    ema_params: Any = None  # EMA of ``params`` when config.ema_decay is set
    skips: SkipCounts | None = None  # updates skipped by the non-finite guard (None: not counted)
    # EMA of ``model_state`` (BatchNorm statistics) beside ``ema_params``, as timm's EMA
    # averages a model's buffers: the EMA evaluation's statistics (None: the live ones).
    ema_model_state: Any = None


def _all_finite(tree: Any) -> jax.Array:
    """Whether every float leaf of ``tree`` is finite (a bool scalar).

    ``sqrt(sum(x * 0))`` is 0, or NaN if any element is not finite. The square root matters:
    XLA copies cheap scalar producers into every consumer, and a chain of per-leaf flags was
    copied into each of the guard's selects (one per state leaf), which made a ViT train step
    6x larger and its compile 4x slower; XLA does not duplicate a square root."""
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    total = sum((jnp.sum(x * 0, dtype=jnp.float32) for x in leaves), jnp.float32(0))
    return jnp.isfinite(jnp.sqrt(total))


EMA_WARMUP_POWER = 2 / 3  # timm's ModelEmaV3 default (its warmup_gamma: 1)


def ema_step_size(step: jax.Array, ema_step: jax.Array, warmup: jax.Array | None) -> jax.Array:
    """``1 - decay`` of the EMA update made by the train step at ``step`` (0 for the first).
    With ``warmup``, timm's ``ModelEmaV3`` warmup: ``decay = 1 - (1 + step) ** -warmup`` up to
    the set decay, 0 at the first update (the EMA starts from the first updated weights)."""
    if warmup is None:
        return ema_step
    return jnp.maximum((1.0 + step.astype(jnp.float32)) ** -warmup, ema_step)


def _average(new: Any, old: Any, step_size: jax.Array) -> Any:
    """``optax.incremental_update`` of the floating leaves; other leaves (a counter in a
    model's state) take their new value."""

    def leaf(n: jax.Array, o: jax.Array) -> jax.Array:
        if not jnp.issubdtype(n.dtype, jnp.inexact):
            return n
        return optax.incremental_update(n, o, step_size)

    return jax.tree.map(leaf, new, old)


def _update_if_finite(
    finite: jax.Array,
    optimizer: optax.GradientTransformation,
    state: TrainState,
    grads: Any,
    model_state: Any,
    ema_step: jax.Array | None,
) -> tuple[tuple[Any, Any, Any, Any], jax.Array]:
    """``((params, model_state, opt_state, ema), applied)``: the optimizer's update if ``finite``
    and the new parameters are finite, else the state's own; ``ema`` is (EMA params, EMA model
    state).

    Two ``lax.cond`` rather than a select per leaf: the update is computed only when the inputs
    are finite, into the output buffers, and a skip keeps the old state whole. Per-leaf selects
    read and write the whole state once more every step (ResNet-50, batch 16: 7-12% of the step).
    """
    ema = (state.ema_params, state.ema_model_state)
    old = (state.params, state.model_state, state.opt_state, ema)

    def update(_):
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new_ema = ema
        if ema_step is not None:
            average = functools.partial(_average, step_size=ema_step)
            ema_model_state = None if ema[1] is None else average(model_state, ema[1])
            new_ema = (average(params, ema[0]), ema_model_state)
        new = (params, model_state, opt_state, new_ema)
        params_finite = _all_finite(params)
        return jax.lax.cond(params_finite, lambda: new, lambda: old), params_finite

    return jax.lax.cond(finite, update, lambda _: (old, jnp.bool_(False)), None)


def _micro_batches(x: jax.Array, k: int) -> jax.Array:
    """(B, ...) -> (k, B/k, ...) with micro-batch j = examples j, j+k, ...: every micro-batch
    keeps examples from every device of a batch-sharded array."""
    if x.shape[0] % k:
        raise ValueError(
            f"A batch of {x.shape[0]} examples cannot be split into {k} micro-batches "
            "(accum_steps must divide the batch size)."
        )
    return x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1)


def _merge_micro(x: jax.Array) -> jax.Array:
    """Per-micro-batch outputs stacked by ``scan`` (k, ...) -> one batch's worth."""
    return x.reshape(-1, *x.shape[2:]) if x.ndim > 1 else x


def _accumulated(
    grad_fn: Callable, task: Task, state: TrainState, frozen: Any, batch: Batch,
    step_rng: jax.Array, accum_steps: int,
) -> tuple[jax.Array, dict, dict, Any]:  # fmt: skip
    """``(loss, aux, model_state, grads)`` of ``batch`` as ``accum_steps`` micro-batches, each
    micro-batch's loss over the whole batch's denominators (``Task.loss_normalisers``) times
    ``accum_steps``, so that their mean is the whole batch's loss."""
    shares = jax.tree.map(lambda n: n / accum_steps, task.loss_normalisers(batch))

    def micro_step(carry, inputs):
        grad_sum, model_state, loss_sum = carry
        micro, i = inputs
        (loss, (aux, model_state)), grads = grad_fn(
            state.params, model_state, frozen, micro, jax.random.fold_in(step_rng, i), shares
        )
        grad_sum = jax.tree.map(jnp.add, grad_sum, grads)
        return (grad_sum, model_state, loss_sum + loss), aux

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    micro = jax.tree.map(lambda x: _micro_batches(x, accum_steps), batch)
    (grads, model_state, loss), aux = jax.lax.scan(
        micro_step,
        (zeros, state.model_state, jnp.zeros((), jnp.float32)),
        (micro, jnp.arange(accum_steps)),
    )
    grads = jax.tree.map(lambda g: g / accum_steps, grads)
    return loss / accum_steps, jax.tree.map(_merge_micro, aux), model_state, grads


def make_train_step(
    model: nn.Module,
    tx: optax.GradientTransformation | Callable[[Any], optax.GradientTransformation],
    task: Task,
    *,
    lora: LoraSpec | None = None,
    accum_steps: int = 1,
    mesh: jax.sharding.Mesh | None = None,
) -> Callable[[TrainState, Any, Batch, StepSettings], tuple[TrainState, clu_metrics.Collection]]:
    """``step(state, frozen_params, batch, settings) -> (state, metrics)``; the task gives the
    loss and the metrics (``task.train_metrics``, plus ``grad_norm``). ``tx`` is the optimizer,
    or a function of ``settings.optimizer`` that builds it (``optim.Optimizer.transform``).

    With ``accum_steps > 1`` the batch is split into that many micro-batches whose gradients
    are averaged (BatchNorm statistics update once per micro-batch) before one optimizer update:
    the same update as the whole batch for a model without BatchNorm, in less memory (losses
    normalised by counts, valid pixels or positive locations, take the whole batch's:
    ``Task.loss_normalisers``).

    A step whose loss, gradient norm, new parameters or new model state are not finite changes
    nothing but ``step`` and ``skips`` (see the module docstring). ``mesh``: the step's
    (activations stay split by batch: :func:`~vision_jax.sharding.split_by_batch`).
    """

    def loss_of(params, model_state, frozen, batch, dropout_rng, normalisers=None):
        variables = {"params": combine(params, frozen), **model_state}
        with apply_adapters(lora, train=True), sharding.activations_split_by_batch(mesh):
            outputs, new_model_state = model.apply(
                variables,
                batch["image"],
                train=True,
                rngs={"dropout": dropout_rng},
                mutable=list(model_state),
            )
        loss, aux = task.train_loss(outputs, batch, normalisers)
        return loss, (aux, dict(new_model_state))

    grad_fn = jax.value_and_grad(loss_of, has_aux=True)

    def train_step(state: TrainState, frozen: Any, batch: Batch, settings: StepSettings):
        step_rng = jax.random.fold_in(settings.rng, state.step)
        if accum_steps == 1:
            (loss, (aux, model_state)), grads = grad_fn(
                state.params, state.model_state, frozen, batch, step_rng
            )
        else:
            loss, aux, model_state, grads = _accumulated(
                grad_fn, task, state, frozen, batch, step_rng, accum_steps
            )
        optimizer = tx if isinstance(tx, optax.GradientTransformation) else tx(settings.optimizer)
        grad_norm = optax.global_norm(grads)
        metrics = task.train_metrics.single_from_model_output(loss=loss, grad_norm=grad_norm, **aux)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & _all_finite(model_state)
        ema_step = settings.ema_step
        if ema_step is not None:
            ema_step = ema_step_size(state.step, ema_step, settings.ema_warmup)
        (params, model_state, opt_state, ema), finite = _update_if_finite(
            finite, optimizer, state, grads, model_state, ema_step
        )
        metrics = _counted_if(finite, metrics)
        new_state = state.replace(
            step=state.step + 1,
            params=params,
            model_state=model_state,
            opt_state=opt_state,
            ema_params=ema[0],
            ema_model_state=ema[1],
            skips=None if state.skips is None else state.skips.record(finite, state.step + 1),
        )
        return new_state, metrics

    return train_step


def _counted_if(applied: jax.Array, collection: clu_metrics.Collection) -> Any:
    """A step's train metrics, each ``Average`` emptied (total and count 0) unless its update
    was ``applied``: a log window's means leave skipped steps out (a window of skipped steps
    only computes 0 / 0, NaN); metrics of other kinds as they are."""
    kept = lambda x: jnp.where(applied, x, jnp.zeros_like(x))
    emptied = {
        name: metric.replace(total=kept(metric.total), count=kept(metric.count))
        for name, metric in vars(collection).items()
        if isinstance(metric, clu_metrics.Average)
    }
    return collection.replace(**emptied)


def make_eval_step(
    model: nn.Module,
    task: Task,
    *,
    lora: LoraSpec | None = None,
    mesh: jax.sharding.Mesh | None = None,
) -> Callable[[Any, Any, Any, Batch], tuple[clu_metrics.Collection, dict[str, jax.Array]]]:
    """``step(params, model_state, frozen_params, batch) -> (metrics, predictions)``: the
    task's metrics of a padded batch (padding, ``mask == 0``, is not counted) and its
    predictions per example (:meth:`~vision_jax.tasks.base.Task.evaluate_batch`). The trained
    and the EMA parameters go through the same step (one program: :func:`evaluated_weights`);
    ``mesh`` as for :func:`make_train_step`."""

    def eval_step(params: Any, model_state: Any, frozen: Any, batch: Batch) -> tuple[Any, dict]:
        variables = {"params": combine(params, frozen), **model_state}
        with apply_adapters(lora, train=False), sharding.activations_split_by_batch(mesh):
            outputs = model.apply(variables, batch["image"], train=False)
        return task.evaluate_batch(outputs, batch)

    return eval_step


def evaluated_weights(state: TrainState, ema: bool) -> tuple[Any, Any]:
    """The parameters and model state an evaluation applies: the trained ones, or (``ema``)
    the EMA parameters with the EMA model state where the state has one."""
    if not ema:
        return state.params, state.model_state
    model_state = state.model_state if state.ema_model_state is None else state.ema_model_state
    return state.ema_params, model_state


def evaluate(
    eval_step: Callable,
    weights: tuple[Any, Any],
    frozen: Any,
    batches: Iterable[dict],
    mesh: jax.sharding.Mesh,
    observe: Callable[[dict, dict], None] | None = None,
) -> clu_metrics.Collection:
    """Runs ``eval_step`` with ``weights`` (:func:`evaluated_weights`) over every batch; the
    metrics merged on the host over the split (the task's ``summarize`` turns them into
    figures). ``observe(batch, predictions)``, if given,
    sees each host batch with its predictions per example, fetched to the host for it only
    (padding rows included; their arrays must be addressable: a single-process run).

    Each batch's results are fetched once the next batch's step is dispatched
    (:func:`fetched_one_behind`)."""

    def dispatched() -> Iterator[tuple[dict, tuple[Any, Any]]]:
        for batch in batches:
            metrics, found = eval_step(*weights, frozen, sharding.to_global_batch(batch, mesh))
            yield batch, (metrics, found if observe is not None else None)

    total = None
    for batch, (metrics, found) in fetched_one_behind(dispatched()):
        if observe is not None:
            observe(batch, found)
        total = metrics if total is None else total.merge(metrics)
    if total is None:
        raise ValueError("The evaluation split is empty.")
    return total


def fetched_one_behind(pairs: Iterable[tuple[T, Any]]) -> Iterator[tuple[T, Any]]:
    """``pairs`` of (item, device arrays) with the arrays fetched to the host, each once the
    next pair is made: when making a pair dispatches device work (a jitted step), the device
    computes while the host waits for the previous results and prepares the next input.
    Fetching each result at once would leave an accelerator idle between batches.

    Processes of a multi-process CPU run fetch each at once: XLA's CPU runtime may run two
    dispatched programs at the same time, and their collectives then meet another process's in
    another order (a deadlock); an accelerator runs a device's programs in order."""
    if not sharding.may_dispatch_ahead():
        yield from ((item, jax.device_get(arrays)) for item, arrays in pairs)
        return
    behind = None
    for ahead in pairs:
        if behind is not None:
            yield behind[0], jax.device_get(behind[1])
        behind = ahead
    if behind is not None:
        yield behind[0], jax.device_get(behind[1])
