"""The input a checkpoint expects: image size, normalisation, resize interpolation and crop.

Pixels are scaled to [0, 1] and then normalised as ``(x - mean) / std``. Each reader
gives the values of the reference evaluation of its source:

=====================================  ====  ===============  =========  =====
source                                 size  mean / std       interp.    crop
=====================================  ====  ===============  =========  =====
google / big_vision ViT ``.npz``       grid  0.5 / 0.5        bilinear   1.0
timm ViT (AugReg) state dict           grid  0.5 / 0.5        bicubic    0.9 (1.0 from 384)
Hugging Face ViT folder                preprocessor_config.json, else 0.5 / 0.5, squash
BiT ``.npz`` or timm state dict        224   0.5 / 0.5        bilinear   1.0 / 0.875
timm / torchvision ResNet              224   ImageNet         bilinear   0.875
torchvision ViT                        grid  ImageNet         bilinear   0.875
CIFAR ResNet (akamaster)               32    ImageNet         bilinear   1.0
vision_jax run                         its run record's input (size, mean, std, interp., crop)
``export_safetensors(..., input=...)``  the input it records in the file's metadata
=====================================  ====  ===============  =========  =====

"grid" is the position-embedding grid times the patch size; ImageNet is mean (0.485, 0.456,
0.406), std (0.229, 0.224, 0.225). timm's and torchvision's ResNets share their state-dict names,
so a ResNet state dict gets torchvision's evaluation (resize 256, bilinear, crop 224).
Hugging Face's ViT processors resize the whole image to the square input size ("squash": the
aspect ratio not kept, nothing cropped); the others resize the shorter side and crop the centre.

A ``.npz`` ViT's row is one of its references' choices: google-research/vision_transformer's
own evaluation resizes the whole image to the square (squash; TensorFlow's bilinear, not
antialiased), and timm's pretrained configs of the same AugReg weights resize bicubic and crop
0.9 (1.0 at 384). Predictions on oblong images depend on that choice: set ``input.*`` to match
the reference compared with.

A state dict does not say how its network was trained: a timm ViT state dict gets AugReg's
contract even when it is DeiT's or DINO's (ImageNet mean and std); set ``input.mean``/``std``
for those.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from typing import Any

Triple = tuple[float, float, float]
HALF: Triple = (0.5, 0.5, 0.5)
IMAGENET_MEAN: Triple = (0.485, 0.456, 0.406)
IMAGENET_STD: Triple = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class InputContract:
    """What a checkpoint's network was trained and evaluated on."""

    image_size: int | tuple[int, int]  # (height, width): an oblong ViT's, as its file records
    mean: Triple = HALF
    std: Triple = HALF
    interpolation: str = "bilinear"
    crop_fraction: float = 1.0
    crop_mode: str = "center"  # or "squash" (see InputSpec.crop_mode)


# The safetensors ``__metadata__`` keys under which :func:`~vision_jax.weights.export_safetensors`
# records a ViT's position-embedding grid, "rows,columns", and the input contract, a JSON object
# of :class:`InputContract`'s fields (timm and safetensors ignore them).
GRID_KEY = "vision_jax.posemb_grid"
INPUT_KEY = "vision_jax.input"
CLASS_NAMES_KEY = "vision_jax.class_names"  # a JSON list of the head's class names, in order


def vit_image_size(
    posemb_shape: tuple[int, ...], patch: int, grid: tuple[int, int] | None = None
) -> int | tuple[int, int] | None:
    """The image size of a ViT: its position-embedding grid (``grid``, where its file records it)
    times ``patch``; (height, width) for an oblong grid. Without ``grid``, a grid's row count is
    a square; one more row is a class token's (big_vision's ``tok`` ViTs and timm's
    ``no_embed_class`` ones give their class token none); None for rows of no square grid (an
    oblong grid the file does not record; one of a square count reads as that square)."""
    if grid is not None:
        rows, columns = grid[0] * patch, grid[1] * patch
        return rows if rows == columns else (rows, columns)
    tokens = posemb_shape[1]
    if math.isqrt(tokens) ** 2 != tokens:
        tokens -= 1
    side = math.isqrt(tokens)
    return side * patch if side * side == tokens else None


def metadata_grid(metadata: dict[str, str] | None) -> tuple[int, int] | None:
    """The position-embedding grid a safetensors file's ``metadata`` records (:data:`GRID_KEY`),
    else None."""
    value = (metadata or {}).get(GRID_KEY)
    if value is None:
        return None
    rows, columns = (int(n) for n in value.split(","))
    return rows, columns


def as_contract(spec: Any) -> InputContract:
    """The contract of an input spec (a run's ``InputSpec``: ``load_trained(...).input``); an
    :class:`InputContract` as it is."""
    if isinstance(spec, InputContract):
        return spec
    return InputContract(
        int(spec.image_size), tuple(map(float, spec.mean)), tuple(map(float, spec.std)),
        interpolation=spec.interpolation, crop_fraction=spec.image_size / spec.resize,
        crop_mode=spec.crop_mode,
    )  # fmt: skip


def contract_metadata(contract: InputContract) -> dict[str, str]:
    """``contract`` as safetensors metadata (:data:`INPUT_KEY`)."""
    return {INPUT_KEY: json.dumps(dataclasses.asdict(contract))}


def class_names_metadata(class_names: Sequence[str]) -> dict[str, str]:
    """A head's ``class_names`` as safetensors metadata (:data:`CLASS_NAMES_KEY`)."""
    return {CLASS_NAMES_KEY: json.dumps([str(name) for name in class_names])}


def metadata_class_names(metadata: dict[str, str] | None) -> list[str] | None:
    """The class names a safetensors file's ``metadata`` records (:data:`CLASS_NAMES_KEY`),
    else None."""
    value = (metadata or {}).get(CLASS_NAMES_KEY)
    return None if value is None else [str(name) for name in json.loads(value)]


def metadata_contract(metadata: dict[str, str] | None) -> InputContract | None:
    """The input contract a safetensors file's ``metadata`` records, else None."""
    value = (metadata or {}).get(INPUT_KEY)
    if value is None:
        return None
    fields = json.loads(value)
    size, mean, std = fields.pop("image_size"), fields.pop("mean"), fields.pop("std")
    size = size if isinstance(size, int) else tuple(size)
    return InputContract(size, tuple(mean), tuple(std), **fields)
