"""TFLite flatbuffers through the TFLite converter, at a fixed batch size, float32 or quantised;
and :class:`TFLiteModel` to run one.

The batch size is fixed: the converter cannot take every model on a symbolic batch (the ViT's
class-token slice and the CIFAR ResNets' strided shortcut become dynamic gathers).

Quantisation (``quantize``): ``float16`` weights; ``dynamic_int8`` (int8 weights, activations
quantised on the fly); ``full_int8`` (int8 weights and activations, ranges calibrated on
representative images; the uint8 input and float32 outputs stay as they are; divides, and any
op TFLite has no int8 kernel for, stay float; a ViT's GELU is its tanh approximation:
:data:`FLOAT_OPS_IN_INT8`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from vision_jax.tf_without_keras import tf

import numpy as np

from vision_jax.export.savedmodel import INPUT_NAME, SIGNATURE, serving_module
from vision_jax.export.serving import ExportError, Servable
from vision_jax.tasks import library_kind

if TYPE_CHECKING:
    from vision_jax.trained import Trained

logger = logging.getLogger(__name__)

QUANTIZATIONS = ("none", "float16", "dynamic_int8", "full_int8")
# Full-integer models: TFLite's int8 divide fails at inference on a divisor stored as 0 (a
# softmax sum, the written-out erf), so divides stay float; a ViT's GELU is traced as its tanh
# approximation, which the converter fuses into its int8 GELU.
FLOAT_OPS_IN_INT8 = ("DIV",)
FULL_INT8_GELU = "tanh"
CALIBRATION_IMAGES = 100  # at least: representative images for full-integer quantisation


def check_quantize(quantize: str) -> str:
    if quantize not in QUANTIZATIONS:
        raise ExportError(f"Unknown quantize {quantize!r}; valid: {', '.join(QUANTIZATIONS)}.")
    return quantize


def calibration_count(batch: int) -> int:
    """Full-integer calibration images for a TFLite batch of ``batch``: whole batches covering
    at least :data:`CALIBRATION_IMAGES` (and one batch)."""
    return batch * math.ceil(max(CALIBRATION_IMAGES, batch) / batch)


def to_tflite(
    servable: Servable,
    *,
    batch: int = 1,
    quantize: str = "none",
    representative: np.ndarray | None = None,
) -> bytes:
    """The TFLite flatbuffer of ``servable`` on ``batch`` images; ``full_int8`` needs
    ``representative`` uint8 images (at least one batch, about 100 or more, as the model takes
    them) to calibrate on: every one of them calibrates (:func:`_calibration`)."""
    check_quantize(quantize)
    if library_kind(servable.task) == "detection":
        raise ExportError(
            "TFLite cannot convert a detection model: the converter lowers neither form of "
            "its post-processing's top-k (lax.top_k's StableHLO composite, a sort); export "
            "it as a savedmodel or stablehlo."
        )
    full_int8 = quantize == "full_int8"
    if full_int8 and (representative is None or len(representative) < batch):
        got = 0 if representative is None else len(representative)
        raise ExportError(
            f"full_int8 needs at least {batch} representative images (one batch); got {got}."
        )
    if full_int8:
        servable = dataclasses.replace(servable, gelu=FULL_INT8_GELU)
    module = serving_module(servable, batch)
    converter = tf.lite.TFLiteConverter.from_concrete_functions(
        [module.serve.get_concrete_function()], module
    )
    if quantize != "none":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if quantize == "float16":
        converter.target_spec.supported_types = [tf.float16]
    if full_int8:
        converter.representative_dataset = lambda: _calibration(representative, batch)
        converter.target_spec.supported_ops = [
            tf.lite.OpsSet.TFLITE_BUILTINS_INT8, tf.lite.OpsSet.TFLITE_BUILTINS,
        ]  # fmt: skip
    try:
        content = _convert(converter, full_int8)
    except Exception as e:  # noqa: BLE001  (its errors come with hundreds of MLIR call sites)
        first = next((line for line in str(e).splitlines() if "error:" in line), str(e))
        reason = first.split("error:")[-1].strip()
        raise ExportError(f"The TFLite converter failed: {reason}") from e
    if full_int8:
        _check_runs(content, representative[:batch])
    return content


def _convert(converter: Any, full_int8: bool) -> bytes:
    """The flatbuffer; a full-integer one keeps :data:`FLOAT_OPS_IN_INT8` in float (TFLite's
    selective quantisation; its debug dataset is only read by ``run``, not needed here)."""
    if not full_int8 or not FLOAT_OPS_IN_INT8:
        return converter.convert()
    options = tf.lite.experimental.QuantizationDebugOptions(denylisted_ops=list(FLOAT_OPS_IN_INT8))
    with warnings.catch_warnings():  # its tf.lite.Interpreter's notice about LiteRT
        warnings.simplefilter("ignore")
        debugger = tf.lite.experimental.QuantizationDebugger(
            converter=converter, debug_dataset=None, debug_options=options
        )
        return debugger.get_nondebug_quantized_model()


def _check_runs(content: bytes, images: np.ndarray) -> None:
    """Runs a quantised flatbuffer once: int8 kernels can fail where float ones do not (a
    divisor quantised to zero), and a file that cannot run is not written."""
    try:
        TFLiteModel(content)(images)
    except RuntimeError as e:
        reason = " ".join(str(e).split())
        raise ExportError(
            f"The full-integer int8 model fails at inference ({reason}); export it with "
            "quantize=dynamic_int8 or float16."
        ) from e


def _calibration(images: np.ndarray, batch: int) -> Iterator[list[np.ndarray]]:
    """``images`` (at least ``batch``) in batches of ``batch``, every one of them: a last
    partial batch is completed with the first images (the converter takes whole batches)."""
    for start in range(0, len(images), batch):
        chunk = images[start : start + batch]
        if len(chunk) < batch:
            chunk = np.concatenate([chunk, images[: batch - len(chunk)]])
        yield [chunk]


class TFLiteModel:
    """A TFLite flatbuffer ready to run: ``model(images)`` returns ``{output: array}``."""

    def __init__(self, content: bytes, *, threads: int | None = None):
        with warnings.catch_warnings():  # tf.lite.Interpreter's notice about LiteRT
            warnings.simplefilter("ignore")
            interpreter = tf.lite.Interpreter(model_content=content, num_threads=threads)
        self._run = interpreter.get_signature_runner(SIGNATURE)
        self.input_shape = tuple(int(n) for n in self._run.get_input_details()[INPUT_NAME]["shape"])

    @property
    def batch(self) -> int:
        return self.input_shape[0]

    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
        if images.shape != self.input_shape or images.dtype != np.uint8:
            raise ExportError(
                f"This TFLite model takes uint8 {list(self.input_shape)} images; got "
                f"{images.dtype} {list(images.shape)}."
            )
        return self._run(**{INPUT_NAME: images})


def in_float32(trained: Trained) -> Trained:
    """``trained`` computing in float32 (its parameters are float32 already): the TFLite
    converter cannot legalise a bfloat16 model's ops, and TFLite quantises from float32."""
    if trained.spec.model_dtype == "float32":
        return trained
    from vision_jax.run import task_model  # run imports the training stack

    logger.info("TFLite: the run computed in %s; exported computing in float32.",
                trained.spec.model_dtype)  # fmt: skip
    spec = dataclasses.replace(trained.spec, model_dtype="float32")
    model = task_model(spec, len(trained.class_names))
    return dataclasses.replace(trained, spec=spec, model=model)
