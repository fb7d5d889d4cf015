"""Content digests of saved pytrees, so that a checkpoint damaged on disk is not restored as good.

orbax checks a checkpoint's structure, not its values: a flipped bit in an array's file (zstd
stores incompressible float data as raw blocks) restores silently. At every save the train
state's arrays are digested and the digests go into the step's JSON meta; a restore digests
what it read and names the first array that differs.

Each array's digest is two sums of its 32-bit words (narrower dtypes widened), modulo 2**32:
plain, which any single flipped bit changes, and weighted by position, which a swap of two
chunks changes. Integer sums are exact in any order, so sharded and single-device arrays of the
same values digest alike, whatever mesh wrote or reads them, on the host or on the devices.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vision_jax.masks import path_to_str
from vision_jax.sharding import may_dispatch_ahead

_GOLDEN = 2654435761  # Knuth's multiplicative hash constant: position weights spread over 32 bits
_CHUNK = 1 << 20  # words per step of the host digest


def _device_words(x: jax.Array) -> jax.Array:
    """``x``'s bits as one flat uint32 word per element."""
    x = jnp.ravel(x)
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    if x.dtype.itemsize == 8:  # two words each, low first (as a little-endian host reads them)
        return jnp.ravel(jax.lax.bitcast_convert_type(x, jnp.uint32))
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize]
    return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


@jax.jit
def _device_sums(x: jax.Array) -> jax.Array:
    """Both sums of an array that spans processes (a collective computation)."""
    words = _device_words(x)
    weight = jax.lax.iota(jnp.uint32, words.size) * jnp.uint32(_GOLDEN) + jnp.uint32(1)
    plain, weighted = jnp.sum(words, dtype=jnp.uint32), jnp.sum(words * weight, dtype=jnp.uint32)
    return jnp.stack([plain, weighted])


@functools.cache
def _weights() -> np.ndarray:
    """Position weights of the first :data:`_CHUNK` words (later chunks shift them)."""
    return (np.arange(_CHUNK, dtype=np.uint64) * _GOLDEN + 1).astype(np.uint32)


def _host_sums(x: np.ndarray) -> tuple[int, int]:
    """Both sums of a host array, a chunk at a time: chunk ``c`` at ``start`` adds its
    words weighted from 1 plus ``start * _GOLDEN`` times its plain sum."""
    x = np.ascontiguousarray(np.ravel(x)).astype(x.dtype.newbyteorder("<"), copy=False)
    width = min(x.dtype.itemsize, 4)  # 8-byte values as two words, low first
    words = x.view(np.uint8) if x.dtype == bool else x.view(f"<u{width}")
    plain = weighted = 0
    for start in range(0, words.size, _CHUNK):
        chunk = words[start : start + _CHUNK].astype(np.uint32)
        chunk_plain = int(np.add.reduce(chunk, dtype=np.uint32))
        chunk_weighted = int(np.add.reduce(chunk * _weights()[: chunk.size], dtype=np.uint32))
        plain += chunk_plain
        weighted += chunk_weighted + start * _GOLDEN * chunk_plain
    return plain % 2**32, weighted % 2**32


def _on_devices(x: Any) -> bool:
    """Whether ``x`` is digested on its devices: arrays on accelerators or spread over processes
    (one compilation per shape); arrays in this process's host memory are digested there (no
    compilation)."""
    return isinstance(x, jax.Array) and (
        not x.is_fully_addressable or any(d.platform != "cpu" for d in x.sharding.device_set)
    )


def digest(tree: Any) -> dict[str, str]:
    """``path -> "dtype:plain:weighted"`` (hex) for each array leaf of ``tree``. Call on every
    process (arrays spread over processes are digested collectively). The device digests are
    all dispatched before any is fetched: one wait for the device, not one per array (in a
    multi-process CPU run one at a time: :func:`vision_jax.sharding.may_dispatch_ahead`)."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    now = (lambda sums: sums) if may_dispatch_ahead() else jax.device_get  # else one at a time
    on_devices = jax.device_get(
        [now(_device_sums(x)) if _on_devices(x) else None for _, x in leaves]
    )
    result = {}
    for (path, x), sums in zip(leaves, on_devices, strict=True):
        plain, weighted = _host_sums(np.asarray(x)) if sums is None else (int(s) for s in sums)
        result[path_to_str(path)] = f"{np.dtype(x.dtype).name}:{plain:08x}:{weighted:08x}"
    return result


def first_difference(saved: Mapping[str, str] | None, tree: Any) -> str | None:
    """The first array of ``tree`` whose digest differs from ``saved`` (what :func:`digest`
    gave at the save), described; None when all agree. Arrays the save did not digest, or
    restored in another dtype than saved (orbax casts), are not compared; without ``saved`` (a
    checkpoint from before digests) nothing is."""
    if not saved:
        return None
    for path, now in digest(tree).items():
        then = saved.get(path)
        if then is not None and then.split(":")[0] == now.split(":")[0] and then != now:
            return f"{path} holds other values than were saved (digest {now}, saved {then})"
    return None
