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


def test_a_saved_config_off_its_branch_warns_only_for_values_other_than_the_defaults(caplog):
    """An earlier version's saved config spelled branch keys out at their defaults
    (rsqrt_timescale under cosine, momentum under adamw): read silently; another value is
    reset with a warning, and a new config refuses either."""
    import logging

    schedule = {"decay": "cosine", "rsqrt_timescale": 10000.0, "step_boundaries": [0.5, 0.75]}
    optimizer = {**default_config().optimizer.to_dict(), "momentum": 0.9, "nesterov": False}
    with caplog.at_level(logging.WARNING), specs.saved_config():
        assert specs.schedule_spec(schedule).decay == "cosine"
        assert specs.optimizer_spec(optimizer).name == "adamw"
    assert "The saved config sets" not in caplog.text
    with caplog.at_level(logging.WARNING), specs.saved_config():
        assert specs.schedule_spec({**schedule, "rsqrt_timescale": 500.0}).rsqrt_timescale == 10_000
    assert "The saved config sets schedule.rsqrt_timescale, which only applies" in caplog.text
    with pytest.raises(specs.ConfigError, match="schedule.rsqrt_timescale only applies"):
        specs.schedule_spec(schedule)
