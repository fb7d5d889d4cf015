"""The Hugging Face reader: ``ViTForImageClassification`` / ``ViTModel`` folders (``config.json``
plus ``model.safetensors`` or ``pytorch_model.bin``), via timm's names.

The documented name mapping (``vit.`` prefix of ViTForImageClassification removed):

==========================================================  =====================================
Hugging Face                                                timm
==========================================================  =====================================
``embeddings.cls_token``                                    ``cls_token``
``embeddings.position_embeddings``                          ``pos_embed``
``embeddings.patch_embeddings.projection.{weight,bias}``    ``patch_embed.proj.*``
``encoder.layer.N.layernorm_before``                        ``blocks.N.norm1``
``encoder.layer.N.attention.attention.{query,key,value}``   ``blocks.N.attn.qkv`` (concatenated)
``encoder.layer.N.attention.output.dense``                  ``blocks.N.attn.proj``
``encoder.layer.N.layernorm_after``                         ``blocks.N.norm2``
``encoder.layer.N.intermediate.dense``                      ``blocks.N.mlp.fc1``
``encoder.layer.N.output.dense``                            ``blocks.N.mlp.fc2``
``layernorm``                                               ``norm``
``classifier``                                              ``head``
==========================================================  =====================================

transformers 5's in-memory modules (what its ``state_dict()`` gives; ``save_pretrained`` writes
the names above) are read too: ``layers.N.attention.{q,k,v,o}_proj``, ``layers.N.mlp.fc{1,2}``,
``layers.N.layernorm_{before,after}``.

``ViTModel``'s ``pooler`` (Dense + tanh on the class token) is not used by image classification
(``ViTForImageClassification`` has none), so it is dropped. ``config.json``'s
``layer_norm_eps`` (1e-12 in Hugging Face's ViTs) is not taken: the LayerNorms keep 1e-6, the
epsilon of the JAX ViTs those weights were converted from (one above 1e-5 is refused).
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import re
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import numpy as np

from vision_jax.models.registry import family_of
from vision_jax.weights.contract import HALF, InputContract
from vision_jax.weights.convert import from_timm, renamed
from vision_jax.weights.files import WeightFormatError, read_safetensors, read_torch
from vision_jax.weights.merge import WeightMismatchError

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
SHARD_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")

_RENAMES = [
    (r"embeddings\.cls_token", "cls_token"),
    (r"embeddings\.position_embeddings", "pos_embed"),
    (r"embeddings\.patch_embeddings\.projection\.(\w+)", r"patch_embed.proj.\1"),
    (r"encoder\.layer\.(\d+)\.layernorm_before\.(\w+)", r"blocks.\1.norm1.\2"),
    (r"encoder\.layer\.(\d+)\.attention\.output\.dense\.(\w+)", r"blocks.\1.attn.proj.\2"),
    (r"encoder\.layer\.(\d+)\.layernorm_after\.(\w+)", r"blocks.\1.norm2.\2"),
    (r"encoder\.layer\.(\d+)\.intermediate\.dense\.(\w+)", r"blocks.\1.mlp.fc1.\2"),
    (r"encoder\.layer\.(\d+)\.output\.dense\.(\w+)", r"blocks.\1.mlp.fc2.\2"),
    # transformers >= 5 in memory (its state_dict(); save_pretrained writes the names above)
    (r"layers\.(\d+)\.attention\.o_proj\.(\w+)", r"blocks.\1.attn.proj.\2"),
    (r"layers\.(\d+)\.layernorm_before\.(\w+)", r"blocks.\1.norm1.\2"),
    (r"layers\.(\d+)\.layernorm_after\.(\w+)", r"blocks.\1.norm2.\2"),
    (r"layers\.(\d+)\.mlp\.(fc1|fc2)\.(\w+)", r"blocks.\1.mlp.\2.\3"),
    (r"layernorm\.(\w+)", r"norm.\1"),
    (r"classifier\.(\w+)", r"head.\1"),
]
# config.json's layer_norm_eps up to this is read as the model's 1e-6 (Hugging Face's ViTs
# have 1e-12: logits within 1e-4); above it the LayerNorms compute something else.
MAX_LAYER_NORM_EPS = 1e-5
_QKV = re.compile(
    r"(?:encoder\.layer|layers)\.(\d+)\.attention\.(?:attention\.)?(query|key|value|[qkv]_proj)"
    r"\.(\w+)"
)
_QKV_PARTS = {"q_proj": "query", "k_proj": "key", "v_proj": "value"}


def is_folder(path: pathlib.Path) -> bool:
    """Whether ``path`` is a Hugging Face folder (``config.json`` and weights, sharded or not)."""
    weights = [path / f for f in WEIGHT_FILES + SHARD_INDEXES]
    return (path / "config.json").is_file() and any(f.is_file() for f in weights)


def is_hf_vit(state_dict: Mapping[str, Any]) -> bool:
    """Whether ``state_dict`` uses Hugging Face ViT names."""
    return any(
        k.removeprefix("vit.").startswith("embeddings.patch_embeddings.") for k in state_dict
    )


def to_timm_names(state_dict: Mapping[str, np.ndarray], *, source: str) -> dict[str, np.ndarray]:
    """Renames a Hugging Face ViT state dict to timm's names (query/key/value fused to qkv)."""
    out: dict[str, np.ndarray] = {}
    qkv: dict[tuple[str, str], dict[str, np.ndarray]] = {}
    for key, value in state_dict.items():
        k = key.removeprefix("vit.")
        if k.startswith("pooler."):
            continue
        if m := _QKV.fullmatch(k):
            block, part, leaf = m.groups()
            qkv.setdefault((block, leaf), {})[_QKV_PARTS.get(part, part)] = value
            continue
        name = renamed(k, _RENAMES)
        if name is None:
            raise WeightMismatchError(f"{source}: unknown Hugging Face ViT key {key!r}.")
        out[name] = value
    for (block, leaf), parts in qkv.items():
        if set(parts) != {"query", "key", "value"}:
            raise WeightMismatchError(
                f"{source}: block {block} has only {sorted(parts)} of query/key/value {leaf}."
            )
        out[f"blocks.{block}.attn.qkv.{leaf}"] = np.concatenate(
            [parts["query"], parts["key"], parts["value"]], axis=0
        )
    return out


def _read_config(folder: str | os.PathLike) -> dict:
    """The folder's ``config.json``."""
    path = pathlib.Path(folder) / "config.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise WeightFormatError(f"Cannot read {path}: {e}") from e


def check_family(model: nn.Module, source: str) -> None:
    """Raises :class:`WeightMismatchError` unless ``model`` is a ViT."""
    if family_of(model) != "vit":
        raise WeightMismatchError(
            f"{source} holds a Hugging Face ViT, not a {type(model).__name__}."
        )


def _read_folder(folder: pathlib.Path) -> dict[str, np.ndarray]:
    """The state dict of a Hugging Face folder, preferring ``model.safetensors``."""
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            path = folder / name
            return read_safetensors(path) if name.endswith(".safetensors") else read_torch(path)
    sharded = [name for name in SHARD_INDEXES if (folder / name).is_file()]
    if sharded:
        raise WeightFormatError(
            f"{folder} holds sharded weights ({sharded[0]}); vision_jax reads one weight file: "
            "save the model again unsharded (save_pretrained(..., max_shard_size='100GB'))."
        )
    raise WeightFormatError(f"{folder} holds none of {WEIGHT_FILES}.")


def _check_config(config: Mapping[str, Any], model: Any, *, source: str) -> None:
    """Raises :class:`WeightMismatchError` if ``config.json`` describes another architecture."""
    expected = {
        "hidden_size": model.width,
        "num_hidden_layers": model.depth,
        "num_attention_heads": model.num_heads,
        "intermediate_size": model.mlp_dim,
    }
    diffs = [
        f"{k}: checkpoint {config[k]} vs model {v}"
        for k, v in expected.items()
        if k in config and config[k] != v
    ]
    if config.get("hidden_act", "gelu") not in ("gelu", "gelu_python"):  # both erf GELU
        diffs.append(f"hidden_act: checkpoint {config['hidden_act']!r} vs model 'gelu' (erf)")
    if not config.get("qkv_bias", True):
        diffs.append("qkv_bias: checkpoint False vs model True")
    if float(config.get("layer_norm_eps") or 1e-12) > MAX_LAYER_NORM_EPS:
        diffs.append(f"layer_norm_eps: checkpoint {config['layer_norm_eps']} vs model 1e-6")
    if diffs:
        raise WeightMismatchError(
            f"{source}/config.json does not describe this ViT:\n  " + "\n  ".join(diffs)
        )


def read_variables(folder: str | os.PathLike, model: nn.Module) -> dict:
    """The variables of a Hugging Face ViT folder, in vision_jax names."""
    source, config = str(folder), _read_config(folder)
    if config.get("model_type", "vit") != "vit":
        raise WeightFormatError(
            f"{source}/config.json: model_type {config['model_type']!r}; of Hugging Face "
            "folders vision_jax reads ViTs only (timm and torchvision state dicts for the rest)."
        )
    check_family(model, source)
    _check_config(config, model, source=source)
    return from_timm(to_timm_names(_read_folder(pathlib.Path(folder)), source=source), model)


def input_contract(folder: str | os.PathLike) -> InputContract:
    """The input of ``preprocessor_config.json`` (else ``config.json``'s size and 0.5 / 0.5):
    a ``{"height", "width"}`` (or plain) size squashes the whole image to that square, as
    ViTImageProcessor does; a ``shortest_edge`` resizes the shorter side and crops the centre
    (``crop_size``); with ``do_center_crop`` (DeiT's processor: 256 squashed, 224 cropped) the
    square's centre ``crop_size`` is taken."""
    size = _square(
        _read_config(folder).get("image_size", 224), pathlib.Path(folder) / "config.json"
    )
    pre = pathlib.Path(folder) / "preprocessor_config.json"
    if not pre.is_file():
        return InputContract(size, crop_mode="squash")
    try:
        p = json.loads(pre.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise WeightFormatError(f"Cannot read {pre}: {e}") from e
    resample = {2: "bilinear", 3: "bicubic"}.get(p.get("resample"), "bilinear")
    normalise = _normalisation(p, pre)
    size_cfg = p.get("size", size)
    if isinstance(size_cfg, Mapping) and "shortest_edge" in size_cfg:
        shorter = int(size_cfg["shortest_edge"])
        crop = p.get("crop_size", shorter) if p.get("do_center_crop", True) else shorter
        crop = _square(crop, pre, "crop_size")
        _check_crop(crop, shorter, pre, "size.shortest_edge")
        return InputContract(crop, *normalise, resample, crop / shorter)
    squashed = _square(size_cfg, pre, "size")
    if not p.get("do_center_crop") or "crop_size" not in p:  # ViTImageProcessor: no crop
        return InputContract(squashed, *normalise, resample, crop_mode="squash")
    crop = _square(p["crop_size"], pre, "crop_size")
    _check_crop(crop, squashed, pre, "size")
    return InputContract(crop, *normalise, resample, crop / squashed, crop_mode="squash")


def _check_crop(crop: int, resized: int, path: pathlib.Path, key: str) -> None:
    """Refuses a centre crop larger than the resized image it is taken from (its
    ``input.crop_fraction``, ``crop / resized``, would exceed 1)."""
    if crop > resized:
        raise WeightFormatError(
            f"{path}: crop_size {crop} is larger than {key} {resized}, the image it is cropped "
            f"from (input.crop_fraction {crop}/{resized} > 1; set init.use_input_contract=False "
            "and input.* instead)."
        )


def _normalisation(p: Mapping[str, Any], path: pathlib.Path) -> tuple[tuple, tuple]:
    """The processor's mean and std for pixels in [0, 1]. It normalises pixels times
    ``s = 255 * rescale_factor`` (255 without ``do_rescale``): ``(s x - mean) / std``, which is
    ``(x - mean / s) / (std / s)``; without ``do_normalize``, mean 0 and std 1."""
    scale = 255.0 * float(p.get("rescale_factor", 1 / 255)) if p.get("do_rescale", True) else 255.0
    scale = 1.0 if math.isclose(scale, 1.0, rel_tol=1e-6) else scale  # 1/255 as JSON writes it
    mean, std = (_per_channel(p.get("image_mean")), _per_channel(p.get("image_std")))
    if not p.get("do_normalize", True):
        mean, std = (0.0,) * 3, (1.0,) * 3
    if len(mean) != 3 or len(std) != 3 or scale <= 0 or min(std) <= 0:
        raise WeightFormatError(
            f"{path}: image_mean {mean}, image_std {std}, rescale_factor {scale / 255} do not "
            "normalise RGB pixels (set init.use_input_contract=False and input.* instead)."
        )
    return tuple(m / scale for m in mean), tuple(s / scale for s in std)


def _per_channel(value: Any) -> tuple:
    """A processor's ``image_mean`` or ``image_std`` per channel, as transformers reads it: a
    number for every channel, None for its default (0.5)."""
    if value is None:
        return HALF
    return (value,) * 3 if isinstance(value, int | float) else tuple(value)


def _square(size: Any, path: pathlib.Path, key: str = "image_size") -> int:
    """A square size as Hugging Face writes it: a number, ``{"height", "width"}`` or a pair."""
    if isinstance(size, Mapping):
        size = (size.get("height"), size.get("width"))
    sides = tuple(size) if isinstance(size, list | tuple) else (size, size)
    if len(sides) != 2 or sides[0] != sides[1] or not isinstance(sides[0], int):
        raise WeightFormatError(
            f"{path}: {key} {size} is not a square; vision_jax's input contract is one (set "
            "init.use_input_contract=False and input.* instead)."
        )
    return sides[0]


def class_names(folder: str | os.PathLike) -> list[str] | None:
    """``config.json``'s ``id2label`` in label order, if it names every label 0..n-1."""
    return names_in_label_order(_read_config(folder).get("id2label") or {})


def names_in_label_order(labels: Any) -> list[str] | None:
    """A label id -> name mapping (ids as ints or strings) as a list in label order, if it
    names every label 0..n-1; else None."""
    try:
        names = {int(k): str(v) for k, v in labels.items()}
    except (AttributeError, ValueError):
        return None
    return [names[i] for i in range(len(names))] if set(names) == set(range(len(names))) else None
