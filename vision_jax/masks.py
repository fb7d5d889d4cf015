"""Regex rules over parameter paths.

One helper serves every place that treats parameters differently by name: freezing, learning-rate
multipliers, weight decay, LoRA targets and sharding. A parameter's path is its nested-dict keys
joined with "/", e.g. ``Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel``. Rules are
``(regex, value)`` pairs; the first regex that matches the *whole* path (``re.fullmatch``) wins.
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

_REQUIRED = object()


def path_to_str(path: Sequence[Any]) -> str:
    """Turns a jax key path into ``a/b/c``."""
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


def compile_rules(
    rules: Sequence[tuple[str, Any]], *, what: str = "rules"
) -> list[tuple[re.Pattern, Any]]:
    """``rules`` with their regexes compiled; a malformed rule is an error naming it (``what``
    names the rules)."""
    if isinstance(rules, str):
        raise ValueError(f"{what}: a sequence of (regex, value) pairs, got {rules!r}.")
    compiled = []
    for rule in rules:
        if not (isinstance(rule, (tuple, list)) and len(rule) == 2):
            raise ValueError(f"{what}: a rule must be a (regex, value) pair, got {rule!r}.")
        pattern, value = rule
        if not isinstance(pattern, str):
            raise ValueError(f"{what}: a regex must be a string, got {pattern!r}.")
        try:
            compiled.append((re.compile(pattern), value))
        except re.error as e:
            raise ValueError(f"Invalid regex {pattern!r} in {what}: {e}") from e
    return compiled


def check_multiplier_rules(rules: Sequence[tuple[str, Any]], *, what: str) -> None:
    """Raises ValueError naming the first malformed rule of ``rules`` (``what`` names them)
    or the first value that is not a number >= 0."""
    for pattern, value in compile_rules(rules, what=what):
        number = isinstance(value, numbers.Real) and not isinstance(value, bool)
        if not (number and 0 <= value < math.inf):
            raise ValueError(
                f"{what} {(pattern.pattern, value)}: the value must be a finite number >= 0."
            )


def tree_map_by_rules(
    rules: Sequence[tuple[str, Any]], tree: Any, *, what: str = "rules", default: Any = _REQUIRED,
    each_rule_applies: bool = False, frozen: Sequence[str] = (),
) -> Any:  # fmt: skip
    """Returns a tree shaped like ``tree`` holding, per leaf, the value of the first matching rule.

    Every leaf must be covered: a leaf that no rule matches takes ``default`` or, if no default is
    given, raises an error listing the uncovered paths. ``what`` names the rules in errors. With
    ``each_rule_applies``, a rule that is the first match of no leaf (a typo, a rule written for
    part of a path, or one that earlier rules shadow: it would do nothing) is an error, which
    says so when the rule matches ``frozen`` paths only (parameters outside ``tree``).
    """
    compiled = compile_rules(rules, what=what)
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    names = [path_to_str(path) for path, _ in flat]
    values, uncovered, applied = [], [], set()
    for name in names:
        for i, (pattern, value) in enumerate(compiled):
            if pattern.fullmatch(name):
                values.append(value)
                applied.add(i)
                break
        else:
            if default is _REQUIRED:
                uncovered.append(name)
            values.append(default)
    if uncovered:
        shown = "\n  ".join(uncovered[:20]) + ("\n  ..." if len(uncovered) > 20 else "")
        raise ValueError(
            f"{len(uncovered)} parameter(s) match none of the {what} "
            f"{[r for r, _ in rules]}; add a catch-all rule ('.*', ...). Uncovered:\n  {shown}"
        )
    if each_rule_applies and (idle := [i for i in range(len(compiled)) if i not in applied]):
        raise ValueError(_idle_rule_message(compiled, idle[0], names, what, frozen))
    return jax.tree_util.tree_unflatten(treedef, values)


def _idle_rule_message(
    compiled: Sequence[tuple[re.Pattern, Any]],
    idle: int,
    names: Sequence[str],
    what: str,
    frozen: Sequence[str],
) -> str:
    """Why rule ``idle`` takes no parameter: earlier rules take all it matches (it should come
    first), it matches frozen parameters only, or it matches none (rules match whole paths)."""
    pattern = compiled[idle][0]
    if not any(pattern.fullmatch(n) for n in names) and (
        held := [n for n in frozen if pattern.fullmatch(n)]
    ):
        adapter = f"{held[0].rpartition('/')[0]}/lora_a"
        lora = held[0].endswith("/kernel") and adapter in names  # a kernel LoRA adapts
        instead = f", or name its LoRA adapters ({adapter!r})" if lora else ""
        return (
            f"{what} {pattern.pattern!r} matches only frozen parameters (such as {held[0]!r}), "
            f"which do not train: remove the rule, or let them train{instead}."
        )
    matched = [n for n in names if pattern.fullmatch(n)]
    if matched:
        earlier = next(p.pattern for p, _ in compiled[:idle] if p.fullmatch(matched[0]))
        return (
            f"{what} {pattern.pattern!r} matches only parameters that the earlier rule "
            f"{earlier!r} takes (the first match wins): put it before that rule."
        )
    example = f" such as {names[0]!r}" if names else ""
    anywhere = f"{'' if pattern.pattern.startswith('.*') else '.*'}{pattern.pattern}"
    anywhere += "" if pattern.pattern.endswith(".*") else ".*"
    return (
        f"{what} {pattern.pattern!r} matches no parameter: a rule matches whole "
        f"paths{example} ('{anywhere}' matches anywhere in a path)."
    )


def tree_mask(
    patterns: Sequence[str] | str, tree: Any, *, what: str | None = None, frozen: Sequence[str] = ()
) -> Any:
    """Boolean tree: True where the path fully matches any of ``patterns``; with ``what`` (the
    patterns' config key), a pattern that adds no path is an error naming it (``frozen``: see
    :func:`tree_map_by_rules`)."""
    if isinstance(patterns, str):
        patterns = [patterns]
    rules = [(p, True) for p in patterns]
    return tree_map_by_rules(
        rules, tree, what=what or "patterns", default=False, each_rule_applies=what is not None,
        frozen=frozen,
    )  # fmt: skip


def rules_table(rules: Sequence[tuple[str, Any]], tree: Any, *, what: str = "rule") -> str:
    """A human-readable table: each rule, its value, and how many leaves/parameters it took."""
    compiled = compile_rules(rules, what=what)
    counts = [[0, 0] for _ in compiled]
    unmatched = [0, 0]
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        name = path_to_str(path)
        size = int(np.prod(np.shape(leaf)))
        for i, (pattern, _) in enumerate(compiled):
            if pattern.fullmatch(name):
                counts[i][0] += 1
                counts[i][1] += size
                break
        else:
            unmatched[0] += 1
            unmatched[1] += size
    width = max([len(what)] + [len(p.pattern) for p, _ in compiled])
    lines = [f"{what:<{width}}  {'value':>12}  {'leaves':>6}  {'params':>12}"]
    for (pattern, value), (n, size) in zip(compiled, counts, strict=True):
        lines.append(f"{pattern.pattern:<{width}}  {str(value):>12}  {n:>6}  {size:>12,}")
    if unmatched[0]:
        lines.append(f"{'(no match)':<{width}}  {'':>12}  {unmatched[0]:>6}  {unmatched[1]:>12,}")
    return "\n".join(lines)
