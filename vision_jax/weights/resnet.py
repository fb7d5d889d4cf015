"""timm <-> Flax weight conversion for the convolutional models.

Three layouts, chosen by the module class:

* :class:`~vision_jax.models.resnet.ResNet`: timm ``resnetNN`` (``conv1``, ``bn1``,
  ``layer1.0.conv1``, ``layer2.0.downsample.{0,1}``, ``fc``);
* :class:`~vision_jax.models.bit.ResNetV2`: timm ``resnetv2_*_bit`` (``stem.conv``,
  ``stages.0.blocks.0.{norm1,conv1,...,downsample.conv}``, ``norm``, ``head.fc``, a 1x1 conv);
  it has no ``batch_stats``;
* :class:`~vision_jax.models.cifar_resnet.CifarResNet`: akamaster/pytorch_resnet_cifar10 names
  (``conv1``, ``bn1``, ``layer1.0.conv1``, ``linear``), without the ``module.`` prefix.

Both directions share one table of ``(torch key, flax path, kind)`` rows built from the model's
configuration, so they cannot drift apart. A headless model (``num_classes == 0``) skips the
checkpoint's classifier.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import flax.linen as nn
import numpy as np

from vision_jax.models.bit import ResNetV2
from vision_jax.models.cifar_resnet import WIDTHS, CifarResNet
from vision_jax.models.resnet import ResNet
from vision_jax.trees import flatten_dict, unflatten_dict
from vision_jax.weights.merge import WeightMismatchError, key_groups

# kind -> (torch ndim, torch -> flax, flax -> torch)
_LAYOUTS = {
    "copy": (None, lambda w: w, lambda w: w),
    "conv": (4, lambda w: w.transpose(2, 3, 1, 0), lambda w: w.transpose(3, 2, 0, 1)),  # OIHW/HWIO
    "linear": (2, lambda w: w.T, lambda w: w.T),
    "conv_head": (4, lambda w: w[:, :, 0, 0].T, lambda w: w.T[:, :, None, None]),  # 1x1 conv fc
}
_BN_TRACKED = "num_batches_tracked"

Row = tuple[str, str, str]  # (torch key, flax path "collection/...", kind)


def _bn(torch_prefix: str, flax_prefix: str) -> Iterator[Row]:
    yield f"{torch_prefix}.weight", f"params/{flax_prefix}/scale", "copy"
    yield f"{torch_prefix}.bias", f"params/{flax_prefix}/bias", "copy"
    yield f"{torch_prefix}.running_mean", f"batch_stats/{flax_prefix}/mean", "copy"
    yield f"{torch_prefix}.running_var", f"batch_stats/{flax_prefix}/var", "copy"


def _gn(torch_prefix: str, flax_prefix: str) -> Iterator[Row]:
    yield f"{torch_prefix}.weight", f"params/{flax_prefix}/scale", "copy"
    yield f"{torch_prefix}.bias", f"params/{flax_prefix}/bias", "copy"


def _conv(torch_prefix: str, flax_prefix: str) -> Row:
    return f"{torch_prefix}.weight", f"params/{flax_prefix}/kernel", "conv"


def _head(torch_prefix: str, kind: str) -> Iterator[Row]:
    yield f"{torch_prefix}.weight", "params/head/kernel", kind
    yield f"{torch_prefix}.bias", "params/head/bias", "copy"


def _resnet_rows(model: ResNet) -> Iterator[Row]:
    yield _conv("conv1", "conv1")
    yield from _bn("bn1", "bn1")
    expansion, n_convs = (4, 3) if model.bottleneck else (1, 2)
    in_chs = 64
    for i, depth in enumerate(model.stage_sizes):
        out_chs = 64 * 2**i * expansion
        for j in range(depth):
            t, f = f"layer{i + 1}.{j}", f"layer{i + 1}/{j}"
            for k in range(1, n_convs + 1):
                yield _conv(f"{t}.conv{k}", f"{f}/conv{k}")
                yield from _bn(f"{t}.bn{k}", f"{f}/bn{k}")
            if j == 0 and (i > 0 or in_chs != out_chs):
                yield _conv(f"{t}.downsample.0", f"{f}/downsample_conv")
                yield from _bn(f"{t}.downsample.1", f"{f}/downsample_bn")
            in_chs = out_chs
    if model.num_classes:
        yield from _head("fc", "linear")


def _bit_rows(model: ResNetV2) -> Iterator[Row]:
    yield _conv("stem.conv", "root_block/conv_root")
    for i, depth in enumerate(model.stage_sizes):
        for j in range(depth):
            t, f = f"stages.{i}.blocks.{j}", f"block{i + 1}/unit{j + 1:02d}"
            for k in (1, 2, 3):
                yield from _gn(f"{t}.norm{k}", f"{f}/gn{k}")
                yield _conv(f"{t}.conv{k}", f"{f}/conv{k}")
            if j == 0:  # every stage widens (the stem has 64w channels, stage 1 has 256w)
                yield _conv(f"{t}.downsample.conv", f"{f}/conv_proj")
    yield from _gn("norm", "norm-pre-head")
    if model.num_classes:
        yield from _head("head.fc", "conv_head")


def _cifar_rows(model: CifarResNet) -> Iterator[Row]:
    yield _conv("conv1", "conv1")
    yield from _bn("bn1", "bn1")
    for i, depth in enumerate(model.stage_sizes):
        for j in range(depth):
            t, f = f"layer{i + 1}.{j}", f"layer{i + 1}/{j}"
            for k in (1, 2):
                yield _conv(f"{t}.conv{k}", f"{f}/conv{k}")
                yield from _bn(f"{t}.bn{k}", f"{f}/bn{k}")
    if model.num_classes:
        yield from _head("linear", "linear")


def _layout(model: nn.Module) -> tuple[list[Row], str]:
    """The conversion rows of ``model`` and its checkpoint's classifier prefix."""
    if isinstance(model, ResNet):
        return list(_resnet_rows(model)), "fc."
    if isinstance(model, ResNetV2):
        return list(_bit_rows(model)), "head.fc."
    if isinstance(model, CifarResNet):
        if len(model.stage_sizes) != len(WIDTHS):
            raise ValueError(f"A CIFAR ResNet has {len(WIDTHS)} stages, got {model.stage_sizes}.")
        return list(_cifar_rows(model)), "linear."
    raise TypeError(
        f"vision_jax.weights.resnet converts ResNet, ResNetV2 and CifarResNet, "
        f"not {type(model).__name__}."
    )


def _listing(keys: list[str], limit: int = 20) -> str:
    return ", ".join(keys[:limit]) + (
        f", ... ({len(keys) - limit} more)" if len(keys) > limit else ""
    )


def _variant_hint(leftover: list[str]) -> str:
    """What keys the model does not use say about the checkpoint, when they say something."""
    if any(k.startswith("module.") for k in leftover):
        return " Some keys start with 'module.' (DataParallel) and others do not."
    if any(k.startswith("conv1.0.") for k in leftover):
        return " Its stem is three convolutions (timm's resnet*c/d/s/t variants): not this model."
    return ""


def checkpoint_model(state_dict: Mapping[str, np.ndarray], model: nn.Module) -> nn.Module:
    """``model`` with the checkpoint's class count (0 if it has no classifier)."""
    head = state_dict.get(_layout(model)[1] + "weight")
    return model.clone(parent=None, num_classes=0 if head is None else int(np.shape(head)[0]))


def from_timm(state_dict: Mapping[str, np.ndarray], model: nn.Module) -> dict:
    """Converts a timm (or, for CIFAR ResNets, akamaster) state dict to Flax variables.

    Returns ``{"params": ..., "batch_stats": ...}`` (BiT: ``{"params": ...}``). Raises
    :class:`~vision_jax.weights.merge.WeightMismatchError` (a ``ValueError``) naming the keys
    when a needed key is absent or a key is left over; ``num_batches_tracked`` is ignored, and so
    is the classifier when ``model.num_classes == 0``. Shapes are checked by ``merge_strict``.
    """
    rows, head_prefix = _layout(model)
    name = type(model).__name__
    missing = [t for t, _, _ in rows if t not in state_dict]
    if len(missing) > len(rows) // 2:
        raise WeightMismatchError(
            f"The state dict holds no {name} of this layout: it lacks {len(missing)} of the "
            f"{len(rows)} keys the model needs, and holds {key_groups(state_dict, '.', 1)}."
        )
    used = {t for t, _, _ in rows}
    leftover = [
        k
        for k in state_dict
        if k not in used
        and not k.endswith(_BN_TRACKED)
        and not (model.num_classes == 0 and k.startswith(head_prefix))
    ]
    differences = [f"lacks {len(missing)} key(s): {_listing(missing)}"] if missing else []
    if leftover:
        differences.append(f"has {len(leftover)} key(s) the model does not use: "
                           f"{_listing(leftover)}")  # fmt: skip
    if differences:
        raise WeightMismatchError(
            f"State dict for {name} {'; '.join(differences)}.{_variant_hint(leftover)}"
        )
    flat = {}
    for torch_key, flax_path, kind in rows:
        value = np.asarray(state_dict[torch_key])
        ndim, to_flax, _ = _LAYOUTS[kind]
        if ndim is not None and value.ndim != ndim:
            raise WeightMismatchError(
                f"{torch_key} has shape {value.shape}; expected a {ndim}-d tensor for {flax_path}."
            )
        flat[flax_path] = np.ascontiguousarray(to_flax(value))
    return unflatten_dict(flat)


def to_timm(variables: Mapping[str, Any], model: nn.Module) -> dict[str, np.ndarray]:
    """Converts Flax variables to a state dict that timm (or akamaster's model) loads strictly.

    BatchNorm layers get a zero ``num_batches_tracked`` (int64, 0-d), as torch expects.
    """
    flat = flatten_dict(variables)
    out: dict[str, np.ndarray] = {}
    for torch_key, flax_path, kind in _layout(model)[0]:
        if flax_path not in flat:
            raise ValueError(f"Variables lack {flax_path} (needed for {torch_key}).")
        out[torch_key] = np.ascontiguousarray(_LAYOUTS[kind][2](np.asarray(flat[flax_path])))
        if torch_key.endswith(".running_var"):
            out[torch_key.removesuffix("running_var") + _BN_TRACKED] = np.zeros((), np.int64)
    return out
