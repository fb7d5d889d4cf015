"""A family's declarations are checked where the library reads them (README "Adding a
backbone"): a wrong one is an error naming the family, not a silent change of training."""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from test_train import small_config

from vision_jax.models import create_model, registry
from vision_jax.models.head import classify
from vision_jax.models.registry import (
    Family,
    FeatureTap,
    family,
    register_family,
    register_model,
    stage_taps,
    stages_run,
)
from vision_jax.models.vit import VisionTransformer


@pytest.fixture(autouse=True)
def restore_registry(own_models):
    """Every family and model a test registers is removed afterwards (conftest's own_models)."""
    return own_models


class ToyNet(nn.Module):
    """Two stride-2 stages of two blocks each."""

    num_classes: int
    dtype: Any = jnp.float32
    feature_taps: tuple[int, ...] | None = None

    @nn.compact
    def __call__(self, images, *, train=False):
        taps = stage_taps(self.feature_taps, 2, self.num_classes)
        x = nn.Conv(4, (3, 3), name="stem")(jnp.asarray(images, self.dtype))
        outs = []
        for i in range(stages_run(self, taps, 2)):
            x = nn.Conv(4 * (i + 1), (3, 3), strides=2, name=f"stage{i}_block0")(x)
            x = nn.Conv(4 * (i + 1), (1, 1), name=f"stage{i}_block1")(x)
            x = nn.LayerNorm(name=f"stage{i}_norm")(x)
            outs.append(x)
        if taps:
            return tuple(outs[i] for i in taps)
        x = nn.LayerNorm(name="final_norm")(x)
        return classify(x.mean((1, 2)), self.num_classes, self.dtype)


def toy_groups(model):
    return [("stem/.*", 0), ("stage0_.*", 1), ("stage1_.*", 2), (".*", 3)], 4


def toy_taps(model):
    return [FeatureTap("stage0", 2, 4), FeatureTap("stage1", 4, 8)]


def toy_family(name: str, module: type | None = None, **changes: Any) -> str:
    """Registers family and model ``name`` on ``module`` (a ToyNet subclass of its own) with the
    toy declarations, changed."""
    module = module or type(name, (ToyNet,), {})
    declared = dict(
        name=name, module=module, layer_groups=toy_groups, norm_modules=r"stage\d_norm|final_norm",
        feature_taps=toy_taps, converter="none", after_last_stage="final_norm/.*",
    )  # fmt: skip
    register_family(Family(**{**declared, **changes}))
    register_model(name, family=name, module=module, input_size=16)
    return name


def params_of(model) -> Any:
    return model.init(jax.random.key(0), jnp.ones((1, 16, 16, 3)))["params"]


def test_toy_family_passes_every_check():
    toy_family("toy_ok")
    assert family(create_model("toy_ok", num_classes=3)).name == "toy_ok"


def test_subclass_of_a_registered_module_gets_its_own_family():
    """``class MyViT(VisionTransformer)`` under a family of its own is not read as a ViT (the
    first registered family whose module it is an instance of): its layer groups count."""

    class MyViT(VisionTransformer):
        pass

    def groups(model):
        return [(".*", 1)], 3

    register_family(
        Family(
            name="myvit_test", module=MyViT, layer_groups=groups, norm_modules="LayerNorm_0",
            feature_taps=lambda m: [], converter="none",
        )
    )  # fmt: skip
    register_model(
        "myvit_test", family="myvit_test", module=MyViT, input_size=16, patch_size=8, width=8,
        depth=1, num_heads=1, mlp_dim=8,
    )  # fmt: skip
    model = create_model("myvit_test", num_classes=3)
    assert family(model).name == "myvit_test"
    assert family(create_model("vit_ti16", num_classes=3)).name == "vit"
    # family="vit" on MyViT would be a spec whose family disagrees with family(model)
    with pytest.raises(ValueError, match=r"module MyViT is of family 'myvit_test' .* not 'vit'"):
        register_model("myvit_as_vit", family="vit", module=MyViT, input_size=16)

    class MyViT2(MyViT):  # a subclass without a family of its own: MyViT's
        pass

    with pytest.raises(ValueError, match=r"register it with family='myvit_test'"):
        register_model("myvit2_as_vit", family="vit", module=MyViT2, input_size=16)
    register_model("myvit2_test", family="myvit_test", module=MyViT2, input_size=16)
    assert "myvit_as_vit" not in registry._REGISTRY and "myvit2_as_vit" not in registry._REGISTRY


def test_register_model_refuses_an_unknown_family_or_a_foreign_module():
    with pytest.raises(ValueError, match=r"family 'nosuchfamily' is not registered \(registered: "):
        register_model("toy_unreg", family="nosuchfamily", module=ToyNet, input_size=16)
    with pytest.raises(ValueError, match="register_family"):
        register_model("toy_unreg", family="nosuchfamily", module=ToyNet, input_size=16)
    with pytest.raises(
        ValueError, match=r"module ToyNet is neither the module of family 'vit' \(Vision"
    ):
        register_model("toy_vit", family="vit", module=ToyNet, input_size=16)
    assert "toy_unreg" not in registry._REGISTRY and "toy_vit" not in registry._REGISTRY

    class SubViT(VisionTransformer):
        pass

    register_model("subvit_test", family="vit", module=SubViT, input_size=16)  # a subclass


def block_groups(model):
    """One group per block (4), but the taps are per stage (2)."""
    blocks = [(rf"stage{i}_block{j}/.*", 2 * i + j + 1) for i in range(2) for j in range(2)]
    return [("stem/.*", 0), *blocks, (".*", 5)], 6


def test_layer_groups_must_match_the_feature_taps():
    """Per-block groups with per-stage taps made the last stage "never run" (trained in no
    preset) although it feeds the head."""
    from vision_jax import optim

    toy_family("toy_blocks", layer_groups=block_groups)
    model = create_model("toy_blocks", num_classes=0, feature_taps=(0, 1))
    with pytest.raises(ValueError, match=r"'toy_blocks'.*group i \+ 1 must be feature tap i"):
        optim.layer_groups(model)
    # without taps, per-block groups are a layer decay of one's choice
    plain = create_model("toy_blocks", num_classes=3)
    assert optim.layer_groups(plain)[1] == 6
    toy_family("toy_ok")
    rules, n_groups = optim.layer_groups(create_model("toy_ok", num_classes=0, feature_taps=(0,)))
    assert n_groups == 3


def test_one_group_family_refuses_taps_and_layer_decay():
    from vision_jax import optim

    toy_family("toy_one", layer_groups=lambda m: ([(".*", 0)], 1))
    tapped = create_model("toy_one", num_classes=0, feature_taps=(0, 1))
    with pytest.raises(ValueError, match=r"group i \+ 1 must be feature tap i"):
        optim.layer_groups(tapped)
    model = create_model("toy_one", num_classes=3)
    params = params_of(model)
    with pytest.raises(ValueError, match=r"layer_decay=0.5: family 'toy_one' declares no block"):
        optim.lr_multipliers(params, model, layer_decay=0.5)
    assert set(jax.tree.leaves(optim.lr_multipliers(params, model, layer_decay=1.0))) == {1.0}


def test_norm_modules_and_after_last_stage_must_match_a_parameter():
    """A typo trained no norm scale under bitfit, or left the final norm of a backbone whose
    last tap is an earlier stage in training, without a word."""
    from vision_jax import optim

    toy_family("toy_norms", norm_modules=r"LayerNorm_\d+")
    model = create_model("toy_norms", num_classes=3)
    params = params_of(model)
    with pytest.raises(ValueError, match=r"'toy_norms': norm_modules 'LayerNorm_\\\\d\+' matches"):
        optim.trainable_mask(params, model, preset="bitfit")
    optim.trainable_mask(params, model, preset="all")  # norms unread

    toy_family("toy_after", after_last_stage="head_norm/.*")
    model = create_model("toy_after", num_classes=0, feature_taps=(0,))
    with pytest.raises(ValueError, match=r"'toy_after': after_last_stage 'head_norm/\.\*' match"):
        optim.trainable_mask(params_of(model), model, preset="all")

    toy_family("toy_ok")
    model = create_model("toy_ok", num_classes=3)
    mask = optim.trainable_mask(params_of(model), model, preset="bitfit")
    assert mask["stage0_norm"]["scale"] and not mask["stage0_block0"]["kernel"]
    toy_family("toy_no_norms", norm_modules="")
    model = create_model("toy_no_norms", num_classes=3)
    optim.trainable_mask(params_of(model), model, preset="bitfit")


def test_feature_maps_must_have_the_declared_stride_and_channels():
    """A wrong FeatureTap built the pyramid heads for maps the backbone does not return."""
    from vision_jax.tasks.segmentation import Segmentation

    def wrong_stride(model):
        return [FeatureTap("stage0", 2, 4), FeatureTap("stage1", 8, 8)]

    def wrong_channels(model):
        return [FeatureTap("stage0", 2, 4), FeatureTap("stage1", 4, 16)]

    images = jnp.ones((1, 16, 16, 3))
    for name, taps, match in [
        ("toy_stride", wrong_stride, r"tap 1 \('stage1'\) declares stride 8 .*\[N, 2x2, 8\]"),
        ("toy_channels", wrong_channels, r"tap 1 \('stage1'\) .* returns \(1, 4, 4, 8\)"),
    ]:
        toy_family(name, feature_taps=taps)
        model = Segmentation(head="fpn", feature_taps=(0, 1)).build_model(name, 3)
        with pytest.raises(ValueError, match=rf"Family '{name}': feature {match}"):
            model.init(jax.random.key(0), images)
    toy_family("toy_ok")
    model = Segmentation(head="fpn", feature_taps=(0, 1)).build_model("toy_ok", 3)
    model.init(jax.random.key(0), jnp.ones((1, 15, 17, 3)))  # 8x9 and 4x5 maps (ceil)


def test_a_module_of_ones_own_without_remat_fields_is_told_to_declare_them():
    """A module of one's own asked for remat: "remat is for bit, resnet, vit models" told its
    author nothing. At their defaults (what the config passes every model) they are dropped."""
    toy_family("toy_remat")
    create_model("toy_remat", num_classes=3, remat="none", remat_rules=[])  # the defaults
    with pytest.raises(ValueError, match=r"Unknown override\(s\) \['remat'\] ") as e:
        create_model("toy_remat", num_classes=3, remat="block", remat_rules=())
    assert 'declare the fields remat: str = "none" and remat_rules: tuple = ()' in str(e.value)
    assert "remat_block" in str(e.value) and "remat is for" not in str(e.value)
    with pytest.raises(ValueError, match=r"Unknown override\(s\) \['remat_rules'\] "):
        create_model("toy_remat", num_classes=3, remat_rules=((".*", "block"),))
    with pytest.raises(ValueError, match="pool_type is for vit models") as e:  # unchanged
        create_model("toy_remat", num_classes=3, pool_type="avg")
    assert "declare" not in str(e.value)


def test_a_module_without_remat_fields_trains_from_a_default_config(tmp_path):
    """The default config passes model.remat="none" and model.remat_rules=() to every model: a
    minimal module (ToyNet declares neither) trains from it, remat fields optional."""
    from vision_jax.train import train_and_evaluate

    toy_family("toy_minimal")
    config = small_config(total_steps=2, **{"model.name": "toy_minimal"})
    assert (config.model.remat, tuple(config.model.remat_rules)) == ("none", ())
    result = train_and_evaluate(config, str(tmp_path / "run"))
    assert result["eval/examples"] == 360


def test_a_new_size_of_a_built_in_class_is_resolved_through_model_module_twice(
    tmp_path, monkeypatch, own_models
):
    """A module of one's own may register a new size of a library class (vit_tiny_d2, a
    VisionTransformer): "built in" means a library name, not a library class, so the second
    run in a process (the module imported already) is not refused as "built in"."""
    from vision_jax import specs
    from vision_jax.config import TrackedConfig
    from vision_jax.specs import ConfigError

    (tmp_path / "my_vits.py").write_text(
        "from vision_jax.models.registry import register_model\n"
        "from vision_jax.models.vit import VisionTransformer\n"
        'register_model("vit_tiny_d2", family="vit", module=VisionTransformer, input_size=32,\n'
        "               patch_size=16, width=32, depth=2, num_heads=2, mlp_dim=64)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    own_models("my_vits")  # (removed afterwards)
    config = small_config(**{"model.name": "vit_tiny_d2", "model.module": "my_vits"})
    for _ in range(2):  # the second: my_vits imported, vit_tiny_d2 registered
        spec = specs.run_spec(TrackedConfig(config))
        assert (spec.model_name, spec.model_module) == ("vit_tiny_d2", "my_vits")
    assert type(create_model("vit_tiny_d2", num_classes=3)) is VisionTransformer
    with pytest.raises(ConfigError, match=r"model.module 'my_vits' registers a model of your ow"):
        specs.run_spec(TrackedConfig(small_config(**{"model.module": "my_vits"})))  # a library one


def test_the_readme_example_backbone_trains_with_bitfit(own_models):
    """tests/own_backbone.py, the README's example family, has no norms: its norm_modules must
    be "" (a regex such as "none" matches no parameter and bitfit refuses it)."""
    import importlib

    from vision_jax import optim

    own_models("own_backbone")  # (the test's import undone after)
    importlib.import_module("own_backbone")
    model = create_model("own_net_s", num_classes=3)
    mask = optim.trainable_mask(params_of(model), model, preset="bitfit")
    assert mask["stage0"]["Conv_0"]["bias"] and not mask["stage0"]["Conv_0"]["kernel"]


OWN_CELL = """
import flax.linen as nn
import jax.numpy as jnp
from vision_jax.models.registry import Family, FeatureTap, register_family, register_model


class CellNet(nn.Module):
    num_classes: int
    dtype: object = jnp.float32
    width: int = 4

    @nn.compact
    def __call__(self, images, *, train=False):
        x = nn.Conv(self.width, (3, 3), strides=2, name="stem")(images)
        return nn.Dense(self.num_classes, name="head")(x.mean((1, 2)))


register_family(Family(
    name="cell_net", module=CellNet, layer_groups=lambda m: ([(".*", 0)], 1), norm_modules="",
    feature_taps=lambda m: [FeatureTap("stem", 2, m.width)], converter="none",
))
register_model("cell_net_s", family="cell_net", module=CellNet, input_size=16, width=WIDTH)
"""


def run_cell(width: int = 4, source: str = OWN_CELL) -> dict[str, Any]:
    """Runs the notebook cell ``source`` (as Jupyter does, in __main__'s namespace)."""
    namespace: dict[str, Any] = {"__name__": "__main__", "WIDTH": width}
    exec(compile(source, "<cell>", "exec"), namespace)
    return namespace


def test_a_notebook_cell_registering_a_backbone_runs_again():
    """README "Adding a backbone" in a notebook: the cell run a second time (its class defined
    again) replaces the family and the model, whose class is the new one everywhere."""
    first = run_cell()
    early = run_cell(width=4)["CellNet"]  # a second run: no "already registered"
    second = run_cell(width=8)["CellNet"]  # edited and run again
    assert first["CellNet"] is not second and early is not second
    model = create_model("cell_net_s", num_classes=3)
    assert type(model) is second and model.width == 8
    assert family(model).name == "cell_net" and family(model).module is second
    assert params_of(model)["stem"]["kernel"].shape == (3, 3, 3, 8)
    # a model registered after the run resolves to the new class; one made before is named
    register_model("cell_net_m", family="cell_net", module=second, input_size=16, width=16)
    assert type(create_model("cell_net_m", num_classes=3)) is second
    with pytest.raises(ValueError, match=r"family 'cell_net' has its class defined again since"):
        family(first["CellNet"](num_classes=3))


SUBCLASS_CELL = """
from vision_jax.models.registry import register_model


class WideCellNet(CellNet):
    pass


register_model("wide_cell_net", family="cell_net", module=WideCellNet, input_size=16, width=8)
"""


def test_a_backbone_cell_run_again_refuses_models_of_a_subclass_until_theirs_runs_again():
    """A subclass of the family's class defined in another cell derives from the old class
    after the family's cell runs again: its model is refused when created, naming what to run
    again (not "not a registered model class" alone); run again, it builds on the new class."""
    first = run_cell()
    exec(compile(SUBCLASS_CELL, "<cell2>", "exec"), first)
    assert create_model("wide_cell_net", num_classes=3).width == 8
    second = run_cell(width=4)
    message = (
        r"Model 'wide_cell_net': WideCellNet is not a registered model class \(family 'cell_net' "
        r"has its class CellNet defined again since, and WideCellNet derives from the old one: "
        r"run the code defining WideCellNet"
    )
    with pytest.raises(ValueError, match=message):
        create_model("wide_cell_net", num_classes=3)
    exec(compile(SUBCLASS_CELL, "<cell2>", "exec"), second)
    model = create_model("wide_cell_net", num_classes=3)
    assert isinstance(model, second["CellNet"]) and family(model).name == "cell_net"


def test_a_backbone_cell_run_again_without_a_field_names_the_models_defaults():
    """The family's cell edited to drop a field its models were registered with: creating the
    model gives the field check's one-line error (not a TypeError from the class)."""
    run_cell()
    source = OWN_CELL.replace("    width: int = 4\n", "").replace("self.width", "4")
    source = source.replace("m.width", "4").replace(", width=WIDTH)", ")")
    source = source.replace('register_model("cell_net_s"', 'register_model("cell_net_t"')
    run_cell(source=source)  # registers another model; cell_net_s moved to the new class
    with pytest.raises(ValueError, match=r"CellNet has no field\(s\) \['width'\] \(model "
                                         r"'cell_net_s' was registered with them"):  # fmt: skip
        create_model("cell_net_s", num_classes=3)
    assert create_model("cell_net_t", num_classes=3) is not None


def test_a_model_or_family_registered_again_must_be_its_class_defined_again():
    run_cell()
    other = run_cell(source=OWN_CELL.replace("CellNet", "OtherNet").replace('"cell_net', '"o_net'))
    with pytest.raises(ValueError, match=r"Model 'cell_net_s' is already registered \(__main__"):
        register_model("cell_net_s", family="o_net", module=other["OtherNet"], input_size=16)
    with pytest.raises(ValueError, match=r"Family 'cell_net' is already registered"):
        toy_family("cell_net")
    # the library's names are never replaced, even by a class of the same name
    vit_again = type("VisionTransformer", (nn.Module,), {"__module__": "vision_jax.models.vit"})
    with pytest.raises(ValueError, match=r"Model 'vit_ti16' is built in \(the library's\)"):
        register_model("vit_ti16", family="vit", module=VisionTransformer, input_size=16)
    with pytest.raises(ValueError, match=r"Family 'vit' is built in"):
        register_family(dataclasses.replace(registry._FAMILIES["vit"], module=vit_again))
    assert registry._FAMILIES["vit"].module is VisionTransformer
    from vision_jax import tasks  # register_task has the same rule

    again = type("Classification", (tasks.Classification,), {"__module__": "__main__"})
    with pytest.raises(ValueError, match=r"Task 'classification' is built in"):
        tasks.register_task(again)
    assert tasks.TASKS["classification"] is tasks.Classification


def test_feature_taps_out_of_range_name_the_backbone_and_its_stages():
    """The old "feature_taps (3,) must be indices in [-3, 3)" named neither the backbone nor what it
    has: a family declaring fewer taps than its module has stages looked like a library bug."""
    with pytest.raises(ValueError) as error:
        ToyNet(num_classes=0, feature_taps=(2,)).init(jax.random.key(0), jnp.ones((1, 16, 16, 3)))
    assert str(error.value) == (
        "feature_taps (2,) of the backbone: it has 2 stages, so taps must be indices in [-2, 2) "
        "(0 is the first stage, -1 the last)."
    )
    # a family declaring one tap for the module's two stages: the family is named
    toy_family("toy_one_tap", feature_taps=lambda m: toy_taps(m)[:1])
    with pytest.raises(ValueError) as error:
        create_model("toy_one_tap", num_classes=0, feature_taps=(1,))
    assert str(error.value) == (
        "feature_taps (1,) of 'toy_one_tap' (toy_one_tap): its family 'toy_one_tap' declares 1 "
        "feature tap, so taps must be indices in [-1, 1) (0 is the first feature tap, -1 the "
        "last)."
    )
    with pytest.raises(ValueError, match=r"^feature_taps \(0, 12\) of VisionTransformer: it has "):
        stage_taps((0, 12), 12, 0, owner="VisionTransformer", unit="block")  # (as vit.py asks)
