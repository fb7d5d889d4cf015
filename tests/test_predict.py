"""vision_jax.predict on image files: predictions equal the evaluation path's on the same images
(classification probabilities, segmentation label maps), unreadable files are named and skipped,
the CLI writes jsonl / csv / PNG label maps, and a pretrained file predicts as timm does."""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import pathlib
import shutil
import signal
import time
import zipfile

import jax
import numpy as np
import pytest
from PIL import Image
from test_segmentation_train import ARRAYS, seg_config
from test_train import small_config

from vision_jax import data as data_lib
from vision_jax import weights
from vision_jax.export.__main__ import main as export_main
from vision_jax.predict import Predictor, flat, image_files, main, voc_palette
from vision_jax.tasks import Segmentation
from vision_jax.train import train_and_evaluate
from vision_jax.trained import load_trained
from vision_jax.trees import flatten_dict

BROKEN = 5  # where the unreadable files go among the digit files


def _softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _eval_outputs(workdir: pathlib.Path, source: data_lib.Source, batch: int) -> np.ndarray:
    """The trained model's outputs (logits) on the real rows of the evaluation batches of
    ``source``."""
    trained = load_trained(workdir)
    rows = []
    for b in data_lib.eval_batches(source, trained.input, global_batch=batch):
        logits = np.asarray(trained.model.apply(trained.variables, b["image"], train=False))
        rows.append(logits[b["mask"] > 0])
    return np.concatenate(rows)


@pytest.fixture(scope="module")
def digit_files(tmp_path_factory) -> tuple[list[str], list[str]]:
    """The digits test split (the run's eval split) as 8x8 grey PNG files, and two unreadable
    files: not an image, and a PNG cut short (its header reads, its pixels do not)."""
    folder = tmp_path_factory.mktemp("digits")
    paths = []
    for i, image in enumerate(data_lib.digits("test").columns["image"]):
        paths.append(str(folder / f"{i:03d}.png"))
        Image.fromarray(image[..., 0]).save(paths[-1])
    png = pathlib.Path(paths[0]).read_bytes()
    broken = [folder / "000_not_an_image.png", folder / "000_truncated.png"]
    broken[0].write_bytes(b"not an image")
    broken[1].write_bytes(png[: len(png) // 2])
    return paths, [str(p) for p in broken]


@pytest.fixture(scope="module")
def digit_predictor(digits_run) -> Predictor:
    return Predictor(digits_run[0], batch_size=32)


@pytest.fixture(scope="module")
def digit_records(digit_predictor, digit_files) -> tuple[list[dict], list]:
    paths, broken = digit_files
    mixed = paths[:BROKEN] + broken + paths[BROKEN:]
    return digit_predictor.predict(mixed, top_k=10)


def test_probabilities_equal_the_evaluation(digits_run, digit_files, digit_predictor,
                                            digit_records):  # fmt: skip
    """Each file's probabilities (and each array's, with predict_arrays) are the softmax of the
    model's logits on the eval pipeline's batch of the same digit (another batch size); the
    top-1 is their argmax; the fraction correct is the run's eval/top1 (the files are exactly
    the eval split)."""
    workdir, result, _ = digits_run
    paths, _ = digit_files
    records, _ = digit_records
    assert [r["file"] for r in records] == paths
    got = np.zeros((len(records), 10))
    for row, r in zip(got, records, strict=True):
        for top in r["top_k"]:
            row[top["label"]] = top["probability"]
            assert top["class_name"] == str(top["label"])
    source = data_lib.digits("test")
    want = _softmax(_eval_outputs(workdir, source, 48))
    np.testing.assert_allclose(got, want, atol=2e-6)
    rgb = np.repeat(source.columns["image"], 3, -1)
    arrays = digit_predictor.predict_arrays(rgb)["probabilities"]
    np.testing.assert_allclose(arrays, want, atol=2e-6)
    with pytest.raises(ValueError, match=r"No images to predict: got an array of shape \(0, 8"):
        digit_predictor.predict_arrays(rgb[:0])
    grey = source.columns["image"]  # as training takes arrays: 1 channel, or floats in [0, 1]
    for images in (grey, grey[..., 0], grey / 255.0):
        arrays = digit_predictor.predict_arrays(images)["probabilities"]
        np.testing.assert_allclose(arrays, want, atol=2e-6)
    labels = np.array([r["label"] for r in records])
    np.testing.assert_array_equal(labels, want.argmax(-1))
    assert np.ptp(want, axis=0).max() > 0.05  # a trained model: not the same for every digit
    assert result["eval/top1"] > 0.3  # chance is 0.1
    correct = np.mean(labels == source.columns["label"])
    assert correct == pytest.approx(result["eval/top1"], abs=1e-6)


def test_a_task_of_ones_own_predicts_its_outputs_on_files(digits_run, digit_files,
                                                          digit_records):  # fmt: skip
    """A run of a task of one's own, not a library task's subclass, gets records of its
    ``predict`` outputs as they come (here the classifier's, under another task: its
    probabilities)."""
    from types import SimpleNamespace

    from vision_jax.tasks import library_kind

    predictor = Predictor(digits_run[0], batch_size=32)
    predictor.task = SimpleNamespace(name="renamed", target="label")  # what predict reads
    assert library_kind(predictor.task) is None
    paths, _ = digit_files
    records, unreadable = predictor.predict(paths[:7])
    assert not unreadable and [r["file"] for r in records] == paths[:7]
    for record, known in zip(records, digit_records[0][:7], strict=True):
        top = max(known["top_k"], key=lambda t: t["probability"])
        assert np.argmax(record["probabilities"]) == top["label"]
        assert record["probabilities"][top["label"]] == pytest.approx(top["probability"])


MY_TASK = """
import dataclasses
from vision_jax.tasks import register_task
from vision_jax.tasks.classification import Classification

@register_task
@dataclasses.dataclass(frozen=True)
class Mine(Classification):
    name = "mine"
"""


def test_a_task_of_ones_own_is_imported_from_its_module(tmp_path, monkeypatch, digit_files,
                                                        capsys):  # fmt: skip
    """``task.module`` names the module that registers a task of one's own: the run imports
    it, and so does everything that reads the run later (here load_trained, in a process that
    never imported it); without it, the error says to set it. A subclass of a library task
    is predicted and reported as that task (class names, per-class tables)."""
    import sys

    from vision_jax import tasks
    from vision_jax.report import write_report
    from vision_jax.report.__main__ import main as report_main
    from vision_jax.trained import load_trained

    (tmp_path / "my_tasks.py").write_text(MY_TASK)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(tasks, "TASKS", dict(tasks.TASKS))
    monkeypatch.delitem(sys.modules, "my_tasks", raising=False)
    with pytest.raises(ValueError, match="Unknown task.name 'mine' \\(set task.module to the"):
        train_and_evaluate(small_config(**{"task.name": "mine"}), str(tmp_path / "run"))
    config = small_config(total_steps=2, **{"task.name": "mine", "task.module": "my_tasks"})
    result = train_and_evaluate(config, str(tmp_path / "run"))
    assert 0 <= result["eval/top1"] <= 1 and "mine" in tasks.TASKS
    del tasks.TASKS["mine"], sys.modules["my_tasks"]  # a later process's view
    trained = load_trained(tmp_path / "run")
    assert trained.task.name == "mine" and type(trained.task).__module__ == "my_tasks"
    records, _ = Predictor(tmp_path / "run").predict(digit_files[0][:3], top_k=2)
    assert records[0]["class_name"] in trained.class_names and len(records[0]["top_k"]) == 2
    write_report(tmp_path / "run")
    assert (tmp_path / "run" / "report" / "per_class.csv").is_file()
    with pytest.raises(ValueError, match="already registered"):
        tasks.register_task(type("Mine", (tasks.Classification,), {"name": "mine"}))
    # A script that registers it as __main__ and names itself: not imported a second time.
    del tasks.TASKS["mine"], sys.modules["my_tasks"]
    script = type("Mine", (tasks.Classification,), {"name": "mine", "__module__": "__main__"})
    tasks.register_task(script)
    assert type(load_trained(tmp_path / "run").task) is script and "my_tasks" not in sys.modules
    # A saved run without the module: the error says to import it (its config is as it ran).
    del tasks.TASKS["mine"]
    for meta in (tmp_path / "run" / "checkpoints").glob("*/meta/metadata"):
        record = json.loads(meta.read_text())
        record["config"]["task"]["module"] = None
        meta.write_text(json.dumps(record))
    with pytest.raises(ValueError, match="import the module that registers it first"):
        load_trained(tmp_path / "run")
    capsys.readouterr()
    assert report_main([f"--workdir={tmp_path / 'run'}"]) == 1  # one line, no traceback
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and "Cannot read the run in" in error and "task.name 'mine'" in error


def test_unreadable_files_are_named_and_skipped(digit_files, digit_records):
    _, broken = digit_files
    records, unreadable = digit_records
    assert [path for path, _ in unreadable] == broken
    assert all(reason for _, reason in unreadable)
    assert Image.open(broken[1]).size == (8, 8)  # a header check alone would let it through
    assert len(records) == 360


def test_one_path_alone_or_none(digit_predictor, digit_files, digit_records):
    """One path (a str or a pathlib.Path) without a list predicts that file (a str was split
    into characters and failed in the pipeline), a folder or a glob its files; no paths give
    no records."""
    paths, _ = digit_files
    records, _ = digit_records
    for one in (paths[0], pathlib.Path(paths[0])):
        alone, unreadable = digit_predictor.predict(one, top_k=10)
        assert unreadable == [] and [r["file"] for r in alone] == [paths[0]]
        assert alone[0]["top_k"][0] == pytest.approx(records[0]["top_k"][0])
    assert digit_predictor.predict([]) == ([], [])
    folder = str(pathlib.Path(paths[0]).parent)  # a folder or a glob, as the CLI's --input
    for where in (folder, pathlib.Path(folder), folder + "/00*.png"):
        found, unreadable = digit_predictor.predict(where, top_k=10)
        assert [r["file"] for r in found][:3] == paths[:3]
        assert found[0]["top_k"][0] == pytest.approx(records[0]["top_k"][0])
    assert len(unreadable) == 2  # the broken files are in the folder (and match the glob)
    missing = str(pathlib.Path(folder) / "missing.png")  # one file, not a folder to expand
    with pytest.raises(data_lib.DataError, match=r"None of the 1 image file\(s\) can be read: "
                       r".*missing.png: .*No such file"):  # fmt: skip
        digit_predictor.predict(missing)


def test_csv_columns_of_the_values_of_a_task_of_ones_own_are_named_when_known():
    """A vector of a task of one's own was ``probabilities_1`` .. ``_K`` in a CSV even when the
    run recorded the values' names: ``probabilities/<name>`` then; numbered without names, and
    for lists of another length or of records (classification's top-k)."""
    record = {"file": "a.png", "probabilities": [0.25, 0.75], "value": 0.5, "pair": [1, 2, 3]}
    assert flat(record) == {"file": "a.png", "probabilities_1": 0.25, "probabilities_2": 0.75,
                            "value": 0.5, "pair_1": 1, "pair_2": 2, "pair_3": 3}  # fmt: skip
    assert flat(record, names=["cat", "dog"]) == {
        "file": "a.png", "probabilities/cat": 0.25, "probabilities/dog": 0.75, "value": 0.5,
        "pair_1": 1, "pair_2": 2, "pair_3": 3,
    }  # fmt: skip
    top = {"top_k": [{"label": 1}, {"label": 0}]}
    assert flat(top, names=["cat", "dog"]) == {"top_k_1_label": 1, "top_k_2_label": 0}


def test_cli_writes_jsonl_and_csv_with_top_k(digits_run, digit_files, digit_records, tmp_path,
                                             capsys):  # fmt: skip
    """The CLI on a glob (100 digits and the two broken files): one jsonl record and one csv
    row per readable file, with 3 classes each, equal to the Predictor's."""
    paths, broken = digit_files
    folder = pathlib.Path(paths[0]).parent
    by_file = {r["file"]: r for r in digit_records[0]}
    for kind in ("jsonl", "csv"):
        out = tmp_path / f"preds.{kind}"
        argv = [f"--workdir={digits_run[0]}", f"--input={folder}/0*.png", f"--output={out}",
                "--top_k=3", "--batch_size=32"]  # fmt: skip
        assert main(argv) == 0
        err = capsys.readouterr().err
        assert all(f"skipped {path}: " in err for path in broken)
        assert "100/100 images" in err
        if kind == "jsonl":
            rows = [json.loads(line) for line in out.read_text().splitlines()]
            assert [r["file"] for r in rows] == paths[:100]
            for r in rows:
                want = by_file[r["file"]]
                assert r["top_k"] == pytest.approx(want["top_k"][:3])
                assert (r["label"], r["class_name"]) == (want["label"], want["class_name"])
        else:
            with out.open(newline="") as f:
                rows = list(csv.DictReader(f))
            assert [r["file"] for r in rows] == paths[:100]
            assert "top_k_3_probability" in rows[0] and "top_k_4_label" not in rows[0]
            for r in rows:
                want = by_file[r["file"]]["top_k"]
                assert [int(r[f"top_k_{k}_label"]) for k in (1, 2, 3)] == [
                    t["label"] for t in want[:3]
                ]
                assert float(r["top_k_2_probability"]) == pytest.approx(want[1]["probability"])


def _watch_batches(monkeypatch, look, stop: int | None = None) -> list:
    """Makes each batch of predictions call ``look()`` as it is predicted, before it goes
    on (the batch at index ``stop`` raises KeyboardInterrupt instead, a Ctrl-C); the list of
    what ``look`` returned."""
    rows, looks = Predictor._rows, []

    def watched(self, *args, **kwargs):
        for i, batch in enumerate(rows(self, *args, **kwargs)):
            looks.append(look())
            if i == stop:
                raise KeyboardInterrupt
            yield batch

    monkeypatch.setattr(Predictor, "_rows", watched)
    return looks


def test_cli_writes_each_batch_as_it_is_predicted(digits_run, digit_files, tmp_path,
                                                  monkeypatch, capsys):  # fmt: skip
    """Each batch's records are written as soon as it is predicted (all of them were held, and
    written after the last batch): a Ctrl-C midway leaves the records of the batches done,
    whole JSON lines (CSV rows), and no summary line; a JSON list, whole only at its end, is
    not left half written (an earlier one stays)."""
    folder = pathlib.Path(digit_files[0][0]).parent
    out = tmp_path / "p.jsonl"
    argv = [f"--workdir={digits_run[0]}", f"--input={folder}/0*.png", "--batch_size=32"]
    lines = lambda: len(out.read_text().splitlines()) if out.exists() else 0  # noqa: E731
    looks = _watch_batches(monkeypatch, lines)
    assert main([*argv, f"--output={out}"]) == 0
    assert looks == [0, 32, 64, 96]  # 100 readable files
    whole = out.read_text().splitlines()
    assert len(whole) == 100 and json.loads(capsys.readouterr().out)["records"] == 100
    for kind in ("jsonl", "csv"):
        out = tmp_path / f"stopped.{kind}"
        _watch_batches(monkeypatch, lines, stop=2)
        with pytest.raises(KeyboardInterrupt):
            main([*argv, f"--output={out}"])
        assert capsys.readouterr().out == ""  # the summary comes at the end only
        if kind == "jsonl":
            assert out.read_text().splitlines() == whole[:64]
        else:
            with out.open(newline="") as f:
                rows = list(csv.DictReader(f))
            assert [r["file"] for r in rows] == [json.loads(w)["file"] for w in whole[:64]]
    out = tmp_path / "p.json"
    monkeypatch.undo()  # not stopped
    assert main([*argv, f"--output={out}"]) == 0
    earlier = out.read_bytes()
    assert [r["file"] for r in json.loads(earlier)] == [json.loads(w)["file"] for w in whole]
    _watch_batches(monkeypatch, lines, stop=2)
    with pytest.raises(KeyboardInterrupt):
        main([*argv, f"--output={out}"])
    assert out.read_bytes() == earlier
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "p.json", "p.jsonl", "stopped.csv", "stopped.jsonl"
    ]  # fmt: skip


def test_cli_errors_are_one_line_naming_the_files(digits_run, digit_files, tmp_path, capsys):
    """No readable image (each named with its reason), or no run: one error line, status 1."""
    _, broken = digit_files
    out = tmp_path / "p.jsonl"
    assert main([f"--workdir={digits_run[0]}", f"--input={broken[0]}", f"--output={out}"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: None of the 1 image file(s) can be read: {broken[0]}: ")
    assert "\n" not in err and not out.exists()
    missing = tmp_path / "no_run"
    assert main([f"--workdir={missing}", f"--input={broken[0]}", f"--output={out}"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and str(missing) in err and "\n" not in err
    blocked = tmp_path / "a_file"
    blocked.write_text("")
    with pytest.raises(SystemExit):  # before predicting, not after
        main([f"--workdir={digits_run[0]}", f"--input={broken[0]}", f"--output={blocked}/p.csv"])
    assert f"{blocked} is not a folder" in capsys.readouterr().err
    new = tmp_path / "new" / "deeper" / "p.csv"  # a failed prediction leaves no empty folder
    assert main([f"--workdir={digits_run[0]}", f"--input={broken[0]}", f"--output={new}"]) == 1
    assert not (tmp_path / "new").exists()
    for flag in ("--top_k=0", "--batch_size=0", "--batch_size=-3"):  # were tracebacks
        with pytest.raises(SystemExit):
            main([f"--workdir={digits_run[0]}", f"--input={broken[0]}", f"--output={out}", flag])
        name, value = flag.split("=")
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert last.endswith(f"{name} must be at least 1, got {value}.")


def test_an_output_url_is_a_usage_error(tmp_path, monkeypatch, capsys):
    """--output gs://... (and --draw): refused before anything is read, as export's, not
    written into a local folder gs:/... (abspath collapsed the URL's //)."""
    monkeypatch.chdir(tmp_path)
    for flags in (["--output=gs://b/p.jsonl"], ["--output=p.jsonl", "--draw=gs://b/drawn"]):
        with pytest.raises(SystemExit):
            main(["--workdir=run", f"--input={tmp_path}", *flags])
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert "is written to a local folder, not a URL: write it locally and copy it" in last
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow  # trains a segmentation run of its own: over 30 s on 2 cores
def test_segmentation_writes_label_maps_of_the_eval_argmax(tmp_path_factory, capsys,
                                                          monkeypatch):  # fmt: skip
    """A segmentation run's predict: one PNG label map per image equal to the argmax of the
    model on the eval pipeline's batch of that image (a 45x29 image: the argmax of those 16x16
    logits resized as torch's bilinear interpolate resizes them), and an index whose class
    fractions are those of the PNG, each batch's written as soon as it is predicted;
    predict_arrays gives the 16x16 maps."""
    import torch

    workdir = tmp_path_factory.mktemp("seg_run")
    steps = {"total_steps": 10, "checkpoint_every_steps": 10, "log_every_steps": 10}
    config = seg_config(**steps, **{"optimizer.learning_rate": 0.1})
    train_and_evaluate(config, str(workdir), arrays=ARRAYS)
    images, _ = ARRAYS["test"]
    names = list(config.data.class_names)
    source = data_lib.from_arrays(images, np.zeros(images.shape[:3], np.uint8), names,
                                  target="label_map")  # fmt: skip
    want = list(_eval_outputs(workdir, source, 8).argmax(-1))
    richest = max(range(len(want)), key=lambda i: len(np.unique(want[i])))
    large = np.asarray(Image.fromarray(images[richest]).resize((29, 45), Image.BILINEAR))
    one = data_lib.from_arrays(large[None], np.zeros((1, 45, 29), np.uint8), names,
                               target="label_map")  # fmt: skip
    small = torch.from_numpy(np.asarray(_eval_outputs(workdir, one, 8)[0], np.float32))
    resized = torch.nn.functional.interpolate(small.permute(2, 0, 1)[None], size=(45, 29),
                                              mode="bilinear", align_corners=False)  # fmt: skip
    want.append(resized[0].argmax(0).numpy())

    folder = tmp_path_factory.mktemp("seg_images")
    paths = [str(folder / f"{i:02d}.png") for i in range(len(images))]
    for path, image in zip(paths, images, strict=True):
        Image.fromarray(image).save(path)
    paths.append(str(folder / "large.png"))
    Image.fromarray(large).save(paths[-1])
    out = tmp_path_factory.mktemp("seg_out") / "preds.jsonl"
    written = lambda: (len(list(out.with_suffix("").glob("*.png"))),  # noqa: E731
                       len(out.read_text().splitlines()) if out.exists() else 0)  # fmt: skip
    looks = _watch_batches(monkeypatch, written)
    assert main([f"--workdir={workdir}", f"--input={folder}", f"--output={out}"]) == 0
    assert looks == [(0, 0), (16, 16)]  # each batch's maps and records written as it came
    assert f"{len(paths)}/{len(paths)} images" in capsys.readouterr().err
    index = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["file"] for r in index] == paths
    assert len({int(c) for m in want for c in np.unique(m)}) >= 2  # not a constant model
    arrays = Predictor(workdir).predict_arrays(images)["label_map"]
    np.testing.assert_array_equal(arrays, np.stack(want[:-1]))
    for record, expected in zip(index, want, strict=True):
        png = Image.open(record["label_map"])
        assert png.mode == "P" and png.getpalette()[:9] == [0, 0, 0, 128, 0, 0, 0, 128, 0]
        label_map = np.asarray(png)
        np.testing.assert_array_equal(label_map, expected)
        counts = np.bincount(label_map.ravel(), minlength=len(names)) / label_map.size
        assert list(record["class_fractions"]) == names
        np.testing.assert_allclose(list(record["class_fractions"].values()), counts)
    inside = folder / "preds.jsonl"  # its label maps in folder/preds/: a rerun leaves them out
    for _ in range(2):
        assert main([f"--workdir={workdir}", f"--input={folder}", f"--output={inside}"]) == 0
        assert [json.loads(line)["file"] for line in inside.read_text().splitlines()] == paths
    beside = f"{folder}.jsonl"  # label maps would go into the input folder itself
    with pytest.raises(SystemExit):
        main([f"--workdir={workdir}", f"--input={folder}", f"--output={beside}"])
    error = capsys.readouterr().err
    assert f"--input {folder} lies in {folder}, where this command writes" in error

    from vision_jax import tasks
    from vision_jax.weights.run_dir import META_FILE

    monkeypatch.setattr(tasks, "TASKS", dict(tasks.TASKS))  # a subclass of one's own, renamed:
    tasks.register_task(type("MySeg", (tasks.Segmentation,), {"name": "my_seg"}))  # as its base
    meta = workdir / "checkpoints" / "10" / META_FILE
    meta.write_text(meta.read_text().replace('"name": "segmentation"', '"name": "my_seg"'))
    renamed = tmp_path_factory.mktemp("seg_out") / "mine.jsonl"
    assert main([f"--workdir={workdir}", f"--input={folder}", f"--output={renamed}"]) == 0
    lines = renamed.read_text().splitlines()  # (folder/preds' PNGs are inputs here too)
    assert len(list(renamed.with_suffix("").glob("*.png"))) == len(lines) >= len(paths)


@pytest.mark.parametrize(
    "small, size, classes, scale",
    [((16, 16), (48, 32), 5, 3), ((20, 24), (7, 9), 3, 3), ((8, 8), (8, 8), 4, 3),
     ((9, 5), (700, 2000), 16, 3), ((12, 12), (40, 40), 4, 100)],
)  # fmt: skip
def test_label_maps_are_the_argmax_of_logits_resized_as_torch_does(small, size, classes, scale):
    """predict's full-size label map equals torch's ``interpolate(logits, bilinear,
    align_corners=False).argmax`` (mmseg's and Hugging Face's post-processing), from the
    log-probabilities; up, down, the same size, and a large image resized in bands; logit gaps
    of hundreds too (where probabilities underflow to 0)."""
    import torch

    from vision_jax.predict import upsampled_argmax

    rng = np.random.default_rng(sum(size))
    logits = rng.normal(0, scale, (*small, classes)).astype(np.float32)
    nchw = torch.from_numpy(logits).permute(2, 0, 1)[None]
    resized = torch.nn.functional.interpolate(nchw, size=size, mode="bilinear",
                                              align_corners=False)  # fmt: skip
    want = resized[0].argmax(0).numpy()
    got = upsampled_argmax(np.asarray(jax.nn.log_softmax(logits)), size)
    assert got.dtype == np.uint8 and got.shape == size
    assert (got != want).mean() < 1e-4  # float32 rounding may flip an exact near-tie
    assert len(np.unique(want)) == classes


def test_label_map_colours_are_pascal_vocs():
    """The label maps' palette is VOC's (as in its SegmentationClass PNGs): person (15) pink,
    the ignored 255 cream."""
    colours = np.reshape(voc_palette(), (256, 3))
    assert colours[:5].tolist() == [[0, 0, 0], [128, 0, 0], [0, 128, 0], [128, 128, 0], [0, 0, 128]]
    assert colours[15].tolist() == [192, 128, 128] and colours[255].tolist() == [224, 224, 192]
    assert len({tuple(c) for c in colours}) == 256


def test_a_classification_output_named_after_its_input_folder(digits_run, digit_files, tmp_path):
    """``--input=photos --output=photos.jsonl``: a classification run writes no images, so
    nothing in photos/ is left out (every file was, as if it were the run's own label maps)."""
    paths, broken = digit_files
    folder = tmp_path / "photos"
    folder.mkdir()
    for path in paths[:5]:
        (folder / pathlib.Path(path).name).write_bytes(pathlib.Path(path).read_bytes())
    out = tmp_path / "photos.jsonl"
    assert main([f"--workdir={digits_run[0]}", f"--input={folder}", f"--output={out}"]) == 0
    assert len(out.read_text().splitlines()) == 5


DOGS = range(24, 30)  # Tiny-ImageNet's 6 dog breeds in its sorted WordNet ids (n02085620 ..)


def test_pretrained_file_predicts_as_timm(shared_dir, timm, tmp_path, capsys):
    """``--weights`` with the ViT-Ti/16 timm file (a 200-way Tiny-ImageNet head) on two
    Imagenette English springer images and two 32 px CIFAR-10 images (enlarged 7.75x): the
    probabilities of timm's own model and evaluation transform for the file (resize 224 / 0.9
    = 248 bicubic, centre 224 crop, mean = std = 0.5, on PIL's images as timm's loader reads
    them); and a dog breed comes first for both springers (the head has no springer class)."""
    import torch
    from safetensors.torch import load_file

    weights = shared_dir / "weights/vit_ti16/vit_tiny_patch16_224.safetensors"
    archives = {
        shared_dir / "data/imagenette_224_val/imagenette2_224_val.zip": "val/n02102040/",
        shared_dir / "data/cifar10_jpeg/cifar10_jpeg.zip": "test/ship/",
    }
    if not (weights.is_file() and all(a.is_file() for a in archives)):
        pytest.skip("the ViT-Ti/16 safetensors, Imagenette or CIFAR-10 archive is absent")
    paths = []
    for archive, folder in archives.items():
        with zipfile.ZipFile(archive) as z:
            for name in sorted(n for n in z.namelist() if n.startswith(folder))[1:3]:
                paths.append(str(tmp_path / f"{len(paths)}_{pathlib.Path(name).name}"))
                pathlib.Path(paths[-1]).write_bytes(z.read(name))

    out = tmp_path / "preds.json"
    argv = [f"--weights={weights}", "--model=vit_ti16", f"--input={tmp_path}/*_*",
            f"--output={out}", "--top_k=200"]  # fmt: skip
    assert main(argv) == 0
    records = json.loads(out.read_text())
    got = np.zeros((len(paths), 200))
    for row, r in zip(got, records, strict=True):
        row[[t["label"] for t in r["top_k"]]] = [t["probability"] for t in r["top_k"]]
    assert records[0]["class_name"].startswith("class_")

    model = timm.create_model("vit_tiny_patch16_224", num_classes=200, pretrained=False)
    model.load_state_dict(load_file(str(weights)), strict=True)
    config = timm.data.resolve_data_config({}, model=model)
    assert (config["crop_pct"], config["interpolation"]) == (0.9, "bicubic")
    transform = timm.data.create_transform(**config)
    inputs = torch.stack([transform(Image.open(p).convert("RGB")) for p in paths])
    with torch.no_grad():
        want = torch.softmax(model.eval()(inputs), -1).numpy()
    # PIL rounds its two passes with fixed-point weights: a level off at some ties (8e-4 here;
    # resizing in float without rounding between the passes was 0.055 off)
    np.testing.assert_allclose(got, want, atol=2e-3)
    assert all(r["label"] in DOGS for r in records[:2]), [r["top_k"][:3] for r in records]
    with pytest.raises(SystemExit):  # a usage error, one line
        main([*argv, "--class_names=a,b,c"])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.endswith("classifies 200 classes; got 3 class names.")


def test_image_files_of_a_folder_tree_a_glob_and_a_file(tmp_path, caplog):
    """A folder is listed with its subfolders, without hidden files and folders (macOS's
    ``._`` copies, ``.git``), as training's listings; ``**`` globs reach any depth. Files
    without an image extension are named; an existing file is itself, whatever its name
    holds (``[1]`` is not read as a glob)."""
    for name in ("a.jpg", "sub/b.PNG", "sub/deep/c.webp", "._a.jpg", "sub/.d.jpg", ".git/e.jpg",
                 "notes.txt"):  # fmt: skip
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    expected = [str(tmp_path / n) for n in ("a.jpg", "sub/b.PNG", "sub/deep/c.webp")]
    with caplog.at_level(logging.WARNING):
        assert image_files(str(tmp_path)) == expected
    elsewhere = tmp_path.with_name(tmp_path.name + "_elsewhere")
    (elsewhere / "z").mkdir(parents=True)
    (elsewhere / "z" / "f.jpg").write_bytes(b"")
    (tmp_path / "sub" / "linked").symlink_to(elsewhere, target_is_directory=True)
    linked = str(tmp_path / "sub" / "linked" / "z" / "f.jpg")  # followed, as training follows
    assert image_files(str(tmp_path)) == sorted([*expected, linked])
    (tmp_path / "sub" / "linked").unlink()
    assert f"Left out 1 file(s) of {tmp_path} without an image extension (.jpg" in caplog.text
    assert image_files(str(tmp_path / "**" / "*.webp")) == expected[2:]
    assert image_files(str(tmp_path / "a.jpg")) == expected[:1]
    (tmp_path / "img[1].jpg").write_bytes(b"")
    assert image_files(str(tmp_path / "img[1].jpg")) == [str(tmp_path / "img[1].jpg")]
    with pytest.raises(FileNotFoundError, match="No image files"):
        image_files(str(tmp_path / "sub" / "*.gif"))
    # A path that does not exist says so (it said "No image files (...) at '...'")
    with pytest.raises(FileNotFoundError, match=r"^'\S+/nowhere' does not exist \(an image file"):
        image_files(str(tmp_path / "nowhere"))


def test_a_folder_and_a_glob_of_it_list_the_same_files(tmp_path, caplog):
    """TIFFs (which the decoder reads) are listed in a folder as a ``**`` glob lists them (a
    folder left them out, a glob took them; a folder of TIFFs alone had "No image files"); a
    glob leaves out a file without an image extension as a folder does."""
    for name in ("a.tif", "sub/b.TIFF", "notes.txt"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    want = [str(tmp_path / "a.tif"), str(tmp_path / "sub" / "b.TIFF")]
    with caplog.at_level(logging.WARNING):
        assert image_files(str(tmp_path)) == image_files(str(tmp_path / "**" / "*")) == want
    assert caplog.text.count("Left out 1 file(s) of") == 2 and "notes.txt" in caplog.text


def test_output_names_of_files_with_the_same_stem_never_collide():
    """``a.jpg``, ``a.png`` and ``a_2.jpg`` in one folder: three label maps (or drawings),
    none written over another, each file keeping its own name where it is free."""
    from vision_jax.predict import unique_pngs

    names = unique_pngs(["in/a.jpg", "in/a.png", "in/a_2.jpg", "in/sub/a.jpg"], "out")
    assert names == ["out/a.png", "out/a_3.png", "out/a_2.png", "out/a_4.png"]
    assert unique_pngs(["a_2.jpg", "a.jpg", "a.png"], "o") == ["o/a_2.png", "o/a.png", "o/a_3.png"]


def test_drawn_detections_show_the_pixels_the_model_read(tmp_path):
    """A 16-bit grey PNG is drawn as the model reads it (value // 256, grey to RGB), not as
    PIL's RGB conversion clips it (almost white), with the box outlined in its colour."""
    from vision_jax.predict import PALETTE, draw_detections

    grey = np.random.default_rng(0).integers(0, 256, (40, 30), np.uint16) * 257 + 3
    Image.fromarray(grey).save(tmp_path / "deep.png")
    box = {"bbox": [4.0, 5.0, 10.0, 8.0], "score": 0.9, "category_id": 1, "category_name": "a"}
    draw_detections(str(tmp_path / "deep.png"), [box], str(tmp_path / "drawn.png"), 0.5)
    drawn = np.asarray(Image.open(tmp_path / "drawn.png"))
    want = np.repeat((grey // 256).astype(np.uint8)[..., None], 3, axis=-1)
    assert drawn.shape == want.shape
    untouched = np.ones(grey.shape, bool)
    untouched[3:22] = False  # the outline (2 px) and its label's text
    np.testing.assert_array_equal(drawn[untouched], want[untouched])
    assert tuple(drawn[12, 8]) == PALETTE[1]  # the box's lower edge: rows 5..12


def test_a_whole_pixel_box_is_drawn_on_the_pixels_it_covers(tmp_path):
    """[x, y, w, h] = [5, 8, 24, 32] covers columns 5..28 and rows 8..39: its outline is drawn
    there (inward), not one pixel outside at column 29 or row 40."""
    from vision_jax.predict import PALETTE, draw_detections

    Image.fromarray(np.zeros((60, 60, 3), np.uint8)).save(tmp_path / "black.png")
    box = {"bbox": [5, 8, 24, 32], "score": 0.9, "category_id": 2, "category_name": ""}
    draw_detections(str(tmp_path / "black.png"), [box], str(tmp_path / "drawn.png"), 0.5)
    drawn = np.asarray(Image.open(tmp_path / "drawn.png"))
    colour, black = np.array(PALETTE[2]), np.zeros(3)
    below_label = slice(25, 40)  # rows under the label, down to the lower edge
    np.testing.assert_array_equal(drawn[below_label, [5, 28]], np.broadcast_to(colour, (15, 2, 3)))
    np.testing.assert_array_equal(drawn[below_label, [4, 29]], np.broadcast_to(black, (15, 2, 3)))
    np.testing.assert_array_equal(drawn[[8, 39], 15], [colour, colour])
    np.testing.assert_array_equal(drawn[[7, 40], 15], [black, black])


def test_box_edges_round_half_up_and_a_non_finite_box_is_not_drawn():
    """A box's edges round half up: the same 3-pixel-wide box at x 2.5 and 3.5 covers 3 pixels
    both times (Python's half-to-even round made it 4 and 2); a NaN or infinite coordinate
    leaves that box out (int() of it stopped the drawing)."""
    from vision_jax.drawing import box_pixels, draw_boxes

    assert box_pixels([2.5, 0.5, 3, 3]) == (3, 1, 5, 3)
    assert box_pixels([3.5, 1.5, 3, 3]) == (4, 2, 6, 4)
    image = np.zeros((20, 20, 3), np.uint8)
    box = ([2.0, 2.0, 10.0, 10.0], (255, 0, 0), "a")
    want = draw_boxes(image, [box])
    for bad in ([np.nan, 1, 4, 4], [1, 1, np.inf, 4], [1, -np.inf, 4, 4]):
        got = draw_boxes(image, [(bad, (0, 255, 0), "b"), box])
        np.testing.assert_array_equal(got, want)


def test_a_label_under_a_box_at_the_bottom_edge_is_drawn_inside_it():
    """A label drawn under its box (the report's ground truth) was cut off when the box reached
    the image's bottom: it is drawn inside the box's bottom-left corner there."""
    from vision_jax.drawing import draw_boxes

    image = np.zeros((40, 40, 3), np.uint8)
    colour = (0, 255, 0)
    box = ([4.0, 4.0, 30.0, 36.0], colour, "dog")  # rows 4..39: no room under it
    drawn = draw_boxes(image, [box], width=1, label_below=True)
    assert (drawn[6:39, 6:33, 1] > 0).sum() > 10  # the label's (antialiased) pixels, inside
    room = draw_boxes(image, [([4.0, 4.0, 30.0, 12.0], colour, "dog")], width=1, label_below=True)
    assert (room[17:, 5:34, 1] > 0).sum() > 10  # under the box, where it fits


def _drawn_label(tmp_path, name: str) -> np.ndarray:
    """A black 40 x 60 PNG drawn with one box labelled ``name``."""
    from vision_jax.predict import draw_detections

    Image.fromarray(np.zeros((40, 60, 3), np.uint8)).save(tmp_path / "black.png")
    box = {"bbox": [2.0, 2.0, 50.0, 30.0], "score": 0.9, "category_id": 1, "category_name": name}
    draw_detections(str(tmp_path / "black.png"), [box], str(tmp_path / f"{name}.png"), 0.5)
    return np.asarray(Image.open(tmp_path / f"{name}.png"))


def test_draw_threshold_says_what_it_does():
    """``--draw_threshold`` in ``--help``: the boxes drawn score at least it, 0.5 by default."""
    from vision_jax.predict import _parser

    help_text = " ".join(_parser().format_help().split())
    want = "--draw_threshold DRAW_THRESHOLD detection: --draw draws the boxes scoring at least "
    assert want + "this (inclusive; default 0.5)" in help_text


def test_drawn_labels_show_accented_letters(tmp_path):
    """Labels differing by one accented letter are drawn differently (Pillow's default font drew
    é and ü as the same box)."""
    assert (_drawn_label(tmp_path, "café") != _drawn_label(tmp_path, "cafü")).any()


def test_drawn_labels_the_font_lacks_are_class_ids(tmp_path):
    """A class name the label font cannot draw (猫: drawn as the same empty box as 犬) is
    labelled by its category_id, as the records name it; predict's drawings make one choice
    for all of them."""
    from vision_jax.predict import _draw_all

    assert (_drawn_label(tmp_path, "猫") == _drawn_label(tmp_path, "#1")).all()
    assert (_drawn_label(tmp_path, "café") != _drawn_label(tmp_path, "#1")).any()
    box = {"bbox": [2.0, 2.0, 50.0, 30.0], "score": 0.9, "category_id": 1,
           "file_name": str(tmp_path / "black.png")}  # fmt: skip
    boxes = [{**box, "category_name": "a"}, {**box, "category_id": 2, "category_name": "犬"}]
    boxes[1]["score"] = 0.3  # not drawn
    _draw_all(boxes[:1], {box["file_name"]: str(tmp_path / "a.png")}, [], 0.5)
    _draw_all(boxes, {box["file_name"]: str(tmp_path / "b.png")}, [], 0.5)
    assert (np.asarray(Image.open(tmp_path / "a.png")) != _drawn_label(tmp_path, "#1")).any()
    assert (np.asarray(Image.open(tmp_path / "b.png")) == _drawn_label(tmp_path, "#1")).all()


@pytest.fixture(scope="module")
def ema_run(tmp_path_factory) -> tuple[pathlib.Path, dict]:
    """A digits run that keeps an EMA of its parameters and selects its best step on the EMA's
    validation (``val_ema/top1``)."""
    from test_train import small_config

    workdir = tmp_path_factory.mktemp("ema_run")
    config = small_config(total_steps=6, eval_every_steps=3, checkpoint_every_steps=3,
                          ema_decay=0.7, **{"optimizer.learning_rate": 0.1})  # fmt: skip
    config.data.train_split, config.data.val_split = "train[:90%]", "train[90%:]"
    config.early_stopping.metric = "val_ema/top1"
    return workdir, train_and_evaluate(config, str(workdir))


def test_a_workdir_with_only_its_best_checkpoint_reads_it(ema_run, tmp_path):
    """A workdir whose step checkpoints were deleted to save space (``best`` kept) loads,
    predicts and reports from its best step, as ``--which=best`` would."""
    from vision_jax.weights.run_dir import latest_step_dir

    workdir, _ = ema_run
    kept = tmp_path / "run"
    shutil.copytree(workdir, kept, ignore=lambda d, names: ["checkpoints"] * (d == str(workdir)))
    assert (
        latest_step_dir(kept)
        == latest_step_dir(kept, "best")
        == (kept / latest_step_dir(workdir, "best").relative_to(workdir))
    )
    want = load_trained(workdir, which="best").variables
    got = load_trained(kept, which="latest").variables
    jax.tree.map(np.testing.assert_array_equal, got, want)
    (kept / "checkpoints").mkdir()  # emptied rather than removed: the same
    assert latest_step_dir(kept) == latest_step_dir(kept, "best")


def test_ema_parameters_predict_as_the_runs_ema_evaluation(ema_run, tmp_path):
    """A run selected on its EMA's validation predicts, reports and exports with the EMA
    parameters by default (``--no-ema``: the trained ones): predict's fraction correct on the
    eval split's files is the run's ``eval_ema/top1`` (of its best step), with --no-ema its
    ``eval/top1``; the variables are the checkpoint's EMA parameters, not its parameters."""
    from vision_jax.weights.run_dir import latest_step_dir, restore_on_one_device

    workdir, result = ema_run
    source = data_lib.digits("test")
    rgb = np.repeat(source.columns["image"], 3, -1)
    saved = restore_on_one_device(latest_step_dir(workdir, "best") / "state")
    correct = {}
    for ema in (None, True, False):
        predictor = Predictor(workdir, ema=ema, batch_size=48)
        labels = predictor.predict_arrays(rgb)["probabilities"].argmax(-1)
        correct[ema] = np.mean(labels == source.columns["label"])
        kernel = load_trained(workdir, ema=ema).variables["params"]["head"]["kernel"]
        want = saved["params" if ema is False else "ema_params"]["head"]["kernel"]
        np.testing.assert_array_equal(kernel, want)
    assert not np.allclose(saved["params"]["head"]["kernel"], saved["ema_params"]["head"]["kernel"])
    for ema, key in ((True, "ema_model_state"), (False, "model_state")):  # BatchNorm statistics
        stats = load_trained(workdir, ema=ema).variables["batch_stats"]
        saved_stats = saved[key]["batch_stats"]
        for name, value in flatten_dict(stats).items():
            np.testing.assert_array_equal(value, flatten_dict(saved_stats)[name])
    assert correct[None] == correct[True] == pytest.approx(result["eval_ema/top1"], abs=1e-6)
    assert correct[False] == pytest.approx(result["eval/top1"], abs=1e-6)
    assert load_trained(workdir).ema and not load_trained(workdir, ema=False).ema
    from_run = weights.read_variables(workdir, load_trained(workdir).model)  # init.path's reader
    np.testing.assert_array_equal(
        from_run["params"]["head"]["kernel"], saved["ema_params"]["head"]["kernel"]
    )
    assert export_main(["--workdir", str(workdir), "--format", "stablehlo", "--output",
                        str(tmp_path)]) == 0  # fmt: skip
    manifest = json.loads((tmp_path / "export.json").read_text())
    assert manifest["source"]["parameters"] == "ema"


def test_ema_parameters_of_a_run_without_them_are_an_error(digits_run, digit_files, tmp_path,
                                                           capsys):  # fmt: skip
    from vision_jax.weights import WeightFormatError

    assert not load_trained(digits_run[0]).ema  # selected on nothing: the trained parameters
    with pytest.raises(WeightFormatError, match="holds no EMA parameters: the run did not set "):
        _ = load_trained(digits_run[0], ema=True).variables
    out = tmp_path / "p.jsonl"
    argv = ["--workdir", str(digits_run[0]), "--input", digit_files[0][0], "--output", str(out)]
    assert main([*argv, "--ema"]) == 1
    assert "holds no EMA parameters" in capsys.readouterr().err
    weights = ["--weights", "w.npz", "--model", "vit_ti16", "--input", digit_files[0][0],
               "--output", str(out)]  # fmt: skip
    with pytest.raises(SystemExit):
        main([*weights, "--no-ema"])
    assert "--ema pick the parameters of --workdir" in capsys.readouterr().err


class FixedPredictor:
    """A stand-in for a segmentation (or detection) run's Predictor, without a model to
    compile: each readable file's label map is all class 1 (its detection one box), two files a
    batch; ``batches`` counts the batches predicted."""

    class_names, category_ids = ["background", "thing"], [1, 2]
    value_names = None  # a library task's

    def __init__(self, task: str = "segmentation"):
        from vision_jax.tasks import Detection, Segmentation

        self.task = Segmentation() if task == "segmentation" else Detection()
        self.batches = 0

    def iter_predict(self, paths, *, top_k, progress, unreadable):
        from vision_jax.predict import decoded_sizes, segmentation_record

        files, skipped = decoded_sizes(paths)
        unreadable += skipped
        scores = np.broadcast_to(np.float32([0.2, 0.8]), (4, 4, 2))
        for start in range(0, len(files), 2):
            self.batches += 1
            batch = files[start : start + 2]
            if isinstance(self.task, Segmentation):
                yield [segmentation_record(p, scores, size, self.class_names) for p, size in batch]
            else:
                yield [{"file_name": p, "image_id": start + i + 1, "category_id": 2, "score": 0.9,
                        "category_name": "thing", "bbox": [1.0, 1.0, 4.0, 4.0]}
                       for i, (p, _) in enumerate(batch)]  # fmt: skip


def _images(folder: pathlib.Path, *names: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        Image.fromarray(np.full((6, 5, 3), 40 * i, np.uint8)).save(folder / name)


def _pngs(folder: pathlib.Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))


def test_predict_never_replaces_a_file_it_did_not_write(tmp_path, monkeypatch, capsys):
    """``--output=root/test/masks.jsonl`` beside root/test/masks/<stem>.png, the ground truth
    of the documented layout: refused in one line naming the folder and the file, before any
    label map or record is written (the masks were overwritten). A rerun replaces the label
    maps it wrote and removes none (another run's into the same folder stay); a marker entry
    outside the folder is not taken; ``--draw`` the same."""
    fixed = FixedPredictor()
    monkeypatch.setattr("vision_jax.predict._predictor", lambda args, parser: fixed)
    images, masks = tmp_path / "test" / "images", tmp_path / "test" / "masks"
    _images(images, "a.png", "b.png", "c.png")
    _images(masks, "b.png")
    truth = (masks / "b.png").read_bytes()
    records = tmp_path / "test" / "masks.jsonl"
    records.write_text("earlier\n")
    argv = ["--workdir=run", f"--input={images}"]
    assert main([*argv, f"--output={records}"]) == 1
    error = capsys.readouterr().err.strip()
    assert error == (f"error: --output {records}: {masks} holds b.png, which its marker "
                     "(.vision_jax_predict.json) does not list as predict's: choose another "
                     "folder, or remove the file (predict replaces only files it "
                     "wrote).")  # fmt: skip
    assert (masks / "b.png").read_bytes() == truth and _pngs(masks) == ["b.png"]
    assert records.read_text() == "earlier\n"
    out = tmp_path / "preds.jsonl"
    assert main([*argv, f"--output={out}"]) == 0
    assert _pngs(tmp_path / "preds") == ["a.png", "b.png", "c.png"]
    assert main(["--workdir=run", f"--input={images / 'a.png'}", f"--output={out}"]) == 0
    assert _pngs(tmp_path / "preds") == ["a.png", "b.png", "c.png"]  # none removed
    (tmp_path / "victim.txt").write_text("mine")
    marker = tmp_path / "preds" / ".vision_jax_predict.json"
    marker.write_text(json.dumps(["a.png", "../victim.txt", str(tmp_path / "victim.txt")]))
    assert main([*argv, f"--output={out}"]) == 1  # b.png: not listed any more
    assert "preds holds b.png, which its marker" in capsys.readouterr().err
    assert (tmp_path / "victim.txt").read_text() == "mine"

    detector = FixedPredictor("detection")
    monkeypatch.setattr("vision_jax.predict._predictor", lambda args, parser: detector)
    drawn = tmp_path / "drawn"
    assert main([*argv, f"--output={tmp_path / 'boxes.json'}", f"--draw={drawn}"]) == 0
    assert _pngs(drawn) == ["a.png", "b.png", "c.png"]
    assert main([*argv, f"--output={tmp_path / 'boxes.json'}", f"--draw={masks}"]) == 1
    assert f"--draw: {masks} holds b.png" in capsys.readouterr().err
    assert (masks / "b.png").read_bytes() == truth


def test_output_paths_are_checked_before_predicting(tmp_path, monkeypatch, capsys):
    """``--draw`` an existing file, ``--output`` an existing folder, segmentation's label map
    folder an existing file: a one-line usage error before any prediction (they were
    tracebacks after predicting: FileExistsError, IsADirectoryError)."""
    _images(tmp_path / "images", "a.png")
    (tmp_path / "taken").write_text("mine")
    (tmp_path / "folder.jsonl").mkdir()
    argv = ["--workdir=run", f"--input={tmp_path / 'images'}"]
    cases = {
        "detection": [(f"--output={tmp_path / 'p.json'}", f"--draw={tmp_path / 'taken'}"),
                      (f"--output={tmp_path / 'folder.jsonl'}",)],
        "segmentation": [(f"--output={tmp_path / 'taken.jsonl'}",)],
    }  # fmt: skip
    wanted = [f"--draw: {tmp_path / 'taken'}, the folder for its PNGs, is a file.",
              f"--output {tmp_path / 'folder.jsonl'}: it is a folder; name a file.",
              f"--output {tmp_path / 'taken.jsonl'}: {tmp_path / 'taken'}, the "
              "folder for its PNGs, is a file."]  # fmt: skip
    for task, flags in ((t, f) for t, all_flags in cases.items() for f in all_flags):
        fixed = FixedPredictor(task)
        monkeypatch.setattr("vision_jax.predict._predictor", lambda args, parser: fixed)  # noqa: B023
        with pytest.raises(SystemExit) as stopped:
            main([*argv, *flags])
        assert stopped.value.code == 2 and fixed.batches == 0
        assert capsys.readouterr().err.strip().splitlines()[-1].endswith(wanted.pop(0))
    assert (tmp_path / "taken").read_text() == "mine"


def test_top_k_for_a_task_without_top_k_classes_is_a_usage_error(tmp_path, monkeypatch,
                                                                  capsys):  # fmt: skip
    """--top_k of a run of a task of one's own, or of segmentation, which write no top-k
    classes: one line, as --draw's for a task that is not detection (it was ignored)."""
    from own_task import DigitValue

    _images(tmp_path / "images", "a.png")
    argv = ["--workdir=run", f"--input={tmp_path / 'images'}", "--top_k=3"]
    own = FixedPredictor()
    own.task = DigitValue()
    for fixed, kind in ((own, "digit_value"), (FixedPredictor(), "segmentation")):
        monkeypatch.setattr("vision_jax.predict._predictor", lambda args, parser: fixed)  # noqa: B023
        with pytest.raises(SystemExit) as stopped:
            main([*argv, f"--output={tmp_path / 'p.jsonl'}"])
        assert stopped.value.code == 2 and fixed.batches == 0
        wanted = f"error: --top_k is for classification: run is a {kind} run."
        assert capsys.readouterr().err.strip().splitlines()[-1].endswith(wanted)
    assert not (tmp_path / "p.jsonl").exists()


def test_an_output_that_cannot_be_written_is_one_line_before_or_midway(
    tmp_path, monkeypatch, capsys
):
    """A read-only output folder is a usage error before anything is predicted (it was a
    chained OSError traceback after the first batch, leaving an empty file); a write that
    fails midway (a full disk: /dev/full) is one line, exit 1, saying the output is partial,
    why (the disk is full) and what to do, as a failed checkpoint save says."""
    import errno

    _images(tmp_path / "images", "a.png", "b.png", "c.png")
    argv = ["--workdir=run", f"--input={tmp_path / 'images'}"]
    fixed = FixedPredictor("segmentation")
    monkeypatch.setattr("vision_jax.predict._predictor", lambda args, parser: fixed)

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", kwargs.get("dir"))

    with monkeypatch.context() as m:
        m.setattr("vision_jax.output_errors.tempfile.TemporaryFile", read_only)
        with pytest.raises(SystemExit) as stopped:
            main([*argv, f"--output={tmp_path / 'ro' / 'p.jsonl'}"])
    assert stopped.value.code == 2 and fixed.batches == 0
    wanted = (f"--output {tmp_path / 'ro' / 'p.jsonl'}: cannot write in {tmp_path}: Read-only "
              "file system.")  # fmt: skip
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(wanted)
    assert not (tmp_path / "ro").exists()  # nothing made before predicting
    for kind in ("jsonl", "csv"):
        full = tmp_path / f"full.{kind}"
        full.symlink_to("/dev/full")
        assert main([*argv, f"--output={full}"]) == 1
        out, err = capsys.readouterr()
        assert out == "" and err.strip() == (
            f"error: cannot write {full} (the disk is full): No space left on device; the "
            f"predictions are incomplete: {full} holds only the records of the batches written "
            "before. Free space on the disk, then run the same command again."
        )  # the reason and what to do of a failed checkpoint save (the same table)


def _without_a_model(task) -> Predictor:
    """A Predictor of ``task`` (two classes, 8x8 input, batches of 32) without a model: for
    what happens before a batch is predicted."""
    predictor = Predictor.__new__(Predictor)
    predictor.task, predictor.batch_size, predictor.input = task, 32, data_lib.InputSpec(8)
    predictor.class_names, predictor.category_ids = ["a", "b"], [1, 2]
    return predictor


def test_a_batch_holds_no_more_than_the_images(digit_files, monkeypatch):
    """One image predicts in a batch of one, not padded to the batch size (16 forward passes
    for one image), from files, arrays or for detection; 3 images in a batch of 4 (powers of
    two: calls with other counts reuse a few compiled sizes); more images in batches of the
    batch size (segmentation's at most 256 MB of scores)."""
    from vision_jax.tasks import Classification, Detection

    class Batched(Exception):
        pass

    def batches(source, spec, *, global_batch, **kwargs):
        raise Batched(global_batch)

    monkeypatch.setattr(data_lib, "eval_batches", batches)
    paths, _ = digit_files
    seen = []
    for task, calls in [
        (Classification(), [lambda p: p.predict(paths[:1]), lambda p: p.predict(paths[:40]),
                            lambda p: p.predict_arrays(np.zeros((3, 8, 8), np.uint8))]),
        (Segmentation(), [lambda p: p.predict(paths[:2])]),
        (Detection(), [lambda p: p.predict(paths[:1])]),
    ]:  # fmt: skip
        for call in calls:
            with pytest.raises(Batched) as batched:
                call(_without_a_model(task))
            seen.append(batched.value.args[0])
    assert seen == [1, 32, 4, 2, 1]


def test_an_unreadable_file_has_the_same_reason_for_every_task(digit_files, tmp_path,
                                                               monkeypatch):  # fmt: skip
    """An empty file, a text file and a JPEG cut short: the reason is the pipeline decoder's
    for detection too (it was PIL's, reading the header: "cannot identify image file ...",
    "Truncated File Read")."""
    from vision_jax.tasks import Classification, Detection

    class Batched(Exception):
        pass

    def batches(source, spec, *, global_batch, **kwargs):
        raise Batched

    monkeypatch.setattr(data_lib, "eval_batches", batches)
    jpeg = io.BytesIO()
    Image.fromarray(np.full((32, 32, 3), 90, np.uint8)).save(jpeg, format="JPEG")
    broken = {"empty.jpg": b"", "text.png": b"not an image", "cut.jpg": jpeg.getvalue()[:300]}
    for name, data in broken.items():
        (tmp_path / name).write_bytes(data)
    paths = [digit_files[0][0], *(str(tmp_path / name) for name in broken)]
    reasons = []
    for task in (Classification(), Segmentation(), Detection()):
        unreadable = []
        with pytest.raises(Batched):
            next(_without_a_model(task).iter_predict(paths, unreadable=unreadable))
        reasons.append(unreadable)
    assert reasons[0] == reasons[1] == reasons[2] and len(reasons[0]) == 3
    assert reasons[0][0][1] == "not an image file of a known format"
    assert "jpeg::Uncompress failed" in reasons[0][2][1]


def test_a_file_gone_once_predicting_is_named_in_predicts_terms(digit_files, tmp_path,
                                                                monkeypatch):  # fmt: skip
    """A file read when predict began that is gone when its batch is read: an error naming it,
    saying so, without training's advice (data.skip_corrupt, a config key predict has not)."""
    from vision_jax import predict
    from vision_jax.tasks import Classification

    paths = [shutil.copy(p, tmp_path) for p in digit_files[0][:3]]
    listed = predict.decoded_sizes

    def then_gone(paths: list[str]):
        found = listed(paths)
        pathlib.Path(paths[1]).unlink()
        return found

    monkeypatch.setattr(predict, "decoded_sizes", then_gone)
    with pytest.raises(data_lib.DataError) as error:
        _without_a_model(Classification()).predict(paths)
    message = str(error.value)
    assert f"cannot read image {paths[1]}: " in message and "skip_corrupt" not in message
    assert message.endswith("It was read when predict began: it changed or went since; predict "
                            "stopped.")  # fmt: skip


def test_arrays_of_another_dtype_than_uint8_or_float_are_named(digit_files):
    """A uint16 array: an error naming its dtype and the two it may be (it said "Float images
    must lie in [0, 1]")."""
    from vision_jax.tasks import Classification

    with pytest.raises(data_lib.DataError, match=r"^Images must be uint8 \(0\.\.255\) or float "
                       r"in \[0, 1\]; got uint16\.$"):  # fmt: skip
        _without_a_model(Classification()).predict_arrays(np.full((2, 8, 8), 1000, np.uint16))


def test_class_names_given_as_one_string_are_refused(tmp_path):
    """from_weights(class_names="a,b"): refused before the file is read, not 3 classes."""
    with pytest.raises(ValueError, match=r"^class_names must be a sequence of names, got the "
                       r"string 'a,b'"):  # fmt: skip
        Predictor.from_weights(tmp_path / "none.safetensors", model="vit_ti16", class_names="a,b")


def test_a_batch_size_below_one_is_refused_at_once(tmp_path):
    """Predictor(batch_size=0 or -1) failed at the first batch (ZeroDivisionError, TF's
    InvalidArgumentError): refused before the run or the file is read."""
    for bad in (0, -1, 2.0):
        with pytest.raises(ValueError, match=rf"^batch_size must be an integer >= 1, got {bad}"):
            Predictor(tmp_path / "no_run", batch_size=bad)
        with pytest.raises(ValueError, match=rf"^batch_size must be an integer >= 1, got {bad}"):
            Predictor.from_weights(tmp_path / "none.npz", model="vit_ti16", batch_size=bad)


def test_one_image_without_its_batch_axis_is_refused(monkeypatch):
    """One [H, W, 3] image is refused, saying to add the batch axis (it was read as H grey
    images of W x 3 pixels: 32 predictions); [N, H, W] grey batches still predict."""
    from vision_jax.tasks import Classification

    def batches(source, spec, *, global_batch, **kwargs):
        raise AssertionError(f"{source.num_examples} images")

    monkeypatch.setattr(data_lib, "eval_batches", batches)
    predictor = _without_a_model(Classification())
    for shape in ((32, 32, 3), (32, 32, 1)):
        with pytest.raises(ValueError, match=r"one \[H, W, C\] image.*images\[None\]"):
            predictor.predict_arrays(np.zeros(shape, np.uint8))
    with pytest.raises(AssertionError, match="^2 images$"):
        predictor.predict_arrays(np.zeros((2, 8, 8), np.uint8))


def test_one_numpy_string_path_is_a_str_path():
    """A single np.str_ path came back as np.str_ (the list branch converts to str) and a 0-d
    string array was refused as pixels: both are one path, a str."""
    from vision_jax.predict import _listed

    for one in (np.str_("a.jpg"), np.array("a.jpg"), np.array(pathlib.Path("a.jpg"), object)):
        listed = _listed(one)
        assert listed == ["a.jpg"] and type(listed[0]) is str, (one, listed)
    with pytest.raises(TypeError, match="got a numpy.ndarray"):  # a 0-d array of a number
        _listed(np.array(3))


def test_predict_on_images_in_memory_points_to_predict_arrays(tmp_path):
    """predict(ndarray) said "expected str, bytes or os.PathLike object, not ndarray" and
    predict(PIL image) "'Image' object is not iterable": a TypeError naming predict_arrays;
    paths (a list of them, pathlib's included) are still read."""
    from vision_jax.tasks import Classification

    predictor = _without_a_model(Classification())
    pixels = np.zeros((2, 8, 8, 3), np.uint8)
    image = Image.fromarray(pixels[0])
    cases = ((pixels, r"a numpy\.ndarray"), (image, r"a PIL\."), (3, "an? int"),
             ([image], r"a list holding a PIL\."))  # fmt: skip
    for images, kind in cases:
        with pytest.raises(TypeError, match=rf"^predict takes image files .*got {kind}.*: "
                           "predict images in memory with predict_arrays"):  # fmt: skip
            predictor.predict(images)
    with pytest.raises(TypeError, match=r"got a list holding a int: "):  # an object array
        predictor.predict(np.array([3, "a.png"], object))
    assert predictor.predict([]) == ([], [])
    with pytest.raises(data_lib.DataError, match="None of the 1 image file"):  # a path: read
        predictor.predict([tmp_path / "none.png"])
    # An array of paths (a pandas Series of them too) is paths, not pixels.
    paths = [str(tmp_path / "none.png"), str(tmp_path / "nor.png")]

    class Series:  # pandas.Series' interface (pandas is not a dependency)
        dtype, ndim, shape = np.dtype(object), 1, (2,)

        def __iter__(self):
            return iter(paths)

    for listed in (np.array(paths), np.array(paths, object), Series()):
        with pytest.raises(data_lib.DataError, match="None of the 2 image file"):
            predictor.predict(listed)


def _sigterm() -> None:
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(5)  # the handler raises at once


def _ctrl_c() -> None:
    raise KeyboardInterrupt


@pytest.mark.parametrize("stop, name", [(_ctrl_c, "SIGINT"), (_sigterm, "SIGTERM")])
def test_a_stop_ends_the_command_with_one_line_and_its_status(
    tmp_path, monkeypatch, capsys, stop, name
):
    """Ctrl-C or SIGTERM while predicting: one line and status 128 + the signal (130 for Ctrl-C,
    as training's command at a second signal), not a KeyboardInterrupt traceback or (SIGTERM,
    Python's default) an end without a word; the records written stay."""
    from vision_jax import predict

    fixed = FixedPredictor()
    batches = fixed.iter_predict

    def stopped(*args, **kwargs):
        yield next(batches(*args, **kwargs))
        stop()

    monkeypatch.setattr(fixed, "iter_predict", stopped)
    monkeypatch.setattr(predict, "_predictor", lambda args, parser: fixed)
    _images(tmp_path / "images", "a.png", "b.png", "c.png")
    out = tmp_path / "p.jsonl"
    monkeypatch.setattr("sys.argv", ["predict", "--workdir=run", f"--input={tmp_path / 'images'}",
                                     f"--output={out}"])  # fmt: skip
    assert predict._command() == 128 + getattr(signal, name)
    assert capsys.readouterr().err.strip().splitlines() == [
        f"vision_jax.predict: interrupted ({name}); the output holds the batches written (a "
        ".json list only once whole)."
    ]  # fmt: skip
    assert len(out.read_text().splitlines()) == 2  # the first batch's
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
