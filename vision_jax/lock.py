"""One run per workdir: ``<workdir>/vision_jax.lock``, held by process 0 of the run.

The lock file is created atomically (``O_EXCL``) and holds the owner's host, pid and start
time (and, on Linux, the process's start time in clock ticks since boot) as JSON; the owner
touches it every ``HEARTBEAT_S`` seconds. A second run fails at once naming the owner. A lock
left by a dead run is taken over with a warning: on the same host when its pid is gone (or a
zombie), or belongs to another process now (another start time, or this process's own pid
after a container restart reused it) and its heartbeat stopped; from another host when its
heartbeat is older than ``STALE_AFTER_S``, or at once when SLURM requeued its job.
A live owner on the same host keeps its lock however old its heartbeat (a suspended job, a
stopped process). In a multi-host run process 0 takes the lock and the other processes share
its verdict. The owner's heartbeat makes a deleted lock again. Where another run holds the lock
now, this run lost it (a heartbeat that could not reach the file for longer than
``STALE_AFTER_S``), and two runs must not save into one workdir: the command line (and every
process of a multi-process run) ends at once (exit :data:`EXIT_LOCK_LOST`, one line); a Python
caller's run is marked :attr:`WorkdirLock.lost`, and the loop and the saves call
:meth:`WorkdirLock.check`, which raises :class:`LockError` naming the other run (the process,
a notebook's kernel, lives on).
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import json
import logging
import os
import socket
import sys
import threading
import time

import jax
import numpy as np

from vision_jax.output_errors import is_url, printable, workdir_problem

logger = logging.getLogger(__name__)

LOCK_NAME = "vision_jax.lock"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0
WRITE_GRACE_S = 2.0  # a lock file without its JSON for longer was left half-written
EXIT_LOCK_LOST = 1  # an error: another run took over the workdir (not resumable here)


class LockError(RuntimeError):
    """The workdir is in use by another run."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """The process's state letter and start time in clock ticks since boot
    (``/proc/<pid>/stat``'s 3rd and 22nd fields; None where there is no such file)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return fields[0], int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


def _describe(owner: dict) -> str:
    return f"host {owner.get('host')}, pid {owner.get('pid')}, started {owner.get('started', '?')}"


_HELD_HERE: set[str] = set()  # the lock files this process holds (real paths)


def stale_reason(owner: dict, age_s: float, path: str) -> str | None:
    """Why the lock ``path`` of ``owner`` (heartbeat ``age_s`` seconds ago) is stale, or
    None."""
    if owner.get("half_written"):
        return f"it was left half-written {age_s:.0f} s ago"
    pid = int(owner.get("pid", -1))
    elsewhere = owner.get("host") != socket.gethostname()  # (here, its pid answers for it)
    if elsewhere and (requeued := _requeued(owner.get("slurm_job"))) is not None:
        return requeued
    if not elsewhere:
        stat = _proc_stat(pid)
        if not _pid_alive(pid) or (stat is not None and stat[0] == "Z"):
            return f"its process {pid} is gone"
        # This process's pid, in a lock it does not hold: a restarted container's entrypoint
        # (containers sharing a host name may each be pid 1: the heartbeat must have stopped).
        mine = pid == os.getpid() and os.path.realpath(path) not in _HELD_HERE
        if mine and age_s > 2 * HEARTBEAT_S:
            return (
                f"its pid {pid} is this process's, which does not hold it, and its heartbeat "
                f"is {age_s:.0f} s old"
            )
        started, now = owner.get("pid_start"), None if stat is None else stat[1]
        if started is not None and now is not None:
            # Another start time: another process, or a container of the same host name
            # (then its heartbeat goes on).
            if started != now and age_s > 2 * HEARTBEAT_S:
                return (
                    f"its pid {pid} belongs to another process now and its heartbeat is "
                    f"{age_s:.0f} s old"
                )
            if started == now:
                return None  # the owner itself, alive: stopped or suspended, not dead
    if age_s > STALE_AFTER_S:
        return f"its heartbeat is {age_s:.0f} s old (> {STALE_AFTER_S:.0f} s)"
    return None


def _slurm_job() -> list | None:
    """This process's SLURM cluster, job id and restart count (``--requeue`` keeps the id and
    counts up), or None outside a batch job's SLURM environment."""
    job, restarts = os.environ.get("SLURM_JOB_ID", ""), os.environ.get("SLURM_RESTART_COUNT")
    if not job.isdigit() or restarts is None or not restarts.isdigit():
        return None
    return [os.environ.get("SLURM_CLUSTER_NAME", ""), int(job), int(restarts)]


def _requeued(owner_job: object) -> str | None:
    """Why the lock of an earlier run of this SLURM job, on another host, is stale (SLURM
    requeues a job once its earlier run has ended), or None."""
    mine = _slurm_job()
    if mine is None or not isinstance(owner_job, list) or len(owner_job) != 3:
        return None
    if owner_job[:2] == mine[:2] and owner_job[2] < mine[2]:
        return f"SLURM requeued its job {mine[1]} (restart {owner_job[2]} -> {mine[2]})"
    return None


def _lost_message(path: str, owner: dict) -> str:
    return (
        f"Another run took over this run's workdir lock {path} ({_describe(owner)}); this run "
        "stops without saving more, leaving the workdir to it."
    )


def _lost(path: str, owner: dict) -> None:
    """Ends this process at once, saving nothing more: another run holds its workdir's lock."""
    print(f"error: {_lost_message(path, owner)}", file=sys.stderr, flush=True)
    os._exit(EXIT_LOCK_LOST)


class WorkdirLock:
    """The lock of one run's workdir; :meth:`release` (also at exit) frees it.

    ``exit_on_loss``: a lock that another run took over ends the process (the command line);
    else (a Python caller) :attr:`lost` says so and :meth:`check` raises :class:`LockError`.
    """

    def __init__(self, workdir: str, *, exit_on_loss: bool = False):
        self.url = is_url(workdir)  # gs://...: no atomic create; not locked
        self.path = os.path.join(workdir if self.url else os.path.abspath(workdir), LOCK_NAME)
        self.held = False
        self.exit_on_loss = exit_on_loss
        self.lost: str | None = None  # why, once another run holds the lock: nothing more saved
        self._owner: dict = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> WorkdirLock:
        """Takes the lock (process 0) or raises :class:`LockError`; all processes agree."""
        error = None
        if self.url:
            logger.warning("Workdir %s is a URL: it is not locked against a second run.", self.path)
            return self
        # A process of a multi-process run exits: raised in one, its peers would wait.
        self.exit_on_loss = self.exit_on_loss or jax.process_count() > 1
        if jax.process_index() == 0:
            try:
                self._take()
            except (LockError, OSError) as e:  # never leave the other processes waiting
                error = str(e) if isinstance(e, LockError) else f"Cannot lock {self.path}: {e}"
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            failed = multihost_utils.broadcast_one_to_all(np.int32(error is not None))
            if int(failed) and error is None:
                error = f"Process 0 could not lock the workdir ({self.path}): see its message."
        if error is not None:
            raise LockError(error)
        return self

    def _take(self) -> None:
        workdir = os.path.dirname(self.path)
        if problem := workdir_problem(workdir):
            raise LockError(f"Workdir {printable(workdir)} {problem}.")
        os.makedirs(workdir, exist_ok=True)
        for _ in range(3):  # a race with another run taking over the same stale lock
            if self._create():
                self._start_heartbeat()
                return
            owner, age = self._read()
            if owner is None:
                continue  # released meanwhile
            reason = stale_reason(owner, age, self.path)
            if reason is None:
                raise LockError(
                    f"Workdir {os.path.dirname(self.path)} is in use by another run "
                    f"({_describe(owner)}; lock {self.path}). Wait for it to finish, use another "
                    "--workdir, or delete the lock file if that run is gone."
                )
            if self._break(owner):
                logger.warning(
                    "Took over the stale workdir lock of a dead run (%s): %s.",
                    _describe(owner), reason,
                )  # fmt: skip
        raise LockError(f"Could not lock {self.path}: other runs keep taking it.")

    def _create(self) -> bool:
        """Creates the lock file if absent; True when this process now owns it."""
        now = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
        owner = {"host": socket.gethostname(), "pid": os.getpid(), "started": now}
        if (stat := _proc_stat(os.getpid())) is not None:
            owner["pid_start"] = stat[1]
        if (job := _slurm_job()) is not None:
            owner["slurm_job"] = job
        if not self._create_as(owner):
            return False
        self._owner = owner
        self.held = True
        _HELD_HERE.add(os.path.realpath(self.path))
        atexit.register(self.release)
        return True

    def _read(self) -> tuple[dict | None, float]:
        """The lock's owner and the age of its heartbeat in seconds (None if it vanished). A
        lock without its JSON is being written (read again, up to ``WRITE_GRACE_S``) or was
        left half-written by a run killed while creating it (stale)."""
        deadline = time.monotonic() + WRITE_GRACE_S
        while True:
            try:
                with open(self.path) as f:
                    text = f.read()
                age = time.time() - os.stat(self.path).st_mtime
            except FileNotFoundError:
                return None, 0.0
            try:
                return json.loads(text), age
            except ValueError:
                if time.monotonic() > deadline:  # not the file's age: clocks of hosts differ
                    return {"host": "?", "pid": -1, "started": "?", "half_written": True}, age
                time.sleep(0.05)

    def _break(self, owner: dict) -> bool:
        """Moves the stale lock away, if it is still the one that was read."""
        aside = f"{self.path}.stale.{os.getpid()}"
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return False
        try:
            with open(aside) as f:
                moved = json.loads(f.read() or "{}")
        except ValueError:
            moved = {}
        if moved and moved != owner:  # another run took it over meanwhile: give it back
            with contextlib.suppress(FileExistsError):
                os.link(aside, self.path)
            os.remove(aside)
            return False
        os.remove(aside)
        return True

    def _start_heartbeat(self) -> None:
        self._stop = threading.Event()  # a fresh one: the lock may be taken again after release
        self.lost = None

        def beat() -> None:
            while not self._stop.wait(HEARTBEAT_S):
                self._beat()

        self._thread = threading.Thread(target=beat, name="workdir_lock", daemon=True)
        self._thread.start()

    def check(self) -> None:
        """Raises :class:`LockError` once another run holds this run's lock (it saves nothing
        more)."""
        if self.lost is not None:
            raise LockError(self.lost)

    def _beat(self) -> None:
        """Touches the lock; makes it again if it was deleted; where another run holds it now
        (this one lost it, deleted or taken over as stale: two runs must not save into one
        workdir) ends this process (``exit_on_loss``) or marks the lock :attr:`lost` and stops
        beating. A file system that does not answer skips the beat."""
        try:
            owner, _ = self._read()
            if self._stop.is_set():  # released meanwhile: the lock is not this run's any more
                return
            if owner is None and self._create_as(self._owner):
                logger.warning("The workdir lock %s was deleted while this run held it; made "
                               "it again.", self.path)  # fmt: skip
                return
            if owner is None:
                owner, _ = self._read()  # another run made it meanwhile
            taken = owner is not None and owner != self._owner and not owner.get("half_written")
            if taken and not self._stop.is_set():
                if self.exit_on_loss:
                    _lost(self.path, owner)
                self.lost = _lost_message(self.path, owner)
                self._stop.set()  # the file is the other run's: not touched again
                logger.error("%s", self.lost)
                return
            os.utime(self.path)
        except OSError:
            pass

    def _create_as(self, owner: dict) -> bool:
        """Creates the lock file holding ``owner`` if it is absent; whether it did (a file it
        could not write is removed again)."""
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(owner, f)
        except OSError:
            with contextlib.suppress(OSError):
                os.remove(self.path)
            raise
        return True

    def release(self) -> None:
        """Frees the lock (idempotent)."""
        if not self.held:
            return
        self.held = False
        _HELD_HERE.discard(os.path.realpath(self.path))
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5.0)  # a beat under way ends before the file goes
        atexit.unregister(self.release)
        owner, _ = self._read()
        if owner == self._owner:  # not taken over by another run meanwhile
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.path)
