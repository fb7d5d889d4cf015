"""Host memory for XLA's CPU buffers (vision_jax.host_memory): when the environment gets the
glibc tunables, that the restart keeps the process, and that the tunables with the synchronous
dispatch stop a step's page faults (the kernel's own count)."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

from vision_jax import host_memory
from vision_jax.host_memory import HEAP_REUSE, HUGE_PAGES, OPT_OUT, environment

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_the_settings_are_added_only_where_they_help(monkeypatch):
    monkeypatch.setattr(host_memory, "accelerator_plugins", list)  # a machine without any
    env = {"HOME": "/h"}
    both = f"{HEAP_REUSE}:{HUGE_PAGES}"
    assert environment(env, "madvise") == {"HOME": "/h", "GLIBC_TUNABLES": both}
    for mode in ("always", "never", None):  # huge pages on already, off, or no such setting
        assert environment(env, mode) == {"HOME": "/h", "GLIBC_TUNABLES": HEAP_REUSE}
    other = {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}
    assert environment(other, "madvise")["GLIBC_TUNABLES"] == f"glibc.malloc.arena_max=2:{both}"
    assert environment(env, "madvise", linux=False) is None
    assert environment({**env, OPT_OUT: "0"}, "madvise") is None
    # Each group the user names stands; the other one is still added.
    tunables = lambda own, mode: environment({"GLIBC_TUNABLES": own}, mode)["GLIBC_TUNABLES"]
    assert tunables("glibc.malloc.hugetlb=0", "madvise") == f"glibc.malloc.hugetlb=0:{HEAP_REUSE}"
    assert tunables("glibc.malloc.mmap_max=4", "madvise") == f"glibc.malloc.mmap_max=4:{HUGE_PAGES}"
    assert environment({"GLIBC_TUNABLES": "glibc.malloc.mmap_max=4"}, "never") is None
    # Steps on another platform: no heap reuse (their buffers are not in host memory).
    assert environment({"JAX_PLATFORMS": "cuda,cpu"}, "madvise")["GLIBC_TUNABLES"] == HUGE_PAGES
    assert environment({"JAX_PLATFORMS": "tpu"}, "never") is None
    assert environment({"JAX_PLATFORMS": "cpu"}, "never")["GLIBC_TUNABLES"] == HEAP_REUSE
    # JAX_PLATFORMS unset where an accelerator plugin is installed: JAX runs the steps there
    cuda = environment({}, "never", plugins=["xla_cuda12"])
    assert cuda is None and environment({"JAX_PLATFORMS": "cpu"}, "never", plugins=["libtpu"])
    assert environment(environment(env, "madvise"), "madvise") is None  # no restart loop


def test_accelerator_plugins_are_found_without_importing_them(tmp_path, monkeypatch):
    """A CUDA plugin as pip installs it (``jax_plugins/xla_cuda12``): found, not imported (a
    GPU host's launcher does not set JAX_PLATFORMS; the heap reuse was added there)."""
    import sys

    from vision_jax.host_memory import accelerator_plugins

    assert "xla_made_up" not in accelerator_plugins()
    plugin = tmp_path / "jax_plugins" / "xla_made_up"
    plugin.mkdir(parents=True)
    (plugin / "__init__.py").write_text("raise RuntimeError('imported')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "xla_made_up" in accelerator_plugins()
    assert "jax_plugins.xla_made_up" not in sys.modules


def test_the_kernel_mode_is_the_selected_word(tmp_path):
    setting = tmp_path / "enabled"
    setting.write_text("always [madvise] never\n")
    assert host_memory.transparent_huge_pages_mode(str(setting)) == "madvise"
    assert host_memory.transparent_huge_pages_mode(str(tmp_path / "missing")) is None


def test_the_dispatch_is_synchronous_only_with_the_heap_reuse_in_one_process(monkeypatch):
    import jax
    from jax._src import xla_bridge

    calls = []
    monkeypatch.setattr(jax.config, "update", lambda *a: calls.append(a))
    monkeypatch.setattr(xla_bridge, "backends_are_initialized", lambda: False)
    reuse = {"GLIBC_TUNABLES": f"{HEAP_REUSE}:{HUGE_PAGES}"}
    assert host_memory.configure_dispatch(reuse)
    assert calls == [("jax_cpu_enable_async_dispatch", False)]
    assert not host_memory.configure_dispatch({"GLIBC_TUNABLES": HUGE_PAGES})
    other_values = HEAP_REUSE.replace("mmap_max=0", "mmap_max=65536")  # not reused
    assert not host_memory.configure_dispatch({"GLIBC_TUNABLES": other_values})
    assert not host_memory.configure_dispatch({**reuse, OPT_OUT: "0"})
    monkeypatch.setattr(xla_bridge, "backends_are_initialized", lambda: True)  # too late
    assert not host_memory.configure_dispatch(reuse)
    monkeypatch.setattr(xla_bridge, "backends_are_initialized", lambda: False)
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: True)  # multi-process
    assert not host_memory.configure_dispatch(reuse)
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    many = {**reuse, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}  # 4 devices
    assert not host_memory.configure_dispatch(many)
    one = {**reuse, "XLA_FLAGS": f"{many['XLA_FLAGS']} --xla_force_host_platform_device_count=1"}
    assert host_memory.configure_dispatch(one)
    monkeypatch.setattr(host_memory, "_configured_cpu_devices", lambda: 2)  # jax_num_cpu_devices
    assert not host_memory.configure_dispatch(reuse)
    assert len(calls) == 2


def test_the_advice_names_the_settings_only_on_cpu(monkeypatch):
    monkeypatch.setattr(host_memory, "transparent_huge_pages_mode", lambda: "madvise")
    line = host_memory.advice("cpu", {})
    assert HEAP_REUSE in line and HUGE_PAGES in line and "configure_dispatch()" in line
    assert host_memory.advice("gpu", {}) is None
    assert HEAP_REUSE in host_memory.advice("cpu", {"GLIBC_TUNABLES": HUGE_PAGES})  # older advice
    assert host_memory.advice("cpu", {"GLIBC_TUNABLES": f"{HUGE_PAGES}:{HEAP_REUSE}"}) is None


RESTARTING = textwrap.dedent("""
    import json, os, sys
    from vision_jax import host_memory
    host_memory.transparent_huge_pages_mode = lambda: "madvise"  # as on such a kernel
    print("started", flush=True)
    host_memory.set_up_single_process()
    import jax
    print(json.dumps({"pid": os.getpid(), "argv": sys.argv[1:], "utf8": sys.flags.utf8_mode,
                      "tunables": os.environ.get("GLIBC_TUNABLES"),
                      "async_dispatch": jax.config.values["jax_cpu_enable_async_dispatch"]}))
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc tunables: Linux")
def test_the_restart_keeps_the_process_its_arguments_and_interpreter_options(tmp_path):
    script = tmp_path / "restarting.py"
    script.write_text(RESTARTING)
    unset = ("GLIBC_TUNABLES", OPT_OUT)
    env = {k: v for k, v in os.environ.items() if k not in unset} | {"JAX_PLATFORMS": "cpu"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])  # the checkout
    proc = subprocess.Popen(
        [sys.executable, "-X", "utf8", str(script), "a", "b c"], cwd=ROOT, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    lines = out.splitlines()
    assert lines[:2] == ["started", "started"], "the program did not start again"
    after = json.loads(lines[2])
    assert after == {"pid": proc.pid, "argv": ["a", "b c"], "utf8": 1,
                     "tunables": f"{HEAP_REUSE}:{HUGE_PAGES}", "async_dispatch": False}  # fmt: skip


FAULTS = textwrap.dedent("""
    import json, resource
    import jax, jax.numpy as jnp
    from vision_jax import host_memory
    host_memory.configure_dispatch()  # as vision_jax.main does: on with the heap reuse
    # A 64 MiB temporary (exp(x), the product's operand) that XLA allocates at every call.
    step = jax.jit(lambda x, w: jnp.exp(x) @ w)
    x, w = jnp.ones((16384, 1024)), jnp.ones((1024, 8))
    # glibc's heap settles within a few calls (XLA's aligned blocks, small ones placed between
    # them), then serves every call from freed blocks.
    for _ in range(12):
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
    not sys.platform.startswith("linux") or _glibc_version() < (2, 26),
    reason="needs Linux with glibc >= 2.26 (malloc tunables)",
)
def test_the_settings_stop_a_steps_page_faults():
    def faults_per_call(settings: dict[str, str]) -> int:
        env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", OPT_OUT)}
        proc = subprocess.run([sys.executable, "-c", FAULTS], cwd=ROOT, env={**env, **settings},
                              capture_output=True, text=True, timeout=120)  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout.splitlines()[-1])

    plain = faults_per_call({})
    reused = faults_per_call({"GLIBC_TUNABLES": HEAP_REUSE})  # no huge pages: 4 KiB faults
    assert plain > 64 * 2**20 // 4096 // 2, plain  # the temporary faulted in, 4 KiB at a time
    assert reused < plain / 100, (reused, plain)
