"""Building a training run from its specs: data, model, variables (pretrained, sharded),
optimizer, train state (resumed from the workdir's latest checkpoint) and the jitted steps.

:func:`build_run` is a plain function (no loop, no subprocess): tests and user code can build a
run, step it by hand and look inside. :mod:`vision_jax.train` drives it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import functools
import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from vision_jax.tf_without_keras import load_if_url

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from vision_jax import data as data_lib
from vision_jax import digests, lora, optim, sharding, specs, trees, weights
from vision_jax.checkpoint import (
    BestCheckpoint,
    Checkpointer,
    CheckpointError,
    CheckpointMismatchError,
    check_no_earlier_best,
)
from vision_jax.compile_options import step_compiler_options
from vision_jax.config import TrackedConfig, default_config, saved_with_defaults
from vision_jax.lock import WorkdirLock
from vision_jax.masks import rules_table
from vision_jax.models.precision import DTYPES
from vision_jax.models.registry import REMAT_DEFAULTS, backbone_of
from vision_jax.models.remat import recomputes
from vision_jax.selection import Selection
from vision_jax.signals import any_process
from vision_jax.steps import (
    EMA_WARMUP_POWER,
    SkipCounts,
    StepSettings,
    TrainState,
    make_eval_step,
    make_train_step,
)
from vision_jax.tasks.base import TOP_LEVEL as TASK_TOP_LEVEL
from vision_jax.tasks.base import class_key
from vision_jax.weights import RunRecord, apply_input_contract, input_contract, load_pretrained
from vision_jax.weights.contract import InputContract
from vision_jax.weights.files import WeightFormatError, read_once
from vision_jax.weights.run_dir import BEST_DIR

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class Setup:
    """What :func:`create_train_state` builds: the state, the frozen params, and how to step."""

    state: TrainState
    frozen: Any
    shardings: TrainState
    optimizer: optim.Optimizer
    memory: dict[str, int]


@dataclasses.dataclass
class Run:
    """A training run, ready to step: built by :func:`build_run`, driven by the loop."""

    spec: specs.RunSpec
    mesh: jax.sharding.Mesh
    model: nn.Module
    input: data_lib.InputSpec  # the spec's, or the checkpoint's input contract
    train_source: data_lib.Source
    eval_source: data_lib.Source  # evaluated at the end (and periodically without val_source)
    val_source: data_lib.Source | None  # evaluated periodically; selects the best state
    setup: Setup
    state: TrainState  # restored from the latest checkpoint if there is one
    train_step: Any  # jitted: step(state, frozen, batch, settings) -> (state, metrics)
    settings: StepSettings  # the train step's inputs besides the state and the batch
    eval_step: Any  # jitted: step(params, model_state, frozen, batch) -> (metrics, found)
    checkpointer: Checkpointer
    start_step: int
    total_steps: int
    meta: dict[str, Any]  # written with every checkpoint
    start_position: int | None = None  # this process's data stream position (None: from step)
    selection: Selection | None = None  # with val_source: the best so far (resumed)
    best: BestCheckpoint | None = None  # with val_source: where the best state is kept
    started: float = 0.0  # time.perf_counter() when build_run began
    final: Any = None  # sees the final evaluation's predictions (train_and_evaluate's ``final``)
    train_window: list | None = None  # the train metrics of the log window the checkpoint cut
    reported: dict[str, float] | None = None  # a finished run's last train (and val) metrics
    evaluation_pending: bool = False  # a stop signal cut the restored step's evaluation short
    restored_meta: dict[str, Any] = dataclasses.field(default_factory=dict)  # its step's meta

    @property
    def task(self) -> Any:
        return self.spec.task

    @property
    def evaluations(self) -> dict[str, bool]:
        """Metric suffix ("", "_ema") -> whether it evaluates the EMA parameters."""
        return {"": False, **({"_ema": True} if self.spec.ema_decay is not None else {})}

    @property
    def periodic_source(self) -> tuple[str, data_lib.Source]:
        """The split evaluated during training and its metric prefix: "val" or "eval"."""
        if self.val_source is not None:
            return "val", self.val_source
        return "eval", self.eval_source

    def close(self) -> None:
        """Waits for pending saves and releases the workdir (also after an error)."""
        try:
            if self.best is not None:
                self.best.close()
        finally:
            self.checkpointer.close()

    @property
    def frozen(self) -> Any:
        return self.setup.frozen


def create_variables(
    spec: specs.RunSpec,
    model: nn.Module,
    input_spec: data_lib.InputSpec,
    mesh: jax.sharding.Mesh,
    rng: jax.Array,
    *,
    abstract: bool = False,
    contract: InputContract | None = None,
    idle_adapters: bool = False,
) -> tuple[dict, dict, data_lib.InputSpec]:
    """Model variables (pretrained from ``spec.init`` if set, plus LoRA adapters), already
    sharded by ``spec.sharding_rules``; their shardings; the input spec (possibly the
    checkpoint's input contract, or ``contract`` in its place: a resumed run's recorded one).
    With ``abstract`` the variables are only their shapes, dtypes and shardings
    (``jax.ShapeDtypeStruct``): nothing is initialised or read but the contract. The blocks that
    never run get no adapters, unless ``idle_adapters`` (a resumed run of an earlier version,
    which added them there, frozen: :func:`_saved_idle_adapters`)."""
    size = input_spec.image_size
    dummy = jnp.zeros((1, size, size, 3), jnp.float32)
    adapters, init_rng, adapter_rng = spec.lora, rng, jax.random.fold_in(rng, 1)
    never_run = None if idle_adapters else optim.never_run(model)

    refused: dict[str, str] = {}  # the kernels LoRA cannot adapt (non-linear), by path

    def base_init(rng: jax.Array) -> dict:
        if adapters is None:
            return flax.core.unfreeze(model.init({"params": rng}, dummy, train=False))
        with lora.refused_kernels() as found:
            variables = flax.core.unfreeze(model.init({"params": rng}, dummy, train=False))
        refused.update(found)
        return variables

    def with_adapters(variables: dict) -> dict:
        if adapters is None:
            return variables
        params = lora.add_adapters(
            variables["params"], adapters, adapter_rng, never_run=never_run, refused=refused
        )
        return {**variables, "params": params}

    init = lambda rng: with_adapters(base_init(rng))

    replicated = sharding.replicated(mesh)
    shapes = jax.eval_shape(init, init_rng)
    shardings = jax.tree.map(lambda _: replicated, shapes)
    shardings["params"] = sharding.param_shardings(
        shapes["params"], mesh, spec.sharding_rules, fsdp_min_size=spec.fsdp_min_size
    )
    init_spec = spec.init
    with read_once():  # a weights file's contract, then its variables: one read
        if init_spec.path and init_spec.use_input_contract:
            given = input_spec  # label maps, boxes: evaluation resizes the whole image, no crop
            input_spec = apply_input_contract(input_spec, contract or init_spec.path)
            if not data_lib.is_image_level(spec.task.target):
                input_spec = dataclasses.replace(input_spec, crop_mode=given.crop_mode)
        elif init_spec.path and contract is None and not abstract:  # a new run, not a resume
            _warn_unlike_contract(input_spec, init_spec.path)
        if abstract:
            return trees.with_shardings(shapes, shardings), shardings, input_spec
        if not init_spec.path:  # created already sharded
            return jax.jit(init, out_shardings=shardings)(init_rng), shardings, input_spec
        # Merged on the host, then split into the shardings. Only the variables the checkpoint
        # does not provide are initialised: compiling the whole random init (whose values the
        # checkpoint replaces) took longer than the train step's compilation.
        base_shapes = shapes if adapters is None else jax.eval_shape(base_init, init_rng)
        loaded = load_pretrained(
            init_spec.path,
            model=model,
            variables=base_shapes,
            replace_head=init_spec.replace_head,
            dont_load=tuple(init_spec.dont_load),
            posemb=init_spec.posemb,
            head_bias_init=float(init_spec.head_bias_init),
            image_size=size,
            ema=init_spec.ema,
        )
    variables = with_adapters(_initialise_abstract(loaded, base_init, init_rng))
    _warn_of_frozen_fresh(spec, model, loaded["params"], variables["params"])
    return sharding.put(variables, shardings), shardings, input_spec


def _initialise_abstract(
    variables: dict, init: Callable[[jax.Array], dict], rng: jax.Array
) -> dict:
    """``variables`` with their abstract leaves (``jax.ShapeDtypeStruct``) set to ``init(rng)``'s
    values; XLA compiles only the initialisers of those leaves."""
    flat = trees.flatten_dict(variables)
    abstract = [k for k, v in flat.items() if isinstance(v, jax.ShapeDtypeStruct)]
    if abstract:

        def only(rng: jax.Array) -> dict:
            initialised = trees.flatten_dict(init(rng))  # one trace, whatever the leaves
            return {k: initialised[k] for k in abstract}

        flat.update(jax.jit(only)(rng))
    return trees.unflatten_dict(flat)


def _warn_of_frozen_fresh(
    spec: specs.RunSpec, model: nn.Module, loaded: Mapping[str, Any], params: Mapping[str, Any]
) -> None:
    """Warns of the parameters the weights did not hold (``loaded``'s abstract leaves: a task
    head, ``init.dont_load``) that stay frozen at their random init without an adapter: a
    segmentation or detection head under LoRA with ``train_head=False`` or in
    ``optimizer.frozen_params`` (a classifier's new head is zero: refused, see
    :func:`_check_head_can_train`)."""
    flat = trees.flatten_dict(loaded)
    fresh = [k for k, v in flat.items() if isinstance(v, jax.ShapeDtypeStruct)]
    trains = trees.flatten_dict(trainable_mask(spec, model, params))
    adapted = lambda k: trains.get(f"{k.rpartition('/')[0]}/lora_a", False)
    stuck = [k for k in fresh if not trains[k] and not adapted(k)]
    if backbone_of(model) is model:  # a classifier
        stuck = [k for k in stuck if not k.startswith("head/")]
    if stuck:
        logger.warning(
            "%d new parameter(s) that init.path does not hold stay frozen at their random "
            "init: %s%s. Let them train (lora.train_head=True, or leave them out of "
            "optimizer.frozen_params and optimizer.trainable).",
            len(stuck), ", ".join(stuck[:4]), ", ..." if len(stuck) > 4 else "",
        )  # fmt: skip


def _adapters(spec: specs.RunSpec) -> str | None:
    """Regex of the LoRA adapters, which train whatever the preset (None without LoRA)."""
    return r"(.*/)?lora_[ab]" if spec.lora is not None else None


def trainable_mask(spec: specs.RunSpec, model: nn.Module, params: Any) -> Any:
    """Boolean tree: True where a parameter of ``params`` trains in the run of ``spec``."""
    return optim.trainable_mask(
        params, model, preset=trainable_preset(spec), frozen=spec.optimizer.frozen_params,
        extra=_adapters(spec),
    )  # fmt: skip


def _trainable_rules(spec: specs.RunSpec, model: nn.Module) -> list[tuple[str, bool]]:
    """The rules of :func:`trainable_mask` as its log table shows them (first match wins)."""
    frozen = [optim.never_run(model), spec.optimizer.frozen_params]
    rules = [(r, False) for r in frozen if r] + [(r, True) for r in [_adapters(spec)] if r]
    return rules + optim.trainable_rules(trainable_preset(spec), model)


def trainable_preset(spec: specs.RunSpec) -> str:
    """``optimizer.trainable``; with LoRA the base model is frozen except (optionally) the head."""
    if spec.lora is None:
        return spec.optimizer.trainable
    return "head" if spec.lora.train_head else "none"


def _check_head_can_train(frozen: Mapping[str, Any], trainable: Mapping[str, Any]) -> None:
    """Raises when the classifier head is frozen and all zeros (the loader starts a replaced
    head at zero) without a LoRA adapter: the model's output is then constant and no step
    changes anything."""
    if "lora_a" in trainable.get("head", {}):
        return
    kernel = frozen.get("head", {}).get("kernel")
    if isinstance(kernel, jax.Array) and not bool(jax.device_get(jnp.any(kernel))):
        raise ValueError(
            "The classifier head is new (all zeros) and frozen, so no step can change the "
            "model's output: let it train (lora.train_head=True, or leave head/ out of "
            "optimizer.frozen_params and optimizer.trainable)."
        )


def _check_adapted_kernels_frozen(trainable: Mapping[str, Any]) -> None:
    """Raises when a LoRA target's kernel trains as well (the head with lora.train_head): its
    adapter would train the same weights twice over, and the run would not be a LoRA of it."""
    flat = trees.flatten_dict(trainable)
    both = [p.removesuffix("lora_a") + "kernel" for p in flat if p.endswith("/lora_a")]
    both = [p for p in both if p in flat]
    if both:
        raise ValueError(
            f"lora.targets matches {', '.join(both)}, which trains fully as well (the head "
            "trains with lora.train_head=True): leave it out of lora.targets, or set "
            "lora.train_head=False to train it through its adapter only."
        )


def create_train_state(
    spec: specs.RunSpec,
    model: nn.Module,
    variables: dict,
    var_shardings: dict,
    mesh: jax.sharding.Mesh,
    *,
    total_steps: int,
    steps_per_epoch: int,
    log: bool = True,
) -> Setup:
    """Splits params into trainable and frozen, builds the optimizer and the sharded state
    (abstract, as :func:`abstract_state`, if the variables are); ``log``: the tables of what
    trains and what decays."""
    replicated = sharding.replicated(mesh)
    variables = dict(variables)
    params, param_shardings = variables.pop("params"), var_shardings["params"]
    mask = trainable_mask(spec, model, params)
    trainable, frozen = trees.partition(params, mask)
    _check_head_can_train(frozen, trainable)
    _check_adapted_kernels_frozen(trainable)
    if log and jax.process_index() == 0:
        table = rules_table(_trainable_rules(spec, model), params)
        logger.info("Trainable parameters (first match wins):\n%s", table)
    trainable_shardings, _ = trees.partition(param_shardings, mask)

    def optimizer(tree: Any, opt_spec: specs.OptimizerSpec, log: bool = True):
        return optim.build_optimizer(
            opt_spec, spec.schedule, tree, model, total_steps=total_steps,
            steps_per_epoch=steps_per_epoch, log=log, frozen=list(trees.flatten_dict(frozen)),
        )  # fmt: skip

    opt = optimizer(trainable, spec.optimizer, log)
    tx = opt.tx
    ema = spec.ema_decay is not None
    opt_shapes = jax.eval_shape(tx.init, trainable)
    shardings = TrainState(
        step=replicated,
        params=trainable_shardings,
        model_state=jax.tree.map(lambda _: replicated, variables),
        opt_state=sharding.follow_params(opt_shapes, trainable, trainable_shardings, mesh),
        ema_params=trainable_shardings if ema else None,
        skips=SkipCounts.filled(replicated),
        ema_model_state=jax.tree.map(lambda _: replicated, variables) if ema else None,
    )
    copy = lambda tree: jax.tree.map(jnp.copy, tree) if ema else None
    fresh = lambda p, ms: TrainState(
        jnp.array(0, jnp.int32), p, ms, tx.init(p), copy(p),
        SkipCounts.filled(jnp.zeros((), jnp.int32)), copy(ms),
    )  # fmt: skip
    if trees.is_abstract(params):
        state = trees.with_shardings(jax.eval_shape(fresh, trainable, variables), shardings)
    else:  # the state takes over the parameters' buffers: no second copy while it is built
        state = jax.jit(fresh, out_shardings=shardings, donate_argnums=(0, 1))(trainable, variables)
    memory = optim.memory_report(trainable, frozen, state.opt_state)
    if spec.lora is not None or frozen:  # what full fine-tuning would hold, for comparison
        base = jax.eval_shape(lambda p: lora.merge(p, spec.lora) if spec.lora else p, params)
        # without the rules written for the trainable tree (they may name adapters only): its
        # decay mask and multipliers add no optimizer state
        plain = dataclasses.replace(spec.optimizer, lr_mults=None, decay_params=None)
        full_tx = optimizer(base, plain, log=False).tx
        memory["full_finetune_optimizer_state_bytes"] = trees.tree_bytes(
            jax.eval_shape(full_tx.init, base)
        )
    return Setup(state, frozen, shardings, opt, memory)


def _initial_setup(
    spec: specs.RunSpec, model: nn.Module, mesh: jax.sharding.Mesh, rng: jax.Array,
    ckpt: Checkpointer, *, total_steps: int, steps_per_epoch: int,
) -> tuple[Setup, data_lib.InputSpec]:  # fmt: skip
    """The setup and input spec of a run. On a resume the state is abstract: the checkpoint
    replaces it, so nothing is initialised and the pretrained weights are not read: the input
    contract is the run's recorded one, frozen parameters come from beside the checkpoints
    (runs of earlier versions, which saved none, read them from ``init.path`` again)."""
    resuming = ckpt.has_steps()
    recorded = _recorded_contract(ckpt) if resuming else None
    idle_adapters = resuming and _saved_idle_adapters(spec, model, ckpt)

    def setup_of(abstract: bool, log: bool = True) -> tuple[Setup, data_lib.InputSpec]:
        variables, shardings, input_spec = create_variables(
            spec, model, spec.input, mesh, rng, abstract=abstract, contract=recorded,
            idle_adapters=idle_adapters,
        )  # fmt: skip
        setup = create_train_state(
            spec, model, variables, shardings, mesh, total_steps=total_steps,
            steps_per_epoch=steps_per_epoch, log=log,
        )  # fmt: skip
        return setup, input_spec

    setup, input_spec = setup_of(abstract=resuming)
    if resuming and jax.tree.leaves(setup.frozen):
        try:
            frozen = ckpt.restore_frozen(setup.frozen)
        except CheckpointMismatchError as error:  # another trainable set than the run's
            raise _with_layout_changes(error, ckpt, spec, model) from error
        if frozen is None:  # saved after the restore (see _restore)
            meta = _newest_meta(ckpt)
            # A run that froze nothing resumed with a frozen part: the change is refused later.
            if meta.get("frozen") is not False:
                logger.warning("No frozen parameters beside %s: reading them from init.path.",
                               ckpt.directory)  # fmt: skip
            setup, input_spec = setup_of(abstract=False, log=False)
            _check_frozen_as_begun(meta.get("frozen_digest"), setup.frozen)
        else:
            setup = dataclasses.replace(setup, frozen=frozen)
    return setup, input_spec


def _saved_idle_adapters(spec: specs.RunSpec, model: nn.Module, ckpt: Checkpointer) -> bool:
    """Whether the frozen parameters a LoRA run saved hold adapters on the blocks that never
    run (after the last feature tap): earlier versions added them there, and the run resumes in
    that layout (they stay frozen, and merge to nothing: ``lora_b`` is zero)."""
    never_run = optim.never_run(model)
    if spec.lora is None or not never_run:
        return False
    idle = re.compile(never_run)
    saved = ckpt.saved_frozen_paths()
    return any_process(any(p.endswith("/lora_a") and idle.fullmatch(p) for p in saved))


def _check_frozen_as_begun(saved: dict | None, frozen: Any) -> None:
    """Frozen parameters read from ``init.path`` again must be those the run began with (the
    digests ``saved`` in its checkpoints; none in runs of earlier versions)."""
    if any_process(not saved):  # every process digests them together, or none does
        return
    problem = digests.first_difference(saved, frozen)
    if any_process(problem is not None):
        raise CheckpointError(
            f"The frozen parameters read from init.path again are not those the run began "
            f"with: {problem or 'they differ on another process'}. Put the original weights "
            "back at init.path, or start afresh in another workdir."
        )


def _newest_meta(ckpt: Checkpointer) -> dict:
    """The meta of the newest complete checkpoint ({} without one, or unreadable)."""
    step = ckpt.newest_complete_step()
    return (ckpt.read_meta(step) if step is not None else None) or {}


def _warn_unlike_contract(spec: data_lib.InputSpec, path: str) -> None:
    """Warns when the weights at ``path`` were trained on pixels normalised otherwise than
    ``spec`` normalises them (``init.use_input_contract`` False: the config's mean and std).
    A weights file is read whole for it: the caller's :func:`read_once` keeps it for loading."""
    try:
        contract = input_contract(path)
    except (WeightFormatError, OSError, ValueError):
        return  # loading them names the problem
    if (tuple(contract.mean), tuple(contract.std)) != (tuple(spec.mean), tuple(spec.std)):
        logger.warning(
            "%s expects inputs normalised with mean %s, std %s; this run feeds them mean %s, "
            "std %s: set init.use_input_contract=True (or input.mean/std) to feed them as they "
            "were trained.", path, contract.mean, contract.std, spec.mean, spec.std,
        )  # fmt: skip


def _warn_of_other_head_classes(spec: specs.RunSpec, class_names: Sequence[str]) -> None:
    """Warns when the weights of ``init.path`` hold a head of this task for as many classes as
    the data's, but other ones or in another order: it is loaded as it is (without
    ``init.replace_head`` or ``init.dont_load``), its outputs meaning its own classes."""
    init = spec.init
    if not init.path or init.replace_head or init.dont_load:
        return
    try:
        if weights.detect_format(init.path) == "run":
            record = weights.read_record(init.path, "best")
            theirs, task = record.class_names, record.config["task"]["name"]
        else:  # only classifiers
            theirs, task = weights.class_names(init.path), "classification"
    except (WeightFormatError, OSError, ValueError, KeyError, TypeError):
        return  # loading them names the problem
    if task != spec.task.name:  # another task's head is not loaded
        return
    if theirs and len(theirs) == len(class_names) and list(theirs) != list(class_names):
        how = "in another order" if sorted(theirs) == sorted(class_names) else "other classes"
        logger.warning(
            "%s holds a head for as many classes as the data's, %s (%s; the data's %s): it is "
            "loaded as it is; set init.replace_head=True for a new one.", init.path, how,
            ", ".join(list(theirs)[:5]), ", ".join(list(class_names)[:5]),
        )  # fmt: skip


def _recorded_contract(ckpt: Checkpointer) -> InputContract | None:
    """The input contract the newest complete checkpoint's run record holds, if it records
    every part of it (runs of earlier versions recorded no crop mode: None)."""
    meta = _newest_meta(ckpt)
    if not meta or not {"interpolation", "crop_mode"} <= (meta.get("input") or {}).keys():
        return None
    try:
        return RunRecord.from_json(meta).contract(ckpt.directory)
    except WeightFormatError:
        return None


def _check_batch_sizes(spec: specs.RunSpec, mesh: jax.sharding.Mesh) -> None:
    accum_steps, dp = spec.grad_accum_steps, sharding.data_parallel_size(mesh)
    for name, size in (("batch_size", spec.batch_size), ("eval_batch_size", spec.eval_batch_size)):
        if size % dp:
            raise ValueError(
                f"{name} {size} is not divisible by the {dp} data-parallel devices of mesh "
                f"{dict(mesh.shape)}."
            )
    if accum_steps < 1 or spec.batch_size % (accum_steps * dp):
        raise ValueError(
            f"batch_size {spec.batch_size} must split into grad_accum_steps={accum_steps} "
            f"micro-batches divisible by the {dp} data-parallel devices."
        )


def _warn_of_padding(
    spec: specs.RunSpec, mesh: jax.sharding.Mesh, sources: list[data_lib.Source]
) -> None:
    """A warning when ``eval_batch_size`` exceeds every evaluated split: each evaluation
    computes (and holds) the whole batch, the rest padding."""
    largest, dp = max(s.num_examples for s in sources), sharding.data_parallel_size(mesh)
    enough = max(dp, -(-largest // dp) * dp)  # rounded up to the data-parallel devices
    if spec.eval_batch_size > enough:
        logger.warning(
            "eval_batch_size %d exceeds the %d examples of the largest split evaluated: each "
            "batch is padded to %d rows (memory and compute); eval_batch_size=%d is enough.",
            spec.eval_batch_size, largest, spec.eval_batch_size, enough,
        )  # fmt: skip


def _load_data(
    spec: specs.RunSpec, arrays: Mapping | None
) -> tuple[data_lib.Source, data_lib.Source, data_lib.Source | None]:
    """The train, eval and (when ``data.val_split`` is set) validation sources."""
    data, target = spec.data, spec.task.target
    load = lambda split: data_lib.load_source(data, split, arrays=arrays, target=target)
    train, evaluation = load(data.train_split), load(data.eval_split)
    if target == "label" and train.num_classes < 2:
        raise data_lib.DataError(
            f"The train split holds {train.num_classes} class ({', '.join(train.class_names)}): "
            "a classifier needs at least 2 (data.classes, or the class folders)."
        )
    if spec.task.per_class_metrics:
        _check_class_keys(train.class_names, spec.task.per_class_metrics[0])
    validation = None if data.val_split is None else load(data.val_split)
    splits = {"eval": evaluation, "val": validation}
    for name, other in splits.items():
        if other is not None and other.column_spec != train.column_spec:
            (shape, dtype), (other_shape, other_dtype) = train.column_spec, other.column_spec
            raise data_lib.DataError(
                f"The train and {name} splits' {target!r} values differ: "
                f"{np.dtype(dtype).name} {shape} per example in train, "
                f"{np.dtype(other_dtype).name} {other_shape} in {name}."
            )
        if other is not None and other.class_names != train.class_names:
            split = data.eval_split if name == "eval" else data.val_split
            if (mapped := data_lib.as_classes(other, train.class_names, split)) is not None:
                splits[name] = mapped  # a split lacking some of train's classes
                continue
            only = lambda a, b: ", ".join(sorted(set(a) - set(b))) or "none"
            train_only, other_only = (only(train.class_names, other.class_names),
                                      only(other.class_names, train.class_names))  # fmt: skip
            how = f"only in train: {train_only}; only in {name}: {other_only}"
            if train_only == other_only == "none":
                orders = f"train: {_order(train)}; {name}: {_order(other)}"
                how = f"the same ones in another order ({orders})"
            raise data_lib.DataError(f"The train and {name} splits have different classes: {how}.")
    return train, splits["eval"], splits["val"]


def _target_record(source: data_lib.Source) -> dict[str, Any]:
    """The shape and dtype a run records of a target column of one's own (evaluations of the
    run compare a split's with them); nothing for other targets."""
    if source.column_spec is None:
        return {}
    shape, dtype = source.column_spec
    return {"target_shape": tuple(shape), "target_dtype": np.dtype(dtype).name}


def _check_class_keys(class_names: Sequence[str], metric: str) -> None:
    """Refuses two classes whose per-class results would share a name (``<metric>/<key>``,
    :func:`~vision_jax.tasks.base.class_key`): one would overwrite the other."""
    seen: dict[str, str] = {}
    for name in class_names:
        key = class_key(name)
        if key in seen:
            raise data_lib.DataError(
                f"The classes {seen[key]!r} and {name!r} would both report as {metric}/{key} "
                "(a '/' in a class name becomes '_'): rename one."
            )
        seen[key] = name


def _order(source: data_lib.Source) -> str:
    """A source's classes in order, the first 8, with their COCO category ids if it has any."""
    categories = (source.annotations or {}).get("categories")
    names = source.class_names
    if categories:  # detection: classes in the order of their ids
        ids = {c["name"]: c["id"] for c in categories}
        names = [f"{n} (id {ids[n]})" for n in names]
    return ", ".join(names[:8]) + (", ..." if names[8:] else "")


def task_model(spec: specs.RunSpec, num_classes: int) -> nn.Module:
    """The model of ``spec``: its task's head on its backbone, in its compute dtype."""
    if spec.model_dtype not in DTYPES:
        raise ValueError(f"Unknown model.dtype {spec.model_dtype!r}; valid: {', '.join(DTYPES)}.")
    model = spec.task.build_model(
        spec.model_name, num_classes, dtype=DTYPES[spec.model_dtype], **spec.model_overrides
    )
    _check_posemb_grid(backbone_of(model), spec.input.image_size)
    return model


def _check_posemb_grid(backbone: nn.Module, size: int) -> None:
    """Refuses a ``model.posemb_grid`` that is not the patch grid of ``input.image_size``: a
    run's images are square (the model's own error names ``create_model``)."""
    grid = getattr(backbone, "posemb_grid", None)
    if grid is None:
        return
    side, patch = size // backbone.patch_size, backbone.patch_size
    if tuple(grid) != (side, side):
        other = f" or set input.image_size={grid[0] * patch}" if grid[0] == grid[1] else ""
        raise specs.ConfigError(
            f"model.posemb_grid {tuple(grid)} is not the grid of input.image_size {size} "
            f"({side}x{side} patches of {patch}x{patch} pixels): a run's images are square, "
            "input.image_size on each side, and so is its grid; leave model.posemb_grid unset "
            f"(the square grid of input.image_size){other}."
        )


def abstract_state(state: TrainState) -> Any:
    """Shapes, dtypes and shardings of ``state``, to restore into."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
    )


def _restore(
    ckpt: Checkpointer, state: TrainState, frozen: Any, spec: specs.RunSpec, train_data: dict,
    total_steps: int, model: nn.Module,
) -> tuple[TrainState, int, int | None, dict]:  # fmt: skip
    """The newest readable checkpoint's state (in the current shardings), step, this
    process's data stream position (None: ``step * local batch``) and meta, or the fresh
    state. ``train_data``: the training split's fingerprint (``Source.fingerprint``)."""
    try:
        restored = _restore_latest(ckpt, state)
    except CheckpointMismatchError as error:
        raise _with_layout_changes(error, ckpt, spec, model) from error
    if restored is None and trees.is_abstract(state):  # has_steps() said there were some
        raise CheckpointError(f"The checkpoints in {ckpt.directory} disappeared during setup.")
    if not ckpt.has_frozen:  # a fresh run's, or one of an earlier version's runs read them
        ckpt.save_frozen(frozen)
    if restored is None:
        return state, 0, None, {}
    state, meta = restored
    step = int(state.step)
    where = f"{ckpt.directory} (step {step})"
    # A finished run (or one stopped early) started again only evaluates again: refused, as a
    # resume is, on other training examples (it would report the run trained on the first ones).
    finished = _ends_recipe(step, total_steps, meta)
    if finished:
        _check_finished_recipe(spec, meta, where)
    position = _resume_position(spec, meta, train_data, where, finished=finished)
    logger.info("Resumed from %s at step %d.", ckpt.directory, step)
    return state, step, position, meta


def note_continuation(run: Run) -> None:
    """:func:`_note_continuation` for ``run``'s restored step: called by the loop once setup
    succeeded (a resume refused, or failing during setup, leaves the step's meta as it was)."""
    step, meta, total = run.start_step, run.restored_meta, run.total_steps
    if step:
        _note_continuation(
            run.checkpointer, step, meta, None if _ends_recipe(step, total, meta) else total
        )


def _ends_recipe(step: int, total_steps: int, meta: Mapping[str, Any]) -> bool:
    """Whether a checkpoint of ``step`` (its ``meta``) ends a recipe of ``total_steps``: the
    last step, or a run stopped early."""
    return step >= total_steps or bool(meta.get("stopped_early"))


def _note_continuation(
    ckpt: Checkpointer, step: int, meta: Mapping[str, Any], total: int | None
) -> None:
    """Records on a step that ended its recipe (``final``) that the run trains on from it to
    step ``total`` (``continued_to``; None: it does not, a note of an earlier resume goes):
    readers of that step warn that it is not the run's end, also once the longer run's steps are
    gone (:func:`~vision_jax.weights.run_dir.warn_if_unfinished`). Rotation keeps it still."""
    if not meta.get("final") or meta.get("continued_to") == total or jax.process_index():
        return  # (process 0 writes; no save is in flight yet, so its wait is no collective)
    meta = ckpt.read_meta(step) or meta  # (as the restored step's pending evaluation left it)
    noted = {k: v for k, v in meta.items() if k != "continued_to"}
    if total is not None:
        noted["continued_to"] = total
    ckpt.update_meta(step, noted)


# Fields earlier versions' checkpoints lack, newest first: the EMA of the model state, then
# the non-finite guard's skip counts.
_ADDED_FIELDS = ("ema_model_state", "skips")


def _restore_latest(ckpt: Checkpointer, state: TrainState) -> tuple[TrainState, dict] | None:
    """``ckpt.restore_latest`` into ``state``'s shapes and shardings (:func:`restore_into`)."""
    return restore_into(ckpt.restore_latest, state)


def restore_into(
    read: Callable[[Any], tuple[Any, dict] | None], state: TrainState
) -> tuple[TrainState, dict] | None:
    """``read(abstract)`` (a checkpoint's state values and meta, or None) into ``state``'s
    shapes and shardings. A checkpoint of an earlier layout (:data:`_ADDED_FIELDS`) restores
    with the skip counts at zero and the EMA's model state from the restored model state."""
    try:
        return read(abstract_state(state))
    except CheckpointError as error:
        for count in range(1, len(_ADDED_FIELDS) + 1):
            missing = _ADDED_FIELDS[:count]
            fields = [f.name for f in dataclasses.fields(state) if f.name not in missing]
            abstract = {f: abstract_state(getattr(state, f)) for f in fields}
            with contextlib.suppress(CheckpointError):
                restored = read(abstract)
                break
        else:
            raise error from None
    if restored is None:
        return None
    values, meta = restored
    if "skips" in missing:
        logger.warning("The checkpoint has no skip counts (an earlier version's): counting anew.")
        shardings = jax.tree.map(lambda x: x.sharding, state.skips)
        zeros = lambda: SkipCounts.filled(jnp.zeros((), jnp.int32))
        values["skips"] = jax.jit(zeros, out_shardings=shardings)()
    if state.ema_model_state is not None:  # an earlier version's EMA of the parameters alone
        if jax.tree.leaves(values["model_state"]):  # BatchNorm statistics (a ViT has none)
            logger.warning(
                "The checkpoint's EMA has no model state (an earlier version's): the EMA's "
                "BatchNorm statistics start from the restored ones."
            )
        values["ema_model_state"] = jax.tree.map(jnp.copy, values["model_state"])
    else:
        values["ema_model_state"] = None
    return TrainState(**values), meta


# Config keys that decide what the train state holds (a restore that does not fit names them;
# turning clipping, SGD's weight decay or momentum, or learning-rate multipliers on or off
# changes the optimizer chain's members).
_LAYOUT_KEYS = (
    "model", "lora", "task", "ema_decay", "input.image_size", "optimizer.trainable",
    "optimizer.frozen_params", "optimizer.name", "optimizer.mu_dtype", "data.source",
    "data.name", "data.root", "data.classes", "data.class_names", "optimizer.grad_clip_norm",
    "optimizer.weight_decay", "optimizer.momentum", "optimizer.lr_mults", "optimizer.layer_decay",
)  # fmt: skip


def _with_layout_changes(
    error: CheckpointMismatchError, ckpt: Checkpointer, spec: specs.RunSpec, model: nn.Module
) -> CheckpointMismatchError:
    """``error`` naming the config changes since that checkpoint that decide the state's layout
    (when there are some), or the blocks after the last feature tap that an earlier version
    trained, and how to start from its weights instead."""
    step = ckpt.newest_complete_step()
    saved = (ckpt.read_meta(step) or {}).get("config") if step is not None else None
    in_layout = lambda key: any(key == k or key.startswith(f"{k}.") for k in _LAYOUT_KEYS)
    changes = _config_changes(saved, spec, in_layout) if saved else []
    weights = f"another --workdir with --config.init.path={os.path.dirname(ckpt.directory)}"
    unused = optim.never_run(model)
    if not changes and unused and re.search(unused, error.diff):
        return CheckpointMismatchError(
            error.where, error.arrays,
            cause="the blocks after the last feature tap never run, and this version no longer "
            "trains them: the earlier version that wrote the run did",
            advice=f"Finish the run with that version, or train from its weights: {weights}.",
        )  # fmt: skip
    if not changes:
        return error
    probe = any(c.startswith("optimizer.trainable") for c in changes)  # then fine-tuning
    return CheckpointMismatchError(
        error.where, error.arrays, changes="; ".join(changes),
        advice="To train from its weights with these settings"
        f"{' (a linear probe, then full fine-tuning)' if probe else ''}, use {weights}.",
    )  # fmt: skip


# Config keys that decide the training stream: a resume that changes them is refused.
_STREAM_KEYS = ("batch_size", "seed") + tuple(
    f"data.{k}"
    for k in (
        "source", "name", "root", "class_names", "train_split", "classes", "label_map_values",
        "coco_annotations", "coco_images", "shuffle_buffer",
    )
)  # fmt: skip
# Keys besides the recipe that a finished run's restart refuses: its training stream's (a seed or
# batch-size sweep reusing the workdir) and its validation split (the best was chosen on it);
# the data's location may change (moved files evaluate as before).
_FINISHED_STREAM_KEYS = ("seed", "batch_size", "data.train_split", "data.val_split")
# Config sections of the training recipe: a resume may change them (to train longer, say), warned.
_RECIPE_SECTIONS = (
    "total_steps", "total_epochs", "grad_accum_steps", "ema_decay", "ema_warmup",
    "label_smoothing", "loss",
    "optimizer", "schedule", "input", "task", "lora", "model",
)  # fmt: skip
_SELECTION_KEYS = ("metric", "mode", "min_delta", "patience")


def _check_selection(
    spec: specs.RunSpec, val_source: data_lib.Source, total_steps: int, fresh: bool
) -> None:
    """Warns of an ``early_stopping.patience`` with too few validations before the last step
    to stop the run (``fresh``: a new run; resumed longer, it may) and refuses, before
    training, an ``early_stopping.metric`` that the validation will not report (for a task
    that declares its :attr:`~vision_jax.tasks.base.Task.metric_names`; found at the first
    validation, the steps before it were lost) or that ``val_source``'s ground truth can
    never give (:meth:`~vision_jax.tasks.base.Task.unmeasurable`: no best would be kept)."""
    patience, every = spec.early_stopping.patience, spec.eval_every_steps
    before_last = (total_steps - 1) // every if every else 0  # validations before the last step
    if fresh and patience is not None and before_last < patience + 1:  # (a longer run may)
        logger.warning(
            "early_stopping.patience=%d cannot stop this run: it needs %d validations before "
            "the last step, and eval_every_steps=%d gives %d of %d steps.",
            patience, patience + 1, every, before_last, total_steps,
        )  # fmt: skip
    task = spec.task
    metric = Selection.from_spec(
        spec.early_stopping, task.headline, task.headline_mode, task.per_class_metrics
    ).metric
    _check_metric_name(task, metric, val_source.class_names)
    why = task.unmeasurable(metric.partition("/")[2], val_source)
    if why:
        raise specs.ConfigError(
            f"early_stopping.metric {metric!r} can never be measured on the validation split "
            f"{spec.data.val_split!r}: {why}."
        )


def _check_headline(task: Any) -> None:
    """Refuses, before training, a task whose headline is not among the results its class
    declares (:meth:`~vision_jax.tasks.base.Task.declared_metrics`)."""
    declared = task.declared_metrics()
    if declared is not None and task.headline not in declared[0]:
        raise ValueError(
            f"{type(task).__name__}.headline {task.headline!r} is not among its metric_names "
            f"({', '.join(declared[0])}): the headline is the result of its summarize that sums "
            "up an evaluation."
        )


def _check_metric_name(task: Any, metric: str, class_names: Sequence[str]) -> None:
    """Refuses a selection ``metric`` that is not a validation result of ``task`` (where its
    class declares its results)."""
    declared = task.declared_metrics()
    if declared is None:
        return
    names, per_class_names = declared
    prefix, _, name = metric.partition("/")
    per_class = {f"{m}/{class_key(c)}" for m in per_class_names for c in class_names}
    if prefix in ("val", "val_ema") and (name in names or name in per_class):
        return  # (val_ema without ema_decay: refused by the spec)
    valid = [f"val/{n}" for n in names] + [f"val/{m}/<class>" for m in per_class_names]
    close = difflib.get_close_matches(metric, [f"val/{n}" for n in (*names, *per_class)])
    hint = f" (closest: {', '.join(close)})" if close else ""
    raise specs.ConfigError(
        f"early_stopping.metric {metric!r} is not a validation result of a {task.name} run"
        f"{hint}; valid: {', '.join(valid)} (val_ema/... with ema_decay)."
    )


def _resumed_selection(
    spec: specs.RunSpec, saved: Mapping[str, Any], finished: bool, where: str
) -> Selection:
    """The run's model selection with the progress its checkpoint saved. A selection that
    changed since, as resolved (an unset metric is the task's ``val/<headline>``), is refused
    for a finished run or one stopped early (its best was chosen by the old one; without a
    best, no validation is left for the new one to choose from) and warned
    for a resumed one (a new metric or mode starts its progress anew, as another
    ``data.val_split`` does)."""
    task = spec.task
    selection = Selection.from_spec(
        spec.early_stopping, task.headline, task.headline_mode, task.per_class_metrics
    )
    old = saved.get("selection") or {}
    changes = [
        f"early_stopping.{k} {old[k]} -> {getattr(selection, k)}"
        for k in _SELECTION_KEYS
        if k in old and old[k] != getattr(selection, k)
    ]
    if changes and finished:
        other = f"another selection ({'; '.join(changes)})"
        why = f"; its best was chosen by {other}"
        if old.get("best_step") is None:  # it validates no more: the new one has nothing either
            why = (f" without a best (no validation gave a finite {old.get('metric')}); "
                   f"{other} has no validations to choose from")  # fmt: skip
        raise CheckpointError(
            f"The run in {where} has {_ended(saved)}{why}. Use another --workdir to select with it."
        )
    if changes:
        logger.warning("Resuming %s with a changed model selection: %s.", where, "; ".join(changes))
    split = _config_changes(saved.get("config") or {}, spec, "data.val_split".__eq__)
    if split and not finished:  # (those refuse it)
        logger.warning(
            "Resuming %s with another validation split (%s): the model selection starts anew "
            "(its best so far was measured on the old split).", where, split[0],
        )  # fmt: skip
        return selection
    return selection.resumed(old)


@functools.cache
def _default_leaves() -> dict[str, Any]:
    """The default config's leaves by dotted key (read only; a resume compares several times)."""
    return _dotted(default_config().to_dict())


def _config_changes(
    saved: Mapping[str, Any], spec: specs.RunSpec, compared: Callable[[str], bool]
) -> list[str]:
    """``key old -> new`` for each leaf (dotted key) that ``compared`` names and that changed
    since ``saved``. A key ``saved`` lacks (an earlier version had none) counts as its default
    (:func:`~vision_jax.config.default_config`), where that is a value (not None: resolved
    later) in a section ``saved`` has; other keys only one of them has are not compared. A key
    unset now (None, its default) is no change from a saved config that spelled the default
    out (an earlier version's), nor a key of a part now off (LoRA). A path (data.root,
    init.path) an earlier version recorded relative is compared as it reads now: against the
    current directory."""
    old, new = _dotted(specs.absolute_paths(saved)), _dotted(spec.config)
    sections = {k.rpartition(".")[0] for k in old}
    for key, value in _default_leaves().items():
        if key not in old and value is not None and key.rpartition(".")[0] in sections:
            old[key] = value  # (a key of a section saved as a leaf, lora: None, is not added)
    return [
        f"{k} {_plain(old[k])} -> {_plain(new[k])}"
        for k in sorted(old.keys() & new.keys())
        if compared(k)
        and not _same(old[k], new[k])
        and not (new[k] is None and _default_is(spec, k, old[k]))
    ]


def _default_is(spec: specs.RunSpec, key: str, saved: Any) -> bool:
    """Whether the unset ``key`` resolves in ``spec`` to the ``saved`` value (or is unused:
    the part it belongs to is off)."""
    section, _, name = key.partition(".")
    if not name:
        owner, name = (spec.task, key) if key in TASK_TOP_LEVEL else (spec, key)
    else:
        owner = spec.task if section == "task" else getattr(spec, section, _MISSING)
    if owner is _MISSING:  # a section without a spec of its own (model.*): compared as set
        return False
    if owner is None:  # the part is off
        return True
    resolved = getattr(owner, name, _MISSING)
    return resolved is not _MISSING and _same(resolved, saved)


def _same(a: Any, b: Any) -> bool:
    """Whether two config values are the same; numbers by value (a float key's int default,
    10000.0 is 10_000; an int key a dict config held as 4.0, which this version refuses)."""
    number = lambda v: isinstance(v, int | float) and not isinstance(v, bool)
    if number(a) and number(b):
        return float(a) == float(b)
    return _plain(a) == _plain(b)


def _dotted(config: Mapping[str, Any]) -> dict[str, Any]:
    """A nested config as ``{"section.key": leaf}``."""
    return {k.replace("/", "."): v for k, v in trees.flatten_dict(config).items()}


_MISSING = object()
_plain = lambda value: json.dumps(value, sort_keys=True, default=str)  # tuples as lists


def _resume_position(
    spec: specs.RunSpec, meta: Mapping[str, Any], train_data: dict | None, where: str,
    finished: bool = False,
) -> int | None:  # fmt: skip
    """This process's data stream position saved in ``meta``; refuses (unless
    ``resume_changed_data``) a resume whose training stream changed: its config keys, the
    number of processes, or the training examples themselves (``train_data``, files added,
    removed or relabelled since the checkpoint; None: not compared). A ``data.root`` moved is
    no change where the fingerprint has a digest of the files (names relative to their folder,
    labels) that is unchanged: one info line names the move. ``finished``: the run ended its
    recipe, nothing is resumed; the same change is refused, as a report again. A tfds
    checkpoint of another ``STREAM_ORDER`` (an earlier version's) resumes with a warning: its
    positions name other examples."""
    positions = meta.get("data_positions")
    processes = None if positions is None else len(positions)
    saved = meta.get("config") or {}
    saved_data = meta.get("train_data") if train_data is not None else None
    data = [] if saved_data is None else _agreed(_data_changes(saved_data, train_data))
    # The same files moved: their digest (names relative to their folder, labels, count) holds.
    same = saved_data is not None and not data and "digest" in saved_data
    # The same tfds dataset and records, its version named now (data.name="name:1.0.0")
    pinned = saved_data is not None and not data and "dataset" in saved_data
    stream = lambda key: (
        key in _STREAM_KEYS
        and not ((same and key == "data.root") or (pinned and key == "data.name"))
    )
    changes = _config_changes(saved, spec, stream) + data  # (earlier versions: no train_data)
    doing = "Reporting %s again" if finished else "Resuming %s"
    if same and (moved := _config_changes(saved, spec, "data.root".__eq__)):
        logger.info(f"{doing} with the training data moved (%s): the same files and labels "
                    "as the checkpoint recorded.", where, moved[0])  # fmt: skip
    if processes is not None and processes != jax.process_count():
        changes.append(f"processes {processes} -> {jax.process_count()}")
    if changes and not spec.resume_changed_data and finished:
        raise CheckpointError(
            f"Cannot report {where} again as it trained: {'; '.join(changes)}. The run has "
            f"{_ended(meta)} on the training data its checkpoint recorded; set "
            "resume_changed_data=True to report it again anyway, or use another --workdir."
        )
    if changes and not spec.resume_changed_data:
        raise CheckpointError(
            f"Cannot resume {where} exactly: {'; '.join(changes)}. The training data cannot "
            "continue where it stopped; set resume_changed_data=True to resume anyway, or use "
            "another --workdir."
        )
    if changes:
        logger.warning(f"{doing} although %s.", where, "; ".join(changes))
    if recipe := _config_changes(saved, spec, _in_recipe):
        logger.warning("Resuming %s with a changed recipe (training goes on with the new "
                       "values): %s.", where, "; ".join(recipe))  # fmt: skip
    reordered = meta.get("stream_order") != data_lib.STREAM_ORDER  # positions name others
    if reordered and not finished and spec.data.source == "tfds":  # (a stream read in order)
        logger.warning(
            "Resuming %s in another example order than its run read the tfds split in (saved "
            "by an earlier version; each epoch is now shuffled anew): the resume is not exact, "
            "the examples from here on are not those the interrupted run would have read.", where
        )  # fmt: skip
    if positions is None:
        return None
    if len(positions) == jax.process_count():
        return int(positions[jax.process_index()])
    return sum(positions) // jax.process_count()  # as many examples consumed in all


def _check_finished_recipe(spec: specs.RunSpec, meta: Mapping[str, Any], where: str) -> None:
    """A finished run started again only evaluates again: a changed recipe would train nothing
    (a sweep reusing a workdir got the first run's metrics back), or evaluate and report the
    trained model with another input than it trained with, over its report; so would another
    seed, batch size or training split (even with ``resume_changed_data``). Refused."""
    saved = meta.get("config") or {}
    compared = lambda key: _in_recipe(key) or key in _FINISHED_STREAM_KEYS
    if changes := _config_changes(saved, spec, compared):
        # Training on (a higher total_steps) helps unless the stream changed too.
        stream = _config_changes(saved, spec, _FINISHED_STREAM_KEYS.__contains__)
        longer = "" if meta.get("stopped_early") or stream else ", or raise total_steps to train on"
        raise CheckpointError(
            f"The run in {where} has {_ended(meta)}; with the changed recipe "
            f"({'; '.join(changes)}) it would train nothing. Use another --workdir to train "
            f"with it{longer}."
        )


def _ended(meta: Mapping[str, Any]) -> str:
    """How a run whose checkpoint recorded ``meta`` ended: "stopped early", "finished", or
    stopped before the end its recipe gave (a signal: a shorter recipe now ends it there)."""
    if meta.get("stopped_early"):
        return "stopped early"
    if meta.get("final") is False:  # (checkpoints of earlier versions record no "final")
        return f"stopped before its end (step {meta.get('total_steps')} of its recipe)"
    return "finished"


def _in_recipe(key: str) -> bool:
    """Whether a config key is part of the training recipe (:data:`_RECIPE_SECTIONS`; not
    where a task's or a model's code lives)."""
    return key.split(".")[0] in _RECIPE_SECTIONS and key not in ("task.module", "model.module")


def _agreed(changes: list[str]) -> list[str]:
    """``changes`` of this process's training files, or, where only another process's files
    changed (hosts with copies of their own), that: every process refuses alike."""
    anywhere = any_process(bool(changes))
    return changes or (["the training examples changed on another process"] if anywhere else [])


def _data_changes(saved: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    """How the training split's fingerprint changed since the checkpoint, in words."""
    counts = [
        f"training {what} {saved[key]} -> {now[key]}"
        for key, what in (("examples", "examples"), ("boxes", "boxes"))
        if key in saved and key in now and saved[key] != now[key]
    ]
    if "dataset" in saved and "dataset" in now:  # a tfds split (earlier versions: no dataset)
        recorded = saved["dataset"]
        if recorded != now["dataset"]:
            return [
                f"tfds dataset {recorded} -> {now['dataset']} (a name without a version reads "
                "the newest prepared; to read the one the run trained on, set data.name="
                f"{data_lib.pinned_tfds_name(recorded)!r})", *counts,
            ]  # fmt: skip
        if saved.get("records") != now.get("records"):
            return [*counts, f"the records of tfds dataset {recorded} changed (prepared again)"]
    if counts or saved.get("digest") == now.get("digest"):
        return counts
    return ["the training examples changed (files, labels or their order; as many as before)"]


def _saved_learning_rate(saved: Mapping[str, Any], step: int, steps_per_epoch: int) -> float:
    """The learning rate that the saved config's schedule gives ``step``."""
    config = saved_with_defaults(saved)
    with specs.saved_config():
        opt, schedule = specs.optimizer_spec(config.optimizer), specs.schedule_spec(config.schedule)
    total = specs.training_steps(
        config.get("total_steps"), config.get("total_epochs"), steps_per_epoch
    )
    numbers = optim.schedule_numbers(
        schedule, base_lr=float(opt.learning_rate), total_steps=total,
        steps_per_epoch=steps_per_epoch,
    )  # fmt: skip
    return float(optim.schedule_value(schedule.decay, numbers, step))


def _note_learning_rate_change(
    spec: specs.RunSpec, optimizer: optim.Optimizer, meta: Mapping[str, Any], step: int,
    count: int, steps_per_epoch: int,
) -> None:  # fmt: skip
    """Warns when the resumed run's schedule (a longer run, another learning rate) gives the
    next update (after ``step``; the schedule's ``count`` of updates applied) another learning
    rate than the saved run's schedule would have."""
    try:
        before = _saved_learning_rate(meta.get("config") or {}, count, steps_per_epoch)
    except (AttributeError, KeyError, TypeError, ValueError):  # older or partial records
        return
    after = float(optim.schedule_value(spec.schedule.decay, optimizer.numbers["schedule"], count))
    if abs(after - before) > 1e-3 * max(abs(before), abs(after)):
        logger.warning(
            "The learning rate of step %d is %.4g under this run's schedule, where the saved "
            "run's would have given %.4g (the schedule is computed over this run's length).",
            step + 1, after, before,
        )  # fmt: skip


def _warn_of_a_slow_ema(spec: specs.RunSpec, total_steps: int) -> None:
    """Warns when, without ``ema_warmup``, the EMA would still hold more than half the initial
    weights after the run's last step (``ema_decay ** total_steps > 0.5``)."""
    if spec.ema_decay is None or spec.ema_warmup:
        return
    initial = spec.ema_decay**total_steps
    if initial > 0.5:
        logger.warning(
            "ema_decay=%g over %d steps: the EMA weights would still be %.0f%% the initial "
            "weights at the end (ema_decay ** total_steps = %.3g); set ema_warmup=True (timm's "
            "EMA warmup), a lower ema_decay, or train longer.",
            spec.ema_decay, total_steps, 100 * initial, initial,
        )  # fmt: skip


def _step_settings(
    spec: specs.RunSpec, setup: Setup, mesh: jax.sharding.Mesh, rng: jax.Array
) -> StepSettings:
    """The train step's settings (the dropout key, the optimizer's numbers, the EMA's step),
    replicated: inputs of the compiled step, not constants in it."""
    ema_step = None if spec.ema_decay is None else np.float32(1.0 - spec.ema_decay)
    warmup = np.float32(EMA_WARMUP_POWER) if spec.ema_warmup else None
    settings = StepSettings(rng, setup.optimizer.numbers, ema_step, warmup)
    # Global arrays, as the fresh state: every process builds the same values from the config.
    return jax.jit(lambda s: s, out_shardings=sharding.replicated(mesh))(settings)


def _compile_steps(
    spec: specs.RunSpec, model: nn.Module, setup: Setup, mesh: jax.sharding.Mesh
) -> tuple[Any, dict[str, Any]]:
    """The jitted train step (``step(state, frozen, batch, settings)``) and the eval steps
    (params, and with EMA the EMA params)."""
    dtype = getattr(model, "dtype", jnp.float32)
    xla_options = step_compiler_options(dtype)
    backbone = backbone_of(model)
    # as the model was built (a module of one's own without remat fields: none)
    remat = recomputes(*(getattr(backbone, k, v) for k, v in REMAT_DEFAULTS.items()))
    task, adapters = spec.task, spec.lora
    train_step = jax.jit(
        make_train_step(
            model, setup.optimizer.transform, task, lora=adapters,
            accum_steps=spec.grad_accum_steps, mesh=mesh,
        ),
        donate_argnums=0,
        out_shardings=(setup.shardings, sharding.replicated(mesh)),
        compiler_options=step_compiler_options(dtype, remat=remat),
    )  # fmt: skip
    eval_step = jax.jit(  # metrics replicated: every host merges whole batches
        make_eval_step(model, task, lora=adapters, mesh=mesh),
        out_shardings=(sharding.replicated(mesh), sharding.batch_sharding(mesh)),
        compiler_options=xla_options,
    )
    return train_step, eval_step


def build_run(
    config: ml_collections.ConfigDict | Mapping[str, Any],
    workdir: str,
    *,
    arrays: Mapping[str, tuple[np.ndarray, np.ndarray] | Mapping[str, np.ndarray]] | None = None,
    exit_on_lost_lock: bool = False,
) -> Run:
    """Everything a run needs, from the config (every key read, or an error), resumed from
    ``workdir``'s newest readable checkpoint if it has one. The workdir stays locked
    (:class:`vision_jax.lock.WorkdirLock`, its ``exit_on_loss`` ``exit_on_lost_lock``) until
    :meth:`Run.close`."""
    started = time.perf_counter()
    load_if_url(workdir)  # before orbax and the compilation cache read it through epath
    tracked = TrackedConfig(config)
    spec = specs.run_spec(tracked)
    tracked.check_all_read()
    _check_same_config({**spec.config, "--workdir": workdir})
    lock, ckpt = WorkdirLock(workdir, exit_on_loss=exit_on_lost_lock).acquire(), None
    try:
        ckpt = Checkpointer(
            workdir, every_steps=spec.checkpoint_every_steps, keep=spec.keep_checkpoints,
            lock=lock,
        )  # fmt: skip
        return dataclasses.replace(_build(spec, workdir, arrays, ckpt), started=started)
    except BaseException:
        if ckpt is None:
            lock.release()
        else:  # releases the lock; a checkpoints folder this call made goes again
            ckpt.close()
        raise


def _own_best(spec: specs.RunSpec, workdir: str, step: int, meta: Mapping[str, Any]) -> bool:
    """Whether the best checkpoint of ``step`` (its ``meta``), in a workdir whose checkpoints
    folder was there already but holds no step, is one this run's command saved before it was
    cut short (an error, a crash, a kill; the caller checks the folder: a finished run's was
    deleted): saved with this config, at a step no later than that run's first step checkpoint
    (every step checkpoint after a best is saved once it is complete). Such a run starts over,
    its best chosen again, as it did; a later step, or another config, is an earlier run's."""
    config = meta.get("config") or {}
    every, total = config.get("checkpoint_every_steps"), meta.get("total_steps")
    if not isinstance(every, int) or not isinstance(total, int):
        return False
    first_save = every if 0 < every < total else total
    if step > first_save or _config_changes(config, spec, lambda key: True):
        return False
    logger.warning(
        "The best checkpoint of step %d in %s was saved by a run of this config cut short "
        "before its first step checkpoint (step %d): starting over, the best is chosen again.",
        step, os.path.join(workdir, BEST_DIR), first_save,
    )  # fmt: skip
    return True


def _digest(text: bytes) -> np.ndarray:
    """Eight bytes of ``text``'s SHA-256 as two int32 (what a process all-gathers to compare:
    JAX's default integers are 32 bits)."""
    return np.frombuffer(hashlib.sha256(text).digest()[:8], np.int32)


def _check_same_config(config: Mapping[str, Any]) -> None:
    """Raises in every process of a multi-process run whose processes were started with
    different configs (each would feed its own values to one program, or wait for the others
    at another step), paths and workdir included; the processes that differ name the keys,
    against process 0's."""
    if jax.process_count() == 1:
        return
    text = np.frombuffer(_plain(config).encode(), np.uint8)
    digests = np.asarray(multihost_utils.process_allgather(_digest(text.tobytes()))).reshape(-1, 2)
    differ = [i for i, d in enumerate(digests) if (d != digests[0]).any()]
    if not differ:
        return
    size = int(multihost_utils.broadcast_one_to_all(np.int32(text.size)))
    mine = text if jax.process_index() == 0 else np.zeros(size, np.uint8)
    first = json.loads(np.asarray(multihost_utils.broadcast_one_to_all(mine)).tobytes())
    old, new = ({k: _plain(v) for k, v in _dotted(c).items()} for c in (first, config))
    keys = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    named = "; ".join(f"{k} {new.get(k, 'unset')} here, {old.get(k, 'unset')} there" for k in keys)
    raise specs.ConfigError(
        f"The processes were started with different configs: processes {differ} differ from "
        f"process 0{f' ({named})' if named else ''}. Start every process with the same config "
        "file and flags."
    )


def _check_same_data(
    spec: specs.RunSpec, sources: Mapping[str, data_lib.Source | None]
) -> dict[str, int | str]:
    """The training split's fingerprint (``Source.fingerprint``); raises in every process of a
    multi-process run whose processes were given different data for a split (arrays of their
    own, or copies of a folder that differ in names or labels: each would feed its own examples
    to one program, and its metrics would be a blend). Only a hash of each fingerprint and its
    number of examples cross processes."""
    if jax.process_count() == 1:
        return sources["train"].fingerprint()
    prints = {name: None if s is None else s.fingerprint() for name, s in sources.items()}
    mine = []
    for fingerprint in prints.values():
        examples = -1 if fingerprint is None else fingerprint["examples"]
        mine.append([*_digest(_plain(fingerprint).encode()), np.int32(min(examples, 2**31 - 1))])
    gathered = np.asarray(multihost_utils.process_allgather(np.asarray(mine, np.int32)))
    gathered = gathered.reshape(-1, len(prints), 3)
    named = {"train": spec.data.train_split, "eval": spec.data.eval_split,
             "val": spec.data.val_split}  # fmt: skip
    problems = []
    for i, name in enumerate(prints):
        differ = [p for p in range(len(gathered)) if (gathered[p, i] != gathered[0, i]).any()]
        if not differ:
            continue
        counts = [int(c) for c in gathered[:, i, 2]]
        how = (f"examples per process: {counts}" if len(set(counts)) > 1
               else f"{counts[0]} examples each, other contents")  # fmt: skip
        problems.append(
            f"the {name} split ({named[name]!r}) of processes {differ} differs from process "
            f"0's ({how})"
        )
    if problems:
        raise data_lib.DataError(
            f"The processes were given different data: {'; '.join(problems)}. Give every "
            "process the same arrays (data.source='arrays'), or the same files."
        )
    return prints["train"]


def _check_not_past_the_end(
    spec: specs.RunSpec, ckpt: Checkpointer, newest: int | None, total_steps: int,
    steps_per_epoch: int,
) -> None:  # fmt: skip
    """Refuses, before anything is restored, a workdir whose newest checkpoint (``newest``) is
    past this run's end (its metrics would be labelled as the shorter run's). A folder that
    holds another step's state (renamed) does not count: the restore moves it aside."""
    while newest is not None and newest > total_steps:
        held = ckpt.held_step(newest)
        if held is None or held == newest:
            break
        newest = ckpt.newest_complete_step(below=newest)
    if newest is None or newest <= total_steps:
        return
    length = f"total_steps={total_steps}"
    if spec.total_epochs is not None:
        length = (f"total_epochs={spec.total_epochs}: {total_steps} steps of "
                  f"{steps_per_epoch} per epoch")  # fmt: skip
    raise specs.ConfigError(
        f"The newest checkpoint in {ckpt.directory} is at step {newest}, past the end of this "
        f"run ({length}): train for at least {newest} steps, or start in another workdir."
    )


def _build(spec: specs.RunSpec, workdir: str, arrays: Mapping | None, ckpt: Checkpointer) -> Run:
    """:func:`build_run` once the workdir is locked and its checkpoints opened."""
    mesh = sharding.create_mesh(spec.mesh)
    train_source, eval_source, val_source = _load_data(spec, arrays)
    train_data = _check_same_data(
        spec, {"train": train_source, "eval": eval_source, "val": val_source}
    )
    _check_batch_sizes(spec, mesh)
    _warn_of_padding(spec, mesh, [s for s in (eval_source, val_source) if s is not None])
    steps_per_epoch = max(train_source.num_examples // spec.batch_size, 1)
    total_steps = spec.steps(steps_per_epoch)
    newest = ckpt.newest_complete_step()
    _check_headline(spec.task)  # (before the selection's check, which would blame its metric)
    if val_source is not None:
        _check_selection(spec, val_source, total_steps, fresh=newest is None)
        if newest is None and not ckpt.has_steps():  # from scratch: no earlier best replaced
            # (on process 0:) a crash, an error or a kill leaves the checkpoints folder that
            # its run made once it saved a best; a missing one was deleted, an earlier run's
            # with it
            check_no_earlier_best(
                workdir,
                lambda step, meta: not ckpt.made_now and _own_best(spec, workdir, step, meta),
            )
    _check_not_past_the_end(spec, ckpt, newest, total_steps, steps_per_epoch)
    _warn_of_a_slow_ema(spec, total_steps)
    model = task_model(spec, train_source.num_classes)
    spec.task.check_train_split(train_source, spec.input.image_size)
    if newest is None:
        _warn_of_other_head_classes(spec, train_source.class_names)
    init_rng, step_rng = jax.random.split(jax.random.key(spec.seed))
    setup, input_spec = _initial_setup(
        spec, model, mesh, init_rng, ckpt, total_steps=total_steps,
        steps_per_epoch=steps_per_epoch,
    )  # fmt: skip
    state, start_step, start_position, saved = _restore(
        ckpt, setup.state, setup.frozen, spec, train_data, total_steps, model
    )
    if 0 < start_step < total_steps:  # skipped updates did not advance the schedule
        skipped = 0 if state.skips is None else int(jax.device_get(state.skips.total))
        _note_learning_rate_change(
            spec, setup.optimizer, saved, start_step, start_step - skipped, steps_per_epoch
        )
    selection = best = None
    if val_source is not None:
        finished = _ends_recipe(start_step, total_steps, saved)
        selection = _resumed_selection(spec, saved, finished, ckpt.directory)
    train_step, eval_step = _compile_steps(spec, model, setup, mesh)
    settings = _step_settings(spec, setup, mesh, step_rng)
    meta = RunRecord(
        config=spec.config,
        task=spec.task.name,
        model=spec.model_name,
        class_names=tuple(train_source.class_names),
        category_ids=train_source.category_ids and tuple(train_source.category_ids),
        total_steps=total_steps,
        image_size=input_spec.image_size,
        mean=tuple(input_spec.mean),
        std=tuple(input_spec.std),
        interpolation=input_spec.interpolation,
        crop_mode=input_spec.crop_mode,
        **_target_record(train_source),
        train_data=train_data,
    ).to_json()
    if "evaluated_before" in saved:  # eval_before_training's results, reported at every end
        meta["evaluated_before"] = saved["evaluated_before"]
    if selection is not None:  # last: nothing after it can fail and leave its folder behind
        best = BestCheckpoint(
            workdir, selection.metric, selection.mode, lock=ckpt.lock, checkpoints=ckpt
        )
    return Run(
        spec, mesh, model, input_spec, train_source, eval_source, val_source, setup, state,
        train_step, settings, eval_step, ckpt, start_step, total_steps, meta, start_position,
        selection, best, train_window=saved.get("train_window"), reported=saved.get("reported"),
        evaluation_pending=bool(saved.get("evaluation_pending")), restored_meta=saved,
    )  # fmt: skip
