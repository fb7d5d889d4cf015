"""timm <-> Flax weight conversion for the Vision Transformer.

timm's ``VisionTransformer`` keeps torch layouts and fuses query, key and value into one
``attn.qkv`` Linear of shape ``(3 * D, D)``; the Flax model (google-research layout) keeps them
apart with a per-head layout: ``query/kernel`` is ``(D, heads, head_dim)``, ``out/kernel`` is
``(heads, head_dim, D)``. Both directions are written once, as a table of ``(timm key, Flax path,
to_flax, to_timm)`` rows built from the model's configuration.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np

from vision_jax.models.vit import VisionTransformer
from vision_jax.trees import flatten_dict, unflatten_dict
from vision_jax.weights.merge import WeightMismatchError, key_groups

Array = np.ndarray
# (timm key, Flax path "params/...", timm -> flax, flax -> timm); a timm key may feed several
# Flax paths (the fused qkv), so the reverse direction is handled by :func:`to_timm`.
Row = tuple[str, str, Callable[[Array], Array], Callable[[Array], Array]]

_copy = lambda w: w


def _linear(torch_prefix: str, flax_prefix: str) -> Iterator[Row]:
    yield f"{torch_prefix}.weight", f"params/{flax_prefix}/kernel", lambda w: w.T, lambda w: w.T
    yield f"{torch_prefix}.bias", f"params/{flax_prefix}/bias", _copy, _copy


def _norm(torch_prefix: str, flax_prefix: str) -> Iterator[Row]:
    yield f"{torch_prefix}.weight", f"params/{flax_prefix}/scale", _copy, _copy
    yield f"{torch_prefix}.bias", f"params/{flax_prefix}/bias", _copy, _copy


def _rows(model: VisionTransformer) -> Iterator[Row]:
    d, heads = model.width, model.num_heads
    hd = d // heads
    yield (
        "patch_embed.proj.weight", "params/embedding/kernel",
        lambda w: w.transpose(2, 3, 1, 0), lambda w: w.transpose(3, 2, 0, 1),
    )  # fmt: skip
    yield "patch_embed.proj.bias", "params/embedding/bias", _copy, _copy
    if model.pool_type == "token":
        yield "cls_token", "params/cls", _copy, _copy
    yield "pos_embed", "params/Transformer/posembed_input/pos_embedding", _copy, _copy
    for i in range(model.depth):
        t, f = f"blocks.{i}", f"Transformer/encoderblock_{i}"
        a = f"{f}/MultiHeadDotProductAttention_1"
        yield from _norm(f"{t}.norm1", f"{f}/LayerNorm_0")
        for j, name in enumerate(("query", "key", "value")):
            part = slice(j * d, (j + 1) * d)
            yield (
                f"{t}.attn.qkv.weight", f"params/{a}/{name}/kernel",
                lambda w, p=part: w[p].T.reshape(d, heads, hd), None,
            )  # fmt: skip
            yield (
                f"{t}.attn.qkv.bias", f"params/{a}/{name}/bias",
                lambda b, p=part: b[p].reshape(heads, hd), None,
            )  # fmt: skip
        yield (
            f"{t}.attn.proj.weight", f"params/{a}/out/kernel",
            lambda w: w.T.reshape(heads, hd, d), lambda w: w.reshape(d, d).T,
        )  # fmt: skip
        yield f"{t}.attn.proj.bias", f"params/{a}/out/bias", _copy, _copy
        yield from _norm(f"{t}.norm2", f"{f}/LayerNorm_2")
        yield from _linear(f"{t}.mlp.fc1", f"{f}/MlpBlock_3/Dense_0")
        yield from _linear(f"{t}.mlp.fc2", f"{f}/MlpBlock_3/Dense_1")
    yield from _norm("norm", "Transformer/encoder_norm")
    if model.num_classes:
        yield from _linear("head", "head")


def _check_model(model: Any) -> None:
    if not isinstance(model, VisionTransformer):
        raise TypeError(f"vision_jax.weights.vit converts VisionTransformer, not {type(model)}.")
    if model.representation_size is not None:
        raise ValueError(
            "timm's VisionTransformer has no pre-logits layer; load google .npz weights for a "
            "model with representation_size."
        )


def _check_width(state_dict: Mapping[str, Array], model: VisionTransformer) -> None:
    """A ViT of another width (another model size) named as such, before any reshape fails."""
    embed = state_dict.get("patch_embed.proj.weight")
    if embed is not None and np.shape(embed)[0] != model.width:
        raise WeightMismatchError(
            f"The state dict holds a ViT of width {np.shape(embed)[0]} (patch_embed.proj.weight "
            f"{tuple(np.shape(embed))}); the model has width {model.width}: load weights of "
            "the same model size, or create the model they were trained as."
        )


def checkpoint_model(state_dict: Mapping[str, Array], model: VisionTransformer) -> Any:
    """``model`` as the checkpoint was built: its pooling, class count and no pre-logits layer.

    Converting with this model keeps everything the checkpoint holds; the loader's surgery then
    adapts it (class token, head) to ``model``.
    """
    head = state_dict.get("head.weight")
    return model.clone(
        parent=None,
        pool_type="token" if "cls_token" in state_dict else "gap",
        num_classes=0 if head is None else int(np.shape(head)[0]),
        representation_size=None,
    )


def from_timm(state_dict: Mapping[str, Array], model: VisionTransformer) -> dict:
    """Converts a timm ``VisionTransformer`` state dict to ``{"params": ...}``.

    Raises :class:`WeightMismatchError` naming absent and left-over keys; the head is skipped
    when ``model.num_classes == 0``. Shapes are checked against the model by ``merge_strict``.
    """
    _check_model(model)
    if "patch_embed.proj.weight" not in state_dict:
        raise WeightMismatchError(
            "The state dict holds no timm ViT (no patch_embed.proj.weight); it holds "
            f"{key_groups(state_dict, '.', 1)}."
        )
    _check_width(state_dict, model)
    if "fc_norm.weight" in state_dict:
        raise WeightMismatchError(
            "The state dict's ViT normalises after pooling (timm's fc_norm, as with "
            "global_pool='avg'); vision_jax's ViT normalises before it: not supported."
        )
    rows = list(_rows(model))
    used = {r[0] for r in rows}
    missing = sorted(used - set(state_dict))
    leftover = sorted(
        k for k in state_dict
        if k not in used and not (model.num_classes == 0 and k.startswith("head."))
    )  # fmt: skip
    if missing or leftover:
        raise WeightMismatchError(
            f"State dict does not fit a ViT of depth {model.depth} and width {model.width}: "
            f"{len(missing)} keys missing {missing[:8]}, {len(leftover)} unexpected "
            f"{leftover[:8]}."
        )
    flat = {}
    for torch_key, flax_path, to_flax, _ in rows:
        value = np.asarray(state_dict[torch_key])
        try:
            flat[flax_path] = np.ascontiguousarray(to_flax(value))
        except ValueError as e:  # a reshape that does not fit: wrong width or heads
            raise WeightMismatchError(
                f"{torch_key} of shape {value.shape} does not fit {flax_path}: {e}"
            ) from e
    return unflatten_dict(flat)


def to_timm(variables: Mapping[str, Any], model: VisionTransformer) -> dict[str, Array]:
    """Converts Flax ViT variables to a state dict that timm loads with ``strict=True``."""
    _check_model(model)
    flat = {k: np.asarray(v) for k, v in flatten_dict(variables).items()}
    out: dict[str, Array] = {}
    qkv: dict[str, list[Array]] = {}
    for torch_key, flax_path, _, to_torch in _rows(model):
        if flax_path not in flat:
            raise ValueError(f"Variables lack {flax_path} (needed for {torch_key}).")
        value = flat[flax_path]
        if to_torch is None:  # one third of a fused qkv: (D, H, hd) kernel or (H, hd) bias
            part = value.reshape(value.shape[0], -1).T if value.ndim == 3 else value.reshape(-1)
            qkv.setdefault(torch_key, []).append(part)
        else:
            out[torch_key] = np.ascontiguousarray(to_torch(value))
    for torch_key, parts in qkv.items():
        out[torch_key] = np.ascontiguousarray(np.concatenate(parts, axis=0))
    return out
