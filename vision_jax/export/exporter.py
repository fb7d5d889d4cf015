"""Exporting a trained run: the artifact of one format and its ``export.json`` manifest."""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from vision_jax.data import augment
from vision_jax.export.images import split_images
from vision_jax.export.savedmodel import INPUT_NAME, SIGNATURE, to_savedmodel
from vision_jax.export.serving import ExportError, Servable
from vision_jax.export.stablehlo import ARTIFACT as STABLEHLO_ARTIFACT
from vision_jax.export.stablehlo import PLATFORMS, to_stablehlo
from vision_jax.export.tflite import check_quantize, in_float32, to_tflite
from vision_jax.output_errors import written_whole
from vision_jax.tasks import library_kind

if TYPE_CHECKING:
    from vision_jax.trained import Trained

FORMATS = ("savedmodel", "stablehlo", "tflite")
ARTIFACTS = {"savedmodel": ".", "stablehlo": STABLEHLO_ARTIFACT, "tflite": "model.tflite"}
MANIFEST = "export.json"
CALIBRATION_IMAGES = 100  # representative images for full-integer quantisation


def export_trained(
    trained: Trained,
    output: str | os.PathLike,
    *,
    format: str,
    quantize: str = "none",
    tflite_batch: int = 1,
) -> dict[str, Any]:
    """Exports the run ``trained`` (from :func:`vision_jax.trained.load_trained`) as ``format``
    into the folder ``output``, beside its manifest; returns the manifest. ``quantize`` and
    ``tflite_batch`` apply to TFLite."""
    if format not in FORMATS:
        raise ExportError(f"Unknown format {format!r}; valid: {', '.join(FORMATS)}.")
    if format != "tflite" and check_quantize(quantize) != "none":
        raise ExportError(f"quantize={quantize!r} applies to TFLite, not to {format}.")
    if tflite_batch < 1:
        raise ExportError(f"tflite_batch must be at least 1; got {tflite_batch}.")
    if format == "tflite":
        trained = in_float32(trained)
    servable = Servable.from_trained(trained)
    output = pathlib.Path(output)
    output.mkdir(parents=True, exist_ok=True)
    batch = tflite_batch if format == "tflite" else None
    manifest = _manifest(trained, servable, format, quantize, batch)
    with _manifest_written(output, manifest):  # in place once the artifact is
        _write_artifact(trained, servable, output, format, quantize, tflite_batch)
    return manifest


def _write_artifact(
    trained: Trained, servable: Servable, output: pathlib.Path, format: str, quantize: str,
    tflite_batch: int,
) -> None:  # fmt: skip
    """The artifact of ``format`` in ``output`` (files written whole; a SavedModel in place)."""
    artifact = output / ARTIFACTS[format]
    if format == "savedmodel":
        to_savedmodel(servable, output)
    elif format == "stablehlo":
        to_stablehlo(servable, artifact)
    else:
        representative = None
        if quantize == "full_int8":
            split = trained.spec.data.train_split
            representative = split_images(trained, split, count=CALIBRATION_IMAGES)[0]
        content = to_tflite(
            servable, batch=tflite_batch, quantize=quantize, representative=representative
        )
        with written_whole(artifact) as partial:
            pathlib.Path(partial).write_bytes(content)


def _manifest(
    trained: Trained, servable: Servable, format: str, quantize: str, batch: int | None
) -> dict[str, Any]:
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
        "class_names": trained.class_names,
        "source": {
            "step_dir": trained.step_dir,
            "step": trained.step,
            "parameters": "ema" if trained.ema else "trained",
        },
    }
    kind = library_kind(trained.task)
    if kind == "detection":  # how evaluation and predict fit images in
        manifest["input"]["letterbox"] = {
            "resize": "the longer side to the input size, aspect ratio kept",
            "image_at": "top-left; boxes come back in input pixels, clipped to the input "
            "before NMS: divide by the scale and clip to the image (evaluation and predict clip "
            "to the image before NMS: detections reaching into the padding may differ)",
            "pad_rgb": [round(255 * m, 3) for m in servable.mean],
            "note": "evaluation pads with the mean (0 after normalisation); the nearest uint8 "
            "value gives nearly the same detections, black padding does not",
        }
    elif kind == "segmentation":  # evaluation sees every pixel of the image
        spec = trained.input
        manifest["input"]["resize"] = {
            "interpolation": spec.interpolation,
            "resize": f"the whole image to {spec.image_size} x {spec.image_size}, aspect ratio "
            "not kept",
            "label_map": "at the input size: for the image's size, resize the log of "
            "probabilities bilinearly (half-pixel centres) and take the argmax, as predict does",
        }
    elif kind == "classification":  # how evaluation resizes and crops
        spec = trained.input
        whole = spec.crop_mode == "squash"
        manifest["input"]["resize"] = {
            "interpolation": spec.interpolation,
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
