"""Multi-scale feature pyramids on backbone feature maps, for dense heads.

* :class:`SimpleFeaturePyramid` (ViTDet, Li et al. 2022): strides 4, 8, 16 and 32 from the single
  stride-16 token grid of a plain ViT, by transposed convolutions and max-pooling.
* :class:`FPN` (Lin et al. 2017): lateral 1x1 convolutions and a top-down path over the stage
  outputs of a CNN (ResNet, BiT), then a 3x3 convolution per level.

Both return ``width``-channel maps ordered from the finest to the coarsest; parameters float32,
compute in ``dtype``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vision_jax.models import precision
from vision_jax.models.pooling import max_pool
from vision_jax.models.registry import map_sizes


def conv(
    features: int, kernel: int, dtype: Any, name: str, stride: int = 1
) -> Callable[[jax.Array], jax.Array]:
    """A ``kernel`` x ``kernel`` convolution with 'SAME' padding and float32 parameters (1x1
    ones and those into maps of 2x2 pixels or fewer as products: :func:`precision.conv_as_dot`),
    its output in ``dtype``: in a low precision the bias is added to the float32 accumulator
    (:func:`precision.conv_layer`) and the sum rounded, so the bias gradient sums float32."""
    layer = nn.Conv(
        features, (kernel, kernel), strides=(stride, stride), padding="SAME",
        dtype=dtype, param_dtype=jnp.float32, conv_general_dilated=precision.conv_layer(dtype),
        name=name,
    )  # fmt: skip
    return lambda x: layer(x).astype(dtype)


def channel_norm(dtype: Any, name: str) -> nn.LayerNorm:
    """LayerNorm over channels (ViTDet's ``LayerNorm2d``)."""
    return nn.LayerNorm(epsilon=1e-6, dtype=dtype, param_dtype=jnp.float32, name=name)


def upsample_to(x: jax.Array, hw: Sequence[int], method: str = "bilinear") -> jax.Array:
    """Resizes NHWC ``x`` to spatial size ``hw`` (half-pixel centres)."""
    if tuple(x.shape[1:3]) == tuple(hw):
        return x
    return jax.image.resize(x, (x.shape[0], *hw, x.shape[3]), method)


MAX_STRIDE_LOG2 = 16  # feature_strides tries the strides 1, 2, 4, ..., 2**15


def check_coarser(
    strides: Sequence[int], maps: str, taps: Sequence[int] | None = None, reader: str = "a pyramid"
) -> None:
    """Refuses pyramid maps (``maps`` names them) at ``strides`` that are not each coarser than
    the one before: a pyramid reads them fine to coarse, and an FPN over two maps of one stride
    would read the second's corner as the whole image. ``taps``: the ``feature_taps`` that gave
    them, for a hint keeping the last tap of each stride."""
    strides = tuple(int(s) for s in strides)
    if all(b > a for a, b in zip(strides[:-1], strides[1:], strict=True)):
        return
    at = f"all at stride {strides[0]}" if len(set(strides)) == 1 else f"at strides {strides}"
    hint = ""
    if taps is not None:
        taps, n = tuple(taps), len(strides)
        keep = tuple(t for i, t in enumerate(taps) if i == n - 1 or strides[i] < strides[i + 1])
        kept = [s for i, s in enumerate(strides) if i == n - 1 or s < strides[i + 1]]
        if all(b > a for a, b in zip(kept[:-1], kept[1:], strict=True)):
            hint = f"; set one tap per stride, e.g. feature_taps={keep}"
    raise ValueError(
        f"{maps} are {at}: {reader} reads maps fine to coarse, each coarser than the one "
        f"before. Maps of equal stride give it nothing coarser (a dilated CNN's last stages "
        f"share one stride; a plain ViT's blocks share one stride, and its pyramid, ViTDet's "
        f"simple one, is built from one block){hint}."
    )


def feature_strides(features: Sequence[jax.Array], image_hw: Sequence[int]) -> list[int]:
    """The stride of each feature map (finest first), from its height and width against the
    image's, for a backbone of no registered family (a registered one's heads take the strides
    its family declares): the power of two ``s`` with each of the map's sides the image's over
    ``s``, rounded down (a ViT's grid) or up (a CNN's maps). Where several fit, the smallest past
    the previous map's (at small or odd sizes a CNN's maps round up: 40 px gives maps of 10, 5,
    3 and 2, and the 2-cell one fits strides 16 and 32); where none fits (a simple pyramid's
    finer levels of an odd grid), the power of two nearest to the sizes' ratio. Maps that are
    not each coarser than the one before are refused (:func:`check_coarser`)."""
    strides: list[int] = []
    for f in features:
        hw = tuple(f.shape[1:3])
        fits = [
            s for s in (2**k for k in range(MAX_STRIDE_LOG2))
            if all(n in pair for n, pair in zip(hw, map_sizes(image_hw, s), strict=True))
        ]  # fmt: skip
        if fits:
            stride = next((s for s in fits if not strides or s > strides[-1]), fits[0])
        else:
            ratio = math.sqrt(image_hw[0] / hw[0] * image_hw[1] / hw[1])
            stride = 2 ** round(math.log2(ratio))
        strides.append(stride)
    sizes = ", ".join("x".join(str(n) for n in f.shape[1:3]) for f in features)
    check_coarser(strides, f"Feature maps of {sizes} cells on {image_hw[0]}x{image_hw[1]} images")
    return strides


def upsample_by(x: jax.Array, factor: int, hw: Sequence[int]) -> jax.Array:
    """NHWC ``x`` enlarged ``factor`` times (bilinear, half-pixel centres) and cut to ``hw``: a
    map whose cells cover ``factor`` cells of a finer one, the last ones partly past the image
    (a pyramid level of ceil(n / 2) cells), kept in place where resizing to ``hw`` would
    stretch it."""
    h, w = x.shape[1] * factor, x.shape[2] * factor
    return upsample_to(x, (h, w))[:, : hw[0], : hw[1]]


class Upsample2x(nn.Module):
    """``nn.ConvTranspose(features, (2, 2), strides=(2, 2))``: the same parameters, initial
    values and outputs, computed as one matrix product and a depth-to-space reshape (kernel and
    stride are equal, so output pixels never overlap). XLA's CPU backend runs this several times
    faster than the transposed convolution's gradient."""

    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        shape = (2, 2, x.shape[-1], self.features)
        kernel = self.param("kernel", nn.initializers.lecun_normal(), shape, jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
        if jnp.dtype(self.dtype) == jnp.float32:
            x, kernel = x.astype(jnp.float32), kernel[::-1, ::-1]  # ConvTranspose's flip
            y = jnp.einsum("nhwc,abco->nhawbo", x, kernel)
            n, h, _, w, _, o = y.shape
            return y.reshape(n, 2 * h, 2 * w, o) + bias
        # A low precision: the float32 product (precision.dot), the float32 bias added to it,
        # then rounded (the bias gradient sums float32, as precision.dot_general's layers).
        x, kernel = x.astype(self.dtype), kernel[::-1, ::-1].astype(self.dtype)
        n, h, w, c = x.shape
        columns = jnp.transpose(kernel, (2, 0, 1, 3)).reshape(c, 4 * self.features)  # (c, abo)
        y = precision.dot(x.reshape(n * h * w, c), columns, (((1,), (0,)), ((), ())))
        y = y.reshape(n, h, w, 2, 2, self.features).transpose(0, 1, 3, 2, 4, 5)
        return (y.reshape(n, 2 * h, 2 * w, self.features) + bias).astype(self.dtype)


SIMPLE_SCALES = (4.0, 2.0, 1.0, 0.5)  # the simple pyramid's levels, as resampling factors


class SimpleFeaturePyramid(nn.Module):
    """From one stride-``s`` map, maps at strides ``s/4, s/2, s, 2s`` (ViTDet's simple pyramid,
    its ``LayerNorm2d`` kept, each level then 1x1 and 3x3 convolutions to ``width``).

    ``scales`` selects levels (factors of :data:`SIMPLE_SCALES`, in its order); the others are
    not built. Parameter names do not depend on the selection."""

    width: int
    dtype: Any = jnp.float32
    scales: tuple[float, ...] = SIMPLE_SCALES

    @nn.compact
    def __call__(self, x: jax.Array) -> list[jax.Array]:
        c = x.shape[-1]
        unknown = set(self.scales) - set(SIMPLE_SCALES)
        if unknown:
            raise ValueError(f"Simple pyramid scales {sorted(unknown)} not in {SIMPLE_SCALES}.")

        def deconv(features: int, name: str) -> Upsample2x:
            return Upsample2x(features, self.dtype, name=name)

        def level(scale: float) -> jax.Array:
            if scale == 4.0:
                y = deconv(c // 2, "up4_0")(x)
                return deconv(c // 4, "up4_1")(nn.gelu(channel_norm(self.dtype, "up4_norm")(y)))
            if scale == 2.0:
                return deconv(c // 2, "up2")(x)
            if scale == 1.0:
                return x
            odd = ((0, x.shape[1] % 2), (0, x.shape[2] % 2))  # ceil(n / 2) cells, as the layout
            return max_pool(x, (2, 2), (2, 2), odd)

        outputs = []
        for i, scale in enumerate(SIMPLE_SCALES):
            if scale not in self.scales:
                continue
            y = channel_norm(self.dtype, f"lateral{i}_norm")(
                conv(self.width, 1, self.dtype, f"lateral{i}")(level(scale))
            )
            y = channel_norm(self.dtype, f"output{i}_norm")(
                conv(self.width, 3, self.dtype, f"output{i}")(y)
            )
            outputs.append(y)
        return outputs


class FPN(nn.Module):
    """Feature pyramid network over maps ordered from fine to coarse (strides doubling).

    ``outputs`` selects the levels (indices into ``maps``) that get their 3x3 output
    convolution and are returned (default: all); the top-down path still uses every map."""

    width: int
    dtype: Any = jnp.float32
    outputs: tuple[int, ...] | None = None

    @nn.compact
    def __call__(self, maps: Sequence[jax.Array]) -> list[jax.Array]:
        laterals = [conv(self.width, 1, self.dtype, f"lateral{i}")(m) for i, m in enumerate(maps)]
        for i in range(len(laterals) - 2, -1, -1):
            coarser = upsample_to(laterals[i + 1], laterals[i].shape[1:3], "nearest")
            laterals[i] = laterals[i] + coarser
        keep = range(len(maps)) if self.outputs is None else self.outputs
        return [conv(self.width, 3, self.dtype, f"output{i}")(laterals[i]) for i in keep]
