"""The command-line options that pick what of a trained run the after-training commands
(report, predict, export) read: its step and which of its parameters."""

from __future__ import annotations

import argparse


def add_run_options(parser: argparse.ArgumentParser, *, which_default: str | None = "best") -> None:
    """Adds ``--which`` (the best step; the newest of a run without a validation split, or one
    cut short before its first; a run whose validations gave no best is an error; or the
    newest) and ``--ema``/``--no-ema`` (the step's EMA parameters or its trained ones; unset:
    the ones the run's model selection measured, see :func:`vision_jax.trained.load_trained`)."""
    parser.add_argument(
        "--which", choices=("best", "latest"), default=which_default,
        help="the run's step: the best one (best; a run without a validation split, or cut "
        "short before its first, gives its newest; one whose validations gave no best is an "
        "error); or the newest (latest)",
    )  # fmt: skip
    parser.add_argument(
        "--ema", action=argparse.BooleanOptionalAction,
        help="the step's EMA parameters (config.ema_decay), or its trained ones (--no-ema); "
        "default: the ones the run's model selection measured",
    )  # fmt: skip
