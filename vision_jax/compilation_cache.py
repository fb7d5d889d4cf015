"""JAX's persistent compilation cache as ``--compilation_cache`` sets it, for the command line
and for Python code of its own (a notebook, a big_vision- or scenic-style script with absl flags
of its own: this module defines no flags, unlike :mod:`vision_jax.main`)::

    from vision_jax.compilation_cache import configure_compilation_cache
    configure_compilation_cache(workdir, "auto")  # before the first computation
"""

from __future__ import annotations

import logging
import math
import os
import posixpath
import shutil
import time
from typing import Any

from vision_jax.output_errors import is_url, unwritable_folder

EMPTY_SETTING = "is empty: give a folder, 'auto' or 'off'."
_CACHE_OFF = ("off", "false", "none", "no", "0")


def _unwritable(folder: str) -> str | None:
    """Why files cannot be created in ``folder`` (made if missing), or None."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        return "it is a file, not a folder"
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        return e.strerror or str(e)
    return unwritable_folder(folder)


def compilation_cache_dir(workdir: str | os.PathLike, setting: str) -> str | None:
    """The persistent compilation cache folder of ``--compilation_cache`` (None: off, also
    spelled false, none, no or 0; 'auto', in any case: ``jax_cache`` beside the workdir)."""
    if setting.strip().lower() in _CACHE_OFF:
        return None
    if not setting.strip():
        raise ValueError(f"--compilation_cache {EMPTY_SETTING}")
    if setting.strip().lower() != "auto":  # absolute: the same folder after a chdir
        return setting if is_url(setting) else os.path.abspath(os.path.expanduser(setting))
    workdir = os.fspath(workdir).rstrip("/") or "/"
    if is_url(workdir):  # beside it in its bucket; in a bucket's root for the root itself
        scheme, _, path = workdir.partition("://")
        bucket, _, folder = path.partition("/")
        return f"{scheme}://{posixpath.join(bucket, posixpath.dirname(folder), 'jax_cache')}"
    return posixpath.join(os.path.dirname(os.path.abspath(workdir)), "jax_cache")


def _rewrite_unreadable_entries() -> None:
    """Makes JAX delete a cache entry it cannot read (cut short by a full disk or a process
    killed while writing it), so that the compile that follows writes it again: JAX skips a key
    that has a file, and the program compiled, with a warning, at every start."""
    import jax
    from jax._src import compilation_cache, lru_cache

    read = compilation_cache.get_executable_and_time
    if getattr(read, "rewrites_unreadable", False):
        return

    def read_or_delete(cache_key: str, *args: Any, **kwargs: Any) -> Any:
        try:
            return read(cache_key, *args, **kwargs)
        except OSError:  # not reached (a lock's timeout, a bucket's hiccup): the entry stays
            raise
        except Exception:
            cache = compilation_cache._cache
            # one process deletes (another may be writing the entry it cannot read yet)
            if isinstance(cache, lru_cache.LRUCache) and jax.process_index() == 0:
                entry = cache.path / f"{cache_key}{lru_cache._CACHE_SUFFIX}"
                try:
                    entry.unlink()
                    logging.warning("Deleted the unreadable compilation cache entry %s: this "
                                    "compile writes it again.", entry)  # fmt: skip
                except OSError:  # a read-only cache
                    pass
            raise

    read_or_delete.rewrites_unreadable = True  # type: ignore[attr-defined]
    compilation_cache.get_executable_and_time = read_or_delete


# A local cache on a filesystem with less free space than this is only read for the run: on a
# full disk JAX writes empty entries (warning for each), which the next start reads, deletes and
# compiles again, one warning each.
CACHE_MIN_FREE_BYTES = 256 * 2**20
# An empty cache entry older than this is one a full disk cut short, removed at the start; a
# younger one may be an entry a sibling run sharing the cache is writing (JAX's LRUCache.put
# writes in place, not through a rename).
CACHE_EMPTY_ENTRY_AGE_S = 60.0


def _free_bytes(folder: str) -> int:
    """The free space, in bytes, of the filesystem of ``folder`` (as an unprivileged user)."""
    return shutil.disk_usage(folder).free


def _remove_empty_entries(folder: str) -> None:
    """Removes the empty entries of the cache ``folder`` (left by a full disk) older than
    :data:`CACHE_EMPTY_ENTRY_AGE_S` (not those a sibling run may be writing), with one line
    giving their count, not JAX's warning and a delete for each (process 0 only)."""
    import jax
    from jax._src import lru_cache

    if jax.process_index() != 0:
        return
    suffix, removed = lru_cache._CACHE_SUFFIX, 0
    before = time.time() - CACHE_EMPTY_ENTRY_AGE_S
    with os.scandir(folder) as entries:
        empty = [e for e in entries if e.name.endswith(suffix) and e.is_file()
                 and e.stat().st_size == 0 and e.stat().st_mtime < before]  # fmt: skip
    for entry in empty:
        try:
            os.unlink(entry.path)
            removed += 1
            atime = entry.path.removesuffix(suffix) + lru_cache._ATIME_SUFFIX
            if os.path.exists(atime):
                os.unlink(atime)
        except OSError:  # removed by another process meanwhile
            pass
    if removed:
        logging.info("Removed %d empty compilation cache entries (cut short by a full disk) "
                     "from %s: their programs compile again.", removed, folder)  # fmt: skip


def _low_on_space(folder: str) -> str | None:
    """Why the local cache ``folder`` is only read for this run (its filesystem has less than
    :data:`CACHE_MIN_FREE_BYTES` free), or None; its empty entries are removed first."""
    _remove_empty_entries(folder)
    free = _free_bytes(folder)
    if free >= CACHE_MIN_FREE_BYTES:
        return None
    return (f"its filesystem has {free / 2**20:.0f} MiB free, under "
            f"{CACHE_MIN_FREE_BYTES // 2**20} MiB")  # fmt: skip


def configure_compilation_cache(workdir: str | os.PathLike, setting: str) -> None:
    """Sets JAX's persistent compilation cache as ``--compilation_cache`` says. A cache also
    keeps the programs that compile in under JAX's default second (state and variable
    initialisers, RNG splits; benchmarks/RESULTS.md), unless
    ``JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS`` says otherwise. A local folder that cannot
    be made turns the cache off, one that cannot be written is only read (warned; no write is
    tried, so JAX warns of none); a
    local one on a filesystem with less than :data:`CACHE_MIN_FREE_BYTES` free is only read
    for the run (warned), and the empty entries a full disk left in it are removed (one line). An
    entry that cannot be read is deleted, so that the compile writes it again. Off a GPU (and
    on a nearly full disk), XLA's GPU caches are off
    (``jax_persistent_cache_enable_xla_caches``, unless
    ``JAX_PERSISTENT_CACHE_ENABLE_XLA_CACHES`` says otherwise): JAX's default puts their
    folder, inside the cache's, into every key, so a cache copied, moved or reached by another
    path never hit. Call it after ``jax.distributed.initialize``, if any (it asks JAX's backend
    whether it is a GPU), and before the process's first compilation: JAX settles on its cache
    then."""
    import jax

    if setting.strip().lower() != "auto" or not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", compilation_cache_dir(workdir, setting))
    folder, low_space, read_only = jax.config.jax_compilation_cache_dir, None, False
    if folder and not is_url(folder) and (problem := _unwritable(folder)):
        if os.access(folder, os.R_OK | os.X_OK):  # a filled cache on a read-only mount
            logging.warning("The compilation cache %s cannot be written (%s): it is only read; "
                            "what it lacks compiles at every start.", folder, problem)  # fmt: skip
            read_only = True  # not JAX's two lines for every program it cannot write
        else:
            logging.warning("The compilation cache %s cannot be written (%s): it is off, and a "
                            "restart compiles again.", folder, problem)  # fmt: skip
            jax.config.update("jax_compilation_cache_dir", None)
    elif folder and not is_url(folder) and (low_space := _low_on_space(folder)):
        logging.warning("The compilation cache %s is only read for this run: %s (on a full "
                        "disk, JAX writes empty entries).", folder, low_space)  # fmt: skip
        read_only = True  # (XLA's GPU caches are off too: they would write into it)
    elif folder:
        logging.info("Compilation cache: %s.", folder)
    if jax.config.jax_compilation_cache_dir:
        _rewrite_unreadable_entries()
    # A cache only read: JAX writes no program that compiled in under this (every one)
    min_seconds = os.environ.get("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", 0.0)
    jax.config.update("jax_persistent_cache_min_compile_time_secs",
                      math.inf if read_only else float(min_seconds))  # fmt: skip
    if (
        jax.config.jax_compilation_cache_dir
        and "JAX_PERSISTENT_CACHE_ENABLE_XLA_CACHES" not in os.environ
        and (low_space or jax.default_backend() != "gpu")
    ):
        jax.config.update("jax_persistent_cache_enable_xla_caches", "none")
