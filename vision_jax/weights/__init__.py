"""Pretrained weights: reading files, converting names and layouts, merging into a model."""

from __future__ import annotations

import importlib
import os
from collections.abc import Mapping
from typing import Any

import flax.linen as nn

from vision_jax.models.registry import family_of
from vision_jax.weights import surgery
from vision_jax.weights.formats import WeightFormatError, read_state_dict
from vision_jax.weights.merge import WeightMismatchError, merge_strict

# family -> module holding ``from_timm(state_dict, model)`` and ``to_timm(variables, model)``.
_CONVERTER_MODULES = {
    "vit": "vision_jax.weights.vit",
    "resnet": "vision_jax.weights.resnet",
    "bit": "vision_jax.weights.resnet",
    "cifar_resnet": "vision_jax.weights.resnet",
}


def converter(model: nn.Module):
    """The converter module (``from_timm`` / ``to_timm``) for a model created by create_model."""
    return importlib.import_module(_CONVERTER_MODULES[family_of(model)])


def read_variables(source: str | os.PathLike, model: nn.Module) -> dict:
    """Reads ``source`` into model variables in vision_jax names, choosing the format.

    A directory is a vision_jax run (workdir, ``checkpoints`` folder or step folder); a
    ``.safetensors`` file is a timm state dict.
    """
    from vision_jax import checkpoint

    if os.path.isdir(source):
        return checkpoint.read_variables(str(source))
    return converter(model).from_timm(read_state_dict(source), model)


def load_pretrained(
    source: str | os.PathLike,
    *,
    model: nn.Module,
    variables: Mapping[str, Any],
    replace_head: bool = False,
) -> dict:
    """Loads pretrained weights into ``variables`` (the model's freshly initialised variables).

    The head is re-initialised when the class count differs or ``replace_head`` is set; any
    other difference raises :class:`WeightMismatchError` listing missing, unexpected and
    mis-shaped keys.
    """
    loaded = read_variables(source, model)
    loaded, log = surgery.replace_head(variables, loaded, force=replace_head)
    surgery.log_surgery(str(source), log)
    return merge_strict(variables, loaded, source=str(source))


__all__ = [
    "WeightFormatError",
    "WeightMismatchError",
    "converter",
    "load_pretrained",
    "read_state_dict",
    "read_variables",
]
