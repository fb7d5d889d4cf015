"""A TensorFlow SavedModel through jax2tf: a ``serving_default`` signature taking uint8
``images`` of any batch size (TF Serving, ``tf.saved_model.load``; no JAX needed to run it).

The TFLite converter cannot take the symbolic batch (class-token and strided-shortcut slices
become dynamic gathers): :mod:`~vision_jax.export.tflite` traces the same function at a fixed
batch size instead.
"""

from __future__ import annotations

import os

from vision_jax.tf_without_keras import load as load_tensorflow
from vision_jax.tf_without_keras import tf

import jax

from vision_jax.export.serving import Servable

SIGNATURE = "serving_default"
INPUT_NAME = "images"


def _variables(servable: Servable) -> object:
    """The model's variables as (frozen) TensorFlow variables named by their paths
    (``params/head/kernel``): stored once in the SavedModel's ``variables/`` rather than as
    constants inside the serialised computation."""
    return jax.tree_util.tree_map_with_path(
        lambda path, a: tf.Variable(a, trainable=False, name="/".join(k.key for k in path)),
        servable.variables,
    )


def serving_module(servable: Servable, batch: int | None = None) -> tf.Module:
    """A ``tf.Module`` whose ``serve`` function maps uint8 ``images`` (``batch`` of them, any
    number when None: the batch dimension is symbolic) to the predictions."""
    load_tensorflow()  # before jax2tf, which imports TensorFlow itself
    from jax.experimental import jax2tf

    variables = _variables(servable)
    shapes = [None, "(b, ...)"] if batch is None else None
    predict = jax2tf.convert(servable.apply, polymorphic_shapes=shapes, with_gradient=False)
    module = tf.Module()
    module.model_variables = tf.nest.flatten(variables)
    module.serve = tf.function(
        lambda images: predict(variables, images),
        input_signature=[tf.TensorSpec(servable.input_shape(batch), tf.uint8, INPUT_NAME)],
        autograph=False,
    )
    return module


def to_savedmodel(servable: Servable, path: str | os.PathLike) -> None:
    """Writes the batch-polymorphic SavedModel to the folder ``path``."""
    module = serving_module(servable)
    tf.saved_model.save(module, os.fspath(path), signatures={SIGNATURE: module.serve})
