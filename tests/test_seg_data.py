"""Segmentation data: label-map sources (image folders with index PNGs, arrays, tfds), joint
image/label-map augmentation, eval coverage, exact resumption and errors naming the file."""

from __future__ import annotations

import dataclasses
import io
import logging
import pathlib
import struct
import tracemalloc
import zlib

import jax
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from vision_jax import data as data_lib
from vision_jax.config import TrackedConfig, default_config
from vision_jax.data import IGNORE_LABEL, augment
from vision_jax.data.pipeline import label_map_pixels
from vision_jax.data.preprocess import InputSpec, make_preprocess
from vision_jax.tasks import Segmentation

# Region colours (never black: black is padding), by class; grey marks ignored pixels.
COLOURS = {0: (220, 40, 40), 1: (40, 220, 40), 2: (40, 40, 220), 3: (220, 220, 40)}
GREY = (128, 128, 128)
CLASSES = ("background", "a", "b", "c")


def label_map_of(shape: tuple[int, int], block: int, seed: int) -> np.ndarray:
    """Rectangular blocks of random classes 0..3, some ignored (IGNORE_LABEL)."""
    rng = np.random.default_rng(seed)
    grid = rng.choice([0, 1, 2, 3, 3, IGNORE_LABEL], (shape[0] // block + 1, shape[1] // block + 1))
    return np.kron(grid, np.ones((block, block), np.int64))[: shape[0], : shape[1]].astype(np.uint8)


def image_of(label_map: np.ndarray) -> np.ndarray:
    """uint8 RGB with each class's colour (grey where ignored)."""
    palette = np.array([*COLOURS.values(), GREY], np.uint8)
    return palette[np.where(label_map == IGNORE_LABEL, 4, label_map)]


def save_mask(path: pathlib.Path, label_map: np.ndarray, palette: bool) -> None:
    mask = Image.fromarray(label_map, mode="L")
    if palette:  # VOC-style: colours in the palette, indices in the pixels
        mask = Image.fromarray(label_map).convert("P")
        mask.putpalette(list(np.random.default_rng(0).integers(0, 256, 768)))
        mask.putpixel((0, 0), int(label_map[0, 0]))
    mask.save(path, format="PNG")


def make_seg_folder(root: pathlib.Path, n: int = 7, size=(16, 16)) -> list[np.ndarray]:
    """root/train/{images,masks}/ (PNG images with palette and grayscale masks, alternately)
    and root/classes.txt; returns the label maps in file order."""
    (root / "train" / "images").mkdir(parents=True)
    (root / "train" / "masks").mkdir(parents=True)
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    maps = []
    for i in range(n):
        label_map = label_map_of(size, 4, seed=i)
        Image.fromarray(image_of(label_map)).save(root / "train" / "images" / f"{i:03d}.png")
        save_mask(root / "train" / "masks" / f"{i:03d}.png", label_map, palette=i % 2 == 0)
        maps.append(label_map)
    return maps


def data_config(**overrides) -> TrackedConfig:
    return TrackedConfig({"data": {**default_config().data.to_dict(), **overrides}})


def spec_of(**overrides) -> InputSpec:
    """Pixels stay 0..255 (up to rounding): mean 0, std 1/255; no crop or flip by default."""
    base = {"image_size": 16, "mean": (0,) * 3, "std": (1 / 255,) * 3}
    return InputSpec(**{**base, **overrides})


def take(batches, n: int) -> list[dict]:
    return [next(batches) for _ in range(n)]


# Reading label maps.


def test_palette_and_grayscale_pngs_read_as_indices(tmp_path):
    label_map = label_map_of((9, 13), 3, seed=0)
    for palette in (True, False):
        save_mask(tmp_path / "m.png", label_map, palette)
        assert Image.open(tmp_path / "m.png").mode == ("P" if palette else "L")
        decoded = augment.decode_index_png(tf.io.read_file(str(tmp_path / "m.png")))
        np.testing.assert_array_equal(decoded.numpy()[..., 0], label_map)
    small = Image.fromarray(label_map % 4).convert("P")  # few palette entries, 2 bits a pixel
    small.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255, 9, 9, 9])
    small.save(tmp_path / "s.png", bits=2)
    decoded = augment.decode_index_png(tf.io.read_file(str(tmp_path / "s.png")))
    np.testing.assert_array_equal(decoded.numpy()[..., 0], label_map % 4)
    Image.fromarray(image_of(label_map)).save(tmp_path / "rgb.png")
    with pytest.raises(tf.errors.InvalidArgumentError, match="grayscale or palette PNG"):
        augment.decode_index_png(tf.io.read_file(str(tmp_path / "rgb.png")))


def test_indices_past_a_short_palette_read_as_pil_reads_them(tmp_path):
    """VOC's masks: a 21-colour palette, and 255 ("void") past it. The indices are the
    pixels' own, as PIL reads them (libpng's expansion gives 0 for an index past the
    palette: void pixels would train as background)."""
    mask = np.zeros((6, 7), np.uint8)
    mask[0], mask[1], mask[2, :3] = 255, 1, 20
    image = Image.fromarray(mask, "P")
    image.putpalette([v for c in range(21) for v in (c * 12, 255 - c * 12, c)])
    image.save(tmp_path / "voc.png")
    assert len(Image.open(tmp_path / "voc.png").getpalette()) == 21 * 3  # short, as written
    decoded = augment.decode_index_png(tf.io.read_file(str(tmp_path / "voc.png")))
    np.testing.assert_array_equal(
        decoded.numpy()[..., 0], np.array(Image.open(tmp_path / "voc.png"))
    )
    np.testing.assert_array_equal(decoded.numpy()[..., 0], mask)


def test_a_text_chunk_holding_plte_before_the_palette(tmp_path):
    """The palette is found by walking the chunks: a tEXt or zTXt chunk before it may hold the
    bytes "PLTE" (splitting the file on them cut it at the comment)."""
    label_map = label_map_of((9, 13), 3, seed=1)
    save_mask(tmp_path / "m.png", label_map, palette=True)
    png = (tmp_path / "m.png").read_bytes()

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    at = png.index(b"PLTE") - 4
    for extra in (chunk(b"tEXt", b"Comment\x00PLTE chunk follows"),
                  chunk(b"zTXt", b"Comment\x00\x00" + zlib.compress(b"PLTE" * 20))):  # fmt: skip
        data = png[:at] + extra + png[at:]
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(data))), label_map)
        decoded = augment.decode_index_png(tf.constant(data))
        np.testing.assert_array_equal(decoded.numpy()[..., 0], label_map)
    # Damaged files end the walk and fail as PNGs (not with an out-of-range slice's message,
    # which held the file's bytes).
    length = struct.unpack(">I", png[at : at + 4])[0]
    for damaged in (png[:at] + b"\xff\xff\xff\xf0tEXt" + png[at:],  # a length over 2**31
                    png[:at] + b"\x7f\xff\xff\xfftEXt" + png[at:],  # at + length wraps
                    png[:at] + png[at + 12 + length :],  # no PLTE
                    png[: at + 6]):  # fmt: skip
        with pytest.raises(tf.errors.InvalidArgumentError, match="Invalid PNG"):
            augment.decode_index_png(tf.constant(damaged))


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_low_bit_grayscale_pngs_read_as_their_values(tmp_path, bits):
    """A 1-bit mask (PIL's mode "1") reads as 0 and 1, a 2- or 4-bit one as 0..3 or 0..15: not
    stretched to 8 bits (1 -> 255, the ignore label) as decode_png does for images."""
    values = np.random.default_rng(bits).integers(0, 1 << bits, (9, 13)).astype(np.uint8)
    if bits == 1:
        Image.fromarray(values.astype(bool)).save(tmp_path / "m.png")
    else:
        Image.fromarray(values, "L").save(tmp_path / "m.png", bits=bits)  # the values as samples
    assert (tmp_path / "m.png").read_bytes()[24:26] == bytes([bits, 0])  # depth, grayscale
    decoded = augment.decode_index_png(tf.io.read_file(str(tmp_path / "m.png")))
    np.testing.assert_array_equal(decoded.numpy()[..., 0], values)


def test_label_map_folder_eval_covers_every_pixel_once(tmp_path):
    maps = make_seg_folder(tmp_path)
    cfg = data_config(source="imagefolder", root=str(tmp_path))
    source = data_lib.load_source(cfg.data, "train", target="label_map")
    assert source.target == "label_map" and source.class_names == list(CLASSES)
    assert source.num_examples == 7
    batches = list(data_lib.eval_batches(source, spec_of(), global_batch=3))
    assert len(batches) == 3
    assert all(b.keys() == {"image", "label_map", "mask", "row"} for b in batches)
    mask = np.concatenate([b["mask"] for b in batches])
    np.testing.assert_array_equal(mask, [1] * 7 + [0] * 2)
    np.testing.assert_array_equal(np.concatenate([b["row"] for b in batches])[:7], range(7))
    label_maps = np.concatenate([b["label_map"] for b in batches])
    assert label_maps.dtype == np.int32 and label_maps.shape == (9, 16, 16)
    np.testing.assert_array_equal(label_maps[:7], np.stack(maps))  # whole image, no crop
    assert (label_maps[7:] == IGNORE_LABEL).all()
    head = data_lib.load_source(cfg.data, "train[:70%]", target="label_map")
    tail = data_lib.load_source(cfg.data, "train[70%:]", target="label_map")
    assert (head.num_examples, tail.num_examples) == (5, 2)
    assert not set(head.columns["path"]) & set(tail.columns["path"])
    named = data_lib.load_source(
        data_config(source="imagefolder", root=str(tmp_path), class_names=("x",) * 5).data,
        "train",
        target="label_map",
    )
    assert named.num_classes == 5


def test_raw_mask_values_of_an_image_folder_through_the_value_table(tmp_path):
    """ADE20K-style masks (0 = other, to ignore; classes from 1) read through
    data.label_map_values: batches (training and evaluation) and the split's check see the
    class ids; a raw value missing from the table names the file."""
    maps = make_seg_folder(tmp_path)
    raw_maps = [np.where(m == IGNORE_LABEL, 0, m + 1).astype(np.uint8) for m in maps]
    for i, raw in enumerate(raw_maps):
        save_mask(tmp_path / "train" / "masks" / f"{i:03d}.png", raw, palette=False)
    ade = tuple((v, v - 1 if v else IGNORE_LABEL) for v in range(len(CLASSES) + 1))
    cfg = data_config(source="imagefolder", root=str(tmp_path), label_map_values=ade)
    source = data_lib.load_source(cfg.data, "train", target="label_map")
    batches = list(data_lib.eval_batches(source, spec_of(), global_batch=7))
    np.testing.assert_array_equal(batches[0]["label_map"], np.stack(maps))
    train = next(data_lib.train_batches(source, spec_of(), global_batch=7, seed=0))
    assert set(np.unique(train["label_map"])) <= {*range(len(CLASSES)), IGNORE_LABEL}
    assert data_lib.check_examples(source, spec_of()) == 0
    # The check of a selection's class before training counts the class ids too.
    counts = np.bincount(np.stack(maps).ravel(), minlength=256)
    np.testing.assert_array_equal(label_map_pixels(source)[0], counts)
    assert label_map_pixels(source)[1] == 0  # every map read
    cut = tuple(pair for pair in ade if pair[0] != 2)  # raw 2 (class 1) left out
    source = data_lib.load_source(
        data_config(source="imagefolder", root=str(tmp_path), label_map_values=cut).data,
        "train",
        target="label_map",
    )
    with pytest.raises(data_lib.DataError, match=r"masks/000.png: raw values \[2\] missing from "
                       "data.label_map_values"):  # fmt: skip
        data_lib.check_examples(source, spec_of())
    # Maps that cannot be read count nothing: a selection's class is not called absent for
    # them (it was: "no label map holds a pixel of class 'a'"), their error is given instead.
    pixels, unread = label_map_pixels(source)
    assert unread and not pixels[1]
    assert Segmentation().unmeasurable("iou/a", source) is None
    source = dataclasses.replace(source, skip_corrupt=True)  # skipped in validation too
    assert "class 'a'" in Segmentation().unmeasurable("iou/a", source)


def test_label_maps_match_photos_turned_by_their_exif_orientation(tmp_path):
    """A camera JPEG stored sideways (EXIF orientation 6) with its mask drawn on the picture as
    shown: the pipeline turns the image, so image and label map agree (and the size check
    compares the turned size)."""
    make_seg_folder(tmp_path, n=1, size=(24, 40))
    label_map = label_map_of((24, 40), 8, seed=5)
    shown = image_of(label_map)
    stored = np.ascontiguousarray(np.rot90(shown, 1))  # the camera's frame: a quarter turn back
    exif = Image.Exif()
    exif[0x0112] = 6  # turn a quarter clockwise to show
    Image.fromarray(stored).save(
        tmp_path / "train" / "images" / "001.jpg", "JPEG", exif=exif.tobytes(), quality=98
    )
    save_mask(tmp_path / "train" / "masks" / "001.png", label_map, palette=False)
    cfg = data_config(source="imagefolder", root=str(tmp_path))
    source = data_lib.load_source(cfg.data, "train", target="label_map")
    assert data_lib.check_examples(source, spec_of()) == 0  # sizes agree once turned
    batch = next(iter(data_lib.eval_batches(source, spec_of(image_size=40), global_batch=2)))
    row = list(source.columns["path"]).index(str(tmp_path / "train" / "images" / "001.jpg"))
    image = np.asarray(Image.fromarray(shown).resize((40, 40), Image.Resampling.NEAREST))
    want = nearest_class(image.astype(np.float32))
    got = nearest_class(batch["image"][row])
    inner = uniform_neighbourhood(batch["label_map"][row])
    assert inner.mean() > 0.3
    np.testing.assert_array_equal(got[inner], want[inner])
    np.testing.assert_array_equal(batch["label_map"][row][inner], want[inner])
    # A mask drawn on the stored pixels (as loaders that ignore EXIF see them) is named so.
    save_mask(tmp_path / "train" / "masks" / "001.png", np.rot90(label_map, 1).copy(), False)
    with pytest.raises(data_lib.DataError, match=r"masks/001.png: size 24x40 differs .* turned "
                       "upright by its EXIF orientation, as viewers show it; the mask fits its "
                       "stored pixels"):  # fmt: skip
        data_lib.check_examples(source, spec_of())


def test_photos_turned_by_exif_without_a_change_of_size_are_named(tmp_path, caplog):
    """A JPEG stored upside down (EXIF orientation 3: the size stays) passes every size check,
    whichever frame its mask was drawn in: one warning per split names it and says the masks
    are taken in the upright frame."""
    make_seg_folder(tmp_path, n=2)
    exif = Image.Exif()
    exif[0x0112] = 3
    stored = image_of(label_map_of((16, 16), 4, seed=1))
    Image.fromarray(stored).save(tmp_path / "train" / "images" / "001.jpg", exif=exif.tobytes())
    (tmp_path / "train" / "images" / "001.png").unlink()
    cfg = data_config(source="imagefolder", root=str(tmp_path))
    with caplog.at_level(logging.WARNING):
        source = data_lib.load_source(cfg.data, "train", target="label_map")
    assert source.num_examples == 2
    turned = str(tmp_path / "train" / "images" / "001.jpg")
    assert (f"(split 'train'): 1 JPEG(s) are stored turned or mirrored (EXIF orientation 2-8), "
            f"such as {turned}:") in caplog.text  # fmt: skip
    assert "label maps are taken in that upright frame" in caplog.text


def test_images_in_subfolders_take_the_mask_at_the_same_path_and_others_are_counted(
    tmp_path, caplog
):
    """``images/<city>/x.png`` with ``masks/<city>/x.png`` (Cityscapes' layout) is read, as
    class folders read subfolders; files that are not images are counted in one warning."""
    maps = make_seg_folder(tmp_path, n=3)
    for folder in ("images", "masks"):
        (tmp_path / "train" / folder / "city").mkdir()
        (tmp_path / "train" / folder / "001.png").rename(
            tmp_path / "train" / folder / "city" / "001.png"
        )
    (tmp_path / "train" / "images" / "notes.txt").write_text("x")
    (tmp_path / "train" / "images" / "city" / "Thumbs.db").write_bytes(b"x")
    cfg = data_config(source="imagefolder", root=str(tmp_path))
    with caplog.at_level(logging.WARNING):
        source = data_lib.load_source(cfg.data, "train", target="label_map")
    images = tmp_path / "train" / "images"
    assert list(source.columns["path"]) == [
        str(images / n) for n in ("000.png", "002.png", "city/001.png")
    ]
    assert source.columns["label_map_path"][2] == str(
        tmp_path / "train" / "masks" / "city" / "001.png"
    )
    assert f"Left out 2 files of {images} that are not" in caplog.text
    assert "(.txt: 1, .db: 1)" in caplog.text or "(.db: 1, .txt: 1)" in caplog.text
    batch = next(iter(data_lib.eval_batches(source, spec_of(), global_batch=3)))
    np.testing.assert_array_equal(batch["label_map"][2], maps[1])


def test_a_subfolder_of_images_without_its_folder_under_masks_is_left_out(tmp_path, caplog):
    """A stray ``images/overlays/`` (previews beside the data) without ``masks/overlays/`` is
    not the split's: its images are left out in one warning naming it, not a missing mask."""
    make_seg_folder(tmp_path, n=2)
    stray = tmp_path / "train" / "images" / "overlays"
    stray.mkdir()
    (stray / "000.png").write_bytes((tmp_path / "train" / "images" / "000.png").read_bytes())
    cfg = data_config(source="imagefolder", root=str(tmp_path))
    with caplog.at_level(logging.WARNING):
        source = data_lib.load_source(cfg.data, "train", target="label_map")
    images = tmp_path / "train" / "images"
    assert list(source.columns["path"]) == [str(images / n) for n in ("000.png", "001.png")]
    masks = tmp_path / "train" / "masks"
    assert (f"Left out 1 image(s) in subfolders of {images} without a folder of their name "
            f"under {masks} (not the split's): overlays (1).") in caplog.text  # fmt: skip


def test_a_nested_layout_lacking_a_subfolder_under_masks_is_an_error(tmp_path):
    """``masks/`` with subfolders of its own (images/<city>/x.png, masks/<city>/x.png) lacking
    one city's folder is an incomplete copy: an error naming it, not that city left out."""
    import shutil

    make_seg_folder(tmp_path, n=3)
    for city, name in (("aachen", "000.png"), ("bonn", "001.png")):
        for folder in ("images", "masks"):
            (tmp_path / "train" / folder / city).mkdir()
            (tmp_path / "train" / folder / name).rename(tmp_path / "train" / folder / city / name)
    shutil.rmtree(tmp_path / "train" / "masks" / "bonn")
    cfg = data_config(source="imagefolder", root=str(tmp_path))
    message = (r"masks has subfolders, but none for 1 image\(s\) in subfolders of "
               r".*/train/images: bonn \(1\) \(an incomplete copy")  # fmt: skip
    with pytest.raises(data_lib.DataError, match=message):
        data_lib.load_source(cfg.data, "train", target="label_map")


def test_an_empty_line_in_classes_txt_is_an_error(tmp_path):
    """Line k names class k - 1: an empty line would shift the names after it."""
    make_seg_folder(tmp_path, n=1)
    (tmp_path / "classes.txt").write_text("background\n\na\nb\n\n")
    cfg = data_config(source="imagefolder", root=str(tmp_path))
    with pytest.raises(data_lib.DataError, match=r"classes\.txt: line 2 is empty"):
        data_lib.load_source(cfg.data, "train", target="label_map")


def test_resumed_stream_equals_the_uninterrupted_one(tmp_path):
    make_seg_folder(tmp_path, size=(20, 28))
    source = data_lib.load_source(
        data_config(source="imagefolder", root=str(tmp_path)).data, "train", target="label_map"
    )
    spec = spec_of(scale_jitter=(0.5, 2.0), flip=True)
    fresh = take(data_lib.train_batches(source, spec, global_batch=2, seed=3), 5)
    resumed = take(data_lib.train_batches(source, spec, global_batch=2, seed=3, start_step=3), 2)
    for a, b in zip(fresh[3:], resumed, strict=True):
        assert a.keys() == b.keys() == {"image", "label_map"}
        assert a["label_map"].shape == (2, 16, 16) and a["label_map"].dtype == np.int32
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    assert not np.array_equal(fresh[0]["label_map"], fresh[4]["label_map"])


# Joint augmentation: the label map stays on its pixels.

CROPS = {
    "inception": dict(inception_crop=True, inception_scale=(0.1, 1.0)),
    "random_crop": dict(random_crop=True, crop_padding=6),
    "scale_jitter": dict(scale_jitter=(0.4, 2.0)),
    "none": dict(),
}


def nearest_class(image: np.ndarray) -> np.ndarray:
    """The class whose colour is nearest each pixel (IGNORE_LABEL for grey, -1 for black)."""
    colours = np.array([*COLOURS.values(), GREY, (0, 0, 0)], np.float32)
    classes = np.array([*COLOURS, IGNORE_LABEL, -1])
    distance = ((image[..., None, :] - colours) ** 2).sum(-1)
    return classes[distance.argmin(-1)]


def uniform_neighbourhood(label_map: np.ndarray) -> np.ndarray:
    """Pixels whose 3x3 neighbourhood holds one class (never those at the border, whose
    neighbours outside the crop are unknown)."""
    padded = np.pad(label_map.astype(np.int64), 1, constant_values=-1)
    h, w = label_map.shape
    shifts = [padded[dy : dy + h, dx : dx + w] for dy in range(3) for dx in range(3)]
    return np.all([s == label_map for s in shifts], axis=0)


@pytest.mark.parametrize("crop", sorted(CROPS))
def test_label_maps_stay_aligned_under_augmentation(crop):
    label_map = label_map_of((40, 56), 8, seed=1)
    example = {"image": tf.constant(image_of(label_map)), "label_map": tf.constant(label_map)}
    spec = spec_of(image_size=32, flip=True, **CROPS[crop])
    fn = make_preprocess(spec, train=True, seed=0, target="label_map", num_classes=4)
    outputs, padded = set(), 0
    for i in range(6):
        out = fn(tf.constant(i), example)
        image, label_map_out = out["image"].numpy(), out["label_map"].numpy()
        assert image.shape == (32, 32, 3) and label_map_out.shape == (32, 32)
        padding = (image == 0).all(-1)  # black: only padding, always ignored
        assert (label_map_out[padding] == IGNORE_LABEL).all()
        padded += padding.sum()
        check = uniform_neighbourhood(label_map_out) & ~padding
        assert check.mean() > 0.3
        np.testing.assert_array_equal(nearest_class(image)[check], label_map_out[check])
        outputs.add(label_map_out.tobytes())
    assert len(outputs) > (1 if crop == "none" else 3)  # crops and flips vary by example
    assert padded > 0 if crop in ("random_crop", "scale_jitter") else padded == 0


def test_eval_resizes_the_whole_image_nearest():
    label_map = label_map_of((40, 56), 8, seed=2)
    example = {"image": tf.constant(image_of(label_map)), "label_map": tf.constant(label_map)}
    spec = spec_of(image_size=8, random_crop=True, flip=True, crop_fraction=0.5)  # train-only
    out = make_preprocess(spec, train=False, seed=0, target="label_map", num_classes=4)(
        tf.constant(0), example
    )
    rows, cols = (np.arange(8) * 40 // 8 + 2), (np.arange(8) * 56 // 8 + 3)  # pixel centres
    np.testing.assert_array_equal(out["label_map"].numpy(), label_map[np.ix_(rows, cols)])


def test_augmentations_that_do_not_apply_to_label_maps(tmp_path):
    source = data_lib.from_arrays(
        np.zeros((4, 8, 8, 3), np.uint8), np.zeros((4, 8, 8), np.uint8), target="label_map"
    )
    for option in (
        dict(randaugment_layers=2),
        dict(random_erasing=0.25),
        dict(mixup_alpha=0.8),
        dict(cutmix_alpha=1.0),
    ):
        with pytest.raises(ValueError, match=f"input.{next(iter(option))}.*label maps"):
            data_lib.train_batches(source, spec_of(image_size=8, **option), global_batch=2, seed=0)
    with pytest.raises(ValueError, match="scale_jitter excludes"):
        spec_of(scale_jitter=(0.5, 2.0), random_crop=True)
    with pytest.raises(ValueError, match="timm leaves colour jitter out when RandAugment is on"):
        spec_of(color_jitter=0.4, randaugment_layers=2)
    with pytest.raises(ValueError, match=r"input.color_jitter must lie in \[0, inf\]"):
        spec_of(color_jitter=-0.1)
    with pytest.raises(ValueError, match="0 < lo <= hi"):
        spec_of(scale_jitter=(2.0, 0.5))


def test_a_host_without_examples_left_gets_ignored_padding(monkeypatch):
    maps = np.arange(3 * 4 * 4).reshape(3, 4, 4) % 3
    source = data_lib.from_arrays(np.zeros((3, 4, 4), np.uint8), maps, target="label_map")
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(jax, "process_index", lambda: 1)  # one row (1) of three
    batches = list(data_lib.eval_batches(source, spec_of(image_size=4), global_batch=2))
    assert [b["mask"].tolist() for b in batches] == [[1.0], [0.0]]
    np.testing.assert_array_equal(batches[0]["label_map"][0], maps[1])
    assert batches[1].keys() == {"image", "label_map", "mask", "row"}
    assert batches[1]["label_map"].shape == (1, 4, 4)
    assert (batches[1]["label_map"] == IGNORE_LABEL).all()


# Arrays and tfds.


def test_array_label_maps():
    images = np.zeros((3, 6, 5, 3), np.uint8)
    maps = np.zeros((3, 6, 5), np.int64)
    maps[1, 0, 0], maps[2, 1, 1] = 2, IGNORE_LABEL
    source = data_lib.load_source(
        data_config(source="arrays").data, "x", arrays={"x": (images, maps)}, target="label_map"
    )
    assert source.class_names == ["0", "1", "2"]  # 255 is no class
    arrays = {"x": (images, maps), "y": (images[:1], maps[:1])}  # its own largest: 0
    assert data_lib.load_source(
        data_config(source="arrays").data, "y", arrays=arrays, target="label_map"
    ).class_names == ["0", "1", "2"]
    batch = next(data_lib.eval_batches(source, spec_of(image_size=6), global_batch=4))
    assert batch["label_map"][1, 0, 0] == 2 and (batch["label_map"][3] == IGNORE_LABEL).all()
    maps[2, 3, 4] = 7
    with pytest.raises(data_lib.DataError, match=r"label_maps\[2\] holds values \[7\] outside"):
        data_lib.from_arrays(images, maps, ["a", "b", "c"], target="label_map")
    with pytest.raises(data_lib.DataError, match=r"label_map arrays must have shape \(3, 6, 5\)"):
        data_lib.from_arrays(images, maps[:, :5], target="label_map")


def test_label_map_classes_are_counted_in_place():
    """The classes of label maps are their largest value but IGNORE_LABEL, counted in place:
    the pixels of every map (of every split, at each split's load) were gathered into a copy."""
    maps = np.zeros((64, 128, 128), np.int64)
    maps[0, 0, :2] = 3, IGNORE_LABEL
    tracemalloc.start()
    classes = data_lib.label_classes(maps, "label_map")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert classes == ["0", "1", "2", "3"]
    assert peak < maps.nbytes / 4, peak / maps.nbytes  # the mask's byte per label, not a copy


def _pet_dataset(raw_maps: list[np.ndarray]):
    """A stand-in for oxford_iiit_pet's reader: encoded images, decoded trimaps."""

    def as_dataset(self, split, decoders=None, read_config=None, shuffle_files=False):
        images = [tf.io.encode_png(np.full((*m.shape, 3), 99, np.uint8)) for m in raw_maps]
        return tf.data.Dataset.from_tensor_slices(
            {
                "image": tf.stack(images),
                "segmentation_mask": np.stack(raw_maps)[..., None],
                "label": np.zeros(len(raw_maps), np.int64),
            }
        )

    return as_dataset


def test_tfds_segmentation_mask_through_the_value_table():
    tfds = pytest.importorskip("tensorflow_datasets")
    trimaps = [np.array([[1, 2, 3], [3, 2, 1]], np.uint8), np.full((2, 3), 2, np.uint8)]
    cfg = data_config(
        source="tfds",
        name="oxford_iiit_pet",
        class_names=("background", "pet"),
        label_map_values=((1, 1), (2, 0), (3, IGNORE_LABEL)),
    )
    with tfds.testing.mock_data(as_dataset_fn=_pet_dataset(trimaps)):
        source = data_lib.load_source(cfg.data, "train", target="label_map")
        assert source.num_examples == 2 and source.class_names == ["background", "pet"]
        batch = next(data_lib.eval_batches(source, spec_of(image_size=3), global_batch=2))
    np.testing.assert_array_equal(batch["label_map"][0, :2], [[1, 0, 255], [255, 0, 1]])
    np.testing.assert_array_equal(batch["label_map"][1, 0], [0, 0, 0])
    unmapped = [np.array([[1, 4, 2]], np.uint8)] * 2
    with tfds.testing.mock_data(as_dataset_fn=_pet_dataset(unmapped)):
        source = data_lib.load_source(cfg.data, "train", target="label_map")
        raw = r"label map holds raw values \[4\] missing from data.label_map_values \(add them"
        reads = (
            lambda: list(data_lib.eval_batches(source, spec_of(image_size=3), global_batch=2)),
            lambda: next(data_lib.train_batches(source, spec_of(image_size=3), global_batch=2,
                                                seed=0)),
        )  # fmt: skip
        for read in reads:  # the value named; no advice for unreadable images
            with pytest.raises(data_lib.DataError, match=raw) as error:
                read()
            assert "skip_corrupt" not in str(error.value) and "assert" not in str(error.value)
        cfg = data_config(source="tfds", name="oxford_iiit_pet")
        with pytest.raises(data_lib.DataError, match="need data.class_names"):
            data_lib.load_source(cfg.data, "train", target="label_map")
        cfg = data_config(source="tfds", name="mnist", class_names=("a",))
        with pytest.raises(data_lib.DataError, match="no 'segmentation_mask' feature"):
            data_lib.load_source(cfg.data, "train", target="label_map")


# Bad input: errors naming the file, or counted skips.


@pytest.fixture()
def bad_folder(tmp_path) -> pathlib.Path:
    """Seven good examples, plus one mask of the wrong size and one with class 6 of 4."""
    maps = make_seg_folder(tmp_path, n=7)
    images, masks = tmp_path / "train" / "images", tmp_path / "train" / "masks"
    for name, label_map in (("size", maps[0][:12]), ("range", np.where(maps[1] == 2, 6, maps[1]))):
        Image.fromarray(image_of(maps[0])).save(images / f"{name}.png")
        save_mask(masks / f"{name}.png", label_map.astype(np.uint8), palette=False)
    return tmp_path


def test_bad_masks_are_errors_naming_the_file(bad_folder):
    cfg = data_config(source="imagefolder", root=str(bad_folder))
    source = data_lib.load_source(cfg.data, "train", target="label_map")
    masks = bad_folder / "train" / "masks"
    with pytest.raises(data_lib.DataError) as error:
        list(data_lib.eval_batches(source, spec_of(), global_batch=9))
    message = str(error.value)
    assert "masks/size.png: size 16x12 differs from its image" in message
    assert "(16x16, w x h)" in message  # as detection's size check writes sizes
    assert "masks/range.png: values [6] outside [0, 4)" in message
    assert "skip_corrupt" in message
    Image.fromarray(image_of(label_map_of((16, 16), 4, 0))).save(masks / "000.png")  # RGB
    with pytest.raises(
        data_lib.DataError,
        match=r"masks/000\.png: A label map must be a grayscale or palette PNG of at most 8 "
        r"bits; this PNG's .* and bit depth: 2 8;",  # RGB, 8 bits
    ):
        list(data_lib.eval_batches(source, spec_of(), global_batch=9))
    (masks / "000.png").write_bytes(b"abcdefgh" * 8)  # named .png, not one
    with pytest.raises(data_lib.DataError, match=r"masks/000\.png: .* PNG; this file is not a PNG"):
        list(data_lib.eval_batches(source, spec_of(), global_batch=9))
    for bad in ("size", "range"):
        only = dict(source.columns)
        keep = np.array([bad in p for p in only["path"]])
        single = data_lib.from_columns({k: v[keep] for k, v in only.items()}, CLASSES)
        with pytest.raises(data_lib.DataError, match=f"masks/{bad}.png"):
            next(data_lib.train_batches(single, spec_of(flip=True), global_batch=1, seed=0))


def test_bad_masks_skipped_and_counted_with_skip_corrupt(bad_folder, caplog):
    (bad_folder / "train" / "images" / "lonely.jpg").write_bytes(
        (bad_folder / "train" / "images" / "000.png").read_bytes()
    )
    (bad_folder / "train" / "masks" / "lonely_mask.png").write_bytes(b"")  # named otherwise
    cfg = data_config(source="imagefolder", root=str(bad_folder))
    with pytest.raises(
        data_lib.DataError,
        match=r"images/lonely\.jpg has no mask .*lonely\.png\. "
        r"Found lonely_mask\.png: masks are PNGs named as their image's stem",
    ):
        data_lib.load_source(cfg.data, "train", target="label_map")  # fmt: skip
    cfg = data_config(source="imagefolder", root=str(bad_folder), skip_corrupt=True)
    with caplog.at_level(logging.WARNING):
        source = data_lib.load_source(cfg.data, "train", target="label_map")
        assert source.num_examples == 9 and "lonely.jpg has no mask" in caplog.text
        batches = list(data_lib.eval_batches(source, spec_of(), global_batch=4))
        assert sum(b["mask"].sum() for b in batches) == 7 and len(batches) == 3
        train = data_lib.train_batches(
            source, spec_of(scale_jitter=(0.5, 1.5)), global_batch=3, seed=0
        )
        take(train, 6)  # two epochs: both bad examples met twice
    assert train.skipped == 4 and "Skipped" in caplog.text
    assert "label map " in caplog.text and "masks/range.png: values [6] outside" in caplog.text


def test_configs_without_label_maps(tmp_path):
    make_seg_folder(tmp_path, n=2)
    (tmp_path / "classes.txt").unlink()
    cfg = data_config(source="imagefolder", root=str(tmp_path))
    with pytest.raises(data_lib.DataError, match="classes.txt"):
        data_lib.load_source(cfg.data, "train", target="label_map")
    cfg = data_config(source="imagefolder", root=str(tmp_path), class_names=CLASSES, classes=(1,))
    with pytest.raises(data_lib.DataError, match="data.classes not read.*whole-image classes"):
        data_lib.load_source(cfg.data, "train", target="label_map")
    for source in ("csv", "idx", "digits"):
        cfg = data_config(source=source, root=str(tmp_path))
        with pytest.raises(data_lib.DataError, match=f"data.source='{source}' has no label maps"):
            data_lib.load_source(cfg.data, "train", target="label_map")
    cfg = data_config(source="arrays", label_map_values=((1, 1),))
    with pytest.raises(data_lib.DataError, match="data.label_map_values not read by data.sou"):
        data_lib.load_source(cfg.data, "train", target="label_map")
    with pytest.raises(data_lib.DataError, match="A task's target 'mask' .* is neither"):
        data_lib.load_source(cfg.data, "train", target="mask")  # a key of the pipeline's own


def test_a_class_no_label_map_holds_is_named_at_the_check(tmp_path, caplog):
    """Masks saved as 0/255 (a common binary format): the object class holds no pixel, all of
    its pixels being the ignore value, so mIoU would measure the background alone."""
    make_seg_folder(tmp_path, n=3)
    (tmp_path / "classes.txt").write_text("background\nobject\n")
    for i in range(3):
        mask = np.zeros((16, 16), np.uint8)
        mask[4:12, 4:12] = IGNORE_LABEL
        save_mask(tmp_path / "train" / "masks" / f"{i:03d}.png", mask, palette=False)
    source = data_lib.load_source(data_config(source="imagefolder", root=str(tmp_path)).data,
                                  "train", target="label_map")  # fmt: skip
    with caplog.at_level(logging.WARNING):
        assert data_lib.check_examples(source, spec_of()) == 0
    assert "No label map of this split holds a pixel of object (1):" in caplog.text
    assert f"{3 * 64} pixels hold 255, the ignore value: a mask saved as 0/255" in caplog.text
    caplog.clear()
    make_seg_folder(tmp_path / "all", n=3)  # every class present: no warning
    config = data_config(source="imagefolder", root=str(tmp_path / "all"))
    source = data_lib.load_source(config.data, "train", target="label_map")
    with caplog.at_level(logging.WARNING):
        data_lib.check_examples(source, spec_of())
    assert "No label map" not in caplog.text
    (tmp_path / "all" / "classes.txt").write_text("\n".join([*CLASSES, "absent"]) + "\n")
    border = label_map_of((16, 16), 4, seed=0)  # VOC-style 255 beside other classes: no hint
    border[0, :] = IGNORE_LABEL
    save_mask(tmp_path / "all" / "train" / "masks" / "000.png", border, palette=False)
    source = data_lib.load_source(config.data, "train", target="label_map")
    with caplog.at_level(logging.WARNING):
        data_lib.check_examples(source, spec_of())
    assert "pixel of absent (4)" in caplog.text and "saved as 0/255" not in caplog.text


def test_pascal_voc_layout_reads_as_torchvisions_voc_segmentation(timm, tmp_path, caplog):
    """PASCAL VOC's layout (JPEGImages, SegmentationClass, ImageSets/Segmentation/<split>.txt)
    gives the pairs torchvision's VOCSegmentation gives for the same tree, VOC's 21 class names
    without classes.txt; an id without its files is named (left out with skip_corrupt)."""
    import torchvision  # importable once the timm fixture declared its ops

    voc = tmp_path / "VOCdevkit" / "VOC2012"
    for d in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (voc / d).mkdir(parents=True)
    maps = {}
    for i, name in enumerate(["2007_000032", "2007_000039", "2008_000123"]):
        maps[name] = label_map_of((16, 16), 4, seed=i)
        Image.fromarray(image_of(maps[name])).save(voc / "JPEGImages" / f"{name}.jpg", quality=95)
        save_mask(voc / "SegmentationClass" / f"{name}.png", maps[name], palette=True)
    (voc / "ImageSets/Segmentation/train.txt").write_text("2008_000123\n2007_000032\n")
    (voc / "ImageSets/Segmentation/val.txt").write_text("2007_000039\n2009_999999\n")
    cfg = data_config(source="imagefolder", root=str(voc))
    source = data_lib.load_source(cfg.data, "train", target="label_map")
    reference = torchvision.datasets.VOCSegmentation(str(tmp_path), image_set="train")
    assert list(source.columns["path"]) == reference.images
    assert list(source.columns["label_map_path"]) == reference.masks
    assert source.class_names[:3] == ["background", "aeroplane", "bicycle"]
    assert source.num_classes == 21
    batch = next(data_lib.eval_batches(source, spec_of(), global_batch=2))
    expected = [np.asarray(reference[i][1]) for i in range(2)]  # PIL's palette indices
    np.testing.assert_array_equal(batch["label_map"], np.stack(expected))
    missing = r"val.txt lists 2009_999999, but .*JPEGImages/2009_999999.jpg and .*/2009_99"
    with pytest.raises(data_lib.DataError, match=missing):
        data_lib.load_source(cfg.data, "val", target="label_map")
    skipping = data_config(source="imagefolder", root=str(voc), skip_corrupt=True)
    with caplog.at_level(logging.WARNING):
        val = data_lib.load_source(skipping.data, "val", target="label_map")
    assert val.num_examples == 1 and "Leaving the image out" in caplog.text


def test_the_evaluate_warning_names_a_class_no_label_map_of_the_split_holds(caplog):
    """vision_jax.evaluate's warning of classes a split lacks (data.warn_of_absent_classes)
    passed label_map_pixels' (pixels, unread) pair where the counts go, and raised."""
    from vision_jax import specs

    config = default_config()
    config.data.source = "arrays"
    config.data.class_names = ("background", "red", "green", "blue")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (4, 8, 8, 3), dtype=np.uint8)
    maps = rng.integers(0, 3, (4, 8, 8)).astype(np.uint8)  # no pixel of blue (3)
    source = data_lib.load_source(
        specs.data_spec(config.data), "test", arrays={"test": (images, maps)}, target="label_map"
    )
    with caplog.at_level(logging.WARNING):
        data_lib.warn_of_absent_classes(source)
    assert "blue (3)" in caplog.text and "red" not in caplog.text.split("blue")[0][-40:]
