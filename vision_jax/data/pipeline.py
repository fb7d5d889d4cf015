"""Batching a :class:`Source` into host-local numpy batches for training and evaluation.

Each process reads its own ``process_index`` shard and batches ``global_batch / process_count``
examples. The training stream is infinite and a function of the seed: for random-access
sources (arrays, image files), of the seed alone: position ``p`` of a host's stream is example
``shuffle_epoch(p // n)[p % n]`` (a stateless index shuffle per epoch), so ``start_step`` resumes
it exactly at no cost; tfds sources shuffle each epoch anew through a buffer seeded by (seed,
epoch), and a resume reads only its epoch's examples before it; their order depends also on
TensorFlow's global seed, which tf.data's shuffle mixes in (``tf.random.set_seed`` in a notebook
changes it; the command line never sets it). Evaluation batches are padded
(with ``mask == 0``) so every example counts once and all processes run the same number of
batches. With ``source.skip_corrupt`` unreadable images (and label maps that are unreadable,
or do not fit their image or the classes) are dropped and counted (later batches then start
further along the stream: see ``start_position``); otherwise they are an error naming the file.
Segmentation sources (``source.target == "label_map"``) give ``label_map`` in place of ``label``;
detection sources (``"boxes"``) give boxes padded to ``max_boxes`` rows (see
:func:`train_batches`); sources of a target of one's own (a column, ``source.column_spec``) give
that column's values unchanged in place of ``label``.
"""

from __future__ import annotations

import atexit
import logging
import math
import os
import re
import sys
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence

from vision_jax.tf_without_keras import tf

import jax
import numpy as np

from vision_jax.data import augment, boxes, exif
from vision_jax.data.coco import size_problem
from vision_jax.data.preprocess import InputSpec, make_preprocess, raw_label_map
from vision_jax.data.sources import IGNORE_LABEL, DataError, Source, gather_rows

logger = logging.getLogger(__name__)

Batch = dict[str, np.ndarray]


def parallel_map(ds: tf.data.Dataset, fn: Callable) -> tf.data.Dataset:
    """``ds.map(fn)`` on tf.data's threads, in order, with ``fn`` traced as written: AutoGraph
    does not rewrite it (the preprocessing writes its control flow with ``tf.cond``), which
    takes a second or more off building each pipeline."""
    fn = tf.autograph.experimental.do_not_convert(fn)
    return ds.map(fn, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def _local_batch(global_batch: int) -> int:
    if global_batch % jax.process_count():
        raise DataError(
            f"batch_size {global_batch} is not divisible by the {jax.process_count()} processes."
        )
    return global_batch // jax.process_count()


def pipeline_options(threads: int | None = None) -> tf.data.Options:
    """Deterministic tf.data options with a private pool of ``threads`` (default: the cores this
    process may use), one thread per op."""
    options = tf.data.Options()
    options.deterministic = True
    options.threading.private_threadpool_size = threads or len(os.sched_getaffinity(0))
    options.threading.max_intra_op_parallelism = 1
    return options


_MIX_STREAM = 1  # folded into a step's mixing seed: examples use (host seed, position) as is


def _host_share(num_examples: int) -> int:
    """How many of a split's ``num_examples`` this process reads: rows ``process_index``,
    ``process_index + process_count``, ..."""
    return len(range(jax.process_index(), num_examples, jax.process_count()))


def _example_index(position: tf.Tensor, num_local: int, seed: int) -> tf.Tensor:
    """Row of the source at a host's stream ``position``: a fresh permutation of the host's
    rows (``process_index + k * process_count``) every epoch, seeded by (seed, epoch, host)."""
    host, hosts = jax.process_index(), jax.process_count()
    epoch, offset = position // num_local, position % num_local
    local = tf.raw_ops.RandomIndexShuffle(
        index=offset,
        seed=tf.stack([tf.constant(seed, tf.int64), epoch, tf.constant(host, tf.int64)]),
        max_index=tf.constant(num_local - 1, tf.int64),
    )
    return host + local * hosts


# The example order of the stream of a source read in order (tfds), recorded in checkpoints
# (``stream_order``): a checkpoint's positions name the same examples only under the same order.
# 2: each epoch shuffled anew (:func:`_streaming_order`); before it, a shuffle buffer over the
# repeated shard, the same order every epoch near enough.
STREAM_ORDER = 2


def _streaming_order(source: Source, first: int, seed: int, buffer: int) -> tf.data.Dataset:
    """(position, example) pairs of this host's stream of a source read in order (tfds) from
    stream position ``first``: epoch ``e`` (positions ``e * n`` to ``(e + 1) * n - 1``, ``n``
    examples in the host's shard) is the shard shuffled through a buffer of ``buffer`` examples
    seeded by (``seed``, ``e``), a fresh order each epoch. A stream from ``first`` starts at its
    epoch and reads only the examples of that epoch before it, not every earlier epoch's."""
    host, hosts = jax.process_index(), jax.process_count()
    shard = source.dataset.shard(hosts, host)
    per_epoch = _host_share(source.num_examples)
    epoch, offset = divmod(first, per_epoch)

    def epoch_order(e: tf.Tensor) -> tf.data.Dataset:
        key = tf.stack([tf.constant(seed, tf.int64), e])
        epoch_seed = tf.random.stateless_uniform([], key, minval=None, maxval=None, dtype=tf.int64)
        return shard.shuffle(min(buffer, per_epoch), seed=epoch_seed)

    ds = tf.data.Dataset.counter(epoch).flat_map(
        tf.autograph.experimental.do_not_convert(epoch_order)
    )
    return ds.enumerate(start=epoch * per_epoch).skip(offset)


_FIX = "Fix or remove the file(s), or set data.skip_corrupt = True to skip such examples."


_UNREADABLE = "cannot read image of "  # a tfds example's image, in :func:`_problems`
_OPEN: weakref.WeakSet[Batches] = weakref.WeakSet()  # batch iterators not closed yet


@atexit.register
def _release_open() -> None:
    """Releases the tf.data iterators a program leaves open, while Python can still run their
    in-flight ``tf.py_function`` calls (EXIF decoding): released in the interpreter's teardown,
    those calls waited for Python forever and the program never exited."""
    for batches in list(_OPEN):
        batches._release_now()
    _OPEN.clear()


class Batches(Iterator[Batch]):
    """Host-local numpy batches from a tf.data pipeline.

    ``skipped`` counts unreadable images dropped so far (``skip_corrupt``): stream positions
    consumed minus examples delivered; each is logged with its file. ``next_position`` is the
    stream position after the last delivered batch. A decode error (or a bad label map)
    without ``skip_corrupt`` is re-raised as a :class:`DataError` naming the file(s), found by
    re-reading the failing batch's files. ``row_of`` maps a stream position to its row of a file
    source's ``columns`` (None past the split's end); without it files are not named.
    ``end_position``: where a finite stream ends (examples dropped after its last batch count).
    ``advice``: the error's last sentence. After an error the iterator is closed: it yields
    nothing more.
    """

    def __init__(
        self,
        ds: tf.data.Dataset,
        first_position: int,
        local_batch: int,
        source: Source,
        row_of: Callable[[int], int | None] | None = None,
        end_position: int | None = None,
        advice: str = _FIX,
    ):
        self._iter = ds.as_numpy_iterator()
        _OPEN.add(self)
        self._advice = advice
        self._local = local_batch
        self._row_of = row_of
        self._source = source
        self.examples = self.skipped = 0
        self._named: set[int | None] = set()  # rows of skipped examples logged so far
        self.next_position, self.end_position = first_position, end_position

    def __next__(self) -> Batch:
        if self._iter is None:  # closed
            raise StopIteration
        try:
            batch = next(self._iter)
        except tf.errors.OpError as e:
            error = self._error(e)
            self.close()  # now, not in the interpreter's exit (the error may end the program)
            raise error from e
        except StopIteration:  # a finite stream: the examples dropped after the last batch
            if self.end_position is not None:
                self._note_skipped(list(range(self.next_position, self.end_position)))
                self.next_position = self.end_position
            raise
        index = batch.pop("index")
        delivered = set(index.tolist())
        self.examples += len(index)
        dropped = [p for p in range(self.next_position, int(index[-1])) if p not in delivered]
        self.next_position = int(index[-1]) + 1
        self._note_skipped(dropped)
        return batch

    def _note_skipped(self, dropped: list[int]) -> None:
        """Counts the ``dropped`` stream positions; logs them unless each is an example named
        before (an epoch later: the count goes on, the log does not repeat itself)."""
        if not dropped:
            return
        self.skipped += len(dropped)
        if self._row_of is not None:
            dropped = [p for p in dropped if self._row_of(p) not in self._named]
            if not dropped:
                return
            self._named.update(self._row_of(p) for p in dropped)
        logger.warning(
            "Skipped %d unreadable image(s) so far (of %d read)%s.",
            self.skipped,
            self.skipped + self.examples,
            self._files(dropped),
        )

    def _files(self, positions: list[int]) -> str:
        """``": <what is wrong>; ..."`` of the first stream ``positions``: the file and why (its
        image, its label map, ...), found by reading them again (a tfds split's example: named,
        not read again: that would scan the split up to it); empty if not known."""
        if self._row_of is None or not reads_encoded_images(self._source):
            return ""
        rows = [self._row_of(p) for p in positions[:3]]
        found = dict.fromkeys(rows)
        if self._source.columns is not None:
            found = _problems(self._source, rows)
        found = [problem or _example_name(self._source, row) for row, problem in found.items()]
        more = f" and {len(positions) - 3} more" if positions[3:] else ""
        return ": " + "; ".join(str(p) for p in found) + more

    def close(self) -> None:
        """Releases the tf.data iterator on a daemon thread, so that its teardown does not hold
        up the caller: with autotuning on, the iterator's destructor waits for tf.data's
        autotuning thread, at times for tens of seconds (benchmarks/RESULTS.md). The wait releases
        the GIL, so the run goes on meanwhile."""
        if self._iter is None:
            return
        held, self._iter = [self._iter], None
        _OPEN.discard(self)
        if sys.is_finalizing():  # a batch iterator left half read at exit: no new threads
            return
        threading.Thread(target=held.clear, name="release_tf_data", daemon=True).start()

    def _release_now(self) -> None:
        """Releases the tf.data iterator on this thread (at exit: see :func:`_release_open`)."""
        self._iter = None

    def _error(self, error: tf.errors.OpError) -> DataError:
        bad = []
        if self._row_of is not None and reads_encoded_images(self._source):
            positions = range(self.next_position, self.next_position + self._local)
            rows = [row for p in positions if (row := self._row_of(p)) is not None]
            bad = [p for p in _problems(self._source, rows).values() if p]
        if bad:
            more = f" and {len(bad) - 3} more" if bad[3:] else ""
            advice = _advice(self._source, bad, self._advice)
            return DataError(f"Bad example(s): {'; '.join(bad[:3])}{more}.{advice}")
        origin = f" reading {self._source.origin}" if self._source.origin else ""
        message = f"The input pipeline failed{origin}: {_op_message(error)}."
        own = "assertion failed" in error.message  # the sources' own checks (labels, label maps)
        if self._source.columns is None and reads_encoded_images(self._source) and not own:
            message += (" If an image cannot be decoded, fix the dataset or set "
                        "data.skip_corrupt = True to skip such examples.")  # fmt: skip
        return DataError(message)


def _advice(source: Source, problems: Sequence[str], advice: str) -> str:
    """`` advice`` for bad examples' ``problems``; none where they are a tfds split's that
    fail before their images are decoded (a label outside the classes, a label map's raw value
    missing from its table: the message says what to fix; they are no unreadable images)."""
    if source.columns is not None or any(p.startswith(_UNREADABLE) for p in problems):
        return f" {advice}"
    return ""


def reads_encoded_images(source: Source) -> bool:
    """Whether the pipeline decodes ``source``'s images (files, or a tfds split's encoded
    bytes), so that an example may be unreadable."""
    if source.columns is not None:
        return "path" in source.columns
    spec = source.dataset.element_spec
    return "path" in spec or ("image" in spec and spec["image"].dtype == tf.string)


def _example_name(source: Source, row: int) -> str:
    """Example ``row`` of a source: its file, else its row in the split."""
    if source.columns is not None and "path" in source.columns:
        return str(source.columns["path"][row])
    return f"example {row} of {source.origin or 'the split'}"


def _problems(source: Source, rows: Sequence[int]) -> dict[int, str | None]:
    """What is wrong with each example of ``rows`` (None: nothing found), read again: a file
    source's files, a tfds split's examples in one pass up to the last of them."""
    if source.columns is not None:
        return {row: _problem(source, row) for row in rows}
    found: dict[int, str | None] = dict.fromkeys(rows)
    if not rows:
        return found
    # From the first row: skip() would raise a skipped element's error as the next one's.
    examples = iter(source.dataset.take(max(rows) + 1))
    for row in range(max(rows) + 1):  # an element that fails (a label map's values) is an
        try:  # error of its own: the iterator goes on with the next
            example = next(examples)
        except tf.errors.OpError as e:
            found[row] = f"{_example_name(source, row)}: {_op_message(e)}"
            continue
        except StopIteration:
            break
        if row in found:
            try:
                augment.decode(example["image"])
            except tf.errors.OpError as e:
                name = _example_name(source, row)
                found[row] = f"{_UNREADABLE}{name}: {_op_message(e)}"
    return {row: found[row] for row in rows}


def _problem(source: Source, row: int) -> str | None:
    """What is wrong with example ``row`` of a file source (its image, its size against its
    annotations, or its label map's file, size or values), or None."""
    columns, num_classes = source.columns, source.num_classes
    path = columns["path"][row]
    image = decode_file(path, augment.decode)
    if isinstance(image, str):
        return f"cannot read image {path}: {image}"
    if source.target == "boxes":
        info = source.annotations["images"][int(columns["row"][row])]
        (h, w), (ah, aw) = image.shape[:2], (info["height"], info["width"])
        return size_problem(path, (w, h), (aw, ah))
    if "label_map_path" not in columns:
        return None
    map_path = columns["label_map_path"][row]
    label_map = decode_file(map_path, augment.decode_index_png)
    if isinstance(label_map, str):
        return f"cannot read label map {map_path}: {label_map}"
    if source.label_values is not None:  # raw values, mapped
        mapped = source.label_values[label_map]
        if (mapped < 0).any():
            raw = np.unique(label_map[mapped < 0]).tolist()
            return f"label map {map_path}: raw values {raw[:5]} missing from data.label_map_values"
        label_map = mapped
    if label_map.shape[:2] != image.shape[:2]:
        (h, w), (ih, iw) = label_map.shape[:2], image.shape[:2]
        turned = ""
        if (h, w) == (iw, ih) and exif.turned_by_exif(path):
            turned = (
                " (the image is turned upright by its EXIF orientation, as viewers show it; the "
                "mask fits its stored pixels: turn the mask alike, or save the image upright)"
            )
        return (
            f"label map {map_path}: size {w}x{h} differs from its image {path} ({iw}x{ih}, w x h)"
            f"{turned}"
        )
    bad = sorted(set(np.unique(label_map).tolist()) - {*range(num_classes), IGNORE_LABEL})
    if bad:
        return (
            f"label map {map_path}: values {bad[:5]} outside [0, {num_classes}) "
            f"({IGNORE_LABEL} = ignore)"
        )
    return None


def decode_file(path: str, decode: Callable[[tf.Tensor], tf.Tensor]) -> np.ndarray | str:
    """The decoded file at ``path``, or the error message."""
    try:
        return decode(tf.io.read_file(os.fsencode(path))).numpy()
    except tf.errors.OpError as e:  # a missing file's message starts with its path
        return _op_message(e).removeprefix(f"{path}; ")


def _op_message(error: tf.errors.OpError) -> str:
    """A TensorFlow op error's message without TensorFlow's function, node, op and iterator
    names."""
    message = re.sub(r"\s*\[\[\{\{node [^}]*\}\}\]\]", "", error.message.split("[Op:")[0])
    message = re.sub(r"\{\{function_node [^}]*\}\}", "", message)
    message = re.sub(r"Error in user-defined function passed to \S+ transformation with "
                     r"iterator: \S+: ", "", message)  # fmt: skip
    if "Summarized data: " in message:  # a failed tf.debugging.Assert: its data, a line each
        data = message.split("Summarized data: ")[-1].splitlines()
        message = " ".join(part.strip("b'\" ") for part in data)
    elif own := re.fullmatch(r"\s*assertion failed: \[(.*)\]\s*", message, re.S):  # one string
        message = own.group(1)
    return message.strip().rstrip(".")


def train_batches(
    source: Source,
    spec: InputSpec,
    *,
    global_batch: int,
    seed: int,
    start_step: int = 0,
    start_position: int | None = None,
    shuffle_buffer: int = 10_000,
    threads: int | None = None,
    max_boxes: int | None = None,
) -> Batches:
    """Infinite host-local training batches, starting at ``start_step`` of the seeded stream.

    The stream starts at example position ``start_step * local_batch``. When images were skipped
    (``skip_corrupt``) the stream is ahead of that: pass the interrupted iterator's
    ``next_position`` as ``start_position`` to resume exactly. ``shuffle_buffer``: the examples
    a source read in order (tfds) is shuffled through each epoch (others shuffle whole epochs).

    Batches hold ``image`` (float32 [B, H, W, 3]) and ``label`` (int32 [B]); with mixup or
    cutmix also ``soft_label`` (float32 [B, num_classes], rows summing to 1). Label-map sources
    give ``label_map`` (int32 [B, H, W], IGNORE_LABEL where nothing counts) in place of
    ``label``. Box sources (``max_boxes`` required: M, at least the boxes of any image) give
    ``boxes`` (float32 [B, M, 4], x0 y0 x1 y1 in pixels of the model input), ``classes``,
    ``valid`` (1: an object to detect) and ``crowd`` (1: an iscrowd region), int32 [B, M];
    rows past an image's boxes are all 0. A source of a target of one's own (a column) gives
    its values as they are (int32 or float32 [B, ...]) in place of ``label``.
    """
    local = _local_batch(global_batch)
    target = _target(source, max_boxes)
    if spec.mixes and source.column_spec is not None:
        raise DataError(
            f"mixup and cutmix mix image labels; the target {source.target!r} is a column of "
            "one's own, which they do not mix: turn them off."
        )
    if source.num_examples < global_batch:
        raise DataError(
            f"The training split has {source.num_examples} examples, fewer than one global "
            f"batch of {global_batch}."
        )
    host_seed = seed + jax.process_index() * 1_000_003
    first = start_step * local if start_position is None else start_position
    row_of = None
    if source.columns is not None:
        num_local = _host_share(source.num_examples)
        columns = source.column_variables  # held once, shared with the source's dataset

        def example_at(position: tf.Tensor) -> tuple[tf.Tensor, dict]:
            row = _example_index(position, num_local, seed)
            return position, gather_rows(columns, row)

        def row_of(position: int) -> int:
            return int(_example_index(tf.constant(position, tf.int64), num_local, seed))

        ds = tf.data.Dataset.counter(first).map(
            tf.autograph.experimental.do_not_convert(example_at)
        )
    else:
        ds = _streaming_order(source, first, seed, shuffle_buffer)
    ds = parallel_map(ds, make_preprocess(spec, train=True, seed=host_seed, **target))
    if source.skip_corrupt:
        ds = ds.ignore_errors()
    ds = ds.batch(local, drop_remainder=True)
    if spec.mixes:

        def mix(step: tf.Tensor, batch: dict) -> dict:
            return augment.mix_batch(
                batch,
                num_classes=source.num_classes,
                mixup_alpha=spec.mixup_alpha,
                cutmix_alpha=spec.cutmix_alpha,
                prob=spec.mix_prob,
                switch_prob=spec.mix_switch_prob,
                seed=tf.random.experimental.stateless_fold_in(  # not example `step`'s key
                    tf.stack([tf.constant(host_seed, tf.int64), step]),
                    tf.constant(_MIX_STREAM, tf.int64),
                ),
            )

        ds = tf.data.Dataset.zip(tf.data.Dataset.counter(start_step), ds)
        ds = parallel_map(ds, mix)
    ds = ds.prefetch(tf.data.AUTOTUNE).with_options(pipeline_options(threads))
    return Batches(ds, first, local, source, row_of)


def eval_batches(
    source: Source,
    spec: InputSpec,
    *,
    global_batch: int,
    threads: int | None = None,
    max_boxes: int | None = None,
    advice: str = _FIX,
) -> Iterator[Batch]:
    """Host-local evaluation batches covering the split exactly once, padded and masked:
    ``image``, the targets (as :func:`train_batches`), ``mask`` (float32 [B], 1 for real
    examples, 0 for padding rows, whose ``label_map`` is all IGNORE_LABEL and boxes all 0) and
    ``row`` (int32 [B], each example's row in the source: unreadable ones skipped leave gaps).

    Box sources are letterboxed (the longer side scaled to ``image_size``, the image at the
    top-left, zero padding after normalisation) and add ``image_id`` (int32 [B], the id in
    ``source.annotations``, 0 in padding rows) and ``scale`` (float32 [B], model-input pixels
    per original pixel: original box = box / scale). Their ground-truth rows hold the first
    ``max_boxes`` boxes of an image, without a check that it holds no more: evaluation scores
    against ``source.annotations``, so a split of images of more boxes than training's
    ``max_boxes`` is evaluated whole.
    ``advice``: the last sentence of the error naming a file that cannot be read.
    """
    local = _local_batch(global_batch)
    target = _target(source, max_boxes, check=False)
    per_process = math.ceil(source.num_examples / jax.process_count())
    num_batches = math.ceil(per_process / local)
    ds = source.dataset.shard(jax.process_count(), jax.process_index())
    preprocess = make_preprocess(spec, train=False, seed=0, **target)

    def source_row(position: int | tf.Tensor) -> int | tf.Tensor:
        """The row in the source of the shard's ``position``-th example."""
        return jax.process_index() + position * jax.process_count()

    def example(i: tf.Tensor, ex: dict) -> dict:
        row = tf.cast(source_row(i), tf.int32)
        return {**preprocess(i, ex), "mask": tf.constant(1.0), "row": row}

    ds = parallel_map(ds.enumerate(), example)
    if source.skip_corrupt:
        ds = ds.ignore_errors()
    ds = ds.batch(local).prefetch(tf.data.AUTOTUNE).with_options(pipeline_options(threads))

    def row_of(position: int) -> int | None:
        row = source_row(position)
        return row if row < source.num_examples else None

    shard_size = _host_share(source.num_examples)
    batches = Batches(ds, 0, local, source, row_of, end_position=shard_size, advice=advice)
    empty = _empty_batch(local, spec.image_size, target)
    return _padded(batches, local, num_batches, shard_size, empty)


def eval_example_shapes(
    source: Source, spec: InputSpec, *, max_boxes: int | None = None
) -> dict[str, tuple[tuple[int, ...], type]]:
    """Shape and dtype of one row of each key of ``eval_batches``' batches (to compile the
    evaluation before any image is read)."""
    kind, most = source.target, _max_boxes(source.target, max_boxes)
    return _example_shapes(spec.image_size, kind, most, source.column_spec)


def train_example_shapes(
    source: Source, spec: InputSpec, *, max_boxes: int | None = None
) -> dict[str, tuple[tuple[int, ...], type]]:
    """Shape and dtype of one row of each key of ``train_batches``' batches (to compile the
    train step before the pipeline starts)."""
    shapes = eval_example_shapes(source, spec, max_boxes=max_boxes)
    for key in _EVAL_ONLY_KEYS:
        shapes.pop(key, None)
    if spec.mixes:
        shapes["soft_label"] = ((source.num_classes,), np.float32)
    return shapes


def _padded(
    batches: Batches, local: int, num_batches: int, shard_size: int, empty: Batch
) -> Iterator[Batch]:
    """``batches`` padded to ``local`` rows, then ``empty`` up to ``num_batches`` batches."""
    count = 0
    try:
        for batch in batches:
            count += 1
            yield _pad(batch, local)
    finally:
        batches.close()
    if count > num_batches:
        raise DataError(f"Evaluation produced {count} batches, more than {num_batches} expected.")
    if shard_size > batches.examples:
        logger.warning(
            "Skipped %d unreadable image(s) of %d.",
            shard_size - batches.examples,
            shard_size,
        )
    for _ in range(num_batches - count):
        yield empty


def _max_boxes(kind: str, max_boxes: int | None) -> int | None:
    """``max_boxes``, checked against the source's ``kind`` (boxes only, and then >= 1)."""
    if kind != "boxes":
        if max_boxes is not None:
            raise DataError(f"max_boxes applies to box sources, not to {kind!r} ones.")
        return None
    if max_boxes is None or max_boxes < 1:
        raise DataError(
            f"Box sources need max_boxes >= 1 (task.max_boxes: boxes per image in a batch); "
            f"got {max_boxes}."
        )
    return max_boxes


def _target(source: Source, max_boxes: int | None, check: bool = True) -> dict:
    """:func:`make_preprocess`'s target arguments for ``source`` (``max_boxes``: boxes only;
    ``check``: an error if an image holds more boxes, else the first ``max_boxes`` are kept)."""
    target = {"target": source.target, "num_classes": source.num_classes}
    if source.label_values is not None:
        target["label_values"] = source.label_values
    if source.column_spec is not None:
        target["column"] = source.column_spec
    if _max_boxes(source.target, max_boxes) is None:
        return target
    if check:
        boxes.check_max_boxes(source, max_boxes)
    table = boxes.box_table(source.annotations, source.category_ids)
    return {**target, "box_table": table, "max_boxes": max_boxes}


def _fill(key: str) -> int:
    """The value of ``key`` in padding rows."""
    return IGNORE_LABEL if key == "label_map" else 0


def _pad(batch: Batch, size: int) -> Batch:
    n = len(batch["mask"])
    if n == size:
        return batch
    return {
        k: np.concatenate([v, np.full((size - n, *v.shape[1:]), _fill(k), v.dtype)])
        for k, v in batch.items()
    }


def _empty_batch(size: int, s: int, target: dict) -> Batch:
    """An all-padding batch, for a process whose shard ran out before the others."""
    shapes = _example_shapes(s, target["target"], target.get("max_boxes"), target.get("column"))
    return {k: np.full((size, *shape), _fill(k), dtype) for k, (shape, dtype) in shapes.items()}


_EVAL_ONLY_KEYS = ("mask", "row", "image_id", "scale", "extent")


def _example_shapes(
    s: int, kind: str, max_boxes: int | None, column: tuple[tuple[int, ...], type] | None = None
) -> dict[str, tuple[tuple[int, ...], type]]:
    """Shape and dtype of one row of each key of an evaluation batch at image size ``s`` from a
    source of target ``kind`` (a column of one's own: ``column``, its shape and dtype)."""
    shapes = {"image": ((s, s, 3), np.float32), "mask": ((), np.float32), "row": ((), np.int32)}
    if kind == "boxes":
        m = max_boxes
        shapes |= {k: ((m,), np.int32) for k in ("classes", "valid", "crowd")}
        shapes |= {"boxes": ((m, 4), np.float32), "image_id": ((), np.int32)}
        shapes["scale"] = ((), np.float32)
        shapes["extent"] = ((2,), np.float32)
    elif column is not None:
        shapes[kind] = column
    else:
        shapes[kind] = ((s, s) if kind == "label_map" else (), np.int32)
    return shapes


def label_map_pixels(source: Source, threads: int | None = None) -> tuple[np.ndarray, int]:
    """Pixels of each label value (256 counts) in every label map of ``source`` as stored
    (before resizing and cropping; a file's raw values through the source's table), for checks
    before training, and how many maps could not be read (they count nothing;
    :func:`check_examples` names them)."""

    def count(example: dict) -> tf.Tensor:
        label_map = tf.reshape(tf.cast(raw_label_map(example, source.label_values), tf.int32), [-1])
        return tf.math.bincount(label_map, minlength=256, maxlength=256, dtype=tf.int64)

    ds = parallel_map(source.dataset, count).ignore_errors()
    ds = ds.batch(1024).with_options(pipeline_options(threads))
    pixels, read = np.zeros(256, np.int64), 0
    for counts in ds.as_numpy_iterator():
        pixels, read = pixels + counts.sum(0), read + len(counts)
    return pixels, source.num_examples - read


def warn_of_absent_classes(source: Source, threads: int | None = None) -> None:
    """The warning :func:`check_examples` gives before training, for a label-map split read
    otherwise (``vision_jax.evaluate``): from its label maps as stored
    (:func:`label_map_pixels`)."""
    _warn_of_absent_classes(source, label_map_pixels(source, threads)[0])


def _warn_of_absent_classes(source: Source, pixels: np.ndarray) -> None:
    """Warns of classes that no label map of ``source`` holds (``pixels``: pixels per label
    value): their IoU is 0 wherever the model predicts them, else left out of the mean
    (:func:`vision_jax.metrics.iou_summary`, mmsegmentation's nanmean)."""
    absent = [f"{name} ({c})" for c, name in enumerate(source.class_names) if not pixels[c]]
    if not absent:
        return
    hint = ""
    if pixels[IGNORE_LABEL] and not pixels[1 : len(source.class_names)].any():  # only 0 and 255
        hint = (f" {pixels[IGNORE_LABEL]} pixels hold {IGNORE_LABEL}, the ignore value: a mask "
                f"saved as 0/{IGNORE_LABEL} must hold class ids (1 for its objects).")  # fmt: skip
    logger.warning(
        "No label map of this split holds a pixel of %s: their IoU is 0 if the model predicts "
        "them anywhere (counted in mIoU), else left out of mIoU.%s", ", ".join(absent), hint,
    )  # fmt: skip


def check_examples(
    source: Source, spec: InputSpec, *, threads: int | None = None, sample: int | None = None,
    advice: str = _FIX, whole: bool = False,
) -> int:  # fmt: skip
    """Reads every example of this process's shard of a file source once, as evaluation does
    (``whole``: every example, without asking JAX for the processes: a tool that prepares data
    does not start JAX's backend).

    Unreadable examples are a :class:`DataError` naming the files, or with ``skip_corrupt``
    counted (logged, and returned): so a bad file in the eval split stops a run before it trains,
    not at its final evaluation; a split of which no example can be used is an error either way.
    ``sample``: read only that many examples drawn at random, an error only if none of them can
    be used (a training split with ``skip_corrupt``, whose stream would wait for a good example
    forever). Sources of decoded arrays (arrays, digits) are not read (0). ``advice``: the
    error's last sentence.
    """
    if not reads_encoded_images(source):
        return 0
    most = None  # boxes: pad to the split's most boxes
    if source.target == "boxes":
        most = max(boxes.boxes_per_image(source.annotations).values(), default=1)
    target = _target(source, most)
    preprocess = make_preprocess(spec, train=False, seed=0, **target)

    def read(i: tf.Tensor, example: dict) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        out = preprocess(i, example)  # sums keep the decoding from being pruned
        total = tf.add_n([tf.reduce_sum(tf.cast(v, tf.float32)) for v in out.values()])
        if "label_map" not in out:
            return i, total, tf.zeros([0], tf.int32)
        label_map = tf.cast(out["label_map"], tf.int32)  # pixels of each label value
        return i, total, tf.math.bincount(label_map, minlength=256, maxlength=256)

    hosts, host = (1, 0) if whole else (jax.process_count(), jax.process_index())
    ds = source.dataset.shard(hosts, host).enumerate()
    if sample is not None:
        buffer = min(source.num_examples, 10_000)  # the same draw in both passes below
        ds = ds.shuffle(buffer, seed=0, reshuffle_each_iteration=False).take(sample)
        drawn = [int(k) for k, _ in ds.as_numpy_iterator()]
    ds = parallel_map(ds, read).ignore_errors()
    ds = ds.batch(1024).with_options(pipeline_options(threads))
    good, pixels = set(), 0
    for rows, _, counts in ds.as_numpy_iterator():
        good.update(int(i) for i in rows)
        pixels += counts.sum(0)  # label maps: pixels of each value; else nothing
    if source.target == "label_map" and good and sample is None and hosts == 1:
        _warn_of_absent_classes(source, pixels)
    shard = range(host, source.num_examples, hosts)
    positions = drawn if sample is not None else range(len(shard))  # read, in the shard
    bad_rows = [shard[k] for k in positions if k not in good]
    if not bad_rows or (sample is not None and good):
        return 0
    found = _problems(source, bad_rows[:10])
    named = [problem or _example_name(source, row) for row, problem in found.items()]
    more = f" (and {len(bad_rows) - 10} more)" if len(bad_rows) > 10 else ""
    if not good:
        what = "drawn at random " if sample is not None else ""
        raise DataError(
            f"None of the {len(positions)} examples {what}of the split can be used: "
            f"{'; '.join(named)}{more}."
        )
    if source.skip_corrupt:
        logger.warning(
            "%d bad example(s) of %d will be skipped: %s%s.",
            len(bad_rows), len(shard), "; ".join(named), more,
        )  # fmt: skip
        return len(bad_rows)
    raise DataError(f"Bad example(s): {'; '.join(named)}{more}.{_advice(source, named, advice)}")
