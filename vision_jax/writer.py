"""Scalars and hyperparameters to the log (every process) and to TensorBoard event files.

The log lines (``[step] key=value, ...``) and event files are those of clu's default writer.
clu's ``metric_writers`` package is not imported: it imports TensorBoard's hparams API, whose
Keras callback class imports Keras, and Keras imports matplotlib and scikit-learn, seconds of
every run's start (``benchmarks/startup.py``). The hparams summary itself needs none of them.

An event file that cannot be written (a full disk, a lost bucket) costs a warning, not the run:
the log lines hold the same values, and checkpoints report their own failures.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping
from typing import Any

from vision_jax.tf_without_keras import tf

logger = logging.getLogger(__name__)


class MetricWriter:
    """Writes to the log, and to event files in ``logdir`` unless it is None (hosts other than
    the first only log)."""

    def __init__(self, logdir: str | None) -> None:
        self._logdir, self._failed = logdir, False
        self._events = None if logdir is None else tf.summary.create_file_writer(logdir)

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        items = sorted(scalars.items())
        values = [f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}" for k, v in items]
        logger.info("[%d] %s", step, ", ".join(values))
        if self._events is not None:
            with self._tolerated(), self._events.as_default():
                for key, value in scalars.items():
                    tf.summary.scalar(key, value, step=step)

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        """Hyperparameters (flat, values str/int/float/bool) for TensorBoard's HParams tab."""
        if self._events is None:
            return
        from tensorboard.plugins.hparams import summary_v2  # not .api: that imports Keras

        with self._tolerated(), self._events.as_default():
            summary_v2.hparams(dict(hparams))

    def flush(self) -> None:
        if self._events is not None:
            with self._tolerated():
                self._events.flush()

    def close(self) -> None:
        if self._events is not None:
            with self._tolerated():
                self._events.close()

    @contextlib.contextmanager
    def _tolerated(self) -> Iterator[None]:
        """A failed event write: one warning (later ones at DEBUG); the writer tries again."""
        try:
            yield
        except tf.errors.OpError as e:
            reason = (e.message or type(e).__name__).strip().splitlines()[0]
            level = logging.DEBUG if self._failed else logging.WARNING
            self._failed = True
            logger.log(
                level, "Cannot write TensorBoard events to %s (%s); the log lines keep the "
                "metrics.", self._logdir, reason,
            )  # fmt: skip
