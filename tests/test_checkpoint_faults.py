"""Fault injection for checkpoints and the workdir: SIGKILL at random points (also in the middle
of an async save) resumes bit-identically, damaged or unfinished checkpoints fall back to the
newest readable step (moved aside: corrupt/ keeps the newest two), a second run in a busy
workdir fails at once, a stale lock is taken over, and a resume whose data stream changed is
refused."""

from __future__ import annotations

import errno
import json
import logging
import os
import pathlib
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_data import make_folder
from test_train import small_config

from vision_jax import lock as lock_lib
from vision_jax.checkpoint import CORRUPT_DIR, Checkpointer, CheckpointError
from vision_jax.specs import ConfigError
from vision_jax.train import train_and_evaluate
from vision_jax.weights.run_dir import restore_on_one_device as _restore_on_one_device

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG = """
import json, sys
sys.path.insert(0, {tests!r})
from test_train import small_config


def get_config(arg=None):
    return small_config(**json.loads({overrides!r}))
"""


def steps_in(workdir: pathlib.Path) -> list[int]:
    return sorted(int(d.name) for d in (workdir / "checkpoints").iterdir() if d.name.isdigit())


def state_of(workdir: pathlib.Path, step: int) -> list[np.ndarray]:
    """Every array of a step's saved train state (params, optimizer, step, ...)."""
    path = workdir / "checkpoints" / str(step) / "state"
    return jax.tree_util.tree_leaves(_restore_on_one_device(str(path)))


def meta_of(workdir: pathlib.Path, step: int) -> dict:
    return json.loads((workdir / "checkpoints" / str(step) / "meta" / "metadata").read_text())


def assert_same_step(a: pathlib.Path, b: pathlib.Path, step: int) -> None:
    """Bit-identical state and data stream position at ``step`` in two workdirs."""
    for x, y in zip(state_of(a, step), state_of(b, step), strict=True):
        np.testing.assert_array_equal(x, y, err_msg=f"step {step}")
    assert meta_of(a, step)["data_positions"] == meta_of(b, step)["data_positions"]


def moved_aside(workdir: pathlib.Path) -> list[str]:
    """The steps whose folders were moved to ``checkpoints/corrupt``."""
    corrupt = workdir / "checkpoints" / CORRUPT_DIR
    if not corrupt.is_dir():
        return []
    return sorted(d.name.split("-")[0].split(".")[0] for d in corrupt.iterdir())


# --- retention and the workdir lock --------------------------------------------------------


def test_keep_checkpoints_zero_is_refused_before_anything_is_written(tmp_path):
    with pytest.raises(ConfigError, match="keep_checkpoints must be >= 1"):
        train_and_evaluate(small_config(keep_checkpoints=0), str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_a_file_where_the_checkpoints_go_is_an_error_before_training(tmp_path):
    """It was found at the first save, every run spending checkpoint_every_steps in vain."""
    (tmp_path / "checkpoints").write_text("x")
    with pytest.raises(CheckpointError, match=r"checkpoints is not a folder: move it away"):
        train_and_evaluate(small_config(total_steps=2), str(tmp_path))
    assert (tmp_path / "checkpoints").read_text() == "x"
    assert not list(tmp_path.glob("events*"))


LOCK_HOLDER = """
import sys, time
from vision_jax.lock import WorkdirLock
WorkdirLock(sys.argv[1], exit_on_loss=True).acquire()  # as the command line's
print("locked", flush=True)
time.sleep(120)
"""


def test_second_run_fails_at_once_and_a_dead_runs_lock_is_taken_over(tmp_path, caplog):
    holder = subprocess.Popen(
        [sys.executable, "-c", LOCK_HOLDER, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        start = time.perf_counter()
        with pytest.raises(lock_lib.LockError, match=rf"in use by another run .*pid {holder.pid}"):
            train_and_evaluate(small_config(total_steps=2), str(tmp_path))
        assert time.perf_counter() - start < 10  # at once: before data, model or compilation
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert not (tmp_path / "checkpoints").exists()
    with caplog.at_level(logging.WARNING):
        lock = lock_lib.WorkdirLock(str(tmp_path)).acquire()
    lock.release()
    host = os.uname()[1]
    assert f"stale workdir lock of a dead run (host {host}, pid {holder.pid}" in caplog.text
    assert f"its process {holder.pid} is gone" in caplog.text


def test_a_deleted_lock_is_made_again_and_a_lost_one_ends_its_run(tmp_path):
    """The owner's heartbeat makes its deleted lock again (another run would start beside
    it); when another run holds the lock (taken over as stale while this run's file system
    did not answer, say), the command line's owner ends at once with one line, saving nothing
    more."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "from vision_jax import lock; lock.HEARTBEAT_S = 0.1\n"
         + LOCK_HOLDER, str(tmp_path)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    path = tmp_path / lock_lib.LOCK_NAME
    try:
        assert holder.stdout.readline().strip() == "locked"
        owner = json.loads(path.read_text())
        path.unlink()
        deadline = time.monotonic() + 20
        while not (path.exists() and path.read_text()) and time.monotonic() < deadline:
            time.sleep(0.05)  # made again, then written (a reader sees it empty in between)
        assert json.loads(path.read_text()) == owner
        with pytest.raises(lock_lib.LockError, match=rf"in use by another run .*pid {holder.pid}"):
            lock_lib.WorkdirLock(str(tmp_path)).acquire()
        other = tmp_path / "other.json"
        other.write_text(json.dumps({**owner, "host": "elsewhere", "pid": 7}))
        os.replace(other, path)
        assert holder.wait(timeout=20) == lock_lib.EXIT_LOCK_LOST
    finally:
        holder.kill()
        holder.wait()
    error = holder.stderr.read()
    assert "Another run took over this run's workdir lock" in error and "host elsewhere" in error
    assert json.loads(path.read_text())["host"] == "elsewhere"  # left to the other run


def test_a_lost_lock_raises_in_python_and_nothing_more_is_saved(tmp_path, monkeypatch):
    """From Python (a notebook's kernel) a lock that another run took over neither ends the
    process nor lets the run save on: the next step raises LockError naming the other run,
    whose lock file stays, and the run's checkpoints stay as they were."""
    monkeypatch.setattr(lock_lib, "HEARTBEAT_S", 0.05)
    exits = []
    monkeypatch.setattr(lock_lib, "_lost", lambda path, owner: exits.append(owner))
    path = tmp_path / lock_lib.LOCK_NAME
    save = Checkpointer.save

    def save_then_lose(self, step, *args, **kwargs):
        saved = save(self, step, *args, **kwargs)
        if saved and step == 2:  # another run takes the workdir over
            self.wait()
            other = tmp_path / "other.json"
            other.write_text(json.dumps({"host": "elsewhere", "pid": 7, "started": "then"}))
            os.replace(other, path)
            deadline = time.monotonic() + 10
            while getattr(self.lock, "lost", None) is None and time.monotonic() < deadline:
                time.sleep(0.02)
            assert not exits, "the process would have ended"
        return saved

    monkeypatch.setattr(Checkpointer, "save", save_then_lose)
    with pytest.raises(lock_lib.LockError, match="took over this run's workdir lock .*elsewhere"):
        train_and_evaluate(small_config(total_steps=6), str(tmp_path))
    assert not exits
    assert json.loads(path.read_text())["host"] == "elsewhere"  # left to the other run
    assert steps_in(tmp_path) == [2]  # nothing saved after the loss was noticed


def test_a_ctrl_c_inside_a_save_lets_it_finish_before_the_lock_goes(tmp_path, monkeypatch):
    """Two Ctrl-Cs (Python caller) while orbax's save started its threads raised
    KeyboardInterrupt before orbax registered them: train_and_evaluate returned with the lock
    released while they still wrote ``checkpoints/2.orbax-checkpoint-tmp``. Now the interrupt
    comes once the save is handed over, and closing waits for it before releasing the lock."""
    from orbax.checkpoint._src.checkpointers import async_checkpointer

    from vision_jax.weights.run_dir import is_complete

    checkpoints = tmp_path / "checkpoints"
    manager = async_checkpointer._AsyncManager
    start_commit = manager.start_async_commit  # the save's threads run, not yet registered

    def interrupted(self, directory, *args, **kwargs):
        if directory.parent == checkpoints and directory.name == "2":
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.1)
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.5)  # the handler raises in the main thread at once
        return start_commit(self, directory, *args, **kwargs)

    released = []
    release = lock_lib.WorkdirLock.release

    def listing_release(self):
        if self.held:
            released.append(sorted(os.listdir(checkpoints)))
        release(self)

    monkeypatch.setattr(manager, "start_async_commit", interrupted)
    monkeypatch.setattr(lock_lib.WorkdirLock, "release", listing_release)
    with pytest.raises(KeyboardInterrupt):
        train_and_evaluate(small_config(total_steps=6), str(tmp_path))
    assert released == [["2"]]  # the save had ended when the workdir was released
    time.sleep(1)
    assert sorted(os.listdir(checkpoints)) == ["2"]  # no thread of orbax's writes on
    assert is_complete(checkpoints / "2")
    assert not (tmp_path / lock_lib.LOCK_NAME).exists()


def test_the_heartbeat_never_takes_its_own_run_for_a_lost_one(tmp_path, monkeypatch):
    """A beat after the release leaves no lock behind; a lock the beat could not write (a full
    disk) is not left empty, and an empty (half-written) lock is not another run's."""

    def lost(path, owner):
        raise AssertionError(f"the run was ended: {owner}")

    monkeypatch.setattr(lock_lib, "_lost", lost)
    path = tmp_path / lock_lib.LOCK_NAME
    lock = lock_lib.WorkdirLock(str(tmp_path), exit_on_loss=True).acquire()
    path.unlink()

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(lock_lib.json, "dump", disk_full)
        lock._beat()
    assert not path.exists()  # not an empty file: the next beat makes it
    lock._beat()
    assert json.loads(path.read_text())["pid"] == os.getpid()
    path.write_text("")  # half-written
    lock._beat()
    path.unlink()
    lock.release()
    lock._beat()  # a beat under way as the lock was released
    assert not path.exists()
    assert lock.lost is None


def test_a_stopped_runs_lock_stays_its_own_and_a_reused_pid_does_not_hold_it(tmp_path, caplog):
    """A live owner on this host keeps its lock however old its heartbeat (SIGSTOP, a suspended
    job: a second run took it over after 300 s and both wrote the workdir); its pid held by
    another process (another start time) does not, once its heartbeat stopped."""
    holder = subprocess.Popen(
        [sys.executable, "-c", LOCK_HOLDER, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    path = tmp_path / lock_lib.LOCK_NAME
    try:
        assert holder.stdout.readline().strip() == "locked"
        holder.send_signal(signal.SIGSTOP)
        old = time.time() - lock_lib.STALE_AFTER_S - 5
        os.utime(path, (old, old))
        with pytest.raises(lock_lib.LockError, match=rf"in use by another run .*pid {holder.pid}"):
            lock_lib.WorkdirLock(str(tmp_path)).acquire()
        owner = json.loads(path.read_text())
        path.write_text(json.dumps({**owner, "pid_start": owner["pid_start"] - 1}))
        with pytest.raises(lock_lib.LockError, match="in use by another run"):
            lock_lib.WorkdirLock(str(tmp_path)).acquire()  # beating: a container's, same name
        old = time.time() - 2 * lock_lib.HEARTBEAT_S - 5
        os.utime(path, (old, old))
        with caplog.at_level(logging.WARNING):
            lock_lib.WorkdirLock(str(tmp_path)).acquire().release()
        assert f"its pid {holder.pid} belongs to another process now" in caplog.text
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()


def test_a_lock_with_this_process_pid_that_it_does_not_hold_is_stale(tmp_path, caplog):
    """A restarted container: the same host name, and the entrypoint got the pid of the run
    that left the lock (it waited for the 300 s heartbeat limit); taken once its heartbeat
    has stopped for two beats. A lock this process does hold stays in use."""
    path = tmp_path / lock_lib.LOCK_NAME
    mine = {"host": socket.gethostname(), "pid": os.getpid(), "started": "2026-01-01"}
    path.write_text(json.dumps(mine))
    with pytest.raises(lock_lib.LockError, match="in use by another run"):
        lock_lib.WorkdirLock(str(tmp_path)).acquire()  # its heartbeat is fresh: another
    old = time.time() - 2 * lock_lib.HEARTBEAT_S - 5  # container's pid 1 may hold it
    os.utime(path, (old, old))
    with caplog.at_level(logging.WARNING):
        lock = lock_lib.WorkdirLock(str(tmp_path)).acquire()
    assert f"its pid {os.getpid()} is this process's, which does not hold it" in caplog.text
    os.utime(path, (old, old))
    with pytest.raises(lock_lib.LockError, match="in use by another run"):
        lock_lib.WorkdirLock(str(tmp_path)).acquire()
    lock.release()
    assert not path.exists()
    lock.acquire()  # taken again after its release: its heartbeat beats again
    assert lock._thread.is_alive()
    lock.release()


def test_lock_of_another_host_is_stale_only_without_heartbeat(tmp_path):
    path = tmp_path / lock_lib.LOCK_NAME
    path.write_text(json.dumps({"host": "elsewhere", "pid": 1, "started": "2026-01-01"}))
    with pytest.raises(lock_lib.LockError, match="host elsewhere, pid 1, started 2026-01-01"):
        lock_lib.WorkdirLock(str(tmp_path)).acquire()
    old = time.time() - lock_lib.STALE_AFTER_S - 5
    os.utime(path, (old, old))
    lock = lock_lib.WorkdirLock(str(tmp_path)).acquire()
    assert json.loads(path.read_text())["pid"] == os.getpid()
    lock.release()
    assert not path.exists()
    path.write_text('{"host": "elsew')  # a run killed while writing its lock
    old = time.time() - 10
    os.utime(path, (old, old))
    lock_lib.WorkdirLock(str(tmp_path)).acquire().release()


def test_a_requeued_slurm_jobs_lock_from_its_earlier_run_is_stale(tmp_path, monkeypatch):
    """SLURM's --requeue starts the job again (another node, maybe) right after its earlier
    run ended: that run's lock is stale though its heartbeat is fresh."""
    path = tmp_path / lock_lib.LOCK_NAME
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    monkeypatch.setenv("SLURM_CLUSTER_NAME", "big")
    here = socket.gethostname()
    for host, job, held in (
        ("node07", ["big", 4242, 1], True),  # the same run of the job (a second srun)
        ("node07", ["big", 77, 0], True),  # another job
        ("node07", ["other", 4242, 0], True),  # another cluster's job of that id
        (here, ["big", 4242, 0], True),  # here, its live pid answers for it (an orphan)
        ("node07", ["big", 4242, 0], False),  # its earlier run, elsewhere: requeued
    ):
        path.write_text(json.dumps({"host": host, "pid": os.getppid(), "slurm_job": job}))
        if held:
            with pytest.raises(lock_lib.LockError, match=f"host {host}"):
                lock_lib.WorkdirLock(str(tmp_path)).acquire()
            continue
        lock = lock_lib.WorkdirLock(str(tmp_path)).acquire()
        assert json.loads(path.read_text())["slurm_job"] == ["big", 4242, 1]
        lock.release()


def test_a_lock_being_written_is_not_taken_for_a_dead_runs(tmp_path, caplog):
    """Between another run's atomic create and its JSON, the lock file is empty: read again."""
    path = tmp_path / lock_lib.LOCK_NAME
    path.touch()

    def write_owner():
        time.sleep(0.3)
        path.write_text(json.dumps({"host": "elsewhere", "pid": 1, "started": "now"}))

    writer = threading.Thread(target=write_owner)
    writer.start()
    with pytest.raises(lock_lib.LockError, match="in use by another run .host elsewhere"):
        lock_lib.WorkdirLock(str(tmp_path)).acquire()
    writer.join()
    path.write_text("")
    old = time.time() - 10
    os.utime(path, (old, old))
    with caplog.at_level(logging.WARNING):
        lock_lib.WorkdirLock(str(tmp_path)).acquire().release()
    assert re.search(r"it was left half-written 1[0-9] s ago", caplog.text), caplog.text


# --- damaged checkpoints and the data stream position ---------------------------------------


def folder_config(root: pathlib.Path, **overrides):
    """6 steps of 4 images from 9 readable files and one unreadable one (skipped)."""
    settings = {"total_steps": 6, "batch_size": 4, "eval_batch_size": 6, "keep_checkpoints": 5}
    return small_config(
        **{**settings, **overrides}, **{"data.source": "imagefolder", "data.root": str(root),
        "data.skip_corrupt": True},
    )  # fmt: skip


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> tuple[pathlib.Path, object]:
    """A finished run that kept its checkpoints at steps 2, 4 and 6, and its config."""
    root = tmp_path_factory.mktemp("data")
    make_folder(root, per_class=3, classes=("a", "b", "c"))
    good = (root / "train" / "a" / "000.jpg").read_bytes()
    (root / "train" / "b" / "bad.jpg").write_bytes(good[: len(good) // 2])
    workdir, config = tmp_path_factory.mktemp("finished"), folder_config(root)
    train_and_evaluate(config, str(workdir))
    assert steps_in(workdir) == [2, 4, 6]
    return workdir, config


@pytest.mark.slow
def test_skip_corrupt_resume_is_exact(tmp_path, finished_run):
    """By step 4 (16 examples of 10 files) the stream has skipped the unreadable file at least
    once, so the saved position is past 16; resuming from it is exact."""
    full, config = finished_run
    assert meta_of(full, 4)["data_positions"][0] > 16
    workdir = tmp_path / "run"
    shutil.copytree(full, workdir)
    shutil.rmtree(workdir / "checkpoints" / "6")
    train_and_evaluate(config, str(workdir))
    assert_same_step(full, workdir, 6)


@pytest.mark.slow
def test_changed_data_is_refused_unless_allowed_and_final_steps_survive_rotation(
    tmp_path, finished_run
):
    full, config = finished_run
    workdir = tmp_path / "run"
    shutil.copytree(full, workdir)
    config = folder_config(config.data.root, total_steps=8, keep_checkpoints=1, batch_size=2)
    config.seed = 1
    with pytest.raises(CheckpointError, match=r"step 6\) exactly: batch_size 4 -> 2; seed 0 -> 1"):
        train_and_evaluate(config, str(workdir))
    assert steps_in(workdir) == [2, 4, 6] and not (workdir / lock_lib.LOCK_NAME).exists()
    config.resume_changed_data = True
    result = train_and_evaluate(config, str(workdir))
    assert np.isfinite(result["train/loss"])
    assert steps_in(workdir) == [6, 8]  # 2 and 4 rotated out; 6 and 8 each ended a run
    before = meta_of(workdir, 6)["data_positions"][0]
    assert meta_of(workdir, 8)["data_positions"][0] >= before + 2 * 2  # the stream went on
    assert not (workdir / lock_lib.LOCK_NAME).exists()  # released at the end


@pytest.mark.slow
def test_a_resume_on_changed_training_files_is_refused_unless_allowed(tmp_path, caplog):
    """Files removed, or moved to another class, since the checkpoint: the saved stream
    position means other examples now, so the resume (or a finished run's restart, which would
    report the run trained on the files before) is refused as a changed config is; the
    fingerprint does not change when the folder moves (its root is a config key)."""
    from vision_jax.data.folders import from_image_folder

    root, workdir = tmp_path / "data", tmp_path / "run"
    make_folder(root, per_class=3, classes=("a", "b", "c"))
    train_and_evaluate(folder_config(root, total_steps=2), str(workdir))
    longer = folder_config(root, total_steps=4)
    (root / "train" / "c" / "002.png").unlink()
    finished = r"Cannot report \S+ \(step 2\) again as it trained: training examples 9 -> 8\. "
    with pytest.raises(CheckpointError, match=finished + "The run has finished on the training "
                       "data its checkpoint recorded; set resume_changed_data=True to report it "
                       "again anyway"):  # fmt: skip
        train_and_evaluate(folder_config(root, total_steps=2), str(workdir))  # nothing resumed
    with pytest.raises(CheckpointError, match=r"exactly: training examples 9 -> 8\. The trai"):
        train_and_evaluate(longer, str(workdir))  # the run trained on the files before
    make_folder(root, per_class=3, classes=("a", "b", "c"))  # back as it was, then relabel one
    (root / "train" / "a" / "000.jpg").rename(root / "train" / "b" / "000.jpg")
    with pytest.raises(CheckpointError, match=r"the training examples changed \(files, labels"):
        train_and_evaluate(longer, str(workdir))
    assert steps_in(workdir) == [2]
    longer.resume_changed_data = True
    with caplog.at_level(logging.WARNING):
        train_and_evaluate(longer, str(workdir))
    assert "although the training examples changed" in caplog.text and steps_in(workdir) == [2, 4]
    moved = tmp_path / "moved"
    shutil.copytree(root, moved)
    fingerprints = [from_image_folder(str(r), "train").fingerprint() for r in (root, moved)]
    assert fingerprints[0] == fingerprints[1] and fingerprints[0]["examples"] == 9


def test_a_resume_from_the_same_files_moved_is_exact_with_one_line(tmp_path, caplog):
    """The training folder moved (data.root changed, its files and labels the same, as the
    recorded digest shows) was refused ("Cannot resume ... exactly: data.root ..."): the
    resume goes on with one info line naming the move; moved and changed, it is refused."""
    root, moved, workdir = tmp_path / "data", tmp_path / "moved", tmp_path / "run"
    make_folder(root, per_class=3, classes=("a", "b", "c"))
    train_and_evaluate(folder_config(root, total_steps=2), str(workdir))
    shutil.move(root, moved)
    (moved / "train" / "c" / "002.png").rename(tmp_path / "002.png")
    with pytest.raises(CheckpointError, match=r"exactly: data.root .* -> .*moved\"; training ex"):
        train_and_evaluate(folder_config(moved, total_steps=4), str(workdir))
    (tmp_path / "002.png").rename(moved / "train" / "c" / "002.png")
    with caplog.at_level(logging.INFO, logger="vision_jax.run"):
        train_and_evaluate(folder_config(moved, total_steps=4), str(workdir))
    assert steps_in(workdir) == [2, 4]
    assert re.search(r"with the training data moved \(data.root \S+data\" -> \S+moved\"\)",
                     caplog.text), caplog.text  # fmt: skip
    assert "although" not in caplog.text  # no changed data to warn of


def test_an_arrays_fingerprint_tells_changed_images_and_labels():
    from vision_jax.data.sources import from_columns

    images = np.random.default_rng(0).integers(0, 255, (50, 8, 8, 3), np.uint8)
    labels = np.arange(50, dtype=np.int32) % 3
    base = from_columns({"image": images, "label": labels}, ["a", "b", "c"]).fingerprint()
    relabelled, changed = labels.copy(), images.copy()
    relabelled[7], changed[7, 0, 0, 0] = (labels[7] + 1) % 3, images[7, 0, 0, 0] ^ 1
    for columns in ({"image": images, "label": relabelled}, {"image": changed, "label": labels}):
        other = from_columns(columns, ["a", "b", "c"]).fingerprint()
        assert other["examples"] == 50 and other["digest"] != base["digest"]
    again = from_columns({"image": images.copy(), "label": labels.copy()}, ["a", "b", "c"])
    assert again.fingerprint() == base


def flip_a_stored_bit(item: pathlib.Path) -> str:
    """Stores an orbax item again with one bit of its largest parameter flipped, as a disk or
    a copy could change it (orbax reads such an item without an error: zstd frames carry no
    checksum); files beside orbax's own stay. Returns the parameter's path."""
    import orbax.checkpoint as ocp

    from vision_jax.masks import path_to_str

    kept = {f.name: f.read_bytes() for f in item.iterdir() if f.suffix == ".json"}
    tree = jax.tree.map(np.array, _restore_on_one_device(item))  # writable copies
    leaves = jax.tree_util.tree_flatten_with_path(tree.get("params", tree))[0]
    path, array = max(leaves, key=lambda leaf: np.size(leaf[1]))
    array.reshape(-1).view(np.uint32)[np.size(array) // 2] ^= 1 << 20
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(item.absolute(), tree, force=True)
    checkpointer.wait_until_finished()
    for name, data in kept.items():
        (item / name).write_bytes(data)
    return path_to_str(path)


def damage(step_dir: pathlib.Path, how: str) -> None:
    if how == "truncated":
        files = [f for f in (step_dir / "state").rglob("*") if f.is_file()]
        biggest = max(files, key=lambda f: f.stat().st_size)
        with open(biggest, "r+b") as f:
            f.truncate(biggest.stat().st_size // 2)
    elif how == "bit-flipped":  # still readable: orbax restores it without an error
        flip_a_stored_bit(step_dir / "state")
    elif how == "unfinished":  # a save that a crash interrupted
        step_dir.rename(step_dir.with_name(f"{step_dir.name}.orbax-checkpoint-tmp-1764640000"))
    else:  # a deleted metadata file
        (step_dir / how).unlink()


@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.slow
@pytest.mark.parametrize(
    "newest, previous",
    [
        ("truncated", "state/_METADATA"),
        ("bit-flipped", "bit-flipped"),
        pytest.param("_CHECKPOINT_METADATA", "unfinished", marks=pytest.mark.slow),
    ],
)
def test_unreadable_newest_steps_are_moved_aside_and_the_run_resumes_exactly(
    tmp_path, finished_run, newest, previous, caplog, capfd
):
    full, config = finished_run
    workdir = tmp_path / "run"
    shutil.copytree(full, workdir)
    damage(workdir / "checkpoints" / "6", newest)
    damage(workdir / "checkpoints" / "4", previous)
    with caplog.at_level(logging.WARNING):
        train_and_evaluate(config, str(workdir))
    assert moved_aside(workdir) == ["4", "6"]
    assert steps_in(workdir) == [2, 4, 6]
    for step in (4, 6):  # trained again from step 2, exactly as before
        assert_same_step(full, workdir, step)
    lines = [r.getMessage() for r in caplog.records if "moved it to" in r.getMessage()]
    assert len(lines) == 2 and all("\n" not in line for line in lines), lines
    assert any("resuming from step 2" in line for line in lines), lines
    if newest == "bit-flipped":  # read without error: the digests tell
        assert all("holds other values than were saved" in line for line in lines), lines
    if newest == "truncated":  # the array is named (orbax's own message gave an index range)
        assert any(re.search(r'6 cannot be read \(ValueError: \w+: Error reading "[^"]+/0', line)
                   for line in lines), lines  # fmt: skip
    err = capfd.readouterr().err
    for noise in ("Traceback", "Event loop is closed", "TensorStore("):
        assert noise not in err + caplog.text


def test_abandoned_read_tasks_are_not_logged_as_errors(caplog):
    """orbax abandons the other reads of a damaged step; asyncio logs the exception of each
    read's task, or of the future gathering them, when it is collected. Those are DEBUG lines;
    other never-retrieved errors stay errors."""
    import asyncio
    import gc

    from vision_jax.weights.run_dir import quiet_abandoned_io

    async def _read_array_index_and_device_put():
        raise ValueError("OUT_OF_RANGE: Requested byte range is not valid")

    async def read_shard():
        raise Exception("Encountered error while reading array index: (slice(0, 3, 1),)")

    async def tensorstore_read():
        raise ValueError('OUT_OF_RANGE: Error reading "params.b/0" in OCDBT database at local '
                         'file "/ckpt/6/state/": Requested byte range is not valid')  # fmt: skip

    async def another_task():
        raise ValueError("a real bug")

    async def gathered(coroutine):  # the gathering future, never awaited
        return asyncio.gather(coroutine)

    async def bare_future(coroutine):  # a plain future holding the read's error
        future = asyncio.get_running_loop().create_future()
        try:
            await coroutine
        except ValueError as e:
            future.set_exception(e)
        return future

    quiet_abandoned_io()
    with caplog.at_level(logging.DEBUG):
        for coroutine, wrap in ((_read_array_index_and_device_put, None),
                                (read_shard, gathered), (tensorstore_read, bare_future),
                                (another_task, None)):  # fmt: skip
            loop = asyncio.new_event_loop()
            if wrap is None:
                future = loop.create_task(coroutine())
            else:
                future = loop.run_until_complete(wrap(coroutine()))
            loop.run_until_complete(asyncio.sleep(0.01))
            loop.close()
            del future
            gc.collect()
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "another_task" in errors[0].getMessage(), errors
    quieted = [r.getMessage() for r in caplog.records if "After a failed read" in r.getMessage()]
    assert any("Task exception" in m for m in quieted), quieted
    assert any("_GatheringFuture exception" in m for m in quieted), quieted
    assert any(m.startswith("After a failed read: Future exception") for m in quieted), quieted


@pytest.mark.slow
@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
def test_no_readable_checkpoint_is_an_error_and_nothing_is_moved(tmp_path, finished_run):
    full, config = finished_run
    workdir = tmp_path / "run"
    shutil.copytree(full, workdir)
    for step in (2, 4, 6):
        damage(workdir / "checkpoints" / str(step), "truncated")
    with pytest.raises(CheckpointError, match=r"No checkpoint in .* can be read \(step 6: "):
        train_and_evaluate(config, str(workdir))
    assert moved_aside(workdir) == [] and steps_in(workdir) == [2, 4, 6]
    assert not (workdir / lock_lib.LOCK_NAME).exists()


# --- SIGKILL at random points ---------------------------------------------------------------

KILL_OVERRIDES = {
    "total_steps": 24,
    "checkpoint_every_steps": 2,
    "log_every_steps": 4,
    "eval_batch_size": 360,
}


def _start(config: pathlib.Path, workdir: pathlib.Path, log: pathlib.Path) -> subprocess.Popen:
    """``python -m vision_jax.main`` on ``config``; later runs reuse the first one's compiled
    steps (JAX's persistent cache beside the workdir)."""
    cache = workdir.parent / "jax_cache"
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "JAX_COMPILATION_CACHE_DIR": str(cache),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    }
    env.pop("XLA_FLAGS", None)
    cmd = [sys.executable, "-m", "vision_jax.main", f"--config={config}", f"--workdir={workdir}"]
    cmd.append("--report=false")
    return subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=open(log, "w")
    )


def _write_config(path: pathlib.Path, **overrides) -> pathlib.Path:
    text = CONFIG.format(tests=str(ROOT / "tests"), overrides=json.dumps(overrides))
    path.write_text(text)
    return path


def _entries(checkpoints: pathlib.Path) -> dict[str, int]:
    """Name -> inode of what the checkpoints folder holds."""
    try:
        return {e.name: e.inode() for e in os.scandir(checkpoints)}
    except FileNotFoundError:
        return {}


def kill_at(proc: subprocess.Popen, workdir: pathlib.Path, step: int, delay: float | None) -> str:
    """SIGKILLs ``proc`` while it saves a step >= ``step`` (``delay`` None), or ``delay``
    seconds after it committed one; returns where the kill landed. Only folders this run
    writes count (a previous run's leftovers are moved aside, not rewritten)."""
    checkpoints = workdir / "checkpoints"
    before = _entries(checkpoints)
    while proc.poll() is None:
        for name, inode in _entries(checkpoints).items():
            head = name.split(".")[0]
            if before.get(name) == inode or not head.isdigit() or int(head) < step:
                continue
            if delay is None and "orbax-checkpoint-tmp" in name:
                proc.kill()
                proc.wait()
                return f"during the save of step {head}"
            if delay is not None and name == head:
                time.sleep(delay)
                proc.kill()
                proc.wait()
                return f"{delay:.2f} s after step {head} was saved"
        time.sleep(0.001)
    raise AssertionError(f"the run ended (exit {proc.returncode}) before kill point {step}")


def sigkill_chain(tmp_path: pathlib.Path, points: list[tuple[int, float | None]]) -> dict:
    """One run killed at each point in turn, each resumed by the same command, beside the
    uninterrupted run; every checkpoint among the newest kept ones at each kill and at the end
    equals the uninterrupted run's (bit for bit, and the data stream position)."""
    full, work, seen = tmp_path / "full", tmp_path / "killed", tmp_path / "seen"
    keep = 2
    config = _write_config(tmp_path / "config.py", keep_checkpoints=keep, **KILL_OVERRIDES)
    full_config = _write_config(tmp_path / "full.py", keep_checkpoints=100, **KILL_OVERRIDES)
    start = time.perf_counter()
    uninterrupted = _start(full_config, full, tmp_path / "full.log")  # alongside: 2 cores
    report: dict = {"landed": [], "seconds": {}}
    for i, (step, delay) in enumerate([*points, (None, None)]):
        log = tmp_path / f"run{i}.log"
        proc = _start(config, work, log)
        if step is None:
            assert proc.wait(timeout=600) == 0, log.read_text()[-3000:]
        else:
            report["landed"].append(kill_at(proc, work, step, delay))
        text = log.read_text()
        for noise in ("Traceback", "Event loop is closed"):
            assert noise not in text, text[-3000:]
        if i:  # the killed run's lock is taken over with one line
            assert "Took over the stale workdir lock" in text, text[-3000:]
        # Kept for the comparison (rotation deletes them): the newest ``keep`` only, as an
        # older one may be half deleted (orbax deletes a rotated step in place after
        # committing the next one, and the kill can land in the middle).
        for saved in steps_in(work)[-keep:]:
            if not (seen / "checkpoints" / str(saved)).exists():
                shutil.copytree(
                    work / "checkpoints" / str(saved), seen / "checkpoints" / str(saved)
                )
    report["seconds"]["killed and resumed runs"] = round(time.perf_counter() - start, 1)
    assert uninterrupted.wait(timeout=600) == 0, (tmp_path / "full.log").read_text()[-3000:]
    report["seconds"]["all"] = round(time.perf_counter() - start, 1)
    assert steps_in(work)[-1] == KILL_OVERRIDES["total_steps"]
    compared = steps_in(seen)
    for saved in compared:
        assert_same_step(full, seen, saved)
    report["steps identical"] = compared
    return report


def random_points(n: int, seed: int) -> list[tuple[int, float | None]]:
    """``n`` increasing kill points: every other one in the middle of an async save."""
    rng = random.Random(seed)
    saves = list(range(2, KILL_OVERRIDES["total_steps"], 2))
    steps = sorted(rng.sample(saves, n))
    return [(s, None if i % 2 == 0 else rng.uniform(0, 0.3)) for i, s in enumerate(steps)]


@pytest.mark.slow
def test_sigkill_at_two_points_resumes_bit_identically(tmp_path):
    report = sigkill_chain(tmp_path, random_points(2, seed=14))
    assert report["landed"][0].startswith("during the save"), report
    print(json.dumps(report, indent=1))


@pytest.mark.slow
def test_sigkill_at_ten_random_points_resumes_bit_identically(tmp_path):
    seed = int(time.time()) % 1000
    report = sigkill_chain(tmp_path, random_points(10, seed=seed))
    print(json.dumps({"seed": seed, **report}, indent=1))


@pytest.mark.slow
def test_two_processes_save_each_hosts_stream_position_and_resume_exactly(tmp_path):
    """Each process reads its own shard; the one holding the unreadable file skips it, so the
    two positions differ and both must be restored."""
    from test_sharding import run_two_processes

    root = tmp_path / "data"
    make_folder(root, per_class=6, classes=("a", "b", "c"))
    good = (root / "train" / "a" / "000.jpg").read_bytes()
    (root / "train" / "b" / "bad.jpg").write_bytes(good[: len(good) // 2])
    config = _write_config(
        tmp_path / "config.py", total_steps=6, batch_size=8, eval_batch_size=8,
        checkpoint_every_steps=3, keep_checkpoints=5, **{"data.source": "imagefolder",
        "data.root": str(root), "data.skip_corrupt": True},
    )  # fmt: skip
    full, interrupted = tmp_path / "full", tmp_path / "interrupted"
    run_two_processes(config, full)
    positions = meta_of(full, 3)["data_positions"]
    assert min(positions) == 12 < max(positions), positions  # 3 steps x 4 per host + skipped
    shutil.copytree(full, interrupted)
    shutil.rmtree(interrupted / "checkpoints" / "6")
    run_two_processes(config, interrupted)
    assert_same_step(full, interrupted, 6)


def test_digests_are_the_words_sums_numpy_computes():
    """Per array: the sum of its 32-bit words (narrower types widened) and the sum weighted by
    position, both modulo 2**32, with the saved dtype named."""
    from vision_jax import digests

    rng = np.random.default_rng(0)
    tree = {
        "w": rng.standard_normal((5, 7)).astype(np.float32),
        "b": np.asarray(rng.standard_normal(9), jax.numpy.bfloat16),
        "step": np.int32(-3),
        "mask": np.array([True, False, True]),
        "long": rng.standard_normal(2**20 + 5).astype(np.float32),  # two of the host's chunks
    }

    def reference(x: np.ndarray) -> str:
        x = np.ravel(x)
        unsigned = {1: np.uint8, 2: np.uint16, 4: np.uint32}[x.dtype.itemsize]
        words = (x.astype(np.uint8) if x.dtype == bool else x.view(unsigned)).astype(np.uint64)
        weight = (np.arange(x.size, dtype=np.uint64) * 2654435761 + 1) % 2**32
        plain, weighted = int(words.sum()) % 2**32, int((words * weight).sum()) % 2**32
        return f"{x.dtype.name}:{plain:08x}:{weighted:08x}"

    assert digests.digest(tree) == {k: reference(np.asarray(v)) for k, v in sorted(tree.items())}
    for x in tree.values():  # arrays spread over processes are digested on their devices
        on_devices = tuple(int(s) for s in digests._device_sums(jax.numpy.asarray(x)))
        assert on_devices == digests._host_sums(np.asarray(x))
    changed = {**tree, "w": tree["w"].copy()}
    changed["w"].view(np.uint32)[2, 3] ^= 1 << 30  # one bit
    assert digests.first_difference(digests.digest(tree), changed).startswith("w holds other")
    swapped = {**tree, "w": tree["w"][::-1].copy()}  # the same words, in another order
    assert digests.first_difference(digests.digest(tree), swapped).startswith("w holds other")
    assert digests.first_difference(digests.digest(tree), tree) is None
    assert digests.first_difference(None, changed) is None  # a checkpoint from before digests


def test_device_digests_are_fetched_together(monkeypatch):
    """Arrays digested on their devices (accelerators, arrays spread over processes) are
    fetched in one wait, with the sums the host computes."""
    from vision_jax import digests

    tree = {"a": jax.numpy.arange(10.0), "b": {"c": jax.numpy.ones((3, 4), jax.numpy.int32)}}
    expected = digests.digest(jax.device_get(tree))  # host arrays: digested on the host
    fetches = []
    fetch = jax.device_get
    monkeypatch.setattr(digests, "_on_devices", lambda x: True)
    monkeypatch.setattr(jax, "device_get", lambda t: fetches.append(t) or fetch(t))
    assert digests.digest(tree) == expected
    assert len(fetches) == 1


def test_weights_read_from_a_damaged_run_are_refused(tmp_path, finished_run):
    """``predict --weights <workdir>`` and export read the run through read_variables."""
    from vision_jax.weights.files import WeightFormatError
    from vision_jax.weights.run_dir import read_variables

    full, _ = finished_run
    workdir = tmp_path / "run"
    shutil.copytree(full, workdir)
    damage(workdir / "checkpoints" / "6", "bit-flipped")
    with pytest.raises(WeightFormatError, match=r"checkpoints/6 is damaged: params/.* holds other"):
        read_variables(workdir)


# --- a save that fails -------------------------------------------------------------------------

FAILING_WRITES = """
import resource, signal, sys
sys.path[:0] = [{tests!r}, {root!r}]  # a script's folder is on the path, not the checkout
from test_train import small_config
from vision_jax import checkpoint
from vision_jax.train import train_and_evaluate

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
save = checkpoint.Checkpointer.save


def save_then_limit(self, step, *args, **kwargs):
    saved = save(self, step, *args, **kwargs)
    if saved:  # once the first save is complete, no file may grow past 4 KiB
        self.wait()
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
    return saved


checkpoint.Checkpointer.save = save_then_limit
try:
    train_and_evaluate(small_config(total_steps=6), sys.argv[1])
except checkpoint.CheckpointSaveError as e:
    print("SAVE ERROR", e)
"""


@pytest.mark.slow
def test_a_failed_async_save_is_named_and_the_saved_steps_stay(tmp_path):
    """orbax fails a save in its background threads (here a file size limit, as a full disk
    would): the next wait raises one error naming the step, the reason and the newest
    complete checkpoint, which a run with room resumes from."""
    script = tmp_path / "failing_writes.py"
    script.write_text(FAILING_WRITES.format(tests=str(ROOT / "tests"), root=str(ROOT)))
    workdir = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, str(script), str(workdir)], capture_output=True, text=True, timeout=300,
        cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    line = [ln for ln in done.stdout.splitlines() if ln.startswith("SAVE ERROR")]
    assert line, done.stdout[-2000:] + done.stderr[-3000:]
    assert "Saving the checkpoint of step 4 in " in line[0], line
    assert " failed (a file is over the file size limit): " in line[0], line
    assert line[0].endswith(
        "The newest complete checkpoint is step 2: raise the file size limit "
        "(ulimit -f), then run the same command again to resume."
    ), line
    assert steps_in(workdir) == [2]
    assert done.stderr.count("Cannot write TensorBoard events to") == 1  # and training went on
    assert "Event loop is closed" not in done.stderr
    train_and_evaluate(small_config(total_steps=6), str(workdir))
    assert steps_in(workdir) == [2, 4, 6] and moved_aside(workdir) == []  # the partial save gone
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["2", "4", "6"]


def test_a_damaged_array_metadata_file_is_named_by_the_readers(tmp_path, finished_run, capfd):
    """A flipped byte in the state's own metadata record (the small file under ``state/d``):
    predict, export and the report name the damaged step in one short line (it was an
    AttributeError, or TensorStore's whole spec, and pages of its callbacks failing on a closed
    event loop)."""
    from vision_jax.weights.files import WeightFormatError
    from vision_jax.weights.run_dir import read_variables

    full, _ = finished_run
    workdir = tmp_path / "run"
    shutil.copytree(full, workdir)
    record = min((workdir / "checkpoints" / "6" / "state" / "d").iterdir(),
                 key=lambda f: f.stat().st_size)  # fmt: skip
    data = bytearray(record.read_bytes())
    data[len(data) // 2] ^= 0xFF
    record.write_bytes(bytes(data))
    with pytest.raises(WeightFormatError, match=r"checkpoints/6 is damaged: ValueError: DATA_LOSS"):
        read_variables(workdir)
    assert "Event loop is closed" not in capfd.readouterr().err


def test_a_step_removed_while_it_is_read_says_so(tmp_path, finished_run, monkeypatch):
    """predict --which=latest beside a run still training: retention removes the step being
    read; the reader says what happened instead of orbax's 'not found' or TensorStore errors."""
    from vision_jax.weights import run_dir
    from vision_jax.weights.files import WeightFormatError

    full, _ = finished_run
    workdir = tmp_path / "run"
    shutil.copytree(full, workdir)

    def removed_by_the_run(path):
        shutil.rmtree(pathlib.Path(path).parent)  # the step folder, by the run's retention
        raise FileNotFoundError(f"Checkpoint at {path} not found")

    monkeypatch.setattr(run_dir, "restore_on_one_device", removed_by_the_run)
    with pytest.raises(WeightFormatError, match=r"checkpoints/6 was removed while it was read"):
        run_dir.read_variables(workdir)
    # report and export resolve the step first and read its variables later: it went between.
    from vision_jax.trained import load_trained

    shutil.rmtree(workdir)
    shutil.copytree(full, workdir)
    monkeypatch.undo()
    trained = load_trained(workdir, which="latest")
    shutil.rmtree(workdir / "checkpoints" / "6")
    with pytest.raises(WeightFormatError, match=r"checkpoints/6 was removed while it was read"):
        _ = trained.variables


def test_an_error_that_stops_a_run_stays_the_error_when_a_pending_save_failed_too(
    tmp_path, monkeypatch, caplog
):
    """A run that stops on an error (bad data, a bug) while a save of its failed in the
    background: the run's own error is raised, the failed save logged beside it."""
    from vision_jax import checkpoint
    from vision_jax import train as train_lib

    class PendingSaveFailed:
        final = None

        def close(self):
            raise checkpoint.CheckpointSaveError("Saving the checkpoint of step 4 failed: EFBIG")

    def stopped_by_bad_data(*args):
        raise ValueError("Cannot decode image cat.jpg")

    monkeypatch.setattr(train_lib, "build_run", lambda *a, **k: PendingSaveFailed())
    monkeypatch.setattr(train_lib, "_train", stopped_by_bad_data)
    with caplog.at_level(logging.ERROR), pytest.raises(ValueError, match="decode image cat.jpg"):
        train_and_evaluate(small_config(), str(tmp_path / "run"))
    assert "While stopping after the error below: Saving the checkpoint of step 4" in caplog.text


def test_an_empty_newer_step_folder_is_moved_aside_not_taken_for_the_newest(
    tmp_path, finished_run, caplog
):
    """A step folder without a committed save (made by hand, or a copy cut short) is neither
    "past the end of this run" nor what predict reads."""
    from vision_jax.weights.run_dir import read_variables

    full, config = finished_run
    workdir = tmp_path / "run"
    shutil.copytree(full, workdir)
    (workdir / "checkpoints" / "8").mkdir()
    with caplog.at_level(logging.WARNING):
        variables = read_variables(workdir)
    assert "checkpoints/8: not a complete checkpoint" in caplog.text
    want = jax.tree.leaves(read_variables(full))
    for got, expected in zip(jax.tree.leaves(variables), want, strict=True):
        np.testing.assert_array_equal(got, expected)
    train_and_evaluate(config, str(workdir))  # finished: reports step 6 again
    assert moved_aside(workdir) == ["8"] and steps_in(workdir) == [2, 4, 6]


@pytest.mark.slow
def test_swapped_step_folders_are_moved_aside_and_the_run_resumes_exactly(
    tmp_path, finished_run, caplog
):
    """Each folder holds a readable state of another step: neither is taken for its name."""
    from vision_jax.weights.files import WeightFormatError
    from vision_jax.weights.run_dir import read_variables

    full, config = finished_run
    workdir = tmp_path / "run"
    shutil.copytree(full, workdir)
    steps = workdir / "checkpoints"
    (steps / "4").rename(steps / "swap")
    (steps / "6").rename(steps / "4")
    (steps / "swap").rename(steps / "6")
    with pytest.raises(WeightFormatError, match=r"checkpoints/6 is damaged: it holds the state of"):
        read_variables(workdir)
    with caplog.at_level(logging.WARNING):
        train_and_evaluate(config, str(workdir))
    assert moved_aside(workdir) == ["4", "6"] and "holds the state of step 4" in caplog.text
    for step in (4, 6):
        assert_same_step(full, workdir, step)


def test_a_step_folder_renamed_past_the_end_is_moved_aside_not_taken_for_its_name(
    tmp_path, finished_run, caplog
):
    """``checkpoints/20`` holding step 6's state is not "the newest checkpoint at step 20, past
    the end of this run" (the run refused, naming a step it never trained): it is moved aside
    as swapped folders are, and the run resumes from step 4 as the uninterrupted one."""
    full, config = finished_run
    workdir = tmp_path / "run"
    shutil.copytree(full, workdir)
    (workdir / "checkpoints" / "6").rename(workdir / "checkpoints" / "20")
    with caplog.at_level(logging.WARNING):
        train_and_evaluate(config, str(workdir))
    assert "holds the state of step 6" in caplog.text and "past the end" not in caplog.text
    assert moved_aside(workdir) == ["20"] and steps_in(workdir) == [2, 4, 6]
    assert_same_step(full, workdir, 6)


def test_a_run_loaded_into_another_model_names_the_model_it_trained(finished_run):
    """A run's weights into another architecture: the message says which model the run
    trained (its record knows), beside what each side holds."""
    from vision_jax.models.registry import create_model
    from vision_jax.weights import WeightMismatchError, load_pretrained

    full, config = finished_run
    model = create_model("vit_ti16", num_classes=3, depth=1)
    variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
    with pytest.raises(WeightMismatchError) as info:
        load_pretrained(full, model=model, variables=variables)
    first = str(info.value).splitlines()[0]
    assert f"{full}/checkpoints/6 (a run of {config.model.name})" in first, first  # the step read
    assert "weights of another architecture?" in first, first


def test_a_failed_best_save_says_the_step_checkpoints_are_not_affected(tmp_path):
    """The best's folder is not what a resume reads: its failed save does not report "the
    newest complete checkpoint is none" (it named the best's own steps)."""
    from vision_jax import checkpoint

    def disk_full():
        raise OSError("[Errno 28] No space left on device")

    best = checkpoint.BestCheckpoint(str(tmp_path), "val/top1", "max", async_save=False)
    best._pending, best.manager.wait_until_finished = 60, disk_full
    with pytest.raises(checkpoint.CheckpointSaveError, match="The step checkpoints are not "
                       "affected: free space"):  # fmt: skip
        best.wait()
    steps = checkpoint.Checkpointer(str(tmp_path), every_steps=1, keep=1, async_save=False)
    steps.manager.all_steps = lambda: [20, 60]
    steps._pending, steps.manager.wait_until_finished = 60, disk_full
    with pytest.raises(checkpoint.CheckpointSaveError, match="The newest complete checkpoint is "
                       "step 20: free space on the disk, then run the same command again to "
                       "resume"):  # fmt: skip
        steps.wait()
    steps.manager.all_steps = lambda: [60]  # the first save: nothing to resume from
    steps._pending = 60
    with pytest.raises(checkpoint.CheckpointSaveError, match="There is no complete checkpoint "
                       "yet: free space on the disk, then run the same command again to start "
                       "over"):  # fmt: skip
        steps.wait()


def test_a_failed_best_save_names_the_newest_complete_step_checkpoint(tmp_path):
    """A step save and then a best save failed (a full disk): the last line said "The step
    checkpoints are not affected" with no complete step checkpoint to resume from."""
    from vision_jax import checkpoint
    from vision_jax.weights.run_dir import REQUIRED_FILES

    def disk_full():
        raise OSError("[Errno 28] No space left on device")

    steps = checkpoint.Checkpointer(str(tmp_path), every_steps=1, keep=1, async_save=False)
    best = checkpoint.BestCheckpoint(str(tmp_path), "val/top1", "max", async_save=False,
                                     checkpoints=steps)  # fmt: skip
    (tmp_path / "checkpoints" / "5.orbax-checkpoint-tmp-1").mkdir()  # the failed step save
    best._pending, best.manager.wait_until_finished = 10, disk_full
    with pytest.raises(checkpoint.CheckpointSaveError) as info:
        best.wait()
    assert str(info.value).endswith(
        "There is no complete step checkpoint yet: free space on the disk, then run the same "
        "command again to start over."
    ), info.value
    for step in (20, 30):
        for name in REQUIRED_FILES[: 3 if step == 20 else 2]:  # 30: no meta (a partial save)
            (tmp_path / "checkpoints" / str(step) / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / "checkpoints" / str(step) / name).write_text("{}")
    best._pending = 40
    with pytest.raises(checkpoint.CheckpointSaveError, match="The newest complete step "
                       "checkpoint is step 20: free space on the disk, then run the same "
                       "command again to resume"):  # fmt: skip
        best.wait()


@pytest.mark.parametrize(
    "error, why, advice",
    [
        (OSError(errno.EROFS, "Read-only file system"), "the file system is read-only",
         "remount it writable"),
        (ValueError("Error writing local file: [Errno 13] Permission denied"),
         "permission denied", "give this user write permission there"),
        (OSError("[Errno 27] File too large"), "a file is over the file size limit",
         "raise the file size limit (ulimit -f)"),
        (OSError(errno.EDQUOT, "Disk quota exceeded"), "the disk quota is exceeded",
         "free space within the quota"),
        (OSError(errno.ENOSPC, "No space left on device"), "the disk is full",
         "free space on the disk"),
        (OSError(errno.ENOSPC, "No space left on device"), "the disk has no free inodes",
         "delete files on the disk"),
        (OSError(errno.EIO, "Input/output error"), None, None),
    ],
)  # fmt: skip
def test_a_failed_save_says_why_and_what_to_do(tmp_path, monkeypatch, error, why, advice):
    """Beyond a full disk (ENOSPC): a read-only file system, no permission, the file size limit
    (``ulimit -f``), a quota; a full disk with free bytes but no inodes says so."""
    from vision_jax import checkpoint

    if why == "the disk has no free inodes":
        real = os.statvfs(tmp_path)
        fields = {k: getattr(real, k) for k in dir(real) if k.startswith("f_")}
        stats = type("Stats", (), {**fields, "f_favail": 0, "f_ffree": 0, "f_bavail": 100})
        monkeypatch.setattr(checkpoint.os, "statvfs", lambda path: stats)

    def failed():
        raise RuntimeError("Save Finalize thread failed") from error  # orbax's wrapping

    steps = checkpoint.Checkpointer(str(tmp_path), every_steps=1, keep=1, async_save=False)
    steps.manager.all_steps = lambda: [20, 60]
    steps._pending, steps.manager.wait_until_finished = 60, failed
    with pytest.raises(checkpoint.CheckpointSaveError) as info:
        steps.wait()
    message = str(info.value)
    if why is None:
        assert "failed: RuntimeError" in message, message
        assert message.endswith("The newest complete checkpoint is step 20: run the same "
                                "command again to resume."), message  # fmt: skip
    else:
        assert f"failed ({why}): RuntimeError" in message, message
        assert f"The newest complete checkpoint is step 20: {advice}" in message, message


def test_a_checkpoints_folder_that_cannot_be_written_is_an_error_before_training(
    tmp_path, monkeypatch
):
    """A read-only checkpoints folder was found at the first save, after checkpoint_every_steps
    of training: a small file written and removed at the start finds it (root writes through
    permissions: the file system's refusal is simulated)."""
    from etils import epath

    from vision_jax import checkpoint

    kind = type(epath.Path(tmp_path))
    write_text = kind.write_text

    def read_only(self, *args, **kwargs):
        if self.name.startswith(".vision_jax-write-probe") and self.parent.name == "checkpoints":
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return write_text(self, *args, **kwargs)

    monkeypatch.setattr(kind, "write_text", read_only)
    compiled = []
    monkeypatch.setattr("vision_jax.run._compile_steps", lambda *a: compiled.append(1))
    with pytest.raises(CheckpointError) as info:
        train_and_evaluate(small_config(total_steps=2), str(tmp_path))
    message = str(info.value)
    assert message.startswith(
        f"Cannot write checkpoints in {tmp_path}/checkpoints (the file "
        "system is read-only): OSError: [Errno 30] Read-only file system"
    )
    assert message.endswith("Remount it writable, or use another --workdir."), message
    assert not compiled and not list(tmp_path.glob("events*"))
    assert not (tmp_path / "checkpoints").exists()  # made for the check: removed again
    monkeypatch.setattr(kind, "write_text", write_text)
    checkpoint.Checkpointer(str(tmp_path), every_steps=1, keep=1).close()  # writable: fine
    assert not list((tmp_path).glob("**/.vision_jax-write-probe*"))


def test_a_write_probe_left_by_a_killed_process_is_removed_at_the_next_start(tmp_path):
    """A process killed between writing its write probe and removing it left the probe in
    the checkpoints (or best) folder for good; the next start removes every process's, and
    keeps other files."""
    from vision_jax import checkpoint

    left = [f"{checkpoint.PROBE_FILE}-{i}-{pid}" for i, pid in ((0, 4242), (3, 17))]
    for folder in ("checkpoints", "best"):
        (tmp_path / folder).mkdir()
        for name in (*left, "notes.txt"):
            (tmp_path / folder / name).write_text("")
    checkpoint.Checkpointer(str(tmp_path), every_steps=1, keep=1).close()
    checkpoint.BestCheckpoint(str(tmp_path), "val/top1", "max").close()
    for folder in ("checkpoints", "best"):
        assert os.listdir(tmp_path / folder) == ["notes.txt"], folder


def test_a_failed_frozen_save_is_one_line(tmp_path, monkeypatch):
    """Writing the frozen parameters (once, at the start) fails with the one-line save error,
    not TensorStore's raw message of hundreds of characters."""
    import orbax.checkpoint as ocp

    from vision_jax import checkpoint

    def disk_full(*args, **kwargs):
        raise ValueError("NOT_FOUND: Error writing local file " + "x" * 400
                         + ": [Errno 28] No space left on device")  # fmt: skip

    monkeypatch.setattr(ocp.StandardCheckpointer, "save", disk_full)
    ckpt = checkpoint.Checkpointer(str(tmp_path), every_steps=1, keep=1, async_save=False)
    with pytest.raises(checkpoint.CheckpointSaveError) as info:
        ckpt.save_frozen({"w": jnp.ones(2)})
    message = str(info.value)
    assert message.startswith(f"Saving the frozen parameters in {tmp_path}/frozen_params failed "
                              "(the disk is full): ValueError: NOT_FOUND")  # fmt: skip
    assert message.endswith(
        "No space left on device. Free space on the disk, then run the same command again."
    ) and len(message) < 300 + len(str(tmp_path))
    assert not ckpt.has_frozen


def test_a_long_error_keeps_its_cause():
    """A save error's line is cut in the middle: the path's start and the cause at its end."""
    from vision_jax.weights.run_dir import short_reason

    path = "/work/run/checkpoints/20.orbax-checkpoint-tmp/state/" + "d" * 120
    line = short_reason(OSError(f'Failed writing: "{path}": [Errno 27] File too large'))
    assert len(line) == 160 and line.startswith('OSError: Failed writing: "/work/run/')
    assert line.endswith("[Errno 27] File too large")


@pytest.mark.slow
def test_a_damaged_best_is_read_from_the_step_checkpoint_of_its_step(tmp_path, caplog):
    """A finished validation run whose best checkpoint is damaged, started again: its step
    checkpoint of the same step (the same state) serves, with a warning; the final metrics are
    those it reported (the run could not be started again past the error)."""
    config = small_config(total_steps=4, eval_every_steps=4, checkpoint_every_steps=4)
    config.data.train_split, config.data.val_split = "train[:90%]", "train[90%:]"
    first = train_and_evaluate(config, str(tmp_path))
    assert first["best/step"] == 4
    damage(tmp_path / "best" / "4", "truncated")
    from vision_jax.weights.files import WeightFormatError
    from vision_jax.weights.run_dir import read_variables

    with pytest.raises(WeightFormatError, match=r"best/4 (is damaged|cannot be read): .*; "
                       "--which=latest reads the newest checkpoint instead"):  # fmt: skip
        read_variables(tmp_path, "best")  # as predict, evaluate, report and export read it
    with caplog.at_level(logging.WARNING):
        again = train_and_evaluate(config, str(tmp_path))
    assert "The best checkpoint" in caplog.text and "reading the same step from" in caplog.text
    assert again == first
    # Saved again from the step checkpoint (it was read from there at every run, and lost
    # once rotation removed that step); the damaged one moved aside, as damaged steps are
    corrupt = [d.name.split("-")[0] for d in (tmp_path / "best" / CORRUPT_DIR).iterdir()]
    assert corrupt == ["4"] and sorted(os.listdir(tmp_path / "best")) == ["4", CORRUPT_DIR]
    best, latest = read_variables(tmp_path, "best"), read_variables(tmp_path, "latest")
    jax.tree.map(np.testing.assert_array_equal, best, latest)
    meta = json.loads((tmp_path / "best" / "4" / "meta" / "metadata").read_text())
    assert meta["selection"]["best_step"] == 4 and "data_positions" not in meta
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert train_and_evaluate(config, str(tmp_path)) == first
    assert "is damaged" not in caplog.text


def validated_config(**overrides):
    """``small_config`` with a validation split: a best checkpoint is kept."""
    steps = {"total_steps": 4, "eval_every_steps": 4, "checkpoint_every_steps": 4}
    config = small_config(**{**steps, **overrides})
    config.data.train_split, config.data.val_split = "train[:90%]", "train[90%:]"
    return config


@pytest.mark.slow
def test_an_earlier_runs_best_is_not_replaced_by_a_run_from_scratch(tmp_path, caplog):
    """A finished run's step checkpoints deleted (its best kept), the workdir started again: it
    started from scratch, and its first validation replaced the earlier best without a word.
    It is refused before training, naming the best's step and score (with the same config or
    another, or a short run's whose only step checkpoint was its last); moved away, it trains,
    and init.path reads the moved best. A run cut short before its first step checkpoint (its
    best saved, its checkpoints folder left empty) starts over as it did."""
    config = validated_config(checkpoint_every_steps=2)
    first = train_and_evaluate(config, str(tmp_path))
    assert first["best/step"] == 4
    shutil.rmtree(tmp_path / "checkpoints")
    events = sorted(tmp_path.glob("events*"))
    saved = {f: f.read_bytes() for f in (tmp_path / "best").rglob("*") if f.is_file()}
    other = validated_config(seed=1, checkpoint_every_steps=2, **{"optimizer.learning_rate": 0.5})
    for again in (config, other):
        with pytest.raises(CheckpointError) as info:
            train_and_evaluate(again, str(tmp_path))
        message = str(info.value)
        assert f"{tmp_path}/best holds the best checkpoint of an earlier run (step 4, val/" in (
            message
        )
        assert f"mv {tmp_path}/best {tmp_path}/best-earlier" in message, message
        assert "--config.init.path" in message
        assert {f: f.read_bytes() for f in (tmp_path / "best").rglob("*") if f.is_file()} == saved
        assert sorted(tmp_path.glob("events*")) == events
        assert not (tmp_path / "checkpoints").exists()
    short = tmp_path / "short"  # a finished run whose only step checkpoint is its last
    train_and_evaluate(validated_config(), str(short))
    shutil.rmtree(short / "checkpoints")  # deleted: the best is an earlier run's
    with pytest.raises(CheckpointError, match="holds the best checkpoint of an earlier run"):
        train_and_evaluate(validated_config(), str(short))
    cut = tmp_path / "cut"  # killed once its best of step 4 was saved, before its first step's
    train_and_evaluate(validated_config(), str(cut))
    shutil.rmtree(cut / "checkpoints")
    (cut / "checkpoints").mkdir()  # a crash leaves the folder its run made, without a step
    with caplog.at_level(logging.WARNING):
        assert train_and_evaluate(validated_config(), str(cut))["best/step"] == 4
    assert "saved by a run of this config cut short before its first step checkpoint" in (
        caplog.text
    )
    (tmp_path / "best").rename(tmp_path / "best-earlier")
    other.init.path = str(tmp_path / "best-earlier")
    again = train_and_evaluate(other, str(tmp_path))  # a run from scratch, from those weights
    assert again["best/step"] == 4 and (tmp_path / "best-earlier" / "4").is_dir()


def test_a_run_stopped_by_an_error_after_its_first_best_starts_over(tmp_path, monkeypatch, caplog):
    """An error (or a Ctrl-C's KeyboardInterrupt) once the first best was saved, before the
    first step checkpoint: closing removed the empty checkpoints folder, and the same command
    again was refused as an earlier run's best (a kill -9 left the folder and started over).
    The folder stays: it starts over; a finished run's best is still refused once its step
    checkpoints are deleted."""
    from vision_jax import train as train_lib

    config = validated_config(eval_every_steps=2)
    evaluate, calls = train_lib.run_evaluation, []

    def second_fails(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("the second validation fails")  # (as a Python error)
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(train_lib, "run_evaluation", second_fails)
    with pytest.raises(KeyboardInterrupt, match="second validation"):
        train_and_evaluate(config, str(tmp_path))
    monkeypatch.undo()
    assert os.listdir(tmp_path / "best") == ["2"] and os.listdir(tmp_path / "checkpoints") == []
    with caplog.at_level(logging.WARNING):
        assert train_and_evaluate(config, str(tmp_path))["best/step"] in (2, 4)
    assert "cut short before its first step checkpoint" in caplog.text
    shutil.rmtree(tmp_path / "checkpoints")  # a finished run's: its best is an earlier run's
    with pytest.raises(CheckpointError, match="holds the best checkpoint of an earlier run"):
        train_and_evaluate(config, str(tmp_path))


def test_corrupt_keeps_the_newest_folders_moved_aside(tmp_path, monkeypatch, caplog):
    """A run killed while it commits a save leaves a complete but uncommitted folder, moved to
    corrupt/ at the next start: killed again and again, corrupt/ grew without end. It keeps
    the 2 newest of those (by the time in their names), each removal one line; damaged
    committed steps (several moved in one second by one restore), folders moved there by the
    same process and anything else stay."""
    import datetime

    from vision_jax import checkpoint
    from vision_jax.weights.run_dir import REQUIRED_FILES

    times = iter(["20261207T095959"] * 3 + ["20261207T100000", "20261207T100000",
                                             "20261207T100001", "20261207T100002",
                                             "20261207T100003", "20261207T100004"])  # fmt: skip

    class Clock(datetime.datetime):
        @classmethod
        def now(cls, tz=None):
            return datetime.datetime.strptime(next(times), "%Y%m%dT%H%M%S")

    monkeypatch.setattr(checkpoint.datetime, "datetime", Clock)
    monkeypatch.setattr(checkpoint, "_MOVED_HERE", set(), raising=False)
    folder = tmp_path / "checkpoints"
    (folder / CORRUPT_DIR).mkdir(parents=True)
    (folder / CORRUPT_DIR / "notes.txt").write_text("mine")  # not moved there: never removed

    def save_cut_short(step):
        unfinished = folder / f"{step}.orbax-checkpoint-tmp-17646{step}"
        for name in REQUIRED_FILES:
            (unfinished / name).parent.mkdir(parents=True, exist_ok=True)
            (unfinished / name).write_text("{}")

    for step in (30, 25, 20):  # damaged steps a restore moved aside, newest first, one second
        (folder / str(step)).mkdir()
        checkpoint._move_aside(str(folder), step, "is damaged")
    for step in (5, 10, 15, 20):  # a commit cut short by each kill, found by the next start
        save_cut_short(step)
        checkpoint._MOVED_HERE.clear()  # each start is a new process
        with caplog.at_level(logging.WARNING):
            checkpoint._move_aside_unfinished(str(folder))
    damaged = ["20-20261207T095959", "25-20261207T095959", "30-20261207T095959"]
    kept = sorted(p.name for p in (folder / CORRUPT_DIR).iterdir())
    assert kept == sorted(
        [
            "15.orbax-checkpoint-tmp-1764615-20261207T100001",
            "20.orbax-checkpoint-tmp-1764620-20261207T100002",
            *damaged,
            "notes.txt",
        ]
    )
    removed = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Removed")]
    assert len(removed) == 2 and all("keeps the 2 newest" in line for line in removed), removed
    assert [line.split("/corrupt/")[1].split(".")[0] for line in removed] == ["5", "10"]
    for step in (35, 40):  # the last start tidies twice more: what it moved stays
        save_cut_short(step)
        checkpoint._move_aside_unfinished(str(folder))
    kept = sorted(p.name for p in (folder / CORRUPT_DIR).iterdir() if "-tmp-" in p.name)
    assert kept == [
        "20.orbax-checkpoint-tmp-1764620-20261207T100002",
        "35.orbax-checkpoint-tmp-1764635-20261207T100003",
        "40.orbax-checkpoint-tmp-1764640-20261207T100004",
    ]
