"""Input pipeline throughput: decoded-and-augmented images/s on this machine's CPU cores.

Reads real JPEGs through ``data.source = "imagefolder"``: 224-pixel Imagenette validation images
and 32-pixel CIFAR-10 training images, from the zips under ``../shared/data`` or
``$VISION_JAX_SHARED/data`` (extracted to a temporary directory; a missing zip is skipped).
Each row runs the training (or evaluation) stream for about ``--seconds`` after a warm-up and
prints images/s. Takes about a minute::

    python benchmarks/input_pipeline.py [--seconds 6] [--threads N]

Beside it, the training step's consumption rate on the same machine (vision_jax's train step at
224 px, float32, measured by ``train_throughput.py``'s worker) for ``--step-models``, so the
output says whether the pipeline keeps the step fed.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import tempfile
import time
import zipfile

_BESIDE = pathlib.Path(__file__).resolve().parents[1] / ".." / "shared"
SHARED = pathlib.Path(os.environ.get("VISION_JAX_SHARED", _BESIDE)) / "data"
IMAGENETTE = SHARED / "imagenette_224_val" / "imagenette2_224_val.zip"
CIFAR = SHARED / "cifar10_jpeg" / "cifar10_jpeg.zip"

HEAVY = dict(randaugment_layers=2, randaugment_magnitude=9, random_erasing=0.25)
MIX = dict(mixup_alpha=0.8, cutmix_alpha=1.0)
IMAGENET = dict(image_size=224, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
CASES = {
    "224": [
        ("eval: resize 256, centre crop 224", dict(crop_fraction=0.875), False),
        ("train: inception crop, flip", dict(inception_crop=True, flip=True), True),
        (
            "train: + RandAugment(2, 9), erasing, mixup/cutmix",
            dict(inception_crop=True, flip=True, **HEAVY, **MIX),
            True,
        ),
    ],
    "32": [
        ("eval: 32 as is", dict(), False),
        ("train: pad-4 random crop, flip", dict(random_crop=True, crop_padding=4, flip=True), True),
        (
            "train: + RandAugment(2, 9), erasing, mixup/cutmix",
            dict(random_crop=True, crop_padding=4, flip=True, **HEAVY, **MIX),
            True,
        ),
    ],
}


def extract(zip_path: pathlib.Path, prefix: str, dest: pathlib.Path) -> pathlib.Path | None:
    """Extracts the members under ``prefix`` of ``zip_path`` into ``dest``; None if absent."""
    if not zip_path.exists():
        print(f"{zip_path} is absent: skipped.")
        return None
    with zipfile.ZipFile(zip_path) as z:
        z.extractall(dest, [n for n in z.namelist() if n.startswith(prefix)])
    return dest


def images_per_second(batches, batch_size: int, seconds: float) -> float:
    """Throughput of ``batches`` over about ``seconds``, after two warm-up batches."""
    for _ in range(2):
        next(batches)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        try:
            next(batches)
        except StopIteration:
            break
        count += batch_size
    return count / (time.perf_counter() - start)


def run_case(root: str, split: str, overrides: dict, train: bool, args) -> float:
    from vision_jax import data as data_lib

    source = data_lib.from_image_folder(root, split)
    spec = data_lib.InputSpec(**{**IMAGENET, **overrides})
    if train:
        batches = data_lib.train_batches(
            source, spec, global_batch=args.batch, seed=0, threads=args.threads
        )
    else:
        batches = iter(
            data_lib.eval_batches(source, spec, global_batch=args.batch, threads=args.threads)
        )
    return images_per_second(batches, args.batch, args.seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=6.0, help="timed seconds per row")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None, help="default: usable cores")
    parser.add_argument("--step-models", nargs="*", default=["vit_ti16:32", "resnet50:16"],
                        help="model:batch pairs whose train-step rate is shown beside")  # fmt: skip
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    cores = len(os.sched_getaffinity(0))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        roots = {
            "224": (extract(IMAGENETTE, "val/", pathlib.Path(tmp) / "imagenette"), "val"),
            "32": (extract(CIFAR, "train/", pathlib.Path(tmp) / "cifar"), "train"),
        }
        for size, (root, split) in roots.items():
            if root is None:
                continue
            for name, overrides, train in CASES[size]:
                overrides = {**overrides, "image_size": int(size)}
                rate = run_case(str(root), split, overrides, train, args)
                rows.append((f"{size}px JPEG", name, rate))
                print(f"{size:>3}px  {name:<52} {rate:9.0f} images/s", flush=True)
    print(f"\n{cores} cores, batch {args.batch}, threads {args.threads or cores}:")
    print("| images | pipeline | images/s |\n|---|---|---:|")
    for images, name, rate in rows:
        print(f"| {images} | {name} | {rate:,.0f} |")
    slowest = min((rate for images, _, rate in rows if images.startswith("224")), default=None)
    for entry in args.step_models:
        name, _, batch = entry.partition(":")
        step = train_step_rate(name, int(batch or 32))
        if isinstance(step, str):
            print(f"train step {name} batch {batch}: {step}")
            continue
        verdict = (
            f"pipeline {slowest / step:,.0f}x faster" if slowest else "no 224-px pipeline measured"
        )
        print(f"train step {name} batch {batch}: consumes {step:.1f} images/s; {verdict}")


def train_step_rate(name: str, batch: int) -> float | str:
    """Images/s of vision_jax's float32 train step at 224 px (a separate process)."""
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
    from train_throughput import _run_worker

    result = _run_worker(["jax", name, str(batch), "224", "float32", "train", "3", "1"], 900)
    return result if isinstance(result, str) else batch / result["median_s"]


if __name__ == "__main__":
    main()
