"""Pretrained weights: reading every supported format, adapting them to a model, exporting.

:func:`load_pretrained` reads (the format told apart by :mod:`~vision_jax.weights.dispatch`,
which calls that format's one reader) google-research / big_vision / big_transfer ``.npz``, timm
and torchvision state dicts (``.safetensors``, ``.pth``/``.pt``/``.bin``/``.th``), Hugging Face
ViT folders and vision_jax runs, then adapts them (:mod:`~vision_jax.weights.surgery`) and
merges them strictly into the model's initial variables. This module only re-exports.
"""

from vision_jax.weights.contract import InputContract
from vision_jax.weights.dispatch import (
    class_names,
    detect_format,
    input_contract,
    posemb_method,
    read_variables,
    recorded_grid,
)
from vision_jax.weights.export import export_npz, export_safetensors
from vision_jax.weights.files import WeightFormatError
from vision_jax.weights.load import apply_input_contract, load_pretrained
from vision_jax.weights.merge import WeightMismatchError
from vision_jax.weights.run_dir import RunRecord, read_record

__all__ = [
    "InputContract",
    "RunRecord",
    "WeightFormatError",
    "WeightMismatchError",
    "apply_input_contract",
    "class_names",
    "detect_format",
    "export_npz",
    "export_safetensors",
    "input_contract",
    "load_pretrained",
    "posemb_method",
    "read_record",
    "read_variables",
    "recorded_grid",
]
