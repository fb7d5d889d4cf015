"""The ``.npz`` reader: JAX checkpoints (flat "/"-joined keys) to vision_jax variables.

Layouts read:

* google-research/vision_transformer: names are vision_jax's ViT names, optionally under
  ``opt/target/`` (old flax optimizer checkpoints) or ``params/``;
* big_vision ViT: ``pos_embedding`` at the top level, blocks named
  ``MultiHeadDotProductAttention_0`` / ``LayerNorm_1`` / ``MlpBlock_0``, or one scanned
  ``Transformer/encoderblock`` whose arrays carry a leading depth axis;
* big_transfer BiT (``resnet/root_block/standardized_conv2d/kernel``,
  ``resnet/block1/unit01/a/group_norm/gamma``, ``.../a/proj/standardized_conv2d/kernel``,
  ``resnet/group_norm/...``, ``resnet/head/conv2d/...``) and big_vision ``bit_paper``, whose names
  are vision_jax's BiT names.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

import numpy as np

from vision_jax.trees import unflatten_dict
from vision_jax.weights.contract import InputContract, vit_image_size
from vision_jax.weights.files import WeightFormatError, read_npz

Flat = dict[str, np.ndarray]

# big_vision ViT block names -> google-research names (the first LayerNorm is LayerNorm_0 in both).
_BIG_VISION_BLOCK = {
    "MultiHeadDotProductAttention_0": "MultiHeadDotProductAttention_1",
    "LayerNorm_1": "LayerNorm_2",
    "MlpBlock_0": "MlpBlock_3",
}
_BIT_UNIT = re.compile(
    r"(block\d+/unit\d+)/"
    r"(?:([abc])/(group_norm|standardized_conv2d)|a/proj/standardized_conv2d)/(\w+)"
)
_BIT_LEAF = {"gamma": "scale", "beta": "bias", "kernel": "kernel"}


def _strip_prefix(flat: Mapping[str, np.ndarray]) -> Flat:
    """The model parameters of a checkpoint: keys under ``opt/target/`` or ``params/`` if any."""
    for prefix in ("opt/target/", "params/"):
        if any(k.startswith(prefix) for k in flat):
            return {k.removeprefix(prefix): v for k, v in flat.items() if k.startswith(prefix)}
    return dict(flat)


def _unscan(flat: Flat) -> Flat:
    """Splits big_vision's scanned ``Transformer/encoderblock/...`` into ``encoderblock_N``."""
    scanned = "Transformer/encoderblock/"
    out = {k: v for k, v in flat.items() if not k.startswith(scanned)}
    for k, v in flat.items():
        if k.startswith(scanned):
            for i, layer in enumerate(v):
                out[f"Transformer/encoderblock_{i}/{k.removeprefix(scanned)}"] = layer
    return out


def _vit_names(flat: Flat) -> Flat:
    """big_vision ViT names -> google-research (= vision_jax) names; others pass unchanged."""
    flat = _unscan(flat)
    if "pos_embedding" in flat:
        flat["Transformer/posembed_input/pos_embedding"] = flat.pop("pos_embedding")
    if not any("MultiHeadDotProductAttention_0" in k for k in flat):
        return flat
    out = {}
    for k, v in flat.items():
        parts = k.split("/")
        if len(parts) > 2 and parts[0] == "Transformer" and parts[1].startswith("encoderblock_"):
            parts[2] = _BIG_VISION_BLOCK.get(parts[2], parts[2])
        out["/".join(parts)] = v
    return out


def _bit_names(flat: Flat, source: str) -> Flat:
    """big_transfer BiT names (``resnet/...``) -> vision_jax's (big_vision ``bit_paper``) names."""
    out = {}
    for key, v in flat.items():
        k = key.removeprefix("resnet/")
        if k.startswith("root_block/standardized_conv2d/"):
            out[f"root_block/conv_root/{k.rsplit('/', 1)[1]}"] = v
        elif k.startswith("group_norm/"):
            out[f"norm-pre-head/{_BIT_LEAF[k.rsplit('/', 1)[1]]}"] = v.reshape(-1)
        elif k.startswith("head/conv2d/"):
            leaf = k.rsplit("/", 1)[1]
            out[f"head/{leaf}"] = v.reshape(v.shape[-2:]) if leaf == "kernel" else v
        elif m := _BIT_UNIT.fullmatch(k):
            unit, sub, layer, leaf = m.groups()
            if sub is None:
                out[f"{unit}/conv_proj/kernel"] = v
            else:
                n = "abc".index(sub) + 1
                name = f"gn{n}" if layer == "group_norm" else f"conv{n}"
                out[f"{unit}/{name}/{_BIT_LEAF[leaf]}"] = v.reshape(-1) if leaf != "kernel" else v
        else:
            raise WeightFormatError(f"{source}: unknown big_transfer BiT key {key!r}.")
    return out


def from_npz(flat: Mapping[str, np.ndarray], *, source: str) -> dict:
    """Converts the arrays of a JAX ``.npz`` checkpoint to ``{"params": ...}`` in vision_jax names.

    Shapes and missing or extra names are checked later, against the model, by the loader.
    """
    params = _strip_prefix(flat)
    if any(k.startswith("resnet/") for k in params):
        params = _bit_names(params, source)
    else:
        params = _vit_names(params)
    return {"params": unflatten_dict(params)}


def read_variables(path: str | os.PathLike) -> dict:
    """The variables of an ``.npz`` file, in vision_jax names."""
    return from_npz(read_npz(path), source=str(path))


def input_contract(path: str | os.PathLike) -> InputContract:
    """The input of an ``.npz`` checkpoint: 224 for BiT, the position-embedding grid for ViT."""
    params = _strip_prefix(read_npz(path))
    if any(k.startswith(("resnet/", "root_block/")) for k in params):
        return InputContract(224)
    posemb = params.get("Transformer/posembed_input/pos_embedding", params.get("pos_embedding"))
    if posemb is None or "embedding/kernel" not in params:
        raise WeightFormatError(f"{path}: not a ViT or BiT .npz checkpoint.")
    patch = params["embedding/kernel"].shape[0]
    return InputContract(vit_image_size(posemb.shape, patch))
