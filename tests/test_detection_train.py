"""Detection runs end to end on a COCO-format folder: learning, mAP equal to pycocotools on the
trained model's own detections of every test image, exact resume, and the parameter-efficient
options (LoRA, freezing) on a detection model."""

from __future__ import annotations

import json
import logging
import os
import pathlib
import shutil

import jax
import numpy as np
import pytest
from helpers import assert_declared_metrics
from PIL import Image
from test_det_data import NAMES, write_coco
from test_train import small_config

from vision_jax import train as train_lib
from vision_jax.report.curves import read_scalars
from vision_jax.tasks import Detection
from vision_jax.tasks.coco_eval import coco_metrics, coco_results
from vision_jax.train import train_and_evaluate
from vision_jax.trees import flatten_dict
from vision_jax.weights.run_dir import latest_step_dir, read_variables
from vision_jax.weights.run_dir import restore_on_one_device as _restore_on_one_device

SIZE = 32


def random_scenes(n: int, seed: int) -> list:
    """(height, width, rects) of ``n`` 32x32 images with 1-2 coloured rectangles of 3 classes."""
    rng = np.random.default_rng(seed)
    scenes = []
    for _ in range(n):
        rects = []
        for _ in range(rng.integers(1, 3)):
            w, h = rng.integers(8, 17, 2)
            x, y = rng.integers(0, SIZE - w + 1), rng.integers(0, SIZE - h + 1)
            rects.append((int(rng.integers(3)), int(x), int(y), int(w), int(h), 0))
        scenes.append((SIZE, SIZE, rects))
    return scenes


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory) -> pathlib.Path:
    root = tmp_path_factory.mktemp("coco")
    write_coco(root, random_scenes(64, 0), "train")
    # 20 = 2.5 eval batches of 8; image ids that are not 1, 2, ... in file order
    write_coco(root, random_scenes(20, 1), "test", ids=[100 + 7 * i for i in range(20)])
    return root


def det_config(root: pathlib.Path, **overrides):
    cfg = small_config(**{
        "task.name": "detection", "data.source": "coco", "data.root": str(root),
        "input.image_size": SIZE, "task.strides": (4, 8), "task.max_boxes": 4,
        "eval_batch_size": 8, "optimizer.name": "adamw", "optimizer.learning_rate": 3e-3,
        **overrides,
    })  # fmt: skip
    cfg.input.flip = True
    return cfg


@pytest.mark.slow
def test_detection_learns_and_map_equals_pycocotools(coco_root, tmp_path, capsys):
    """mAP rises; the reported figures equal pycocotools on the trained model's detections of
    each of the 20 test images, computed here outside the evaluation loop."""
    cfg = det_config(coco_root, **{"total_steps": 60, "eval_before_training": True})
    result = train_and_evaluate(cfg, str(tmp_path), arrays=None)
    assert result["eval/examples"] == 20
    assert result["eval/map"] > result["eval_before/map"] + 0.15, result
    assert {"eval/ap50", "eval/ap/red", "train/box_loss", "train/positives"} <= result.keys()
    assert_declared_metrics(result, Detection)

    task = Detection(strides=(4, 8), max_boxes=4)
    model = task.build_model("cifar_resnet20", len(NAMES))
    variables = read_variables(str(tmp_path))
    truth = json.loads((coco_root / "annotations/instances_test.json").read_text())
    images = np.stack([np.asarray(Image.open(coco_root / "test" / im["file_name"]).convert("RGB"))
                       for im in truth["images"]])  # fmt: skip
    outputs = model.apply(variables, (images.astype(np.float32) - 127.5) / 127.5)
    found = jax.device_get(task.detect(outputs, (SIZE, SIZE)))  # square images: scale 1
    found["image_ids"] = np.asarray([im["id"] for im in truth["images"]])
    category_ids = sorted(c["id"] for c in truth["categories"])
    names = [c["name"] for c in sorted(truth["categories"], key=lambda c: c["id"])]
    want = coco_metrics(
        truth, coco_results(found, category_ids, truth["images"]), found["image_ids"], names
    )
    assert result["eval/map"] == pytest.approx(want["map"], abs=2e-3)
    assert result["eval/ap50"] == pytest.approx(want["ap50"], abs=2e-3)
    _check_predict(tmp_path, coco_root, truth, result, capsys)


def _check_predict(workdir: pathlib.Path, coco_root: pathlib.Path, truth: dict, result: dict,
                   capsys) -> None:  # fmt: skip
    """``python -m vision_jax.predict`` on the test images (and one unreadable file) with the
    ground truth's image ids (``--coco_annotations``, a copy naming the unreadable file too):
    pycocotools scores its COCO results as the evaluation did; boxes are drawn on copies of the
    images. A file that the annotations do not name is an error naming it."""
    from vision_jax import predict

    folder = workdir / "images"
    shutil.copytree(coco_root / "test", folder)
    (folder / "broken.png").write_bytes(b"not an image")
    broken = {"id": 5, "file_name": "broken.png", "width": SIZE, "height": SIZE}
    annotations = workdir / "instances.json"
    annotations.write_text(json.dumps({**truth, "images": [*truth["images"], broken]}))
    output, drawn = workdir / "detections.json", workdir / "drawn"
    argv = [f"--workdir={workdir}", f"--input={folder}", f"--output={output}",
            f"--coco_annotations={annotations}", "--batch_size=6"]  # fmt: skip
    assert predict.main([*argv, f"--draw={drawn}"]) == 0
    results = json.loads(output.read_text())
    id_of = {str(folder / im["file_name"]): im["id"] for im in truth["images"]}
    assert {r["file_name"] for r in results} <= set(id_of)
    for r in results:
        assert r["image_id"] == id_of[r["file_name"]]
        assert NAMES[(r["category_id"] - 2) // 2] == r["category_name"]  # ids 2, 4, ...
    names = [c["name"] for c in sorted(truth["categories"], key=lambda c: c["id"])]
    got = coco_metrics(truth, results, list(id_of.values()), names)
    assert got["map"] == pytest.approx(result["eval/map"], abs=2e-3)
    shutil.copy(folder / truth["images"][0]["file_name"], folder / "extra.png")
    argv[-2] = f"--coco_annotations={coco_root / 'annotations/instances_test.json'}"
    capsys.readouterr()
    assert predict.main(argv) == 1
    error = capsys.readouterr().err
    assert "2 file(s) are not images of" in error and f"{folder}/broken.png" in error
    assert sorted(p.name for p in drawn.iterdir() if not p.name.startswith(".")) == sorted(
        f"{im['file_name'][:-4]}.png" for im in truth["images"]
    )  # and predict's hidden marker of the files it wrote there
    best = max(results, key=lambda r: r["score"])  # its box outline is drawn on the image
    x, y, w, h = (int(round(v)) for v in best["bbox"])
    before = np.asarray(Image.open(best["file_name"]).convert("RGB"), np.int32)
    after = np.asarray(Image.open(drawn / (pathlib.Path(best["file_name"]).stem + ".png")))
    edge = (slice(min(y + h, SIZE - 1), min(y + h, SIZE - 1) + 1), slice(x, x + w))
    assert np.abs(after[edge].astype(np.int32) - before[edge]).max() > 30


@pytest.mark.slow
def test_detection_resumes_exactly(coco_root, tmp_path):
    """4 steps straight, then the same run resumed from step 2: the same step-4 variables."""
    cfg = det_config(coco_root, total_steps=4, checkpoint_every_steps=2, keep_checkpoints=5)
    cfg.input.scale_jitter = (0.75, 1.5)  # augmentation randomness must resume too
    train_and_evaluate(cfg, str(tmp_path))
    straight = read_variables(str(tmp_path))
    shutil.rmtree(tmp_path / "checkpoints" / "4")
    train_and_evaluate(cfg, str(tmp_path))
    resumed = read_variables(str(tmp_path))
    for x, y in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed), strict=True):
        np.testing.assert_array_equal(x, y)


def _trained_names(workdir) -> set[str]:
    state = _restore_on_one_device(os.path.join(latest_step_dir(str(workdir)), "state"))
    return set(flatten_dict(state["params"]))


@pytest.mark.slow
def test_lora_and_frozen_backbone_on_a_detection_model(coco_root, tmp_path):
    vit = {"model.name": "vit_ti16", "total_steps": 2, "task.strides": (8, 16)}
    result = train_and_evaluate(det_config(coco_root, **vit, **{"lora.rank": 2}),
                                str(tmp_path / "lora"))  # fmt: skip
    assert np.isfinite(result["train/loss"]) and result["eval/examples"] == 20
    trained = _trained_names(tmp_path / "lora")
    adapters = {k for k in trained if k.rsplit("/", 1)[-1] in ("lora_a", "lora_b")}
    assert len(adapters) == 12 * 2 * 2
    head = {k for k in trained if k.startswith("task_head/")}
    assert trained == adapters | head and len(head) > 20  # pyramid and towers train too

    frozen = det_config(coco_root, **{"total_steps": 2, "optimizer.trainable": "head"})
    train_and_evaluate(frozen, str(tmp_path / "frozen"))  # the CIFAR ResNet: a cheaper compile
    trained = _trained_names(tmp_path / "frozen")
    assert trained and all(k.startswith("task_head/") for k in trained)
    variables = read_variables(str(tmp_path / "frozen"))  # the backbone saved once, beside
    assert "conv1" in variables["params"] and "batch_stats" in variables


def test_splits_whose_category_ids_differ_are_named(tmp_path):
    """The same category names under other ids in the eval split's file: an error listing the
    classes of each split in order (the order of their ids) with their ids."""
    write_coco(tmp_path, random_scenes(4, 0), "train")
    truth = write_coco(tmp_path, random_scenes(4, 1), "test")
    swap = {2: 4, 4: 2}  # the first two classes trade ids
    for record in truth["categories"] + truth["annotations"]:
        key = "id" if "name" in record else "category_id"
        record[key] = swap.get(record[key], record[key])
    (tmp_path / "annotations/instances_test.json").write_text(json.dumps(truth))
    first, second = NAMES[:2]
    with pytest.raises(ValueError, match=rf"another order \(train: {first} \(id 2\), {second} "
                       rf"\(id 4\), .*; eval: {second} \(id 2\), {first} \(id 4\)"):  # fmt: skip
        train_and_evaluate(det_config(tmp_path), str(tmp_path / "run"))


def test_class_names_whose_ap_keys_collide_are_refused(tmp_path):
    """'a/b' and 'a_b' would both report as ap/a_b (a '/' becomes '_'), one overwriting the
    other: refused before training, naming both."""
    for split, seed in (("train", 0), ("test", 1)):
        truth = write_coco(tmp_path, random_scenes(4, seed), split)
        truth["categories"][0]["name"], truth["categories"][1]["name"] = "a/b", "a_b"
        (tmp_path / f"annotations/instances_{split}.json").write_text(json.dumps(truth))
    with pytest.raises(ValueError, match="The classes 'a_b' and 'a/b' would both report as ap/a_b"):
        train_and_evaluate(det_config(tmp_path), str(tmp_path / "run"))


def test_train_images_of_more_boxes_than_max_boxes_are_refused_before_compiling(
    tmp_path, monkeypatch
):
    dense = (SIZE, SIZE, [(1, x, y, 8, 8, 0) for x in (0, 12, 24) for y in (0, 16)])
    write_coco(tmp_path, [*random_scenes(3, 0), dense], "train")
    write_coco(tmp_path, random_scenes(2, 1), "test")

    def compile_ahead(run):
        raise AssertionError("the steps compile before the split's boxes are checked")

    monkeypatch.setattr(train_lib, "_compile_ahead", compile_ahead)
    with pytest.raises(ValueError, match=r"holds 6 boxes .* Raise task.max_boxes to at least 6"):
        train_and_evaluate(det_config(tmp_path), str(tmp_path / "run"))


def test_a_run_on_boxes_no_location_is_positive_for_warns_before_compiling(
    tmp_path, monkeypatch, caplog
):
    tiny = (SIZE, SIZE, [(0, 15, 15, 2, 2, 0)])  # between the stride-4 centres 14 and 18
    write_coco(tmp_path, [*random_scenes(2, 0), tiny, tiny], "train")
    write_coco(tmp_path, random_scenes(2, 1), "test")

    def compile_ahead(run):
        raise KeyboardInterrupt  # (stops the run here)

    monkeypatch.setattr(train_lib, "_compile_ahead", compile_ahead)
    with caplog.at_level(logging.WARNING), pytest.raises(KeyboardInterrupt):
        train_and_evaluate(det_config(tmp_path), str(tmp_path / "run"))
    assert "get no positive location at task.strides=(4, 8) on 32 px inputs" in caplog.text


@pytest.mark.parametrize(
    "overrides,match",
    [
        ({"task.head": "retina"}, "Unknown task.head 'retina'"),
        ({"loss": "softmax_xent"}, "focal_giou"),
        ({"task.strides": (3, 6)}, "no level at stride 3"),
        ({"input.randaugment_layers": 2}, "randaugment"),
    ],
)
def test_detection_config_errors(coco_root, tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        train_and_evaluate(det_config(coco_root, **overrides), str(tmp_path))


def test_a_detection_key_with_segmentation_is_an_error(coco_root, tmp_path):
    from vision_jax.config import UnreadConfigKeysError

    cfg = det_config(coco_root, **{"task.name": "segmentation", "data.source": "arrays",
                                   "data.root": None})  # fmt: skip
    match = r"task.max_boxes \(read by detection runs; this run's task.name is 'segmentation'\)"
    with pytest.raises(UnreadConfigKeysError, match=match):
        train_and_evaluate(cfg, str(tmp_path), arrays={})


ON_DEVICES = """
import json, sys
sys.path.insert(0, {tests!r})
from test_detection_train import det_config
from vision_jax.train import train_and_evaluate
import pathlib, jax
result = train_and_evaluate(det_config(pathlib.Path(sys.argv[1]), **json.loads(sys.argv[3])),
                            sys.argv[2])
print("RESULT", json.dumps({{"devices": jax.device_count(), **result}}))
"""


def _first_step_scalars(workdir: pathlib.Path) -> dict[str, float]:
    scalars = read_scalars(workdir)
    keys = ("train/loss", "train/box_loss", "train/class_loss", "train/grad_norm")
    return {k: float(scalars[k][1][list(scalars[k][0]).index(1)]) for k in keys}


@pytest.mark.slow
def test_detection_on_eight_devices_with_fsdp_matches_one_device(coco_root, tmp_path):
    """A detection run on 1 device and on a data x fsdp mesh of 8 (batch-sharded boxes, in-step
    assignment): the same first-step loss and gradient norm; the 1-device run's checkpoint,
    resumed on the 8-device mesh, evaluates (replicated detections gathered for pycocotools)
    to the same figures. Later training steps are not compared: AdamW's first update divides
    each gradient by its own size, so last-bit differences of sharded sums in near-zero
    gradients become whole-step updates (1e-3 in the loss after two steps)."""
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parents[1]
    recipe = {"total_steps": 2, "log_every_steps": 1}
    sharded = {**recipe, "mesh": "data:-1,fsdp:2", "fsdp_min_size": 256}

    def run(devices: int, workdir: pathlib.Path, overrides: dict) -> dict:
        proc = subprocess.run(
            [sys.executable, "-c", ON_DEVICES.format(tests=str(root / "tests")), str(coco_root),
             str(workdir), json.dumps(overrides)],
            env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS":
                 f"{os.environ['XLA_FLAGS']} --xla_force_host_platform_device_count={devices}"},
            capture_output=True, text=True, timeout=600, cwd=root,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
        result = json.loads(line[len("RESULT ") :])
        assert result["devices"] == devices
        return result

    one = run(1, tmp_path / "1", recipe)
    run(8, tmp_path / "8", sharded)
    first_one, first_eight = (_first_step_scalars(tmp_path / str(n)) for n in (1, 8))
    for key, value in first_one.items():
        assert first_eight[key] == pytest.approx(value, rel=2e-5), key

    shutil.copytree(tmp_path / "1", tmp_path / "resumed")
    eight = run(8, tmp_path / "resumed", sharded)  # finished: evaluates again, on 8 devices
    assert eight["eval/examples"] == one["eval/examples"] == 20
    assert one["eval/map"] > 0.02, one
    # Scores of a 2-step model are near ties: sharded float sums reorder a few detections.
    for key in ("eval/map", "eval/ap50"):
        assert eight[key] == pytest.approx(one[key], abs=5e-3), key
