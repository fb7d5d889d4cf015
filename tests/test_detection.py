"""The detection task's parts against independent references: GIoU and focal loss against
torchvision, NMS against a numpy greedy NMS, target assignment on hand-made boxes, post-processing
on hand-made outputs, COCO mAP against pycocotools run directly, head shapes for every family."""

from __future__ import annotations

import logging
from collections import Counter
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import import_timm

from vision_jax.tasks import Detection, fcos
from vision_jax.tasks.boxes import (
    generalized_iou,
    nms_first,
    nms_keep,
    pairwise_intersection,
    pairwise_iou,
)
from vision_jax.tasks.coco_eval import (
    PADDING_ID,
    STAT_NAMES,
    Detections,
    coco_metrics,
    coco_results,
    warn_if_all_zero_area,
)
from vision_jax.tasks.detection import CoverageError, EvalMetrics


def random_boxes(rng: np.random.Generator, n: int, size: float = 100.0) -> np.ndarray:
    """Boxes clustered around a few centres, so that many overlap."""
    centres = rng.uniform(0, size, (4, 2))[rng.integers(0, 4, n)] + rng.normal(0, 5, (n, 2))
    wh = rng.uniform(5, 30, (n, 2))
    return np.concatenate([centres - wh / 2, centres + wh / 2], -1).astype(np.float32)


@pytest.fixture(scope="module")
def torchvision():
    import_timm()  # declares torchvision's C++ op schemas so that it imports on the CPU torch
    return pytest.importorskip("torchvision")


def test_iou_and_giou_match_torchvision(torchvision):
    import torch

    rng = np.random.default_rng(0)
    a, b = random_boxes(rng, 40), random_boxes(rng, 30)
    want_iou = torchvision.ops.box_iou(torch.from_numpy(a), torch.from_numpy(b)).numpy()
    np.testing.assert_allclose(pairwise_iou(jnp.asarray(a), jnp.asarray(b)), want_iou, atol=1e-6)
    want_giou = torchvision.ops.generalized_box_iou(torch.from_numpy(a), torch.from_numpy(b))
    got = generalized_iou(jnp.asarray(a)[:, None], jnp.asarray(b)[None, :])
    np.testing.assert_allclose(got, want_giou.numpy(), atol=1e-5)
    loss = torchvision.ops.generalized_box_iou_loss(
        torch.from_numpy(a[:30]), torch.from_numpy(b), reduction="none"
    )
    np.testing.assert_allclose(1 - generalized_iou(a[:30], b), loss.numpy(), atol=1e-5)


def test_iou_of_host_arrays_is_computed_on_the_host():
    """pairwise_iou of numpy arrays (the report's boxes, image by image) is a numpy array, as
    on the device (no transfer, no compilation for each new number of boxes), 0 for an empty
    union, and [N, 0] with no boxes."""
    rng = np.random.default_rng(1)
    a, b = random_boxes(rng, 7), random_boxes(rng, 5)
    b[0] = a[0, [0, 1, 0, 1]]  # empty
    got = pairwise_iou(a, b)
    assert type(got) is np.ndarray and got.dtype == np.float32
    np.testing.assert_allclose(got, pairwise_iou(jnp.asarray(a), jnp.asarray(b)), atol=1e-6)
    assert pairwise_iou(a[:1], a[:1]) == pytest.approx(1.0) and not got[:, 0].any()
    assert pairwise_iou(b[:1], b[:1]) == 0  # an empty union
    assert pairwise_iou(a, b[:0]).shape == (7, 0)


def numpy_nms(boxes: np.ndarray, scores: np.ndarray, threshold: float) -> np.ndarray:
    """Textbook greedy NMS: indices kept, by decreasing score."""
    order, keep = list(np.argsort(-scores, kind="stable")), []
    area = lambda b: max(b[2] - b[0], 0) * max(b[3] - b[1], 0)
    while order:
        i = order.pop(0)
        keep.append(i)
        survivors = []
        for j in order:
            x0, y0 = np.maximum(boxes[i, :2], boxes[j, :2])
            x1, y1 = np.minimum(boxes[i, 2:], boxes[j, 2:])
            inter = area((x0, y0, x1, y1))
            if inter / (area(boxes[i]) + area(boxes[j]) - inter) <= threshold:
                survivors.append(j)
        order = survivors
    return np.asarray(keep)


@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.7])
def test_nms_matches_numpy_greedy(threshold):
    rng = np.random.default_rng(1)
    boxes, scores = random_boxes(rng, 300), rng.uniform(size=300).astype(np.float32)
    order = np.argsort(-scores, kind="stable")
    valid = np.ones(300, bool)
    valid[rng.choice(300, 20, replace=False)] = False  # e.g. under the score threshold
    keep = jax.jit(nms_keep, static_argnums=2)(boxes[order], valid[order], threshold)
    got = np.sort(order[np.asarray(keep)])
    candidates = np.flatnonzero(valid)
    want = np.sort(candidates[numpy_nms(boxes[candidates], scores[candidates], threshold)])
    assert 20 < len(want) < 280  # the case exercises suppression
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize(
    ("max_keep", "block", "n_valid"),
    [(1, 64, 280), (30, 7, 280), (100, 64, 280), (300, 512, 280), (300, 64, 120)],
)  # (300, 64, 120): stops at the third block, the first with no valid candidate
def test_nms_first_keeps_the_first_boxes_greedy_nms_keeps(max_keep, block, n_valid):
    """Block by block and stopping at ``max_keep`` kept boxes or at the first block without a
    valid one, the first ``max_keep`` boxes of the greedy NMS over all of them."""
    rng = np.random.default_rng(3)
    boxes = random_boxes(rng, 300)
    boxes[200:260] = boxes[199]  # a run of one box, as many locations on one object predict
    valid = np.arange(300) < n_valid  # the candidates above the score threshold: a prefix
    full = np.asarray(jax.jit(nms_keep, static_argnums=2)(boxes, valid, 0.5))
    assert full.sum() > 30  # the case exercises the cut at max_keep
    got = jax.jit(nms_first, static_argnums=(2, 3, 4))(boxes, valid, 0.5, max_keep, block)
    want = np.flatnonzero(full)[:max_keep]
    np.testing.assert_array_equal(np.flatnonzero(np.asarray(got)), want)


def test_pairwise_intersection_in_numpy_and_jax():
    a = np.asarray([[0, 0, 10, 10], [5, 5, 6, 6]], np.float32)
    b = np.asarray([[5, 0, 15, 4], [20, 20, 30, 30], [0, 0, 0, 0]], np.float32)
    want = [[20, 0, 0], [0, 0, 0]]
    np.testing.assert_array_equal(pairwise_intersection(a, b), want)
    np.testing.assert_array_equal(pairwise_intersection(jnp.asarray(a), jnp.asarray(b)), want)


def test_nms_first_of_no_candidate_keeps_none():
    got = jax.jit(nms_first, static_argnums=(2, 3))(jnp.zeros((0, 4)), jnp.zeros(0, bool), 0.5, 5)
    assert got.shape == (0,)


@pytest.mark.parametrize("pre_nms_topk", [0, -1])
def test_pre_nms_topk_must_be_positive(pre_nms_topk):
    with pytest.raises(ValueError, match="pre_nms_topk"):
        Detection(pre_nms_topk=pre_nms_topk)


def test_focal_loss_matches_torchvision(torchvision):
    import torch

    rng = np.random.default_rng(2)
    layout = fcos.layout((32, 32), (8, 16))
    n, c = len(layout.points), 3
    logits = rng.normal(0, 2, (2, n, c)).astype(np.float32)
    targets = fcos.Targets(
        positive=jnp.asarray(rng.uniform(size=(2, n)) < 0.3),
        ignore=jnp.asarray(rng.uniform(size=(2, n)) < 0.1),
        classes=jnp.asarray(rng.integers(0, c, (2, n)), jnp.int32),
        boxes=jnp.zeros((2, n, 4)),
        centerness=jnp.zeros((2, n)),
    )
    outputs = {
        "logits": jnp.asarray(logits),
        "distances": jnp.ones((2, n, 4)),
        "centerness": jnp.zeros((2, n)),
    }
    got = fcos.losses(outputs, targets, jnp.asarray(layout.points))["class"]
    positive, ignore = np.asarray(targets.positive), np.asarray(targets.ignore)
    one_hot = np.eye(c)[np.asarray(targets.classes)] * positive[..., None]
    focal = torchvision.ops.sigmoid_focal_loss(
        torch.from_numpy(logits), torch.from_numpy(one_hot.astype(np.float32)), reduction="none"
    ).numpy()
    want = (focal.sum(-1) * ~ignore).sum() / positive.sum()
    assert float(got) == pytest.approx(want, rel=1e-5)


def test_assignment_on_hand_made_boxes():
    """64x64 input, strides 8 (centres 4, 12, ..., 60; sizes up to 64) and 16 (centres 8, 24,
    40, 56; sizes above 64)."""
    where = fcos.layout((64, 64), (8, 16))
    boxes = jnp.asarray(
        [
            [2, 2, 22, 14],  # A: level 8, centre (12, 8), reach 12 -> x 4, 12, 20; y 4, 12
            [0, 0, 30, 30],  # C: big
            [6, 6, 18, 18],  # D: inside A and C, the smallest; (12, 12) is its only centre
            [40, 40, 64, 64],  # crowd region
            [0, 0, 0, 0],  # padding
        ],
        jnp.float32,
    )
    classes = jnp.asarray([1, 0, 2, 0, 0])
    valid = jnp.asarray([1, 1, 1, 0, 0])
    crowd = jnp.asarray([0, 0, 0, 1, 0])
    t = fcos.assign(where, boxes, classes, valid, crowd)
    points = where.points
    positives = {tuple(points[i]): (int(t.classes[i]), list(np.asarray(t.boxes[i])))
                 for i in np.flatnonzero(t.positive)}  # fmt: skip
    # Smallest box wins where several qualify: D (144) < A (240) < C (900). C (centre 15,
    # reach 12: x, y in 4, 12, 20) keeps only the row y = 20.
    expected = {(12, 12): (2, [6, 6, 18, 18])}
    for p in [(4, 4), (12, 4), (20, 4), (4, 12), (20, 12)]:
        expected[p] = (1, [2, 2, 22, 14])
    for p in [(4, 20), (12, 20), (20, 20)]:
        expected[p] = (0, [0, 0, 30, 30])
    assert {k: v for k, v in positives.items()} == {
        tuple(map(float, k)): (c, [float(x) for x in b]) for k, (c, b) in expected.items()
    }
    # A's (12, 4): sides l 10, t 2, r 10, b 10 -> centerness sqrt(1 * 0.2).
    i = int(np.flatnonzero((points == [12, 4]).all(1))[0])
    assert float(t.centerness[i]) == pytest.approx(np.sqrt(0.2), rel=1e-6)
    # Inside the crowd box and not positive: ignored (level-8 centres 44..60, level-16 56).
    ignored = {tuple(points[i]) for i in np.flatnonzero(t.ignore)}
    level8 = {(float(x), float(y)) for x in (44, 52, 60) for y in (44, 52, 60)}
    assert ignored == level8 | {(56.0, 56.0)}
    assert not np.any(np.asarray(t.positive & t.ignore))


def test_reached_boxes_are_those_some_location_is_positive_for():
    """64x64 input, strides 8 and 16: a box between the centres (4, 12, ..., 60) gets none; a box
    whose every candidate a smaller box inside it takes gets none; crowd and padding rows none."""
    where = fcos.layout((64, 64), (8, 16))
    boxes = jnp.asarray(
        [
            [2, 2, 22, 14],  # reached (see test_assignment_on_hand_made_boxes)
            [25, 25, 27, 28],  # tiny: holds no centre
            [33, 33, 47, 47],  # its candidates (36 and 44 across and down) ...
            [34, 34, 46, 46],  # ... are all inside this smaller box
            [50, 2, 62, 14],  # a crowd region
            [0, 0, 0, 0],  # padding
        ],
        jnp.float32,
    )
    valid = jnp.asarray([1, 1, 1, 1, 0, 0])
    got = fcos.reached(where, boxes, valid)
    assert np.asarray(got).tolist() == [True, False, False, True, False, False]
    t = fcos.assign(where, boxes, jnp.arange(6), valid, jnp.asarray([0, 0, 0, 0, 1, 0]))
    assert set(np.asarray(t.classes)[np.asarray(t.positive)].tolist()) == {0, 3}


def _box_source(images: list[list[tuple[list[float], int]]], side: int = 64) -> SimpleNamespace:
    """A source whose images (``side`` px square) hold (COCO box, iscrowd) lists."""
    annotations = [
        {"id": len(images) * 100 + k, "image_id": i + 1, "category_id": 1, "bbox": bbox,
         "iscrowd": crowd}
        for i, boxes in enumerate(images) for k, (bbox, crowd) in enumerate(boxes)
    ]  # fmt: skip
    records = [{"id": i + 1, "width": side, "height": side} for i in range(len(images))]
    return SimpleNamespace(
        annotations={"images": records, "annotations": annotations}, category_ids=[1]
    )


def test_a_share_of_boxes_no_location_is_positive_for_is_warned_of(caplog):
    task = Detection(strides=(8, 16))
    tiny, big, crowd = ([25, 25, 2, 3], 0), ([2, 2, 20, 12], 0), ([1, 1, 2, 2], 1)
    with caplog.at_level(logging.WARNING):
        task.warn_of_unreached_boxes(_box_source([[big, crowd]] * 9 + [[tiny]]), 64)
        assert not caplog.text  # 1 of 10: not over 10%
        task.warn_of_unreached_boxes(_box_source([[big, tiny, crowd]] * 3), 64)
        assert not caplog.text.count("\n") > 1
    assert ("3 of the 6 non-crowd boxes of the train split (50%) get no positive location at "
            "task.strides=(8, 16) on 64 px inputs") in caplog.text  # fmt: skip
    assert "longer side 3.0 px at the median" in caplog.text and "Finer task.strides" in caplog.text
    # At the letterbox's scale: the same boxes on 32-px images, scaled by 2, are all reached.
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        task.warn_of_unreached_boxes(_box_source([[([20, 20, 8, 8], 0)]] * 4, side=32), 64)
        task.warn_of_unreached_boxes(_box_source([[([20, 20, 8, 8], 0)]] * 4, side=256), 64)
    assert caplog.text.count("get no positive location") == 1 and "4 of the 4" in caplog.text
    caplog.clear()  # a large split: a sample of its images
    with caplog.at_level(logging.WARNING):
        task.warn_of_unreached_boxes(_box_source([[big, tiny]] * 600), 64)
    assert "512 of the 1024 non-crowd boxes of the train split (a sample of 512 images)" in (
        caplog.text
    )


@pytest.mark.parametrize("size,level", [(40, 8.0), (200, 16.0)])
def test_level_ranges(size, level):
    """Strides 8 (largest side distance up to 64) and 16 (above 64): a box's central locations
    are about size / 2 from its sides, so a 40-px box is the stride-8 level's, a 200-px box the
    stride-16 one's."""
    where = fcos.layout((256, 256), (8, 16))
    box = jnp.asarray([[20.0, 30, 20 + size, 30 + size]])
    t = fcos.assign(where, box, jnp.asarray([0]), jnp.asarray([1]), jnp.asarray([0]))
    strides = where.strides[np.asarray(t.positive)]
    assert len(strides) and set(strides.tolist()) == {level}


def test_postprocess_on_hand_made_outputs():
    """Scores, per-class NMS of the boxes clipped to the image (as torchvision's detectors
    clip before their NMS), empty slots."""
    where = fcos.layout((32, 32), (8,))  # 16 locations, centres 4, 12, 20, 28
    n, c = len(where.points), 2
    logits = np.full((1, n, c), -20.0, np.float32)
    distances = np.full((1, n, 4), 2.0, np.float32)
    index = lambda x, y: int(np.flatnonzero((where.points == [x, y]).all(1))[0])

    def put(x, y, cls, prob, ltrb):
        logits[0, index(x, y), cls] = np.log(prob / (1 - prob))
        distances[0, index(x, y)] = ltrb

    put(12, 12, 0, 0.9, [8, 8, 8, 8])  # box 4..20: kept
    put(20, 12, 0, 0.8, [16, 8, 0, 8])  # box 4..20 x 4..20 again: same class, suppressed
    put(20, 20, 1, 0.7, [16, 16, 0, 0])  # the same box, other class: kept
    put(28, 28, 0, 0.6, [2, 2, 2, 2])  # elsewhere: kept
    put(4, 28, 1, 0.001, [2, 2, 2, 2])  # under the score threshold: dropped
    put(28, 4, 1, 0.5, [8, 2, 40, 2])  # x 20..68, clipped to the image: 20..32: kept
    put(20, 4, 1, 0.4, [0, 2, 14, 2])  # x 20..34 (IoU 0.29 with it), clipped 20..32: suppressed
    outputs = {
        "logits": jnp.asarray(logits),
        "distances": jnp.asarray(distances),
        "centerness": jnp.full((1, n), 30.0),  # sigmoid 1: scores sqrt(class probabilities)
    }
    found = fcos.postprocess(
        outputs, where, (32, 32), score_threshold=0.1, iou_threshold=0.5,
        pre_nms=50, max_detections=6,
    )  # fmt: skip
    np.testing.assert_allclose(found["scores"][0], np.sqrt([0.9, 0.7, 0.6, 0.5, 0, 0]), atol=1e-5)
    np.testing.assert_array_equal(found["classes"][0], [0, 1, 0, 1, -1, -1])
    np.testing.assert_allclose(
        found["boxes"][0, :4],
        [[4, 4, 20, 20], [4, 4, 20, 20], [26, 26, 30, 30], [20, 2, 32, 6]],
        atol=1e-5,
    )


def test_a_nan_score_takes_no_place_among_the_pre_nms_best():
    """``lax.top_k`` takes NaN as the highest: NaN scores (a diverged location) would fill the
    ``pre_nms`` places and leave out every real detection."""
    where = fcos.layout((32, 32), (8,))
    n = len(where.points)
    logits = np.full((1, n, 2), -20.0, np.float32)
    logits[0, :4] = -np.nan  # a score of +NaN (lax.top_k's order: -NaN lowest, +NaN highest)
    logits[0, 9, 1] = np.log(0.9 / 0.1)
    outputs = {
        "logits": jnp.asarray(logits),
        "distances": jnp.full((1, n, 4), 2.0),
        "centerness": jnp.full((1, n), 30.0),
    }
    found = fcos.postprocess(
        outputs, where, (32, 32), score_threshold=0.1, iou_threshold=0.5,
        pre_nms=4, max_detections=2,
    )  # fmt: skip
    np.testing.assert_allclose(found["scores"][0], [np.sqrt(0.9), 0.0], atol=1e-5)
    np.testing.assert_array_equal(found["classes"][0], [1, -1])


def test_postprocess_clips_to_each_letterboxed_image_before_nms():
    """With each image's extent in the input (the rest letterbox padding), boxes are clipped
    to the image before NMS, as torchvision's detectors clip to the resized image: two boxes
    that overlap only inside the image suppress one another there, not in the input square."""
    where = fcos.layout((32, 32), (8,))
    n = len(where.points)
    logits = np.full((2, n, 1), -20.0, np.float32)
    distances = np.full((2, n, 4), 2.0, np.float32)
    index = lambda x, y: int(np.flatnonzero((where.points == [x, y]).all(1))[0])
    for image in (0, 1):
        logits[image, index(12, 4), 0] = np.log(0.9 / 0.1)  # x 8..40: 8..32 in the input
        distances[image, index(12, 4)] = [4, 0, 28, 8]
        logits[image, index(12, 12), 0] = np.log(0.8 / 0.2)  # x 8..18: IoU 10/24 with it
        distances[image, index(12, 12)] = [4, 8, 6, 0]
    outputs = {"logits": jnp.asarray(logits), "distances": jnp.asarray(distances),
               "centerness": jnp.full((2, n), 30.0)}  # fmt: skip
    found = fcos.postprocess(
        outputs, where, (32, 32), score_threshold=0.1, iou_threshold=0.5,
        pre_nms=10, max_detections=3,
        extents=jnp.asarray([[32.0, 32.0], [32.0, 20.0]]),
    )  # fmt: skip
    np.testing.assert_array_equal(found["classes"], [[0, 0, -1], [0, -1, -1]])
    np.testing.assert_allclose(found["boxes"][0, :2], [[8, 4, 32, 12], [8, 4, 18, 12]])
    np.testing.assert_allclose(found["boxes"][1, 0], [8, 4, 20, 12])  # 20 wide: IoU 10/12
    # The task clips so from the batch's extents (padding rows: the whole input), in evaluation
    # and in the report's and predict's predictions alike.
    task = Detection(strides=(8,), score_threshold=0.1, nms_iou=0.5, pre_nms_topk=10,
                     max_detections=3)  # fmt: skip
    batch = {"image": jnp.zeros((3, 32, 32, 3)), "mask": jnp.asarray([1.0, 1.0, 0.0]),
             "extent": jnp.asarray([[32.0, 32.0], [32.0, 20.0], [0.0, 0.0]]),
             "scale": jnp.ones(3), "image_id": jnp.arange(3)}  # fmt: skip
    three = {k: jnp.concatenate([v, v[:1]]) for k, v in outputs.items()}
    predicted = task.predict_batch(three, batch)
    _, per_example = task.evaluate_batch(three, batch)
    for key in ("boxes", "scores", "classes"):
        np.testing.assert_array_equal(predicted[key][:2], found[key])
        np.testing.assert_array_equal(per_example[key], predicted[key])
    np.testing.assert_array_equal(predicted["classes"][2], found["classes"][0])  # padding


def test_postprocess_takes_the_pre_nms_best_of_each_level():
    """As torchvision's FCOS (``topk_candidates``), the official FCOS and detectron2: many
    fine-level locations on one object fill one top-k over all levels, NMS collapses them to one
    box and a coarse level's object is lost; the top-k of each level keeps it."""
    size, strides = 256, (8, 16, 32, 64)
    where = fcos.layout((size, size), strides)
    n = len(where.points)
    logits = np.full((1, n, 1), -20.0, np.float32)
    distances = np.zeros((1, n, 4), np.float32)
    fine = np.arange(where.level_sizes[0])  # all 1024 stride-8 locations: the box 0..256 x 0..100
    logits[0, fine, 0] = 2.0  # score sqrt(sigmoid(2)) = 0.94
    x, y = where.points[fine].T
    distances[0, fine] = np.stack([x, y, size - x, 100 - y], -1)
    logits[0, n - 1, 0] = np.log(0.36 / 0.64)  # the last stride-64 location (224, 224): 0.6
    distances[0, n - 1] = [50, 50, 20, 20]
    outputs = {"logits": jnp.asarray(logits), "distances": jnp.asarray(distances),
               "centerness": jnp.full((1, n), 30.0)}  # fmt: skip
    found = fcos.postprocess(
        outputs, where, (size, size), score_threshold=0.05,
        iou_threshold=0.6, pre_nms=100, max_detections=10,
    )  # fmt: skip
    np.testing.assert_allclose(found["scores"][0, :3], [np.sqrt(1 / (1 + np.exp(-2))), 0.6, 0],
                               atol=1e-5)  # fmt: skip
    np.testing.assert_allclose(found["boxes"][0, :2], [[0, 0, 256, 100], [174, 174, 244, 244]])
    task = Detection(strides=strides, pre_nms_topk=100, max_detections=10)
    np.testing.assert_array_equal(task.detect(outputs, (size, size))["boxes"], found["boxes"])


@pytest.fixture
def torchvision_nms(torchvision, monkeypatch):
    """torchvision's ``nms`` op with a numpy greedy kernel where the CPU torch has none (the
    conftest declares only its schema, and torchvision refuses its ops without its C++
    extension); both undone after the test."""
    import torch
    import torchvision.extension

    def greedy(dets, scores, threshold):  # as torchvision's kernel: a 0 / 0 IoU suppresses none
        boxes, order = dets.numpy(), np.argsort(-scores.numpy(), kind="stable")
        alive, keep = np.ones(len(order), bool), []
        for rank, i in enumerate(order):
            if alive[rank]:
                keep.append(i)
                alive &= pairwise_iou(boxes[i : i + 1], boxes[order])[0] <= threshold
        return torch.as_tensor(np.asarray(keep, np.int64))

    try:  # a torchvision with its C++ extension has a CPU kernel
        torch.ops.torchvision.nms(torch.zeros((1, 4)), torch.zeros(1), 0.5)
        has_kernel = True
    except (NotImplementedError, RuntimeError):
        has_kernel = False
    if has_kernel:
        yield
        return
    lib = torch.library.Library("torchvision", "IMPL")
    lib.impl("nms", greedy, "CPU")
    monkeypatch.setattr(torchvision.extension, "_has_ops", lambda: True)
    try:
        yield
    finally:
        lib._destroy()


@pytest.mark.parametrize("per_image", [500, 20])  # 20: NMS stops at max_detections
@pytest.mark.parametrize("shift", [0.0, -6.0])  # scores mostly above / below the threshold
def test_postprocess_matches_torchvision_fcos(torchvision, torchvision_nms, shift, per_image):
    """The detections of torchvision's ``FCOS.postprocess_detections`` (per-level top-k,
    boxes clipped to each image, per-class NMS, the best ``detections_per_img``) on random
    outputs, letterboxed images included: the same boxes, scores and classes in the same order
    (torchvision's anchors are the stride squares around the locations)."""
    import torch
    from torchvision.models.detection.fcos import FCOS

    (h, w), strides, c = (96, 128), (8, 16, 32, 64), 5
    # The two finer levels hold over 200 pairs; room for every candidate that NMS keeps.
    pre, threshold, iou = 200, 0.05, 0.6
    where = fcos.layout((h, w), strides)
    n, sizes = len(where.points), list(where.level_sizes)
    rng = np.random.default_rng(0)
    logits = rng.normal(shift, 2, (3, n, c)).astype(np.float32)
    ctr = rng.normal(0, 2, (3, n)).astype(np.float32)
    distances = (rng.uniform(0.2, 4, (3, n, 4)) * where.strides[None, :, None]).astype(np.float32)
    extents = np.asarray([[h, w], [70, w], [h, 100]], np.float32)
    outputs = {"logits": jnp.asarray(logits), "distances": jnp.asarray(distances),
               "centerness": jnp.asarray(ctr)}  # fmt: skip
    post = lambda o, e: fcos.postprocess(
        o, where, (h, w), score_threshold=threshold, iou_threshold=iou,
        pre_nms=pre, max_detections=per_image, extents=e,
    )  # fmt: skip
    found = jax.jit(post)(outputs, jnp.asarray(extents))

    class Backbone(torch.nn.Module):
        out_channels = 32  # FCOS's head has GroupNorm(32) layers

    model = FCOS(Backbone(), num_classes=c, score_thresh=threshold, nms_thresh=iou,
                 detections_per_img=per_image, topk_candidates=pre)  # fmt: skip
    split = lambda x: list(torch.from_numpy(x).split(sizes, dim=1))
    points, half = torch.from_numpy(where.points), torch.from_numpy(where.strides)[:, None] / 2
    anchors = list(torch.cat([points - half, points + half], 1).split(sizes))
    heads = {"cls_logits": split(logits), "bbox_ctrness": split(ctr[..., None]),
             "bbox_regression": split(distances / where.strides[None, :, None])}  # fmt: skip
    want = model.postprocess_detections(
        heads, [anchors] * 3, [tuple(int(v) for v in e) for e in extents]
    )
    for i, expected in enumerate(want):
        d = len(expected["scores"])
        assert 10 < d <= per_image
        np.testing.assert_allclose(found["scores"][i, :d], expected["scores"], atol=1e-6)
        np.testing.assert_array_equal(found["scores"][i, d:], 0.0)
        np.testing.assert_array_equal(found["classes"][i, :d], expected["labels"])
        np.testing.assert_allclose(found["boxes"][i, :d], expected["boxes"], atol=1e-4)


def coco_ground_truth() -> dict:
    """Two images (ids 0 and 9: COCO ids may be 0), categories with non-contiguous ids, one
    crowd annotation."""
    box = lambda i, img, cat, b, crowd=0: {
        "id": i, "image_id": img, "category_id": cat, "bbox": b, "area": b[2] * b[3],
        "iscrowd": crowd,
    }  # fmt: skip
    return {
        "images": [
            {"id": 0, "width": 200, "height": 100, "file_name": "a.jpg"},
            {"id": 9, "width": 120, "height": 160, "file_name": "b.jpg"},
        ],
        "annotations": [
            box(1, 0, 3, [10, 10, 50, 40]),
            box(2, 0, 7, [100, 20, 60, 60]),
            box(3, 9, 3, [5, 5, 30, 90]),
            box(4, 9, 1, [50, 50, 60, 60]),
            box(5, 9, 1, [0, 100, 40, 50], 1),
        ],
        "categories": [
            {"id": 1, "name": "one"},
            {"id": 3, "name": "three"},
            {"id": 7, "name": "seven"},
        ],  # fmt: skip
    }


MADE = [  # (image, class index, x, y, w, h in original pixels, score)
    (0, 1, 12, 8, 48, 44, 0.9),  # good match of ann 1
    (0, 2, 100, 25, 55, 50, 0.8),  # fair match of ann 2
    (0, 2, 0, 0, 30, 30, 0.7),  # false positive
    (9, 1, 5, 5, 30, 90, 0.95),  # exact ann 3
    (9, 0, 60, 55, 50, 50, 0.6),  # partial ann 4
    (9, 0, 5, 110, 30, 30, 0.5),  # inside the crowd region: ignored, not a false positive
]
CATEGORY_IDS, NAMES = [1, 3, 7], ["one", "three", "seven"]


class FixedDetections(Detection):
    """The task with post-processing replaced by MADE (in model-input pixels, ``scale`` per
    image row), to test what happens to detections after the model."""

    scale = {0: 0.64, 9: 0.4}  # input pixels per original pixel
    rows = {0: 0, 9: 2}  # rows 1 and 3 of the batch are padding

    def _layout(self, batch, outputs):
        return None

    def detect(self, outputs, image_hw, extents=None):
        d = 4
        boxes, scores = np.zeros((4, d, 4), np.float32), np.zeros((4, d), np.float32)
        classes, slot = np.full((4, d), -1, np.int32), {0: 0, 9: 0}
        for image, cls, x, y, w, h, score in MADE:
            r, s = self.rows[image], slot[image]
            slot[image] += 1
            boxes[r, s] = np.asarray([x, y, x + w, y + h]) * self.scale[image]
            scores[r, s], classes[r, s] = score, cls
        boxes[1] = boxes[3] = 7.0  # whatever padding rows hold is dropped
        classes[1] = classes[3] = 0
        return {"boxes": jnp.asarray(boxes), "scores": jnp.asarray(scores),
                "classes": jnp.asarray(classes)}  # fmt: skip


def test_map_equals_pycocotools_on_hand_made_detections():
    """Detections as the eval step makes them (model-input pixels, class indices, padded rows)
    summarised by the task = pycocotools on the same detections in COCO's results format."""
    task = FixedDetections()
    batch = {
        "image": jnp.zeros((4, 64, 64, 3)),
        "mask": jnp.asarray([1.0, 0, 1, 0]),
        "scale": jnp.asarray([task.scale[0], 0, task.scale[9], 0], jnp.float32),
        "image_id": jnp.asarray([0, 0, 9, 0]),  # padding rows hold 0 as well
    }
    collection = task.eval_metrics({}, batch)
    source = SimpleNamespace(
        annotations=coco_ground_truth(), category_ids=CATEGORY_IDS, class_names=NAMES,
        skip_corrupt=False,
    )  # fmt: skip
    summary = task.summarize(collection, source, "eval/")

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt = COCO()
    gt.dataset = coco_ground_truth()
    gt.createIndex()
    results = [
        {"image_id": i, "category_id": CATEGORY_IDS[c], "bbox": [x, y, w, h], "score": s}
        for i, c, x, y, w, h, s in MADE
    ]
    evaluation = COCOeval(gt, gt.loadRes(results), "bbox")
    evaluation.evaluate()
    evaluation.accumulate()
    evaluation.summarize()
    for i, name in enumerate(["map", "ap50", "ap75"]):
        assert summary[f"eval/{name}"] == pytest.approx(evaluation.stats[i], abs=1e-6)
    assert 0.2 < summary["eval/map"] < 0.9  # neither trivial case
    assert summary["eval/examples"] == 2
    assert {k for k in summary if k.startswith("eval/ap/")} == {f"eval/ap/{n}" for n in NAMES}
    precision = evaluation.eval["precision"][:, :, 1, 0, -1]
    assert summary["eval/ap/three"] == pytest.approx(precision[precision > -1].mean())


def test_detections_merged_batch_by_batch_are_copied_once(monkeypatch):
    """As steps.evaluate merges them, batch by batch: the detections are concatenated once, by
    compute (each merge concatenated every detection so far again: quadratic in the split)."""
    rng = np.random.default_rng(0)
    parts = [
        Detections(
            rng.random((2, 3, 4)),
            rng.random((2, 3)),
            rng.integers(-1, 2, (2, 3)),
            np.arange(2) + 2 * i,
        )  # fmt: skip
        for i in range(5)
    ]
    real, calls = np.concatenate, []
    monkeypatch.setattr(np, "concatenate", lambda *a, **k: calls.append(1) or real(*a, **k))
    total = parts[0]
    for part in parts[1:]:
        total = total.merge(part)
    assert not calls
    found = total.compute()
    assert len(calls) == 4  # one per field
    np.testing.assert_array_equal(found["boxes"], real([p.boxes for p in parts]))
    np.testing.assert_array_equal(found["classes"], real([p.classes for p in parts]))
    np.testing.assert_array_equal(found["image_ids"], np.arange(10))


def test_results_are_clipped_to_their_image():
    """As torchvision's detectors: a box reaching past its image (or into the letterbox
    padding) is cut at the image's edges (image 9 is 120 wide, 160 high); one wholly off the
    image is dropped."""
    found = {
        "boxes": np.asarray([[[-5, 10, 130, 170], [20, 200, 60, 260], [1, 2, 3, 4]]], np.float32),
        "scores": np.asarray([[0.9, 0.8, 0.0]]),
        "classes": np.asarray([[0, 1, -1]]),  # the third slot is empty
        "image_ids": np.asarray([9]),
    }
    results = coco_results(found, CATEGORY_IDS, coco_ground_truth()["images"])
    assert [r["bbox"] for r in results] == [[0, 10, 120, 150]]
    assert [r["category_id"] for r in results] == [1]


class DeadBoxes(FixedDetections):
    """MADE's detections as a dead box branch gives them: every box of zero size at its
    location (all four distances 0)."""

    def detect(self, outputs, image_hw, extents=None):
        found = super().detect(outputs, image_hw, extents)
        return {**found, "boxes": found["boxes"].at[..., 2:].set(found["boxes"][..., :2])}


DEAD = "the box branch predicts zero distances everywhere (a dead ReLU"


@pytest.mark.parametrize("dead", [False, True])
def test_an_evaluation_whose_every_box_has_zero_area_warns_once(caplog, dead):
    """A dead box branch (every distance 0, GIoU loss stuck at 1) leaves every detection without
    area, dropped from COCO's results: mAP 0 with no word; the evaluation says why, once."""
    task = DeadBoxes() if dead else FixedDetections()
    batch = {
        "image": jnp.zeros((4, 64, 64, 3)),
        "mask": jnp.asarray([1.0, 0, 1, 0]),
        "scale": jnp.asarray([task.scale[0], 0, task.scale[9], 0], jnp.float32),
        "image_id": jnp.asarray([0, 0, 9, 0]),
    }
    collection = task.eval_metrics({}, batch).merge(task.eval_metrics({}, batch | {
        "mask": jnp.zeros(4), "image_id": jnp.full(4, PADDING_ID)}))  # fmt: skip
    source = SimpleNamespace(
        annotations=coco_ground_truth(), category_ids=CATEGORY_IDS, class_names=NAMES,
        skip_corrupt=False,
    )  # fmt: skip
    with caplog.at_level(logging.WARNING):
        summary = task.summarize(collection, source, "eval/")
    warned = [r for r in caplog.records if DEAD in r.getMessage()]
    assert len(warned) == int(dead)
    assert (summary["eval/map"] == 0.0) == dead
    if dead:
        assert f"All {len(MADE)} detections of this evaluation" in warned[0].getMessage()
        assert "lower learning rate or a longer warmup" in warned[0].getMessage()


def test_results_converted_a_batch_at_a_time_warn_once_of_zero_area(caplog):
    """predict converts a batch at a time into one tally: no batch warns, the tally warns once
    when every detection had zero area, and not when one had area."""
    point = lambda image, x, y: {
        "boxes": np.asarray([[[x, y, x, y]]], np.float32), "scores": np.asarray([[0.9]]),
        "classes": np.asarray([[0]]), "image_ids": np.asarray([image]),
    }  # fmt: skip
    images = coco_ground_truth()["images"]
    with caplog.at_level(logging.WARNING):
        tally = Counter()
        for image in (0, 9):
            assert coco_results(point(image, 20, 30), CATEGORY_IDS, images, tally=tally) == []
        assert DEAD not in caplog.text
        assert tally == {"detections": 2, "zero_area": 2}
        assert warn_if_all_zero_area(tally, "this prediction")
        assert caplog.text.count(DEAD) == 1 and "of this prediction" in caplog.text
        caplog.clear()
        live = {**point(9, 20, 30), "boxes": np.asarray([[[20, 30, 40, 50]]], np.float32)}
        assert len(coco_results(live, CATEGORY_IDS, images, tally=tally)) == 1
        assert not warn_if_all_zero_area(tally, "this prediction")
        assert not warn_if_all_zero_area(Counter(), "this prediction")  # nothing detected
    assert DEAD not in caplog.text


def test_perfect_and_empty_detections():
    truth = coco_ground_truth()
    perfect = [
        {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"],
         "score": 1.0}
        for a in truth["annotations"] if not a["iscrowd"]
    ]  # fmt: skip
    assert coco_metrics(truth, perfect, [0, 9], NAMES)["map"] == pytest.approx(1.0)
    assert coco_metrics(truth, [], [0, 9], NAMES)["map"] == 0.0


def test_a_split_without_annotations_warns_that_map_is_undefined(caplog):
    truth = {**coco_ground_truth(), "annotations": []}
    with caplog.at_level(logging.WARNING):
        figures = coco_metrics(truth, [], [0, 9], NAMES)
    assert all(np.isnan(figures[name]) for name in STAT_NAMES)  # pycocotools' -1, as detectron2
    assert "hold no (non-crowd) annotation: every COCO figure is undefined (NaN)" in caplog.text


def test_coverage_is_checked():
    source = SimpleNamespace(
        annotations=coco_ground_truth(), category_ids=CATEGORY_IDS, class_names=NAMES,
        skip_corrupt=False,
    )  # fmt: skip

    def empty(ids: list[int]) -> EvalMetrics:
        n = len(ids)
        return EvalMetrics.single_from_model_output(
            boxes=jnp.zeros((n, 1, 4)), scores=jnp.zeros((n, 1)),
            classes=-jnp.ones((n, 1), jnp.int32), image_ids=jnp.asarray(ids),
        )  # fmt: skip

    with pytest.raises(CoverageError, match="1 seen twice"):
        Detection().summarize(empty([0, 9, 9, PADDING_ID]), source, "eval/")
    with pytest.raises(CoverageError, match="1 missing"):
        Detection().summarize(empty([0, PADDING_ID]), source, "eval/")
    merged = empty([9, PADDING_ID]).merge(empty([0]))  # merged on the host across batches
    assert Detection().summarize(merged, source, "eval/")["eval/map"] == 0.0


FAMILIES = [("vit_ti16", 64), ("resnet18", 64), ("bit_r50x1", 64), ("cifar_resnet20", 32),
            ("vit_ti16", 112), ("vit_ti16", 48), ("resnet18", 40), ("resnet18", 21),
            ("resnet18", 67)]  # odd grids: ViT/16 at 112 px (7x7), CNN maps rounded up  # fmt: skip


@pytest.mark.parametrize("name,size", FAMILIES)
def test_head_shapes_every_family(name, size):
    """The head predicts at the layout's locations at any size the backbone takes: odd grids
    pool to ceil(n / 2) cells (as the layout counts them), and each CNN map's stride is told
    apart from its neighbours' (at 40 px ResNet's maps are 10, 5, 3 and 2)."""
    task = Detection(strides=(8, 16, 32, 64))
    model = task.build_model(name, 5, **({"depth": 1} if name.startswith("vit") else {}))
    images = jnp.zeros((2, size, size, 3))
    shapes = jax.eval_shape(lambda: model.init_with_output(jax.random.key(0), images))[0]
    n = len(fcos.layout((size, size), (8, 16, 32, 64)).points)
    assert shapes["logits"].shape == (2, n, 5)
    assert shapes["distances"].shape == (2, n, 4)
    assert shapes["centerness"].shape == (2, n)


@pytest.mark.parametrize("strides", [(32, 16, 8), (8, 8, 16), (8.0, 16.0), (0, 8), (-8, 8), (),
                                     (True, 8), ("8", "16")])  # fmt: skip
def test_strides_must_increase_strictly_as_positive_integers(strides):
    """The size ranges go by position (the first level's from 0, the last's to infinity): a
    reversed order sends the small boxes to the coarsest level, a repeated stride builds one
    level twice, a float is no stride: each refused when the task is made."""
    with pytest.raises(ValueError, match=r"task.strides .* must be strictly increasing positive"):
        Detection(strides=strides)


def test_strides_error_hints_the_sorted_strides_and_integers_are_accepted():
    with pytest.raises(ValueError, match=r"e\.g\. \(8, 16, 32\)"):
        Detection(strides=(32, 16, 8))
    assert Detection(strides=(4, 8, 16, 32)).strides == (4, 8, 16, 32)
    assert Detection(strides=(np.int64(8), np.int64(16))).strides == (8, 16)
