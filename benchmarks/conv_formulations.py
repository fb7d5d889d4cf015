"""ResNet-50's 3x3 convolutions written three ways, against torch's convolution in the same run.

For the stride-1 3x3 convolution of each ResNet-50 stage (56x56x64, 28x28x128, 14x14x256 and
7x7x512 at the given batch), the forward product and the kernel gradient, each as:

- ``xla``: ``lax.conv_general_dilated`` (NHWC, HWIO) and its transpose for the kernel gradient,
  what ``vision_jax.models.resnet`` compiles to;
- ``im2col``: the nine shifted views stacked into ``(pixels, 9 * channels)`` patches, then one
  product with the kernel (forward) or with the cotangent (kernel gradient);
- ``taps``: nine products, one per kernel tap, on the shifted views (no patch matrix).

vision_jax's versions are jitted with the train step's compiler options; torch runs
``F.conv2d`` channels-last and ``torch.nn.grad.conv2d_weight`` eagerly, as timm's ResNet-50
trains. Each framework runs in its own process (vision_jax's as ``python -m vision_jax.main``
starts: ``vision_jax.host_memory``), the formulations alternate within it, figures are medians;
each jax formulation is checked against ``xla`` to float32 rounding.

  python benchmarks/conv_formulations.py --batch 16
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

from vision_jax import host_memory

sys.path.insert(0, os.path.dirname(__file__))
import train_throughput  # noqa: E402
from vit_components import _median_ms  # noqa: E402

# (height = width, channels): input and output channels alike, as the formulations' reshapes
# and the FLOP count assume.
STAGES = ((56, 64), (28, 128), (14, 256), (7, 512))
FORMULATIONS = ("xla", "im2col", "taps")


def jax_worker(batch: int, rounds: int) -> dict:
    import jax
    import jax.numpy as jnp
    from jax import lax

    from vision_jax.compile_options import step_compiler_options

    def conv(x, w):
        dimensions = ("NHWC", "HWIO", "NHWC")
        return lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=dimensions)

    def views(x):  # the nine shifted views of the zero-padded input, tap order (kh, kw)
        _, h, w, _ = x.shape
        padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
        return [padded[:, i : i + h, j : j + w, :] for i in range(3) for j in range(3)]

    def patches(x):
        return jnp.stack(views(x), axis=3).reshape(-1, 9 * x.shape[-1])

    forward = {
        "xla": conv,
        "im2col": lambda x, w: (patches(x) @ w.reshape(-1, w.shape[-1])).reshape(x.shape),
        "taps": lambda x, w: sum(
            v.reshape(-1, x.shape[-1]) @ w.reshape(9, *w.shape[2:])[k]
            for k, v in enumerate(views(x))
        ).reshape(x.shape),
    }
    kernel_grad = {
        "xla": lambda x, w, dy: jax.vjp(lambda w: conv(x, w), w)[1](dy)[0],
        "im2col": lambda x, w, dy: (patches(x).T @ dy.reshape(-1, dy.shape[-1])).reshape(w.shape),
        "taps": lambda x, w, dy: jnp.stack(
            [v.reshape(-1, x.shape[-1]).T @ dy.reshape(-1, dy.shape[-1]) for v in views(x)]
        ).reshape(w.shape),
    }
    options = step_compiler_options(jnp.float32)
    rng = np.random.default_rng(0)
    results = {}
    for size, channels in STAGES:
        x = jnp.asarray(rng.standard_normal((batch, size, size, channels), np.float32))
        w = jnp.asarray(rng.standard_normal((3, 3, channels, channels), np.float32) * 0.05)
        dy = jnp.asarray(rng.standard_normal(x.shape, np.float32))
        calls = {}
        parts = (("forward", forward, (x, w)), ("kernel_grad", kernel_grad, (x, w, dy)))
        for part, fns, args in parts:
            reference = None
            for name in FORMULATIONS:
                compiled = jax.jit(fns[name], compiler_options=options).lower(*args).compile()
                out = np.asarray(compiled(*args))
                reference = out if reference is None else reference
                err = float(np.abs(out - reference).max() / np.abs(reference).max())
                if err > 1e-4:
                    raise SystemExit(f"{part} {name} at {size}x{size}x{channels}: error {err}")
                calls[f"{part}/{name}"] = lambda c=compiled, a=args: jax.block_until_ready(c(*a))
        results[f"{size}x{size}x{channels}"] = _median_ms(calls, rounds)
    return results


def torch_worker(batch: int, rounds: int) -> dict:
    import torch
    from torch.nn import functional as F

    torch.manual_seed(0)
    results = {}
    for size, channels in STAGES:
        shape = (batch, channels, size, size)
        x = torch.randn(shape).to(memory_format=torch.channels_last)
        w = (0.05 * torch.randn(channels, channels, 3, 3)).to(memory_format=torch.channels_last)
        dy = torch.randn(shape).to(memory_format=torch.channels_last)
        calls = {
            "forward/torch": lambda x=x, w=w: F.conv2d(x, w, padding=1),
            "kernel_grad/torch": lambda x=x, w=w, dy=dy: torch.nn.grad.conv2d_weight(
                x, w.shape, dy, padding=1
            ),
        }
        with torch.no_grad():
            results[f"{size}x{size}x{channels}"] = _median_ms(calls, rounds)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        kind, batch, rounds = args.worker
        if kind == "jax":  # as python -m vision_jax.main runs (vision_jax.host_memory)
            host_memory.set_up_single_process()
        worker = jax_worker if kind == "jax" else torch_worker
        print("RESULT " + json.dumps(worker(int(batch), int(rounds))))
        return

    measured = {}
    for kind in ("jax", "torch"):
        result = train_throughput._run_worker(
            [kind, str(args.batch), str(args.rounds)], timeout=1800, script=__file__
        )
        if isinstance(result, str):
            raise SystemExit(f"The {kind} worker {result}")
        measured[kind] = result
    print(f"# 3x3 stride-1 convolutions, batch {args.batch}, fp32; medians of {args.rounds}; "
          "ms (GFLOP/s), and torch's time over each")  # fmt: skip
    for stage, jx in measured["jax"].items():
        size, _, channels = (int(v) for v in stage.split("x"))
        gflop = 2 * args.batch * size * size * 9 * channels * channels / 1e9
        for part in ("forward", "kernel_grad"):
            torch_ms = measured["torch"][stage][f"{part}/torch"]
            cells = [f"torch {torch_ms:.1f} ({gflop / torch_ms * 1e3:.0f})"]
            for name in FORMULATIONS:
                ms = jx[f"{part}/{name}"]
                cells.append(f"{name} {ms:.1f} ({gflop / ms * 1e3:.0f}) {torch_ms / ms:.2f}x")
            print(f"{stage:<10} {part:<12} " + " | ".join(cells))


if __name__ == "__main__":
    main()
