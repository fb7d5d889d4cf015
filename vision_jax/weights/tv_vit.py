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

from collections.abc import Mapping

import numpy as np

from vision_jax.weights.convert import renamed
from vision_jax.weights.merge import WeightMismatchError

_BLOCK = r"encoder\.layers\.encoder_layer_(\d+)\."
_RENAMES = [
    (r"class_token", "cls_token"),
    (r"conv_proj\.(\w+)", r"patch_embed.proj.\1"),
    (r"encoder\.pos_embedding", "pos_embed"),
    (_BLOCK + r"ln_1\.(\w+)", r"blocks.\1.norm1.\2"),
    (_BLOCK + r"ln_2\.(\w+)", r"blocks.\1.norm2.\2"),
    (_BLOCK + r"self_attention\.in_proj_(\w+)", r"blocks.\1.attn.qkv.\2"),
    (_BLOCK + r"self_attention\.out_proj\.(\w+)", r"blocks.\1.attn.proj.\2"),
    (_BLOCK + r"mlp\.(?:0|linear_1)\.(\w+)", r"blocks.\1.mlp.fc1.\2"),
    (_BLOCK + r"mlp\.(?:3|linear_2)\.(\w+)", r"blocks.\1.mlp.fc2.\2"),
    (r"encoder\.ln\.(\w+)", r"norm.\1"),
    (r"heads\.head\.(\w+)", r"head.\1"),
]


def is_torchvision_vit(state_dict: Mapping[str, object]) -> bool:
    """Whether ``state_dict`` uses torchvision's ViT names."""
    return "conv_proj.weight" in state_dict and "encoder.pos_embedding" in state_dict


def to_timm_names(state_dict: Mapping[str, np.ndarray], *, source: str) -> dict[str, np.ndarray]:
    """Renames a torchvision ViT state dict to timm's names."""
    out = {}
    for key, value in state_dict.items():
        name = renamed(key, _RENAMES)
        if name is None:
            raise WeightMismatchError(f"{source}: unknown torchvision ViT key {key!r}.")
        out[name] = value
    return out
