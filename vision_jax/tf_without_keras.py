"""TensorFlow, imported without the Keras import its ``__init__`` makes.

vision_jax uses TensorFlow for tf.data, tf.image, summaries and export, never Keras. TensorFlow's
``__init__`` imports ``keras.src.optimizers`` eagerly (inside ``try: ... except ImportError``, to
register Keras optimizers for SavedModel loading), and Keras imports matplotlib and scikit-learn:
about half of TensorFlow's import time. Marking ``keras`` unimportable for that one import skips
it; ``tf.keras`` and ``import keras`` still load Keras afterwards, when something asks for it.

vision_jax's modules import TensorFlow only through this module (``tests/test_imports.py``), before
anything that imports it too (tfds, jax2tf): ``pyproject.toml`` gives it its own import section,
which sorts first. (clu's ``metric_writers`` would load Keras again: :mod:`vision_jax.writer`.)
"""

from __future__ import annotations

import sys


def _import_tensorflow_without_keras() -> None:
    if "tensorflow" in sys.modules or "keras" in sys.modules:
        return  # already imported (or Keras wanted): nothing to skip
    sys.modules["keras"] = None  # type: ignore[assignment]  # import raises ImportError
    try:
        import tensorflow  # noqa: F401
    finally:
        if "keras" in sys.modules and sys.modules["keras"] is None:
            del sys.modules["keras"]


_import_tensorflow_without_keras()

import tensorflow as tf  # noqa: E402

__all__ = ["tf"]
