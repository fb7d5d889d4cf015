"""Huge pages for XLA's CPU buffers (vision_jax.host_memory): when the environment gets the
glibc tunable, that the restart keeps the process, and that the tunable stops a step's page
faults (the kernel's own count)."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

from vision_jax import host_memory
from vision_jax.host_memory import OPT_OUT, TUNABLE, huge_pages_environment

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_the_tunable_is_added_only_where_it_helps():
    env = {"HOME": "/h"}
    assert huge_pages_environment(env, "madvise") == {"HOME": "/h", "GLIBC_TUNABLES": TUNABLE}
    other = {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}
    assert huge_pages_environment(other, "madvise")["GLIBC_TUNABLES"] == (
        f"glibc.malloc.arena_max=2:{TUNABLE}"
    )
    for mode in ("always", "never", None):  # on already, off, or not Linux
        assert huge_pages_environment(env, mode) is None
    assert huge_pages_environment({**env, OPT_OUT: "0"}, "madvise") is None
    chosen = {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}  # the user's own setting stands
    assert huge_pages_environment(chosen, "madvise") is None
    assert huge_pages_environment({"GLIBC_TUNABLES": TUNABLE}, "madvise") is None  # no loop


def test_the_kernel_mode_is_the_selected_word(tmp_path):
    setting = tmp_path / "enabled"
    setting.write_text("always [madvise] never\n")
    assert host_memory.transparent_huge_pages_mode(str(setting)) == "madvise"
    assert host_memory.transparent_huge_pages_mode(str(tmp_path / "missing")) is None


def test_the_advice_names_the_tunable_only_on_cpu(monkeypatch):
    monkeypatch.setattr(host_memory, "transparent_huge_pages_mode", lambda: "madvise")
    assert TUNABLE in host_memory.advice("cpu", {})
    assert host_memory.advice("gpu", {}) is None
    assert host_memory.advice("cpu", {"GLIBC_TUNABLES": TUNABLE}) is None


RESTARTING = textwrap.dedent("""
    import json, os, sys
    from vision_jax import host_memory
    host_memory.transparent_huge_pages_mode = lambda: "madvise"  # as on such a kernel
    print("started", flush=True)
    host_memory.restart_with_huge_pages()
    print(json.dumps({"pid": os.getpid(), "argv": sys.argv[1:], "utf8": sys.flags.utf8_mode,
                      "tunables": os.environ.get("GLIBC_TUNABLES")}))
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc tunables: Linux")
def test_the_restart_keeps_the_process_its_arguments_and_interpreter_options(tmp_path):
    script = tmp_path / "restarting.py"
    script.write_text(RESTARTING)
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", OPT_OUT)}
    proc = subprocess.Popen(
        [sys.executable, "-X", "utf8", str(script), "a", "b c"], cwd=ROOT, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    lines = out.splitlines()
    assert lines[:2] == ["started", "started"], "the program did not start again"
    after = json.loads(lines[2])
    assert after == {"pid": proc.pid, "argv": ["a", "b c"], "utf8": 1, "tunables": TUNABLE}


FAULTS = textwrap.dedent("""
    import json, resource
    import jax, jax.numpy as jnp
    # A 64 MiB temporary (exp(x), the product's operand) that XLA allocates at every call.
    step = jax.jit(lambda x, w: jnp.exp(x) @ w)
    x, w = jnp.ones((16384, 1024)), jnp.ones((1024, 8))
    step(x, w).block_until_ready()
    faults = []
    for _ in range(5):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        step(x, w).block_until_ready()
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(json.dumps(sorted(faults)[2]))
""")


def _glibc_version() -> tuple[int, ...]:
    name = os.confstr("CS_GNU_LIBC_VERSION") if hasattr(os, "confstr") else None
    return tuple(int(p) for p in name.split()[-1].split(".")) if name else ()


@pytest.mark.skipif(
    host_memory.transparent_huge_pages_mode() != "madvise" or _glibc_version() < (2, 35),
    reason="needs Linux transparent huge pages in madvise mode and glibc >= 2.35",
)
def test_huge_pages_stop_a_steps_page_faults():
    def faults_per_call(tunables: str | None) -> int:
        env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
        env.update({"GLIBC_TUNABLES": tunables} if tunables else {})
        proc = subprocess.run([sys.executable, "-c", FAULTS], env=env, capture_output=True,
                              text=True, timeout=120)  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout.splitlines()[-1])

    plain, huge = faults_per_call(None), faults_per_call(TUNABLE)
    assert plain > 64 * 2**20 // 4096 // 2, plain  # the temporary faulted in, 4 KiB at a time
    assert huge < plain / 20, (huge, plain)
