"""The compute kernels behind the performance work: 1x1 convolutions as dots, exact GELU, the
per-step XLA options, float32 bias gradients under bfloat16 compute, and float32 layer
products over rows."""

from __future__ import annotations

import logging
import math
import pathlib
import re
import shutil
import subprocess
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from vision_jax import compile_options
from vision_jax.compile_options import step_compiler_options
from vision_jax.models import create_model, precision
from vision_jax.models.vit import gelu_exact

NHWC = ("NHWC", "HWIO", "NHWC")


@pytest.mark.parametrize(
    "hw, stride, padding",
    [(8, 1, "VALID"), (9, 2, "VALID"), (7, 2, "SAME"), (8, 2, ((0, 0), (0, 0)))],
)
def test_pointwise_conv_as_dot_matches_convolution_and_its_gradients(hw, stride, padding):
    x = jax.random.normal(jax.random.key(0), (2, hw, hw, 5))
    w = jax.random.normal(jax.random.key(1), (1, 1, 5, 4))

    def loss(conv):
        strides = (stride, stride)
        return lambda x, w: jnp.sum(jnp.tanh(conv(x, w, strides, padding, None, None, NHWC)))

    for got, want in zip(
        jax.grad(loss(precision.conv_as_dot), argnums=(0, 1))(x, w),
        jax.grad(loss(lax.conv_general_dilated), argnums=(0, 1))(x, w),
        strict=True,
    ):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    out = precision.conv_as_dot(x, w, (stride, stride), padding, None, None, NHWC)
    ref = lax.conv_general_dilated(x, w, (stride, stride), padding, None, None, NHWC)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    hlo = jax.jit(loss(precision.conv_as_dot)).lower(x, w).as_text()
    assert "convolution" not in hlo and "dot_general" in hlo


@pytest.mark.parametrize(
    "hw, kernel, padding, stride",
    [
        ((2, 2), 3, "SAME", 1),
        ((1, 1), 3, ((1, 1), (1, 1)), 1),
        ((2, 1), 3, "SAME", 1),
        ((2, 2), 2, "VALID", 1),
        ((4, 4), 3, ((1, 1), (1, 1)), 2),
        ((3, 4), 3, "SAME", 2),
        ((2, 2), 2, "SAME", 2),
        ((5, 5), 3, "VALID", 3),
    ],
)
def test_convolutions_into_maps_of_two_pixels_are_products_with_the_same_values(
    hw, kernel, padding, stride
):
    """A ResNet's last stage at 64 px convolves into 2x2 maps, which XLA's CPU backend does
    50-80x slower than the product of the padded windows: values and both gradients equal the
    convolution's; the bfloat16 result is bfloat16, as the convolution's."""
    x = jax.random.normal(jax.random.key(0), (3, *hw, 6))
    w = jax.random.normal(jax.random.key(1), (kernel, kernel, 6, 5))
    strides = (stride, stride)

    def loss(conv):
        return lambda x, w: jnp.sum(jnp.tanh(conv(x, w, strides, padding, None, None, NHWC)))

    for got, want in zip(
        jax.grad(loss(precision.conv_as_dot), argnums=(0, 1))(x, w),
        jax.grad(loss(lax.conv_general_dilated), argnums=(0, 1))(x, w),
        strict=True,
    ):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    out = precision.conv_as_dot(x, w, strides, padding, None, None, NHWC)
    want = lax.conv_general_dilated(x, w, strides, padding, None, None, NHWC)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
    hlo = jax.jit(loss(precision.conv_as_dot)).lower(x, w).as_text()
    assert "convolution" not in hlo and "dot_general" in hlo
    low = precision.conv_as_dot(
        x.astype(jnp.bfloat16), w.astype(jnp.bfloat16), strides, padding, None, None, NHWC
    )
    assert low.dtype == jnp.bfloat16
    np.testing.assert_allclose(low.astype(np.float32), out, rtol=0.05, atol=0.1)


def test_larger_maps_strides_and_single_pixel_outputs_stay_convolutions():
    w = jax.random.normal(jax.random.key(1), (3, 3, 4, 4))
    cases = [((2, 3, 3, 4), (1, 1), "SAME"), ((2, 6, 6, 4), (2, 2), "SAME"),
             ((1, 1, 1, 4), (1, 1), "SAME"), ((3, 1, 1, 4), (1, 1), "VALID")]  # fmt: skip
    for shape, strides, padding in cases:  # the last one's output is empty, as lax's
        x = jax.random.normal(jax.random.key(0), shape)
        args = (x, w, strides, padding, None, None, NHWC)
        np.testing.assert_array_equal(precision.conv_as_dot(*args), lax.conv_general_dilated(*args))
        hlo = jax.jit(precision.conv_as_dot, static_argnums=(2, 3, 4, 5, 6)).lower(*args)
        assert "convolution" in hlo.as_text()


def test_other_convolutions_stay_convolutions():
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
    w3 = jax.random.normal(jax.random.key(1), (3, 3, 3, 4))
    w1 = jax.random.normal(jax.random.key(2), (1, 1, 3, 4))
    cases = [(w3, "SAME", None), (w1, ((1, 1), (1, 1)), None), (w1, "VALID", (2, 2))]
    for w, padding, rhs_dilation in cases:
        args = (x, w, (1, 1), padding, None, rhs_dilation, NHWC)
        np.testing.assert_array_equal(precision.conv_as_dot(*args), lax.conv_general_dilated(*args))
        hlo = jax.jit(precision.conv_as_dot, static_argnums=(2, 3, 4, 5, 6)).lower(*args)
        assert "convolution" in hlo.as_text()


CONVOLUTIONS = [  # (input, kernel, strides, padding, kernel dilation)
    ((2, 8, 9, 3), (3, 3, 3, 5), (1, 1), "SAME", (1, 1)),
    ((2, 9, 9, 3), (3, 3, 3, 5), (2, 2), ((1, 1), (1, 1)), (1, 1)),  # rows left over
    ((1, 15, 14, 3), (7, 7, 3, 4), (2, 2), ((3, 3), (3, 3)), (1, 1)),  # a ResNet stem
    ((2, 32, 48, 3), (16, 16, 3, 4), (16, 16), "VALID", (1, 1)),  # a ViT patch embedding
    ((2, 10, 11, 3), (3, 3, 3, 2), (1, 1), "SAME", (2, 2)),
    ((1, 11, 12, 2), (3, 2, 2, 3), (2, 3), ((0, 2), (1, 0)), (1, 1)),  # uneven everything
    ((2, 12, 12, 2), (4, 4, 2, 3), (3, 3), ((2, 1), (0, 0)), (2, 1)),
]


@pytest.mark.parametrize("x_shape, w_shape, strides, padding, dilation", CONVOLUTIONS)
def test_nhwc_convolution_gradients_equal_jax_gradients(x_shape, w_shape, strides, padding,
                                                        dilation):  # fmt: skip
    """The convolution whose gradients are written in XLA's fast CPU form has JAX's value and
    gradients (of ``lax.conv_general_dilated``), float32 and bfloat16 alike."""
    x = jax.random.normal(jax.random.key(0), x_shape)
    w = jax.random.normal(jax.random.key(1), w_shape)

    def loss(conv, **kwargs):
        args = (strides, padding, None, dilation, NHWC)
        return lambda x, w: jnp.sum(jnp.sin(conv(x, w, *args, **kwargs).astype(jnp.float32)))

    for dtype, kwargs in [(jnp.float32, {}), (jnp.bfloat16, {}),
                          (jnp.bfloat16, {"preferred_element_type": jnp.float32})]:  # fmt: skip
        a, b = x.astype(dtype), w.astype(dtype)
        got = jax.jit(jax.value_and_grad(loss(precision._convolution, **kwargs), (0, 1)))(a, b)
        exact = loss(lax.conv_general_dilated)
        want = jax.value_and_grad(exact, (0, 1))(a.astype(jnp.float32), b.astype(jnp.float32))
        tol = 1e-5 if dtype == jnp.float32 else 2**-6
        for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            assert g.dtype == (jnp.float32 if g.ndim == 0 else dtype)
            r = np.asarray(r, np.float32)
            np.testing.assert_allclose(np.asarray(g, np.float32), r, atol=tol * np.abs(r).max())


def test_convolutions_of_any_output_rank_and_precision_as_lax():
    """An empty output has zero gradients, a 1-D convolution and a list of precisions pass
    through (each failed: a window of size 0, the NHWC numbers of a rank-3 input, an unhashable
    static argument)."""
    x, w = jnp.ones((2, 2, 2, 3)), jnp.ones((3, 3, 3, 4))
    for conv in (precision.conv_as_dot, precision.conv_general_dilated(jnp.float32)):
        empty = lambda x, w, conv=conv: conv(x, w, (1, 1), "VALID", None, None, NHWC).sum()
        assert [float(jnp.abs(g).sum()) for g in jax.grad(empty, (0, 1))(x, w)] == [0.0, 0.0]
        x1, w1 = jnp.ones((2, 5, 3)), jnp.ones((3, 3, 4))
        want = lax.conv_general_dilated(x1, w1, (1,), "SAME", None, None, ("NWC", "WIO", "NWC"))
        got = conv(x1, w1, (1,), "SAME", None, None, ("NWC", "WIO", "NWC"))
        np.testing.assert_array_equal(got, want)
        highest = [lax.Precision.HIGHEST] * 2
        y = conv(jnp.ones((2, 4, 4, 3)), w, (1, 1), "SAME", None, None, NHWC, precision=highest)
        assert y.shape == (2, 4, 4, 4)


def test_convolution_gradients_inside_a_loop_run_in_the_fast_form():
    """Inside a ``lax.scan`` (gradient accumulation's micro-batches) every convolution of a
    ResNet's gradient is in the one form XLA's CPU backend runs with its fast kernel (NHWC
    input, HWIO kernel); JAX's own gradients there are left in other forms, tens of times
    slower."""
    from vision_jax.models.cifar_resnet import CifarResNet

    model = CifarResNet(num_classes=3, stage_sizes=(1, 1, 1))
    x = jnp.zeros((2, 3, 8, 8, 3))
    variables = model.init(jax.random.key(0), x[0])

    def loss_sum(params):
        def micro(total, images):
            logits, _ = model.apply(
                {**variables, "params": params}, images, train=True, mutable=["batch_stats"]
            )
            return total + logits.sum(), None

        return jax.lax.scan(micro, jnp.zeros(()), x)[0]

    compiled = jax.jit(jax.grad(loss_sum)).lower(variables["params"]).compile().as_text()
    forms = set(re.findall(r"convolution\(.*dim_labels=([\w>-]+)", compiled))
    assert forms == {"b01f_01io->b01f"}


def test_gelu_exact_matches_the_erf_definition():
    x = np.linspace(-8, 8, 1601, dtype=np.float32)
    want = np.array([0.5 * v * (1 + math.erf(v / math.sqrt(2))) for v in x.astype(np.float64)])
    np.testing.assert_allclose(gelu_exact(jnp.asarray(x)), want, rtol=1e-6, atol=1e-6)
    # d/dx gelu = Phi(x) + x * phi(x)
    dwant = np.array(
        [0.5 * (1 + math.erf(v / math.sqrt(2))) + v * math.exp(-v * v / 2) / math.sqrt(2 * math.pi)
         for v in x.astype(np.float64)]
    )  # fmt: skip
    np.testing.assert_allclose(jax.vmap(jax.grad(gelu_exact))(x), dwant, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="CPU compiler options")
def test_cpu_step_options_keep_convolutions_out_of_ynnpack():
    assert step_compiler_options(jnp.float32) == {
        "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE"
    }
    bf16 = step_compiler_options(jnp.bfloat16)["xla_cpu_experimental_ynn_fusion_type"]
    assert bf16.split(",") == ["LIBRARY_FUSION_TYPE_REDUCE", "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"]
    x = jax.random.normal(jax.random.key(0), (2, 16, 16, 8))
    w = jax.random.normal(jax.random.key(1), (3, 3, 8, 8))

    def conv(x, w):
        return lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=NHWC)

    with_options = jax.jit(conv, compiler_options=step_compiler_options(jnp.float32))
    hlo = with_options.lower(x, w).compile().as_text()
    assert "convolution(" in hlo and "__ynn_fusion" not in hlo
    np.testing.assert_allclose(with_options(x, w), jax.jit(conv)(x, w), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="CPU compiler options")
@pytest.mark.parametrize(
    "flags, warned",
    [({"avx512f", "avx512_vnni"}, True), ({"avx512f", "avx512_bf16"}, False),
     ({"amx_bf16"}, False), ({"asimd", "bf16"}, False), (None, False)],
)  # fmt: skip
def test_bfloat16_steps_warn_on_a_cpu_without_bfloat16_instructions(
    monkeypatch, caplog, flags, warned
):
    monkeypatch.setattr(compile_options, "cpu_flags", lambda: flags and frozenset(flags))
    compile_options._warn_of_bfloat16_emulation.cache_clear()
    with caplog.at_level(logging.WARNING, logger=compile_options.__name__):
        step_compiler_options(jnp.float32)
        assert not caplog.records
        step_compiler_options(jnp.bfloat16)
        step_compiler_options(jnp.bfloat16)
    assert len(caplog.records) == int(warned)  # once per process
    compile_options._warn_of_bfloat16_emulation.cache_clear()


@pytest.mark.skipif(not pathlib.Path("/proc/cpuinfo").exists(), reason="Linux's CPU flags")
def test_cpu_flags_are_linux_flags():
    """The flags as Linux lists them, against lscpu's where there is one."""
    flags = compile_options.cpu_flags()
    assert flags
    lscpu = shutil.which("lscpu")
    if lscpu:
        out = subprocess.run([lscpu], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Flags:"):
                assert set(line.split()[1:]) == flags


@pytest.mark.parametrize("representation_size", [None, 8])
def test_bfloat16_vit_bias_gradients_are_float32_reductions(representation_size):
    """Bias adds happen on the float32 accumulator, so no bias gradient reduces bfloat16 (the
    pre-logits layer's included)."""
    model = create_model(
        "vit_ti16", num_classes=3, dtype=jnp.bfloat16, depth=1,
        representation_size=representation_size,
    )  # fmt: skip
    x = jnp.ones((2, 32, 32, 3))
    variables = model.init(jax.random.key(0), x)

    def loss(params):
        return jnp.sum(model.apply({"params": params}, x).astype(jnp.float32) ** 2)

    hlo = jax.jit(jax.grad(loss)).lower(variables["params"]).as_text()
    bf16_reductions = [ln for ln in hlo.splitlines() if "reduce" in ln and "tensor<bf16>" in ln]
    assert not bf16_reductions, bf16_reductions[:3]


LOW_PRECISION_DOTS = [
    ((4, 5), (5, 6), (((1,), (0,)), ((), ()))),  # Dense
    ((2, 7, 3, 4), (2, 9, 3, 4), (((3,), (3,)), ((0, 2), (0, 2)))),  # attention logits
    ((2, 3, 7, 9), (2, 9, 3, 4), (((3,), (1,)), ((0, 1), (0, 2)))),  # attention x values
    ((3, 5, 8), (5, 8, 6), (((1, 2), (0, 1)), ((), ()))),  # DenseGeneral over two axes
    ((3, 5, 8), (8, 5, 6), (((2, 1), (0, 1)), ((), ()))),  # contracted axes out of order
    ((3, 5, 8), (6, 8), (((2,), (1,)), ((), ()))),  # x @ w.T: a kernel gradient kept (6, 8)
]


@pytest.mark.parametrize("lhs_shape, rhs_shape, dims", LOW_PRECISION_DOTS)
def test_low_precision_dot_gradients_match_float32_products(lhs_shape, rhs_shape, dims):
    """bfloat16 gradients (computed with bfloat16 operands, float32 accumulation) equal the
    float32 product's gradients to bfloat16 rounding, in every layout the models use."""
    lhs = jax.random.normal(jax.random.key(0), lhs_shape).astype(jnp.bfloat16)
    rhs = jax.random.normal(jax.random.key(1), rhs_shape).astype(jnp.bfloat16)

    def loss(product, a, b):
        return jnp.sum(jnp.sin(product(a, b)))

    def exact(a, b):
        return lax.dot_general(a.astype(jnp.float32), b.astype(jnp.float32), dims)

    options = step_compiler_options(jnp.bfloat16)
    grads = jax.jit(jax.grad(lambda a, b: loss(lambda x, y: precision.dot(x, y, dims), a, b),
                             argnums=(0, 1)), compiler_options=options)(lhs, rhs)  # fmt: skip
    expected = jax.jit(jax.grad(lambda a, b: loss(exact, a, b), argnums=(0, 1)))(lhs, rhs)
    for got, want in zip(grads, expected, strict=True):
        assert got.dtype == jnp.bfloat16
        want = np.asarray(want, np.float32)
        np.testing.assert_allclose(
            np.asarray(got, np.float32), want, atol=2**-7 * np.abs(want).max()
        )


def test_bfloat16_backward_products_take_bfloat16_operands():
    """No float32 x float32 product is left in a bfloat16 ViT's gradient (JAX's own rule would
    run the whole backward pass in float32)."""
    model = create_model("vit_ti16", num_classes=3, dtype=jnp.bfloat16, depth=1)
    x = jnp.zeros((1, 32, 32, 3))
    params = model.init(jax.random.key(0), x)["params"]
    grad = jax.grad(lambda p: model.apply({"params": p}, x).sum())
    hlo = jax.jit(grad).lower(params).as_text()
    dots = [line for line in hlo.splitlines() if "stablehlo.dot_general" in line]
    assert dots and not [d for d in dots if "xf32>, tensor<" in d.split(":")[-1].split("->")[0]]


def test_bfloat16_dot_general_keeps_the_layers_precision_for_float32_operands():
    """A layer's ``precision=`` reaches the product when its operands are not both bfloat16."""
    dims = (((1,), (0,)), ((), ()))
    x, w = jnp.ones((2, 3)), jnp.ones((3, 4))
    jaxpr = jax.make_jaxpr(
        lambda x, w: precision.dot_general(jnp.bfloat16)(x, w, dims, lax.Precision.HIGHEST)
    )(x, w)
    assert "precision=(Precision.HIGHEST, Precision.HIGHEST)" in str(jaxpr)


def test_bfloat16_pointwise_convolutions_accumulate_in_float32():
    """A bfloat16 1x1 convolution as a dot multiplies bfloat16 operands, accumulates in float32
    and rounds once: within bfloat16 rounding of the float32 convolution, value and gradients."""
    x = jax.random.normal(jax.random.key(0), (2, 6, 6, 256))
    w = jax.random.normal(jax.random.key(1), (1, 1, 256, 8)) / 16

    def loss(x, w):
        out = precision.conv_as_dot(x, w, (1, 1), "VALID", None, None, NHWC)
        return jnp.sum(jnp.sin(out.astype(jnp.float32)))

    low = [x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)]
    high = [a.astype(jnp.float32) for a in low]  # the same rounded operands in float32
    out = precision.conv_as_dot(*low, (1, 1), "VALID", None, None, NHWC)
    ref = lax.conv_general_dilated(*high, (1, 1), "VALID", None, None, NHWC)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), ref, rtol=2**-8, atol=1e-6)
    for got, want in zip(jax.grad(loss, (0, 1))(*low), jax.grad(loss, (0, 1))(*high), strict=True):
        assert got.dtype == jnp.bfloat16
        scale = np.abs(want).max()
        np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=2**-7 * scale)
    # Every product, forward and backward, takes bfloat16 operands and returns float32.
    hlo = jax.jit(jax.grad(loss, (0, 1))).lower(*low).as_text()
    dots = [line for line in hlo.splitlines() if "stablehlo.dot_general" in line]
    signatures = {re.sub(r"\d+x", "", line.split(" : ")[-1]) for line in dots}
    assert dots and signatures == {"(tensor<bf16>, tensor<bf16>) -> tensor<f32>"}, signatures


def test_float32_pointwise_returns_the_accumulator():
    """``float32_pointwise``: a bfloat16 1x1 convolution returns the float32 product unrounded;
    other convolutions and float32 ones are unchanged."""
    x = jax.random.normal(jax.random.key(0), (2, 6, 6, 64), jnp.bfloat16)
    w = jax.random.normal(jax.random.key(1), (1, 1, 64, 8), jnp.bfloat16)
    out = precision.conv_as_dot(x, w, (2, 2), "VALID", None, None, NHWC, float32_pointwise=True)
    want = lax.dot_general(
        x[:, ::2, ::2].reshape(-1, 64), w[0, 0], (((1,), (0,)), ((), ())),
        preferred_element_type=jnp.float32,
    ).reshape(2, 3, 3, 8)  # fmt: skip
    assert out.dtype == jnp.float32
    np.testing.assert_array_equal(out, want)
    rounded = precision.conv_as_dot(x, w, (2, 2), "VALID", None, None, NHWC)
    np.testing.assert_array_equal(rounded, want.astype(jnp.bfloat16))
    w3 = jax.random.normal(jax.random.key(2), (3, 3, 64, 8), jnp.bfloat16)
    args = (x, w3, (1, 1), "SAME", None, None, NHWC)
    assert precision.conv_as_dot(*args, float32_pointwise=True).dtype == jnp.bfloat16
    assert precision.conv_as_dot(
        x.astype(jnp.float32), w.astype(jnp.float32), (1, 1), "VALID", None, None, NHWC,
        float32_pointwise=True,
    ).dtype == jnp.float32  # fmt: skip


@pytest.mark.slow
def test_bfloat16_resnet_feeds_its_batch_norms_float32_products():
    """A bfloat16 bottleneck ResNet in training: its 1x1 convolutions hand BatchNorm their
    float32 accumulators (3x3 ones round to bfloat16), and its loss and gradients stay within
    bfloat16 tolerance of the float32 model's."""
    from vision_jax.models.resnet import ResNet

    x = jax.random.normal(jax.random.key(0), (4, 32, 32, 3))
    labels = jnp.arange(4) % 10

    def run(dtype):
        model = ResNet(num_classes=10, stage_sizes=(1, 1), dtype=dtype)
        variables = model.init(jax.random.key(1), x[:1])

        def loss(params):
            (logits, state) = model.apply(
                {**variables, "params": params}, x, train=True,
                mutable=["batch_stats", "intermediates"], capture_intermediates=True,
            )  # fmt: skip
            one_hot = jax.nn.one_hot(labels, 10)
            return -jnp.mean(
                jnp.sum(jax.nn.log_softmax(logits.astype(jnp.float32)) * one_hot, -1)
            ), state

        (value, state), grads = jax.value_and_grad(loss, has_aux=True)(variables["params"])
        return value, grads, state["intermediates"]

    value, grads, inter = run(jnp.bfloat16)
    block = inter["layer1"]["0"]
    assert block["conv1"]["__call__"][0].dtype == jnp.float32  # 1x1
    assert block["conv3"]["__call__"][0].dtype == jnp.float32
    assert block["downsample_conv"]["__call__"][0].dtype == jnp.float32
    assert block["conv2"]["__call__"][0].dtype == jnp.bfloat16  # 3x3
    ref_value, ref_grads, _ = run(jnp.float32)
    np.testing.assert_allclose(value, ref_value, rtol=2e-2)
    for ref, g in zip(jax.tree.leaves(ref_grads), jax.tree.leaves(grads), strict=True):
        assert g.dtype == jnp.float32
        np.testing.assert_allclose(g, ref, atol=0.1 * np.abs(ref).max())


def test_pointwise_kernel_gradient_needs_no_transposed_cotangent():
    """A 1x1 convolution followed by BatchNorm: the compiled kernel gradient reads the cotangent
    as laid out, with no (channels, pixels) copy for XLA to fuse the BatchNorm backward into
    (that copy was the largest item of a ResNet-50 train step)."""
    x = jax.random.normal(jax.random.key(0), (4, 6, 6, 16))
    w = jax.random.normal(jax.random.key(1), (1, 1, 16, 24))

    def loss(w):
        y = precision.conv_as_dot(x, w, (1, 1), "VALID", None, None, NHWC)
        y = (y - y.mean((0, 1, 2))) * lax.rsqrt(y.var((0, 1, 2)) + 1e-5)
        return jnp.sum(jax.nn.relu(y) ** 2)

    grad = jax.jit(jax.grad(loss), compiler_options=step_compiler_options(jnp.float32))
    hlo = grad.lower(w).compile().as_text()
    assert re.search(r"= f32\[4,6,6,24\]|= f32\[144,24\]", hlo)  # the cotangent, as laid out
    transposed = re.findall(r"%\S+ = f32\[24,144\]\S* (?:fusion|copy|transpose)\(", hlo)
    assert not transposed, transposed


class _Mlp(nn.Module):
    """Two Dense layers over (batch, tokens, features), as a ViT's MLP block."""

    dot_general: Any

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        hidden = nn.Dense(48, dot_general=self.dot_general)(x)
        return nn.Dense(16, dot_general=self.dot_general)(gelu_exact(hidden))


def test_float32_layer_products_need_no_transposed_cotangent():
    """Dense layers over (batch, tokens, features) compute their kernel gradients from the
    cotangents as laid out; a 3-D product's kernel gradient went through a (features, rows)
    copy of each (the MLP's was the largest single item of a ViT-Ti/16 step at 112 px).
    Values and gradients are unchanged."""
    x = jax.random.normal(jax.random.key(0), (4, 10, 16))
    layer_product, plain = _Mlp(precision.dot_general(jnp.float32)), _Mlp(lax.dot_general)
    params = plain.init(jax.random.key(1), x)

    def grad(model):
        loss = lambda p: jnp.sum(model.apply(p, x) ** 2)
        return jax.jit(jax.grad(loss), compiler_options=step_compiler_options(jnp.float32))

    np.testing.assert_allclose(layer_product.apply(params, x), plain.apply(params, x), rtol=1e-6)
    compiled = grad(layer_product).lower(params).compile()
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
        compiled(params),
        grad(plain)(params),
    )
    hlo = compiled.as_text()
    transposed = re.findall(r"%\S+ = f32\[(?:16|48),40\]\S* (?:fusion|copy|transpose)\(", hlo)
    assert not transposed, transposed


def test_layer_product_leaves_other_products_alone():
    """Batched products (attention) and already 2-D ones are passed through as given; a
    kernel over several output axes gives the product in its shape."""
    product = precision.layer_product(lax.dot_general)
    q, k = jnp.ones((2, 5, 3, 4)), jnp.ones((2, 6, 3, 4))
    batched = (((3,), (3,)), ((0, 2), (0, 2)))
    assert "reshape" not in str(jax.make_jaxpr(lambda q, k: product(q, k, batched))(q, k))
    x, dims = jnp.arange(6.0).reshape(2, 3), (((1,), (0,)), ((), ()))
    matrix = jnp.ones((3, 4))
    assert "reshape" not in str(jax.make_jaxpr(lambda x, w: product(x, w, dims))(x, matrix))
    w = jnp.ones((3, 2, 2))  # a kernel over several output axes: flattened and restored
    out = product(x, w, dims)
    assert out.shape == (2, 2, 2)
    np.testing.assert_array_equal(out, jnp.einsum("ij,jkl->ikl", x, w))


def _bfloat16_sums(jaxpr: Any) -> list[str]:
    """The ``reduce_sum`` equations over bfloat16 in ``jaxpr`` and the jaxprs inside it."""
    found = []
    for eqn in jaxpr.eqns:
        for value in eqn.params.values():
            for inner in value if isinstance(value, (list, tuple)) else [value]:
                inner = getattr(inner, "jaxpr", inner)
                if hasattr(inner, "eqns"):
                    found += _bfloat16_sums(inner)
        if eqn.primitive.name == "reduce_sum" and eqn.invars[0].aval.dtype == jnp.bfloat16:
            found.append(str(eqn))
    return found


@pytest.mark.parametrize(
    "task, backbone, size",
    [("detection", "vit_ti16", 64), ("detection", "resnet18", 64), ("fpn", "vit_ti16", 64),
     ("fpn", "cifar_resnet20", 32), ("linear", "vit_ti16", 32)],
)  # fmt: skip
def test_bfloat16_task_losses_sum_no_bias_gradient_in_bfloat16(task, backbone, size):
    """In a bfloat16 detection or segmentation step every convolution, transposed convolution
    and classifier of the task head adds its bias in float32: no gradient of the loss is a
    bfloat16 sum (XLA's CPU backend accumulates those in bfloat16, and over a feature map's
    pixels they stall at a fraction of the float32 sum)."""
    from vision_jax.tasks import Detection, Segmentation

    spec = Detection(strides=(8, 16)) if task == "detection" else Segmentation(head=task)
    kwargs = {"depth": 1} if backbone.startswith("vit") else {}
    model = spec.build_model(backbone, 3, dtype=jnp.bfloat16, **kwargs)
    x = jnp.zeros((2, size, size, 3))
    if task == "detection":
        batch = {"image": x, "boxes": jnp.tile(jnp.asarray([[[2.0, 2, 30, 30]]]), (2, 1, 1)),
                 "classes": jnp.ones((2, 1), jnp.int32), "valid": jnp.ones((2, 1), jnp.int32),
                 "crowd": jnp.zeros((2, 1), jnp.int32)}  # fmt: skip
    else:
        batch = {"image": x, "label_map": jnp.ones((2, size, size), jnp.int32)}
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
    state = {k: v for k, v in variables.items() if k != "params"}

    def loss(params, state):
        out, _ = model.apply({"params": params, **state}, x, train=True, mutable=list(state))
        return spec.train_loss(out, batch)[0]

    jaxpr = jax.make_jaxpr(jax.grad(loss))(variables["params"], state)
    sums = _bfloat16_sums(jaxpr.jaxpr)
    assert not sums, sums[:3]


def _head_bias_gradients(head: Any, features: list, image_hw: tuple[int, int], dtype: Any):
    """The bias gradients of ``head`` (a function of the compute dtype) on ``features``, the
    parameters those of the float32 head."""
    variables = head(jnp.float32).init(jax.random.key(0), features, image_hw, train=False)

    def loss(params):
        inputs = [f.astype(dtype) for f in features]
        out = head(dtype).apply({"params": params}, inputs, image_hw, train=False)
        return sum(jnp.sum(jnp.sin(a.astype(jnp.float32) / 4 + 1)) for a in jax.tree.leaves(out))

    grads = jax.jit(jax.grad(loss))(variables["params"])
    flat = jax.tree_util.tree_leaves_with_path(grads)
    return {jax.tree_util.keystr(p): g for p, g in flat if jax.tree_util.keystr(p).endswith(
        "['bias']")}  # fmt: skip


@pytest.mark.parametrize("head", ["detection", "segmentation"])
@pytest.mark.parametrize("single_map", [True, False])
def test_bfloat16_head_bias_gradients_match_float32(head, single_map):
    """The bias gradients of a bfloat16 FCOS or segmentation FPN head (simple pyramid on one
    map, FPN on three) are within bfloat16 rounding of the float32 head's: biases added in
    bfloat16 summed their gradients in bfloat16 over the maps' pixels, 10-90% off."""
    from vision_jax.tasks.fcos import FCOSHead
    from vision_jax.tasks.segmentation import FPNHead

    if single_map:
        features, image_hw = [jax.random.normal(jax.random.key(1), (2, 8, 8, 32))], (64, 64)
    else:
        features = [jax.random.normal(jax.random.key(i), (2, 32 >> i, 32 >> i, 16))
                    for i in range(3)]  # fmt: skip
        image_hw = (128, 128)
    if head == "detection":
        make = lambda dtype: FCOSHead(3, strides=(4, 8), width=32, dtype=dtype)  # noqa: E731
    else:
        make = lambda dtype: FPNHead(3, width=32, dtype=dtype)  # noqa: E731
    want = _head_bias_gradients(make, features, image_hw, jnp.float32)
    got = _head_bias_gradients(make, features, image_hw, jnp.bfloat16)
    # Relative to each gradient's norm, except where it is a small remainder of cancelling
    # terms (the biases under the towers' GroupNorms), where bfloat16 activations dominate.
    largest = max(float(np.linalg.norm(g)) for g in want.values())
    for name, g in want.items():
        error = float(np.linalg.norm(got[name] - g))
        assert error <= 0.02 * float(np.linalg.norm(g)) + 0.005 * largest, (name, error)


def test_conv_layer_returns_float32_accumulators_in_bfloat16_only():
    """``conv_layer``: in bfloat16 every kind of convolution (a product over channels, over a
    2x2 map's windows, a convolution) returns its float32 accumulator, the values of
    ``conv_as_dot`` before rounding; in float32 it is ``conv_as_dot`` itself."""
    assert precision.conv_layer(jnp.float32) is precision.conv_as_dot
    layer = precision.conv_layer(jnp.bfloat16)
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 16), jnp.bfloat16)
    for kernel, stride in [(1, 1), (3, 4), (3, 1)]:
        w = jax.random.normal(jax.random.key(kernel), (kernel, kernel, 16, 8), jnp.bfloat16)
        args = (x, w, (stride, stride), "SAME", None, None, NHWC)
        out = layer(*args)
        assert out.dtype == jnp.float32
        np.testing.assert_array_equal(out.astype(jnp.bfloat16), precision.conv_as_dot(*args))
