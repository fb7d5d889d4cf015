"""Sharding rules, FSDP and multi-host: rules -> PartitionSpecs, optimizer state that follows the
parameters, equal losses on every mesh, resharding on restore, and two real processes."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AbstractMesh, AxisType
from jax.sharding import PartitionSpec as P
from test_train import _result, run_with_devices

from vision_jax import sharding
from vision_jax.masks import path_to_str
from vision_jax.weights.run_dir import read_variables

ROOT = pathlib.Path(__file__).resolve().parents[1]
BIG = "Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel"  # (192, 768) in vit_ti16


def mesh(**axes: int) -> AbstractMesh:
    """A device-free mesh: shardings can be computed and checked without the devices."""
    return AbstractMesh(tuple(axes.values()), tuple(axes), axis_types=(AxisType.Auto,) * len(axes))


def test_fsdp_splits_the_largest_divisible_dim_of_large_params_only():
    m = mesh(data=2, fsdp=4)
    assert sharding.fsdp_spec((192, 768), m, min_size=1000) == P(None, "fsdp")
    assert sharding.fsdp_spec((768, 192), m, min_size=1000) == P("fsdp")
    assert sharding.fsdp_spec((3, 3, 64, 6), m, min_size=1000) == P(None, None, "fsdp")
    assert sharding.fsdp_spec((192,), m, min_size=1000) == P()  # too small
    assert sharding.fsdp_spec((999, 1001), m, min_size=1000) == P()  # nothing divisible by 4
    assert sharding.fsdp_spec((192, 768), mesh(data=8), min_size=1000) == P()  # no fsdp axis


def test_rules_give_partition_specs_first_match_wins():
    params = {
        "head": {"kernel": jnp.zeros((192, 8)), "bias": jnp.zeros((8,))},
        "mlp": {"kernel": jnp.zeros((192, 768)), "bias": jnp.zeros((768,))},
        "embed": {"kernel": jnp.zeros((16, 16, 3, 192))},
    }
    rules = [("head/.*", "replicated"), ("mlp/kernel", (None, "model")), (".*", "fsdp")]
    got = sharding.param_shardings(params, mesh(fsdp=4, model=2), rules, fsdp_min_size=2**12)
    specs = {path_to_str(p): s.spec for p, s in jax.tree_util.tree_flatten_with_path(got)[0]}
    assert specs == {
        "embed/kernel": P(None, None, None, "fsdp"),
        "head/bias": P(),
        "head/kernel": P(),
        "mlp/bias": P(),  # 768 elements: below fsdp_min_size
        "mlp/kernel": P(None, "model"),
    }


@pytest.mark.parametrize(
    "rule, match",
    [
        ((None, "tensor"), r"names axes \['tensor'\] that mesh"),
        (("fsdp", None), r"splits dim 0 of w \(192, 768\) into 5 parts"),
        ((None, None, "fsdp"), "more entries than w"),
        ("shard", "expected 'fsdp', 'replicated' or a partition spec"),
    ],
)
def test_bad_rules_are_clear_errors(rule, match):
    with pytest.raises(ValueError, match=match):
        sharding.param_shardings(
            {"w": jnp.zeros((192, 768))}, mesh(data=2, fsdp=5), [("w", rule)], fsdp_min_size=1
        )


def test_a_sharding_rule_that_matches_nothing_is_an_error():
    """A typo'd rule would replicate what it meant to shard (FSDP given up without a word)."""
    params = {"mlp": {"kernel": jnp.zeros((192, 768))}}
    with pytest.raises(ValueError, match=r"sharding_rules rule '\.\*kernal' matches no parameter"):
        sharding.param_shardings(params, mesh(fsdp=4), [(".*kernal", "fsdp")], fsdp_min_size=1)


def test_optimizer_state_follows_the_parameter_shardings():
    params = {"a": {"kernel": jnp.zeros((64, 128))}, "b": {"bias": jnp.zeros((128,))}}
    mask = {"a": {"kernel": True}, "b": {"bias": False}}
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3, mask=mask))
    m = mesh(fsdp=4)
    shardings = sharding.param_shardings(params, m, [(".*", "fsdp")], fsdp_min_size=1000)
    got = sharding.follow_params(jax.eval_shape(tx.init, params), params, shardings, m)
    specs = {path_to_str(p): s.spec for p, s in jax.tree_util.tree_flatten_with_path(got)[0]}
    assert specs == {
        "1/0/count": P(),
        "1/0/mu/a/kernel": P(None, "fsdp"),
        "1/0/mu/b/bias": P(),
        "1/0/nu/a/kernel": P(None, "fsdp"),
        "1/0/nu/b/bias": P(),
    }


def shard_shape(workdir: pathlib.Path, path: str) -> tuple[int, ...]:
    """The per-device shape of one saved array, from the checkpoint's sharding metadata."""
    import orbax.checkpoint as ocp

    step_dir = max((workdir / "checkpoints").iterdir(), key=lambda d: int(d.name))
    meta = ocp.StandardCheckpointer().metadata(str(step_dir / "state")).item_metadata
    flat = {path_to_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(meta.tree)[0]}
    x = flat[path]
    sizes = dict(zip(x.sharding.axis_names, x.sharding.shape, strict=True))
    shape = list(x.shape)
    for dim, entry in enumerate(x.sharding.partition_spec):
        axes = () if entry is None else (entry,) if isinstance(entry, str) else entry
        shape[dim] //= int(np.prod([sizes[a] for a in axes]))
    return tuple(shape)


VIT = {
    "model.name": "vit_ti16",
    "input.image_size": 32,
    "optimizer.name": "adamw",
    "optimizer.learning_rate": 1e-3,
    "fsdp_min_size": 2**16,
    "total_steps": 4,
    "checkpoint_every_steps": 2,
    "eval_batch_size": 40,
}


def assert_checksums_match(got: dict, want: dict) -> None:
    """Per-parameter sums of |param| agree, except attention key biases: softmax is invariant to
    a per-query shift of the logits, so their true gradient is exactly zero and Adam turns the
    round-off left in it (which depends on the reduction order, so on the mesh) into steps of
    +-lr. Near-zero leaves (MLP biases start at 1e-6) get the same, bounded by ``atol``."""
    assert got.keys() == want.keys()
    keys = [k for k in want if not k.endswith("key/bias")]
    assert len(keys) < len(want)
    bad = {k: (got[k], want[k]) for k in keys if not np.isclose(got[k], want[k], 1e-5, 1e-4)}
    assert not bad, bad


@pytest.mark.slow
def test_fsdp_meshes_match_one_device_and_restore_into_another_mesh(tmp_path):
    one = _result(run_with_devices(1, tmp_path / "one", VIT))
    shapes = {}
    for spec in ("data:8", "fsdp:8", "data:2,fsdp:4"):
        workdir = tmp_path / spec.replace(":", "").replace(",", "_")
        got = _result(run_with_devices(8, workdir, {**VIT, "mesh": spec}))
        assert got["devices"] == 8
        assert got["loss"] == pytest.approx(one["loss"], abs=1e-5), spec
        assert got["eval_loss"] == pytest.approx(one["eval_loss"], abs=1e-5), spec
        assert_checksums_match(got["checksum"], one["checksum"])
        shapes[spec] = (shard_shape(workdir, f"params/{BIG}"), workdir)
        # Adam's moments are split like their parameter.
        assert shard_shape(workdir, f"opt_state/1/0/mu/{BIG}") == shapes[spec][0]
    assert [shapes[s][0] for s in ("data:8", "data:2,fsdp:4", "fsdp:8")] == [
        (192, 768),
        (192, 192),
        (192, 96),
    ]
    # A checkpoint saved on fsdp:8 resumes on data:2,fsdp:4 and ends where every run ends.
    workdir = shapes["fsdp:8"][1]
    shutil.rmtree(workdir / "checkpoints" / "4")
    resumed = _result(run_with_devices(8, workdir, {**VIT, "mesh": "data:2,fsdp:4"}))
    assert_checksums_match(resumed["checksum"], one["checksum"])
    assert shard_shape(workdir, f"params/{BIG}") == (192, 192)


COLLECTIVES = r"""
import json, re, sys
sys.path.insert(0, {tests!r})
from test_train import small_config
from vision_jax import run, sharding
cfg = small_config(**{{"model.name": "vit_ti16", "input.image_size": 224, "batch_size": 8,
                      "fsdp_min_size": 2**10, "mesh": "fsdp:8", "model.depth": 1}})
r = run.build_run(cfg, sys.argv[1])
from vision_jax import data as data_lib
it = data_lib.train_batches(r.train_source, r.input, global_batch=8, seed=0)
batch = sharding.to_global_batch(next(it), r.mesh)
it.close()
hlo = r.train_step.lower(r.state, r.frozen, batch, r.settings).compile().as_text()
shapes = []
for line in hlo.splitlines():
    m = re.search(r"= (\(?[^=]*?\)?) all-gather(-start)?\(", line)
    shapes += re.findall(r"\w+\[([\d,]*)\]", m.group(1)) if m else []
print("GATHERED " + json.dumps(shapes))
"""


def test_fsdp_keeps_activations_split_by_batch(tmp_path):
    """A head kernel (192, 10) that FSDP splits along its input (the classes do not divide by
    8): the features stay split by batch, so only parameters are gathered (the width split had
    spread back through the blocks: the image batch (8, 224, 224, 3) and activations gathered
    whole on every device; 20x the traffic of the parameters for a 12-block ViT-Ti/16 at
    batch 64)."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8"
    code = COLLECTIVES.format(tests=str(ROOT / "tests"))
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("GATHERED ")][-1]
    gathered = json.loads(line.removeprefix("GATHERED "))
    batch_first = [s for s in gathered if s.split(",")[0] in ("8", "1576")]  # 8 x 197 tokens
    assert gathered and set(batch_first) <= {"8,10"}, gathered  # the logits at most


CONFIG = """
import json, sys
sys.path.insert(0, {tests!r})
from test_train import small_config


def get_config(arg=None):
    return small_config(**json.loads({overrides!r}))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def communicate_all(procs: list[subprocess.Popen], timeout: float) -> list[tuple[str, str]]:
    """Each of ``procs``' (stdout, stderr); any still running at the end (a timeout, an error)
    is killed."""
    try:
        return [p.communicate(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def run_two_processes(config: pathlib.Path, workdir: pathlib.Path) -> list[dict]:
    """``python -m vision_jax.main`` as 2 processes x 2 CPU devices; each one's final metrics."""
    port = free_port()
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    procs = [
        subprocess.Popen(
            [
                sys.executable, "-m", "vision_jax.main", f"--config={config}",
                f"--workdir={workdir}", f"--coordinator_address=127.0.0.1:{port}",
                "--num_processes=2", f"--process_id={i}", "--num_cpu_devices=2",
            ],
            cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        for i in range(2)
    ]  # fmt: skip
    outputs = communicate_all(procs, timeout=400)
    metrics = []
    for i, (p, (out, err)) in enumerate(zip(procs, outputs, strict=True)):
        assert p.returncode == 0, f"process {i}:\n{out[-2000:]}\n{err[-4000:]}"
        line = [ln for ln in err.splitlines() if f"Final metrics of process {i}: " in ln][-1]
        metrics.append(json.loads(line.split(f"Final metrics of process {i}: ", 1)[1]))
    assert json.loads([ln for ln in outputs[0][0].splitlines() if ln.startswith("{")][-1])
    assert "No report in a multi-process run: python -m vision_jax.report" in outputs[0][1]
    return metrics


SAME_CONFIG = """
import sys
import jax
jax.config.update("jax_num_cpu_devices", 1)
jax.distributed.initialize(coordinator_address="127.0.0.1:{port}", num_processes=2,
                           process_id=int(sys.argv[1]), coordinator_bind_address="127.0.0.1:{port}")
from vision_jax import run
rate = 0.1 if sys.argv[1] == "0" else float(sys.argv[2])
try:
    run._check_same_config({{"seed": 0, "optimizer": {{"learning_rate": rate}}}})
    print("same")
except ValueError as e:
    print(e)
jax.distributed.shutdown()
"""


@pytest.mark.parametrize("rate", [0.1, 0.05])
def test_processes_started_with_different_configs_are_refused(tmp_path, rate):
    """Each process would feed its own learning rate to the one program (or wait for the
    others at another step, with another total_steps): every process refuses, naming the key."""
    script = tmp_path / "same.py"
    script.write_text(SAME_CONFIG.format(port=free_port()))
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    env.pop("XLA_FLAGS", None)
    procs = [subprocess.Popen([sys.executable, str(script), str(i), str(rate)], env=env,
                              text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for i in range(2)]  # fmt: skip
    outputs = [out.strip().splitlines()[-1] for out, _ in communicate_all(procs, timeout=120)]
    if rate == 0.1:
        assert outputs == ["same", "same"]
        return
    assert all(o.startswith("The processes were started with different configs: processes [1] "
                            "differ from process 0") for o in outputs), outputs  # fmt: skip
    assert "(optimizer.learning_rate 0.05 here, 0.1 there)" in outputs[1]


@pytest.mark.slow
def test_two_processes_train_checkpoint_jointly_and_resume_on_another_mesh(tmp_path):
    overrides = {
        "mesh": "fsdp:4",  # the 3x3x64x64 kernels are split across both processes
        "fsdp_min_size": 2**12,
        "total_steps": 4,
        "checkpoint_every_steps": 2,
        "eval_batch_size": 40,
    }
    config = tmp_path / "config.py"
    config.write_text(CONFIG.format(tests=str(ROOT / "tests"), overrides=json.dumps(overrides)))
    workdir = tmp_path / "run"
    first = run_two_processes(config, workdir)
    same = lambda m: {k: v for k, v in m.items() if k != "train/images_per_sec"}  # wall clock
    assert same(first[0]) == same(first[1])
    assert np.isfinite(first[0]["train/loss"]) and first[0]["eval/examples"] == 360
    step_dir = workdir / "checkpoints" / "4" / "state"
    assert {"ocdbt.process_0", "ocdbt.process_1"} <= set(os.listdir(step_dir))  # both wrote
    params = read_variables(str(workdir))["params"]  # one process reads the joint checkpoint
    kernel = params["layer3"]["0"]["conv2"]["kernel"]
    assert kernel.shape == (3, 3, 64, 64) and np.all(np.isfinite(kernel))

    # Resume from step 4 on a different mesh, to step 6.
    overrides.update(mesh="data:2,fsdp:2", total_steps=6)
    config.write_text(CONFIG.format(tests=str(ROOT / "tests"), overrides=json.dumps(overrides)))
    second = run_two_processes(config, workdir)
    assert same(second[0]) == same(second[1])
    assert sorted(int(d) for d in os.listdir(workdir / "checkpoints")) == [2, 4, 6]
    resumed = read_variables(str(workdir))["params"]["layer3"]["0"]["conv2"]["kernel"]
    assert not np.allclose(resumed, kernel)


SAME_DATA = """
import json, sys
import jax
jax.config.update("jax_num_cpu_devices", 1)
jax.distributed.initialize(coordinator_address="127.0.0.1:{port}", num_processes=2,
                           process_id=int(sys.argv[1]), coordinator_bind_address="127.0.0.1:{port}")
import numpy as np
sys.path.insert(0, {tests!r})
from test_train import small_config
from vision_jax.data import DataError
from vision_jax.train import train_and_evaluate


def make(seed, n):
    r = np.random.default_rng(seed)
    y = r.integers(0, 3, n).astype(np.int32)
    return (r.random((n, 16, 16, 3)) * 60 + y[:, None, None, None] * 60).astype(np.uint8), y


process, mode = int(sys.argv[1]), sys.argv[2]
config = small_config(total_steps=2, batch_size=16, eval_batch_size=16)
config.data.source, config.data.class_names = "arrays", ("a", "b", "c")
config.mesh = "data:-1"
train = make(1, 64 - (process if mode == "fewer" else 0))
test = make(2 + (process if mode == "other" else 0), 32)
try:
    result = train_and_evaluate(config, sys.argv[3], arrays={{"train": train, "test": test}})
    print("TRAINED", result["eval/examples"], flush=True)
except DataError as e:
    print(e, flush=True)
jax.distributed.shutdown()
"""


@pytest.mark.parametrize(
    "mode",
    ["other", "fewer", pytest.param("same", marks=pytest.mark.slow)],  # it trains
)
def test_processes_given_different_arrays_are_refused(tmp_path, mode):
    """Processes given different arrays (their own test arrays; one training row fewer) would
    each feed their own examples to one program and report a blend: every process refuses,
    naming the split and the processes; the same arrays train."""
    script = tmp_path / "same_data.py"
    script.write_text(SAME_DATA.format(port=free_port(), tests=str(ROOT / "tests")))
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    env.pop("XLA_FLAGS", None)
    workdir = str(tmp_path / "run")
    procs = [subprocess.Popen([sys.executable, str(script), str(i), mode, workdir], env=env,
                              text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for i in range(2)]  # fmt: skip
    outputs = communicate_all(procs, timeout=300)
    for p, (_, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err[-4000:]
    lines = [out.strip().splitlines()[-1] for out, _ in outputs]
    if mode == "same":
        assert lines == ["TRAINED 32.0", "TRAINED 32.0"]
        return
    start = "The processes were given different data: the "
    split = {"other": "eval split ('test') of processes [1] differs from process 0's (32 "
             "examples each, other contents)",
             "fewer": "train split ('train') of processes [1] differs from process 0's "
             "(examples per process: [64, 63])"}[mode]  # fmt: skip
    assert lines == [start + split + ". Give every process the same arrays "
                     "(data.source='arrays'), or the same files."] * 2, lines  # fmt: skip
