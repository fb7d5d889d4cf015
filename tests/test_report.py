"""A trained run's report: its per-class numbers and confusion matrix equal scikit-learn's on
the model's own predictions, its hardest examples are the least probable true labels, its
figures are real PNGs embedded in a page that renders in a real browser, and a run without
event files or without a readable evaluation split still gets a report."""

from __future__ import annotations

import base64
import contextlib
import csv
import io
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from vision_jax import data as data_lib
from vision_jax.report import FinalEvaluation, write_report
from vision_jax.report.__main__ import main as report_main
from vision_jax.train import train_and_evaluate
from vision_jax.trained import load_trained

PNGS = ("training_curves.png", "confusion_matrix.png", "hardest_examples.png")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def run(digits_run) -> pathlib.Path:
    """The shared digits run (conftest) and its report in ``<workdir>/report``."""
    workdir, _, _ = digits_run
    write_report(workdir)
    return workdir


@pytest.fixture(scope="module")
def predictions(run) -> dict[str, np.ndarray]:
    """Labels and softmax probabilities of the 360 test digits, computed here: the model applied
    to the evaluation pipeline's images, padding rows dropped."""
    trained = load_trained(run)
    source = data_lib.load_source(trained.spec.data, "test")
    images, labels = [], []
    for batch in data_lib.eval_batches(source, trained.input, global_batch=1000):
        keep = batch["mask"] > 0
        images.append(batch["image"][keep])
        labels.append(batch["label"][keep])
    logits = trained.model.apply(trained.variables, np.concatenate(images), train=False)
    probs = np.asarray(jax.nn.softmax(logits.astype(np.float32)))
    return {"labels": np.concatenate(labels), "probs": probs, "names": trained.class_names}


def _rows(path: pathlib.Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_per_class_table_and_confusion_matrix_equal_scikit_learn(run, predictions):
    from sklearn.metrics import classification_report, confusion_matrix

    labels, names = predictions["labels"], predictions["names"]
    predicted = predictions["probs"].argmax(-1)
    assert len(labels) == 360 and len(set(predicted)) >= 3  # a meaningful comparison
    want = classification_report(labels, predicted, labels=range(10), target_names=names,
                                 output_dict=True, zero_division=0)  # fmt: skip
    rows = {row["class"]: row for row in _rows(run / "report" / "per_class.csv")}
    assert list(rows) == [*names, "accuracy", "macro avg", "weighted avg"]
    for name in [*names, "macro avg", "weighted avg"]:
        for key in ("precision", "recall", "f1-score"):
            assert float(rows[name][key]) == pytest.approx(want[name][key], abs=1e-12), name
        assert int(rows[name]["support"]) == want[name]["support"]
    assert float(rows["accuracy"]["f1-score"]) == pytest.approx(want["accuracy"], abs=1e-12)

    with (run / "report" / "confusion_matrix.csv").open(newline="") as f:
        header, *body = list(csv.reader(f))
    assert header[1:] == names and [row[0] for row in body] == names
    matrix = np.asarray([[int(v) for v in row[1:]] for row in body])
    np.testing.assert_array_equal(matrix, confusion_matrix(labels, predicted, labels=range(10)))
    page = (run / "report" / "report.html").read_text()
    assert f"top1 {want['accuracy']:.4f} on 360 test examples" in page
    assert "model cifar_resnet20" in page and "latest step 40" in page


def test_hardest_examples_are_the_least_probable_true_labels(run, predictions):
    labels, probs, names = predictions["labels"], predictions["probs"], predictions["names"]
    p_true = probs[np.arange(len(labels)), labels]
    want = np.argsort(p_true, kind="stable")[:16]
    rows = _rows(run / "report" / "hardest_examples.csv")
    assert [int(r["index"]) for r in rows] == want.tolist()
    for row, i in zip(rows, want, strict=True):
        assert row["true"] == names[labels[i]]
        assert row["predicted"] == names[probs[i].argmax()]
        assert float(row["probability of true"]) == pytest.approx(p_true[i], abs=1e-5)


def test_hardest_examples_name_their_files_also_when_some_were_skipped():
    """With a file source the table names each hardest example's file, by the example's row
    in the source: also when unreadable files were skipped (the file column was dropped)."""
    from types import SimpleNamespace

    from vision_jax.report.tasks import Classification

    paths = np.asarray([f"test/c{i % 2}/{i}.jpg" for i in range(6)])
    source = SimpleNamespace(columns={"path": paths, "label": np.arange(6) % 2})
    spec = data_lib.InputSpec(2)
    probs = np.asarray([[0.9, 0.1], [0.2, 0.8], [0.3, 0.7], [0.6, 0.4], [0.55, 0.45], [0.1, 0.9]])
    for rows in ([0, 1, 2, 3, 4, 5], [0, 2, 3, 4, 5]):  # row 1 unreadable in the second
        evaluator = Classification(["a", "b"], spec, source, 2)
        rows = np.asarray(rows)
        batch = {"image": np.zeros((len(rows), 2, 2, 3)), "label": rows % 2, "row": rows,
                 "mask": np.ones(len(rows))}  # fmt: skip
        evaluator.add(batch, {"probabilities": probs[rows]})
        table = evaluator.result().hardest_table
        assert table.columns[:2] == ("index", "file")
        assert [row[0] for row in table.rows] == [2, 3]  # p(true) 0.3 and 0.4
        assert [row[1] for row in table.rows] == [paths[2], paths[3]]
    long_name = "a class name much longer than a thumbnail is wide"  # the table keeps it whole
    evaluator = Classification([long_name, "b"], spec, source, 1)
    batch = {"image": np.zeros((1, 2, 2, 3)), "label": np.zeros(1, int), "row": np.zeros(1, int),
             "mask": np.ones(1)}  # fmt: skip
    evaluator.add(batch, {"probabilities": probs[3:4]})
    result = evaluator.result()
    assert result.hardest[0].title.splitlines()[0] == "true a class name much l… (0.60)"
    assert long_name in result.hardest_table.rows[0]


def test_the_report_of_a_training_command_takes_its_final_evaluations_figures(
    digits_run, run, tmp_path, monkeypatch
):
    """The training's final evaluation made the report's figures as it ran: the report written
    from them predicts nothing and reads no weights, and its tables equal those of the report
    that predicted the split again with the saved variables (``run``)."""
    import vision_jax.report as report_package
    import vision_jax.trained as trained_module

    workdir, result, final = digits_run

    def predicting(*args, **kwargs):
        raise AssertionError("the report predicted the split again")

    monkeypatch.setattr(report_package, "_evaluation", predicting)
    monkeypatch.setattr(trained_module, "read_variables", predicting)
    write_report(workdir, tmp_path, final=final)
    for name in ("per_class.csv", "confusion_matrix.csv"):
        assert _rows(tmp_path / name) == _rows(run / "report" / name)
    got, want = (_rows(p / "hardest_examples.csv") for p in (tmp_path, run / "report"))
    assert [r["index"] for r in got] == [r["index"] for r in want] and len(got) == 16
    for g, w in zip(got, want, strict=True):
        assert float(g["probability of true"]) == pytest.approx(float(w["probability of true"]),
                                                                abs=1e-5)  # fmt: skip
    page = (tmp_path / "report.html").read_text()
    assert f"top1 {result['eval/top1']:.4f} on 360 test examples" in page
    # Figures of another checkpoint (another step, another run's same step), or with another
    # number of hardest examples, are not used.
    assert final.step_dir == str((workdir / "checkpoints" / "40").resolve())
    other = tmp_path / "other"
    shutil.copytree(workdir / "checkpoints" / "40", other / "checkpoints" / "40")
    assert final.evaluation(workdir / "checkpoints" / "39") is None
    assert final.evaluation(other / "checkpoints" / "40") is None
    with pytest.raises(AssertionError, match="predicted the split again"):
        write_report(other, tmp_path / "of_other", final=final)
    with pytest.raises(AssertionError, match="predicted the split again"):
        write_report(workdir, tmp_path, hardest=4, final=final)


def test_a_failing_report_evaluation_costs_the_run_nothing(tmp_path, monkeypatch, caplog):
    """An error in the report's evaluator during the final evaluation is a warning: the run
    ends with its metrics and its report predicts the split again."""
    from test_train import small_config

    from vision_jax.report import FinalEvaluation, tasks

    def broken(self, batch, outputs):
        raise RuntimeError("broken evaluator")

    monkeypatch.setattr(tasks.Classification, "add", broken)
    final = FinalEvaluation()
    result = train_and_evaluate(small_config(), str(tmp_path), final=final)
    assert result["eval/examples"] == 360
    assert "broken evaluator" in caplog.text
    assert final.evaluation(tmp_path / "checkpoints" / "4") is None
    monkeypatch.undo()
    write_report(tmp_path, final=final)
    rows = {r["class"]: r for r in _rows(tmp_path / "report" / "per_class.csv")}
    assert float(rows["accuracy"]["f1-score"]) == pytest.approx(result["eval/top1"])


def test_a_nan_probability_never_ranks_first_as_in_the_eval_metrics():
    """Softmax of a NaN logit row is all NaN: argmax took it for class 0 (a hit for a label 0)
    and a NaN beside numbers for the best; as the jitted metrics (metrics.nan_lowest) a NaN
    ranks lowest, an all-NaN row is a miss, and predict's label maps and records agree."""
    from types import SimpleNamespace

    from vision_jax.predict import classification_record, upsampled_argmax
    from vision_jax.report.tasks import Classification

    nan = float("nan")
    probs = np.asarray([[nan, nan, nan], [0.1, nan, 0.2], [0.7, 0.2, 0.1]])
    evaluator = Classification(["a", "b", "c"], data_lib.InputSpec(2), SimpleNamespace(), 3)
    batch = {"image": np.zeros((3, 2, 2, 3)), "label": np.asarray([0, 2, 0]),
             "row": np.arange(3), "mask": np.ones(3)}  # fmt: skip
    evaluator.add(batch, {"probabilities": probs})
    result = evaluator.result()
    np.testing.assert_array_equal(result.confusion, [[1, 1, 0], [0, 0, 0], [0, 0, 1]])
    assert result.headline == 2 / 3
    assert [row[1] for row in result.hardest_table.rows] == ["a", "c", "a"]  # NaN first
    # The predicted class as the confusion matrix books it (the all-NaN row: a miss, b), a NaN
    # probability shown as NaN.
    rows = result.hardest_table.rows
    assert [row[1:3] for row in rows] == [["a", "b"], ["c", "c"], ["a", "a"]], rows
    assert np.isnan(rows[0][3]) and result.hardest[0].title.startswith("true a (nan)\npredicted b")
    assert classification_record("x", probs[1], ["a", "b", "c"], 3)["label"] == 2
    scores = np.stack([np.full((2, 2), nan), np.zeros((2, 2)), np.ones((2, 2))], -1)
    np.testing.assert_array_equal(upsampled_argmax(scores, (4, 4)), np.full((4, 4), 2))


def test_hardest_examples_draw_only_the_examples_they_keep():
    """A thumbnail is made only for an example that enters the kept set when offered (each
    detection thumbnail took ~0.1 s: with batches no larger than the examples kept, every image
    of the split was drawn), and the kept set is the lowest scores, ties to the earlier row."""
    from vision_jax.report.tasks import Lowest

    rng = np.random.default_rng(0)
    lowest, made, scores_seen = Lowest(4), [], []
    for start in range(0, 400, 4):
        scores = rng.random(4).round(2)  # ties too
        scores[rng.random(4) < 0.05] = np.nan
        rows = np.arange(start, start + 4)
        batch_made = []

        def make(i, rows=rows, batch_made=batch_made):
            batch_made.append(int(rows[i]))
            return None, []

        lowest.offer(scores, rows, make)
        kept = [row for _, row, _, _ in lowest.kept]
        assert set(batch_made) <= set(kept), (batch_made, kept)
        made += batch_made
        scores_seen += list(zip(np.where(np.isnan(scores), -np.inf, scores), rows, strict=True))
    assert len(made) < 40  # not one per example offered (400)
    assert [row for _, row, _, _ in lowest.kept] == [int(r) for _, r in sorted(scores_seen)[:4]]


def test_figures_are_pngs_embedded_in_the_page(run):
    from PIL import Image

    page = (run / "report" / "report.html").read_text()
    for name in PNGS:
        path = run / "report" / name
        with Image.open(path) as image:
            assert image.format == "PNG"
            assert 300 <= image.width <= 3000 and 200 <= image.height <= 3000, (name, image.size)
        assert base64.b64encode(path.read_bytes()).decode() in page  # this very file
        assert f'data-file="{name}"' in page
    assert page.count("<img ") == len(PNGS)


def _rendered_images(html: pathlib.Path, profile: pathlib.Path) -> str:
    """``<body data-images-loaded>`` of the page as headless Chromium rendered it ("loaded/all"
    images); the browser's whole process group is killed afterwards."""
    command = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
        "--no-first-run", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", f"--user-data-dir={profile}", "--virtual-time-budget=5000",
        "--dump-dom", html.as_uri(),
    ]  # fmt: skip
    browser = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        dom, _ = browser.communicate(timeout=60)
    finally:
        try:
            os.killpg(browser.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        browser.wait()
    found = re.search(r'<body[^>]*data-images-loaded="([^"]*)"', dom)
    assert found, dom[-2000:]
    return found.group(1)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")
def test_every_image_renders_in_a_browser_after_moving_the_page(run, tmp_path):
    moved = tmp_path / "moved.html"  # alone, away from the PNG files
    shutil.copy(run / "report" / "report.html", moved)
    assert _rendered_images(moved, tmp_path / "profile") == "3/3"
    # The check sees a broken image: one data URI cut short.
    broken = tmp_path / "broken.html"
    page = moved.read_text()
    start = page.index("base64,") + len("base64,")
    broken.write_text(page[:start] + page[start + 200 :])
    assert _rendered_images(broken, tmp_path / "profile") == "2/3"


def test_command_line_on_a_run_without_event_files(run, predictions, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("events.out.tfevents.*", "report"))
    assert report_main([f"--workdir={copy}", f"--output={tmp_path / 'out'}"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "out" / "report.html")
    out = tmp_path / "out"
    assert not (out / "training_curves.png").exists()
    page = (out / "report.html").read_text()
    assert "No training curves: no TensorBoard scalars" in page and page.count("<img ") == 2
    assert _rows(out / "per_class.csv") == _rows(run / "report" / "per_class.csv")


def test_command_line_output_that_cannot_be_written_is_one_line(run, tmp_path, capsys,
                                                                monkeypatch):  # fmt: skip
    """A path that cannot be a folder: one line naming it, exit status 1, before the run is
    read and predicted (it was found once the report was made)."""
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")

    def not_made(*args, **kwargs):
        raise AssertionError("the report is made before its output is checked")

    monkeypatch.setattr("vision_jax.report.write_report", not_made)
    out = blocker / "report"
    assert report_main([f"--workdir={run}", f"--output={out}"]) == 1
    assert capsys.readouterr().err == (
        f"vision_jax.report: error: --output {out}: {blocker} is not a folder\n"
    )
    workdir = tmp_path / "w"  # the default <workdir>/report, named as the report folder
    workdir.mkdir()
    (workdir / "report").write_text("not a folder")
    assert report_main([f"--workdir={workdir}"]) == 1
    assert capsys.readouterr().err == (
        f"vision_jax.report: error: the report folder {workdir / 'report'} (--output): "
        f"{workdir / 'report'} is not a folder\n"
    )
    monkeypatch.chdir(tmp_path)  # a URL: one line, not a local folder gs:/...
    assert report_main([f"--workdir={run}", "--output=gs://bucket/report"]) == 1
    assert capsys.readouterr().err == (
        "vision_jax.report: error: --output gs://bucket/report: the report is written to a "
        "local folder, not a URL: write it locally and copy it (gcloud storage cp -r)\n"
    )
    assert not (tmp_path / "gs:").exists()


def test_command_line_error_is_one_line(tmp_path, capsys):
    assert report_main([f"--workdir={tmp_path}"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("vision_jax.report: error: No vision_jax checkpoint found in")
    assert "\n" not in err
    with pytest.raises(SystemExit) as exit_:
        report_main([f"--workdir={tmp_path}", "--hardest=-1"])
    assert exit_.value.code == 2
    assert (
        capsys.readouterr()
        .err.strip()
        .splitlines()[-1]
        .endswith("error: --hardest must be >= 0 (examples to show), got -1.")
    )


@pytest.fixture(scope="module")
def seg_run(tmp_path_factory) -> tuple[pathlib.Path, FinalEvaluation]:
    """20 steps of the FPN segmentation head on coloured squares ("arrays" data), and the
    report's figures made during its final evaluation."""
    from test_segmentation_train import ARRAYS, seg_config

    workdir = tmp_path_factory.mktemp("seg")
    cfg = seg_config(**{"task.head": "fpn", "total_steps": 20, "log_every_steps": 5,
                        "checkpoint_every_steps": 20, "optimizer.learning_rate": 0.1})  # fmt: skip
    final = FinalEvaluation()
    train_and_evaluate(cfg, str(workdir), arrays=ARRAYS, final=final)
    return workdir, final


@pytest.mark.slow
def test_segmentation_report_counts_every_valid_pixel(seg_run, tmp_path):
    """Per-class IoU, pixel accuracy and the confusion matrix equal scikit-learn's confusion
    matrix of the model's label maps on the evaluation pipeline's images; the hardest images
    have the lowest pixel accuracy; the report made from the final evaluation's label maps
    holds the same figures."""
    from sklearn.metrics import confusion_matrix
    from test_segmentation_train import ARRAYS

    workdir, final = seg_run
    write_report(workdir, tmp_path, arrays=ARRAYS)
    write_report(workdir, tmp_path / "final", final=final)  # needs no arrays: nothing to load
    for name in ("per_class.csv", "confusion_matrix.csv", "hardest_examples.csv"):
        assert _rows(tmp_path / "final" / name) == _rows(tmp_path / name), name
    trained = load_trained(workdir)
    source = data_lib.load_source(trained.spec.data, "test", arrays=ARRAYS, target="label_map")
    (batch,) = data_lib.eval_batches(source, trained.input, global_batch=64)
    keep = batch["mask"] > 0
    logits = trained.model.apply(trained.variables, batch["image"][keep], train=False)
    truth, found = batch["label_map"][keep], np.asarray(logits).argmax(-1)
    valid = truth != data_lib.IGNORE_LABEL
    assert len(np.unique(found[valid])) >= 2  # not all background: a meaningful comparison
    want = confusion_matrix(truth[valid], found[valid], labels=range(4))
    with (tmp_path / "confusion_matrix.csv").open(newline="") as f:
        matrix = np.asarray([[int(v) for v in row[1:]] for row in list(csv.reader(f))[1:]])
    np.testing.assert_array_equal(matrix, want)
    tp, union = np.diag(want), want.sum(0) + want.sum(1) - np.diag(want)
    rows = {row["class"]: row for row in _rows(tmp_path / "per_class.csv")}
    for name, iou in zip(trained.class_names, tp / union, strict=True):
        assert float(rows[name]["iou"]) == pytest.approx(iou, abs=1e-12)
    assert float(rows["mean"]["iou"]) == pytest.approx(np.mean(tp / union), abs=1e-12)
    assert float(rows["all pixels"]["accuracy"]) == pytest.approx(tp.sum() / want.sum())
    accuracy = ((truth == found) & valid).sum((1, 2)) / valid.sum((1, 2))
    hardest = [int(r["index"]) for r in _rows(tmp_path / "hardest_examples.csv")]
    assert hardest == np.argsort(accuracy, kind="stable")[:16].tolist()


@pytest.mark.slow
def test_a_run_whose_split_cannot_be_loaded_gets_curves_and_the_reason(seg_run, tmp_path):
    """The "arrays" run reported without its arrays."""
    page = pathlib.Path(write_report(seg_run[0], tmp_path)).read_text()
    assert "No evaluation: the split &#x27;test&#x27; could not be loaded" in page
    assert "data.source=&#x27;arrays&#x27; needs arrays=" in page
    assert page.count("<img ") == 1 and (tmp_path / "training_curves.png").exists()
    assert not (tmp_path / "per_class.csv").exists()


@pytest.mark.slow
def test_detection_report_has_the_evaluations_per_class_ap(tmp_path):
    """The per-class COCO AP of the report (predictions, then pycocotools) equals what the
    training loop's final evaluation reported (its own metric collection), as does the report
    made from that evaluation's detections."""
    from test_det_data import NAMES, write_coco
    from test_detection_train import det_config, random_scenes

    write_coco(tmp_path / "coco", random_scenes(64, 0), "train")
    write_coco(tmp_path / "coco", random_scenes(20, 1), "test")
    cfg = det_config(tmp_path / "coco", total_steps=40, log_every_steps=10)
    final = FinalEvaluation()
    result = train_and_evaluate(cfg, str(tmp_path / "run"), final=final)
    page = pathlib.Path(write_report(tmp_path / "run")).read_text()
    write_report(tmp_path / "run", tmp_path / "final", final=final)
    assert _rows(tmp_path / "final" / "per_class.csv") == _rows(
        tmp_path / "run" / "report" / "per_class.csv"
    )
    rows = {row["class"]: row for row in _rows(tmp_path / "run" / "report" / "per_class.csv")}
    assert list(rows) == [*NAMES, "mean (mAP)"]
    for name in NAMES:  # classes without ground truth in the split have no AP
        want = result.get(f"eval/ap/{name}")
        got = rows[name]["ap"]
        assert got == "" if want is None else float(got) == pytest.approx(want, abs=1e-6), name
    assert float(rows["mean (mAP)"]["ap"]) == pytest.approx(result["eval/map"], abs=1e-6)
    assert result["eval/map"] > 0.05  # something was detected
    assert page.count("<img ") == 3 and "No confusion matrix for detection" in page
    assert (tmp_path / "run" / "report" / "precision_recall.csv").exists()


def _detections_case():
    """Three 160 x 160 images seen at 80 x 80 (scale 0.5): image 10's cat found; image 11's dog
    missed (its only dog detection elsewhere); image 12's cat found, its dog only by a detection
    scoring under 0.5. Returns the source, the batch, the outputs and the COCO results."""
    from types import SimpleNamespace

    images = [{"id": i, "file_name": f"{i}.jpg", "width": 160, "height": 160} for i in (10, 11, 12)]
    truth = [(10, 1, [8, 8, 40, 40]), (11, 2, [40, 60, 80, 48]), (12, 1, [90, 90, 60, 60]),
             (12, 2, [10, 100, 40, 40])]  # fmt: skip
    annotations = {
        "images": images,
        "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}],
        "annotations": [{"id": n, "image_id": i, "category_id": c, "bbox": b, "area": b[2] * b[3],
                         "iscrowd": 0} for n, (i, c, b) in enumerate(truth, 1)],
    }  # fmt: skip
    source = SimpleNamespace(
        annotations=annotations, category_ids=[1, 2], class_names=["cat", "dog"],
        columns={"path": np.asarray([f"test/{i}.jpg" for i in (10, 11, 12)])},
    )  # fmt: skip
    found = [[(0, [4, 4, 24, 24], 0.9)], [(1, [0, 0, 10, 10], 0.8)],
             [(0, [45, 45, 75, 75], 0.95), (1, [5, 50, 25, 70], 0.3)]]  # fmt: skip
    outputs = {"boxes": np.zeros((3, 2, 4), np.float32), "scores": np.zeros((3, 2), np.float32),
               "classes": np.full((3, 2), -1)}  # fmt: skip
    results = []
    for i, image in enumerate(found):
        for j, (c, box, score) in enumerate(image):
            outputs["boxes"][i, j], outputs["scores"][i, j] = box, score
            outputs["classes"][i, j] = c
            x0, y0, x1, y1 = (2 * v for v in box)  # original pixels
            results.append({"image_id": images[i]["id"], "category_id": c + 1,
                            "bbox": [x0, y0, x1 - x0, y1 - y0], "score": score})  # fmt: skip
    batch = {"image": np.zeros((3, 80, 80, 3), np.float32), "mask": np.ones(3),
             "row": np.arange(3), "image_id": np.asarray([10, 11, 12]),
             "scale": np.full(3, 0.5, np.float32)}  # fmt: skip
    return source, batch, outputs, results


def test_one_detection_over_two_boxes_of_its_class_finds_one():
    """A detection found every box of its class it overlapped at IoU >= 0.5 (two overlapping
    people, one detection: both found); matched as COCO matches, it finds the box it overlaps
    most, and a second detection finds the other."""
    from vision_jax.report.tasks import _Image

    truth = np.array([[0, 0, 10, 10], [1, 0, 11, 10]], np.float32)  # IoU 0.82 with each other
    one = np.array([[0.5, 0, 10.5, 10]], np.float32)
    image = _Image(truth, np.array([0, 0]), one, np.array([0]), np.array([0.9]))
    assert image.missed.tolist() == [False, True] and image.recall == 0.5
    two = np.concatenate([one, truth[1:]])
    image = _Image(truth, np.array([0, 0]), two, np.array([0, 0]), np.array([0.9, 0.8]))
    assert not image.missed.any()
    other_class = _Image(truth, np.array([0, 0]), one, np.array([1]), np.array([0.9]))
    assert other_class.missed.all()


def test_detection_report_shows_the_images_with_boxes_missed_and_pr_curves(tmp_path):
    """The hardest image first is the one whose ground-truth box no detection found (then the
    one whose dog was found only under the score threshold), its ground truth drawn in green on
    the pixels it covers in the model's input; the precision-recall curves are pycocotools'
    precision at IoU 0.5, and the report writes them as a figure and a table."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from vision_jax.report import _evaluation_sections
    from vision_jax.report.tasks import TRUTH_COLOUR, Detection

    source, batch, outputs, results = _detections_case()
    evaluator = Detection(source.class_names, data_lib.InputSpec(80), source, 3)
    evaluator.add(batch, outputs)
    result = evaluator.result()
    rows = result.hardest_table.rows
    assert [row[:3] for row in rows] == [[1, "test/11.jpg", 11], [2, "test/12.jpg", 12],
                                         [0, "test/10.jpg", 10]]  # fmt: skip
    assert [row[3:] for row in rows][:2] == [
        [1, 1, 1, 0.0, 0.0, "dog"],
        [2, 1, 0, 0.5, pytest.approx(2 / 3), "dog"],
    ]
    first = result.hardest[0]
    assert first.title == "found 0 of 1, 1 false\nmissed dog"
    assert first.indexed.endswith("missed #1")
    green = np.all(first.image == TRUTH_COLOUR, -1)  # the dog: x 20..59, y 30..53 in the input
    assert green[30:54, [20, 59]].all() and green[[30, 53], 20:60].all()
    assert not green[29:55, [19, 60]].any() and not green[[29, 54], 19:61].any()
    assert not green[31:53, 21:59].any()  # one pixel wide

    with contextlib.redirect_stdout(io.StringIO()):
        truth = COCO()
        truth.dataset = source.annotations
        truth.createIndex()
        coco = COCOeval(truth, truth.loadRes(results), "bbox")
        coco.evaluate()
        coco.accumulate()
    want = coco.eval["precision"][0, :, :, 0, 2]  # IoU 0.5, all areas, 100 detections
    assert list(result.pr_curves) == ["cat", "dog"]
    for k, name in enumerate(source.class_names):
        np.testing.assert_array_equal(result.pr_curves[name][0], coco.params.recThrs)
        np.testing.assert_array_equal(result.pr_curves[name][1], want[:, k])
    np.testing.assert_allclose(result.pr_mean[1], want.mean(1))
    _evaluation_sections(result, source.class_names, tmp_path)
    table = _rows(tmp_path / "precision_recall.csv")
    assert list(table[0]) == ["recall", "mean", "class:cat", "class:dog"]
    assert [float(r["class:dog"]) for r in table] == pytest.approx(want[:, 1].tolist())
    assert [float(r["mean"]) for r in table] == pytest.approx(want.mean(1).tolist())

    # Classes named "mean" and "recall" neither replace the mean curve nor the recall column.
    source.class_names = ["mean", "recall"]
    evaluator = Detection(source.class_names, data_lib.InputSpec(80), source, 3)
    evaluator.add(batch, outputs)
    named = evaluator.result()
    np.testing.assert_allclose(named.pr_mean[1], want.mean(1))
    np.testing.assert_array_equal(named.pr_curves["mean"][1], want[:, 0])
    _evaluation_sections(named, source.class_names, tmp_path)
    table = _rows(tmp_path / "precision_recall.csv")
    assert list(table[0]) == ["recall", "mean", "class:mean", "class:recall"]
    assert [float(r["recall"]) for r in table] == pytest.approx(coco.params.recThrs.tolist())
    assert [float(r["mean"]) for r in table] == pytest.approx(want.mean(1).tolist())
    assert [float(r["class:mean"]) for r in table] == pytest.approx(want[:, 0].tolist())
    assert (tmp_path / "precision_recall.png").stat().st_size > 0
    assert [r["image_id"] for r in _rows(tmp_path / "hardest_examples.csv")] == ["11", "12", "10"]


def test_false_detections_rank_an_image_among_the_hardest_and_a_split_without_truth_says_so(
    tmp_path,
):
    """An image whose only errors are false detections (here one without ground truth: its cat
    detection at 0.9) is among the hardest images (it was left out: nothing to miss), ranked by
    F1 with the images that miss boxes; one without ground truth or false detections is not. A
    split without ground truth has no precision-recall curves, and a note says why."""
    from vision_jax.report import _evaluation_sections
    from vision_jax.report.tasks import Detection

    source, batch, outputs, _ = _detections_case()
    truth = source.annotations["annotations"]
    source.annotations["annotations"] = [a for a in truth if a["image_id"] != 10]
    evaluator = Detection(source.class_names, data_lib.InputSpec(80), source, 3)
    evaluator.add(batch, outputs)
    result = evaluator.result()
    rows = result.hardest_table.rows
    want = [(10, 1, 0.0), (11, 1, 0.0), (12, 0, pytest.approx(2 / 3))]
    assert [(row[2], row[5], row[7]) for row in rows] == want
    assert result.hardest[0].title == "found 0 of 0, 1 false"
    assert not [n for n in result.notes if "no ground-truth boxes" in n]

    outputs["scores"][0] = 0.4  # image 10 without false detections: nothing to show
    evaluator = Detection(source.class_names, data_lib.InputSpec(80), source, 3)
    evaluator.add(batch, outputs)
    assert [row[2] for row in evaluator.result().hardest_table.rows] == [11, 12]

    source.annotations["annotations"] = []
    evaluator = Detection(source.class_names, data_lib.InputSpec(80), source, 3)
    evaluator.add(batch, outputs)
    result = evaluator.result()
    assert [row[2] for row in result.hardest_table.rows] == [11, 12]  # their false detections
    assert result.pr_mean is None and result.examples == 3
    assert "No precision-recall curves: the images evaluated have no ground-truth boxes" in \
        " ".join(result.notes)  # fmt: skip
    headings = [heading for heading, _ in _evaluation_sections(result, [], tmp_path)]
    assert headings == ["Per-class metrics", "Hardest examples"]


def test_a_detection_on_a_crowd_region_of_its_class_is_not_false():
    """COCO ignores a detection that finds no box but lies on a crowd region of its class
    (most of its area on it); on another class's crowd region, or mostly off it, it is false."""
    from vision_jax.report.tasks import _Image

    none, crowd = np.zeros((0, 4), np.float32), np.array([[0, 0, 50, 50]], np.float32)
    found = np.array([[10, 10, 20, 20], [40, 40, 70, 70], [10, 10, 20, 20]], np.float32)
    image = _Image(none, np.zeros(0, np.int64), found, np.array([0, 0, 1]),
                   np.array([0.9, 0.8, 0.7]), crowd, np.array([0]))  # fmt: skip
    assert image.false.tolist() == [False, True, True]
    assert image.f1 == 0.0 and image.recall == 1.0
    clean = _Image(none, np.zeros(0, np.int64), found[:1], np.array([0]), np.array([0.9]),
                   crowd, np.array([0]))  # fmt: skip
    assert clean.f1 == 1.0 and not clean.false.any()


def test_detection_thumbnails_label_classes_the_font_lacks_by_index():
    """Class names the labels' font cannot draw (猫, 犬: each drawn as the same empty box) are
    labelled by class index in the thumbnails and their titles, as the figures show them, and
    the caption says so; names it can draw (café) are drawn."""
    from types import SimpleNamespace

    from vision_jax.report.tasks import Detection

    source, batch, outputs, _ = _detections_case()

    def hardest(names):
        named = SimpleNamespace(**{**vars(source), "class_names": names})
        evaluator = Detection(names, data_lib.InputSpec(80), named, 3)
        evaluator.add(batch, outputs)
        return evaluator.result()

    cjk, indexed, accented = hardest(["猫", "犬"]), hardest(["#0", "#1"]), hardest(["café", "dog"])
    for a, b in zip(cjk.hardest, indexed.hardest, strict=True):
        np.testing.assert_array_equal(a.image, b.image)
        assert a.title == b.title == b.indexed
    assert cjk.hardest[0].title == "found 0 of 1, 1 false\nmissed #1"
    assert "Classes by index (#k" in cjk.hardest_caption
    assert "Classes by index" not in accented.hardest_caption
    assert accented.hardest[1].title.endswith("missed dog")
    assert not np.array_equal(accented.hardest[2].image, indexed.hardest[2].image)


def test_tables_and_predictions_are_utf8_whatever_the_locale(tmp_path):
    """Class names beyond ASCII, written and read under the C locale (a minimal container; on
    Windows, cp1252): every file is UTF-8, as the page's charset says."""
    code = """
import pathlib, sys
import numpy as np
from vision_jax.data.folders import _classes_txt
from vision_jax.predict import write_records
from vision_jax.report.tables import Table, write_confusion, write_table
out = pathlib.Path(sys.argv[1])
names = _classes_txt(str(out))
write_table(Table(["class", "recall"], [[names[0], 0.5]], []), out / "table.csv")
write_confusion(np.eye(2, dtype=int), names, out / "confusion.csv")
write_records([{"file": "a.png", "label": names[1]}], str(out / "predictions.csv"))
"""
    names = ["chat 🐱", "café"]
    (tmp_path / "classes.txt").write_text("\n".join(names) + "\n", encoding="utf-8")
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0",
           "PYTHONCOERCECLOCALE": "0"}  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    for name, want in [("table.csv", names[0]), ("confusion.csv", names[1]),
                       ("predictions.csv", names[1])]:  # fmt: skip
        assert want in (tmp_path / name).read_text(encoding="utf-8")


def _drawn_figures(monkeypatch, draw) -> list:
    """The matplotlib figures that ``draw()`` saves (saved too: text is laid out then)."""
    from vision_jax.report import figures

    saved, save = [], figures._save
    monkeypatch.setattr(figures, "_save", lambda f, path: (saved.append(f), save(f, path)))
    draw()
    return saved


def test_names_the_font_cannot_draw_are_shown_by_class_index(tmp_path, monkeypatch, capfd):
    """A class name with a character that DejaVu Sans lacks (猫): the confusion matrix and the
    hardest examples show the classes by index, with the note saying where the names are, not
    as boxes with a "Glyph missing" warning on stderr; accented names are still shown."""
    import warnings

    from vision_jax.report.figures import Thumb, confusion_figure, hardest_figure

    image = np.zeros((8, 8, 3), np.uint8)
    draw = lambda names: lambda: (
        confusion_figure(np.eye(2, dtype=int), names, tmp_path / "c.png"),
        hardest_figure([Thumb(image, f"true {names[0]}", "true #0")], tmp_path / "h.png"),
    )  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        confusion, hardest = _drawn_figures(monkeypatch, draw(["猫", "dog"]))
    assert not [w for w in caught if "missing from font" in str(w.message)]
    assert "Glyph" not in capfd.readouterr().err
    ax = confusion.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] != ["猫", "dog"]
    assert "class index: names in confusion_matrix.csv" in ax.get_xlabel()
    assert hardest.axes[0].get_title() == "true #0"
    assert "names in hardest_examples.csv" in hardest.get_suptitle()
    confusion, hardest = _drawn_figures(monkeypatch, draw(["café", "dog"]))
    assert [t.get_text() for t in confusion.axes[0].get_xticklabels()] == ["café", "dog"]
    assert hardest.axes[0].get_title() == "true café"


def test_galleries_say_they_show_the_models_input_and_curves_share_the_step_axis(
    tmp_path, monkeypatch
):
    """The hardest examples' captions say the thumbnails are the model's input (as it saw
    them), and a panel of one evaluation shares the other panels' step axis."""
    from vision_jax.report.figures import curves_figure
    from vision_jax.report.tasks import Classification, Segmentation

    spec, ones = data_lib.InputSpec(2), np.ones(1)
    classes = Classification(["a", "b"], spec, None, 1)
    classes.add({"image": np.zeros((1, 2, 2, 3)), "label": np.zeros(1, int), "row": ones,
                 "mask": ones}, {"probabilities": np.asarray([[0.4, 0.6]])})  # fmt: skip
    pixels = Segmentation(["a", "b"], spec, None, 1)
    pixels.add({"image": np.zeros((1, 2, 2, 3)), "label_map": np.zeros((1, 2, 2), int),
                "row": ones, "mask": ones}, {"label_map": np.zeros((1, 2, 2), int)})  # fmt: skip
    for evaluator in (classes, pixels):
        assert "as the model saw them (its input: resized" in evaluator.result().hardest_caption
    panels = {"train/loss": {"train/loss": (np.arange(0, 101, 10), np.ones(11))},
              "accuracy": {"eval/accuracy": (np.asarray([100]), np.asarray([0.5]))}}  # fmt: skip
    (figure,) = _drawn_figures(monkeypatch, lambda: curves_figure(panels, tmp_path / "c.png"))
    loss, accuracy = figure.axes
    assert accuracy.get_xlim() == loss.get_xlim() and loss.get_xlim()[0] < 10


def test_a_class_absent_from_labels_and_predictions_stays_out_of_the_macro_average():
    """scikit-learn's default labels (those in y_true or y_pred): a class of the run that the
    split never shows and the model never predicts has no scores and no vote in the macro
    average; one that is only predicted (or only labelled) counts with zeros."""
    from sklearn.metrics import classification_report, confusion_matrix

    from vision_jax.report.tables import classification_table

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, 300)  # classes 0-4 labelled
    predicted = np.where(rng.random(300) < 0.6, labels, rng.integers(0, 6, 300))  # 5: predicted
    names = [f"c{i}" for i in range(7)]  # class 6: neither
    want = classification_report(labels, predicted, output_dict=True, zero_division=0)
    table = classification_table(confusion_matrix(labels, predicted, labels=range(7)), names)
    rows = {row[0]: row for row in table.rows + table.totals}
    for i, key in enumerate(("precision", "recall", "f1-score"), start=1):
        for c in range(6):
            assert rows[f"c{c}"][i] == pytest.approx(want[str(c)][key], abs=1e-12)
        assert rows["macro avg"][i] == pytest.approx(want["macro avg"][key], abs=1e-12)
        assert rows["weighted avg"][i] == pytest.approx(want["weighted avg"][key], abs=1e-12)
        assert rows["c6"][i] is None
    assert rows["c6"][4] == 0


def test_the_page_says_which_step_it_shows_and_of_how_many(tmp_path):
    """A latest step short of the run's length (a stopped run) is shown as "step N of M"; a
    best step with the validation figure its selection kept it for, to 4 significant digits
    (a small loss was "0.0000")."""
    from types import SimpleNamespace

    from vision_jax.report import _step

    def trained(step_dir: str, step: int, total: int | None, ema: bool = False):
        record = SimpleNamespace(total_steps=total)
        return SimpleNamespace(step_dir=step_dir, step=step, record=record, ema=ema)

    assert _step(trained("w/checkpoints/20", 20, 100)) == "latest step 20 of 100"
    assert _step(trained("w/checkpoints/100", 100, 100)) == "latest step 100"
    best = tmp_path / "best" / "30"
    (best / "meta").mkdir(parents=True)
    selection = {"metric": "val_ema/miou", "best_value": 0.08966, "best_step": 30}
    (best / "meta" / "metadata").write_text(json.dumps({"selection": selection}))
    assert _step(trained(str(best), 30, 100)) == "best step 30 (val_ema/miou 0.08966)"
    got = _step(trained(str(best), 30, 100, True))
    assert got == "best step 30 (val_ema/miou 0.08966; EMA parameters)"
    selection = {"metric": "val/loss", "best_value": 3.21e-5, "best_step": 30}
    (best / "meta" / "metadata").write_text(json.dumps({"selection": selection}))
    assert _step(trained(str(best), 30, 100)) == "best step 30 (val/loss 3.21e-05)"
    assert _step(trained("w/checkpoints/7", 7, None)) == "latest step 7"


def test_a_task_of_ones_own_gets_the_results_its_run_recorded(tmp_path, monkeypatch):
    """A task without an evaluator got the curves alone; its report now shows the evaluation
    results its run recorded for the step shown (the best step: its validation figures and
    the best checkpoint's on the evaluation split; the latest: that step's), in results.csv."""
    from own_task import DigitValue
    from test_train import small_config

    from vision_jax import tasks

    monkeypatch.setitem(tasks.TASKS, DigitValue.name, DigitValue)
    config = small_config(
        total_steps=4, eval_every_steps=2, eval_batch_size=360, **{"task.name": DigitValue.name},
        **{"input.image_size": 8, "optimizer.learning_rate": 0.01,
           "data.train_split": "train[:80%]", "data.val_split": "train[80%:]"},
    )  # fmt: skip
    result = train_and_evaluate(config, str(tmp_path))
    best = int(result["best/step"])
    write_report(tmp_path)
    rows = {r["result"]: float(r["value"]) for r in _rows(tmp_path / "report" / "results.csv")}
    assert set(rows) == {
        f"{s}/{m}" for s in ("val", "best/eval") for m in ("mse", "mae", "examples")
    }
    assert rows["best/eval/mae"] == pytest.approx(result["eval/mae"], rel=1e-6)
    assert rows["val/mae"] == pytest.approx(result["best/val/mae"], rel=1e-6)
    assert rows["best/eval/examples"] == 360
    page = (tmp_path / "report" / "report.html").read_text()
    assert "Evaluation results" in page and f"recorded for step {best} (best/..." in page
    assert f"<td>best/eval/mae</td><td>{result['eval/mae']:.6g}</td>" in page
    write_report(tmp_path, which="latest")
    rows = {r["result"] for r in _rows(tmp_path / "report" / "results.csv")}
    assert rows == {f"val/{m}" for m in ("mse", "mae", "examples")} | (
        {f"best/eval/{m}" for m in ("mse", "mae", "examples")} if best == 4 else set()
    )


def _image_folders(root: pathlib.Path) -> None:
    """Two classes of two 16-pixel PNGs in train/ and test/ of ``root``."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for name in "ab":
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(2):
                pixels = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")


def test_a_relative_data_root_is_recorded_absolute_and_an_evaluated_report_is_kept(
    tmp_path, monkeypatch, capsys
):
    """A run started with data.root relative to its directory records it absolute: its report,
    written later from another directory, evaluates its split (it gave a page saying the split
    'test' could not be loaded, over the report with figures). A report whose split cannot be
    loaded any more does not replace an evaluated one: one line, exit 1, the files kept."""
    from test_train import small_config

    from vision_jax.evaluate import evaluate_run

    _image_folders(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    cfg = small_config(**{"data.source": "imagefolder", "data.root": "data", "total_steps": 1,
                          "batch_size": 4, "eval_batch_size": 4})  # fmt: skip
    train_and_evaluate(cfg, str(tmp_path / "run"))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert load_trained(tmp_path / "run").spec.data.root == str(tmp_path / "data")
    assert evaluate_run(tmp_path / "run")["eval/examples"] == 4
    assert report_main([f"--workdir={tmp_path / 'run'}"]) == 0
    out = tmp_path / "run" / "report"
    names = ("per_class.csv", "confusion_matrix.csv", "hardest_examples.csv", "report.html")
    evaluated = {n: (out / n).read_bytes() for n in names}
    capsys.readouterr()
    (tmp_path / "data").rename(tmp_path / "moved")
    assert report_main([f"--workdir={tmp_path / 'run'}"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"vision_jax.report: error: Not writing a report without evaluation "
                          f"over the one in {out} (per_class.csv, ")  # fmt: skip
    assert "the split 'test' could not be loaded" in err and "\n" not in err
    assert {n: (out / n).read_bytes() for n in evaluated} == evaluated
