"""Where a ViT train step's time goes, part by part, against timm in the same run.

Each part of one encoder block runs forward and backward at the model's training shapes:
LayerNorm, the attention core (``softmax(q k^T) v`` from the per-head query, key and value),
the whole attention layer, the MLP and the whole block; the block's six layer products alone
(query, key, value, output, MLP in and out: ``(rows, in) x (in, out)`` products over the
batch's tokens, forward and both gradients, with their GFLOP/s); and the AdamW update of the
whole model's parameters. vision_jax's own modules and ``vit.attend`` are jitted with the train
step's compiler options; timm's modules (and ``F.scaled_dot_product_attention``, which timm's
attention calls) run eagerly. Each framework runs in its own process (vision_jax's as
``python -m vision_jax.main`` starts, with its host-memory settings: ``vision_jax.host_memory``);
the parts alternate within it and the figures are medians.

  python benchmarks/vit_components.py --model vit_ti16 --batch 32 --size 224

"per step" multiplies each part by how often one train step runs it (LayerNorm twice per block
and once more at the end, the other block parts once per block, AdamW once). The parts
alternate, so each starts with cold caches, in both frameworks alike.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

from vision_jax import host_memory

sys.path.insert(0, os.path.dirname(__file__))
import train_throughput  # noqa: E402

PARTS = ("layer_norm", "attention_core", "attention", "mlp", "block", "products", "adamw")


def layer_product_shapes(width: int, mlp_dim: int) -> list[tuple[int, int]]:
    """(in, out) of one encoder block's layer products: query, key, value, output, MLP."""
    return [(width, width)] * 4 + [(width, mlp_dim), (mlp_dim, width)]


def products_gflop(rows: int, width: int, mlp_dim: int) -> float:
    """GFLOP of the block's layer products, forward and both gradients."""
    return sum(3 * 2 * rows * a * b for a, b in layer_product_shapes(width, mlp_dim)) / 1e9


def _median_ms(fns: dict, rounds: int) -> dict[str, float]:
    """Each zero-argument ``fns`` value called ``rounds`` times, the parts alternating."""
    for fn in fns.values():
        fn(), fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {k: 1e3 * float(np.median(v)) for k, v in times.items()}


def jax_worker(model_name: str, batch: int, size: int, rounds: int) -> dict:
    import jax
    import jax.numpy as jnp
    import optax

    from vision_jax import create_model
    from vision_jax.compile_options import step_compiler_options
    from vision_jax.models import vit

    model = create_model(model_name, num_classes=1000)
    if not isinstance(model, vit.VisionTransformer):
        raise SystemExit(f"vit_components.py measures ViT models; {model_name} is not one.")
    width, heads, depth = model.width, model.num_heads, model.depth
    tokens = (size // model.patch_size) ** 2 + int(model.pool_type == "token")
    rng = np.random.default_rng(0)
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
    x, head_shape = normal(batch, tokens, width), (batch, tokens, heads, width // heads)
    q, k, v = normal(*head_shape), normal(*head_shape), normal(*head_shape)
    options = step_compiler_options(jnp.float32)

    def module_part(module, **kwargs):
        params = module.init(jax.random.key(0), x, **kwargs)
        loss = lambda p, x: jnp.sum(module.apply(p, x, **kwargs) * x)
        grad = jax.jit(jax.grad(loss, argnums=(0, 1)), compiler_options=options)
        return lambda: jax.block_until_ready(grad(params, x))

    def core_part():
        loss = lambda q, k, v: jnp.sum(vit.attend(q, k, v) * q)
        grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)), compiler_options=options)
        return lambda: jax.block_until_ready(grad(q, k, v))

    def products_part():  # what the step's layer products compile to: 2-D products in float32
        shapes = layer_product_shapes(width, model.mlp_dim)
        rows, kernels = [normal(batch * tokens, a) for a, _ in shapes], [normal(*s) for s in shapes]
        cotangents = [normal(batch * tokens, b) for _, b in shapes]  # random: no shortcut for XLA
        products = lambda xs, ws: zip(xs, ws, cotangents, strict=True)
        loss = lambda xs, ws: sum(jnp.sum((x @ w) * g) for x, w, g in products(xs, ws))
        grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)), compiler_options=options)
        return lambda: jax.block_until_ready(grad(rows, kernels))

    def adamw_part():
        images = jnp.zeros((1, size, size, 3))
        params = model.init(jax.random.key(0), images)["params"]
        grads = jax.tree.map(lambda p: jnp.full_like(p, 1e-3), params)
        tx = optax.adamw(1e-4, weight_decay=1e-4)

        def update(params, opt_state, grads):
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state

        update = jax.jit(update, donate_argnums=(0, 1), compiler_options=options)
        state = [params, tx.init(params)]

        def run():
            state[:] = update(*state, grads)
            jax.block_until_ready(state)

        return run

    parts = {
        "layer_norm": module_part(vit._layer_norm(jnp.float32, "ln")),
        "attention_core": core_part(),
        "attention": module_part(vit.Attention(heads), deterministic=True),
        "mlp": module_part(vit.MlpBlock(model.mlp_dim), deterministic=True),
        "block": module_part(vit.EncoderBlock(heads, model.mlp_dim), deterministic=True),
        "products": products_part(),
        "adamw": adamw_part(),
    }
    return {"depth": depth, "tokens": tokens, "width": width, "mlp_dim": model.mlp_dim,
            "ms": _median_ms(parts, rounds)}  # fmt: skip


def timm_worker(model_name: str, batch: int, size: int, rounds: int) -> dict:
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
    from conftest import import_timm  # the CPU-torch import workaround for torchvision

    timm = import_timm()
    import torch
    from timm.models.vision_transformer import Attention, Block, Mlp
    from torch.nn import functional as F

    from vision_jax import model_spec

    model = timm.create_model(model_spec(model_name).timm_name, num_classes=1000, img_size=size)
    blk = model.blocks[0]
    width, heads = model.embed_dim, blk.attn.num_heads
    tokens = model.patch_embed.num_patches + model.num_prefix_tokens
    torch.manual_seed(0)
    x = torch.randn(batch, tokens, width, requires_grad=True)
    head_shape = (batch, heads, tokens, width // heads)
    q, k, v = (torch.randn(*head_shape, requires_grad=True) for _ in range(3))
    hidden = blk.mlp.fc1.out_features

    def module_part(module):
        def run():
            module.zero_grad(set_to_none=True)
            x.grad = None
            (module(x) * x).sum().backward()

        return run

    def core_part():
        def run():
            q.grad = k.grad = v.grad = None
            (F.scaled_dot_product_attention(q, k, v) * q).sum().backward()

        return run

    def products_part():
        shapes = layer_product_shapes(width, hidden)
        rows = [torch.randn(batch * tokens, a, requires_grad=True) for a, _ in shapes]
        kernels = [torch.randn(b, a, requires_grad=True) for a, b in shapes]  # as nn.Linear
        cotangents = [torch.randn(batch * tokens, b) for _, b in shapes]

        def run():
            for tensor in rows + kernels:
                tensor.grad = None
            products = zip(rows, kernels, cotangents, strict=True)
            sum((F.linear(x, w) * g).sum() for x, w, g in products).backward()

        return run

    def adamw_part():
        params = list(model.parameters())
        for p in params:
            p.grad = torch.full_like(p, 1e-3)
        opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-4)
        return opt.step

    parts = {
        "layer_norm": module_part(torch.nn.LayerNorm(width, eps=1e-6)),
        "attention_core": core_part(),
        "attention": module_part(Attention(width, heads, qkv_bias=True)),
        "mlp": module_part(Mlp(width, hidden)),
        "block": module_part(Block(width, heads, mlp_ratio=hidden / width, qkv_bias=True)),
        "products": products_part(),
        "adamw": adamw_part(),
    }
    return {"depth": len(model.blocks), "tokens": tokens, "ms": _median_ms(parts, rounds)}


def _measure(kind: str, args: list[str]) -> dict:
    """One framework's parts, in a worker process (``train_throughput``'s worker protocol)."""
    result = train_throughput._run_worker([kind, *args], timeout=1800, script=__file__)
    if isinstance(result, str):
        raise SystemExit(f"The {kind} worker {result}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="vit_ti16")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        kind, name, batch, size, rounds = args.worker
        if kind == "jax":  # as python -m vision_jax.main runs (vision_jax.host_memory)
            host_memory.set_up_single_process()
        worker = jax_worker if kind == "jax" else timm_worker
        print("RESULT " + json.dumps(worker(name, int(batch), int(size), int(rounds))))
        return

    common = [args.model, str(args.batch), str(args.size), str(args.rounds)]
    jx, tm = _measure("jax", common), _measure("timm", common)
    depth = jx["depth"]
    print(f"# {args.model}, batch {args.batch}, {args.size} px ({jx['tokens']} tokens), "
          f"forward and backward, fp32; medians of {args.rounds}")  # fmt: skip
    print(f"{'part':<15} {'vision_jax ms':>13} {'timm ms':>8} {'vs timm':>8} "
          f"{'per step: vision_jax':>21} {'timm':>7} {'difference':>11}")  # fmt: skip
    for part in PARTS:
        a, b = jx["ms"][part], tm["ms"][part]
        n = {"adamw": 1, "layer_norm": 2 * depth + 1}.get(part, depth)
        print(f"{part:<15} {a:>13.2f} {b:>8.2f} {b / a:>7.2f}x "
              f"{a * n:>18.0f} ms {b * n:>5.0f} ms {(a - b) * n:>8.0f} ms")  # fmt: skip
    gflop = products_gflop(args.batch * jx["tokens"], jx["width"], jx["mlp_dim"])
    print(f"# products: {gflop:.2f} GFLOP per block; vision_jax "
          f"{gflop / jx['ms']['products'] * 1e3:.0f} GFLOP/s, timm (torch) "
          f"{gflop / tm['ms']['products'] * 1e3:.0f} GFLOP/s")  # fmt: skip


if __name__ == "__main__":
    main()
