"""The timm Hub reader: a folder as timm's ``save_for_hf`` / ``push_to_hf_hub`` writes it and
``huggingface_hub.snapshot_download("timm/...")`` fetches it: ``config.json`` (``architecture``,
``pretrained_cfg``, optionally ``label_names``) beside ``model.safetensors`` or
``pytorch_model.bin``, a plain timm state dict.

The weights are read as the state dict they are (:mod:`.state_dict`); the input contract is the
one of timm's ``pretrained_cfg`` (``input_size``, ``mean``, ``std``, ``interpolation``,
``crop_pct``, ``crop_mode``; for inference its ``test_input_size`` and ``test_crop_pct`` where it
has them, as timm evaluates them), and the class names are ``label_names``.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
from collections.abc import Mapping
from typing import Any

import flax.linen as nn

from vision_jax.models.registry import backbone_of, family
from vision_jax.specs import CROP_MODES, INTERPOLATIONS
from vision_jax.weights import state_dict
from vision_jax.weights.contract import InputContract
from vision_jax.weights.files import WeightFormatError
from vision_jax.weights.hf import names_in_label_order
from vision_jax.weights.merge import WeightMismatchError

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def is_folder(path: pathlib.Path) -> bool:
    """Whether ``path`` is a timm Hub folder: a ``config.json`` naming a timm ``architecture``
    beside a weights file (a transformers folder's names ``model_type``)."""
    config = path / "config.json"
    if not config.is_file() or not any((path / f).is_file() for f in WEIGHT_FILES):
        return False
    try:
        content = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False  # read (and named) by the Hugging Face reader
    return isinstance(content, dict) and "architecture" in content


def _weights_file(folder: pathlib.Path) -> pathlib.Path:
    return next(folder / f for f in WEIGHT_FILES if (folder / f).is_file())


def _config(folder: str | os.PathLike) -> tuple[dict[str, Any], pathlib.Path]:
    path = pathlib.Path(folder) / "config.json"
    try:
        return dict(json.loads(path.read_text(encoding="utf-8"))), path
    except (OSError, ValueError, TypeError) as e:
        raise WeightFormatError(f"Cannot read {path}: {e}") from e


def _pretrained_cfg(folder: str | os.PathLike) -> tuple[dict[str, Any], pathlib.Path]:
    """``config.json``'s ``pretrained_cfg`` (older exports kept its keys at the top level, and
    the class names as ``labels``)."""
    config, path = _config(folder)
    cfg = config.get("pretrained_cfg", config)
    if not isinstance(cfg, Mapping):
        raise WeightFormatError(f"{path}: pretrained_cfg is not an object.")
    names = config.get("label_names", cfg.get("label_names", cfg.get("labels")))
    return {**cfg, "label_names": names}, path


# The timm architectures each family computes exactly. Others whose state dicts have the same
# names and shapes compute something else (resnetaa50's and resnetblur50's blurred strides).
ARCHITECTURES = {  # with the older names of timm's weights (vit_base_patch16_224_in21k)
    "vit": r"(vit|deit)_(tiny|small|base|large|huge)_patch\d+_\d+(_(in21k|sam|dino|miil))?",
    "resnet": r"(tv_|gluon_|ssl_|swsl_)?resnet(18|34|50|101|152)(_v1b)?",
    "bit": r"resnetv2_\d+x\d+_bit\w*",
}


ANY = None  # a model_args value the state dict's names and shapes record (or training-only)
_TRAINING_ONLY = {
    **dict.fromkeys(
        ("num_classes", "in_chans", "drop_rate", "drop_path_rate", "drop_block_rate",
         "pos_drop_rate", "patch_drop_rate", "proj_drop_rate", "attn_drop_rate", "weight_init",
         "fix_init", "zero_init_last"), ANY,
    ),
    "device": (None,), "dtype": (None,),
}  # fmt: skip
_RELU = (None, "relu")
# The timm model_args (constructor keywords, as save_for_hf records them) each family computes:
# a value in the tuple, or any (ANY). Others (resnet50's output_stride=16, act_layer="silu",
# global_pool="max") compute another function from the same state dict: refused.
MODEL_ARGS = {
    "vit": {
        **_TRAINING_ONLY, "img_size": ANY, "patch_size": ANY, "embed_dim": ANY, "depth": ANY,
        "num_heads": ANY, "mlp_ratio": ANY, "qkv_bias": ANY, "class_token": ANY,
        "no_embed_class": ANY, "fc_norm": ANY, "reg_tokens": ANY, "init_values": ANY,
        "pre_norm": ANY, "final_norm": ANY, "dynamic_img_size": ANY,
        "global_pool": ("", "token", "avg"), "act_layer": (None, "gelu"),
        "qk_norm": (False,), "proj_bias": (True,), "pos_embed": ("learn",),
        "pool_include_prefix": (False,), "dynamic_img_pad": (False,),
        "scale_attn_norm": (False,), "scale_mlp_norm": (False,), "norm_layer": (None,),
        "embed_norm_layer": (None,),
    },
    "resnet": {
        **_TRAINING_ONLY, "layers": ANY, "block": ANY, "channels": ANY, "stem_width": ANY,
        "output_stride": (32,), "global_pool": ("avg", ""), "act_layer": _RELU,
        "block_args": (None, {}), "cardinality": (1,), "base_width": (64,), "stem_type": ("",),
        "replace_stem_pool": (False,), "block_reduce_first": (1,), "down_kernel_size": (1,),
        "avg_down": (False,), "aa_layer": (None,), "norm_layer": (None,),
    },
    "bit": {
        **_TRAINING_ONLY, "layers": ANY, "channels": ANY, "width_factor": ANY, "stem_chs": ANY,
        "output_stride": (32,), "global_pool": ("avg", ""), "act_layer": _RELU,
        "stem_type": ("fixed",), "avg_down": (False,), "preact": (True,), "basic": (False,),
        "bottle_ratio": (0.25,), "norm_layer": (None,), "conv_layer": (None,),
    },
}  # fmt: skip


def _model_args(config: Mapping[str, Any]) -> dict[str, Any]:
    """``config.json``'s ``model_args``, with timm's top-level ``global_pool`` (its own exports
    record it beside them) where they do not set it."""
    args = dict(config.get("model_args") or {})
    if "global_pool" in config:
        args.setdefault("global_pool", config["global_pool"])
    return args


def _check_architecture(config: Mapping[str, Any], path: pathlib.Path, model: nn.Module) -> None:
    """Refuses an ``architecture``, ``model_args`` or ``global_pool`` that the model does not
    compute: the state dict alone would load."""
    name, kind = str(config.get("architecture")), family(model).name
    if kind in ARCHITECTURES and not re.fullmatch(ARCHITECTURES[kind], name):
        raise WeightMismatchError(
            f"{path}: architecture {name!r} is not a network vision_jax's {kind} models compute "
            f"(timm's {ARCHITECTURES[kind]}); its state dict may load, and compute another "
            "function. Point init.path at the weights file itself to load it anyway."
        )
    args = _model_args(config)
    for key, value in args.items() if kind in MODEL_ARGS else ():
        allowed = MODEL_ARGS[kind].get(key, ())
        if allowed is not ANY and value not in allowed:
            why = (f"vision_jax's {kind} model computes {key} in {allowed}: the state dict "
                   "would load and compute another function" if allowed else
                   f"an argument vision_jax does not know for its {kind} models")  # fmt: skip
            raise WeightMismatchError(
                f"{path}: model_args {key}={value!r}; {why}. Point init.path at the weights file "
                "itself to load it anyway."
            )
    heads = getattr(backbone_of(model), "num_heads", None)
    if "num_heads" in args and heads is not None and int(args["num_heads"]) != heads:
        raise WeightMismatchError(
            f"{path}: model_args num_heads={args['num_heads']}; the model has {heads} heads "
            "(set model.num_heads)."
        )


def read_variables(folder: str | os.PathLike, model: nn.Module) -> dict:
    """The variables of the folder's state dict, in vision_jax names. An ``architecture`` that
    the model's family does not compute exactly, another head count, or a ViT that averages its
    tokens while keeping a class token (``global_pool="avg"``) is refused: the state dict alone
    would load (it does not record them)."""
    config, path = _config(folder)
    _check_architecture(config, path, model)
    variables = state_dict.read_variables(_weights_file(pathlib.Path(folder)), model)
    pool = _model_args(config).get("global_pool")
    if pool not in (None, "", "token") and "cls" in variables.get("params", {}):
        raise WeightMismatchError(
            f"{path}: global_pool={pool!r} with a class token kept: vision_jax's ViTs pool the "
            "class token, or average a ViT without one (pool_type='gap')."
        )
    return variables


def input_contract(folder: str | os.PathLike, *, inference: bool = False) -> InputContract:
    """The input of the weights, from ``pretrained_cfg``: at their train size (``input_size``,
    ``crop_pct``), to fine-tune them; ``inference``: at their test size, the one timm evaluates
    them with (``test_input_size`` and ``test_crop_pct`` where it has them: timm's
    ``resolve_data_config(use_test_size=True)``, as its validate.py and inference.py)."""
    cfg, path = _pretrained_cfg(folder)
    if inference:  # timm takes a test_crop_pct only where it is truthy
        test_size, test_crop = cfg.get("test_input_size"), cfg.get("test_crop_pct")
        cfg = {**cfg, **({"input_size": test_size} if test_size is not None else {}),
               **({"crop_pct": test_crop} if test_crop else {})}  # fmt: skip
    try:
        _, height, width = cfg["input_size"]
        mean, std = tuple(map(float, cfg["mean"])), tuple(map(float, cfg["std"]))
        interpolation = cfg.get("interpolation", "bilinear")
        crop_fraction = float(cfg.get("crop_pct", 0.875))
    except (KeyError, TypeError, ValueError) as e:
        raise WeightFormatError(f"{path}: pretrained_cfg has no readable {e}.") from e
    if height != width:
        raise WeightFormatError(f"{path}: input_size {cfg['input_size']} is not a square.")
    if not 0 < crop_fraction <= 1:  # timm's crop_pct > 1 pads a crop larger than the image
        raise WeightFormatError(
            f"{path}: pretrained_cfg.crop_pct is {crop_fraction}, outside (0, 1]: vision_jax crops "
            "within the resized image (set init.use_input_contract=False and input.* instead)."
        )
    if len(mean) != 3 or len(std) != 3:
        raise WeightFormatError(f"{path}: mean {mean} and std {std} must give 3 channels.")
    crop_mode = cfg.get("crop_mode", "center")  # timm's "border" has no equivalent
    if interpolation not in INTERPOLATIONS or crop_mode not in CROP_MODES:
        raise WeightFormatError(
            f"{path}: interpolation {interpolation!r} with crop_mode {crop_mode!r}; "
            f"vision_jax resizes {' or '.join(INTERPOLATIONS)} and crops "
            f"{' or '.join(map(repr, CROP_MODES))} (set init.use_input_contract=False and "
            "input.* instead)."
        )
    return InputContract(
        int(height), mean, std, interpolation=interpolation,
        crop_fraction=crop_fraction, crop_mode=crop_mode,
    )  # fmt: skip


def class_names(folder: str | os.PathLike) -> list[str] | None:
    """``label_names`` in label order (a list, or ids 0..n-1 to names), else None."""
    names = _pretrained_cfg(folder)[0].get("label_names")
    if isinstance(names, Mapping):
        return names_in_label_order(names)
    return [str(n) for n in names] if isinstance(names, list | tuple) else None
