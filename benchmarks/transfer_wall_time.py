"""Wall time of a small transfer run, start to final metrics: vision_jax's command against the
same recipe written for timm, each in its own process, in one run.

  unzip -q ../shared/data/cifar10_jpeg/cifar10_jpeg.zip -d /tmp/cifar10_jpeg
  python benchmarks/transfer_wall_time.py
  python benchmarks/transfer_wall_time.py --set model.dtype=bfloat16   # vision_jax in bf16

vision_jax runs ``python -m vision_jax.main --config=configs/vit_ti16_cifar10.py:pretrained``
(ViT-Ti/16 from ``../shared/weights``, 2,000 CIFAR-10 JPEGs at 112 px, 150 SGD steps of 32,
evaluated on 1,000 test images). The timm process does the same with torch: the same image files
(the config's splits), the same weights (timm's safetensors of the same tensors, position
embeddings resampled bilinearly to 7x7, a zero-initialised 10-way head), resize to 112, 14 px
zero padding, random 112 px crop and flip, mean/std 0.5, SGD with momentum 0.9 at 0.01, 15
linear warmup steps then cosine decay to 0, gradients clipped to norm 1, then top-1 on the same
1,000 test images. Each wall time counts the whole process: imports, loading, training, eval.
The timm process decodes its images in the training loop on the main thread (no DataLoader
workers, which would cost their own start-up), so its step times include the decoding, where
vision_jax's tf.data pipeline decodes on background threads.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


# What the timm run takes from the config (_file_lists), by its name there: --set may not
# change them (nor data.*).
_RECIPE = {
    "image_size": "input.image_size", "crop_padding": "input.crop_padding",
    "batch_size": "batch_size", "eval_batch_size": "eval_batch_size",
    "total_steps": "total_steps", "learning_rate": "optimizer.learning_rate",
    "warmup_steps": "schedule.warmup_steps", "grad_clip_norm": "optimizer.grad_clip_norm",
}  # fmt: skip


def _file_lists(config: str) -> dict:
    """The config's training and evaluation files and labels, as vision_jax reads them."""
    from vision_jax.data.folders import from_image_folder

    path, _, arg = config.partition(":")
    namespace: dict = {}
    exec(compile(open(os.path.join(REPO, path)).read(), path, "exec"), namespace)
    c = namespace["get_config"](arg or None)
    lists = {}
    for key, split in [("train", c.data.train_split), ("eval", c.data.eval_split)]:
        source = from_image_folder(c.data.root, split)
        lists[key] = [source.columns["path"].tolist(), source.columns["label"].tolist()]
    lists["num_classes"] = len(source.class_names)
    recipe = {name: functools.reduce(getattr, key.split("."), c) for name, key in _RECIPE.items()}
    return {**lists, **recipe}


def timm_worker(lists_file: str, weights: str) -> None:
    """Train and evaluate the recipe with timm; print one JSON line of results."""
    sys.path.insert(0, os.path.join(REPO, "tests"))
    from conftest import import_timm  # the CPU-torch import workaround for torchvision

    start = time.perf_counter()
    import_timm()
    import numpy as np
    import timm
    import torch
    from PIL import Image
    from safetensors.torch import load_file
    from timm.layers import resample_abs_pos_embed
    from torch.nn import functional as F

    spec = json.load(open(lists_file))
    size, pad, n_cls = spec["image_size"], spec["crop_padding"], spec["num_classes"]
    state = load_file(weights)
    grid = size // 16
    state["pos_embed"] = resample_abs_pos_embed(
        state["pos_embed"], (grid, grid), num_prefix_tokens=1, interpolation="bilinear",
        antialias=True,
    )  # fmt: skip
    state["head.weight"] = torch.zeros(n_cls, state["head.weight"].shape[1])
    state["head.bias"] = torch.zeros(n_cls)
    model = timm.create_model("vit_tiny_patch16_224", img_size=size, num_classes=n_cls)
    model.load_state_dict(state, strict=True)

    def load(path: str) -> torch.Tensor:
        image = Image.open(path).convert("RGB").resize((size, size), Image.BILINEAR)
        pixels = torch.from_numpy(np.asarray(image, np.float32) / 255.0).permute(2, 0, 1)
        return (pixels - 0.5) / 0.5

    def augment(image: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        padded = F.pad(image, (pad, pad, pad, pad))
        top, left = rng.integers(0, 2 * pad + 1, size=2)
        crop = padded[:, top : top + size, left : left + size]
        return crop.flip(-1) if rng.random() < 0.5 else crop

    paths, labels = spec["train"]
    optimizer = torch.optim.SGD(model.parameters(), lr=spec["learning_rate"], momentum=0.9)
    total, warmup = spec["total_steps"], spec["warmup_steps"]

    def lr_factor(step: int) -> float:  # optax-style: step 0 has learning rate 0
        frac = min(max((step - warmup) / max(total - warmup, 1), 0.0), 1.0)
        return 0.5 * (1 + math.cos(math.pi * frac)) * min(step / warmup, 1.0)

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    rng = np.random.default_rng(0)
    order, cursor, batch = rng.permutation(len(paths)), 0, spec["batch_size"]
    model.train()
    setup_s, step_times = time.perf_counter() - start, []
    for _ in range(total):
        if cursor + batch > len(order):
            order, cursor = rng.permutation(len(paths)), 0
        rows, cursor = order[cursor : cursor + batch], cursor + batch
        t0 = time.perf_counter()
        images = torch.stack([augment(load(paths[i]), rng) for i in rows])
        targets = torch.tensor([labels[i] for i in rows])
        loss = F.cross_entropy(model(images), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), spec["grad_clip_norm"])
        optimizer.step()
        schedule.step()
        step_times.append(time.perf_counter() - t0)
    model.eval()
    paths, labels = spec["eval"]
    correct = 0
    with torch.inference_mode():
        for i in range(0, len(paths), spec["eval_batch_size"]):
            images = torch.stack([load(p) for p in paths[i : i + spec["eval_batch_size"]]])
            predicted = model(images).argmax(-1)
            correct += int((predicted == torch.tensor(labels[i : i + len(images)])).sum())
    median_step = sorted(step_times)[len(step_times) // 2]
    print(json.dumps({
        "top1": correct / len(paths), "setup_s": setup_s,
        "train_img_per_s": batch / median_step, "final_loss": loss.item(),
    }))  # fmt: skip


def _timed(command: list[str], what: str) -> tuple[float, float, dict]:
    """Runs ``command``; seconds to its first stdout line that is a JSON object holding
    ``eval/top1`` or ``top1`` (the final metrics), seconds to its exit, and that object."""
    t0 = time.perf_counter()
    process = subprocess.Popen(
        command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    metrics, metrics_s = None, float("nan")
    for line in process.stdout:
        if metrics is None and line.startswith("{") and "top1" in line:
            metrics, metrics_s = json.loads(line), time.perf_counter() - t0
    stderr = process.stderr.read()
    if process.wait() or metrics is None:
        raise RuntimeError(f"The {what} run failed:\n{stderr[-3000:]}")
    return metrics_s, time.perf_counter() - t0, metrics


def _run_vision_jax(config: str, workdir: str, flags: list[str]) -> dict:
    command = [sys.executable, "-m", "vision_jax.main", f"--config={config}",
               f"--workdir={workdir}", *flags]  # fmt: skip
    metrics_s, wall, metrics = _timed(command, "vision_jax")
    from vision_jax.report.curves import read_scalars

    rates = sorted(read_scalars(workdir)["train/images_per_sec"][1][1:])  # [0] compiles
    rate = rates[len(rates) // 2] if rates else float("nan")
    return {"metrics_s": metrics_s, "wall_s": wall, "top1": metrics["eval/top1"],
            "train_img_per_s": rate}  # fmt: skip


def _run_timm(lists_file: str, weights: str) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--timm-worker", lists_file,
               "--weights", weights]  # fmt: skip
    metrics_s, wall, metrics = _timed(command, "timm")
    return {"metrics_s": metrics_s, "wall_s": wall, **metrics}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/vit_ti16_cifar10.py:pretrained")
    shared = os.environ.get("VISION_JAX_SHARED", os.path.join(REPO, "..", "shared"))
    parser.add_argument("--weights", default=os.path.join(
        shared, "weights/vit_ti16/vit_tiny_patch16_224.safetensors"))  # fmt: skip
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a config override for the vision_jax run only (repeatable; not of the recipe "
        "both sides train)",
    )
    parser.add_argument("--timm-worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    for override in args.set:
        key = override.partition("=")[0]
        if key.startswith("data.") or key in _RECIPE.values():
            parser.error(f"--set {key} would change the recipe of the vision_jax run alone (timm "
                         "trains the config's): change it in the config file.")  # fmt: skip
    if args.timm_worker:
        return timm_worker(args.timm_worker, args.weights)
    with tempfile.TemporaryDirectory(prefix="transfer_wall_time_") as tmp:
        lists_file = os.path.join(tmp, "lists.json")
        json.dump(_file_lists(args.config), open(lists_file, "w"))
        flags = [f"--config.{override}" for override in args.set]
        print(f"# {' '.join([args.config, *flags])} against timm, each in its own process")
        print("# 'to metrics': launch to the final metrics on stdout; 'wall': launch to exit")
        print("# (vision_jax writes its report after the metrics)")
        print(f"{'impl':<11} {'to metrics s':>12} {'wall s':>7} {'top1':>6} {'train img/s':>12}")
        for repeat in range(args.repeats):
            workdir = os.path.join(tmp, f"run{repeat}")
            results = {
                "vision_jax": _run_vision_jax(args.config, workdir, flags),
                "timm": _run_timm(lists_file, args.weights),
            }
            for name, r in results.items():
                print(f"{name:<11} {r['metrics_s']:>12.1f} {r['wall_s']:>7.1f} {r['top1']:>6.3f} "
                      f"{r['train_img_per_s']:>12.1f}", flush=True)  # fmt: skip
            jx, tm = results["vision_jax"], results["timm"]
            print(f"# vision_jax / timm: {jx['metrics_s'] / tm['metrics_s']:.2f} to the metrics, "
                  f"{jx['wall_s'] / tm['wall_s']:.2f} wall", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
