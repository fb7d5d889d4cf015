"""Exporting a trained run: the artifact of one format and its ``export.json`` manifest."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pathlib
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from vision_jax.data import augment, boxes, is_image_level
from vision_jax.export.images import split_images
from vision_jax.export.report import float_agreement
from vision_jax.export.savedmodel import INPUT_NAME, SIGNATURE, to_savedmodel
from vision_jax.export.serving import ExportError, Servable
from vision_jax.export.stablehlo import ARTIFACT as STABLEHLO_ARTIFACT
from vision_jax.export.stablehlo import PLATFORMS, to_stablehlo
from vision_jax.export.tflite import (
    CALIBRATION_IMAGES,
    calibration_count,
    check_quantize,
    in_float32,
    to_tflite,
)
from vision_jax.output_errors import remove_partials, written_whole
from vision_jax.tasks import library_kind

if TYPE_CHECKING:
    from vision_jax.trained import Trained

FORMATS = ("savedmodel", "stablehlo", "tflite")
ARTIFACTS = {"savedmodel": ".", "stablehlo": STABLEHLO_ARTIFACT, "tflite": "model.tflite"}
MANIFEST = "export.json"
AGREEMENT_WARNING = 0.9  # full_int8's agreement with float32 (calibration images) warned below

logger = logging.getLogger(__name__)


def export_trained(
    trained: Trained,
    output: str | os.PathLike,
    *,
    format: str,
    quantize: str = "none",
    tflite_batch: int | None = None,
) -> dict[str, Any]:
    """Exports the run ``trained`` (from :func:`vision_jax.trained.load_trained`) as ``format``
    into the folder ``output``, beside its manifest; returns the manifest. ``quantize`` and
    ``tflite_batch`` (default 1) apply to TFLite (SavedModel and StableHLO take any batch).

    ``full_int8`` calibrates on :func:`calibration_count` training images and measures the
    quantised model's agreement with float32 on them (the manifest's ``quantization_check``),
    with a warning below :data:`AGREEMENT_WARNING` (a task of one's own: not measured, a
    warning says so). Nothing is left in ``output`` (nor the
    folder, when the export made it) by an export that fails before its files are written."""
    if isinstance(trained, str | os.PathLike):
        raise TypeError(
            f"export_trained takes a loaded run, not its path {os.fspath(trained)!r}: "
            "export_trained(vision_jax.trained.load_trained(workdir), ...)."
        )
    if format not in FORMATS:
        raise ExportError(f"Unknown format {format!r}; valid: {', '.join(FORMATS)}.")
    if format != "tflite" and check_quantize(quantize) != "none":
        raise ExportError(f"quantize={quantize!r} applies to TFLite, not to {format}.")
    if format != "tflite" and tflite_batch is not None:
        raise ExportError(
            f"tflite_batch={tflite_batch} applies to TFLite, not to {format} (it takes any "
            "batch size)."
        )
    batch = 1 if tflite_batch is None else tflite_batch
    if batch < 1:
        raise ExportError(f"tflite_batch must be at least 1; got {batch}.")
    if format == "tflite":
        trained = in_float32(trained)
    servable = Servable.from_trained(trained)
    manifest = _manifest(trained, servable, format, quantize, batch if format == "tflite" else None)
    content = None
    if format == "tflite":  # converted (and checked) before the folder is made
        representative = None
        if quantize == "full_int8":
            representative = _calibration_images(trained, batch)
        content = to_tflite(servable, batch=batch, quantize=quantize, representative=representative)
        if representative is not None and library_kind(trained.task) is None:
            logger.warning(
                "full_int8: the quantised model's agreement with float32 is not measured for "
                "the task %r, one of your own (the check counts equal top-1 classes or pixel "
                "labels): compare its outputs with the float32 model's yourself.",
                trained.task.name,
            )  # fmt: skip
        elif representative is not None:
            manifest["quantization_check"] = _quantization_check(
                trained, servable, content, representative
            )
    output = pathlib.Path(output)
    with _removed_if_left_empty(output):
        output.mkdir(parents=True, exist_ok=True)
        # Of an export that was killed (a SIGKILL): the files written whole.
        remove_partials(output, [MANIFEST, *(a for a in ARTIFACTS.values() if a != ".")])
        with _manifest_written(output, manifest):  # in place once the artifact is
            _write_artifact(servable, output, format, content)
    return manifest


def _calibration_images(trained: Trained, batch: int) -> np.ndarray:
    """:func:`calibration_count` images of the run's training split (all of a smaller one)."""
    split = trained.spec.data.train_split
    images = split_images(trained, split, count=calibration_count(batch))[0]
    if len(images) < batch:
        raise ExportError(
            f"full_int8 calibrates on whole batches of training images: the training split "
            f"{split!r} holds {len(images)}, fewer than one batch (tflite_batch={batch}); "
            "export with a smaller tflite_batch."
        )
    if len(images) < CALIBRATION_IMAGES:
        logger.warning(
            "full_int8 calibrates on all %d images of the training split %r, fewer than the "
            "%d it takes at least: the int8 ranges may fit other images less well.",
            len(images), split, CALIBRATION_IMAGES,
        )  # fmt: skip
    return images


def _quantization_check(
    trained: Trained, servable: Servable, content: bytes, images: np.ndarray
) -> dict[str, Any]:
    """The agreement of the quantised flatbuffer ``content`` with the float32 model on the
    calibration ``images``, with a warning below :data:`AGREEMENT_WARNING`."""
    agreement = float_agreement(servable, content, images)
    pixels = library_kind(trained.task) == "segmentation"
    check = {
        "agreement": round(agreement, 4),
        "measure": "share of pixel labels (argmax) equal to the float32 model's" if pixels
        else "share of top-1 classes equal to the float32 model's",
        "images": len(images),  # the calibration images
        "split": trained.spec.data.train_split,
        "warning_below": AGREEMENT_WARNING,
    }  # fmt: skip
    if agreement < AGREEMENT_WARNING:
        logger.warning(
            "full_int8: the quantised model agrees with float32 on only %.1f%% of %s on %d "
            "calibration images; it may have lost much accuracy: export with "
            "--quantize=dynamic_int8 or float16 (--evaluate compares them).",
            100 * agreement, "pixel labels" if pixels else "top-1 classes", len(images),
        )  # fmt: skip
    return check


@contextlib.contextmanager
def _removed_if_left_empty(output: pathlib.Path) -> Iterator[None]:
    """The folders the block makes for ``output`` removed again (innermost first) where a
    failure in it leaves them empty."""
    made = [p for p in (output, *output.parents) if not p.exists()]
    try:
        yield
    except BaseException:
        for folder in made:
            with contextlib.suppress(OSError):  # not empty, or not made
                folder.rmdir()
        raise


def _write_artifact(
    servable: Servable, output: pathlib.Path, format: str, content: bytes | None
) -> None:
    """The artifact of ``format`` in ``output`` (files written whole; a SavedModel in place);
    TFLite's ``content`` converted already."""
    artifact = output / ARTIFACTS[format]
    if format == "savedmodel":
        to_savedmodel(servable, output)
    elif format == "stablehlo":
        to_stablehlo(servable, artifact)
    else:
        with written_whole(artifact) as partial:
            pathlib.Path(partial).write_bytes(content)


def _manifest(
    trained: Trained, servable: Servable, format: str, quantize: str, batch: int | None
) -> dict[str, Any]:
    kind, target = library_kind(trained.task), trained.task.target
    outputs = {
        name: {"shape": [batch, *spec.shape[1:]], "dtype": np.dtype(spec.dtype).name}
        for name, spec in servable.output_specs().items()
    }
    manifest = {
        "format": format,
        "artifact": ARTIFACTS[format],
        "quantize": quantize,
        "input": {
            "name": INPUT_NAME,
            "shape": list(servable.input_shape(batch)),
            "dtype": "uint8",
            "layout": "NHWC, RGB, at the model's input size (not resized inside)",
            "decode": augment.DECODING,
        },
        "outputs": outputs,
        "normalisation": {
            "mean": list(servable.mean),
            "std": list(servable.std),
            "applied": "inside the model: (pixels - 255 * mean) / (255 * std), float32",
        },
        "task": trained.task.name,
        "model": trained.record.model,
        "compute_dtype": trained.spec.model_dtype,  # TFLite: float32 (see in_float32)
        # What a library task's outputs index; a task of one's own: the data's classes (its
        # outputs mean what its predict makes them, as many as its model gives)
        "class_names" if kind is not None else "data_class_names": trained.class_names,
        "source": {
            "step_dir": trained.step_dir,
            "step": trained.step,
            "parameters": "ema" if trained.ema else "trained",
        },
    }
    # How evaluation fits images in: its target decides (vision_jax.data's preprocessing)
    if target == "boxes":  # and predict
        manifest["input"]["letterbox"] = _letterbox(trained.input, servable.mean)
    if kind == "detection":
        outputs["boxes"]["meaning"] = "x0, y0, x1, y1 in input pixels (divide by s for the image's)"
        outputs["classes"]["meaning"] = (
            "an index into class_names (category_ids[index]: the COCO category id); -1 marks an "
            "empty slot"
        )
        outputs["scores"]["meaning"] = (
            "sqrt(class probability * centerness), highest first; 0 in empty slots"
        )
    if target == "label_map":  # evaluation sees every pixel of the image
        spec = trained.input
        manifest["input"]["resize"] = {
            "interpolation": spec.interpolation,
            "resampling": _resampling(spec.interpolation),
            "resize": f"the whole image to {spec.image_size} x {spec.image_size}, aspect ratio "
            "not kept",
        }
        if kind == "segmentation":
            manifest["input"]["resize"]["label_map"] = (
                "at the input size: for the image's size, resize the log of probabilities "
                "bilinearly (half-pixel centres) and take the argmax; predict resizes "
                "log_softmax of the logits, the same but where a probability underflows to 0 "
                "(logit gaps past about 87)"
            )
    elif is_image_level(target):  # a label, or a column of one's own: how evaluation
        # resizes and crops
        spec = trained.input
        whole = spec.crop_mode == "squash"
        manifest["input"]["resize"] = {
            "interpolation": spec.interpolation,
            "resampling": _resampling(spec.interpolation),
            "resize": f"the whole image to {spec.resize} x {spec.resize}, aspect ratio not kept"
            if whole else f"the shorter side to {spec.resize}, aspect ratio kept",
            "crop": f"the central {spec.image_size} x {spec.image_size} square",
        }  # fmt: skip
    if trained.record.category_ids:
        manifest["category_ids"] = list(trained.record.category_ids)
    if format == "savedmodel":
        manifest["signature"] = SIGNATURE
    if format == "stablehlo":
        manifest["platforms"] = list(PLATFORMS)
    return manifest


def _letterbox(spec: Any, mean: Sequence[float]) -> dict[str, Any]:
    """How evaluation and predict letterbox an image (:func:`vision_jax.data.boxes.resample`),
    for the manifest: one resampling at a fractional scale, which PIL's whole-pixel resize
    does not reproduce."""
    size, kernel = spec.image_size, boxes.KERNELS[spec.interpolation]
    return {
        "resize": f"the decoded image (float32, 0..255) resampled once by s = {size} / "
        f"max(height, width) along both axes, at the top-left: tf.raw_ops.ScaleAndTranslate("
        f"images=image[None], size=[{size}, {size}], scale=[s, s], translation=[0, 0], "
        f"kernel_type='{kernel}', antialias=True), clipped to 0..255, then rounded to uint8 "
        "(predict feeds the unrounded values); PIL's resize to whole-pixel sizes gives pixels "
        "levels apart and other detections",
        "image_at": "top-left: the pixels whose centre lies at or past height * s (rows) or "
        "width * s (columns) are padding, set to pad_rgb; boxes come back in input pixels, "
        "clipped to the input before NMS: divide by s and clip to the image (evaluation and "
        "predict clip to the image before NMS: detections reaching into the padding may differ)",
        "pad_rgb": [round(255 * m, 3) for m in mean],
        "note": "evaluation pads with the mean (0 after normalisation); the nearest uint8 "
        "value gives nearly the same detections, black padding does not",
    }


def _resampling(interpolation: str) -> str:
    """How evaluation resamples (:func:`vision_jax.data.augment.resize`), for the manifest."""
    return (
        f"as PIL's Image.resize((width, height), Image.Resampling.{interpolation.upper()}) "
        "resizes the decoded uint8 RGB image (antialiased when shrinking, each pass rounded to "
        "uint8); tf.image.resize without antialias, or cv2.resize, gives other pixels"
    )


@contextlib.contextmanager
def _manifest_written(output: str | os.PathLike, manifest: dict[str, Any]) -> Iterator[None]:
    """``manifest`` written beside ``output``'s earlier one, which it replaces after the
    block (an export that fails in it leaves the earlier manifest)."""
    with written_whole(pathlib.Path(output) / MANIFEST) as partial:
        pathlib.Path(partial).write_text(json.dumps(manifest, indent=1) + "\n")
        yield


def write_manifest(output: str | os.PathLike, manifest: dict[str, Any]) -> None:
    with _manifest_written(output, manifest):
        pass
