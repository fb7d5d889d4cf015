"""A backbone in feature mode plus a task head, as one Flax module.

The backbone shares the task model's scope (``nn.share_scope``), so its parameters keep the
checkpoint names at the root (``Transformer/...``, ``layer1/...``) and every pretrained format
loads into a task model unchanged; the head's parameters live under ``task_head/``.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax

from vision_jax.models.registry import check_feature_maps

TASK_HEAD = "task_head"


class TaskModel(nn.Module):
    """``task_head(backbone(images), images)``: the backbone returns feature maps (its
    ``feature_taps`` are set), the head turns them into the task's outputs."""

    backbone: nn.Module
    task_head: nn.Module

    def setup(self) -> None:
        nn.share_scope(self, self.backbone)

    def __call__(self, images: jax.Array, *, train: bool = False) -> Any:
        features = self.backbone(images, train=train)
        if self.is_initializing():  # the maps the heads are built for
            check_feature_maps(self.backbone, features, images.shape[1:3])
        return self.task_head(features, images.shape[1:3], train=train)

    @property
    def dtype(self) -> Any:
        """The backbone's compute dtype."""
        return self.backbone.dtype


def head_pattern(model: nn.Module) -> str:
    """Regex of the parameters of ``model``'s task head (``head`` of a classifier)."""
    return rf"{TASK_HEAD}/.*" if isinstance(model, TaskModel) else r"head/.*"
