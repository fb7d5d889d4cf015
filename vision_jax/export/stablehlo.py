"""A serialised ``jax.export`` artifact (StableHLO, weights inside, batch dimension symbolic):
``jax.export.deserialize(data).call(images)`` runs it from JAX without vision_jax."""

from __future__ import annotations

import os
import pathlib

import jax
import jax.numpy as jnp

from vision_jax.export.serving import Servable
from vision_jax.output_errors import written_whole

PLATFORMS = ("cpu", "cuda", "tpu")


def to_stablehlo(servable: Servable, path: str | os.PathLike) -> None:
    """Writes the exported serving function, lowered for :data:`PLATFORMS`, to the file
    ``path``."""
    (batch,) = jax.export.symbolic_shape("b")
    images = jax.ShapeDtypeStruct(servable.input_shape(batch), jnp.uint8)
    exported = jax.export.export(jax.jit(servable), platforms=PLATFORMS)(images)
    with written_whole(path) as partial:
        pathlib.Path(partial).write_bytes(exported.serialize())


ARTIFACT = "model.jax_exported"


def load_stablehlo(path: str | os.PathLike) -> jax.export.Exported:
    """The exported function in ``path`` (the file, or the export folder that holds it); call
    it with ``.call(images)``."""
    path = pathlib.Path(path)
    if path.is_dir():
        path = path / ARTIFACT
    return jax.export.deserialize(bytearray(path.read_bytes()))
