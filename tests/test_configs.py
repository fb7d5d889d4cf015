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
    data = {**default_config().data.to_dict(), "source": "digits", "skip_corrupt": True}
    with caplog.at_level(logging.WARNING), specs.saved_config():  # an earlier version's run
        assert specs.data_spec(data).skip_corrupt is False
    assert "The saved config sets data.skip_corrupt, which only applies to sources" in caplog.text


def test_the_shuffle_buffer_is_a_positive_count_of_tfds_sources_only():
    """Other sources shuffle whole epochs: a buffer set for them would do nothing."""
    data = default_config().data.to_dict()
    assert specs.data_spec({**data, "name": "mnist", "shuffle_buffer": 250_000}).shuffle_buffer == (
        250_000
    )
    with pytest.raises(specs.ConfigError, match=r"data.shuffle_buffer must lie in \[1, inf\)"):
        specs.data_spec({**data, "name": "mnist", "shuffle_buffer": 0})
    digits = {**data, "source": "digits"}
    assert specs.data_spec(digits).shuffle_buffer == 10_000
    with pytest.raises(specs.ConfigError, match=r"data.shuffle_buffer only applies to source='tfds"
                       r"' \(other sources shuffle whole epochs\); remove it \(or pass "
                       r"--config.data.shuffle_buffer=10000\)"):  # fmt: skip
        specs.data_spec({**digits, "shuffle_buffer": 5})


def test_class_names_given_as_one_string_are_refused():
    """A dict config (no ConfigDict types) with data.class_names "a,b": refused, not 3 classes
    'a', ',' and 'b'; a list of names stays a tuple. An earlier version's saved run read it as
    it ran, the string its classes' characters (it loads to predict, report, export)."""
    data = {**default_config().data.to_dict(), "source": "arrays"}
    with pytest.raises(specs.ConfigError, match=r"^data.class_names must be a sequence of "
                       r"names, got the string 'a,b' \(a tuple"):  # fmt: skip
        specs.data_spec({**data, "class_names": "a,b"})
    assert specs.data_spec({**data, "class_names": ["a", "b"]}).class_names == ("a", "b")
    with specs.saved_config():
        assert specs.data_spec({**data, "class_names": "ab"}).class_names == "ab"


@pytest.mark.parametrize(
    "key, value, name",
    [
        ("batch_size", 8.0, "batch_size must be an integer; got 8.0"),
        ("total_steps", 2.5, "total_steps must be an integer; got 2.5"),
        ("schedule.warmup_steps", 10.0, "schedule.warmup_steps must be an integer; got 10.0"),
        ("early_stopping.patience", True, "early_stopping.patience must be an integer; got True"),
        ("lora.rank", 2.5, "lora.rank must be an integer; got 2.5"),
        ("data.classes", (0, 1.5), r"data.classes must be a tuple of integers; got \(0, 1.5\)"),
        ("schedule.warmup_epochs", True, "schedule.warmup_epochs must be a number; got True"),
        ("total_epochs", True, "total_epochs must be a number; got True"),
        ("lora.alpha", True, "lora.alpha must be a number; got True"),  # was cast to 1.0
    ],
)
def test_integer_keys_of_a_dict_config_refuse_other_numbers(key, value, name):
    """A dict config has no ConfigDict types: batch_size 8.0 failed deep in JAX, total_steps 2.5
    ran 2 steps and recorded 2.5; every integer key refuses a float (as a ConfigDict does), and
    a float key a bool (as default_config's ConfigDict does)."""
    config = default_config()
    config.total_epochs, config.total_steps = None, 4
    config.data.val_split = "train[90%:]"  # early_stopping applies
    config.lora.rank = 4  # lora's keys apply
    specs.run_spec(TrackedConfig(config.to_dict()))  # the ConfigDict's own values pass
    *parents, leaf = key.split(".")
    node = config = config.to_dict()
    for parent in parents:
        node = node[parent]
    node[leaf] = value
    with pytest.raises(specs.ConfigError, match=f"^{name}.$"):
        specs.run_spec(TrackedConfig(config))


def test_a_bool_for_a_number_key_is_refused_naming_the_key(tmp_path):
    """ml_collections casts True to 1.0 for a float key (``c.input.random_erasing = True`` ran
    with probability 1) and keeps it for an int key: a config from ``default_config`` refuses
    it, naming the key from the root (one line from a config file); bool keys, and numbers for
    number keys, are kept; a saved run's config loads as it ran."""
    import subprocess
    import sys

    from vision_jax.config import saved_with_defaults

    config = default_config()
    config.model.drop_path_rate = 0.0  # a model override the config file adds
    for key, what in (("input.random_erasing", "a number"), ("optimizer.b1", "a number"),
                      ("seed", "an integer"), ("total_steps", "an integer"),
                      ("model.drop_path_rate", "a number")):  # fmt: skip
        section, _, leaf = key.rpartition(".")
        node = config[section] if section else config
        message = f"^Could not override field '{key}': True is a bool, and the key takes {what}.$"
        with pytest.raises(TypeError, match=message):
            node[leaf] = True
        with pytest.raises(TypeError, match=message):
            setattr(node, leaf, True)
    config.input.flip, config.model.frozen_bn_stats = False, True
    config.eval_before_training = True
    config.input.random_erasing, config.total_epochs, config.total_steps = 1, None, 4
    assert config.input.random_erasing == 1.0 and config.input.flip is False
    assert config.eval_before_training is True and config.model.frozen_bn_stats is True
    config.lora.rank, config.lora.train_head = 4, False  # a placeholder(bool)
    specs.run_spec(TrackedConfig(config))
    saved = config.to_dict()  # an earlier version's record: a bool where a number goes
    saved["input"]["random_erasing"] = True
    with specs.saved_config():
        spec = specs.run_spec(TrackedConfig(saved_with_defaults(saved)))
    assert spec.input.random_erasing is True
    config_file = tmp_path / "bool.py"
    config_file.write_text(
        "from vision_jax.config import default_config\n\n\n"
        "def get_config(arg=None):\n"
        "    c = default_config()\n"
        "    c.input.random_erasing = True\n"
        "    return c\n"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "vision_jax.main", f"--config={config_file}",
         f"--workdir={tmp_path / 'run'}"],
        cwd=pathlib.Path(__file__).resolve().parents[1], capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [
        f"vision_jax: error: --config={config_file}: Could not override field "
        "'input.random_erasing': True is a bool, and the key takes a number."
    ]


def test_a_section_replaced_by_a_config_dict_or_a_dict_keeps_the_bool_refusal():
    """``c.lora = ml_collections.ConfigDict(dict(rank=8))`` and big_vision's
    ``c.model = ml_collections.ConfigDict()`` then filling it in were refused (a ConfigDict
    cannot be cast to NumberConfigDict); the new section refuses a bool for a number key, the
    error naming the key from the root."""
    import ml_collections

    config = default_config()
    config.lora = ml_collections.ConfigDict(dict(rank=8))
    assert config.lora.rank == 8
    config.model = ml_collections.ConfigDict()
    config.model.name, config.model.drop_path_rate = "vit_ti16", 0.1
    assert config.model.to_dict() == {"name": "vit_ti16", "drop_path_rate": 0.1}
    config.init = dict(path="x.npz", head_bias_init=0.0)
    for key, what in (("lora.rank", "an integer"), ("model.drop_path_rate", "a number"),
                      ("init.head_bias_init", "a number")):  # fmt: skip
        section, _, leaf = key.rpartition(".")
        message = f"^Could not override field '{key}': True is a bool, and the key takes {what}.$"
        with pytest.raises(TypeError, match=message):
            setattr(config[section], leaf, True)


def test_a_schedule_longer_than_training_is_refused_with_the_config():
    """--config.total_steps=4 on a config with warmup_steps=20 was refused only once the model
    was built (by the optimizer); lengths in epochs wait for the data's steps per epoch."""
    config = default_config()
    config.total_epochs, config.total_steps, config.schedule.warmup_steps = None, 4, 20
    with pytest.raises(specs.ConfigError, match="warmup_steps=20 is 20 steps; training has 4"):
        specs.run_spec(TrackedConfig(config))
    config.schedule.warmup_steps, config.schedule.cooldown_fraction = 3, 0.5
    with pytest.raises(specs.ConfigError, match=r"^Warmup 3 \+ cooldown 2 > 4 training steps"):
        specs.run_spec(TrackedConfig(config))
    config.schedule.warmup_steps, config.schedule.warmup_epochs = None, 100.0
    specs.run_spec(TrackedConfig(config))


def test_a_partial_dict_config_says_to_start_from_the_defaults():
    """A dict of only the changed keys: the missing key's error says where a config starts."""
    partial = {"model": {"name": "cifar_resnet20"}, "data": {"source": "arrays"}}
    advice = r"starts from vision_jax\.config\.default_config\(\) \(a dict: its to_dict\(\)"
    with pytest.raises(AttributeError, match=rf"has no key 'mesh'.*{advice} with your changes"):
        specs.run_spec(TrackedConfig(partial))


def test_fsdp_keys_on_a_mesh_without_an_fsdp_axis_warn_that_they_do_nothing(caplog):
    """fsdp_min_size and 'fsdp'-only sharding rules replicate every parameter on a mesh
    without an fsdp axis: a warning names them (a config file written for FSDP runs on other
    meshes too, so not an error); with an fsdp axis, or rules naming other axes, none."""
    import logging

    def warned(**overrides) -> str:
        config = default_config()
        config.update({"model": {"name": "vit_ti16"}, **overrides})
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            specs.run_spec(config)
        return caplog.text

    rules = ((".*kernel", "fsdp"), (".*", "replicated"))
    text = warned(fsdp_min_size=16, sharding_rules=rules)
    assert "fsdp_min_size, sharding_rules: no effect on mesh 'data:-1' (no fsdp axis" in text
    assert not warned(fsdp_min_size=16, mesh="data:-1,fsdp:1")
    assert not warned(sharding_rules=((".*kernel", (None, "data")),))
    assert not warned()


def test_an_unknown_model_key_says_how_to_add_a_model_override(tmp_path):
    """The command line cannot add keys (the config is locked), but a config file can: every
    other model.* key is a create_model override. The message says so, and the way it names
    works: the key set in a file is then overridden on the command line."""
    import subprocess
    import sys

    from absl import flags
    from ml_collections import config_flags

    from vision_jax.config import unknown_key

    hint = (" Model overrides (create_model arguments such as drop_path_rate, dropout_rate, "
            "pool_type) are added in the config file (c.model.drop_path_rate = ...); the command "
            "line can then override them (--config.model.drop_path_rate=...).")  # fmt: skip
    message = unknown_key(default_config(), "model.drop_path_rate")
    assert message == "Unknown config key 'model.drop_path_rate'." + hint  # (no model.* alike)
    assert "Model overrides" not in unknown_key(default_config(), "optimizer.drop_path_rate")
    root = pathlib.Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, "-m", "vision_jax.main", "--config=configs/digits_pretrain.py",
         "--config.model.drop_path_rate=0.1", f"--workdir={tmp_path}"],
        cwd=root, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].endswith(hint)
    config_file = tmp_path / "with_override.py"
    config_file.write_text(
        "from vision_jax.config import default_config\n\n\n"
        "def get_config(arg=None):\n"
        "    c = default_config()\n"
        "    c.model.drop_path_rate = 0.0\n"
        "    return c\n"
    )
    argv = ["main", f"--config={config_file}", "--config.model.drop_path_rate=0.1"]
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=values, lock_config=True,
                                    sys_argv=argv)  # fmt: skip
    values(argv)
    assert values.config.model.drop_path_rate == 0.1


def test_a_checkpoint_without_a_class_token_names_the_config_file_setting():
    import numpy as np

    from vision_jax.weights import surgery

    block = {"Transformer": {"encoder_norm": {"scale": np.ones(2)}}}
    init = {"params": {"cls": np.zeros((1, 1, 2)), **block}}
    expected = r"pool_type='gap' \(in the config file: c\.model\.pool_type = 'gap'\)\.$"
    with pytest.raises(surgery.WeightMismatchError, match=expected):
        surgery.adapt(init, {"params": block})
