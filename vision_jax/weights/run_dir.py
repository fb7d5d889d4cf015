"""The vision_jax run reader: a training run's workdir, its ``checkpoints`` folder or one step
folder, read with orbax; and the layout and record of a run, which :mod:`vision_jax.checkpoint`
writes::

    <workdir>/checkpoints/<step>/state   the train state (trainable params, model state, ...)
    <workdir>/checkpoints/<step>/meta    the RunRecord as JSON, plus the step's own keys (the
                                         state's digests among them: vision_jax.digests)
    <workdir>/best/<step>/...            the best evaluation's state (runs with a validation
                                         split), laid out like a checkpoint step
    <workdir>/frozen_params              the frozen params, written once (and their digests)

Readers take the newest checkpoint, or with ``which="best"`` the best step when the run kept one
(the newest when it selects none: no validation split).
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import os
import pathlib
import re
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from etils import epath

from vision_jax import digests, lora
from vision_jax.orbax_import import ocp
from vision_jax.specs import EarlyStoppingSpec, LoraSpec
from vision_jax.trees import combine
from vision_jax.weights.contract import InputContract, Triple
from vision_jax.weights.files import WeightFormatError

logger = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"
BEST_DIR = "best"
FROZEN_DIR = "frozen_params"
FROZEN_DIGEST_FILE = "digest.json"  # in FROZEN_DIR: vision_jax.digests of the frozen params
STATE_ITEM = "state"
META_ITEM = "meta"
META_FILE = f"{META_ITEM}/metadata"  # where orbax's JsonSave writes the meta item
# Written by every committed save; a step without one of them was damaged.
REQUIRED_FILES = ("_CHECKPOINT_METADATA", f"{STATE_ITEM}/_METADATA", META_FILE)


def _tuple(values: Sequence[Any] | None) -> tuple | None:
    return None if values is None else tuple(values)


def _list(values: Sequence[Any] | None) -> list | None:
    return None if values is None else list(values)


@dataclasses.dataclass(frozen=True)
class RunRecord:
    """What a training run writes with every checkpoint (its ``meta`` item) and the loader reads.

    Every field is optional: older runs recorded fewer. The checkpointer writes the step's own
    keys (``final``, ``data_positions``) beside the record; :meth:`from_json` ignores them.
    """

    config: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # as plain data
    task: str | None = None
    model: str | None = None
    class_names: tuple[str, ...] | None = None
    category_ids: tuple[int, ...] | None = None  # detection: the COCO id of each class
    total_steps: int | None = None  # the step saved with it is marked final (kept)
    image_size: int | None = None  # the input the run used (after its input contract)
    mean: Triple | None = None
    std: Triple | None = None
    interpolation: str | None = None  # its resize (older runs: the config's, else bilinear)
    crop_mode: str | None = None  # "center" or "squash" (older runs: the config's, else center)
    # a target of one's own (a column): the shape and dtype name of an example's values
    # (older runs: None)
    target_shape: tuple[int, ...] | None = None
    target_dtype: str | None = None
    # The training split's fingerprint (``Source.fingerprint``: a tfds split's dataset version)
    train_data: Mapping[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        """The record as a JSON object (the input under ``"input"``)."""
        return {
            "config": dict(self.config),
            "task": self.task,
            "model": self.model,
            "class_names": _list(self.class_names),
            "category_ids": _list(self.category_ids),
            "total_steps": self.total_steps,
            "input": {
                "image_size": self.image_size,
                "mean": _list(self.mean),
                "std": _list(self.std),
                "interpolation": self.interpolation,
                "crop_mode": self.crop_mode,
            },
            **(
                {"target": {"shape": _list(self.target_shape), "dtype": self.target_dtype}}
                if self.target_dtype is not None
                else {}
            ),
            **({"train_data": dict(self.train_data)} if self.train_data is not None else {}),
        }

    @classmethod
    def from_json(cls, meta: Mapping[str, Any]) -> RunRecord:
        """The record in a ``meta`` item; without ``input``, the config's input."""
        config = dict(meta.get("config") or {})
        given = meta.get("input") or config.get("input") or {}
        return cls(
            config=config,
            task=meta.get("task"),
            model=meta.get("model"),
            class_names=_tuple(meta.get("class_names")),
            category_ids=_tuple(meta.get("category_ids")),
            total_steps=meta.get("total_steps"),
            image_size=given.get("image_size"),
            mean=_tuple(given.get("mean")),
            std=_tuple(given.get("std")),
            interpolation=given.get("interpolation")
            or config.get("input", {}).get("interpolation"),
            crop_mode=given.get("crop_mode") or config.get("input", {}).get("crop_mode"),
            target_shape=_tuple((meta.get("target") or {}).get("shape")),
            target_dtype=(meta.get("target") or {}).get("dtype"),
            train_data=meta.get("train_data"),
        )

    def contract(self, where: str) -> InputContract:
        """The input the run trained and evaluated on (``where``: the run, for the error when
        the record holds none)."""
        if None in (self.image_size, self.mean, self.std):
            raise WeightFormatError(f"The run record of {where} holds no input size, mean and std.")
        return InputContract(
            int(self.image_size), tuple(self.mean), tuple(self.std),
            interpolation=self.interpolation or InputContract.interpolation,
            crop_mode=self.crop_mode or InputContract.crop_mode,
        )  # fmt: skip


def is_complete(step_dir: pathlib.PurePath) -> bool:
    """Whether a step folder holds every file a committed save writes."""
    return all((step_dir / f).exists() for f in REQUIRED_FILES)


def _step_folders(folder: pathlib.Path) -> list[int]:
    """The steps of the step folders in ``folder`` (none if it is not a folder)."""
    return [int(d.name) for d in folder.iterdir() if d.name.isdigit()] if folder.is_dir() else []


def _newest_step(folder: pathlib.Path) -> pathlib.Path | None:
    """The newest complete step folder in ``folder``; newer incomplete ones are named."""
    for step in sorted(_step_folders(folder), reverse=True):
        if is_complete(folder / str(step)):
            return folder / str(step)
        logger.warning("Skipping %s: not a complete checkpoint.", folder / str(step))
    return None


def latest_step_dir(path: str | os.PathLike, which: str = "latest") -> pathlib.Path:
    """Resolves a run's workdir, its ``checkpoints`` folder, or a step folder to a step folder:
    the newest checkpoint (``which="latest"``), or the best step if the run kept one and the
    newest checkpoint if it selects none (no validation split) or no validation has run yet
    (with a warning) (``which="best"``; a run whose validations gave no best, or whose best is
    gone, is an error naming ``--which=latest``). A workdir whose step checkpoints were deleted
    (only ``best`` kept) resolves to its best step either way."""
    if which not in ("latest", "best"):
        raise ValueError(f"which must be 'latest' or 'best', got {which!r}.")
    path = pathlib.Path(path).absolute()
    only_best = not _step_folders(path / CHECKPOINTS_DIR)
    if (which == "best" or only_best) and _step_folders(path / BEST_DIR):
        best = _newest_step(path / BEST_DIR)
        if best is None:
            instead = "" if only_best else "; --which=latest reads the newest checkpoint instead"
            raise WeightFormatError(
                f"The best checkpoint in {path / BEST_DIR} is incomplete{instead}."
            )
        return best
    workdir = (path / CHECKPOINTS_DIR).is_dir()
    if workdir:
        path = path / CHECKPOINTS_DIR
    if (path / STATE_ITEM).is_dir():
        return path
    step = _newest_step(path)
    if step is None:
        missing = "" if path.exists() else " (it does not exist)"
        raise WeightFormatError(f"No vision_jax checkpoint found in {path}{missing}.")
    if which == "best" and workdir:
        _check_no_best_kept(step, path.parent / BEST_DIR)
    return step


def _check_no_best_kept(newest: pathlib.Path, best_dir: pathlib.Path) -> None:
    """Raises when the run selects a best step (it has a validation split) and ``best_dir``
    holds none: its best is gone, or no validation gave one (a NaN, a class with nothing to
    score). "best" would otherwise read the newest checkpoint as if it were the best; a run
    without a selection has no best, and reads its newest, as does (with a warning) a run cut
    short before its first validation."""
    selection = read_selection(newest)
    if not selection.get("metric"):
        return
    latest = (
        f"--which=latest reads the newest checkpoint (step {newest.name}) instead (as "
        f"init.path or --weights: {newest.parent})."
    )
    if selection.get("best_step") is not None:
        raise WeightFormatError(
            f"The run's best checkpoint (step {selection['best_step']}, "
            f"{selection.get('metric')}) is not in {best_dir}; {latest}"
        )
    if not selection.get("bad_evaluations"):  # cut short before its first validation
        logger.warning(
            "The run has no best checkpoint: no validation has chosen one by %s yet; reading "
            "its newest checkpoint (step %s).", selection["metric"], newest.name,
        )  # fmt: skip
        return
    raise WeightFormatError(
        f"The run has no best checkpoint: no validation gave a finite {selection['metric']}; "
        f"{latest}"
    )


def frozen_dir(checkpoints_dir: str) -> str:
    """Where a run keeps its frozen parameters: ``<workdir>/frozen_params`` (``checkpoints_dir``:
    ``<workdir>/checkpoints`` or ``<workdir>/best``)."""
    return os.path.join(os.path.dirname(checkpoints_dir.rstrip("/")), FROZEN_DIR)


def read_record(path: str | os.PathLike, which: str = "latest") -> RunRecord:
    """The :class:`RunRecord` of a run's latest (or best) step, or of the step folder ``path``."""
    return RunRecord.from_json(_read_meta(latest_step_dir(path, which)))


def read_selection(step_dir: str | os.PathLike) -> dict:
    """The model selection's progress saved with the step ``step_dir`` (its ``metric``,
    ``best_value`` and ``best_step``, as :class:`~vision_jax.selection.Selection` saves them);
    empty for a run without a validation split."""
    return dict(_read_meta(pathlib.Path(step_dir)).get("selection") or {})


def warn_if_unfinished(step_dir: str | os.PathLike) -> None:
    """Warns when ``step_dir`` is a step before the end of a run that has
    not finished (stopped or still training): its weights are those of that step (runs of
    versions that did not record ``final`` are taken as they are). Every reader of a run's step
    comes here: :func:`~vision_jax.trained.load_trained` (predict, evaluate, export, report)
    and ``load_pretrained`` (``init.path``). A step that ended a shorter recipe is not the end
    of a run resumed from it with a longer one (``continued_to``: that recipe's total_steps,
    recorded on the step when the run went on), also once the longer run's steps are gone."""
    step_dir = pathlib.Path(step_dir)
    meta = _read_meta(step_dir)
    total, unfinished = meta.get("total_steps"), meta.get("final") is False
    if meta.get("continued_to") is not None and not meta.get("stopped_early"):
        total, unfinished = int(meta["continued_to"]), True
    if unfinished and total is not None and int(step_dir.name) < total:
        logger.warning(
            "%s is step %s of a run that has not finished (it trains to step %d): its weights "
            "are that step's.", step_dir, step_dir.name, total,
        )  # fmt: skip


def _read_meta(step_dir: pathlib.Path) -> dict:
    """A step's ``meta`` item: its run record and the step's own keys."""
    try:
        return dict(json.loads((step_dir / META_FILE).read_text()))
    except (OSError, ValueError, TypeError) as e:
        check_not_removed(step_dir)
        raise WeightFormatError(
            f"Cannot read the run record of {step_dir}: {e}{_latest_instead(step_dir)}"
        ) from e


def check_not_removed(step_dir: str | os.PathLike) -> None:
    """Raises when ``step_dir`` is gone: a run still training there removed it (it keeps only
    its newest checkpoints) while it was read."""
    if not pathlib.Path(step_dir).exists():
        raise WeightFormatError(
            f"{step_dir} was removed while it was read: the run writing there keeps only its "
            "newest checkpoints (keep_checkpoints). Run the command again."
        )


def short_reason(error: BaseException) -> str:
    """The first line of an error, without TensorStore's spec dump, at most 160 characters
    (its middle cut: the cause, e.g. "File too large", comes last); for orbax's "error while
    reading array index", its cause (which names the array)."""
    if str(error).startswith("Encountered error while reading") and error.__cause__:
        return short_reason(error.__cause__)
    text = re.sub(r' in OCDBT database at [^:]*"', "", str(error))
    text = text.split("See full TensorStore details")[0].strip().splitlines()
    text = (text[0] if text else "").strip().rstrip(".:")
    text = f"{type(error).__name__}: {text}" if text else type(error).__name__
    return text if len(text) <= 160 else f"{text[:97]} ... {text[-58:]}"


def _abandoned_io(unraisable: Any) -> bool:
    """Whether an error nobody can catch comes from orbax abandoning a damaged step's reads
    (after the first one fails) or a failed save's writes: the other reads' failures (raised
    when their coroutines are garbage-collected, or logged by asyncio for their tasks) and
    TensorStore completing a read or write on orbax's closed event loop."""
    error, source = unraisable.exc_value, unraisable.object
    if inspect.iscoroutine(source) and "_read_array_index" in source.__qualname__:
        return True
    return isinstance(error, RuntimeError) and str(error) == "Event loop is closed"


# What asyncio's message about an abandoned read names: orbax's read coroutine (a task), orbax's
# read error (a future gathering them), or TensorStore's (a bare future of one read).
_ABANDONED_READ_MARKERS = (
    "_read_array_index",
    "error while reading array index",
    "in OCDBT database",
)


class _AbandonedReadTasks(logging.Filter):
    """asyncio's "... exception was never retrieved" for those reads, at DEBUG instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        orbax_read = any(marker in message for marker in _ABANDONED_READ_MARKERS)
        if "never retrieved" in message and orbax_read:
            logger.debug("After a failed read: %s", message.splitlines()[0])
            return False
        return True


def quiet_abandoned_io() -> None:
    """Logs those errors at DEBUG instead of a page each on stderr (installed once, for the
    process: TensorStore's callbacks may come after the read or save has returned)."""
    asyncio_log = logging.getLogger("asyncio")
    if not any(isinstance(f, _AbandonedReadTasks) for f in asyncio_log.filters):
        asyncio_log.addFilter(_AbandonedReadTasks())
    previous = sys.unraisablehook
    if getattr(previous, "vision_jax", False):
        return

    def hook(unraisable: Any) -> None:
        if _abandoned_io(unraisable):
            logger.debug("After a failed read or write: %s", short_reason(unraisable.exc_value))
        else:
            previous(unraisable)

    hook.vision_jax = True
    sys.unraisablehook = hook


def restore_on_one_device(path: str | os.PathLike) -> Any:
    """Restores an orbax pytree onto this process's first device, whatever mesh wrote it."""
    quiet_abandoned_io()  # a damaged item's other reads fail after the first: not on stderr
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    handler = ocp.StandardCheckpointHandler()  # the item itself: no step-level metadata sought
    target = jax.tree_util.tree_map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
        handler.metadata(epath.Path(path)).tree,
    )
    restored = handler.restore(epath.Path(path), args=ocp.args.StandardRestore(target))
    return jax.tree_util.tree_map(np.asarray, restored)


def frozen_digests(frozen_path: pathlib.PurePath) -> dict | None:
    """The digests saved with the frozen params in ``frozen_path`` (None, with a warning, when
    there are none: an earlier version saved none)."""
    path = frozen_path / FROZEN_DIGEST_FILE
    if not path.is_file():
        logger.warning("%s holds no digests (an earlier version's): not checked.", frozen_path)
        return None
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError, TypeError) as e:
        raise WeightFormatError(f"{path} is damaged: {type(e).__name__}: {e}") from e


def _merge_adapters(params: dict, config: Mapping[str, Any]) -> dict:
    """``params`` with the run's LoRA adapters (``config["lora"]``) folded into their kernels."""
    adapters = config.get("lora") or {}
    if not adapters.get("rank"):
        return params
    rank = int(adapters["rank"])
    spec = LoraSpec(rank, float(adapters.get("alpha") or rank))
    return jax.tree_util.tree_map(np.asarray, lora.merge(params, spec))


def state_damage(
    step_dir: pathlib.PurePath, meta: Mapping[str, Any], state: Any, arrays: Any = None
) -> str | None:
    """What shows that a step's restored ``state`` is not what its save wrote: the state of
    another step than the folder's name, or ``arrays`` (default: the whole state) that differ
    from the digests in ``meta``; None if nothing does. A step saved without digests (an
    earlier version's) is named in a warning and passes. Collective for arrays spread over
    processes."""
    step = int(state["step"] if isinstance(state, Mapping) else state.step)
    if step_dir.name.isdigit() and step != int(step_dir.name):
        return f"it holds the state of step {step}"
    if "digest" not in meta:
        logger.warning("Checkpoint %s holds no digests (an earlier version's): not checked.",
                       step_dir)  # fmt: skip
    return digests.first_difference(meta.get("digest"), state if arrays is None else arrays)


def read_variables(
    path: str | os.PathLike, which: str = "latest", *, ema: bool | None = None
) -> dict:
    """The model variables (``params`` plus e.g. ``batch_stats``) of a run's latest step (or
    best: see :func:`latest_step_dir`); ``ema``: its EMA parameters (``config.ema_decay``)
    instead of the trained ones, with the EMA's model state (BatchNorm statistics; an earlier
    version's runs: the trained ones), as the run's ``*_ema/`` evaluations used them; None:
    the ones its model selection measured (:func:`selects_ema`).

    Frozen parameters (saved once beside the checkpoints) are put back, and LoRA adapters are
    merged into their kernels, so the result is the plain model's variables.
    """
    step_dir = latest_step_dir(path, which)
    meta = _read_meta(step_dir)
    if ema is None:
        ema = selects_ema(meta.get("config") or {})
    params_key = "ema_params" if ema else "params"
    frozen_path = pathlib.Path(frozen_dir(str(step_dir.parent)))
    if meta.get("frozen") and not frozen_path.is_dir():
        raise WeightFormatError(
            f"{frozen_path} is missing: the run froze some parameters and saved them there."
        )
    state = _restored(step_dir, step_dir / STATE_ITEM)
    frozen = _restored(frozen_path, frozen_path) if frozen_path.is_dir() else {}
    if ema and state.get(params_key) is None:
        raise WeightFormatError(
            f"Checkpoint {step_dir} holds no EMA parameters: the run did not set ema_decay."
        )
    has_ema_state = state.get("ema_model_state") is not None
    state_key = "ema_model_state" if ema and has_ema_state else "model_state"
    used = {k: state[k] for k in (params_key, state_key) if k in state}
    for folder, damage in (
        (step_dir, state_damage(step_dir, meta, state, used)),
        (frozen_path, frozen and digests.first_difference(frozen_digests(frozen_path), frozen)),
    ):
        if damage:
            raise WeightFormatError(
                f"Checkpoint {folder} is damaged: {damage}{_latest_instead(folder)}."
            )
    params = _merge_adapters(combine(state[params_key], frozen), meta.get("config") or {})
    return {"params": params, **(state.get(state_key) or {})}


def selects_ema(config: Mapping[str, Any]) -> bool:
    """Whether a run's model selection (its ``config`` as plain data) measured its EMA
    parameters: ``early_stopping.metric`` an ``*_ema/`` metric."""
    metric = (config.get("early_stopping") or {}).get("metric")
    return EarlyStoppingSpec(metric=metric).measures_ema


def _restored(folder: pathlib.Path, item: pathlib.Path) -> Any:
    """``restore_on_one_device(item)``; a failure names ``folder`` (a step, or the frozen
    params) and whether it was damaged or removed while it was read."""
    try:
        return restore_on_one_device(item)
    except Exception as e:  # orbax and TensorStore raise many types
        check_not_removed(folder)
        what = "is damaged" if "DATA_LOSS" in str(e) else "cannot be read"
        raise WeightFormatError(
            f"Checkpoint {folder} {what}: {short_reason(e)}{_latest_instead(folder)}"
        ) from e


def _latest_instead(folder: pathlib.Path) -> str:
    """For a damaged best step ``folder`` of a run that has step checkpoints: that
    ``--which=latest`` reads the newest of them instead (a training run started again in the
    workdir saves the best again from its step checkpoint, while that step is kept); else ""."""
    if folder.parent.name != BEST_DIR or not _step_folders(folder.parent.parent / CHECKPOINTS_DIR):
        return ""
    return (
        "; --which=latest reads the newest checkpoint instead (the run's command, run again, "
        "saves the best again from its step checkpoint while it is kept)"
    )


def input_contract(path: str | os.PathLike, which: str = "latest") -> InputContract:
    """The input the run recorded (its size, mean, std, interpolation and crop) at its latest
    (or best) step."""
    return read_record(path, which).contract(str(path))
