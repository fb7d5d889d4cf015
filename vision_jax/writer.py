"""Scalars and hyperparameters to the log (every process) and to TensorBoard event files.

The log lines (``[step] key=value, ...``) and event files are those of clu's default writer.
clu's ``metric_writers`` package is not imported: it imports TensorBoard's hparams API, whose
Keras callback class imports Keras, and Keras imports matplotlib and scikit-learn, seconds of
every run's start (``benchmarks/startup.py``). The hparams summary itself needs none of them.

An event file that cannot be written (a full disk, a lost bucket) costs a warning, not the run:
the log lines hold the same values, and checkpoints report their own failures.

Each run's events begin with TensorBoard's restart marker (:meth:`MetricWriter.write_start`):
a run resumed after a crash writes the steps after its checkpoint again, and TensorBoard then
shows the new values alone instead of both (a line drawn back to the checkpoint's step).
"""

from __future__ import annotations

import contextlib
import logging
import time
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

    def write_start(self, step: int) -> None:
        """Marks the start of this process's events at ``step`` (its first step: a resumed
        run's restored step + 1) with a ``SessionLog.START`` event, TensorBoard's restart
        marker: TensorBoard drops the events an earlier process wrote from ``step`` on (the
        steps after the checkpoint it resumed from, before a crash), which this run writes
        again. A workdir's first start drops nothing."""
        if self._events is None:
            return
        log = tf.compat.v1.SessionLog(status=tf.compat.v1.SessionLog.START)
        event = tf.compat.v1.Event(step=step, wall_time=time.time(), session_log=log)
        with self._tolerated():  # (tf.summary writes summaries only: the writer's own op)
            tf.raw_ops.ImportEvent(writer=self._events._resource, event=event.SerializeToString())

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
