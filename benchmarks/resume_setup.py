"""Setup time of a resume against a fresh start: ``vision_jax.run.build_run`` timed in a new
process, once on a workdir that holds a checkpoint and once on an empty one.

A short run (from scratch, scikit-learn's digits upsampled, one step, checkpointed) makes the
checkpoint first. Each timing then runs in its own process with the compilation cache that run
filled, so both read their compiled executables instead of compiling (warm): the figure is what a
preempted job spends before it can train again (the variables, optimizer state and restore).

  python benchmarks/resume_setup.py --models vit_b16 resnet50
"""

from __future__ import annotations

import argparse
import pathlib
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]

PROCESS = """
import sys, time
sys.path.insert(0, {here!r})
import jax
jax.config.update("jax_compilation_cache_dir", {cache!r})
from vision_jax.compilation_cache import configure_compilation_cache
configure_compilation_cache({workdir!r}, "auto")  # as main: every program, in the cache above
from resume_setup import config
from vision_jax.run import build_run
from vision_jax.train import train_and_evaluate
if {train}:
    train_and_evaluate(config({model!r}, {size}), {workdir!r})
else:
    start = time.perf_counter()
    run = build_run(config({model!r}, {size}), {workdir!r})
    jax.block_until_ready(run.state)
    print(f"{{time.perf_counter() - start:.2f}}")
    run.close()
"""


def config(model: str, size: int):
    """One step of ``model`` from scratch on digits at ``size`` px, checkpointed."""
    from vision_jax.config import default_config

    c = default_config()
    c.model.name, c.data.source, c.input.image_size = model, "digits", size
    c.batch_size = c.eval_batch_size = 8
    c.total_epochs, c.total_steps = None, 1
    c.optimizer.name, c.optimizer.learning_rate = "adamw", 1e-4
    c.schedule.warmup_steps = 0
    c.checkpoint_every_steps = 1
    return c


def in_process(model: str, size: int, workdir: pathlib.Path, cache: pathlib.Path, *,
               train: bool) -> str:  # fmt: skip
    """Trains (``train``) or times ``build_run`` in a new Python process; its stdout."""
    code = PROCESS.format(here=str(ROOT / "benchmarks"), cache=str(cache), model=model,
                          size=size, workdir=str(workdir), train=train)  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    if out.returncode:
        raise RuntimeError(f"{model}: exit {out.returncode}\n{out.stderr[-3000:]}")
    return out.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["vit_b16", "resnet50"])
    parser.add_argument("--image_size", type=int, default=64)
    args = parser.parse_args()
    print("| model | fresh start: build_run | resume: build_run |\n|---|---:|---:|")
    for model in args.models:
        with tempfile.TemporaryDirectory() as tmp:
            tmp = pathlib.Path(tmp)
            cache, size = tmp / "cache", args.image_size
            in_process(model, size, tmp / "run", cache, train=True)
            fresh = float(in_process(model, size, tmp / "fresh", cache, train=False).split()[-1])
            resume = float(in_process(model, size, tmp / "run", cache, train=False).split()[-1])
        print(f"| {model} | {fresh:.1f} s | {resume:.1f} s |", flush=True)


if __name__ == "__main__":
    main()
