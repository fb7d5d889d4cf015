"""Where a train step's time goes: a ``jax.profiler`` trace of one step, attributed to model ops.

Runs ``train_throughput.build_jax_step`` (the same step the throughput benchmark times), traces
one step after warm-up, and sums the trace's XLA thunk durations per HLO instruction. Each
instruction is named by the ``op_name`` metadata of the compiled HLO (layer indices folded to
``N``), so the table reads "MlpBlock/Dense/dot_general forward: 350 ms in 24 calls". Thunks run
concurrently on the CPU's threads, so the sum can exceed the step time.

  python benchmarks/profile_step.py --model vit_ti16 --batch 32 --dtype bfloat16
  python benchmarks/profile_step.py --model resnet50 --batch 16 --xla-defaults

The trace stays in ``--trace-dir`` for TensorBoard's profile plugin or Perfetto.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

from vision_jax import host_memory

sys.path.insert(0, os.path.dirname(__file__))
import train_throughput  # noqa: E402


def _instruction_labels(hlo_text: str) -> dict[str, str]:
    """HLO instruction name -> (kind, op_name) for the compiled module's instructions."""
    labels = {}
    pattern = re.compile(r"\s*(?:ROOT )?%([\w.\-]+) = \S+ (\S+?)\(")
    for line in hlo_text.splitlines():
        match = pattern.match(line)
        if not match:
            continue
        name, opcode = match.groups()
        if opcode == "fusion":
            kind = re.search(r'"kind":"(__\w+)"', line)
            opcode = kind.group(1).strip("_") if kind else name.rstrip("0123456789.")
        op_name = re.search(r'op_name="([^"]*)"', line)
        op_name = re.sub(r"\d+", "N", op_name.group(1)) if op_name else "(no op_name)"
        labels[name] = (opcode, op_name)
    return labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="vit_ti16")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--dtype", default="float32", help="float32 or bfloat16 (+lora:RANK)")
    parser.add_argument("--mode", choices=["train", "infer"], default="train")
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--xla-defaults", action="store_true",
                        help="compile without vision_jax.compile_options")  # fmt: skip
    parser.add_argument("--trace-dir", default=None)
    args = parser.parse_args()
    if args.xla_defaults:
        os.environ[train_throughput._XLA_DEFAULTS_ENV] = "1"

    import jax

    fn, step_args = train_throughput.build_jax_step(
        args.model, args.batch, args.size, args.dtype, args.mode
    )
    compiled = fn.lower(*step_args).compile()
    labels = _instruction_labels(compiled.as_text())

    def run(step_args):
        out = compiled(*step_args)
        jax.block_until_ready(out)
        return (out[0], *step_args[1:]) if args.mode == "train" else step_args

    for _ in range(2):
        step_args = run(step_args)
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        step_args = run(step_args)
        times.append(time.perf_counter() - t0)
    untraced_step_s = sorted(times)[1]
    trace_dir = args.trace_dir or tempfile.mkdtemp(prefix="vision_jax_trace_")
    t0 = time.perf_counter()
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        run(step_args)
    step_s = time.perf_counter() - t0

    traces = glob.glob(f"{trace_dir}/**/perfetto_trace.json.gz", recursive=True)
    trace_file = max(traces, key=os.path.getmtime)  # this run's (the folder may hold others)
    with gzip.open(trace_file) as f:
        events = json.load(f)
    events = events["traceEvents"] if isinstance(events, dict) else events
    totals, counts = collections.Counter(), collections.Counter()
    for event in events:
        label = labels.get(event.get("name", "")) if event.get("ph") == "X" else None
        if label:
            totals[label] += event["dur"] / 1e3
            counts[label] += 1
    total = sum(totals.values())
    run_name = f"{args.model} batch {args.batch} {args.dtype} {args.mode}"
    print(f"# {run_name}: step {untraced_step_s:.2f} s ({step_s:.2f} s traced); "
          f"traced XLA ops {total:.0f} ms; trace in {trace_dir}")  # fmt: skip
    print("# Dots and convolutions run by XLA's own (Eigen) kernels leave no trace event: the step")
    print("# time the table does not cover is theirs (less any overlap of concurrent thunks).")
    print(f"{'ms':>8} {'share':>6} {'calls':>5}  {'kind':<26} op")
    for (kind, op_name), ms in totals.most_common(args.top):
        share, calls = ms / (untraced_step_s * 1e3), counts[kind, op_name]
        print(f"{ms:>8.1f} {share:>6.1%} {calls:>5}  {kind[:26]:<26} {op_name[-90:]}")


if __name__ == "__main__":
    host_memory.set_up_single_process()  # as python -m vision_jax.main runs
    main()
