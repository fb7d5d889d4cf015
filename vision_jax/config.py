"""Config access that records which keys were read, so that keys nothing reads are errors.

A run reads its ``ml_collections.ConfigDict`` only through :class:`TrackedConfig`. After setup,
:meth:`TrackedConfig.check_all_read` raises on any key that was set (not None) but never read:
a typo'd or dead key fails loudly instead of silently doing nothing. ``None`` means "not set"
and may stay unread.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import ml_collections
from ml_collections.config_dict import placeholder


def default_config() -> ml_collections.ConfigDict:
    """Defaults for every run; config files start from this and override fields.

    Every key is read by the run; None means "unset" (``placeholder(type)`` keeps such keys
    overridable from the command line). A key that nothing reads is an error.
    """
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.mesh = "data:-1"  # named mesh axes: "data:-1", "data:2,fsdp:4" (-1 = the rest)

    c.model = ml_collections.ConfigDict()
    c.model.name = "vit_ti16"
    c.model.dtype = "float32"  # compute dtype; params stay float32

    c.init = ml_collections.ConfigDict()
    c.init.path = placeholder(
        str
    )  # pretrained weights: a vision_jax workdir or a timm .safetensors file
    c.init.replace_head = False  # re-initialise the head even if the class count matches

    c.data = ml_collections.ConfigDict()
    c.data.source = "tfds"  # "tfds", "digits" or "arrays"
    c.data.name = placeholder(str)  # tfds name
    c.data.data_dir = placeholder(str)
    c.data.train_split = "train"
    c.data.eval_split = "test"
    c.data.classes = placeholder(tuple)  # keep only these class ids (relabelled 0..k-1)

    c.input = ml_collections.ConfigDict()
    c.input.image_size = 224
    c.input.resize_size = placeholder(int)  # shorter side before cropping; None = image_size
    c.input.random_crop = True
    c.input.flip = True
    c.input.mean = (0.5, 0.5, 0.5)
    c.input.std = (0.5, 0.5, 0.5)

    c.batch_size = 64
    c.eval_batch_size = 64
    c.total_steps = placeholder(int)
    c.total_epochs = 10.0

    c.loss = "softmax_xent"  # or "sigmoid_xent"
    c.label_smoothing = 0.0

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.name = "adamw"  # or "sgd"
    c.optimizer.learning_rate = 1e-3
    c.optimizer.weight_decay = 1e-4
    c.optimizer.decay_params = placeholder(
        str
    )  # regex of params that get weight decay; None = kernels
    c.optimizer.grad_clip_norm = 1.0
    c.optimizer.b1 = placeholder(float)  # adamw; None = optax default
    c.optimizer.b2 = placeholder(float)
    c.optimizer.eps = placeholder(float)
    c.optimizer.momentum = placeholder(float)  # sgd; None = 0.9
    c.optimizer.nesterov = placeholder(bool)

    c.schedule = ml_collections.ConfigDict()
    c.schedule.decay = "cosine"  # "cosine", "linear" or "constant"
    c.schedule.warmup_steps = placeholder(int)
    c.schedule.warmup_epochs = placeholder(float)

    c.log_every_steps = 50
    c.eval_every_steps = 500  # 0 = only at the end
    c.eval_before_training = False
    c.checkpoint_every_steps = 500
    c.keep_checkpoints = 3
    return c


def _is_section(value: Any) -> bool:
    return isinstance(value, (Mapping, ml_collections.ConfigDict))


class UnreadConfigKeysError(ValueError):
    """The config holds keys that nothing in the run reads."""


class TrackedConfig:
    """Read-only view of a ConfigDict that remembers every key read."""

    def __init__(self, config: Mapping[str, Any], prefix: str = "", reads: set | None = None):
        object.__setattr__(self, "_config", config)
        object.__setattr__(self, "_prefix", prefix)
        object.__setattr__(self, "_reads", set() if reads is None else reads)

    def _wrap(self, key: str, value: Any) -> Any:
        self._reads.add(self._prefix + key)
        if _is_section(value):
            return TrackedConfig(value, f"{self._prefix}{key}.", self._reads)
        return value

    def __getattr__(self, key: str) -> Any:
        if key.startswith("__"):
            raise AttributeError(key)
        if key not in self._config:
            raise AttributeError(
                f"Config has no key '{self._prefix}{key}'. "
                f"Keys here: {', '.join(sorted(self._config)) or '(none)'}."
            )
        return self._wrap(key, self._config[key])

    def __getitem__(self, key: str) -> Any:
        return self.__getattr__(key)

    def __setattr__(self, key: str, value: Any) -> None:
        raise TypeError("TrackedConfig is read-only.")

    def __contains__(self, key: str) -> bool:
        return key in self._config

    def __iter__(self) -> Iterator[str]:
        return iter(self._config)

    def get(self, key: str, default: Any = None) -> Any:
        """Like ``dict.get``; marks the key read when present."""
        return self.__getattr__(key) if key in self._config else default

    def items(self) -> Iterator[tuple[str, Any]]:
        """Reads every key of this section (e.g. to pass them on as keyword arguments)."""
        for key in self._config:
            yield key, self.__getattr__(key)

    def to_dict(self) -> dict[str, Any]:
        """A plain-dict copy of this section (does not mark keys read)."""
        config = self._config
        if isinstance(config, ml_collections.ConfigDict):
            return config.to_dict()
        return {k: (v.to_dict() if hasattr(v, "to_dict") else v) for k, v in config.items()}

    def unread(self) -> list[str]:
        """Set (non-None) leaf keys that were never read."""

        def leaves(node: Mapping[str, Any], prefix: str) -> Iterator[tuple[str, Any]]:
            for key, value in node.items():
                if _is_section(value) and len(value):
                    yield from leaves(value, f"{prefix}{key}.")
                else:
                    yield prefix + key, value

        return sorted(
            key
            for key, value in leaves(self._config, self._prefix)
            if value is not None and key not in self._reads
        )

    def check_all_read(self) -> None:
        """Raises :class:`UnreadConfigKeysError` if any set key was never read."""
        unread = self.unread()
        if unread:
            raise UnreadConfigKeysError(
                "Config keys that nothing reads (remove them, set them to None, or fix a typo): "
                + ", ".join(unread)
            )

    def __repr__(self) -> str:
        return f"TrackedConfig({self._prefix or '<root>'}: {dict(self._config)!r})"
