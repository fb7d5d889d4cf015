"""Running a trained detection run on image files: COCO-format results and images with boxes.

``python -m vision_jax.predict --workdir=RUN --input=DIR|FILE|GLOB --output=detections.json
[--draw=DIR] [--draw_threshold=0.5]``

The run's record gives the task settings, the model, the class names and category ids and the
input (size, mean, std); images go through the evaluation pipeline (letterboxed, in batches)
and the jitted model and post-processing of the evaluation, so predictions equal what the
evaluation scored. Unreadable files are reported by name and skipped.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections

from vision_jax import data as data_lib
from vision_jax import specs
from vision_jax.config import TrackedConfig
from vision_jax.data.coco import from_image_files
from vision_jax.tasks.coco_eval import coco_results
from vision_jax.weights.run_dir import read_record, read_variables

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")


def image_files(pattern: str) -> list[str]:
    """The image files of a folder (sorted), a glob pattern, or one file."""
    if os.path.isdir(pattern):
        names = sorted(os.listdir(pattern))
        return [os.path.join(pattern, n) for n in names if n.lower().endswith(IMAGE_SUFFIXES)]
    files = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
    if not files or not all(os.path.isfile(f) for f in files):
        raise FileNotFoundError(f"No image files at {pattern!r}.")
    return files


class Predictor:
    """A trained detection run, ready to detect objects in image files.

    ``detect(paths)`` returns COCO results (``image_id``, ``category_id``, ``bbox`` [x, y, w,
    h] in original pixels, ``score``) with ``file_name`` and ``category_name`` added, and the
    files that could not be read.
    """

    def __init__(self, workdir: str, *, batch_size: int = 16):
        from vision_jax.run import task_model

        record = read_record(workdir)
        if record.task != "detection":
            raise ValueError(
                f"{workdir} is a {record.task or 'classification'} run; vision_jax.predict runs "
                "detection runs."
            )
        spec = specs.run_spec(TrackedConfig(ml_collections.ConfigDict(record.config)))
        self.task, self.batch_size = spec.task, batch_size
        self.class_names = list(record.class_names)
        self.category_ids = list(record.category_ids or range(1, len(self.class_names) + 1))
        self.input = dataclasses.replace(
            spec.input, image_size=record.image_size, mean=record.mean, std=record.std
        )
        model = task_model(spec, len(self.class_names))
        self.variables = read_variables(workdir)

        def forward(variables: Any, batch: dict[str, jax.Array]) -> Any:
            outputs = model.apply(variables, batch["image"], train=False)
            return self.task.eval_metrics(outputs, batch)  # what the evaluation scores

        self._forward = jax.jit(forward)

    def detect(self, paths: Sequence[str]) -> tuple[list[dict], list[tuple[str, str]]]:
        """Detections of every readable file of ``paths``, and the unreadable ones (path,
        reason)."""
        source, unreadable = from_image_files(paths, self.class_names, self.category_ids)
        batches = data_lib.eval_batches(
            source, self.input, global_batch=self.batch_size, max_boxes=1
        )
        total = None
        for batch in batches:
            found = jax.device_get(self._forward(self.variables, batch))
            total = found if total is None else total.merge(found)
        merged = total.detections.compute()
        seen = set(merged["image_ids"].tolist()) - {0}
        images = {im["id"]: im["file_name"] for im in source.annotations["images"]}
        unreadable += [(images[i], "cannot be decoded") for i in sorted(set(images) - seen)]
        results = coco_results(merged, self.category_ids)
        names = dict(zip(self.category_ids, self.class_names, strict=True))
        for r in results:
            r["file_name"] = images[r["image_id"]]
            r["category_name"] = names[r["category_id"]]
        return results, unreadable


PALETTE = (
    (255, 64, 64), (64, 200, 64), (64, 128, 255), (255, 200, 0), (255, 64, 255), (0, 220, 220),
    (255, 128, 0), (160, 96, 255), (128, 255, 128), (255, 255, 255),
)  # fmt: skip


def draw_detections(path: str, detections: list[dict], out_path: str, threshold: float) -> None:
    """``path`` with the boxes of ``detections`` scoring at least ``threshold`` drawn, labelled
    with class name and score, saved to ``out_path``."""
    from PIL import Image, ImageDraw

    image = Image.open(path).convert("RGB")
    draw = ImageDraw.Draw(image)
    for d in sorted(detections, key=lambda d: d["score"]):
        if d["score"] < threshold:
            continue
        x, y, w, h = d["bbox"]
        colour = PALETTE[d["category_id"] % len(PALETTE)]
        draw.rectangle([x, y, x + w, y + h], outline=colour, width=2)
        draw.text((x + 2, y + 1), f"{d['category_name']} {d['score']:.2f}", fill=colour)
    image.save(out_path)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True, help="a detection run's workdir")
    parser.add_argument("--input", required=True, help="an image folder, file or glob pattern")
    parser.add_argument("--output", required=True, help="COCO results JSON to write")
    parser.add_argument("--draw", help="folder for the images with their boxes drawn")
    parser.add_argument("--draw_threshold", type=float, default=0.5)
    parser.add_argument("--batch_size", type=int, default=16)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    paths = image_files(args.input)
    results, unreadable = Predictor(args.workdir, batch_size=args.batch_size).detect(paths)
    for path, reason in unreadable:
        print(f"skipped {path}: {reason}", file=sys.stderr)
    with open(args.output, "w") as f:
        json.dump(results, f)
    if args.draw:
        os.makedirs(args.draw, exist_ok=True)
        skipped = {path for path, _ in unreadable}
        for path in (p for p in paths if p not in skipped):
            mine = [r for r in results if r["file_name"] == path]
            out = os.path.join(args.draw, os.path.splitext(os.path.basename(path))[0] + ".png")
            draw_detections(path, mine, out, args.draw_threshold)
    print(json.dumps({"images": len(paths) - len(unreadable), "skipped": len(unreadable),
                      "detections": len(results), "output": args.output}))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
