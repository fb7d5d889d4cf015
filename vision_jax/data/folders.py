"""Image files on disk (local, or any filesystem etils' ``epath`` reaches) as sources.

``imagefolder``: ``root/<split>/<class>/.../<image>`` (any of :data:`IMAGE_EXTENSIONS`, in
subfolders too), classes named by their sorted folder names; for label maps
``root/<split>/images/<image>`` with index PNGs ``root/<split>/masks/<same stem>.png`` (in
subfolders alike) and
class names from ``root/classes.txt``, or PASCAL VOC's layout (``root/JPEGImages``,
``root/SegmentationClass``, the split's ids in ``root/ImageSets/Segmentation/<split>.txt``).
``csv``:
``root/<split>.csv`` with a ``filename,label`` header, file names relative to ``root``. Only
the file list is built here; images are read and decoded in the tf.data pipeline.
A split may be sliced like tfds splits: ``"train[:90%]"``, ``"train[90%:]"``, ``"val[:500]"``.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import logging
import os
import posixpath
import re
import unicodedata
from collections import Counter
from collections.abc import Sequence

import numpy as np

from vision_jax.data import exif
from vision_jax.data.sources import (
    DataError,
    Source,
    check_target,
    column_source,
    file_path,
    from_columns,
    is_column_target,
    list_names,
    missing_column,
    num_rows,
    value_table,
)
from vision_jax.output_errors import is_url

logger = logging.getLogger(__name__)

# The image files that folders (training's and predict's) and predict's globs list: what
# augment.decode reads (TIFFs of 16-bit grey as value // 256; float ones refused, not clipped).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
_SLICE = re.compile(r"^(?P<name>[^\[\]]+)(\[(?P<start>(-?\d+%?)?):(?P<stop>(-?\d+%?)?)\])?$")


def parse_split(split: str) -> tuple[str, slice]:
    """``"train[:90%]"`` -> ("train", slice); percentages are resolved by :func:`apply_slice`."""
    match = _SLICE.match(split.strip())
    if not match:
        raise DataError(f"Cannot parse split {split!r}; expected e.g. 'train' or 'train[:90%]'.")
    bounds = [match["start"] or None, match["stop"] or None]
    for bound in bounds:
        if bound and bound.endswith("%") and abs(int(bound[:-1])) > 100:
            raise DataError(f"Split {split!r}: a percentage lies in [-100%, 100%]; got {bound}.")
    return match["name"], slice(*bounds)


def apply_slice(columns: dict[str, np.ndarray], where: slice) -> dict[str, np.ndarray]:
    """Rows ``where`` of a fixed (seed 0) permutation of ``columns``, kept in file order.

    Slicing a permutation, not the sorted list, gives ``[:90%]`` and ``[90%:]`` each class in
    about its share (a random draw, not stratified).
    """
    if where.start is None and where.stop is None:
        return columns
    n = num_rows(columns)

    def resolve(bound: str | None) -> int | None:
        if bound is None:
            return None
        return round(n * int(bound[:-1]) / 100) if bound.endswith("%") else int(bound)

    order = np.random.default_rng(0).permutation(n)
    rows = np.sort(order[resolve(where.start) : resolve(where.stop)])
    if not len(rows):
        start, stop = where.start or "", where.stop or ""
        raise DataError(f"The split slice [{start}:{stop}] of {n} examples holds none.")
    return {k: v[rows] for k, v in columns.items()}


def sliced(source: Source, where: slice) -> Source:
    """Rows ``where`` of a column source (:func:`apply_slice`), its values checked whole."""
    if where.start is None and where.stop is None:
        return source
    return from_columns(apply_slice(source.columns, where), source.class_names, source.target)


def _file_source(
    paths: list[str], labels: list[int], class_names: Sequence[str], where: slice
) -> Source:
    columns = {"path": np.array(paths, dtype=str), "label": np.array(labels, np.int32)}
    return from_columns(apply_slice(columns, where), class_names)


def subdirectories(path: str) -> list[str]:
    """Sorted names of the non-hidden folders in ``path`` (local, or a URL: :func:`file_path`)."""
    return sorted(
        d
        for d in list_names(path)
        if not d.startswith(".") and file_path(posixpath.join(path, d)).is_dir()
    )


def _splits_in(root: str) -> str:
    """What ``root`` holds instead, for a missing split's message."""
    if not file_path(root).is_dir():
        return f"data.root {root} is not a folder"
    found = subdirectories(root)
    return f"{root} holds {', '.join(found)}" if found else f"{root} holds no split folders"


def is_image_file(name: str) -> bool:
    """Whether a file name is one the listings take: an image extension, not hidden."""
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def files_under(folder: str) -> list[str]:
    """Every file under ``folder`` (its non-hidden subfolders too, symbolic links followed, as
    torchvision's ``ImageFolder`` walks), relative to it."""
    if is_url(folder):
        top = file_path(folder)
        found = (str(p.relative_to(top)) for p in top.rglob("*") if p.is_file())
        return [f for f in found if not any(part.startswith(".") for part in f.split("/")[:-1])]
    files, seen = [], set()
    for here, subfolders, names in os.walk(folder, followlinks=True):
        if (real := os.path.realpath(here)) in seen:  # a link back to a folder above
            subfolders[:] = []
            continue
        seen.add(real)
        subfolders[:] = [d for d in subfolders if not d.startswith(".")]
        inside = os.path.relpath(here, folder).replace(os.sep, "/")
        files += [n if inside == "." else f"{inside}/{n}" for n in names]
    return files


def _images_under(class_dir: str, left_out: Counter) -> list[str]:
    """The images under ``class_dir`` (a class's, or a label-map split's ``images``; relative,
    sorted); the extensions of its other files (hidden ones aside) are counted in
    ``left_out``."""
    images = []
    for f in files_under(class_dir):
        name = posixpath.basename(f)
        if is_image_file(name):
            images.append(f)
        elif not name.startswith("."):
            left_out[posixpath.splitext(name)[1].lower() or "no extension"] += 1
    return sorted(images)


def _warn_of_left_out(left_out: Counter, folder: str) -> None:
    """One warning counting the files of ``folder`` left out as not images, by extension."""
    if left_out:
        kinds = ", ".join(f"{kind}: {n}" for kind, n in left_out.most_common())
        logger.warning("Left out %d files of %s that are not %s images (%s).",
                       left_out.total(), folder, "/".join(IMAGE_EXTENSIONS), kinds)  # fmt: skip


def _class_folders(split_dir: str) -> list[tuple[str, str]]:
    """(class name, folder name) of the class folders in ``split_dir``, sorted by class name.
    Class names in Unicode's composed form: a zip made on macOS decomposes accented names, so
    one split's folders would name other classes than another's."""
    return sorted((unicodedata.normalize("NFC", f), f) for f in subdirectories(split_dir))


def image_folder_classes(root: str, split: str) -> list[str] | None:
    """The class names of the image-folder split ``split`` (its class folders), None where it
    does not exist: without reading its images."""
    split_dir = posixpath.join(root, parse_split(split)[0])
    if not file_path(split_dir).is_dir():
        return None
    return [name for name, _ in _class_folders(split_dir)]


def from_image_folder(
    root: str,
    split: str,
    *,
    skip_corrupt: bool = False,
    target: str = "label",
    class_names: Sequence[str] | None = None,
    label_map_values: Sequence[Sequence[int]] | None = None,
) -> Source:
    """``root/<split>/<class>/<image>`` (images in subfolders of a class folder too; other
    files are counted in a warning); an empty class folder is an error unless
    ``skip_corrupt`` (then it is logged and the class kept, so splits share class names).

    With ``target="label_map"``: see :func:`label_map_folder` (``class_names`` and
    ``label_map_values`` apply there).
    """
    if check_target(target) == "label_map":
        return label_map_folder(
            root, split, skip_corrupt=skip_corrupt, class_names=class_names,
            label_map_values=label_map_values,
        )  # fmt: skip
    name, where = parse_split(split)
    split_dir = posixpath.join(root, name)
    if not file_path(split_dir).is_dir():
        raise DataError(f"Image folder split {split_dir} does not exist ({_splits_in(root)}).")
    folders = _class_folders(split_dir)
    subdirs = {folder for _, folder in folders}
    class_names = [name for name, _ in folders]
    if not class_names:
        raise DataError(f"{split_dir} holds no class folders (expected {split_dir}/<class>/).")
    if len(set(class_names)) < len(class_names):
        twice = sorted(n for n, count in Counter(class_names).items() if count > 1)
        raise DataError(f"{split_dir}: folders {twice} differ only in their Unicode form.")
    paths, labels, left_out = [], [], Counter()
    for label, (_, folder) in enumerate(folders):
        class_dir = posixpath.join(split_dir, folder)
        files = _images_under(class_dir, left_out)
        if not files:
            message = f"Class folder {class_dir} holds no {'/'.join(IMAGE_EXTENSIONS)} images."
            if not skip_corrupt:
                raise DataError(message + " Remove it, or set data.skip_corrupt=True.")
            logger.warning("%s Keeping the class without examples.", message)
        paths += [posixpath.join(class_dir, f) for f in files]
        labels += [label] * len(files)
    _warn_of_left_out(left_out, split_dir)
    loose = [n for n in list_names(split_dir) if is_image_file(n) and n not in subdirs]
    if loose:
        logger.warning("Left out %d image(s) directly in %s, outside the class folders (such as "
                       "%s).", len(loose), split_dir, sorted(loose)[0])  # fmt: skip
    return dataclasses.replace(
        _file_source(paths, labels, class_names, where), skip_corrupt=skip_corrupt
    )


def _near_miss(mask: str, masks: set[str]) -> str:
    """Masks named like ``mask`` but not as it (another extension or case, a suffix), named."""
    stem = posixpath.splitext(mask)[0].lower()
    after = lambda m: m[len(stem) : len(stem) + 1]  # what follows the stem: ".", "_", "-"
    near = sorted(
        m for m in masks if m != mask and m.lower().startswith(stem) and after(m) in "._-"
    )
    if not near:
        return ""
    return f" Found {', '.join(near[:3])}: masks are PNGs named as their image's stem."


def label_map_folder(
    root: str,
    split: str,
    *,
    skip_corrupt: bool = False,
    class_names: Sequence[str] | None = None,
    label_map_values: Sequence[Sequence[int]] | None = None,
) -> Source:
    """Segmentation: ``root/<split>/images/<image>``, each with the index PNG
    ``root/<split>/masks/<stem>.png`` (in subfolders alike: ``images/<city>/<image>`` with
    ``masks/<city>/<stem>.png``) of class ids (grayscale of 1 to 8 bits, or palette PNGs
    read as their indices; 255 = ignore), or of raw values that ``label_map_values`` ((raw,
    class id) pairs: ADE20K's 0 to 255 and the others one down, Cityscapes' label ids to train
    ids) maps. Class names are ``class_names``, else the lines of ``root/classes.txt``. A
    missing mask is an error naming the image, unless ``skip_corrupt`` (then the image is
    logged and left out). Masks are read, and checked against their images, in the pipeline.
    """
    name, where = parse_split(split)
    voc_ids = posixpath.join(root, "ImageSets", "Segmentation", f"{name}.txt")
    if file_path(voc_ids).exists():
        paths, mask_paths = _voc_pairs(root, voc_ids, skip_corrupt)
        class_names = list(class_names or _classes_txt(root, default=VOC_CLASSES))
    else:
        paths, mask_paths = _folder_pairs(root, name, skip_corrupt)
        class_names = list(class_names) if class_names else _classes_txt(root)
    columns = {
        "path": np.array(paths, dtype=str),
        "label_map_path": np.array(mask_paths, dtype=str),
    }
    source = from_columns(apply_slice(columns, where), class_names)
    exif.warn_of_turned(source.columns["path"], "label maps", f"{root} (split {split!r})")
    table = value_table(label_map_values, len(class_names))
    return dataclasses.replace(source, skip_corrupt=skip_corrupt, label_values=table)


def _folder_pairs(root: str, name: str, skip_corrupt: bool) -> tuple[list[str], list[str]]:
    """Images and masks of ``root/<name>/images`` and ``root/<name>/masks`` (in subfolders
    too, each mask at its image's relative path; a subfolder of ``images`` without its folder
    under ``masks`` is left out, named in a warning, where ``masks`` is flat: stray previews
    beside the data; where ``masks`` has subfolders too it is an error, an incomplete copy)."""
    image_dir, mask_dir = (posixpath.join(root, name, d) for d in ("images", "masks"))
    for folder in (image_dir, mask_dir):
        if not file_path(folder).is_dir():
            raise DataError(
                f"Label-map split folder {folder} does not exist (the layout: "
                f"{root}/<split>/images/<image> and {root}/<split>/masks/<stem>.png, or PASCAL "
                f"VOC's with {root}/ImageSets/Segmentation/<split>.txt)."
            )
    paths, mask_paths, left_out = [], [], Counter()
    masks = set(files_under(mask_dir))
    images = _images_under(image_dir, left_out)
    _warn_of_left_out(left_out, image_dir)
    # Subfolders of images/ without their folder under masks/ (previews, overlays) are not
    # the split's: left out, named in a warning.
    subfolders = {posixpath.dirname(f) for f in images} - {""}
    unmatched = {d for d in subfolders if not file_path(posixpath.join(mask_dir, d)).is_dir()}
    if outside := Counter(d for f in images if (d := posixpath.dirname(f)) in unmatched):
        shown = ", ".join(f"{d} ({n})" for d, n in sorted(outside.items())[:5])
        if any(posixpath.dirname(m) for m in masks):  # a nested layout lacking a folder
            raise DataError(
                f"{mask_dir} has subfolders, but none for {outside.total()} image(s) in "
                f"subfolders of {image_dir}: {shown}{', ...' if len(outside) > 5 else ''} (an "
                "incomplete copy? each subfolder of images/ needs its own under masks/)."
            )
        logger.warning(
            "Left out %d image(s) in subfolders of %s without a folder of their name under %s "
            "(not the split's): %s%s.", outside.total(), image_dir, mask_dir, shown,
            ", ..." if len(outside) > 5 else "",
        )  # fmt: skip
        images = [f for f in images if posixpath.dirname(f) not in unmatched]
    for f in images:  # in subfolders too (images/<city>/x.jpg, masks/<city>/x.png)
        mask = posixpath.splitext(f)[0] + ".png"
        if mask not in masks:
            message = f"Image {posixpath.join(image_dir, f)} has no mask {mask_dir}/{mask}."
            _missing(message + _near_miss(mask, masks), skip_corrupt)
            continue
        paths.append(posixpath.join(image_dir, f))
        mask_paths.append(posixpath.join(mask_dir, mask))
    if not paths:
        raise DataError(f"{image_dir} holds no {'/'.join(IMAGE_EXTENSIONS)} images with masks.")
    return paths, mask_paths


def _voc_pairs(root: str, ids_file: str, skip_corrupt: bool) -> tuple[list[str], list[str]]:
    """PASCAL VOC: the ids listed in ``ids_file``, images ``root/JPEGImages/<id>.jpg`` and
    masks ``root/SegmentationClass/<id>.png`` (as torchvision's ``VOCSegmentation`` reads)."""
    folders = {d: posixpath.join(root, d) for d in ("JPEGImages", "SegmentationClass")}
    present = {}
    for d, folder in folders.items():
        if not file_path(folder).is_dir():
            raise DataError(f"{ids_file} lists a PASCAL VOC split, but {folder} does not exist.")
        present[d] = set(list_names(folder))
    paths, mask_paths = [], []
    ids = file_path(ids_file).read_text(encoding="utf-8").split()
    for i in ids:
        files = {"JPEGImages": f"{i}.jpg", "SegmentationClass": f"{i}.png"}
        lacks = [f"{folders[d]}/{f}" for d, f in files.items() if f not in present[d]]
        if lacks:
            message = f"{ids_file} lists {i}, but {' and '.join(lacks)} does not exist."
            _missing(message, skip_corrupt)
            continue
        image, mask = files.values()
        paths.append(posixpath.join(folders["JPEGImages"], image))
        mask_paths.append(posixpath.join(folders["SegmentationClass"], mask))
    if not paths:
        raise DataError(f"{ids_file} lists no image with its mask ({len(ids)} ids).")
    return paths, mask_paths


def _missing(message: str, skip_corrupt: bool) -> None:
    """A listed image without its mask (or a listed id without its files): an error, or with
    ``skip_corrupt`` a warning (the caller leaves the example out)."""
    if not skip_corrupt:
        raise DataError(message + " Add it, or set data.skip_corrupt=True.")
    logger.warning("%s Leaving the image out.", message)


# PASCAL VOC's class names in its id order (0 background; 255 in its masks is ignored).
VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)  # fmt: skip


def _classes_txt(root: str, default: Sequence[str] | None = None) -> list[str]:
    """The lines of ``root/classes.txt`` (line i names class id i; trailing blank lines
    dropped, an empty line among them is an error: it would shift the names after it), else
    ``default``."""
    path = posixpath.join(root, "classes.txt")
    if not file_path(path).exists():
        if default is not None:
            return list(default)
        raise DataError(
            f"Label maps need class names: set data.class_names or write {path} (one per line, "
            "class 0 first)."
        )
    text = file_path(path).read_text(encoding="utf-8")
    names = [line.strip() for line in text.rstrip().splitlines()]
    if "" in names:
        raise DataError(
            f"{path}: line {names.index('') + 1} is empty; line k names class id k - 1, so "
            "every class id up to the last needs a name."
        )
    return names


def _csv_text(path: str) -> str:
    """The text of a CSV file, past a byte-order mark (as spreadsheets write)."""
    return file_path(path).read_bytes().decode("utf-8-sig")


CsvTable = tuple[list[str], list[tuple[int, list[str]]]]


def _csv_table(path: str) -> CsvTable:
    """The header of a CSV file (its names stripped) and its non-empty rows with their line
    numbers."""
    reader = csv.reader(io.StringIO(_csv_text(path)))
    header = [h.strip() for h in next(reader, [])]
    return header, [(line, row) for line, row in enumerate(reader, start=2) if row]


def _csv_files(root: str) -> list[str]:
    """The CSV files in ``root`` (``root/*.csv``), sorted."""
    return [str(p) for p in sorted(file_path(root).glob("*.csv"))]


def _csv_rows(path: str) -> tuple[list[str], list[tuple[int, str, str]] | None]:
    """The header of a CSV file and, if it is a split's (``filename,label``), its (line number,
    filename, label) rows; None for another file's."""
    header, rows = _csv_table(path)
    if header[:2] != ["filename", "label"]:
        return header, None
    for line, row in rows:
        if len(row) < 2:
            raise DataError(f"{path}:{line}: expected 'filename,label'; got {row}.")
    return header, [(line, row[0].strip(), row[1].strip()) for line, row in rows]


def _read_csv(path: str) -> list[tuple[int, str, str]]:
    """(line number, filename, label) rows of a ``filename,label`` CSV file."""
    header, rows = _csv_rows(path)
    if rows is None:
        raise DataError(f"{path} must start with the header 'filename,label'; got {header}.")
    return rows


def _csv_class_names(root: str) -> list[str]:
    """Class names from every split CSV in ``root`` (``root/*.csv`` with the ``filename,label``
    header; others are named in a warning): integer labels 0..max, or sorted label names."""
    rows = {p: _csv_rows(p)[1] for p in _csv_files(root)}
    splits = [posixpath.basename(p) for p, split in rows.items() if split is not None]
    if len(splits) < len(rows):
        others = ", ".join(posixpath.basename(p) for p, split in rows.items() if split is None)
        logger.warning("Class names from %s; not split files (no 'filename,label' header): %s.",
                       ", ".join(splits), others)  # fmt: skip
    labels = {label for split in rows.values() for _, _, label in split or ()}
    _check_not_measurements(rows, labels)
    if labels and all((i := _label_id(x)) is not None and i >= 0 for x in labels):
        ids = {_label_id(x) for x in labels}
        if unused := sorted(set(range(max(ids) + 1)) - ids):
            logger.warning(
                "%d class id(s) of 0..%d have no example in the split CSVs of %s (integer "
                "labels are ids from 0): %s.", len(unused), max(ids), root, unused[:10],
            )  # fmt: skip
        return [str(i) for i in range(max(ids) + 1)]
    return sorted(labels)


def _check_not_measurements(
    rows: dict[str, list[tuple[int, str, str]] | None], labels: set[str]
) -> None:
    """Refuse labels that are all numbers, some not integers (0.37, 1.5): measurements, not
    class names (their sorted texts would be the classes); a class name or id is kept."""
    if not labels or not all(_NUMBER.fullmatch(x) for x in labels):
        return
    if all(_label_id(x) is not None for x in labels):
        return
    path, line, value = next(
        (p, line, label)
        for p, split in rows.items()
        for line, _, label in split or ()
        if _label_id(label) is None
    )
    raise DataError(
        f"{path}:{line}: the column 'label' holds numbers that are not integers ({value!r}): a "
        "label is a class name or an integer id; numbers per example go in a column named by "
        "task.target of a task of one's own, e.g. 'targets' (README: Adding a task)."
    )


def from_csv(
    root: str,
    split: str,
    *,
    class_names: Sequence[str] | None = None,
    target: str = "label",
    splits: Sequence[str] = (),
) -> Source:
    """``root/<split>.csv`` (``filename,label``; file names relative to ``root``).

    A label is a class name or an integer id into ``class_names``. Without ``class_names`` the
    classes come from every split CSV in ``root`` (so all splits agree; a stale one adds its
    classes too): ids 0..max if all labels are integers, else the sorted label names (labels
    that are all numbers, some not integers, are refused: measurements, not classes; an
    integral decimal, 2.0, is the id 2).

    A ``target`` of one's own (a task's column, :func:`csv_target_rows`) is read from the
    columns of that name instead; the file then starts with ``filename`` and needs no label.
    Its values are int32 where every value in the CSV files of ``split`` and ``splits`` (the
    other splits of the run) is an integer, else float32: other files in ``root`` do not
    change a split.
    """
    name, where = parse_split(split)
    path = posixpath.join(root, f"{name}.csv")
    if not file_path(path).exists():
        raise DataError(f"CSV split file {path} does not exist.")
    if is_column_target(check_target(target)):
        files = [posixpath.join(root, f"{parse_split(s)[0]}.csv") for s in splits]
        return _csv_column_source(root, path, where, target, class_names, files)
    class_names = list(class_names) if class_names is not None else _csv_class_names(root)
    index = {c: i for i, c in enumerate(class_names)}
    paths, labels = [], []
    for line, filename, label in _read_csv(path):
        if label in index:
            labels.append(index[label])
        elif (value := _label_id(label)) is not None:
            if not 0 <= value < len(class_names):
                raise DataError(
                    f"{path}:{line}: label {value} of {filename} is outside the class range "
                    f"[0, {len(class_names)})."
                )
            labels.append(value)
        else:
            raise DataError(f"{path}:{line}: unknown class {label!r} for {filename}.")
        paths.append(posixpath.join(root, filename))
    return _file_source(paths, labels, class_names, where)


_INTEGER = re.compile(r"[+-]?\d+")
_ID = re.compile(r"([+-]?\d+)(?:\.0*)?")  # 2, or 2.0 and 2.00 as pandas and spreadsheets write it
# A number as a CSV target holds it: plain decimal or scientific notation (no nan, inf or _)
_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")


def _label_id(label: str) -> int | None:
    """The integer id a CSV label writes (2, or an integral decimal: 2.0, 2.00), else None."""
    return None if (match := _ID.fullmatch(label)) is None else int(match[1])


def csv_target_rows(
    path: str,
    target: str,
    class_names: Sequence[str] | None = None,
    table: CsvTable | None = None,
) -> tuple[list[str], list[tuple[int, str, list[str]]]]:
    """The names of the values of the target column ``target`` of one's own in a split CSV
    (its header ``filename,...``; ``table``: the file as read already), and its (line number,
    filename, value texts) rows.

    Two encodings: a column named ``target`` holding an example's numbers separated by spaces
    (``0 1 1``; one number in every row: a scalar per example), its value names ``"0"`` ..
    ``"K-1"``; or a column per value, named ``<target>/<name>`` (``targets/cat,targets/dog``),
    each cell one number, its value names the ``<name>`` parts: in the header's order, or with
    ``class_names`` (data.class_names, or those a run trained on) in theirs, the columns
    matched by name (other names are an error naming the file and both)."""
    header, lines = _csv_table(path) if table is None else table
    if header[:1] != ["filename"]:
        raise DataError(f"{path} must start with the header 'filename,...'; got {header}.")
    parts = [i for i, h in enumerate(header) if h.startswith(f"{target}/")]
    single = [i for i, h in enumerate(header) if h == target]
    if single and parts:
        raise DataError(
            f"{path}: the header has both a column {target!r} and columns {target}/<name>: "
            "keep one encoding."
        )
    if not single and not parts:
        raise DataError(missing_column(target, header, path))
    named = [header[i] for i in single + parts]
    if twice := sorted({h for h in named if named.count(h) > 1}):
        raise DataError(f"{path}: the header names {', '.join(twice)} more than once.")
    columns, names = single, [header[i].removeprefix(f"{target}/") for i in parts]
    if parts:
        columns = parts
        if class_names is not None and list(class_names) != names:
            if sorted(class_names) != sorted(names):
                raise DataError(
                    f"{path}: the columns {target}/<name> name the values {', '.join(names)}; "
                    f"expected {', '.join(class_names)} (data.class_names, or the values the "
                    "run trained on)."
                )
            by_name = dict(zip(names, parts, strict=True))
            columns, names = [by_name[n] for n in class_names], list(class_names)
    rows = []
    for line, row in lines:
        if len(row) < len(header):
            raise DataError(f"{path}:{line}: {len(row)} fields; the header names {len(header)}.")
        filename = row[0].strip()
        if parts:
            texts = [row[i].strip() for i in columns]
            for i, text in zip(columns, texts, strict=True):
                if len(text.split()) != 1:
                    held = f"{text!r}" if text else "nothing"
                    raise DataError(
                        f"{path}:{line}: the column {header[i]!r} holds {held} ({filename}); a "
                        "column per value holds one number."
                    )
        else:
            texts = row[columns[0]].split()
            if not texts:
                raise DataError(f"{path}:{line}: no value for {target!r} ({filename}).")
        rows.append((line, filename, texts))
    if single:
        counts = {len(texts) for _, _, texts in rows}
        names = [str(i) for i in range(max(counts, default=0))] if counts != {1} else ["0"]
    return names, rows


def _csv_column_source(
    root: str,
    path: str,
    where: slice,
    target: str,
    class_names: Sequence[str] | None,
    others: Sequence[str],
) -> Source:
    """A CSV split's images with the target column ``target`` of one's own
    (:func:`csv_target_rows`): int32 where every value of the split's file and of the files
    ``others`` (the run's other splits; those missing or without the column are passed over)
    is an integer, else float32 (so that a run's splits agree and no other file changes
    them)."""
    table = _csv_table(path)
    names, rows = csv_target_rows(path, target, class_names, table)
    one_column = target in table[0]
    scalar = one_column and all(len(texts) == 1 for _, _, texts in rows)
    width = len(names)
    for line, filename, texts in rows:
        if len(texts) != width:
            raise DataError(
                f"{path}:{line}: {len(texts)} values for {target!r} ({filename}); other rows "
                f"hold {width} (every example holds as many)."
            )
        if bad := next((t for t in texts if not _NUMBER.fullmatch(t)), None):
            raise DataError(
                f"{path}:{line}: {bad!r} is not a number ({target!r} of {filename}): plain "
                "decimal or scientific notation (2, -0.5, 1e-3); no nan, inf or '_'."
            )
    integers = all(_INTEGER.fullmatch(t) for _, _, texts in rows for t in texts)
    for other in dict.fromkeys(others):  # each file once
        if not integers:
            break
        if other == path or not file_path(other).exists():
            continue
        header, lines = other_table = _csv_table(other)
        if header[:1] != ["filename"] or not any(
            h == target or h.startswith(f"{target}/") for h in header
        ):
            continue  # loading that split names what it lacks
        _, other_rows = csv_target_rows(other, target, None, other_table)
        integers = all(_INTEGER.fullmatch(t) for _, _, texts in other_rows for t in texts)
    if integers:  # int64 (beyond it: its bound, refused as beyond int32 by column_source)
        array = np.array([[int(t) for t in texts] for _, _, texts in rows], np.object_)
        array = array.clip(-(2**63), 2**63 - 1).astype(np.int64)
    else:
        array = np.array([[float(t) for t in texts] for _, _, texts in rows], np.float64)
    array = array.reshape(len(rows), *(() if scalar else (width,)))
    if class_names is None and not one_column:
        class_names = names
    paths = np.array([posixpath.join(root, f) for _, f, _ in rows], dtype=str)

    def row_text(row: int) -> str:  # the first bad row's, only when there is one
        line, filename, texts = rows[row]
        return f"line {line}, {filename}: {' '.join(texts)}"

    source = column_source({"path": paths, target: array}, target, class_names, path, row_text)
    return sliced(source, where)  # the whole file checked, as an array split
