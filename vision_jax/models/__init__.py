"""Model definitions (Flax Linen) and the registry that creates them by name."""

from vision_jax.models import bit, cifar_resnet, resnet, vit  # noqa: F401  (registers models)
from vision_jax.models.registry import ModelSpec, create_model, list_models, model_spec

BUILT_IN_MODELS = frozenset(list_models())  # the library's own names (model.module is refused)

__all__ = ["BUILT_IN_MODELS", "ModelSpec", "create_model", "list_models", "model_spec"]
