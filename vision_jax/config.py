"""Config access that records which keys were read, so that keys nothing reads are errors.

A run reads its ``ml_collections.ConfigDict`` only through :class:`TrackedConfig`. After setup,
:meth:`TrackedConfig.check_all_read` raises on any key that was set (not None) but never read:
a typo'd or dead key fails loudly instead of silently doing nothing. ``None`` means "not set"
and may stay unread.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import ml_collections
from ml_collections.config_dict import FieldReference, placeholder

from vision_jax import specs

# A key's type in words, for a value of another type (from a config file or the command line)
TYPE_WORDS = {int: "an integer", float: "a number", bool: "True or False", str: "a string"}


def wrong_type(key: str, kind: type, value: str, write: str) -> str:
    """One line for a value of another type than ``kind`` (one of :data:`TYPE_WORDS`) for
    ``config.<key>``: what the key takes, the value and, for a whole number (60.0, 1e3) given to
    an integer key, how to write it: ``write`` with ``{key}`` and ``{value}``, as the place where
    it was given spells it."""
    try:
        whole = float(value) if kind is int else math.nan
    except ValueError:
        whole = math.nan
    written = math.isfinite(whole) and whole.is_integer()
    hint = f" ({write.format(key=key, value=int(whole))})" if written else ""
    return f"config.{key} must be {TYPE_WORDS[kind]}; got {value}{hint}."


class NumberConfigDict(ml_collections.ConfigDict):
    """A ConfigDict whose number keys refuse a bool: ml_collections casts ``True`` to ``1.0``
    for a float key (``c.input.random_erasing = True`` read as probability 1) and keeps it for
    an int key. The error names the key from the config's root (a section assigned to another
    section takes its name). A value ml_collections cannot cast (``c.total_steps = 60.0``) is
    :func:`wrong_type`'s line, as on the command line, not ml_collections' own."""

    def __setitem__(self, key: str, value: Any) -> None:
        field = self._fields.get(key)
        kind = field.get_type() if isinstance(field, FieldReference) else type(field)
        path = self.__dict__.get("_path", "")
        if isinstance(value, bool) and kind in (int, float):
            raise TypeError(
                f"Could not override field '{path}{key}': {value} is a bool, and the key takes "
                f"{TYPE_WORDS[kind]}."
            )
        if (isinstance(field, NumberConfigDict) and isinstance(value, ml_collections.ConfigDict)
                and not isinstance(value, NumberConfigDict)):  # fmt: skip
            # ``c.model = ml_collections.ConfigDict()`` (big_vision's habit) replaces a section
            value = NumberConfigDict(value)
        try:
            super().__setitem__(key, value)
        except TypeError:
            if kind not in TYPE_WORDS:
                raise
            write = "config.{key} = {value}"
            raise TypeError(wrong_type(f"{path}{key}", kind, repr(value), write)) from None
        stored = self._fields.get(key)  # a dict given is stored as a section of its own
        if isinstance(stored, NumberConfigDict):
            object.__setattr__(stored, "_path", f"{path}{key}.")


def default_config() -> ml_collections.ConfigDict:
    """Defaults for every run; config files start from this and override fields.

    Every key is read by the run; None means "unset" (``placeholder(type)`` keeps such keys
    overridable from the command line). A key that nothing reads is an error.
    """
    c = NumberConfigDict()
    c.seed = 0
    c.mesh = "data:-1"  # named mesh axes: "data:-1", "data:2,fsdp:4" (-1 = the rest)
    # (regex over param paths, "fsdp" | "replicated" | spec like (None, "model")); first match wins
    c.sharding_rules = ((".*", "fsdp"),)
    c.fsdp_min_size = 2**18  # "fsdp" splits only params with at least this many elements

    # What the model is trained for (vision_jax.tasks): "classification", "segmentation" or
    # "detection".
    # The other keys are the task's own (None: the task's default); setting one that the
    # task does not use is an error.
    c.task = NumberConfigDict()
    c.task.name = "classification"
    # a task of one's own: the module that registers it (vision_jax.tasks.register_task)
    c.task.module = placeholder(str)
    c.task.head = placeholder(str)  # segmentation: "linear" (default) or "fpn" (a decoder)
    c.task.decoder_width = placeholder(int)  # segmentation "fpn": channels (default 64)
    c.task.feature_taps = placeholder(tuple)  # backbone taps (default: last ViT block / stages)
    c.task.class_weights = placeholder(tuple)  # segmentation: one loss weight per class
    # Detection (FCOS): pyramid strides (default (8, 16, 32, 64)), convolutions per head tower
    # (2), ground-truth boxes per image (32), centre sampling radius in strides (1.5), focal
    # loss alpha / gamma (0.25 / 2), post-processing score threshold (0.05), NMS IoU (0.6),
    # candidates before NMS (1000) and detections per image (100).
    c.task.strides = placeholder(tuple)
    c.task.head_convs = placeholder(int)
    c.task.max_boxes = placeholder(int)
    c.task.center_radius = placeholder(float)
    c.task.focal_alpha = placeholder(float)
    c.task.focal_gamma = placeholder(float)
    c.task.score_threshold = placeholder(float)
    c.task.nms_iou = placeholder(float)
    c.task.pre_nms_topk = placeholder(int)
    c.task.max_detections = placeholder(int)

    c.model = NumberConfigDict()
    c.model.name = "vit_ti16"
    c.model.dtype = "float32"  # compute dtype; params stay float32
    # a model of one's own: the module that registers it (vision_jax.models.registry's
    # register_family / register_model), imported by the run and by every reader of it
    c.model.module = placeholder(str)
    # activation checkpointing of each block: "none", "block" (recompute all) or "dots" (keep
    # matmul/conv outputs), for models whose activations do not fit (vision_jax.models.remat)
    c.model.remat = "none"
    # per block: ((regex, policy), ...) matched against block paths, as in parameter paths
    # ("Transformer/encoderblock_3", "layer2/0", "block3/unit01"); first match wins, else remat
    c.model.remat_rules = ()
    # ResNets: BatchNorm with frozen running statistics in training too (torchvision's
    # FrozenBatchNorm2d, for small per-device batches, e.g. detection); None: models' default
    c.model.frozen_bn_stats = placeholder(bool)

    # Pretrained weights (path) and their surgery (vision_jax.specs.InitSpec: the fields, their
    # defaults and meaning: replace_head, head_bias_init, dont_load, posemb, use_input_contract).
    c.init = NumberConfigDict(specs.section_defaults(specs.InitSpec))

    c.data = NumberConfigDict()
    # "tfds", "imagefolder", "csv", "idx", "digits", "arrays" or "coco" (detection)
    c.data.source = "tfds"
    c.data.name = placeholder(str)  # tfds name
    c.data.data_dir = placeholder(str)
    # imagefolder: root/<split>/<class>/<image>; csv: root/<split>.csv; idx: root/train-*-ubyte.gz
    c.data.root = placeholder(str)
    # class names of csv/idx/arrays labels, tfds integer labels and label maps
    c.data.class_names = placeholder(tuple)
    c.data.skip_corrupt = False  # skip (and count) unreadable images instead of failing
    # tfds: the examples each epoch is shuffled through (other sources shuffle whole epochs)
    c.data.shuffle_buffer = 10_000
    c.data.train_split = "train"
    c.data.eval_split = "test"
    # Evaluated every eval_every_steps instead of eval_split, to keep the best checkpoint (and
    # stop early); eval_split is evaluated once at the end, with the best checkpoint. Every
    # source takes sliced splits: train_split="train[:90%]", val_split="train[90%:]".
    c.data.val_split = placeholder(str)
    c.data.classes = placeholder(tuple)  # keep only these class ids of train's (relabelled 0..k-1)
    # segmentation tfds: ((raw mask value, class id), ...), e.g. oxford_iiit_pet's trimap
    c.data.label_map_values = placeholder(tuple)
    # coco only, relative to root ("{split}" = the split's name); None: the COCO layout,
    # "annotations/instances_{split}.json" and images in "{split}" (scenes: "{split}/images")
    c.data.coco_annotations = placeholder(str)
    c.data.coco_images = placeholder(str)

    # How images enter the model (vision_jax.specs.InputSpec: its fields and defaults, e.g.
    # resize_size, crop_fraction, inception_crop, randaugment_layers, mixup_alpha, scale_jitter),
    # with the default training recipe's random crop and flip.
    c.input = NumberConfigDict(specs.section_defaults(specs.InputSpec))
    c.input.image_size = 224
    c.input.random_crop = True  # train: random crop of the resized image (else centre crop)
    c.input.flip = True

    c.batch_size = 64
    c.eval_batch_size = 64  # global, for validation and the final evaluation
    c.total_steps = placeholder(int)
    # An epoch is floor(examples / batch_size) steps, as timm's and the flax ImageNet example's
    # (big_vision counts examples / batch_size); the stream itself drops nothing: a batch may
    # hold the end of one shuffle and the start of the next. total_epochs and *_epochs round up
    # and to the nearest step.
    c.total_epochs = 10.0

    # The task's loss (None: its default): classification "softmax_xent" (default) or
    # "sigmoid_xent"; segmentation "softmax_xent"; detection "focal_giou".
    c.loss = placeholder(str)
    c.label_smoothing = placeholder(float)  # classification, segmentation (default 0)

    c.optimizer = NumberConfigDict()
    c.optimizer.name = "adamw"  # or "sgd"
    c.optimizer.learning_rate = 1e-3
    # adamw: decoupled (each step subtracts lr_t * weight_decay * param; big_vision's wd =
    # lr * this). sgd: L2, added to the gradient before momentum (torch.optim.SGD's, timm's).
    # lr_mults and layer_decay scale the decay with the update (timm's and BEiT's param groups).
    c.optimizer.weight_decay = 1e-4
    c.optimizer.decay_params = placeholder(str)  # regex of decayed params; None = kernels only
    c.optimizer.grad_clip_norm = 1.0  # global-norm clipping; None/0 = off
    # adamw only (None: vision_jax.specs.OptimizerSpec's 0.9, 0.999, 1e-8)
    c.optimizer.b1 = placeholder(float)
    c.optimizer.b2 = placeholder(float)
    c.optimizer.eps = placeholder(float)
    # sgd only (None: momentum 0.9, no nesterov)
    c.optimizer.momentum = placeholder(float)
    c.optimizer.nesterov = placeholder(bool)
    c.optimizer.mu_dtype = placeholder(str)  # "bfloat16": first moments / momentum in bf16
    # What trains: "all", "head" (linear probe), "last:N" (head + last N blocks), "bitfit"
    # (biases + norms + head); frozen params get no gradient, update or optimizer state.
    c.optimizer.trainable = "all"
    c.optimizer.frozen_params = placeholder(str)  # regex of params to freeze as well
    c.optimizer.lr_mults = placeholder(tuple)  # ((regex, multiplier), ...), first match wins
    c.optimizer.layer_decay = placeholder(float)  # lr * decay**(last group - group)

    c.schedule = NumberConfigDict()
    c.schedule.decay = "cosine"  # "cosine", "linear", "constant", "rsqrt" or "step"
    c.schedule.warmup_steps = placeholder(int)  # at most one of steps / epochs / fraction
    c.schedule.warmup_epochs = placeholder(float)
    c.schedule.warmup_fraction = placeholder(float)
    c.schedule.cooldown_steps = placeholder(int)  # linear cooldown to 0 at the end
    c.schedule.cooldown_epochs = placeholder(float)
    c.schedule.cooldown_fraction = placeholder(float)
    # rsqrt only: lr / sqrt(1 + t / timescale) (None: 10_000)
    c.schedule.rsqrt_timescale = placeholder(float)
    # step only: fractions of training where lr drops (None: (0.5, 0.75)), and by how much (0.1)
    c.schedule.step_boundaries = placeholder(tuple)
    c.schedule.step_factor = placeholder(float)
    # cosine / linear only: where the decay ends, a fraction of the learning rate (None: 0;
    # timm's min_lr / lr, big_vision's linear_end)
    c.schedule.end_factor = placeholder(float)

    c.lora = NumberConfigDict()
    c.lora.rank = 0  # > 0: train low-rank adapters (and the head) instead of the model
    # With rank > 0 (None: the defaults of vision_jax.specs.LoraSpec):
    c.lora.alpha = placeholder(float)  # None = rank (scale 1)
    c.lora.dropout = placeholder(float)  # None = 0
    c.lora.targets = placeholder(str)  # None = ViT query and value kernels
    c.lora.train_head = placeholder(bool)  # None = True

    # Model selection on data.val_split (vision_jax.specs.EarlyStoppingSpec): the metric (default
    # "val/<task headline>", e.g. val/top1), "max"/"min", evaluations without an improvement
    # larger than min_delta before stopping (None: train to the end, still keeping the best).
    c.early_stopping = NumberConfigDict(specs.section_defaults(specs.EarlyStoppingSpec))

    c.grad_accum_steps = 1  # micro-batches per step (batch_size must divide)
    c.ema_decay = placeholder(float)  # EMA of the params and BatchNorm stats (e.g. 0.999)
    c.ema_warmup = False  # timm's EMA warmup: decay 1 - (1 + step) ** (-2/3), up to ema_decay

    c.log_every_steps = 50
    c.eval_every_steps = 500  # 0 = only at the end
    c.eval_before_training = False  # also evaluate the starting weights (before fine-tuning)
    c.checkpoint_every_steps = 500
    c.keep_checkpoints = 3  # >= 1; the step that ends a run is kept as well
    # Resume although batch_size, seed or the training data changed (the stream then cannot
    # continue exactly where it stopped); False: such a resume is an error naming the change.
    c.resume_changed_data = False
    # A step whose loss or gradients are not finite is never applied (nor saved). "stop": stop
    # with an error naming it and the newest checkpoint; "skip": skip it, count it
    # (train/skipped_steps) and stop only after max_consecutive_skips in a row. Checked at each
    # log_every_steps and before each save (no host sync per step).
    c.on_nonfinite = "stop"
    c.max_consecutive_skips = 10
    return c


def saved_with_defaults(saved: Mapping[str, Any]) -> ml_collections.ConfigDict:
    """A saved run's config over :func:`default_config`: keys an earlier version did not have
    take today's defaults; the saved keys are kept, those the defaults lack too (model
    overrides such as ``model.depth``)."""

    def merge(default: dict, given: Any) -> dict:
        out = dict(default)
        for key, value in given.items():
            both = isinstance(default.get(key), dict) and is_section(value)
            out[key] = merge(default[key], value) if both else value
        return out

    return ml_collections.ConfigDict(merge(default_config().to_dict(), saved))


def is_section(value: Any) -> bool:
    return isinstance(value, (Mapping, ml_collections.ConfigDict))


class UnreadConfigKeysError(ValueError):
    """The config holds keys that nothing in the run reads."""


_SHORT_NAME = 4  # a name this short is a few edits from any: closest's looser cutoff


def closest(name: str, candidates: Iterable[str], prefix: str = "") -> str:
    """``" (closest: a, b, c)"``: the (at most three) ``candidates`` close to ``name``
    (difflib's cutoff), or for a short name (:data:`_SHORT_NAME` characters at most: ``lrr``)
    when none is, those somewhat like it; none alike, nothing."""
    candidates = sorted(set(candidates))
    close = difflib.get_close_matches(name, candidates, n=3)
    if not close and len(name) <= _SHORT_NAME:
        close = difflib.get_close_matches(name, candidates, n=3, cutoff=0.25)
    return f" (closest: {', '.join(prefix + k for k in close)})" if close else ""


# The config is locked on the command line: a model override (a create_model argument, which
# run_spec passes on from every other model.* key) is added in the config file first.
_MODEL_OVERRIDE_HINT = (
    " Model overrides (create_model arguments such as drop_path_rate, dropout_rate, pool_type)"
    " are added in the config file (c.model.{name} = ...); the command line can then override"
    " them (--config.model.{name}=...)."
)


def unknown_key(config: Mapping[str, Any], key: str) -> str | None:
    """None if the dotted ``key`` is in ``config``; else one line naming it and the closest
    keys of the section where it goes wrong (under ``model.``, how to add a model override)."""
    node, parts = config, key.split(".")
    for i, part in enumerate(parts):
        prefix = "".join(p + "." for p in parts[:i])
        if not is_section(node):
            return f"Unknown config key '{key}': '{prefix[:-1]}' is a value, not a section."
        if part not in node:
            elsewhere = [k for k, _ in _leaves(config) if k.rsplit(".", 1)[-1] == parts[-1]]
            if elsewhere:  # where the key went, alone: not the keys here alike in name
                return f"Unknown config key '{key}': {' or '.join(elsewhere)} has that name."
            hint = _MODEL_OVERRIDE_HINT.format(name=part) if prefix == "model." else ""
            return f"Unknown config key '{key}'{closest(part, node, prefix)}.{hint}"
        node = node[part]
    return None


def _leaves(node: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """``(dotted key, value)`` of every leaf of ``node`` (an empty section is a leaf)."""
    for key, value in node.items():
        if is_section(value) and len(value):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield prefix + key, value


class TrackedConfig:
    """Read-only view of a ConfigDict that remembers every key read."""

    def __init__(self, config: Mapping[str, Any], prefix: str = "", reads: set | None = None):
        object.__setattr__(self, "_config", config)
        object.__setattr__(self, "_prefix", prefix)
        object.__setattr__(self, "_reads", set() if reads is None else reads)

    def _wrap(self, key: str, value: Any) -> Any:
        self._reads.add(self._prefix + key)
        if is_section(value):
            return TrackedConfig(value, f"{self._prefix}{key}.", self._reads)
        return value

    def __getattr__(self, key: str) -> Any:
        if key.startswith("__"):
            raise AttributeError(key)
        if key not in self._config:
            raise AttributeError(
                f"Config has no key '{self._prefix}{key}'"
                f"{closest(key, self._config, self._prefix)}: a config starts from "
                "vision_jax.config.default_config() (a dict: its to_dict() with your changes)."
            )
        return self._wrap(key, self._config[key])

    def __getitem__(self, key: str) -> Any:
        return self.__getattr__(key)

    def __setattr__(self, key: str, value: Any) -> None:
        raise TypeError("TrackedConfig is read-only.")

    def __contains__(self, key: str) -> bool:
        return key in self._config

    def __iter__(self) -> Iterator[str]:
        return iter(self._config)

    def get(self, key: str, default: Any = None) -> Any:
        """Like ``dict.get``; marks the key read when present."""
        return self.__getattr__(key) if key in self._config else default

    def items(self) -> Iterator[tuple[str, Any]]:
        """Reads every key of this section (e.g. to pass them on as keyword arguments)."""
        for key in self._config:
            yield key, self.__getattr__(key)

    def to_dict(self) -> dict[str, Any]:
        """A plain-dict copy of this section (does not mark keys read)."""
        config = self._config
        if isinstance(config, ml_collections.ConfigDict):
            return config.to_dict()
        return {k: (v.to_dict() if hasattr(v, "to_dict") else v) for k, v in config.items()}

    def unread(self) -> list[str]:
        """Set (non-None) leaf keys that were never read."""
        return sorted(
            key
            for key, value in _leaves(self._config, self._prefix)
            if value is not None and key not in self._reads
        )

    def _closest_read(self, key: str) -> str:
        """:func:`closest` among the leaf keys read in ``key``'s section."""
        reads, section, _, name = self._reads, *key.rpartition(".")
        prefix = section + "." if section else ""
        leaves = [k for k in reads if not any(r.startswith(k + ".") for r in reads)]
        names = [k[len(prefix) :] for k in leaves if k.startswith(prefix)]
        if section == "task":  # the task's own keys, the unset ones too (never read)
            names += self._task_fields()
        return closest(name, [k for k in names if "." not in k], prefix)

    def _task_fields(self) -> list[str]:
        """The ``task.*`` keys this run's task reads."""
        from vision_jax.tasks import TASKS  # the tasks import this module
        from vision_jax.tasks.base import TOP_LEVEL

        task = TASKS.get(self._config.get("task", {}).get("name"))
        fields = dataclasses.fields(task) if task is not None else ()
        return [f.name for f in fields if f.name not in TOP_LEVEL]

    def _other_tasks(self, key: str) -> str:
        """For a ``task.*`` key: the tasks that read it (it belongs to another task's runs)."""
        from vision_jax.tasks import TASKS  # the tasks import this module

        section, _, name = key.rpartition(".")
        readers = [t for t, cls in TASKS.items()
                   if any(f.name == name for f in dataclasses.fields(cls))]  # fmt: skip
        if section != "task" or not readers:
            return ""
        this = self._config.get("task", {}).get("name")
        return f" (read by {' and '.join(readers)} runs; this run's task.name is {this!r})"

    def check_all_read(self) -> None:
        """Raises :class:`UnreadConfigKeysError` if any set key was never read."""
        unread = self.unread()
        if unread:
            named = [key + (self._other_tasks(key) or self._closest_read(key)) for key in unread]
            raise UnreadConfigKeysError(
                "Config keys that nothing reads (remove them, set them to None, or fix a typo): "
                + ", ".join(named)
            )

    def __repr__(self) -> str:
        return f"TrackedConfig({self._prefix or '<root>'}: {dict(self._config)!r})"
