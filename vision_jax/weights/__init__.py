"""Pretrained weights: reading every supported format, adapting them to a model, exporting.

:func:`load_pretrained` reads (format detected by :func:`~vision_jax.weights.formats.
detect_format`) google-research / big_vision / big_transfer ``.npz``, timm and torchvision state
dicts (``.safetensors``, ``.pth``/``.pt``/``.bin``/``.th``), Hugging Face ViT folders and
vision_jax checkpoints, then adapts them (:mod:`~vision_jax.weights.surgery`) and merges them
strictly into the model's initial variables.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn

from vision_jax.models.registry import backbone_of, family_of
from vision_jax.trees import flatten_dict, unflatten_dict
from vision_jax.weights import hf, surgery
from vision_jax.weights.contract import InputContract, apply_input_contract, input_contract
from vision_jax.weights.export import converter, export_npz, export_safetensors
from vision_jax.weights.formats import (
    WeightFormatError,
    detect_format,
    read_npz,
    read_state_dict,
)
from vision_jax.weights.merge import WeightMismatchError, merge_strict
from vision_jax.weights.npz import from_npz


def _from_state_dict(state_dict: dict, model: nn.Module, source: str) -> dict:
    if hf.is_hf_vit(state_dict):
        if family_of(model) != "vit":
            raise WeightMismatchError(
                f"{source} holds a Hugging Face ViT, not a {type(model).__name__}."
            )
        state_dict = hf.to_timm_names(state_dict, source=source)
    conv = converter(model)
    return conv.from_timm(state_dict, conv.checkpoint_model(state_dict, model))


def _classifier_view(model: nn.Module) -> nn.Module:
    """The registered backbone of ``model`` in its classifier form (converters describe that
    form; the feature form has the same parameters without the head)."""
    backbone = backbone_of(model)
    if getattr(backbone, "feature_taps", None) is not None:
        backbone = backbone.clone(parent=None, feature_taps=None)
    return backbone


def read_variables(source: str | os.PathLike, model: nn.Module) -> dict:
    """Reads ``source`` into variables in vision_jax names, as the checkpoint holds them.

    The result is not yet adapted to ``model`` (head, class token, grids): see
    :func:`load_pretrained`. Raises :class:`WeightFormatError` for unreadable files and
    :class:`WeightMismatchError` for weights of another architecture, naming ``source``.
    """
    from vision_jax import checkpoint

    kind, name = detect_format(source), str(source)
    model = _classifier_view(model)
    try:
        if kind == "orbax":
            try:
                return checkpoint.read_variables(name)
            except checkpoint.CheckpointError as e:
                raise WeightFormatError(str(e)) from e
        if kind == "npz":
            return from_npz(read_npz(source), source=name)
        if kind == "hf":
            if family_of(model) != "vit":
                raise WeightMismatchError(
                    f"{name} is a Hugging Face ViT folder, not a {type(model).__name__}."
                )
            hf.check_config(hf.read_config(source), model, source=name)
            return _from_state_dict(hf.read_folder(source), model, name)
        return _from_state_dict(read_state_dict(source), model, name)
    except WeightMismatchError as e:
        if name in str(e):
            raise
        raise WeightMismatchError(f"Weights from {name} do not fit the model: {e}") from e


def load_pretrained(
    source: str | os.PathLike,
    *,
    model: nn.Module,
    variables: Mapping[str, Any],
    replace_head: bool = False,
    dont_load: Sequence[str] = (),
    posemb: str = "bilinear",
    head_bias_init: float = 0.0,
) -> dict:
    """Loads pretrained weights into a copy of ``variables`` (the model's initial variables).

    Args:
      source: a weight file or folder in any supported format (detected from the path).
      model: the Flax module ``variables`` belong to (from ``create_model``).
      variables: the model's freshly initialised variables; they are not modified.
      replace_head: re-initialise the head even if the class count matches. It is re-initialised
        (zero kernel, bias ``head_bias_init``) anyway when the class count differs.
      dont_load: regexes over variable paths inside their collection (``head/.*``,
        ``Transformer/posembed_input/pos_embedding``); matching variables keep their init values.
      posemb: ``"bilinear"`` or ``"bicubic"`` resampling of position embeddings to a new grid.
      head_bias_init: the bias of a re-initialised head.

    Class tokens and position-embedding rows are dropped for ``gap`` models, position embeddings
    and patch embeddings are resampled to the model's grid and patch size, and every step is
    logged in one table. Any other difference raises :class:`WeightMismatchError` listing
    missing, unexpected and mis-shaped keys; nothing is returned half-loaded.
    """
    name = str(source)
    loaded = read_variables(source, model)
    n_read = len(flatten_dict(loaded))
    try:
        flat, rows = surgery.adapt(
            variables,
            loaded,
            replace_head=replace_head,
            dont_load=dont_load,
            posemb=posemb,
            head_bias_init=head_bias_init,
        )
    except ValueError as e:
        raise WeightMismatchError(f"Cannot adapt weights from {name}: {e}") from e
    merged = merge_strict(variables, unflatten_dict(flat), source=name)
    surgery.log_summary(name, rows, n_read)
    return merged


__all__ = [
    "InputContract",
    "apply_input_contract",
    "WeightFormatError",
    "WeightMismatchError",
    "converter",
    "detect_format",
    "export_npz",
    "export_safetensors",
    "input_contract",
    "load_pretrained",
    "read_state_dict",
    "read_variables",
]
