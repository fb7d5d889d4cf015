"""Decoding weight files into flat ``{name: numpy array}`` dicts.

Files (see :func:`file_kind`):

* ``npz``: google-research/vision_transformer, big_vision or big_transfer ``.npz`` files;
* ``safetensors``: a state dict (timm, torchvision, ...);
* ``torch``: a ``.pth``/``.pt``/``.bin``/``.th`` state dict, zip or legacy serialisation, read with
  ``torch.load(weights_only=True)`` only: a file that needs arbitrary unpickling is refused.

Every failure raises :class:`WeightFormatError` naming the file and the reason.
"""

from __future__ import annotations

import contextlib
import functools
import os
import pathlib
import re
import zipfile
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np


class WeightFormatError(ValueError):
    """A weight file could not be read; the message names the file and the reason."""


SUFFIXES = {
    ".npz": "npz",
    ".safetensors": "safetensors",
    ".pth": "torch",
    ".pt": "torch",
    ".bin": "torch",
    ".th": "torch",
}
# Keys that wrap a state dict, in order of preference (the EMA only when nothing else is there),
# and the prefixes stripped when every key has one (Lightning's ``self.model``, DataParallel's,
# ``torch.compile``'s ``_orig_mod``).
_WRAPPERS = ("state_dict", "model", "model_state_dict", "module", "state_dict_ema", "model_ema")
_PREFIXES = ("model.", "module.", "_orig_mod.")

_kept: dict[tuple, dict[str, np.ndarray]] | None = None  # :func:`read_once`'s, while it is open


@contextlib.contextmanager
def read_once() -> Iterator[None]:
    """Within it, each weight file is decoded once: reading it again (its input contract, then
    its variables) gives the arrays read first, while the file is unchanged. They are let go
    at its end (the outermost one's, when nested)."""
    global _kept
    if _kept is not None:
        yield
        return
    _kept = {}
    try:
        yield
    finally:
        _kept = None


def _kept_in_read_once(
    read: Callable[[str | os.PathLike], dict[str, np.ndarray]],
) -> Callable[[str | os.PathLike], dict[str, np.ndarray]]:
    """``read``, whose arrays :func:`read_once` keeps for the file's next read."""

    @functools.wraps(read)
    def kept(path: str | os.PathLike) -> dict[str, np.ndarray]:
        held = _kept  # once: another thread's block may end meanwhile
        if held is None:
            return read(path)
        try:
            stat = os.stat(path)
        except OSError:
            return read(path)  # which names the problem
        # a file replaced keeping its size and mtime (cp -p, rsync -t) changes inode or ctime
        key = (read.__name__, os.path.realpath(path), stat.st_ino, stat.st_ctime_ns,
               stat.st_mtime_ns, stat.st_size)  # fmt: skip
        if key not in held:
            held[key] = read(path)
        return dict(held[key])  # readers may rename its keys in place

    return kept


def file_kind(path: str | os.PathLike) -> str:
    """``npz``, ``safetensors`` or ``torch``: by suffix, else by the first bytes (safetensors'
    JSON header, a zip archive, a pickle)."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise WeightFormatError(f"Weight file {path} does not exist.")
    if path.suffix in SUFFIXES:
        return SUFFIXES[path.suffix]
    with open(path, "rb") as f:
        head = f.read(16)
    if len(head) > 8 and head[8:9] == b"{":
        return "safetensors"
    if head.startswith(b"\x80"):  # a pickle: torch's legacy serialisation
        return "torch"
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
        if any(n.endswith("data.pkl") for n in names):
            return "torch"
        if names and all(n.endswith(".npy") for n in names):
            return "npz"
    raise WeightFormatError(
        f"Unknown weight format for {path} (suffix {path.suffix!r}); expected a vision_jax "
        "run folder, a Hugging Face folder, .npz, .safetensors or .pth/.pt/.bin/.th."
    )


@_kept_in_read_once
def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads a ``.safetensors`` file without torch."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        return dict(load_file(str(path)))
    except (SafetensorError, OSError, ValueError, TypeError) as e:
        raise WeightFormatError(f"Cannot read safetensors file {path}: {e}") from e


def safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The ``__metadata__`` strings of a ``.safetensors`` file (none for other files)."""
    from safetensors import SafetensorError, safe_open

    if file_kind(path) != "safetensors":
        return {}
    try:
        with safe_open(str(path), "np") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError, TypeError) as e:
        raise WeightFormatError(f"Cannot read safetensors file {path}: {e}") from e


@_kept_in_read_once
def read_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads every array of an ``.npz`` file (no pickles allowed)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: np.asarray(data[k]) for k in data.files}
    except Exception as e:  # zipfile, zlib, numpy and OS errors for corrupt or truncated files
        raise WeightFormatError(
            f"Cannot read npz file {path}: {type(e).__name__}: {e} (truncated or corrupted?)"
        ) from e


def _to_numpy(value: Any) -> np.ndarray:
    import torch

    if value.dtype == torch.bfloat16:
        value = value.float()
    return value.detach().cpu().numpy().copy()


@_kept_in_read_once
def read_torch(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads a torch state dict with ``torch.load(weights_only=True)`` (zip or legacy format).

    A ``{"state_dict": ...}`` / ``{"model": ...}`` wrapper (an EMA's, ``state_dict_ema`` or
    ``model_ema``, when alone) is removed; entries that are not tensors (e.g. ``best_prec1``)
    are ignored.
    """
    import argparse
    import pickle

    try:
        import torch
    except ImportError as e:
        raise WeightFormatError(f"Reading {path} needs torch, which is not installed.") from e
    try:  # timm's training checkpoints keep their command line as an argparse.Namespace
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise WeightFormatError(
            f"Refusing to read {path}: it needs arbitrary unpickling, which weights_only=True "
            f"forbids (load it yourself only if you trust it, and save its state_dict as "
            f".safetensors). torch said: {_unpickling_reason(e)}"
        ) from e
    except Exception as e:  # truncated or corrupted: RuntimeError, EOFError, ...
        raise WeightFormatError(
            f"Cannot read torch file {path}: {type(e).__name__}: {e} (truncated or corrupted?)"
        ) from e
    state_dict = _unwrap_state_dict(obj, str(path))
    return {k: _to_numpy(v) for k, v in state_dict.items()}


def _unpickling_reason(error: Exception) -> str:
    """torch's reason for refusing a pickle, without its terminal colours and advice."""
    lines = re.sub(r"\x1b\[[0-9;]*m", "", str(error)).splitlines()
    return next((line.strip() for line in lines if "Unsupported global" in line), lines[0])


def _unwrap_state_dict(obj: Any, source: str) -> dict[str, Any]:
    """The tensors of a (possibly wrapped, possibly ``module.``/``model.``-prefixed) state
    dict."""
    while isinstance(obj, Mapping):
        wrapped = [k for k in _WRAPPERS if _holds_tensors(obj.get(k))]
        if not wrapped:
            break
        obj = obj[wrapped[0]]
    if not isinstance(obj, Mapping):
        raise WeightFormatError(f"{source} holds a {type(obj).__name__}, not a state dict.")
    tensors = {k: v for k, v in obj.items() if hasattr(v, "shape") and hasattr(v, "dtype")}
    if not tensors:
        raise WeightFormatError(f"{source} holds no tensors (keys: {sorted(obj)[:10]}).")
    return tensors


def _holds_tensors(obj: Any) -> bool:
    """Whether ``obj`` is a mapping holding tensors, itself or in a wrapper (a checkpoint's
    ``"model"`` may be its settings beside its ``"model_state_dict"``)."""
    if not isinstance(obj, Mapping):
        return False
    if any(hasattr(v, "shape") and hasattr(v, "dtype") for v in obj.values()):
        return True
    return any(_holds_tensors(obj.get(k)) for k in _WRAPPERS)


def _strip_prefixes(tensors: dict[str, Any]) -> dict[str, Any]:
    """``tensors`` without the ``module.``/``model.``/``_orig_mod.`` prefixes that every key
    has."""
    while prefix := next((p for p in _PREFIXES if all(k.startswith(p) for k in tensors)), ""):
        tensors = {k.removeprefix(prefix): v for k, v in tensors.items()}
    return tensors


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The tensors of a ``.safetensors`` or torch file, without ``module.`` (DataParallel),
    ``model.`` (Lightning) or ``_orig_mod.`` (``torch.compile``) prefixes."""
    if file_kind(path) == "safetensors":
        return _strip_prefixes(read_safetensors(path))
    return _strip_prefixes(read_torch(path))
