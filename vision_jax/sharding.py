"""Device meshes and shardings: the global batch is split along the data-parallel axes."""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

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


def create_mesh(spec: str, devices: list[Any] | None = None) -> Mesh:
    """A mesh over all devices (of every process) with the named axes of ``spec``.

    Axes are ``Auto`` (the compiler propagates shardings from the inputs and ``out_shardings``),
    not jax's newer default ``Explicit`` sharding-in-types, so models need no sharding code.
    """
    devices = jax.devices() if devices is None else devices
    names, sizes = parse_mesh(spec, len(devices))
    return jax.make_mesh(sizes, names, (AxisType.Auto,) * len(names), devices=devices)


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
