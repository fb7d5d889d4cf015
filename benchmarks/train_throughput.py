"""Training (or inference) throughput of vision_jax against timm, side by side, in one run.

Each measurement runs in its own subprocess (clean peak memory, no thread pools shared between
JAX and torch). Per model and dtype it reports images/s (median step time over the timed steps
after warm-up), the step-time spread (p10-p90), compile time, peak memory, FLOPs per step from
XLA's cost analysis, achieved GFLOP/s and MFU against a measured matmul peak of this device, and
the same model in timm (eager fp32, bf16 autocast, channels-last for CNNs) with the ratio.

  python benchmarks/train_throughput.py --models vit_ti16:32 vit_s16:16 resnet50:16
  python benchmarks/train_throughput.py --models vit_b16:128 --dtypes bfloat16 --mode infer

The JAX step is vision_jax's own train step (``vision_jax.steps.make_train_step``) with AdamW,
softmax cross-entropy and 1000 classes; timm runs the same model with torch.optim.AdamW. The JAX
workers start as ``python -m vision_jax.main`` does, with its host-memory settings for XLA's
buffers (heap reuse, synchronous CPU dispatch, huge pages: ``vision_jax.host_memory``;
``--no-huge-pages``: without); timm's start as torch users run them (``--timm-huge-pages``: with
the same malloc settings).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import subprocess
import sys
import time

import numpy as np

from vision_jax import host_memory

NUM_CLASSES = 1000
_XLA_DEFAULTS_ENV = "VISION_JAX_BENCH_XLA_DEFAULTS"  # set by --xla-defaults for the workers


def _percentiles(times: list[float]) -> dict[str, float]:
    t = np.asarray(times)
    return {
        "median_s": float(np.median(t)),
        "p10_s": float(np.percentile(t, 10)),
        "p90_s": float(np.percentile(t, 90)),
    }


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# --------------------------------------------------------------------------------------------
# workers (run in subprocesses)


def matmul_peak(dtype: str, n: int = 2048, reps: int = 10) -> dict:
    """GFLOP/s of a jitted n x n matmul in ``dtype`` (bfloat16 accumulates in float32)."""
    import jax
    import jax.numpy as jnp

    dt = jnp.dtype(dtype)
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(dt)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32).astype(dt)
    f = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
    f(a, b).block_until_ready()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        f(a, b).block_until_ready()
        times.append(time.perf_counter() - t0)
    return {"gflops": 2 * n**3 / float(np.median(times)) / 1e9, "device": str(jax.devices()[0])}


def build_jax_step(model_name: str, batch: int, size: int, variant: str, mode: str):
    """vision_jax's jitted train step (or forward pass) and its arguments, on random data.

    ``variant`` is a dtype, optionally with ``+lora:RANK`` (adapters on query/value plus the
    head train; the rest is frozen, as ``lora.rank`` does in a run)."""
    import functools

    import jax
    import jax.numpy as jnp
    import optax

    from vision_jax import create_model, lora, optim, trees
    from vision_jax.compile_options import step_compiler_options
    from vision_jax.steps import StepSettings, TrainState, make_train_step
    from vision_jax.tasks import Classification

    dtype, _, method = variant.partition("+")
    model = create_model(model_name, num_classes=NUM_CLASSES, dtype=jnp.dtype(dtype))
    rng = jax.random.key(0)
    images = jax.random.normal(rng, (batch, size, size, 3), jnp.float32)
    labels = jax.random.randint(rng, (batch,), 0, NUM_CLASSES)
    variables = jax.jit(functools.partial(model.init, train=False))(rng, images[:1])
    params, frozen, spec = variables.pop("params"), {}, None
    if method.startswith("lora:"):
        rank = int(method.removeprefix("lora:"))
        spec = lora.LoraSpec(rank, float(rank))
        params = lora.add_adapters(params, spec, rng)
        mask = optim.trainable_mask(params, model, preset="head", frozen=None, extra=".*/lora_.")
        params, frozen = trees.partition(params, mask)
    xla_options = None if os.environ.get(_XLA_DEFAULTS_ENV) else step_compiler_options(dtype)
    if mode == "train":
        tx = optax.adamw(1e-4, weight_decay=1e-4)
        state = TrainState(jnp.array(0, jnp.int32), params, dict(variables), tx.init(params))
        step = make_train_step(model, tx, Classification(), lora=spec)
        fn = jax.jit(step, donate_argnums=0, compiler_options=xla_options)
        return fn, (state, frozen, {"image": images, "label": labels}, StepSettings(rng))
    fn = jax.jit(lambda v, x: model.apply(v, x, train=False), compiler_options=xla_options)
    return fn, ({"params": params, **variables}, images)


def jax_worker(model_name: str, batch: int, size: int, variant: str, mode: str, steps: int,
               warmup: int) -> dict:  # fmt: skip
    """Compile time, FLOPs and step times of ``build_jax_step``'s step."""
    import jax

    fn, args = build_jax_step(model_name, batch, size, variant, mode)
    t0 = time.perf_counter()
    compiled = fn.lower(*args).compile()
    compile_s = time.perf_counter() - t0
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = float(cost.get("flops", 0.0)) if cost else 0.0

    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        if mode == "train":
            state, metrics = compiled(*args)
            args = (state, *args[1:])
            jax.block_until_ready(metrics)
        else:
            jax.block_until_ready(compiled(*args))
        if i == 0:
            first_step_s = compile_s + time.perf_counter() - t0
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    stats = jax.devices()[0].memory_stats() or {}
    peak_mb = stats.get("peak_bytes_in_use", 0) / 2**20 or _peak_rss_mb()
    return {
        **_percentiles(times),
        "compile_s": compile_s,
        "first_step_s": first_step_s,
        "flops": flops,
        "peak_mb": peak_mb,
    }


def timm_worker(model_name: str, batch: int, size: int, variant: str, mode: str, steps: int,
                warmup: int) -> dict:  # fmt: skip
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
    from conftest import import_timm  # the CPU-torch import workaround for torchvision

    timm = import_timm()
    import torch

    from vision_jax import model_spec

    device = "cuda" if torch.cuda.is_available() else "cpu"
    kwargs = {"img_size": size} if model_name.startswith("vit") else {}
    model = timm.create_model(model_spec(model_name).timm_name, num_classes=NUM_CLASSES, **kwargs)
    model = model.to(device)
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, NUM_CLASSES, (batch,), device=device)
    if "channels_last" in variant:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    if "compile" in variant:
        model = torch.compile(model)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled="bf16" in variant)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-4)
    loss_fn = torch.nn.CrossEntropyLoss()
    model.train(mode == "train")

    def step():
        if mode == "train":
            opt.zero_grad(set_to_none=True)
            with autocast:
                loss = loss_fn(model(x), y)
            loss.backward()
            opt.step()
            return loss
        with torch.no_grad(), autocast:
            return model(x)

    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    peak_mb = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else _peak_rss_mb()
    return {**_percentiles(times), "peak_mb": peak_mb}


# --------------------------------------------------------------------------------------------
# driver


def _run_worker(
    args: list[str], timeout: int, script: str = __file__, env: dict | None = None
) -> dict | str:
    """``script --worker *args`` in a new process (environment ``env``, default this one's): its
    ``RESULT {json}`` line, or why it failed."""
    proc = subprocess.run(
        [sys.executable, script, "--worker", *args],
        capture_output=True, text=True, timeout=timeout, env=env,
    )  # fmt: skip
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        return f"failed: {_error_line(proc.stderr) or f'exit status {proc.returncode}'}"
    return json.loads(lines[-1][len("RESULT ") :])


def _error_line(stderr: str) -> str:
    """The last ``SomeError: message`` line of a worker's stderr (JAX ends a traceback with a
    note about its filtered frames), else its last line."""
    lines = stderr.strip().splitlines()
    errors = [ln for ln in lines if re.match(r"[\w.]*(Error|Exception|Interrupt)\b", ln)]
    return (errors or lines or [""])[-1]


def _timm_variants(model_name: str, dtype: str, gpu: bool) -> list[str]:
    cnn = not model_name.startswith("vit")
    base = "bf16" if dtype == "bfloat16" else "fp32"
    variants = [base] + ([f"{base}+channels_last"] if cnn else [])
    return variants + ([f"{base}+compile"] if gpu else [])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["vit_ti16:32", "vit_s16:16", "resnet50:16"],
                        help="model:batch pairs")  # fmt: skip
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument(
        "--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"]
    )
    parser.add_argument("--methods", nargs="+", default=["full"],
                        help="full, or lora:RANK (vision_jax only)")  # fmt: skip
    parser.add_argument("--mode", choices=["train", "infer"], default="train")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--no-timm", action="store_true")
    parser.add_argument("--xla-defaults", action="store_true",
                        help="compile without vision_jax.compile_options")  # fmt: skip
    parser.add_argument("--no-huge-pages", action="store_true",
                        help="vision_jax without vision_jax.host_memory's settings")  # fmt: skip
    parser.add_argument("--timm-huge-pages", action="store_true",
                        help="timm with the same malloc settings")  # fmt: skip
    parser.add_argument("--timeout", type=int, default=900)
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode == "infer" and any(m != "full" for m in args.methods):
        parser.error("--methods lora:R measures training; a LoRA model infers as the merged one "
                     "(full).")  # fmt: skip
    for entry in args.models:
        if not re.fullmatch(r"[\w.-]+(:[1-9]\d*)?", entry):
            parser.error(f"--models takes model:batch pairs (e.g. vit_ti16:32); got {entry!r}.")

    if args.worker:
        kind, *rest = args.worker
        if kind != "timm":  # as python -m vision_jax.main runs
            host_memory.set_up_single_process()
        if kind == "peak":
            result = matmul_peak(rest[0])
        else:
            name, batch, size, variant, mode, steps, warmup = rest
            fn = jax_worker if kind == "jax" else timm_worker
            result = fn(name, int(batch), int(size), variant, mode, int(steps), int(warmup))
        print("RESULT " + json.dumps(result))
        return

    from vision_jax import model_spec

    for entry in args.models:
        try:
            model_spec(entry.partition(":")[0])
        except ValueError as e:
            parser.error(str(e))
    if args.xla_defaults:
        os.environ[_XLA_DEFAULTS_ENV] = "1"
    timm_env = None  # this process's environment; decided before --no-huge-pages changes it
    if args.timm_huge_pages:
        thp = host_memory.transparent_huge_pages_mode()
        timm_env = host_memory.environment(os.environ, thp)
    if args.no_huge_pages:
        os.environ[host_memory.OPT_OUT] = "0"
    peaks = {d: _run_worker(["peak", d], args.timeout) for d in args.dtypes}
    device = next((p["device"] for p in peaks.values() if isinstance(p, dict)), "?")
    gpu = "cuda" in device.lower() or "gpu" in device.lower()
    print(f"# {args.mode} throughput, {args.size}px, on {device} ({platform.processor() or ''} "
          f"{os.cpu_count()} CPUs)")  # fmt: skip
    for d, p in peaks.items():
        if isinstance(p, dict):
            print(f"# measured {d} matmul peak: {p['gflops']:.0f} GFLOP/s")
    header = (
        f"{'model':<10} {'batch':>5} {'impl':<26} {'img/s':>8} {'p10-p90 ms':>15} "
        f"{'compile s':>9} {'1st step s':>10} {'GFLOP/s':>8} {'MFU':>5} {'peak MB':>8} "
        f"{'vs timm':>7}"
    )
    print(header)
    rows = []
    for entry in args.models:
        name, _, batch = entry.partition(":")
        batch = int(batch or 32)
        common = [name, str(batch), str(args.size)]
        tail = [args.mode, str(args.steps), str(args.warmup)]
        for dtype in args.dtypes:
            timm_res = {}
            if not args.no_timm and model_spec(name).timm_name:
                for variant in _timm_variants(name, dtype, gpu):
                    timm_res[variant] = _run_worker(
                        ["timm", *common, variant, *tail], args.timeout, env=timm_env
                    )
            best_timm = max(
                (batch / r["median_s"] for r in timm_res.values() if isinstance(r, dict)),
                default=None,
            )
            for method in args.methods:
                variant = dtype if method == "full" else f"{dtype}+{method}"
                res = _run_worker(["jax", *common, variant, *tail], args.timeout)
                row = {"model": name, "batch": batch, "variant": variant, "jax": res}
                rows.append(row)
                label = "vision_jax " + variant
                if not isinstance(res, dict):
                    print(f"{name:<10} {batch:>5} {label:<26} {res}")
                    continue
                ips = batch / res["median_s"]
                gflops = res["flops"] / res["median_s"] / 1e9
                peak = peaks.get(dtype)
                mfu = gflops / peak["gflops"] if isinstance(peak, dict) else float("nan")
                ratio = f"{ips / best_timm:.2f}x" if best_timm else "-"
                row.update(images_per_s=ips, gflops=gflops, mfu=mfu, vs_timm=ratio)
                print(f"{name:<10} {batch:>5} {label:<26} {ips:>8.1f} "
                      f"{res['p10_s'] * 1e3:>7.0f}-{res['p90_s'] * 1e3:<7.0f} "
                      f"{res['compile_s']:>9.1f} {res['first_step_s']:>10.1f} "
                      f"{gflops:>8.0f} {mfu:>5.0%} {res['peak_mb']:>8.0f} {ratio:>7}")  # fmt: skip
            for variant, r in timm_res.items():
                rows.append(
                    {"model": name, "batch": batch, "variant": "timm " + variant, "timm": r}
                )
                if isinstance(r, dict):
                    print(f"{name:<10} {batch:>5} {'timm ' + variant:<26} "
                          f"{batch / r['median_s']:>8.1f} "
                          f"{r['p10_s'] * 1e3:>7.0f}-{r['p90_s'] * 1e3:<7.0f} {'':>9} {'':>10} "
                          f"{'':>8} {'':>5} {r['peak_mb']:>8.0f}")  # fmt: skip
                else:
                    print(f"{name:<10} {batch:>5} {'timm ' + variant:<26} {r}")
            sys.stdout.flush()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device, "peaks": peaks, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
