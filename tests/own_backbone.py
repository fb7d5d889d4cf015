"""A backbone of one's own for the tests, outside the library: a family (``own_net``) of two
convolution stages registered with ``register_family`` and one size (``own_net_s``) with
``register_model``; a config selects it with ``model.name="own_net_s"`` and
``model.module="own_backbone"``. What a minimal family declares to run from a config: the
fields ``num_classes``, ``dtype`` and ``feature_taps``; ``remat`` and ``remat_rules`` are
optional, declared here to support ``model.remat`` (each block wrapped by ``remat_block``)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from vision_jax.models.head import classify
from vision_jax.models.registry import (
    Family,
    FeatureTap,
    check_images,
    register_family,
    register_model,
    stage_taps,
    stages_run,
)
from vision_jax.models.remat import RematRules, policy_at, remat_block, stage_policies


class Stage(nn.Module):
    width: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        conv = nn.Conv(self.width, (3, 3), strides=2, dtype=self.dtype, param_dtype=jnp.float32)
        return nn.relu(conv(x))


class OwnNet(nn.Module):
    num_classes: int
    widths: tuple[int, ...] = (8, 16)
    dtype: Any = jnp.float32
    feature_taps: tuple[int, ...] | None = None
    remat: str = "none"
    remat_rules: RematRules = ()

    @nn.compact
    def __call__(self, images, *, train: bool = False):
        check_images(images)
        n = len(self.widths)
        taps = stage_taps(self.feature_taps, n, self.num_classes, owner=type(self).__name__)
        policies = stage_policies(self.remat, self.remat_rules, (1,) * n, lambda i, _: f"stage{i}",
                                  taps)  # fmt: skip
        x, outs = jnp.asarray(images, self.dtype), []
        for i in range(stages_run(self, taps, n)):
            block = remat_block(Stage, policy_at(policies[i], 0))
            x = block(self.widths[i], self.dtype, name=f"stage{i}")(x)
            outs.append(x)
        if taps:
            return tuple(outs[i] for i in taps)
        return classify(jnp.mean(x, axis=(1, 2)), self.num_classes, self.dtype)


def _layer_groups(model: OwnNet) -> tuple[list[tuple[str, int]], int]:
    n = len(model.widths)
    return [(f"stage{i}/.*", i + 1) for i in range(n)] + [(".*", n + 1)], n + 2


register_family(
    Family(
        name="own_net",
        module=OwnNet,
        layer_groups=_layer_groups,
        norm_modules="",  # (no norm modules)
        feature_taps=lambda m: [
            FeatureTap(f"stage{i}", 2 ** (i + 1), w) for i, w in enumerate(m.widths)
        ],
        converter="own_backbone_converter",  # (none: it has no pretrained weights)
    )
)
register_model("own_net_s", family="own_net", module=OwnNet, input_size=16)
