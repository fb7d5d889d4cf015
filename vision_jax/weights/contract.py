"""The input a checkpoint expects: image size, normalisation, resize interpolation and crop.

Pixels are scaled to ``value_range`` and then normalised as ``(x - mean) / std``. The values are
those of the reference evaluation of each source:

=====================================  ====  ===============  =========  =====
source                                 size  mean / std       interp.    crop
=====================================  ====  ===============  =========  =====
google / big_vision ViT ``.npz``       grid  0.5 / 0.5        bilinear   1.0
timm ViT (AugReg) state dict           grid  0.5 / 0.5        bicubic    0.9
Hugging Face ViT folder                       preprocessor_config.json, else 0.5 / 0.5
BiT ``.npz`` or timm state dict        224   0.5 / 0.5        bilinear   1.0 / 0.875
timm / torchvision ResNet              224   ImageNet         bilinear   0.875
CIFAR ResNet (akamaster)               32    ImageNet         bilinear   1.0
vision_jax checkpoint                  its run's ``input`` config (size, mean, std)
=====================================  ====  ===============  =========  =====

"grid" is the position-embedding grid times the patch size; ImageNet is mean (0.485, 0.456,
0.406), std (0.229, 0.224, 0.225). timm's and torchvision's ResNets share their state-dict names,
so a ResNet state dict gets torchvision's evaluation (resize 256, bilinear, crop 224).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import pathlib
from collections.abc import Mapping
from typing import Any

import numpy as np

from vision_jax.weights import hf
from vision_jax.weights.formats import WeightFormatError, detect_format, read_state_dict
from vision_jax.weights.npz import strip_prefix

Triple = tuple[float, float, float]
HALF: Triple = (0.5, 0.5, 0.5)
IMAGENET_MEAN: Triple = (0.485, 0.456, 0.406)
IMAGENET_STD: Triple = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class InputContract:
    """What a checkpoint's network was trained and evaluated on."""

    image_size: int
    mean: Triple = HALF
    std: Triple = HALF
    value_range: tuple[float, float] = (0.0, 1.0)  # pixels scaled to this before normalising
    interpolation: str = "bilinear"
    crop_fraction: float = 1.0


def _vit_size(posemb_shape: tuple[int, ...], patch: int, has_cls: bool) -> int:
    tokens = posemb_shape[1]
    if has_cls or math.isqrt(tokens) ** 2 != tokens:
        tokens -= 1
    return math.isqrt(tokens) * patch


def _from_npz(flat: Mapping[str, np.ndarray], source: str) -> InputContract:
    params = strip_prefix(flat)
    if any(k.startswith(("resnet/", "root_block/")) for k in params):
        return InputContract(224)
    posemb = params.get("Transformer/posembed_input/pos_embedding", params.get("pos_embedding"))
    if posemb is None or "embedding/kernel" not in params:
        raise WeightFormatError(f"{source}: not a ViT or BiT .npz checkpoint.")
    size = _vit_size(posemb.shape, params["embedding/kernel"].shape[0], "cls" in params)
    return InputContract(size)


def _from_state_dict(sd: Mapping[str, np.ndarray], source: str) -> InputContract:
    if "patch_embed.proj.weight" in sd:
        size = _vit_size(sd["pos_embed"].shape, sd["patch_embed.proj.weight"].shape[-1], True)
        return InputContract(size, interpolation="bicubic", crop_fraction=0.9)
    if "stem.conv.weight" in sd:
        return InputContract(224, crop_fraction=0.875)
    if "conv1.weight" in sd and "layer1.0.conv1.weight" in sd:
        if sd["conv1.weight"].shape[-1] == 3:  # akamaster's 3x3 stem: CIFAR
            return InputContract(32, IMAGENET_MEAN, IMAGENET_STD)
        return InputContract(224, IMAGENET_MEAN, IMAGENET_STD, crop_fraction=0.875)
    raise WeightFormatError(f"{source}: unknown state-dict layout; cannot tell its input.")


def _from_hf(folder: pathlib.Path) -> InputContract:
    config = hf.read_config(folder)
    size = int(config.get("image_size", 224))
    pre = folder / "preprocessor_config.json"
    if not pre.is_file():
        return InputContract(size)
    p = json.loads(pre.read_text())
    size_cfg = p.get("size", size)
    if isinstance(size_cfg, Mapping):
        size_cfg = size_cfg.get("height", size_cfg.get("shortest_edge", size))
    resample = {2: "bilinear", 3: "bicubic"}.get(p.get("resample"), "bilinear")
    return InputContract(
        int(size_cfg),
        tuple(p.get("image_mean", HALF)),
        tuple(p.get("image_std", HALF)),
        (0.0, float(p.get("rescale_factor", 1 / 255)) * 255.0),
        resample,
    )


def _from_orbax(path: pathlib.Path) -> InputContract:
    import orbax.checkpoint as ocp

    from vision_jax.checkpoint import latest_step_dir

    step_dir = pathlib.Path(latest_step_dir(str(path)))
    try:
        meta = ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(step_dir / "meta")
    except Exception as e:
        raise WeightFormatError(f"Cannot read the run config of {step_dir}: {e}") from e
    # The input the run really used (after its own input contract), else its config.
    cfg: dict[str, Any] = meta.get("input") or meta["config"]["input"]
    return InputContract(int(cfg["image_size"]), tuple(cfg["mean"]), tuple(cfg["std"]))


def input_contract(source: str | os.PathLike) -> InputContract:
    """The :class:`InputContract` of a checkpoint, in any format :func:`load_pretrained` reads."""
    kind = detect_format(source)
    path = pathlib.Path(source)
    if kind == "orbax":
        return _from_orbax(path)
    if kind == "hf":
        return _from_hf(path)
    flat = read_state_dict(path)
    if kind == "npz":
        return _from_npz(flat, str(path))
    if hf.is_hf_vit(flat):
        flat = hf.to_timm_names(flat, source=str(path))
    return _from_state_dict(flat, str(path))


def apply_input_contract(spec: Any, source: str | os.PathLike) -> Any:
    """``spec`` (a frozen dataclass with ``mean`` and ``std``, e.g. the run's ``InputSpec``) with
    the checkpoint's mean and std, unless the config set its own (values other than the
    defaults of :func:`vision_jax.config.default_config`), which then win."""
    from vision_jax.config import default_config

    contract = input_contract(source)
    default = default_config().input
    given = (tuple(spec.mean), tuple(spec.std))
    if given != (tuple(default.mean), tuple(default.std)):
        logging.info(
            "Input contract of %s (mean %s, std %s) not applied: input.mean/std are set to %s/%s.",
            source, contract.mean, contract.std, *given,
        )  # fmt: skip
        return spec
    logging.info("Input contract of %s: mean %s, std %s.", source, contract.mean, contract.std)
    return dataclasses.replace(spec, mean=contract.mean, std=contract.std)
