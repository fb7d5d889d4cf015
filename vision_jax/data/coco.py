"""Detection sources: COCO JSON files with an image folder, and tfds datasets with ``objects``.

Both give a :class:`Source` with ``target == "boxes"``: examples ``{"path" or "image", "row"}``
(``row`` indexes ``annotations["images"]``) and the split's ground truth ``annotations`` (COCO
format, original pixels; see :mod:`vision_jax.data.boxes` for how batches get their boxes).
The ground truth is checked here: a box without area or wholly outside its image, an unknown
category or image id, or a missing image file is a DataError naming the file and the
annotation, or with ``skip_corrupt`` counted, logged and left out. A box that sticks out of its
image is clipped to it for training (as torchvision's and detectron2's loaders do; more than
:data:`TOLERANCE` pixels is logged once per source) and evaluated as written, as pycocotools
reads the file. Crowd regions (``iscrowd``) are kept as such; images without boxes too. An
image without ``width``/``height`` (optional, as for pycocotools) takes its file header's.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import posixpath
import warnings
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from vision_jax.tf_without_keras import tf

import numpy as np
from PIL import Image

from vision_jax.data import augment, exif
from vision_jax.data.folders import apply_slice, parse_split
from vision_jax.data.sources import (
    DataError,
    Source,
    file_path,
    list_names,
    tfds_origin,
    tfds_split,
)

logger = logging.getLogger(__name__)

TOLERANCE = 1.0  # pixels a box may stick out of its image unlogged (float rounding)
ANNOTATIONS = "annotations/instances_{split}.json"
IMAGES = "{split}"
_KEYS = {
    "categories": ("id", "name"),
    "images": ("id", "file_name", "width", "height"),
    "annotations": ("id", "image_id", "category_id", "bbox"),
}


def from_coco(
    root: str,
    split: str,
    *,
    annotations: str = ANNOTATIONS,
    images: str = IMAGES,
    skip_corrupt: bool = False,
) -> Source:
    """COCO detection files: ``root/annotations`` (the JSON) and ``root/images`` (the folder
    its ``file_name`` s are relative to), ``{split}`` replaced by the split name. ``split`` may
    be sliced like image folders (``"train[:90%]"``): a fixed share of the images."""
    name, where = parse_split(split)
    json_path = posixpath.join(root, annotations.replace("{split}", name))
    image_dir = posixpath.join(root, images.replace("{split}", name))
    coco = _read_json(json_path)
    categories = _records(coco, "categories", json_path)
    _check_category_names(categories, json_path)
    all_images = _records(coco, "images", json_path)
    for image in all_images:
        image["file_name"] = file_name(image["file_name"])
    if not file_path(image_dir).is_dir():
        raise DataError(f"COCO image folder {image_dir} does not exist (data.coco_images).")
    missing = _missing_files(all_images, image_dir)
    if all_images and len(missing) == len(all_images):
        raise DataError(
            f"COCO image folder {image_dir} holds none of the {len(all_images)} image file(s) "
            f"{json_path} names (the first: {image_dir}/{all_images[0]['file_name']}): set "
            "data.coco_images to the folder under data.root that its file_names are relative to."
        )
    problems = [f"image {im['id']}: {image_dir}/{im['file_name']} is missing" for im in missing]
    missing_ids = {im["id"] for im in missing}
    orientations: dict[str, int] = {}  # of the headers read for sizes: not read again
    sized = [im for im in all_images if im["id"] not in missing_ids]
    problems += _read_sizes(sized, image_dir, orientations)
    by_id = {im["id"]: im for im in all_images}
    anns, bad_anns = _checked_annotations(coco, by_id, categories, json_path)
    _report(bad_anns + problems, json_path, skip_corrupt)
    missing_ids |= {im["id"] for im in all_images if not _sized(im)}
    kept = sorted((im for im in all_images if im["id"] not in missing_ids), key=lambda im: im["id"])
    rows = apply_slice({"row": np.arange(len(kept))}, where)["row"]
    kept = [kept[row] for row in rows]
    if not kept:
        raise DataError(f"{json_path} (split {split!r}) holds no images with files.")
    if not anns:
        logger.warning("%s holds no annotations: every image is background only.", json_path)
    columns = {
        "path": np.array([posixpath.join(image_dir, im["file_name"]) for im in kept], dtype=str),
        "row": np.arange(len(kept), dtype=np.int32),
    }
    source = _box_source(None, kept, anns, categories, columns, skip_corrupt)
    _warn_of_unused_categories(source.annotations, f"{json_path} (split {split!r})")
    exif.warn_of_turned(columns["path"], "boxes", f"{json_path} (split {split!r})", orientations)
    return source


def _warn_of_unused_categories(ground_truth: dict, where: str) -> None:
    """Warns of categories without an annotation: trained as classes without examples, and
    left out of the mean AP by pycocotools (no ground truth)."""
    used = {a["category_id"] for a in ground_truth["annotations"]}
    unused = [f"{c['name']} ({c['id']})" for c in ground_truth["categories"] if c["id"] not in used]
    if used and unused:
        logger.warning(
            "%s: %d categor(ies) have no annotation: %s. They stay classes (without examples "
            "in this split); pycocotools leaves a category without ground truth out of its "
            "mean AP.", where, len(unused), ", ".join(unused[:10]),
        )  # fmt: skip


def from_image_files(
    paths: Sequence[str], class_names: Sequence[str], category_ids: Sequence[int]
) -> tuple[Source, list[tuple[str, str]]]:
    """A box source over image files without ground truth (to predict on), image ids 1, 2, ...
    in the order of ``paths``; and the files whose header cannot be read (left out), as (path,
    reason). Files that fail later, when decoded, are skipped by the pipeline."""
    images, unreadable = [], []
    for path in paths:
        size = upright_size_of(path)
        if isinstance(size, str):
            unreadable.append((path, size))
            continue
        width, height = size
        images.append({"id": len(images) + 1, "file_name": path, "width": width, "height": height})
    if not images:
        raise DataError(f"None of the {len(paths)} image file(s) can be read.")
    columns = {
        "path": np.array([im["file_name"] for im in images], dtype=str),
        "row": np.arange(len(images), dtype=np.int32),
    }
    categories = [{"id": int(i), "name": n} for i, n in zip(category_ids, class_names, strict=True)]
    source = _box_source(None, images, [], categories, columns, skip_corrupt=True)
    return source, unreadable


def upright_size_of(path: str, orientations: dict[str, int] | None = None) -> tuple[int, int] | str:
    """The (width, height) of the image file ``path`` upright, as the pipeline decodes it, from
    its header (however many pixels: PIL's limit guards decoding, which the pipeline does);
    or why it cannot be read. ``orientations``: its EXIF orientation is put there too."""
    limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None  # opening reads the header alone
    try:
        with Image.open(path) as image:
            if orientations is not None:
                orientations[path] = exif.orientation_in(image)
            return exif.upright_size(image)
    except (OSError, ValueError) as e:
        return str(e)
    finally:
        Image.MAX_IMAGE_PIXELS = limit


def size_problem(path: str, size: tuple[int, int], annotated: tuple[int, int]) -> str | None:
    """How the image ``path``'s upright (width, height) ``size`` differs from its annotations'
    (``annotated``), or None."""
    if size == annotated:
        return None
    (w, h), (aw, ah) = size, annotated
    turned = ""
    if size == annotated[::-1] and exif.turned_by_exif(path):
        turned = (
            " (the image is turned upright by its EXIF orientation, as viewers show it; the "
            "annotations give its stored size: annotate the upright image, or save it upright)"
        )
    return f"image {path}: size {w}x{h} differs from its annotations' {aw}x{ah} (w x h){turned}"


def _check_sizes(ids: Mapping[str, int], images: Mapping[int, dict], annotations: str) -> None:
    """Raises if a file's size differs from its image record's (its boxes would be scored
    against boxes of another size); files that cannot be opened are left to the prediction."""
    problems = []
    for path, image_id in ids.items():
        image = images[image_id]
        if not _sized(image):
            continue
        if isinstance(size := upright_size_of(path), str):
            continue
        problems.append(size_problem(path, size, (image["width"], image["height"])))
    if bad := [p for p in problems if p]:
        more = f" (and {len(bad) - 3} more)" if bad[3:] else ""
        raise DataError(f"{annotations}: {'; '.join(bad[:3])}{more}.")


def image_ids_by_file(
    annotations: str, paths: Sequence[str], categories: Mapping[int, str]
) -> dict[str, int]:
    """The id in the COCO file ``annotations`` of each image file in ``paths``: of the image
    whose ``file_name`` (relative to whatever folder) the path ends with, the longest such; so
    that predictions on those files are results pycocotools scores against that file. A path
    that no image names, or that two images name alike, is a DataError naming it; so is a
    category of the model's (``categories``: id -> name) that the file names otherwise."""
    coco = _read_json(annotations, "--coco_annotations")
    theirs = {c["id"]: c["name"] for c in _records(coco, "categories", annotations)}
    other = [f"{name} (id {i}: {theirs.get(i, 'absent')})" for i, name in categories.items()
             if theirs.get(i) != name]  # fmt: skip
    if other:
        raise DataError(
            f"{annotations}: the model's categories are not that file's: {', '.join(other[:5])}."
        )
    images = _records(coco, "images", annotations)
    by_name: dict[str, list[int]] = {}
    for image in images:
        name = file_name(image["file_name"]).lstrip("/")
        by_name.setdefault(name, []).append(image["id"])
    ids, unnamed = {}, []
    for path in paths:
        parts = posixpath.normpath(path.replace("\\", "/")).split("/")
        tails = ("/".join(parts[k:]) for k in range(len(parts)))  # the longest first
        found = next((by_name[tail] for tail in tails if tail in by_name), None)
        if found is None:
            unnamed.append(path)
        elif len(found) > 1:
            raise DataError(f"{annotations}: images {found} all name the file {path}.")
        else:
            ids[path] = found[0]
    _check_sizes(ids, {image["id"]: image for image in images}, annotations)
    shared = sorted(i for i, n in Counter(ids.values()).items() if n > 1)
    if shared:
        both = [p for p, i in ids.items() if i == shared[0]]
        raise DataError(f"{annotations}: image {shared[0]} names several files: {both}.")
    if unnamed:
        listed = ", ".join(unnamed[:3]) + (" ..." if unnamed[3:] else "")
        raise DataError(f"{len(unnamed)} file(s) are not images of {annotations}: {listed}.")
    return ids


def file_name(name: str) -> str:
    """A COCO ``file_name`` as a POSIX path: Windows' backslashes as slashes, ``./`` and ``..``
    resolved (as the files are found, for training and for predictions alike)."""
    return posixpath.normpath(str(name).replace("\\", "/"))


def _read_sizes(images: list[dict], image_dir: str, orientations: dict[str, int]) -> list[str]:
    """Gives the ``images`` without ``width`` or ``height`` (optional, as for pycocotools) their
    upright size from their file's header (no decoding), their orientations put in
    ``orientations``; what cannot be read, as problems. Sizes given are checked against the
    decoded images in the pipeline."""
    problems = []
    for image in images:
        if _sized(image):
            continue
        path = posixpath.join(image_dir, image["file_name"])
        with warnings.catch_warnings():  # PIL's for damaged EXIF data: the pipeline decodes
            warnings.simplefilter("ignore")
            size = upright_size_of(path, orientations)
        if isinstance(size, str):
            problems.append(f"image {image['id']}: {path} has no width/height and its header "
                            f"cannot be read ({size})")  # fmt: skip
            continue
        image.setdefault("width", size[0])
        image.setdefault("height", size[1])
    return problems


def _box_source(
    dataset: tf.data.Dataset | None,
    images: list[dict],
    anns: Iterable[dict],
    categories: list[dict],
    columns: dict[str, np.ndarray] | None,
    skip_corrupt: bool,
) -> Source:
    """A box :class:`Source` over ``images`` (in row order) with the ``anns`` of those images."""
    categories = sorted(categories, key=lambda c: c["id"])
    ids = {im["id"] for im in images}
    ground_truth = {
        "images": [{k: im[k] for k in _KEYS["images"]} for im in images],
        "annotations": [_annotation(a) for a in anns if a["image_id"] in ids],
        "categories": [{"id": c["id"], "name": c["name"]} for c in categories],
    }
    return Source(
        dataset,
        len(images),
        [str(c["name"]) for c in categories],
        columns,
        skip_corrupt,
        target="boxes",
        annotations=ground_truth,
        category_ids=[int(c["id"]) for c in categories],
    )


def _annotation(ann: dict) -> dict:
    """The COCO fields a box annotation needs (area w * h when absent)."""
    x, y, w, h = (float(v) for v in ann["bbox"])
    return {
        "id": int(ann["id"]),
        "image_id": int(ann["image_id"]),
        "category_id": int(ann["category_id"]),
        "bbox": [x, y, w, h],
        "area": float(ann.get("area", w * h)),
        "iscrowd": int(bool(ann.get("iscrowd", 0))),
    }


def _read_json(path: str, setting: str = "data.coco_annotations") -> dict:
    if not file_path(path).exists():
        raise DataError(f"COCO annotation file {path} does not exist ({setting}).")
    try:
        coco = json.loads(file_path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(coco, dict):
        raise DataError(f"{path} must hold a COCO object with images, annotations, categories.")
    return coco


def _records(coco: dict, key: str, path: str) -> list[dict]:
    """``coco[key]``, each record holding the keys detection needs."""
    records = coco.get(key)
    if not isinstance(records, list):
        raise DataError(f"{path} has no {key!r} list.")
    for i, record in enumerate(records):
        needed = [k for k in _KEYS[key] if k not in _OPTIONAL]
        lacking = [k for k in needed if not isinstance(record, dict) or k not in record]
        if lacking:
            raise DataError(f"{path}: {key}[{i}] lacks {', '.join(lacking)}.")
        checked = ("id",) if key == "annotations" else _KEYS[key]  # the others: _problem
        for field in (f for f in checked if f in record):
            kind, what = _FIELD_TYPES[field]
            if not _is(record[field], kind):
                raise DataError(f"{path}: {key}[{i}] has {field} {record[field]!r}, not {what}.")
        if key == "images":
            _check_image_id(record["id"], f"{path}: {key}[{i}]")
    _check_unique(records, key, path)
    return records


_OPTIONAL = ("width", "height")  # read from the image file's header when absent
_FIELD_TYPES = {  # field -> (type, in words), for the fields of _KEYS
    "id": (int, "an integer"),
    "image_id": (int, "an integer"),
    "category_id": (int, "an integer"),
    "width": (float, "a positive number"),
    "height": (float, "a positive number"),
    "file_name": (str, "a string"),
    "name": (str, "a string"),
}


def _is(value: Any, kind: type) -> bool:
    """``value`` is an integer (a whole float too, as JSON writers give ``1.0``; not a bool), a
    positive finite number (``float``), or a ``str``."""
    if isinstance(value, bool):
        return False
    if kind is float:
        return isinstance(value, int | float) and bool(np.isfinite(value)) and value > 0
    if kind is int:
        return isinstance(value, int) or (isinstance(value, float) and value.is_integer())
    return isinstance(value, kind)


def _check_image_id(image_id: int, where: str) -> None:
    """Image ids are int32 in the batches, and -1 marks a padding row."""
    if not 0 <= image_id < 2**31:
        raise DataError(f"{where} has id {image_id}, not in [0, 2**31).")


def _check_unique(records: list[dict], what: str, where: str) -> None:
    """A DataError naming an id that two ``records`` share."""
    seen = set()
    for record in records:
        if record["id"] in seen:
            raise DataError(f"{where}: {what} id {record['id']} appears twice.")
        seen.add(record["id"])


def _check_category_names(categories: list[dict], path: str) -> None:
    """Category names name the classes (splits are matched by them): each once."""
    names = Counter(str(c["name"]) for c in categories)
    twice = sorted(name for name, n in names.items() if n > 1)
    if twice:
        ids = {n: [c["id"] for c in categories if str(c["name"]) == n] for n in twice}
        raise DataError(f"{path}: categories {ids} share a name; each class needs its own.")


def _checked_annotations(
    coco: dict, images: dict, categories: list[dict], path: str
) -> tuple[list[dict], list[str]]:
    """The good annotations, and what is wrong with the others."""
    category_ids = {c["id"] for c in categories}
    good, problems = [], []
    for ann in _records(coco, "annotations", path):
        problem = _problem(ann, images, category_ids)
        if problem:
            problems.append(f"annotation {ann['id']}: {problem}")
        else:
            good.append(ann)
    _log_clipped(good, images, path)
    return good, problems


def _problem(ann: dict, images: dict, category_ids: set) -> str | None:
    """What is wrong with one annotation, or None."""
    for field in ("image_id", "category_id"):
        if not _is(ann[field], int):
            return f"{field} {ann[field]!r} is not an integer"
    image = images.get(ann["image_id"])
    if image is None:
        return f"unknown image_id {ann['image_id']}"
    if ann["category_id"] not in category_ids:
        return f"unknown category_id {ann['category_id']!r}"
    if not _sized(image):
        return None  # its file is missing or unreadable: the image's problem, left out
    bbox = ann["bbox"]
    if not isinstance(bbox, list) or len(bbox) != 4:
        return f"bbox {bbox!r} is not [x, y, width, height]"
    return box_problem(bbox, image["width"], image["height"], image["file_name"])


def box_problem(bbox: list, width: float, height: float, file_name: str) -> str | None:
    """What is wrong with a COCO box ``[x, y, w, h]`` of a ``width`` x ``height`` image."""
    if not all(isinstance(v, int | float) and np.isfinite(v) for v in bbox):
        return f"bbox {bbox!r} holds non-numbers"
    x, y, w, h = bbox
    if w <= 0 or h <= 0:
        return f"box {bbox} has no area (width and height must be > 0)"
    if x >= width or y >= height or x + w <= 0 or y + h <= 0:
        return f"box {bbox} lies outside its image {file_name} ({width}x{height})"
    return None


def _sticks_out(bbox: list, width: float, height: float) -> bool:
    """Whether a (valid) COCO box reaches more than :data:`TOLERANCE` pixels past its image."""
    x, y, w, h = bbox
    return min(x, y) < -TOLERANCE or x + w > width + TOLERANCE or y + h > height + TOLERANCE


def _sized(image: dict) -> bool:
    """Whether an image record has its size (given, or read from its file)."""
    return "width" in image and "height" in image


def _log_clipped(anns: list[dict], images: dict, where: str) -> None:
    """One line naming the boxes (of ``anns``, valid) that training clips to their image."""
    anns = [a for a in anns if _sized(images[a["image_id"]])]
    clipped = [
        f"annotation {a['id']} {a['bbox']} in {image['file_name']} "
        f"({image['width']}x{image['height']})"
        for a in anns
        if _sticks_out(a["bbox"], (image := images[a["image_id"]])["width"], image["height"])
    ]
    if clipped:
        more = f" (and {len(clipped) - 3} more)" if clipped[3:] else ""
        logger.info(
            "%s: %d box(es) stick out of their image; training clips them to it, evaluation "
            "reads them as written: %s%s.", where, len(clipped), "; ".join(clipped[:3]), more,
        )  # fmt: skip


def _missing_files(images: list[dict], image_dir: str) -> list[dict]:
    """The images whose files are missing (one listing per folder)."""
    listings, missing = {}, []
    for image in images:
        folder, name = posixpath.split(posixpath.join(image_dir, image["file_name"]))
        if folder not in listings:
            exists = file_path(folder).is_dir()
            listings[folder] = set(list_names(folder)) if exists else set()
        if name not in listings[folder]:
            missing.append(image)
    return missing


def _report(problems: list[str], where: str, skip_corrupt: bool) -> None:
    """Raises on ``problems``, or with ``skip_corrupt`` logs (and counts) them."""
    if not problems:
        return
    shown = "; ".join(problems[:5]) + (f" (and {len(problems) - 5} more)" if problems[5:] else "")
    if not skip_corrupt:
        raise DataError(
            f"{where}: {shown}. Fix the ground truth, or set data.skip_corrupt = True to skip "
            "such annotations and images."
        )
    logger.warning("%s: skipping %d bad annotation(s)/image(s): %s.", where, len(problems), shown)


# tfds.


def from_tfds_boxes(
    name: str, split: str, data_dir: str | None = None, *, skip_corrupt: bool = False
) -> Source:
    """A prepared tfds detection dataset (``coco/2017``, ``voc/2007``): feature ``objects``
    with ``bbox`` (normalised ymin, xmin, ymax, xmax), ``label`` and optional ``is_crowd``.

    One pass over the split builds the ground truth: image sizes from the JPEG headers (other
    formats are decoded), image ids from ``image/id`` (else the 1-based example index), file
    names from ``image/filename``, category ids 1..C for the labels' names.
    """
    features, ds, provenance = tfds_split(name, split, data_dir)
    objects = features["objects"] if "objects" in features else {}
    if "bbox" not in objects or "label" not in objects:
        raise DataError(
            f"tfds dataset {name!r} has no 'objects' feature with 'bbox' and 'label' "
            f"(features: {sorted(features)})."
        )
    where = f"tfds {name} {split}"
    images, anns, problems = [], [], []
    for row, record in enumerate(ds.map(_tfds_record).as_numpy_iterator()):
        image = _tfds_image(record, row, where)
        images.append(image)
        for ann in _tfds_annotations(record, image, first_id=len(anns) + len(problems) + 1):
            problem = box_problem(ann["bbox"], image["width"], image["height"], image["file_name"])
            if problem:
                problems.append(f"annotation {ann['id']}: {problem}")
            else:
                anns.append(ann)
    _report(problems, where, skip_corrupt)
    if not images:
        raise DataError(f"{where} holds no examples.")
    _check_unique(images, "images", where)
    names = objects["label"].names
    categories = [{"id": i + 1, "name": n} for i, n in enumerate(names)]
    dataset = ds.enumerate().map(
        lambda row, ex: {"image": ex["image"], "row": tf.cast(row, tf.int32)}
    )
    source = _box_source(dataset, images, anns, categories, None, skip_corrupt)
    return dataclasses.replace(source, origin=tfds_origin(name, split), provenance=provenance)


def _tfds_record(example: dict) -> dict:
    """What the ground truth needs of one tfds example."""
    objects = example["objects"]
    data = example["image"]
    shape = tf.cond(
        tf.io.is_jpeg(data),
        lambda: tf.image.extract_jpeg_shape(data)[:2],
        lambda: tf.shape(augment.decode(data))[:2],
    )
    crowd = objects.get("is_crowd", tf.zeros_like(objects["label"], tf.bool))
    record = {"shape": shape, "bbox": objects["bbox"], "label": objects["label"], "crowd": crowd}
    for key in ("image/id", "image/filename"):
        if key in example:
            record[key] = example[key]
    return record


def _tfds_image(record: dict, row: int, where: str) -> dict:
    """The COCO image record of tfds example ``row``."""
    height, width = (int(v) for v in record["shape"])
    name = record.get("image/filename")
    image_id = int(record.get("image/id", row + 1))
    _check_image_id(image_id, f"{where} example {row}")
    return {
        "id": image_id,
        "file_name": name.decode() if name is not None else f"{where} example {row}",
        "width": width,
        "height": height,
    }


def _tfds_annotations(record: dict, image: dict, first_id: int) -> list[dict]:
    """COCO annotations of one tfds example (boxes in pixels), ids from ``first_id``."""
    width, height = image["width"], image["height"]
    anns = []
    for k, (box, label, crowd) in enumerate(
        zip(record["bbox"], record["label"], record["crowd"], strict=True)
    ):
        ymin, xmin, ymax, xmax = (float(v) for v in box)
        bbox = [xmin * width, ymin * height, (xmax - xmin) * width, (ymax - ymin) * height]
        anns.append(
            {
                "id": first_id + k,
                "image_id": image["id"],
                "category_id": int(label) + 1,
                "bbox": bbox,
                "area": bbox[2] * bbox[3],
                "iscrowd": int(crowd),
            }
        )
    return anns
