"""Activation checkpointing (remat) of a model's repeated blocks, chosen by name, per block.

``remat="block"`` keeps only each block's input for the backward pass and recomputes the rest
(activation memory of one block instead of all of them, about one more forward pass of compute);
``"dots"`` also keeps the outputs of matrix products without batch dimensions and of
convolutions (the projections and MLPs of a ViT, the convolutions of a ResNet; in bfloat16 too)
and recomputes the elementwise passes and attention between them; ``"none"`` (the default)
keeps everything. The parameters and the results are the same with every policy.

``remat_rules`` sets the policy block by block: ``((regex, policy), ...)`` matched against each
block's path, the prefix of its parameters' paths (``Transformer/encoderblock_3``, ``layer2/0``,
``block3/unit01``); the first rule whose regex matches the whole path wins, and blocks that no
rule matches take ``remat``. The backward pass rebuilds the last block's activations as soon as
it starts, so recomputing every block but the last keeps as little memory as recomputing them
all, for one block less of compute.

On CPU the saving needs the train step's compiler options
(:func:`vision_jax.compile_options.step_compiler_options` with ``remat=True``, as
``vision_jax.run`` compiles the train step): without them XLA's CPU pipeline expands
``jax.checkpoint``'s optimisation barriers before common-subexpression elimination, merges the
recomputation back into the forward pass and keeps as much as without remat, or more (the
README gives the figures). Code that jits a model's gradient itself passes the
same options (``jax.jit(..., compiler_options=step_compiler_options(dtype, remat=True))``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax

from vision_jax import trees
from vision_jax.masks import compile_rules, tree_map_by_rules
from vision_jax.models.precision import CONVOLUTION, UNBATCHED_PRODUCT


def _products_saveable(primitive: Any, *args: Any, **params: Any) -> bool:
    """Matrix products without batch dimensions (JAX's policy of that name) and convolutions:
    their outputs are kept by ``"dots"``."""
    if primitive is jax.lax.conv_general_dilated_p:
        return True
    return jax.checkpoint_policies.dots_with_no_batch_dims_saveable(primitive, *args, **params)


REMAT_POLICIES = {
    "none": None,
    "block": jax.checkpoint_policies.nothing_saveable,
    # bfloat16 products and CPU convolutions are custom_vjps the policy does not look into:
    # kept by their names
    "dots": jax.checkpoint_policies.save_from_both_policies(
        _products_saveable,
        jax.checkpoint_policies.save_only_these_names(UNBATCHED_PRODUCT, CONVOLUTION),
    ),
}

RematRules = Sequence[tuple[str, str]]


def _check_policy(policy: Any, where: str) -> None:
    if not isinstance(policy, str) or policy not in REMAT_POLICIES:
        valid = ", ".join(REMAT_POLICIES)
        raise ValueError(f"Unknown remat policy {policy!r}{where}; valid: {valid}.")


def block_policies(
    remat: str, rules: RematRules, blocks: Sequence[str], idle: Sequence[str] = ()
) -> dict[str, str]:
    """The policy of each block path in ``blocks``: the first rule whose regex matches the whole
    path, else ``remat`` (:func:`vision_jax.masks.tree_map_by_rules`). An unknown policy, a
    malformed rule, a rule that matches no block, or only ``idle`` ones (blocks that never run:
    those after the last feature tap; it would change nothing), is an error naming what is
    valid."""
    _check_policy(remat, "")
    for pattern, policy in compile_rules(rules, what="remat_rules"):
        _check_policy(policy, f" in remat_rules {(pattern.pattern, policy)!r}")
        hits = [block for block in blocks if pattern.fullmatch(block)]
        if not hits:
            shown = ", ".join(blocks[:3]) + (f", ... {blocks[-1]}" if len(blocks) > 3 else "")
            raise ValueError(f"remat_rules: {pattern.pattern!r} matches no block; blocks: {shown}.")
        if set(hits) <= set(idle):
            last = [block for block in blocks if block not in idle][-1]
            raise ValueError(
                f"remat_rules: {pattern.pattern!r} matches only blocks that never run ({hits[0]}"
                f"{', ...' * (len(hits) > 1)}: with these feature taps the blocks after {last} "
                "do not run), so it would change nothing: remove it."
            )
    tree = trees.unflatten_dict({block: 0 for block in blocks})
    return trees.flatten_dict(tree_map_by_rules(rules, tree, what="remat_rules", default=remat))


def stage_policies(
    remat: str,
    rules: RematRules,
    stage_sizes: Sequence[int],
    path: Callable[[int, int], str],
    taps: Sequence[int] = (),
) -> list[tuple[str, ...]]:
    """Per stage, the policy of each of its blocks (:func:`block_policies`); ``path(i, j)``
    is the path of block ``j`` of stage ``i``; ``taps``: the backbone's feature taps (checked
    stage indices, :func:`~vision_jax.models.registry.stage_taps`), after the last of which
    the stages never run."""
    paths = [[path(i, j) for j in range(depth)] for i, depth in enumerate(stage_sizes)]
    idle = [p for stage in paths[max(taps) + 1 :] for p in stage] if taps else []
    policies = block_policies(remat, rules, [p for stage in paths for p in stage], idle)
    return [tuple(policies[p] for p in stage) for stage in paths]


def recomputes(remat: str, rules: RematRules) -> bool:
    """Whether a model with ``remat`` and ``remat_rules`` (checked ones) recomputes anything."""
    return any(REMAT_POLICIES.get(p) is not None for p in (remat, *(r[-1] for r in rules)))


def policy_at(policies: Sequence[str], index: int) -> str:
    """Block ``index``'s policy in a stage's ``remat_policies`` (empty: keep everything)."""
    return policies[index] if policies else "none"


@functools.cache
def remat_block(block: type[nn.Module], remat: str, static_argnums: tuple[int, ...] = ()) -> type:
    """``block`` wrapped in :func:`flax.linen.remat` with the policy named ``remat``;
    ``static_argnums`` counts ``self`` as 0 (flags such as ``train`` must be passed
    positionally)."""
    _check_policy(remat, "")
    if remat == "none":
        return block
    return nn.remat(block, policy=REMAT_POLICIES[remat], static_argnums=static_argnums)
