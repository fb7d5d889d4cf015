"""Time to the first training step of ``python -m vision_jax.main``, cold and warm.

Per model, two launches in fresh workdirs that share one persistent compilation cache
(``--compilation_cache``): the first compiles (cold); the second, a sweep member with another
seed and learning rate, reads every compiled step from the cache (warm), as a resume does.
Reported: seconds from launching the process to the end of step 1, and from the start of the run
(after Python and JAX imports, :func:`vision_jax.run.build_run`) to the end of step 1, as the run
logs it. The data is scikit-learn's digits upsampled to the model's size (nothing is downloaded) and
the model starts from scratch (no pretrained file needed); each process is killed after step 1.

  python benchmarks/startup.py --models vit_b16 resnet50
"""

from __future__ import annotations

import argparse
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
SWEEP_MEMBER = ("--config.seed=1", "--config.optimizer.learning_rate=3e-4")
FIRST_STEP = re.compile(r"First step \(1\) done ([\d.]+) s after the run started")


def launch(
    model: str, workdir: pathlib.Path, cache: pathlib.Path, args: argparse.Namespace,
    member: tuple[str, ...] = (),
) -> tuple[float, float]:  # fmt: skip
    """(seconds from launch to step 1, seconds the run logged) of one launch; ``member``: the
    sweep member's config flags."""
    command = [
        sys.executable, "-m", "vision_jax.main", "--config=configs/digits_pretrain.py",
        f"--workdir={workdir}", f"--compilation_cache={cache}", "--report=false",
        f"--config.model.name={model}", f"--config.input.image_size={args.image_size}",
        f"--config.batch_size={args.batch}", f"--config.eval_batch_size={args.batch}",
        "--config.total_steps=1000", "--config.log_every_steps=1000",
        "--config.checkpoint_every_steps=0", "--config.optimizer.name=adamw",
        "--config.optimizer.learning_rate=1e-4", *member,
    ]  # fmt: skip
    env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
    start = time.perf_counter()
    proc = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    lines = []
    try:
        for line in proc.stderr:
            lines.append(line)
            if match := FIRST_STEP.search(line):
                return time.perf_counter() - start, float(match[1])
    finally:
        proc.kill()
        proc.wait()
    raise RuntimeError(f"{model}: no first step (exit {proc.returncode}):\n{''.join(lines[-20:])}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["vit_b16", "resnet50"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--image_size", type=int, default=224)
    args = parser.parse_args()
    rows = []
    for model in args.models:
        with tempfile.TemporaryDirectory() as tmp:
            tmp = pathlib.Path(tmp)
            cold = launch(model, tmp / "cold", tmp / "cache", args)
            warm = launch(model, tmp / "warm", tmp / "cache", args, SWEEP_MEMBER)
        rows.append((model, *cold, *warm))
        print(f"{model}: cold {cold[0]:.1f} s ({cold[1]:.1f} s in the run), "
              f"warm {warm[0]:.1f} s ({warm[1]:.1f} s in the run)", flush=True)  # fmt: skip
    print(f"\nbatch {args.batch}, {args.image_size} px, from scratch; seconds to the end of step 1")
    print("| model | cold, from launch | cold, in the run | warm, from launch | warm, in the run |")
    print("|---|---:|---:|---:|---:|")
    for model, *times in rows:
        print(f"| {model} | " + " | ".join(f"{t:.1f}" for t in times) + " |")


if __name__ == "__main__":
    main()
