"""Host memory for XLA's CPU steps: reused from one step to the next, on huge pages.

XLA's CPU runtime allocates a step's temporary buffers with ``malloc`` each time the step runs
(hundreds of MB to GB in a train step). glibc serves allocations that large with fresh ``mmap``
pages and returns them on ``free``, so every step faults its whole working set in again, 4 KiB
at a time, and the kernel zeroes each page (ViT-Ti/16 at 112 px, batch 32: 98,500 faults per
step). Two glibc tunables and one JAX setting make the memory stay:

- ``glibc.malloc.mmap_max=0`` and a ``glibc.malloc.trim_threshold`` of 64 GiB: large blocks come
  from the main heap, and freed ones stay there for the next step (no faults once the heap
  has settled, within the first few steps);
- JAX's ``jax_cpu_enable_async_dispatch`` off in a single-process run
  (:func:`configure_dispatch`): single-device steps run on the thread that calls them, which
  allocates from the main heap, and release the GIL meanwhile. (From JAX's dispatch thread,
  another malloc arena, blocks that large are mapped afresh whatever the tunables say. One
  arena for every thread, ``arena_max=1``, would also keep them, but puts tf.data's threads
  behind one lock.)
- ``glibc.malloc.hugetlb=1`` where the kernel's transparent huge pages are in ``madvise`` mode:
  the heap on 2 MiB pages, 512 times fewer faults the first time and fewer TLB misses.

Tunables are read when a process starts, so ``python -m vision_jax.main`` executes itself again,
once, with them set (same process id, arguments and interpreter options), before anything heavy
is imported, and then calls :func:`configure_dispatch`. Other programs (a notebook, your own
script calling :func:`vision_jax.train.train_and_evaluate`) get the same by starting Python with
the ``GLIBC_TUNABLES`` that :func:`environment` returns (``advice`` logs it) and calling
:func:`configure_dispatch` before JAX's backend is first used (devices, arrays, computations).
``VISION_JAX_HUGE_PAGES=0`` keeps both from changing anything (the name predates the heap
reuse). Freed host memory is not returned to the system while the process runs (its peak
stays). The first step pays for the huge pages (the kernel assembles each one on first touch,
compacting memory where it must); the steps after it gain.

Each group of tunables (heap reuse; huge pages) is added unless ``GLIBC_TUNABLES`` already names
one of its tunables: the user's choice stands. The heap reuse is left out where ``JAX_PLATFORMS``
puts another platform first, or, unset, where an accelerator plugin of JAX's is installed (CUDA,
ROCm, libtpu: the steps' buffers are not in host memory). Nothing changes off
Linux; glibc older than 2.35 ignores ``hugetlb``.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import pkgutil
import re
import sys
from collections.abc import Mapping, Sequence

logger = logging.getLogger(__name__)

HEAP_REUSE = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736"
HUGE_PAGES = "glibc.malloc.hugetlb=1"
OPT_OUT = "VISION_JAX_HUGE_PAGES"  # "0": leave malloc and dispatch as they are
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


def _entries(tunables: str) -> dict[str, str]:
    return dict(t.partition("=")[::2] for t in tunables.split(":") if t)


def accelerator_plugins() -> list[str]:
    """JAX's accelerator plugins installed (the ``jax_plugins`` packages, such as CUDA's
    ``xla_cuda12``, and ``libtpu``), found without importing them: JAX runs on them unless
    ``JAX_PLATFORMS`` says otherwise."""
    spec = importlib.util.find_spec("jax_plugins")
    folders = (spec.submodule_search_locations or []) if spec else []
    found = [m.name for m in pkgutil.iter_modules(folders)]
    return found + (["libtpu"] if importlib.util.find_spec("libtpu") else [])


def _steps_on_cpu(environ: Mapping[str, str], plugins: Sequence[str]) -> bool:
    """Whether JAX may run the steps on the CPU: ``JAX_PLATFORMS`` naming it first, or unset
    with no accelerator ``plugins`` installed."""
    platforms = environ.get("JAX_PLATFORMS", "")
    return platforms.split(",")[0] == "cpu" if platforms else not plugins


def environment(
    environ: Mapping[str, str],
    thp_mode: str | None,
    *,
    linux: bool = sys.platform.startswith("linux"),
    plugins: Sequence[str] | None = None,
) -> dict[str, str] | None:
    """``environ`` with the heap-reuse tunables and (in ``madvise`` mode) huge pages added to
    ``GLIBC_TUNABLES``; None when a process started with ``environ`` has nothing to gain or the
    user chose otherwise (see the module docstring). ``plugins``: JAX's accelerator plugins
    (default: :func:`accelerator_plugins`)."""
    if not linux or environ.get(OPT_OUT) == "0":
        return None
    tunables = environ.get("GLIBC_TUNABLES", "")
    named = _entries(tunables).keys()
    added = []
    plugins = accelerator_plugins() if plugins is None else plugins
    if not named & _entries(HEAP_REUSE).keys() and _steps_on_cpu(environ, plugins):
        added.append(HEAP_REUSE)
    if thp_mode == "madvise" and not named & _entries(HUGE_PAGES).keys():
        added.append(HUGE_PAGES)
    if not added:
        return None
    return {**environ, "GLIBC_TUNABLES": ":".join(([tunables] if tunables else []) + added)}


def configure_dispatch(environ: Mapping[str, str] = os.environ) -> bool:
    """Turns JAX's asynchronous CPU dispatch off when this process runs with the heap-reuse
    tunables (their point; see the module docstring) and alone; returns whether it did. Call
    it before JAX's backend is first used and after ``jax.distributed.initialize``, if any: a
    process of a multi-process run keeps the asynchronous dispatch (its steps' collectives
    would block the calling thread, and a dead peer's transport error would reach the program
    there before the peer watchdog could name the lost process), and so does a process with
    several CPU devices (its gain is a single device's; a step's collectives across devices
    waited for a participant, once in seven launches, while the calling thread ran an eager
    op)."""
    entries = _entries(environ.get("GLIBC_TUNABLES", ""))
    reused = all(entries.get(k) == v for k, v in _entries(HEAP_REUSE).items())
    if not reused or environ.get(OPT_OUT) == "0":
        return False
    import jax
    from jax._src import xla_bridge

    if jax.distributed.is_initialized() or _cpu_devices(environ) > 1:
        return False
    if xla_bridge.backends_are_initialized():
        logger.warning(
            "Host memory: JAX's backend is running already, so its CPU dispatch stays "
            "asynchronous; call vision_jax.host_memory.configure_dispatch() before using JAX."
        )
        return False
    jax.config.update("jax_cpu_enable_async_dispatch", False)
    return True


def _configured_cpu_devices() -> int:
    import jax

    return jax.config.jax_num_cpu_devices  # -1: not set


def _cpu_devices(environ: Mapping[str, str]) -> int:
    """The CPU devices this process will have: ``jax_num_cpu_devices``, else the last
    ``--xla_force_host_platform_device_count`` of ``XLA_FLAGS``, else 1."""
    if (configured := _configured_cpu_devices()) > 0:
        return configured
    flags = environ.get("XLA_FLAGS", "")
    counts = re.findall(r"--xla_force_host_platform_device_count=(\d+)", flags)
    return int(counts[-1]) if counts else 1


def advice(backend: str, environ: Mapping[str, str] = os.environ) -> str | None:
    """A line for the log when this process's CPU steps would run faster with the settings."""
    if backend != "cpu":
        return None
    changed = environment(environ, transparent_huge_pages_mode())
    if changed is None:
        return None
    return (
        "Host memory: XLA's CPU steps fault their buffers in at every step here. Start Python "
        f"with GLIBC_TUNABLES={changed['GLIBC_TUNABLES']} and call "
        "vision_jax.host_memory.configure_dispatch() for faster steps (python -m "
        "vision_jax.main does)."
    )


def restart_for_xla_buffers() -> None:
    """Executes this program again with :func:`environment`, if that would help; else returns.
    Call it first thing in a program's ``__main__``: nothing before it runs twice, except
    imports. Off Linux it returns."""
    changed = environment(os.environ, transparent_huge_pages_mode())
    if changed is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, sys.orig_argv, changed)


def set_up_single_process() -> None:
    """:func:`restart_for_xla_buffers`, then :func:`configure_dispatch`: first thing in the
    ``__main__`` of a single-process program (``vision_jax.main`` calls the two apart, around
    ``jax.distributed.initialize``)."""
    restart_for_xla_buffers()
    configure_dispatch()
