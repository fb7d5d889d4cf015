"""Loading pretrained weights into a model: read (:mod:`.dispatch`), adapt (:mod:`.surgery`),
merge strictly (:mod:`.merge`); and taking a checkpoint's input contract into a run's input."""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import numpy as np

from vision_jax.models.registry import backbone_of
from vision_jax.trees import flatten_dict, unflatten_dict
from vision_jax.weights import run_dir, surgery
from vision_jax.weights.contract import InputContract
from vision_jax.weights.dispatch import (
    describe_source,
    detect_format,
    input_contract,
    posemb_method,
    read_variables,
    recorded_grid,
)
from vision_jax.weights.merge import WeightMismatchError, merge_strict

logger = logging.getLogger(__name__)


def load_pretrained(
    source: str | os.PathLike,
    *,
    model: nn.Module,
    variables: Mapping[str, Any],
    replace_head: bool = False,
    dont_load: Sequence[str] = (),
    posemb: str | None = None,
    head_bias_init: float = 0.0,
    image_size: int | tuple[int, int] | None = None,
    checkpoint_grid: tuple[int, int] | None = None,
    ema: bool | None = None,
    warn_unfinished: bool = True,
) -> dict:
    """Loads pretrained weights into a copy of ``variables`` (the model's initial variables).

    Args:
      source: a weight file or folder in any supported format (detected from the path).
      model: the Flax module ``variables`` belong to (from ``create_model``).
      variables: the model's freshly initialised variables; they are not modified. They may be
        abstract (``jax.eval_shape`` of the init): the variables that keep their init values
        (a new head of a task model, ``dont_load``) then come back abstract, for the caller to
        initialise alone.
      replace_head: re-initialise the head even if the class count matches. It is re-initialised
        (zero kernel, bias ``head_bias_init``) anyway when the class count differs. A task
        model's head (``task_head/...``) starts from its own init then.
      dont_load: regexes over variable paths inside their collection (``head/.*``,
        ``Transformer/posembed_input/pos_embedding``); matching variables keep their init values.
      posemb: ``"bilinear"`` or ``"bicubic"`` resampling of position embeddings to a new grid;
        None: the weights' own convention (:func:`~vision_jax.weights.dispatch.posemb_method`).
        Set for a model without position embeddings, an error.
      head_bias_init: the bias of a re-initialised classifier head (an error where no such
        head is re-initialised: a task model, or a head loaded as it is).
      image_size: the (height, width) (or one side) ``variables`` were initialised at: a ViT's
        position embeddings are resampled to that grid of patches. None: the model's
        ``posemb_grid``, else a square grid (the position embedding's row count tells no other
        shape).
      checkpoint_grid: the checkpoint's grid of patches (rows, columns). None: the grid the file
        records (``export_safetensors`` writes it), else square when its row count differs
        from the model's, else the model's layout (an oblong model whose count is also a
        square's, e.g. 9x16 and 12x12, is an error naming both).
      ema: of a vision_jax run, its EMA parameters (True, with the EMA's BatchNorm statistics)
        or its trained ones (False); None: the ones its model selection measured (the EMA's
        when ``early_stopping.metric`` was an ``*_ema/`` metric). Set for another format, an
        error.
      warn_unfinished: of a vision_jax run, warn when the step read is before the end of a
        run that has not finished (False: the caller warned of that step already).

    Class tokens and position-embedding rows are dropped for ``gap`` models, position embeddings
    and patch embeddings are resampled to the model's grid and patch size, and every step is
    logged in one table. Any other difference raises :class:`WeightMismatchError` listing
    missing, unexpected and mis-shaped keys; nothing is returned half-loaded.
    """
    if detect_format(source) == "run":  # the step folder it reads, once (a live run moves on)
        source = run_dir.latest_step_dir(source, "best")
        if warn_unfinished:
            run_dir.warn_if_unfinished(source)
    name = str(source)
    if "params" not in variables:
        raise ValueError(
            "variables must be the model's variables as model.init returns them ({'params': "
            f"...}}); got a dict of {sorted(variables)[:5]}."
        )
    loaded = read_variables(source, model, ema=ema)
    flat_loaded = flatten_dict(loaded)
    if checkpoint_grid is None and surgery.POSEMB in flat_loaded:
        checkpoint_grid = recorded_grid(source)
    n_read = len(flat_loaded)
    model_grid = getattr(backbone_of(model), "posemb_grid", None)
    try:
        if posemb is not None and surgery.POSEMB not in flatten_dict(variables):
            raise ValueError(
                f"posemb={posemb!r} (init.posemb) resamples a ViT's position embeddings; this "
                "model has none."
            )
        flat, rows = surgery.adapt(
            variables,
            loaded,
            replace_head=replace_head,
            dont_load=dont_load,
            posemb=posemb or posemb_method(source),
            head_bias_init=head_bias_init,
            image_size=None if image_size is None else _height_width(image_size),
            checkpoint_grid=None if checkpoint_grid is None else _height_width(checkpoint_grid),
            model_grid=None if model_grid is None else _height_width(model_grid),
        )
    except ValueError as e:
        what = describe_source(source)
        raise WeightMismatchError(f"Cannot adapt weights from {what}: {e}") from e
    try:
        merged = merge_strict(variables, unflatten_dict(flat), source=name)
    except WeightMismatchError as e:  # named with the model a run trained
        raise WeightMismatchError(str(e).replace(name, describe_source(source), 1)) from e
    surgery.log_summary(name, rows, n_read)
    return merged


def _height_width(image_size: int | Sequence[int]) -> tuple[int, int]:
    height, width = np.broadcast_to(image_size, 2).tolist()
    return int(height), int(width)


def apply_input_contract(spec: Any, source: str | os.PathLike | InputContract) -> Any:
    """``spec`` (a frozen dataclass with ``mean``, ``std``, ``interpolation`` and ``crop_mode``,
    e.g. the run's ``InputSpec``) with the checkpoint's mean and std, unless the config set its
    own (values other than the defaults of :func:`vision_jax.config.default_config`), which
    then win; and likewise its interpolation and crop mode. ``source``: a weights path, or the
    contract itself (a resumed run's recorded one)."""
    from vision_jax.config import default_config

    recorded = isinstance(source, InputContract)
    contract = source if recorded else input_contract(source)
    where = "the checkpoint's run record" if recorded else source
    default = default_config().input
    for key in ("interpolation", "crop_mode"):
        if getattr(spec, key) == default[key]:
            spec = dataclasses.replace(spec, **{key: getattr(contract, key)})
    given = (tuple(spec.mean), tuple(spec.std))
    if given != (tuple(default.mean), tuple(default.std)):
        logger.info(
            "Input contract of %s (mean %s, std %s) not applied: input.mean/std are set to %s/%s.",
            where, contract.mean, contract.std, *given,
        )  # fmt: skip
        return spec
    logger.info(
        "Input contract of %s: mean %s, std %s, %s.", where, contract.mean, contract.std,
        spec.interpolation,
    )  # fmt: skip
    return dataclasses.replace(spec, mean=contract.mean, std=contract.std)
