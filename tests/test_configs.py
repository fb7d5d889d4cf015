"""Every config file loads, each variant only sets keys the defaults define (a typo would
otherwise add a key that nothing reads) and turns into typed specs, and its docstring holds a
command and a result."""

from __future__ import annotations

import importlib.util
import pathlib
import re

import pytest

from vision_jax import specs
from vision_jax.config import TrackedConfig, default_config

CONFIGS = sorted((pathlib.Path(__file__).resolve().parents[1] / "configs").glob("*.py"))


def _load(path: pathlib.Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _keys(config, prefix=""):
    for key, value in config.items():
        if hasattr(value, "items"):
            yield from _keys(value, f"{prefix}{key}.")
        else:
            yield prefix + key


def _variants(module) -> list:
    docstring = module.__doc__ or ""
    args = set(re.findall(r"--config=configs/\w+\.py:(\w+)", docstring))
    return sorted(args) or [None]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_loads_and_sets_only_known_keys(path):
    module = _load(path)
    doc = module.__doc__ or ""
    assert "python -m vision_jax.main --config=configs/" in doc, "docstring lacks the command"
    assert re.search(r"[Ee]xpected result", doc), "docstring lacks the expected result"
    assert "RESULTS_TABLE" not in doc
    known = set(_keys(default_config()))
    for arg in _variants(module):
        config = module.get_config(arg)
        if given := re.search(r"--config\.init\.path=(\S+)", doc):  # set on the command line
            config.init.path = given.group(1)
        unknown = set(_keys(config)) - known
        assert not unknown, f"{path.name}:{arg} sets keys the defaults lack: {sorted(unknown)}"
        tracked = TrackedConfig(config)
        specs.run_spec(tracked)  # typed, branch keys consistent
        tracked.check_all_read()
