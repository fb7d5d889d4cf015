"""Device meshes and shardings: the global batch is split along the data-parallel axes."""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from vision_jax.masks import path_to_str, tree_map_by_rules

# Axes that split the batch. ``fsdp`` splits the batch too (and, with sharding rules, params).
BATCH_AXES = ("data", "fsdp")


def parse_mesh(spec: str, num_devices: int) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """Parses ``"data:-1"`` or ``"data:2,fsdp:4"`` into axis names and sizes (-1 = the rest)."""
    names, sizes = [], []
    for part in spec.split(","):
        name, _, size = part.strip().partition(":")
        if not name or not size.lstrip("-").isdigit():
            raise ValueError(f"Bad mesh {spec!r}: expected 'axis:size,...' like 'data:-1,fsdp:2'.")
        if name not in (*BATCH_AXES, "model"):
            raise ValueError(f"Unknown mesh axis {name!r} in {spec!r}; valid: data, fsdp, model.")
        names.append(name)
        sizes.append(int(size))
    if len(set(names)) != len(names):
        raise ValueError(f"Mesh {spec!r} names an axis twice.")
    if sizes.count(-1) > 1:
        raise ValueError(f"Mesh {spec!r} has more than one -1 axis.")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise ValueError(f"Mesh {spec!r} does not divide the {num_devices} devices.")
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ValueError(f"Mesh {spec!r} has {math.prod(sizes)} devices; there are {num_devices}.")
    return tuple(names), tuple(sizes)


def may_dispatch_ahead() -> bool:
    """Whether independent programs with collectives may be dispatched before the previous
    one's results are fetched: not in a multi-process CPU run, where XLA's CPU runtime may run
    them at the same time and their collectives meet in different orders on different
    processes (a deadlock)."""
    return jax.process_count() == 1 or jax.default_backend() != "cpu"


def create_mesh(spec: str, devices: list[Any] | None = None) -> Mesh:
    """A mesh over all devices (of every process) with the named axes of ``spec``.

    Axes are ``Auto`` (the compiler propagates shardings from the inputs and ``out_shardings``),
    not jax's newer default ``Explicit`` sharding-in-types, so models need no sharding code.
    """
    devices = jax.devices() if devices is None else devices
    names, sizes = parse_mesh(spec, len(devices))
    return jax.make_mesh(sizes, names, (AxisType.Auto,) * len(names), devices=devices)


_BATCH_SPLIT: contextvars.ContextVar[Mesh | None] = contextvars.ContextVar(
    "batch_split", default=None
)


@contextlib.contextmanager
def activations_split_by_batch(mesh: Mesh | None) -> Iterator[None]:
    """Inside (while a step is traced), :func:`split_by_batch` keeps an activation split over
    ``mesh``'s batch axes (None: no mesh, a no-op)."""
    token = _BATCH_SPLIT.set(mesh)
    try:
        yield
    finally:
        _BATCH_SPLIT.reset(token)


def split_by_batch(x: jax.Array) -> jax.Array:
    """``x`` (batch first) constrained to the batch split of the step being traced.

    A classifier's pooled features: FSDP splits a head kernel along its input (the largest
    dimension, when the classes are fewer or do not divide), and XLA's propagation then split
    the features, and back through every block the activations, along the width: the whole
    batch gathered on every device (about 20x the parameter traffic for ViT-Ti on 8)."""
    mesh = _BATCH_SPLIT.get()
    if mesh is None or mesh.size == 1:
        return x
    rest = (P.UNCONSTRAINED,) * (x.ndim - 1)  # a model axis may still split the width
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(batch_axes(mesh), *rest)))


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
    """The mesh axes the batch dimension is split over."""
    return tuple(a for a in BATCH_AXES if a in mesh.axis_names)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over the data-parallel axes, the rest replicated."""
    return NamedSharding(mesh, P(batch_axes(mesh)))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def data_parallel_size(mesh: Mesh) -> int:
    return math.prod(mesh.shape[a] for a in batch_axes(mesh))


def to_global_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assembles every process's host-local batch into global arrays sharded along the batch."""
    sharding = batch_sharding(mesh)
    return {
        k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()
    }


# Sharding rules: ``(regex, value)`` pairs over parameter paths (see vision_jax.masks). A value is
# "fsdp" (split the largest dimension divisible by the fsdp axis, for parameters of at least
# ``fsdp_min_size`` elements), "replicated", or a partition spec as a sequence with one entry per
# leading dimension: None, a mesh axis name or a sequence of axis names, e.g. (None, "model").
# ``config.sharding_rules`` holds them; the default ``((".*", "fsdp"),)`` is plain FSDP.


def fsdp_spec(shape: tuple[int, ...], mesh: Mesh, min_size: int) -> P:
    """Splits the largest dimension divisible by the ``fsdp`` axis size; replicates otherwise.

    Parameters with fewer than ``min_size`` elements stay replicated: splitting them saves little
    memory and costs an all-gather each.
    """
    size = dict(mesh.shape).get("fsdp", 1)
    if size == 1 or math.prod(shape) < min_size:
        return P()
    dims = [i for i, d in enumerate(shape) if d % size == 0]
    if not dims:
        return P()
    dim = max(dims, key=lambda i: shape[i])  # the first of equally large dimensions
    return P(*([None] * dim), "fsdp")


def _rule_spec(value: Any, shape: tuple[int, ...], mesh: Mesh, min_size: int, name: str) -> P:
    """The PartitionSpec that rule ``value`` gives the parameter ``name`` of ``shape``."""
    if value == "fsdp":
        return fsdp_spec(shape, mesh, min_size)
    if value == "replicated":
        return P()
    if isinstance(value, str) or not isinstance(value, (tuple, list)):
        raise ValueError(
            f"Sharding rule value {value!r} for {name}: expected 'fsdp', 'replicated' or a "
            "partition spec such as (None, 'model')."
        )
    if len(value) > len(shape):
        raise ValueError(f"Sharding spec {value!r} has more entries than {name} {shape} has dims.")
    for dim, entry in enumerate(value):
        axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
        unknown = [a for a in axes if a not in mesh.axis_names]
        if unknown:
            raise ValueError(
                f"Sharding spec {value!r} for {name} names axes {unknown} that mesh "
                f"{dict(mesh.shape)} does not have."
            )
        split = math.prod(mesh.shape[a] for a in axes)
        if shape[dim] % split:
            raise ValueError(
                f"Sharding spec {value!r} splits dim {dim} of {name} {shape} into {split} parts; "
                f"{shape[dim]} is not divisible by {split}."
            )
    return P(*(tuple(e) if isinstance(e, list) else e for e in value))


def param_shardings(
    params: Any, mesh: Mesh, rules: Sequence[tuple[str, Any]], *, fsdp_min_size: int
) -> Any:
    """A tree of NamedShardings like ``params`` (arrays or ShapeDtypeStructs), from ``rules``.

    A parameter that no rule matches is replicated; a rule that matches none (a typo would
    replicate what it meant to shard) is an error.
    """
    values = tree_map_by_rules(
        rules, params, what="sharding_rules rule", default="replicated", each_rule_applies=True
    )
    return jax.tree_util.tree_map_with_path(
        lambda path, x, v: NamedSharding(
            mesh, _rule_spec(v, tuple(x.shape), mesh, fsdp_min_size, path_to_str(path))
        ),
        params,
        values,
    )


def follow_params(tree: Any, params: Any, shardings: Any, mesh: Mesh) -> Any:
    """Shardings for ``tree`` (e.g. optimizer state) that follow the parameters' shardings.

    A leaf whose path ends with a parameter's path and has that parameter's shape (Adam's
    ``mu/<param path>``, momentum traces, ...) takes the parameter's sharding; every other leaf
    (step counts, scalars, factored statistics) is replicated.
    """
    by_path = {
        path_to_str(p): (tuple(x.shape), s)
        for (p, x), s in zip(
            jax.tree_util.tree_flatten_with_path(params)[0],
            jax.tree_util.tree_leaves(shardings),
            strict=True,
        )
    }

    def pick(path: Any, leaf: Any) -> NamedSharding:
        parts = path_to_str(path).split("/")
        for i in range(len(parts)):
            shape, s = by_path.get("/".join(parts[i:]), (None, None))
            if shape == tuple(leaf.shape):
                return s
        return replicated(mesh)

    return jax.tree_util.tree_map_with_path(pick, tree)


def put(tree: Any, shardings: Any) -> Any:
    """Host arrays (the same full value on every process) -> global arrays with ``shardings``."""
    return jax.tree_util.tree_map(
        lambda x, s: jax.make_array_from_callback(np.shape(x), s, lambda idx: np.asarray(x)[idx]),
        tree,
        shardings,
    )
