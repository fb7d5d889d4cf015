"""``python -m vision_jax.report --workdir=RUN [--output=DIR] [--which=best|latest]
[--ema|--no-ema] [--hardest=16]``: writes the run's report (see :mod:`vision_jax.report`) and
prints the path of its ``report.html``. Exit status 1 with one line on stderr when the run
cannot be read, or when its evaluation split cannot be loaded and the output holds an evaluated
report (kept as it was)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from vision_jax.run_options import add_run_options
from vision_jax.signals import command


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m vision_jax.report", description="Writes a trained run's report."
    )
    parser.add_argument("--workdir", required=True, help="the run's workdir")
    parser.add_argument("--output", help="folder for the report (default: <workdir>/report)")
    add_run_options(parser)
    parser.add_argument("--hardest", type=int, default=16, help="hardest examples to show")
    args = parser.parse_args(argv)
    if args.hardest < 0:
        parser.error(f"--hardest must be >= 0 (examples to show), got {args.hardest}.")
    logging.basicConfig(level=logging.WARNING)
    # after parsing: --help stays fast
    from vision_jax.output_errors import failed_write, folder_problem, local_only
    from vision_jax.report import REPORT_DIR, ReportError, write_report
    from vision_jax.weights.files import WeightFormatError

    output = args.output or os.path.join(args.workdir, REPORT_DIR)
    named = f"--output {output}" if args.output else f"the report folder {output} (--output)"
    # before the run is read and predicted (a missing workdir: the error reading it comes first)
    problem = local_only(output, "the report")
    if problem or os.path.isdir(args.workdir) and (problem := folder_problem(output)):
        print(f"vision_jax.report: error: {named}: {problem}", file=sys.stderr)
        return 1
    try:
        path = write_report(
            args.workdir, args.output, args.which, ema=args.ema, hardest=args.hardest
        )
    except (WeightFormatError, ReportError) as e:
        print(f"vision_jax.report: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # a failed write (a full disk), or e.g. a file not found
        print(f"vision_jax.report: error: {failed_write(e, 'report', output) or e}",
              file=sys.stderr)  # fmt: skip
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(command(main, "vision_jax.report", "the report is unfinished: run it again."))
