"""ResNet v1.5 (He et al. 2016; stride in the 3x3 conv), the same network as timm's ``resnetNN``.

Parameter paths follow the torch names: ``conv1``, ``bn1``, ``layer1/0/conv1``,
``layer2/0/downsample_conv``, ..., and the classifier ``head`` (timm's ``fc``).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from vision_jax.models import precision
from vision_jax.models.batch_norm import BatchNorm
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

# torch's kaiming_normal_(mode="fan_out", nonlinearity="relu"), as timm initialises convs.
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def conv2d(features: int, kernel: int, stride: int, dtype: Any, name: str) -> nn.Conv:
    """A bias-free conv with torch's symmetric padding ``kernel // 2``."""
    pad = kernel // 2
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=((pad, pad), (pad, pad)),
        use_bias=False,
        kernel_init=conv_init,
        dtype=dtype,
        param_dtype=jnp.float32,
        # every conv feeds a BatchNorm, which normalises in float32
        conv_general_dilated=partial(precision.conv_as_dot, float32_pointwise=True),
        name=name,
    )


def batch_norm(train: bool, dtype: Any, name: str) -> BatchNorm:
    """torch's BatchNorm2d defaults: momentum 0.1 (Flax 0.9), eps 1e-5.

    One difference in train mode: Flax (and :class:`BatchNorm`) folds the biased batch variance
    into ``var``, torch the unbiased one (a factor ``n / (n - 1)`` with ``n = N * H * W``); eval
    mode is identical.
    """
    return BatchNorm(
        use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype, name=name
    )


class BasicBlock(nn.Module):
    """Two 3x3 convs (ResNet-18/34); the stride sits in the first."""

    planes: int
    stride: int = 1
    dtype: Any = jnp.float32
    expansion = 1

    @nn.compact
    def __call__(self, x, train: bool):
        conv = partial(conv2d, dtype=self.dtype)
        norm = partial(batch_norm, train, self.dtype)
        out_chs = self.planes * self.expansion
        shortcut = x
        if self.stride != 1 or x.shape[-1] != out_chs:
            shortcut = conv(out_chs, 1, self.stride, name="downsample_conv")(x)
            shortcut = norm(name="downsample_bn")(shortcut)
        y = nn.relu(norm(name="bn1")(conv(self.planes, 3, self.stride, name="conv1")(x)))
        y = norm(name="bn2")(conv(out_chs, 3, 1, name="conv2")(y))
        return nn.relu(y + shortcut)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (strided, v1.5) -> 1x1 with 4x expansion (ResNet-50/101/152)."""

    planes: int
    stride: int = 1
    dtype: Any = jnp.float32
    expansion = 4

    @nn.compact
    def __call__(self, x, train: bool):
        conv = partial(conv2d, dtype=self.dtype)
        norm = partial(batch_norm, train, self.dtype)
        out_chs = self.planes * self.expansion
        shortcut = x
        if self.stride != 1 or x.shape[-1] != out_chs:
            shortcut = conv(out_chs, 1, self.stride, name="downsample_conv")(x)
            shortcut = norm(name="downsample_bn")(shortcut)
        y = nn.relu(norm(name="bn1")(conv(self.planes, 1, 1, name="conv1")(x)))
        y = nn.relu(norm(name="bn2")(conv(self.planes, 3, self.stride, name="conv2")(y)))
        y = norm(name="bn3")(conv(out_chs, 1, 1, name="conv3")(y))
        return nn.relu(y + shortcut)


def block_path(stage: int, block: int) -> str:
    """The path of block ``block`` of stage ``stage`` (from 0): ``layer1/0``, as torch's names."""
    return f"layer{stage + 1}/{block}"


class Stage(nn.Module):
    """``depth`` blocks named ``0``, ``1``, ... (torch's ``layerN.M``); the first one strides."""

    block: type[nn.Module]
    planes: int
    depth: int
    stride: int
    dtype: Any = jnp.float32
    remat_policies: tuple[str, ...] = ()  # each block's (vision_jax.models.remat); () none

    @nn.compact
    def __call__(self, x, *, train: bool):
        for i in range(self.depth):
            stride = self.stride if i == 0 else 1
            policy = policy_at(self.remat_policies, i)
            block = remat_block(self.block, policy, static_argnums=(2,))
            x = block(self.planes, stride, self.dtype, name=str(i))(x, train)
        return x


class ResNet(nn.Module):
    """ResNet v1.5 on NHWC images; returns logits, or pooled features if ``num_classes == 0``,
    or with ``feature_taps`` (stage indices) a tuple of those stages' outputs (strides 4-32)."""

    num_classes: int
    stage_sizes: Sequence[int] = (3, 4, 6, 3)
    bottleneck: bool = True
    dtype: Any = jnp.float32
    feature_taps: tuple[int, ...] | None = None
    remat: str = "none"  # "block" or "dots": recompute block activations in the backward pass
    remat_rules: RematRules = ()  # per block: ((regex, policy), ...) (vision_jax.models.remat)
    # BatchNorm normalises with its running statistics in training too and never updates them
    # (torchvision's FrozenBatchNorm2d, timm's freeze_batch_norm_2d, for small per-device
    # batches: detection); its scale and bias still train unless frozen (optimizer.frozen_params)
    frozen_bn_stats: bool = False

    @nn.compact
    def __call__(self, images, *, train: bool = False):
        check_images(images)
        check_channels(self, images, "conv1")
        train = train and not self.frozen_bn_stats  # train mode only changes the BatchNorms
        taps = stage_taps(
            self.feature_taps, len(self.stage_sizes), self.num_classes, owner=type(self).__name__
        )
        stages = []
        x = jnp.asarray(images, self.dtype)
        x = conv2d(64, 7, 2, self.dtype, name="conv1")(x)
        x = nn.relu(batch_norm(train, self.dtype, name="bn1")(x))
        x = max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
        block = Bottleneck if self.bottleneck else BasicBlock
        policies = stage_policies(self.remat, self.remat_rules, self.stage_sizes, block_path, taps)
        run = stages_run(self, taps, len(self.stage_sizes))
        for i, depth in enumerate(self.stage_sizes[:run]):
            x = Stage(
                block, 64 * 2**i, depth, 1 if i == 0 else 2, self.dtype, policies[i],
                name=f"layer{i + 1}",
            )(x, train=train)  # fmt: skip
            stages.append(x)
        if taps:
            return tuple(stages[i] for i in taps)
        x = jnp.mean(x, axis=(1, 2))
        return classify(x, self.num_classes, self.dtype)


def resnet_layer_groups(model: Any) -> tuple[list[tuple[str, int]], int]:
    """Stem (``conv1``, ``bn1``), stages ``layer1``.., then the head (ResNet and CIFAR ResNet)."""
    n = len(model.stage_sizes)
    blocks = [(rf"layer{i + 1}/.*", i + 1) for i in range(n)]
    return [(r"(conv1|bn1)/.*", 0)] + blocks + [(".*", n + 1)], n + 2


NORM_MODULES = r"bn\d*|downsample_bn"

register_family(
    Family(
        name="resnet",
        module=ResNet,
        layer_groups=resnet_layer_groups,
        norm_modules=NORM_MODULES,
        feature_taps=lambda m: [
            FeatureTap(f"layer{i + 1}", 4 * 2**i, 64 * 2**i * (4 if m.bottleneck else 1))
            for i in range(len(m.stage_sizes))
        ],
        converter="vision_jax.weights.resnet",
    )
)


for _depth, _stages, _bottleneck in [
    (18, (2, 2, 2, 2), False),
    (34, (3, 4, 6, 3), False),
    (50, (3, 4, 6, 3), True),
    (101, (3, 4, 23, 3), True),
    (152, (3, 8, 36, 3), True),
]:
    register_model(
        f"resnet{_depth}",
        family="resnet",
        module=ResNet,
        input_size=224,
        timm_name=f"resnet{_depth}",
        stage_sizes=_stages,
        bottleneck=_bottleneck,
    )
