"""Model definitions (Flax Linen) and the registry that creates them by name."""

from vision_jax.models import bit, cifar_resnet, resnet, vit  # noqa: F401  (registers models)
from vision_jax.models.registry import ModelSpec, create_model, families, list_models, model_spec

BUILT_IN_MODELS = frozenset(list_models())  # the library's own names (model.module is refused)
BUILT_IN_FAMILIES = frozenset(f.name for f in families())  # (never replaced by one's own)

__all__ = [
    "BUILT_IN_FAMILIES",
    "BUILT_IN_MODELS",
    "ModelSpec",
    "create_model",
    "list_models",
    "model_spec",
]
