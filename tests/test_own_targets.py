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
from vision_jax import evaluate, predict, specs, tasks
from vision_jax import trained as trained_lib
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
    predictor = Predictor(tmp_path, which="latest")
    assert predictor.value_names is None  # "0" .. "2": predict's CSV numbers its columns
    probs = predictor.predict_arrays(arrays["test"]["image"])["probabilities"]
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
    # A split whose column is not the run's: named by shape and type, not as "classes"
    test = arrays["test"]
    for values, held in ((test["targets"][:, :2], r"int32 \(2,\)"),
                         (test["targets"].astype(np.float32), r"float32 \(3,\)")):  # fmt: skip
        other = {"test": {"image": test["image"], "targets": values}}
        match = rf"The split 'test' holds 'targets' values of {held} per example; the run " \
                r"trained on int32 \(3,\)\.$"  # fmt: skip
        with pytest.raises(DataError, match=match):
            evaluate.evaluate_run(tmp_path, which="latest", arrays=other)
    match = (
        r"data.source='arrays' needs arrays=\{'test': \{'image': images, 'targets': "
        r"values\}, \.\.\.\}: the split 'test' is not among those passed \('train'\)\.$"
    )
    with pytest.raises(DataError, match=match):  # evaluate_run's arrays, not train_and_evaluate's
        evaluate.evaluate_run(tmp_path, which="latest", arrays={"train": arrays["train"]})


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


NAMES = ("top", "bottom", "red")  # multi_hot's values


def write_multi_label_csv(root, name: str, n: int, seed: int, order=NAMES) -> None:
    """``root/<name>.csv`` of n 8x8 PNGs (``multi_hot``) with a column per value,
    ``targets/<name>``, in the header order ``order``."""
    data = multi_hot(n, seed)
    (root / name).mkdir(parents=True, exist_ok=True)
    lines = ["filename," + ",".join(f"targets/{c}" for c in order)]
    for i, (image, values) in enumerate(zip(data["image"], data["targets"], strict=True)):
        Image.fromarray(image).save(root / name / f"{i}.png")
        by_name = dict(zip(NAMES, values.astype(int).tolist(), strict=True))
        lines.append(f"{name}/{i}.png," + ",".join(str(by_name[c]) for c in order))
    (root / f"{name}.csv").write_text("\n".join(lines) + "\n")


def test_csv_columns_per_value_are_matched_by_name_to_the_runs(tmp_path, register):
    """Columns ``<target>/<name>`` are read by name, not position: a test CSV whose columns
    come in another order measures the same; other names are refused naming the file."""
    register(MultiLabel)
    root, workdir = tmp_path / "data", tmp_path / "run"
    write_multi_label_csv(root, "train", 16, 0)
    write_multi_label_csv(root, "test", 12, 1)
    config = own_config(MultiLabel, total_steps=1, **{
        "data.source": "csv", "data.root": str(root), "task.module": "own_task",
    })  # fmt: skip
    result = train_and_evaluate(config, str(workdir))
    # predict's CSV names the values' columns as the run recorded them (JSON lines: the list)
    run = [f"--workdir={workdir}", "--which=latest", f"--input={root / 'test'}"]
    for out in (tmp_path / "preds.csv", tmp_path / "preds.jsonl"):
        assert predict.main([*run, f"--output={out}"]) == 0
    header, row = (tmp_path / "preds.csv").read_text().splitlines()[:2]
    assert header == "file,probabilities/top,probabilities/bottom,probabilities/red"
    record = json.loads((tmp_path / "preds.jsonl").read_text().splitlines()[0])
    assert row.split(",")[1:] == [repr(p) for p in record["probabilities"]]
    write_multi_label_csv(root, "test", 12, 1, order=("red", "top", "bottom"))
    again = evaluate.evaluate_run(workdir, which="latest")
    assert again["eval/loss"] == pytest.approx(result["eval/loss"], rel=1e-5)
    assert again["eval/map"] == pytest.approx(result["eval/map"], abs=1e-6)
    test_csv = root / "test.csv"
    test_csv.write_text(test_csv.read_text().replace("targets/red", "targets/blue"))
    match = (
        r"test.csv: the columns targets/<name> name the values blue, top, bottom; "
        r"expected top, bottom, red \(data.class_names, or the values the run trained on\)"
    )
    with pytest.raises(DataError, match=match):
        evaluate.evaluate_run(workdir, which="latest")
    # data.class_names orders them too
    names = ("red", "top", "bottom")
    source = data_lib.load_source(data_spec(source="csv", root=str(root), class_names=names),
                                  "train", target="targets")  # fmt: skip
    truth = multi_hot(16, 0)["targets"].astype(np.int32)
    np.testing.assert_array_equal(source.columns["targets"], truth[:, [2, 0, 1]])
    assert source.class_names == list(names)


@pytest.mark.parametrize(
    "text, match",
    [
        ("filename,v\na.png,0.5\nb.png,nan\n", r"train.csv:3: 'nan' is not a number"),
        ("filename,v\na.png,inf\n", r"train.csv:2: 'inf' is not a number"),
        ("filename,v\na.png,-Infinity\n", r"train.csv:2: '-Infinity' is not a number"),
        ("filename,v\na.png,1_000\n", r"train.csv:2: '1_000' is not a number \('v' of a.png\)"),
        ("filename,v\na.png,1e39\n", r"train.csv: the column 'v' holds a value that is not a "
                                      r"finite float32 \(line 2, a.png: 1e39\): NaN, infinity or "
                                      r"beyond float32's range"),
        ("filename,v\na.png,3000000000\n", r"train.csv: the column 'v' holds integers outside "
                                            r"int32's range \(line 2, a.png: 3000000000\)"),
        ("filename,v\na.png,1\nb.png,1" + "0" * 30 + "\n",
         r"train.csv: the column 'v' holds integers outside int32's range \(line 3, b.png: 1"
         + "0" * 30 + r"\)"),
        ("filename,v/a,v/b\na.png,1 0,\nb.png,0,1\n",
         r"train.csv:2: the column 'v/a' holds '1 0' \(a.png\); a column per value holds one"),
        ("filename,v/a,v/b\na.png,1,\n", r"train.csv:2: the column 'v/b' holds nothing"),
        ("filename,v/a,v/a\na.png,1,2\n", r"train.csv: the header names v/a more than once"),
        ("filename,v,v\na.png,1,2\n", r"train.csv: the header names v more than once"),
    ],
)  # fmt: skip
def test_csv_values_that_are_not_one_finite_number_are_refused_naming_the_line(
    tmp_path, text, match
):
    (tmp_path / "train.csv").write_text(text)
    with pytest.raises(DataError, match=match):
        data_lib.load_source(data_spec(source="csv", root=str(tmp_path)), "train", target="v")


def test_a_csv_columns_type_comes_from_the_runs_splits_alone(tmp_path):
    """int32 where every value of the run's split files is an integer: a float in the eval
    split makes the train split float32 too (so that they agree); another CSV file in the
    folder (predictions, notes) changes neither the type nor the fingerprint."""
    (tmp_path / "train.csv").write_text("filename,v\na.png,1\nb.png,0\n")
    (tmp_path / "test.csv").write_text("filename,v\nc.png,1\n")
    load = lambda **keys: data_lib.load_source(
        data_spec(source="csv", root=str(tmp_path), **keys), "train", target="v"
    )
    before = load()
    assert before.column_spec == ((), np.int32)
    (tmp_path / "predictions.csv").write_text("filename,v\nc.png,0.73\n")
    after = load()
    assert after.column_spec == ((), np.int32)
    assert after.fingerprint() == before.fingerprint()
    assert load(eval_split="predictions").column_spec == ((), np.float32)  # a split of the run


@pytest.mark.parametrize(
    "column, match",
    [
        (np.array([0, np.nan, 1, 2]), r"arrays\['train'\]: the column 'v' holds a value that "
                                      r"is not a finite float32 \(row 1: nan\)"),
        (np.array([0, 1, np.inf, 2]), r"arrays\['train'\]: .* \(row 2: inf\)"),
        (np.array([[0.0], [1e39], [0], [0]]), r"arrays\['train'\]: .* \(row 1: \[1e\+39\]\)"),
        ([[0], [1, 2], [1], [2]], r"arrays\['train'\]: the column 'v' must hold numbers of one "
                                  r"shape per example"),
        (np.zeros(3), r"arrays\['train'\]: the column 'v' has 3 rows, the images 4\."),
        (np.array([1, 2, 3, 2**40]), r"arrays\['train'\]: the column 'v' holds integers "
                                     r"outside int32's range \(row 3: 1099511627776\)"),
    ],
)  # fmt: skip
def test_arrays_columns_that_are_not_finite_numbers_are_refused_naming_split_and_row(column, match):
    images = np.zeros((4, 8, 8, 3), np.uint8)
    arrays = {"train": {"image": images, "v": column}}
    with pytest.raises(DataError, match=match):
        data_lib.load_source(data_spec(source="arrays"), "train", arrays=arrays, target="v")
    arrays = {"train": {"images": images, "v": np.zeros(4)}}
    with pytest.raises(DataError, match=r"arrays\['train'\] has no 'image' column \(its "):
        data_lib.load_source(data_spec(source="arrays"), "train", arrays=arrays, target="v")


def test_the_run_record_keeps_the_columns_shape_and_type_and_older_runs_check_its_size():
    """A run records its target column's shape and type (evaluate_run compares a split's with
    them); a record without them (an older run) still loads, and a split then is checked
    against the number of values its class names count."""
    from types import SimpleNamespace

    from vision_jax.weights.run_dir import RunRecord

    record = RunRecord(class_names=("a", "b", "c"), target_shape=(3,), target_dtype="int32")
    assert RunRecord.from_json(json.loads(json.dumps(record.to_json()))) == record
    older = RunRecord.from_json({"class_names": ["a", "b", "c"]})
    assert older.target_shape is None and older.target_dtype is None
    assert "target" not in older.to_json()
    images = np.zeros((2, 8, 8, 3), np.uint8)
    two = data_lib.from_arrays(images, np.zeros((2, 2), np.float32), target="targets")
    trained = SimpleNamespace(record=older, class_names=["a", "b", "c"])
    match = (r"The split 'test' holds 'targets' values of shape \(2,\) per example; the run "
             r"trained on 3 values per example\.$")  # fmt: skip
    with pytest.raises(DataError, match=match):
        trained_lib._check_column(trained, two, "test")
    three = data_lib.from_arrays(images, np.zeros((2, 3), np.float32), target="targets")
    trained_lib._check_column(trained, three, "test")
