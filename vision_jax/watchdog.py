"""Peer watchdog for multi-process runs: when a process dies or fails, the others exit in bounded
time, each with one line naming it.

Every process writes a heartbeat counter to the coordinator's key-value store (the
``jax.distributed`` client) every ``timeout / 10`` seconds (at most 5 s) and reads everyone
else's. A peer whose counter has not moved for ``timeout`` seconds is lost; a peer that failed
(an error it reported itself, :meth:`PeerWatchdog.fail`) is named at once. This process then
prints one line and exits with :data:`EXIT_PEER_LOST`, without waiting in collectives or in
``jax.distributed.shutdown`` (which would hang until JAX's own, longer, heartbeat timeout aborts
the process with a C++ message). Process 0 hosts the coordinator, so it leaves last: it waits
until every other process has left (or is lost) before it exits; otherwise the survivors' JAX
clients would abort on the vanished coordinator. A process that ends normally marks itself
done, so peers still finishing do not mistake it for lost.

If process 0 itself dies (``kill -9``), the other processes' JAX clients abort at once, before
this watchdog can speak (the Python hook that could, ``missed_heartbeat_callback``, aborts in
jaxlib 0.10.2); :mod:`vision_jax.abort_notice` replaces JAX's message with one line.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from typing import Any

logger = logging.getLogger(__name__)

EXIT_PEER_LOST = 69  # sysexits.h EX_UNAVAILABLE: a peer process failed or is gone
PREFIX = "vision_jax/heartbeat/"
DONE, FAILED, LEAVING = "done", "failed", "leaving"


class PeerWatchdog:
    """Background threads that end this process when a peer stops heartbeating or fails."""

    def __init__(self, client: Any, process_id: int, num_processes: int, timeout: float):
        self.client, self.me, self.n, self.timeout = client, process_id, num_processes, timeout
        self.interval = min(max(timeout / 10, 0.2), 5.0)
        now = time.monotonic()
        self._seen: dict[int, tuple[str | None, float]] = {
            p: (None, now) for p in range(num_processes) if p != process_id
        }
        self._answered = now  # when the coordinator last answered
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._leaving = threading.Lock()  # held by the one thread that ends the process

    def start(self) -> PeerWatchdog:
        for target, name in ((self._beat, "heartbeat"), (self._watch, "watchdog")):
            threading.Thread(target=target, name=f"vision_jax-{name}", daemon=True).start()
        return self

    def _set(self, value: str) -> None:
        self.client.key_value_set(f"{PREFIX}{self.me}", value, allow_overwrite=True)

    def _poll(self) -> None:
        """Reads every peer's key; remembers when each last changed."""
        values = dict(self.client.key_value_dir_get(PREFIX))
        now = time.monotonic()
        with self._lock:
            self._answered = now
            for peer, (old, since) in self._seen.items():
                value = values.get(f"{PREFIX}{peer}")
                self._seen[peer] = (value, since if value == old else now)

    def _beat(self) -> None:
        count = 0
        while not self._stop.is_set():
            count += 1
            try:
                self._set(str(count))
                self._poll()
            except Exception as e:  # the coordinator is gone or failing: _watch decides
                logger.debug("Heartbeat failed: %s", e)
            self._stop.wait(self.interval)

    def lost(self, timeout: float | None = None) -> str | None:
        """What is lost (silent for ``timeout``, default ``self.timeout``) or failed (a phrase),
        or None while every peer is fine."""
        now, timeout = time.monotonic(), timeout or self.timeout
        with self._lock:
            if (silent := now - self._answered) > timeout:
                return f"lost the coordinator (process 0 of {self.n}): no answer for {silent:.0f} s"
            for peer, (value, since) in sorted(self._seen.items()):
                kind, _, why = (value or "").partition(":")
                if kind == FAILED:
                    return f"process {peer} of {self.n} failed ({why})"
                if kind == LEAVING:
                    return f"process {peer} of {self.n} is stopping ({why})"
                if value != DONE and now - since > timeout:
                    return f"lost process {peer} of {self.n}: no heartbeat for {now - since:.0f} s"
        return None

    def _watch(self) -> None:
        while not self._stop.wait(self.interval):
            if (lost := self.lost()) is not None:
                self.exit(lost)

    def _first_to_leave(self) -> None:
        """Returns in the first thread to end the process; blocks any later one (the watchdog
        and the main thread may both find a peer lost) until the first has ended it, so that
        one line says why."""
        if not self._leaving.acquire(blocking=False):
            threading.Event().wait()

    def _leave(self, mark: str, code: int) -> None:
        """Marks this process ``mark``; process 0 waits for the others to leave; exits."""
        self._stop.set()
        try:
            self._set(mark)
            if self.me == 0:
                self._wait_for_peers()
        except Exception as e:
            logger.debug("Could not mark process %d %s: %s", self.me, mark, e)
        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
        os._exit(code)

    def _wait_for_peers(self) -> None:
        """Until every other process has left, is done, or is silent for three heartbeats (at
        most ``timeout``)."""
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            self._poll()
            now = time.monotonic()
            with self._lock:
                if all(
                    (v or "").partition(":")[0] in (DONE, FAILED, LEAVING)
                    or now - since > 3 * self.interval
                    for v, since in self._seen.values()
                ):
                    break
            time.sleep(self.interval / 4)
        time.sleep(0.5)  # let the last ones exit before the coordinator goes

    def exit(self, lost: str) -> None:
        """Prints one line naming what is lost or failed and ends this process."""
        self._first_to_leave()
        message = f"{lost}; stopping process {self.me} too (exit {EXIT_PEER_LOST})."
        logger.error("%s", message)
        print(f"vision_jax: error: {message}", file=sys.stderr, flush=True)
        self._leave(f"{LEAVING}:{lost[:200]}", EXIT_PEER_LOST)

    def fail(self, code: int, error: str) -> None:
        """Ends this process after its own ``error`` (already printed): peers stop at once."""
        self._first_to_leave()
        self._leave(f"{FAILED}:{error[:200]}", code)

    def wait_for_verdict(self, seconds: float) -> str | None:
        """After an error: waits up to ``seconds`` for a failed peer, or one silent for three
        heartbeats (a failed collective already hints that a peer is gone); None if every peer
        stayed fine."""
        deadline = time.monotonic() + seconds
        while (lost := self.lost(3 * self.interval)) is None and time.monotonic() < deadline:
            time.sleep(self.interval / 2)
        return lost

    def finish(self) -> None:
        """Marks this process done (a normal end) and stops the threads."""
        self._stop.set()
        try:
            self._set(DONE)
        except Exception as e:
            logger.debug("Could not mark process %d done: %s", self.me, e)


def start_watchdog(timeout: float) -> PeerWatchdog | None:
    """A started :class:`PeerWatchdog` for this multi-process run; None for one process or
    ``timeout <= 0``."""
    import jax
    from jax._src import distributed

    client = distributed.global_state.client
    if timeout <= 0 or client is None or jax.process_count() < 2:
        return None
    return PeerWatchdog(client, jax.process_index(), jax.process_count(), timeout).start()
