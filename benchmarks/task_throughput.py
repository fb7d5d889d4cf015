"""Train-step throughput of each task on the same backbone, in one run: what the dense heads,
target assignment and losses cost against classification.

  python benchmarks/task_throughput.py --model vit_ti16 --batch 16 --size 224

Each task runs vision_jax's own train step (``vision_jax.steps.make_train_step``, AdamW, the XLA
options of a run) on random images: classification (1000 classes), segmentation (``fpn`` head,
21 classes) and detection (FCOS, 80 classes, 8 boxes per image padded to ``max_boxes``). It
prints images/s (median step over the timed steps after warm-up), compile time and the ratio to
classification.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from vision_jax import host_memory
from vision_jax.compile_options import step_compiler_options
from vision_jax.steps import StepSettings, TrainState, make_train_step
from vision_jax.tasks import Classification, Detection, Segmentation

TASKS = {
    "classification": (Classification(), 1000),
    "segmentation": (Segmentation(head="fpn"), 21),
    "detection": (Detection(), 80),
}


def batch_for(task: str, batch: int, size: int, num_classes: int) -> dict[str, jax.Array]:
    """Random images and targets of ``task``."""
    rng = np.random.default_rng(0)
    out = {"image": jnp.asarray(rng.normal(size=(batch, size, size, 3)), jnp.float32)}
    if task == "classification":
        out["label"] = jnp.asarray(rng.integers(0, num_classes, batch), jnp.int32)
    elif task == "segmentation":
        out["label_map"] = jnp.asarray(rng.integers(0, num_classes, (batch, size, size)), jnp.int32)
    else:
        m = TASKS["detection"][0].max_boxes
        corner = rng.uniform(0, size * 0.7, (batch, m, 2))
        extent = rng.uniform(size * 0.05, size * 0.3, (batch, m, 2))
        valid = np.arange(m)[None, :] < 8
        boxes = np.concatenate([corner, np.minimum(corner + extent, size)], -1) * valid[..., None]
        out["boxes"] = jnp.asarray(boxes, jnp.float32)
        out["classes"] = jnp.asarray(rng.integers(0, num_classes, (batch, m)), jnp.int32)
        out["valid"] = jnp.asarray(np.broadcast_to(valid, (batch, m)), jnp.int32)
        out["crowd"] = jnp.zeros((batch, m), jnp.int32)
    return out


def measure(task: str, model_name: str, batch: int, size: int, steps: int, warmup: int) -> dict:
    """Compile time and median step time of ``task``'s train step."""
    spec, num_classes = TASKS[task]
    model = spec.build_model(model_name, num_classes)
    rng = jax.random.key(0)
    data = batch_for(task, batch, size, num_classes)
    variables = jax.jit(lambda r: model.init(r, data["image"][:1], train=False))(rng)
    params = variables.pop("params")
    tx = optax.adamw(1e-4, weight_decay=1e-4)
    state = TrainState(jnp.array(0, jnp.int32), params, dict(variables), tx.init(params))
    options = step_compiler_options(jnp.float32)  # as a run compiles its step
    fn = jax.jit(make_train_step(model, tx, spec), donate_argnums=0, compiler_options=options)
    settings = StepSettings(rng)
    t0 = time.perf_counter()
    compiled = fn.lower(state, {}, data, settings).compile()
    compile_s = time.perf_counter() - t0
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        state, metrics = compiled(state, {}, data, settings)
        jax.block_until_ready(metrics)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    median = float(np.median(times))
    return {"task": task, "images_per_s": batch / median, "step_s": median, "compile_s": compile_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="vit_ti16")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    results = [
        measure(t, args.model, args.batch, args.size, args.steps, args.warmup) for t in args.tasks
    ]
    base = next((r for r in results if r["task"] == "classification"), None)
    print(f"{args.model}, batch {args.batch}, {args.size} px, {jax.devices()[0].platform}")
    for r in results:
        ratio = f"{r['images_per_s'] / base['images_per_s']:.2f}x" if base else "-"
        print(f"  {r['task']:<15} {r['images_per_s']:7.1f} img/s  compile {r['compile_s']:5.1f} s"
              f"  vs classification {ratio}")  # fmt: skip
    print(json.dumps(results))


if __name__ == "__main__":
    host_memory.set_up_single_process()  # as python -m vision_jax.main runs
    main()
