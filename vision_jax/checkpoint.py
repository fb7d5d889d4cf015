"""Checkpoints with orbax: async saves every N steps, keep the last K, resume from the latest.

Each checkpoint step holds two items: ``state`` (the whole :class:`TrainState`) and ``meta``
(the run's config and class names, JSON). A run that fails to restore raises before it trains,
so an existing checkpoint is never overwritten by a run that could not read it.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

FROZEN_DIR = "frozen_params"


class CheckpointError(RuntimeError):
    """A checkpoint exists but cannot be restored into this run."""


class Checkpointer:
    """Thin wrapper over ``ocp.CheckpointManager`` for one workdir."""

    def __init__(self, workdir: str, *, every_steps: int, keep: int, async_save: bool = True):
        self.directory = os.path.join(workdir, "checkpoints")
        if "://" not in workdir:  # gs://... stays a URL; local paths become absolute
            self.directory = os.path.abspath(self.directory)
        self.every_steps = every_steps
        self.manager = ocp.CheckpointManager(
            self.directory,
            item_names=("state", "meta"),
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep,
                save_interval_steps=1,  # we decide when to save
                enable_async_checkpointing=async_save,
                create=True,
            ),
        )

    def save_frozen(self, frozen: Any) -> None:
        """Writes the frozen parameters once, beside the checkpoints (they never change, so step
        checkpoints hold only the trainable state). A no-op when nothing is frozen."""
        if not jax.tree_util.tree_leaves(frozen):
            return
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(frozen_dir(self.directory), frozen, force=True)
        checkpointer.wait_until_finished()

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, meta: dict, *, force: bool = False) -> bool:
        """Saves asynchronously at every ``every_steps`` step (or when ``force``)."""
        if not force and (self.every_steps <= 0 or step % self.every_steps):
            return False
        if self.manager.latest_step() == step:
            return False
        return self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
            ),
            force=True,
        )

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict]:
        """Restores ``state`` into the shapes, dtypes and shardings of ``abstract_state``."""
        step = self.manager.latest_step() if step is None else step
        where = f"{self.directory} (step {step})"
        try:
            restored = self.manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()
                ),
            )
        except Exception as e:  # orbax raises many types; the message is what matters
            raise CheckpointError(
                f"Cannot restore checkpoint {where} into this run: {type(e).__name__}: {e}\n"
                "The checkpoint was left untouched. Use another --workdir, or fix the config "
                "to match the run that wrote it."
            ) from e
        check_same_structure(abstract_state, restored.state, where=where)
        return restored.state, restored.meta

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def check_same_structure(expected: Any, got: Any, *, where: str) -> None:
    """Raises :class:`CheckpointError` if shapes or dtypes differ between two pytrees."""
    from vision_jax.masks import path_to_str

    flat_e = jax.tree_util.tree_flatten_with_path(expected)[0]
    flat_g = jax.tree_util.tree_flatten_with_path(got)[0]
    if len(flat_e) != len(flat_g):
        raise CheckpointError(
            f"Checkpoint {where} has {len(flat_g)} arrays, this run expects {len(flat_e)}."
        )
    bad = [
        f"{path_to_str(p)}: run {np.shape(e)} {e.dtype} vs checkpoint {np.shape(g)} {g.dtype}"
        for (p, e), (_, g) in zip(flat_e, flat_g, strict=True)
        if np.shape(e) != np.shape(g) or e.dtype != g.dtype
    ]
    if bad:
        raise CheckpointError(f"Checkpoint {where} does not match this run:\n  " + "\n  ".join(bad))


def latest_step_dir(path: str) -> str:
    """Resolves a run's workdir, its ``checkpoints`` folder, or a step folder to a step folder."""
    path = os.path.abspath(path)
    if os.path.isdir(os.path.join(path, "checkpoints")):
        path = os.path.join(path, "checkpoints")
    if os.path.isdir(os.path.join(path, "state")):
        return path
    steps = [int(d) for d in os.listdir(path) if d.isdigit()] if os.path.isdir(path) else []
    if not steps:
        raise CheckpointError(f"No vision_jax checkpoint found in {path}.")
    return os.path.join(path, str(max(steps)))


def frozen_dir(checkpoints_dir: str) -> str:
    """Where a run keeps its frozen parameters: ``<workdir>/frozen_params``."""
    return os.path.join(os.path.dirname(checkpoints_dir.rstrip("/")), FROZEN_DIR)


def _restore_on_one_device(path: str) -> Any:
    """Restores an orbax pytree onto this process's first device, whatever mesh wrote it."""
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    checkpointer = ocp.StandardCheckpointer()
    target = jax.tree_util.tree_map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
        checkpointer.metadata(path).item_metadata.tree,
    )
    return jax.tree_util.tree_map(np.asarray, checkpointer.restore(path, target))


def read_variables(path: str) -> dict:
    """The model variables (``params`` plus e.g. ``batch_stats``) of a vision_jax checkpoint.

    Frozen parameters (saved once beside the checkpoints) are put back, and LoRA adapters are
    merged into their kernels, so the result is the plain model's variables.
    """
    from vision_jax import lora
    from vision_jax.trees import combine

    step_dir = latest_step_dir(path)
    try:
        state = _restore_on_one_device(os.path.join(step_dir, "state"))
        frozen_path = frozen_dir(os.path.dirname(step_dir))
        frozen = _restore_on_one_device(frozen_path) if os.path.isdir(frozen_path) else {}
        with open(os.path.join(step_dir, "meta", "metadata")) as f:
            config = json.load(f)["config"]
    except Exception as e:
        raise CheckpointError(f"Cannot read checkpoint {step_dir}: {type(e).__name__}: {e}") from e
    params = combine(state["params"], frozen)
    lora_config = config.get("lora") or {}
    if lora_config.get("rank"):
        rank = int(lora_config["rank"])
        spec = lora.LoraSpec(rank, float(lora_config.get("alpha") or rank))
        params = jax.tree_util.tree_map(np.asarray, lora.merge(params, spec))
    return {"params": params, **(state.get("model_state") or {})}
