"""A model as a serving function: uint8 images in, its task's predictions out.

The function takes NHWC RGB uint8 images already at the model's input size (nothing is resized
inside: resize and centre-crop as the run's evaluation does first; detection: letterbox), applies
the run's normalisation ``(pixels - 255 mean) / (255 std)`` in float32, the model and the task's
``predict``: classification ``probabilities``; segmentation ``label_map`` and per-pixel
``probabilities``; detection ``boxes`` (x0, y0, x1, y1 in input pixels), ``scores`` and
``classes`` (-1 in empty slots). Every exported form is traced from :meth:`Servable.apply`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vision_jax.models.vit import gelu_form
from vision_jax.tasks import Task
from vision_jax.tasks.boxes import top_k_by_sort


class ExportError(ValueError):
    """A model or run that cannot be exported as asked."""


@dataclasses.dataclass(frozen=True, eq=False)
class Servable:
    """A model, its variables, the input it takes and the task whose predictions it serves."""

    model: nn.Module
    variables: Any
    task: Task
    image_size: int
    mean: Sequence[float]
    std: Sequence[float]
    gelu: str = "elementary"  # how a ViT traces GELU (:func:`vision_jax.models.vit.gelu_form`)

    @classmethod
    def from_trained(cls, trained: Any) -> Servable:
        """The servable of a :class:`vision_jax.trained.Trained` run."""
        spec = trained.input
        return cls(
            trained.model, trained.variables, trained.task, spec.image_size, spec.mean, spec.std
        )

    def input_shape(self, batch: int | None) -> tuple[int | None, int, int, int]:
        return (batch, self.image_size, self.image_size, 3)

    def normalise(self, images: jax.Array) -> jax.Array:
        """uint8 pixels to the model's float32 input, as the evaluation pipeline computes it."""
        mean = np.float32(self.mean) * np.float32(255.0)
        std = np.float32(self.std) * np.float32(255.0)
        return (images.astype(jnp.float32) - mean) / std

    def apply(self, variables: Any, images: jax.Array) -> dict[str, jax.Array]:
        """The predictions for a batch of uint8 images (GELU as :attr:`gelu` says: by default
        its erf written out with elementary ops, which every converter lowers; detection's
        top-k from a sort, which TensorFlow loads)."""
        if images.shape[1:] != self.input_shape(None)[1:] or images.dtype != jnp.uint8:
            raise ExportError(
                f"images must be uint8 {list(self.input_shape(None)[1:])} (the model's input "
                f"size); got {images.dtype} {list(images.shape[1:])}."
            )
        with gelu_form(self.gelu), top_k_by_sort():
            outputs = self.model.apply(variables, self.normalise(images), train=False)
            return self.task.predict(outputs, (self.image_size, self.image_size))

    def __call__(self, images: jax.Array) -> dict[str, jax.Array]:
        return self.apply(self.variables, images)

    def output_specs(self) -> dict[str, jax.ShapeDtypeStruct]:
        """Shapes and dtypes of the predictions for a batch of one."""
        image = jax.ShapeDtypeStruct(self.input_shape(1), jnp.uint8)
        return jax.eval_shape(self, image)
