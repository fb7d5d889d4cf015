"""Export for serving: the SavedModel, StableHLO and TFLite forms compute what the JAX model
computes (uint8 images in, preprocessing inside), at several batch sizes; the ViT's erf; LoRA
runs; quantisation measured on real images."""

from __future__ import annotations

import dataclasses
import errno
import functools
import io
import json
import math
import os
import pathlib
import signal
import subprocess
import sys
import time
import zipfile
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf
from conftest import SHARED
from PIL import Image
from test_finetune import lora_vit_config
from test_train import small_config

from vision_jax import create_model
from vision_jax.data import InputSpec, digits, eval_batches, from_arrays, from_columns
from vision_jax.export import (
    QUANTIZATIONS,
    ExportError,
    Servable,
    TFLiteModel,
    export_trained,
    load_stablehlo,
    quantization_report,
    tflite,
    to_savedmodel,
    to_stablehlo,
    to_tflite,
)
from vision_jax.export.__main__ import main as export_main
from vision_jax.export.exporter import _manifest
from vision_jax.models.vit import erf_elementary
from vision_jax.output_errors import _HOST, remove_partials, written_whole
from vision_jax.tasks import Classification, Detection, Segmentation
from vision_jax.train import train_and_evaluate
from vision_jax.trained import load_trained
from vision_jax.weights import load_pretrained

CIFAR_ZIP = SHARED / "data/cifar10_jpeg/cifar10_jpeg.zip"
RESNET20 = SHARED / "weights/resnet_cifar10/resnet20-12fca82f.th"
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def cifar_members(split: str, per_class: int) -> list[str]:
    """The first ``per_class`` JPEGs of each class of the shared CIFAR-10 split (zip members)."""
    with zipfile.ZipFile(CIFAR_ZIP) as z:
        names = sorted(n for n in z.namelist() if n.startswith(f"{split}/") and n.endswith("jpg"))
    taken: dict[str, list[str]] = {}
    for name in names:
        taken.setdefault(name.split("/")[1], []).append(name)
    return [n for members in taken.values() for n in members[:per_class]]


def cifar_images(split: str, per_class: int) -> np.ndarray:
    """Those JPEGs of the shared CIFAR-10 split, decoded."""
    with zipfile.ZipFile(CIFAR_ZIP) as z:
        return np.stack([
            np.asarray(Image.open(io.BytesIO(z.read(n))).convert("RGB"))
            for n in cifar_members(split, per_class)
        ])  # fmt: skip


def digit_images(count: int) -> np.ndarray:
    """sklearn digits as uint8 16x16 RGB (each pixel repeated 2x2)."""
    images = digits("test").columns["image"][:count, ..., 0]
    return np.repeat(np.repeat(images, 2, 1), 2, 2)[..., None].repeat(3, -1)


@pytest.fixture(scope="module")
def resnet():
    """A CIFAR ResNet-20 with trained weights and real images: the shared CIFAR-10 weights and
    test JPEGs, or (without ../shared) randomly perturbed weights on digits."""
    real = CIFAR_ZIP.is_file() and RESNET20.is_file()
    size, mean, std = (32, IMAGENET_MEAN, IMAGENET_STD) if real else (16, (0.5,) * 3, (0.5,) * 3)
    model = create_model("cifar_resnet20", num_classes=10)
    variables = init(model, size)
    if real:
        images = cifar_images("test", 1)  # one per class
        variables = load_pretrained(RESNET20, model=model, variables=variables)
    else:
        images, variables = digit_images(10), perturbed(variables)
    return Servable(model, variables, Classification(), size, mean, std), images


def init(model, size: int) -> dict:
    initialise = jax.jit(functools.partial(model.init, train=False))
    return initialise(jax.random.key(0), jnp.zeros((1, size, size, 3)))


def perturbed(variables: dict, scale: float = 0.1) -> dict:
    """Parameters with noise added (a fresh head is zero: every output would be equal)."""
    rng = np.random.default_rng(1)
    noisy = lambda x: np.asarray(x) + scale * rng.standard_normal(x.shape, np.float32)
    return {**variables, "params": jax.tree.map(noisy, variables["params"])}


def reference(servable: Servable, images: np.ndarray) -> np.ndarray:
    """The JAX model's probabilities with the preprocessing written out in numpy: /255, then
    (x - mean) / std."""
    x = (images / 255.0 - np.asarray(servable.mean)) / np.asarray(servable.std)
    apply = jax.jit(functools.partial(servable.model.apply, train=False))
    return np.asarray(jax.nn.softmax(apply(servable.variables, x.astype(np.float32))))


def test_savedmodel_takes_any_batch_and_matches_the_model(resnet, tmp_path):
    servable, images = resnet
    to_savedmodel(servable, tmp_path)
    serve = tf.saved_model.load(str(tmp_path)).signatures["serving_default"]
    spec = serve.structured_input_signature[1]["images"]
    assert spec.dtype == tf.uint8 and spec.shape.as_list() == [None, *images.shape[1:]]
    for batch in (3, len(images)):
        out = serve(images=tf.constant(images[:batch]))["probabilities"].numpy()
        expected = reference(servable, images[:batch])
        np.testing.assert_allclose(out, expected, atol=1e-4)
        assert np.ptp(expected, axis=0).max() > 1e-5  # the outputs differ from image to image


def test_stablehlo_reloads_in_jax_at_any_batch(resnet, tmp_path):
    servable, images = resnet
    to_stablehlo(servable, tmp_path / "model.jax_exported")
    exported = load_stablehlo(tmp_path / "model.jax_exported")
    assert "cpu" in exported.platforms
    for batch in (2, len(images)):
        out = exported.call(images[:batch])["probabilities"]
        np.testing.assert_allclose(out, reference(servable, images[:batch]), atol=1e-4)


def test_tflite_float32_matches_and_checks_its_input(resnet):
    servable, images = resnet
    model = TFLiteModel(to_tflite(servable, batch=4))
    assert model.batch == 4
    out = model(images[:4])["probabilities"]
    np.testing.assert_allclose(out, reference(servable, images[:4]), atol=1e-4)
    with pytest.raises(ExportError, match=r"takes uint8 \[4, \d+, \d+, 3\] images; got float32"):
        model(images[:4].astype(np.float32))
    with pytest.raises(ExportError, match="Unknown quantize 'int4'"):
        to_tflite(servable, quantize="int4")
    with pytest.raises(ExportError, match="full_int8 needs at least 4 representative images"):
        to_tflite(servable, batch=4, quantize="full_int8")


@pytest.mark.slow
def test_resnet_with_a_one_pixel_stage_converts_at_batch_1_and_any_batch(tmp_path):
    """ResNet-18 at 32 px: layer4's stride-2 1x1 shortcut gives one output pixel at batch 1,
    which the TFLite converter refused as a matrix product (it stays a convolution); with a
    symbolic batch (SavedModel, StableHLO) whether there is more than one is not known, which
    failed the export ("Symbolic dimension comparison 'b' > '1' is inconclusive")."""
    model = create_model("resnet18", num_classes=5)
    variables = init(model, 32)
    rng = np.random.default_rng(0)
    head = jax.tree.map(
        lambda x: 0.01 * rng.standard_normal(x.shape, np.float32), variables["params"]["head"]
    )
    variables = {**variables, "params": {**variables["params"], "head": head}}
    servable = Servable(model, variables, Classification(), 32, (0.5,) * 3, (0.5,) * 3)
    images = rng.integers(0, 256, (1, 32, 32, 3), dtype=np.uint8)
    out = TFLiteModel(to_tflite(servable, batch=1))(images)["probabilities"]
    expected = reference(servable, images)
    np.testing.assert_allclose(out, expected, atol=1e-5)
    assert expected.max() < 0.99  # not saturated: the comparison means something
    to_stablehlo(servable, tmp_path / "model.jax_exported")
    images = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    for batch in (1, 3):
        out = load_stablehlo(tmp_path).call(images[:batch])["probabilities"]
        np.testing.assert_allclose(out, reference(servable, images[:batch]), atol=1e-5)


def test_a_converter_failure_is_one_line(resnet, monkeypatch):
    def fail(self):
        raise RuntimeError("/x/precision.py:200:11: error: 'tfl.op' bad rank\nloc(callsite(...))")

    monkeypatch.setattr(tf.lite.TFLiteConverter, "convert", fail)
    with pytest.raises(ExportError, match=r"^The TFLite converter failed: 'tfl.op' bad rank$"):
        to_tflite(resnet[0], batch=2)


def test_elementary_erf_is_float32_erf():
    x = np.linspace(-6, 6, 100_001, dtype=np.float32)
    exact = np.asarray([math.erf(v) for v in x.astype(np.float64)])
    np.testing.assert_allclose(np.asarray(jax.jit(erf_elementary)(x)), exact, atol=1e-6, rtol=0)


def test_vit_converts_to_tflite_and_matches_the_model_with_lax_erf():
    """TFLite has no erf: exported ViTs compute it with elementary ops (XLA's expansion), and
    still equal the model (which keeps ``lax.erf``)."""
    model = create_model("vit_ti16", num_classes=5, depth=1)
    images = np.tile(digit_images(4), (1, 2, 2, 1))  # 32x32: a 2x2 grid of patches
    variables = perturbed(init(model, 32))
    servable = Servable(model, variables, Classification(), 32, (0.5,) * 3, (0.5,) * 3)
    out = TFLiteModel(to_tflite(servable, batch=4))(images)["probabilities"]
    np.testing.assert_allclose(out, reference(servable, images), atol=1e-4)


def test_vit_full_int8_runs_and_agrees_with_float(monkeypatch):
    """Full-integer ViTs keep their divides float and trace GELU as its tanh approximation:
    TFLite's int8 divide (the softmax sums', the written-out erf's) met a divisor stored as 0
    and the model failed at inference. A model that cannot run is an ExportError, not a file."""
    model = create_model("vit_ti16", num_classes=5, depth=1)
    images = np.tile(digit_images(32), (1, 2, 2, 1))
    servable = Servable(model, perturbed(init(model, 32)), Classification(), 32, (0.5,) * 3,
                        (0.5,) * 3)  # fmt: skip
    int8 = TFLiteModel(to_tflite(servable, batch=8, quantize="full_int8", representative=images))
    got = np.concatenate([int8(images[i : i + 8])["probabilities"] for i in range(0, 32, 8)])
    expected = reference(servable, images)
    assert np.mean(got.argmax(-1) == expected.argmax(-1)) >= 0.8
    assert np.abs(got - expected).max() < 0.15
    monkeypatch.setattr(tflite, "FULL_INT8_GELU", "elementary")
    monkeypatch.setattr(tflite, "FLOAT_OPS_IN_INT8", ())
    with pytest.raises(ExportError, match=r"full-integer int8 model fails at inference \(.*DIV"):
        to_tflite(servable, batch=8, quantize="full_int8", representative=images)


def test_detection_refuses_tflite_with_the_reason():
    task = Detection(strides=(16,))
    servable = Servable(task.build_model("vit_ti16", 2, depth=1), {}, task, 32, (0.5,) * 3,
                        (0.5,) * 3)  # fmt: skip
    with pytest.raises(ExportError, match="TFLite cannot convert a detection model: .*top-k"):
        to_tflite(servable)


@pytest.mark.slow
def test_detection_savedmodel_runs_in_tensorflow(tmp_path):
    """TensorFlow 2.21 cannot load lax.top_k's StableHLO composite: the exported
    post-processing takes its top-k from a sort, with the same detections."""
    task = Detection(strides=(16,))
    model = task.build_model("vit_ti16", 2, depth=1)
    servable = Servable(model, perturbed(init(model, 32)), task, 32, (0.5,) * 3, (0.5,) * 3)
    images = np.tile(digit_images(3), (1, 2, 2, 1))
    x = (images / 255.0 - 0.5) / 0.5
    outputs = jax.jit(functools.partial(model.apply, train=False))(servable.variables, x)
    expected = task.predict(outputs, (32, 32))
    to_savedmodel(servable, tmp_path / "det")
    serve = tf.saved_model.load(str(tmp_path / "det")).signatures["serving_default"]
    for batch in (1, 3):
        got = serve(images=tf.constant(images[:batch]))
        assert set(got) == {"boxes", "scores", "classes"}
        for key in got:
            np.testing.assert_allclose(got[key], expected[key][:batch], atol=1e-4, err_msg=key)
    assert (np.asarray(expected["classes"]) >= 0).sum() > 3  # detections to compare
    trained = SimpleNamespace(  # what the manifest reads of a run
        task=task, input=InputSpec(32), class_names=["a", "b"], step_dir="run/checkpoints/3",
        step=3, ema=False,
        record=SimpleNamespace(model="vit_ti16", category_ids=(3, 7)),
        spec=SimpleNamespace(model_dtype="float32"),
    )  # fmt: skip
    manifest = _manifest(trained, servable, "savedmodel", "none", None)
    assert manifest["input"]["letterbox"]["pad_rgb"] == [127.5] * 3  # the mean, as evaluation
    assert manifest["category_ids"] == [3, 7] and manifest["signature"] == "serving_default"


@pytest.mark.slow
def test_detection_exports_to_stablehlo(tmp_path):
    task = Detection(strides=(16,))
    model = task.build_model("vit_ti16", 2, depth=1)
    servable = Servable(model, perturbed(init(model, 32)), task, 32, (0.5,) * 3, (0.5,) * 3)
    images = np.tile(digit_images(3), (1, 2, 2, 1))
    to_stablehlo(servable, tmp_path / "det")
    exported = load_stablehlo(tmp_path / "det")
    x = (images / 255.0 - 0.5) / 0.5
    outputs = jax.jit(functools.partial(model.apply, train=False))(servable.variables, x)
    expected = task.predict(outputs, (32, 32))
    for batch in (1, 3):
        got = exported.call(images[:batch])
        assert set(got) == {"boxes", "scores", "classes"}
        for key in got:
            np.testing.assert_allclose(got[key], expected[key][:batch], atol=1e-4, err_msg=key)
    assert (np.asarray(expected["classes"]) >= 0).any()  # some detections to compare


def test_cli_errors_are_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit):
        export_main(["--workdir", str(tmp_path), "--format", "savedmodel", "--output",
                     str(tmp_path / "out"), "--evaluate"])  # fmt: skip
    assert "--evaluate compares TFLite quantisations" in capsys.readouterr().err
    for flags, message in [
        (["--eval_examples=50"], "--evaluate measures on: add --evaluate."),
        (["--evaluate", "--eval_examples=-3"], "--eval_examples must be at least 1, got -3."),
        (["--tflite_batch=0"], "--tflite_batch must be at least 1, got 0."),
    ]:  # before any work (a negative count was numpy's "negative dimensions" after it)
        with pytest.raises(SystemExit):
            export_main(["--workdir", str(tmp_path), "--format", "tflite", "--output",
                         str(tmp_path / "out"), *flags])  # fmt: skip
        assert capsys.readouterr().err.strip().splitlines()[-1].endswith(message)
    assert export_main(["--workdir", str(tmp_path), "--format", "stablehlo",
                        "--output", str(tmp_path / "out")]) == 1  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: No vision_jax checkpoint found in") and "\n" not in err


def test_quantisations_of_a_task_of_ones_own_are_not_compared_as_classes(
    tmp_path, monkeypatch, caplog, capsys
):
    """--evaluate and full_int8's agreement counted top-1 classes of any task of one's own: a
    regression's export failed after converting (KeyError 'probabilities'), a multi-label
    task's printed meaningless figures. --evaluate is refused before anything converts;
    full_int8 exports without the check, and a warning says it was not measured."""
    from own_task import DigitValue

    import vision_jax.export.__main__ as cli
    from vision_jax.export import exporter

    task = DigitValue()
    model = task.build_model("cifar_resnet20", 10)
    spec = SimpleNamespace(model_dtype="float32", data=SimpleNamespace(train_split="train"))
    trained = SimpleNamespace(
        task=task, model=model, variables=perturbed(init(model, 8)), spec=spec,
        input=InputSpec(image_size=8), class_names=[str(d) for d in range(10)],
        record=SimpleNamespace(model="cifar_resnet20", category_ids=None), step_dir="run/1",
        step=1, ema=False,
    )  # fmt: skip
    with pytest.raises(ExportError, match="the task 'digit_value' is one of your own"):
        quantization_report(trained)
    monkeypatch.setattr(cli, "load_trained", lambda *args, **kwargs: trained)
    converted = lambda *args, **kwargs: pytest.fail("converted before refusing")
    monkeypatch.setattr(cli, "export_trained", converted)
    args = ["--workdir", "run", "--format", "tflite", "--output", str(tmp_path), "--evaluate"]
    assert cli.main(args) == 1
    assert "Comparing TFLite quantisations (--evaluate)" in capsys.readouterr().err
    images = digit_images(100)[:, ::2, ::2]  # 8 x 8
    monkeypatch.setattr(exporter, "_calibration_images", lambda trained, batch: images)
    with caplog.at_level("WARNING"):
        manifest = export_trained(trained, tmp_path, format="tflite", quantize="full_int8")
    assert "quantization_check" not in manifest
    said = "agreement with float32 is not measured for the task 'digit_value', one of your own"
    assert any(said in r.getMessage() for r in caplog.records)
    values = TFLiteModel((tmp_path / "model.tflite").read_bytes())(images[:1])["value"]
    assert values.shape == (1,) and np.isfinite(values).all()


def test_segmentation_exports_label_maps_and_probabilities():
    task = Segmentation()
    model = task.build_model("vit_ti16", 3, depth=1)  # a linear head on a ViT: GELU inside
    servable = Servable(model, perturbed(init(model, 32)), task, 32, (0.5,) * 3, (0.5,) * 3)
    images = np.tile(digit_images(2), (1, 2, 2, 1))
    out = TFLiteModel(to_tflite(servable, batch=2))(images)
    x = (images / 255.0 - 0.5) / 0.5
    logits = jax.jit(functools.partial(model.apply, train=False))(servable.variables, x)
    expected = np.asarray(jax.nn.softmax(logits))
    assert out["probabilities"].shape == (2, 32, 32, 3)
    np.testing.assert_allclose(out["probabilities"], expected, atol=1e-4)
    assert np.mean(out["label_map"] == expected.argmax(-1)) > 0.999  # ties may round apart
    # The manifest says how evaluation fits an image in (the whole image squashed) and back.
    from types import SimpleNamespace

    from vision_jax.export.exporter import _manifest

    trained = SimpleNamespace(
        task=task, input=InputSpec(image_size=32, interpolation="bicubic"), class_names=["a"] * 3,
        record=SimpleNamespace(model="vit_ti16", category_ids=None), step_dir="run/1", step=1,
        ema=False, spec=SimpleNamespace(model_dtype="float32"),
    )  # fmt: skip
    resize = _manifest(trained, servable, "tflite", "none", 2)["input"]["resize"]
    assert resize["interpolation"] == "bicubic" and "whole image to 32 x 32" in resize["resize"]
    assert "bilinearly" in resize["label_map"] and "argmax" in resize["label_map"]


# ---- exporting trained runs (each trains a small run first) ----------------------------------


def run_predictions(trained, images: np.ndarray) -> np.ndarray:
    """The run's probabilities for ``images`` through its own evaluation path: the pipeline's
    normalisation (``vision_jax.data``) and ``Trained.predict_batches``."""
    source = from_arrays(images, np.zeros(len(images), np.int32), trained.class_names)
    batches = eval_batches(source, trained.input, global_batch=len(images))
    return np.concatenate([p["probabilities"] for _, p in trained.predict_batches(batches)])


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """CIFAR ResNet-20 trained on 8x8 digits (the pipeline then resizes nothing)."""
    workdir = tmp_path_factory.mktemp("digits_run")
    config = small_config(total_steps=30, **{"input.image_size": 8})
    train_and_evaluate(config, str(workdir))
    return workdir


def savedmodel_in_a_tensorflow_process(path, images: np.ndarray, tmp_path) -> np.ndarray:
    """The SavedModel's probabilities, loaded and run by a Python process that imports only
    TensorFlow (not vision_jax)."""
    np.save(tmp_path / "images.npy", images)
    code = (
        "import sys, numpy as np, tensorflow as tf\n"
        "serve = tf.saved_model.load(sys.argv[1]).signatures['serving_default']\n"
        "out = serve(images=tf.constant(np.load(sys.argv[2])))['probabilities'].numpy()\n"
        "assert 'vision_jax' not in sys.modules\n"
        "np.save(sys.argv[3], out)\n"
    )
    args = [str(path), str(tmp_path / "images.npy"), str(tmp_path / "out.npy")]
    subprocess.run([sys.executable, "-c", code, *args], check=True, capture_output=True)
    return np.load(tmp_path / "out.npy")


@pytest.mark.slow
def test_cli_exports_a_run_in_every_format(digits_run, tmp_path):
    trained = load_trained(digits_run)
    images = digits("test").columns["image"][:6].repeat(3, -1)
    expected = run_predictions(trained, images)
    for fmt in ("savedmodel", "stablehlo", "tflite"):
        out = tmp_path / fmt
        batch_flag = ["--tflite_batch", "6"] if fmt == "tflite" else []  # others: any batch
        assert export_main(["--workdir", str(digits_run), "--format", fmt, "--output", str(out),
                            *batch_flag]) == 0  # fmt: skip
        manifest = json.loads((out / "export.json").read_text())
        batch = 6 if fmt == "tflite" else None
        assert manifest["input"]["shape"] == [batch, 8, 8, 3]
        assert manifest["input"]["dtype"] == "uint8" and manifest["input"]["name"] == "images"
        assert manifest["input"]["decode"]["orientation"].startswith("JPEGs upright")
        assert manifest["outputs"] == {"probabilities": {"shape": [batch, 10], "dtype": "float32"}}
        assert manifest["class_names"] == [str(d) for d in range(10)]
        assert manifest["normalisation"]["mean"] == [0.5] * 3
        assert manifest["input"]["resize"]["resize"] == "the shorter side to 8, aspect ratio kept"
        assert manifest["source"]["step"] == trained.step == 30
        assert manifest["compute_dtype"] == "float32"
        if fmt == "savedmodel":
            got = savedmodel_in_a_tensorflow_process(out, images, tmp_path)
        elif fmt == "stablehlo":
            got = load_stablehlo(out).call(images)["probabilities"]  # the folder
        else:
            model = TFLiteModel((out / manifest["artifact"]).read_bytes())
            got = model(images)["probabilities"]
        np.testing.assert_allclose(got, expected, atol=1e-4, err_msg=fmt)
    assert len(set(expected.argmax(-1))) > 1


@pytest.mark.slow
def test_a_bfloat16_run_exports_to_tflite_computing_in_float32(tmp_path):
    """The TFLite converter cannot legalise a bfloat16 model (a transpose it refuses): the run
    is exported computing in float32 from its float32 parameters, within bfloat16's rounding of
    the run's own predictions."""
    workdir = tmp_path / "run"
    overrides = {"input.image_size": 8, "model.dtype": "bfloat16"}
    train_and_evaluate(small_config(total_steps=20, **overrides), str(workdir))
    trained = load_trained(workdir)
    images = digits("test").columns["image"][:6].repeat(3, -1)
    manifest = export_trained(trained, tmp_path / "out", format="tflite", tflite_batch=6)
    assert manifest["compute_dtype"] == "float32"  # said in the manifest
    stablehlo = export_trained(trained, tmp_path / "hlo", format="stablehlo")
    assert stablehlo["compute_dtype"] == "bfloat16"
    model = TFLiteModel((tmp_path / "out" / manifest["artifact"]).read_bytes())
    got, expected = model(images)["probabilities"], run_predictions(trained, images)
    np.testing.assert_allclose(got, expected, atol=0.03)
    assert (got.argmax(-1) == expected.argmax(-1)).mean() >= 5 / 6
    report = quantization_report(trained, batch=6, examples=12, calibration=6)  # (it failed)
    assert [r.quantize for r in report.rows] == list(QUANTIZATIONS)


@pytest.mark.slow
def test_lora_run_exports_merged_and_matches(tmp_path):
    config = lora_vit_config()
    train_and_evaluate(config, str(tmp_path / "run"))
    trained = load_trained(tmp_path / "run")
    images = digit_images(4)
    expected = run_predictions(trained, images)
    export_trained(trained, tmp_path / "sm", format="savedmodel")
    loaded = tf.saved_model.load(str(tmp_path / "sm"))
    names = {v.name for v in loaded.model_variables}
    shapes = sorted(tuple(v.shape) for v in loaded.model_variables)
    plain = create_model("vit_ti16", num_classes=10)
    plain_shapes = sorted(x.shape for x in jax.tree.leaves(init(plain, 16)))
    assert shapes == plain_shapes and not any("lora" in n for n in names)  # merged
    got = loaded.signatures["serving_default"](images=tf.constant(images))["probabilities"]
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-4)
    export_trained(trained, tmp_path / "tfl", format="tflite", tflite_batch=4)
    got = TFLiteModel((tmp_path / "tfl/model.tflite").read_bytes())(images)["probabilities"]
    np.testing.assert_allclose(got, expected, atol=1e-4)


def cifar_folder(root, per_class: dict[str, int]) -> None:
    """``root/<split>/<class>/*.jpg``: the first JPEGs of each class of shared CIFAR-10."""
    with zipfile.ZipFile(CIFAR_ZIP) as z:
        for split, count in per_class.items():
            for name in cifar_members(split, count):
                (root / name).parent.mkdir(parents=True, exist_ok=True)
                (root / name).write_bytes(z.read(name))


@pytest.mark.slow
def test_quantisation_report_on_real_images(tmp_path, capsys):
    """Every TFLite form of a trained run on its evaluation split: the CIFAR-10 ResNet-20 on
    300 real CIFAR-10 test images (shared), or a digits run without ../shared."""
    if CIFAR_ZIP.is_file() and RESNET20.is_file():
        cifar_folder(tmp_path / "cifar", {"train": 12, "test": 30})
        config = small_config(**{
            "init.path": str(RESNET20), "data.source": "imagefolder",
            "data.root": str(tmp_path / "cifar"), "input.image_size": 32,
            "input.mean": IMAGENET_MEAN, "input.std": IMAGENET_STD,
            "optimizer.learning_rate": 1e-4, "total_steps": 2, "eval_batch_size": 100,
        })  # fmt: skip
        least = 0.6  # the weights' top-1 on these JPEGs is 0.81 (shared/README.md)
    else:
        config = small_config(total_steps=60, **{"optimizer.learning_rate": 0.1})
        least = 0.5
    result = train_and_evaluate(config, str(tmp_path / "run"))
    out = tmp_path / "tflite"
    assert export_main(["--workdir", str(tmp_path / "run"), "--format", "tflite", "--output",
                        str(out), "--quantize", "full_int8", "--evaluate"]) == 0  # fmt: skip
    table = capsys.readouterr().out
    rows = {r["quantize"]: r for r in json.loads((out / "export.json").read_text())["evaluation"]}
    assert list(rows) == ["none", "float16", "dynamic_int8", "full_int8"]
    for name in ("float32", "float16", "dynamic-range int8", "full-integer int8"):
        assert name in table
    assert rows["none"]["accuracy"] >= least and rows["none"]["agreement"] == 1.0
    # The run's own evaluation (JAX, float pipeline) scores what float32 TFLite scores.
    assert rows["none"]["accuracy"] == pytest.approx(result["eval/top1"], abs=0.02)
    assert rows["float16"]["agreement"] >= 0.98
    assert rows["dynamic_int8"]["agreement"] >= 0.9 and rows["full_int8"]["agreement"] >= 0.9
    for r in rows.values():
        assert r["accuracy_change"] == pytest.approx(r["accuracy"] - rows["none"]["accuracy"])
        assert f"{r['accuracy_change']:+.4f}" in table
    sizes = {q: r["size_bytes"] for q, r in rows.items()}
    assert sizes["full_int8"] < sizes["float16"] < sizes["none"]
    assert (out / "model.tflite").stat().st_size == sizes["full_int8"]


def test_cli_an_output_url_is_one_line(tmp_path, capsys, monkeypatch):
    """--output gs://...: one line before the run is read (export writes a local folder), not
    a local folder gs:/... made."""

    def not_read(*args, **kwargs):
        raise AssertionError("the run is read before the output is checked")

    monkeypatch.setattr("vision_jax.export.__main__.load_trained", not_read)
    monkeypatch.chdir(tmp_path)
    argv = ["--workdir", str(tmp_path), "--format", "stablehlo", "--output", "gs://b/model"]
    assert export_main(argv) == 1
    assert capsys.readouterr().err == (
        "error: --output gs://b/model: an export is written to a local folder, not a URL: "
        "write it locally and copy it (gcloud storage cp -r)\n"
    )
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("fmt", ["stablehlo", "savedmodel"])
def test_cli_an_output_that_cannot_be_written_is_one_line(
    digits_run, tmp_path, fmt, capsys, monkeypatch
):
    """A path that cannot be a folder, or one where nothing can be written (a read-only file
    system): one line naming it, exit status 1, before the run is read (it was found once the
    model was converted, after a TFLite calibration). Found while writing (a full disk; here
    the check skipped), it is one line too."""
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")

    def not_read(*args, **kwargs):
        raise AssertionError("the run is read before the output is checked")

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", kwargs.get("dir"))

    monkeypatch.setattr("vision_jax.export.__main__.load_trained", not_read)
    out = blocker / fmt
    assert export_main(["--workdir", str(digits_run), "--format", fmt, "--output", str(out)]) == 1
    assert capsys.readouterr().err == f"error: --output {out}: {blocker} is not a folder\n"
    monkeypatch.setattr("vision_jax.output_errors.tempfile.TemporaryFile", read_only)
    out = tmp_path / "new" / fmt
    assert export_main(["--workdir", str(digits_run), "--format", fmt, "--output", str(out)]) == 1
    assert capsys.readouterr().err == (
        f"error: --output {out}: cannot write in {tmp_path}: Read-only file system\n"
    )
    assert sorted(os.listdir(tmp_path)) == ["a_file"]
    monkeypatch.undo()
    monkeypatch.setattr("vision_jax.export.__main__.folder_problem", lambda output: None)
    out = blocker / fmt
    assert export_main(["--workdir", str(digits_run), "--format", fmt, "--output", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: cannot write ") and "a_file" in err[-1], err
    assert err[-1].endswith(f"the export in {out} is incomplete."), err


def test_a_failed_export_leaves_the_earlier_one_whole(digits_run, tmp_path, monkeypatch, capsys):
    """A disk that fills while the artifact is written: the earlier export in that folder (its
    artifact and manifest) stays as it was, and no partial file is left beside it."""
    out = tmp_path / "exported"
    args = ["--workdir", str(digits_run), "--format", "stablehlo", "--output", str(out)]
    assert export_main(args) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def disk_fills(self, data):
        with open(self, "wb") as f:
            f.write(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device", str(self))

    monkeypatch.setattr(pathlib.Path, "write_bytes", disk_fills)
    assert export_main(args) == 1
    err = capsys.readouterr().err
    assert (
        f"cannot write {out / 'model.jax_exported'} (the disk is full): No space left on device"
        in err
    ), err
    assert err.strip().endswith("then run the same command again."), err  # what to do
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_sigterm_during_an_export_is_one_line_and_a_killed_ones_partials_go(
    digits_run, tmp_path, monkeypatch, capsys
):
    """SIGTERM ended an export without a word (Python's default) and left its
    ``export.json.partial-<pid>``, which piled up: now one line and status 143, its partial
    files removed as on Ctrl-C; those a killed export left (SIGKILL) go at the next export,
    another's under way stays."""
    from vision_jax.export.__main__ import _command

    out = tmp_path / "exported"
    out.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    (out / f"export.json.partial-{_HOST}-{dead}").write_text("{")
    (out / f"model.jax_exported.partial-{_HOST}-{os.getppid()}").write_text("")  # running
    write_bytes = pathlib.Path.write_bytes

    def signalled(self, data):
        write_bytes(self, data[:10])
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises at once

    monkeypatch.setattr(pathlib.Path, "write_bytes", signalled)
    argv = ["export", "--workdir", str(digits_run), "--format", "stablehlo", "--output", str(out)]
    monkeypatch.setattr("sys.argv", argv)
    assert _command() == 128 + signal.SIGTERM
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "vision_jax.export: interrupted (SIGTERM); the export in --output is unfinished "
        "(export.json is written last): run it again."
    )
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    left = sorted(p.name for p in out.iterdir())
    assert left == [f"model.jax_exported.partial-{_HOST}-{os.getppid()}"], left


def test_only_this_hosts_partials_of_the_files_export_writes_are_removed(tmp_path):
    """remove_partials removed any ``*.partial-<digits>`` whose pid did not run here: another
    host's export under way into a shared (NFS) folder, a user's ``notes.partial-2024``. Only
    ``<file export writes>.partial-<this host>-<dead pid>`` goes."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    names = [f"export.json.partial-{_HOST}-{dead}", f"model.tflite.partial-{_HOST}-{dead}",
             f"export.json.partial-{_HOST}-{os.getpid()}",  # running
             f"export.json.partial-{_HOST}-2-{dead}",  # host <this host>-2
             f"export.json.partial-other-host-{dead}", "notes.partial-2024",
             f"notes.partial-{_HOST}-{dead}", f"export.json.partial-{dead}"]  # fmt: skip
    for name in names:
        (tmp_path / name).write_text("")
    remove_partials(tmp_path, ["export.json", "model.tflite"])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names[2:])
    with written_whole(tmp_path / "export.json") as partial:
        assert pathlib.Path(partial).name == f"export.json.partial-{_HOST}-{os.getpid()}"


def test_quantisation_report_miou_is_scikit_learns():
    """The segmentation column of ``--evaluate``: mean IoU over the pixels not ignored, of the
    classes that occur or are predicted (scikit-learn's macro Jaccard over those)."""
    from sklearn.metrics import jaccard_score

    from vision_jax.data import IGNORE_LABEL
    from vision_jax.export.report import _miou

    rng = np.random.default_rng(0)
    targets = rng.integers(0, 4, (3, 8, 8))
    predictions = np.where(rng.random(targets.shape) < 0.7, targets, rng.integers(0, 4, (3, 8, 8)))
    targets[0, :2] = IGNORE_LABEL
    counted = targets != IGNORE_LABEL
    want = jaccard_score(
        targets[counted], predictions[counted], labels=[0, 1, 2, 3], average="macro"
    )
    assert _miou(predictions, targets, num_classes=5) == pytest.approx(want)  # class 4: absent


# ---- full-integer calibration and its agreement check; the manifest's resampling; flags -------


def test_full_int8_calibration_takes_every_image_in_whole_batches():
    """The last partial batch calibrates too (completed with the first images): at batch 64,
    36 of 100 images were left out."""
    images = np.arange(100, dtype=np.uint8).reshape(100, 1, 1, 1)
    batches = [b for (b,) in tflite._calibration(images, 64)]
    assert [len(b) for b in batches] == [64, 64]
    assert set(np.concatenate(batches).ravel()) == set(range(100))
    assert [len(b) for (b,) in tflite._calibration(images, 25)] == [25] * 4


@pytest.mark.parametrize("count, warned", [(40, True), (100, False)])
def test_full_int8_on_a_split_under_100_images_warns_with_the_count(
    monkeypatch, caplog, count, warned
):
    """A training split of fewer than the 100 calibration images calibrates on all it has,
    said in a warning naming the count (it said nothing)."""
    from vision_jax.export import exporter

    images = np.zeros((count, 8, 8, 3), np.uint8)
    monkeypatch.setattr(exporter, "split_images", lambda trained, split, count: (images, None))
    trained = SimpleNamespace(spec=SimpleNamespace(data=SimpleNamespace(train_split="train")))
    with caplog.at_level("WARNING"):
        assert len(exporter._calibration_images(trained, 8)) == count
    said = f"full_int8 calibrates on all {count} images of the training split 'train', fewer "
    assert (said in caplog.text) == warned, caplog.text


def test_full_int8_at_a_batch_above_100_calibrates_and_checks_agreement(
    digits_run, tmp_path, monkeypatch, caplog, capsys
):
    """--tflite_batch=128 failed ("full_int8 needs at least 128 representative images": 100
    were drawn); now whole batches covering at least 100 images are drawn, and the quantised
    model's agreement with float32 on them is measured, recorded and warned about when low."""
    from vision_jax.export import exporter
    from vision_jax.export.images import split_images

    monkeypatch.setattr(exporter, "AGREEMENT_WARNING", 1.01)  # any agreement warns
    out = tmp_path / "int8"
    args = ["--workdir", str(digits_run), "--format", "tflite", "--output", str(out),
            "--quantize", "full_int8", "--tflite_batch", "128"]  # fmt: skip
    with caplog.at_level("WARNING"):
        assert export_main(args) == 0
    check = json.loads((out / "export.json").read_text())["quantization_check"]
    assert check["images"] == 128 and check["split"] == "train"
    assert "top-1" in check["measure"] and check["warning_below"] == 1.01
    # The agreement is the int8 file's against the run's own float predictions.
    trained = load_trained(digits_run)
    images = split_images(trained, "train", count=128)[0]
    int8 = TFLiteModel((out / "model.tflite").read_bytes())(images)["probabilities"]
    want = np.mean(int8.argmax(-1) == run_predictions(trained, images).argmax(-1))
    assert check["agreement"] == pytest.approx(want, abs=1e-4)
    assert f"calibration images {check['agreement']:.4f}" in capsys.readouterr().out
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    said = f"agrees with float32 on only {100 * check['agreement']:.1f}% of top-1 classes on 128"
    assert any(said in w and "dynamic_int8 or float16" in w for w in warnings), warnings
    assert tflite.calibration_count(1) == 100 and tflite.calibration_count(64) == 128


def test_full_int8_on_a_split_smaller_than_a_batch_names_it_and_leaves_nothing(
    digits_run, tmp_path
):
    """The error names the split and its size (it said "needs at least N representative
    images" of the 100 drawn), and the output folder it had made is not left behind."""
    trained = load_trained(digits_run)
    out = tmp_path / "new" / "int8"
    message = r"training split 'train' holds 1437, fewer than one batch \(tflite_batch=1500\)"
    with pytest.raises(ExportError, match=message):
        export_trained(trained, out, format="tflite", quantize="full_int8", tflite_batch=1500)
    assert not (tmp_path / "new").exists()


def test_manifest_states_the_resampling_pil_reproduces():
    """``input.resize.resampling`` says evaluation resizes as PIL's Image.resize does on the
    uint8 image (antialiased; tf.image.resize without antialias is another resize); PIL resizing
    so, then cropping as the manifest says, gives the pipeline's pixels within one level."""
    from vision_jax.tasks import library_kind

    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (45, 33, 3), dtype=np.uint8)
    image = np.asarray(Image.fromarray(noise).resize((66, 90)).resize((33, 45)))  # smoother
    filters = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}
    for interpolation, task in [("bicubic", Classification()), ("bilinear", Segmentation())]:
        spec = InputSpec(image_size=16, resize_size=20, interpolation=interpolation)
        trained = SimpleNamespace(
            task=task, input=spec, class_names=["a"], step_dir="run/1", step=1, ema=False,
            record=SimpleNamespace(model="vit_ti16", category_ids=None),
            spec=SimpleNamespace(model_dtype="float32"),
        )  # fmt: skip
        servable = SimpleNamespace(  # what the manifest reads of it
            mean=(0.5,) * 3, std=(0.5,) * 3, output_specs=dict, input_shape=lambda b: (b, 16, 16, 3)
        )
        resize = _manifest(trained, servable, "tflite", "none", 1)["input"]["resize"]
        pil = f"PIL's Image.resize((width, height), Image.Resampling.{interpolation.upper()})"
        assert pil in resize["resampling"] and "uint8" in resize["resampling"]
        assert "antialiased" in resize["resampling"]
        if library_kind(task) == "segmentation":  # the whole image, no crop
            want = Image.fromarray(image).resize((16, 16), filters[interpolation])
        else:  # the shorter side to 20 (45 * 20 / 33 = 27.3), the centre 16 x 16
            resized = Image.fromarray(image).resize((20, 27), filters[interpolation])
            want = np.asarray(resized)[6:22, 2:18]
        pipeline = dataclasses.replace(spec, mean=(0.0,) * 3, std=(1 / 255,) * 3)
        pixels = library_kind(task) == "segmentation"
        targets = np.zeros((1, 45, 33) if pixels else 1, np.int32)
        source = from_arrays(image[None], targets, ["a"], target=task.target)
        got = next(iter(eval_batches(source, pipeline, global_batch=1)))["image"][0]
        assert np.abs(got - np.asarray(want, np.float32)).max() <= 1, interpolation


def test_manifest_of_a_task_of_ones_own_states_its_targets_resize_and_the_datas_classes():
    """A task of one's own evaluates as its target says (labels: resized and cropped; label
    maps: the whole image), which the manifest left out (it was keyed on the library task);
    its outputs index no classes (one value here, ten digit classes): the data's classes are
    ``data_class_names``, not ``class_names``."""
    from own_task import DigitValue

    spec = InputSpec(image_size=16, resize_size=20, crop_mode="squash")
    servable = SimpleNamespace(
        mean=(0.5,) * 3, std=(0.5,) * 3, input_shape=lambda b: (b, 16, 16, 3),
        output_specs=lambda: {"value": jax.ShapeDtypeStruct((1,), jnp.float32)},
    )  # fmt: skip
    maps = type("Maps", (DigitValue,), {"name": "maps", "target": "label_map"})
    for task in (DigitValue(), maps(), Classification()):
        trained = SimpleNamespace(
            task=task, input=spec, class_names=[str(d) for d in range(10)], step_dir="run/1",
            step=1, ema=False, record=SimpleNamespace(model="vit_ti16", category_ids=None),
            spec=SimpleNamespace(model_dtype="float32"),
        )  # fmt: skip
        manifest = _manifest(trained, servable, "savedmodel", "none", None)
        resize = manifest["input"]["resize"]
        assert "PIL's Image.resize" in resize["resampling"]
        if task.target == "label":  # as classification's evaluation
            assert resize["resize"] == "the whole image to 20 x 20, aspect ratio not kept"
            assert resize["crop"] == "the central 16 x 16 square"
        else:
            assert resize["resize"].startswith("the whole image to 16 x 16") and len(resize) == 3
        names = {"class_names", "data_class_names"} & set(manifest)
        assert names == {"class_names" if task.name == "classification" else "data_class_names"}
        assert manifest[names.pop()] == trained.class_names


def test_detection_manifest_states_the_letterbox_that_reproduces_the_pipeline(tmp_path):
    """The manifest's letterbox recipe (ScaleAndTranslate at s = size / longer side, padding
    where a pixel's centre lies past the scaled image), followed literally, gives the pixels
    evaluation and predict feed a 100 x 60 image; PIL's resize to whole pixels (what the
    manifest said before: "the longer side to the input size") is levels apart."""
    import re

    from vision_jax.data.coco import from_image_files

    smooth = np.random.default_rng(1).integers(0, 256, (6, 10, 3), np.uint8)
    picture = Image.fromarray(smooth).resize((100, 60), Image.Resampling.BICUBIC)
    picture.save(tmp_path / "wide.png")
    spec = InputSpec(image_size=32, mean=(0.0,) * 3, std=(1 / 255,) * 3)  # pixels as they are
    trained = SimpleNamespace(
        task=Detection(strides=(16,)), input=spec, class_names=["a"], step_dir="run/1", step=1,
        ema=False, record=SimpleNamespace(model="vit_ti16", category_ids=(1,)),
        spec=SimpleNamespace(model_dtype="float32"),
    )  # fmt: skip
    shapes = {k: jax.ShapeDtypeStruct((1, 5, 4) if k == "boxes" else (1, 5), jnp.float32)
              for k in ("boxes", "scores", "classes")}  # fmt: skip
    servable = SimpleNamespace(
        mean=(0.0,) * 3,
        std=(1 / 255,) * 3,
        output_specs=lambda: shapes,
        input_shape=lambda b: (b, 32, 32, 3),
    )
    manifest = _manifest(trained, servable, "stablehlo", "none", None)
    letterbox = manifest["input"]["letterbox"]
    assert "x0, y0, x1, y1 in input pixels" in manifest["outputs"]["boxes"]["meaning"]
    assert "an index into class_names" in manifest["outputs"]["classes"]["meaning"]
    kernel = re.search(r"kernel_type='(\w+)'", letterbox["resize"]).group(1)
    s = 32 / 100  # "s = 32 / max(height, width)"
    assert "s = 32 / max(height, width)" in letterbox["resize"]
    image = tf.constant(np.asarray(picture, np.float32))
    resized = tf.raw_ops.ScaleAndTranslate(
        images=image[None], size=[32, 32], scale=[s, s], translation=[0.0, 0.0],
        kernel_type=kernel, antialias=True,
    )[0].numpy().clip(0, 255)  # fmt: skip
    centres = np.arange(32) + 0.5
    resized[centres >= 60 * s] = letterbox["pad_rgb"]  # "at or past height * s (rows)"
    resized[:, centres >= 100 * s] = letterbox["pad_rgb"]
    source, _ = from_image_files([str(tmp_path / "wide.png")], ["a"], [1])
    got = next(iter(eval_batches(source, spec, global_batch=1, max_boxes=1)))["image"][0]
    np.testing.assert_allclose(got, resized, atol=1e-3)
    pil = np.zeros((32, 32, 3), np.float32)  # whole pixels: 32 x 19
    pil[:19] = np.asarray(picture.resize((32, 19), Image.Resampling.BILINEAR))
    assert np.abs(got[:19] - pil[:19]).max() > 2


def test_a_runs_path_instead_of_the_loaded_run_is_named(tmp_path):
    """export_trained("RUN", ...) said 'str' object has no attribute 'input'."""
    for path in (str(tmp_path), tmp_path):
        with pytest.raises(TypeError, match=r"not its path .*export_trained\(vision_jax\.trained"
                           r"\.load_trained\(workdir\), \.\.\.\)"):  # fmt: skip
            export_trained(path, tmp_path / "out", format="stablehlo")
    assert not (tmp_path / "out").exists()


def test_tflite_batch_with_another_format_is_refused(tmp_path, capsys):
    """--tflite_batch with savedmodel or stablehlo was ignored in silence (exit 0); refused as
    --evaluate is, before any work; the default (unset) stays accepted."""
    for fmt in ("savedmodel", "stablehlo"):
        with pytest.raises(SystemExit):
            export_main(["--workdir", str(tmp_path), "--format", fmt, "--output",
                         str(tmp_path / "out"), "--tflite_batch=4"])  # fmt: skip
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.endswith(f"use it with --format=tflite ({fmt} takes any batch size)."), err
        with pytest.raises(ExportError, match=f"tflite_batch=4 applies to TFLite, not to {fmt}"):
            export_trained(None, tmp_path / "out", format=fmt, tflite_batch=4)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow  # four TFLite conversions: ~1 min on 2 cores
def test_evaluate_on_drawn_examples_names_a_skipped_file_once_and_counts_the_rest(
    tmp_path, capsys, caplog
):
    """--evaluate --eval_examples on a skip_corrupt run whose drawn evaluation images include
    an unreadable one: the drawn subset lost its file list, and naming the skipped file raised
    KeyError: 'image' (after model.tflite was written). It completes now, names the file once
    and measures on the readable images."""
    from vision_jax.trained import load_split

    rng = np.random.default_rng(0)
    for split, count in (("train", 6), ("test", 4)):
        for name in ("a", "b", "c"):
            for i in range(count):
                path = tmp_path / "data" / split / name / f"{i}.jpg"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(rng.integers(0, 255, (8, 8, 3), np.uint8)).save(path)
    config = small_config(**{"data.source": "imagefolder", "data.root": str(tmp_path / "data"),
                             "data.skip_corrupt": True, "total_steps": 1, "batch_size": 6,
                             "eval_batch_size": 12})  # fmt: skip
    train_and_evaluate(config, str(tmp_path / "run"))
    test = load_split(load_trained(str(tmp_path / "run")), "test")
    drawn = np.sort(np.random.default_rng(0).choice(12, 8, replace=False))  # as _subset draws
    bad = str(test.columns["path"][drawn[2]])
    pathlib.Path(bad).write_bytes(pathlib.Path(bad).read_bytes()[:40])
    out = tmp_path / "tflite"
    args = ["--workdir", str(tmp_path / "run"), "--format", "tflite", "--output", str(out),
            "--evaluate", "--eval_examples", "8"]  # fmt: skip
    with caplog.at_level("WARNING"):
        assert export_main(args) == 0
    assert "(7 evaluation examples; " in capsys.readouterr().out
    named = [r.getMessage() for r in caplog.records if bad in r.getMessage()]
    assert len(named) == 1 and named[0].count(bad) == 1, named
    assert "Skipped 1 unreadable image(s) so far (of 8 read): cannot read image " in named[0]


def test_drawn_examples_of_a_file_source_keep_their_files():
    """The examples --evaluate (--eval_examples) and full_int8's calibration draw keep their
    rows of a file source's columns: the pipeline names a file it skips from them."""
    from vision_jax.data.pipeline import reads_encoded_images
    from vision_jax.export.images import _subset

    paths = np.array([f"/d/test/c/{i}.jpg" for i in range(12)])
    source = from_columns({"path": paths, "label": np.arange(12) % 3}, ["a", "b", "c"])
    drawn = _subset(source, 8, seed=0)
    rows = np.sort(np.random.default_rng(0).choice(12, 8, replace=False))
    assert list(drawn.columns["path"]) == list(paths[rows]) and drawn.num_examples == 8
    assert list(drawn.columns["label"]) == list(rows % 3)
    assert [ex["path"].decode() for ex in drawn.dataset.as_numpy_iterator()] == list(paths[rows])
    assert reads_encoded_images(drawn)
    assert reads_encoded_images(dataclasses.replace(drawn, columns=None))  # no "image" key
