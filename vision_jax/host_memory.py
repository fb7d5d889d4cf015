"""Transparent huge pages for the host memory of XLA's CPU steps, through glibc's malloc.

XLA's CPU runtime allocates a step's temporary buffers with ``malloc`` each time the step runs
(hundreds of MB to GB in a train step). glibc serves allocations that large with fresh ``mmap``
pages and returns them on ``free``, so every step faults its whole working set in again, 4 KiB
at a time, and the kernel zeroes each page. With glibc's ``glibc.malloc.hugetlb=1`` tunable,
malloc asks for transparent huge pages (``madvise``): 2 MiB pages, 512 times fewer faults and
TLB entries. The tunable is read when a process starts, so ``python -m vision_jax.main``
executes itself again, once, with it set (same process id, arguments and interpreter options),
before anything heavy is imported. Other programs (a notebook, your own script calling
:func:`vision_jax.train.train_and_evaluate`) get it by starting Python with
``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` in the environment; ``VISION_JAX_HUGE_PAGES=0``
keeps ``vision_jax.main`` from setting it. The first step pays for the huge pages (the kernel
assembles each one on first touch, compacting memory where it must); the steps after it gain.

Nothing changes where it would not help: off Linux, where the kernel's transparent huge pages
are ``never`` (off) or ``always`` (already on for every large allocation), or when the tunable
is already set. glibc older than 2.35 ignores the tunable.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

TUNABLE = "glibc.malloc.hugetlb=1"
OPT_OUT = "VISION_JAX_HUGE_PAGES"  # "0": leave malloc as it is
THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"


def transparent_huge_pages_mode(path: str = THP_SETTING) -> str | None:
    """The kernel's transparent huge page mode ("always", "madvise" or "never"); None if
    unknown (not Linux, or no such setting)."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return None
    selected = [word[1:-1] for word in text.split() if word.startswith("[")]
    return selected[0] if selected else None


def huge_pages_environment(
    environ: Mapping[str, str], thp_mode: str | None
) -> dict[str, str] | None:
    """``environ`` with :data:`TUNABLE` added to ``GLIBC_TUNABLES``; None when a process
    started with ``environ`` has nothing to gain (see the module docstring)."""
    tunables = [t for t in environ.get("GLIBC_TUNABLES", "").split(":") if t]
    if thp_mode != "madvise" or environ.get(OPT_OUT) == "0":
        return None
    if any(t.partition("=")[0] == TUNABLE.partition("=")[0] for t in tunables):
        return None  # set already, to this value or another one: the user's choice stands
    return {**environ, "GLIBC_TUNABLES": ":".join([*tunables, TUNABLE])}


def advice(backend: str, environ: Mapping[str, str] = os.environ) -> str | None:
    """A line for the log when this process's CPU steps would run faster with huge pages."""
    if backend != "cpu" or huge_pages_environment(environ, transparent_huge_pages_mode()) is None:
        return None
    return (
        "Host memory: malloc here uses 4 KiB pages, so XLA's CPU steps fault their buffers in "
        f"at every step. Start Python with GLIBC_TUNABLES={TUNABLE} for faster steps "
        "(python -m vision_jax.main does; see vision_jax.host_memory)."
    )


def restart_with_huge_pages() -> None:
    """Executes this program again with :data:`TUNABLE` set, if that would help; else returns.
    Call it first thing in a program's ``__main__``: nothing before it runs twice, except
    imports. Off Linux there is no such kernel setting, and it returns."""
    environ = huge_pages_environment(os.environ, transparent_huge_pages_mode())
    if environ is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, sys.orig_argv, environ)
