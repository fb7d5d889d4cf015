"""The one place where a run's config becomes typed specs.

Library code (:mod:`vision_jax.optim`, :mod:`vision_jax.data`, :mod:`vision_jax.weights`, the
tasks) takes these small frozen dataclasses, never the config object. Every key of a section is
read here, so a key that nothing uses is caught by ``TrackedConfig.check_all_read``; a key that
only applies to a branch the run does not take (``schedule.step_factor`` with a cosine decay,
``lora.*`` with rank 0, ``optimizer.momentum`` with AdamW) is an error when set, or, for the
keys whose default is not ``None`` (``input.mix_prob``, ``init.replace_head``), when set off its
default. Defaults live once: in ``default_config()`` for keys every run uses, in the spec for
branch-only keys (which the config leaves ``None``) and for the sections the config copies
from their spec (``input``, ``init``).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import importlib
import logging
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from numbers import Integral
from typing import Any

from vision_jax.masks import check_multiplier_rules
from vision_jax.output_errors import is_url

logger = logging.getLogger(__name__)

IGNORE_LABEL = 255  # label-map pixels that count for nothing (VOC's "void")
SCHEDULES = ("cosine", "linear", "constant", "rsqrt", "step")
OPTIMIZERS = ("sgd", "adamw")
NONFINITE_POLICIES = ("stop", "skip")


class ConfigError(ValueError):
    """A config value is invalid or does not apply to the run."""


def check_interval(name: str, value: Any, interval: str) -> None:
    """Raises :class:`ConfigError` unless ``value`` (None passes) lies in ``interval``, written
    as in mathematics: ``"[0, 1)"``, ``"(0, inf)"``. NaN lies in none."""
    if value is None:
        return
    if isinstance(value, bool):  # True would read as 1
        raise ConfigError(f"{name} must be a number in {interval}; got {value!r}.")
    low, high = (float(bound) for bound in interval[1:-1].split(","))
    try:
        above = low <= value if interval[0] == "[" else low < value
        below = value <= high if interval[-1] == "]" else value < high
    except TypeError:
        raise ConfigError(f"{name} must be a number in {interval}; got {value!r}.") from None
    if not (above and below):
        raise ConfigError(f"{name} must lie in {interval}; got {value}.")


def _check_count(name: str, value: Any, low: int) -> None:
    """Raises :class:`ConfigError` unless ``value`` (None passes) is an integer >= ``low``."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, Integral) or value < low:
        raise ConfigError(f"{name} must be an integer >= {low}; got {value!r}.")


def _check_range(name: str, value: Any, rule: str, high: float) -> None:
    """Raises :class:`ConfigError` unless ``value`` is ``(lo, hi)`` with ``0 < lo <= hi <= high``
    (``rule`` says so in the message)."""
    try:
        low_value, high_value = (float(v) for v in value)
        valid = 0 < low_value <= high_value <= high
    except (TypeError, ValueError):
        valid = False
    if not valid:
        raise ConfigError(f"{name} must be (lo, hi) with {rule}; got {value!r}.")


INTERPOLATIONS = ("bilinear", "bicubic")
CROP_MODES = ("center", "squash")


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """How images enter the model: size, normalisation, and training augmentations.

    Evaluation (and training without a random crop) resizes the shorter side to ``resize_size``
    (or ``image_size / crop_fraction``, timm's crop_pct; default ``image_size``) and takes the
    central ``image_size`` square; with ``crop_mode="squash"`` (timm's, and Hugging Face's
    ViT processors') it resizes the whole image to that size in both sides, aspect ratio not
    kept, before the centre crop. Every image resize is ``interpolation`` ("bilinear" or
    "bicubic", as PIL resamples an 8-bit image: antialiased when shrinking, rounded). Training
    crops are, in order of precedence: ``inception_crop`` (random-resized crop, area fraction
    ``inception_scale``, aspect ratio ``inception_ratio``), ``random_crop`` (a random square of
    the resized image, after zero-padding ``crop_padding`` pixels: CIFAR-style), or the centre
    crop. Then:
    ``flip``, RandAugment with ``randaugment_layers`` ops at ``randaugment_magnitude`` (0..10;
    timm's ``rand-mM-nN``; ``randaugment_magnitude_std``: timm's ``mstd``, ``inf`` for uniform;
    ``randaugment_increasing``: its ``inc1``; :mod:`vision_jax.data.randaugment`), colour
    jitter of strength ``color_jitter`` (timm's ``--color-jitter``: brightness, contrast and
    saturation as torchvision's ``ColorJitter`` on PIL images), normalisation by
    ``mean``/``std`` (fractions of 255), random erasing with probability ``random_erasing``.
    Batch-level mixup/cutmix (``mixup_alpha``, ``cutmix_alpha``, applied
    with ``mix_prob``, cutmix chosen with ``mix_switch_prob`` when both are on) adds
    ``soft_label`` to batches. ``scale_jitter`` ``(lo, hi)`` is a third training crop: the
    shorter side resized to ``image_size * U(lo, hi)``, zero-padded (bottom, right) up to
    ``image_size``, then a random ``image_size`` square (the usual segmentation recipe, e.g.
    (0.5, 2.0)).

    Label maps (segmentation) take the same crop windows and flips as their images, resized
    nearest-neighbour and padded with IGNORE_LABEL; colour jitter leaves them as they are;
    RandAugment, random erasing and mixup/cutmix are refused. Evaluation (and training without
    a random crop) resizes the whole image to ``image_size`` x ``image_size``, with no crop, so
    every pixel is evaluated (``resize_size``, ``crop_fraction`` and ``crop_mode`` do not
    apply).

    Boxes (detection) take the same flips and windows as their images, clipped to the window
    (in training, boxes left under 1 px wide or high are dropped). Evaluation, and training
    without a crop, letterbox: the longer side scaled to ``image_size``, the image at the
    top-left, padded with the mean (0 after normalisation). ``scale_jitter`` scales the longer
    side (not the shorter) to ``image_size * U(lo, hi)``; ``random_crop`` works as for images;
    the other augmentations are refused.
    """

    image_size: int
    mean: Sequence[float] = (0.5, 0.5, 0.5)
    std: Sequence[float] = (0.5, 0.5, 0.5)
    resize_size: int | None = None
    crop_fraction: float | None = None
    interpolation: str = "bilinear"
    crop_mode: str = "center"
    random_crop: bool = False
    crop_padding: int = 0
    inception_crop: bool = False
    inception_scale: Sequence[float] = (0.08, 1.0)
    inception_ratio: Sequence[float] = (3 / 4, 4 / 3)
    flip: bool = False
    randaugment_layers: int = 0
    randaugment_magnitude: float = 9.0
    randaugment_magnitude_std: float = 0.0
    randaugment_increasing: bool = False
    color_jitter: float = 0.0
    random_erasing: float = 0.0
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    mix_prob: float = 1.0
    mix_switch_prob: float = 0.5
    scale_jitter: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        try:
            self._check_values()
        except ConfigError as e:
            if not reading_saved_config():
                raise
            saved_config_warning(f"A saved run's config: {e} (kept: the run was trained with it)")
        if self.resize_size is not None and self.crop_fraction is not None:
            raise ValueError("Set at most one of input.resize_size and input.crop_fraction.")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(
                f"input.interpolation must be one of {INTERPOLATIONS}; got {self.interpolation!r}."
            )
        if self.crop_mode not in CROP_MODES:
            raise ValueError(f"input.crop_mode must be one of {CROP_MODES}: {self.crop_mode!r}.")
        if self.resize < self.image_size:
            raise ValueError(f"input.resize_size {self.resize} < input.image_size.")
        if self.inception_crop and self.random_crop:
            raise ValueError("input.inception_crop and input.random_crop exclude each other.")
        if self.crop_padding and not self.random_crop:
            raise ValueError("input.crop_padding needs input.random_crop = True.")
        if self.scale_jitter is not None:
            if self.inception_crop or self.random_crop:
                raise ValueError("input.scale_jitter excludes inception_crop and random_crop.")
        mixing = (self.mixup_alpha > 0, self.cutmix_alpha > 0)
        only_when("input", self, ("inception_scale", "inception_ratio"), self.inception_crop,
                   "with inception_crop=True")  # fmt: skip
        randaugment = ("randaugment_magnitude", "randaugment_magnitude_std",
                       "randaugment_increasing")  # fmt: skip
        only_when("input", self, randaugment, self.randaugment_layers > 0,
                   "with randaugment_layers > 0")  # fmt: skip
        check_interval("input.color_jitter", self.color_jitter, "[0, inf]")
        if self.color_jitter and self.randaugment_layers:
            raise ValueError(
                "input.color_jitter with input.randaugment_layers: timm leaves colour jitter out "
                "when RandAugment is on (its colour ops do that work); set one of them."
            )
        check_interval("input.randaugment_magnitude", self.randaugment_magnitude, "[0, 10]")
        check_interval("input.randaugment_magnitude_std", self.randaugment_magnitude_std,
                       "[0, inf]")  # fmt: skip
        only_when("input", self, ("mix_prob",), any(mixing), "with mixup_alpha or cutmix_alpha")
        only_when("input", self, ("mix_switch_prob",), all(mixing),
                   "with both mixup_alpha and cutmix_alpha")  # fmt: skip
        for name, values in (("mean", self.mean), ("std", self.std)):
            if len(values) != 3:
                raise ConfigError(f"input.{name} needs one value per RGB channel; got {values}.")

    def _check_values(self) -> None:
        """Sizes, ranges and probabilities (a saved run's config that a version before these
        checks accepted still loads, with a warning: see :func:`saved_config`)."""
        for name, low in (("image_size", 1), ("resize_size", 1), ("crop_padding", 0),
                          ("randaugment_layers", 0)):  # fmt: skip
            _check_count(f"input.{name}", getattr(self, name), low)
        check_interval("input.crop_fraction", self.crop_fraction, "(0, 1]")
        if self.scale_jitter is not None:
            _check_range("input.scale_jitter", self.scale_jitter, "0 < lo <= hi", math.inf)
        _check_range("input.inception_scale", self.inception_scale, "0 < lo <= hi <= 1", 1.0)
        _check_range("input.inception_ratio", self.inception_ratio, "0 < lo <= hi", math.inf)
        for name in ("mixup_alpha", "cutmix_alpha"):
            check_interval(f"input.{name}", getattr(self, name), "[0, inf)")
        for name in ("random_erasing", "mix_prob", "mix_switch_prob"):
            check_interval(f"input.{name}", getattr(self, name), "[0, 1]")
        for name, values, interval in (("mean", self.mean, "[0, 1]"), ("std", self.std, "(0, 1]")):
            if max(values, default=0) > 1 and min(values) >= 1:  # every channel: 0-255 units
                raise ConfigError(
                    f"input.{name} {tuple(values)} looks like 0-255 units; vision_jax takes "
                    "fractions of 255 (as timm: ImageNet's mean is (0.485, 0.456, 0.406)): "
                    "divide by 255."
                )
            for value in values:
                check_interval(f"input.{name}", value, interval)

    @property
    def resize(self) -> int:
        """The shorter side before the centre (or random) crop."""
        if self.crop_fraction is not None:  # timm's floor; 1e-9: 93 = 16 / (16 / 93) (92.99...)
            return math.floor(self.image_size / self.crop_fraction + 1e-9)
        return self.resize_size or self.image_size

    @property
    def mixes(self) -> bool:
        """Whether training batches are mixed (and carry ``soft_label``)."""
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0


# Classic LoRA targets for ViT: the query and value projections.
DEFAULT_TARGETS = r".*/MultiHeadDotProductAttention_1/(query|value)/kernel"


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """Which kernels get adapters and how they scale: ``scale = alpha / rank``."""

    rank: int
    alpha: float
    dropout: float = 0.0
    targets: str = DEFAULT_TARGETS
    train_head: bool = True  # with LoRA the base model is frozen; the head may still train

    def __post_init__(self):
        if self.rank <= 0:
            raise ValueError(f"LoRA rank must be positive, got {self.rank}.")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must lie in [0, 1), got {self.dropout}.")

    @property
    def scale(self) -> float:
        """The adapters' output scale, ``alpha / rank``."""
        return self.alpha / self.rank


def as_tuples(value: Any) -> Any:
    """``value`` with its lists as tuples, at every depth: a run record's JSON gives lists
    where the config had tuples (specs and models stay comparable and hashable)."""
    if isinstance(value, list | tuple):
        return tuple(as_tuples(v) for v in value)
    return value


def _section(section: Any, spec: type) -> dict[str, Any]:
    """The keys of a config section that are fields of ``spec`` (marking them read; any other
    key stays unread, so ``check_all_read`` names it), lists as tuples."""
    names = [f.name for f in dataclasses.fields(spec)]
    return {k: as_tuples(section.get(k)) for k in names if k in section}


def takes_none(field: dataclasses.Field) -> bool:
    """Whether ``field``'s type takes None (``X | None``, ``Optional[X]``)."""
    return "None" in str(field.type) or "Optional[" in str(field.type)


def _lacks_value(field: dataclasses.Field, value: Any) -> bool:
    """Whether ``value`` is a None that ``field``'s type does not take (a required key unset)."""
    return value is None and not takes_none(field)


def _build(spec: type, values: dict[str, Any], section: str) -> Any:
    """``spec(**values)``, where ``None`` means "the spec's default" for fields that have one;
    a field without one that takes no None is an error naming ``section.key``."""
    fields = dataclasses.fields(spec)
    for f in fields if not _SAVED.get() else ():  # a saved run's record: as it ran
        if f.default is dataclasses.MISSING and _lacks_value(f, values.get(f.name, 0)):
            raise ConfigError(f"{section}.{f.name} needs a value: it is None.")
    defaults = {f.name for f in fields if f.default is not dataclasses.MISSING}
    built = spec(**{k: v for k, v in values.items() if v is not None or k not in defaults})
    if not _SAVED.get():  # a saved run's record: as it ran
        _check_numbers(built, f"{section}.")
    return built


def is_integer(value: Any) -> bool:
    """Whether ``value`` is an integer (Python's or numpy's), not a bool nor an integral float."""
    return isinstance(value, Integral) and not isinstance(value, bool)


def _check_numbers(spec: Any, prefix: str) -> None:
    """Raises naming the first field of ``spec`` typed ``int`` (or a tuple of them) whose value
    is not one: a dict config's 8.0 or 2.5 (a ConfigDict refuses them) failed deep in JAX or
    was cut to 2; or typed ``float`` whose value is a bool (True read as 1.0; a ConfigDict of
    ``default_config`` refuses it, see ``config.NumberConfigDict``)."""
    for f in dataclasses.fields(spec):
        kind, value = str(f.type).removesuffix(" | None"), getattr(spec, f.name)
        if kind == "float" and isinstance(value, bool):
            raise ConfigError(f"{prefix}{f.name} must be a number; got {value!r}.")
        if kind not in ("int", "tuple[int, ...]") or value is None:
            continue
        items = (value,) if kind == "int" else value
        if not all(is_integer(v) for v in items):
            what = "an integer" if kind == "int" else "a tuple of integers"
            raise ConfigError(f"{prefix}{f.name} must be {what}; got {value!r}.")


def _defaults(spec: Any) -> dict[str, Any]:
    """The default of each field of the dataclass ``spec`` (``dataclasses.MISSING``: none)."""
    return {f.name: f.default for f in dataclasses.fields(spec)}


def _only_with(
    spec: type, section: str, values: dict[str, Any], keys: tuple[str, ...], when: bool, why: str
) -> None:
    """Raises if any of ``keys`` is set while ``when`` is False (the branch is not taken);
    inside :func:`saved_config`, sets them to None instead (silently where the saved value is
    ``spec``'s default: an earlier version's config spelled its defaults out)."""
    if when:
        return
    stray = [k for k in keys if values.get(k) is not None]
    if _SAVED.get():
        defaults = _defaults(spec)
        values.update({k: None for k in stray if values[k] == defaults[k]})
        stray = [k for k in stray if values[k] is not None]
    if stray and _refuse_stray(section, dict.fromkeys(stray), why):
        values.update(dict.fromkeys(stray))


def only_when(section: str, spec: Any, keys: tuple[str, ...], when: bool, why: str) -> None:
    """Raises if any of ``keys`` of the dataclass ``spec`` differs from its default while
    ``when`` is False (for branch keys whose default is not None); inside
    :func:`saved_config`, sets them to their defaults instead."""
    defaults = _defaults(spec)
    stray = [k for k in keys if as_tuples(getattr(spec, k)) != defaults[k]]
    if stray and not when and _refuse_stray(section, {k: defaults[k] for k in stray}, why):
        for key in stray:
            object.__setattr__(spec, key, defaults[key])  # while the frozen spec is built


_SAVED = contextvars.ContextVar("saved_config", default=False)
# The saved-config warnings given inside the outermost saved_config (None: none given).
_WARNED: contextvars.ContextVar[set[str] | None] = contextvars.ContextVar(
    "saved_config_warned", default=None
)


def import_config_module(key: str, module: str) -> None:
    """Imports ``module``, which the config key ``key`` names (``task.module``, ``model.module``:
    code of one's own that registers a task or a model), for the run and for everything that
    reads it later from its saved config; a module that cannot be imported is one line naming
    both."""
    try:
        importlib.import_module(module)
    except ImportError as e:
        raise ConfigError(
            f"{key} {module!r} cannot be imported ({e}): is its folder on PYTHONPATH?"
        ) from e


def check_registered_again(
    kind: str, name: str, old: type | None, new: type, built_in: Any
) -> None:
    """Registering a ``kind`` (model, family, task) under a ``name`` registered already (as
    ``old``) again, with the class ``new``: allowed when ``new`` is ``old`` defined again (the
    same module and qualified name: a notebook cell run again), refused when ``name`` is one of
    the library's (``built_in``) or ``new`` is another class."""
    if old is None:
        return
    if name in built_in:
        raise ValueError(
            f"{kind} {name!r} is built in (the library's); register yours under another name."
        )
    if (old.__module__, old.__qualname__) != (new.__module__, new.__qualname__):
        raise ValueError(
            f"{kind} {name!r} is already registered ({old.__module__}.{old.__qualname__}; "
            f"registering it again takes that class defined again, not {new.__module__}."
            f"{new.__qualname__})."
        )


def import_own_module(
    section: str, name: str, module: str | None, built_in: Any, registered: Any
) -> str | None:
    """What ``model`` and ``task`` share: ``{section}.module`` names the module that registers
    ``name`` (a model or task of one's own). A module beside a ``built_in`` name (the library's
    own names, recorded once) is refused; it is imported when ``name`` is not ``registered()``
    yet (a script registering it as __main__ has it already). None when ``name`` is registered
    then, else the hint of the unknown-name error saying where to register it."""
    key = f"{section}.module"
    if module and name in built_in and not _SAVED.get():
        raise ConfigError(
            f"{key} {module!r} registers a {section} of your own; {section}.name {name!r} is "
            f"built in (remove {key}, or name the {section} the module registers)."
        )
    if module and name not in registered():
        import_config_module(key, module)
    if name in registered():
        return None
    if module:
        return f"{key} {module!r} does not register it"
    if _SAVED.get():  # a saved run: its config cannot be changed from here
        return "import the module that registers it first: the run's config has no module"
    return f"set {key} to the module that registers a {section} of your own"


def _import_model_module(name: str, module: str | None) -> None:
    """Imports ``model.module`` when ``model.name`` is not registered yet; a name that is still
    unknown is an error saying where to register it."""
    from vision_jax.models import BUILT_IN_MODELS, list_models, model_spec  # (they import this)

    if name is None:  # (_check_set names it)
        return
    hint = import_own_module("model", name, module, BUILT_IN_MODELS, list_models)
    if hint is None:
        return
    try:
        model_spec(name)
    except ValueError as e:
        timm = ": timm's " in str(e)  # (a timm name: the message names the one here)
        raise ConfigError(str(e) if timm else f"{e} {hint[0].upper()}{hint[1:]}.") from None


def reading_saved_config() -> bool:
    """Whether a saved run's config is being read (inside :func:`saved_config`)."""
    return _SAVED.get()


@contextlib.contextmanager
def saved_config(*, warn: bool = True) -> Iterator[None]:
    """Inside, a key set for a branch its run does not take is reset, with a warning, not an
    error: a saved run's config (from a version that accepted the key) still loads for
    predict, export and reports. Each warning is given once inside (a spec rebuilt with
    ``dataclasses.replace`` is checked again); ``warn=False``: none, for a spec of a run that
    was read, and warned of, before (``load_trained``'s ``input`` with another size)."""
    outer = _WARNED.get() if _SAVED.get() else set()
    tokens = _SAVED.set(True), _WARNED.set(outer if warn else None)
    try:
        yield
    finally:
        _WARNED.reset(tokens[1])
        _SAVED.reset(tokens[0])


def saved_config_warning(message: str) -> None:
    """Logs ``message``, a warning of a saved run's config, once inside :func:`saved_config`
    (none with ``warn=False``)."""
    warned = _WARNED.get()
    if warned is not None and message not in warned:
        warned.add(message)
        logger.warning("%s", message)


def _refuse_stray(section: str, stray: dict[str, Any], why: str) -> bool:
    """Raises :class:`ConfigError` naming the ``stray`` keys and the flags that reset them
    (``stray``: key -> the value that does); inside :func:`saved_config`, warns and returns
    True (the caller resets them)."""
    one = len(stray) == 1
    full = {f"{section}.{k}" if section else k: v for k, v in stray.items()}  # "": top level
    names = ", ".join(full)
    message = f"{names} only appl{'ies' if one else 'y'} {why}"
    if not _SAVED.get():  # each flag one shell word: "(0.08,1.0)", not "(0.08, 1.0)"
        undo = " ".join(f"--config.{k}={str(v).replace(' ', '')}" for k, v in full.items())
        raise ConfigError(f"{message}; remove {'it' if one else 'them'} (or pass {undo}).")
    saved_config_warning(
        f"The saved config sets {names}, which only appl{'ies' if one else 'y'} {why}: ignored."
    )
    return True


# The keys of each config section that name a place on disk (data.coco_annotations and
# data.coco_images are relative to data.root, or absolute): a new run records them absolute,
# resolved against the directory it starts in; a saved run of an earlier version that recorded
# them relative reads them against the current directory.
PATH_KEYS = {"data": ("root", "data_dir"), "init": ("path",)}


def absolute_path(path: Any) -> Any:
    """``path`` made absolute against the current directory; None, "" and URLs (``gs://...``)
    as they are."""
    if not isinstance(path, str) or not path or is_url(path):
        return path
    return os.path.abspath(path)


def absolute_paths(config: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of the config dict ``config`` with its :data:`PATH_KEYS` absolute (a section it
    does not hold stays out)."""
    out = dict(config)
    for section, keys in PATH_KEYS.items():
        if isinstance(part := out.get(section), Mapping):
            out[section] = {k: absolute_path(v) if k in keys else v for k, v in part.items()}
    return out


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """``config.data``: where examples come from (see :func:`vision_jax.data.load_source`)."""

    source: str
    name: str | None
    data_dir: str | None
    root: str | None
    class_names: tuple[str, ...] | None
    skip_corrupt: bool
    train_split: str
    eval_split: str
    classes: tuple[int, ...] | None
    label_map_values: tuple[tuple[int, int], ...] | None
    val_split: str | None = None  # evaluated during training; picks the best checkpoint
    coco_annotations: str = "annotations/instances_{split}.json"  # coco only
    coco_images: str = "{split}"  # coco only
    # tfds only: the examples each epoch is shuffled through (other sources: whole epochs)
    shuffle_buffer: int = 10_000


@dataclasses.dataclass(frozen=True)
class InitSpec:
    """``config.init``: pretrained weights and the surgery applied to them.

    ``path``: a vision_jax workdir, .npz (google/big_vision), timm or torchvision
    .safetensors/.pth/.bin/.th, or a Hugging Face ViT folder (see :mod:`vision_jax.weights`).
    ``replace_head``: re-initialise the head even if the class count matches (kernel zeros,
    bias ``head_bias_init``). ``dont_load``: regexes of variables that keep their init values.
    ``posemb``: position-embedding resampling to a new grid, "bilinear" (big_vision's
    corner-aligned ``scipy.ndimage.zoom(order=1)``, not timm's half-pixel bilinear) or
    "bicubic" (None: the weights' convention, :func:`vision_jax.weights.posemb_method`).
    ``use_input_contract``: input mean/std/interpolation from the checkpoint
    (``weights.input_contract``) unless set to non-defaults. ``ema``: of a vision_jax run, its
    EMA parameters (True) or its trained ones (False); None: the ones its model selection
    measured (as ``load_trained``). The others need ``path``.
    """

    path: str | None = None
    replace_head: bool = False
    head_bias_init: float = 0.0
    dont_load: tuple[str, ...] = ()
    posemb: str | None = None
    use_input_contract: bool = False
    ema: bool | None = None

    def __post_init__(self) -> None:
        if self.path is None and self.posemb == "bilinear" and _SAVED.get():
            object.__setattr__(self, "posemb", None)  # an earlier version's default, recorded
        surgery = ("replace_head", "head_bias_init", "dont_load", "posemb", "use_input_contract",
                   "ema")  # fmt: skip
        why = "with init.path, the weights to start from, which is not set (--config.init.path)"
        only_when("init", self, surgery, self.path is not None, why)


@dataclasses.dataclass(frozen=True)
class ScheduleSpec:
    """``config.schedule``: warmup, decay shape, cooldown (see ``optim.schedule_value``)."""

    decay: str
    warmup_steps: int | None = None
    warmup_epochs: float | None = None
    warmup_fraction: float | None = None
    cooldown_steps: int | None = None
    cooldown_epochs: float | None = None
    cooldown_fraction: float | None = None
    rsqrt_timescale: float = 10_000  # rsqrt only
    step_boundaries: tuple[float, ...] = (0.5, 0.75)  # step only: fractions of training
    step_factor: float = 0.1  # step only
    end_factor: float = 0.0  # cosine and linear only: their final value, a fraction of the lr

    def __post_init__(self) -> None:
        if self.decay not in SCHEDULES:
            valid = ", ".join(SCHEDULES)
            raise ConfigError(f"Unknown schedule.decay {self.decay!r}; valid: {valid}.")
        if any(not 0 < b < 1 for b in self.step_boundaries):
            raise ConfigError(
                f"schedule.step_boundaries {self.step_boundaries} must be fractions in (0, 1)."
            )
        check_interval("schedule.rsqrt_timescale", self.rsqrt_timescale, "(0, inf)")
        check_interval("schedule.step_factor", self.step_factor, "(0, inf)")
        check_interval("schedule.end_factor", self.end_factor, "[0, 1]")

    def lengths(self, total_steps: int, steps_per_epoch: int | None) -> tuple[int, int]:
        """The warmup's and the cooldown's steps in training of ``total_steps``, checked
        against it (``steps_per_epoch`` is needed only by lengths in epochs)."""
        warmup = _duration(self, "warmup", total_steps, steps_per_epoch)
        cooldown = _duration(self, "cooldown", total_steps, steps_per_epoch)
        if warmup + cooldown > total_steps:
            raise ConfigError(
                f"Warmup {warmup} + cooldown {cooldown} > {total_steps} training steps."
            )
        return warmup, cooldown


def _duration(spec: ScheduleSpec, name: str, total: int, steps_per_epoch: int | None) -> int:
    """``{name}_steps``, ``{name}_epochs`` or ``{name}_fraction`` (of training) as steps."""
    given = {
        unit: getattr(spec, f"{name}_{unit}")
        for unit in ("steps", "epochs", "fraction")
        if getattr(spec, f"{name}_{unit}") is not None
    }
    if len(given) > 1:
        raise ConfigError(
            f"Set at most one of schedule.{name}_{{steps,epochs,fraction}}: {given} (unset one "
            f"with --config.schedule.{name}_{next(iter(given))}=None)."
        )
    if not given:
        return 0
    unit, value = next(iter(given.items()))
    if unit == "epochs" and steps_per_epoch is None:
        raise ConfigError(f"schedule.{name}_epochs needs the steps per epoch (steps_per_epoch).")
    steps = {
        "steps": lambda v: int(v),
        "epochs": lambda v: math.floor(v * steps_per_epoch + 0.5),  # to the nearest, half up
        "fraction": lambda v: math.floor(v * total + 0.5),
    }[unit](value)
    if value < 0:  # (a negative count of steps needs a negative value)
        raise ConfigError(f"schedule.{name}_{unit}={value} is negative: set 0 or more.")
    if steps > total:
        raise ConfigError(
            f"schedule.{name}_{unit}={value} is {steps} steps; training has {total} (lower it, "
            f"e.g. --config.schedule.{name}_{unit}=..., or train longer)."
        )
    return steps


@dataclasses.dataclass(frozen=True)
class OptimizerSpec:
    """``config.optimizer``: the optax optimizer and which parameters train, how fast."""

    name: str
    learning_rate: float
    weight_decay: float
    grad_clip_norm: float | None
    trainable: str
    decay_params: str | None = None  # None: kernels only
    mu_dtype: str | None = None
    frozen_params: str | None = None
    lr_mults: tuple[tuple[str, float], ...] | None = None
    layer_decay: float | None = None
    b1: float = 0.9  # adamw only
    b2: float = 0.999
    eps: float = 1e-8
    momentum: float = 0.9  # sgd only
    nesterov: bool = False

    def __post_init__(self) -> None:
        if self.name not in OPTIMIZERS:
            raise ConfigError(f"Unknown optimizer.name {self.name!r}; valid: sgd, adamw.")
        for name, interval in (
            ("learning_rate", "(0, inf)"), ("weight_decay", "[0, inf)"),
            ("grad_clip_norm", "[0, inf)"), ("layer_decay", "(0, 1]"), ("b1", "[0, 1)"),
            ("b2", "[0, 1)"), ("eps", "[0, inf)"), ("momentum", "[0, 1)"),
        ):  # fmt: skip
            check_interval(f"optimizer.{name}", getattr(self, name), interval)
        try:
            check_multiplier_rules(self.lr_mults or (), what="optimizer.lr_mults rule")
        except ValueError as e:
            raise ConfigError(str(e)) from None


_DECODED_SOURCES = ("digits", "arrays", "idx")  # no image files: nothing to skip as unreadable


def data_spec(section: Any) -> DataSpec:
    """:class:`DataSpec` of ``config.data``; the coco_* keys only with source 'coco'."""
    values = _section(section, DataSpec)
    # Its characters would be the classes (a saved run's record: as it ran).
    if isinstance(values.get("class_names"), str) and not _SAVED.get():
        raise ConfigError(
            f"data.class_names must be a sequence of names, got the string "
            f"{values['class_names']!r} (a tuple: ('cat', 'dog'))."
        )
    coco_keys = ("coco_annotations", "coco_images")
    is_coco = values["source"] == "coco"
    _only_with(DataSpec, "data", values, coco_keys, is_coco, "to source='coco'")
    if values.get("skip_corrupt") and values["source"] in _DECODED_SOURCES:
        why = f"to sources of image files (source={values['source']!r} holds decoded arrays)"
        _refuse_stray("data", {"skip_corrupt": False}, why)  # a saved run's: warned, ignored
        values["skip_corrupt"] = False
    spec = _build(DataSpec, values, "data")
    check_interval("data.shuffle_buffer", spec.shuffle_buffer, "[1, inf)")
    why = "to source='tfds' (other sources shuffle whole epochs)"
    only_when("data", spec, ("shuffle_buffer",), spec.source == "tfds", why)
    if spec.val_split is not None and spec.val_split in (spec.eval_split, spec.train_split):
        raise ConfigError(
            f"data.val_split {spec.val_split!r} must differ from train_split and eval_split "
            "(select on held-out training data, e.g. train_split='train[:90%]' and "
            "val_split='train[90%:]')."
        )
    return spec


@dataclasses.dataclass(frozen=True)
class EarlyStoppingSpec:
    """``config.early_stopping``: model selection on ``data.val_split`` (the best checkpoint
    is kept and finally evaluated on ``eval_split``), and stopping when it stops improving."""

    metric: str | None = None  # an evaluation key; None: "val/<the task's headline metric>"
    mode: str | None = None  # "max" or "min"; None: "min" for losses, else "max"
    patience: int | None = None  # evaluations without improvement before stopping; None: never
    min_delta: float = 0.0  # an improvement must beat the best by more than this

    @property
    def measures_ema(self) -> bool:
        """Whether the metric is one of the EMA parameters' evaluation (``val_ema/...``)."""
        return self.metric is not None and self.metric.split("/")[0].endswith("_ema")


def early_stopping_spec(section: Any, has_val_split: bool) -> EarlyStoppingSpec:
    """:class:`EarlyStoppingSpec` of ``config.early_stopping``: only with a validation split."""
    values = _section(section, EarlyStoppingSpec)
    if not values.get("min_delta"):
        values["min_delta"] = None  # the default: not a setting that needs a validation split
    _only_with(
        EarlyStoppingSpec, "early_stopping", values, ("metric", "mode", "patience", "min_delta"),
        has_val_split, "with data.val_split (selecting on the test split would overfit it)",
    )  # fmt: skip
    spec = _build(EarlyStoppingSpec, values, "early_stopping")
    if spec.mode not in (None, "max", "min"):
        raise ConfigError(f"early_stopping.mode must be 'max' or 'min', got {spec.mode!r}.")
    if spec.patience is not None and spec.patience < 1:
        raise ConfigError(f"early_stopping.patience must be >= 1, got {spec.patience}.")
    if not _SAVED.get():  # a saved run's record: as it ran
        check_interval("early_stopping.min_delta", spec.min_delta, "[0, inf)")
    return spec


def input_spec(section: Any) -> InputSpec:
    """:class:`~vision_jax.data.InputSpec` of ``config.input`` (unset keys: its defaults)."""
    return _build(InputSpec, _section(section, InputSpec), "input")


def init_spec(section: Any) -> InitSpec:
    """:class:`InitSpec` of ``config.init``."""
    return _build(InitSpec, _section(section, InitSpec), "init")


def schedule_spec(section: Any) -> ScheduleSpec:
    """:class:`ScheduleSpec` of ``config.schedule``; rsqrt / step / end keys only with their
    decays."""
    values = _section(section, ScheduleSpec)
    decay = values["decay"]
    only_with = functools.partial(_only_with, ScheduleSpec, "schedule", values)
    only_with(("rsqrt_timescale",), decay == "rsqrt", "to decay='rsqrt'")
    only_with(("step_boundaries", "step_factor"), decay == "step", "to decay='step'")
    only_with(("end_factor",), decay in ("cosine", "linear"), "to decay='cosine' or 'linear'")
    return _build(ScheduleSpec, values, "schedule")


def optimizer_spec(section: Any) -> OptimizerSpec:
    """:class:`OptimizerSpec` of ``config.optimizer``; b1/b2/eps only with AdamW, momentum and
    nesterov only with SGD, decay_params only with weight decay, layer_decay only when more
    than the head trains."""
    values = _section(section, OptimizerSpec)
    name = values["name"]
    only_with = functools.partial(_only_with, OptimizerSpec, "optimizer", values)
    only_with(("b1", "b2", "eps"), name == "adamw", "to name='adamw'")
    only_with(("momentum", "nesterov"), name == "sgd", "to name='sgd'")
    only_with(("decay_params",), (values.get("weight_decay") or 0) > 0, "with weight_decay > 0")
    only_with(("layer_decay",), values.get("trainable") not in ("head", "last:0"),
              "when more than the head trains (the head is the last group: its rate is the "
              "learning rate)")  # fmt: skip
    return _build(OptimizerSpec, values, "optimizer")


def lora_spec(section: Any) -> LoraSpec | None:
    """:class:`~vision_jax.lora.LoraSpec` of ``config.lora``; None when ``rank == 0`` (then the
    other LoRA keys must be unset)."""
    values = _section(section, LoraSpec)
    rank = values.pop("rank")
    if rank == 0:
        _only_with(LoraSpec, "lora", values, tuple(values), False, "with rank > 0")
        return None
    alpha = values.pop("alpha")
    if alpha is not None and alpha <= 0:
        raise ConfigError(
            f"lora.alpha must be > 0 (the adapters' scale is alpha / rank), got {alpha}."
        )
    alpha = rank if alpha is None else alpha  # as given, for _build's check of its type
    spec = _build(LoraSpec, {**values, "rank": rank, "alpha": alpha}, "lora")
    return dataclasses.replace(spec, alpha=float(spec.alpha))


def section_defaults(spec: type) -> dict[str, Any]:
    """``{field: default}`` of a spec dataclass, for ``default_config`` (``None`` defaults as
    typed placeholders, so that they can be set from the command line)."""
    from ml_collections.config_dict import placeholder

    kinds = {"bool": bool, "int": int, "float": float, "str": str}
    out = {}
    for field in dataclasses.fields(spec):
        if field.default is dataclasses.MISSING:
            continue
        if field.default is None:
            name = str(field.type).split("|")[0].strip().split("[")[0]
            kind = kinds.get(name, tuple)
            out[field.name] = placeholder(kind)
        else:
            out[field.name] = field.default
    return out


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """Everything a run reads from its config, typed; built once by :func:`run_spec`."""

    task: Any  # a vision_jax.tasks.Task
    data: DataSpec
    input: InputSpec
    init: InitSpec
    optimizer: OptimizerSpec
    schedule: ScheduleSpec
    lora: LoraSpec | None
    early_stopping: EarlyStoppingSpec
    model_name: str
    model_dtype: str
    model_overrides: dict[str, Any]
    model_module: str | None  # the module that registers a model of one's own
    mesh: str
    sharding_rules: tuple
    fsdp_min_size: int
    seed: int
    batch_size: int
    eval_batch_size: int
    total_steps: int | None
    total_epochs: float | None
    grad_accum_steps: int
    ema_decay: float | None
    ema_warmup: bool  # timm's ModelEmaV3 warmup (vision_jax.steps.ema_step_size)
    log_every_steps: int
    eval_every_steps: int  # 0 = only at the end
    eval_before_training: bool
    checkpoint_every_steps: int
    keep_checkpoints: int
    on_nonfinite: str  # "stop" or "skip" (see vision_jax.steps: the non-finite guard)
    max_consecutive_skips: int
    resume_changed_data: bool  # resume although the data stream cannot continue exactly
    config: dict[str, Any]  # the whole config as plain data, for the run's records

    def steps(self, steps_per_epoch: int) -> int:
        """Training steps: ``total_steps``, or ``total_epochs`` of ``steps_per_epoch``."""
        return training_steps(self.total_steps, self.total_epochs, steps_per_epoch)


def training_steps(
    total_steps: int | None, total_epochs: float | None, steps_per_epoch: int
) -> int:
    """``total_steps``, or ``total_epochs`` of ``steps_per_epoch`` (exactly one is set)."""
    if total_steps is None and total_epochs is None:
        raise ConfigError("Set total_steps or total_epochs.")
    if total_steps is not None and total_epochs is not None:
        raise ConfigError(
            f"Set exactly one of total_steps ({total_steps}) and total_epochs ({total_epochs}): "
            "unset the other, e.g. --config.total_epochs=None."
        )
    if total_steps is not None:
        total = int(total_steps)
    else:
        total = math.ceil(total_epochs * steps_per_epoch)
    if total <= 0:
        raise ConfigError(f"Training must last at least one step, got {total}.")
    return total


def _refuse_unread_top_level(spec: RunSpec) -> None:
    """Raises when max_consecutive_skips differs from its default without on_nonfinite='skip';
    warns when fsdp_min_size, or sharding rules that only say 'fsdp' or 'replicated', differ
    from theirs on a mesh without an fsdp axis (read by nothing: every parameter is replicated;
    a warning, not an error: a config file written for FSDP also runs on other meshes)."""
    from vision_jax.config import default_config

    defaults = default_config()

    def changed(*keys: str) -> dict[str, Any]:
        return {k: defaults[k] for k in keys if as_tuples(getattr(spec, k)) != defaults[k]}

    if spec.on_nonfinite != "skip" and (stray := changed("max_consecutive_skips")):
        _refuse_stray("", stray, "with on_nonfinite='skip'")
    if _SAVED.get() or "fsdp" in {p.partition(":")[0].strip() for p in spec.mesh.split(",")}:
        return  # a saved run's record: its mesh is not used again as it was
    only_fsdp = all(value in ("fsdp", "replicated") for _, value in spec.sharding_rules)
    if stray := changed("fsdp_min_size", *(("sharding_rules",) if only_fsdp else ())):
        logger.warning("%s: no effect on mesh %r (no fsdp axis: every parameter is replicated).",
                       ", ".join(stray), spec.mesh)  # fmt: skip


_CONFIG_KEYS = {
    "model_name": "model.name",
    "model_dtype": "model.dtype",
    "model_module": "model.module",
}


def _check_set(spec: RunSpec) -> None:
    """Raises naming the first top-level key that is None where RunSpec takes no None (a
    required key unset with ``--config.<key>=None``; the sections' keys: :func:`_build`)."""
    for f in dataclasses.fields(spec):
        if _lacks_value(f, getattr(spec, f.name)):
            raise ConfigError(f"{_CONFIG_KEYS.get(f.name, f.name)} needs a value: it is None.")


def run_spec(config: Any) -> RunSpec:
    """The :class:`RunSpec` of a whole config (a ``TrackedConfig``, so that every key is read
    here and the caller can check that none is left over)."""
    from vision_jax.tasks import create_task

    model = {k: config.model[k] for k in config.model}
    model_module = model.pop("module", None)  # (a dict config may leave it out)
    _import_model_module(model["name"], model_module)
    scalars = {
        k: config[k]
        for k in (
            "mesh", "fsdp_min_size", "seed", "batch_size", "eval_batch_size", "total_steps",
            "total_epochs", "grad_accum_steps", "ema_decay", "ema_warmup", "log_every_steps",
            "eval_every_steps", "eval_before_training", "checkpoint_every_steps",
            "keep_checkpoints", "on_nonfinite", "max_consecutive_skips",
        )
    }  # fmt: skip
    scalars["resume_changed_data"] = bool(config.resume_changed_data)
    data, init, recorded = data_spec(config.data), init_spec(config.init), config.to_dict()
    if not _SAVED.get():  # recorded absolute: predict, evaluate, report run from anywhere
        recorded = absolute_paths(recorded)
        data = dataclasses.replace(data, **{k: recorded["data"][k] for k in PATH_KEYS["data"]})
        init = dataclasses.replace(init, **{k: recorded["init"][k] for k in PATH_KEYS["init"]})
    spec = RunSpec(
        task=create_task(config),
        data=data,
        input=input_spec(config.input),
        init=init,
        optimizer=optimizer_spec(config.optimizer),
        schedule=schedule_spec(config.schedule),
        lora=lora_spec(config.lora),
        early_stopping=early_stopping_spec(config.early_stopping, data.val_split is not None),
        model_name=model.pop("name"),
        model_dtype=model.pop("dtype"),
        model_overrides={k: as_tuples(v) for k, v in model.items() if v is not None},
        model_module=model_module,
        sharding_rules=tuple(config.sharding_rules),
        config=recorded,
        **scalars,
    )
    if not _SAVED.get():  # a saved run's record: as it ran
        _check_set(spec)
        _check_numbers(spec, "")
    for name, interval in (
        ("ema_decay", "[0, 1)"), ("log_every_steps", "[1, inf)"), ("eval_every_steps", "[0, inf)"),
        ("checkpoint_every_steps", "[0, inf)"), ("batch_size", "[1, inf)"),
        ("eval_batch_size", "[1, inf)"), ("fsdp_min_size", "[0, inf)"),
        ("grad_accum_steps", "[1, inf)"),
    ):  # fmt: skip
        check_interval(name, getattr(spec, name), interval)
    if not _SAVED.get():  # the length's keys, before any data is read
        training_steps(spec.total_steps, spec.total_epochs, steps_per_epoch=1)
        schedule = spec.schedule  # its lengths too, unless in epochs (they need the data)
        in_epochs = schedule.warmup_epochs is not None or schedule.cooldown_epochs is not None
        if spec.total_steps is not None and not in_epochs:
            schedule.lengths(int(spec.total_steps), steps_per_epoch=None)
    if spec.on_nonfinite not in NONFINITE_POLICIES:
        raise ConfigError(f"Unknown on_nonfinite {spec.on_nonfinite!r}; valid: stop, skip.")
    if spec.max_consecutive_skips < 1:
        raise ConfigError(f"max_consecutive_skips must be >= 1, got {spec.max_consecutive_skips}.")
    _refuse_unread_top_level(spec)
    if spec.keep_checkpoints < 1:
        raise ConfigError(
            f"keep_checkpoints must be >= 1 (got {spec.keep_checkpoints}): with none kept the "
            "trained model would be deleted."
        )
    if spec.ema_warmup and spec.ema_decay is None:
        raise ConfigError("ema_warmup warms up the EMA of the parameters: set ema_decay too.")
    if spec.early_stopping.measures_ema and spec.ema_decay is None:
        raise ConfigError(
            f"early_stopping.metric {spec.early_stopping.metric!r} measures the EMA parameters: "
            "set ema_decay (e.g. 0.999) to keep them."
        )
    mixing = [f"input.{k}" for k in ("mixup_alpha", "cutmix_alpha") if getattr(spec.input, k)]
    if mixing and not spec.task.reads_soft_label and not _SAVED.get():
        raise ConfigError(
            f"{', '.join(mixing)}: the task {spec.task.name!r} does not read the mixed labels "
            "(batch['soft_label']) that mixup and cutmix make: its images would be mixed and "
            "its targets not; turn them off (a task of one's own whose train_loss reads "
            "soft_label declares reads_soft_label = True)."
        )
    if spec.lora is not None and spec.optimizer.trainable != "all":
        raise ConfigError(
            f"optimizer.trainable={spec.optimizer.trainable!r} and lora.rank > 0 both choose "
            "what trains: with LoRA the base model is frozen; use lora.train_head for the head."
        )
    return spec
