"""The dispatcher: tells a source's format apart and calls that format's one reader.

======================  ==========================================  ====================
format                  source                                      reader
======================  ==========================================  ====================
``run``                 a vision_jax workdir (its best step; the    :mod:`.run_dir`
                        newest without a validation split or
                        before the first; an error if its
                        validations gave none), its
                        ``checkpoints`` folder (the newest) or a
                        step folder
``timm_hub``            a timm Hub folder (``config.json`` naming   :mod:`.timm_hub`
                        an ``architecture``, a state dict)
``hf``                  a Hugging Face ViT folder                   :mod:`.hf`
``npz``                 google-research / big_vision / BiT          :mod:`.npz`
``safetensors``         a timm / torchvision state dict             :mod:`.state_dict`
``torch``               ``.pth``/``.pt``/``.bin``/``.th``           :mod:`.state_dict`
======================  ==========================================  ====================

Every reader returns variables in vision_jax names (``{"params": ..., "batch_stats": ...}``)
for the classifier form of the model, and the source's :class:`InputContract`. Readers never
import this module.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import pathlib
from collections.abc import Callable

import flax.linen as nn

from vision_jax.models.registry import backbone_of
from vision_jax.weights import hf, npz, run_dir, state_dict, timm_hub
from vision_jax.weights.contract import InputContract
from vision_jax.weights.files import SUFFIXES, WeightFormatError, file_kind
from vision_jax.weights.merge import WeightMismatchError


@dataclasses.dataclass(frozen=True)
class Reader:
    """One format's variables (of the model's classifier form), input contract (for inference,
    where it differs: timm's test size and crop) and, where it names them, its classes."""

    variables: Callable[[pathlib.Path, nn.Module], dict]
    contract: Callable[[pathlib.Path], InputContract]
    class_names: Callable[[pathlib.Path], list[str] | None] = lambda _: None
    inference_contract: Callable[[pathlib.Path], InputContract] | None = None


READERS = {
    "run": Reader(
        lambda path, _, ema=None: run_dir.read_variables(path, "best", ema=ema),
        lambda path: run_dir.input_contract(path, "best"),
        lambda path: list(run_dir.read_record(path, "best").class_names or ()) or None,
    ),
    "timm_hub": Reader(
        timm_hub.read_variables,
        timm_hub.input_contract,
        timm_hub.class_names,
        functools.partial(timm_hub.input_contract, inference=True),
    ),
    "hf": Reader(hf.read_variables, hf.input_contract, hf.class_names),
    "npz": Reader(lambda path, _: npz.read_variables(path), npz.input_contract),
    "safetensors": Reader(
        state_dict.read_variables, state_dict.input_contract, state_dict.class_names
    ),
    "torch": Reader(state_dict.read_variables, state_dict.input_contract),
}


def detect_format(path: str | os.PathLike) -> str:
    """One of :data:`READERS`' formats for ``path``: folders by their contents, files by suffix
    and, for an unknown suffix, by their first bytes."""
    path = pathlib.Path(path)
    if path.is_dir():
        if timm_hub.is_folder(path):
            return "timm_hub"
        if hf.is_folder(path):
            return "hf"
        _check_not_a_partial_hub_folder(path)
        return "run"
    return file_kind(path)


def _check_not_a_partial_hub_folder(path: pathlib.Path) -> None:
    """Raises for a folder that is no run and holds half of a Hugging Face or timm Hub folder
    (its ``config.json`` or its weights file alone): the run reader would find no checkpoint."""
    names = {p.name for p in path.iterdir()}
    if names & {run_dir.CHECKPOINTS_DIR, run_dir.BEST_DIR, run_dir.STATE_ITEM} or any(
        n.isdigit() for n in names
    ):
        return
    weights = sorted(n for n in names if pathlib.Path(n).suffix in SUFFIXES)
    alone = f"; to read a weights file alone, pass it: {path / weights[0]}" if weights else ""
    if "config.json" in names:
        raise WeightFormatError(
            f"{path} holds config.json but none of {', '.join(hf.WEIGHT_FILES)} (a Hugging "
            f"Face or timm Hub folder holds one beside it){alone}."
        )
    if weights:
        raise WeightFormatError(
            f"{path} is no vision_jax run, and has no config.json (a Hugging Face or timm Hub "
            f"folder){alone}."
        )


def posemb_method(source: str | os.PathLike) -> str:
    """How the weights' own code resamples their position embeddings: bicubic for timm,
    torchvision and Hugging Face state dicts (timm's ``resample_abs_pos_embed`` exactly;
    torchvision's and Hugging Face's bicubic differ a little: corners aligned, or no
    antialiasing), bilinear for .npz files and vision_jax runs (the JAX reference,
    ``scipy.ndimage.zoom`` of order 1)."""
    return "bilinear" if detect_format(source) in ("npz", "run") else "bicubic"


def _classifier_view(model: nn.Module) -> nn.Module:
    """The registered backbone of ``model`` in its classifier form (converters describe that
    form; the feature form has the same parameters without the head)."""
    backbone = backbone_of(model)
    if getattr(backbone, "feature_taps", None) is not None:
        backbone = backbone.clone(parent=None, feature_taps=None)
    return backbone


def read_variables(source: str | os.PathLike, model: nn.Module, *, ema: bool | None = None) -> dict:
    """Reads ``source`` into variables in vision_jax names, as the checkpoint holds them;
    ``ema``: of a run, its EMA parameters or its trained ones (None: those its model selection
    measured, :func:`~vision_jax.weights.run_dir.read_variables`; other formats hold one set).

    The result is not yet adapted to ``model`` (head, class token, grids): see
    :func:`~vision_jax.weights.load_pretrained`. Raises :class:`WeightFormatError` for
    unreadable files and :class:`WeightMismatchError` for weights of another architecture,
    naming ``source``.
    """
    path = pathlib.Path(source)
    kind = detect_format(path)
    if ema is not None and kind != "run":
        raise WeightFormatError(
            f"{path} ({kind}) holds one set of weights: ema={ema} (init.ema) chooses between "
            "a vision_jax run's EMA and trained parameters."
        )
    reader = READERS[kind]
    try:
        chosen = {"ema": ema} if kind == "run" else {}  # (the others hold one set)
        return reader.variables(path, _classifier_view(model), **chosen)
    except WeightMismatchError as e:
        if str(path) in str(e):
            raise
        raise WeightMismatchError(f"Weights from {path} do not fit the model: {e}") from e


def describe_source(source: str | os.PathLike) -> str:
    """``source`` for an error message: its path, and for a run the model it trained (when its
    record can still be read)."""
    path = pathlib.Path(source)
    try:
        model = run_dir.read_record(path, "best").model if detect_format(path) == "run" else None
    except Exception:  # noqa: BLE001  (a message's detail; the error being raised matters)
        model = None
    return f"{path} (a run of {model})" if model else str(path)


def recorded_grid(source: str | os.PathLike) -> tuple[int, int] | None:
    """The position-embedding grid (rows, columns) a weight file records (a ``.safetensors``
    file that :func:`~vision_jax.weights.export_safetensors` wrote), else None."""
    path = pathlib.Path(source)
    return state_dict.checkpoint_grid(path) if detect_format(path) == "safetensors" else None


def input_contract(source: str | os.PathLike, *, inference: bool = False) -> InputContract:
    """The :class:`InputContract` of a checkpoint, in any format :func:`read_variables` reads:
    the input to fine-tune it on; ``inference``: the one to evaluate it with as it is (another
    for a timm Hub folder with a ``test_input_size`` or ``test_crop_pct``)."""
    path = pathlib.Path(source)
    reader = READERS[detect_format(path)]
    return ((reader.inference_contract if inference else None) or reader.contract)(path)


def class_names(source: str | os.PathLike) -> list[str] | None:
    """The class names a checkpoint records (a run's, a Hugging Face ``id2label``, those
    ``export_safetensors`` wrote), else None."""
    path = pathlib.Path(source)
    return READERS[detect_format(path)].class_names(path)
