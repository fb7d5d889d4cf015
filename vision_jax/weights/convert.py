"""timm-named state dicts to and from vision_jax variables, through the model family's converter
module (``from_timm`` / ``to_timm`` / ``checkpoint_model``, e.g. :mod:`~vision_jax.weights.vit`)."""

from __future__ import annotations

import importlib
import re
from collections.abc import Mapping
from types import ModuleType

import flax.linen as nn
import numpy as np

from vision_jax.models.registry import family
from vision_jax.weights.files import WeightFormatError


def converter(model: nn.Module) -> ModuleType:
    """The converter module that the model's family names (``Family.converter``); one that is
    not found is one line naming it and its family."""
    fam = family(model)
    try:
        return importlib.import_module(fam.converter)
    except ModuleNotFoundError as e:  # the converter itself (an import inside it: as it is)
        if e.name is None or not (fam.converter + ".").startswith(e.name + "."):
            raise
        raise WeightFormatError(
            f"The {fam.name!r} family's converter {fam.converter!r} (Family.converter, the "
            f"module with from_timm / to_timm / checkpoint_model) cannot be imported ({e}): is "
            "its folder on PYTHONPATH, or is the name in register_family wrong?"
        ) from None


def from_timm(state_dict: Mapping[str, np.ndarray], model: nn.Module) -> dict:
    """A timm (or torchvision, akamaster) state dict as ``model``'s variables, in vision_jax
    names; shapes are those of the model the state dict describes."""
    conv = converter(model)
    return conv.from_timm(state_dict, conv.checkpoint_model(state_dict, model))


def renamed(key: str, renames: list[tuple[str, str]]) -> str | None:
    """``key`` renamed by the first ``(regex, replacement)`` of ``renames`` that matches all of
    it; None if none does."""
    for pattern, replacement in renames:
        if re.fullmatch(pattern, key):
            return re.sub(pattern, replacement, key)
    return None
