"""Merging loaded weights into freshly initialised variables, strictly, with a readable diff."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import numpy as np

from vision_jax.trees import flatten_dict, unflatten_dict


class WeightMismatchError(ValueError):
    """Loaded weights do not fit the model; the message lists every difference."""


def key_groups(keys: Iterable[str], sep: str = "/", depth: int = 2, limit: int = 4) -> str:
    """What a set of names holds at a glance: their leading ``depth`` parts with counts, most
    common first (``"params/Transformer (150), params/head (2)"``)."""
    counts = Counter(sep.join(k.split(sep)[:depth]) for k in keys).most_common()
    shown = ", ".join(f"{name} ({n})" for name, n in counts[:limit])
    return shown + (f" and {len(counts) - limit} more" if len(counts) > limit else "")


def _headline(expected: Mapping[str, Any], got: Mapping[str, Any], shapes: list) -> str:
    """What the differences say together: another architecture, another model size."""
    shared = set(expected) & set(got)
    if len(shared) < min(len(expected), len(got)) / 4:
        return (
            f" only {len(shared)} of the checkpoint's {len(got)} array names are among the "
            f"model's {len(expected)}: weights of another architecture? (checkpoint: "
            f"{key_groups(got)}; model: {key_groups(expected)})"
        )
    if len(shapes) > len(shared) // 2:
        return (
            f" {len(shapes)} of the {len(shared)} arrays both hold have other shapes: weights "
            "of another model size?"
        )
    return ""


def describe_mismatch(
    expected: Mapping[str, Any], got: Mapping[str, Any], *, source: str, limit: int = 8
) -> str | None:
    """A readable diff between two flat ``{path: array}`` dicts, or None if they agree."""
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    shapes = sorted(
        (k, tuple(np.shape(expected[k])), tuple(np.shape(got[k])))
        for k in set(expected) & set(got)
        if tuple(np.shape(expected[k])) != tuple(np.shape(got[k]))
    )
    if not (missing or unexpected or shapes):
        return None

    def block(title: str, rows: list[str]) -> list[str]:
        if not rows:
            return []
        shown = rows[:limit] + ([f"... and {len(rows) - limit} more"] if len(rows) > limit else [])
        return [f"  {title} ({len(rows)}):"] + [f"    {r}" for r in shown]

    lines = [f"Weights from {source} do not match the model:{_headline(expected, got, shapes)}"]
    lines += block("missing in checkpoint", [f"{k} {np.shape(expected[k])}" for k in missing])
    lines += block("unexpected in checkpoint", [f"{k} {np.shape(got[k])}" for k in unexpected])
    lines += block(
        "shape mismatch (model vs checkpoint)", [f"{k}: {a} vs {b}" for k, a, b in shapes]
    )
    return "\n".join(lines)


def merge_strict(init: Mapping[str, Any], loaded: Mapping[str, Any], *, source: str) -> dict:
    """Returns ``loaded`` cast to the dtypes of ``init``; raises on any structural difference.
    Abstract leaves (``jax.ShapeDtypeStruct``: values still to be initialised) pass through."""
    flat_init, flat_loaded = flatten_dict(init), flatten_dict(loaded)
    diff = describe_mismatch(flat_init, flat_loaded, source=source)
    if diff:
        raise WeightMismatchError(diff)

    def cast(value: Any, like: Any) -> Any:
        if isinstance(value, jax.ShapeDtypeStruct):
            return value
        return np.asarray(
            value, dtype=like.dtype if hasattr(like, "dtype") else np.asarray(like).dtype
        )

    return unflatten_dict({k: cast(v, flat_init[k]) for k, v in flat_loaded.items()})
