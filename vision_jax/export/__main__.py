"""``python -m vision_jax.export --workdir=RUN --format=savedmodel|stablehlo|tflite --output=DIR
[--which=best|latest] [--ema|--no-ema] [--quantize=none|float16|dynamic_int8|full_int8]
[--tflite_batch=1 (TFLite)] [--evaluate [--eval_examples=N]]``

Writes the run's model (uint8 images at its input size in, predictions out; see
:mod:`vision_jax.export`) and ``export.json`` into DIR. ``--quantize=full_int8`` also measures
the int8 model's agreement with float32 on its calibration images (the manifest's
``quantization_check``; a warning when low; not for a task of one's own). ``--evaluate``
(TFLite; a library task's run) also converts every quantisation and prints what each costs on
the run's evaluation split (size, accuracy and its change, agreement with float32, latency),
stored in the manifest as ``evaluation``.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import re
import sys
from collections.abc import Sequence

from vision_jax.data import DataError
from vision_jax.export.exporter import FORMATS, export_trained, write_manifest
from vision_jax.export.report import check_comparable, quantization_report
from vision_jax.export.serving import ExportError
from vision_jax.export.tflite import QUANTIZATIONS
from vision_jax.output_errors import failed_write, folder_problem, local_only, write_failure
from vision_jax.run_options import add_run_options
from vision_jax.signals import command
from vision_jax.trained import load_trained
from vision_jax.weights import WeightFormatError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m vision_jax.export", description=__doc__.split("\n\n")[1]
    )
    parser.add_argument("--workdir", required=True, help="the run's workdir")
    parser.add_argument("--format", required=True, choices=FORMATS)
    parser.add_argument("--output", required=True, help="the folder to write into")
    add_run_options(parser)
    parser.add_argument("--quantize", choices=QUANTIZATIONS, default="none")
    parser.add_argument(
        "--tflite_batch", type=int, help="the TFLite model's batch size (default 1)"
    )
    parser.add_argument(
        "--evaluate", action="store_true", help="compare the TFLite quantisations (see above)"
    )
    parser.add_argument(
        "--eval_examples", type=int, help="evaluate this many examples drawn at random (or all)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.evaluate and args.format != "tflite":
        parser.error("--evaluate compares TFLite quantisations: use it with --format=tflite.")
    if args.tflite_batch is not None and args.format != "tflite":
        parser.error(
            f"--tflite_batch is the TFLite model's batch size: use it with --format=tflite "
            f"({args.format} takes any batch size)."
        )
    if args.eval_examples is not None and not args.evaluate:
        parser.error("--eval_examples is the number --evaluate measures on: add --evaluate.")
    for flag in ("tflite_batch", "eval_examples"):
        if (value := getattr(args, flag)) is not None and value < 1:
            parser.error(f"--{flag} must be at least 1, got {value}.")
    problem = local_only(args.output, "an export")
    if problem or (problem := folder_problem(args.output)):  # before the run is read, converted
        print(f"error: --output {args.output}: {problem}", file=sys.stderr)
        return 1
    logging.basicConfig(level=logging.WARNING)
    try:
        trained = load_trained(args.workdir, which=args.which, ema=args.ema)
        if args.evaluate:  # before the export converts
            check_comparable(trained.task)
        manifest = export_trained(
            trained, args.output, format=args.format, quantize=args.quantize,
            tflite_batch=args.tflite_batch,
        )  # fmt: skip
        if args.evaluate:
            report = quantization_report(
                trained, batch=args.tflite_batch or 1, examples=args.eval_examples
            )
            print(report.table())
            manifest["evaluation"] = [dataclasses.asdict(r) for r in report.rows]
            write_manifest(args.output, manifest)
    except (ExportError, DataError, WeightFormatError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        if (line := failed_write(e, "export", args.output)) is None:
            raise  # not a write of the export
        print(f"error: {line}", file=sys.stderr)
        return 1
    except Exception as e:  # TensorFlow's own error for a failed write (SavedModel, TFLite)
        from vision_jax.tf_without_keras import tf

        message = getattr(e, "message", "")
        if not isinstance(e, tf.errors.OpError) or os.path.abspath(args.output) not in message:
            raise
        reason = re.sub(r"\{\{function_node [^}]*\}\}\s*", "", message.strip().splitlines()[0])
        print(f"error: {write_failure('export', args.output, None, reason)}", file=sys.stderr)
        return 1
    check = ""
    if (c := manifest.get("quantization_check")) is not None:
        check = f"; agreement with float32 on calibration images {c['agreement']:.4f}"
    print(f"wrote {args.format} to {args.output} (manifest export.json{check})")
    return 0


def _command() -> int:
    """:func:`main` as a command: Ctrl-C or SIGTERM ends it with one line, its partial files
    removed (:func:`vision_jax.signals.command`)."""
    return command(
        main, "vision_jax.export",
        "the export in --output is unfinished (export.json is written last): run it again.",
    )  # fmt: skip


if __name__ == "__main__":
    sys.exit(_command())
