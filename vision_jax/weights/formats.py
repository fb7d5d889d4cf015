"""Reading weight files into flat ``{name: numpy array}`` dicts."""

from __future__ import annotations

import os
import pathlib

import numpy as np


class WeightFormatError(ValueError):
    """A weight file could not be read; the message names the file and the reason."""


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads a ``.safetensors`` file without torch."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        return dict(load_file(str(path)))
    except (SafetensorError, OSError, ValueError) as e:
        raise WeightFormatError(f"Cannot read safetensors file {path}: {e}") from e


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads a flat state dict from a weight file, choosing the reader by extension."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise WeightFormatError(f"Weight file {path} does not exist.")
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    raise WeightFormatError(f"Unknown weight format for {path} (suffix {path.suffix!r}).")
