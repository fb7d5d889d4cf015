"""vision_jax runs as a weights format: the run record, and the one-way imports of weights/."""

from __future__ import annotations

import ast
import json
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
from test_train import small_config

import vision_jax.weights
from vision_jax.trees import flatten_dict
from vision_jax.weights import (
    InputContract,
    RunRecord,
    input_contract,
    read_record,
    read_variables,
)

WEIGHTS = pathlib.Path(vision_jax.weights.__file__).parent
DISPATCH = {"__init__", "dispatch", "load"}  # the modules above the readers


def _imports(path: pathlib.Path) -> list[tuple[str, str | None]]:
    """``(module, name)`` of every import in a file, inside functions too (``name`` None for
    ``import module``)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            found += [(node.module, alias.name) for alias in node.names]
    return found


def _targets(module: str, name: str | None) -> set[str]:
    """The modules an import may load: ``module``, and ``module.name`` when that is a module."""
    return {module} | ({f"{module}.{name}"} if name else set())


def test_weights_imports_go_one_way():
    """No module of weights/ imports vision_jax.checkpoint (not even lazily); readers never
    import the dispatcher nor a name of the package ``__init__``; ``__init__`` only
    re-exports."""
    for path in sorted(WEIGHTS.glob("*.py")):
        for module, name in _imports(path):
            targets = _targets(module, name)
            assert "vision_jax.checkpoint" not in targets, f"{path.name} imports checkpoint"
            if path.stem == "dispatch":
                assert "vision_jax.weights.load" not in targets, "dispatch imports load"
            if path.stem in DISPATCH:
                continue
            above = {f"vision_jax.weights.{m}" for m in DISPATCH - {"__init__"}}
            assert not targets & above, f"{path.name} imports the dispatcher ({module}, {name})"
            if module == "vision_jax.weights":  # only submodules, never the package's names
                assert name and (WEIGHTS / f"{name}.py").is_file(), f"{path.name}: {name}"
    init = ast.parse((WEIGHTS / "__init__.py").read_text())
    logic = [
        n
        for n in init.body
        if not isinstance(n, ast.Import | ast.ImportFrom | ast.Assign)
        and not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant))  # docstring
    ]
    assert not logic, "weights/__init__.py holds more than re-exports"


@pytest.fixture(scope="module")
def written_run(tmp_path_factory):
    """A run directory written as training writes it: ``build_run``'s record, one save."""
    from vision_jax.run import build_run

    workdir = tmp_path_factory.mktemp("run")
    config = small_config(total_steps=1, **{"input.interpolation": "bicubic"})
    run = build_run(config, str(workdir))
    try:
        state = run.state.replace(step=run.state.step + 1)  # as after one step
        run.checkpointer.save(1, state, run.meta, force=True, data_position=32)
        run.checkpointer.wait()
        expected = {"params": run.state.params, **run.state.model_state}
        return workdir, run, jax.tree.map(np.asarray, expected)
    finally:
        run.close()


def test_run_record_round_trips_and_reads_old_records():
    record = RunRecord(
        config={"model": {"name": "vit_ti16"}},
        task="classification",
        model="vit_ti16",
        class_names=("cat", "dog"),
        total_steps=7,
        image_size=32,
        mean=(0.1, 0.2, 0.3),
        std=(0.4, 0.5, 0.6),
        interpolation="bicubic",
    )
    assert RunRecord.from_json(json.loads(json.dumps(record.to_json()))) == record
    # Older runs recorded the input only in their config, and no model; step keys are ignored.
    old = {"config": {"input": {"image_size": 48, "mean": [0.1] * 3, "std": [0.2] * 3}}}
    assert RunRecord.from_json({**old, "final": True, "data_positions": [3]}) == RunRecord(
        config=old["config"], image_size=48, mean=(0.1,) * 3, std=(0.2,) * 3
    )
    assert RunRecord.from_json({}) == RunRecord()


def test_a_training_run_is_read_through_its_record(written_run):
    workdir, run, expected = written_run
    record = read_record(workdir)
    assert record == RunRecord.from_json(json.loads(json.dumps(run.meta)))  # as JSON keeps it
    assert record.model == "cifar_resnet20" and record.task == run.task.name
    assert record.class_names == tuple(run.train_source.class_names)
    assert record.total_steps == 1 and record.image_size == 16
    mean, std = tuple(run.input.mean), tuple(run.input.std)
    contract = InputContract(16, mean, std, interpolation="bicubic")
    for path in (workdir, workdir / "checkpoints", workdir / "checkpoints" / "1"):
        assert input_contract(path) == contract
    got = flatten_dict(read_variables(workdir, run.model))
    assert got.keys() == flatten_dict(expected).keys()
    for k, v in flatten_dict(expected).items():
        np.testing.assert_array_equal(got[k], v, err_msg=k)


READ_WITHOUT_CHECKPOINT = """
import importlib, pkgutil, sys
import vision_jax.weights as weights
from vision_jax.models import create_model

for info in pkgutil.iter_modules(weights.__path__):
    importlib.import_module(f"vision_jax.weights.{info.name}")
model = create_model("cifar_resnet20", num_classes=10)
weights.read_variables(sys.argv[1], model)
weights.input_contract(sys.argv[1])
print(sorted(m for m in sys.modules if m.startswith("vision_jax.checkpoint")))
"""


def test_reading_a_run_never_imports_checkpoint(written_run):
    """In a fresh process, every weights module plus reading a run leave checkpoint unloaded."""
    workdir = written_run[0]
    done = subprocess.run(
        [sys.executable, "-c", READ_WITHOUT_CHECKPOINT, str(workdir)],
        capture_output=True, text=True, timeout=300, cwd=pathlib.Path(__file__).parents[1],
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"
