"""Detection data: COCO and tfds box sources, boxes that follow their objects through flips,
scale jitter and crops, letterboxed evaluation, validation of the ground truth, and resumption."""

from __future__ import annotations

import itertools
import json
import logging
import pathlib

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from vision_jax import data as data_lib
from vision_jax import specs
from vision_jax.config import TrackedConfig, default_config
from vision_jax.data import boxes as boxes_lib
from vision_jax.data.preprocess import InputSpec, make_preprocess

# Object colours by class; the background is grey, padding black (0 with mean 0).
COLOURS = {
    0: (230, 30, 30),
    1: (30, 230, 30),
    2: (30, 30, 230),
    3: (230, 230, 30),
    4: (230, 30, 230),
    5: (30, 230, 230),
}
GREY = (128, 128, 128)
NAMES = ("red", "green", "blue", "yellow", "magenta", "cyan")
BOX_KEYS = {"image", "boxes", "classes", "valid", "crowd"}

# (class, x, y, w, h, iscrowd) on a 60 x 90 image; the last one touches the right edge.
RECTS = [
    (0, 4, 5, 14, 12, 0),
    (1, 26, 3, 12, 20, 0),
    (2, 48, 30, 16, 14, 0),
    (3, 6, 38, 20, 16, 1),
    (4, 74, 8, 16, 24, 0),
]


def draw(height: int, width: int, rects) -> np.ndarray:
    image = np.full((height, width, 3), GREY, np.uint8)
    for cls, x, y, w, h, _ in rects:
        image[y : y + h, x : x + w] = COLOURS[cls]
    return image


def write_coco(root: pathlib.Path, scenes: list, split: str = "train", ids=None) -> dict:
    """root/<split>/<i>.png and root/annotations/instances_<split>.json; ``scenes`` holds
    (height, width, rects) per image. Returns the JSON. Category ids are 2, 4, ... (class * 2 + 2)
    to tell class indices from ids."""
    (root / split).mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(exist_ok=True)
    ids = ids or list(range(1, len(scenes) + 1))
    coco = {"images": [], "annotations": [], "categories": []}
    for image_id, (height, width, rects) in zip(ids, scenes, strict=True):
        name = f"{image_id:03d}.png"
        Image.fromarray(draw(height, width, rects)).save(root / split / name)
        coco["images"].append({"id": image_id, "file_name": name, "width": width, "height": height})
        for cls, x, y, w, h, crowd in rects:
            coco["annotations"].append(
                {
                    "id": len(coco["annotations"]) + 1,
                    "image_id": image_id,
                    "category_id": 2 * cls + 2,
                    "bbox": [x, y, w, h],
                    "area": w * h,
                    "iscrowd": crowd,
                }
            )
    coco["categories"] = [{"id": 2 * c + 2, "name": n} for c, n in reversed(list(enumerate(NAMES)))]
    path = root / "annotations" / f"instances_{split}.json"
    path.write_text(json.dumps(coco))
    return coco


def data_config(**overrides) -> TrackedConfig:
    return TrackedConfig({"data": {**default_config().data.to_dict(), **overrides}})


def coco_source(root: pathlib.Path, split: str = "train", **overrides) -> data_lib.Source:
    cfg = data_config(source="coco", root=str(root), **overrides)
    return data_lib.load_source(specs.data_spec(cfg.data), split, target="boxes")


def spec_of(**overrides) -> InputSpec:
    """Pixels stay 0..255: mean 0, std 1/255 (so padding is black); no augmentation."""
    base = {"image_size": 48, "mean": (0,) * 3, "std": (1 / 255,) * 3, "random_crop": False}
    return InputSpec(**{**base, **overrides})


def xyxy(rect) -> list[float]:
    _, x, y, w, h, _ = rect
    return [x, y, x + w, y + h]


def nearest_class(image: np.ndarray) -> np.ndarray:
    """The class whose colour is nearest each pixel; -1 for grey, -2 for black."""
    colours = np.array([*COLOURS.values(), GREY, (0, 0, 0)], np.float32)
    classes = np.array([*COLOURS, -1, -2])
    return classes[((image[..., None, :] - colours) ** 2).sum(-1).argmin(-1)]


# Boxes follow their objects.

CROPS = {
    "scale_jitter": dict(scale_jitter=(1.0, 2.5)),
    "random_crop": dict(random_crop=True, crop_padding=4, resize_size=64),
    "letterbox": dict(),
}


def check_boxes_on_objects(out: dict[str, np.ndarray]) -> set[int]:
    """Each kept box tightly bounds its colour; a class without a box shows (almost) nothing.
    Returns the kept classes."""
    classes = nearest_class(out["image"])
    kept = set()
    for box, cls, valid, crowd in zip(
        out["boxes"], out["classes"], out["valid"], out["crowd"], strict=True
    ):
        if not valid and not crowd:
            assert not box.any() and cls == 0  # padding rows are all 0
            continue
        assert crowd == (cls == 3) and valid == 1 - crowd
        ys, xs = np.nonzero(classes == cls)
        found = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
        np.testing.assert_allclose(box, found, atol=0.75)  # tight: pixel rounding only
        x0, y0, x1, y1 = np.round(box).astype(int)
        assert (classes[y0 + 1 : y1 - 1, x0 + 1 : x1 - 1] == cls).all()
        kept.add(int(cls))
    for cls in set(COLOURS) - kept:
        ys, xs = np.nonzero(classes == cls)
        assert len(ys) == 0 or min(np.ptp(xs), np.ptp(ys)) < 2  # at most a sliver
    return kept


@pytest.mark.parametrize("crop", sorted(CROPS))
def test_boxes_stay_on_their_objects_under_augmentation(tmp_path, crop):
    write_coco(tmp_path, [(60, 90, RECTS)])
    source = coco_source(tmp_path)
    table = boxes_lib.box_table(source.annotations, source.category_ids)
    spec = spec_of(flip=True, **CROPS[crop])
    example = {"path": tf.constant(source.columns["path"][0]), "row": tf.constant(0)}
    dropped, cut, flipped = 0, 0, 0
    for seed in range(10):
        fn = make_preprocess(
            spec, train=True, seed=seed, target="boxes", box_table=table, max_boxes=6
        )
        out = {k: v.numpy() for k, v in fn(tf.constant(seed), example).items()}
        assert out.keys() == BOX_KEYS | {"index"}
        assert out["boxes"].shape == (6, 4) and out["classes"].dtype == np.int32
        kept = check_boxes_on_objects(out)
        rows = out["valid"] + out["crowd"]
        assert (rows[: len(kept)] == 1).all() and not rows[len(kept) :].any()  # kept first
        dropped += len(RECTS) - len(kept)
        cut += ((out["boxes"][rows == 1] % 48) == 0).any(1).sum()  # at the window's border
        centre = {c: out["boxes"][i, 0] for i, c in enumerate(out["classes"]) if rows[i]}
        flipped += {0, 1} <= centre.keys() and centre[0] > centre[1]  # red left of green
    assert flipped > 0
    if crop == "letterbox":
        assert dropped == 0
    else:
        assert dropped > 0 and cut > 0


def test_box_example_shapes_are_those_of_the_batches(tmp_path):
    """The shapes the steps compile against ahead of the data are those of box batches."""
    write_coco(tmp_path, [(60, 90, RECTS), (50, 40, RECTS[:2])])
    source, spec = coco_source(tmp_path), spec_of(flip=True)
    rows = lambda batch: {k: (v.shape[1:], v.dtype) for k, v in batch.items()}
    train = data_lib.train_batches(source, spec, global_batch=2, seed=0, max_boxes=6)
    try:
        assert rows(next(train)) == data_lib.train_example_shapes(source, spec, max_boxes=6)
    finally:
        train.close()
    evaluation = data_lib.eval_batches(source, spec, global_batch=2, max_boxes=6)
    assert rows(next(evaluation)) == data_lib.eval_example_shapes(source, spec, max_boxes=6)


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
@pytest.mark.parametrize("scale", [0.5, 1.5])
def test_resampled_window_equals_pil_resize(interpolation, scale):
    """The letterbox window holds PIL's resize of the image (float pixels, per channel, clamped
    to 0..255 as PIL's 8-bit images are) by the chosen interpolation, zeros around it."""
    image = np.random.default_rng(1).uniform(0, 255, (20, 30, 3)).astype(np.float32)
    out, inside = boxes_lib.resample(tf.constant(image), tf.constant(scale), tf.zeros([2]), 48,
                                     interpolation)  # fmt: skip
    h, w = round(20 * scale), round(30 * scale)
    resample = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}[interpolation]
    pil = np.stack([np.asarray(Image.fromarray(image[..., c]).resize((w, h), resample))
                    for c in range(3)], -1)  # fmt: skip
    np.testing.assert_allclose(out.numpy()[:h, :w], np.clip(pil, 0, 255), atol=0.02)
    assert not out.numpy()[h:].any() and inside.numpy()[:h, :w].all()


def test_eval_letterbox_scales_back_to_the_original_boxes(tmp_path):
    sizes = [(40, 64), (64, 40), (30, 30), (20, 50), (50, 21)]
    scenes = [(h, w, [(i % 6, 2, 3, w // 3, h // 2, i == 2)]) for i, (h, w) in enumerate(sizes)]
    scenes[3] = (20, 50, [])  # an image without objects
    ids = [10, 20, 7, 3, 42]
    coco = write_coco(tmp_path, scenes, ids=ids)
    source = coco_source(tmp_path)
    assert source.class_names == list(NAMES) and source.category_ids == [2, 4, 6, 8, 10, 12]
    batches = list(
        data_lib.eval_batches(source, spec_of(image_size=32), global_batch=2, max_boxes=3)
    )
    assert len(batches) == 3
    eval_keys = {"image_id", "scale", "extent", "mask", "row"}
    assert all(b.keys() == BOX_KEYS | eval_keys for b in batches)
    batch = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
    np.testing.assert_array_equal(batch["mask"], [1] * 5 + [0])
    assert sorted(batch["image_id"][:5]) == sorted(ids) and batch["image_id"][5] == 0
    assert batch["image_id"].dtype == np.int32 and batch["scale"].dtype == np.float32
    for row, image_id in enumerate(batch["image_id"][:5]):
        (height, width, rects) = scenes[ids.index(image_id)]
        scale = batch["scale"][row]
        assert scale == pytest.approx(32 / max(height, width))
        np.testing.assert_allclose(batch["extent"][row], [height * scale, width * scale])
        real = batch["valid"][row] + batch["crowd"][row] == 1
        np.testing.assert_allclose(
            batch["boxes"][row][real] / scale,
            np.reshape([xyxy(r) for r in rects], (-1, 4)),
            atol=1e-4,
        )
        assert batch["crowd"][row].sum() == sum(r[5] for r in rects)
        image = batch["image"][row]
        h, w = round(height * scale), round(width * scale)
        assert not image[h:].any() and not image[:, w:].any()  # padding: 0 after normalising
        assert (nearest_class(image[:h, :w]) != -2).all()  # no padding inside the image
        for cls, x, y, rw, rh, _ in rects:
            centre = image[round((y + rh / 2) * scale), round((x + rw / 2) * scale)]
            np.testing.assert_allclose(centre, COLOURS[cls], atol=2)
    padding = {k: v[5] for k, v in batch.items()}
    assert not any(v.any() for v in padding.values())
    ann_ids = sorted(a["image_id"] for a in coco["annotations"])
    assert sorted(a["image_id"] for a in source.annotations["annotations"]) == ann_ids


# Sources.


def test_scenes_load_as_a_coco_source(tmp_path, shared_dir):
    from pycocotools.coco import COCO

    from vision_jax.data.scenes import FASHION_MNIST_CLASSES, generate_scenes

    root = tmp_path / "scenes"
    generate_scenes(str(root), shared_dir=str(shared_dir), num_train=2, num_test=5, image_size=48)
    source = coco_source(root, "test", coco_images="{split}/images")
    written = json.loads((root / "annotations" / "instances_test.json").read_text())
    assert source.target == "boxes" and source.num_examples == 5
    assert source.class_names == list(FASHION_MNIST_CLASSES)
    assert source.category_ids == list(range(1, 11))
    coco = COCO()
    coco.dataset = source.annotations
    coco.createIndex()
    assert sorted(coco.getImgIds()) == [im["id"] for im in written["images"]]
    assert coco.loadCats(3)[0]["name"] == FASHION_MNIST_CLASSES[2]
    assert len(coco.anns) == len(written["annotations"]) > 0
    for ann in written["annotations"]:
        assert coco.anns[ann["id"]]["bbox"] == ann["bbox"]
        assert coco.anns[ann["id"]]["image_id"] == ann["image_id"]
    assert data_lib.check_examples(source, spec_of()) == 0
    batch = next(data_lib.eval_batches(source, spec_of(), global_batch=5, max_boxes=8))
    for row, image_id in enumerate(batch["image_id"]):
        anns = [a for a in written["annotations"] if a["image_id"] == image_id]
        want = [a["bbox"] for a in anns]
        held = (batch["valid"][row] + batch["crowd"][row]) == 1  # crowd regions: valid 0
        got = batch["boxes"][row][held] / batch["scale"][row]
        np.testing.assert_array_equal(batch["crowd"][row][held], [a["iscrowd"] for a in anns])
        np.testing.assert_allclose(got[:, 2:] - got[:, :2], [b[2:] for b in want], atol=1e-3)
        np.testing.assert_allclose(got[:, :2], [b[:2] for b in want], atol=1e-3)


def build_tfds(data_dir: pathlib.Path, name: str, examples: list, with_ids: bool) -> None:
    """A local tfds detection dataset: ``examples`` of (image, pixel xyxy boxes, labels,
    crowd); JPEG images and ``image/id`` with ``with_ids``, else PNG and no ids or crowd."""
    tfds = pytest.importorskip("tensorflow_datasets")
    objects = {"bbox": tfds.features.BBoxFeature(), "label": tfds.features.ClassLabel(names=NAMES)}
    if with_ids:
        objects["is_crowd"] = tf.bool
    features = {
        "image": tfds.features.Image(encoding_format="jpeg" if with_ids else "png"),
        "objects": tfds.features.Sequence(objects),
    }
    if with_ids:
        features["image/id"] = tf.int64

    def encode(i: int, image, pixel_boxes, labels, crowd) -> dict:
        h, w = image.shape[:2]
        bbox = [
            tfds.features.BBox(y0 / h, x0 / w, y1 / h, x1 / w) for x0, y0, x1, y1 in pixel_boxes
        ]
        example = {"image": image, "objects": {"bbox": bbox, "label": labels}}
        if with_ids:
            example["objects"]["is_crowd"] = crowd
            example["image/id"] = 100 + i
        return example

    tfds.dataset_builders.store_as_tfds_dataset(
        name=name,
        version="1.0.0",
        features=tfds.features.FeaturesDict(features),
        split_datasets={"train": [(f"{i}", encode(i, *ex)) for i, ex in enumerate(examples)]},
        data_dir=str(data_dir),
    )


@pytest.mark.parametrize("with_ids", [True, False])
def test_tfds_boxes_convert_from_normalised_yxyx(tmp_path, with_ids):
    examples = [
        (draw(40, 64, []), [[8, 4, 40, 30], [0, 0, 64, 40]], [1, 4], [False, True]),
        (draw(30, 20, []), [[2.5, 3, 12, 27.5]], [5], [False]),
        (draw(16, 16, []), [], [], []),
    ]
    name = f"tiny_boxes_{int(with_ids)}"
    build_tfds(tmp_path, name, examples, with_ids)
    cfg = data_config(source="tfds", name=name, data_dir=str(tmp_path))
    source = data_lib.load_source(specs.data_spec(cfg.data), "train", target="boxes")
    assert source.class_names == list(NAMES) and source.category_ids == [1, 2, 3, 4, 5, 6]
    images = source.annotations["images"]
    assert [(im["height"], im["width"]) for im in images] == [(40, 64), (30, 20), (16, 16)]
    assert [im["id"] for im in images] == ([100, 101, 102] if with_ids else [1, 2, 3])
    anns = source.annotations["annotations"]
    want = [b for _, bs, _, _ in examples for b in bs]
    got = [[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)]
    np.testing.assert_allclose(got, want, atol=1e-3)
    assert [a["category_id"] for a in anns] == [2, 5, 6]
    assert [a["iscrowd"] for a in anns] == ([0, 1, 0] if with_ids else [0, 0, 0])
    batch = next(data_lib.eval_batches(source, spec_of(image_size=32), global_batch=4, max_boxes=2))
    np.testing.assert_array_equal(batch["image_id"], [im["id"] for im in images] + [0])
    np.testing.assert_allclose(batch["boxes"][0] / batch["scale"][0], want[:2], atol=1e-3)
    np.testing.assert_array_equal(batch["classes"][:2], [[1, 4], [5, 0]])
    train = data_lib.train_batches(source, spec_of(flip=True), global_batch=2, seed=0, max_boxes=2)
    assert next(train).keys() == BOX_KEYS


# Bad ground truth.


@pytest.fixture()
def bad_coco(tmp_path) -> pathlib.Path:
    """Image 1 (40 x 40) with a good box and four bad annotations, image 2 without its file."""
    coco = write_coco(tmp_path, [(40, 40, [RECTS[0]]), (40, 40, [RECTS[1]])])
    (tmp_path / "train" / "002.png").unlink()
    for ann_id, change in (
        (11, {"bbox": [41, 2, 15, 5]}),  # wholly right of the image
        (12, {"category_id": 99}),
        (13, {"image_id": 77}),
        (14, {"bbox": [3, 3, 0, 4]}),
    ):
        coco["annotations"].append({**coco["annotations"][0], "id": ann_id, **change})
    (tmp_path / "annotations" / "instances_train.json").write_text(json.dumps(coco))
    return tmp_path


def test_bad_ground_truth_is_an_error_naming_file_and_annotation(bad_coco):
    with pytest.raises(data_lib.DataError) as error:
        coco_source(bad_coco)
    message = str(error.value)
    assert "annotations/instances_train.json" in message and "skip_corrupt" in message
    assert "annotation 11: box [41, 2, 15, 5] lies outside its image 001.png (40x40)" in message
    assert "annotation 12: unknown category_id 99" in message
    assert "annotation 13: unknown image_id 77" in message
    assert "annotation 14: box [3, 3, 0, 4] has no area" in message
    assert "image 2: " in message and "train/002.png is missing" in message


@pytest.mark.parametrize("image_id", [2**31, -1])
def test_an_image_id_outside_int32_or_negative_is_an_error(tmp_path, image_id):
    coco = write_coco(tmp_path, [(40, 40, [RECTS[0]])])
    coco["images"][0]["id"] = image_id
    for annotation in coco["annotations"]:
        annotation["image_id"] = image_id
    (tmp_path / "annotations" / "instances_train.json").write_text(json.dumps(coco))
    with pytest.raises(data_lib.DataError, match=rf"images\[0\] has id {image_id}, not in \["):
        coco_source(tmp_path)


@pytest.mark.parametrize(
    "section, field, value, words",
    [
        ("images", "width", "40", "a positive number"),
        ("images", "height", None, "a positive number"),
        ("images", "width", 0, "a positive number"),
        ("images", "file_name", 7, "a string"),
        ("images", "id", 1.5, "an integer"),
        ("categories", "id", True, "an integer"),
    ],
)
def test_a_field_of_the_wrong_type_is_an_error_naming_it(tmp_path, section, field, value, words):
    """A width given as a string, an id as a float: one error naming the record, the field and
    the value (they were a TypeError from a comparison, or "unknown category_id 1")."""
    coco = write_coco(tmp_path, [(40, 40, [RECTS[0]])])
    coco[section][0][field] = value
    (tmp_path / "annotations" / "instances_train.json").write_text(json.dumps(coco))
    with pytest.raises(data_lib.DataError) as error:
        coco_source(tmp_path)
    assert f"{section}[0] has {field} {value!r}, not {words}." in str(error.value)


def test_category_names_twice_are_an_error_and_no_annotations_a_warning(tmp_path, caplog):
    """Classes are matched across splits by name: two categories of one name were two classes
    that the other split named differently; a file without annotations trains on background."""
    coco = write_coco(tmp_path, [(40, 40, [RECTS[0]])])
    json_path = tmp_path / "annotations" / "instances_train.json"
    coco["categories"].append({"id": 99, "name": coco["categories"][0]["name"]})
    json_path.write_text(json.dumps(coco))
    with pytest.raises(data_lib.DataError, match=r"instances_train.json: categories \{'\w+': "
                       r"\[\d+, 99\]\} share a name"):  # fmt: skip
        coco_source(tmp_path)
    coco["categories"].pop()
    coco["annotations"] = []
    json_path.write_text(json.dumps(coco))
    with caplog.at_level(logging.WARNING):
        coco_source(tmp_path)
    assert "instances_train.json holds no annotations" in caplog.text


def test_ids_as_whole_floats_load_and_annotation_types_are_skippable(tmp_path):
    """JSON writers that give ``1.0`` for ids: the file loads as with ``1``; an annotation with
    a string category_id is one bad annotation, named, and skipped with skip_corrupt."""
    coco = write_coco(tmp_path, [(40, 40, [RECTS[0], RECTS[1]])])
    coco["annotations"][0]["image_id"] = float(coco["annotations"][0]["image_id"])
    coco["annotations"][0]["category_id"] = float(coco["annotations"][0]["category_id"])
    coco["annotations"][1]["category_id"] = str(coco["annotations"][1]["category_id"])
    (tmp_path / "annotations" / "instances_train.json").write_text(json.dumps(coco))
    with pytest.raises(data_lib.DataError, match=r"annotation \d+: category_id '\d+' is not an"):
        coco_source(tmp_path)
    source = coco_source(tmp_path, skip_corrupt=True)
    (kept,) = source.annotations["annotations"]
    assert isinstance(kept["category_id"], int) and isinstance(kept["image_id"], int)


def test_bad_ground_truth_skipped_and_counted_with_skip_corrupt(bad_coco, caplog):
    with caplog.at_level(logging.WARNING):
        source = coco_source(bad_coco, skip_corrupt=True)
    assert "skipping 5 bad annotation(s)/image(s)" in caplog.text
    assert source.num_examples == 1 and source.skip_corrupt
    assert [im["id"] for im in source.annotations["images"]] == [1]
    assert [a["id"] for a in source.annotations["annotations"]] == [1]


def test_a_box_sticking_out_is_clipped_for_training_and_scored_as_written(tmp_path, caplog):
    """As torchvision's and detectron2's loaders: the part inside the image is the target; the
    ground truth pycocotools scores stays as the file has it."""
    coco = write_coco(tmp_path, [(60, 90, [RECTS[0]])])
    coco["annotations"].append({**coco["annotations"][0], "id": 7, "bbox": [-6, 40, 30, 25]})
    (tmp_path / "annotations" / "instances_train.json").write_text(json.dumps(coco))
    with caplog.at_level(logging.INFO):
        source = coco_source(tmp_path)
    assert "1 box(es) stick out of their image" in caplog.text
    assert "annotation 7 [-6, 40, 30, 25] in 001.png (90x60)" in caplog.text
    assert source.annotations["annotations"][1]["bbox"] == [-6, 40, 30, 25]
    batch = next(data_lib.eval_batches(source, spec_of(image_size=90), global_batch=1, max_boxes=2))
    np.testing.assert_allclose(
        batch["boxes"][0] / batch["scale"][0], [xyxy(RECTS[0]), [0, 40, 24, 60]], atol=1e-3
    )


def test_an_image_of_another_size_than_its_annotations(tmp_path):
    coco = write_coco(tmp_path, [(40, 40, [RECTS[0]]), (30, 30, [])])
    coco["images"][1].update(width=50, height=35)
    (tmp_path / "annotations" / "instances_train.json").write_text(json.dumps(coco))
    source = coco_source(tmp_path)
    with pytest.raises(data_lib.DataError, match=r"002\.png: size 30x30 differs .* 50x35"):
        data_lib.check_examples(source, spec_of())
    with pytest.raises(data_lib.DataError, match=r"002\.png: size 30x30 differs"):
        list(data_lib.eval_batches(source, spec_of(), global_batch=2, max_boxes=1))
    skipping = coco_source(tmp_path, skip_corrupt=True)
    batches = list(data_lib.eval_batches(skipping, spec_of(), global_batch=2, max_boxes=1))
    np.testing.assert_array_equal(batches[0]["mask"], [1, 0])


@pytest.mark.parametrize("kind", ["JPEG", "MPO"])
def test_images_to_predict_on_have_their_shown_size(tmp_path, kind):
    """A JPEG stored sideways (EXIF orientation 8): boxes are predicted on the picture as
    shown, so its size is the turned one (20 wide, 12 high). Phones write MPO files (a JPEG
    holding more pictures), which PIL names apart."""
    from vision_jax.data.coco import from_image_files

    exif = Image.Exif()
    exif[0x0112] = 8
    picture = Image.new("RGB", (12, 20))
    more = {"save_all": True, "append_images": [picture]} if kind == "MPO" else {}
    picture.save(tmp_path / "side.jpg", kind, exif=exif.tobytes(), **more)
    assert Image.open(tmp_path / "side.jpg").format == kind
    Image.new("RGB", (12, 20)).save(tmp_path / "plain.png")
    source, unreadable = from_image_files(
        [str(tmp_path / "side.jpg"), str(tmp_path / "plain.png")], ["a"], [1]
    )
    sizes = [(im["width"], im["height"]) for im in source.annotations["images"]]
    assert sizes == [(20, 12), (12, 20)] and not unreadable


def test_images_of_more_pixels_than_pil_opens(tmp_path, monkeypatch):
    """An image of more pixels than PIL opens (its DecompressionBombError, neither OSError nor
    ValueError: a traceback, nothing predicted) gets its size from its header, as
    classification and segmentation predict it (TensorFlow decodes it; a format the pipeline
    decodes with PIL is skipped there, named); PIL's limit is back after it."""
    from vision_jax.data.coco import from_image_files

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # a bomb above 200 pixels
    for name in ("large.png", "large.gif"):
        Image.new("RGB", (20, 15)).save(tmp_path / name)
    paths = [str(tmp_path / n) for n in ("large.png", "large.gif")]
    source, unreadable = from_image_files(paths, ["a"], [1])
    sizes = [(im["width"], im["height"]) for im in source.annotations["images"]]
    assert sizes == [(20, 15), (20, 15)] and not unreadable
    assert Image.MAX_IMAGE_PIXELS == 100


def test_box_configs_that_do_not_fit(tmp_path):
    write_coco(tmp_path, [(60, 90, RECTS), (20, 20, [])])
    source = coco_source(tmp_path)
    path = source.columns["path"][0]
    with pytest.raises(
        data_lib.DataError, match=rf"{path} \(image id 1\) holds 5 boxes.*at least 5"
    ):
        data_lib.train_batches(source, spec_of(), global_batch=2, seed=0, max_boxes=4)
    # evaluation scores against the annotations, not the padded rows: not limited by max_boxes
    batch = next(data_lib.eval_batches(source, spec_of(), global_batch=2, max_boxes=2))
    assert batch["boxes"].shape == (2, 2, 4) and batch["valid"].tolist() == [[1, 1], [0, 0]]
    with pytest.raises(data_lib.DataError, match="need max_boxes"):
        data_lib.eval_batches(source, spec_of(), global_batch=2)
    labels = data_lib.from_arrays(np.zeros((2, 4, 4), np.uint8), np.array([0, 1]))
    with pytest.raises(data_lib.DataError, match="max_boxes applies to box sources"):
        data_lib.eval_batches(labels, spec_of(), global_batch=2, max_boxes=4)
    for option in ("randaugment_layers=2", "mixup_alpha=0.8", "inception_crop=True"):
        key, value = option.split("=")
        spec = spec_of(**{key: eval(value)})
        with pytest.raises(ValueError, match=f"input.{key}: not for boxes"):
            data_lib.train_batches(source, spec, global_batch=2, seed=0, max_boxes=5)
    # read by nothing with boxes: evaluation letterboxes the whole image, no crop resizes
    for option in ("crop_mode='squash'", "crop_fraction=0.5", "resize_size=100"):
        key, value = option.split("=")
        spec = spec_of(**{key: eval(value)}, random_crop=False)
        with pytest.raises(ValueError, match=f"input.{key}: not read with boxes"):
            data_lib.train_batches(source, spec, global_batch=2, seed=0, max_boxes=5)
    data_lib.train_batches(  # with random_crop, resize_size sizes its resize
        source, spec_of(resize_size=100, random_crop=True), global_batch=2, seed=0, max_boxes=5
    ).close()
    with pytest.raises(specs.ConfigError, match="data.coco_images only applies to source='coco'"):
        specs.data_spec(data_config(source="tfds", coco_images="{split}/images").data)
    for kind, hint in (("imagefolder", "use 'coco'"), ("arrays", "has no boxes")):
        with pytest.raises(data_lib.DataError, match=hint):
            data_lib.load_source(data_config(source=kind).data, "train", target="boxes")
    with pytest.raises(data_lib.DataError, match="data.class_names not read by .* with boxes"):
        coco_source(tmp_path, class_names=("a",))
    with pytest.raises(data_lib.DataError, match=r"file .*instances_val\.json does not exist"):
        coco_source(tmp_path, "val")
    annotations = tmp_path / "annotations"
    (annotations / "instances_val.json").write_bytes(
        (annotations / "instances_train.json").read_bytes()
    )
    with pytest.raises(data_lib.DataError, match="image folder .*/val does not exist"):
        coco_source(tmp_path, "val")


def test_resumed_stream_equals_the_uninterrupted_one(tmp_path):
    write_coco(tmp_path, [(60 + 4 * i, 90, RECTS[: i + 1]) for i in range(5)])
    source = coco_source(tmp_path)
    spec = spec_of(scale_jitter=(0.5, 2.0), flip=True)

    def stream(seed: int, **kwargs) -> data_lib.Batches:
        return data_lib.train_batches(
            source, spec, global_batch=2, seed=seed, max_boxes=5, **kwargs
        )

    fresh = list(itertools.islice(stream(3), 5))
    resumed = list(itertools.islice(stream(3, start_step=3), 2))
    for a, b in zip(fresh[3:], resumed, strict=True):
        assert a.keys() == b.keys() == BOX_KEYS
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    assert not np.array_equal(fresh[0]["boxes"], fresh[4]["boxes"])
    other = next(stream(4))
    assert not np.array_equal(fresh[0]["boxes"], other["boxes"])


def test_image_ids_by_file_name_the_longest_match_and_refuse_ambiguity(tmp_path):
    """Predicted files take the ids of the COCO images whose file_name their path ends with (the
    longest such); a file no image names, or two files one image names, is an error."""
    from vision_jax.data import DataError
    from vision_jax.data.coco import image_ids_by_file

    coco = {
        "images": [
            {"id": 7, "file_name": "a.jpg", "width": 4, "height": 4},
            {"id": 9, "file_name": "sub/a.jpg", "width": 4, "height": 4},
        ],
        "annotations": [],
        "categories": [{"id": 3, "name": "cat"}, {"id": 5, "name": "dog"}],
    }
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(coco))
    mine = {3: "cat", 5: "dog"}  # the model's categories
    ids = image_ids_by_file(str(path), ["/data/a.jpg", "/data/sub/a.jpg"], mine)
    assert ids == {"/data/a.jpg": 7, "/data/sub/a.jpg": 9}
    with pytest.raises(DataError, match="image 7 names several files"):
        image_ids_by_file(str(path), ["/data/x/a.jpg", "/data/y/a.jpg"], mine)
    with pytest.raises(DataError, match="1 file\\(s\\) are not images of .*: /data/b.jpg"):
        image_ids_by_file(str(path), ["/data/b.jpg"], mine)
    with pytest.raises(DataError, match=r"categories are not that file's: dog \(id 4: absent\)"):
        image_ids_by_file(str(path), ["/data/a.jpg"], {3: "cat", 4: "dog"})


def test_image_ids_by_file_refuse_files_of_another_size_than_their_record(tmp_path):
    """A predicted file whose (upright) size differs from its COCO record's would be scored
    against boxes of another size (mAP 0 in silence): an error naming it; an EXIF-turned JPEG
    recorded at its stored size says that it is turned."""
    from vision_jax.data import DataError
    from vision_jax.data.coco import image_ids_by_file

    Image.new("RGB", (8, 6)).save(tmp_path / "plain.jpg")
    orientation = Image.Exif()
    orientation[0x0112] = 6  # stored 8 x 6, shown 6 x 8
    Image.new("RGB", (8, 6)).save(tmp_path / "turned.jpg", exif=orientation)
    coco = {
        "images": [
            {"id": 1, "file_name": "plain.jpg", "width": 8, "height": 6},
            {"id": 2, "file_name": "turned.jpg", "width": 6, "height": 8},
        ],
        "annotations": [],
        "categories": [{"id": 1, "name": "cat"}],
    }
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(coco))
    files = [str(tmp_path / "plain.jpg"), str(tmp_path / "turned.jpg")]
    assert image_ids_by_file(str(path), files, {1: "cat"}) == dict(zip(files, (1, 2), strict=True))
    coco["images"][0] |= {"width": 16, "height": 12}  # the file was resized since
    coco["images"][1] |= {"width": 8, "height": 6}  # the stored size
    path.write_text(json.dumps(coco))
    with pytest.raises(DataError) as error:
        image_ids_by_file(str(path), files, {1: "cat"})
    message = str(error.value)
    assert "plain.jpg: size 8x6 differs from its annotations' 16x12 (w x h)" in message
    assert ("turned.jpg: size 6x8 differs from its annotations' 8x6 (w x h) (the image is "
            "turned upright by its EXIF orientation") in message  # fmt: skip


def test_file_names_with_backslashes_or_dot_slash_name_their_files(tmp_path):
    """A COCO file written on Windows (``sub\\001.png``) or with ``./``: the files are found, as
    predict's image_ids_by_file finds them (one normalisation for both)."""
    coco = write_coco(tmp_path, [(40, 40, [RECTS[0]]), (40, 40, [RECTS[1]])])
    (tmp_path / "train" / "sub").mkdir()
    (tmp_path / "train" / "001.png").rename(tmp_path / "train" / "sub" / "001.png")
    coco["images"][0]["file_name"] = "sub\\001.png"
    coco["images"][1]["file_name"] = "./002.png"
    (tmp_path / "annotations" / "instances_train.json").write_text(json.dumps(coco))
    source = coco_source(tmp_path)
    paths = list(source.columns["path"])
    assert paths == [f"{tmp_path}/train/sub/001.png", f"{tmp_path}/train/002.png"]
    data_lib.check_examples(source, spec_of(), whole=True)


def test_images_without_width_or_height_take_their_file_header_size(tmp_path):
    """pycocotools and torchvision need no image sizes: one absent is read from the file's
    header (upright); a file whose header cannot be read is named (skipped with skip_corrupt)."""
    coco = write_coco(tmp_path, [(40, 60, [RECTS[0]]), (30, 20, []), (30, 20, [RECTS[0]])])
    del coco["images"][0]["width"], coco["images"][0]["height"]
    del coco["images"][2]["height"]
    (tmp_path / "annotations" / "instances_train.json").write_text(json.dumps(coco))
    source = coco_source(tmp_path)
    sizes = [(im["width"], im["height"]) for im in source.annotations["images"]]
    assert sizes == [(60, 40), (20, 30), (20, 30)]
    data_lib.check_examples(source, spec_of(), whole=True)
    (tmp_path / "train" / "003.png").write_bytes(b"not an image")
    with pytest.raises(data_lib.DataError, match=r"image 3: .*003.png has no width/height and"):
        coco_source(tmp_path)
    skipping = coco_source(tmp_path, skip_corrupt=True)
    assert [im["id"] for im in skipping.annotations["images"]] == [1, 2]
    assert {a["image_id"] for a in skipping.annotations["annotations"]} == {1}


def test_categories_without_annotations_are_named_in_a_warning(tmp_path, caplog):
    """A category no box of the split holds is a class without examples (pycocotools leaves it
    out of the mean AP): one warning naming it."""
    write_coco(tmp_path, [(40, 40, [RECTS[0]]), (40, 40, [RECTS[1]])])
    with caplog.at_level(logging.WARNING):
        source = coco_source(tmp_path)
    assert source.num_classes == len(NAMES)
    assert "4 categor(ies) have no annotation: blue (6), yellow (8), magenta (10), cyan (12)" in (
        caplog.text
    )
    assert "pycocotools leaves a category without ground truth out of its mean AP" in caplog.text


def test_photos_turned_by_exif_without_a_change_of_size_are_named(tmp_path, caplog):
    """A JPEG stored mirrored (EXIF orientation 2: the size stays) fits its record in either
    frame: one warning names it and says the boxes are taken in the upright frame."""
    coco = write_coco(tmp_path, [(40, 60, [RECTS[0]]), (40, 60, [RECTS[1]])])
    exif = Image.Exif()
    exif[0x0112] = 2
    Image.fromarray(draw(40, 60, [RECTS[1]])).save(tmp_path / "train" / "x.jpg", exif=exif)
    coco["images"][1]["file_name"] = "x.jpg"
    (tmp_path / "annotations" / "instances_train.json").write_text(json.dumps(coco))
    with caplog.at_level(logging.WARNING):
        coco_source(tmp_path)
    assert "instances_train.json (split 'train'): 1 JPEG(s) are stored turned or mirrored " in (
        caplog.text
    )
    assert "such as " + str(tmp_path / "train" / "x.jpg") in caplog.text
    assert "their boxes are taken in that upright frame" in caplog.text


def test_an_image_folder_holding_none_of_the_files_is_one_error_naming_coco_images(tmp_path):
    """data.coco_images pointing where none of the JSON's files are: one error naming the folder,
    the count and the first expected path, and data.coco_images (it listed five missing files
    and advised data.skip_corrupt, which then left no images)."""
    write_coco(tmp_path, [(40, 40, [RECTS[0]]), (40, 40, [RECTS[1]])])
    (tmp_path / "elsewhere").mkdir()
    for skip_corrupt in (False, True):
        with pytest.raises(data_lib.DataError) as error:
            coco_source(tmp_path, coco_images="elsewhere", skip_corrupt=skip_corrupt)
        message = str(error.value)
        assert f"{tmp_path}/elsewhere holds none of the 2 image file(s)" in message
        assert f"(the first: {tmp_path}/elsewhere/001.png)" in message
        assert "data.coco_images" in message and "skip_corrupt" not in message


def test_the_exif_scan_reads_each_header_once_and_silences_pils_warnings(
    tmp_path, caplog, monkeypatch
):
    """Images without width/height have their headers read once (for the size and the EXIF
    orientation, not again for the turned-images warning); PIL's warnings of damaged EXIF data
    (here a tag past the file's end) are not printed per file during the scan."""
    import struct
    import warnings

    from vision_jax.data import exif as exif_lib

    coco = write_coco(tmp_path, [(40, 60, [RECTS[0]]), (60, 40, [])])
    tiff = struct.pack("<2sHIH", b"II", 42, 8, 2)
    tiff += struct.pack("<HHII", 0x0112, 3, 1, 6)  # turned a quarter: stored 40 x 60
    tiff += struct.pack("<HHII", 0x010E, 2, 1000, 5000) + struct.pack("<I", 0)  # past the end
    Image.fromarray(draw(40, 60, [])).save(tmp_path / "train" / "x.jpg", exif=b"Exif\0\0" + tiff)
    coco["images"][1]["file_name"] = "x.jpg"
    for image in coco["images"]:
        del image["width"], image["height"]
    (tmp_path / "annotations" / "instances_train.json").write_text(json.dumps(coco))
    read = []
    orientation_of = exif_lib.orientation_of
    monkeypatch.setattr(exif_lib, "orientation_of", lambda p: read.append(p) or orientation_of(p))
    with warnings.catch_warnings(record=True) as shown, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        source = coco_source(tmp_path)
    assert [
        str(w.message) for w in shown if "EXIF" in str(w.message) or "Tag" in str(w.message)
    ] == []
    assert read == []  # its header was read for its size
    assert [(im["width"], im["height"]) for im in source.annotations["images"]] == [
        (60, 40),
        (40, 60),
    ]
    assert "1 JPEG(s) are stored turned or mirrored" in caplog.text
