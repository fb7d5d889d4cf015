"""Helpers shared by the model tests: inputs, jitted Flax forwards, torch forwards."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from vision_jax.models.registry import create_model, model_spec


@functools.cache
def flax_fn(name: str, num_classes: int = 10):
    """(module, jitted eval-mode apply), shared across tests so each shape compiles once."""
    model = create_model(name, num_classes=num_classes)
    jitted = jax.jit(functools.partial(model.apply, train=False))

    def apply(variables, x):
        with jax.default_matmul_precision("highest"):  # no TF32 on GPUs; a no-op on CPU
            return jitted(variables, x)

    return model, apply


def images(size: int, batch: int = 2, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, size, size, 3)).astype(np.float32)


def torch_logits(module, x: np.ndarray) -> np.ndarray:
    """The torch module's eval output on NHWC ``x`` (transposed to NCHW)."""
    import torch

    with torch.no_grad():
        return module(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()


def state_dict_np(module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in module.state_dict().items()}


def n_params(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def flax_param_count(name: str, num_classes: int) -> int:
    model = create_model(name, num_classes=num_classes)
    size = model_spec(name).input_size
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, size, size, 3)))
    return n_params(shapes["params"])


def assert_declared_metrics(result: dict, task: type, prefix: str = "eval/") -> None:
    """The ``prefix`` results of a run are the task's declared ``metric_names`` and its
    ``per_class_metrics`` (``<name>/<class>``): what the run checks early_stopping.metric
    against before training."""
    names = {k.removeprefix(prefix) for k in result if k.startswith(prefix)}
    assert {n for n in names if "/" not in n} == set(task.metric_names), names
    assert {n.split("/")[0] for n in names if "/" in n} <= set(task.per_class_metrics), names
