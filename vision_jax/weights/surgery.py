"""Adapting loaded weights to a new model: head, class token, position and patch embeddings.

All steps work on flat ``{"collection/path": array}`` dicts and are driven by the shapes of the
model's freshly initialised variables; :func:`adapt` runs them in order and returns one row per
step for the summary table that the loader logs.

Resampling methods:

* position embeddings, ``"bilinear"`` (default): the JAX references' ``scipy.ndimage.zoom(grid,
  zoom, order=1)`` (google-research/vision_transformer and big_vision), i.e. linear interpolation
  with the corner tokens aligned, written in numpy; ``"bicubic"``: ``jax.image.resize(...,
  "bicubic")`` (half-pixel centres, Keys cubic, antialiased when shrinking), close to timm's
  ``resample_abs_pos_embed``. The class token is kept apart and never interpolated.
* patch embeddings: FlexiViT's pseudo-inverse resize (Beyer et al. 2023): the new kernel ``w'``
  solves ``<x, w> = <resize(x), w'>`` in the least-squares sense for patches ``x``, with
  ``resize`` bilinear (``jax.image.resize``). Upsampling the patch keeps every token exactly.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from vision_jax.masks import tree_mask
from vision_jax.models.task_model import TASK_HEAD
from vision_jax.trees import flatten_dict
from vision_jax.weights.merge import WeightMismatchError, key_groups

logger = logging.getLogger(__name__)

POSEMB = "params/Transformer/posembed_input/pos_embedding"
PATCH = "params/embedding/kernel"
CLS = "params/cls"
HEAD = ("params/head/kernel", "params/head/bias")
PRE_LOGITS = ("params/pre_logits/kernel", "params/pre_logits/bias")
POSEMB_METHODS = ("bilinear", "bicubic")

Flat = dict[str, Any]
Row = tuple[str, str]  # (step, detail)


def _linear_align_corners(x: np.ndarray, size: int, axis: int) -> np.ndarray:
    """Linear interpolation along ``axis`` to ``size`` samples, first and last samples aligned."""
    n = x.shape[axis]
    if n == size:
        return x
    pos = np.linspace(0.0, n - 1, size) if size > 1 else np.zeros(1)
    lo = np.clip(np.floor(pos).astype(int), 0, n - 1)
    hi = np.minimum(lo + 1, n - 1)
    shape = [1] * x.ndim
    shape[axis] = size
    frac = (pos - lo).reshape(shape)
    return np.take(x, lo, axis=axis) * (1 - frac) + np.take(x, hi, axis=axis) * frac


def resize_grid(grid: np.ndarray, new_hw: tuple[int, int], method: str = "bilinear") -> np.ndarray:
    """Resizes a ``(h, w, d)`` grid of embeddings to ``(*new_hw, d)`` (see the module docstring)."""
    if method == "bilinear":
        out = _linear_align_corners(grid.astype(np.float64), new_hw[0], 0)
        return _linear_align_corners(out, new_hw[1], 1).astype(grid.dtype)
    if method == "bicubic":
        shape = (*new_hw, grid.shape[-1])
        return np.asarray(jax.image.resize(grid, shape, "bicubic"), grid.dtype)
    raise ValueError(f"Unknown posemb resampling {method!r}; valid: {POSEMB_METHODS}.")


def _square(tokens: int, what: str, advice: str = "") -> int:
    side = math.isqrt(tokens)
    if side * side != tokens:
        raise ValueError(f"{what} has {tokens} grid tokens, not a square grid{advice}.")
    return side


def resample_posemb(
    posemb: np.ndarray,
    *,
    num_prefix: int,
    new_grid: tuple[int, int],
    method: str = "bilinear",
    old_grid: tuple[int, int] | None = None,
) -> np.ndarray:
    """Resamples ``(1, num_prefix + h * w, d)`` position embeddings of the grid ``old_grid``
    ((h, w); None: square) to ``new_grid``; the ``num_prefix`` leading tokens (the class
    token's) are kept as they are."""
    prefix, grid = posemb[:, :num_prefix], posemb[0, num_prefix:]
    if old_grid is None:
        side = _square(
            grid.shape[0],
            "The checkpoint's position embedding",
            f" (with {num_prefix} class-token row(s) before it): pass its grid "
            "(load_pretrained's checkpoint_grid=(rows, columns))",
        )
        old_grid = (side, side)
    grid = resize_grid(grid.reshape(*old_grid, -1), new_grid, method)
    return np.concatenate([prefix, grid.reshape(1, -1, grid.shape[-1])], axis=1)


def resample_patch_embed(kernel: np.ndarray, new_hw: tuple[int, int]) -> np.ndarray:
    """FlexiViT's pseudo-inverse resize of a ``(p, p, in, out)`` patch-embedding kernel."""
    old_hw = kernel.shape[:2]
    n_old = old_hw[0] * old_hw[1]
    basis = np.eye(n_old, dtype=np.float32).reshape(n_old, *old_hw)
    resized = jax.image.resize(basis, (n_old, *new_hw), "bilinear")  # B[:, i] = resize(e_i)
    resize_mat = np.asarray(resized, np.float64).reshape(n_old, -1).T  # (n_new, n_old)
    pinv = np.linalg.pinv(resize_mat.T)  # (n_new, n_old)
    flat = kernel.reshape(n_old, -1).astype(np.float64)
    return (pinv @ flat).reshape(*new_hw, *kernel.shape[2:]).astype(kernel.dtype)


def dont_load_paths(patterns: Sequence[str], init: Mapping[str, Any]) -> set[str]:
    """Full ``collection/path`` names of the variables matched by any of ``patterns``.

    A pattern matches (``re.fullmatch``) the path inside a collection, e.g. ``head/.*`` or
    ``Transformer/posembed_input/pos_embedding``; it applies in every collection (``bn1/.*``
    covers BatchNorm scale, bias and statistics). A pattern that matches nothing is an error.
    """
    if isinstance(patterns, str):
        patterns = [patterns]
    paths: set[str] = set()
    for pattern in patterns:
        hits = {
            f"{col}/{path}"
            for col, tree in init.items()
            for path, hit in flatten_dict(tree_mask(pattern, dict(tree))).items()
            if hit
        }
        if not hits:
            raise ValueError(f"dont_load pattern {pattern!r} matches no variable of the model.")
        paths |= hits
    return paths


def _head(init: Flat, loaded: Flat, force: bool, bias_init: float) -> list[Row]:
    dropped = [p for p in PRE_LOGITS if p in loaded and p not in init]
    for path in dropped:
        del loaded[path]
    rows = [("pre_logits", "dropped (the model has no representation layer)")] if dropped else []
    if HEAD[0] not in init:
        if bias_init:
            raise ValueError(
                f"head_bias_init={bias_init} (init.head_bias_init) is the bias of a replaced "
                "classifier head (head/bias), which this model does not have: a task model's "
                "head (task_head/...) starts from its own initialisation."
            )
        if any(p in loaded for p in HEAD):
            for p in HEAD:
                loaded.pop(p, None)
            rows.append(("head", "dropped (the model is headless)"))
        return rows
    if HEAD[0] not in loaded:
        why = "initialised (the checkpoint has none)"
    elif np.shape(loaded[HEAD[0]]) != np.shape(init[HEAD[0]]):
        why = f"replaced: {np.shape(loaded[HEAD[0]])} -> {np.shape(init[HEAD[0]])}"
    elif force:
        why = "replaced on request"
    elif bias_init:
        raise ValueError(
            f"head_bias_init={bias_init} (init.head_bias_init) would not be used: the "
            f"checkpoint's head {np.shape(loaded[HEAD[0]])} fits the model and is loaded as it "
            "is. Replace it (init.replace_head=True) to start it with that bias, or leave "
            "head_bias_init unset."
        )
    else:
        return rows
    loaded[HEAD[0]] = np.zeros(np.shape(init[HEAD[0]]), np.float32)
    loaded[HEAD[1]] = np.full(np.shape(init[HEAD[1]]), bias_init, np.float32)
    return rows + [("head", f"{why}; zero kernel, bias {bias_init}")]


def _task_head(init: Flat, loaded: Flat, force: bool) -> list[Row]:
    """A task model's head (``task_head/...``) starts fresh unless the checkpoint holds the same
    head (a run of the same task and classes) and ``force`` (``replace_head``) is not set; a
    model without one (a classifier) drops the checkpoint's (a segmentation or detection
    run's). The row names the fresh arrays and those of the checkpoint's head left unloaded
    (another task's or head's, or of other shapes), as a strict=False load lists them."""
    paths = [p for p in init if p.split("/", 2)[1:2] == [TASK_HEAD]]
    theirs = [p for p in loaded if p.split("/", 2)[1:2] == [TASK_HEAD]]
    if not paths:
        for path in theirs:
            del loaded[path]
        return [("task head", f"dropped ({len(theirs)} arrays: the model has none)")] * bool(theirs)
    same = all(p in loaded and np.shape(loaded[p]) == np.shape(init[p]) for p in paths)
    if same and not force:
        return []
    for path in theirs:
        del loaded[path]
    loaded.update({p: init[p] for p in paths})
    fresh = f"{len(paths)} arrays ({key_groups(paths, depth=3)})"
    if same:
        return [("task head", f"initialised fresh on request: {fresh}")]
    if not theirs:
        return [("task head", f"initialised fresh (the checkpoint has none): {fresh}")]
    why = "other shapes" if set(theirs) == set(paths) else "another head"
    dropped = f"{len(theirs)} arrays ({key_groups(theirs, depth=3)})"
    return [("task head", f"initialised fresh: {fresh}; the checkpoint's not loaded ({why}): "
             f"{dropped}")]  # fmt: skip


def _model_grid(
    init: Flat, image_size: tuple[int, int] | None, model_grid: tuple[int, int] | None
) -> tuple[int, int]:
    """The model's patch grid (rows, columns): ``image_size`` over the patch embedding's kernel
    size; without ``image_size``, the grid the model names (a ViT's ``posemb_grid``), else the
    square grid of its position embedding's rows."""
    tokens = np.shape(init[POSEMB])[1] - int(CLS in init)
    if image_size is None and model_grid is not None:
        return tuple(model_grid)
    if image_size is None:
        side = _square(
            tokens,
            "The model's position embedding",
            ": pass the model's image size (load_pretrained's image_size=(height, width))",
        )
        return side, side
    patch = np.shape(init[PATCH])[:2]
    grid = (image_size[0] // patch[0], image_size[1] // patch[1])
    if grid[0] * grid[1] != tokens or model_grid not in (None, grid):
        named = f"the model's posemb_grid is {model_grid}" if model_grid else (
            f"the model's position embedding has {tokens} grid rows")  # fmt: skip
        raise ValueError(
            f"image_size {tuple(image_size)} with {patch[0]}x{patch[1]} patches is a "
            f"{grid[0]}x{grid[1]} grid, but {named}: pass the size the model was initialised "
            "at."
        )
    return grid


def _posemb(
    init: Flat,
    loaded: Flat,
    had_cls: bool,
    method: str,
    image_size: tuple[int, int] | None,
    checkpoint_grid: tuple[int, int] | None,
    model_grid: tuple[int, int] | None,
) -> list[Row]:
    if POSEMB not in loaded or POSEMB not in init:
        return []
    old, tokens = loaded[POSEMB], np.shape(init[POSEMB])[1]
    new_prefix = int(CLS in init)
    if old.shape[1] == tokens and had_cls == bool(new_prefix):
        if checkpoint_grid is None and image_size is None and model_grid is None:
            return []  # the model's own layout (non-square grids included)
        grid = _model_grid(init, image_size, model_grid)
        if checkpoint_grid is None:
            _check_unambiguous(grid)
            return []
        if tuple(checkpoint_grid) == grid:
            return []
    rows = []
    if checkpoint_grid is not None:  # its grid given: the rows before it are prefix rows
        old_prefix = old.shape[1] - checkpoint_grid[0] * checkpoint_grid[1]
        if old_prefix not in (0, 1):
            raise ValueError(
                f"checkpoint_grid {tuple(checkpoint_grid)} does not fit the checkpoint's "
                f"{old.shape[1]} position-embedding rows (a grid and at most a class token's)."
            )
    else:
        # A grid's rows are a square; one more is a class token's row (old checkpoints of gap
        # models keep one too). big_vision's tok ViTs and timm's no_embed_class ones give their
        # class token no position embedding: a zero row is the same function. (A grid of
        # another shape cannot be told from the row count: checkpoint_grid tells it.)
        old_prefix = int(math.isqrt(old.shape[1]) ** 2 != old.shape[1])
    if had_cls and new_prefix and not old_prefix:
        old, old_prefix = np.concatenate([np.zeros_like(old[:, :1]), old], axis=1), 1
        rows.append(("posemb", "zero row added for the class token (it had none)"))
    if old_prefix > new_prefix:
        old = old[:, old_prefix - new_prefix :]
        old_prefix = new_prefix
        rows.append(("posemb", "class-token row dropped (the model pools with gap)"))
    grid = _model_grid(init, image_size, model_grid)
    if checkpoint_grid is None:  # square, or the model's grid with the model's count
        count = old.shape[1] - old_prefix
        side = math.isqrt(count)
        if side * side != count and count != grid[0] * grid[1]:
            _square(count, "The checkpoint's position embedding", f" (the model's: {grid[0]}x"
                    f"{grid[1]}): pass its grid (load_pretrained's checkpoint_grid=(rows, "
                    "columns))")  # fmt: skip
        checkpoint_grid = (side, side) if side * side == count else grid
    if tuple(checkpoint_grid) != grid:
        old = resample_posemb(
            old, num_prefix=old_prefix, new_grid=grid, method=method, old_grid=checkpoint_grid
        )
        unknown = image_size is None and model_grid is None
        assumed = " (the model's grid taken as square)" if unknown else ""
        was = "x".join(map(str, checkpoint_grid))
        rows.append(("posemb", f"resampled {was} -> {grid[0]}x{grid[1]} ({method}){assumed}"))
    loaded[POSEMB] = old
    return rows


def _check_unambiguous(grid: tuple[int, int]) -> None:
    """Raises when a checkpoint with the row count of the model's ``grid`` may hold another
    grid: ``grid`` is oblong and its count a square (9x16's 144 rows, or 12x12's)."""
    rows, columns = grid
    side = math.isqrt(rows * columns)
    if rows != columns and side * side == rows * columns:
        raise ValueError(
            f"The checkpoint's position embedding has the row count of the model's {rows}x"
            f"{columns} grid and of a {side}x{side} one: pass its grid (load_pretrained's "
            f"checkpoint_grid=({rows}, {columns}) or ({side}, {side}))."
        )


def adapt(
    init: Mapping[str, Any],
    loaded: Mapping[str, Any],
    *,
    replace_head: bool = False,
    dont_load: Sequence[str] = (),
    posemb: str = "bilinear",
    head_bias_init: float = 0.0,
    image_size: tuple[int, int] | None = None,
    checkpoint_grid: tuple[int, int] | None = None,
    model_grid: tuple[int, int] | None = None,
) -> tuple[dict, list[Row]]:
    """Adapts nested ``loaded`` variables to the model whose initial variables are ``init``
    (initialised at ``image_size``, (height, width); None: the grid of patches the model names,
    ``model_grid``, else a square one; the checkpoint's grid of patches is ``checkpoint_grid``,
    None: square, or the model's).

    Returns the adapted flat variables and the summary rows. Whatever still differs afterwards is
    left for the strict merge to report.
    """
    if posemb not in POSEMB_METHODS:
        raise ValueError(f"Unknown posemb resampling {posemb!r}; valid: {POSEMB_METHODS}.")
    flat_init, flat = flatten_dict(init), dict(flatten_dict(loaded))
    keep = dont_load_paths(dont_load, init) if dont_load else set()
    for path in keep:
        flat.pop(path, None)
    rows: list[Row] = []
    had_cls = CLS in flat
    vit_without_cls = any(p.startswith("params/Transformer") for p in flat) and not had_cls
    if vit_without_cls and CLS in flat_init and CLS not in keep:
        raise WeightMismatchError(
            "The checkpoint's ViT has no class token (it pools the average of its patch tokens) "
            "and the model pools its class token: build the model with pool_type='gap' "
            "(in the config file: c.model.pool_type = 'gap')."
        )
    if had_cls and CLS not in flat_init and CLS not in keep:
        del flat[CLS]
        rows.append(("cls", "dropped (the model pools with gap)"))
    if not any(p in keep for p in HEAD):
        rows += _head(flat_init, flat, replace_head, head_bias_init)
    elif head_bias_init:
        raise ValueError(
            f"head_bias_init={head_bias_init} (init.head_bias_init) would not be used: "
            "init.dont_load keeps the head's init values."
        )
    rows += _task_head(flat_init, flat, replace_head)
    rows += _posemb(flat_init, flat, had_cls, posemb, image_size, checkpoint_grid, model_grid)
    if PATCH in flat and PATCH in flat_init:
        old, new = np.shape(flat[PATCH]), np.shape(flat_init[PATCH])
        if old[:2] != new[:2] and old[2:] == new[2:]:
            flat[PATCH] = resample_patch_embed(np.asarray(flat[PATCH]), new[:2])
            rows.append(("patch embedding", f"{old[:2]} -> {new[:2]} (FlexiViT PI-resize)"))
    if keep:
        for path in keep:
            flat[path] = flat_init[path]
        rows.append(
            ("dont_load", f"{len(keep)} array(s) keep their init values: {list(dont_load)}")
        )
    return flat, rows


def log_summary(source: str, rows: list[Row], n_arrays: int) -> None:
    """Logs one table of what the loader did (also when it did nothing but read ``n_arrays``)."""
    rows = [("read", f"{n_arrays} arrays")] + rows
    width = max(len(step) for step, _ in rows)
    table = "\n".join(f"  {step:<{width}}  {detail}" for step, detail in rows)
    logger.info("Pretrained weights from %s:\n%s", source, table)
