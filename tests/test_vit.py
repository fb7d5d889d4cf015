"""Vision Transformer: parity with timm, exact parameter counts, the google-research parameter
layout, the timm converters and the registry's errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import flax_fn, flax_param_count, images, state_dict_np, torch_logits

from vision_jax.models.registry import create_model, list_models, model_spec
from vision_jax.models.vit import VIT_SIZES, attend
from vision_jax.trees import flatten_dict
from vision_jax.weights import WeightMismatchError
from vision_jax.weights.vit import from_timm, to_timm

torch = pytest.importorskip("torch")
TOL = 1e-4


def randomize_(module, x: np.ndarray, seed: int = 0) -> None:
    """Perturbs every timm parameter (norms, biases, cls, pos_embed too) so that parity means
    something, then scales the head so the logits on ``x`` have unit std."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name.endswith("norm1.weight") or name.endswith("norm2.weight"):
                p.copy_(1.0 + 0.2 * noise)
            elif name.startswith("head."):
                p.copy_(noise)
            else:
                p.add_(0.02 * noise)
        module.eval()
        scale = float(torch_logits(module, x).std())
        module.head.weight.div_(scale)
        module.head.bias.div_(scale)


def timm_vit(timm, name: str, num_classes: int = 10):
    """timm's same network: its registered name, or its VisionTransformer class with our sizes."""
    spec = model_spec(name)
    if spec.timm_name is not None:
        return timm.create_model(spec.timm_name, pretrained=False, num_classes=num_classes)
    from timm.models.vision_transformer import VisionTransformer

    d = spec.defaults
    return VisionTransformer(
        img_size=spec.input_size, patch_size=d["patch_size"], embed_dim=d["width"],
        depth=d["depth"], num_heads=d["num_heads"], mlp_ratio=d["mlp_dim"] / d["width"],
        num_classes=num_classes,
    )  # fmt: skip


@pytest.mark.parametrize("name", ["vit_ti16", "vit_s16", "vit_b32"])
def test_parity_with_timm(timm, name):
    x = images(224, batch=2, seed=1)
    ref = timm_vit(timm, name)
    randomize_(ref, x)
    expected = torch_logits(ref, x)
    model, apply = flax_fn(name)
    got = np.asarray(apply(from_timm(state_dict_np(ref), model), x))
    assert got.shape == (2, 10)
    assert np.std(expected) > 0.5
    np.testing.assert_allclose(got, expected, rtol=0, atol=TOL)


def test_attend_matches_numpy_softmax_attention():
    """The attention core (deferred softmax normalisation) against the textbook formula in
    float64, with and without dropout on the weights."""
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((2, 7, 3, 8)) for _ in range(3))  # (B, N, H, hd)
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(8)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    expected = np.einsum("bhqk,bkhd->bqhd", weights, v)
    as_f32 = [jnp.asarray(a, jnp.float32) for a in (q, k, v)]
    np.testing.assert_allclose(attend(*as_f32), expected, rtol=1e-5, atol=1e-5)
    # Dropout acts on the normalised weights: zeroing every weight of query 0 zeroes its output.
    mask = np.ones((2, 3, 7, 7), np.float32)
    mask[:, :, 0] = 0.0
    dropped = attend(*as_f32, dropout=lambda w: w * mask)
    np.testing.assert_allclose(dropped[:, 0], 0.0, atol=1e-7)
    np.testing.assert_allclose(dropped[:, 1:], expected[:, 1:], rtol=1e-5, atol=1e-5)


def test_headless_returns_class_token_features(timm):
    x = images(224, seed=2)
    ref = timm_vit(timm, "vit_ti16")
    randomize_(ref, x)
    model, apply = flax_fn("vit_ti16", 0)
    variables = from_timm(state_dict_np(ref), model)  # the checkpoint's head is skipped
    assert "head" not in variables["params"]
    ref.reset_classifier(0)
    features = np.asarray(apply(variables, x))
    assert features.shape == (2, 192)
    np.testing.assert_allclose(features, torch_logits(ref, x), atol=TOL)


@pytest.mark.parametrize("name", list_models("vit"))
def test_param_count_matches_timm(timm, name):
    with torch.device("meta"):
        ref = timm_vit(timm, name, num_classes=1000)
    assert flax_param_count(name, 1000) == sum(p.numel() for p in ref.parameters())


def test_pinned_param_counts():
    # The counts in the README's model table (1000 classes; timm's numbers).
    assert flax_param_count("vit_ti16", 1000) == 5_717_416
    assert flax_param_count("vit_s16", 1000) == 22_050_664
    assert flax_param_count("vit_b16", 1000) == 86_567_656
    assert flax_param_count("vit_b32", 1000) == 88_224_232
    assert flax_param_count("vit_l16", 1000) == 304_326_632


def test_google_research_parameter_layout():
    model = create_model("vit_b16", num_classes=10, representation_size=768)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 224, 224, 3)))
    flat = {k: v.shape for k, v in flatten_dict(shapes["params"]).items()}
    block = "Transformer/encoderblock_0"
    expected = {
        "embedding/kernel": (16, 16, 3, 768),
        "embedding/bias": (768,),
        "cls": (1, 1, 768),
        "Transformer/posembed_input/pos_embedding": (1, 197, 768),
        f"{block}/LayerNorm_0/scale": (768,),
        f"{block}/MultiHeadDotProductAttention_1/query/kernel": (768, 12, 64),
        f"{block}/MultiHeadDotProductAttention_1/key/bias": (12, 64),
        f"{block}/MultiHeadDotProductAttention_1/out/kernel": (12, 64, 768),
        f"{block}/MultiHeadDotProductAttention_1/out/bias": (768,),
        f"{block}/LayerNorm_2/bias": (768,),
        f"{block}/MlpBlock_3/Dense_0/kernel": (768, 3072),
        f"{block}/MlpBlock_3/Dense_1/kernel": (3072, 768),
        "Transformer/encoderblock_11/MlpBlock_3/Dense_1/bias": (768,),
        "Transformer/encoder_norm/scale": (768,),
        "pre_logits/kernel": (768, 768),
        "head/kernel": (768, 10),
        "head/bias": (10,),
    }
    for path, shape in expected.items():
        assert flat.get(path) == shape, path
    assert len(flat) == 4 + 12 * 16 + 2 + 2 + 2  # stem, blocks, encoder_norm, pre_logits, head


def test_gap_pooling_has_no_class_token_and_pools_the_normed_tokens():
    model = create_model("vit_ti16", num_classes=0, pool_type="gap")
    x = images(32, seed=3)
    variables = model.init(jax.random.key(0), x)
    assert "cls" not in variables["params"]
    assert variables["params"]["Transformer"]["posembed_input"]["pos_embedding"].shape == (
        1, 4, 192,
    )  # fmt: skip
    features, state = model.apply(
        variables, x, capture_intermediates=True, mutable=["intermediates"]
    )
    tokens = state["intermediates"]["Transformer"]["__call__"][0]  # after encoder_norm
    assert tokens.shape == (2, 4, 192)
    np.testing.assert_allclose(features, tokens.mean(axis=1), atol=1e-6)


def test_dropout_and_stochastic_depth_act_only_in_training():
    model = create_model("vit_ti16", num_classes=10, dropout_rate=0.1, drop_path_rate=0.2)
    x = images(32, seed=4)
    variables = model.init(jax.random.key(0), x)
    head = variables["params"]["head"]
    head["kernel"] = jax.random.normal(jax.random.key(1), head["kernel"].shape)  # non-zero head
    eval1, eval2 = model.apply(variables, x), model.apply(variables, x)
    np.testing.assert_array_equal(eval1, eval2)
    train = lambda seed: model.apply(
        variables, x, train=True, rngs={"dropout": jax.random.key(seed)}
    )
    assert not np.allclose(train(0), eval1)
    assert not np.allclose(train(0), train(1))
    np.testing.assert_array_equal(train(2), train(2))


def test_images_of_another_patch_grid_are_refused():
    """Position embeddings are read in the grid they were made for: 112x448 images (7x28, the
    196 patches of 224's 14x14) and 160 px (10x10) are named, not read as 14x14 (timm refuses
    another size too). An oblong grid is named at init, its count a square's or not (2x4 of 8
    patches; the init's error names no embeddings, there are none yet); ``posemb_grid`` makes
    it the model's, and any other grid is refused then."""
    model = create_model("vit_ti16", num_classes=10, depth=1)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3)))
    with pytest.raises(ValueError, match=r"112x448 are a 7x28 grid .* for a 14x14 grid.*"
                       r"image_size=\(112, 448\)"):  # fmt: skip
        model.apply(variables, jnp.zeros((1, 112, 448, 3)))
    with pytest.raises(ValueError, match=r"10x10 grid .* for a 14x14 grid: .*\(224x224\)"):
        model.apply(variables, jnp.zeros((1, 160, 160, 3)))
    with pytest.raises(ValueError, match=r"^Images of 112x448 are a 7x28 grid of 16x16 patches, "
                       r"an oblong grid: a model of this grid names it, "
                       r"create_model\(\.\.\., posemb_grid=\(7, 28\)\)\.(\n|$)"):  # fmt: skip
        model.init(jax.random.key(0), jnp.zeros((1, 112, 448, 3)))
    oblong = create_model("vit_ti16", num_classes=10, depth=1, posemb_grid=(8, 2))
    variables = oblong.init(jax.random.key(0), jnp.zeros((1, 128, 32, 3)))
    assert oblong.apply(variables, jnp.zeros((2, 128, 32, 3))).shape == (2, 10)
    with pytest.raises(ValueError, match=r"4x4 grid .* for a 8x2 grid"):
        oblong.apply(variables, jnp.zeros((1, 64, 64, 3)))
    with pytest.raises(ValueError, match=r"4x4 grid .*, not the model's posemb_grid \(8, 2\)"):
        oblong.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
    wide = create_model("vit_ti16", num_classes=10, depth=1, posemb_grid=(2, 4))  # count 8
    variables = wide.init(jax.random.key(0), jnp.zeros((1, 32, 64, 3)))
    assert wide.apply(variables, jnp.zeros((1, 32, 64, 3))).shape == (1, 10)
    for height, width in [(64, 32), (16, 128)]:  # 4x2, 1x8: the same count, not its grid
        with pytest.raises(ValueError, match=r"grid .* for a 2x4 grid"):
            wide.apply(variables, jnp.zeros((1, height, width, 3)))
    unnamed = create_model("vit_ti16", num_classes=10, depth=1)
    for height, width in [(32, 64), (64, 32)]:
        with pytest.raises(ValueError, match=r"8 position embeddings .* posemb_grid=\(rows, "):
            unnamed.apply(variables, jnp.zeros((1, height, width, 3)))
        with pytest.raises(ValueError, match=rf"oblong grid: .*posemb_grid=\({height // 16}, "):
            unnamed.init(jax.random.key(0), jnp.zeros((1, height, width, 3)))


def test_bfloat16_compute_keeps_float32_params_and_stays_close(timm):
    x = images(224, seed=5)
    ref = timm_vit(timm, "vit_ti16")
    randomize_(ref, x)
    expected = torch_logits(ref, x)
    model = create_model("vit_ti16", num_classes=10, dtype=jnp.bfloat16)
    variables = from_timm(state_dict_np(ref), model)
    shapes = jax.eval_shape(model.init, jax.random.key(0), x)
    assert {v.dtype for v in jax.tree.leaves(shapes)} == {jnp.dtype(jnp.float32)}
    got = jax.jit(model.apply)(variables, x)
    assert got.dtype == jnp.bfloat16
    # bfloat16 keeps 8 bits of mantissa: logits of unit scale agree to a few hundredths.
    np.testing.assert_allclose(np.asarray(got, np.float32), expected, atol=0.1)
    with pytest.raises(ValueError, match="dtype must be float32 or bfloat16, got float16"):
        create_model("vit_ti16", num_classes=10, dtype=jnp.float16)  # no loss scaling for it


def test_to_timm_round_trip(timm):
    x = images(224, seed=6)
    ref = timm_vit(timm, "vit_ti16")
    randomize_(ref, x)
    state_dict = state_dict_np(ref)
    model, apply = flax_fn("vit_ti16")
    variables = from_timm(state_dict, model)
    back = to_timm(variables, model)
    assert back.keys() == state_dict.keys()
    for k, v in state_dict.items():
        np.testing.assert_array_equal(back[k], v, err_msg=k)
    fresh = timm_vit(timm, "vit_ti16")
    fresh.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()}, strict=True)
    fresh.eval()
    np.testing.assert_allclose(torch_logits(fresh, x), np.asarray(apply(variables, x)), atol=TOL)


def test_from_timm_names_missing_and_unexpected_keys(timm):
    model = create_model("vit_ti16", num_classes=10)
    state_dict = state_dict_np(timm_vit(timm, "vit_ti16"))
    with pytest.raises(WeightMismatchError, match=r"blocks\.3\.attn\.qkv\.bias"):
        from_timm({k: v for k, v in state_dict.items() if k != "blocks.3.attn.qkv.bias"}, model)
    with pytest.raises(WeightMismatchError, match=r"blocks\.12\.norm1\.weight"):
        from_timm({**state_dict, "blocks.12.norm1.weight": np.ones(192, np.float32)}, model)
    with pytest.raises(WeightMismatchError, match=r"qkv\.weight of shape \(576, 192\)"):
        from_timm(state_dict, create_model("vit_ti16", num_classes=10, num_heads=5))


def test_registry_names_and_errors():
    assert list_models("vit") == sorted(f"vit_{s}{p}" for s in VIT_SIZES for p in (8, 16, 32))
    assert model_spec("vit_b16").timm_name == "vit_base_patch16_224"
    create_model("vit_b16", num_classes=10)
    with pytest.raises(ValueError, match=r"Unknown model 'vit_x16'.*resnet50.*vit_b16"):
        create_model("vit_x16", num_classes=10)
    with pytest.raises(ValueError, match=r"timm's vit_tiny_patch16_224 is 'vit_ti16' here"):
        model_spec("vit_tiny_patch16_224.augreg_in21k")
    for bad in (-1, 2.5, "10", True):
        with pytest.raises(ValueError, match="num_classes must be a positive int"):
            create_model("vit_b16", num_classes=bad)
    assert create_model("vit_b16", num_classes=np.int64(10)).num_classes == 10  # an int
    with pytest.raises(ValueError, match="^dtype must be float32 or bfloat16, got None.$"):
        create_model("vit_b16", num_classes=10, dtype=None)  # it said float64
    with pytest.raises(ValueError, match=r"Unknown override\(s\) \['patch'\].*patch_size"):
        create_model("vit_b16", num_classes=10, patch=8)
    with pytest.raises(ValueError, match="not divisible by the patch size 16"):
        create_model("vit_ti16", num_classes=10).init(jax.random.key(0), jnp.zeros((1, 40, 40, 3)))


def test_timm_names_exist(timm):
    available = set(timm.list_models("vit_*"))
    for name in list_models("vit"):
        timm_name = model_spec(name).timm_name
        assert timm_name is None or timm_name in available
    assert model_spec("vit_ti32").timm_name is None and "vit_tiny_patch32_224" not in available
