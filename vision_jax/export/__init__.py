"""Exporting trained runs for serving: TensorFlow SavedModel, StableHLO (``jax.export``) and
TFLite (float32, float16, dynamic-range or full-integer int8), preprocessing inside.

Every form takes NHWC RGB uint8 ``images`` already at the run's input size and applies the run's
normalisation inside (:mod:`~vision_jax.export.serving`); the SavedModel and StableHLO forms
take any batch size, TFLite a fixed one. ``python -m vision_jax.export`` exports a run's workdir
(see :mod:`vision_jax.export.__main__`).
"""

from vision_jax.export.exporter import FORMATS, MANIFEST, export_trained
from vision_jax.export.report import QuantizationReport, quantization_report
from vision_jax.export.savedmodel import to_savedmodel
from vision_jax.export.serving import ExportError, Servable
from vision_jax.export.stablehlo import load_stablehlo, to_stablehlo
from vision_jax.export.tflite import QUANTIZATIONS, TFLiteModel, to_tflite

__all__ = [
    "FORMATS",
    "MANIFEST",
    "QUANTIZATIONS",
    "ExportError",
    "QuantizationReport",
    "Servable",
    "TFLiteModel",
    "export_trained",
    "load_stablehlo",
    "quantization_report",
    "to_savedmodel",
    "to_stablehlo",
    "to_tflite",
]
