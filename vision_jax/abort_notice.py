"""One line instead of JAX's abort when a multi-process run loses its coordinator.

Process 0 hosts ``jax.distributed``'s coordination service. When it dies, every other process's
JAX client aborts at once from C++ ("Terminating process because the JAX distributed service
detected fatal errors", then a stack), before any Python code can run, so the watchdog
(:mod:`vision_jax.watchdog`) cannot speak first. :func:`route_stderr` therefore sends each
multi-process run's stderr through a small reader process forked before JAX starts: it copies
every line through as it comes; from JAX's fatal line on it holds the lines back, and when the
stream ends (the process is gone) it prints one line naming the lost coordinator instead of them
(after more than :data:`MAX_HELD` lines it was no abort: they are written after all). The reader
ignores SIGINT, SIGTERM and the signals taken as SIGTERM (:data:`vision_jax.signals.ALSO`; a
terminal's Ctrl-C or a scheduler's signal reaches every process) and ends with the stream, so
signals and exit statuses stay exactly those of the JAX process.
"""

from __future__ import annotations

import os
import re
import signal

from vision_jax.signals import ALSO, SIGNALS

JAX_FATAL = b"Terminating process because the JAX distributed service detected fatal errors"
_PROCESS_LINE = re.compile(rb"JAX process (\d+) of (\d+)")
_STATUS = re.compile(rb"Status: (\w+)")
MAX_HELD = 500  # an abort's message and stack are shorter: more lines mean it was no abort


def route_stderr(process: int | None = None, count: int | None = None) -> None:
    """From now on this process's stderr (fd 2) goes through the reader described above;
    ``process`` and ``count`` name this process until its log says (``JAX process K of N``)."""
    read_end, write_end = os.pipe()
    if os.fork() == 0:  # the reader: fd 2 is still the real stderr here
        os.close(write_end)
        for signum in SIGNALS + ALSO:
            signal.signal(signum, signal.SIG_IGN)
        try:
            copy_lines(os.fdopen(read_end, "rb"), 2, process, count)
        finally:
            os._exit(0)
    os.close(read_end)
    os.dup2(write_end, 2)
    os.close(write_end)


def copy_lines(stream, out_fd: int, process: int | None, count: int | None) -> None:
    """Copies ``stream`` to ``out_fd`` line by line until it ends, with JAX's fatal message
    replaced by :func:`coordinator_lost`'s line."""
    held: list[bytes] = []
    for line in iter(stream.readline, b""):
        if held or JAX_FATAL in line:
            held.append(line)
            if len(held) <= MAX_HELD:
                continue
            os.write(out_fd, b"".join(held))  # no abort after all: the process goes on
            held = []
            continue
        if match := _PROCESS_LINE.search(line):
            process, count = int(match[1]), int(match[2])
        os.write(out_fd, line)
    if held:
        os.write(out_fd, coordinator_lost(held[0], process, count).encode() + b"\n")


def coordinator_lost(fatal: bytes, process: int | None, count: int | None) -> str:
    """The line that replaces JAX's ``fatal`` message of ``process`` (of ``count``)."""
    status = _STATUS.search(fatal)
    why = f" ({status[1].decode()})" if status else ""
    of = f" of {count}" if count else ""
    me = "this process" if process is None else f"process {process}"
    return (
        f"vision_jax: error: lost the coordinator (process 0{of}): JAX's distributed service "
        f"ended {me}{why}."
    )
