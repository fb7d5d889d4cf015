"""Feature backbones and the segmentation task: feature maps against timm's, head shapes for
every family, the loss against numpy, mIoU against scikit-learn, pretrained weights loading into
a segmentation model."""

from __future__ import annotations

from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import images, state_dict_np
from test_resnet import randomize_ as randomize_cnn_
from test_vit import randomize_ as randomize_vit_

from vision_jax.models import create_model
from vision_jax.models.registry import family
from vision_jax.tasks import IGNORE_LABEL, Segmentation
from vision_jax.trees import flatten_dict
from vision_jax.weights import WeightMismatchError, export_safetensors, load_pretrained
from vision_jax.weights.resnet import from_timm as resnet_from_timm
from vision_jax.weights.vit import from_timm as vit_from_timm

TOL = 1e-4
FAMILIES = [("vit_ti16", 64), ("resnet18", 64), ("bit_r50x1", 64), ("cifar_resnet20", 32)]


def _nchw(x: np.ndarray) -> np.ndarray:
    return np.asarray(x).transpose(0, 3, 1, 2)


def test_vit_feature_taps_equal_timm_forward_intermediates(timm):
    import torch

    x = images(64, seed=4)
    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=64)
    randomize_vit_(timm.create_model("vit_tiny_patch16_224", num_classes=10, img_size=64), x)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    ref.eval()
    model = create_model("vit_ti16", num_classes=0, feature_taps=(2, -1))
    variables = vit_from_timm(state_dict_np(ref), model.clone(feature_taps=None))
    got = model.apply(variables, x)
    with torch.no_grad():
        expected = ref.forward_intermediates(
            torch.from_numpy(_nchw(x).copy()), indices=[2, 11], norm=True,
            intermediates_only=True,
        )  # fmt: skip
    assert [g.shape for g in got] == [(2, 4, 4, 192)] * 2
    for g, e in zip(got, expected, strict=True):
        np.testing.assert_allclose(_nchw(g), e.numpy(), atol=TOL)


def test_resnet_feature_taps_equal_timm_stage_outputs(timm):
    import torch

    x = images(64, seed=5)
    ref = timm.create_model("resnet18", pretrained=False, num_classes=10)
    randomize_cnn_(ref, x, seed=5)
    model = create_model("resnet18", num_classes=0, feature_taps=(0, 1, 2, 3))
    variables = resnet_from_timm(state_dict_np(ref), model.clone(feature_taps=None))
    got = model.apply(variables, x)
    with torch.no_grad():
        expected = ref.forward_intermediates(
            torch.from_numpy(_nchw(x).copy()), indices=[1, 2, 3, 4], intermediates_only=True
        )
    assert [g.shape[1] for g in got] == [16, 8, 4, 2]  # strides 4..32
    for g, e in zip(got, expected, strict=True):  # stage outputs reach 10: 1e-5 relative
        np.testing.assert_allclose(_nchw(g), e.numpy(), atol=TOL, rtol=1e-3)


@pytest.mark.parametrize("name,size", FAMILIES)
@pytest.mark.parametrize("head", ["linear", "fpn"])
def test_head_output_shapes_and_parameter_names(name, size, head):
    model = Segmentation(head=head).build_model(name, 7)
    x = jnp.zeros((2, size, size, 3))
    variables = jax.eval_shape(model.init, jax.random.key(0), x)
    assert jax.eval_shape(model.apply, variables, x).shape == (2, size, size, 7)
    classifier = jax.eval_shape(create_model(name, num_classes=0).init, jax.random.key(0), x)
    names = set(flatten_dict(variables["params"]))
    backbone = {n for n in names if not n.startswith("task_head/")}
    assert backbone == set(flatten_dict(classifier["params"]))  # the checkpoint names
    assert names - backbone and all(n.startswith("task_head/") for n in names - backbone)
    taps = family(model).feature_taps(model.backbone)
    assert [t.stride for t in taps] == sorted(t.stride for t in taps)


@pytest.mark.parametrize("name,size", FAMILIES)
def test_blocks_after_the_last_tap_exist_but_do_not_run(name, size):
    """As timm's ``forward_intermediates(stop_early=True)``: fewer products, and every parameter
    still there (checkpoints load unchanged)."""
    early = create_model(name, num_classes=0, feature_taps=(0,))
    full = create_model(name, num_classes=0, feature_taps=(0, -1))
    x = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
    variables = jax.eval_shape(early.init, jax.random.key(0), x)
    assert jax.tree.structure(variables) == jax.tree.structure(
        jax.eval_shape(full.init, jax.random.key(0), x)
    )

    def products(model) -> int:
        text = str(jax.make_jaxpr(model.apply)(variables, x))
        return text.count("conv_general_dilated[") + text.count("dot_general[")

    assert products(early) < products(full)


def test_the_linear_head_takes_one_tap():
    """It reads the last map only: more taps would be computed and dropped without a word."""
    from vision_jax.tasks import Segmentation

    with pytest.raises(ValueError, match=r"feature_taps \(2, 3\): the linear head reads one"):
        Segmentation(head="linear", feature_taps=(2, 3))
    assert Segmentation(head="fpn", feature_taps=(2, 3)).feature_taps == (2, 3)


def test_feature_taps_need_a_headless_model():
    with pytest.raises(ValueError, match="num_classes=0"):
        create_model("resnet18", num_classes=3, feature_taps=(0,)).init(
            jax.random.key(0), jnp.zeros((1, 32, 32, 3))
        )
    with pytest.raises(ValueError, match="indices in"):
        create_model("vit_ti16", num_classes=0, feature_taps=(12,)).init(
            jax.random.key(0), jnp.zeros((1, 32, 32, 3))
        )
    for taps in ((2, 0), (1, 1), (-1, 2)):  # the pyramid assumed fine to coarse: wrong strides
        with pytest.raises(ValueError, match="each block or stage once, in network order"):
            Segmentation(head="fpn", feature_taps=taps).build_model("resnet18", 5).init(
                jax.random.key(0), jnp.zeros((1, 32, 32, 3))
            )


def _numpy_loss(logits, labels, weights):
    logits = logits.astype(np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    valid = labels != IGNORE_LABEL
    y = labels[valid]
    w = weights[y]
    return float((-logp[valid][np.arange(len(y)), y] * w).sum() / w.sum())


def test_loss_ignores_label_255_and_weights_classes_like_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 8, 8, 4)).astype(np.float32) * 3
    labels = rng.integers(0, 4, size=(3, 8, 8)).astype(np.int32)
    labels[rng.random(labels.shape) < 0.3] = IGNORE_LABEL
    weights = np.array([0.2, 1.0, 2.0, 0.5], np.float32)
    for task, w in [
        (Segmentation(), np.ones(4)),
        (Segmentation(class_weights=tuple(weights)), weights),
    ]:
        loss, aux = task.train_loss(jnp.asarray(logits), {"label_map": jnp.asarray(labels)})
        assert float(loss) == pytest.approx(_numpy_loss(logits, labels, w), rel=1e-5)
        valid = labels != IGNORE_LABEL
        acc = (logits.argmax(-1) == labels)[valid].mean()
        assert float(aux["pixel_accuracy"]) == pytest.approx(acc, rel=1e-6)
    # Changing ignored pixels' logits changes nothing.
    changed = np.where((labels == IGNORE_LABEL)[..., None], 100.0, logits)
    a, _ = Segmentation().train_loss(jnp.asarray(logits), {"label_map": jnp.asarray(labels)})
    b, _ = Segmentation().train_loss(jnp.asarray(changed), {"label_map": jnp.asarray(labels)})
    assert float(a) == pytest.approx(float(b), rel=1e-6)


def test_smoothed_and_class_weighted_loss_equals_torch(timm):
    """torch weights each class's share of the smoothed target by that class's weight (the
    whole smoothed cross-entropy was weighted by the label's)."""
    import torch

    rng = np.random.default_rng(2)
    logits = rng.normal(size=(2, 6, 6, 4)).astype(np.float32) * 2
    labels = rng.integers(0, 4, size=(2, 6, 6)).astype(np.int64)
    labels[rng.random(labels.shape) < 0.2] = IGNORE_LABEL
    weights = (1.0, 2.0, 0.5, 3.0)
    task = Segmentation(class_weights=weights, label_smoothing=0.1)
    loss, _ = task.train_loss(jnp.asarray(logits), {"label_map": jnp.asarray(labels)})
    expected = torch.nn.functional.cross_entropy(
        torch.from_numpy(logits.transpose(0, 3, 1, 2)), torch.from_numpy(labels),
        weight=torch.tensor(weights), ignore_index=IGNORE_LABEL, label_smoothing=0.1,
    )  # fmt: skip
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)


def test_a_nan_logit_is_never_a_correct_pixel():
    """``argmax`` alone takes a NaN as the best logit: here a NaN ranks lowest, and a pixel whose
    logits are all NaN is a miss in the training accuracy, the confusion matrix and mIoU."""
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(3, 4, 4, 3)).astype(np.float32)
    labels = rng.integers(0, 3, size=(3, 4, 4)).astype(np.int32)
    logits[0] = np.nan  # a diverged image, all class 0
    labels[0] = 0
    logits[1, :2, :, 1] = np.nan  # one class's logit NaN
    labels[1, :2] = 1
    labels[2, 0] = IGNORE_LABEL
    valid = labels != IGNORE_LABEL
    predicted = np.where(np.isnan(logits), -np.inf, logits).argmax(-1)
    correct = (predicted == labels) & ~np.isnan(logits).all(-1) & valid
    task, batch = Segmentation(), {"label_map": jnp.asarray(labels)}
    _, aux = task.train_loss(jnp.asarray(logits), batch)
    assert float(aux["pixel_accuracy"]) == pytest.approx(correct.sum() / valid.sum())
    batch["mask"] = jnp.ones(3)
    matrix = task.eval_metrics(jnp.asarray(logits), batch).confusion.compute()
    assert matrix.sum() == valid.sum() and np.trace(matrix) == correct.sum()
    assert matrix[0, 0] == correct[labels == 0].sum()  # image 0's 16 pixels all missed
    np.testing.assert_array_equal(task.predict(jnp.asarray(logits), (4, 4))["label_map"], predicted)


def test_miou_over_padded_batches_equals_sklearn_confusion_matrix():
    """Per-batch confusion matrices merged over a split of 7 images in batches of 3 (the last
    padded) equal scikit-learn's matrix over every real, non-ignored pixel; the loss is the
    mean over the images that have a valid pixel of each one's mean over them."""
    from sklearn.metrics import confusion_matrix

    rng = np.random.default_rng(1)
    n, c = 7, 5
    logits = rng.normal(size=(n, 6, 6, c)).astype(np.float32)
    labels = rng.integers(0, c - 1, size=(n, 6, 6)).astype(np.int32)  # class 4 never true
    labels[rng.random(labels.shape) < 0.2] = IGNORE_LABEL
    labels[2] = IGNORE_LABEL  # an image with nothing to score: no loss, still an example
    task, eval_step, total = Segmentation(), jax.jit(Segmentation().eval_metrics), None
    for start in range(0, n, 3):
        real = min(3, n - start)

        def pad(a, v, real=real):
            return np.concatenate([a, np.full((3 - real, *a.shape[1:]), v, a.dtype)])

        batch = {
            "label_map": pad(labels[start : start + 3], 0),  # padding rows hold class 0
            "mask": pad(np.ones(real, np.float32), 0.0),
        }
        m = jax.device_get(eval_step(pad(logits[start : start + 3], 0.0), batch))
        total = m if total is None else total.merge(m)
    valid = labels != IGNORE_LABEL
    expected = confusion_matrix(labels[valid], logits.argmax(-1)[valid], labels=list(range(c)))
    np.testing.assert_array_equal(total.confusion.compute(), expected)
    names = [f"c{i}" for i in range(c)]
    summary = task.summarize(total, SimpleNamespace(class_names=names), "eval/")
    tp = np.diag(expected)
    union = expected.sum(0) + expected.sum(1) - tp
    iou = tp[union > 0] / union[union > 0]
    assert summary["eval/miou"] == pytest.approx(iou.mean())
    assert summary["eval/pixel_accuracy"] == pytest.approx(tp.sum() / expected.sum())
    assert summary["eval/examples"] == n
    assert summary["eval/iou/c0"] == pytest.approx(tp[0] / union[0])
    losses = [
        _numpy_loss(logits[i : i + 1], labels[i : i + 1], np.ones(c)) for i in range(n) if i != 2
    ]
    assert summary["eval/loss"] == pytest.approx(np.mean(losses), rel=1e-5)  # per image


@pytest.mark.parametrize("name,size", [("cifar_resnet20", 32), ("vit_ti16", 32)])
def test_pretrained_classifier_loads_into_segmentation_model(tmp_path, name, size):
    """A classifier's weights file loads into a segmentation model: backbone identical, head
    fresh, the classifier's own head dropped."""
    x = jnp.zeros((1, size, size, 3))
    classifier = create_model(name, num_classes=10)
    variables = classifier.init(jax.random.key(3), x)
    perturbed = jax.tree.map(lambda a: a + 0.01 * jnp.cos(jnp.arange(a.size).reshape(a.shape)),
                             variables)  # fmt: skip
    path = tmp_path / "weights.safetensors"
    export_safetensors(perturbed, classifier, path)
    model = Segmentation(head="fpn").build_model(name, 4)
    fresh = model.init(jax.random.key(4), x)
    loaded = flatten_dict(load_pretrained(path, model=model, variables=fresh))
    source, init = flatten_dict(perturbed), flatten_dict(fresh)
    head = [k for k in loaded if "/task_head/" in k]
    assert head and all(np.array_equal(loaded[k], init[k]) for k in head)
    backbone = [k for k in loaded if k not in head]
    assert set(backbone) == set(source) - {"params/head/kernel", "params/head/bias"}
    for k in backbone:
        np.testing.assert_allclose(loaded[k], source[k], atol=1e-6, err_msg=k)


def test_replace_head_starts_a_task_head_afresh_and_unused_surgery_is_refused(
    tmp_path, monkeypatch
):
    """A segmentation model's weights loaded into the same model keep their task head, or
    start it afresh with ``replace_head`` (it was loaded as is: a new label set with the same
    class count kept the old head); ``head_bias_init`` (the bias of a replaced classifier
    head) on a task model, on a classifier whose head is loaded as is, and ``posemb`` on a
    model without position embeddings are errors, not settings read by nothing."""
    from vision_jax.weights import load as load_module

    x = jnp.zeros((1, 32, 32, 3))
    model = Segmentation(head="fpn").build_model("cifar_resnet20", 4)
    trained = model.init(jax.random.key(3), x)
    trained = jax.tree.map(lambda a: a + 0.01 * jnp.cos(jnp.arange(a.size).reshape(a.shape)),
                           trained)  # fmt: skip
    path = tmp_path / "seg.safetensors"  # a segmentation run's weights, as the reader gives them
    path.write_bytes(b"")
    monkeypatch.setattr(load_module, "read_variables", lambda source, model, **_: trained)
    fresh = model.init(jax.random.key(4), x)
    head = [k for k in flatten_dict(fresh) if "/task_head/" in k]
    kept = flatten_dict(load_pretrained(path, model=model, variables=fresh))
    assert all(np.allclose(kept[k], flatten_dict(trained)[k], atol=1e-6) for k in head)
    replaced = flatten_dict(load_pretrained(path, model=model, variables=fresh, replace_head=True))
    assert all(np.array_equal(replaced[k], flatten_dict(fresh)[k]) for k in head)
    with pytest.raises(WeightMismatchError, match=r"head_bias_init=-4.6 .*task model's head"):
        load_pretrained(path, model=model, variables=fresh, replace_head=True, head_bias_init=-4.6)
    with pytest.raises(WeightMismatchError, match=r"posemb='bicubic' .*this model has none"):
        load_pretrained(path, model=model, variables=fresh, posemb="bicubic")
    monkeypatch.undo()
    classifier = create_model("cifar_resnet20", num_classes=10)
    weights = classifier.init(jax.random.key(3), x)
    export_safetensors(weights, classifier, tmp_path / "cls.safetensors")
    with pytest.raises(
        WeightMismatchError, match=r"head_bias_init=2.0 .init.head_bias_init. would not be used"
    ):
        load_pretrained(tmp_path / "cls.safetensors", model=classifier, variables=weights,
                        head_bias_init=2.0)  # fmt: skip
    with pytest.raises(WeightMismatchError, match=r"would not be used: init.dont_load keeps"):
        load_pretrained(tmp_path / "cls.safetensors", model=classifier, variables=weights,
                        head_bias_init=2.0, dont_load=["head/.*"])  # fmt: skip
    loaded = load_pretrained(tmp_path / "cls.safetensors", model=classifier, variables=weights,
                             head_bias_init=2.0, replace_head=True)  # fmt: skip
    np.testing.assert_array_equal(loaded["params"]["head"]["bias"], 2.0)


def test_another_tasks_head_left_unloaded_is_named(tmp_path, monkeypatch, caplog):
    """A segmentation model from a detection run's weights: the load table names the new head's
    arrays and the detection head's that were not loaded (it said only "initialised fresh (2
    arrays)", the 32 dropped ones unmentioned), as a torch load lists missing and unexpected
    keys; a head of other shapes (another class count) is named as such."""
    import logging

    from vision_jax.tasks import Detection
    from vision_jax.weights import load as load_module

    x = jnp.zeros((1, 32, 32, 3))
    detector = Detection(strides=(4, 8)).build_model("cifar_resnet20", 3)
    path = tmp_path / "det.safetensors"  # a detection run's weights, as the reader gives them
    path.write_bytes(b"")
    model = Segmentation(head="linear").build_model("cifar_resnet20", 4)
    fresh = model.init(jax.random.key(4), x)

    def table(weights) -> str:
        monkeypatch.setattr(load_module, "read_variables", lambda source, model, **_: weights)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="vision_jax.weights"):
            load_pretrained(path, model=model, variables=fresh)
        return caplog.text

    theirs = [k for k in flatten_dict(detector.init(jax.random.key(3), x)) if "/task_head/" in k]
    text = table(detector.init(jax.random.key(3), x))
    assert "initialised fresh: 2 arrays (params/task_head/classifier (2))" in text, text
    assert f"the checkpoint's not loaded (another head): {len(theirs)} arrays (" in text, text
    assert "params/task_head/pyramid (8)" in text, text
    other = Segmentation(head="linear").build_model("cifar_resnet20", 7)
    text = table(other.init(jax.random.key(3), x))
    assert "the checkpoint's not loaded (other shapes): 2 arrays" in text, text


@pytest.mark.slow
def test_shared_vit_ti16_loads_into_segmentation_model(shared_dir):
    weights = shared_dir / "weights" / "vit_ti16"
    model = Segmentation(head="linear").build_model("vit_ti16", 11)
    fresh = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
    from_npz = flatten_dict(
        load_pretrained(weights / "ViT-Ti_16.npz", model=model, variables=fresh)
    )
    from_timm = flatten_dict(  # the same tensors: resampled alike (timm's default is bicubic)
        load_pretrained(
            weights / "vit_tiny_patch16_224.safetensors",
            model=model,
            variables=fresh,
            posemb="bilinear",
        )  # fmt: skip
    )
    assert from_npz.keys() == from_timm.keys()
    for k in from_npz:
        np.testing.assert_allclose(from_npz[k], from_timm[k], atol=1e-6, err_msg=k)
    assert np.array_equal(from_npz["params/task_head/classifier/kernel"],
                          flatten_dict(fresh)["params/task_head/classifier/kernel"])  # fmt: skip


def test_upsample2x_is_flax_conv_transpose():
    """The pyramid's 2x upsampling: nn.ConvTranspose's parameters, initial values and outputs."""
    import flax.linen as nn

    from vision_jax.models.pyramid import Upsample2x

    x = jax.random.normal(jax.random.key(0), (2, 5, 7, 6))
    reference = nn.ConvTranspose(4, (2, 2), strides=(2, 2))
    ours = Upsample2x(4)
    init = jax.random.key(1)
    for a, b in zip(*(jax.tree.leaves(m.init(init, x)) for m in (ours, reference)), strict=True):
        np.testing.assert_array_equal(a, b)
    variables = jax.tree.map(lambda a: jax.random.normal(jax.random.key(2), a.shape),
                             reference.init(init, x))  # fmt: skip
    np.testing.assert_allclose(
        ours.apply(variables, x), reference.apply(variables, x), rtol=1e-5, atol=1e-5
    )


def test_a_coarse_level_is_enlarged_in_place_not_stretched():
    """A pyramid level of ceil(n / 2) cells (a 7x7 ViT grid's stride-32 level has 4 cells
    covering 128 of 112 px) is enlarged by its stride's ratio and cut, so each cell stays over
    the pixels it covers; resizing it to the finer map's size would stretch it."""
    from vision_jax.models.pyramid import upsample_by

    coarse = np.zeros((1, 4, 4, 1), np.float32)
    coarse[0, 1, 2, 0] = 1.0  # rows 8-15, columns 16-23 of a 28x28 map at factor 8
    fine = np.asarray(upsample_by(jnp.asarray(coarse), 8, (28, 28)))[0, ..., 0]
    assert fine.shape == (28, 28)
    np.testing.assert_array_equal(np.unravel_index(fine.argmax(), fine.shape), (11, 19))
    assert fine[:, 24:].max() < 0.5  # stretched over 28 px, the peak would be at (10, 17)


@pytest.mark.parametrize("name,size", [("resnet18", 40), ("resnet18", 36), ("resnet18", 20),
                                       ("vit_ti16", 112), ("cifar_resnet20", 18)])  # fmt: skip
def test_the_fpn_head_takes_odd_sizes(name, size):
    """Odd and small sizes, where a CNN's maps round up (ResNet at 40 px: 10, 5, 3, 2) and a
    ViT's grid is odd (7x7 at 112 px): logits at the image's size."""
    from vision_jax.tasks import Segmentation

    model = Segmentation(head="fpn").build_model(
        name, 3, **({"depth": 1} if name.startswith("vit") else {})
    )
    images = jnp.zeros((1, size, size, 3))
    logits = jax.eval_shape(lambda: model.init_with_output(jax.random.key(0), images))[0]
    assert logits.shape == (1, size, size, 3)


def test_vit_taps_of_one_stride_are_refused_by_the_pyramid_heads():
    """A plain ViT's blocks all sit at its patch stride: an FPN over two of them would read the
    'coarser' one as stride 32 (its corner stretched over the image). The fpn head and the
    detector refuse them when the model is built; one tap builds the simple pyramid as before."""
    from vision_jax.tasks import Detection, Segmentation

    for task in (Segmentation(head="fpn", feature_taps=(5, 11)), Detection(feature_taps=(5, 11))):
        with pytest.raises(ValueError, match=r"feature_taps \(5, 11\) of vit_ti16 are all at "
                                             r"stride 16: .*one block.*set one tap"):  # fmt: skip
            task.build_model("vit_ti16", 3)
    images = jnp.zeros((1, 96, 96, 3))
    seg = Segmentation(head="fpn", feature_taps=(11,)).build_model("vit_ti16", 3)
    logits = jax.eval_shape(lambda: seg.init_with_output(jax.random.key(0), images))[0]
    assert logits.shape == (1, 96, 96, 3)
    det = Detection(strides=(8, 16, 32), feature_taps=(11,)).build_model("vit_ti16", 3)
    out = jax.eval_shape(lambda: det.init_with_output(jax.random.key(0), images))[0]
    assert out["logits"].shape == (1, 12 * 12 + 6 * 6 + 3 * 3, 3)


def test_feature_strides_from_the_maps_sizes():
    """Each map's stride from its height and width against the image's: a CNN's rounded-up maps
    (ResNet at 40 px: 10, 5, 3, 2) and non-square inputs as they are; maps of one stride (a
    ViT's blocks) refused, never given invented coarser strides."""
    from vision_jax.models.pyramid import feature_strides

    maps = lambda *hw: [jnp.zeros((1, h, w, 1)) for h, w in hw]
    assert feature_strides(maps((10, 10), (5, 5), (3, 3), (2, 2)), (40, 40)) == [4, 8, 16, 32]
    assert feature_strides(maps((32, 32), (16, 16), (8, 8)), (32, 32)) == [1, 2, 4]  # CIFAR
    assert feature_strides(maps((6, 16), (3, 8), (2, 4)), (48, 128)) == [8, 16, 32]
    assert feature_strides(maps((1, 4)), (48, 128)) == [32]  # 48 px over 32, rounded down
    with pytest.raises(ValueError, match=r"6x6, 6x6 cells on 96x96 images are all at stride "
                                         r"16: a pyramid reads maps fine to coarse"):  # fmt: skip
        feature_strides(maps((6, 6), (6, 6)), (96, 96))


def test_maps_of_equal_stride_are_refused_with_one_message_for_any_family():
    """The one rule and message for both checks (the taps' declared strides, the maps' sizes):
    a dilated CNN's last stages (4, 8, 16, 16) are refused as a plain ViT's blocks are, with
    the taps to keep (the last of each stride)."""
    from vision_jax.models.pyramid import check_coarser

    message = (
        r"feature_taps \(0, 1, 2, 3\) of dilated are at strides \(4, 8, 16, 16\): the fpn head "
        r"reads maps fine to coarse.*dilated CNN.*e\.g\. feature_taps=\(0, 1, 3\)"
    )
    with pytest.raises(ValueError, match=message):
        taps = (0, 1, 2, 3)
        check_coarser((4, 8, 16, 16), "feature_taps (0, 1, 2, 3) of dilated", taps, "the fpn head")
    check_coarser((4, 8, 16, 32), "maps")


@pytest.mark.parametrize(("taps", "size", "strides"), [((1, 3), 40, (8, 32, 64)),
                                                       ((3,), 20, (16, 32, 64))])  # fmt: skip
def test_pyramid_heads_take_the_strides_the_family_declares(taps, size, strides):
    """A CNN tap with no tap just before it, on small images: ResNet at 40 px with taps (1, 3)
    gives maps of 5 and 2 cells, a single tap (3,) at 20 px one of 1 cell; both fit strides 16
    and 32 by size, the family declares 32. The heads take 32: the fpn head fuses the maps at
    the image's size, the detector's levels are the layout's."""
    from vision_jax.tasks import Detection, Segmentation
    from vision_jax.tasks import fcos as fcos_lib

    images = jnp.zeros((1, size, size, 3))
    seg = Segmentation(head="fpn", feature_taps=taps).build_model("resnet18", 3)
    assert seg.task_head.feature_strides[-1] == 32
    logits = jax.eval_shape(lambda: seg.init_with_output(jax.random.key(0), images))[0]
    assert logits.shape == (1, size, size, 3)
    det = Detection(strides=strides, feature_taps=taps).build_model("resnet18", 3)
    assert det.task_head.feature_strides[-1] == 32
    out, variables = jax.eval_shape(lambda: det.init_with_output(jax.random.key(0), images))
    layout = fcos_lib.layout((size, size), strides)
    assert out["logits"].shape == (1, len(layout.points), 3)
    pyramid = variables["params"]["task_head"]["pyramid"]
    if len(taps) == 2:  # the stride-32 map is the level at 32 (not subsampled from the 8)
        assert "output1" in pyramid
    else:  # stride 32: the simple pyramid's levels 16 (2x), 32 and 64
        assert {"lateral1", "lateral2", "lateral3"} <= set(pyramid)
