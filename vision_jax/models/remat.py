"""Activation checkpointing (remat) of a model's repeated blocks, chosen by name.

``remat="block"`` keeps only each block's input for the backward pass and recomputes the rest
(activation memory of one block instead of all of them, about one more forward pass of compute);
``"dots"`` also keeps the outputs of matrix products and convolutions without batch dimensions
(the projections and MLPs of a ViT, the convolutions of a ResNet) and recomputes the elementwise
passes and attention between them; ``"none"`` (the default) keeps everything. The parameters and
the results are the same with every policy.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax

REMAT_POLICIES = {
    "none": None,
    "block": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def remat_block(block: type[nn.Module], remat: str, static_argnums: Sequence[int] = ()) -> type:
    """``block`` wrapped in :func:`flax.linen.remat` with the policy named ``remat``;
    ``static_argnums`` counts ``self`` as 0 (flags such as ``train`` must be passed
    positionally)."""
    if remat not in REMAT_POLICIES:
        raise ValueError(f"Unknown remat policy {remat!r}; valid: {', '.join(REMAT_POLICIES)}.")
    if remat == "none":
        return block
    return nn.remat(block, policy=REMAT_POLICIES[remat], static_argnums=tuple(static_argnums))
