"""Vision Transformer (Dosovitskiy et al. 2021), the network of google-research/vision_transformer.

Parameter names and shapes are those of the google-research checkpoints, so their ``.npz`` files
map one to one: ``embedding`` (the patch conv), ``cls``, ``Transformer/posembed_input/
pos_embedding``, ``Transformer/encoderblock_N/{LayerNorm_0, MultiHeadDotProductAttention_1/
{query,key,value,out}, LayerNorm_2, MlpBlock_3/{Dense_0,Dense_1}}``, ``Transformer/encoder_norm``,
optional ``pre_logits`` and ``head``. Attention kernels keep the per-head layout: query/key/value
``(D, heads, head_dim)``, out ``(heads, head_dim, D)``.

With ``pool_type="token"`` and no pre-logits layer this is timm's ``vit_*_patch*_224``: LayerNorm
eps 1e-6, exact (erf) GELU. ``pool_type="gap"`` follows the JAX reference (final LayerNorm on
every token, then the mean; no class token), which differs from timm's ``fc_norm`` ordering.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from collections.abc import Callable, Iterator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from vision_jax.models import precision
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

POOL_TYPES = ("token", "gap")


# The float32 erf that StableHLO's chlo.erf decomposes into (Eigen's rational approximation):
# x P(x^2) / Q(x^2) on x clamped to [-4, 4].
_ERF_P = (-2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06,
          -5.69250639462346e-05, -7.34990630326855e-04, -2.95459980854025e-03,
          -1.60960333262415e-02)  # fmt: skip
_ERF_Q = (-1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03,
          -7.37332916720468e-03, -1.42647390514189e-02)  # fmt: skip
_gelu_form = contextvars.ContextVar("gelu_form", default="erf")
GELU_FORMS = ("erf", "elementary", "tanh")


def erf_elementary(x: jax.Array) -> jax.Array:
    """float32 ``erf`` from multiplies, adds, a divide and clamps (within 1e-6 of the exact
    erf), for converters that have no erf (TFLite)."""
    x = jnp.clip(x.astype(jnp.float32), -4.0, 4.0)
    x2 = x * x
    p = functools.reduce(lambda acc, c: acc * x2 + c, _ERF_P, 0.0)
    q = functools.reduce(lambda acc, c: acc * x2 + c, _ERF_Q, 0.0)
    return jnp.clip(x * p / q, -1.0, 1.0)


@contextlib.contextmanager
def gelu_form(form: str) -> Iterator[None]:
    """Models traced inside compute GELU in ``form``, for a converter: ``"erf"`` (``lax.erf``,
    as training and evaluation), ``"elementary"`` (erf from :func:`erf_elementary`, for
    converters without erf) or ``"tanh"`` (the tanh approximation, within 5e-4 of the exact
    GELU, with no divide: full-integer TFLite, whose int8 divide can meet a zero divisor)."""
    if form not in GELU_FORMS:
        raise ValueError(f"GELU form must be one of {GELU_FORMS}, got {form!r}.")
    token = _gelu_form.set(form)
    try:
        yield
    finally:
        _gelu_form.reset(token)


def gelu_exact(x: jax.Array) -> jax.Array:
    """Exact GELU as torch writes it, ``x/2 * (1 + erf(x/sqrt(2)))``; XLA's polynomial ``erf``
    is cheaper than the ``erfc`` (with an ``exp``) of ``nn.gelu(approximate=False)``. Inside
    :func:`gelu_form`, erf is written out or GELU approximated."""
    form = _gelu_form.get()
    if form == "tanh":
        return nn.gelu(x, approximate=True)
    y = x * jnp.asarray(0.5**0.5, x.dtype)
    erf = erf_elementary(y).astype(x.dtype) if form == "elementary" else lax.erf(y)
    return 0.5 * x * (1 + erf)


def _layer_norm(dtype: Any, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=1e-6, dtype=dtype, param_dtype=jnp.float32, name=name)


class DropPath(nn.Module):
    """Stochastic depth: drops the whole residual branch per example with probability ``rate``."""

    rate: float

    @nn.compact
    def __call__(self, x: jax.Array, *, deterministic: bool) -> jax.Array:
        if deterministic or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        mask = jax.random.bernoulli(self.make_rng("dropout"), keep, shape)
        return jnp.where(mask, x / keep, jnp.zeros_like(x))


def _linear(dtype: Any) -> dict[str, Any]:
    """Shared fields of the ViT's Dense layers: Xavier-uniform kernels (as the JAX reference),
    float32 params, compute in ``dtype`` with float32 accumulation and bias (outputs are float32:
    cast them to ``dtype``)."""
    return {
        "kernel_init": nn.initializers.xavier_uniform(),
        "dot_general": precision.dot_general(dtype),
        "dtype": dtype,
        "param_dtype": jnp.float32,
    }


def attend(
    q: jax.Array, k: jax.Array, v: jax.Array, *, dropout: Callable | None = None
) -> jax.Array:
    """``softmax(q k^T / sqrt(head_dim)) v`` per head: ``(B, N, H, hd)`` in and out, in the
    inputs' dtype (products accumulate in float32); ``dropout`` applies to the weights."""
    dtype = q.dtype
    q = q * jnp.asarray(q.shape[-1] ** -0.5, dtype)
    logits = precision.dot(q, k, (((3,), (3,)), ((0, 2), (0, 2))))  # (B, H, N, N)
    # Softmax with the normalisation deferred past the value product: dividing the
    # (B, H, N, hd) output is cheaper than dividing the (B, H, N, N) weights.
    unnormalized = jnp.exp(logits - lax.stop_gradient(logits.max(-1, keepdims=True)))
    denom = unnormalized.sum(-1)  # (B, H, N)
    weights = unnormalized.astype(dtype)
    if dropout is not None:
        weights = dropout(weights)
    out = precision.dot(weights, v, (((3,), (1,)), ((0, 1), (0, 2))))  # (B, H, N, hd)
    return (out / denom[..., None]).transpose(0, 2, 1, 3).astype(dtype)


class Attention(nn.Module):
    """Multi-head self-attention with the per-head parameter layout of ``flax`` / the JAX ViT."""

    num_heads: int
    dropout_rate: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, deterministic: bool) -> jax.Array:
        width = x.shape[-1]
        if width % self.num_heads:
            raise ValueError(f"Width {width} is not divisible by {self.num_heads} heads.")
        head_dim = width // self.num_heads

        def proj(name: str) -> jax.Array:
            dense = nn.DenseGeneral((self.num_heads, head_dim), name=name, **_linear(self.dtype))
            return dense(x).astype(self.dtype)

        q, k, v = proj("query"), proj("key"), proj("value")  # (B, N, H, hd)
        dropout = None
        if self.dropout_rate and not deterministic:
            dropout = functools.partial(nn.Dropout(self.dropout_rate), deterministic=False)
        out = attend(q, k, v, dropout=dropout)
        out = nn.DenseGeneral(width, axis=(-2, -1), name="out", **_linear(self.dtype))(out)
        return out.astype(self.dtype)


class MlpBlock(nn.Module):
    """Dense -> exact GELU -> dropout -> Dense -> dropout."""

    mlp_dim: int
    dropout_rate: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, deterministic: bool) -> jax.Array:
        bias_init = nn.initializers.normal(stddev=1e-6)
        dense = lambda features, name: nn.Dense(
            features, bias_init=bias_init, name=name, **_linear(self.dtype)
        )
        y = gelu_exact(dense(self.mlp_dim, "Dense_0")(x)).astype(self.dtype)
        y = nn.Dropout(self.dropout_rate)(y, deterministic=deterministic)
        y = dense(x.shape[-1], "Dense_1")(y).astype(self.dtype)
        return nn.Dropout(self.dropout_rate)(y, deterministic=deterministic)


class EncoderBlock(nn.Module):
    """Pre-norm transformer block: ``x + attn(ln(x))``, then ``x + mlp(ln(x))``."""

    num_heads: int
    mlp_dim: int
    dropout_rate: float = 0.0
    attention_dropout_rate: float = 0.0
    drop_path_rate: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
        y = _layer_norm(self.dtype, "LayerNorm_0")(x)
        y = Attention(
            self.num_heads,
            self.attention_dropout_rate,
            self.dtype,
            name="MultiHeadDotProductAttention_1",
        )(y, deterministic=deterministic)
        y = nn.Dropout(self.dropout_rate)(y, deterministic=deterministic)
        x = x + DropPath(self.drop_path_rate)(y, deterministic=deterministic)
        y = _layer_norm(self.dtype, "LayerNorm_2")(x)
        y = MlpBlock(self.mlp_dim, self.dropout_rate, self.dtype, name="MlpBlock_3")(
            y, deterministic=deterministic
        )
        return x + DropPath(self.drop_path_rate)(y, deterministic=deterministic)


class AddPositionEmbs(nn.Module):
    """Adds a learned ``pos_embedding`` of shape ``(1, tokens, width)``."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        posemb = self.param(
            "pos_embedding", nn.initializers.normal(stddev=0.02), (1, *x.shape[1:]), jnp.float32
        )
        return x + posemb.astype(x.dtype)


class Encoder(nn.Module):
    """Position embeddings, ``depth`` encoder blocks and the final LayerNorm (``Transformer``).

    Returns the normalised output of the last block, or with ``taps`` a list of the outputs of
    those blocks, each through the (shared) final LayerNorm: timm's ``forward_intermediates``
    with ``norm=True``. With taps the blocks after the last tapped one run only at init (their
    parameters exist, so checkpoints load unchanged; they get no gradient: the optimizer freezes
    them, ``vision_jax.optim.layer_groups``).
    """

    depth: int
    num_heads: int
    mlp_dim: int
    dropout_rate: float = 0.0
    attention_dropout_rate: float = 0.0
    drop_path_rate: float = 0.0
    dtype: Any = jnp.float32
    taps: tuple[int, ...] = ()
    remat_policies: tuple[str, ...] = ()  # each block's (vision_jax.models.remat); () none

    @nn.compact
    def __call__(self, x: jax.Array, *, deterministic: bool) -> jax.Array | list[jax.Array]:
        outputs = {}
        x = AddPositionEmbs(name="posembed_input")(x).astype(self.dtype)
        x = nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)
        for i in range(stages_run(self, self.taps, self.depth)):
            policy = policy_at(self.remat_policies, i)
            block = remat_block(EncoderBlock, policy, static_argnums=(2,))
            # Linearly increasing stochastic depth, as in timm and big_vision.
            rate = self.drop_path_rate * i / max(self.depth - 1, 1)
            x = block(
                self.num_heads,
                self.mlp_dim,
                self.dropout_rate,
                self.attention_dropout_rate,
                rate,
                self.dtype,
                name=f"encoderblock_{i}",
            )(x, deterministic)
            outputs[i] = x
        norm = _layer_norm(self.dtype, "encoder_norm")
        if not self.taps:
            return norm(x)
        return [norm(outputs[i]) for i in self.taps]


class VisionTransformer(nn.Module):
    """ViT on NHWC images; returns logits, or the pooled features if ``num_classes == 0``.

    With ``feature_taps`` (block indices, negative from the end; needs ``num_classes == 0``) it
    returns a tuple of NHWC token grids ``(N, H / patch, W / patch, width)`` instead: the outputs
    of those blocks through the final LayerNorm, class token dropped. The parameters are the same
    in every mode (the class token and every block exist), so checkpoints load unchanged.
    """

    num_classes: int
    patch_size: int = 16
    width: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    pool_type: str = "token"  # "token" (class token) or "gap" (mean of all tokens)
    representation_size: int | None = None  # optional pre-logits Dense + tanh
    dropout_rate: float = 0.0
    attention_dropout_rate: float = 0.0
    drop_path_rate: float = 0.0
    dtype: Any = jnp.float32
    feature_taps: tuple[int, ...] | None = None
    remat: str = "none"  # "block" or "dots": recompute block activations in the backward pass
    remat_rules: RematRules = ()  # per block: ((regex, policy), ...) (vision_jax.models.remat)
    # The patch grid (rows, columns) of the position embeddings; None: the square grid of their
    # rows (an oblong grid must be named here).
    posemb_grid: tuple[int, int] | None = None

    @nn.compact
    def __call__(self, images: jax.Array, *, train: bool = False) -> Any:
        check_images(images)
        check_channels(self, images, "embedding")
        taps = stage_taps(
            self.feature_taps, self.depth, self.num_classes, owner=type(self).__name__, unit="block"
        )
        if self.pool_type not in POOL_TYPES:
            raise ValueError(f"Unknown pool_type {self.pool_type!r}; valid: {POOL_TYPES}.")
        h, w = images.shape[1:3]
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(
                f"Image size {h}x{w} is not divisible by the patch size {self.patch_size}."
            )
        x = jnp.asarray(images, self.dtype)
        x = nn.Conv(
            self.width,
            (self.patch_size, self.patch_size),
            strides=(self.patch_size, self.patch_size),
            padding="VALID",
            dtype=self.dtype,
            param_dtype=jnp.float32,
            conv_general_dilated=precision.conv_general_dilated(self.dtype),
            name="embedding",
        )(x)  # float32 until the position embeddings are added
        n, gh, gw, c = x.shape
        check_grid((h, w), self.patch_size, self._posemb_rows(), self.posemb_grid)
        x = jnp.reshape(x, (n, gh * gw, c))
        if self.pool_type == "token":
            cls = self.param("cls", nn.initializers.zeros, (1, 1, c), jnp.float32)
            x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (n, 1, c)), x], axis=1)
        x = Encoder(
            self.depth,
            self.num_heads,
            self.mlp_dim,
            self.dropout_rate,
            self.attention_dropout_rate,
            self.drop_path_rate,
            self.dtype,
            taps,
            self._block_policies(taps),
            name="Transformer",
        )(x, deterministic=not train)
        if taps:
            prefix = int(self.pool_type == "token")
            return tuple(y[:, prefix:].reshape(n, gh, gw, c) for y in x)
        x = x[:, 0] if self.pool_type == "token" else jnp.mean(x, axis=1)
        if self.representation_size is not None:  # float32 product and bias, then tanh
            x = nn.Dense(
                self.representation_size, dtype=self.dtype, param_dtype=jnp.float32,
                dot_general=precision.dot_general(self.dtype), name="pre_logits",
            )(x)  # fmt: skip
            x = jnp.tanh(x).astype(self.dtype)
        return classify(x, self.num_classes, self.dtype)

    def _posemb_rows(self) -> int | None:
        """The patch rows of the position embedding in the variables (None at init)."""
        params = self.variables.get("params", {})
        posemb = params.get("Transformer", {}).get("posembed_input", {}).get("pos_embedding")
        return None if posemb is None else posemb.shape[1] - int(self.pool_type == "token")

    def _block_policies(self, taps: tuple[int, ...]) -> tuple[str, ...]:
        path = lambda i, _: block_path(i)  # each block a stage of one: the taps index blocks
        stages = stage_policies(self.remat, self.remat_rules, (1,) * self.depth, path, taps)
        return tuple(policy for (policy,) in stages)


def check_grid(
    image_hw: tuple[int, int], patch: int, rows: int | None, posemb_grid: tuple[int, int] | None
) -> None:
    """Refuses images whose patch grid is not the grid of the ``rows`` position embeddings (None
    at init: the images' count): ``posemb_grid``, else the square one (an oblong grid must be
    named: timm refuses another image size too; the same count as another grid would read the
    embeddings in its layout)."""
    (h, w), grid = image_hw, (image_hw[0] // patch, image_hw[1] // patch)
    count = grid[0] * grid[1] if rows is None else rows
    side = math.isqrt(count)
    laid = tuple(posemb_grid) if posemb_grid else (side, side) if side * side == count else None
    if laid == grid and grid[0] * grid[1] == count:
        return
    images = f"Images of {h}x{w} are a {grid[0]}x{grid[1]} grid of {patch}x{patch} patches"
    if rows is None:  # at init: no embeddings yet, the grid is named or square
        named = f"not the model's posemb_grid {laid}" if posemb_grid else "an oblong grid"
        raise ValueError(
            f"{images}, {named}: a model of this grid names it, create_model(..., "
            f"posemb_grid={grid})."
        )
    if laid is None:
        raise ValueError(
            f"{images}, but the model's {rows} position embeddings are of no square grid: "
            "create the model with the grid it was initialised at, create_model(..., "
            "posemb_grid=(rows, columns))."
        )
    named = f"; a model made for this grid: create_model(..., posemb_grid={grid})"
    raise ValueError(
        f"{images}, but the model's position embeddings are for a {laid[0]}x{laid[1]} grid: "
        f"resize the images to the model's size ({laid[0] * patch}x{laid[1] * patch}), or "
        f"resample the embeddings to this grid (load_pretrained(..., image_size=({h}, {w})) "
        f"into the model initialised at this size{named if grid[0] != grid[1] else ''})."
    )


def block_path(index: int) -> str:
    """The path of encoder block ``index`` (its parameters' prefix)."""
    return f"Transformer/encoderblock_{index}"


def _layer_groups(model: VisionTransformer) -> tuple[list[tuple[str, int]], int]:
    stem = [(r"(embedding|Transformer/posembed_input)/.*|cls", 0)]
    blocks = [(rf"{block_path(i)}/.*", i + 1) for i in range(model.depth)]
    return stem + blocks + [(".*", model.depth + 1)], model.depth + 2


register_family(
    Family(
        name="vit",
        module=VisionTransformer,
        layer_groups=_layer_groups,
        norm_modules=r"LayerNorm_\d+|encoder_norm",
        feature_taps=lambda m: [
            FeatureTap(f"block{i}", m.patch_size, m.width) for i in range(m.depth)
        ],
        converter="vision_jax.weights.vit",
    )
)

# name: (width, depth, heads, mlp_dim, timm's name stem)
VIT_SIZES = {
    "ti": (192, 12, 3, 768, "tiny"),
    "s": (384, 12, 6, 1536, "small"),
    "b": (768, 12, 12, 3072, "base"),
    "l": (1024, 24, 16, 4096, "large"),
}

# timm registers no tiny/32, tiny/8 or large/8; for those the same network is timm's
# VisionTransformer class with these sizes (the parameter-count test builds it that way).
TIMM_VITS = {
    "vit_tiny_patch16_224",
    *(f"vit_{s}_patch{p}_224" for s in ("small", "base") for p in (32, 16, 8)),
    "vit_large_patch32_224",
    "vit_large_patch16_224",
}

for _size, (_width, _depth, _heads, _mlp, _stem) in VIT_SIZES.items():
    for _patch in (32, 16, 8):
        _timm = f"vit_{_stem}_patch{_patch}_224"
        register_model(
            f"vit_{_size}{_patch}",
            family="vit",
            module=VisionTransformer,
            input_size=224,
            timm_name=_timm if _timm in TIMM_VITS else None,
            patch_size=_patch,
            width=_width,
            depth=_depth,
            num_heads=_heads,
            mlp_dim=_mlp,
        )
