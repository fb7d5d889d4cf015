"""Synthetic scenes: the pure compositing function on hand-made arrays, then a tiny dataset
generated from ../shared (layout, COCO boxes, determinism)."""

from __future__ import annotations

import io
import json
import pathlib
import re
import zipfile

import numpy as np
import pytest
from PIL import Image

from vision_jax.data import scenes
from vision_jax.data.sources import DataError


def _tight_box(where: np.ndarray) -> list[float]:
    rows, cols = np.any(where, axis=1), np.any(where, axis=0)
    y0, y1 = np.flatnonzero(rows)[[0, -1]]
    x0, x1 = np.flatnonzero(cols)[[0, -1]]
    return [float(x0), float(y0), float(x1 - x0 + 1), float(y1 - y0 + 1)]


def _blob(rng: np.random.Generator) -> np.ndarray:
    """A 28x28 gray item: a bright random rectangle with a dark hole, on black."""
    gray = np.zeros((28, 28), np.uint8)
    y0, x0 = rng.integers(0, 10, 2)
    y1, x1 = rng.integers(18, 28, 2)
    gray[y0:y1, x0:x1] = rng.integers(120, 256, (y1 - y0, x1 - x0))
    gray[12:15, 12:15] = 0
    return gray


def test_compose_random_items_match_mask_and_boxes():
    rng = np.random.default_rng(3)
    background = np.zeros((70, 90, 3), np.uint8)
    classes = [4, 0, 9, 2, 7]
    items = [(_blob(rng), c) for c in classes]
    image, mask, boxes = scenes.compose_scene(background, items, np.random.default_rng(1))
    assert image.shape == background.shape and image.dtype == np.uint8
    assert mask.shape == background.shape[:2] and mask.dtype == np.uint8
    assert set(np.unique(mask)) <= {0, *(c + 1 for c in classes)}
    # Items are painted exactly where the mask says, in colour (not gray).
    np.testing.assert_array_equal(mask > 0, np.any(image != background, axis=-1))
    painted = image[mask > 0].astype(int)
    assert np.mean(painted.max(-1) - painted.min(-1)) > 10
    # Boxes: tight boxes of each item's visible pixels (classes are distinct here).
    assert boxes, "at least one item should stay visible"
    for box in boxes:
        visible = mask == box["category_id"]
        assert box["category_id"] == classes[box["item"]] + 1
        assert box["bbox"] == _tight_box(visible)
        assert box["area"] == int(visible.sum())
    # Same generator state, same scene.
    again = scenes.compose_scene(background, items, np.random.default_rng(1))
    np.testing.assert_array_equal(again[1], mask)
    assert again[2] == boxes


def _full_and_left_half() -> tuple[np.ndarray, np.ndarray]:
    full = np.full((28, 28), 200, np.uint8)
    left = np.zeros((28, 28), np.uint8)
    left[:, :14] = 200
    return full, left


def _compose_exact(items):
    """Every item covers the whole 56x56 image (scale 1, nearest): placement is fixed."""
    background = np.full((56, 56, 3), 30, np.uint8)
    rng = np.random.default_rng(0)
    kwargs = dict(min_scale=1.0, max_scale=1.0, resample="nearest")
    return scenes.compose_scene(background, items, rng, **kwargs)


def test_compose_later_items_occlude_earlier_ones():
    full, left = _full_and_left_half()
    _, mask, boxes = _compose_exact([(full, 1), (left, 4)])
    assert (mask[:, :28] == 5).all() and (mask[:, 28:] == 2).all()
    assert [b["item"] for b in boxes] == [0, 1]
    assert boxes[0]["bbox"] == [28.0, 0.0, 28.0, 56.0] and boxes[0]["area"] == 28 * 56
    assert boxes[1]["bbox"] == [0.0, 0.0, 28.0, 56.0]
    # Reversed: the full item hides the half one entirely, which then gets no box.
    _, mask, boxes = _compose_exact([(left, 4), (full, 1)])
    assert (mask == 2).all()
    assert [b["item"] for b in boxes] == [1]


def test_compose_mostly_occluded_item_keeps_pixels_and_a_crowd_box():
    """Under min_visible of an item visible: its box is a crowd region (COCO's ignore), so a
    visible object is neither asked for nor background."""
    full = np.full((28, 28), 200, np.uint8)
    most = full.copy()
    most[:, 21:] = 0  # covers 3/4 of the image: the first item keeps 1/4 < min_visible
    _, mask, boxes = _compose_exact([(full, 6), (most, 2)])
    assert (mask[:, 42:] == 7).all() and (mask[:, :42] == 3).all()
    assert [(b["item"], b["crowd"]) for b in boxes] == [(0, True), (1, False)]
    assert boxes[0]["bbox"] == [42.0, 0.0, 14.0, 56.0] and boxes[0]["category_id"] == 7


def test_compose_rejects_bad_inputs():
    rng = np.random.default_rng(0)
    gray = np.full((28, 28), 200, np.uint8)
    with pytest.raises(ValueError, match="background"):
        scenes.compose_scene(np.zeros((8, 8), np.uint8), [(gray, 0)], rng)
    with pytest.raises(ValueError, match="scale"):
        scenes.compose_scene(np.zeros((8, 8, 3), np.uint8), [(gray, 0)], rng, max_scale=2.0)


def test_background_pools_are_disjoint_and_stable():
    names = [f"val/n{i % 3}/img{i}.JPEG" for i in range(200)] + ["val/readme.txt"]
    pools = scenes.background_pools(names)
    assert not set(pools["train"]) & set(pools["test"])
    assert len(pools["train"]) + len(pools["test"]) == 200
    assert 0 < len(pools["test"]) < len(pools["train"])
    assert scenes.background_pools(names[::-1]) == pools
    split = scenes.background_pools(["train/a/1.jpg", "test/a/2.jpg", "train/b/3.png"])
    assert split == {"train": ["train/a/1.jpg", "train/b/3.png"], "test": ["test/a/2.jpg"]}


def test_missing_shared_file_names_the_path(tmp_path):
    with pytest.raises(DataError, match=re.escape(str(tmp_path / "data" / "fashion_mnist"))):
        scenes.generate_scenes(str(tmp_path / "out"), shared_dir=str(tmp_path), num_train=1)


# ---------------------------------------------------------------------------- from ../shared

SMALL = dict(num_train=6, num_test=4, image_size=64)


def _files(root: pathlib.Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def generated(shared_dir, tmp_path_factory) -> tuple[pathlib.Path, dict]:
    out = tmp_path_factory.mktemp("scenes")
    summary = scenes.generate_scenes(str(out), shared_dir=str(shared_dir), seed=0, **SMALL)
    return out, summary


def test_generated_layout_and_boxes(generated):
    out, summary = generated
    names = (out / "classes.txt").read_text().splitlines()
    assert names == ["background", *scenes.FASHION_MNIST_CLASSES]
    assert json.loads((out / "scenes.json").read_text())["params"]["seed"] == 0
    for split, count in (("train", 6), ("test", 4)):
        coco = json.loads((out / "annotations" / f"instances_{split}.json").read_text())
        assert [c["id"] for c in coco["categories"]] == list(range(1, 11))
        assert len(coco["images"]) == count == summary[split]["images"]
        assert len(coco["annotations"]) == summary[split]["boxes"] > 0
        crowd = sum(a["iscrowd"] for a in coco["annotations"])
        assert crowd == summary[split]["crowd_regions"]
        sizes = {}
        for entry in coco["images"]:
            image = Image.open(out / split / "images" / entry["file_name"])
            mask = Image.open(out / split / "masks" / entry["file_name"].replace(".jpg", ".png"))
            assert image.mode == "RGB" and mask.mode == "L"
            assert image.size == mask.size == (entry["width"], entry["height"]) == (64, 64)
            assert np.asarray(mask).max() <= 10
            sizes[entry["id"]] = (entry["width"], entry["height"])
        for ann in coco["annotations"]:
            x, y, w, h = ann["bbox"]
            width, height = sizes[ann["image_id"]]
            assert w > 0 and h > 0 and x >= 0 and y >= 0 and x + w <= width and y + h <= height
            assert 1 <= ann["category_id"] <= 10 and ann["iscrowd"] in (0, 1)
            assert 0 < ann["area"] <= w * h
        fractions = summary[split]["pixel_fraction"]
        assert abs(sum(fractions.values()) - 1) < 1e-4 and fractions["background"] > 0.3


def test_generated_coco_loads_with_pycocotools(generated):
    coco_lib = pytest.importorskip("pycocotools.coco")
    out, summary = generated
    coco = coco_lib.COCO(str(out / "annotations" / "instances_train.json"))
    assert len(coco.getImgIds()) == 6 and len(coco.getAnnIds()) == summary["train"]["boxes"]


def test_generation_is_deterministic(generated, shared_dir, tmp_path):
    out, _ = generated
    scenes.generate_scenes(str(tmp_path / "same"), shared_dir=str(shared_dir), seed=0, **SMALL)
    assert _files(tmp_path / "same") == _files(out)
    # A different seed gives other scenes; regenerating into the same folder replaces them.
    scenes.generate_scenes(str(tmp_path / "same"), shared_dir=str(shared_dir), seed=1, **SMALL)
    other = _files(tmp_path / "same")
    assert other.keys() == _files(out).keys()
    assert other["train/masks/000000.png"] != _files(out)["train/masks/000000.png"]


def test_refuses_a_foreign_non_empty_folder(shared_dir, tmp_path):
    (tmp_path / "keep.txt").write_text("not ours")
    with pytest.raises(DataError, match="not empty"):
        scenes.generate_scenes(str(tmp_path), shared_dir=str(shared_dir), num_train=1, num_test=1)


# ---------------------------------------------------------------------------- other items


def _write_idx(path: pathlib.Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(s.to_bytes(4, "big") for s in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def _other_items(tmp_path: pathlib.Path, num_classes: int) -> tuple[str, str]:
    """An IDX item folder with labels 0 .. num_classes - 1 and a zip of plain backgrounds."""
    items = tmp_path / "items"
    items.mkdir()
    gray = np.zeros((2 * num_classes, 8, 8), np.uint8)
    gray[:, 2:6, 2:6] = 200
    for prefix in ("train", "t10k"):
        _write_idx(items / f"{prefix}-images-idx3-ubyte", gray)
        _write_idx(items / f"{prefix}-labels-idx1-ubyte", np.arange(2 * num_classes) % num_classes)
    backgrounds = tmp_path / "backgrounds.zip"
    with zipfile.ZipFile(backgrounds, "w") as archive:
        for split in ("train", "test"):
            picture = io.BytesIO()
            Image.new("RGB", (32, 32), (30, 60, 90)).save(picture, "PNG")
            archive.writestr(f"{split}/a.png", picture.getvalue())
    return str(items), str(backgrounds)


def _written_names(out: pathlib.Path) -> list[str]:
    coco = json.loads((out / "annotations" / "instances_train.json").read_text())
    names = [c["name"] for c in coco["categories"]]
    assert (out / "classes.txt").read_text().splitlines() == ["background", *names]
    return names


def test_other_items_are_named_by_their_labels_or_the_given_names(tmp_path, capsys):
    items, backgrounds = _other_items(tmp_path, 3)
    args = [f"--items_dir={items}", f"--background_zip={backgrounds}", "--num_train=2",
            "--num_test=1", "--image_size=32"]  # fmt: skip
    assert scenes.main([*args, f"--out={tmp_path / 'plain'}"]) == 0
    assert _written_names(tmp_path / "plain") == ["class_0", "class_1", "class_2"]
    summary = json.loads(capsys.readouterr().out)
    assert list(summary["train"]["pixel_fraction"]) == ["background", "class_0", "class_1",
                                                        "class_2"]  # fmt: skip
    assert scenes.main([*args, f"--out={tmp_path / 'named'}", "--class_names=cat, dog,ship"]) == 0
    assert _written_names(tmp_path / "named") == ["cat", "dog", "ship"]


def test_other_items_with_too_few_names_are_refused(tmp_path, capsys):
    items, backgrounds = _other_items(tmp_path, 25)
    out = tmp_path / "out"
    args = [f"--items_dir={items}", f"--background_zip={backgrounds}", "--num_train=1",
            "--num_test=1", "--image_size=32", f"--out={out}"]  # fmt: skip
    assert scenes.main([*args, "--class_names=a,b"]) == 2
    error = capsys.readouterr().err
    assert "IDX labels reach 24; only 2 class names given (--class_names)" in error
    names = ",".join(["a", "a", *(f"c{c}" for c in range(23))])
    assert scenes.main([*args, f"--class_names={names}"]) == 2  # the same name twice
    error = capsys.readouterr().err
    assert (
        error
        == f"error: Class names must differ: a given more than once (--class_names={names}).\n"
    )
    assert scenes.main(args) == 0
    assert _written_names(out) == [f"class_{c}" for c in range(25)]


def test_items_without_box_counts_only_hidden_items_not_crowd_regions(tmp_path, monkeypatch):
    """Three items a scene: one boxed, one a crowd region, one hidden entirely."""
    items, backgrounds = _other_items(tmp_path, 3)

    def compose(background, scene, rng, **kwargs):
        assert len(scene) == 3
        mask = np.zeros(background.shape[:2], np.uint8)
        boxes = [{"item": k, "category_id": 1, "bbox": [1.0, 1.0, 4.0, 4.0], "area": 16,
                  "crowd": crowd} for k, crowd in ((0, False), (1, True))]  # fmt: skip
        return background, mask, boxes

    monkeypatch.setattr(scenes, "compose_scene", compose)
    summary = scenes.generate_scenes(
        str(tmp_path / "out"), items_dir=items, background_zip=backgrounds, num_train=2,
        num_test=1, image_size=32, min_items=3, max_items=3,
    )  # fmt: skip
    assert summary["train"]["boxes"] == 4 and summary["train"]["crowd_regions"] == 2
    assert summary["train"]["items_without_box"] == 2
