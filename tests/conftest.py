"""Shared test fixtures: the timm reference (CPU torch) and the ../shared data folder."""

from __future__ import annotations

import os
import pathlib
import sys

import pytest

# Tests compile many small steps: XLA's backend optimisation level 0 halves compile times (the
# same HLO and float semantics; runs on the shipped level are the benchmarks and the README's
# commands). Set before JAX starts, and inherited by the tests' subprocesses.
FAST_COMPILE = "--xla_backend_optimization_level=0"
if FAST_COMPILE not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE}".strip()

SHARED = pathlib.Path(
    os.environ.get(
        "VISION_JAX_SHARED", pathlib.Path(__file__).resolve().parents[1] / ".." / "shared"
    )
).resolve()


def import_timm():
    """Imports timm on the CPU torch.

    torchvision 0.28 on PyPI is a CUDA build; on the CPU torch its C++ ops are missing and
    ``import timm`` fails with "operator torchvision::nms does not exist". Declaring the two op
    schemas first (we never call them) lets torchvision's Python side import.
    """
    torch = pytest.importorskip("torch")
    try:
        torch.ops.torchvision.nms  # noqa: B018
    except (AttributeError, RuntimeError):
        lib = torch.library.Library("torchvision", "DEF")  # noqa: F841 (must stay alive)
        lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        lib.define(
            "qnms(Tensor dets, Tensor scores, float iou_threshold, Tensor qdets, "
            "Tensor qscores) -> Tensor"
        )
        import_timm._lib = lib
    return pytest.importorskip("timm")


@pytest.fixture(scope="session", autouse=True)
def compilation_cache(tmp_path_factory):
    """Runs in the tests compile the same steps again and again: JAX's persistent cache (one
    folder per test session, also for the tests' subprocesses) reuses them: the same
    executables, so results stay bit-identical. The settings are restored at the end."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache as cache

    values = {
        "jax_compilation_cache_dir": str(tmp_path_factory.mktemp("jax_cache")),
        "jax_persistent_cache_min_compile_time_secs": 0,
    }
    before = {k: getattr(jax.config, k) for k in values}
    with pytest.MonkeyPatch.context() as env:
        cache.reset_cache()
        for key, value in values.items():
            jax.config.update(key, value)
            env.setenv(key.upper(), str(value))
        yield
    cache.reset_cache()
    for key, value in before.items():
        jax.config.update(key, value)


@pytest.fixture(scope="session")
def timm():
    return import_timm()


@pytest.fixture(scope="session")
def shared_dir() -> pathlib.Path:
    """``../shared`` beside the checkout; tests that use it skip cleanly when it is absent."""
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} is absent (real data and weights live there).")
    return SHARED


@pytest.fixture(scope="session")
def digits_run(tmp_path_factory):
    """A finished 40-step digits run (CIFAR ResNet-20, about 0.4 top-1: several classes
    predicted), logged every 5 steps and evaluated every 10, shared by the tests of what comes
    after training (predict, report): ``(workdir, final metrics, the report's figures made
    during its final evaluation)``."""
    from test_train import small_config

    from vision_jax.report import FinalEvaluation
    from vision_jax.train import train_and_evaluate

    workdir = tmp_path_factory.mktemp("digits_run")
    steps = {"total_steps": 40, "checkpoint_every_steps": 40, "log_every_steps": 5}
    config = small_config(eval_every_steps=10, **steps, **{"optimizer.learning_rate": 0.1})
    final = FinalEvaluation()
    return workdir, train_and_evaluate(config, str(workdir), final=final), final


@pytest.fixture
def own_models(monkeypatch):
    """The model and family registries as they were, and the modules unimported by the returned
    ``unimport(name)`` gone, after a test that registers models of its own."""
    from vision_jax.models import registry

    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    monkeypatch.setattr(registry, "_FAMILIES", dict(registry._FAMILIES))

    def unimport(name: str) -> None:
        monkeypatch.setitem(sys.modules, name, None)  # recorded: removed after the test
        del sys.modules[name]

    return unimport
