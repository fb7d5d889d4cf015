"""Evaluating a trained run without training: its metrics on any split of its data, at its
input size or another one (timm's ``validate.py``, detectron2's ``--eval-only``).

``python -m vision_jax.evaluate --workdir=RUN [--which=best|latest] [--ema|--no-ema]
[--split=SPLIT] [--image_size=N] [--batch_size=N] [--output=metrics.json]`` prints one line of
JSON, ``{"eval/<metric>": value, ..., "eval/examples": n}``: the figures the run's own final
evaluation gives (the same eval step and the task's ``summarize``), here of the split ``--split``
(default: the run's ``data.eval_split``; any split or slice its data source has, e.g.
``train[:10%]``). ``--image_size`` evaluates at another input size (a ViT's position
embeddings resampled to the new grid, bilinearly as ``init.path`` does from a run): test-time
resolution, as FixRes. In Python: :func:`evaluate_run`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from vision_jax import data as data_lib
from vision_jax import sharding, specs
from vision_jax.compile_options import step_compiler_options
from vision_jax.metrics import json_line
from vision_jax.run_options import add_run_options
from vision_jax.steps import evaluate, make_eval_step
from vision_jax.trained import Trained, load_trained
from vision_jax.trees import unflatten_dict
from vision_jax.weights import surgery
from vision_jax.weights.merge import merge_strict

logger = logging.getLogger(__name__)


def evaluate_run(
    workdir: str | os.PathLike,
    *,
    which: str = "best",
    ema: bool | None = None,
    split: str | None = None,
    image_size: int | None = None,
    batch_size: int | None = None,
    arrays: Mapping[str, Any] | None = None,
) -> dict[str, float]:
    """The task's metrics (``eval/...``, with ``eval/examples``) of the run in ``workdir`` on
    ``split`` of its data (None: its ``data.eval_split``), at ``image_size`` (None: its own),
    in batches of ``batch_size`` (None: its ``eval_batch_size``); ``which`` and ``ema`` choose
    the weights as :func:`~vision_jax.trained.load_trained` does; ``arrays``: the splits of a
    ``data.source="arrays"`` run. Uses every local device (a single-process command)."""
    trained = load_trained(workdir, which=which, ema=ema)
    spec, task = trained.spec, trained.task
    split = spec.data.eval_split if split is None else split
    if spec.data.source == "arrays" and arrays is None:
        raise data_lib.DataError(
            f"The run in {workdir} trained on arrays passed from Python (data.source='arrays'): "
            f"evaluate it with evaluate_run(workdir, arrays={{{split!r}: (images, targets)}})."
        )
    source = data_lib.load_source(spec.data, split, arrays=arrays, target=task.target)
    _check_classes(trained, source, split)
    input_spec, variables = trained.input, trained.variables
    if image_size is not None and image_size != input_spec.image_size:
        with specs.saved_config(warn=False):  # its values as load_trained kept them
            input_spec = dataclasses.replace(input_spec, image_size=image_size)
        variables = _at_size(trained, image_size)
    mesh = sharding.create_mesh("data:-1", jax.local_devices())
    batch_size = spec.eval_batch_size if batch_size is None else batch_size
    _check_batch_size(batch_size, mesh)
    eval_step = jax.jit(
        make_eval_step(trained.model, task, mesh=mesh),
        out_shardings=(sharding.replicated(mesh), sharding.batch_sharding(mesh)),
        compiler_options=step_compiler_options(getattr(trained.model, "dtype", jnp.float32)),
    )
    variables = jax.device_put(variables, sharding.replicated(mesh))
    params = variables["params"]
    model_state = {k: v for k, v in variables.items() if k != "params"}
    batches = data_lib.eval_batches(
        source, input_spec, global_batch=batch_size, **task.batch_args()
    )
    with contextlib.closing(batches):
        total = evaluate(eval_step, (params, model_state), {}, batches, mesh)
    return task.summarize(total, source, "eval/")


def _check_classes(trained: Trained, source: data_lib.Source, split: str) -> None:
    """Refuses a split whose classes are not the run's, in the run's order (its labels would
    mean other classes than the model's outputs)."""
    if trained.class_names and list(source.class_names) != trained.class_names:
        raise data_lib.DataError(
            f"The split {split!r} has the classes {', '.join(source.class_names[:8])}"
            f"{', ...' if len(source.class_names) > 8 else ''}; the run was trained on "
            f"{', '.join(trained.class_names[:8])}"
            f"{', ...' if len(trained.class_names) > 8 else ''} (these, in this order)."
        )


def _check_batch_size(batch_size: int, mesh: jax.sharding.Mesh) -> None:
    devices = sharding.data_parallel_size(mesh)
    if batch_size < 1 or batch_size % devices:
        raise ValueError(
            f"batch_size {batch_size} must be a positive multiple of the {devices} devices."
        )


def _at_size(trained: Trained, image_size: int) -> dict[str, Any]:
    """``trained``'s variables for inputs of ``image_size`` pixels a side: a ViT's position
    embeddings resampled to its new grid of patches (bilinear, as ``init.path`` from a run)."""
    images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
    init = jax.eval_shape(lambda x: trained.model.init(jax.random.key(0), x, train=False), images)
    flat, rows = surgery.adapt(init, trained.variables, image_size=(image_size, image_size))
    surgery.log_summary(trained.step_dir, rows, len(flat))
    return merge_strict(init, unflatten_dict(flat), source=trained.step_dir)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m vision_jax.evaluate",
        description="Evaluates a trained run on a split of its data, without training.",
    )
    parser.add_argument("--workdir", required=True, help="the run's workdir")
    add_run_options(parser)
    parser.add_argument("--split", help="the split (default: the run's data.eval_split)")
    parser.add_argument("--image_size", type=int, help="input size (default: the run's)")
    parser.add_argument("--batch_size", type=int, help="default: the run's eval_batch_size")
    parser.add_argument("--output", help="also write the metrics to this JSON file")
    args = parser.parse_args(argv)
    for name in ("image_size", "batch_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}.")
    logging.basicConfig(level=logging.WARNING)
    try:
        results = evaluate_run(
            args.workdir, which=args.which, ema=args.ema, split=args.split,
            image_size=args.image_size, batch_size=args.batch_size,
        )  # fmt: skip
        line = json_line(results)
        if args.output:
            with open(args.output, "w", encoding="utf-8") as f:
                f.write(json.dumps(json.loads(line), indent=1) + "\n")
    except (ValueError, OSError) as e:  # an unreadable run, split or size; a failed write
        print(f"vision_jax.evaluate: error: {e}", file=sys.stderr)
        return 1
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
