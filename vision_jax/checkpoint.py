"""Checkpoints with orbax: async saves every N steps, rotation, resume from the newest readable.

Each checkpoint step holds two items: ``state`` (the whole :class:`TrainState`) and ``meta``
(the run's :class:`~vision_jax.weights.run_dir.RunRecord` plus every process's data stream
position, JSON), laid out as :mod:`vision_jax.weights.run_dir` (which reads runs) says.
Rotation keeps the newest ``keep`` steps plus every step that ended its run (``meta["final"]``);
orbax deletes old steps only after the new one is committed. A newest step that cannot be read
(truncated file, missing metadata, arrays that differ from their digests in ``meta``: see
:mod:`vision_jax.digests`) is moved aside to ``checkpoints/corrupt/<step>-<time>`` (never
deleted) with a one-line warning, and the run resumes from the newest readable step; so are
unfinished saves left by a crash that hold every file of a save (others, partial writes, are
removed), of which ``corrupt/`` keeps the :data:`KEEP_CORRUPT` newest. A checkpoint that does not
match the run (another model) is an error and left untouched, so it is never overwritten by a
run that could not read it.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import json
import logging
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from etils import epath

from vision_jax import digests
from vision_jax.orbax_import import ocp
from vision_jax.output_errors import is_url, remove_left_behind, why_and_advice, why_and_what_to_do
from vision_jax.signals import uninterrupted
from vision_jax.weights.run_dir import (
    BEST_DIR,
    CHECKPOINTS_DIR,
    FROZEN_DIGEST_FILE,
    META_FILE,
    META_ITEM,
    REQUIRED_FILES,
    STATE_ITEM,
    frozen_digests,
    frozen_dir,
    is_complete,
    quiet_abandoned_io,
    short_reason,
    state_damage,
)

logger = logging.getLogger(__name__)

CORRUPT_DIR = "corrupt"


class CheckpointError(RuntimeError):
    """A checkpoint exists but cannot be restored into this run."""


class CheckpointSaveError(CheckpointError):
    """An asynchronous save failed (a full disk, a lost bucket); the steps saved before it are
    intact."""


def _steps_not_at_hand() -> None:
    """``resumable`` of a best checkpoint without its step checkpoints at hand: unknown."""
    return None


@contextlib.contextmanager
def _reporting_failed_saves(
    manager: ocp.CheckpointManager, pending: int | None,
    resumable: Callable[[], list[int] | None] | None = None,
) -> Iterator[None]:  # fmt: skip
    """Turns a failed save that orbax raises when it is next waited for (the next save, the
    end of the run, closing) into a :class:`CheckpointSaveError` naming the step, the reason
    (:func:`~vision_jax.output_errors.why_and_advice`) and the newest complete checkpoint a
    resume reads: ``manager``'s own (but ``pending``; ``resumable`` None), or those
    ``resumable()`` lists (the complete step checkpoints beside a best checkpoint's
    ``manager``; None: not at hand, and the step checkpoints are named unaffected)."""
    try:
        yield
    except Exception as e:  # orbax and TensorStore raise many types
        if pending is None or isinstance(e, CheckpointError):  # not a save's failure
            raise
        reason = short_reason(e)
        if resumable is None:
            steps, kind = [s for s in manager.all_steps() if s != pending], "checkpoint"
        else:
            steps, kind = _complete(resumable), "step checkpoint"
        if steps is None:
            kept, then = "The step checkpoints are not affected", "resume"
        elif steps:
            kept, then = f"The newest complete {kind} is step {max(steps)}", "resume"
        else:
            kept, then = f"There is no complete {kind} yet", "start over"
        why, advice = why_and_advice(e, str(manager.directory))
        advice = advice and f"{advice}, then "
        raise CheckpointSaveError(
            f"Saving the checkpoint of step {pending} in {manager.directory} failed{why}: "
            f"{reason}. {kept}: {advice}run the same command again to {then}."
        ) from e


def _complete(steps: Callable[[], list[int] | None]) -> list[int] | None:
    """``steps()``, or none when they cannot be listed (the disk's failure, say)."""
    try:
        listed = steps()
    except Exception:  # noqa: BLE001  (a message's detail: none known)
        return None
    return None if listed is None else list(listed)


def _save_async(
    manager: ocp.CheckpointManager, pending: int | None, step: int, state: Any, meta: dict,
    resumable: Callable[[], list[int] | None] | None = None, **options: Any,
) -> bool:  # fmt: skip
    """Saves ``state`` and ``meta`` (plus the state's digests) as ``step`` once the previous
    save (of step ``pending``) has finished; a failure of either names its own step
    (:func:`_reporting_failed_saves`, ``resumable`` its). ``options``: more of
    ``manager.save``'s arguments."""
    meta = {**meta, "digest": digests.digest(state)}
    with _reporting_failed_saves(manager, pending, resumable):
        manager.wait_until_finished()
    items = {STATE_ITEM: ocp.args.StandardSave(state), META_ITEM: ocp.args.JsonSave(meta)}
    # Not cut short by a Ctrl-C: orbax would write on in threads that closing does not wait for
    with _reporting_failed_saves(manager, step, resumable), uninterrupted():
        return manager.save(step, args=ocp.args.Composite(**items), force=True, **options)


class CheckpointMismatchError(CheckpointError):
    """A checkpoint whose arrays do not fit this run's state: ``arrays`` names the differences
    (``diff`` joins them), ``cause`` what changed (or a guess), ``advice`` what to do; with
    ``changes`` (the config changes since it was written) the message leads with them."""

    def __init__(
        self, where: str, arrays: Sequence[str], *,
        cause: str = "did the model, its input size or what trains change?",
        advice: str = "Use another --workdir, or fix the config to match the run that wrote it.",
        changes: str | None = None,
    ) -> None:  # fmt: skip
        self.where, self.arrays, self.diff = where, list(arrays), "; ".join(arrays)
        if changes:
            message = (
                f"Cannot restore checkpoint {where} into this run: changed since: {changes}. "
                f"{advice}\nThe checkpoint was left untouched; its arrays that differ: "
                f"{_first(self.arrays, 2)}."
            )
        else:
            message = (
                f"Cannot restore checkpoint {where} into this run: {_first(self.arrays, 3)} "
                f"({cause})\nThe checkpoint was left untouched. {advice}"
            )
        super().__init__(message)


def _first(items: Sequence[str], most: int) -> str:
    """The first ``most`` of ``items``, and how many more."""
    more = f" (and {len(items) - most} more)" if len(items) > most else ""
    return "; ".join(items[:most]) + more


class KeepSteps:
    """Orbax preservation policy: keeps the steps in ``steps`` (a set its owner grows)."""

    def __init__(self, steps: Sequence[int] = ()):
        self.steps = set(steps)

    def should_preserve(self, checkpoints: Sequence[Any], *, context: Any) -> list[bool]:
        return [info.step in self.steps for info in checkpoints]


def _broadcast(value: int) -> int:
    """Process 0's ``value`` on every process."""
    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils

    return int(multihost_utils.broadcast_one_to_all(np.int64(value)))


def _gather(value: int) -> list[int]:
    """``value`` of every process, in process order."""
    if jax.process_count() == 1:
        return [int(value)]
    from jax.experimental import multihost_utils

    return [int(v) for v in np.ravel(multihost_utils.process_allgather(np.int64(value)))]


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _read_step(path: epath.Path, abstract_state: Any) -> tuple[Any, str | None]:
    """``((state, meta), None)`` of a step folder, or ``(None, why it cannot be read)``; the
    full error is logged at DEBUG. Reads with the item handler directly (no cross-process
    barrier), so that a process that fails cannot leave the others waiting."""
    quiet_abandoned_io()
    handler = ocp.StandardCheckpointHandler()
    try:
        state = handler.restore(path / STATE_ITEM, args=ocp.args.StandardRestore(abstract_state))
        return (state, json.loads((path / META_FILE).read_text())), None
    except Exception as e:  # orbax and TensorStore raise many types
        logger.debug("Reading %s failed.", path, exc_info=True)
        why = short_reason(e)
    finally:
        handler.close()
    gc.collect()  # the abandoned reads, now that the error no longer holds them
    return None, why


def _held_step(path: epath.Path) -> int | None:
    """The train step a step folder's state holds, read alone; None if it cannot be read."""
    quiet_abandoned_io()
    handler = ocp.PyTreeCheckpointHandler()
    try:
        restore = {"step": ocp.RestoreArgs(restore_type=np.ndarray)}
        args = ocp.args.PyTreeRestore(item={"step": 0}, restore_args=restore, partial_restore=True)
        return int(handler.restore(path / STATE_ITEM, args=args)["step"])
    except Exception:  # orbax and TensorStore raise many types
        logger.debug("Reading the step of %s failed.", path, exc_info=True)
        return None
    finally:
        handler.close()


def _move_aside(directory: str, name: str | int, why: str) -> None:
    """Moves a step folder (or an unfinished save) of ``directory`` to
    ``corrupt/<name>-<UTC time>``, with one warning line; process 0 only (the callers sync)."""
    if jax.process_index() != 0:
        return
    source = epath.Path(directory) / str(name)
    time = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%S")
    target = epath.Path(directory) / CORRUPT_DIR / f"{name}-{time}"
    target.parent.mkdir(parents=True, exist_ok=True)
    i = 1
    while target.exists():
        target, i = target.with_name(f"{name}-{time}-{i}"), i + 1
    source.rename(target)
    _MOVED_HERE.add(str(target))
    logger.warning("Checkpoint %s %s; moved it to %s.", source, why, target)


KEEP_CORRUPT = 2  # unfinished saves moved aside that corrupt/ keeps, the newest, for diagnosis
# <orbax's temporary name: <step>.orbax-checkpoint-tmp-<time>>-<UTC time>[-<i>]
_UNFINISHED_MOVED = re.compile(r".+\.orbax-checkpoint-tmp(?:-\d+)?-(\d{8}T\d{6})(?:-(\d+))?")
_MOVED_HERE: set[str] = set()  # folders this process moved aside: never pruned by it


def _prune_corrupt(corrupt: epath.Path) -> None:
    """Removes all but the :data:`KEEP_CORRUPT` newest unfinished saves that
    :func:`_move_aside_unfinished` moved to ``corrupt`` (by the time in their names), one line
    each: a run killed again and again while it commits a save moves one there at each start,
    and they would fill the disk (orbax removes its own unfinished saves). Damaged committed
    steps, folders this process moved there and anything else are never removed."""
    moved = []
    for path in corrupt.iterdir():
        if match := _UNFINISHED_MOVED.fullmatch(path.name):
            try:  # in one second: the later rename's (a bucket's folders: none)
                renamed = os.stat(path).st_ctime_ns
            except OSError:
                renamed = 0
            moved.append(((match[1], int(match[2] or 0), renamed), path))
    for _, path in sorted(moved, key=lambda m: m[0], reverse=True)[KEEP_CORRUPT:]:
        if str(path) in _MOVED_HERE:
            continue
        try:
            path.rmtree() if path.is_dir() else path.unlink()
        except OSError as e:
            logger.warning("Could not remove %s: %s", path, short_reason(e))
            continue
        logger.warning(
            "Removed %s: %s keeps the %d newest unfinished saves moved aside.", path, corrupt,
            KEEP_CORRUPT,
        )  # fmt: skip


def _check_folder(directory: str) -> None:
    """Something else than a folder where the checkpoints go is an error at once (every
    process), not at the first save."""
    path = epath.Path(directory)
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"{directory} is not a folder: move it away to save checkpoints.")


# The write probe's name; each process's is ``<PROBE_FILE>-<process index>-<pid>`` (no two
# processes of a run share one), which the next start removes if a process died holding it.
PROBE_FILE = ".vision_jax-write-probe"


def _remove_probes(directory: str) -> None:
    """Removes the write probes that a process killed between writing and removing its probe
    left in ``directory`` (call on process 0 before any process of this run probes)."""
    root = epath.Path(directory)
    if root.is_dir():
        remove_left_behind(root.glob(f"{PROBE_FILE}-*"), "the write probe")


def _check_writable(directory: str) -> None:
    """Writes and removes a small file in ``directory`` (every process, each its own: each
    writes its shards of a save), so that a folder no save could write in (read-only, no
    permission, a full disk) is one error at once on every process, not after
    ``checkpoint_every_steps`` of training."""
    probe = epath.Path(directory) / f"{PROBE_FILE}-{jax.process_index()}-{os.getpid()}"
    problem = None
    try:
        probe.write_text("vision_jax checks that checkpoints can be written here\n")
    except Exception as e:  # noqa: BLE001  (OSError locally; a bucket's client raises others)
        problem = e
    else:
        with contextlib.suppress(Exception):
            probe.unlink()
    failed = _gather(problem is not None)
    if not any(failed):
        return
    if problem is None:
        raise CheckpointError(
            f"Cannot write checkpoints in {directory} on process {failed.index(True)} (its log "
            "says why)."
        )
    why, advice = why_and_what_to_do(problem, str(probe), then="or use another --workdir")
    raise CheckpointError(
        f"Cannot write checkpoints in {directory}{why}: {short_reason(problem)}."
        f"{advice or ' Use another --workdir.'}"
    ) from problem


def check_no_earlier_best(workdir: str, own: Callable[[int, dict], bool]) -> None:
    """Refuses a run that starts from scratch (no step checkpoint) in a workdir whose ``best``
    folder holds a step (an earlier run's best, its step checkpoints deleted): the first
    validation's best would replace it (a best checkpoint keeps one step). Unless
    ``own(step, meta)`` says it is this run's own (``meta``: the best's; a run cut short
    before its first step checkpoint), started over. Every process raises, on process 0's
    answer (process 0's message names the best's score)."""
    folder = epath.Path(workdir) / BEST_DIR
    if not is_url(workdir):
        folder = epath.Path(os.path.abspath(folder))
    step, meta = -1, None
    if jax.process_index() == 0 and folder.is_dir():
        step = max((int(d.name) for d in folder.iterdir() if d.name.isdigit()), default=-1)
        with contextlib.suppress(Exception):  # unreadable: refused, naming no score
            meta = json.loads((folder / str(step) / META_FILE).read_text())
    refused = step >= 0 and not (meta is not None and own(step, meta))
    step = _broadcast(step if refused else -1)
    if step < 0:
        return
    scored = ""
    with contextlib.suppress(Exception):  # what it scored, where process 0 read its record
        selection = meta["selection"]
        scored = f", {selection['metric']} {float(selection['best_value']):.6g}"
    raise CheckpointError(
        f"{folder} holds the best checkpoint of an earlier run (step {step}{scored}), and this "
        f"run starts from scratch ({folder.parent / CHECKPOINTS_DIR} holds no step): its first "
        f"validation would replace it. Move that folder away to keep it (e.g. mv {folder} "
        f"{folder}-earlier), and set --config.init.path to the moved folder to train from its "
        "weights; or use another --workdir."
    )


def _check_usable(manager: ocp.CheckpointManager, new: bool) -> None:
    """:func:`_check_writable` of a new ``manager``'s folder; when it fails, the manager is
    closed and its folder removed again if it was ``new`` (and is empty)."""
    directory = str(manager.directory)
    try:
        _check_writable(directory)
    except BaseException:
        with contextlib.suppress(Exception):
            manager.close()
        _remove_if_unused(directory, new)
        raise


def _move_aside_unfinished(directory: str) -> None:
    """Saves in ``directory`` that a crash or a failed write left unfinished (orbax ignores
    them): moved aside when they hold every file of a save (cut short while being committed),
    else removed: they hold no state to resume from, and on a full disk they would pile up."""
    root = epath.Path(directory)
    if not root.is_dir():
        return
    moved = False
    for path in sorted(root.iterdir()):
        if path.name == CORRUPT_DIR or not ocp.path.step.is_path_temporary(path):
            continue
        if is_complete(path):
            _move_aside(directory, path.name, "is an unfinished save")
            moved = True
        else:
            path.rmtree()
            logger.warning("Removed %s: a save cut short, holding no complete state.", path)
    if moved:
        _prune_corrupt(root / CORRUPT_DIR)


class Checkpointer:
    """Thin wrapper over ``ocp.CheckpointManager`` for one workdir.

    ``keep`` (>= 1) newest steps survive rotation, and every step that ended its run (orbax
    preservation policies, any of which keeps a step: a best-checkpoint ``BestN`` policy can
    join them). ``lock`` (a :class:`vision_jax.lock.WorkdirLock`) is released by :meth:`close`;
    once another run took it over, nothing more is saved (:meth:`check_lock`) or removed.
    """

    def __init__(
        self,
        workdir: str,
        *,
        every_steps: int,
        keep: int,
        async_save: bool = True,
        lock: Any = None,
    ):
        if keep < 1:
            raise ValueError(f"keep_checkpoints must be >= 1, got {keep}.")
        self.directory = os.path.join(workdir, CHECKPOINTS_DIR)
        if not is_url(workdir):  # gs://... stays a URL; local paths become absolute
            self.directory = os.path.abspath(self.directory)
        self.every_steps = every_steps
        self.lock = lock
        quiet_abandoned_io()  # a failed save's TensorStore callbacks, too
        self._new = _is_new(self.directory)
        _check_folder(self.directory)
        if jax.process_index() == 0:
            _move_aside_unfinished(self.directory)
            _remove_probes(self.directory)
        _sync("vision_jax:checkpoints_tidied")
        self.final_steps = KeepSteps()
        self._pending: int | None = None  # the step of the newest save (it may be in flight)
        self.has_frozen = False  # frozen params lie beside the steps (each step's meta says)
        self._keep_folder = False  # a best was saved: the folder stays, even empty (keep_folder)
        self.frozen_digest: dict | None = None  # their digests (each step's meta records them)
        policies = ocp.checkpoint_managers
        self.manager = ocp.CheckpointManager(
            self.directory,
            item_names=(STATE_ITEM, META_ITEM),
            options=ocp.CheckpointManagerOptions(
                preservation_policy=policies.AnyPreservationPolicy(
                    [policies.LatestN(keep), self.final_steps]
                ),
                save_interval_steps=1,  # we decide when to save
                enable_async_checkpointing=async_save,
                create=True,
            ),
        )
        _check_usable(self.manager, self._new)
        self.final_steps.steps.update(
            s for s in self.manager.all_steps() if (self.read_meta(s) or {}).get("final")
        )

    @property
    def made_now(self) -> bool:
        """Whether this run made the checkpoints folder (process 0's answer; False elsewhere)."""
        return self._new

    def keep_folder(self) -> None:
        """Keeps the checkpoints folder at :meth:`close`, even without a step: a best was saved,
        and an empty folder beside it marks it as this run's own (one cut short before its first
        step checkpoint, by an error or a kill alike), which the run started again replaces
        (:func:`check_no_earlier_best`)."""
        self._keep_folder = True

    def step_dir(self, step: int) -> epath.Path:
        return epath.Path(self.directory) / str(step)

    def read_meta(self, step: int) -> dict | None:
        """The ``meta`` item of ``step`` (JSON), or None if it cannot be read."""
        try:
            return json.loads((self.step_dir(step) / META_FILE).read_text())
        except (OSError, ValueError):
            return None

    def check_lock(self) -> None:
        """Raises :class:`vision_jax.lock.LockError` once another run took over the workdir's
        lock (a Python caller's run; the command line's process has ended)."""
        _check_lock(self.lock)

    def update_meta(self, step: int, meta: Mapping[str, Any]) -> None:
        """Replaces the ``meta`` item of the saved ``step`` by ``meta`` (``final`` set as
        :meth:`save` sets it; a new file renamed over the old one: a crash leaves one or the
        other whole). For single-process runs."""
        self.wait()
        self.check_lock()
        path = self.step_dir(step) / META_FILE
        partial = path.parent / f"{path.name}.partial"
        partial.write_text(json.dumps(self._with_final(step, meta)))
        partial.replace(path)

    def _with_final(self, step: int, meta: Mapping[str, Any]) -> dict:
        """``meta`` with ``final``: whether ``step`` ended its run (the last step, or an early
        stop); such steps survive rotation."""
        final = step == meta.get("total_steps") or bool(meta.get("stopped_early"))
        if final:
            self.final_steps.steps.add(step)
        return {**meta, "final": final}

    def save_frozen(self, frozen: Any) -> None:
        """Writes the frozen parameters once, beside the checkpoints (they never change, so step
        checkpoints hold only the trainable state). A no-op when nothing is frozen."""
        if not jax.tree_util.tree_leaves(frozen):
            return
        checkpointer = ocp.StandardCheckpointer()
        try:
            with uninterrupted():  # (see _save_async)
                checkpointer.save(frozen_dir(self.directory), frozen, force=True)
                checkpointer.wait_until_finished()
        except Exception as e:  # orbax and TensorStore raise many types
            why, advice = why_and_what_to_do(e, frozen_dir(self.directory))
            raise CheckpointSaveError(
                f"Saving the frozen parameters in {frozen_dir(self.directory)} failed{why}: "
                f"{short_reason(e)}.{advice or ' Run the same command again.'}"
            ) from e
        saved = digests.digest(frozen)
        if jax.process_index() == 0:
            (epath.Path(frozen_dir(self.directory)) / FROZEN_DIGEST_FILE).write_text(
                json.dumps(saved)
            )
        self.has_frozen, self.frozen_digest = True, saved

    def saved_frozen_paths(self) -> list[str]:
        """The paths of the frozen parameters :meth:`save_frozen` wrote ([] when there are none,
        or their metadata cannot be read: :meth:`restore_frozen` names the problem)."""
        path = epath.Path(frozen_dir(self.directory))
        try:
            tree = ocp.StandardCheckpointHandler().metadata(path).tree
        except Exception:  # orbax and TensorStore raise many types
            return []
        return [name for name, _ in _shapes(tree)]

    def restore_frozen(self, abstract_frozen: Any) -> Any | None:
        """The frozen parameters :meth:`save_frozen` wrote, in ``abstract_frozen``'s shapes and
        shardings and checked against their digests; None when there are none (an earlier
        version's run). Raises :class:`CheckpointError` when they cannot be used."""
        path = epath.Path(frozen_dir(self.directory))
        if not _broadcast(int(path.is_dir())):
            return None
        frozen, problem = None, None
        handler = ocp.StandardCheckpointHandler()
        try:
            frozen = handler.restore(path, args=ocp.args.StandardRestore(abstract_frozen))
            saved = frozen_digests(path)
        except Exception as e:  # orbax and TensorStore raise many types
            problem = short_reason(e)
        finally:
            handler.close()
        if problem is not None:  # another split of the params than the run saved
            self._check_matches(path, abstract_frozen, f"{path} (the frozen parameters)")
        failed = _gather(problem is not None)
        if not any(failed):  # every process read them: now a collective check of the values
            problem = digests.first_difference(saved, frozen)
        if any(failed) or problem is not None:
            problem = problem or f"unreadable on process {failed.index(True)}"
            raise CheckpointError(
                f"The frozen parameters in {path} cannot be used ({problem}). Move the folder "
                "aside to read them from init.path again, as the run began."
            )
        self.has_frozen, self.frozen_digest = True, saved
        return frozen

    def newest_complete_step(self, below: int | None = None) -> int | None:
        """The newest step (``below`` that one) whose folder holds every file of a committed
        save (it may still be unreadable), as process 0 sees it; None without one. Call on
        every process."""
        steps = [s for s in self.manager.all_steps() if below is None or s < below]
        steps = [s for s in steps if is_complete(self.step_dir(s))]
        newest = _broadcast(max(steps, default=-1))  # every process acts on process 0's answer
        return None if newest < 0 else newest

    def held_step(self, step: int) -> int | None:
        """The step whose state the folder of ``step`` holds (another one's in a renamed
        folder, which the restore moves aside), as process 0 reads it; None if it cannot be
        read. Call on every process."""
        held = _held_step(self.step_dir(step)) if jax.process_index() == 0 else None
        held = _broadcast(-1 if held is None else held)
        return None if held < 0 else held

    def complete_steps(self) -> list[int]:
        """The steps whose folders hold every file of a committed save, as this process sees
        them (a save in flight, or one that failed, is not among them)."""
        folder = epath.Path(self.directory)
        names = [d.name for d in folder.iterdir()] if folder.is_dir() else []
        return [int(n) for n in names if n.isdigit() and is_complete(self.step_dir(int(n)))]

    def has_steps(self) -> bool:
        """Whether process 0 sees a step checkpoint (readable or not), on every process: the
        same answer :meth:`restore_latest` acts on."""
        return bool(_broadcast(len(self.manager.all_steps())))

    def save(
        self,
        step: int,
        state: Any,
        meta: dict,
        *,
        force: bool = False,
        data_position: int | None = None,
    ) -> bool:
        """Saves asynchronously at every ``every_steps`` step (or when ``force``).

        ``meta`` is the run's ``RunRecord.to_json()``; ``meta["final"]`` is set when
        ``step == meta["total_steps"]`` (such steps survive rotation); ``data_position`` (this
        process's ``Batches.next_position``) is gathered from every process into
        ``meta["data_positions"]``. Call on every process.
        """
        if not force and (self.every_steps <= 0 or step % self.every_steps):
            return False
        self.check_lock()
        if self.manager.latest_step() == step:
            return False
        meta = self._with_final(step, meta)
        if data_position is not None:
            meta["data_positions"] = _gather(data_position)
        saved = _save_async(self.manager, self._pending, step, state, meta)
        self._pending = step
        return saved

    def restore_latest(self, abstract_state: Any) -> tuple[Any, dict] | None:
        """The newest readable step's state and meta (None without checkpoints).

        Newer unreadable steps are moved aside, one warning line each. All processes agree
        (process 0 picks each candidate; a step unreadable on any process is unreadable).
        When no step is readable nothing is moved and :class:`CheckpointError` is raised.
        """
        steps = sorted(self.manager.all_steps(), reverse=True)
        count = _broadcast(len(steps))
        problems: dict[int, str] = {}
        for i in range(count):
            step = _broadcast(steps[i] if i < len(steps) else -1)
            restored, problem = self._try_restore(step, abstract_state)
            failed = _gather(problem is not None)
            if not any(failed):  # every process read it: now a collective check of its values
                problem = state_damage(self.step_dir(step), restored[1], restored[0])
            if not any(failed) and problem is None:
                for bad, why in problems.items():
                    why = f"cannot be read ({why}); resuming from step {step}"
                    _move_aside(self.directory, bad, why)
                if problems:
                    _sync("vision_jax:moved_aside")
                    self.manager.reload()
                return restored
            problems[step] = problem or f"unreadable on process {failed.index(True)}"
            restored = None  # a damaged state's arrays go before the next step's are read
        if problems:
            listed = "; ".join(f"step {s}: {why}" for s, why in problems.items())
            raise CheckpointError(
                f"No checkpoint in {self.directory} can be read ({listed}). Move the step "
                "folders away to start afresh, or use another --workdir."
            )
        return None

    def _try_restore(self, step: int, abstract_state: Any) -> tuple[Any, str | None]:
        """``((state, meta), None)``, or ``(None, why)`` when ``step`` is unreadable. Raises
        :class:`CheckpointError` when it does not match ``abstract_state``."""
        where = f"{self.directory} (step {step})"
        path = self.step_dir(step)
        missing = [f for f in REQUIRED_FILES if not (path / f).exists()]
        if missing:
            return None, f"missing {', '.join(missing)}"
        restored, problem = _read_step(path, abstract_state)
        if problem is not None:
            self._check_matches(path / STATE_ITEM, abstract_state, where)
            return None, problem
        check_same_structure(abstract_state, restored[0], where=where)
        return restored, None

    def _check_matches(self, item: epath.Path, abstract: Any, where: str) -> None:
        """Raises the mismatch error if the metadata of the orbax item ``item`` is readable and
        differs in shape or structure from ``abstract``; returns if it matches or cannot be
        read."""
        try:
            tree = ocp.StandardCheckpointHandler().metadata(item).tree
        except Exception:  # unreadable metadata: the step is damaged, not mismatched
            return
        expected, saved = dict(_shapes(abstract)), dict(_shapes(tree))
        if expected != saved:
            raise CheckpointMismatchError(where, _shape_diff(saved, expected))

    def wait(self) -> None:
        with _reporting_failed_saves(self.manager, self._pending):
            self.manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves, closes the manager and releases the workdir lock; removes
        the checkpoints folder again if this run made it and saved nothing in it (nor a best:
        :meth:`keep_folder`). A Ctrl-C
        (KeyboardInterrupt) while it waits is raised once the lock is released: a save under
        way ends first, not after the workdir is free for another run."""
        with uninterrupted():
            try:
                with _reporting_failed_saves(self.manager, self._pending):
                    self.manager.close()
                if not _lost(self.lock):
                    _remove_if_unused(self.directory, self._new and not self._keep_folder)
            finally:
                if self.lock is not None:
                    self.lock.release()


# What a step checkpoint's meta records and a best checkpoint's does not (the train loop's
# position, its open window, the final metrics, whether the run ends there or went on).
_STEP_ONLY = (
    "final", "data_positions", "stream_order", "train_window", "reported", "evaluation_pending",
    "continued_to",
)  # fmt: skip


class BestCheckpoint:
    """The train state of the best evaluation so far, in ``<workdir>/best/<step>`` (laid out
    like a checkpoint step): one is kept, the newest complete save (:meth:`wait`).

    The loop saves here only on an improvement (:class:`vision_jax.selection.Selection`
    decides); a step already saved (evaluated again after a resume) is not written twice.
    """

    def __init__(
        self, workdir: str, metric: str, mode: str, *, async_save: bool = True, lock: Any = None,
        checkpoints: Checkpointer | None = None,
    ):  # fmt: skip
        """``checkpoints``: the run's step checkpoints, which a failed save's error names (the
        newest complete one, that a resume reads)."""
        self.directory = os.path.join(workdir, BEST_DIR)
        self._resumable = _steps_not_at_hand if checkpoints is None else checkpoints.complete_steps
        self._checkpoints = checkpoints
        self.lock = lock  # the workdir's: once another run took it over, nothing is written
        if not is_url(workdir):
            self.directory = os.path.abspath(self.directory)
        self.metric = metric
        self._new = _is_new(self.directory)
        _check_folder(self.directory)
        if jax.process_index() == 0:
            _move_aside_unfinished(self.directory)
            _remove_probes(self.directory)
        _sync("vision_jax:best_tidied")
        self._pending: int | None = None  # the step of the newest save (it may be in flight)
        policy = ocp.checkpoint_managers.BestN(
            get_metric_fn=lambda metrics: metrics[metric], reverse=mode == "min", n=1
        )
        self.manager = ocp.CheckpointManager(
            self.directory,
            item_names=(STATE_ITEM, META_ITEM),
            options=ocp.CheckpointManagerOptions(
                preservation_policy=policy,
                save_interval_steps=1,
                enable_async_checkpointing=async_save,
                create=True,
            ),
        )
        _check_usable(self.manager, self._new)

    def has(self, step: int) -> bool:
        """Whether ``step`` is a best checkpoint, as process 0 sees it (on every process: the
        callers' next steps are collective)."""
        return bool(_broadcast(int(step in self.manager.all_steps())))

    def save(self, step: int, state: Any, meta: dict, value: float) -> None:
        """Saves ``state`` as the best, scoring ``value``, once the previous save is complete.
        Call on every process."""
        _check_lock(self.lock)
        if self.has(step):
            return
        _save_async(
            self.manager, self._pending, step, state, meta, resumable=self._resumable,
            metrics={self.metric: float(value)},
        )  # fmt: skip
        self._pending = step
        if self._checkpoints is not None:
            self._checkpoints.keep_folder()

    def wait(self) -> None:
        """Waits for the pending save; the newest complete one is then the only one kept
        (orbax's policy keeps steps of earlier runs, whose scores it does not know)."""
        with _reporting_failed_saves(self.manager, self._pending, self._resumable):
            self.manager.wait_until_finished()
        if self._pending is not None and self._pending in self.manager.all_steps():
            if not _lost(self.lock):
                self.keep_only(self._pending)
        self._pending = None  # complete: the next wait has nothing to list or remove

    def keep_only(self, step: int | None) -> None:
        """Removes every best checkpoint but ``step`` (a complete one; None: every one). Call
        on every process."""
        _check_lock(self.lock)
        for other in self.manager.all_steps():
            if other != step:
                self.manager.delete(other)

    def restore(
        self, abstract_state: Any, step_dir: Callable[[int], epath.Path] | None = None
    ) -> tuple[int, Any, dict]:
        """The best step, its state (in the shardings of ``abstract_state``) and meta; from the
        step checkpoint of the same step (``step_dir(step)``) if the best's own is damaged."""
        self.wait()
        step = self.manager.latest_step()
        if step is None:
            raise CheckpointError(
                f"No best checkpoint in {self.directory}: no validation gave a finite "
                f"{self.metric} (a detection split without boxes has no mAP, say)."
            )
        path = epath.Path(self.directory) / str(step)
        restored, problem = _read_step(path, abstract_state)
        if problem is None:
            problem = state_damage(path, restored[1], restored[0])
        other = None if step_dir is None else step_dir(step)
        if problem is not None and other is not None and other.is_dir():
            same, damage = _read_step(other, abstract_state)
            if damage is None and state_damage(other, same[1], same[0]) is None:
                logger.warning(
                    "The best checkpoint %s is damaged (%s): reading the same step from %s, "
                    "and saving it again.", path, problem, other,
                )  # fmt: skip
                self._save_again(step, *same)
                return step, *same
        if problem is not None:
            raise CheckpointError(
                f"Cannot read the best checkpoint {self.directory}/{step}: {problem}. The step "
                "checkpoints are not affected: predict and export read the newest with "
                "--which=latest."
            )
        return step, *restored

    def _save_again(self, step: int, state: Any, meta: dict) -> None:
        """Replaces the damaged best ``step`` (moved to ``corrupt/``, as damaged step
        checkpoints are) by ``state``, the same step read from its step checkpoint (``meta``:
        that checkpoint's, less what only step checkpoints record); complete once this returns.
        Call on every process."""
        _check_lock(self.lock)
        _move_aside(self.directory, step, "is damaged; the same step's checkpoint replaces it")
        _sync("vision_jax:best_moved_aside")
        self.manager.reload()
        meta = {k: v for k, v in meta.items() if k not in _STEP_ONLY and k != "digest"}
        if "stopped_early" in meta:  # (a best is saved as an improvement, not as a stop)
            meta["stopped_early"] = False
        value = (meta.get("selection") or {}).get("best_value")
        metrics = None if value is None else {self.metric: float(value)}
        _save_async(
            self.manager, None, step, state, meta, resumable=self._resumable, metrics=metrics
        )
        self._pending = step
        self.wait()

    def close(self) -> None:
        """Waits for a pending save (a Ctrl-C while it waits is raised after it: see
        :meth:`Checkpointer.close`); removes the folder if this run made it and saved nothing."""
        with uninterrupted():
            self.wait()
            with _reporting_failed_saves(self.manager, self._pending, self._resumable):
                self.manager.close()
        if not _lost(self.lock):
            _remove_if_unused(self.directory, self._new)


def _check_lock(lock: Any) -> None:
    """Raises :class:`vision_jax.lock.LockError` once another run took over ``lock`` (None:
    none)."""
    if lock is not None:
        lock.check()


def _lost(lock: Any) -> bool:
    """Whether another run took over the workdir ``lock`` (None: none)."""
    return lock is not None and lock.lost is not None


def _is_new(directory: str) -> bool:
    """Whether process 0 is about to make ``directory`` (a checkpoint manager's)."""
    return jax.process_index() == 0 and not epath.Path(directory).exists()


def _remove_if_unused(directory: str, new: bool) -> None:
    """Removes ``directory`` if it was ``new`` to this run and is still empty (an error came
    before the first save): the workdir is left as it was."""
    folder = epath.Path(directory)
    if new and folder.exists() and not any(folder.iterdir()):
        with contextlib.suppress(OSError):
            folder.rmdir()


def _shapes(tree: Any) -> list[tuple[str, tuple[int, ...]]]:
    """Sorted ``(path, shape)`` of a pytree's arrays (None leaves dropped)."""
    from vision_jax.masks import path_to_str

    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return sorted((path_to_str(p), tuple(np.shape(x))) for p, x in leaves if x is not None)


def _shape_diff(saved: dict[str, tuple], expected: dict[str, tuple]) -> list[str]:
    """The arrays whose shapes differ, or that only one side has."""
    return [
        f"{k} {saved[k] if k in saved else 'absent'} in the checkpoint, "
        f"{expected[k] if k in expected else 'absent'} in this run"
        for k in sorted(saved.keys() | expected.keys())
        if saved.get(k) != expected.get(k)
    ]


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
