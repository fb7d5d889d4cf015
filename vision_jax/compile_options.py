"""XLA compiler options for the train and eval steps, chosen per backend and compute dtype.

On CPU, jaxlib 0.10 hands individual convolutions, dots and reductions to the YNNPACK library by
default. What ``benchmarks/train_throughput.py`` showed (figures in
``benchmarks/RESULTS.md``):

- convolutions: XLA's own (Eigen) convolutions are faster than YNNPACK's, fp32 and bf16 alike,
  so convolutions stay away from YNNPACK.
- dots: in float32, Eigen's dots win; with bfloat16 operands YNNPACK's dots win, so they stay
  with YNNPACK there.
- reductions stay with YNNPACK: without them, BatchNorm statistics make ResNet-50 much slower.

With activation checkpointing (``model.remat``) the train step also keeps XLA's CPU pipeline from
expanding ``jax.checkpoint``'s optimisation barriers before common-subexpression elimination,
which would merge the recomputed activations with the saved ones and keep them all (remat would
save no memory; the README gives the temporaries with and without).

A CPU without bfloat16 instructions (AVX512_BF16, AMX or Arm's BF16; Intel's Ice Lake, for one)
converts every bfloat16 operand to float32 and back, so a bfloat16 step is slower there than a
float32 one: the step's options then come with a warning, once per process.

Elsewhere (GPU, TPU) no options are set. Options are per executable (``jax.jit(...,
compiler_options=...)``), so nothing changes for the user's own jitted code.
"""

from __future__ import annotations

import functools
import logging
import pathlib
from typing import Any

import jax
import jax.numpy as jnp

logger = logging.getLogger(__name__)

_YNN = "xla_cpu_experimental_ynn_fusion_type"
_NO_PASSES = "xla_disable_hlo_passes"
_BFLOAT16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})  # x86 AVX-512, AMX; Arm


@functools.cache
def _cpu_accepts_ynn_option() -> bool:
    """Whether this jaxlib's CPU compiler knows the YNNPACK fusion option."""
    options = {_YNN: "LIBRARY_FUSION_TYPE_REDUCE"}
    try:
        jax.jit(jnp.sum, compiler_options=options).lower(jnp.ones(2)).compile()
    except Exception as e:  # noqa: BLE001  (an unknown option raises an XLA runtime error)
        logger.info("Not setting %s: %s", _YNN, e)
        return False
    return True


def step_compiler_options(dtype: Any, *, remat: bool = False) -> dict[str, str] | None:
    """XLA options for a step whose model computes in ``dtype`` (``None``: the defaults);
    ``remat``: the model recomputes activations (``model.remat``) in this step's backward pass."""
    if jax.default_backend() != "cpu":
        return None
    if jnp.dtype(dtype) == jnp.bfloat16:
        _warn_of_bfloat16_emulation()
    options = {}
    if _cpu_accepts_ynn_option():
        kinds = ["LIBRARY_FUSION_TYPE_REDUCE"]
        if jnp.dtype(dtype) != jnp.float32:
            kinds.append("LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT")
        options[_YNN] = ",".join(kinds)
    if remat:  # keep jax.checkpoint's barriers, else CSE merges the recomputation away
        options[_NO_PASSES] = "cse_barrier_expander"
    return options or None


@functools.cache
def cpu_flags() -> frozenset[str] | None:
    """This CPU's feature flags as Linux lists them (``/proc/cpuinfo``); None where unknown."""
    try:
        text = pathlib.Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):  # x86, Arm
            return frozenset(value.split())
    return None


@functools.cache
def _warn_of_bfloat16_emulation() -> None:
    """Warn (once) where this CPU has no bfloat16 instructions."""
    flags = cpu_flags()
    if flags is not None and not flags & _BFLOAT16_FLAGS:
        logger.warning(
            "This CPU has no bfloat16 instructions (AVX512_BF16, AMX or Arm BF16): "
            "model.dtype=bfloat16 computes by converting to float32 and back, so its steps "
            "are slower here than in float32."
        )
