"""LoRA: low-rank adapters on chosen Dense / DenseGeneral / 1x1-Conv kernels, with exact merging.

An adapted kernel ``W`` gets two parameters beside it, ``lora_a`` ``(fan_in, rank)`` and
``lora_b`` ``(rank, fan_out)`` (zero at the start), so the layer computes
``y = x W + (alpha / rank) * dropout(x) A B``. The adapters live in the ``params`` tree next to
the kernel they adapt (``.../query/lora_a``), so the same regex masks select them for freezing,
optimizer state and sharding; the model code is untouched: :func:`apply_adapters` wraps a forward
in a Flax method interceptor that adds the low-rank path. :func:`merge` folds the adapters into
the kernels (``W + (alpha / rank) * A B``) for serving, giving the same network without them.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Iterator, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vision_jax.masks import tree_mask
from vision_jax.models.registry import families
from vision_jax.specs import DEFAULT_TARGETS, LoraSpec
from vision_jax.trees import flatten_dict, unflatten_dict

LORA_LEAVES = ("lora_a", "lora_b")


def _fans(path: str, shape: tuple[int, ...]) -> tuple[int, int]:
    """(fan_in, fan_out) of a kernel LoRA can adapt; a clear error for any other kernel."""
    name = path.rsplit("/", 2)[-2] if "/" in path else path
    if len(shape) == 2:  # Dense
        return shape[0], shape[1]
    if len(shape) == 4:  # Conv: 1x1 only
        if shape[:2] != (1, 1):
            raise ValueError(
                f"LoRA adapts Dense kernels and 1x1 convolutions; {path} is a "
                f"{shape[0]}x{shape[1]} convolution. Narrow lora.targets."
            )
        return shape[2], shape[3]
    if len(shape) == 3:  # DenseGeneral: (D, heads, head_dim) in, or (heads, head_dim, D) out
        if name == "out":
            return shape[0] * shape[1], shape[2]
        return shape[0], shape[1] * shape[2]
    raise ValueError(f"LoRA cannot adapt {path} of shape {shape}.")


def _unmergeable() -> tuple[type, ...]:
    """The module classes whose kernels LoRA refuses (every family's ``lora_unmergeable``)."""
    return tuple(t for fam in families() for t in fam.lora_unmergeable)


def _refusal(path: str, module_class: str) -> str:
    return (
        f"LoRA cannot adapt {path} ({module_class}): its kernel is transformed non-linearly, "
        "so the adapters could not be merged exactly. Narrow lora.targets."
    )


@contextlib.contextmanager
def refused_kernels() -> Iterator[dict[str, str]]:
    """Context recording the kernels LoRA must refuse in a model initialised (or traced) inside
    it: those of its family's ``lora_unmergeable`` modules, as ``{path: module class name}``,
    for :func:`add_adapters`' ``refused``."""
    unmergeable, found = _unmergeable(), {}

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name == "__call__" and isinstance(module, unmergeable):
            found["/".join((*module.path, "kernel"))] = type(module).__name__
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
        yield found


def add_adapters(
    params: Mapping[str, Any],
    spec: LoraSpec,
    rng: jax.Array,
    *,
    never_run: str | None = None,
    refused: Mapping[str, str] | None = None,
) -> dict:
    """Returns ``params`` with ``lora_a`` (random) and ``lora_b`` (zero) beside each target kernel.

    ``lora_a`` is drawn like torch's Linear (Kaiming-uniform, bound ``1/sqrt(fan_in)``), as in
    the LoRA reference implementation; the adapted network starts equal to the base network.
    ``model.apply`` uses the adapters only inside :func:`apply_adapters` (elsewhere it computes
    the base network and ignores them); :func:`merge` folds them in for use without it.
    ``never_run``: regex of the parameters the model never runs (the blocks after its last
    feature tap, :func:`vision_jax.optim.never_run`): their kernels get no adapter (nothing
    would read or train it); the others get the values they would get without it.
    ``refused``: the kernels LoRA cannot adapt, with their module class names
    (:func:`refused_kernels`): a target among them is an error naming its path.
    """
    flat = flatten_dict(params)
    try:
        mask = tree_mask(spec.targets, dict(params), what="lora.targets")
    except ValueError as e:
        if spec.targets != DEFAULT_TARGETS:
            raise
        raise ValueError(
            f"{e} The default lora.targets are a ViT's query and value projections: for another "
            "model, set lora.targets to its Dense or 1x1-convolution kernels."
        ) from e
    targets = [p for p, hit in flatten_dict(mask).items() if hit]
    if any(p.rsplit("/", 1)[-1] in LORA_LEAVES for p in flat):
        raise ValueError("The parameters already hold LoRA adapters.")
    idle = re.compile(never_run) if never_run else None
    if idle and targets and all(idle.fullmatch(p) for p in targets):
        raise ValueError(
            f"lora.targets {spec.targets!r} matches only kernels that never run (such as "
            f"{targets[0]!r}: the blocks after the last feature tap): no adapter would train."
        )
    out = dict(flat)
    for i, path in enumerate(targets):
        if not path.endswith("/kernel"):
            raise ValueError(f"lora.targets must select kernels; it matched {path}.")
        if idle and idle.fullmatch(path):
            continue
        if refused and path in refused:
            raise ValueError(_refusal(path, refused[path]))
        fan_in, fan_out = _fans(path, tuple(np.shape(flat[path])))
        bound = 1.0 / math.sqrt(fan_in)
        key = jax.random.fold_in(rng, i)
        prefix = path.removesuffix("kernel")
        out[prefix + "lora_a"] = jax.random.uniform(
            key, (fan_in, spec.rank), jnp.float32, -bound, bound
        )
        out[prefix + "lora_b"] = jnp.zeros((spec.rank, fan_out), jnp.float32)
    return unflatten_dict(out)


def adapter_paths(params: Mapping[str, Any]) -> list[str]:
    """Paths of the LoRA leaves in ``params``."""
    return [p for p in flatten_dict(params) if p.rsplit("/", 1)[-1] in LORA_LEAVES]


def merge(params: Mapping[str, Any], spec: LoraSpec) -> dict:
    """Folds every adapter into its kernel and drops the adapter leaves (exact, in float32)."""
    flat = flatten_dict(params)
    out = {p: v for p, v in flat.items() if p.rsplit("/", 1)[-1] not in LORA_LEAVES}
    for path in flat:
        if not path.endswith("/lora_a"):
            continue
        prefix = path.removesuffix("lora_a")
        kernel = jnp.asarray(out[prefix + "kernel"])
        a, b = jnp.asarray(flat[path]), jnp.asarray(flat[prefix + "lora_b"])
        delta = jnp.matmul(a, b, precision="highest") * spec.scale
        out[prefix + "kernel"] = kernel + delta.reshape(kernel.shape)
    return unflatten_dict(out)


def _adapted_call(spec: LoraSpec, train: bool):
    """A Flax interceptor adding ``scale * dropout(x) A B`` to adapted layers' outputs."""
    unmergeable = _unmergeable()

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name != "__call__" or not isinstance(
            module, (nn.Dense, nn.DenseGeneral, nn.Conv)
        ):
            return next_fun(*args, **kwargs)
        if not module.has_variable("params", "lora_a"):
            return next_fun(*args, **kwargs)
        y = next_fun(*args, **kwargs)
        x = args[0]
        a = module.get_variable("params", "lora_a")
        b = module.get_variable("params", "lora_b")
        if isinstance(module, unmergeable):
            path = "/".join((*module.path, "kernel"))
            raise ValueError(_refusal(path, type(module).__name__))
        if isinstance(module, nn.Conv):
            sh, sw = module.strides if module.strides is not None else (1, 1)
            x = x[:, ::sh, ::sw, :]
        elif isinstance(module, nn.DenseGeneral):
            axes = module.axis if isinstance(module.axis, tuple) else (module.axis,)
            x = x.reshape(*x.shape[: x.ndim - len(axes)], -1)
        if spec.dropout and train:
            keep = 1.0 - spec.dropout
            mask = jax.random.bernoulli(module.make_rng("dropout"), keep, x.shape)
            x = jnp.where(mask, x / keep, 0)
        dtype = y.dtype
        delta = (x.astype(dtype) @ a.astype(dtype)) @ b.astype(dtype)
        return y + (delta * jnp.asarray(spec.scale, dtype)).reshape(y.shape)

    return interceptor


@contextlib.contextmanager
def apply_adapters(spec: LoraSpec | None, *, train: bool) -> Iterator[None]:
    """Context in which ``model.apply`` uses the LoRA adapters found in its params."""
    if spec is None:
        yield
        return
    with nn.intercept_methods(_adapted_call(spec, train)):
        yield
