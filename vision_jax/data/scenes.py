"""Synthetic segmentation-and-detection scenes composed from real images, seeded and offline.

Foreground items are gray IDX images (Fashion-MNIST by default), each upscaled, tinted with a
random colour and pasted at a random position fully inside a background: a random crop of a JPEG
read straight from a zip (Imagenette or CIFAR-10 from ``../shared``). Later items occlude earlier
ones. The truth for each scene:

* an index mask: 0 = background, ``class + 1`` where an item is visible (pixels of its upscaled
  gray image above ``threshold``);
* COCO boxes ``[x, y, w, h]``: the tight box of each item's *visible* pixels. An item whose visible
  area is under ``min_visible`` of its full mask area keeps its visible pixels in the mask and its
  box is a crowd region (``iscrowd`` 1: too occluded to ask a detector for, and not background
  either; COCO's convention: no location in it is a negative, no detection on it a false
  positive). An item hidden entirely gets nothing.

Layout written by :func:`generate_scenes` (read by the segmentation data loader)::

    out/classes.txt                          line i = name of mask index i ("background" first)
    out/<split>/images/000000.jpg            RGB (JPEG quality 95, or PNG)
    out/<split>/masks/000000.png             8-bit index PNG (mode "L"), same size as the image
    out/annotations/instances_<split>.json   COCO detection (image and annotation ids from 1)
    out/scenes.json                          generation parameters and summary

Splits ``train`` and ``test`` take items from the IDX ``train`` / ``t10k`` files and backgrounds
from disjoint pools: the zip's top-level ``train/`` and ``test/`` folders when it has both, else a
fixed hash of each member name (about 1 in 5 to test). Scene ``i`` of a split depends only on
``(seed, split, i)``, so the same seed gives byte-identical files.

CLI: ``python -m vision_jax.data.scenes --shared=../shared --out=/tmp/scenes --seed=0``; other
items: ``--items_dir=DIR`` (IDX files named as Fashion-MNIST's) and ``--class_names=a,b,c``
(comma-separated; without it ``class_0`` .. up to the largest label).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
import time
import zipfile
import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from vision_jax.data.idx import read_idx
from vision_jax.data.sources import DataError

FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
BACKGROUNDS = {
    "imagenette": "data/imagenette_224_val/imagenette2_224_val.zip",
    "cifar10": "data/cifar10_jpeg/cifar10_jpeg.zip",
}
ITEMS_DIR = "data/fashion_mnist"
SPLITS = ("train", "test")
_IDX_PREFIX = {"train": "train", "test": "t10k"}
_RESAMPLE = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR}
_FORMATS = {"jpg": ("JPEG", {"quality": 95}), "png": ("PNG", {})}
_BACKGROUND_EXTENSIONS = (".jpg", ".jpeg", ".png")
_TEST_HASH_MODULUS = 5

Box = dict[str, Any]


# ---------------------------------------------------------------------------- one scene


def _random_tint(rng: np.random.Generator) -> np.ndarray:
    """An RGB multiplier in (0, 1] with its brightest channel at 1 (a vivid colour)."""
    tint = rng.uniform(0.15, 1.0, 3)
    return tint / tint.max()


def _tight_box(visible: np.ndarray, x0: int, y0: int) -> list[float]:
    """COCO ``[x, y, w, h]`` of the true pixels of ``visible`` (offset by ``x0, y0``)."""
    ys, xs = np.nonzero(visible)
    x, y = int(xs.min()), int(ys.min())
    return [float(x0 + x), float(y0 + y), float(xs.max() - x + 1), float(ys.max() - y + 1)]


def compose_scene(
    background: np.ndarray,
    items: Sequence[tuple[np.ndarray, int]],
    rng: np.random.Generator,
    *,
    min_scale: float = 0.25,
    max_scale: float = 0.6,
    threshold: int = 40,
    min_visible: float = 0.3,
    resample: str = "bilinear",
) -> tuple[np.ndarray, np.ndarray, list[Box]]:
    """Pastes ``items`` (gray HxW uint8 image, class id) over ``background`` (HxWx3 uint8).

    Each item is resized to a random square side in ``[min_scale, max_scale]`` of the shorter
    image side, placed fully inside the image, painted as gray x random tint where its gray
    value exceeds ``threshold``; later items occlude earlier ones. Returns the image, the index
    mask (0 = background, class + 1) and one box per visible item: dicts with ``item`` (index
    in ``items``), ``category_id`` (class + 1), ``bbox`` (COCO ``[x, y, w, h]`` of the visible
    pixels), ``area`` (visible pixel count) and ``crowd`` (True when under ``min_visible`` of
    the item is visible), in item order.
    """
    if background.ndim != 3 or background.shape[2] != 3 or background.dtype != np.uint8:
        raise ValueError(f"background must be HxWx3 uint8, got {background.shape}.")
    if not 0 < min_scale <= max_scale <= 1:
        raise ValueError(f"Need 0 < min_scale <= max_scale <= 1, got {min_scale}, {max_scale}.")
    height, width = background.shape[:2]
    image = background.copy()
    mask = np.zeros((height, width), np.uint8)
    owner = np.full((height, width), -1, np.int32)
    placed = []
    for k, (gray, cls) in enumerate(items):
        if not 0 <= cls < 255:
            raise ValueError(f"Class ids must lie in [0, 255) for a uint8 mask, got {cls}.")
        side = int(round(rng.uniform(min_scale, max_scale) * min(height, width)))
        side = min(max(side, 1), height, width)
        y0 = int(rng.integers(0, height - side + 1))
        x0 = int(rng.integers(0, width - side + 1))
        tint = _random_tint(rng)
        up = np.asarray(Image.fromarray(gray).resize((side, side), _RESAMPLE[resample]))
        hit = up > threshold
        paint = np.round(up[..., None] * tint).astype(np.uint8)
        window = np.s_[y0 : y0 + side, x0 : x0 + side]
        image[window][hit] = paint[hit]
        mask[window][hit] = cls + 1
        owner[window][hit] = k
        placed.append((window, x0, y0, int(hit.sum()), cls))
    boxes = []
    for k, (window, x0, y0, full_area, cls) in enumerate(placed):
        visible = owner[window] == k
        area = int(visible.sum())
        if area == 0:
            continue
        bbox = _tight_box(visible, x0, y0)
        crowd = area < min_visible * full_area
        boxes.append({"item": k, "category_id": cls + 1, "bbox": bbox, "area": area,
                      "crowd": crowd})  # fmt: skip
    return image, mask, boxes


# ---------------------------------------------------------------------------- inputs


def _require_file(path: str, what: str) -> str:
    if not os.path.isfile(path):
        raise DataError(f"{what} {path} does not exist.")
    return path


def _idx_path(items_dir: str, split: str, kind: str) -> str:
    base = os.path.join(items_dir, f"{_IDX_PREFIX[split]}-{kind}-ubyte")
    for candidate in (base + ".gz", base):
        if os.path.isfile(candidate):
            return candidate
    raise DataError(f"IDX file {base}.gz does not exist.")


def load_items(items_dir: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Gray item images (N, H, W) uint8 and int labels of one split of an IDX dataset."""
    images = read_idx(_idx_path(items_dir, split, "images-idx3"))
    labels = read_idx(_idx_path(items_dir, split, "labels-idx1")).astype(np.int64)
    if images.ndim != 3 or labels.shape != images.shape[:1] or not len(labels):
        raise DataError(f"IDX images {images.shape} and labels {labels.shape} in {items_dir}.")
    return images, labels


def _check_labels(labels: np.ndarray, num_classes: int) -> None:
    if labels.max() >= num_classes:
        raise DataError(
            f"IDX labels reach {labels.max()}; only {num_classes} class names given "
            "(--class_names)."
        )


def default_class_names(items_dir: str | None, labels: Sequence[np.ndarray]) -> list[str]:
    """Fashion-MNIST's names for the default items, else ``class_0`` .. up to the largest label."""
    if items_dir is None:
        return list(FASHION_MNIST_CLASSES)
    return [f"class_{c}" for c in range(max(int(x.max()) for x in labels) + 1)]


def background_pools(names: Sequence[str]) -> dict[str, list[str]]:
    """Disjoint, sorted train/test lists of the image members of a zip (see module docstring)."""
    images = sorted(n for n in names if n.lower().endswith(_BACKGROUND_EXTENSIONS))
    tops = {n.split("/", 1)[0] for n in images if "/" in n}
    if {"train", "test"} <= tops:
        return {s: [n for n in images if n.startswith(s + "/")] for s in SPLITS}
    is_test = [zlib.crc32(n.encode()) % _TEST_HASH_MODULUS == 0 for n in images]
    return {
        "train": [n for n, t in zip(images, is_test, strict=True) if not t],
        "test": [n for n, t in zip(images, is_test, strict=True) if t],
    }


def random_background(
    archive: zipfile.ZipFile, name: str, size: int, rng: np.random.Generator
) -> np.ndarray:
    """A random square crop (half to all of the shorter side) of one zip member, size x size."""
    with Image.open(io.BytesIO(archive.read(name))) as decoded:
        picture = decoded.convert("RGB")
    width, height = picture.size
    side = rng.uniform(0.5, 1.0) * min(width, height)
    left = rng.uniform(0, width - side)
    top = rng.uniform(0, height - side)
    crop = (left, top, left + side, top + side)
    return np.asarray(picture.resize((size, size), Image.Resampling.BILINEAR, box=crop))


# ---------------------------------------------------------------------------- dataset


def _prepare_out_dir(out_dir: str) -> None:
    """Creates ``out_dir``; replaces a previous output, refuses a folder holding other files."""
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        if not os.path.isfile(os.path.join(out_dir, "scenes.json")):
            raise DataError(f"{out_dir} is not empty and holds no scenes.json: refusing to write.")
        for sub in (*SPLITS, "annotations"):
            shutil.rmtree(os.path.join(out_dir, sub), ignore_errors=True)
    for sub in [os.path.join(s, d) for s in SPLITS for d in ("images", "masks")]:
        os.makedirs(os.path.join(out_dir, sub), exist_ok=True)
    os.makedirs(os.path.join(out_dir, "annotations"), exist_ok=True)


def _write_split(
    out_dir: str,
    split: str,
    count: int,
    archive: zipfile.ZipFile,
    pool: list[str],
    items: tuple[np.ndarray, np.ndarray],
    class_names: Sequence[str],
    params: dict[str, Any],
) -> dict[str, Any]:
    """Writes ``count`` scenes of ``split`` and its COCO file; returns the split's summary."""
    images, labels = items
    size, fmt = params["image_size"], params["image_format"]
    pil_format, save_kwargs = _FORMATS[fmt]
    coco_images, annotations, dropped = [], [], 0
    pixels = np.zeros(len(class_names) + 1, np.int64)
    for i in range(count):
        rng = np.random.default_rng([params["seed"], SPLITS.index(split), i])
        background = random_background(archive, pool[rng.integers(len(pool))], size, rng)
        num = int(rng.integers(params["min_items"], params["max_items"] + 1))
        chosen = rng.integers(0, len(labels), num)
        scene = [(images[j], int(labels[j])) for j in chosen]
        image, mask, boxes = compose_scene(
            background,
            scene,
            rng,
            min_scale=params["min_scale"],
            max_scale=params["max_scale"],
            threshold=params["threshold"],
            min_visible=params["min_visible"],
            resample=params["resample"],
        )
        file_name = f"{i:06d}.{fmt}"
        Image.fromarray(image).save(
            os.path.join(out_dir, split, "images", file_name), pil_format, **save_kwargs
        )
        Image.fromarray(mask).save(os.path.join(out_dir, split, "masks", f"{i:06d}.png"), "PNG")
        pixels += np.bincount(mask.ravel(), minlength=len(pixels))[: len(pixels)]
        coco_images.append({"id": i + 1, "file_name": file_name, "width": size, "height": size})
        dropped += num - len(boxes)
        for box in boxes:
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": i + 1,
                    "category_id": box["category_id"],
                    "bbox": box["bbox"],
                    "area": float(box["area"]),
                    "iscrowd": int(box["crowd"]),
                }
            )
    coco = {
        "info": {"description": f"vision_jax.data.scenes {split} split", "version": "1"},
        "images": coco_images,
        "annotations": annotations,
        "categories": [{"id": c + 1, "name": n} for c, n in enumerate(class_names)],
    }
    with open(os.path.join(out_dir, "annotations", f"instances_{split}.json"), "w") as f:
        json.dump(coco, f)
    names = ["background", *class_names]
    fractions = pixels / max(int(pixels.sum()), 1)
    return {
        "images": count,
        "boxes": len(annotations),
        "crowd_regions": sum(a["iscrowd"] for a in annotations),
        "items_without_box": dropped,
        "pixel_fraction": {n: round(float(p), 6) for n, p in zip(names, fractions, strict=True)},
    }


def _check_params(params: dict[str, Any]) -> None:
    if params["background"] not in BACKGROUNDS and params["background_zip"] is None:
        raise DataError(f"background must be one of {sorted(BACKGROUNDS)}.")
    if params["image_format"] not in _FORMATS:
        raise DataError(f"image_format must be one of {sorted(_FORMATS)}.")
    if params["resample"] not in _RESAMPLE:
        raise DataError(f"resample must be one of {sorted(_RESAMPLE)}.")
    if not 0 <= params["min_items"] <= params["max_items"]:
        raise DataError("Need 0 <= min_items <= max_items.")
    if not 0 < params["min_scale"] <= params["max_scale"] <= 1:
        raise DataError("Need 0 < min_scale <= max_scale <= 1.")
    if params["image_size"] < 8 or params["num_train"] < 0 or params["num_test"] < 0:
        raise DataError("Need image_size >= 8 and non-negative scene counts.")


def generate_scenes(
    out_dir: str,
    *,
    shared_dir: str = "../shared",
    num_train: int = 1000,
    num_test: int = 200,
    image_size: int = 224,
    min_items: int = 1,
    max_items: int = 4,
    min_scale: float = 0.25,
    max_scale: float = 0.6,
    background: str = "imagenette",
    image_format: str = "jpg",
    seed: int = 0,
    threshold: int = 40,
    min_visible: float = 0.3,
    resample: str = "bilinear",
    items_dir: str | None = None,
    background_zip: str | None = None,
    class_names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Writes the scene dataset (layout in the module docstring) and returns its summary.

    Items come from ``items_dir`` (default ``shared_dir/data/fashion_mnist``), backgrounds from
    ``background_zip`` (default: the ``background`` zip under ``shared_dir``). Class ``c`` of the
    items is named ``class_names[c]``; without names, Fashion-MNIST's for the default items, else
    ``class_0`` .. ``class_<largest label>``. The summary has,
    per split, the image and box counts (``crowd_regions`` of them crowd boxes), the items hidden
    entirely (``items_without_box``: no box, not even a crowd one), and per-class pixel
    fractions. A missing input raises :class:`DataError` naming the path.
    """
    params = {
        "seed": seed,
        "image_size": image_size,
        "num_train": num_train,
        "num_test": num_test,
        "min_items": min_items,
        "max_items": max_items,
        "min_scale": min_scale,
        "max_scale": max_scale,
        "threshold": threshold,
        "min_visible": min_visible,
        "resample": resample,
        "background": background,
        "image_format": image_format,
        "background_zip": background_zip,
    }
    _check_params(params)
    given_items, items_dir = items_dir, items_dir or os.path.join(shared_dir, ITEMS_DIR)
    zip_path = background_zip or os.path.join(shared_dir, BACKGROUNDS[background])
    items = {s: load_items(items_dir, s) for s in SPLITS}
    if class_names is None:
        class_names = default_class_names(given_items, [items[s][1] for s in SPLITS])
    if not all(class_names):
        raise DataError(f"Class names must not be empty, got {list(class_names)}.")
    if twice := sorted({n for n in class_names if list(class_names).count(n) > 1}):
        raise DataError(
            f"Class names must differ: {', '.join(twice)} given more than once "
            f"(--class_names={','.join(class_names)})."
        )
    for split in SPLITS:
        _check_labels(items[split][1], len(class_names))
    params.update(items_dir=items_dir, background_zip=zip_path, class_names=list(class_names))
    with zipfile.ZipFile(_require_file(zip_path, "Background zip")) as archive:
        pools = background_pools(archive.namelist())
        for split in SPLITS:
            if not pools[split]:
                raise DataError(f"{zip_path} has no {split} background images (.jpg/.png).")
        _prepare_out_dir(out_dir)
        counts = {"train": num_train, "test": num_test}
        summary = {
            s: _write_split(out_dir, s, counts[s], archive, pools[s], items[s], class_names, params)
            for s in SPLITS
        }
    with open(os.path.join(out_dir, "classes.txt"), "w") as f:
        f.write("".join(f"{n}\n" for n in ["background", *class_names]))
    params["background_pool_sizes"] = {s: len(pools[s]) for s in SPLITS}
    with open(os.path.join(out_dir, "scenes.json"), "w") as f:
        json.dump({"params": params, "summary": summary}, f, indent=1)
    return summary


# ---------------------------------------------------------------------------- CLI


def _split_names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",")]


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: generates the scenes and prints the summary as one JSON line."""
    parser = argparse.ArgumentParser(
        prog="python -m vision_jax.data.scenes", description=__doc__.split("\n", 1)[0]
    )
    parser.add_argument("--shared", default="../shared", help="folder holding data/...")
    parser.add_argument("--out", required=True, help="output folder (created)")
    parser.add_argument("--num_train", type=int, default=1000)
    parser.add_argument("--num_test", type=int, default=200)
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--min_items", type=int, default=1)
    parser.add_argument("--max_items", type=int, default=4)
    parser.add_argument("--min_scale", type=float, default=0.25)
    parser.add_argument("--max_scale", type=float, default=0.6)
    parser.add_argument("--background", choices=sorted(BACKGROUNDS), default="imagenette")
    parser.add_argument("--format", choices=sorted(_FORMATS), default="jpg")
    parser.add_argument("--resample", choices=sorted(_RESAMPLE), default="bilinear")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--items_dir", default=None, help="IDX item folder (overrides --shared)")
    parser.add_argument("--background_zip", default=None, help="zip of JPEG/PNG backgrounds")
    parser.add_argument(
        "--class_names",
        default=None,
        help="comma-separated names of item classes 0, 1, ... (default: Fashion-MNIST's for the "
        "default items, else class_0 .. class_<largest label>)",
    )
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        summary = generate_scenes(
            args.out,
            shared_dir=args.shared,
            num_train=args.num_train,
            num_test=args.num_test,
            image_size=args.image_size,
            min_items=args.min_items,
            max_items=args.max_items,
            min_scale=args.min_scale,
            max_scale=args.max_scale,
            background=args.background,
            image_format=args.format,
            resample=args.resample,
            seed=args.seed,
            items_dir=args.items_dir,
            background_zip=args.background_zip,
            class_names=None if args.class_names is None else _split_names(args.class_names),
        )
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    seconds = round(time.perf_counter() - start, 2)
    print(json.dumps({"out": args.out, "seconds": seconds, **summary}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
