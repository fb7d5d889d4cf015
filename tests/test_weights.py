"""The pretrained-weights loader: every format, surgery, input contracts, export, bad input."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import flax_fn, images, state_dict_np, torch_logits
from PIL import Image

from vision_jax.models.registry import create_model
from vision_jax.trees import flatten_dict
from vision_jax.weights import (
    InputContract,
    WeightFormatError,
    WeightMismatchError,
    apply_input_contract,
    class_names,
    detect_format,
    export_npz,
    export_safetensors,
    input_contract,
    load_pretrained,
    posemb_method,
)
from vision_jax.weights.surgery import resample_patch_embed, resample_posemb

torch = pytest.importorskip("torch")
TOL = 1e-4
VIT = dict(depth=2)  # a 2-block ViT-Ti/16: fast, and every name pattern occurs
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


# --------------------------------------------------------------------------------------------
# helpers


def init_vars(model, size: int) -> dict:
    """Model variables of the right structure, random (seeded) so that "kept at init" shows."""
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, size, size, 3)))
    rng = np.random.default_rng(123)
    return jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(s.dtype), shapes)


def perturb_(module, seed: int = 0) -> None:
    """Random values in every parameter and BatchNorm buffer of a torch module."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in module.state_dict().items():
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif t.is_floating_point():
                t.add_(0.1 * torch.randn(t.shape, generator=g))
    module.eval()


def timm_vit(timm, img_size: int = 32, num_classes: int = 10, **kwargs):
    from timm.models.vision_transformer import VisionTransformer

    ref = VisionTransformer(
        img_size=img_size, patch_size=16, embed_dim=192, depth=2, num_heads=3,
        num_classes=num_classes, **kwargs,
    )  # fmt: skip
    perturb_(ref)
    return ref


def vit(num_classes: int = 10, **kwargs):
    return create_model("vit_ti16", num_classes=num_classes, **VIT, **kwargs)


def apply(model, variables, x):
    with jax.default_matmul_precision("highest"):
        return np.asarray(jax.jit(functools.partial(model.apply, train=False))(variables, x))


def assert_close(got, want) -> None:
    """Equal up to float32 rounding, relative to the logits' scale."""
    want = np.asarray(want)
    np.testing.assert_allclose(got, want, rtol=0, atol=TOL * max(1.0, float(np.abs(want).max())))


def save_torch(obj, path, legacy: bool = False) -> None:
    torch.save(obj, path, _use_new_zipfile_serialization=not legacy)


def tensors(sd: dict) -> dict:
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()}


def hf_state_dict(sd: dict, *, classifier: bool, in_memory_5: bool = False) -> dict:
    """timm ViT names -> Hugging Face ViT names (the documented mapping, written independently);
    ``in_memory_5``: as transformers 5.25's ``ViTForImageClassification.state_dict()`` names
    them (its ``save_pretrained`` writes the older names)."""
    out = {}
    prefix = "vit." if classifier else ""
    for k, v in sd.items():
        if k.startswith("blocks."):
            _, i, rest = k.split(".", 2)
            layer = f"{prefix}{'layers' if in_memory_5 else 'encoder.layer'}.{i}."
            if rest.startswith("attn.qkv."):
                leaf = rest.rsplit(".", 1)[1]
                parts = ("q_proj", "k_proj", "v_proj") if in_memory_5 else ("query", "key", "value")
                for part, chunk in zip(parts, np.split(v, 3), strict=True):
                    where = "attention." if in_memory_5 else "attention.attention."
                    out[f"{layer}{where}{part}.{leaf}"] = chunk
                continue
            names = [("norm1.", "layernorm_before."), ("norm2.", "layernorm_after.")]
            if in_memory_5:
                names.append(("attn.proj.", "attention.o_proj."))
            else:
                names += [
                    ("attn.proj.", "attention.output.dense."),
                    ("mlp.fc1.", "intermediate.dense."),
                    ("mlp.fc2.", "output.dense."),
                ]
            for old, new in names:
                rest = rest.replace(old, new)
            out[layer + rest] = v
        elif k.startswith("head."):
            if classifier:
                out["classifier." + k.removeprefix("head.")] = v
        else:
            name = {
                "cls_token": "embeddings.cls_token",
                "pos_embed": "embeddings.position_embeddings",
                "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
                "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
                "norm.weight": "layernorm.weight",
                "norm.bias": "layernorm.bias",
            }[k]
            out[prefix + name] = v
    if not classifier:  # ViTModel's pooler
        out["pooler.dense.weight"] = np.eye(192, dtype=np.float32)
        out["pooler.dense.bias"] = np.zeros(192, np.float32)
    return out


HF_CONFIG = {
    "model_type": "vit", "hidden_size": 192, "num_hidden_layers": 2, "num_attention_heads": 3,
    "intermediate_size": 768, "hidden_act": "gelu", "layer_norm_eps": 1e-6, "image_size": 32,
    "patch_size": 16, "num_channels": 3, "qkv_bias": True,
}  # fmt: skip


# --------------------------------------------------------------------------------------------
# formats: random-weight round trips


@pytest.mark.parametrize(
    "fmt",
    [
        "safetensors",
        "safetensors-ddp",
        "compiled",
        "pth",
        "bin-wrapped",
        "th-legacy",
        "lightning",
        "timm-train",
        "ema-only",
        "model-settings",
    ],  # fmt: skip
)
def test_timm_vit_every_file_format(timm, tmp_path, fmt):
    ref = timm_vit(timm)
    sd = state_dict_np(ref)
    if fmt == "safetensors":
        from safetensors.numpy import save_file

        path = tmp_path / "vit.safetensors"
        save_file(sd, str(path))
    elif fmt == "pth":
        path = tmp_path / "vit.pth"
        save_torch(tensors(sd), path)
    elif fmt == "bin-wrapped":
        path = tmp_path / "vit.bin"
        wrapped = {f"module.{k}": v for k, v in tensors(sd).items()}
        save_torch({"model": wrapped, "epoch": 3}, path)
    elif fmt == "th-legacy":
        path = tmp_path / "vit.th"
        save_torch({"state_dict": tensors(sd), "best_prec1": 1.0}, path, legacy=True)
    elif fmt == "lightning":  # a LightningModule's self.model, trained with DDP
        path = tmp_path / "vit.ckpt"
        wrapped = {f"model.module.{k}": v for k, v in tensors(sd).items()}
        save_torch({"state_dict": wrapped, "epoch": 3, "global_step": 10}, path)
    elif fmt == "timm-train":  # timm's CheckpointSaver: its command line as a Namespace
        path = tmp_path / "model_best.pth.tar"
        args = argparse.Namespace(model="vit_tiny_patch16_224", lr=0.1, amp=False)
        save_torch({"epoch": 3, "arch": "vit", "state_dict": tensors(sd), "args": args,
                    "optimizer": {"state": {}}, "version": 2, "metric": 71.5}, path)  # fmt: skip
    elif fmt == "safetensors-ddp":
        from safetensors.numpy import save_file

        path = tmp_path / "vit_ddp.safetensors"
        save_file({f"module.{k}": v for k, v in sd.items()}, str(path))
    elif fmt == "compiled":  # torch.compile(model).state_dict(), of a DDP-wrapped model
        path = tmp_path / "vit_compiled.pth"
        save_torch({f"_orig_mod.module.{k}": v for k, v in tensors(sd).items()}, path)
    elif fmt == "model-settings":  # "model" holds the network's settings, not its tensors
        path = tmp_path / "vit_settings.pt"
        settings = {"arch": "vit_tiny", "num_classes": 10, "sizes": [1, 2]}
        save_torch({"model": settings, "model_state_dict": tensors(sd), "epoch": 3}, path)
    else:  # timm's train script, EMA weights kept alone
        path = tmp_path / "vit_ema.pth"
        save_torch({"model_ema": tensors(sd), "epoch": 3}, path)
    model = vit()
    variables = load_pretrained(path, model=model, variables=init_vars(model, 32))
    x = images(32, seed=1)
    assert_close(apply(model, variables, x), torch_logits(ref, x))


def test_frozen_bn_stats_train_as_torchvisions_frozen_batch_norm(timm, tmp_path):
    """``frozen_bn_stats=True``: in train mode a ResNet-18 gives the logits of torchvision's
    ResNet-18 built with FrozenBatchNorm2d (in train mode too) and its running statistics stay
    as they were; without it, train mode normalises by the batch and moves them."""
    import torchvision
    from torchvision.ops import FrozenBatchNorm2d

    ref = torchvision.models.resnet18(num_classes=10)
    perturb_(ref)
    frozen = torchvision.models.resnet18(num_classes=10, norm_layer=FrozenBatchNorm2d)
    state = {k: v for k, v in ref.state_dict().items() if "num_batches_tracked" not in k}
    frozen.load_state_dict(state)
    frozen.train()
    path = tmp_path / "model.pth"
    save_torch(ref.state_dict(), path)
    x = images(32, batch=4, seed=2)
    for flag in (True, False):
        model = create_model("resnet18", num_classes=10, frozen_bn_stats=flag)
        variables = load_pretrained(path, model=model, variables=init_vars(model, 32))
        with jax.default_matmul_precision("highest"):
            logits, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
        moved = [not np.array_equal(a, b) for a, b in zip(
            jax.tree.leaves(updates["batch_stats"]), jax.tree.leaves(variables["batch_stats"]),
            strict=True)]  # fmt: skip
        if flag:
            assert_close(np.asarray(logits), torch_logits(frozen, x))
            assert not any(moved)
        else:
            assert all(moved)
            assert np.abs(np.asarray(logits) - torch_logits(frozen, x)).max() > 1e-2


@pytest.mark.parametrize("name", ["resnet18", "cifar_resnet20"])
def test_resnet_state_dicts(timm, tmp_path, name):
    if name == "resnet18":
        import torchvision

        ref = torchvision.models.resnet18(num_classes=10)  # the same names as timm's resnet18
    else:
        from test_resnet import RefCifarResNet

        ref = RefCifarResNet(20)
    perturb_(ref)
    path = tmp_path / "model.pth"
    save_torch({"state_dict": ref.state_dict()}, path)
    model = create_model(name, num_classes=10)
    variables = load_pretrained(path, model=model, variables=init_vars(model, 32))
    x = images(32, seed=2)
    assert_close(apply(model, variables, x), torch_logits(ref, x))


def test_resnet_variants_and_half_prefixed_keys_are_named(timm, tmp_path):
    """A deep-stem variant (timm's resnet18d) and a state dict with 'module.' on some keys only:
    the error lists what is missing and what is left over, and says what that looks like."""
    model = create_model("resnet18", num_classes=10)
    save_torch(timm.create_model("resnet18d", num_classes=10).state_dict(), tmp_path / "d.pth")
    deep = r"lacks \d+ key\(s\): conv1.weight, .*; has \d+ key.*conv1.0.weight.*three convolutions"
    with pytest.raises(WeightMismatchError, match=deep):
        load_pretrained(tmp_path / "d.pth", model=model, variables=init_vars(model, 32))
    plain = timm.create_model("resnet18", num_classes=10).state_dict()
    half = {("module." + k if k.startswith("layer4") else k): v for k, v in plain.items()}
    save_torch(half, tmp_path / "half.pth")
    with pytest.raises(WeightMismatchError, match="Some keys start with 'module.'"):
        load_pretrained(tmp_path / "half.pth", model=model, variables=init_vars(model, 32))
    with pytest.raises(ValueError, match=r"as model.init returns them \(\{'params': \.\.\.\}\)"):
        load_pretrained(tmp_path / "half.pth", model=model,
                        variables=init_vars(model, 32)["params"])  # fmt: skip


@pytest.mark.parametrize("classifier, in_memory_5", [(True, False), (False, False), (True, True)])
def test_hugging_face_vit_folder(timm, tmp_path, classifier, in_memory_5):
    ref = timm_vit(timm)
    sd = hf_state_dict(state_dict_np(ref), classifier=classifier, in_memory_5=in_memory_5)
    if classifier:
        from safetensors.numpy import save_file

        save_file(sd, str(tmp_path / "model.safetensors"))
    else:
        save_torch(tensors(sd), tmp_path / "pytorch_model.bin")
        ref.reset_classifier(0)
    (tmp_path / "config.json").write_text(json.dumps(HF_CONFIG))
    assert detect_format(tmp_path) == "hf"
    model = vit(10 if classifier else 0)
    variables = load_pretrained(tmp_path, model=model, variables=init_vars(model, 32))
    x = images(32, seed=3)
    assert_close(apply(model, variables, x), torch_logits(ref, x))
    assert input_contract(tmp_path) == InputContract(32, crop_mode="squash")

    (tmp_path / "config.json").write_text(json.dumps({**HF_CONFIG, "num_hidden_layers": 3}))
    with pytest.raises(
        WeightMismatchError, match=r"(?s)config\.json.*num_hidden_layers: checkpoint 3"
    ):
        load_pretrained(tmp_path, model=model, variables=init_vars(model, 32))


@pytest.mark.parametrize("name", ["vit_ti16", "resnet18"])
def test_timm_hub_folder(timm, tmp_path, name):
    """A folder as timm's own ``save_for_hf`` writes it (what ``snapshot_download`` of a
    ``timm/...`` repository gives) loads as its state dict, to timm's logits; its input contract
    is the data config timm resolves for the folder and its class names are ``label_names``."""
    from timm.models import save_for_hf

    if name == "vit_ti16":
        ref = timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=3, depth=2)
        model, size = vit(3), 32
    else:
        ref, model, size = (
            timm.create_model(name, num_classes=3),
            create_model(name, num_classes=3),
            64,
        )
    perturb_(ref)
    labels = ["cat", "dog", "eel"]
    save_for_hf(ref, tmp_path, model_config={"label_names": labels}, safe_serialization=True)
    assert detect_format(tmp_path) == "timm_hub"
    variables = load_pretrained(tmp_path, model=model, variables=init_vars(model, size))
    loaded = timm.create_model(f"local-dir:{tmp_path}", pretrained=True).eval()  # timm reads it
    x = images(size, seed=5)
    assert_close(apply(model, variables, x), torch_logits(loaded, x))
    assert_close(torch_logits(loaded, x), torch_logits(ref, x))
    data = timm.data.resolve_data_config({}, model=loaded)
    contract = input_contract(tmp_path)
    assert contract.image_size == data["input_size"][-1]
    assert contract.mean == pytest.approx(data["mean"]) and contract.std == pytest.approx(
        data["std"]
    )
    assert (contract.interpolation, contract.crop_mode) == (
        data["interpolation"],
        data["crop_mode"],
    )
    assert contract.crop_fraction == pytest.approx(data["crop_pct"])
    assert class_names(tmp_path) == labels
    config = json.loads((tmp_path / "config.json").read_text())
    config["pretrained_cfg"]["crop_mode"] = "border"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(WeightFormatError, match="crop_mode 'border'; vision_jax resizes"):
        input_contract(tmp_path)


def test_timm_hub_crop_pct_outside_0_1_is_named_with_its_file_and_key(tmp_path):
    """timm's crop_pct 1.2 (a crop larger than the resized image, padded) gave the generic
    "input.crop_fraction must lie in (0, 1]": the folder's config.json, the key and value."""
    from vision_jax.weights.timm_hub import input_contract as timm_contract

    cfg = {"input_size": [3, 224, 224], "mean": [0.5] * 3, "std": [0.5] * 3, "crop_pct": 1.2}
    (tmp_path / "config.json").write_text(json.dumps({"pretrained_cfg": cfg}))
    with pytest.raises(WeightFormatError) as error:
        timm_contract(tmp_path)
    assert str(error.value) == (
        f"{tmp_path / 'config.json'}: pretrained_cfg.crop_pct is 1.2, outside (0, 1]: vision_jax "
        "crops within the resized image (set init.use_input_contract=False and input.* instead)."
    )
    cfg["crop_pct"] = 1.0
    (tmp_path / "config.json").write_text(json.dumps({"pretrained_cfg": cfg}))
    assert timm_contract(tmp_path).crop_fraction == 1.0


def test_timm_hub_vit_averaging_with_a_class_token_is_refused(timm, tmp_path):
    """timm's ``global_pool="avg"`` ViT that keeps its class token (``fc_norm=False``): its state
    dict looks token-pooled, its folder's config.json says otherwise: refused, not misread."""
    from timm.models import save_for_hf

    ref = timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=3, depth=2,
                            global_pool="avg", fc_norm=False)  # fmt: skip
    save_for_hf(ref, tmp_path, safe_serialization=True)
    model = vit(3)
    with pytest.raises(WeightMismatchError, match="global_pool='avg' with a class token kept"):
        load_pretrained(tmp_path, model=model, variables=init_vars(model, 32))


def test_timm_hub_architectures_the_model_does_not_compute_are_refused(timm, tmp_path):
    """resnetaa50's state dict has resnet50's names and shapes (its strides blur first): its
    folder's ``architecture`` says so and is refused, as ``model_args`` with another head count;
    the weights file alone still loads (the escape the message names)."""
    from timm.models import save_for_hf

    save_for_hf(timm.create_model("resnetaa50", num_classes=3), tmp_path / "aa",
                safe_serialization=True)  # fmt: skip
    model = create_model("resnet50", num_classes=3)
    with pytest.raises(WeightMismatchError, match="architecture 'resnetaa50' is not a network"):
        load_pretrained(tmp_path / "aa", model=model, variables=init_vars(model, 64))
    load_pretrained(tmp_path / "aa" / "model.safetensors", model=model,
                    variables=init_vars(model, 64))  # fmt: skip
    ref = timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=3, depth=2)
    save_for_hf(ref, tmp_path / "vit", model_args={"num_heads": 6}, safe_serialization=True)
    model = vit(3)
    with pytest.raises(WeightMismatchError, match="num_heads=6; the model has 3 heads"):
        load_pretrained(tmp_path / "vit", model=model, variables=init_vars(model, 32))


@pytest.mark.parametrize(
    "name, args, match",
    [
        (
            "resnet18",
            {"global_pool": "max"},
            r"model_args global_pool='max'; vision_jax's resnet "
            r"model computes global_pool in \('avg', ''\)",
        ),  # fmt: skip
        ("resnet18", {"output_stride": 16}, r"output_stride=16; .* computes output_stride in"),
        ("resnet18", {"act_layer": "silu"}, r"act_layer='silu'"),
        ("resnetv2_50x1_bit", {"output_stride": 16}, r"output_stride=16"),
        (
            "vit_tiny_patch16_224",
            {"class_token": False, "global_pool": "max", "fc_norm": False},
            r"global_pool='max'; vision_jax's vit model computes global_pool in",
        ),  # fmt: skip
        (
            "vit_tiny_patch16_224",
            {"some_new_arg": 1},
            r"some_new_arg=1; an argument vision_jax "
            "does not know for its vit models",
        ),  # fmt: skip
        ("vit_tiny_patch16_224", {"scale_attn_norm": False, "norm_layer": None}, None),
        ("resnet18", {"global_pool": "", "block_args": None}, None),  # timm's defaults, or a
        # backbone export (vision_jax's head pools)
    ],
)
def test_timm_hub_model_args_the_model_does_not_compute_are_refused(
    timm, tmp_path, name, args, match
):
    """Each of these timm networks has the state dict of one the model computes (they loaded,
    and their logits differed from timm's by 1-5): the folder's model_args say so."""
    from timm.models import save_for_hf

    vit_args = {"img_size": 32, "depth": 2} if name.startswith("vit") else {}
    try:
        ref = timm.create_model(name, num_classes=3, **vit_args, **args)
    except TypeError:  # an argument timm's constructor lacks: written into the folder by hand
        ref = timm.create_model(name, num_classes=3, **vit_args)
    save_for_hf(ref, tmp_path, model_args={**vit_args, **args}, safe_serialization=True)
    if name.startswith("vit"):
        model = vit(3, **({"pool_type": "gap"} if args.get("class_token") is False else {}))
    else:
        model = create_model(name.replace("resnetv2_50x1_bit", "bit_r50x1"), num_classes=3)
    size = 32 if name.startswith("vit") else 64
    if match is None:
        load_pretrained(tmp_path, model=model, variables=init_vars(model, size))
        return
    with pytest.raises(WeightMismatchError, match=match):
        load_pretrained(tmp_path, model=model, variables=init_vars(model, size))


def _hf_vit_folder(timm, folder: pathlib.Path, processor: dict | None) -> torch.nn.Module:
    """A ViTForImageClassification folder of a random 12-block timm ViT-Ti at 32 px, with 10
    named classes (``id2label``) and ``processor`` as its preprocessor_config.json."""
    from safetensors.numpy import save_file

    ref = timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=10)
    perturb_(ref)
    folder.mkdir(exist_ok=True)
    save_file(hf_state_dict(state_dict_np(ref), classifier=True), str(folder / "model.safetensors"))
    labels = {str(i): f"thing{i}" for i in range(10)}
    config = {**HF_CONFIG, "num_hidden_layers": 12, "id2label": labels}
    (folder / "config.json").write_text(json.dumps(config))
    if processor is not None:
        (folder / "preprocessor_config.json").write_text(json.dumps(processor))
    return ref.eval()


@pytest.mark.slow
def test_a_run_from_a_hugging_face_folder_records_its_squash(timm, tmp_path):
    """The crop mode a run's input contract gave it (not the config's default) is recorded,
    so predicting from the run, and a run started from it, resize as it was evaluated."""
    from test_train import small_config

    from vision_jax.train import train_and_evaluate
    from vision_jax.trained import load_trained

    _hf_vit_folder(timm, tmp_path / "hf", None)
    cfg = small_config(total_steps=1, **{"model.name": "vit_ti16", "input.image_size": 32})
    cfg.init.path, cfg.init.use_input_contract = str(tmp_path / "hf"), True
    train_and_evaluate(cfg, str(tmp_path / "run"))
    assert input_contract(tmp_path / "run") == InputContract(32, crop_mode="squash")
    assert load_trained(tmp_path / "run").input.crop_mode == "squash"
    # Segmentation resizes the whole image: the contract's mean and std, not its crop mode
    # (which the check of label-map settings refused as if the config had set it).
    rng = np.random.default_rng(0)
    maps = rng.integers(0, 3, (64, 32, 32), dtype=np.uint8)
    arrays = {"train": (rng.integers(0, 255, (64, 32, 32, 3), np.uint8), maps)}
    arrays["test"] = (arrays["train"][0][:32], maps[:32])
    seg = small_config(total_steps=1, **{"model.name": "vit_ti16", "input.image_size": 32})
    seg.task.name, seg.task.head, seg.data.source = "segmentation", "linear", "arrays"
    seg.data.class_names = ("a", "b", "c")
    seg.init.path, seg.init.use_input_contract = str(tmp_path / "hf"), True
    train_and_evaluate(seg, str(tmp_path / "seg"), arrays=arrays)
    trained = load_trained(tmp_path / "seg")
    assert trained.input.crop_mode == "center" and trained.input.mean == (0.5, 0.5, 0.5)


def _predicted_wide_picture(tmp_path: pathlib.Path, seed: int) -> tuple[Image.Image, dict]:
    """A smooth 80 x 48 picture, and the probabilities (by class name) that
    ``Predictor.from_weights`` of the Hugging Face folder ``tmp_path / "hf"`` gives it."""
    from vision_jax.predict import Predictor

    smooth = Image.fromarray(np.random.default_rng(seed).integers(0, 256, (6, 10, 3), np.uint8))
    picture = smooth.resize((80, 48), Image.Resampling.BICUBIC)
    picture.save(tmp_path / "wide.png")
    records, _ = Predictor.from_weights(tmp_path / "hf", model="vit_ti16").predict(
        [str(tmp_path / "wide.png")], top_k=10
    )
    return picture, {t["class_name"]: t["probability"] for t in records[0]["top_k"]}


def _timm_probabilities(ref: torch.nn.Module, image: Image.Image) -> dict[str, float]:
    """timm's probabilities of ``image`` (already at the model's size; mean and std 0.5)."""
    x = torch.from_numpy(np.asarray(image, np.float32) / 127.5 - 1).permute(2, 0, 1)
    with torch.no_grad():
        p = torch.softmax(ref(x[None]), -1)[0].numpy()
    return {f"thing{i}": float(v) for i, v in enumerate(p)}


@pytest.mark.parametrize("rescale, mean_std", [(1 / 255, 0.5), (2 / 255, 1.0)])
def test_hugging_face_folder_predicts_as_its_processor(timm, tmp_path, rescale, mean_std):
    """ViTImageProcessor resizes the whole image to its square size (PIL, aspect ratio not
    kept): ``Predictor.from_weights`` on a Hugging Face folder does so too, on a 48 x 80
    image, and names the classes of ``id2label``. Rescaled to [0, 2] (rescale_factor 2/255)
    and normalised with mean 1, std 1, pixels are what mean 0.5, std 0.5 on [0, 1] give (the
    factor was recorded and never applied); without do_normalize, the rescaled pixels."""

    processor = {"do_resize": True, "size": {"height": 32, "width": 32}, "resample": 2,
                 "do_rescale": True, "rescale_factor": rescale, "do_normalize": True,
                 "image_mean": [mean_std] * 3, "image_std": [mean_std] * 3}  # fmt: skip
    ref = _hf_vit_folder(timm, tmp_path / "hf", processor)
    assert input_contract(tmp_path / "hf") == InputContract(32, crop_mode="squash")
    picture, got = _predicted_wide_picture(tmp_path, seed=0)
    squashed = _timm_probabilities(ref, picture.resize((32, 32), Image.Resampling.BILINEAR))
    cropped = picture.resize((53, 32), Image.Resampling.BILINEAR).crop((10, 0, 42, 32))
    gap = max(abs(squashed[k] - v) for k, v in _timm_probabilities(ref, cropped).items())
    assert gap > 0.05  # the test tells a shorter-side resize and centre crop apart
    for name, want in squashed.items():
        assert got[name] == pytest.approx(want, abs=5e-3), name
    plain = {**processor, "do_normalize": False}
    (tmp_path / "hf" / "preprocessor_config.json").write_text(json.dumps(plain))
    contract = input_contract(tmp_path / "hf")
    assert contract.mean == (0.0,) * 3
    assert contract.std == pytest.approx((1 / (255 * rescale),) * 3)


def test_hugging_face_processor_means_as_transformers_reads_them(tmp_path):
    """A number for every channel, null for the default (0.5), as transformers reads
    image_mean and image_std (a number was a TypeError: "has no len()")."""
    (tmp_path / "config.json").write_text(json.dumps({**HF_CONFIG, "image_size": 32}))
    (tmp_path / "model.safetensors").write_bytes(b"")  # a folder of weights: never read here
    processor = {"size": {"height": 32, "width": 32}, "image_mean": 0.25, "image_std": None}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(processor))
    contract = input_contract(tmp_path)
    assert contract.mean == (0.25,) * 3 and contract.std == (0.5,) * 3


def test_a_hugging_face_crop_larger_than_its_resize_names_both_keys(tmp_path):
    """A processor whose crop_size exceeds the image it crops from (size, or its shortest_edge)
    gave crop_fraction > 1, refused by the input check as "input.crop_fraction must lie in
    (0, 1]", a key no config had set: the error names the file's keys and values."""
    from vision_jax.predict import Predictor

    (tmp_path / "config.json").write_text(json.dumps({**HF_CONFIG, "image_size": 32}))
    (tmp_path / "model.safetensors").write_bytes(b"")  # a folder of weights: never read here
    pre = tmp_path / "preprocessor_config.json"
    for size, key in (({"height": 32, "width": 32}, "size"),
                      ({"shortest_edge": 32}, "size.shortest_edge")):  # fmt: skip
        processor = {"size": size, "do_center_crop": True, "crop_size": {"height": 40, "width": 40}}
        pre.write_text(json.dumps(processor))
        message = rf"^{re.escape(str(pre))}: crop_size 40 is larger than {re.escape(key)} 32, "
        with pytest.raises(WeightFormatError, match=message):
            input_contract(tmp_path)
        with pytest.raises(WeightFormatError, match=message):  # before any weight is read
            Predictor.from_weights(tmp_path, model="vit_ti16")
    processor["crop_size"] = 32  # as large as the image: the whole of it
    pre.write_text(json.dumps(processor))
    assert input_contract(tmp_path).crop_fraction == 1.0


def test_hugging_face_deit_processor_squashes_then_crops(timm, tmp_path):
    """DeiTImageProcessor (facebook/deit-*-patch16-224: 256 x 256, then the centre 224) at 40
    and 32 px: the whole image squashed to 40 x 40 (PIL bicubic), the centre 32 cropped. It was
    read as a 40 px squash with no crop (the position embeddings resampled to 40 px)."""

    processor = {"do_resize": True, "size": {"height": 40, "width": 40}, "resample": 3,
                 "do_center_crop": True, "crop_size": {"height": 32, "width": 32},
                 "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
                 "image_mean": [0.5] * 3, "image_std": [0.5] * 3}  # fmt: skip
    ref = _hf_vit_folder(timm, tmp_path / "hf", processor)
    assert input_contract(tmp_path / "hf") == InputContract(
        32, interpolation="bicubic", crop_fraction=0.8, crop_mode="squash"
    )
    picture, got = _predicted_wide_picture(tmp_path, seed=1)
    crop = picture.resize((40, 40), Image.Resampling.BICUBIC).crop((4, 4, 36, 36))
    for name, want in _timm_probabilities(ref, crop).items():
        assert got[name] == pytest.approx(want, abs=5e-3), name


def test_hugging_face_config_values_the_model_does_not_compute(timm, tmp_path):
    """A LayerNorm epsilon far from the model's 1e-6 is refused (1e-2 moved logits by 0.5);
    Hugging Face's 1e-12 and its exact "gelu_python" load; a non-square image_size is named."""
    ref = timm_vit(timm)
    save_torch(tensors(hf_state_dict(state_dict_np(ref), classifier=True)),
               tmp_path / "pytorch_model.bin")  # fmt: skip
    model = vit(10)
    for config, error in [
        ({"layer_norm_eps": 1e-2}, r"layer_norm_eps: checkpoint 0.01 vs model 1e-6"),
        ({"layer_norm_eps": 1e-12, "hidden_act": "gelu_python"}, None),
    ]:
        (tmp_path / "config.json").write_text(json.dumps({**HF_CONFIG, **config}))
        if error is None:
            variables = load_pretrained(tmp_path, model=model, variables=init_vars(model, 32))
            x = images(32, seed=4)
            assert_close(apply(model, variables, x), torch_logits(ref, x))
            continue
        with pytest.raises(WeightMismatchError, match=error):
            load_pretrained(tmp_path, model=model, variables=init_vars(model, 32))
    (tmp_path / "config.json").write_text(json.dumps({**HF_CONFIG, "image_size": [32, 48]}))
    with pytest.raises(WeightFormatError, match=r"config.json: image_size \[32, 48\] is not a "):
        input_contract(tmp_path)


def test_hugging_face_folders_refused_by_name(timm, tmp_path):
    """Folders vision_jax cannot read say why: another model type, sharded weights."""
    model = vit(10)
    resnet = tmp_path / "resnet"
    resnet.mkdir()
    (resnet / "config.json").write_text(json.dumps({"model_type": "resnet"}))
    torch.save({}, resnet / "pytorch_model.bin")
    with pytest.raises(WeightFormatError, match=r"model_type 'resnet'.*ViTs only"):
        load_pretrained(resnet, model=model, variables=init_vars(model, 32))
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    (sharded / "config.json").write_text(json.dumps(HF_CONFIG))
    (sharded / "model.safetensors.index.json").write_text("{}")
    with pytest.raises(WeightFormatError, match=r"sharded weights \(model\.safetensors\.index"):
        load_pretrained(sharded, model=model, variables=init_vars(model, 32))
    (sharded / "model.safetensors.index.json").unlink()  # config.json alone
    with pytest.raises(WeightFormatError, match=r"holds config.json but none of model.safetens"):
        load_pretrained(sharded, model=model, variables=init_vars(model, 32))
    alone = tmp_path / "alone"  # a weights file without its config.json
    alone.mkdir()
    save_torch(tensors(hf_state_dict(state_dict_np(timm_vit(timm)), classifier=True)),
               alone / "pytorch_model.bin")  # fmt: skip
    with pytest.raises(WeightFormatError, match=r"alone is no vision_jax run, and has no config"
                       r".*pass it: .*alone/pytorch_model.bin\.$"):  # fmt: skip
        load_pretrained(alone, model=model, variables=init_vars(model, 32))
    load_pretrained(alone / "pytorch_model.bin", model=model, variables=init_vars(model, 32))


def test_vision_jax_checkpoint_folder(tmp_path):
    from vision_jax.checkpoint import Checkpointer

    model = vit()
    variables = init_vars(model, 32)
    state = {"step": np.int32(5), "params": variables["params"], "model_state": {}}
    checkpointer = Checkpointer(str(tmp_path), every_steps=1, keep=1, async_save=False)
    meta = {"config": {"input": {"image_size": 48, "mean": [0.1] * 3, "std": [0.2] * 3}}}
    checkpointer.save(5, state, meta, force=True)
    checkpointer.close()
    assert input_contract(tmp_path) == InputContract(48, (0.1,) * 3, (0.2,) * 3)
    fresh = init_vars(model, 32) | {"params": jax.tree.map(np.zeros_like, variables["params"])}
    loaded = load_pretrained(tmp_path, model=model, variables=fresh)
    for k, v in flatten_dict(variables).items():
        np.testing.assert_array_equal(flatten_dict(loaded)[k], v, err_msg=k)


# --------------------------------------------------------------------------------------------
# .npz layouts


def _big_vision(flat: dict, scanned: bool) -> dict:
    renames = {
        "MultiHeadDotProductAttention_1": "MultiHeadDotProductAttention_0",
        "LayerNorm_2": "LayerNorm_1",
        "MlpBlock_3": "MlpBlock_0",
    }
    out, blocks = {}, {}
    for k, v in flat.items():
        if k == "Transformer/posembed_input/pos_embedding":
            out["pos_embedding"] = v
        elif k.startswith("Transformer/encoderblock_"):
            _, block, layer, rest = k.split("/", 3)
            name = f"{renames.get(layer, layer)}/{rest}"
            if scanned:
                blocks.setdefault(name, []).append(v)
            else:
                out[f"Transformer/{block}/{name}"] = v
        else:
            out[k] = v
    out.update({f"Transformer/encoderblock/{k}": np.stack(v) for k, v in blocks.items()})
    return {f"params/{k}": v for k, v in out.items()}


@pytest.mark.parametrize("layout", ["plain", "params", "opt_target", "big_vision", "scanned"])
def test_npz_layouts_match_timms_npz_loader(timm, tmp_path, layout):
    """Every layout loads into the same params, and timm's own npz reader agrees on the logits."""
    from timm.models.vision_transformer import _load_weights

    model = vit()
    variables = {"params": init_vars(model, 32)["params"]}
    flat = {k: np.asarray(v) for k, v in flatten_dict(variables["params"]).items()}
    path = tmp_path / "vit.npz"
    if layout == "plain":
        export_npz(variables, path)
    else:
        arrays = {
            "params": {f"params/{k}": v for k, v in flat.items()},
            "opt_target": {f"opt/target/{k}": v for k, v in flat.items()},
            "big_vision": _big_vision(flat, scanned=False),
            "scanned": _big_vision(flat, scanned=True),
        }[layout]
        np.savez(path, **arrays, **{"opt/state/step": np.int64(7)})
    assert detect_format(path) == "npz"
    loaded = load_pretrained(path, model=model, variables=init_vars(model, 32))
    for k, v in flatten_dict(variables).items():
        np.testing.assert_array_equal(flatten_dict(loaded)[k], v, err_msg=k)
    if layout != "params":  # timm reads params/ files as big_vision's layout only
        ref = timm_vit(timm)
        _load_weights(ref, str(path))
        x = images(32, seed=4)
        assert_close(apply(model, loaded, x), torch_logits(ref, x))


def test_npz_class_token_in_posemb_of_gap_model(tmp_path):
    model = vit(pool_type="gap")
    variables = init_vars(model, 32)
    flat = {k: np.asarray(v) for k, v in flatten_dict(variables["params"]).items()}
    posemb = "Transformer/posembed_input/pos_embedding"
    old = np.concatenate([np.full((1, 1, 192), 7.0, np.float32), flat[posemb]], axis=1)
    np.savez(tmp_path / "old.npz", **{**flat, posemb: old})  # old layout: 1 + 2*2 rows, no cls
    loaded = load_pretrained(tmp_path / "old.npz", model=model, variables=init_vars(model, 32))
    got = flatten_dict(loaded["params"])[posemb]
    np.testing.assert_array_equal(got, flat[posemb])
    # A token-pooling checkpoint (cls plus its posemb row) loads into the gap model too.
    np.savez(tmp_path / "tok.npz", **{**flat, posemb: old, "cls": np.ones((1, 1, 192))})
    loaded = load_pretrained(tmp_path / "tok.npz", model=model, variables=init_vars(model, 32))
    assert "cls" not in loaded["params"]


def test_torchvision_vit_state_dict(timm, tmp_path):
    """torchvision's VisionTransformer (vit_b_16's names, 2 blocks at width 192): its logits,
    and torchvision's evaluation as the input contract."""
    import torchvision

    ref = torchvision.models.VisionTransformer(
        image_size=32, patch_size=16, num_layers=2, num_heads=3, hidden_dim=192, mlp_dim=768,
        num_classes=10,
    )  # fmt: skip
    perturb_(ref)
    save_torch(ref.state_dict(), tmp_path / "vit_b_16-c867db91.pth")
    model = vit()
    loaded = load_pretrained(
        tmp_path / "vit_b_16-c867db91.pth", model=model, variables=init_vars(model, 32)
    )
    x = images(32, seed=7)
    assert_close(apply(model, loaded, x), torch_logits(ref, x))
    contract = input_contract(tmp_path / "vit_b_16-c867db91.pth")
    assert contract == InputContract(32, *IMAGENET, crop_fraction=0.875)


def test_class_token_without_position_embedding(timm, tmp_path):
    """timm's no_embed_class ViTs and big_vision's tok ViTs add the position embedding to the
    grid before the class token joins: both load (a zero row for the class token), with timm's
    logits; the input contract reads the grid (32 px)."""
    from safetensors.numpy import save_file
    from timm.models.vision_transformer import _load_weights

    ref = timm_vit(timm, no_embed_class=True)
    assert ref.pos_embed.shape[1] == 4  # the 2 x 2 grid only
    save_file(state_dict_np(ref), str(tmp_path / "no_embed_class.safetensors"))
    model = vit()
    loaded = load_pretrained(
        tmp_path / "no_embed_class.safetensors", model=model, variables=init_vars(model, 32)
    )
    x = images(32, seed=6)
    assert_close(apply(model, loaded, x), torch_logits(ref, x))
    assert input_contract(tmp_path / "no_embed_class.safetensors").image_size == 32

    flat = {k: np.asarray(v) for k, v in flatten_dict(loaded["params"]).items()}
    posemb = "Transformer/posembed_input/pos_embedding"
    big_vision = _big_vision({**flat, posemb: flat[posemb][:, 1:]}, scanned=True)
    np.savez(tmp_path / "tok.npz", **big_vision)
    from_npz = load_pretrained(tmp_path / "tok.npz", model=model, variables=init_vars(model, 32))
    assert input_contract(tmp_path / "tok.npz").image_size == 32
    again = timm_vit(timm, no_embed_class=True)
    _load_weights(again, str(tmp_path / "tok.npz"))
    assert_close(apply(model, from_npz, x), torch_logits(again, x))


def test_bit_npz_big_transfer_names_match_timm(timm, tmp_path):
    """big_transfer names, written from Flax variables here; timm's BiT npz reader is the judge."""
    from timm.layers import StdConv2d
    from timm.models.resnetv2 import ResNetV2, _load_weights

    model = create_model("bit_r50x1", num_classes=10, stage_sizes=(1, 1, 1, 1))
    params = flatten_dict(init_vars(model, 32)["params"])
    params = {k: np.asarray(v) * (0.1 if k.endswith("bias") else 1.0) for k, v in params.items()}
    arrays = {}
    for k, v in params.items():
        parts = k.split("/")
        if parts[0] == "root_block":
            arrays["resnet/root_block/standardized_conv2d/kernel"] = v
        elif parts[0] == "norm-pre-head":
            arrays[f"resnet/group_norm/{'gamma' if parts[1] == 'scale' else 'beta'}"] = v
        elif parts[0] == "head":
            arrays[f"resnet/head/conv2d/{parts[1]}"] = v[None, None] if v.ndim == 2 else v
        else:
            block, unit, layer, leaf = parts
            pre = f"resnet/{block}/{unit}"
            if layer == "conv_proj":
                arrays[f"{pre}/a/proj/standardized_conv2d/kernel"] = v
            elif layer.startswith("conv"):
                arrays[f"{pre}/{'abc'[int(layer[-1]) - 1]}/standardized_conv2d/kernel"] = v
            else:
                gn = "gamma" if leaf == "scale" else "beta"
                arrays[f"{pre}/{'abc'[int(layer[-1]) - 1]}/group_norm/{gn}"] = v
    np.savez(tmp_path / "BiT-M-R50x1.npz", **arrays)
    loaded = load_pretrained(
        tmp_path / "BiT-M-R50x1.npz", model=model, variables=init_vars(model, 32)
    )
    for k, v in params.items():
        np.testing.assert_array_equal(flatten_dict(loaded["params"])[k], v, err_msg=k)
    ref = ResNetV2(
        layers=(1, 1, 1, 1),
        num_classes=10,
        stem_type="fixed",
        conv_layer=functools.partial(StdConv2d, eps=1e-8),
    )  # fmt: skip, timm's resnetv2_50x1_bit with one block per stage
    _load_weights(ref, str(tmp_path / "BiT-M-R50x1.npz"))
    ref.eval()
    x = images(32, seed=5)
    assert_close(apply(model, loaded, x), torch_logits(ref, x))
    assert input_contract(tmp_path / "BiT-M-R50x1.npz") == InputContract(224)


# --------------------------------------------------------------------------------------------
# surgery


def test_posemb_resampling_matches_scipy_zoom():
    from scipy import ndimage

    rng = np.random.default_rng(0)
    posemb = rng.standard_normal((1, 1 + 7 * 7, 8)).astype(np.float32)
    for side in (4, 7, 12):
        got = resample_posemb(posemb, num_prefix=1, new_grid=(side, side))
        grid = posemb[0, 1:].reshape(7, 7, 8).astype(np.float64)
        want = ndimage.zoom(grid, (side / 7, side / 7, 1), order=1)
        np.testing.assert_array_equal(got[:, :1], posemb[:, :1])  # class token kept apart
        np.testing.assert_allclose(got[0, 1:].reshape(side, side, 8), want, atol=1e-5)
    bicubic = resample_posemb(posemb, num_prefix=1, new_grid=(12, 12), method="bicubic")
    assert bicubic.shape == (1, 145, 8)
    np.testing.assert_array_equal(bicubic[:, :1], posemb[:, :1])


def test_patch_embed_pseudo_inverse_resize_keeps_tokens():
    """FlexiViT: <x, w> == <resize(x), resize_pi(w)> for any patch x when the patch grows."""
    rng = np.random.default_rng(1)
    kernel = rng.standard_normal((8, 8, 3, 5)).astype(np.float32)
    new = resample_patch_embed(kernel, (16, 16))
    x = rng.standard_normal((8, 8, 3)).astype(np.float32)
    x_big = np.asarray(jax.image.resize(x, (16, 16, 3), "bilinear"))
    np.testing.assert_allclose(
        np.einsum("hwc,hwcd->d", x_big, new), np.einsum("hwc,hwcd->d", x, kernel), atol=1e-3
    )


def test_new_image_and_patch_size_head_and_dont_load(timm, tmp_path, caplog):
    from safetensors.numpy import save_file

    sd = state_dict_np(timm_vit(timm, img_size=32, num_classes=7))
    save_file(sd, str(tmp_path / "vit.safetensors"))
    model = vit(10, patch_size=8)  # 64 px: a 8x8 grid of 8 px patches
    init = init_vars(model, 64)
    with caplog.at_level(logging.INFO):
        loaded = load_pretrained(
            tmp_path / "vit.safetensors", model=model, variables=init, head_bias_init=-2.0,
            dont_load=["Transformer/encoderblock_1/LayerNorm_0/.*"],
        )  # fmt: skip
    p = loaded["params"]
    import torch
    from timm.layers import resample_abs_pos_embed

    # A timm file resamples as timm does (bicubic, antialiased), a .npz as the JAX reference.
    want = resample_abs_pos_embed(torch.from_numpy(sd["pos_embed"]), (8, 8), num_prefix_tokens=1)
    np.testing.assert_allclose(p["Transformer"]["posembed_input"]["pos_embedding"], want.numpy(),
                               atol=1e-6)  # fmt: skip
    assert posemb_method(tmp_path / "vit.safetensors") == "bicubic"
    assert p["embedding"]["kernel"].shape == (8, 8, 3, 192)
    np.testing.assert_array_equal(p["head"]["kernel"], 0.0)
    np.testing.assert_array_equal(p["head"]["bias"], -2.0)
    ln = "Transformer/encoderblock_1/LayerNorm_0/scale"
    np.testing.assert_array_equal(flatten_dict(p)[ln], flatten_dict(init["params"])[ln])
    log = caplog.text
    for step in ("head", "posemb", "patch embedding", "dont_load", "2x2 -> 8x8 (bicubic)"):
        assert step in log
    # Same class count: the head is loaded, unless replaced on request.
    model = vit(7)
    kept = load_pretrained(
        tmp_path / "vit.safetensors", model=model, variables=init_vars(model, 32)
    )
    np.testing.assert_array_equal(kept["params"]["head"]["kernel"], sd["head.weight"].T)
    fresh = load_pretrained(
        tmp_path / "vit.safetensors", model=model, variables=init_vars(model, 32),
        replace_head=True,
    )  # fmt: skip
    np.testing.assert_array_equal(fresh["params"]["head"]["kernel"], 0.0)
    with pytest.raises(WeightMismatchError, match="matches no variable"):
        load_pretrained(
            tmp_path / "vit.safetensors", model=model, variables=init_vars(model, 32),
            dont_load=["nothing/.*"],
        )  # fmt: skip


def test_a_non_square_grid_loads_into_a_model_of_its_size(timm, tmp_path):
    """A ViT trained at 32x64 px (a 2x4 grid and a class token: 9 rows, a square count) loads
    into a model of that size as it is; into a model of another grid (its posemb_grid, no
    image_size needed) it resamples from the grid it is told; a model that names no grid of
    its non-square count is refused, naming the cause."""
    from safetensors.numpy import save_file

    ref = timm_vit(timm, img_size=(32, 64))
    save_file(state_dict_np(ref), str(tmp_path / "wide.safetensors"))
    model = vit(posemb_grid=(2, 4))
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 64, 3)))
    init = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
    loaded = load_pretrained(tmp_path / "wide.safetensors", model=model, variables=init)
    x = np.random.default_rng(5).standard_normal((2, 32, 64, 3)).astype(np.float32)
    assert_close(apply(model, loaded, x), torch_logits(ref, x))
    narrow = vit(posemb_grid=(2, 3))
    narrow_init = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), jax.eval_shape(
        narrow.init, jax.random.key(0), jnp.zeros((1, 32, 48, 3))))  # fmt: skip
    resampled = load_pretrained(tmp_path / "wide.safetensors", model=narrow,
                                variables=narrow_init, checkpoint_grid=(2, 4))  # fmt: skip
    assert np.shape(resampled["params"]["Transformer"]["posembed_input"]["pos_embedding"]) == (
        1, 7, 192)  # fmt: skip
    with pytest.raises(ValueError, match="6 grid tokens, not a square grid: pass the model"):
        load_pretrained(tmp_path / "wide.safetensors", model=vit(), variables=narrow_init)


def test_abstract_init_variables_are_initialised_alone_to_the_same_values(timm, tmp_path):
    """A run loads pretrained weights into abstract variables (``jax.eval_shape`` of the init)
    and initialises only what the checkpoint does not provide: the same variables as loading
    into a full random init, for kept-from-init (``dont_load``) and replaced leaves alike. The
    init is traced once, however many leaves it fills in."""
    from safetensors.numpy import save_file

    from vision_jax.run import _initialise_abstract

    save_file(state_dict_np(timm_vit(timm, img_size=32, num_classes=7)), str(tmp_path / "v.st"))
    model, keep = vit(10), ["Transformer/encoderblock_1/LayerNorm_0/.*", "cls"]
    rng, x = jax.random.key(3), jnp.zeros((1, 32, 32, 3))
    traces = []

    def init(rng):
        traces.append(rng)
        return model.init(rng, x)

    load = functools.partial(load_pretrained, tmp_path / "v.st", model=model, dont_load=keep)
    want = flatten_dict(load(variables=jax.jit(init)(rng)))
    partial = load(variables=jax.eval_shape(init, rng))
    abstract = [k for k, v in flatten_dict(partial).items() if isinstance(v, jax.ShapeDtypeStruct)]
    assert sorted(abstract) == sorted(
        [
            "params/cls",
            *(f"params/Transformer/encoderblock_1/LayerNorm_0/{n}" for n in ("bias", "scale")),
        ]
    )
    traces.clear()
    got = flatten_dict(_initialise_abstract(partial, init, rng))
    assert len(traces) == 1  # not once per leaf: seconds per leaf for a task head's dozens
    assert got.keys() == want.keys()
    for k in want:
        assert np.asarray(got[k]).dtype == np.asarray(want[k]).dtype, k
        np.testing.assert_allclose(got[k], want[k], rtol=1e-6, atol=1e-7, err_msg=k)


# --------------------------------------------------------------------------------------------
# export


@pytest.mark.parametrize("name", ["vit_ti16", "resnet18"])
def test_export_safetensors_loads_in_timm_strictly(timm, tmp_path, name):
    from safetensors.torch import load_file

    model = vit() if name == "vit_ti16" else create_model(name, num_classes=10)
    variables = init_vars(model, 32)
    if name == "resnet18":  # positive variances
        variables["batch_stats"] = jax.tree.map(np.abs, variables["batch_stats"])
    else:  # scale the random weights down to keep activations O(1)
        variables = jax.tree.map(lambda v: 0.1 * v, variables)
    path = tmp_path / "out.safetensors"
    export_safetensors(variables, model, path)
    ref = timm_vit(timm) if name == "vit_ti16" else timm.create_model(name, num_classes=10)
    ref.load_state_dict(load_file(str(path)), strict=True)
    ref.eval()
    x = images(32, seed=6)
    assert_close(apply(model, variables, x), torch_logits(ref, x))
    back = load_pretrained(path, model=model, variables=init_vars(model, 32))
    for k, v in flatten_dict(variables).items():
        np.testing.assert_allclose(flatten_dict(back)[k], v, err_msg=k)
    if "batch_stats" in variables:
        with pytest.raises(ValueError, match="use export_safetensors"):
            export_npz(variables, tmp_path / "x.npz")


@pytest.mark.parametrize(
    "task_name, name", [("segmentation", "vit_ti16"), ("detection", "resnet18")]
)
def test_a_task_models_backbone_exports_in_timm_names(timm, tmp_path, caplog, task_name, name):
    """A segmentation or detection model exports its backbone, headless, in timm's names (the
    converter was handed the task model and refused it: callers had to pass model.backbone);
    the left-out task head is logged, and the file loads back into the task model."""
    from safetensors.torch import load_file

    from vision_jax.tasks import TASKS

    task = TASKS[task_name](**({"strides": (8, 16)} if task_name == "detection" else {}))
    model = task.build_model(name, 3, **(VIT if name == "vit_ti16" else {}))
    variables = init_vars(model, 32)
    path = tmp_path / "backbone.safetensors"
    with caplog.at_level(logging.INFO, logger="vision_jax.weights"):
        export_safetensors(variables, model, path)
    assert "its task head (" in caplog.text and "params/task_head/" in caplog.text, caplog.text
    ref = timm_vit(timm, num_classes=0) if name == "vit_ti16" else timm.create_model(
        name, num_classes=0)  # fmt: skip
    ref.load_state_dict(load_file(str(path)), strict=True)
    back = flatten_dict(load_pretrained(path, model=model, variables=init_vars(model, 32)))
    for k, v in flatten_dict(variables).items():
        if "/task_head/" not in k:
            np.testing.assert_allclose(back[k], v, err_msg=k)


# --------------------------------------------------------------------------------------------
# input contracts


def test_input_contracts_and_apply(tmp_path, timm):
    from safetensors.numpy import save_file

    save_file(state_dict_np(timm.create_model("resnet18", num_classes=3)), str(tmp_path / "r.st"))
    c = input_contract(tmp_path / "r.st")  # format sniffed from the bytes
    assert (c.mean, c.std, c.image_size, c.crop_fraction) == (*IMAGENET, 224, 0.875)
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.image_size = 1

    @dataclasses.dataclass(frozen=True)
    class Spec:
        mean: tuple = (0.5, 0.5, 0.5)
        std: tuple = (0.5, 0.5, 0.5)
        interpolation: str = "bilinear"
        crop_mode: str = "center"

    assert (apply_input_contract(Spec(), tmp_path / "r.st").mean, apply_input_contract(
        Spec(), tmp_path / "r.st").std) == IMAGENET  # fmt: skip
    mine = Spec(mean=(0.1, 0.2, 0.3))
    assert apply_input_contract(mine, tmp_path / "r.st") == mine  # the config's values win
    # timm's ViTs are evaluated bicubic, at 0.9 crop: the contract's interpolation applies
    # unless the config chose one.
    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=3)
    save_file(state_dict_np(vit), str(tmp_path / "v.st"))
    c = input_contract(tmp_path / "v.st")
    assert (c.image_size, c.interpolation, c.crop_fraction) == (32, "bicubic", 0.9)
    assert apply_input_contract(Spec(), tmp_path / "v.st").interpolation == "bicubic"


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "vit_tiny_patch16_384"])
def test_a_timm_vit_state_dicts_crop_is_timms_for_its_size(tmp_path, timm, name):
    """A timm ViT state dict's contract crops as timm's pretrained config of its size does:
    0.9 at 224, 1.0 at 384 (it gave 0.9 for every grid)."""
    from safetensors.numpy import save_file

    ref = timm.create_model(name, depth=1, num_classes=3)  # its pretrained_cfg: no download
    save_file(state_dict_np(ref), str(tmp_path / "v.safetensors"))
    data = timm.data.resolve_data_config({}, model=ref)
    c = input_contract(tmp_path / "v.safetensors")
    assert (c.image_size, c.interpolation) == (data["input_size"][-1], data["interpolation"])
    assert c.crop_fraction == pytest.approx(data["crop_pct"])


# --------------------------------------------------------------------------------------------
# bad input: one clear error naming the file, never a partial load


class Opaque:
    pass


def test_bad_files_give_one_clear_error(tmp_path, timm):
    from safetensors.numpy import save_file

    model = vit()
    init = init_vars(model, 32)
    good = tmp_path / "vit.safetensors"
    save_file(state_dict_np(timm_vit(timm)), str(good))
    cases = {}
    data = good.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    cases["cut.safetensors"] = (WeightFormatError, "cut.safetensors")
    export_npz({"params": init["params"]}, tmp_path / "cut.npz")
    (tmp_path / "cut.npz").write_bytes((tmp_path / "cut.npz").read_bytes()[:5000])
    cases["cut.npz"] = (WeightFormatError, r"cut\.npz.*(truncated|corrupted)")
    (tmp_path / "junk.pth").write_bytes(b"\x80\x02garbage" * 10)
    cases["junk.pth"] = (WeightFormatError, r"junk\.pth")
    torch.save({"state_dict": {}, "args": Opaque()}, tmp_path / "pickled.pth")
    cases["pickled.pth"] = (WeightFormatError, r"pickled\.pth.*arbitrary.*Unsupported global")
    (tmp_path / "notes.txt").write_text("hello")
    cases["notes.txt"] = (WeightFormatError, r"Unknown weight format for .*notes\.txt")
    r18 = create_model("resnet18", num_classes=10)
    export_safetensors(init_vars(r18, 32), r18, tmp_path / "resnet.safetensors")
    cases["resnet.safetensors"] = (
        WeightMismatchError, r"resnet\.safetensors.*holds no timm ViT.*it holds layer\d \("
    )  # fmt: skip
    cases["missing.npz"] = (WeightFormatError, r"missing\.npz does not exist")
    before = {k: np.copy(v) for k, v in flatten_dict(init).items()}
    for name, (error, match) in cases.items():
        with pytest.raises(error, match=match):
            load_pretrained(tmp_path / name, model=model, variables=init)
    for k, v in flatten_dict(init).items():  # the caller's variables are never touched
        np.testing.assert_array_equal(v, before[k])
    shallow = create_model("vit_ti16", num_classes=10, depth=1)
    with pytest.raises(WeightMismatchError, match=r"vit\.safetensors.*blocks\.1\."):
        load_pretrained(good, model=shallow, variables=init_vars(shallow, 32))
    wider = create_model(
        "vit_s16", num_classes=10, depth=1
    )  # another size: one line, not a reshape
    match = r"vit\.safetensors.*holds a ViT of width 192 .*the model has width 384"
    with pytest.raises(WeightMismatchError, match=match):
        load_pretrained(good, model=wider, variables=init_vars(wider, 32))


def test_weights_of_another_architecture_or_size_are_named_as_such(tmp_path, timm):
    """Weights of another family or size: the first line says so (with what each holds), and
    the listing stays short (it listed every key: 54-198 lines)."""
    from safetensors.numpy import save_file

    export_npz({"params": init_vars(vit(), 32)["params"]}, tmp_path / "vit.npz")
    save_file(state_dict_np(timm_vit(timm)), str(tmp_path / "vit.safetensors"))
    r18 = create_model("resnet18", num_classes=10)
    wider = create_model("vit_s16", num_classes=10, **VIT)
    cases = [
        (
            "vit.npz",
            r18,
            r"only \d+ of the .* another architecture\? \(checkpoint: "
            r"params/Transformer \(\d+\)",
        ),
        ("vit.npz", wider, r"have other shapes: weights of another model size\?"),
        ("vit.safetensors", r18, r"holds no ResNet of this layout: it lacks \d+ of the \d+ keys"),
    ]
    for name, model, match in cases:
        with pytest.raises(WeightMismatchError, match=match) as info:
            load_pretrained(tmp_path / name, model=model, variables=init_vars(model, 32))
        assert str(tmp_path / name) in str(info.value)
        assert len(str(info.value).splitlines()) <= 30, str(info.value)


@pytest.mark.parametrize(
    "pooling, match",
    [
        (dict(class_token=False, global_pool="avg", fc_norm=False), r"pool_type='gap'"),
        (dict(global_pool="avg"), r"normalises after pooling \(timm's fc_norm"),
    ],
)
def test_timm_vits_pooled_otherwise_say_what_to_do(tmp_path, timm, pooling, match):
    """A timm ViT without a class token into a token-pooled model: build it with gap; one that
    normalises after pooling (fc_norm): not supported, said in one line."""
    from safetensors.numpy import save_file

    save_file(state_dict_np(timm_vit(timm, **pooling)), str(tmp_path / "vit.safetensors"))
    model = vit()
    with pytest.raises(WeightMismatchError, match=match):
        load_pretrained(tmp_path / "vit.safetensors", model=model, variables=init_vars(model, 32))


# --------------------------------------------------------------------------------------------
# the real files in ../shared/weights


def test_real_vit_ti16_npz_and_safetensors_agree(shared_dir):
    folder = shared_dir / "weights" / "vit_ti16"
    npz, st = folder / "ViT-Ti_16.npz", folder / "vit_tiny_patch16_224.safetensors"
    if not (npz.is_file() and st.is_file()):
        pytest.skip(f"{folder} lacks the ViT-Ti/16 files.")
    model, fn = flax_fn("vit_ti16", 200)
    init = init_vars(model, 224)
    a = load_pretrained(npz, model=model, variables=init)
    b = load_pretrained(st, model=model, variables=init)
    fa, fb = flatten_dict(a), flatten_dict(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)
    x = images(224, batch=1, seed=7)
    np.testing.assert_array_equal(np.asarray(fn(a, x)), np.asarray(fn(b, x)))
    assert input_contract(npz) == InputContract(224)
    assert input_contract(st) == InputContract(224, interpolation="bicubic", crop_fraction=0.9)


def test_real_cifar_resnet20_th(shared_dir):
    path = shared_dir / "weights" / "resnet_cifar10" / "resnet20-12fca82f.th"
    if not path.is_file():
        pytest.skip(f"{path} is absent.")
    assert detect_format(path) == "torch"
    model = create_model("cifar_resnet20", num_classes=10)
    variables = load_pretrained(path, model=model, variables=init_vars(model, 32))
    sd = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    np.testing.assert_array_equal(
        variables["params"]["head"]["kernel"], sd["module.linear.weight"].numpy().T
    )
    np.testing.assert_array_equal(
        variables["batch_stats"]["layer3"]["2"]["bn2"]["var"],
        sd["module.layer3.2.bn2.running_var"].numpy(),
    )
    assert input_contract(path) == InputContract(32, *IMAGENET)


@pytest.mark.slow  # ~35 s on 2 cores: one training step and a full evaluation
def test_train_applies_the_input_contract(tmp_path, caplog):
    """config.init.use_input_contract: the run normalises with the checkpoint's mean/std."""
    from test_train import small_config

    from vision_jax.train import train_and_evaluate

    model = create_model("cifar_resnet20", num_classes=10)
    variables = init_vars(model, 16)
    variables["batch_stats"] = jax.tree.map(np.abs, variables["batch_stats"])
    export_safetensors(variables, model, tmp_path / "resnet20.safetensors")
    config = small_config(total_steps=1, checkpoint_every_steps=0)
    config.init.path = str(tmp_path / "resnet20.safetensors")
    config.init.use_input_contract = True
    with caplog.at_level(logging.INFO):
        train_and_evaluate(config, str(tmp_path / "run"))
    assert f"Input contract of {config.init.path}: mean {IMAGENET[0]}, std {IMAGENET[1]}" in (
        caplog.text
    )
    # The run records the input it really used, so a later run starting from it inherits it.
    assert input_contract(tmp_path / "run") == InputContract(16, IMAGENET[0], IMAGENET[1])


def test_a_square_checkpoint_resamples_to_a_non_square_model_grid(timm, tmp_path, caplog):
    """A 4x4 checkpoint into a model initialised at 128x32 px (its posemb_grid 8x2: 17 rows
    with the class token, as the checkpoint's) is ambiguous from the row count alone: an error
    names both grids; given the checkpoint's grid it resamples to 8x2 as timm's
    resample_abs_pos_embed does. A size that is not the model's is named."""
    from safetensors.numpy import save_file
    from timm.layers import resample_abs_pos_embed

    sd = state_dict_np(timm_vit(timm, img_size=64))
    save_file(sd, str(tmp_path / "square.safetensors"))
    model = vit(posemb_grid=(8, 2))
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 128, 32, 3)))
    init = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
    load = functools.partial(load_pretrained, tmp_path / "square.safetensors", model=model,
                             variables=init, image_size=(128, 32))  # fmt: skip
    with pytest.raises(ValueError, match=r"checkpoint_grid=\(8, 2\) or \(4, 4\)"):
        load()
    with caplog.at_level(logging.INFO):
        loaded = load(checkpoint_grid=(4, 4))
    assert "4x4 -> 8x2 (bicubic)" in caplog.text
    want = resample_abs_pos_embed(
        __import__("torch").from_numpy(sd["pos_embed"]), (8, 2), num_prefix_tokens=1
    )
    got = loaded["params"]["Transformer"]["posembed_input"]["pos_embedding"]
    np.testing.assert_allclose(got, want.numpy(), atol=1e-5)
    with pytest.raises(ValueError, match=r"\(96, 96\) with 16x16 patches is a 6x6 grid"):
        load(image_size=96)


def test_an_oblong_checkpoint_keeps_its_layout_or_resamples_from_its_grid(timm, tmp_path):
    """A 2x4 checkpoint (9 rows with the class token, a square count) loads unchanged into its
    own model given the model's size; into a 2x3 model it resamples from the 2x4 grid it is
    told, as timm's resample_abs_pos_embed(old_size=(2, 4))."""
    import torch
    from safetensors.numpy import save_file
    from timm.layers import resample_abs_pos_embed

    ref = timm_vit(timm, img_size=(32, 64))
    sd = state_dict_np(ref)
    save_file(sd, str(tmp_path / "wide.safetensors"))

    def load(height_width, **kwargs):
        model = vit(posemb_grid=(height_width[0] // 16, height_width[1] // 16))
        shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, *height_width, 3)))
        init = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
        return load_pretrained(tmp_path / "wide.safetensors", model=model, variables=init,
                               image_size=height_width, **kwargs)  # fmt: skip

    posemb = lambda v: v["params"]["Transformer"]["posembed_input"]["pos_embedding"]
    np.testing.assert_array_equal(posemb(load((32, 64))), sd["pos_embed"])
    resampled = posemb(load((32, 48), checkpoint_grid=(2, 4)))
    want = resample_abs_pos_embed(
        torch.from_numpy(sd["pos_embed"]), (2, 3), old_size=(2, 4), num_prefix_tokens=1
    )
    np.testing.assert_allclose(resampled, want.numpy(), atol=1e-5)
    with pytest.raises(ValueError, match=r"checkpoint_grid \(3, 4\) does not fit"):
        load((32, 48), checkpoint_grid=(3, 4))


def test_an_oblong_model_resamples_to_its_posemb_grid_without_image_size(timm, tmp_path):
    """A 4x4 checkpoint into a model of posemb_grid 1x4 (4 rows: also a 2x2 grid's count)
    loaded without image_size resamples to 1x4 as timm's resample_abs_pos_embed, not to 2x2 read
    as 1x4; an image_size of another grid of that count is named."""
    from safetensors.numpy import save_file
    from timm.layers import resample_abs_pos_embed

    sd = state_dict_np(timm_vit(timm, img_size=64))
    save_file(sd, str(tmp_path / "square.safetensors"))
    model = vit(posemb_grid=(1, 4))
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 16, 64, 3)))
    init = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
    load = functools.partial(load_pretrained, tmp_path / "square.safetensors", model=model,
                             variables=init)  # fmt: skip
    got = load()["params"]["Transformer"]["posembed_input"]["pos_embedding"]
    want = resample_abs_pos_embed(torch.from_numpy(sd["pos_embed"]), (1, 4), num_prefix_tokens=1)
    np.testing.assert_allclose(got, want.numpy(), atol=1e-5)
    with pytest.raises(ValueError, match=r"2x2 grid, but the model's posemb_grid is \(1, 4\)"):
        load(image_size=32)


def test_an_exported_oblong_vit_records_its_grid(timm, tmp_path):
    """export_safetensors records a 1x4 ViT's grid (4 rows, a 2x2 grid's count too) in the
    file's metadata: timm loads the file strictly all the same; load_pretrained keeps it in a
    model of that grid and resamples it from 1x4 into a square one (as timm's
    resample_abs_pos_embed(old_size=(1, 4))); its input contract is 16x64, and
    Predictor.from_weights, which predicts square images, refuses it naming the grid."""
    from timm.layers import resample_abs_pos_embed

    from vision_jax.predict import Predictor

    model = vit(posemb_grid=(1, 4))
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 16, 64, 3)))
    rng = np.random.default_rng(3)
    variables = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(s.dtype), shapes)
    path = tmp_path / "wide.safetensors"
    export_safetensors(variables, model, path)
    ref = timm_vit(timm, img_size=(16, 64))
    ref.load_state_dict({k: torch.from_numpy(v) for k, v in load_file_np(path).items()})
    x = np.random.default_rng(4).standard_normal((2, 16, 64, 3)).astype(np.float32)
    assert_close(apply(model, variables, x), torch_logits(ref, x))

    posemb = lambda v: np.asarray(v["params"]["Transformer"]["posembed_input"]["pos_embedding"])
    kept = load_pretrained(path, model=model, variables=shapes)
    np.testing.assert_array_equal(posemb(kept), posemb(variables))
    square = vit()
    resampled = load_pretrained(path, model=square, variables=init_vars(square, 32))
    want = resample_abs_pos_embed(
        torch.from_numpy(posemb(variables)), (2, 2), old_size=(1, 4), num_prefix_tokens=1
    )
    np.testing.assert_allclose(posemb(resampled), want.numpy(), atol=1e-5)
    assert input_contract(path).image_size == (16, 64)
    with pytest.raises(ValueError, match=r"16x64 images \(its 1x4 grid\); Predictor.from_weig"):
        Predictor.from_weights(path, model="vit_ti16")


def load_file_np(path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return dict(load_file(str(path)))


def test_predictor_from_a_weights_file_reads_it_once(tmp_path, monkeypatch):
    """Predictor.from_weights decoded a weights file twice (its input contract, then its
    variables): once, with the classes it records."""
    import safetensors.numpy

    from vision_jax.predict import Predictor

    model = create_model("cifar_resnet20", num_classes=3)
    path = tmp_path / "exported.safetensors"
    export_safetensors(init_vars(model, 16), model, path, class_names=("cat", "dog", "eel"))
    reads, load = [], safetensors.numpy.load_file
    monkeypatch.setattr(safetensors.numpy, "load_file", lambda *a: reads.append(a) or load(*a))
    assert Predictor.from_weights(path, model="cifar_resnet20").class_names == ["cat", "dog", "eel"]
    assert len(reads) == 1, reads


def test_a_vit_state_dict_without_pos_embed_is_a_format_error(tmp_path):
    """input_contract of a timm-named ViT file without pos_embed raised a bare KeyError (the
    fine-tuning warning caught KeyError for it): a WeightFormatError naming the file."""
    from safetensors.numpy import save_file

    path = tmp_path / "no_posemb.safetensors"
    save_file({"patch_embed.proj.weight": np.zeros((8, 3, 4, 4), np.float32)}, str(path))
    with pytest.raises(WeightFormatError, match=rf"^{re.escape(str(path))}: a ViT without "):
        input_contract(path)


def test_read_once_notices_a_file_replaced_with_its_size_and_time(tmp_path):
    """read_once keyed a file by its path, size and mtime: one replaced by another of the same
    size with its mtime kept (cp -p, rsync -t) gave the first file's arrays."""
    import os

    from vision_jax.weights.files import read_npz, read_once

    path = tmp_path / "w.npz"
    np.savez(path, a=np.zeros(4, np.float32))
    with read_once():
        assert not read_npz(path)["a"].any()
        stat = os.stat(path)
        np.savez(tmp_path / "other.npz", a=np.ones(4, np.float32))
        os.replace(tmp_path / "other.npz", path)
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        assert os.stat(path).st_size == stat.st_size
        assert read_npz(path)["a"].all()


def test_export_safetensors_records_the_input_it_is_given(tmp_path):
    """export_safetensors(..., input=a run's InputSpec) records the run's input in the file's
    metadata: input_contract (Predictor.from_weights, init.use_input_contract) gives it, not the
    layout's (a ViT: timm AugReg's bicubic and crop 0.9; a CIFAR ResNet: 32 px, no crop)."""
    from vision_jax.specs import InputSpec

    resnet = create_model("cifar_resnet20", num_classes=10)
    for model, size in ((vit(), 32), (resnet, 16)):
        path = tmp_path / "exported.safetensors"
        export_safetensors(init_vars(model, size), model, path)
        assert input_contract(path).crop_fraction in (0.9, 1.0)  # the layout's
        spec = InputSpec(size, *IMAGENET, resize_size=size * 5 // 4, interpolation="bilinear")
        export_safetensors(init_vars(model, size), model, path, input=spec)
        assert input_contract(path) == InputContract(size, *IMAGENET, crop_fraction=0.8)
    given = InputContract(16, crop_fraction=0.875, crop_mode="squash", interpolation="bicubic")
    export_safetensors(init_vars(resnet, 16), resnet, tmp_path / "given.safetensors", input=given)
    assert input_contract(tmp_path / "given.safetensors") == given


def test_export_safetensors_records_the_class_names_it_is_given(tmp_path):
    """export_safetensors(..., class_names=...) writes them in the file's metadata (timm
    ignores it): Predictor.from_weights names them, not class_0 .. class_2."""
    from safetensors.numpy import load_file

    from vision_jax.predict import Predictor
    from vision_jax.weights.convert import converter

    model = create_model("cifar_resnet20", num_classes=3)
    variables = init_vars(model, 16)
    variables["batch_stats"] = jax.tree.map(np.abs, variables["batch_stats"])
    path = tmp_path / "exported.safetensors"
    export_safetensors(variables, model, path)
    assert class_names(path) is None
    assert Predictor.from_weights(path, model="cifar_resnet20").class_names[0] == "class_0"
    export_safetensors(variables, model, path, class_names=("cat", "dog", "eel / ray"))
    assert class_names(path) == ["cat", "dog", "eel / ray"]
    assert Predictor.from_weights(path, model="cifar_resnet20").class_names[2] == "eel / ray"
    assert set(load_file(str(path))) == set(converter(model).to_timm(variables, model))
    with pytest.raises(ValueError, match=r"^class_names must name the head's 3 classes; got"):
        export_safetensors(variables, model, path, class_names=["cat", "dog"])
    with pytest.raises(ValueError, match=r"^class_names name a classifier's classes: this model"):
        headless = create_model("cifar_resnet20", num_classes=0)
        export_safetensors(init_vars(headless, 16), headless, path, class_names=["a"])


def test_predictor_from_an_oblong_file_names_what_to_build(timm, tmp_path):
    """A timm ViT of a 2x3 grid (7 rows: no square grid, none recorded) is refused by
    Predictor.from_weights naming the model to build and load_pretrained's checkpoint_grid, not
    with load_pretrained's error alone (from_weights takes no checkpoint_grid)."""
    from safetensors.numpy import save_file

    from vision_jax.predict import Predictor

    save_file(state_dict_np(timm_vit(timm, img_size=(32, 48))), str(tmp_path / "w.safetensors"))
    assert input_contract(tmp_path / "w.safetensors").image_size is None
    with pytest.raises(ValueError, match=r"no square grid \(the file does not record it\); "
                       r"Predictor.from_weights predicts at a square size\. Load it into "
                       r"create_model\('vit_ti16', num_classes=\.\.\., posemb_grid=\(rows, "
                       r"columns\)\) .*checkpoint_grid=\(rows, columns\)"):  # fmt: skip
        Predictor.from_weights(tmp_path / "w.safetensors", model="vit_ti16")


@pytest.mark.parametrize("fmt", ["safetensors", "timm_hub", "hf"])
def test_predictor_refuses_weights_of_another_patch_size(timm, tmp_path, fmt):
    """A ViT-Ti of 32x32 patches given to Predictor.from_weights as vit_ti16 is refused in one
    line naming both patch sizes and the model to use: its patch kernel was resized (FlexiViT,
    fine-tuning's start), another network than the file's predicting, said in an INFO line."""
    from safetensors.numpy import save_file
    from timm.models import save_for_hf

    from vision_jax.predict import Predictor

    ref = timm.create_model("vit_tiny_patch16_224", patch_size=32, img_size=64, num_classes=3)
    path = tmp_path / "w"
    if fmt == "safetensors":
        path = tmp_path / "w.safetensors"
        save_file(state_dict_np(ref), str(path))
    elif fmt == "timm_hub":
        save_for_hf(ref, path, safe_serialization=True)
    else:
        path.mkdir()
        sd = hf_state_dict(state_dict_np(ref), classifier=True)
        save_file(sd, str(path / "model.safetensors"))
        config = {**HF_CONFIG, "num_hidden_layers": 12, "image_size": 64, "patch_size": 32}
        (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(WeightMismatchError) as error:
        Predictor.from_weights(path, model="vit_ti16")
    assert str(error.value) == (
        f"{path} holds a ViT with 32x32 patches; vit_ti16 has 16x16: use vit_ti32."
    )
    model = create_model("vit_ti16", num_classes=3)  # fine-tuning resizes it, as documented
    load_pretrained(path, model=model, variables=init_vars(model, 64))


def test_timm_hub_test_size_and_crop_are_for_inference(timm, tmp_path):
    """A timm Hub folder whose pretrained_cfg has test_input_size and test_crop_pct (timm's
    resnet50.a1_in1k: 224 train, 288 test) is evaluated at those, as timm's
    resolve_data_config(use_test_size=True) gives them (validate.py, inference.py): for
    Predictor.from_weights, not for fine-tuning (it read input_size and crop_pct alone)."""
    from timm.models import save_for_hf

    from vision_jax.predict import Predictor
    from vision_jax.weights.contract import as_contract

    overlay = {"input_size": (3, 64, 64), "crop_pct": 0.875, "test_input_size": (3, 96, 96),
               "test_crop_pct": 1.0}  # fmt: skip
    ref = timm.create_model("resnet18", num_classes=3, pretrained_cfg_overlay=overlay)
    save_for_hf(ref, tmp_path, safe_serialization=True)
    predicting = as_contract(Predictor.from_weights(tmp_path, model="resnet18").input)
    assert (predicting.image_size, predicting.crop_fraction) == (96, 1.0)
    loaded = timm.create_model(f"local-dir:{tmp_path}", pretrained=True)
    for inference in (False, True):
        data = timm.data.resolve_data_config({}, model=loaded, use_test_size=inference)
        contract = input_contract(tmp_path, inference=inference)
        assert contract.image_size == data["input_size"][-1] == (96 if inference else 64)
        assert contract.crop_fraction == pytest.approx(data["crop_pct"])


def test_a_family_whose_converter_is_not_found_is_named_in_one_line(tmp_path, own_models):
    """A family of one's own (tests/own_backbone.py) whose ``converter`` module does not exist:
    exporting its weights in timm's names (or loading timm's) says which module of which
    family, in one line (was a bare ModuleNotFoundError)."""
    import importlib

    from vision_jax.weights import export_safetensors

    own_models("own_backbone")
    importlib.import_module("own_backbone")
    model = create_model("own_net_s", num_classes=3)
    variables = model.init(jax.random.PRNGKey(0), np.zeros((1, 16, 16, 3), np.float32))
    with pytest.raises(WeightFormatError) as info:
        export_safetensors(variables, model, tmp_path / "own.safetensors")
    message = str(info.value)
    assert "\n" not in message and not (tmp_path / "own.safetensors").exists()
    assert message.startswith("The 'own_net' family's converter 'own_backbone_converter' (Fami")
