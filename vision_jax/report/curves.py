"""Training curves from a run's TensorBoard event files (clu writes scalars as tensors)."""

from __future__ import annotations

import pathlib

from vision_jax.tf_without_keras import load as load_tensorflow

import numpy as np

from vision_jax.report.figures import curves_figure

LOSS, LEARNING_RATE = "train/loss", "train/learning_rate"


def _wanted(tag: str, headline: str) -> bool:
    """The training loss, the learning rate and every split's headline (``eval/top1``,
    ``val/top1``, ``eval_ema/top1``, ...)."""
    return tag in (LOSS, LEARNING_RATE) or tag.rsplit("/", 1)[-1] == headline


def read_scalars(workdir: str | pathlib.Path, headline: str | None = None) -> dict[str, tuple]:
    """``{tag: (steps, values)}`` of every scalar tag (with ``headline``: of the curves the
    report plots), sorted by step (the last value of a step written twice, e.g. by a resumed run);
    empty without event files."""
    if not any(pathlib.Path(workdir).glob("events.out.tfevents.*")):
        return {}
    load_tensorflow()  # first: TensorBoard imports TensorFlow (with Keras) itself
    from tensorboard.backend.event_processing import event_accumulator
    from tensorboard.util import tensor_util

    events = event_accumulator.EventAccumulator(str(workdir), size_guidance={"tensors": 0})
    events.Reload()
    scalars = {}
    for tag in events.Tags()["tensors"]:
        if headline is not None and not _wanted(tag, headline):
            continue
        by_step = {e.step: tensor_util.make_ndarray(e.tensor_proto) for e in events.Tensors(tag)}
        if any(np.size(v) != 1 for v in by_step.values()):  # not a scalar (hparams text)
            continue
        by_step = {step: float(np.ravel(v)[0]) for step, v in by_step.items()}
        steps = sorted(by_step)
        scalars[tag] = (np.asarray(steps), np.asarray([by_step[s] for s in steps]))
    return scalars


def plot_curves(scalars: dict[str, tuple], headline: str, path: pathlib.Path) -> bool:
    """Draws the loss, headline and learning-rate panels that ``scalars`` has data for; False
    (nothing drawn) when it has none."""
    curves = {tag: v for tag, v in scalars.items() if len(v[0])}
    panels = {
        LOSS: {tag: v for tag, v in curves.items() if tag == LOSS},
        headline: {tag: v for tag, v in curves.items() if tag not in (LOSS, LEARNING_RATE)},
        LEARNING_RATE: {tag: v for tag, v in curves.items() if tag == LEARNING_RATE},
    }
    panels = {title: lines for title, lines in panels.items() if lines}
    if not panels:
        return False
    curves_figure(panels, path)
    return True
