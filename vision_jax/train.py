"""Fine-tuning: one training loop for every model, dataset, mesh and parameter-efficient method.

``train_and_evaluate(config, workdir)`` builds the data, model, variables (pretrained, sharded),
optimizer and train state from the config, resumes from the latest checkpoint in ``workdir`` if
there is one, trains with the jitted step of :mod:`vision_jax.steps` over a device mesh,
evaluates every ``eval_every_steps`` and at the end, and checkpoints.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Mapping
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from clu import metric_writers, parameter_overview, periodic_actions

from vision_jax import data as data_lib
from vision_jax import lora, losses, optim, sharding
from vision_jax.checkpoint import Checkpointer
from vision_jax.compile_options import step_compiler_options
from vision_jax.config import TrackedConfig
from vision_jax.masks import rules_table
from vision_jax.metrics import scalars
from vision_jax.models import create_model
from vision_jax.steps import TrainState, evaluate, make_eval_step, make_train_step
from vision_jax.weights import apply_input_contract, load_pretrained

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def _total_steps(cfg: TrackedConfig, steps_per_epoch: int) -> int:
    steps, epochs = cfg.get("total_steps"), cfg.get("total_epochs")
    if (steps is None) == (epochs is None):
        raise ValueError("Set exactly one of total_steps and total_epochs.")
    total = int(steps) if steps is not None else math.ceil(epochs * steps_per_epoch)
    if total <= 0:
        raise ValueError(f"Training must last at least one step, got {total}.")
    return total


def _model_kwargs(model_cfg: TrackedConfig) -> dict[str, Any]:
    kwargs = {k: v for k, v in model_cfg.items() if k not in ("name", "dtype")}
    if model_cfg.dtype not in DTYPES:
        raise ValueError(f"Unknown model.dtype {model_cfg.dtype!r}; valid: {', '.join(DTYPES)}.")
    return {"dtype": DTYPES[model_cfg.dtype], **kwargs}


def lora_spec(section: TrackedConfig) -> lora.LoraSpec | None:
    """The :class:`~vision_jax.lora.LoraSpec` of ``config.lora`` (None when ``rank == 0``)."""
    rank, alpha, dropout = int(section.rank), section.get("alpha"), float(section.dropout)
    targets = section.targets
    if rank == 0:
        return None
    return lora.LoraSpec(rank, float(rank if alpha is None else alpha), dropout, targets)


@dataclasses.dataclass
class Setup:
    """What :func:`create_train_state` builds: the state, the frozen params, and how to step."""

    state: TrainState
    frozen: Any
    shardings: TrainState
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    memory: dict[str, int]


def create_variables(
    cfg: TrackedConfig,
    model: nn.Module,
    spec: data_lib.InputSpec,
    mesh: jax.sharding.Mesh,
    rng: jax.Array,
    adapters: lora.LoraSpec | None,
) -> tuple[dict, dict, data_lib.InputSpec]:
    """Model variables (pretrained from ``config.init`` if set, plus LoRA adapters), already
    sharded by ``config.sharding_rules``; their shardings; the input spec (possibly the
    checkpoint's input contract)."""
    dummy = jnp.zeros((1, spec.image_size, spec.image_size, 3), jnp.float32)
    init_rng, adapter_rng = rng, jax.random.fold_in(rng, 1)

    def base_init(rng: jax.Array) -> dict:
        return flax.core.unfreeze(model.init({"params": rng}, dummy, train=False))

    def with_adapters(variables: dict) -> dict:
        if adapters is None:
            return variables
        params = lora.add_adapters(variables["params"], adapters, adapter_rng)
        return {**variables, "params": params}

    init = lambda rng: with_adapters(base_init(rng))

    replicated = sharding.replicated(mesh)
    shapes = jax.eval_shape(init, init_rng)
    shardings = jax.tree.map(lambda _: replicated, shapes)
    shardings["params"] = sharding.param_shardings(
        shapes["params"], mesh, cfg.sharding_rules, fsdp_min_size=int(cfg.fsdp_min_size)
    )
    init_cfg = cfg.init
    path, replace_head = init_cfg.get("path"), bool(init_cfg.replace_head)
    dont_load, posemb = tuple(init_cfg.dont_load), init_cfg.posemb
    head_bias_init = float(init_cfg.head_bias_init)
    use_input_contract = bool(init_cfg.use_input_contract)
    if not path:  # created already sharded
        return jax.jit(init, out_shardings=shardings)(init_rng), shardings, spec
    # Merged on the host (with the fresh head), then split into the shardings.
    fresh = jax.jit(base_init)(init_rng)
    loaded = load_pretrained(
        path,
        model=model,
        variables=fresh,
        replace_head=replace_head,
        dont_load=dont_load,
        posemb=posemb,
        head_bias_init=head_bias_init,
    )
    variables = with_adapters(loaded)
    if use_input_contract:
        spec = apply_input_contract(spec, path)
    return sharding.put(variables, shardings), shardings, spec


def trainable_preset(cfg: TrackedConfig, adapters: lora.LoraSpec | None) -> str:
    """``optimizer.trainable``; with LoRA the base model is frozen except (optionally) the head."""
    preset, train_head = cfg.optimizer.trainable, bool(cfg.lora.train_head)
    if adapters is None:
        return preset
    if preset != "all":
        raise ValueError(
            f"optimizer.trainable={preset!r} and lora.rank > 0 both choose what trains: with "
            "LoRA the base model is frozen; use lora.train_head for the head."
        )
    return "head" if train_head else "none"


def create_train_state(
    cfg: TrackedConfig,
    model: nn.Module,
    variables: dict,
    var_shardings: dict,
    mesh: jax.sharding.Mesh,
    adapters: lora.LoraSpec | None,
    *,
    total_steps: int,
    steps_per_epoch: int,
) -> Setup:
    """Splits params into trainable and frozen, builds the optimizer and the sharded state."""
    replicated = sharding.replicated(mesh)
    variables = dict(variables)
    params, param_shardings = variables.pop("params"), var_shardings["params"]
    preset, frozen_regex = trainable_preset(cfg, adapters), cfg.optimizer.get("frozen_params")
    extra = r"(.*/)?lora_[ab]" if adapters is not None else None
    mask = optim.trainable_mask(params, model, preset=preset, frozen=frozen_regex, extra=extra)
    trainable, frozen = optim.partition(params, mask)
    if jax.process_index() == 0:
        rules = [(r, False) for r in [frozen_regex] if r] + [(r, True) for r in [extra] if r]
        rules += optim.trainable_rules(preset, model)
        logging.info("Trainable parameters (first match wins):\n%s", rules_table(rules, params))
    trainable_shardings, _ = optim.partition(param_shardings, mask)
    tx, schedule = optim.build_optimizer(
        cfg, trainable, model, total_steps=total_steps, steps_per_epoch=steps_per_epoch
    )
    ema_decay = cfg.get("ema_decay")
    opt_shapes = jax.eval_shape(tx.init, trainable)
    shardings = TrainState(
        step=replicated,
        params=trainable_shardings,
        model_state=jax.tree.map(lambda _: replicated, variables),
        opt_state=sharding.follow_params(opt_shapes, trainable, trainable_shardings, mesh),
        ema_params=trainable_shardings if ema_decay is not None else None,
    )
    state = jax.jit(
        lambda p, ms: TrainState(
            jnp.array(0, jnp.int32),
            p,
            ms,
            tx.init(p),
            jax.tree.map(jnp.copy, p) if ema_decay is not None else None,
        ),
        out_shardings=shardings,
    )(trainable, variables)
    memory = optim.memory_report(trainable, frozen, state.opt_state)
    if adapters is not None or frozen:  # what full fine-tuning would hold, for comparison
        base = jax.eval_shape(lambda p: lora.merge(p, adapters) if adapters else p, params)
        full_tx, _ = optim.build_optimizer(
            cfg, base, model, total_steps=total_steps, steps_per_epoch=steps_per_epoch, log=False
        )
        memory["full_finetune_optimizer_state_bytes"] = optim.tree_bytes(
            jax.eval_shape(full_tx.init, base)
        )
    return Setup(state, frozen, shardings, tx, schedule, memory)


def _log_memory(memory: dict[str, int]) -> None:
    mb = lambda b: f"{b / 2**20:,.1f} MiB"
    lines = [
        f"trainable parameters: {memory['trainable_params']:,} ({mb(memory['trainable_bytes'])})",
        f"frozen parameters:    {memory['frozen_params']:,} ({mb(memory['frozen_bytes'])})",
        f"optimizer state:      {mb(memory['optimizer_state_bytes'])}",
    ]
    if "full_finetune_optimizer_state_bytes" in memory:
        lines.append(
            "optimizer state of full fine-tuning would be "
            f"{mb(memory['full_finetune_optimizer_state_bytes'])}"
        )
    logging.info("Memory report:\n  %s", "\n  ".join(lines))


def train_and_evaluate(
    config: ml_collections.ConfigDict | Mapping[str, Any],
    workdir: str,
    *,
    arrays: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None,
) -> dict[str, float]:
    """Fine-tunes as ``config`` says, in ``workdir``; returns the final evaluation metrics.

    ``arrays`` feeds in-memory data when ``config.data.source == "arrays"``:
    ``{"train": (images, labels), "test": (images, labels)}`` keyed by split name.
    With ``config.ema_decay`` set, the EMA parameters are evaluated too (``eval_ema/...``).
    """
    cfg = TrackedConfig(config)
    is_main = jax.process_index() == 0
    mesh = sharding.create_mesh(cfg.mesh)

    # Data.
    train_source = data_lib.load_source(cfg.data, cfg.data.train_split, arrays=arrays)
    eval_source = data_lib.load_source(cfg.data, cfg.data.eval_split, arrays=arrays)
    if eval_source.class_names != train_source.class_names:
        raise data_lib.DataError("The train and eval splits have different classes.")
    spec = data_lib.input_spec(cfg.input)
    batch_size, eval_batch_size = int(cfg.batch_size), int(cfg.eval_batch_size)
    accum_steps = int(cfg.grad_accum_steps)
    dp = sharding.data_parallel_size(mesh)
    for name, size in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
        if size % dp:
            raise ValueError(
                f"{name} {size} is not divisible by the {dp} data-parallel devices of mesh "
                f"{dict(mesh.shape)}."
            )
    if accum_steps < 1 or batch_size % (accum_steps * dp):
        raise ValueError(
            f"batch_size {batch_size} must split into grad_accum_steps={accum_steps} "
            f"micro-batches divisible by the {dp} data-parallel devices."
        )
    steps_per_epoch = max(train_source.num_examples // batch_size, 1)
    total_steps = _total_steps(cfg, steps_per_epoch)

    # Model, variables, optimizer, state.
    model = create_model(
        cfg.model.name, num_classes=train_source.num_classes, **_model_kwargs(cfg.model)
    )
    seed = int(cfg.seed)
    init_rng, step_rng = jax.random.split(jax.random.key(seed))
    adapters = lora_spec(cfg.lora)
    variables, var_shardings, spec = create_variables(cfg, model, spec, mesh, init_rng, adapters)
    setup = create_train_state(
        cfg,
        model,
        variables,
        var_shardings,
        mesh,
        adapters,
        total_steps=total_steps,
        steps_per_epoch=steps_per_epoch,
    )
    state, frozen = setup.state, setup.frozen

    # Checkpoints and resume.
    ckpt = Checkpointer(
        workdir, every_steps=int(cfg.checkpoint_every_steps), keep=int(cfg.keep_checkpoints)
    )
    start_step = 0
    if ckpt.latest_step() is not None:
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
        )
        state, _ = ckpt.restore(abstract)
        start_step = int(state.step)
        logging.info("Resumed from %s at step %d.", ckpt.directory, start_step)
    else:
        ckpt.save_frozen(frozen)

    loss_fn = losses.get_loss(cfg.loss)
    ema_decay = cfg.get("ema_decay")
    log_every = int(cfg.log_every_steps)
    eval_every = int(cfg.eval_every_steps)
    eval_before = bool(cfg.eval_before_training)
    meta = {
        "config": cfg.to_dict(),
        "class_names": train_source.class_names,
        "input": {"image_size": spec.image_size, "mean": list(spec.mean), "std": list(spec.std)},
    }
    xla_options = step_compiler_options(getattr(model, "dtype", jnp.float32))
    train_step = jax.jit(
        make_train_step(
            model,
            setup.tx,
            loss_fn,
            step_rng,
            label_smoothing=float(cfg.label_smoothing),
            lora=adapters,
            accum_steps=accum_steps,
            ema_decay=ema_decay,
        ),
        donate_argnums=0,
        out_shardings=(setup.shardings, sharding.replicated(mesh)),
        compiler_options=xla_options,
    )
    eval_step = make_eval_step(model, loss_fn, lora=adapters)
    eval_steps = {"eval/": jax.jit(eval_step, compiler_options=xla_options)}
    if ema_decay is not None:
        eval_steps["eval_ema/"] = jax.jit(
            make_eval_step(model, loss_fn, lora=adapters, use_ema=True),
            compiler_options=xla_options,
        )
    cfg.check_all_read()

    writer = metric_writers.create_default_writer(workdir, just_logging=not is_main)
    if is_main:
        writer.write_hparams(_flat_hparams(meta["config"]))
        parameter_overview.log_parameter_overview(  # no stats: they would fetch other hosts' shards
            state.params, include_stats="sharding", msg=f"Trainable parameters of {cfg.model.name}"
        )
        _log_memory(setup.memory)
        logging.info(
            "Training %s on %d examples (%d classes) for %d steps of %d images; mesh %s.",
            cfg.model.name, train_source.num_examples, train_source.num_classes,
            total_steps, batch_size, dict(mesh.shape),
        )  # fmt: skip
    report = periodic_actions.ReportProgress(
        num_train_steps=total_steps, writer=writer, every_steps=log_every, every_secs=None
    )

    def run_eval(step: int) -> dict[str, float]:
        result = {}
        for prefix, eval_step in eval_steps.items():
            batches = data_lib.eval_batches(eval_source, spec, global_batch=eval_batch_size)
            result.update(evaluate(eval_step, state, frozen, batches, mesh, prefix))
        writer.write_scalars(step, result)
        return result

    results: dict[str, float] = {}
    if eval_before and start_step == 0:
        before = run_eval(0)
        results.update({k.replace("eval", "eval_before", 1): v for k, v in before.items()})

    train_iter = data_lib.train_batches(
        train_source, spec, global_batch=batch_size, seed=seed, start_step=start_step
    )
    train_metrics, window_start, window_images = None, time.perf_counter(), 0
    for step in range(start_step + 1, total_steps + 1):
        batch = sharding.to_global_batch(next(train_iter), mesh)
        state, metrics = train_step(state, frozen, batch)
        train_metrics = metrics if train_metrics is None else train_metrics.merge(metrics)
        window_images += batch_size
        report(step)
        if step % log_every == 0 or step == total_steps:
            summary = scalars(train_metrics, "train/")
            elapsed = time.perf_counter() - window_start
            summary["train/learning_rate"] = float(setup.schedule(step - 1))
            summary["train/images_per_sec"] = window_images / max(elapsed, 1e-9)
            writer.write_scalars(step, summary)
            results.update(summary)
            train_metrics, window_start, window_images = None, time.perf_counter(), 0
        if step == total_steps or (eval_every > 0 and step % eval_every == 0):
            results.update(run_eval(step))
        ckpt.save(step, state, meta, force=step == total_steps)

    if start_step >= total_steps:  # already finished: report the final evaluation again
        results.update(run_eval(total_steps))
    ckpt.wait()
    ckpt.close()
    writer.flush()
    writer.close()
    return results


def _flat_hparams(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in config.items():
        if isinstance(v, Mapping):
            out.update(_flat_hparams(v, f"{prefix}{k}."))
        elif isinstance(v, (int, float, str, bool)):
            out[prefix + k] = v
        else:
            out[prefix + k] = json.dumps(v)
    return out
