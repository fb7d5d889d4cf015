"""vision_jax: fine-tune pretrained vision models (ViT, ResNet, BiT) with JAX and Flax."""

from typing import Any

from vision_jax.models import ModelSpec, create_model, list_models, model_spec
from vision_jax.weights import load_pretrained

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # These import TensorFlow (the input pipeline): load them only when asked for.
    if name == "train_and_evaluate":
        from vision_jax.train import train_and_evaluate

        return train_and_evaluate
    if name == "Predictor":
        from vision_jax.predict import Predictor

        return Predictor
    raise AttributeError(f"module 'vision_jax' has no attribute {name!r}")


__all__ = [
    "ModelSpec",
    "Predictor",
    "create_model",
    "list_models",
    "load_pretrained",
    "model_spec",
    "train_and_evaluate",
]
