"""Matrix products for the models' layers: bfloat16 operands with float32 accumulation, and
the layout of float32 layer products.

``lax.dot_general`` on two bfloat16 operands accumulates and returns bfloat16. Asking XLA for a
float32 result (``preferred_element_type``) accumulates in float32: more accurate, and on CPUs
with AVX512-BF16 the fast path (about twice the rate of bfloat16 accumulation). The layer adds
its bias to that float32 result and the model casts the output back to bfloat16, so activations
still travel in bfloat16. In float32 a layer's product is computed over rows
(:func:`layer_product`) and convolutions are the plain ``lax`` function."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.ad_checkpoint import checkpoint_name

# Compute (and optimizer-moment) dtypes by config name.
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def _operand_gradient(
    g: jax.Array, other: jax.Array, ndim: int, dims: Any, swap: bool
) -> jax.Array:
    """Gradient with respect to ``x`` (rank ``ndim``) of ``dot_general(x, other, dims)`` from
    the output cotangent ``g``, or with ``swap`` of ``dot_general(other, x)`` (``dims`` then
    lists ``x``'s dimensions first): ``g`` times ``other``, accumulating in float32.

    ``other`` is laid out (batch, contracted, kept) before the product and ``g`` is used as it
    comes where it can be (transposing it too, the activations' cotangent, cost 3% of a bfloat16
    ViT-S step): XLA's CPU runtime leaves some other layouts of a bfloat16 x bfloat16 -> float32
    product to a kernel that has none, which fails at run time; so does ``other`` times ``g`` for
    an ``x`` of several kept dimensions out of order, where ``g`` is transposed too. The barrier
    keeps XLA from folding the transposes back into the product.
    """
    (x_contract, o_contract), (x_batch, o_batch) = dims
    x_kept = [i for i in range(ndim) if i not in (*x_contract, *x_batch)]
    o_kept = [i for i in range(other.ndim) if i not in (*o_contract, *o_batch)]
    nb, nx, no, nc = len(x_batch), len(x_kept), len(o_kept), len(o_contract)
    (other,) = lax.optimization_barrier((lax.transpose(other, (*o_batch, *o_contract, *o_kept)),))
    order = [*x_batch, *x_contract, *x_kept]
    if swap and no > 1 and order != sorted(order):  # g to (batch, x's kept, other's kept)
        kept_x, kept_o = range(nb + no, nb + no + nx), range(nb, nb + no)
        (g,) = lax.optimization_barrier((lax.transpose(g, (*range(nb), *kept_x, *kept_o)),))
        swap = False
    batch_dims = (range(nb), range(nb))
    other_kept = range(nb + nc, other.ndim)
    g_kept = range(nb, nb + no) if swap else range(nb + nx, nb + nx + no)  # other's kept in g
    if swap or order == sorted(order):  # other x g: (batch, x's contracted, x's kept)
        product = lax.dot_general(
            other, g, ((other_kept, g_kept), batch_dims), preferred_element_type=jnp.float32
        )
    else:  # g x other: (batch, x's kept, x's contracted)
        product = lax.dot_general(
            g, other, ((g_kept, other_kept), batch_dims), preferred_element_type=jnp.float32
        )
        order = [*x_batch, *x_kept, *x_contract]
    if order == sorted(order):
        return product
    return lax.transpose(product, tuple(np.argsort(order)))


# The name of low_precision_dot's outputs without batch dimensions: remat policies do not see
# the dot_general inside the custom_vjp (vision_jax.models.remat keeps them by this name).
UNBATCHED_PRODUCT = "low_precision_dot"
# The name of nhwc_convolution's outputs, for the same reason.
CONVOLUTION = "nhwc_convolution"


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def low_precision_dot(lhs: jax.Array, rhs: jax.Array, dimension_numbers: Any) -> jax.Array:
    """``lax.dot_general`` of low-precision operands accumulating in float32, float32 result;
    its gradients are computed the same way (cotangent cast to the operands' dtype).

    JAX's own gradient of such a dot multiplies the float32 cotangent with the other operand
    converted to float32, so the backward pass (two thirds of a step's products) would run in
    float32. Here both backward products take low-precision operands and accumulate in float32,
    as torch's autocast does; each gradient is rounded to its operand's dtype.
    """
    return lax.dot_general(lhs, rhs, dimension_numbers, preferred_element_type=jnp.float32)


def _low_precision_dot_fwd(lhs, rhs, dimension_numbers):
    return low_precision_dot(lhs, rhs, dimension_numbers), (lhs, rhs)


def _low_precision_dot_bwd(dimension_numbers, residuals, g):
    lhs, rhs = residuals
    (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
    swapped = ((rhs_contract, lhs_contract), (rhs_batch, lhs_batch))
    g_lhs = _operand_gradient(g.astype(rhs.dtype), rhs, lhs.ndim, dimension_numbers, swap=False)
    g_rhs = _operand_gradient(g.astype(lhs.dtype), lhs, rhs.ndim, swapped, swap=True)
    return g_lhs.astype(lhs.dtype), g_rhs.astype(rhs.dtype)


low_precision_dot.defvjp(_low_precision_dot_fwd, _low_precision_dot_bwd)


def dot(lhs: jax.Array, rhs: jax.Array, dimension_numbers: Any, precision: Any = None) -> jax.Array:
    """``lax.dot_general`` with a float32 result: :func:`low_precision_dot` for two bfloat16
    operands (one pass whatever ``precision``), the plain product at ``precision`` otherwise."""
    if lhs.dtype == rhs.dtype == jnp.bfloat16:
        dimension_numbers = tuple(
            tuple(tuple(int(i) for i in d) for d in p) for p in dimension_numbers
        )
        out = low_precision_dot(lhs, rhs, dimension_numbers)
        batched = any(dimension_numbers[1])  # remat's "dots" keeps the others' outputs
        return out if batched else checkpoint_name(out, UNBATCHED_PRODUCT)
    return lax.dot_general(
        lhs, rhs, dimension_numbers, precision, preferred_element_type=jnp.float32
    )


def dot_general(dtype: Any) -> Callable[..., jax.Array]:
    """A ``lax.dot_general`` for Flax's ``dot_general=`` field in compute dtype ``dtype``.

    In float32 it is :func:`layer_product` of ``lax.dot_general``. For a low-precision
    ``dtype`` the product is :func:`low_precision_dot`, returned in float32,
    so the layer adds its bias in float32 and the caller casts the layer's output to ``dtype``.
    That keeps the bias gradient a float32 reduction: XLA's CPU backend rewrites a bfloat16
    reduction into a reduce-window tree about 7x slower (``benchmarks/profile_step.py`` shows it).
    """
    if jnp.dtype(dtype) == jnp.float32:
        return layer_product(lax.dot_general)

    def accumulate_in_f32(lhs, rhs, dimension_numbers, precision=None, **kwargs):
        return dot(lhs, rhs, dimension_numbers, precision)

    return accumulate_in_f32


def layer_product(product: Callable[..., jax.Array]) -> Callable[..., jax.Array]:
    """``product`` (a ``dot_general``) computing a layer's product, activations ``(..., in)``
    times a kernel ``(in, out)`` (either side may span several axes), as a 2-D product of
    ``(rows, in)`` and ``(in, out)``; other products pass through unchanged.

    The result is the same; the gain is in the backward pass. For a ``(B, N, D)`` activation
    XLA's CPU backend computes the kernel gradient (contracting ``B`` and ``N`` at once) through
    a transposed copy of the cotangent; flattened to rows, it is a plain transposed product.
    Used in float32 only: with bfloat16 operands the 2-D products are slower.
    """

    def as_matrix_product(lhs, rhs, dimension_numbers, precision=None, **kwargs):
        (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
        n = len(lhs_contract)
        is_layer = (
            not lhs_batch
            and not rhs_batch
            and tuple(lhs_contract) == tuple(range(lhs.ndim - n, lhs.ndim))
            and tuple(rhs_contract) == tuple(range(n))
        )
        if not is_layer or lhs.ndim == rhs.ndim == 2:
            return product(lhs, rhs, dimension_numbers, precision, **kwargs)
        kept, inner = lhs.shape[: lhs.ndim - n], math.prod(rhs.shape[:n])
        rows, columns = lhs.reshape(math.prod(kept), inner), rhs.reshape(inner, -1)
        out = product(rows, columns, (((1,), (0,)), ((), ())), precision, **kwargs)
        return out.reshape(*kept, *rhs.shape[n:])

    return as_matrix_product


def conv_as_dot(lhs: jax.Array, rhs: jax.Array, window_strides: Sequence[int],
                padding: str | Sequence[tuple[int, int]], lhs_dilation: Any = None,
                rhs_dilation: Any = None, dimension_numbers: Any = None,
                feature_group_count: int = 1, batch_group_count: int = 1,
                precision: Any = None, preferred_element_type: Any = None,
                float32_pointwise: bool = False,
                float32_result: bool = False) -> jax.Array:  # fmt: skip
    """``lax.conv_general_dilated`` (the same arguments and result), computing two kinds of
    NHWC convolutions as 2-D products, where XLA's CPU backend is slow:

    - 1x1 ones, as a strided slice and a product over channels. The gain is in the backward
      pass: XLA computes a convolution's kernel gradient as a convolution over transposed
      activations and fuses their producers (BatchNorm, residual adds, ReLU) into the
      transpose, which then dominates a ResNet step; a product's kernel gradient is a plain
      transposed matmul.
    - ones whose output maps have at most 2x2 pixels, as the product of the padded windows
      (:func:`patches_as_dot`): XLA computes their input gradient through a reversed-kernel
      convolution 50-80x slower (a ResNet's last stage at 64 px: 3x3 over 2x2 maps, 512
      channels, 0.3 s for batch 32 against 4 ms), and inside a loop in a generic loop nest
      (:func:`nhwc_convolution`).

    Other ones are :func:`nhwc_convolution` on CPU.

    One output pixel in all (batch 1, a 1x1 output) stays a convolution: the TFLite converter
    turns a one-row product into a batch_matmul of the wrong rank. ``float32_pointwise``: a
    bfloat16 1x1 convolution returns its float32 accumulator instead of rounding it, for a
    consumer that computes in float32 anyway (BatchNorm): one conversion pass and one rounding
    less. ``float32_result``: every bfloat16 convolution returns its float32 accumulator (see
    :func:`conv_layer`); float32 ones are unchanged.
    """
    if float32_result and preferred_element_type is None and jnp.finfo(lhs.dtype).bits < 32:
        float32_pointwise = True  # the 1x1 product's accumulator
    else:
        float32_result = False
    plain = (
        lhs.ndim == rhs.ndim == 4
        and dimension_numbers in (_nhwc_numbers(lhs, rhs), ("NHWC", "HWIO", "NHWC"))
        and feature_group_count == batch_group_count == 1
        and all(d == 1 for d in (*(lhs_dilation or ()), *(rhs_dilation or ())))
    )
    if plain:
        pads = padding
        if isinstance(padding, str):
            pads = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], window_strides, padding)
        pads = tuple(tuple(p) for p in pads)
        rounded = preferred_element_type is None  # as the convolution's result
        several = _several_rows(lhs, rhs, window_strides, pads)
        if several and rhs.shape[:2] == (1, 1) and pads == ((0, 0), (0, 0)):
            sh, sw = window_strides
            x = lhs[:, ::sh, ::sw, :] if (sh, sw) != (1, 1) else lhs
            y = _matrix_product(x, rhs[0, 0], precision, preferred_element_type)
            return y.astype(x.dtype) if rounded and not float32_pointwise else y
        out = [(n + sum(p) - k) // s + 1 for n, p, k, s in
               zip(lhs.shape[1:3], pads, rhs.shape[:2], window_strides, strict=True)]  # fmt: skip
        if several and max(out) <= 2 and min(map(min, pads)) >= 0:
            y = patches_as_dot(lhs, rhs, pads, precision, preferred_element_type, window_strides)
            return y.astype(lhs.dtype) if rounded and not float32_result else y
    if float32_result:
        preferred_element_type = jnp.float32
    return _convolution(
        lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
        feature_group_count, batch_group_count, precision, preferred_element_type,
    )  # fmt: skip


def _nhwc_numbers(lhs: jax.Array, rhs: jax.Array) -> lax.ConvDimensionNumbers:
    """The dimension numbers of an NHWC x HWIO convolution of ``lhs`` and ``rhs`` (rank 4)."""
    return lax.conv_dimension_numbers(lhs.shape, rhs.shape, ("NHWC", "HWIO", "NHWC"))


def _convolution(lhs: jax.Array, rhs: jax.Array, window_strides: Sequence[int],
                 padding: str | Sequence[tuple[int, int]], lhs_dilation: Any = None,
                 rhs_dilation: Any = None, dimension_numbers: Any = None,
                 feature_group_count: int = 1, batch_group_count: int = 1,
                 precision: Any = None,
                 preferred_element_type: Any = None) -> jax.Array:  # fmt: skip
    """``lax.conv_general_dilated``; on CPU, an ungrouped NHWC x HWIO convolution without input
    dilation is :func:`nhwc_convolution`, whose gradients XLA's CPU backend runs fast inside
    loops too."""
    canonical = (
        jax.default_backend() == "cpu"
        and lhs.ndim == rhs.ndim == 4
        and dimension_numbers in (_nhwc_numbers(lhs, rhs), ("NHWC", "HWIO", "NHWC"))
        and feature_group_count == batch_group_count == 1
        and all(d == 1 for d in lhs_dilation or ())
    )
    if not canonical:
        return lax.conv_general_dilated(
            lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
            feature_group_count, batch_group_count, precision, preferred_element_type,
        )  # fmt: skip
    pads = padding
    if isinstance(padding, str):
        dilation = rhs_dilation or (1, 1)
        dilated = [(k - 1) * d + 1 for k, d in zip(rhs.shape[:2], dilation, strict=True)]
        pads = lax.padtype_to_pads(lhs.shape[1:3], dilated, window_strides, padding)
    layout = ConvLayout(
        tuple(int(s) for s in window_strides),
        tuple(tuple(int(p) for p in pad) for pad in pads),
        tuple(int(d) for d in rhs_dilation or (1, 1)),
        tuple(precision) if isinstance(precision, list) else precision,  # (hashable)
        None if preferred_element_type is None else jnp.dtype(preferred_element_type),
    )
    return checkpoint_name(nhwc_convolution(lhs, rhs, layout), CONVOLUTION)


class ConvLayout(NamedTuple):
    """The static arguments of :func:`nhwc_convolution`."""

    strides: tuple[int, int]
    pads: tuple[tuple[int, int], tuple[int, int]]
    kernel_dilation: tuple[int, int]
    precision: Any = None
    preferred_element_type: Any = None


def _conv(lhs: jax.Array, rhs: jax.Array, strides: Any, pads: Any, lhs_dilation: Any,
          rhs_dilation: Any, layout: ConvLayout) -> jax.Array:  # fmt: skip
    """An NHWC x HWIO convolution at ``layout``'s precision and result type."""
    return lax.conv_general_dilated(
        lhs, rhs, strides, pads, lhs_dilation, rhs_dilation, ("NHWC", "HWIO", "NHWC"),
        precision=layout.precision, preferred_element_type=layout.preferred_element_type,
    )  # fmt: skip


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def nhwc_convolution(lhs: jax.Array, rhs: jax.Array, layout: ConvLayout) -> jax.Array:
    """``lax.conv_general_dilated`` of NHWC ``lhs`` and HWIO ``rhs`` at ``layout``, with both
    gradients written as NHWC x HWIO convolutions over explicitly transposed operands.

    XLA's CPU backend hands a convolution to its fast (Eigen) kernel only in that form. JAX's
    gradients are convolutions in other dimension orders, which XLA's CPU compiler transposes
    into that form in the program's entry computation only: inside a loop (the micro-batches of
    gradient accumulation, a ``lax.scan``) they ran through a generic loop nest, a ResNet step
    tens of times slower. The gradients are JAX's (the same sums); with a low-precision result
    type the cotangent is cast to the operands' dtype, as :func:`low_precision_dot`.
    """
    return _conv(lhs, rhs, layout.strides, layout.pads, None, layout.kernel_dilation, layout)


def _nhwc_convolution_fwd(lhs, rhs, layout):
    return nhwc_convolution(lhs, rhs, layout), (lhs, rhs)


def _nhwc_convolution_bwd(layout, residuals, g):
    lhs, rhs = residuals
    if not g.size:  # an empty output: no window to convolve with
        return jnp.zeros_like(lhs), jnp.zeros_like(rhs)
    g = g.astype(lhs.dtype) if layout.preferred_element_type is not None else g
    dilated = [(k - 1) * d + 1 for k, d in zip(rhs.shape[:2], layout.kernel_dilation, strict=True)]
    sizes = list(zip(dilated, layout.pads, lhs.shape[1:3], g.shape[1:3], layout.strides,
                     strict=True))  # fmt: skip
    # lhs: g dilated by the strides, padded back to the input, times the flipped kernel (I<->O).
    lhs_pads = [(e - 1 - lo, n - 1 - (o - 1) * s + lo) for e, (lo, _), n, o, s in sizes]
    flipped = jnp.swapaxes(rhs[::-1, ::-1], 2, 3).astype(g.dtype)
    g_lhs = _conv(g, flipped, (1, 1), lhs_pads, layout.strides, layout.kernel_dilation, layout)
    # rhs: channels as the batch and the batch as channels: (C, H, W, B) x (h, w, B, O).
    rhs_pads = [(lo, e + (o - 1) * s - n - lo) for e, (lo, _), n, o, s in sizes]
    x = jnp.transpose(lhs, (3, 1, 2, 0)).astype(g.dtype)
    g_rhs = _conv(x, jnp.transpose(g, (1, 2, 0, 3)), layout.kernel_dilation, rhs_pads, None,
                  layout.strides, layout)  # fmt: skip
    g_rhs = jnp.transpose(g_rhs, (1, 2, 0, 3))
    return g_lhs.astype(lhs.dtype), g_rhs.astype(rhs.dtype)


nhwc_convolution.defvjp(_nhwc_convolution_fwd, _nhwc_convolution_bwd)


def _several_rows(
    lhs: jax.Array, rhs: jax.Array, strides: Sequence[int], pads: Sequence[Sequence[int]]
) -> bool:
    """Whether a convolution has more than one output pixel in all, batch included; a symbolic
    batch (a batch-polymorphic export, which the TFLite converter never sees) counts as
    several."""
    sizes = zip(lhs.shape[1:3], pads, rhs.shape[:2], strides, strict=True)
    pixels = math.prod(max((n + sum(p) - k) // s + 1, 0) for n, p, k, s in sizes)
    if jax.export.is_symbolic_dim(lhs.shape[0]):
        return pixels > 0
    return lhs.shape[0] * pixels > 1


def _matrix_product(
    x: jax.Array, kernel: jax.Array, precision: Any, preferred_element_type: Any
) -> jax.Array:
    """``x`` (..., C) times ``kernel`` (C, out) as one 2-D product over rows: the kernel
    gradient of a product contracting (N, H, W) at once goes through a transposed copy of the
    cotangent, into which XLA fuses the BatchNorm backward pass. Two bfloat16 operands give
    the float32 accumulator (:func:`dot`)."""
    x2d, dims = x.reshape(-1, x.shape[-1]), (((1,), (0,)), ((), ()))
    if x.dtype == kernel.dtype == jnp.bfloat16 and preferred_element_type is None:
        y = dot(x2d, kernel, dims)
    else:
        y = lax.dot_general(
            x2d, kernel, dims, precision, preferred_element_type=preferred_element_type
        )
    return y.reshape(*x.shape[:-1], kernel.shape[-1])


def patches_as_dot(
    lhs: jax.Array, rhs: jax.Array, pads: Sequence[Sequence[int]], precision: Any = None,
    preferred_element_type: Any = None, strides: Sequence[int] = (1, 1),
) -> jax.Array:  # fmt: skip
    """An NHWC x HWIO convolution padded by ``pads`` as one product: the padded input's
    windows side by side over channels (kh * kw * C columns) times the kernel as a
    (kh * kw * C, out) matrix (float32 for bfloat16 operands, as :func:`dot`). Worth it only for
    small maps (the columns copy the input up to kh * kw times)."""
    kh, kw, cin, cout = rhs.shape
    sh, sw = strides
    x = jnp.pad(lhs, ((0, 0), *map(tuple, pads), (0, 0)))
    oh, ow = (x.shape[1] - kh) // sh + 1, (x.shape[2] - kw) // sw + 1
    columns = jnp.concatenate(
        [x[:, i : i + (oh - 1) * sh + 1 : sh, j : j + (ow - 1) * sw + 1 : sw, :]
         for i in range(kh) for j in range(kw)], axis=-1,
    )  # fmt: skip
    kernel = rhs.reshape(kh * kw * cin, cout)
    return _matrix_product(columns, kernel, precision, preferred_element_type)


def conv_general_dilated(dtype: Any) -> Callable[..., jax.Array]:
    """``lax.conv_general_dilated`` for Flax's ``conv_general_dilated=`` field, returning float32
    for a low-precision ``dtype`` (as ``dot_general``); on CPU :func:`nhwc_convolution`."""
    if jnp.dtype(dtype) == jnp.float32:
        return _convolution
    return functools.partial(_convolution, preferred_element_type=jnp.float32)


def conv_layer(dtype: Any) -> Callable[..., jax.Array]:
    """:func:`conv_as_dot` for Flax's ``conv_general_dilated=`` field of a convolution with a
    bias in compute dtype ``dtype``: for a low-precision ``dtype`` it returns the float32
    accumulator (``float32_result``), so the layer adds its bias in float32 and the caller casts
    the layer's output to ``dtype``, as :func:`dot_general`. Added in bfloat16, the bias's
    gradient is a bfloat16 sum over batch x height x width, which XLA's CPU backend accumulates
    in bfloat16: over a 128x128 map it stalls at a fraction of the float32 sum. In float32 it is
    :func:`conv_as_dot` itself."""
    if jnp.dtype(dtype) == jnp.float32:
        return conv_as_dot
    return functools.partial(conv_as_dot, float32_result=True)
