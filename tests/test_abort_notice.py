"""The stderr reader of multi-process runs (vision_jax.abort_notice), with stand-in processes
(no JAX): JAX's abort becomes one line naming the lost coordinator, everything else passes
through unchanged, and exit statuses and signals stay the process's own."""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time

from vision_jax.abort_notice import JAX_FATAL, MAX_HELD

ROOT = pathlib.Path(__file__).resolve().parents[1]
FATAL = JAX_FATAL.decode()


def start(body: str, process: int | None = 1, count: int | None = 2) -> subprocess.Popen:
    """A process that routes its stderr through the reader, then runs ``body``."""
    code = (
        f"import os, signal, sys, time\nfrom vision_jax.abort_notice import route_stderr\n"
        f"route_stderr({process}, {count})\n{textwrap.dedent(body)}"
    )
    return subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip


def test_jax_abort_becomes_one_line_naming_the_lost_coordinator():
    proc = start(f"""
        print("I1202 JAX process 2 of 3, 1 local / 3 global devices (cpu).", file=sys.stderr)
        print("a result", flush=True)
        print("F1202 client.h:80] {FATAL}. Status: UNAVAILABLE: RPC failed", file=sys.stderr)
        print("*** Check failure stack trace: ***", file=sys.stderr, flush=True)
        os.abort()
    """)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGABRT
    assert out == "a result\n"
    assert err.splitlines() == [
        "I1202 JAX process 2 of 3, 1 local / 3 global devices (cpu).",
        "vision_jax: error: lost the coordinator (process 0 of 3): JAX's distributed service "
        "ended process 2 (UNAVAILABLE).",
    ]


def test_other_output_and_exit_statuses_pass_through():
    proc = start(f"""
        print("E1202 an error", file=sys.stderr)
        print("{FATAL}, quoted", file=sys.stderr)
        for i in range({MAX_HELD} + 1):
            print(i, file=sys.stderr)
        sys.exit(3)
    """)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 3
    expected = ["E1202 an error", f"{FATAL}, quoted", *map(str, range(MAX_HELD + 1))]
    assert err.splitlines() == expected


def test_a_signal_to_the_whole_group_reaches_the_process_and_its_last_lines_arrive():
    proc = start("""
        def stop(signum, frame):
            time.sleep(0.5)  # saving a checkpoint
            print("vision_jax: stopped at step 3 (SIGTERM)", file=sys.stderr)
            sys.exit(75)
        signal.signal(signal.SIGTERM, stop)
        print("training", file=sys.stderr, flush=True)
        time.sleep(60)
    """)
    line = proc.stderr.readline()
    assert line == "training\n"
    os.killpg(proc.pid, signal.SIGTERM)  # as a scheduler does: every process of the job
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 75
    assert err == "vision_jax: stopped at step 3 (SIGTERM)\n"
    assert not running_in_group(proc.pid, within=5.0)  # the reader ended with the stream


def running_in_group(group: int, within: float) -> list[str]:
    """Processes of ``group`` still running (zombies excluded) after up to ``within`` s."""
    deadline = time.monotonic() + within
    while True:
        ps = subprocess.run(["ps", "-o", "stat=,args=", "-g", str(group)],
                            capture_output=True, text=True).stdout  # fmt: skip
        running = [row for row in ps.splitlines() if row.strip() and not row.startswith("Z")]
        if not running or time.monotonic() > deadline:
            return running
        time.sleep(0.1)
