"""``python -m vision_jax.report --workdir=RUN [--output=DIR] [--which=best|latest]
[--hardest=16]``: writes the run's report (see :mod:`vision_jax.report`) and prints the path of
its ``report.html``. Exit status 1 with one line on stderr when the run cannot be read."""

from __future__ import annotations

import argparse
import errno
import logging
import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Writes a trained run's report.")
    parser.add_argument("--workdir", required=True, help="the run's workdir")
    parser.add_argument("--output", help="folder for the report (default: <workdir>/report)")
    parser.add_argument(
        "--which", choices=("best", "latest"), default="best",
        help="the step to report: the best one if the run kept one, else the newest; or the newest",
    )  # fmt: skip
    parser.add_argument("--hardest", type=int, default=16, help="hardest examples to show")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    from vision_jax.report import write_report  # after parsing: --help stays fast
    from vision_jax.weights.files import WeightFormatError

    try:
        path = write_report(args.workdir, args.output, args.which, hardest=args.hardest)
    except WeightFormatError as e:
        print(f"vision_jax.report: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # a full disk, a folder not writable: what was written is incomplete
        if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES):
            print(f"vision_jax.report: error: {e}", file=sys.stderr)  # e.g. a file not found
            return 1
        where = e.filename or args.output or f"{args.workdir}/report"
        print(f"vision_jax.report: error: cannot write {where}: {e.strerror or e}; the "
              "report there is incomplete.", file=sys.stderr)  # fmt: skip
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
