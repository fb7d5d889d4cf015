"""The state-dict reader: timm, torchvision and akamaster files (``.safetensors`` or torch), and
files in Hugging Face or torchvision ViT names, to vision_jax variables through the family's
converter."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping

import flax.linen as nn
import numpy as np

from vision_jax.weights import hf, tv_vit
from vision_jax.weights.contract import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    InputContract,
    metadata_class_names,
    metadata_contract,
    metadata_grid,
    vit_image_size,
)
from vision_jax.weights.convert import from_timm
from vision_jax.weights.files import WeightFormatError, read_state_dict, safetensors_metadata


def _timm_names(state_dict: dict[str, np.ndarray], source: str) -> dict[str, np.ndarray]:
    """``state_dict`` in timm's names (Hugging Face and torchvision ViT names renamed)."""
    if hf.is_hf_vit(state_dict):
        return hf.to_timm_names(state_dict, source=source)
    if tv_vit.is_torchvision_vit(state_dict):
        return tv_vit.to_timm_names(state_dict, source=source)
    return state_dict


def read_variables(path: str | os.PathLike, model: nn.Module) -> dict:
    """The variables of a state-dict file, in vision_jax names."""
    state_dict = read_state_dict(path)
    if hf.is_hf_vit(state_dict):
        hf.check_family(model, str(path))
    return from_timm(_timm_names(state_dict, str(path)), model)


def _vit_size(
    sd: Mapping[str, np.ndarray], source: str, grid: tuple[int, int] | None = None
) -> int | tuple[int, int] | None:
    """A timm-named ViT's input size: its position-embedding grid (``grid``, as its file
    records it) times its patch."""
    if "pos_embed" not in sd:
        raise WeightFormatError(f"{source}: a ViT without pos_embed; cannot tell its input size.")
    return vit_image_size(sd["pos_embed"].shape, sd["patch_embed.proj.weight"].shape[-1], grid)


def checkpoint_grid(path: str | os.PathLike) -> tuple[int, int] | None:
    """The position-embedding grid a state-dict file records (``export_safetensors`` writes
    it), else None."""
    return metadata_grid(safetensors_metadata(path))


def _vit_crop(size: int | tuple[int, int] | None) -> float:
    """timm's crop of its AugReg ViTs: 0.9, and 1.0 for those fine-tuned at 384 px (its
    ``*_384`` configs; and above, as its larger ones crop)."""
    sides = (size,) if isinstance(size, int) else size or (0,)
    return 1.0 if min(sides) >= 384 else 0.9


def _contract(
    sd: Mapping[str, np.ndarray], source: str, grid: tuple[int, int] | None = None
) -> InputContract:
    if "patch_embed.proj.weight" in sd:
        size = _vit_size(sd, source, grid)
        return InputContract(size, interpolation="bicubic", crop_fraction=_vit_crop(size))
    if "stem.conv.weight" in sd:
        return InputContract(224, crop_fraction=0.875)
    if "conv1.weight" in sd and "layer1.0.conv1.weight" in sd:
        if sd["conv1.weight"].shape[-1] == 3:  # akamaster's 3x3 stem: CIFAR
            return InputContract(32, IMAGENET_MEAN, IMAGENET_STD)
        return InputContract(224, IMAGENET_MEAN, IMAGENET_STD, crop_fraction=0.875)
    raise WeightFormatError(f"{source}: unknown state-dict layout; cannot tell its input.")


def class_names(path: str | os.PathLike) -> list[str] | None:
    """The class names a state-dict file records (``export_safetensors(..., class_names=...)``
    writes them), else None."""
    return metadata_class_names(safetensors_metadata(path))


def input_contract(path: str | os.PathLike) -> InputContract:
    """The input of a state-dict file: the one its metadata records (``export_safetensors``
    writes it), else told from its layout (see :mod:`.contract`)."""
    state_dict = read_state_dict(path)
    timm_names = _timm_names(state_dict, str(path))
    if tv_vit.is_torchvision_vit(state_dict):  # torchvision's evaluation: resize 256, crop 224
        size = _vit_size(timm_names, str(path))
        return InputContract(size, IMAGENET_MEAN, IMAGENET_STD, crop_fraction=0.875)
    metadata = safetensors_metadata(path)
    contract = _contract(timm_names, str(path), metadata_grid(metadata))
    recorded = metadata_contract(metadata)  # export_safetensors(..., input=...) wrote it
    if recorded is None:
        return contract
    if "patch_embed.proj.weight" in timm_names:  # the size of the grid the weights are for
        recorded = dataclasses.replace(recorded, image_size=contract.image_size)
    return recorded
