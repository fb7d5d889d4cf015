"""TensorFlow, imported without the Keras import its ``__init__`` makes, and only when first used.

vision_jax uses TensorFlow for tf.data, tf.image, summaries and export, never Keras. TensorFlow's
``__init__`` imports ``keras.src.optimizers`` eagerly (inside ``try: ... except ImportError``, to
register Keras optimizers for SavedModel loading), and Keras imports matplotlib and scikit-learn:
about half of TensorFlow's import time. Marking ``keras`` unimportable for that one import skips
it; ``tf.keras`` and ``import keras`` still load Keras afterwards, when something asks for it.

``tf`` here is a stand-in module that imports TensorFlow at its first attribute access
(:func:`load`), so that a run builds its model and compiles its first step while TensorFlow's
import (seconds) and the input pipeline's start run beside the compilation
(:mod:`vision_jax.train`). TensorFlow is kept off accelerators: it only feeds and exports.

vision_jax's modules import TensorFlow only through this module (``tests/test_imports.py``); code
that uses something that imports TensorFlow itself (tfds, jax2tf, TensorBoard's event reader)
calls :func:`load` first; code that hands a path to etils' ``epath`` calls :func:`load_if_url`.
(clu's ``metric_writers`` would load Keras again: :mod:`vision_jax.writer`.)
"""

from __future__ import annotations

import sys
import threading
import types
from typing import Any

from vision_jax.output_errors import is_url

_lock = threading.RLock()
_tensorflow: types.ModuleType | None = None


def load() -> types.ModuleType:
    """TensorFlow, imported without Keras unless something imported either already."""
    global _tensorflow
    with _lock:
        if _tensorflow is None:
            _tensorflow = _import_without_keras()
            try:
                _tensorflow.config.set_visible_devices([], "GPU")
            except RuntimeError:  # the caller's own TensorFlow code set up its devices already
                pass
        return _tensorflow


def load_if_url(path: str) -> None:
    """Loads TensorFlow when ``path`` is a URL: etils' ``epath`` (orbax, JAX's compilation
    cache, the data listings) reads URLs through TensorFlow's gfile and would import it with
    Keras."""
    if is_url(path):
        load()


def _import_without_keras() -> types.ModuleType:
    skip_keras = "tensorflow" not in sys.modules and "keras" not in sys.modules
    if skip_keras:
        sys.modules["keras"] = None  # type: ignore[assignment]  # import raises ImportError
    try:
        import tensorflow
    finally:
        if skip_keras and "keras" in sys.modules and sys.modules["keras"] is None:
            del sys.modules["keras"]
    return tensorflow


class _LazyTensorFlow(types.ModuleType):
    """Imports TensorFlow at the first attribute access; then each attribute is TensorFlow's."""

    def __getattr__(self, name: str) -> Any:
        value = getattr(load(), name)
        setattr(self, name, value)  # later accesses skip this method
        return value


tf: Any = _LazyTensorFlow("tensorflow", "TensorFlow, imported at first use (vision_jax).")

__all__ = ["load", "load_if_url", "tf"]
