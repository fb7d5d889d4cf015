"""The model registry: every model is created by name through :func:`create_model`, and every
model family describes itself (:class:`Family`) so that the optimizer, LoRA and the weight
converters ask the family instead of importing model classes (timm's ``group_matcher`` /
``no_weight_decay`` / ``feature_info`` idea)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from vision_jax.specs import check_registered_again, is_integer


@dataclasses.dataclass(frozen=True)
class FeatureTap:
    """One feature map a backbone can return: its stride to the image and its channels."""

    name: str
    stride: int
    channels: int


@dataclasses.dataclass(frozen=True)
class Family:
    """What the rest of the library needs to know about a model family.

    * ``layer_groups(model)``: ``([(regex, group)], n_groups)``: group 0 the stem, 1..L the
      blocks or stages, L+1 the final norm and the head (layer decay, ``last:N``);
    * ``norm_modules``: regex of the normalisation module names (``bitfit``; it must match
      some parameter, ``""`` for a family without norms);
    * ``feature_taps(model)``: every feature map the backbone can return, in tap order
      (``feature_taps`` field of the module selects among them by index);
    * ``converter``: the module with ``from_timm`` / ``to_timm`` / ``checkpoint_model``;
    * ``lora_unmergeable``: module classes whose kernels LoRA must refuse (non-linear kernels);
    * ``after_last_stage``: regex of the head-group parameters that run only after the last
      block or stage (BiT's final norm), idle when the last feature tap is an earlier one.

    Group ``i + 1`` of ``layer_groups`` is feature tap ``i``: the blocks after the last tap,
    which never run, are found by it.
    """

    name: str
    module: type[nn.Module]
    layer_groups: Callable[[Any], tuple[list[tuple[str, int]], int]]
    norm_modules: str
    feature_taps: Callable[[Any], list[FeatureTap]]
    converter: str
    lora_unmergeable: tuple[type, ...] = ()
    after_last_stage: str | None = None


_FAMILIES: dict[str, Family] = {}


def register_family(family: Family) -> None:
    """Registers a model family (beside its module). Registered again (a notebook cell run
    again), it replaces the family if its module is the same class defined again; the models
    registered on the old class then build the new one (their defaults checked against its
    fields when created); those on a subclass of the old class (defined in another cell) are
    refused when created until that code runs again."""
    replaced = _FAMILIES.get(family.name)
    if replaced is not None:
        from vision_jax.models import BUILT_IN_FAMILIES  # (it imports this module)

        old = replaced.module
        check_registered_again("Family", family.name, old, family.module, BUILT_IN_FAMILIES)
    others = (f for f in _FAMILIES.values() if f.name != family.name)
    if same := [f.name for f in others if f.module is family.module]:
        raise ValueError(  # family() finds a model's family by its module's class
            f"Family {family.name!r}: module {family.module.__name__} belongs to family "
            f"{same[0]!r} already; give it a subclass of its own (class Mine("
            f"{family.module.__name__}): ...)."
        )
    _FAMILIES[family.name] = family
    if replaced is not None and replaced.module is not family.module:
        for name, spec in _REGISTRY.items():  # the old class is found nowhere any more
            if spec.module is replaced.module:
                _REGISTRY[name] = dataclasses.replace(spec, module=family.module)


def families() -> list[Family]:
    """Every registered family."""
    return list(_FAMILIES.values())


def backbone_of(model: nn.Module) -> nn.Module:
    """The registered backbone module inside ``model`` (itself, or a task model's backbone)."""
    return getattr(model, "backbone", model)


def check_images(images: Any) -> None:
    """A backbone's input is a batch of NHWC images, a numpy or JAX array: anything else is
    named (one image without its batch axis would fail later with a message about its sizes, a
    torch or TensorFlow tensor with jax's dtype TypeError). Any channel count is taken: a model
    initialised on grey or 4-channel images has a stem for them (:func:`check_channels`)."""
    if not hasattr(images, "dtype"):  # a list of images: its dtype and shape are not one array's
        raise ValueError(
            f"Images must be an array [N, H, W, C]; got a {type(images).__name__} (a list of "
            "images: np.stack(images))."
        )
    try:
        np.dtype(images.dtype)
    except TypeError:  # another library's tensor (torch, TensorFlow): jax said "Cannot
        # interpret 'torch.float32' as a data type"
        kind = f"{type(images).__module__}.{type(images).__name__}"
        raise TypeError(
            f"Images must be a numpy or JAX array [N, H, W, C]; got a {kind} (another array "
            "library's tensor: convert with .numpy() or np.asarray(), channels last)."
        ) from None
    shape = tuple(np.shape(images))
    if len(shape) == 3 and shape[-1] not in (1, 3):  # as Predictor.predict_arrays reads them
        raise ValueError(
            f"Images must be a batch [N, H, W, 3]; got shape {shape} (grey images [N, H, W]: "
            "np.repeat(images[..., None], 3, axis=-1))."
        )
    if len(shape) != 4:
        raise ValueError(
            f"Images must be a batch [N, H, W, C]; got shape {shape} (one image: add the batch "
            "axis, images[None])."
        )
    if shape[1] in (1, 3) and shape[3] not in (1, 3):
        raise ValueError(
            f"Images must be [N, H, W, C]; shape {shape} looks channels-first (torch's NCHW): "
            "images.transpose(0, 2, 3, 1)."
        )
    if not jnp.issubdtype(jnp.result_type(images), jnp.floating):
        raise ValueError(
            f"Images must be normalised floats; got {jnp.result_type(images)} (uint8 pixels: "
            "subtract the mean and divide by the std of the model's input contract first)."
        )


def check_channels(module: nn.Module, images: Any, *stem: str) -> None:
    """Images whose channels differ from those of the parameters' stem kernel (``stem``: its path
    under ``module``'s params) are named with both counts (was Flax's ScopeParamShapeError). At
    init there is no kernel yet: the stem takes the images' channels, as timm's ``in_chans``."""
    kernel: Any = module.variables.get("params", {})
    for key in (*stem, "kernel"):
        if not hasattr(kernel, "get") or key not in kernel:
            return
        kernel = kernel[key]
    kernel_shape = np.shape(getattr(kernel, "value", kernel))  # a boxed (partitioned) kernel
    shape = tuple(np.shape(images))
    if len(kernel_shape) != 4 or kernel_shape[2] == shape[-1]:
        return
    expected = kernel_shape[2]
    if shape[1] == expected:
        hint = " (channels-first, torch's NCHW: images.transpose(0, 2, 3, 1))"
    elif shape[-1] == 1 and expected == 3:
        hint = " (grey: np.repeat(images, 3, axis=-1))"
    else:
        hint = ""
    raise ValueError(
        f"Images have {shape[-1]} channel{'s' * (shape[-1] != 1)} (shape {shape}); the "
        f"parameters' stem "
        f"({'/'.join(stem)}, kernel {kernel_shape}) takes {expected}{hint}."
    )


def stage_taps(
    taps: Any,
    num_stages: int,
    num_classes: int,
    *,
    owner: str = "",
    unit: str = "stage",
    family: str | None = None,
) -> tuple[int, ...]:
    """Stage (or block) indices of a backbone's ``feature_taps`` field (negative from the end),
    checked; () when the field is unset. An error names ``owner`` (the module's class, or the
    model) and how many stages or blocks (``unit``) it has, or how many feature taps its
    ``family`` declares when those are what ``num_stages`` counts."""
    if taps is None:
        return ()
    if num_classes:
        raise ValueError("feature_taps returns feature maps: create the model with num_classes=0.")
    if not taps or any(not -num_stages <= int(t) < num_stages for t in taps):
        counted = "feature tap" if family else unit
        count = f"{num_stages} {counted}{'s' * (num_stages != 1)}"
        has = f"its family {family!r} declares {count}" if family else f"it has {count}"
        raise ValueError(
            f"feature_taps {tuple(taps)} of {owner or 'the backbone'}: {has}, so taps must be "
            f"indices in [-{num_stages}, {num_stages}) (0 is the first {counted}, -1 the last)."
        )
    indices = tuple(int(t) % num_stages for t in taps)
    if list(indices) != sorted(set(indices)):  # the pyramids read them fine to coarse
        raise ValueError(
            f"feature_taps {tuple(taps)} must name each block or stage once, in network order "
            f"(fine to coarse): {tuple(sorted(set(indices)))}."
        )
    return indices


def stages_run(module: nn.Module, taps: tuple[int, ...], num_stages: int) -> int:
    """How many stages (or blocks) a backbone runs: up to its last tap (timm's
    ``forward_intermediates(stop_early=True)``), all of them without taps and at init (every
    parameter exists whatever the taps, so checkpoints load unchanged)."""
    if not taps or module.is_initializing():
        return num_stages
    return max(taps) + 1


def family(model: nn.Module) -> Family:
    """The :class:`Family` of a model created by :func:`create_model` (or a task model on one)."""
    backbone = backbone_of(model)
    fam = _nearest_family(type(backbone))
    if fam is None:
        raise ValueError(
            f"{type(backbone).__name__} is not a registered model class"
            f"{_defined_again_hint(type(backbone))}."
        )
    return fam


def _defined_again_hint(module: type) -> str:
    """Why ``module``, of no registered family, has none: it is (or derives from) a family's
    class as defined before the cell defining it ran again; "" otherwise."""
    key = lambda c: (c.__module__, c.__qualname__)
    for cls in module.__mro__:
        again = [f.name for f in _FAMILIES.values() if key(f.module) == key(cls)]
        if not again:
            continue
        if cls is module:  # a model created before the cell defining its class ran again
            return (
                f" (family {again[0]!r} has its class defined again since: create the model again)"
            )
        return (  # a subclass defined (in another cell) on the old class
            f" (family {again[0]!r} has its class {cls.__name__} defined again since, and "
            f"{module.__name__} derives from the old one: run the code defining "
            f"{module.__name__} and registering its models again, then create the model)"
        )
    return ""


def check_defaults(module: type, defaults: Any, model: str | None = None) -> None:
    """Refuses ``defaults`` naming no field of ``module`` (a registered model's: ``model``)."""
    unknown = set(defaults) - {f.name for f in dataclasses.fields(module)}
    if unknown:
        of = f" (model {model!r} was registered with them: register it again)" if model else ""
        raise ValueError(f"{module.__name__} has no field(s) {sorted(unknown)}{of}.")


def _nearest_family(module: type) -> Family | None:
    """The family of the nearest class in ``module``'s MRO that is a family's module: a
    subclass of a registered module (``class MyViT(VisionTransformer)``) with a family of its own
    has its own family's groups."""
    for cls in module.__mro__:
        fam = next((f for f in _FAMILIES.values() if f.module is cls), None)
        if fam is not None:
            return fam
    return None


def map_sizes(image_size: Any, stride: int) -> list[tuple[int, int]]:
    """Each side's size of a stride-``stride`` map of an ``image_size`` image, as (rounded down,
    rounded up): a ViT's patch grid drops the remainder, a CNN's padded convolutions keep it."""
    return [(int(s) // stride, -(-int(s) // stride)) for s in image_size]


def check_feature_maps(backbone: nn.Module, maps: Any, image_size: tuple[int, int]) -> None:
    """The maps a backbone with ``feature_taps`` returns on ``image_size`` images must be those
    its family declares (:class:`FeatureTap`): each one's size the image's over its stride
    (rounded down or up) and its channels, else an error naming the tap, declared and actual
    (the heads are built for the declared ones)."""
    try:
        fam = family(backbone)
    except ValueError:
        return
    declared = fam.feature_taps(backbone)
    taps = stage_taps(
        getattr(backbone, "feature_taps", None), len(declared), 0,
        owner=type(backbone).__name__, family=fam.name,
    )  # fmt: skip
    maps = tuple(maps) if isinstance(maps, (tuple, list)) else (maps,)
    if len(maps) != len(taps):
        raise ValueError(
            f"{type(backbone).__name__} with feature_taps {tuple(taps)} returns {len(maps)} "
            f"map(s), not one per tap."
        )
    for index, fmap in zip(taps, maps, strict=True):
        tap, shape = declared[index], tuple(np.shape(fmap))
        sizes = map_sizes(image_size, tap.stride)
        ok = len(shape) == 4 and shape[3] == tap.channels
        if not (ok and all(n in pair for n, pair in zip(shape[1:3], sizes, strict=True))):
            want = "x".join(str(a) if a == b else f"{a}-{b}" for a, b in sizes)
            raise ValueError(
                f"Family {fam.name!r}: feature tap {index} ({tap.name!r}) declares stride "
                f"{tap.stride} and {tap.channels} channels ([N, {want}, {tap.channels}] on "
                f"{image_size[0]}x{image_size[1]} images); the backbone returns {shape}."
            )


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """What the registry knows about a model name.

    ``family`` selects the weight converters (``vit``, ``resnet``, ``bit``, ``cifar_resnet``);
    ``timm_name`` is the timm model that is the same network (None if timm has none).
    """

    name: str
    family: str
    module: type[nn.Module]
    defaults: dict[str, Any]
    input_size: int
    timm_name: str | None = None
    paper_params: int | None = None  # parameter count from the paper, for models timm lacks

    def build(self, **kwargs: Any) -> nn.Module:
        """The module with the registered defaults, overridden by ``kwargs``."""
        return self.module(**{**self.defaults, **kwargs})


_REGISTRY: dict[str, ModelSpec] = {}


def register_model(
    name: str,
    *,
    family: str,
    module: type[nn.Module],
    input_size: int,
    timm_name: str | None = None,
    paper_params: int | None = None,
    **defaults: Any,
) -> None:
    """Registers ``name`` as ``module(**defaults)``; registered again (a notebook cell run
    again) with its module defined again, it replaces the model."""
    if name in _REGISTRY:
        from vision_jax.models import BUILT_IN_MODELS  # (it imports this module)

        check_registered_again("Model", name, _REGISTRY[name].module, module, BUILT_IN_MODELS)
    if family not in _FAMILIES:
        raise ValueError(
            f"Model {name!r}: family {family!r} is not registered (registered: "
            f"{', '.join(_FAMILIES)}); register_family(Family(name={family!r}, ...)) first."
        )
    nearest = _nearest_family(module)  # what family() will say of the model
    if nearest is None:
        raise ValueError(
            f"Model {name!r}: module {module.__name__} is neither the module of family "
            f"{family!r} ({_FAMILIES[family].module.__name__}) nor a subclass of it."
        )
    if nearest.name != family:
        raise ValueError(
            f"Model {name!r}: module {module.__name__} is of family {nearest.name!r} (its "
            f"class {nearest.module.__name__} is that family's module), not {family!r}: "
            f"register it with family={nearest.name!r}."
        )
    check_defaults(module, defaults)
    _REGISTRY[name] = ModelSpec(
        name, family, module, dict(defaults), input_size, timm_name, paper_params
    )


def list_models(family: str | None = None) -> list[str]:
    """Registered model names, optionally only those of one family."""
    return sorted(n for n, s in _REGISTRY.items() if family is None or s.family == family)


def model_spec(name: str) -> ModelSpec:
    """The :class:`ModelSpec` of ``name``; an unknown name lists the valid ones."""
    if name not in _REGISTRY:
        timm_name = name.split(".")[0]  # timm's name without its weights tag (".augreg_in21k")
        same = [m for m, spec in sorted(_REGISTRY.items()) if spec.timm_name == timm_name]
        if same:
            raise ValueError(f"Unknown model {name!r}: timm's {timm_name} is {same[0]!r} here.")
        raise ValueError(f"Unknown model {name!r}. Valid names: {', '.join(list_models())}.")
    return _REGISTRY[name]


def family_of(module: nn.Module) -> str:
    """The family name (``vit``, ``resnet``, ...) of a module created by :func:`create_model`."""
    return family(module).name


# What the config passes every model (model.remat, model.remat_rules) at its defaults: a module
# without these fields (one of one's own that does not support remat) is created without them.
REMAT_DEFAULTS: dict[str, Any] = {"remat": "none", "remat_rules": ()}


def _remat_default(key: str, value: Any) -> bool:
    """Whether ``value`` of the override ``key`` is its :data:`REMAT_DEFAULTS` one."""
    value = tuple(value) if isinstance(value, list) else value
    return key in REMAT_DEFAULTS and value == REMAT_DEFAULTS[key]


def _fields(module: type) -> set[str]:
    """A module class's configurable fields."""
    return {f.name for f in dataclasses.fields(module)} - {"parent", "name"}


def create_model(
    name: str, *, num_classes: int, dtype: Any = jnp.float32, **overrides: Any
) -> nn.Module:
    """Creates the Flax module registered as ``name``.

    Args:
      name: a registered name (see :func:`list_models`).
      num_classes: size of the classification head; 0 gives a headless feature extractor
        (pooled features, or with ``feature_taps=(...)`` the chosen feature maps).
      dtype: compute dtype (e.g. ``jnp.bfloat16``); parameters stay float32.
      **overrides: any other field of the module (e.g. ``dropout_rate``, ``pool_type``).
    """
    spec = model_spec(name)
    if _nearest_family(spec.module) is None:  # its family's class defined again since
        raise ValueError(
            f"Model {name!r}: {spec.module.__name__} is not a registered model class"
            f"{_defined_again_hint(spec.module)}."
        )
    # the defaults on a family's class defined again (register_family moved them to it)
    check_defaults(spec.module, spec.defaults, name)
    given = "None" if dtype is None else jnp.dtype(dtype).name
    if given not in ("float32", "bfloat16"):  # float16 would need loss scaling
        raise ValueError(f"dtype must be float32 or bfloat16, got {given}.")
    if not is_integer(num_classes) or num_classes < 0:
        raise ValueError(
            f"num_classes must be a positive int (or 0 for a headless feature extractor), "
            f"got {num_classes!r}."
        )
    fields = _fields(spec.module)
    overrides = {k: v for k, v in overrides.items() if k in fields or not _remat_default(k, v)}
    unknown = set(overrides) - fields
    if unknown:
        # a module of one's own asked for remat (model.remat, model.remat_rules)
        own = set(REMAT_DEFAULTS) & unknown
        own = own if not spec.module.__module__.startswith("vision_jax.") else set()
        elsewhere = [
            f"{key} is for {', '.join(sorted(owners))} models"
            for key in sorted(unknown - own)
            if (owners := {f.name for f in _FAMILIES.values() if key in _fields(f.module)})
        ]
        declare = (
            f" For model.remat and model.remat_rules, declare the fields remat: str = "
            f'"none" and remat_rules: tuple = () in {spec.module.__name__} (its blocks wrapped '
            "by vision_jax.models.remat.remat_block)."
        )
        raise ValueError(
            f"Unknown override(s) {sorted(unknown)} for {name!r} ({spec.module.__name__})"
            f"{' (' + '; '.join(elsewhere) + ')' if elsewhere else ''}. "
            f"Valid: {', '.join(sorted(fields - {'num_classes', 'dtype'}))}.{declare * bool(own)}"
        )
    model = spec.build(num_classes=int(num_classes), dtype=dtype, **overrides)
    taps = getattr(model, "feature_taps", None)
    if taps is not None:  # checked now, not at the first init
        declared = len(_FAMILIES[spec.family].feature_taps(model))
        owner = f"{name!r} ({spec.module.__name__})"
        stage_taps(taps, declared, model.num_classes, owner=owner, family=spec.family)
    return model
