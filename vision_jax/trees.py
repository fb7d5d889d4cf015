"""Nested-dict and pytree utilities shared by the library: flat "/"-joined paths, splitting
parameters into trainable and frozen parts, sizes."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np


def flatten_dict(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dict -> ``{"a/b/c": leaf}``."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten_dict(value, name + "/"))
        else:
            out[name] = value
    return out


def unflatten_dict(flat: Mapping[str, Any]) -> dict[str, Any]:
    """``{"a/b/c": leaf}`` -> nested dict."""
    out: dict[str, Any] = {}
    for name, value in flat.items():
        node = out
        *parents, leaf = name.split("/")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def partition(params: Mapping[str, Any], mask: Any) -> tuple[dict, dict]:
    """Splits a params tree into (trainable, frozen) nested dicts by a boolean ``mask``."""
    flat, flat_mask = flatten_dict(params), flatten_dict(mask)
    trainable = {k: v for k, v in flat.items() if flat_mask[k]}
    frozen = {k: v for k, v in flat.items() if not flat_mask[k]}
    return unflatten_dict(trainable), unflatten_dict(frozen)


def combine(trainable: Mapping[str, Any], frozen: Mapping[str, Any]) -> dict:
    """Inverse of :func:`partition`."""
    return unflatten_dict({**flatten_dict(frozen), **flatten_dict(trainable)})


def is_abstract(tree: Any) -> bool:
    """Whether the leaves of ``tree`` are ``jax.ShapeDtypeStruct`` (shapes, no values)."""
    leaves = jax.tree.leaves(tree)
    return bool(leaves) and all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)


def with_shardings(tree: Any, shardings: Any) -> Any:
    """``tree``'s shapes and dtypes as ``jax.ShapeDtypeStruct`` with ``shardings`` (a tree of
    the same structure)."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )


def tree_bytes(tree: Any) -> int:
    """Bytes held by the array leaves of ``tree`` (arrays or ShapeDtypeStructs)."""
    return sum(math.prod(np.shape(x)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def count_params(tree: Any) -> int:
    """Number of scalars in a pytree of arrays."""
    return sum(math.prod(np.shape(x)) for x in jax.tree.leaves(tree))
