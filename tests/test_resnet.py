"""ResNet v1.5, BiT ResNet-v2 and CIFAR ResNets: parity with timm / a torch reference, parameter
counts, BatchNorm behaviour and the timm weight converters."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import flax_fn, flax_param_count, images, state_dict_np, torch_logits

from vision_jax.models.bit import ResNetV2
from vision_jax.models.cifar_resnet import CifarResNet
from vision_jax.models.registry import create_model, list_models, model_spec
from vision_jax.models.resnet import ResNet
from vision_jax.trees import flatten_dict, unflatten_dict
from vision_jax.weights import WeightMismatchError, load_pretrained
from vision_jax.weights.resnet import from_timm, to_timm

torch = pytest.importorskip("torch")
tnn = torch.nn
F = torch.nn.functional

TOL = 1e-4
HEAD_PREFIXES = ("fc.", "head.fc.", "linear.")


# --------------------------------------------------------------------------------------------
# helpers


def randomize_(module, x: np.ndarray, seed: int = 0) -> None:
    """Random norm affine params, BN running stats and classifier, so parity checks mean something.

    BN running stats are first set to the statistics of ``x`` (one train-mode pass with a
    cumulative average) and then perturbed, which keeps activations O(1) through deep nets; the
    classifier is scaled so that the logits on ``x`` have unit std (float32 rounding, ~1e-5
    relative, then stays well under ``TOL``).
    """
    g = torch.Generator().manual_seed(seed)

    def rand(t, low, high):
        return torch.rand(t.shape, generator=g) * (high - low) + low

    def randn(t, std):
        return torch.randn(t.shape, generator=g) * std

    bns = [m for m in module.modules() if isinstance(m, tnn.BatchNorm2d)]
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (tnn.BatchNorm2d, tnn.GroupNorm)):
                m.weight.copy_(rand(m.weight, 0.5, 1.5))
                m.bias.copy_(randn(m.bias, 0.2))
        if bns:
            for m in bns:
                m.reset_running_stats()
                m.momentum = None  # cumulative average: one batch -> its own statistics
            module.train()
            module(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()))
            for m in bns:
                m.momentum = 0.1
                m.running_mean.add_(randn(m.running_mean, 0.2) * m.running_var.sqrt())
                m.running_var.mul_(rand(m.running_var, 0.7, 1.4))
        module.eval()
        head = [p for n, p in module.named_parameters() if n.startswith(HEAD_PREFIXES)]
        for p in head:
            p.copy_(randn(p, 1.0))
        if head:  # scale the classifier so that the logits on x have unit std
            scale = torch_logits(module, x).std()
            for p in head:
                p.div_(float(scale))


def random_variables(model, size: int, seed: int = 0) -> dict:
    """Random Flax variables of the right structure, built without running ``model.init``."""
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, size, size, 3)))
    rng = np.random.default_rng(seed)
    flat = {}
    for path, s in flatten_dict(shapes).items():
        leaf = path.rsplit("/", 1)[-1]
        if leaf == "kernel":
            fan_in = int(np.prod(s.shape[:-1]))
            value = rng.standard_normal(s.shape) * np.sqrt(1.0 / fan_in)
        elif leaf in ("scale", "var"):
            value = rng.uniform(0.5, 1.5, s.shape)
        else:  # bias, mean
            value = rng.standard_normal(s.shape) * 0.1
        flat[path] = value.astype(np.float32)
    return unflatten_dict(flat)


def zeros_like_init(model, size: int) -> dict:
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, size, size, 3)))
    return jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)


# --------------------------------------------------------------------------------------------
# torch reference for the CIFAR ResNets: akamaster/pytorch_resnet_cifar10's architecture, written
# independently (its state-dict keys: conv1, bn1, layerN.M.{conv1,bn1,conv2,bn2}, linear).


class RefBlock(tnn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = tnn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = tnn.BatchNorm2d(planes)
        self.conv2 = tnn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = tnn.BatchNorm2d(planes)
        self.pad = planes // 4 if (stride != 1 or in_planes != planes) else None

    def forward(self, x):
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        if self.pad is None:
            shortcut = x
        else:  # option A
            shortcut = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad), "constant", 0)
        return F.relu(out + shortcut)


class RefCifarResNet(tnn.Module):
    def __init__(self, depth: int, num_classes: int = 10):
        super().__init__()
        n = (depth - 2) // 6
        self.conv1 = tnn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = tnn.BatchNorm2d(16)
        in_planes = 16
        for i, planes in enumerate((16, 32, 64)):
            blocks = []
            for j in range(n):
                blocks.append(RefBlock(in_planes, planes, 2 if (i > 0 and j == 0) else 1))
                in_planes = planes
            setattr(self, f"layer{i + 1}", tnn.Sequential(*blocks))
        self.linear = tnn.Linear(64, num_classes)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.avg_pool2d(out, out.size()[3]).flatten(1)
        return self.linear(out)


TIMM_PARITY = [("resnet18", 64), ("resnet50", 64), ("bit_r50x1", 64)]


def timm_model(timm, name: str, num_classes: int = 10):
    return timm.create_model(model_spec(name).timm_name, pretrained=False, num_classes=num_classes)


# --------------------------------------------------------------------------------------------
# parity


@pytest.mark.parametrize("name,size", TIMM_PARITY + [("resnet50", 224)])
def test_parity_with_timm(timm, name, size):
    x = images(size)
    ref = timm_model(timm, name)
    randomize_(ref, x, seed=size)
    expected = torch_logits(ref, x)
    model, apply = flax_fn(name)
    got = np.asarray(apply(from_timm(state_dict_np(ref), model), x))
    assert got.shape == (2, 10)
    assert np.std(expected) > 0.5  # a meaningful, non-degenerate output
    # float32 rounding grows with the logits' size (ResNet-50's reach 3.3: 1.03e-4 was seen once)
    np.testing.assert_allclose(got, expected, rtol=0, atol=TOL * max(1.0, np.abs(expected).max()))


def test_cifar_resnet_parity_with_reference():
    x = images(32, batch=4)
    ref = RefCifarResNet(20)
    randomize_(ref, x, seed=1)
    expected = torch_logits(ref, x)
    model, apply = flax_fn("cifar_resnet20")
    got = np.asarray(apply(from_timm(state_dict_np(ref), model), x))
    assert np.std(expected) > 0.5
    np.testing.assert_allclose(got, expected, rtol=0, atol=TOL)


def test_headless_returns_pooled_features(timm):
    x = images(64)
    ref = timm_model(timm, "resnet18")
    randomize_(ref, x, seed=3)
    model, apply = flax_fn("resnet18", 0)
    variables = from_timm(state_dict_np(ref), model)  # the checkpoint's fc is skipped
    assert "head" not in variables["params"]
    ref.reset_classifier(0)
    np.testing.assert_allclose(np.asarray(apply(variables, x)), torch_logits(ref, x), atol=TOL)


# --------------------------------------------------------------------------------------------
# parameter counts


@pytest.mark.parametrize("name", list_models("resnet") + list_models("bit"))
def test_param_count_matches_timm(timm, name):
    with torch.device("meta"):
        ref = timm_model(timm, name, num_classes=1000)
    assert flax_param_count(name, 1000) == sum(p.numel() for p in ref.parameters())


@pytest.mark.parametrize("name", list_models("cifar_resnet"))
def test_cifar_param_count_matches_reference_and_paper(name):
    spec = model_spec(name)
    depth = int(name.removeprefix("cifar_resnet"))
    with torch.device("meta"):
        ref = RefCifarResNet(depth)
    count = flax_param_count(name, 10)
    assert count == sum(p.numel() for p in ref.parameters()) == spec.paper_params
    paper = {20: 0.27e6, 32: 0.46e6, 44: 0.66e6, 56: 0.85e6, 110: 1.7e6}[depth]
    digits = 1 if depth == 110 else 2
    assert round(count / 1e6, digits) == round(paper / 1e6, digits)


def test_pinned_param_counts():
    assert flax_param_count("resnet50", 1000) == 25_557_032
    assert flax_param_count("resnet18", 1000) == 11_689_512
    assert flax_param_count("bit_r50x1", 1000) == 25_549_352
    assert flax_param_count("cifar_resnet20", 10) == 269_722


def test_registry_entries():
    assert list_models("resnet") == [f"resnet{d}" for d in (101, 152, 18, 34, 50)]
    assert list_models("bit") == ["bit_r101x1", "bit_r50x1", "bit_r50x3"]
    assert list_models("cifar_resnet") == [f"cifar_resnet{d}" for d in (110, 20, 32, 44, 56)]
    assert model_spec("resnet50").timm_name == "resnet50"
    assert model_spec("bit_r50x3").timm_name == "resnetv2_50x3_bit"
    assert model_spec("cifar_resnet56").timm_name is None
    assert model_spec("cifar_resnet56").input_size == 32
    assert isinstance(create_model("resnet18", num_classes=3), ResNet)
    assert isinstance(create_model("bit_r101x1", num_classes=3), ResNetV2)
    assert isinstance(create_model("cifar_resnet110", num_classes=3), CifarResNet)


@pytest.mark.parametrize("name", ["resnet18", "bit_r50x1", "cifar_resnet20", "vit_ti16"])
def test_an_image_without_its_batch_axis_is_named(name):
    """One image (H, W, C) passed alone, NCHW images, uint8 pixels, a list of images: the error
    says what a backbone takes (the ViT said its size 32x3 was not divisible by the patch size;
    a list gave jax's dtype TypeError)."""
    model = create_model(name, num_classes=3)
    with pytest.raises(ValueError, match=r"Images must be a batch \[N, H, W, C\]; got shape "
                       r"\(32, 32, 3\) \(one image: add the batch axis"):  # fmt: skip
        jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((32, 32, 3)))
    with pytest.raises(ValueError, match=r"shape \(2, 3, 32, 32\) looks channels-first"):
        jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((2, 3, 32, 32)))
    with pytest.raises(ValueError, match="Images must be normalised floats; got uint8"):
        jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((2, 32, 32, 3), jnp.uint8))
    with pytest.raises(ValueError, match=r"got a list \(a list of images: np\.stack\(images\)\)"):
        model.init(jax.random.key(0), [np.zeros((32, 32, 3), np.float32)] * 2)


@pytest.mark.parametrize("name", ["resnet18", "vit_ti16"])
def test_torch_tensors_grey_batches_and_other_channel_counts_are_named(name):
    """A torch tensor (jax: "Cannot interpret 'torch.float32' as a data type"), a grey batch
    [N, H, W] (was: "one image: add the batch axis") and 1 or 4 channels (Flax's
    ScopeParamShapeError at apply) each get one line naming the problem."""
    model = create_model(name, num_classes=3)
    variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    with pytest.raises(TypeError, match=r"numpy or JAX array .*got a torch\.Tensor .*\.numpy\(\)"):
        model.apply(variables, torch.zeros(2, 32, 32, 3), train=False)
    from vision_jax.tf_without_keras import tf  # not called a torch tensor

    with pytest.raises(TypeError, match=r"got a tensorflow\.\S+Tensor \(another array library's "
                       r"tensor: convert with \.numpy\(\)"):  # fmt: skip
        model.apply(variables, tf.zeros((2, 32, 32, 3)), train=False)
    with pytest.raises(ValueError, match=r"shape \(8, 32, 32\) \(grey images \[N, H, W\]: "
                       r"np\.repeat\(images\[\.\.\., None\], 3, axis=-1\)\)"):  # fmt: skip
        jax.eval_shape(model.apply, variables, jnp.zeros((8, 32, 32)), train=False)
    for channels in (1, 4):
        message = rf"Images have {channels} channels? \(shape \(2, 32, 32, {channels}\)\); the"
        with pytest.raises(ValueError, match=message + r" parameters' stem .* takes 3"):
            jax.eval_shape(model.apply, variables, jnp.zeros((2, 32, 32, channels)), train=False)


@pytest.mark.parametrize("name", ["cifar_resnet20", "resnet18", "vit_ti16"])
def test_a_model_initialised_on_grey_or_4_channel_images_takes_them(name):
    """create_model trained from scratch on grey or RGB-D images: the stem takes the channels of
    the images at init (Flax; timm's in_chans), apply on them works; only images whose channels
    differ from the parameters' stem are refused, naming both counts (was: init refused any
    channel count but 3)."""
    model = create_model(name, num_classes=3)
    for channels in (1, 4):
        images = jnp.zeros((2, 32, 32, channels))
        variables = jax.eval_shape(model.init, jax.random.key(0), images)
        logits = jax.eval_shape(partial(model.apply, train=False), variables, images)
        assert logits.shape == (2, 3)
        other = jnp.zeros((2, 32, 32, 5 - channels))
        with pytest.raises(ValueError, match=rf"Images have {5 - channels} channels? .* takes "
                           rf"{channels}\.(\n|$)"):  # fmt: skip
            jax.eval_shape(partial(model.apply, train=False), variables, other)


@pytest.mark.parametrize("name", ["resnet18", "vit_ti16"])
def test_feature_taps_are_checked_when_the_model_is_created(name):
    """feature_taps with a head, or out of range, failed only at the first init."""
    with pytest.raises(ValueError, match=r"^feature_taps returns feature maps: .*num_classes=0"):
        create_model(name, num_classes=2, feature_taps=(1,))
    with pytest.raises(ValueError, match=rf"^feature_taps \(0, 99\) of '{name}' \(.* in \[-"):
        create_model(name, num_classes=0, feature_taps=(0, 99))
    assert create_model(name, num_classes=0, feature_taps=(0, -1)).feature_taps == (0, -1)


def test_timm_names_exist(timm):
    available = set(timm.list_models("resnetv2*bit*")) | set(timm.list_models("resnet*"))
    for name in list_models("resnet") + list_models("bit"):
        assert model_spec(name).timm_name in available


def test_bfloat16_compute_keeps_float32_params():
    model = create_model("cifar_resnet20", num_classes=10, dtype=jnp.bfloat16)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    assert {x.dtype for x in jax.tree.leaves(shapes)} == {jnp.dtype(jnp.float32)}
    out = jax.eval_shape(model.apply, shapes, jnp.zeros((2, 32, 32, 3)))
    assert out.shape == (2, 10) and out.dtype == jnp.bfloat16


# --------------------------------------------------------------------------------------------
# BatchNorm


def test_batch_stats_update_only_in_train_mode():
    ref = RefCifarResNet(20)
    model, apply = flax_fn("cifar_resnet20")
    variables = from_timm(state_dict_np(ref), model)  # torch init: mean 0, var 1
    x = images(32, batch=4, seed=5)

    logits, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
    assert logits.shape == (4, 10)
    old, new = flatten_dict(variables["batch_stats"]), flatten_dict(updates["batch_stats"])
    assert old.keys() == new.keys()
    assert all(not np.allclose(old[k], new[k]) for k in old)
    # momentum 0.9 (torch 0.1): the stem's new running mean is 0.1 * the batch mean.
    with torch.no_grad():
        ref.train()
        ref(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()))
    np.testing.assert_allclose(new["bn1/mean"], ref.bn1.running_mean.numpy(), atol=1e-5)

    # Eval mode needs no mutable collection and changes nothing when one is offered.
    apply(variables, x)
    _, same = model.apply(variables, x, mutable=["batch_stats"])
    for k, v in flatten_dict(same["batch_stats"]).items():
        np.testing.assert_array_equal(v, old[k])


def test_train_mode_gradients_match_torch():
    """The hand-written BatchNorm backward pass through a whole CIFAR ResNet-20 in train mode
    (batch statistics) against torch's autograd: every parameter's gradient and the running
    statistics."""
    # Seeded: torch's initialisation otherwise depends on the tests that ran before. Some
    # initialisations put a pre-activation within float32 rounding of a ReLU's kink, where the
    # two frameworks' last-bit differences take different sides (1e-2 off in a gradient).
    torch.manual_seed(0)
    ref = RefCifarResNet(20)
    x = images(32, batch=4, seed=3)
    randomize_(ref, x, seed=3)
    model = create_model("cifar_resnet20", num_classes=10)
    variables = from_timm(state_dict_np(ref), model)
    weights = np.random.default_rng(4).standard_normal((4, 10)).astype(np.float32)

    def loss(params):
        logits, updates = model.apply(
            {**variables, "params": params}, x, train=True, mutable=["batch_stats"]
        )
        return jnp.sum(jnp.tanh(logits) * weights), updates

    grads, updates = jax.jit(jax.grad(loss, has_aux=True))(variables["params"])
    ref.train()
    norms = {
        n.replace(".", "/"): m for n, m in ref.named_modules() if isinstance(m, tnn.BatchNorm2d)
    }
    old_stats = {path: (m.running_mean.clone(), m.running_var.clone()) for path, m in norms.items()}
    counts = {}  # elements per channel each BatchNorm normalises over
    for path, m in norms.items():
        m.register_forward_hook(
            lambda m, i, o, path=path: counts.update({path: i[0][:, 0].numel()})
        )
    out = ref(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()))
    torch.sum(torch.tanh(out) * torch.from_numpy(weights)).backward()
    ref_grads = {k: p.grad.numpy() for k, p in ref.named_parameters()}
    expected = from_timm({**state_dict_np(ref), **ref_grads}, model)["params"]
    flat, flat_expected = flatten_dict(grads), flatten_dict(expected)
    assert flat.keys() == flat_expected.keys()
    for path, g in flat.items():
        scale = np.abs(flat_expected[path]).max()
        np.testing.assert_allclose(g, flat_expected[path], atol=2e-4 * scale, err_msg=path)
    # Running statistics: torch folds the unbiased batch variance in, Flax the biased one.
    new = flatten_dict(updates["batch_stats"])
    assert len(norms) == len(new) // 2 == 19
    for path, m in norms.items():
        np.testing.assert_allclose(new[f"{path}/mean"], m.running_mean.numpy(), atol=1e-5)
        old_var, n = old_stats[path][1].numpy(), counts[path]
        unbiased = (new[f"{path}/var"] - 0.9 * old_var) * n / (n - 1)
        np.testing.assert_allclose(unbiased, m.running_var.numpy() - 0.9 * old_var, rtol=1e-4)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_batch_norm_matches_flax(dtype):
    """``models.batch_norm.BatchNorm`` against ``flax.linen.BatchNorm``: variables, outputs,
    gradients (input, scale, bias, through the statistics too) and running statistics."""
    import flax.linen as nn

    from vision_jax.models.batch_norm import BatchNorm, batch_normalize

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(2.0, 3.0, (4, 5, 6, 7)), dtype)
    ref = nn.BatchNorm(use_running_average=False, momentum=0.9, epsilon=1e-5, dtype=dtype)
    variables = ref.init(jax.random.key(0), x)
    ours = BatchNorm(False, dtype=dtype).init(jax.random.key(0), x)
    assert jax.tree.structure(ours) == jax.tree.structure(variables)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(variables), strict=True):
        assert a.dtype == b.dtype == jnp.float32
        np.testing.assert_array_equal(a, b)  # ones and zeros: init leaves the statistics alone
    variables = jax.tree.map(lambda v: v + rng.uniform(0.5, 1.5, v.shape), variables)
    w = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)

    def loss(module, params, x):
        y, updates = module.apply({**variables, "params": params}, x, mutable=["batch_stats"])
        y = y.astype(jnp.float32)
        return jnp.sum(y * w + jnp.sin(y)), (y, updates)

    grad = jax.jit(jax.grad(loss, (1, 2), has_aux=True), static_argnums=0)
    expected = grad(ref, variables["params"], x)
    got = grad(BatchNorm(False, dtype=dtype), variables["params"], x)
    assert got[0][1].dtype == dtype
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    assert jax.tree.structure(got) == jax.tree.structure(expected)
    for e, g in zip(jax.tree.leaves(expected), jax.tree.leaves(got), strict=True):
        e, g = np.asarray(e, np.float32), np.asarray(g, np.float32)
        np.testing.assert_allclose(g, e, atol=tol * max(1.0, np.abs(e).max()))

    # The function itself, with cotangents for the statistics too (the module stops them).
    def plain(x, scale, bias):
        x32 = x.astype(jnp.float32)
        mean, var = jnp.mean(x32, (0, 1, 2)), jnp.var(x32, (0, 1, 2))
        return (x32 - mean) * jax.lax.rsqrt(var + 1e-5) * scale + bias, mean, var

    def total(fn, *args):
        y, mean, var = fn(*args)
        return jnp.sum(y * w + jnp.sin(y)) + jnp.sum(jnp.cos(mean)) + jnp.sum(var**2)

    args = (x, *variables["params"].values())
    expected = jax.grad(partial(total, plain), (0, 1, 2))(*args)
    got = jax.grad(partial(total, lambda *a: batch_normalize(*a, 1e-5)), (0, 1, 2))(*args)
    for e, g in zip(expected, got, strict=True):
        e, g = np.asarray(e, np.float32), np.asarray(g, np.float32)
        np.testing.assert_allclose(g, e, atol=tol * max(1.0, np.abs(e).max()))
    # Eval mode: the running statistics, as Flax.
    ref_eval = nn.BatchNorm(use_running_average=True, epsilon=1e-5, dtype=dtype)
    np.testing.assert_array_equal(
        np.asarray(BatchNorm(True, dtype=dtype).apply(variables, x), np.float32),
        np.asarray(ref_eval.apply(variables, x), np.float32),
    )


def test_bit_has_no_batch_stats():
    model = create_model("bit_r50x1", num_classes=10)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
    assert set(shapes) == {"params"}
    params = flatten_dict(shapes["params"])
    for path in [
        "root_block/conv_root/kernel",
        "block1/unit01/gn1/scale",
        "block1/unit01/conv_proj/kernel",
        "block4/unit03/conv3/kernel",
        "norm-pre-head/bias",
        "head/kernel",
    ]:
        assert path in params


# --------------------------------------------------------------------------------------------
# converters


@pytest.mark.parametrize("name,size", TIMM_PARITY)
def test_to_timm_round_trip(timm, name, size):
    model, apply = flax_fn(name)
    variables = random_variables(model, size, seed=7)
    state_dict = to_timm(variables, model)
    ref = timm_model(timm, name)
    ref.load_state_dict({k: torch.from_numpy(v) for k, v in state_dict.items()}, strict=True)
    ref.eval()
    x = images(size, seed=8)
    expected = torch_logits(ref, x)
    assert np.std(expected) > 0.2
    np.testing.assert_allclose(np.asarray(apply(variables, x)), expected, rtol=0, atol=TOL)
    back = flatten_dict(from_timm(state_dict, model))
    assert back.keys() == flatten_dict(variables).keys()
    for k, v in flatten_dict(variables).items():
        np.testing.assert_array_equal(back[k], v)


def test_to_timm_cifar_loads_into_reference_strictly():
    model, apply = flax_fn("cifar_resnet20")
    variables = random_variables(model, 32, seed=9)
    ref = RefCifarResNet(20)
    state_dict = to_timm(variables, model)
    ref.load_state_dict({k: torch.from_numpy(v) for k, v in state_dict.items()}, strict=True)
    ref.eval()
    x = images(32, batch=4, seed=10)
    np.testing.assert_allclose(np.asarray(apply(variables, x)), torch_logits(ref, x), atol=TOL)


def test_from_timm_names_missing_and_leftover_keys(timm):
    model = create_model("resnet18", num_classes=10)
    state_dict = state_dict_np(timm_model(timm, "resnet18"))
    with pytest.raises(ValueError, match=r"layer2\.0\.downsample\.1\.running_var"):
        from_timm(
            {k: v for k, v in state_dict.items() if "downsample.1.running_var" not in k}, model
        )
    with pytest.raises(ValueError, match=r"layer5\.0\.conv1\.weight"):
        from_timm({**state_dict, "layer5.0.conv1.weight": np.zeros((1, 1, 1, 1))}, model)
    with pytest.raises(TypeError, match="converts ResNet"):
        from_timm(state_dict, object())


def test_load_pretrained_safetensors(timm, tmp_path):
    from safetensors.numpy import save_file

    ref = timm_model(timm, "resnet18")
    state_dict = state_dict_np(ref)
    model = create_model("resnet18", num_classes=10)
    init = zeros_like_init(model, 64)

    path = tmp_path / "resnet18.safetensors"
    save_file(state_dict, str(path))
    loaded = load_pretrained(path, model=model, variables=init)
    flat = flatten_dict(loaded)
    assert flat.keys() == flatten_dict(init).keys()
    np.testing.assert_array_equal(
        flat["params/layer1/0/conv1/kernel"],
        state_dict["layer1.0.conv1.weight"].transpose(2, 3, 1, 0),
    )
    np.testing.assert_array_equal(flat["batch_stats/bn1/var"], state_dict["bn1.running_var"])
    np.testing.assert_array_equal(flat["params/head/kernel"], state_dict["fc.weight"].T)

    bad = dict(state_dict, **{"layer3.1.conv2.weight": np.zeros((256, 256, 1, 1), np.float32)})
    bad_path = tmp_path / "bad.safetensors"
    save_file(bad, str(bad_path))
    with pytest.raises(WeightMismatchError, match=r"params/layer3/1/conv2/kernel"):
        load_pretrained(bad_path, model=model, variables=init)


def test_pretrained_cifar_resnet20_matches_reference(shared_dir):
    path = shared_dir / "weights" / "resnet_cifar10" / "resnet20-12fca82f.th"
    if not path.is_file():
        pytest.skip(f"{path} is absent.")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)  # legacy format
    state_dict = {k.removeprefix("module."): v for k, v in checkpoint["state_dict"].items()}
    ref = RefCifarResNet(20)
    ref.load_state_dict(state_dict, strict=True)
    ref.eval()
    x = images(32, batch=4, seed=11)
    model, apply = flax_fn("cifar_resnet20")
    variables = from_timm({k: v.numpy() for k, v in state_dict.items()}, model)
    expected = torch_logits(ref, x)
    np.testing.assert_allclose(np.asarray(apply(variables, x)), expected, rtol=0, atol=TOL)
