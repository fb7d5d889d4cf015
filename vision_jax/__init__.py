"""vision_jax: fine-tune pretrained vision models (ViT, ResNet, BiT) with JAX and Flax."""

import importlib
from typing import Any

__version__ = "0.1.0"

# Loaded when first asked for: ``python -m vision_jax.main`` starts (and may start again, see
# vision_jax.host_memory) before JAX, Flax or TensorFlow are imported.
_EXPORTS = {
    "ModelSpec": "vision_jax.models",
    "create_model": "vision_jax.models",
    "list_models": "vision_jax.models",
    "model_spec": "vision_jax.models",
    "load_pretrained": "vision_jax.weights",
    "train_and_evaluate": "vision_jax.train",
    "Predictor": "vision_jax.predict",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'vision_jax' has no attribute {name!r}")


def __dir__() -> list[str]:
    # dir(vision_jax) and tab completion list the lazy exports too.
    return sorted(set(globals()) | set(_EXPORTS))


__all__ = sorted(_EXPORTS)
