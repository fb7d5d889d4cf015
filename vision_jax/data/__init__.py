"""Input data: sources (tfds, arrays), preprocessing, and host-local batching."""

from __future__ import annotations

from vision_jax.config import TrackedConfig
from vision_jax.data.pipeline import Batch, eval_batches, train_batches
from vision_jax.data.preprocess import InputSpec
from vision_jax.data.sources import (
    DataError,
    Source,
    digits,
    from_arrays,
    from_tfds,
    select_classes,
)


def load_source(data: TrackedConfig, split: str, *, arrays: dict | None = None) -> Source:
    """The split named ``split`` of the dataset described by ``config.data``.

    ``data.source`` is "tfds" (with ``data.name``, ``data.data_dir``), "digits" (scikit-learn's
    bundled digits), or "arrays" (``arrays[split] = (images, labels)`` passed from Python).
    ``data.classes`` optionally keeps a subset of classes, relabelled in the given order.
    """
    kind = data.source
    if kind == "tfds":
        source = from_tfds(data.name, split, data.get("data_dir"))
    elif kind == "digits":
        source = digits(split)
    elif kind == "arrays":
        if not arrays or split not in arrays:
            raise DataError(
                f"data.source='arrays' needs arrays={{'{split}': (images, labels)}} passed to "
                "train_and_evaluate."
            )
        source = from_arrays(*arrays[split])
    else:
        raise DataError(f"Unknown data.source {kind!r}; valid: 'tfds', 'digits', 'arrays'.")
    classes = data.get("classes")
    if classes is not None:
        source = select_classes(source, classes)
    return source


def input_spec(config: TrackedConfig) -> InputSpec:
    """The :class:`InputSpec` described by ``config.input``."""
    return InputSpec(**dict(config.items()))


__all__ = [
    "Batch",
    "DataError",
    "InputSpec",
    "Source",
    "eval_batches",
    "from_arrays",
    "input_spec",
    "load_source",
    "train_batches",
]
