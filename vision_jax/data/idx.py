"""MNIST-style IDX files (MNIST, Fashion-MNIST, KMNIST): ``root/{train,t10k}-{images-idx3,
labels-idx1}-ubyte[.gz]`` read into memory; split ``train`` or ``test``, sliceable like
``train[:10%]``."""

from __future__ import annotations

import gzip
import os
from collections.abc import Sequence

import numpy as np

from vision_jax.data.folders import apply_slice, parse_split
from vision_jax.data.sources import DataError, Source, from_arrays

_PREFIX = {"train": "train", "test": "t10k"}
_DTYPES = {0x08: np.uint8}


def read_idx(path: str) -> np.ndarray:
    """One IDX file (optionally gzipped) as a numpy array; a clear error for anything else."""
    try:
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise DataError(f"Cannot read IDX file {path}: {e}") from e
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] not in _DTYPES:
        raise DataError(f"{path} is not an unsigned-byte IDX file (bad magic {data[:4]!r}).")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    body = np.frombuffer(data, _DTYPES[data[2]], offset=4 + 4 * ndim)
    if body.size != np.prod(shape):
        raise DataError(f"{path} holds {body.size} values; its header says {shape}.")
    return body.reshape(shape)


def from_idx(root: str, split: str, class_names: Sequence[str] | None = None) -> Source:
    """The ``train`` or ``test`` split (optionally sliced) of the IDX dataset in ``root``."""
    name, where = parse_split(split)
    if name not in _PREFIX:
        raise DataError(f"IDX datasets have splits 'train' and 'test', not {name!r}.")

    def path(kind: str) -> str:
        base = os.path.join(root, f"{_PREFIX[name]}-{kind}-ubyte")
        for candidate in (base + ".gz", base):
            if os.path.isfile(candidate):
                return candidate
        raise DataError(f"IDX file {base}[.gz] does not exist.")

    images, labels = read_idx(path("images-idx3")), read_idx(path("labels-idx1"))
    if images.ndim != 3 or labels.shape != images.shape[:1]:
        raise DataError(f"IDX images {images.shape} and labels {labels.shape} do not match.")
    columns = apply_slice({"image": images, "label": labels.astype(np.int32)}, where)
    return from_arrays(columns["image"], columns["label"], class_names=class_names)
