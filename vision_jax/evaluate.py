"""Evaluating a trained run without training: its metrics on any split of its data, at its
input size or another one (timm's ``validate.py``, detectron2's ``--eval-only``).

``python -m vision_jax.evaluate --workdir=RUN [--which=best|latest] [--ema|--no-ema]
[--split=SPLIT] [--image_size=N] [--batch_size=N] [--data_root=DIR] [--output=metrics.json]``
prints one line of JSON, ``{"eval/<metric>": value, ..., "eval/examples": n}``: the figures the
run's own final evaluation gives (the same eval step and the task's ``summarize``), here of the
split ``--split`` (default: the run's ``data.eval_split``; any split or slice its data source
has, e.g. ``train[:10%]``). ``--image_size`` evaluates at another input size (a ViT's position
embeddings resampled to the new grid, bilinearly as ``init.path`` does from a run): test-time
resolution, as FixRes. ``--data_root`` reads a dataset moved since the run (its
``data.root``; sources without one refuse it). In Python: :func:`evaluate_run`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import pathlib
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from vision_jax import data as data_lib
from vision_jax import sharding, specs
from vision_jax.compile_options import step_compiler_options
from vision_jax.data.sources import file_path
from vision_jax.metrics import json_line
from vision_jax.models.registry import backbone_of
from vision_jax.output_errors import file_problem, is_url, written_whole
from vision_jax.run_options import add_run_options
from vision_jax.signals import command
from vision_jax.steps import evaluate, make_eval_step
from vision_jax.trained import Trained, load_split, load_trained
from vision_jax.weights.load import load_pretrained

logger = logging.getLogger(__name__)


def evaluate_run(
    workdir: str | os.PathLike,
    *,
    which: str = "best",
    ema: bool | None = None,
    split: str | None = None,
    image_size: int | None = None,
    batch_size: int | None = None,
    data_root: str | os.PathLike | None = None,
    arrays: Mapping[str, Any] | None = None,
) -> dict[str, float]:
    """The task's metrics (``eval/...``, with ``eval/examples``) of the run in ``workdir`` on
    ``split`` of its data (None: its ``data.eval_split``), at ``image_size`` (None: its own),
    in batches of ``batch_size`` (None: its ``eval_batch_size``), read from ``data_root``
    (None: its ``data.root``; a dataset moved since, of a source read from a root); ``which``
    and ``ema`` choose the weights as :func:`~vision_jax.trained.load_trained` does;
    ``arrays``: the splits of a ``data.source="arrays"`` run. Uses every local device (a
    single-process command)."""
    trained = load_trained(workdir, which=which, ema=ema)
    spec, task = trained.spec, trained.task
    split = spec.data.eval_split if split is None else split
    if spec.data.source == "arrays" and arrays is None:
        pair = "(images, targets)"
        if data_lib.is_column_target(task.target):  # a column of one's own
            pair = f"{{'image': images, {task.target!r}: values}}"
        raise data_lib.DataError(
            f"The run in {workdir} trained on arrays passed from Python (data.source='arrays'): "
            f"evaluate it with evaluate_run(workdir, arrays={{{split!r}: {pair}}})."
        )
    data = spec.data
    if data_root is not None:
        if data.source not in data_lib.ROOT_SOURCES:
            raise data_lib.DataError(
                f"data_root {os.fspath(data_root)}: the run's data.source {data.source!r} is not "
                f"read from a data.root (those of {', '.join(map(repr, data_lib.ROOT_SOURCES))} "
                "are)."
            )
        data = dataclasses.replace(data, root=os.fspath(data_root))
    source = load_split(trained, split, data=data, arrays=arrays)
    if source.target == "label_map":  # as training warns of its eval split
        data_lib.warn_of_absent_classes(source)
    if image_size is None or image_size == trained.input.image_size:
        model, input_spec, variables = trained.model, trained.input, trained.variables
    else:
        with specs.saved_config(warn=False):  # its values as load_trained kept them
            input_spec = dataclasses.replace(trained.input, image_size=image_size)
        model, variables = _at_size(trained, image_size)
    mesh = sharding.create_mesh("data:-1", jax.local_devices())
    _check_batch_size(batch_size, spec.eval_batch_size, mesh)
    batch_size = spec.eval_batch_size if batch_size is None else batch_size
    logger.info(
        "Evaluating step %d of %s (%s parameters) on the split %r at %d px.", trained.step,
        trained.step_dir, "EMA" if trained.ema else "trained", split, input_spec.image_size,
    )  # fmt: skip
    eval_step = jax.jit(
        make_eval_step(model, task, mesh=mesh),
        out_shardings=(sharding.replicated(mesh), sharding.batch_sharding(mesh)),
        compiler_options=step_compiler_options(getattr(model, "dtype", jnp.float32)),
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


def _check_batch_size(batch_size: int | None, recorded: int, mesh: jax.sharding.Mesh) -> None:
    devices = sharding.data_parallel_size(mesh)
    size = recorded if batch_size is None else batch_size
    if size < 1 or size % devices:
        what = f"The run's eval_batch_size {size}" if batch_size is None else f"batch_size {size}"
        raise ValueError(
            f"{what} is not a positive multiple of the {devices} devices: pass a batch size "
            f"that is (--batch_size={max(devices, -(-size // devices) * devices)})."
        )


def _at_size(trained: Trained, image_size: int) -> tuple[Any, dict[str, Any]]:
    """``trained``'s model and variables for inputs of ``image_size`` pixels a side, loaded
    from its step as ``init.path`` loads a run: a ViT's position embeddings resampled to its
    new grid of patches (bilinear), its ``model.posemb_grid``, if the run set one, the new
    grid."""
    model, spec = trained.model, trained.spec
    if spec.model_overrides.get("posemb_grid") is not None:
        from vision_jax.run import task_model  # (imports the training stack)

        side = image_size // backbone_of(model).patch_size
        with specs.saved_config(warn=False):  # its values as load_trained kept them
            at_size = dataclasses.replace(
                spec, model_overrides={**spec.model_overrides, "posemb_grid": (side, side)},
                input=dataclasses.replace(spec.input, image_size=image_size),
            )  # fmt: skip
        model = task_model(at_size, len(trained.class_names))
    images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
    init = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), images)
    variables = load_pretrained(
        trained.step_dir, model=model, variables=init, image_size=image_size, ema=trained.ema,
        warn_unfinished=False,  # load_trained warned of that step
    )  # fmt: skip
    return model, variables


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
    parser.add_argument(
        "--data_root", help="the run's dataset moved here (default: the run's data.root)"
    )
    parser.add_argument("--output", help="also write the metrics to this JSON file")
    args = parser.parse_args(argv)
    for name in ("image_size", "batch_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}.")
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger(__name__).setLevel(logging.INFO)  # which step, split and size
    if args.output and (problem := file_problem(args.output)):
        print(f"vision_jax.evaluate: error: --output {args.output}: {problem}", file=sys.stderr)
        return 1
    try:
        results = evaluate_run(
            args.workdir, which=args.which, ema=args.ema, split=args.split,
            image_size=args.image_size, batch_size=args.batch_size, data_root=args.data_root,
        )  # fmt: skip
    except (ValueError, OSError) as e:  # an unreadable run, split or size
        print(f"vision_jax.evaluate: error: {e}", file=sys.stderr)
        return 1
    line = json_line(results)
    print(line, flush=True)  # first: a failed write below loses no figures
    if args.output:
        text = json.dumps(json.loads(line), indent=1) + "\n"
        try:
            if is_url(args.output):  # its folder made through its filesystem's library
                path = file_path(args.output)
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(text)
            else:
                os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
                with written_whole(args.output) as partial:
                    pathlib.Path(partial).write_text(text, encoding="utf-8")
        except Exception as e:  # OSError; a bucket's library raises its own errors
            print(f"vision_jax.evaluate: error: --output {args.output}: {e}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(command(main, "vision_jax.evaluate", "no figures (they come at the end)."))
