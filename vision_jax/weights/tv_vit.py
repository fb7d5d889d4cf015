"""torchvision's ``VisionTransformer`` state dicts (``vit_b_16`` ...) in timm's names.

==========================================================  =================================
torchvision                                                 timm
==========================================================  =================================
``class_token``                                             ``cls_token``
``conv_proj.{weight,bias}``                                 ``patch_embed.proj.*``
``encoder.pos_embedding``                                   ``pos_embed``
``encoder.layers.encoder_layer_N.ln_1``                     ``blocks.N.norm1``
``...self_attention.in_proj_{weight,bias}``                 ``blocks.N.attn.qkv.*``
``...self_attention.out_proj``                              ``blocks.N.attn.proj``
``...ln_2``                                                 ``blocks.N.norm2``
``...mlp.0`` / ``mlp.3`` (older files: ``linear_1``/``_2``)  ``blocks.N.mlp.fc1`` / ``fc2``
``encoder.ln``                                              ``norm``
``heads.head``                                              ``head``
==========================================================  =================================

The networks compute alike (pre-norm blocks, LayerNorm eps 1e-6, exact GELU, query/key/value
in one product in that order, the class token's output pooled). A ``heads.pre_logits`` layer
(``representation_size``) has no timm name here and is refused.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np

from vision_jax.weights.merge import WeightMismatchError

_RENAMES = [
    (r"class_token", "cls_token"),
    (r"conv_proj\.(\w+)", r"patch_embed.proj.\1"),
    (r"encoder\.pos_embedding", "pos_embed"),
    (r"encoder\.ln\.(\w+)", r"norm.\1"),
    (r"heads\.head\.(\w+)", r"head.\1"),
]
_BLOCK = re.compile(r"encoder\.layers\.encoder_layer_(\d+)\.(.+)")
_BLOCK_RENAMES = [
    (r"ln_1\.(\w+)", r"norm1.\1"),
    (r"ln_2\.(\w+)", r"norm2.\1"),
    (r"self_attention\.in_proj_(\w+)", r"attn.qkv.\1"),
    (r"self_attention\.out_proj\.(\w+)", r"attn.proj.\1"),
    (r"mlp\.(?:0|linear_1)\.(\w+)", r"mlp.fc1.\1"),
    (r"mlp\.(?:3|linear_2)\.(\w+)", r"mlp.fc2.\1"),
]


def is_torchvision_vit(state_dict: Mapping[str, object]) -> bool:
    """Whether ``state_dict`` uses torchvision's ViT names."""
    return "conv_proj.weight" in state_dict and "encoder.pos_embedding" in state_dict


def _rename(key: str, renames: list[tuple[str, str]]) -> str | None:
    for pattern, repl in renames:
        if re.fullmatch(pattern, key):
            return re.sub(pattern, repl, key)
    return None


def to_timm_names(state_dict: Mapping[str, np.ndarray], *, source: str) -> dict[str, np.ndarray]:
    """Renames a torchvision ViT state dict to timm's names."""
    out = {}
    for key, value in state_dict.items():
        if m := _BLOCK.fullmatch(key):
            rest = _rename(m.group(2), _BLOCK_RENAMES)
            name = None if rest is None else f"blocks.{m.group(1)}.{rest}"
        else:
            name = _rename(key, _RENAMES)
        if name is None:
            raise WeightMismatchError(f"{source}: unknown torchvision ViT key {key!r}.")
        out[name] = value
    return out
