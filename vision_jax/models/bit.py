"""BiT: pre-activation ResNet-v2 with GroupNorm and weight-standardised convs (Kolesnikov et al.).

The same network as timm's ``resnetv2_{50x1,101x1,50x3}_bit``: StdConv eps 1e-8 (timm's value for
BiT), GroupNorm(32 groups, eps 1e-5), a 7x7/2 stem conv (padding 3), then zero padding of 1 and a
3x3/2 max-pool without padding (BiT's "fixed" padding), stride in the 3x3 conv.

Parameter paths follow big_transfer / big_vision's ``bit_paper``: ``root_block/conv_root``,
``block1/unit01/{gn1,conv1,gn2,conv2,gn3,conv3,conv_proj}``, ``norm-pre-head`` and ``head``.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from vision_jax.models import precision
from vision_jax.models.head import classify
from vision_jax.models.pooling import max_pool
from vision_jax.models.registry import (
    Family,
    FeatureTap,
    check_channels,
    check_images,
    register_family,
    register_model,
    stage_taps,
    stages_run,
)
from vision_jax.models.remat import RematRules, policy_at, remat_block, stage_policies


class StdConv(nn.Conv):
    """Conv whose kernel is standardised per output channel: ``(w - mean) / sqrt(var + eps)``.

    The standardisation runs in float32 on the float32 parameter, before the cast to ``dtype``.
    It is not linear in the kernel, so LoRA refuses to adapt it (``Family.lora_unmergeable``).
    """

    eps: float = 1e-8

    def param(self, name, *args, **kwargs):
        value = super().param(name, *args, **kwargs)
        if name == "kernel":
            mean = jnp.mean(value, axis=(0, 1, 2), keepdims=True)
            var = jnp.var(value, axis=(0, 1, 2), keepdims=True)
            value = (value - mean) / jnp.sqrt(var + self.eps)
        return value


def _std_conv(features, kernel, stride, eps, dtype, name):
    pad = kernel // 2
    return StdConv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=((pad, pad), (pad, pad)),
        use_bias=False,
        eps=eps,
        kernel_init=nn.initializers.variance_scaling(2.0, "fan_out", "normal"),
        dtype=dtype,
        param_dtype=jnp.float32,
        conv_general_dilated=precision.conv_as_dot,
        name=name,
    )


def _group_norm(dtype, name):
    return nn.GroupNorm(
        num_groups=32,
        epsilon=1e-5,
        use_fast_variance=False,
        dtype=dtype,
        param_dtype=jnp.float32,
        name=name,
    )


class RootBlock(nn.Module):
    """7x7/2 StdConv (padding 3), zero padding 1, 3x3/2 max-pool (no further padding)."""

    width: int
    eps: float = 1e-8
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = _std_conv(self.width, 7, 2, self.eps, self.dtype, "conv_root")(x)
        x = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
        return max_pool(x, (3, 3), (2, 2))


class PreActBottleneck(nn.Module):
    """GN-ReLU-conv1x1, GN-ReLU-conv3x3 (strided), GN-ReLU-conv1x1, plus the shortcut.

    The projection shortcut (``conv_proj``) reads the pre-activated input, as in BiT.
    """

    out_chs: int
    stride: int = 1
    eps: float = 1e-8
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        conv = partial(_std_conv, eps=self.eps, dtype=self.dtype)
        mid = self.out_chs // 4
        x_pre = nn.relu(_group_norm(self.dtype, "gn1")(x))
        shortcut = x
        if self.stride != 1 or x.shape[-1] != self.out_chs:
            shortcut = conv(self.out_chs, 1, self.stride, name="conv_proj")(x_pre)
        y = conv(mid, 1, 1, name="conv1")(x_pre)
        y = conv(mid, 3, self.stride, name="conv2")(nn.relu(_group_norm(self.dtype, "gn2")(y)))
        y = conv(self.out_chs, 1, 1, name="conv3")(nn.relu(_group_norm(self.dtype, "gn3")(y)))
        return y + shortcut


class Stage(nn.Module):
    """``depth`` units named ``unit01``, ``unit02``, ...; the first one strides."""

    out_chs: int
    depth: int
    stride: int = 1
    eps: float = 1e-8
    dtype: Any = jnp.float32
    remat_policies: tuple[str, ...] = ()  # each unit's (vision_jax.models.remat); () none

    @nn.compact
    def __call__(self, x):
        for j in range(self.depth):
            stride = self.stride if j == 0 else 1
            unit = remat_block(PreActBottleneck, policy_at(self.remat_policies, j))
            x = unit(self.out_chs, stride, self.eps, self.dtype, name=f"unit{j + 1:02d}")(x)
        return x


class ResNetV2(nn.Module):
    """BiT ResNet-v2 on NHWC images; returns logits, or pooled features if ``num_classes == 0``,
    or with ``feature_taps`` (stage indices) a tuple of those stages' outputs (strides 4-32; the
    last stage through ``norm-pre-head`` and ReLU, as the classifier sees it).

    ``train`` is accepted for a uniform interface; the network has no train-mode behaviour.
    """

    num_classes: int
    stage_sizes: Sequence[int] = (3, 4, 6, 3)
    width_factor: int = 1
    std_conv_eps: float = 1e-8
    dtype: Any = jnp.float32
    feature_taps: tuple[int, ...] | None = None
    remat: str = "none"  # "block" or "dots": recompute unit activations in the backward pass
    remat_rules: RematRules = ()  # per unit: ((regex, policy), ...) (vision_jax.models.remat)

    @nn.compact
    def __call__(self, images, *, train: bool = False):
        del train
        check_images(images)
        check_channels(self, images, "root_block", "conv_root")
        taps = stage_taps(
            self.feature_taps, len(self.stage_sizes), self.num_classes, owner=type(self).__name__
        )
        stages = []
        x = jnp.asarray(images, self.dtype)
        width = 64 * self.width_factor
        x = RootBlock(width, self.std_conv_eps, self.dtype, name="root_block")(x)
        unit = lambda i, j: f"block{i + 1}/unit{j + 1:02d}"
        policies = stage_policies(self.remat, self.remat_rules, self.stage_sizes, unit, taps)
        run = stages_run(self, taps, len(self.stage_sizes))
        for i, depth in enumerate(self.stage_sizes[:run]):
            x = Stage(
                width * 4 * 2**i,
                depth,
                stride=1 if i == 0 else 2,
                eps=self.std_conv_eps,
                dtype=self.dtype,
                remat_policies=policies[i],
                name=f"block{i + 1}",
            )(x)
            stages.append(x)
        if run < len(self.stage_sizes):  # the last stage, and the norm after it, do not run
            return tuple(stages[i] for i in taps)
        x = nn.relu(_group_norm(self.dtype, "norm-pre-head")(x))
        if taps:
            stages[-1] = x
            return tuple(stages[i] for i in taps)
        x = jnp.mean(x, axis=(1, 2))
        return classify(x, self.num_classes, self.dtype)


def _layer_groups(model: ResNetV2) -> tuple[list[tuple[str, int]], int]:
    n = len(model.stage_sizes)
    blocks = [(rf"block{i + 1}/.*", i + 1) for i in range(n)]
    return [(r"root_block/.*", 0)] + blocks + [(".*", n + 1)], n + 2


register_family(
    Family(
        name="bit",
        module=ResNetV2,
        layer_groups=_layer_groups,
        norm_modules=r"gn\d+|norm-pre-head",
        after_last_stage=r"norm-pre-head/.*",
        feature_taps=lambda m: [
            FeatureTap(f"block{i + 1}", 4 * 2**i, 256 * m.width_factor * 2**i)
            for i in range(len(m.stage_sizes))
        ],
        converter="vision_jax.weights.resnet",
        lora_unmergeable=(StdConv,),
    )
)


for _name, _stages, _width, _timm in [
    ("bit_r50x1", (3, 4, 6, 3), 1, "resnetv2_50x1_bit"),
    ("bit_r101x1", (3, 4, 23, 3), 1, "resnetv2_101x1_bit"),
    ("bit_r50x3", (3, 4, 6, 3), 3, "resnetv2_50x3_bit"),
]:
    register_model(
        _name,
        family="bit",
        module=ResNetV2,
        input_size=224,
        timm_name=_timm,
        stage_sizes=_stages,
        width_factor=_width,
    )
