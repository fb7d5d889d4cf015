"""Stopping a run cleanly on SIGTERM or SIGINT: a checkpoint at a step every process agrees on.

SIGUSR1, SIGUSR2 and SIGHUP (SLURM's ``--signal``, submitit, a closed ssh session) are taken as
SIGTERM is, where no handler of the caller's own (or an inherited SIG_IGN) has them: a Python
handler, or a C-level one that ``signal.getsignal`` does not see (``faulthandler.register``'s
dump-the-stacks-on-USR1 hook, read through libc's ``sigaction``). A C-level handler of SIGTERM or
SIGINT is taken during the run as a Python one is, and put back after it.

One process: the signal sets a flag that the loop reads at the next step boundary. Several
processes (``jax.distributed``): SIGTERM goes to JAX's preemption notifier (installed by
``jax.distributed.initialize``), whose sync protocol picks the next step that no process has passed
yet (``multihost_utils.reached_preemption_sync_point``; a mutex per step, no communication until a
signal comes); SIGINT (and the others above) is handed on to it as SIGTERM. With that service off
(``jax_enable_preemption_service=False``) the processes agree by an allgather of the flag every
:data:`AGREE_EVERY` steps. A signal sent to any one process stops them all at that step. A Ctrl-C
(SIGINT) after the first signal exits at once, without saving (the command line), or raises
KeyboardInterrupt in the main thread (a Python caller's process, e.g. a notebook's kernel, lives
on), as does every later one; inside :func:`uninterrupted` (a checkpoint save handed to orbax's
threads, the wait for them before the workdir is released) it is held until the block ends: cut
short there, orbax's threads would write on after the run ended. Any other signal after the first
is the same stop request again (a supervisor that signals both the process group and the child):
one line, the save goes on. A signal that this process inherited as ignored (SIGINT in a background
job) stays ignored: the launcher forwards SIGTERM.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import Any

import numpy as np

# sysexits.h EX_TEMPFAIL: stopped by a signal after saving a checkpoint; rerun to resume.
EXIT_STOPPED = 75
SIGNALS = (signal.SIGTERM, signal.SIGINT)
# Asked for as SIGTERM is: SLURM's --signal=USR1@90 (Lightning), submitit's USR2, a closed ssh
# session's HUP. Caught only where their handler is the default (which ends the process): a
# Python caller's own handler (submitit's) is kept, an inherited SIG_IGN (nohup) too, and a
# C-level one (faulthandler.register): see defaulted().
ALSO = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP)
AGREE_EVERY = 10  # steps between agreements when JAX's preemption service is off
NOTICE_KEY = "RECEIVED_PREEMPTION_NOTICE"  # set by JAX's preemption notifier (TSL)


class StopRequested(Exception):
    """Training stopped early on a signal, after saving (or already having) a checkpoint."""

    def __init__(self, step: int, reason: str, directory: str | None):
        """``directory``: where the checkpoint is; None: none was saved yet."""
        self.step, self.reason, self.directory = step, reason, directory
        super().__init__(
            f"stopped at step {step} ({reason}); checkpoint in {directory}. Run the same command "
            "again to resume."
            if directory is not None
            else f"stopped before the first step ({reason}); nothing was saved. Run the same "
            "command again to start."
        )


_shielded = 0  # uninterrupted() blocks open on the main thread
_held = False  # a KeyboardInterrupt that came in one, raised as the outermost ends


@contextlib.contextmanager
def uninterrupted() -> Iterator[None]:
    """A block on the main thread that a signal's KeyboardInterrupt (:class:`StopSignals`) does
    not cut short: it is raised as the block ends (unless the block raises). Elsewhere a no-op
    (signal handlers run on the main thread)."""
    global _shielded, _held
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _shielded += 1
    try:
        yield
    finally:
        _shielded -= 1
        held = _held and not _shielded
        _held = _held and bool(_shielded)
    if held:
        raise KeyboardInterrupt


def _action(sig: int) -> Any:
    """The process's ``struct sigaction`` for ``sig`` as raw bytes (its first field is the
    handler's address on Linux and macOS), read through libc; None where that cannot be done."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        action = ctypes.create_string_buffer(512)  # larger than any libc's struct sigaction
        if libc.sigaction(int(sig), None, action) != 0:
            return None
        return action
    except (OSError, AttributeError, TypeError, ValueError):
        return None


def _c_handler(action: Any) -> int | None:
    """The handler's address in a :func:`_action` (0: SIG_DFL, 1: SIG_IGN); None: unknown."""
    import ctypes

    return None if action is None else ctypes.c_void_p.from_buffer(action).value or 0


def _foreign_action(sig: int) -> Any:
    """``sig``'s :func:`_action` where it has a C-level handler that Python does not know of
    (``signal.getsignal`` says SIG_DFL: ``faulthandler.register``, a C library's), else None."""
    if signal.getsignal(sig) is not signal.SIG_DFL:
        return None
    action = _action(sig)
    return action if _c_handler(action) not in (0, None) else None


def defaulted(signals: tuple[int, ...] = ALSO) -> tuple[int, ...]:
    """Those of ``signals`` whose handler is the default (taken by a run or a command as SIGTERM
    is): no Python handler, no inherited SIG_IGN, no C-level handler (faulthandler's)."""
    return tuple(s for s in signals if signal.getsignal(s) is signal.SIG_DFL
                 and _foreign_action(s) is None)  # fmt: skip


def take(signals: tuple[int, ...], handler: Any) -> dict[int, Any]:
    """Installs ``handler`` for ``signals``; what :func:`give_back` puts back (a C-level handler
    that Python does not know of included)."""
    previous = {}
    for sig in signals:
        action = _foreign_action(sig)  # before the handler is installed over it
        previous[sig] = (signal.signal(sig, handler), action)
    return previous


def give_back(previous: dict[int, Any]) -> None:
    """Puts back the handlers :func:`take` replaced."""
    for sig, (handler, action) in previous.items():
        signal.signal(sig, handler)
        if action is not None:  # Python's table says SIG_DFL, as before; the C handler is back
            import ctypes

            ctypes.CDLL(None).sigaction(int(sig), action, None)
    previous.clear()


def _sync_manager() -> Any:
    """JAX's preemption sync manager when ``jax.distributed`` is initialized, else None."""
    from jax._src import distributed

    if distributed_client() is None:
        return None
    return distributed.global_state.preemption_sync_manager


def _say(message: str) -> None:
    """One line on stderr, safe inside a signal handler."""
    try:
        os.write(2, f"vision_jax: {message}\n".encode())
    except OSError:  # (SIGHUP: the terminal may be gone) the stop goes on without its line
        pass


def tell(text: str) -> None:
    """``text`` and a newline on stderr, flushed; nothing where it is gone (a
    SIGHUP that closed the terminal), so that a command's exit status stays the documented one
    (129, 75) rather than an OSError's 1."""
    try:
        print(text, file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass


def flush_stdout() -> None:
    """``sys.stdout.flush()``, without an error where stdout is gone (see :func:`tell`)."""
    try:
        sys.stdout.flush()
    except (OSError, ValueError):
        pass


class StopSignals:
    """Catches SIGTERM, SIGINT and :data:`ALSO` while entered (a context manager; main thread
    only).

    The signals are read by a thread through ``signal.set_wakeup_fd``, so a message appears and
    a second Ctrl-C exits at once even while the main thread waits in a long step or compile
    (``exit_on_second``; else it raises KeyboardInterrupt in the main thread once that thread
    runs Python again). ``stop_before(step)`` is called once before training,
    ``should_stop(step)`` after every step (absolute step numbers, as orbax uses with the same
    sync manager).
    """

    def __init__(self, exit_on_second: bool = False) -> None:
        self.received: str | None = None
        # A process of a multi-process run exits: raised in one, its peers would wait.
        self._exit_on_second = exit_on_second or distributed_client() is not None
        self._in_main = 0  # signals the main thread's handler has seen
        self._repeated = False  # a signal other than SIGINT came after the first: said once
        self._now = "exit now" if self._exit_on_second else "interrupt"
        self._sync = _sync_manager()
        self._previous: dict[int, Any] = {}
        self._wakeup: tuple[int, Any] | None = None  # (write end, the previous wakeup fd)

    def __enter__(self) -> StopSignals:
        mine = [s for s in SIGNALS if not (s == signal.SIGTERM and self._sync is not None)]
        try:  # JAX's preemption notifier owns SIGTERM when it runs; keep inherited SIG_IGN
            mine = [s for s in mine if signal.getsignal(s) is not signal.SIG_IGN]
            mine += defaulted()
            self._previous.update(take(tuple(mine), self._in_main_thread))
            if self._previous:
                read, write = os.pipe()
                os.set_blocking(write, False)
                old = signal.set_wakeup_fd(write, warn_on_full_buffer=False)
                self._wakeup = (write, old)
                threading.Thread(target=self._watch, args=(read,), daemon=True).start()
        except ValueError:  # not the main thread: leave signals alone
            self.__exit__(None, None, None)
        return self

    def __exit__(
        self, kind: type | None, error: BaseException | None, tb: TracebackType | None
    ) -> None:
        give_back(self._previous)
        if self._wakeup is not None:
            write, old = self._wakeup
            signal.set_wakeup_fd(old)
            os.close(write)  # the watcher sees the end of its pipe
            self._wakeup = None

    def _watch(self, read: int) -> None:
        """Reads the signal numbers the C-level handler writes to the wakeup pipe."""
        with os.fdopen(read, "rb", buffering=0) as pipe:
            while data := pipe.read(64):
                for signum in data:
                    if signum in self._previous:
                        self._handle(signum)

    def _in_main_thread(self, signum: int, frame: Any) -> None:
        """The Python-level handler: raises KeyboardInterrupt at the second signal and every
        later one (unless the watcher exits the process first), or holds it until the
        :func:`uninterrupted` block under way ends."""
        global _held
        self._in_main += 1
        if self._in_main >= 2 and signum == signal.SIGINT and not self._exit_on_second:
            if _shielded:
                _held = True
                return
            raise KeyboardInterrupt

    def _handle(self, signum: int) -> None:
        name = signal.Signals(signum).name
        if self.received is not None and signum != signal.SIGINT:
            # The same stop request again (a supervisor that signals the process group and the
            # child, a wrapper that forwards it): not an order to exit; only Ctrl-C is.
            if not self._repeated:
                self._repeated = True
                _say(f"{name} again: still stopping at the next step (Ctrl-C: {self._now}).")
            return
        if self.received is not None:
            if self._exit_on_second:
                _say(f"second signal ({name}): exiting now, without saving.")
                os._exit(128 + signum)
            later = " once the checkpoint I/O under way is done" if _shielded else ""
            _say(f"second signal ({name}): KeyboardInterrupt in the caller{later}, without saving.")
            return
        self.received = name
        again = "again" if signum == signal.SIGINT else "after it"
        _say(
            f"{name}: stopping at the next step, saved (a final evaluation stops at its next "
            f"batch; Ctrl-C {again}: {self._now})."
        )
        if self._sync is not None:
            os.kill(os.getpid(), signal.SIGTERM)  # to JAX's preemption notifier

    @property
    def reason(self) -> str:
        """What asked for the stop, for messages."""
        return self.received or "a signal to one of the processes"

    def stop_before(self, step: int) -> bool:
        """Whether a stop was asked for during setup (the same answer on every process); call
        once before training, ``step`` being the one resumed from."""
        if self._sync is None:
            return any_process(self.received is not None)
        # Steps are absolute (orbax asks the same sync manager at its saves). A notice that
        # came before this first call set the sync point to 1: look for the notice itself.
        self._sync.reached_sync_point(step)
        try:
            jax_client = distributed_client()
            notice = jax_client.key_value_try_get(NOTICE_KEY) if jax_client else None
        except Exception:  # NOT_FOUND: no notice
            notice = None
        return any_process(notice is not None)

    def should_stop(self, step: int) -> bool:
        """Whether to save and stop after ``step`` (the same answer on every process)."""
        if self._sync is not None:
            return bool(self._sync.reached_sync_point(step))
        import jax

        if jax.process_count() == 1:
            return self.received is not None
        # Several processes without JAX's preemption service: agree every AGREE_EVERY steps by
        # an allgather of the flag (it waits for the device: the loop cannot run ahead there).
        return step % AGREE_EVERY == 0 and any_process(self.received is not None)


class Interrupted(KeyboardInterrupt):
    """SIGTERM (or one of :data:`ALSO`) raised in a command as Ctrl-C's KeyboardInterrupt is
    (:func:`command`), so that the same cleanup runs; ``signum`` names it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _interrupt(signum: int, frame: Any) -> None:
    raise Interrupted(signum)


def command(main: Callable[[], int], name: str, left: str) -> int:
    """``main()`` as the command ``name`` (predict, export, evaluate, report): Ctrl-C, SIGTERM
    and :data:`ALSO` (where their handler is the default) end it with one line,
    ``<name>: interrupted (<signal>); <left>`` (what its output holds), and status 128 + the
    signal, not a traceback or an end without a word; a file being written whole
    (:func:`~vision_jax.output_errors.written_whole`) is removed. A Python caller of ``main``
    keeps its own handlers and gets Ctrl-C's KeyboardInterrupt."""
    previous = take(defaulted((signal.SIGTERM, *ALSO)), _interrupt)
    try:
        return main()
    except KeyboardInterrupt as e:
        signum = getattr(e, "signum", signal.SIGINT)
        after = "\n" if sys.stderr.isatty() else ""  # after a progress line
        tell(f"{after}{name}: interrupted ({signal.Signals(signum).name}); {left}")
        return 128 + signum
    finally:
        give_back(previous)


def distributed_client() -> Any:
    """The ``jax.distributed`` client, or None."""
    from jax._src import distributed

    return distributed.global_state.client


def any_process(flag: bool) -> bool:
    """Whether ``flag`` is set on any process."""
    import jax

    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.int32(flag))))
