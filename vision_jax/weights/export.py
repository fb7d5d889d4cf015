"""Writing vision_jax variables as ``.npz`` (JAX names) or ``.safetensors`` (timm names)."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import numpy as np

from vision_jax.models.registry import backbone_of
from vision_jax.models.task_model import TASK_HEAD
from vision_jax.output_errors import written_whole
from vision_jax.trees import flatten_dict
from vision_jax.weights.contract import (
    GRID_KEY,
    as_contract,
    class_names_metadata,
    contract_metadata,
)
from vision_jax.weights.convert import converter
from vision_jax.weights.merge import key_groups
from vision_jax.weights.surgery import CLS, POSEMB

logger = logging.getLogger(__name__)


def export_npz(variables: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Writes ``variables["params"]`` as an ``.npz`` of flat "/"-joined names.

    For a ViT these are google-research/vision_transformer's names (its loaders and
    :func:`~vision_jax.weights.load_pretrained` read the file). A model with other collections
    (BatchNorm statistics) cannot be written this way: use :func:`export_safetensors`.
    """
    extra = sorted(set(variables) - {"params"})
    if extra:
        raise ValueError(
            f"export_npz writes parameters only, but the variables also hold {extra}; "
            "use export_safetensors for this model."
        )
    flat = {k: np.asarray(v) for k, v in flatten_dict(variables["params"]).items()}
    with written_whole(path) as partial, open(partial, "wb") as f:
        np.savez(f, **flat)


def export_safetensors(
    variables: Mapping[str, Any], model: nn.Module, path: str | os.PathLike, *,
    input: Any = None, class_names: Sequence[str] | None = None,
) -> None:  # fmt: skip
    """Writes ``variables`` as a timm state dict (``timm.create_model(...)`` loads it strictly;
    CIFAR ResNets get akamaster's names). The file's metadata (timm ignores it) records a ViT's
    position-embedding grid (:func:`~vision_jax.weights.load_pretrained` and the input contract
    read it: 9x16's 144 rows are no 12x12 grid) and, given ``input`` (a run's ``InputSpec``,
    ``load_trained(...).input``, or an :class:`InputContract`), the input the weights expect:
    their size, mean, std, resize interpolation, crop fraction and mode, which
    :func:`~vision_jax.weights.input_contract` (``Predictor.from_weights``,
    ``init.use_input_contract``) then gives instead of the layout's (timm AugReg's for a ViT);
    given ``class_names`` (a run's: ``load_trained(...).class_names``), the head's classes in
    order, which ``Predictor.from_weights`` then names (as timm's ``save_for_hf`` puts
    ``label_names`` in config.json).

    A task model's (segmentation, detection) is its backbone's, headless: timm has no such
    heads, so the task head is left out (logged); ``timm.create_model(name, num_classes=0)``
    loads the file, and so does ``init.path`` into any task's model."""
    from safetensors.numpy import save_file

    backbone = backbone_of(model)
    if class_names is not None:
        count = getattr(model, "num_classes", 0) if backbone is model else 0
        if not count:
            raise ValueError("class_names name a classifier's classes: this model has no head.")
        if isinstance(class_names, str) or len(class_names) != count:
            raise ValueError(
                f"class_names must name the head's {count} classes; got {class_names!r}."
            )
    if backbone is not model:
        head = [k for k in flatten_dict(variables) if k.split("/", 2)[1:2] == [TASK_HEAD]]
        logger.info(
            "export_safetensors writes the task model's backbone in timm's names; its task head "
            "(%d arrays: %s) has none and is left out.", len(head), key_groups(head, depth=3),
        )  # fmt: skip
    state_dict = converter(backbone).to_timm(variables, backbone)
    grid = _posemb_grid(variables, model)
    metadata = {} if input is None else contract_metadata(as_contract(input))
    if grid is not None:
        metadata[GRID_KEY] = ",".join(map(str, grid))
    if class_names is not None:
        metadata.update(class_names_metadata(class_names))
    with written_whole(path) as partial:
        arrays = {k: np.ascontiguousarray(v) for k, v in state_dict.items()}
        save_file(arrays, partial, metadata=metadata or None)


def _posemb_grid(variables: Mapping[str, Any], model: nn.Module) -> tuple[int, int] | None:
    """A ViT's position-embedding grid: its ``posemb_grid``, else the square of its rows."""
    flat = flatten_dict(variables)
    if POSEMB not in flat:
        return None
    grid = getattr(backbone_of(model), "posemb_grid", None)
    if grid is not None:
        return int(grid[0]), int(grid[1])
    side = math.isqrt(np.shape(flat[POSEMB])[1] - int(CLS in flat))
    return side, side
