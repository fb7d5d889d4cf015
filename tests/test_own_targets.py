"""Tasks of one's own reading a per-example column of their data (``task.target`` names it):
multi-label classification from in-memory arrays, regression from a CSV file; the columns pass
through the pipeline unchanged, a missing one is named before training."""

import json

import numpy as np
import pytest
from own_task import ColumnValue, MultiLabel
from PIL import Image
from sklearn.metrics import average_precision_score, f1_score
from test_train import small_config

from vision_jax import data as data_lib
from vision_jax import evaluate, specs, tasks
from vision_jax.data import DataError, pipeline
from vision_jax.predict import Predictor
from vision_jax.report import write_report
from vision_jax.run import build_run
from vision_jax.specs import InputSpec
from vision_jax.train import train_and_evaluate


@pytest.fixture
def register(monkeypatch):
    """register_task for one test."""
    monkeypatch.setattr(tasks, "TASKS", dict(tasks.TASKS))
    return tasks.register_task


def multi_hot(n: int, seed: int) -> dict[str, np.ndarray]:
    """8x8 images and 3 labels each: bright top half, bright bottom half, red (so they can be
    learnt a little)."""
    x = np.random.default_rng(seed).integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)
    halves = x[:, :4].mean((1, 2, 3)) > 127, x[:, 4:].mean((1, 2, 3)) > 127
    return {"image": x, "targets": np.stack([*halves, x[..., 0].mean((1, 2)) > 127], 1)}


def own_config(task, **overrides):
    return small_config(**{
        "task.name": task.name, "input.image_size": 8, "batch_size": 16, "eval_batch_size": 16,
        **overrides,
    })  # fmt: skip


def test_a_multi_label_task_trains_evaluates_predicts_and_resumes_on_arrays(tmp_path, register):
    register(MultiLabel)
    arrays = {"train": multi_hot(64, 0), "test": multi_hot(40, 1)}  # 40: a padded last batch
    config = own_config(MultiLabel, total_steps=2, checkpoint_every_steps=1,
                        **{"data.source": "arrays"})  # fmt: skip
    first = train_and_evaluate(config, str(tmp_path), arrays=arrays)
    assert first["eval/examples"] == 40
    config.total_steps = 3  # resumed from step 2
    result = train_and_evaluate(config, str(tmp_path), arrays=arrays)
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("[0-9]*"))[-1].endswith("3")
    assert result["eval/examples"] == 40
    # The figures of the model's outputs (predicted without targets), by scikit-learn
    probs = Predictor(tmp_path, which="latest").predict_arrays(arrays["test"]["image"])
    probs = probs["probabilities"]
    truth = arrays["test"]["targets"].astype(int)
    assert probs.shape == truth.shape
    ap = np.mean([average_precision_score(truth[:, k], probs[:, k]) for k in range(3)])
    f1 = f1_score(truth, probs >= 0.5, average="macro", zero_division=0)
    assert result["eval/map"] == pytest.approx(ap, abs=1e-6)
    assert result["eval/f1"] == pytest.approx(f1, abs=1e-6)
    with pytest.raises(DataError, match=r"arrays=\{'test': \{'image': images, 'targets': values"):
        evaluate.evaluate_run(tmp_path, which="latest")
    again = evaluate.evaluate_run(tmp_path, which="latest", arrays=arrays)
    assert again["eval/map"] == pytest.approx(ap, abs=1e-6)
    assert again["eval/loss"] == pytest.approx(result["eval/loss"], rel=1e-5)


def write_csv_split(root, name: str, n: int, seed: int) -> tuple[list[str], np.ndarray]:
    """``root/<name>.csv`` (``filename,value``) of n 8x8 PNGs, each valued its mean level."""
    x = np.random.default_rng(seed).integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)
    values = (x.mean((1, 2, 3)) / 255).astype(np.float32)
    (root / name).mkdir(parents=True)
    lines, paths = ["filename,value"], []
    for i, (image, value) in enumerate(zip(x, values, strict=True)):
        Image.fromarray(image).save(root / name / f"{i}.png")
        lines.append(f"{name}/{i}.png,{float(value)!r}")
        paths.append(str(root / name / f"{i}.png"))
    (root / f"{name}.csv").write_text("\n".join(lines) + "\n")
    return paths, values


def test_a_regression_task_reads_a_csv_column_and_the_evaluate_command_measures_it(
    tmp_path, register
):
    register(ColumnValue)
    root = tmp_path / "data"
    write_csv_split(root, "train", 48, 0)
    paths, values = write_csv_split(root, "test", 20, 1)
    workdir = tmp_path / "run"
    config = own_config(ColumnValue, total_steps=2, **{
        "data.source": "csv", "data.root": str(root), "optimizer.learning_rate": 0.01,
        "task.module": "own_task",
    })  # fmt: skip
    result = train_and_evaluate(config, str(workdir))
    records, unreadable = Predictor(workdir).predict(paths)
    assert not unreadable
    predicted = np.array([r["value"] for r in records], np.float64)
    mse = np.mean((predicted - values) ** 2)
    assert result["eval/examples"] == 20
    assert result["eval/mse"] == pytest.approx(mse, rel=1e-5)
    out = tmp_path / "eval.json"
    assert evaluate.main(["--workdir", str(workdir), "--output", str(out)]) == 0
    measured = json.loads(out.read_text())
    assert measured["eval/mse"] == pytest.approx(mse, rel=1e-5)
    assert measured["eval/examples"] == 20
    write_report(workdir)  # a task of one's own: the results its run recorded
    assert "eval/mse" in (workdir / "report" / "results.csv").read_text()


def data_spec(**keys) -> specs.DataSpec:
    return specs.data_spec(small_config(**{f"data.{k}": v for k, v in keys.items()}).data)


def test_csv_columns_hold_a_number_or_a_vector_per_example(tmp_path):
    header = "filename,targets,value,box/cat,box/dog"
    rows = ["a.png,0 1 1,0.5,1,0", "b.png,1 0 0,2,0,1"]
    (tmp_path / "train.csv").write_text("\n".join([header, *rows]) + "\n")
    (tmp_path / "test.csv").write_text(f"{header}\nc.png,0 0 1,3,1,1\n")
    load = lambda split, target, **keys: data_lib.load_source(
        data_spec(source="csv", root=str(tmp_path), **keys), split, target=target
    )
    multi = load("train", "targets")
    assert multi.target == "targets" and multi.class_names == ["0", "1", "2"]
    assert multi.columns["targets"].dtype == np.int32  # integers in every split CSV
    np.testing.assert_array_equal(multi.columns["targets"], [[0, 1, 1], [1, 0, 0]])
    assert multi.columns["path"].tolist() == [str(tmp_path / "a.png"), str(tmp_path / "b.png")]
    value = load("train", "value")
    assert value.columns["value"].dtype == np.float32  # 0.5: floats
    np.testing.assert_array_equal(value.columns["value"], [0.5, 2.0])
    assert load("test", "value").column_spec == ((), np.float32)  # 3 in test: as train's
    per_column = load("train", "box")
    assert per_column.class_names == ["cat", "dog"]
    np.testing.assert_array_equal(per_column.columns["box"], [[1, 0], [0, 1]])
    named = load("train", "targets", class_names=("x", "y", "z"))
    assert named.class_names == ["x", "y", "z"]
    with pytest.raises(DataError, match=r"data.class_names names 2 values; the column "
                       r"'targets' holds 3 per example"):  # fmt: skip
        load("train", "targets", class_names=("x", "y"))
    match = (r"train.csv has no column 'points', the task's target \(its columns: filename, "
             r"targets, value, box/cat, box/dog\)\.$")  # fmt: skip
    with pytest.raises(DataError, match=match):
        load("train", "points")
    (tmp_path / "train.csv").write_text("filename,targets\na.png,0 1\nb.png,1 x\nc.png,1\n")
    with pytest.raises(DataError, match=r"train.csv:3: 'x' is not a number \('targets' of b"):
        load("train", "targets")
    (tmp_path / "train.csv").write_text("filename,targets\na.png,0 1\nb.png,1\n")
    with pytest.raises(DataError, match=r"train.csv:3: 1 values for 'targets' \(b.png\); other"):
        load("train", "targets")


def test_arrays_columns_pass_through_the_pipeline_unchanged_and_padded(register):
    arrays = {
        "train": multi_hot(10, 0),
        "test": {"image": multi_hot(10, 1)["image"], "value": np.linspace(0, 1, 10)},
    }
    spec = data_spec(source="arrays")
    source = data_lib.load_source(spec, "test", arrays=arrays, target="value")
    assert source.column_spec == ((), np.float32) and source.class_names == ["0"]
    shapes = data_lib.eval_example_shapes(source, InputSpec(image_size=8))
    assert shapes["value"] == ((), np.float32)
    batches = list(data_lib.eval_batches(source, InputSpec(image_size=8), global_batch=4))
    values = np.concatenate([b["value"] for b in batches])
    mask = np.concatenate([b["mask"] for b in batches])
    assert values.dtype == np.float32 and len(values) == 12  # 10 and 2 padding rows
    np.testing.assert_array_equal(values[mask > 0], np.linspace(0, 1, 10).astype(np.float32))
    assert not values[mask == 0].any()
    empty = pipeline._empty_batch(4, 8, pipeline._target(source, None))  # a shard run out
    assert empty["value"].shape == (4,) and empty["value"].dtype == np.float32
    train = data_lib.load_source(spec, "train[:80%]", arrays=arrays, target="targets")
    assert train.num_examples == 8 and train.column_spec == ((3,), np.int32)
    batch = next(iter(data_lib.train_batches(train, InputSpec(image_size=8), global_batch=8,
                                             seed=0)))  # fmt: skip
    assert batch["targets"].dtype == np.int32 and batch["targets"].shape == (8, 3)
    assert set(batch) == {"image", "targets"}
    rows = {tuple(r) for r in train.columns["targets"].tolist()}
    assert {tuple(r) for r in batch["targets"].tolist()} <= rows
    mixing = InputSpec(image_size=8, mixup_alpha=0.2)
    with pytest.raises(DataError, match="mixup and cutmix mix image labels; the target"):
        data_lib.train_batches(train, mixing, global_batch=8, seed=0)


@pytest.mark.parametrize(
    "source, match",
    [
        ("digits", r"data.source='digits' has no column 'targets', the task's target \(its "
                   r"columns: image, label\); columns of one's own come from data.source "
                   r"'arrays' or 'csv'\.$"),
        ("arrays", r"arrays\['train'\] has no column 'targets', the task's target \(its "
                   r"columns: image, label\)\.$"),
    ],
)  # fmt: skip
def test_a_column_the_data_lacks_is_named_before_training(tmp_path, register, source, match):
    register(MultiLabel)
    arrays = {s: (multi_hot(16, 0)["image"], np.zeros(16, int)) for s in ("train", "test")}
    config = own_config(MultiLabel, **{"data.source": source})
    with pytest.raises(DataError, match=match):
        build_run(config, str(tmp_path), arrays=arrays if source == "arrays" else None)
    assert not (tmp_path / "checkpoints").exists()


def test_mixing_stays_refused_for_a_task_reading_a_column(tmp_path, register):
    register(MultiLabel)
    config = own_config(MultiLabel, **{"data.source": "arrays", "input.mixup_alpha": 0.2})
    with pytest.raises(specs.ConfigError, match="does not read the mixed labels"):
        build_run(config, str(tmp_path), arrays={"train": multi_hot(16, 0)})


def test_splits_whose_columns_differ_in_shape_are_refused(tmp_path, register):
    register(MultiLabel)
    test = multi_hot(16, 1)
    test["targets"] = test["targets"][:, :2]
    config = own_config(MultiLabel, **{"data.source": "arrays"})
    match = (r"The train and eval splits' 'targets' values differ: int32 \(3,\) per example in "
             r"train, int32 \(2,\) in eval\.")  # fmt: skip
    with pytest.raises(DataError, match=match):
        build_run(config, str(tmp_path), arrays={"train": multi_hot(16, 0), "test": test})
