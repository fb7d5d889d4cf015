"""The model registry: every model is created by name through :func:`create_model`."""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """What the registry knows about a model name.

    ``family`` selects the weight converters (``vit``, ``resnet``, ``bit``, ``cifar_resnet``);
    ``timm_name`` is the timm model that is the same network (None if timm has none).
    """

    name: str
    family: str
    module: type[nn.Module]
    defaults: dict[str, Any]
    input_size: int
    timm_name: str | None = None
    paper_params: int | None = None  # parameter count from the paper, for models timm lacks

    def build(self, **kwargs: Any) -> nn.Module:
        return self.module(**{**self.defaults, **kwargs})


_REGISTRY: dict[str, ModelSpec] = {}


def register_model(
    name: str,
    *,
    family: str,
    module: type[nn.Module],
    input_size: int,
    timm_name: str | None = None,
    paper_params: int | None = None,
    **defaults: Any,
) -> None:
    """Registers ``name`` as ``module(**defaults)``."""
    if name in _REGISTRY:
        raise ValueError(f"Model {name!r} is already registered.")
    fields = {f.name for f in dataclasses.fields(module)}
    unknown = set(defaults) - fields
    if unknown:
        raise ValueError(f"{module.__name__} has no field(s) {sorted(unknown)}.")
    _REGISTRY[name] = ModelSpec(
        name, family, module, dict(defaults), input_size, timm_name, paper_params
    )


def list_models(family: str | None = None) -> list[str]:
    """Registered model names, optionally only those of one family."""
    return sorted(n for n, s in _REGISTRY.items() if family is None or s.family == family)


def model_spec(name: str) -> ModelSpec:
    """The :class:`ModelSpec` of ``name``; an unknown name lists the valid ones."""
    if name not in _REGISTRY:
        raise ValueError(f"Unknown model {name!r}. Valid names: {', '.join(list_models())}.")
    return _REGISTRY[name]


def family_of(module: nn.Module) -> str:
    """The family (``vit``, ``resnet``, ...) of a module created by :func:`create_model`."""
    for spec in _REGISTRY.values():
        if isinstance(module, spec.module):
            return spec.family
    raise ValueError(f"{type(module).__name__} is not a registered model class.")


def create_model(
    name: str, *, num_classes: int, dtype: Any = jnp.float32, **overrides: Any
) -> nn.Module:
    """Creates the Flax module registered as ``name``.

    Args:
      name: a registered name (see :func:`list_models`).
      num_classes: size of the classification head; 0 gives a headless feature extractor.
      dtype: compute dtype (e.g. ``jnp.bfloat16``); parameters stay float32.
      **overrides: any other field of the module (e.g. ``dropout_rate``, ``pool_type``).
    """
    spec = model_spec(name)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
        raise ValueError(
            f"num_classes must be a positive int (or 0 for a headless feature extractor), "
            f"got {num_classes!r}."
        )
    fields = {f.name for f in dataclasses.fields(spec.module)} - {"parent", "name"}
    unknown = set(overrides) - fields
    if unknown:
        raise ValueError(
            f"Unknown override(s) {sorted(unknown)} for {name!r} ({spec.module.__name__}). "
            f"Valid: {', '.join(sorted(fields - {'num_classes', 'dtype'}))}."
        )
    return spec.build(num_classes=num_classes, dtype=dtype, **overrides)
