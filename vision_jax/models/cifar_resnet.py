"""CIFAR ResNets 20/32/44/56/110 (He et al. 2016, sec. 4.2) as akamaster/pytorch_resnet_cifar10.

A 3x3 conv to 16 channels, three stages of ``n`` basic blocks with 16/32/64 channels (``depth =
6n + 2``), "option A" shortcuts (stride-2 subsampling plus zero channel padding, no parameters),
global average pooling and a 64->classes classifier. Parameter paths follow akamaster's names:
``conv1``, ``bn1``, ``layer1/0/conv1``, ``layer1/0/bn1``, ..., with ``head`` for his ``linear``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from vision_jax.models.head import classify
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
from vision_jax.models.resnet import (
    NORM_MODULES,
    batch_norm,
    block_path,
    conv2d,
    resnet_layer_groups,
)

WIDTHS = (16, 32, 64)


class BasicBlockA(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus an option-A shortcut, then ReLU."""

    planes: int
    stride: int = 1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        y = conv2d(self.planes, 3, self.stride, self.dtype, name="conv1")(x)
        y = nn.relu(batch_norm(train, self.dtype, name="bn1")(y))
        y = conv2d(self.planes, 3, 1, self.dtype, name="conv2")(y)
        y = batch_norm(train, self.dtype, name="bn2")(y)
        shortcut = x
        if self.stride != 1 or x.shape[-1] != self.planes:
            # Option A: subsample, then zero-pad planes // 4 channels on each side (akamaster's
            # F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, planes // 4, planes // 4))).
            pad = self.planes // 4
            shortcut = jnp.pad(x[:, ::2, ::2, :], ((0, 0), (0, 0), (0, 0), (pad, pad)))
        return nn.relu(y + shortcut)


class Stage(nn.Module):
    """``depth`` blocks named ``0``, ``1``, ... (akamaster's ``layerN.M``); the first strides."""

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
            block = remat_block(BasicBlockA, policy, static_argnums=(2,))
            x = block(self.planes, stride, self.dtype, name=str(i))(x, train)
        return x


class CifarResNet(nn.Module):
    """CIFAR ResNet on NHWC images; returns logits, or pooled features if ``num_classes == 0``,
    or with ``feature_taps`` (stage indices) a tuple of those stages' outputs (strides 1-4)."""

    num_classes: int
    stage_sizes: Sequence[int] = (3, 3, 3)
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
        x = conv2d(WIDTHS[0], 3, 1, self.dtype, name="conv1")(x)
        x = nn.relu(batch_norm(train, self.dtype, name="bn1")(x))
        policies = stage_policies(self.remat, self.remat_rules, self.stage_sizes, block_path, taps)
        run = stages_run(self, taps, len(self.stage_sizes))
        for i, (planes, depth) in enumerate(zip(WIDTHS[:run], self.stage_sizes[:run], strict=True)):
            stride = 1 if i == 0 else 2
            x = Stage(planes, depth, stride, self.dtype, policies[i], name=f"layer{i + 1}")(
                x, train=train
            )
            stages.append(x)
        if taps:
            return tuple(stages[i] for i in taps)
        x = jnp.mean(x, axis=(1, 2))
        return classify(x, self.num_classes, self.dtype)


register_family(
    Family(
        name="cifar_resnet",
        module=CifarResNet,
        layer_groups=resnet_layer_groups,
        norm_modules=NORM_MODULES,
        feature_taps=lambda m: [FeatureTap(f"layer{i + 1}", 2**i, w) for i, w in enumerate(WIDTHS)],
        converter="vision_jax.weights.resnet",
    )
)


# Exact parameter counts of akamaster's resnet{20,...,110} with 10 classes (the paper's table 6:
# 0.27M, 0.46M, 0.66M, 0.85M, 1.7M).
PAPER_PARAMS = {20: 269_722, 32: 464_154, 44: 658_586, 56: 853_018, 110: 1_727_962}

for _depth, _params in PAPER_PARAMS.items():
    register_model(
        f"cifar_resnet{_depth}",
        family="cifar_resnet",
        module=CifarResNet,
        input_size=32,
        paper_params=_params,
        stage_sizes=((_depth - 2) // 6,) * 3,
    )
