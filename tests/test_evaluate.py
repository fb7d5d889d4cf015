"""Evaluating a trained run without training (``vision_jax.evaluate``): its figures equal numpy's
on the model's own outputs, on the run's eval split, another split, at another input size (a ViT's
position embeddings resampled as scipy does) and for detection pycocotools' on its detections."""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import os

import jax
import numpy as np
import pytest
import scipy.ndimage
from test_train import small_config

from vision_jax import data as data_lib
from vision_jax.evaluate import evaluate_run
from vision_jax.evaluate import main as evaluate_main
from vision_jax.train import train_and_evaluate
from vision_jax.trained import load_trained
from vision_jax.trees import flatten_dict, unflatten_dict

POSEMB = "params/Transformer/posembed_input/pos_embedding"


def _numpy_figures(model, variables, source, input_spec) -> dict[str, float]:
    """Top-1 accuracy and mean cross-entropy of ``model`` on every example of ``source``,
    through the evaluation pipeline's images, computed here in numpy."""
    images, labels = [], []
    for batch in data_lib.eval_batches(source, input_spec, global_batch=50):
        keep = batch["mask"] > 0
        images.append(batch["image"][keep])
        labels.append(batch["label"][keep])
    labels = np.concatenate(labels)
    logits = np.asarray(model.apply(variables, np.concatenate(images), train=False), np.float64)
    logits -= logits.max(-1, keepdims=True)
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    return {
        "eval/top1": float((log_probs.argmax(-1) == labels).mean()),
        "eval/loss": float(-log_probs[np.arange(len(labels)), labels].mean()),
        "eval/examples": float(len(labels)),
    }


def _assert_figures(got: dict[str, float], want: dict[str, float]) -> None:
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=2e-5), key


def test_a_run_evaluated_again_gives_its_final_figures(digits_run):
    workdir, final, _ = digits_run
    got = evaluate_run(workdir)
    trained = load_trained(workdir)
    source = data_lib.load_source(trained.spec.data, "test")
    want = _numpy_figures(trained.model, trained.variables, source, trained.input)
    _assert_figures(got, want)
    assert 0.2 < want["eval/top1"] < 0.99  # several classes predicted: a meaningful comparison
    for key in ("eval/top1", "eval/loss", "eval/examples"):
        assert got[key] == pytest.approx(final[key], abs=1e-5), key


def test_another_split_in_other_batches(digits_run):
    workdir, _, _ = digits_run
    got = evaluate_run(workdir, split="train[:100]", batch_size=16, which="latest")
    trained = load_trained(workdir)
    source = data_lib.load_source(trained.spec.data, "train[:100]")
    _assert_figures(got, _numpy_figures(trained.model, trained.variables, source, trained.input))
    assert got["eval/examples"] == 100


@pytest.mark.parametrize("grid", [None, (2, 2)])
def test_a_vit_at_another_size_has_its_position_embeddings_resampled(tmp_path, grid):
    """A ViT trained at 32 px (2x2 patches) evaluated at 48 px: its 2x2 position embeddings
    become 3x3, bilinearly with corners aligned (scipy's zoom of order 1, as ``init.path`` from
    a run resamples them); also where the run named its grid (``model.posemb_grid``)."""
    cfg = small_config(**{"model.name": "vit_ti16", "input.image_size": 32, "total_steps": 2})
    cfg.model.depth = 1
    cfg.model.posemb_grid = grid
    train_and_evaluate(cfg, str(tmp_path))
    trained = load_trained(tmp_path)
    flat = flatten_dict(trained.variables)
    posemb = np.asarray(flat[POSEMB])
    assert posemb.shape == (1, 5, 192)
    grid = scipy.ndimage.zoom(posemb[0, 1:].reshape(2, 2, 192), (1.5, 1.5, 1), order=1)
    flat[POSEMB] = np.concatenate([posemb[:, :1], grid.reshape(1, 9, 192)], axis=1)
    input_48 = dataclasses.replace(trained.input, image_size=48)
    source = data_lib.load_source(trained.spec.data, "test")
    model_48 = trained.model if grid is None else trained.model.clone(posemb_grid=(3, 3))
    want = _numpy_figures(model_48, unflatten_dict(flat), source, input_48)
    _assert_figures(evaluate_run(tmp_path, image_size=48), want)
    same = _numpy_figures(trained.model, trained.variables, source, trained.input)
    _assert_figures(evaluate_run(tmp_path, image_size=32), same)  # its own size: as trained
    assert want["eval/loss"] != pytest.approx(same["eval/loss"], abs=1e-3)  # another input


def test_command_line_prints_and_writes_the_figures(digits_run, tmp_path, capsys):
    workdir, final, _ = digits_run
    output = tmp_path / "metrics.json"
    assert evaluate_main([f"--workdir={workdir}", f"--output={output}"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    printed = json.loads(line)
    assert printed == json.loads(output.read_text())
    assert printed["eval/examples"] == 360
    assert printed["eval/top1"] == pytest.approx(final["eval/top1"], abs=1e-5)
    (tmp_path / "file").write_text("")
    through_a_file = (tmp_path / "file" / "m.json", f"{tmp_path / 'file'} is not a folder")
    for bad, why in ((tmp_path, "it is a folder"), through_a_file):
        assert evaluate_main([f"--workdir={workdir}", f"--output={bad}"]) == 1  # before evaluating
        assert why in capsys.readouterr().err
    # A folder that does not exist yet is made once the figures are written, as predict makes
    # its output's; an evaluation that fails leaves none behind.
    nested = tmp_path / "new" / "folder" / "metrics.json"
    assert evaluate_main([f"--workdir={workdir}", "--split=val", f"--output={nested}"]) == 1
    assert "not 'val'" in capsys.readouterr().err and not (tmp_path / "new").exists()
    assert evaluate_main([f"--workdir={workdir}", f"--output={nested}"]) == 0
    assert json.loads(nested.read_text()) == printed


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--split=validation"], "has splits 'train' and 'test', not 'validation'"),
        (["--ema"], "holds no EMA parameters"),
        (["--batch_size=12"], "batch_size 12 is not a positive multiple of the 8 devices"),
        (
            [],
            "The run's eval_batch_size 48 is not a positive multiple of the 7 devices: pass a "
            "batch size that is (--batch_size=49)",
        ),
    ],
)
def test_command_line_errors_are_one_line(digits_run, argv, message, capsys, monkeypatch):
    workdir, _, _ = digits_run
    if argv in (["--batch_size=12"], []):  # as if on 8 or 7 devices
        devices = 8 if argv else 7
        monkeypatch.setattr("vision_jax.sharding.data_parallel_size", lambda mesh: devices)
    assert evaluate_main([f"--workdir={workdir}", *argv]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("vision_jax.evaluate: error: ") and message in err
    assert "\n" not in err


def _image_folders(root, splits: dict[str, str]) -> None:
    """Image-folder splits under ``root``: two random 16 px PNGs per class (one letter each)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, classes in splits.items():
        for name in classes:
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(2):
                pixels = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")


def test_an_output_url_is_written_through_its_filesystem(tmp_path, monkeypatch, capsys):
    """--output gs://...: not checked as a local path, and written through etils.epath (here a
    stand-in bucket), not into a local folder gs:/... ."""
    from etils import epath

    from vision_jax import evaluate

    bucket = tmp_path / "bucket"
    monkeypatch.setattr(evaluate, "evaluate_run", lambda *a, **k: {"eval/accuracy": 0.5})
    monkeypatch.setattr(evaluate, "file_path",
                        lambda url: epath.Path(bucket / url.split("://")[1]))  # fmt: skip
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    assert evaluate_main(["--workdir=run", "--output=gs://b/eval/metrics.json"]) == 0
    assert json.loads((bucket / "b" / "eval" / "metrics.json").read_text()) == {
        "eval/accuracy": 0.5
    }
    assert os.listdir(tmp_path / "cwd") == []


def test_a_run_whose_dataset_moved_is_evaluated_from_its_new_root(tmp_path, digits_run, capsys):
    """--data_root (evaluate_run's data_root) replaces the run's recorded data.root: an
    image-folder dataset moved after its run is evaluated where it lies now, with the figures
    it gave before the move; a run of a source without a root refuses it in one line."""
    import shutil

    _image_folders(tmp_path / "data", {"train": "ab", "test": "ab"})
    cfg = small_config(**{"data.source": "imagefolder", "data.root": str(tmp_path / "data"),
                          "total_steps": 1, "batch_size": 4, "eval_batch_size": 4})  # fmt: skip
    train_and_evaluate(cfg, str(tmp_path / "run"))
    before = evaluate_run(tmp_path / "run")
    shutil.move(tmp_path / "data", tmp_path / "moved")
    with pytest.raises(data_lib.DataError, match="is not a folder"):
        evaluate_run(tmp_path / "run")
    assert evaluate_run(tmp_path / "run", data_root=tmp_path / "moved") == before
    argv = [f"--workdir={tmp_path / 'run'}", f"--data_root={tmp_path / 'moved'}"]
    assert evaluate_main(argv) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed == pytest.approx(before, rel=1e-5)  # (the line rounds to 6 digits)
    assert evaluate_main([f"--workdir={digits_run[0]}", f"--data_root={tmp_path}"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == (f"vision_jax.evaluate: error: data_root {tmp_path}: the run's data.source "
                   "'digits' is not read from a data.root (those of 'imagefolder', 'csv', "
                   "'idx', 'coco' are).")  # fmt: skip


@pytest.mark.slow
def test_a_split_lacking_a_class_is_scored_with_the_runs_labels(tmp_path, caplog):
    """A test folder without one of train's classes (small test sets): its labels are the run's
    indices of its classes by name, so the run's and evaluate's figures equal numpy's with the
    labels read off the folder names (not those of its own two classes); a warning names the
    class it lacks."""
    import pathlib

    _image_folders(tmp_path / "data", {"train": "abc", "test": "ac"})
    cfg = small_config(**{"data.source": "imagefolder", "data.root": str(tmp_path / "data"),
                          "total_steps": 1, "batch_size": 4, "eval_batch_size": 4})  # fmt: skip
    with caplog.at_level(logging.WARNING):
        final = train_and_evaluate(cfg, str(tmp_path / "run"))
    assert "The split 'test' lacks 1 of the run's 3 classes: b (no examples" in caplog.text
    trained = load_trained(tmp_path / "run")
    paths = sorted(str(p) for p in (tmp_path / "data" / "test").glob("*/*.png"))

    def figures(classes: str) -> dict[str, float]:
        labels = np.array([classes.index(pathlib.Path(p).parent.name) for p in paths])
        source = data_lib.from_columns({"path": np.array(paths), "label": labels}, list("abc"))
        return _numpy_figures(trained.model, trained.variables, source, trained.input)

    want = figures("abc")
    _assert_figures(final, want)
    _assert_figures(evaluate_run(tmp_path / "run"), want)
    assert figures("ac")["eval/loss"] != pytest.approx(want["eval/loss"], abs=1e-4)
    # The standalone report and export read the split as evaluate does: by the run's classes
    from vision_jax.export.images import split_images
    from vision_jax.report import write_report

    write_report(tmp_path / "run", tmp_path / "report")
    with open(tmp_path / "report" / "confusion_matrix.csv") as f:
        rows = {row[0]: sum(map(int, row[1:])) for row in list(csv.reader(f))[1:]}
    assert rows == {"a": 2, "b": 0, "c": 2}
    np.testing.assert_array_equal(split_images(trained, "test")[1], [0, 0, 2, 2])


@pytest.mark.slow
def test_a_run_that_selected_classes_is_read_by_their_names(tmp_path):
    """A run with data.classes=(1, 3) records the classes it selected (b, d): evaluate, the
    standalone report and export read its splits by those names (a CSV split's other rows, a,
    dropped, not an unknown class), also at a copy holding only the evaluated split (no train
    split to resolve the positions against)."""
    import shutil

    from vision_jax.export.images import split_images
    from vision_jax.report import write_report

    root = tmp_path / "data"
    _image_folders(root, {"train": "abcd", "test": "abd"})
    for split, classes in (("train", "abcd"), ("test", "abd")):
        rows = [f"{split}/{c}/{i}.png,{c}" for c in classes for i in range(2)]
        (root / f"{split}.csv").write_text("\n".join(["filename,label", *rows]) + "\n")
    for source in ("imagefolder", "csv"):
        cfg = small_config(**{"data.source": source, "data.root": str(root),
                              "data.classes": (1, 3), "total_steps": 1, "batch_size": 4,
                              "eval_batch_size": 4})  # fmt: skip
        run = tmp_path / f"{source}_run"
        final = train_and_evaluate(cfg, str(run))
        trained = load_trained(run)
        assert trained.class_names == ["b", "d"]
        np.testing.assert_array_equal(split_images(trained, "test")[1], [0, 0, 1, 1])
        before = evaluate_run(run)
        assert before["eval/examples"] == 4
        assert before["eval/loss"] == pytest.approx(final["eval/loss"], abs=1e-5)
        write_report(run, tmp_path / f"{source}_report")
        with open(tmp_path / f"{source}_report" / "confusion_matrix.csv") as f:
            rows = {row[0]: sum(map(int, row[1:])) for row in list(csv.reader(f))[1:]}
        assert rows == {"b": 2, "d": 2}
        copy = tmp_path / f"{source}_copy"
        shutil.copytree(root / "test", copy / "test")
        shutil.copy(root / "test.csv", copy / "test.csv")
        _assert_figures(evaluate_run(run, data_root=copy), before)


@pytest.mark.slow
def test_a_split_with_other_classes_is_refused(tmp_path):
    """An image-folder split whose class folders differ from the run's (its labels would
    name other classes than the model's outputs)."""
    _image_folders(tmp_path / "data", {"train": "ab", "test": "ab", "other": "abc"})
    cfg = small_config(**{"data.source": "imagefolder", "data.root": str(tmp_path / "data"),
                          "total_steps": 1, "batch_size": 4, "eval_batch_size": 4})  # fmt: skip
    train_and_evaluate(cfg, str(tmp_path / "run"))
    assert evaluate_run(tmp_path / "run")["eval/examples"] == 4
    with pytest.raises(data_lib.DataError, match=r"'other' has the classes a, b, c; the run"):
        evaluate_run(tmp_path / "run", split="other")
    # CSV splits: another CSV file with another class, added since, changes nothing (their
    # classes come from every CSV beside them; the run's are its recorded ones).
    root = tmp_path / "data"
    for split, classes in (("train", "ab"), ("test", "ab"), ("extra", "abc")):
        rows = [f"{split}/{c}/{i}.png,{c}" for c in classes for i in range(2)]
        (root / f"{split}.csv").write_text("\n".join(["filename,label", *rows]) + "\n")
    (root / "extra.csv").unlink()
    cfg.data.source = "csv"
    train_and_evaluate(cfg, str(tmp_path / "csv_run"))
    before = evaluate_run(tmp_path / "csv_run")
    rows = [f"other/c/{i}.png,c" for i in range(2)]
    (root / "extra.csv").write_text("\n".join(["filename,label", *rows]) + "\n")
    assert evaluate_run(tmp_path / "csv_run") == before


@pytest.mark.slow
def test_segmentation_figures_equal_scikit_learn_on_its_label_maps(tmp_path, caplog):
    """A short segmentation run on arrays evaluated again (from Python: the arrays passed
    again): mIoU and pixel accuracy equal scikit-learn's confusion matrix of the model's label
    maps; without the arrays, an error saying how to pass them; a split lacking a class gets
    training's warning naming it."""
    from sklearn.metrics import confusion_matrix
    from test_segmentation_train import ARRAYS, seg_config

    train_and_evaluate(seg_config(total_steps=4), str(tmp_path), arrays=ARRAYS)
    got = evaluate_run(tmp_path, arrays=ARRAYS, batch_size=8)
    trained = load_trained(tmp_path)
    source = data_lib.load_source(trained.spec.data, "test", arrays=ARRAYS, target="label_map")
    (batch,) = data_lib.eval_batches(source, trained.input, global_batch=32)
    keep = batch["mask"] > 0
    found = np.asarray(trained.model.apply(trained.variables, batch["image"][keep])).argmax(-1)
    truth = batch["label_map"][keep]
    valid = truth != data_lib.IGNORE_LABEL
    matrix = confusion_matrix(truth[valid], found[valid], labels=range(4)).astype(np.float64)
    tp, union = np.diag(matrix), matrix.sum(0) + matrix.sum(1) - np.diag(matrix)
    assert got["eval/miou"] == pytest.approx(np.mean(tp[union > 0] / union[union > 0]), abs=1e-9)
    assert got["eval/pixel_accuracy"] == pytest.approx(tp.sum() / matrix.sum(), abs=1e-9)
    assert got["eval/examples"] == 20
    with pytest.raises(data_lib.DataError, match=r"evaluate_run\(workdir, arrays=\{'test'"):
        evaluate_run(tmp_path)
    images, maps = ARRAYS["test"]  # a split without a pixel of blue: warned of, as training does
    with caplog.at_level(logging.WARNING):
        evaluate_run(tmp_path, arrays={"test": (images, np.where(maps == 3, 0, maps))})
    assert "No label map of this split holds a pixel of blue (3)" in caplog.text


@pytest.mark.slow
def test_detection_figures_equal_pycocotools_on_its_detections(tmp_path):
    """A short detection run evaluated again: its COCO figures equal pycocotools' on the
    model's detections of each test image, computed here outside the evaluation; an image of
    more boxes than task.max_boxes (4) in the test split is evaluated, not refused."""
    from PIL import Image
    from test_det_data import write_coco
    from test_detection_train import SIZE, det_config, random_scenes

    from vision_jax.tasks.coco_eval import coco_metrics, coco_results

    root = tmp_path / "coco"
    write_coco(root, random_scenes(16, 0), "train")
    dense = (SIZE, SIZE, [(1, x, y, 8, 8, 0) for x in (0, 12, 24) for y in (0, 16)])
    test = [*random_scenes(11, 1), dense]
    write_coco(root, test, "test", ids=[50 + 3 * i for i in range(12)])
    workdir = tmp_path / "run"
    train_and_evaluate(det_config(root, total_steps=20, batch_size=8), str(workdir))
    got = evaluate_run(workdir, batch_size=4)
    trained = load_trained(workdir)
    truth = json.loads((root / "annotations/instances_test.json").read_text())
    images = np.stack([np.asarray(Image.open(root / "test" / im["file_name"]).convert("RGB"))
                       for im in truth["images"]])  # fmt: skip
    outputs = trained.model.apply(trained.variables, (images.astype(np.float32) - 127.5) / 127.5)
    found = jax.device_get(trained.task.detect(outputs, (SIZE, SIZE)))
    found["image_ids"] = np.asarray([im["id"] for im in truth["images"]])
    category_ids = sorted(c["id"] for c in truth["categories"])
    names = [c["name"] for c in sorted(truth["categories"], key=lambda c: c["id"])]
    want = coco_metrics(
        truth, coco_results(found, category_ids, truth["images"]), found["image_ids"], names
    )
    assert got["eval/examples"] == 12 and want["ap50"] > 0.05, want  # boxes found
    for key in ("map", "ap50", "ap75"):
        assert got[f"eval/{key}"] == pytest.approx(want[key], abs=2e-3), key


def test_a_backbone_of_ones_own_is_imported_from_model_module(tmp_path, own_models):
    """``model.module`` names the module that registers a model of one's own
    (tests/own_backbone.py, outside the library): the run imports it, and so does everything
    that reads the run later from its saved config: load_trained, evaluate_run and, in a fresh
    process that never imported it, ``python -m vision_jax.evaluate``, which gives the run's
    own figures. Without it, or with a module that does not import, one line says what to set."""
    import pathlib
    import subprocess
    import sys

    from vision_jax.models import registry

    own_models("own_backbone")
    run = tmp_path / "run"
    mine = {"model.name": "own_net_s"}
    with pytest.raises(ValueError, match=r"Unknown model 'own_net_s'.* Set model.module to the"):
        train_and_evaluate(small_config(**mine), str(run))
    with pytest.raises(ValueError, match=r"^model.module 'no_such_net' cannot be imported \("):
        train_and_evaluate(small_config(**mine, **{"model.module": "no_such_net"}), str(run))
    with pytest.raises(ValueError, match=r"^model.module 'own_backbone' registers a model of yo"):
        train_and_evaluate(small_config(**{"model.module": "own_backbone"}), str(run))
    config = small_config(total_steps=8, **mine, **{"model.module": "own_backbone"})
    final = train_and_evaluate(config, str(run))

    def forget() -> None:  # a later process's view
        del registry._REGISTRY["own_net_s"], registry._FAMILIES["own_net"]
        del sys.modules["own_backbone"]

    forget()
    trained = load_trained(run)
    assert trained.spec.model_module == "own_backbone"
    assert type(trained.model).__module__ == "own_backbone"
    forget()
    got = evaluate_run(run)
    for key in ("eval/top1", "eval/loss", "eval/examples"):
        assert got[key] == pytest.approx(final[key], abs=1e-5), key
    root = pathlib.Path(__file__).resolve().parents[1]
    paths = [str(root), str(root / "tests"), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    proc = subprocess.run(
        [sys.executable, "-m", "vision_jax.evaluate", f"--workdir={run}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    printed = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in ("eval/top1", "eval/loss", "eval/examples"):
        assert printed[key] == pytest.approx(final[key], abs=1e-5), key
    # A saved run without the module (its config as it ran): the error says to import it.
    forget()
    for meta in (run / "checkpoints").glob("*/meta/metadata"):
        record = json.loads(meta.read_text())
        record["config"]["model"]["module"] = None
        meta.write_text(json.dumps(record))
    with pytest.raises(ValueError, match=r"own_net_s'.* Import the module that registers it fi"):
        load_trained(run)
