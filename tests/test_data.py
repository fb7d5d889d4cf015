"""The input pipeline: sources (image folders, CSV, tfds built from a folder), augmentations,
exact resumption, multi-host sharding, and clear errors (or counted skips) on bad input."""

from __future__ import annotations

import gc
import json
import logging
import pathlib
import shutil
import threading
import time

import jax
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from vision_jax import data as data_lib
from vision_jax import specs
from vision_jax.config import TrackedConfig, default_config
from vision_jax.data import augment, pipeline
from vision_jax.data.preprocess import InputSpec, make_preprocess
from vision_jax.data.randaugment import layer_magnitude, operations, randaugment

OPS = operations()
MODES = {"RGB": "jpg", "L": "jpeg", "CMYK": "JPG", "I;16": "png", "P": "png"}


def _save(path: pathlib.Path, mode: str, seed: int, size=(20, 26)) -> None:
    rng = np.random.default_rng(seed)
    if mode == "I;16":
        image = Image.fromarray(rng.integers(0, 65535, size, dtype=np.uint16))
    else:
        image = Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="JPEG" if path.suffix.lower() in (".jpg", ".jpeg") else "PNG")


def make_folder(root: pathlib.Path, per_class: int = 4, classes=("cat", "dog", "eel")) -> None:
    """root/{train,test}/<class>/ with images of every PIL mode in MODES."""
    modes = list(MODES.items())
    for split, count in (("train", per_class), ("test", 2)):
        for c, name in enumerate(classes):
            for i in range(count):
                mode, ext = modes[(c + i) % len(modes)]
                _save(root / split / name / f"{i:03d}.{ext}", mode, seed=100 * c + i)
    (root / "train" / classes[0] / "notes.txt").write_text("not an image")


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> pathlib.Path:
    root = tmp_path_factory.mktemp("folder")
    make_folder(root)
    return root


def data_config(**overrides) -> TrackedConfig:
    c = default_config()
    for key, value in overrides.items():
        c.data[key] = value
    return TrackedConfig(c)


def spec_of(**overrides) -> InputSpec:
    """Pixels stay 0..255 (up to rounding): mean 0, std 1/255."""
    return InputSpec(**{"image_size": 16, "mean": (0,) * 3, "std": (1 / 255,) * 3, **overrides})


def take(batches, n: int) -> list[dict]:
    return [next(batches) for _ in range(n)]


# Sources.


def test_image_folder_reads_every_mode_with_sorted_classes(folder):
    cfg = data_config(source="imagefolder", root=str(folder))
    source = data_lib.load_source(cfg.data, "train")
    # read by train.py
    assert cfg.data.unread() == ["data.eval_split", "data.shuffle_buffer", "data.train_split"]
    assert source.class_names == ["cat", "dog", "eel"]
    assert source.num_examples == 12  # notes.txt ignored
    batches = list(data_lib.eval_batches(source, spec_of(), global_batch=5))
    images = np.concatenate([b["image"][b["mask"] > 0] for b in batches])
    labels = np.concatenate([b["label"][b["mask"] > 0] for b in batches])
    assert images.shape == (12, 16, 16, 3) and images.max() > 1  # 0..255 with mean 0, std 1
    np.testing.assert_array_equal(labels, np.repeat([0, 1, 2], 4))
    # The 16-bit PNG (class 0, file 3) keeps its content after scaling to 8 bits.
    assert images[3].std() > 10


def test_decoding_is_what_the_export_manifest_says():
    """The decode an exported model's manifest describes for serving code: 16-bit PNGs as
    value // 256, alpha dropped (not composited), grey repeated to RGB."""
    import io

    def decoded(image: Image.Image) -> np.ndarray:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return augment.decode(tf.constant(buffer.getvalue())).numpy()

    rng = np.random.default_rng(0)
    deep = rng.integers(0, 65536, (4, 5), dtype=np.uint16)
    np.testing.assert_array_equal(
        decoded(Image.fromarray(deep)), np.repeat(deep[..., None] // 256, 3, -1)
    )
    rgba = rng.integers(0, 256, (4, 5, 4), dtype=np.uint8)
    np.testing.assert_array_equal(decoded(Image.fromarray(rgba)), rgba[..., :3])
    assert (
        "value // 256" in augment.DECODING["bit_depth"]
        and "alpha dropped" in augment.DECODING["channels"]
    )


def test_tiffs_decode_16_bit_grey_as_pngs_and_refuse_float():
    """A 16-bit grey TIFF reads as value // 256, as a 16-bit PNG (PIL's RGB conversion clipped
    it to 255: almost white); a float TIFF, which that conversion clips too, is refused."""
    import io

    deep = np.random.default_rng(0).integers(0, 65536, (4, 5), dtype=np.uint16)
    files = {}
    for name, pixels in (("deep", deep), ("float", deep.astype(np.float32) / 65535)):
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="TIFF")
        files[name] = buffer.getvalue()
    decoded = augment.decode(tf.constant(files["deep"])).numpy()
    np.testing.assert_array_equal(decoded, np.repeat(deep[..., None] // 256, 3, -1))
    with pytest.raises(tf.errors.InvalidArgumentError, match="'F' pixels .* no 8-bit reading"):
        augment.decode(tf.constant(files["float"]))


def test_bmp_gif_and_webp_decode_as_pil_converts_them():
    """Formats past JPEG and PNG read as PIL's ``convert("RGB")`` reads them: a palette BMP's
    colours (not its indices as grey), 1- and 16-bit BMPs and an animated WebP (refused
    before), a GIF's transparent colour (black before); unreadable bytes name no Python
    object."""
    import io

    rng = np.random.default_rng(0)
    frames = [Image.fromarray(rng.integers(0, 256, (10, 14, 3), np.uint8)) for _ in range(3)]
    files = {}
    for name, image, options in [
        ("palette.bmp", frames[0].quantize(16), {}),
        ("1bit.bmp", frames[0].convert("1"), {}),
        ("565.bmp", frames[0], {"bits": 16}),
        ("transparent.gif", frames[0].quantize(64), {"transparency": 0}),
        ("animated.webp", frames[0], {"save_all": True, "append_images": frames[1:],
                                      "lossless": True}),
    ]:  # fmt: skip
        buffer = io.BytesIO()
        image.save(buffer, format=name.split(".")[1].upper(), **options)
        files[name] = buffer.getvalue()
    assert Image.open(io.BytesIO(files["animated.webp"])).n_frames == 3
    for name, data in files.items():
        want = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        np.testing.assert_array_equal(augment.decode(tf.constant(data)).numpy(), want, name)
    assert "GIF, BMP, WebP and any other format PIL reads" in augment.DECODING["other_formats"]
    with pytest.raises(tf.errors.InvalidArgumentError, match="not an image file of a known"):
        augment.decode(tf.constant(b"GIF89a and no more"))
    limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, 10  # PIL's guard: one line too
    try:
        with pytest.raises(tf.errors.InvalidArgumentError, match="DecompressionBombError"):
            augment.decode(tf.constant(files["palette.bmp"]))
    finally:
        Image.MAX_IMAGE_PIXELS = limit


def test_file_names_that_are_not_utf8_train_predict_and_report(tmp_path):
    """A zip made on Windows holds names in its code page (``caf\xe9.png``): listed, read,
    digested, predicted and written back with the file system's bytes (each step failed on
    the name before, even with skip_corrupt)."""
    import os

    from vision_jax.predict import decoded_sizes, write_records
    from vision_jax.report.tables import Table, write_table

    pixels = np.random.default_rng(0).integers(0, 256, (6, 6, 3), np.uint8)
    for name in (b"train/a/caf\xe9.png", b"train/b/plain.png"):
        path = os.fsencode(tmp_path) + b"/" + name
        os.makedirs(os.path.dirname(path), exist_ok=True)
        Image.fromarray(pixels).save(path, format="PNG")
    source = data_lib.load_source(
        data_config(source="imagefolder", root=str(tmp_path)).data, "train"
    )
    odd = next(p for p in source.columns["path"] if "caf" in p)
    assert os.fsencode(odd).endswith(b"caf\xe9.png")
    assert source.fingerprint()["digest"]
    spec = spec_of(image_size=6, resize_size=6, mean=(0, 0, 0), std=(1 / 255,) * 3)
    batch = next(iter(data_lib.eval_batches(source, spec, global_batch=2)))
    for image in batch["image"]:
        np.testing.assert_allclose(image, pixels, atol=1e-3)
    assert decoded_sizes([odd]) == ([(odd, (6, 6))], [])
    write_records([{"file": odd, "label": 0}], str(tmp_path / "p.csv"))
    write_table(Table(("file",), [[odd]], []), tmp_path / "t.csv")
    for written in ("p.csv", "t.csv"):
        assert b"caf\xe9.png" in (tmp_path / written).read_bytes()


def test_image_folder_takes_bmp_gif_and_webp(tmp_path):
    """The files the decoder reads (lossless BMP, GIF and WebP here) are listed and decoded."""
    pixels = np.random.default_rng(0).integers(0, 256, (8, 6, 3), np.uint8)
    pixels[..., 1:] = pixels[..., :1]  # grey: a GIF's palette holds every value exactly
    for name in ("train/a/x.bmp", "train/a/y.gif", "train/b/z.webp"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(tmp_path / name, lossless=True)
    source = data_lib.load_source(
        data_config(source="imagefolder", root=str(tmp_path)).data, "train"
    )
    assert source.class_names == ["a", "b"] and source.num_examples == 3
    spec = spec_of(image_size=6, resize_size=6, mean=(0, 0, 0), std=(1 / 255,) * 3)
    batch = next(iter(data_lib.eval_batches(source, spec, global_batch=3)))
    for image in batch["image"]:  # the centre 6x6 of each 8x6 image
        np.testing.assert_allclose(image, pixels[1:7], atol=1e-3)


def test_image_folder_reads_subfolders_of_a_class_and_counts_other_files(tmp_path, caplog):
    """As torchvision's ImageFolder: images below a class folder's subfolders are the class's
    (they were left out without a word); other files are counted in one warning; hidden
    files and folders are not read."""
    for name in ("train/a/1.png", "train/a/sub/2.png", "train/a/sub/deeper/3.jpg",
                 "train/b/4.png", "train/b/.hidden/5.png"):  # fmt: skip
        _save(tmp_path / name, "RGB", seed=0)
    for name in ("train/a/sub/scan.psd", "train/b/README", "train/b/.DS_Store"):
        (tmp_path / name).write_bytes(b"x")
    with caplog.at_level(logging.WARNING):
        source = data_lib.load_source(
            data_config(source="imagefolder", root=str(tmp_path)).data, "train"
        )
    assert sorted(pathlib.Path(p).relative_to(tmp_path).as_posix()
                  for p in source.columns["path"]) == [
        "train/a/1.png", "train/a/sub/2.png", "train/a/sub/deeper/3.jpg", "train/b/4.png"
    ]  # fmt: skip
    np.testing.assert_array_equal(np.sort(source.columns["label"]), [0, 0, 0, 1])
    assert "Left out 2 files of" in caplog.text and ".psd: 1, no extension: 1" in caplog.text
    assert "Left out" not in caplog.text.split("no extension: 1")[1]  # no loose images
    _save(tmp_path / "train" / "stray.jpg", "RGB", seed=0)  # not in a class folder
    with caplog.at_level(logging.WARNING):
        data_lib.load_source(data_config(source="imagefolder", root=str(tmp_path)).data, "train")
    assert (
        "Left out 1 image(s) directly in " in caplog.text and "(such as stray.jpg)" in caplog.text
    )
    (tmp_path / "train" / "b" / "again").symlink_to(tmp_path / "train" / "b")  # a loop
    source = data_lib.load_source(
        data_config(source="imagefolder", root=str(tmp_path)).data, "train"
    )
    assert source.num_examples == 4


def test_class_folders_in_another_unicode_form_name_the_same_class(tmp_path):
    """A zip made on macOS stores "caf\u00e9" decomposed: both splits still name one class."""
    import unicodedata

    for split, form in (("train", "NFC"), ("test", "NFD")):
        for name in (unicodedata.normalize(form, "caf\u00e9"), "tea"):
            _save(tmp_path / split / name / "1.png", "RGB", seed=0)
    cfg = data_config(source="imagefolder", root=str(tmp_path))
    names = [data_lib.load_source(cfg.data, split).class_names for split in ("train", "test")]
    assert names[0] == names[1] == ["caf\u00e9", "tea"]


def test_split_slices_partition_the_folder(folder):
    cfg = data_config(source="imagefolder", root=str(folder))
    head = data_lib.load_source(cfg.data, "train[:75%]")
    tail = data_lib.load_source(cfg.data, "train[75%:]")
    assert (head.num_examples, tail.num_examples) == (9, 3)
    paths = set(head.columns["path"]) | set(tail.columns["path"])
    assert len(paths) == 12
    assert data_lib.load_source(cfg.data, "train[2:5]").num_examples == 3
    for split, problem in [
        ("train[%:]", "Cannot parse split"),
        ("train[:150%]", r"a percentage lies in \[-100%, 100%\]; got 150%"),
    ]:
        with pytest.raises(data_lib.DataError, match=problem):
            data_lib.load_source(cfg.data, split)
    subset = data_lib.select_classes(head, [2, 0])
    assert subset.class_names == ["eel", "cat"] and subset.columns is not None
    labels = head.columns["label"]
    relabelled = np.array([1, -1, 0])[labels[labels != 1]]  # cat -> 1, eel -> 0
    np.testing.assert_array_equal(subset.columns["label"], relabelled)


def test_csv_source_with_names_and_ids(tmp_path, folder):
    files = sorted((folder / "train").rglob("0*.*"))
    rows = [f"{f.relative_to(folder)},{f.parent.name}" for f in files]
    (folder / "train.csv").write_text("filename,label\n" + "\n".join(rows) + "\n")
    try:
        cfg = data_config(source="csv", root=str(folder))
        source = data_lib.load_source(cfg.data, "train")
        assert source.class_names == ["cat", "dog", "eel"]
        assert source.num_examples == 12
        assert next(data_lib.eval_batches(source, spec_of(), global_batch=12))["image"].shape == (
            12,
            16,
            16,
            3,
        )
    finally:
        (folder / "train.csv").unlink()
    (tmp_path / "a.png").write_bytes((folder / "train" / "cat" / "003.png").read_bytes())
    (tmp_path / "train.csv").write_text("filename,label\na.png,1\na.png,0\n")
    cfg = data_config(source="csv", root=str(tmp_path), class_names=("x", "y"))
    source = data_lib.load_source(cfg.data, "train")
    np.testing.assert_array_equal(source.columns["label"], [1, 0])
    (tmp_path / "train.csv").write_text("filename,label\na.png,1\na.png,2\n")
    with pytest.raises(data_lib.DataError, match=r"train.csv:3: label 2 of a.png is outside"):
        data_lib.load_source(cfg.data, "train")
    (tmp_path / "train.csv").write_text("filename,label\na.png,1\na.png\n")
    with pytest.raises(data_lib.DataError, match=r"train.csv:3: expected 'filename,label'"):
        data_lib.load_source(cfg.data, "train")


def test_csv_ids_that_skip_a_class_and_a_missing_file(tmp_path, folder, caplog):
    """Integer labels are ids from 0: ids from 1 leave class 0 without an example (a warning);
    a file that is not there is named once, with the reason."""
    (tmp_path / "a.png").write_bytes((folder / "train" / "cat" / "003.png").read_bytes())
    (tmp_path / "train.csv").write_text("filename,label\na.png,1\na.png,2\ngone.png,2\n")
    with caplog.at_level(logging.WARNING):
        source = data_lib.load_source(data_config(source="csv", root=str(tmp_path)).data, "train")
    assert source.class_names == ["0", "1", "2"]
    assert "1 class id(s) of 0..2 have no example in the split CSVs of " in caplog.text
    assert "(integer labels are ids from 0): [0]." in caplog.text
    with pytest.raises(data_lib.DataError) as error:
        data_lib.check_examples(source, spec_of())
    assert f"cannot read image {tmp_path}/gone.png: No such file or directory" in str(error.value)


def test_csv_of_a_spreadsheet_and_other_csv_files_beside_the_splits(tmp_path, folder, caplog):
    """A byte-order mark (Excel's "CSV UTF-8") is read past; a CSV without the split header
    (metadata.csv) is not a split: named in a warning, not an error."""
    (tmp_path / "a.png").write_bytes((folder / "train" / "cat" / "003.png").read_bytes())
    (tmp_path / "train.csv").write_text("\ufefffilename,label\na.png,cat\na.png,dog\n",
                                        encoding="utf-8")  # fmt: skip
    (tmp_path / "metadata.csv").write_text("id,author\n1,me\n")
    with caplog.at_level(logging.WARNING):
        source = data_lib.load_source(data_config(source="csv", root=str(tmp_path)).data, "train")
    assert source.class_names == ["cat", "dog"] and source.num_examples == 2
    assert "not split files (no 'filename,label' header): metadata.csv" in caplog.text


def test_csv_labels_that_are_numbers_not_integers_are_refused(tmp_path, folder):
    """Labels 0.37, 1.5 are measurements, not classes (their sorted texts became the classes):
    refused naming the file, line and value; integer labels stay ids, and data.class_names
    that name such labels keep them as classes."""
    (tmp_path / "a.png").write_bytes((folder / "train" / "cat" / "003.png").read_bytes())
    (tmp_path / "train.csv").write_text("filename,label\na.png,2\na.png,0\n")
    (tmp_path / "val.csv").write_text("filename,label\na.png,1\na.png,0.37\n")
    cfg = data_config(source="csv", root=str(tmp_path))
    with pytest.raises(data_lib.DataError) as error:
        data_lib.load_source(cfg.data, "train")
    assert str(error.value) == (
        f"{tmp_path}/val.csv:3: the column 'label' holds numbers that are not integers "
        "('0.37'): a label is a class name or an integer id; numbers per example go in a column "
        "named by task.target of a task of one's own, e.g. 'targets' (README: Adding a task)."
    )
    (tmp_path / "val.csv").write_text("filename,label\na.png,1\na.png,0\n")
    assert data_lib.load_source(cfg.data, "train").class_names == ["0", "1", "2"]
    (tmp_path / "val.csv").write_text("filename,label\na.png,1.5\na.png,cat\n")
    assert data_lib.load_source(cfg.data, "val").class_names == ["0", "1.5", "2", "cat"]
    cfg = data_config(source="csv", root=str(tmp_path), class_names=("0", "2", "1.5", "cat"))
    np.testing.assert_array_equal(data_lib.load_source(cfg.data, "val").columns["label"], [2, 3])


def test_csv_labels_written_as_integral_decimals_are_ids(tmp_path, folder):
    """Labels 0.0, 1.0, 2.00 (pandas, spreadsheets) are the ids 0, 1, 2 as 0, 1, 2 are, in the
    class list and in every split read (data.class_names given too); 2.5 stays refused."""
    (tmp_path / "a.png").write_bytes((folder / "train" / "cat" / "003.png").read_bytes())
    (tmp_path / "train.csv").write_text("filename,label\na.png,0.0\na.png,1.0\na.png,2.00\n")
    (tmp_path / "val.csv").write_text("filename,label\na.png,1\na.png,0.\n")
    cfg = data_config(source="csv", root=str(tmp_path))
    train = data_lib.load_source(cfg.data, "train")
    assert train.class_names == ["0", "1", "2"]
    np.testing.assert_array_equal(train.columns["label"], [0, 1, 2])
    np.testing.assert_array_equal(data_lib.load_source(cfg.data, "val").columns["label"], [1, 0])
    cfg = data_config(source="csv", root=str(tmp_path), class_names=("x", "y", "z"))
    np.testing.assert_array_equal(data_lib.load_source(cfg.data, "train").columns["label"],
                                  [0, 1, 2])  # fmt: skip
    (tmp_path / "val.csv").write_text("filename,label\na.png,2.5\n")
    with pytest.raises(data_lib.DataError, match=r"val.csv:2: .* not integers \('2.5'\)"):
        data_lib.load_source(data_config(source="csv", root=str(tmp_path)).data, "train")


def test_build_tfds_from_folder_reads_back_through_load_source(tmp_path):
    root = tmp_path / "images"
    make_folder(root, per_class=2, classes=("a", "b"))
    data_dir = tmp_path / "tfds"
    data_lib.build_tfds_from_folder(str(root), "tiny_folder", str(data_dir))
    cfg = data_config(source="tfds", name="tiny_folder", data_dir=str(data_dir))
    source = data_lib.load_source(cfg.data, "train")
    assert source.class_names == ["a", "b"] and source.num_examples == 4
    assert data_lib.load_source(cfg.data, "test[:50%]").num_examples == 2
    batch = next(data_lib.eval_batches(source, spec_of(), global_batch=4))
    assert batch["image"].shape == (4, 16, 16, 3)
    assert sorted(batch["label"]) == [0, 0, 1, 1]


def test_build_tfds_from_folder_refuses_a_segmentation_layout(tmp_path):
    """images/ and masks/ under a split are not two classes (it built a 2-class dataset)."""
    root = tmp_path / "seg"
    make_folder(root, per_class=1, classes=("images", "masks"))
    with pytest.raises(data_lib.DataError, match="holds images/ and masks/, a segmentation"):
        data_lib.build_tfds_from_folder(str(root), "seg_folder", str(tmp_path / "tfds"))
    assert not (tmp_path / "tfds").exists()


def test_a_tfds_split_with_an_unreadable_image_is_found_before_training(tmp_path, monkeypatch):
    """build_tfds_from_folder reads every image first (tfds stores the bytes unread); a tfds
    split that holds a bad image anyway is read up front like a folder's, and a batch that
    meets it names the split and the way to skip it, without TensorFlow's op names."""
    root = tmp_path / "images"
    make_folder(root, per_class=2, classes=("a", "b"))
    good = (root / "test" / "a" / "000.jpg").read_bytes()
    (root / "test" / "b" / "bad.jpg").write_bytes(good[: len(good) // 2])
    with pytest.raises(data_lib.DataError, match=r"test/b/bad\.jpg: .*then build the dataset"):
        data_lib.build_tfds_from_folder(str(root), "bad_folder", str(tmp_path / "tfds"))
    monkeypatch.setattr(data_lib.tfds_build, "check_examples", lambda *a, **k: 0)
    data_lib.build_tfds_from_folder(str(root), "bad_folder", str(tmp_path / "tfds"))
    source = data_lib.from_tfds("bad_folder", "test", str(tmp_path / "tfds"))
    name = r"example \d of tfds dataset 'bad_folder' split 'test': jpeg::Uncompress failed"
    with pytest.raises(data_lib.DataError, match=rf"Bad example\(s\): cannot read image of {name}"):
        data_lib.check_examples(source, spec_of())
    with pytest.raises(data_lib.DataError, match=name):
        list(data_lib.eval_batches(source, spec_of(), global_batch=4))
    with pytest.raises(data_lib.DataError) as error:
        take(data_lib.train_batches(source, spec_of(), global_batch=2, seed=0), 8)
    assert "reading tfds dataset 'bad_folder' split 'test': " in str(error.value)
    assert "data.skip_corrupt = True" in str(error.value)
    assert "function_node" not in str(error.value) and "Op:" not in str(error.value)


def test_a_tfds_dataset_or_split_that_is_not_there_is_one_line(tmp_path):
    root = tmp_path / "images"
    make_folder(root, per_class=1, classes=("a", "b"))
    data_lib.build_tfds_from_folder(str(root), "tiny", str(tmp_path / "tfds"))
    with pytest.raises(data_lib.DataError) as error:
        data_lib.from_tfds("tiny", "train", str(tmp_path / "elsewhere"))
    message = str(error.value)
    assert message.startswith(f"Unknown tfds dataset 'tiny': neither prepared in {tmp_path}/elsewh")
    assert "\n" not in message and len(message) < 300
    with pytest.raises(data_lib.DataError) as error:
        data_lib.from_tfds("tiny", "validation", str(tmp_path / "tfds"))
    message = str(error.value)
    assert "Cannot read split 'validation' of tfds dataset 'tiny' in " in message
    assert "(splits: " in message and "tfds build" not in message and ".." not in message
    with pytest.raises(data_lib.DataError, match=r"tfds dataset 'mnist' in .* is not prepared: "
                       r"prepare it first \(`tfds build mnist`"):  # fmt: skip
        data_lib.from_tfds("mnist", "train", str(tmp_path / "empty"))  # a registered builder
    for inside in (tmp_path / "tfds" / "tiny", tmp_path / "tfds" / "tiny" / "1.0.0"):
        with pytest.raises(data_lib.DataError) as error:
            data_lib.from_tfds("tiny", "train", str(inside))
        assert str(error.value) == (
            f"data.data_dir {inside} is a folder of tfds dataset 'tiny' itself: data.data_dir is "
            f"the folder that holds tiny/ ({tmp_path / 'tfds'})."
        )
    holder = tmp_path / "tiny"  # a data_dir named as its dataset, holding it: no such hint
    shutil.copytree(tmp_path / "tfds", holder)
    with pytest.raises(data_lib.DataError) as error:
        data_lib.from_tfds("tiny:9.9.9", "train", str(holder))
    assert "is a folder of tfds dataset" not in str(error.value)
    assert "9.9.9" in str(error.value), str(error.value)  # the version that is not there


# Bad input.


@pytest.fixture()
def corrupt_folder(tmp_path) -> pathlib.Path:
    make_folder(tmp_path, per_class=3, classes=("a", "b"))
    good = (tmp_path / "train" / "a" / "000.jpg").read_bytes()
    (tmp_path / "train" / "b" / "bad.jpg").write_bytes(good[: len(good) // 2])
    return tmp_path


def test_corrupt_image_is_an_error_naming_the_file(corrupt_folder):
    cfg = data_config(source="imagefolder", root=str(corrupt_folder))
    source = data_lib.load_source(cfg.data, "train")
    with pytest.raises(data_lib.DataError, match=r"b/bad\.jpg.*skip_corrupt"):
        take(data_lib.train_batches(source, spec_of(), global_batch=2, seed=0), 4)
    with pytest.raises(data_lib.DataError, match=r"b/bad\.jpg"):
        list(data_lib.eval_batches(source, spec_of(), global_batch=4))


def test_skip_corrupt_skips_and_counts(corrupt_folder, caplog):
    cfg = data_config(source="imagefolder", root=str(corrupt_folder), skip_corrupt=True)
    source = data_lib.load_source(cfg.data, "train")
    bad_row = list(source.columns["path"]).index(str(corrupt_folder / "train/b/bad.jpg"))
    spec = spec_of(flip=True)
    batches = data_lib.train_batches(source, spec, global_batch=2, seed=0)
    with caplog.at_level(logging.WARNING):
        take(batches, 4)
        position = batches.next_position
        later = take(batches, 3)  # two epochs of 7 files in all: the bad one twice
    rows = [int(pipeline._example_index(p, 7, 0)) for p in range(14 + batches.skipped)]
    assert batches.skipped == rows.count(bad_row) >= 1
    named = [r.getMessage() for r in caplog.records if "unreadable image" in r.getMessage()]
    assert len(named) == 1 < batches.skipped  # an epoch later it is counted, not named again
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert data_lib.check_examples(source, spec) == 1  # the up-front check names it too
    assert "1 bad example(s) of 7 will be skipped: cannot read image " in caplog.text
    assert "train/b/bad.jpg: jpeg::Uncompress failed" in caplog.text
    assert all("train/b/bad.jpg: jpeg::Uncompress failed" in m for m in named), named
    resumed = data_lib.train_batches(
        source, spec, global_batch=2, seed=0, start_step=4, start_position=position
    )
    for a, b in zip(later, take(resumed, 3), strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        eval_batches = list(data_lib.eval_batches(source, spec_of(), global_batch=4))
    assert sum(b["mask"].sum() for b in eval_batches) == 6 and len(eval_batches) == 2
    assert "Skipped 1 unreadable image(s) so far (of 7 read): " in caplog.text
    assert caplog.text.count("train/b/bad.jpg") == 1


def test_empty_class_folder(tmp_path):
    make_folder(tmp_path, per_class=2, classes=("a", "b"))
    (tmp_path / "train" / "c").mkdir()
    cfg = data_config(source="imagefolder", root=str(tmp_path))
    with pytest.raises(data_lib.DataError, match=r"train/c holds no"):
        data_lib.load_source(cfg.data, "train")
    cfg = data_config(source="imagefolder", root=str(tmp_path), skip_corrupt=True)
    assert data_lib.load_source(cfg.data, "train").class_names == ["a", "b", "c"]


def test_an_empty_split_is_an_error_naming_it_and_why(tmp_path, folder):
    """A split without examples failed late, in Source.fingerprint ("slice step cannot be
    zero": arrays), or not at load time at all (a CSV without rows, empty class folders)."""
    images, labels = np.zeros((6, 8, 8, 3), np.uint8), np.array([0, 1, 0, 1, 0, 1])
    arrays = {"train": (images[:0], labels[:0]), "test": (images, labels + 5)}
    with pytest.raises(data_lib.DataError, match=r"split 'train' holds no examples \(its arrays "):
        data_lib.load_source(data_config(source="arrays").data, "train", arrays=arrays)
    data = data_config(source="arrays", classes=(0, 1)).data
    with pytest.raises(
        data_lib.DataError,
        match=r"split 'test' holds no examples of data.classes=\(0, 1\) \(its labels: 5, 6\)",
    ):
        data_lib.load_source(data, "test", arrays=arrays)
    (tmp_path / "train.csv").write_text("filename,label\n")
    (tmp_path / "test.csv").write_text("filename,label\nx.png,0\nx.png,1\n")
    with pytest.raises(data_lib.DataError, match=r"'train' holds no examples \(its CSV file has"):
        data_lib.load_source(data_config(source="csv", root=str(tmp_path)).data, "train")
    for name in ("a", "b"):
        (tmp_path / "folders" / "train" / name).mkdir(parents=True)
    data = data_config(source="imagefolder", root=str(tmp_path / "folders"), skip_corrupt=True)
    with pytest.raises(data_lib.DataError, match=r"'train' holds no examples \(its class folders"):
        data_lib.load_source(data.data, "train")
    assert data_lib.from_arrays(images[:0], labels[:0]).fingerprint()["examples"] == 0


def test_split_smaller_than_a_global_batch(folder):
    source = data_lib.load_source(data_config(source="imagefolder", root=str(folder)).data, "test")
    with pytest.raises(data_lib.DataError, match="fewer than one global batch"):
        data_lib.train_batches(source, spec_of(), global_batch=8, seed=0)


def test_labels_outside_the_class_range():
    with pytest.raises(data_lib.DataError, match="Labels must lie in"):
        data_lib.from_arrays(np.zeros((2, 4, 4), np.uint8), np.array([0, 3]), ["a", "b"])
    with pytest.raises(data_lib.DataError, match="Labels must be integers; got dtype float64"):
        data_lib.from_arrays(np.zeros((2, 4, 4), np.uint8), np.array([0, 0.5]), ["a", "b"])
    with pytest.raises(data_lib.DataError, match="Labels must be integers; got dtype float32"):
        data_lib.from_arrays(np.zeros((2, 4, 4), np.uint8), np.array([0, np.nan], np.float32))
    binary = data_lib.from_arrays(np.zeros((2, 4, 4), np.uint8), np.array([False, True]))
    assert binary.class_names == ["0", "1"] and list(binary.columns["label"]) == [0, 1]
    arrays = {"train": (np.zeros((2, 4, 4), np.uint8), np.array([0, 1]))}
    with pytest.raises(data_lib.DataError, match="but data.source is 'tfds': set data.source="):
        data_lib.load_source(default_config().data, "train", arrays=arrays)


def test_array_errors_name_the_split_channels_first_and_one_hot_labels():
    """The label-range error names the split of ``arrays`` it is in; float one-hot labels are
    told to take the argmax; channels-first images are told to transpose."""
    images, labels = np.zeros((2, 4, 4), np.uint8), np.array([0, 1])
    arrays = {"train": (images, labels), "test": (images, np.array([0, 3]))}
    data = data_config(source="arrays", class_names=("a", "b", "c")).data
    data_lib.load_source(data, "train", arrays=arrays)
    with pytest.raises(data_lib.DataError, match=r"^arrays\['test'\]: Labels must lie in \[0, 3\)"):
        data_lib.load_source(data, "test", arrays=arrays)
    with pytest.raises(data_lib.DataError, match=r"got dtype float64 \(one-hot labels \[N, K\]: "
                       r"labels\.argmax\(-1\); soft targets: a task of one's own"):  # fmt: skip
        data_lib.from_arrays(images, np.eye(2), ["a", "b"])
    with pytest.raises(data_lib.DataError, match=r"got \(2, 3, 4, 4\) \(channels-first, torch's "
                       r"NCHW: images\.transpose\(0, 2, 3, 1\)\)\.$"):  # fmt: skip
        data_lib.from_arrays(np.zeros((2, 3, 4, 4), np.uint8), labels, ["a", "b"])


def test_array_classes_come_from_every_split_passed():
    """Without data.class_names, a test split lacking the largest label has the train split's
    classes (its own "0".."2" made the run refuse the splits as different); the classes are
    "0" .. the largest label of any split passed."""
    images = np.zeros((4, 4, 4), np.uint8)
    arrays = {"train": (images, np.array([0, 1, 2, 3])), "test": (images, [0, 1, 2, 2])}
    data = data_config(source="arrays").data
    for split in ("train", "test", "test[:50%]"):
        source = data_lib.load_source(data, split, arrays=arrays)
        assert source.class_names == ["0", "1", "2", "3"], split
    named = data_config(source="arrays", class_names=("a", "b", "c", "d", "e")).data
    assert data_lib.load_source(named, "test", arrays=arrays).num_classes == 5


def test_float_images_out_of_range_or_not_finite():
    """A NaN made the range check pass (every comparison with it is false) and the pixels
    were cast to uint8 as they were."""
    pixels = np.linspace(0, 255, 2 * 4 * 4, dtype=np.float32).reshape(2, 4, 4)
    with pytest.raises(data_lib.DataError, match=r"Float images must lie in \[0, 1\]"):
        data_lib.from_arrays(pixels, np.array([0, 1]), ["a", "b"])
    pixels[1, 2, 3] = np.nan
    with pytest.raises(data_lib.DataError, match=r"1 non-finite value \(the first at index "
                       r"\(1, 2, 3, 0\): nan\)"):  # fmt: skip
        data_lib.from_arrays(pixels / 255, np.array([0, 1]), ["a", "b"])


# The training stream: resumption, multi-host.

HEAVY = dict(
    image_size=16,
    inception_crop=True,
    inception_scale=(0.3, 1.0),
    flip=True,
    randaugment_layers=2,
    randaugment_magnitude=9,
    random_erasing=0.5,
    mixup_alpha=0.8,
    cutmix_alpha=1.0,
    mix_prob=0.8,
)


@pytest.mark.slow
def test_resumed_stream_equals_the_uninterrupted_one_with_augmentations(folder):
    source = data_lib.load_source(data_config(source="imagefolder", root=str(folder)).data, "train")
    spec = spec_of(**HEAVY)
    fresh = take(data_lib.train_batches(source, spec, global_batch=4, seed=3), 5)
    resumed = take(data_lib.train_batches(source, spec, global_batch=4, seed=3, start_step=3), 2)
    for a, b in zip(fresh[3:], resumed, strict=True):
        assert a.keys() == b.keys() == {"image", "label", "soft_label"}
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    assert not np.array_equal(fresh[0]["image"], fresh[1]["image"])
    other_seed = next(data_lib.train_batches(source, spec, global_batch=4, seed=4))
    assert not np.array_equal(fresh[0]["image"], other_seed["image"])
    # Every epoch is a permutation: 3 batches of 4 cover the 12 examples once.
    labels = np.concatenate([b["label"] for b in fresh[:3]])
    np.testing.assert_array_equal(np.bincount(labels), [4, 4, 4])


def test_pipelines_are_traced_without_autograph(folder, monkeypatch):
    """AutoGraph's rewrite of the preprocessing took a second or more per pipeline: no map
    function of the training, evaluation or checking pipelines goes through it."""
    from tensorflow.python.autograph.impl import api as autograph_api

    converted = []
    convert = autograph_api._convert_actual
    monkeypatch.setattr(
        autograph_api, "_convert_actual", lambda f, ctx: converted.append(f) or convert(f, ctx)
    )
    tf.data.Dataset.range(2).map(lambda x: x + 1)  # the probe sees a plain map's conversion
    assert converted
    converted.clear()
    source = data_lib.load_source(data_config(source="imagefolder", root=str(folder)).data, "train")
    spec = spec_of(**HEAVY)
    batch = next(data_lib.train_batches(source, spec, global_batch=4, seed=0))
    assert batch["soft_label"].shape == (4, 3)
    batches = list(data_lib.eval_batches(source, spec, global_batch=4))
    assert sum(int(b["mask"].sum()) for b in batches) == source.num_examples
    assert data_lib.check_examples(source, spec) == 0
    assert converted == []


def test_closing_batches_hands_the_iterator_teardown_to_another_thread():
    """tf.data's iterator teardown can wait tens of seconds for its autotuning thread: closing
    returns at once, the iterator is still released (on a daemon thread), iteration ends."""
    arrays = data_lib.from_arrays(np.zeros((8, 4, 4), np.uint8), np.arange(8))
    batches = data_lib.train_batches(arrays, spec_of(image_size=4), global_batch=4, seed=0)
    assert next(batches)["image"].shape == (4, 4, 4, 3)
    released, released_on = threading.Event(), []

    class SlowTeardown:  # stands in for the tf.data iterator, keeping the real one alive
        def __init__(self, iterator):
            self.iterator = iterator

        def __del__(self):
            time.sleep(1.0)
            released_on.append(threading.current_thread().name)
            released.set()

    batches._iter = SlowTeardown(batches._iter)
    start = time.perf_counter()
    batches.close()
    assert time.perf_counter() - start < 0.5
    assert released.wait(10) and released_on == ["release_tf_data"]
    with pytest.raises(StopIteration):
        next(batches)
    batches.close()  # twice is fine


def test_resume_of_a_sequential_source():
    """tfds-like sources (no random access) resume through the seeded shuffle buffer."""
    arrays = data_lib.from_arrays(
        (np.arange(320).reshape(20, 4, 4) % 255).astype(np.uint8), np.arange(20)
    )
    source = data_lib.Source(arrays.dataset, arrays.num_examples, arrays.class_names)
    spec = spec_of(image_size=4, random_crop=True, crop_padding=1, flip=True)
    fresh = take(data_lib.train_batches(source, spec, global_batch=4, seed=0), 4)
    resumed = take(data_lib.train_batches(source, spec, global_batch=4, seed=0, start_step=2), 2)
    for a, b in zip(fresh[2:], resumed, strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])


def _sequential_ids(n: int, reads: list | None = None) -> data_lib.Source:
    """A source read in order (as tfds) whose label is each example's id (0..n-1); ``reads``
    collects the id of each record read from it."""

    def example(i: tf.Tensor) -> dict:
        if reads is not None:
            i = tf.py_function(lambda x: reads.append(int(x)) or x, [i], tf.int64)
            i.set_shape([])
        return {"image": tf.zeros((4, 4, 3), tf.uint8), "label": i}

    dataset = tf.data.Dataset.range(n).map(example)
    return data_lib.Source(dataset, n, tuple(str(c) for c in range(n)))


def _ids(batches: list[dict]) -> list[int]:
    return [int(i) for b in batches for i in b["label"]]


def test_a_sequential_source_resumes_in_a_later_epoch_exactly_and_reshuffles_each_epoch():
    """Each epoch of a tfds-like source is shuffled anew (it was the same order every epoch,
    near enough), and a resume in a later epoch goes on as the uninterrupted stream does."""
    source, spec = _sequential_ids(10), spec_of(image_size=4)
    fresh = _ids(take(data_lib.train_batches(source, spec, global_batch=4, seed=0), 10))
    epochs = [fresh[e * 10 : (e + 1) * 10] for e in range(4)]
    assert all(sorted(e) == list(range(10)) for e in epochs)  # each epoch a permutation
    assert len({tuple(e) for e in epochs}) == 4, epochs
    # Step 7: position 28, in the third epoch; its batch runs into the fourth.
    resumed = data_lib.train_batches(source, spec, global_batch=4, seed=0, start_step=7)
    assert _ids(take(resumed, 3)) == fresh[28:40]
    assert fresh != _ids(take(data_lib.train_batches(source, spec, global_batch=4, seed=1), 10))
    stored = data_lib.train_batches(source, spec, global_batch=4, seed=0, shuffle_buffer=1)
    assert _ids(take(stored, 5)) == list(range(10)) * 2  # a buffer of one: the stored order


def test_a_sequential_source_with_skipped_images_resumes_at_its_position_exactly():
    """With skip_corrupt the stream is ahead of the step's position: resumed at the batches'
    ``next_position`` in a later epoch, it goes on as the uninterrupted stream does."""
    png = tf.io.encode_png(tf.zeros((4, 4, 3), tf.uint8))
    images = tf.where(tf.range(10) == 3, tf.constant(b"not an image"), png)
    dataset = tf.data.Dataset.from_tensor_slices({"image": images, "label": tf.range(10)})
    source = data_lib.Source(dataset, 10, tuple("abcdefghij"), skip_corrupt=True)
    spec = spec_of(image_size=4)
    batches = data_lib.train_batches(source, spec, global_batch=4, seed=0)
    take(batches, 6)  # 24 examples delivered, of 2 epochs and a half
    position = batches.next_position
    assert batches.skipped >= 2 and position == 24 + batches.skipped
    fresh = _ids(take(batches, 4))
    resumed = data_lib.train_batches(
        source, spec, global_batch=4, seed=0, start_step=6, start_position=position
    )
    assert _ids(take(resumed, 4)) == fresh and 3 not in fresh


def test_a_sequential_source_resumes_without_reading_the_epochs_before():
    """A resume reads the examples of its own epoch before it (and a buffer's worth), not every
    earlier epoch's: at ImageNet scale those took hours."""
    reads: list[int] = []

    def first_after(position: int) -> tuple[int, int]:
        reads.clear()
        ds = pipeline._streaming_order(_sequential_ids(50, reads), position, 0, buffer=8)
        ((at, example),) = ds.take(1).as_numpy_iterator()
        return int(at), len(reads)

    assert first_after(3) == (3, 8 + 3)  # the buffer filled, and a read for each one skipped
    assert first_after(100 * 50 + 3) == (5003, 11)
    reads.clear()  # through train_batches: under two epochs' worth (it read 5,000 and more)
    source, spec = _sequential_ids(50, reads), spec_of(image_size=4)
    batches = data_lib.train_batches(source, spec, global_batch=2, seed=0, start_step=2500)
    next(batches)
    batches.close()
    assert len(reads) < 100, len(reads)


def test_each_host_reads_its_own_slice(monkeypatch):
    source = data_lib.from_arrays(np.zeros((10, 4, 4), np.uint8), np.arange(10))
    spec = spec_of(image_size=4)
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    seen, evaluated = [], []
    for host in (0, 1):
        monkeypatch.setattr(jax, "process_index", lambda host=host: host)
        batches = take(data_lib.train_batches(source, spec, global_batch=4, seed=0), 5)
        assert all(b["label"].shape == (2,) for b in batches)
        labels = np.concatenate([b["label"] for b in batches])
        assert set(labels) == set(range(host, 10, 2))  # one epoch of this host's 5 rows
        seen.append(labels)
        ev = list(data_lib.eval_batches(source, spec, global_batch=4))
        assert len(ev) == 3  # ceil(5 / 2) on both hosts
        evaluated += list(np.concatenate([b["label"][b["mask"] > 0] for b in ev]))
    assert sorted(evaluated) == list(range(10))


def _memory() -> tuple[int, int]:
    """Resident and peak resident bytes of this process."""
    fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return tuple(int(fields[k].split()[0]) * 1024 for k in ("VmRSS", "VmHWM"))


def _read_both_ways(source) -> None:
    """A few batches of a training and of an evaluation pipeline over ``source``."""
    spec = spec_of(image_size=16)
    train = data_lib.train_batches(source, spec, global_batch=32, seed=0)
    evaluation = data_lib.eval_batches(source, spec, global_batch=32)
    for _ in range(2):
        next(train), next(evaluation)
    train.close(), evaluation.close()


@pytest.mark.skipif(not pathlib.Path("/proc/self/clear_refs").exists(), reason="Linux only")
def test_arrays_are_held_once_by_their_pipelines():
    """Training and evaluation over an in-memory source hold its arrays once (in TensorFlow,
    shared with ``columns``), at most a copy of the caller's: before, ``tf.constant`` copied them
    twice (numpy, then aligned), and tf.data copied the constant again at each iterator (its
    graph rewrite): 3.2x the arrays held after, 4.1x at the peak (now 1.0x, the aligned copy)."""
    rng = np.random.default_rng(0)
    _read_both_ways(data_lib.from_arrays(rng.integers(0, 256, (64, 8, 8), np.uint8), np.arange(64)))
    images = rng.integers(0, 256, (12_000, 64, 64, 3), np.uint8)  # the caller's: 140 MiB
    labels = rng.integers(0, 10, len(images))
    gc.collect()
    pathlib.Path("/proc/self/clear_refs").write_text("5")  # the peak from here
    before, _ = _memory()
    source = data_lib.from_arrays(images, labels)
    _read_both_ways(source)
    after, peak = _memory()
    held, most = (after - before) / images.nbytes, (peak - before) / images.nbytes
    assert held < 1.3 and most < 1.3, (held, most)


def test_aligned_arrays_are_not_copied():
    """Numbers at a 64-byte boundary go to TensorFlow as they are (DLPack): the pipelines read
    the caller's memory; other arrays are copied once, to such a boundary."""
    buffer = np.zeros(12 * 4 * 4 + 64, np.uint8)
    start = -buffer.ctypes.data % 64
    images = buffer[start : start + 12 * 4 * 4].reshape(12, 4, 4, 1)
    images[:] = np.arange(12)[:, None, None, None] * 10
    source = data_lib.from_arrays(images, np.arange(12) % 3)
    batches = data_lib.train_batches(source, spec_of(image_size=4), global_batch=4, seed=0)
    first = next(batches)
    batches.close()
    assert np.shares_memory(source.columns["image"], images)
    images[0, 0, 0, 0] = 77  # what TensorFlow reads is that memory
    assert int(source.column_variables["image"][0, 0, 0, 0]) == 77
    rows = np.rint(first["image"][:, 0, 0, 0]).astype(int) // 10  # each image's row
    np.testing.assert_array_equal(first["label"], rows % 3)
    unaligned = buffer[start + 1 : start + 49].reshape(3, 4, 4)
    unaligned = data_lib.from_arrays(unaligned, np.arange(3))
    unaligned.column_variables  # noqa: B018 (made here)
    assert unaligned.columns["image"].ctypes.data % 64 == 0
    assert not np.shares_memory(unaligned.columns["image"], buffer)
    swapped = np.arange(6 * 12, dtype=">f4").reshape(6, 2, 2, 3)  # copied into native order
    columns = data_lib.from_columns({"image": swapped, "label": np.arange(6)}, ["a"] * 6)
    np.testing.assert_array_equal(columns.column_variables["image"].numpy(), swapped)


# Augmentations.


def _square_image() -> np.ndarray:
    """32x32 uint8, zero with a 255 centre square of 16 pixels."""
    image = np.zeros((32, 32, 3), np.uint8)
    image[8:24, 8:24] = 255
    return image


def _run(spec: InputSpec, image: np.ndarray, *, train: bool, index: int = 0) -> np.ndarray:
    fn = make_preprocess(spec, train=train, seed=0)
    return fn(tf.constant(index), {"image": tf.constant(image), "label": tf.constant(0)})[
        "image"
    ].numpy()


def test_resize_and_center_crop_with_crop_fraction():
    spec = spec_of(image_size=8, crop_fraction=0.5)
    assert spec.resize == 16 and InputSpec(224, crop_fraction=0.875).resize == 256
    out = _run(spec, _square_image(), train=False)  # 32 -> 16, centre 8 = the white square
    assert out.shape == (8, 8, 3) and out[1:-1, 1:-1].min() > 250
    whole = _run(spec_of(image_size=8), _square_image(), train=False)  # 32 -> 8: black corners
    assert whole[0, 0].max() < 5 and whole[4, 4].min() > 250
    with pytest.raises(ValueError, match="at most one"):
        spec_of(resize_size=20, crop_fraction=0.5)


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
@pytest.mark.parametrize("shorter", [23, 27, 60])  # shrinking (antialiased), odd margin, enlarging
def test_eval_resize_equals_torchvision(timm, interpolation, shorter):
    """The evaluation resize and centre crop of a 37 x 53 image equal torchvision's ``Resize``
    and ``CenterCrop`` (timm's evaluation transform) of the same 8-bit RGB image, for either
    interpolation: the same output size, window and resampling, rounded as PIL's two 8-bit
    passes are (a level off at a few ties of PIL's fixed-point weights)."""
    from torchvision import transforms  # importable once the timm fixture has run

    image = np.random.default_rng(0).integers(0, 256, (37, 53, 3), np.uint8)
    spec = spec_of(image_size=20, resize_size=shorter, interpolation=interpolation)
    got = _run(spec, image, train=False)
    mode = getattr(transforms.InterpolationMode, interpolation.upper())
    timm_eval = transforms.Compose(
        [transforms.Resize(shorter, interpolation=mode), transforms.CenterCrop(20)]
    )
    expected = np.asarray(timm_eval(Image.fromarray(image)), np.float32)
    off = np.abs(got - expected)
    assert off.max() <= 1 + 1e-3 and (off > 0.5).mean() < 0.02, (off.max(), (off > 0.5).mean())
    if interpolation == "bicubic":  # and differs from bilinear by more than that
        bilinear = _run(spec_of(image_size=20, resize_size=shorter), image, train=False)
        assert np.abs(bilinear - got).max() > 1
    with pytest.raises(ValueError, match="input.interpolation must be one of"):
        spec_of(interpolation="lanczos")


@pytest.mark.parametrize("method", ["bilinear", "bicubic"])
def test_resize_takes_its_passes_in_pils_order(method):
    """PIL resizes the height first when it loses more than twice as many pixels as the width
    (a portrait image squashed to a square, as segmentation's whole-image resize does), else
    the width first; bicubic's rounded intermediate differs by up to 11 levels between the two
    orders, so the resize follows PIL's."""
    rng = np.random.default_rng(0)
    shapes = [(100, 80, 64, 64), (200, 100, 64, 64), (64, 64, 32, 48), (155, 106, 43, 41),
              (50, 40, 64, 64), (100, 80, 120, 30)]  # fmt: skip
    for h, w, out_h, out_w in shapes:
        image = rng.integers(0, 256, (h, w, 3), np.uint8)
        want = np.asarray(
            Image.fromarray(image).resize(
                (out_w, out_h), {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}[method]
            )
        )
        got = augment.clamp(
            augment.resize(tf.constant(image, tf.float32), tf.constant([out_h, out_w]), method),
            method,
        ).numpy()
        off = np.abs(got - want)
        assert off.max() <= 1 + 1e-3 and (off > 0.5).mean() < 0.04, ((h, w), off.max())  # ties


def test_normalisation_uses_mean_and_std():
    spec = spec_of(image_size=4, mean=(0.5, 0.5, 0.5), std=(0.25, 0.5, 1.0))
    out = _run(spec, np.full((4, 4, 3), 255, np.uint8), train=False)
    np.testing.assert_allclose(out[0, 0], [2.0, 1.0, 0.5], rtol=1e-6)


def test_inception_crop_box_respects_scale_and_ratio():
    shape = tf.constant([100, 200, 3])
    for i in range(50):
        top, left, h, w = augment.sample_inception_box(
            shape, (0.2, 0.5), (0.5, 2.0), tf.constant([0, i])
        ).numpy()
        assert 0.2 * 0.95 <= h * w / 20000 <= 0.5 * 1.05, (h, w)
        assert 0.5 * 0.9 <= w / h <= 2.0 * 1.1 and top + h <= 100 and left + w <= 200
    full = augment.sample_inception_box(shape, (1.0, 1.0), (2.0, 2.0), tf.constant([0, 0]))
    np.testing.assert_array_equal(full.numpy(), [0, 0, 100, 200])


def test_inception_crop_decodes_jpeg_windows_and_pngs(folder):
    for name in ("cat/000.jpg", "dog/000.jpeg", "cat/003.png"):
        data = tf.io.read_file(str(folder / "train" / name))
        out = augment.decode_inception_crop(
            data, 12, (0.3, 1), (0.75, 1.33), tf.constant([1, 2]), "bilinear"
        )
        assert out.shape == (12, 12, 3) and 0 <= out.numpy().min() <= out.numpy().max() <= 255
    # The whole image: the same as resizing the decoded image.
    data = tf.io.read_file(str(folder / "train" / "cat" / "000.jpg"))
    seed = tf.constant([0, 0])
    full = augment.decode_inception_crop(data, 8, (1, 1), (26 / 20, 26 / 20), seed, "bilinear")
    decoded = tf.cast(augment.decode(data), tf.float32)
    expected = augment.resize(decoded, tf.constant([8, 8]), "bilinear")
    np.testing.assert_array_equal(full.numpy(), expected.numpy())


def test_random_crop_with_padding_is_a_shifted_window():
    image = np.random.default_rng(0).integers(1, 255, (8, 8, 3)).astype(np.uint8)
    padded = np.pad(image, [(2, 2), (2, 2), (0, 0)]).astype(np.float32)
    spec = spec_of(image_size=8, random_crop=True, crop_padding=2)
    offsets = set()
    for i in range(20):
        out = _run(spec, image, train=True, index=i)
        match = [
            (dy, dx)
            for dy in range(5)
            for dx in range(5)
            if np.allclose(out, padded[dy : dy + 8, dx : dx + 8], atol=1e-3)
        ]
        assert match
        offsets.add(match[0])
    assert len(offsets) > 5
    with pytest.raises(ValueError, match="crop_padding needs"):
        spec_of(random_crop=False, crop_padding=4)


def test_flip_is_random_and_only_in_training():
    image = np.random.default_rng(0).integers(0, 255, (8, 8, 3)).astype(np.uint8)
    spec = spec_of(image_size=8, flip=True)
    outs = [_run(spec, image, train=True, index=i) for i in range(10)]
    flipped = [np.allclose(o, image[:, ::-1], atol=1e-3) for o in outs]
    same = [np.allclose(o, image, atol=1e-3) for o in outs]
    assert all(f or s for f, s in zip(flipped, same, strict=True)) and any(flipped) and any(same)
    np.testing.assert_allclose(_run(spec, image, train=False), image, atol=1e-3)


@pytest.mark.parametrize("name", sorted(OPS))
def test_randaugment_op(name):
    image = tf.constant(np.random.default_rng(0).integers(0, 256, (12, 12, 3)), tf.float32)
    for level in (-1.0, 0.5, 1.0):
        out = OPS[name](image, tf.constant(level)).numpy()
        assert out.shape == (12, 12, 3) and np.isfinite(out).all()
        assert out.min() >= 0 and out.max() <= 255
    if name == "Invert":
        np.testing.assert_array_equal(out, 255 - image.numpy())
    unchanged = {"Rotate": 0.0, "ShearX": 0.0, "Color": 0.5, "Contrast": 0.5, "Sharpness": 0.5}
    if name in unchanged:  # timm's rand-mM: the enhancements' factor is 1.0 at M = 5
        np.testing.assert_allclose(OPS[name](image, tf.constant(unchanged[name])), image, atol=1e-3)
    if name in ("Color", "Contrast", "Brightness", "Sharpness", "Solarize"):
        increasing = operations(increasing=True)[name]  # timm's inc1: no change at M = 0
        np.testing.assert_allclose(increasing(image, tf.constant(0.0)), image, atol=1e-3)
    if name in ("AutoContrast", "Equalize"):
        assert out.min() == 0 and out.max() == 255


def test_randaugment_is_seeded():
    image = tf.constant(np.random.default_rng(0).integers(0, 256, (12, 12, 3)), tf.float32)
    outs = [randaugment(image, 3, 10, tf.constant([0, i])).numpy() for i in range(8)]
    again = randaugment(image, 3, 10, tf.constant([0, 0])).numpy()
    np.testing.assert_array_equal(outs[0], again)
    assert len({o.tobytes() for o in outs}) > 4


# timm's names where they differ, and the ops whose magnitudes follow its inc1 form.
TIMM_OPS = {"TranslateX": "TranslateXRel", "TranslateY": "TranslateYRel"}
INCREASING = ("Posterize", "Solarize", "Color", "Contrast", "Brightness", "Sharpness")


@pytest.mark.parametrize("increasing", [False, True])
def test_randaugment_ops_match_timms(timm, monkeypatch, increasing):
    """Each op at magnitudes 3, 5, 9 and 10, both signs, against timm's PIL op (its
    ``rand-mM-nN`` and ``inc1`` forms) on the same image."""
    import random

    from timm.data import auto_augment

    rng = np.random.default_rng(0)
    smooth = np.kron(rng.integers(0, 256, (6, 8, 3)), np.ones((4, 4, 1)))  # blocks of 4 px
    pixels = np.clip(smooth + rng.normal(0, 12, smooth.shape), 0, 255).astype(np.uint8)
    mean = (124, 116, 104)  # timm fills with the normalisation's mean (ImageNet's here)
    hparams = {**auto_augment._HPARAMS_DEFAULT, "img_mean": mean,
               "interpolation": Image.BILINEAR}  # fmt: skip
    ops = operations(increasing, fill=mean)
    for name, op in ops.items():
        timm_name = TIMM_OPS.get(name, name) + (
            "Increasing" if increasing and name in INCREASING else ""
        )
        for magnitude in (3, 5, 9, 10):
            for sign in (1.0, -1.0):
                # timm negates a signed level when random.random() > 0.5
                monkeypatch.setattr(random, "random", lambda s=sign: 0.9 if s < 0 else 0.1)
                ref = auto_augment.AugmentOp(timm_name, 1.0, magnitude, hparams)
                level = tf.constant(sign * magnitude / 10)
                out = op(tf.constant(pixels, tf.float32), level).numpy()
                if name == "Posterize" and ref.level_fn(magnitude, hparams) == (0,):
                    assert (out == 0).all()  # 0 bits (black), which Pillow now refuses
                    continue
                expected = np.asarray(ref(Image.fromarray(pixels)), np.float32)
                diff = np.abs(np.round(out) - expected)
                where = f"{name} M={magnitude} sign {sign:+.0f}"
                if name in ("Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY"):
                    inner = diff[2:-2, 2:-2]  # interpolation differs at the fill's edge
                    assert np.median(inner) <= 1 and inner.mean() < 2.5, where
                elif name in ("Color", "Contrast", "Brightness"):  # PIL's ImageEnhance; the
                    assert diff.max() <= 1 and diff.mean() < 0.05, where  # factor in float32
                elif name in ("Sharpness", "AutoContrast"):
                    assert diff.max() <= 2, where  # PIL's smoothing filter rounds in integers
                else:
                    assert diff.max() <= 1, where
    monkeypatch.undo()


def test_randaugment_magnitude_std():
    draws = lambda std: np.array(
        [layer_magnitude(9.0, std, tf.constant([0, i])).numpy() for i in range(400)]
    )
    assert (draws(0.0) == 9.0).all()
    normal = draws(0.5)
    assert abs(normal.mean() - 9.0) < 0.1 and 0.4 < normal.std() < 0.6 and normal.max() <= 10
    uniform = draws(float("inf"))
    assert 0 <= uniform.min() < 0.5 and 8.5 < uniform.max() <= 9 and abs(uniform.mean() - 4.5) < 0.4
    assert normal.min() != normal.max()
    with pytest.raises(specs.ConfigError, match="randaugment_magnitude_std"):
        spec_of(randaugment_layers=2, randaugment_magnitude_std=-1.0)
    with pytest.raises(specs.ConfigError, match="randaugment_magnitude must lie"):
        spec_of(randaugment_layers=2, randaugment_magnitude=12)


def test_random_erasing_draws_as_timms(timm):
    """Erased fractions of a 16 x 16 image, 600 draws each: the same mean as timm's
    RandomErasing (which redraws boxes that do not fit), and no box spans a whole side."""
    import random

    import torch
    from timm.data.random_erasing import RandomErasing

    random.seed(0)
    torch.manual_seed(0)
    reference = RandomErasing(probability=1.0, mode="pixel", device="cpu")
    theirs, ours = [], []
    for i in range(600):
        x = torch.zeros(3, 16, 16)
        theirs.append((reference(x) != 0).any(0).numpy())
        out = augment.random_erase(tf.zeros((16, 16, 3)), 1.0, tf.constant([0, i])).numpy()
        ours.append((out != 0).any(-1))
    theirs, ours = np.array(theirs), np.array(ours)
    assert abs(theirs.mean() - ours.mean()) < 0.015, (theirs.mean(), ours.mean())
    assert not ours.all(1).any() and not ours.all(2).any()


def test_random_erasing():
    image = tf.zeros((16, 16, 3))
    erased = [augment.random_erase(image, 1.0, tf.constant([0, i])).numpy() for i in range(10)]
    for out in erased:
        fraction = (out != 0).any(-1).mean()
        assert 0.015 <= fraction <= 0.5
        rows, cols = np.nonzero((out != 0).any(-1))
        box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
        assert box == len(rows)  # one rectangle
    kept = augment.random_erase(image, 0.0, tf.constant([0, 0]))
    np.testing.assert_array_equal(kept, image)


@pytest.mark.parametrize("mixup, cutmix", [(1.0, 0.0), (0.0, 1.0), (0.5, 0.5)])
def test_mixup_and_cutmix_soft_labels(mixup, cutmix):
    images = tf.constant(np.random.default_rng(0).normal(size=(4, 8, 8, 3)), tf.float32)
    batch = {"image": images, "label": tf.constant([0, 1, 2, 3])}
    for i in range(6):
        out = augment.mix_batch(
            batch,
            num_classes=5,
            mixup_alpha=mixup,
            cutmix_alpha=cutmix,
            prob=1.0,
            switch_prob=0.5,
            seed=tf.constant([0, i]),
        )
        soft = out["soft_label"].numpy()
        np.testing.assert_allclose(soft.sum(-1), 1, rtol=1e-5)
        lam = soft[0, 0]
        np.testing.assert_allclose(soft[0, 3], 1 - lam, atol=1e-6)
        mixed, x, other = out["image"].numpy(), images.numpy(), images.numpy()[::-1]
        from_first = np.isclose(mixed, x).all(-1).mean()
        is_blend = np.allclose(mixed, lam * x + (1 - lam) * other, atol=1e-5)
        is_paste = np.all(np.isclose(mixed, x) | np.isclose(mixed, other))
        if cutmix == 0:
            assert is_blend
        if mixup == 0:
            assert is_paste and from_first == pytest.approx(lam, abs=1e-6)
        np.testing.assert_array_equal(out["label"], [0, 1, 2, 3])
    unmixed = augment.mix_batch(
        batch, num_classes=5, mixup_alpha=1, cutmix_alpha=0, prob=0.0, switch_prob=0,
        seed=tf.constant([0, 0]),
    )  # fmt: skip
    np.testing.assert_array_equal(unmixed["image"], images)
    np.testing.assert_array_equal(unmixed["soft_label"], np.eye(5)[:4])


def test_color_jitter_is_torchvisions_on_pil_images(timm):
    """input.color_jitter: the factors and order drawn for a seed, applied as torchvision's
    ColorJitter applies them to a PIL image (PIL's ImageEnhance), give the same pixels; the
    factors lie in [1 - s, 1 + s] and every order occurs."""
    import torchvision.transforms.functional as F  # importable once timm declared its ops

    rng = np.random.default_rng(0)
    photo = rng.integers(0, 256, (24, 20, 3)).astype(np.uint8)
    photo[:8] = [200, 40, 90]  # flat regions, where rounding differences would show
    adjust = [F.adjust_brightness, F.adjust_contrast, F.adjust_saturation]
    orders = set()
    for i in range(12):
        seed = tf.constant([3, i])
        factors, order = augment.color_jitter_draw(0.4, seed)
        assert np.all((0.6 <= factors.numpy()) & (factors.numpy() <= 1.4))
        orders.add(tuple(order.numpy()))
        want = Image.fromarray(photo)
        for k in order.numpy():
            want = adjust[k](want, float(factors[k]))
        got = augment.color_jitter(tf.constant(photo, tf.float32), 0.4, seed)
        np.testing.assert_array_equal(got.numpy(), np.asarray(want))
    assert len(orders) > 3


def test_cutmix_box_is_timms_rand_bbox(timm):
    """The pasted box for a given lambda and centre is timm's (odd cut sizes included: the far
    edge is ``centre + (cut + 1) // 2``), clipped at every border."""
    from unittest import mock

    from timm.data.mixup import rand_bbox

    for lam in (0.3, 0.5, 0.71, 0.9, 0.97):
        for cy, cx in [(0, 0), (5, 17), (31, 23), (16, 12)]:
            with mock.patch.object(np.random, "randint", side_effect=[cy, cx]):
                expected = rand_bbox((3, 32, 24), np.float32(lam))
            box = augment.cutmix_box(32, 24, tf.constant(lam, tf.float32), cy, cx)
            assert [int(b) for b in box] == [int(e) for e in expected], (lam, cy, cx)


def test_input_config_is_fully_read():
    cfg = TrackedConfig(default_config())
    spec = specs.input_spec(cfg.input)
    assert cfg.input.unread() == [] and spec.random_crop and not spec.mixes


@pytest.mark.parametrize(
    "overrides, match",
    [
        (
            {"inception_crop": True, "inception_scale": (0.9, 0.1)},
            r"inception_scale must be "
            r"\(lo, hi\) with 0 < lo <= hi <= 1; got \(0.9, 0.1\)",
        ),  # it cropped nothing
        ({"inception_crop": True, "inception_scale": (0.08, 1.5)}, "inception_scale must be"),
        ({"inception_crop": True, "inception_scale": (0, 0)}, "inception_scale must be"),
        ({"inception_crop": True, "inception_ratio": (2.0, 0.5)}, "inception_ratio must be"),
        (
            {"inception_crop": True, "inception_ratio": (0.75,)},
            r"inception_ratio must be .*"
            r"got \(0.75,\)",
        ),  # fmt: skip
        ({"random_erasing": 1.5}, r"input.random_erasing must lie in \[0, 1\]; got 1.5"),
        ({"random_erasing": True}, r"input.random_erasing must be a number in \[0, 1\]; got True"),
        ({"mixup_alpha": 0.8, "mix_prob": -1.0}, r"input.mix_prob must lie in \[0, 1\]"),
        ({"mixup_alpha": 0.8, "cutmix_alpha": 1.0, "mix_switch_prob": 2.0}, "mix_switch_prob"),
        ({"mixup_alpha": float("nan")}, r"input.mixup_alpha must lie in \[0, inf\); got nan"),
        ({"cutmix_alpha": -1.0}, r"input.cutmix_alpha must lie in \[0, inf\)"),
        ({"randaugment_layers": -1}, r"input.randaugment_layers must be an integer >= 0; got -1"),
        ({"random_crop": True, "crop_padding": -4}, r"input.crop_padding must be an integer >= 0"),
        ({"image_size": 0}, r"input.image_size must be an integer >= 1; got 0"),
        ({"image_size": 224.0}, r"input.image_size must be an integer >= 1; got 224.0"),
        ({"resize_size": 0}, r"input.resize_size must be an integer >= 1; got 0"),
        (
            {"mean": (127, 127, 127), "std": (64, 64, 64)},
            r"input.mean \(127, 127, 127\) looks like "
            r"0-255 units; vision_jax takes fractions of 255 .*: divide by 255",
        ),  # fmt: skip
        ({"std": (58.4, 57.1, 57.4)}, r"input.std \(58.4, 57.1, 57.4\) looks like 0-255 units"),
        ({"mean": (0.5, 0.5, -0.1)}, r"input.mean must lie in \[0, 1\]; got -0.1"),
    ],
)
def test_out_of_range_input_values_are_refused(overrides, match):
    """Each was accepted and trained wrongly in silence (a swapped scale cropped nothing,
    0-255 means made every input a constant, True erased every image), or failed at the first
    batch with a TensorFlow error that named no key."""
    with pytest.raises(specs.ConfigError, match=match):
        InputSpec(**{"image_size": 16, **overrides})
    InputSpec(image_size=np.int64(16), resize_size=18, mean=(0, 0, 1), std=(1 / 255, 1, 1))


def test_a_steps_mixing_seed_is_not_an_examples_seed(monkeypatch):
    """Mixing at step k does not draw from example k's key (its crop, flip and RandAugment
    draws: both were seeded (host seed, k))."""
    source = data_lib.from_arrays(np.zeros((8, 16, 16, 3), np.uint8), np.arange(8) % 2)
    mix_batch = augment.mix_batch

    def recording(batch, *, seed, **kwargs):
        return {**mix_batch(batch, seed=seed, **kwargs), "mix_seed": seed}

    monkeypatch.setattr(augment, "mix_batch", recording)
    batches = data_lib.train_batches(source, spec_of(mixup_alpha=1.0), global_batch=2, seed=5)
    seeds = [tf.constant(batch["mix_seed"]) for batch in take(batches, 3)]
    steps = [tf.constant([5, k], tf.int64) for k in range(3)]
    examples = [tf.random.experimental.stateless_split(key, 5) for key in steps]
    mixing = [tf.random.experimental.stateless_split(s, 4) for s in seeds[:3]]
    drawn = {tuple(k.numpy()) for keys in [*examples, *mixing] for k in [*keys]}
    assert len(drawn) == 3 * 5 + 3 * 4  # no key drawn twice
    assert seeds[0].dtype == tf.int64  # (a 32-bit seed would repeat within long runs)


def test_training_from_an_image_folder_records_class_names(tmp_path, folder):
    from test_train import small_config

    from vision_jax.train import train_and_evaluate

    cfg = small_config(total_steps=2, batch_size=4, eval_batch_size=6)
    cfg.data.source, cfg.data.root = "imagefolder", str(folder)
    cfg.input.mixup_alpha = 0.5  # batches carry soft_label; the train step must accept them
    result = train_and_evaluate(cfg, str(tmp_path))
    assert result["eval/examples"] == 6 and np.isfinite(result["train/loss"])
    meta = json.loads(next((tmp_path / "checkpoints" / "2").rglob("meta/*")).read_text())
    assert meta["class_names"] == ["cat", "dog", "eel"]


def test_randaugment_translate_and_shear_move_pixels():
    image = np.random.default_rng(0).integers(0, 256, (20, 20, 3)).astype(np.float32)
    level = tf.constant(2 / (0.45 * 20))  # a 2-pixel shift
    moved = OPS["TranslateX"](tf.constant(image), level).numpy()
    np.testing.assert_allclose(moved[:, :-2], image[:, 2:], atol=1e-3)
    np.testing.assert_allclose(moved[:, -2:], 128.0)  # grey fill
    moved = OPS["TranslateY"](tf.constant(image), -level).numpy()
    np.testing.assert_allclose(moved[2:], image[:-2], atol=1e-3)
    # x += (y + 0.5) * 2 / 19 at pixel centres, as PIL: row 9 moves by one pixel
    sheared = OPS["ShearX"](tf.constant(image), tf.constant(2 / 19 / 0.3)).numpy()
    np.testing.assert_allclose(sheared[9, :-1], image[9, 1:], atol=1e-3)


def _write_idx(path, array):
    import gzip

    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape
    )
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_idx_source_reads_mnist_style_files(tmp_path):
    from vision_jax.data.idx import from_idx

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (20, 28, 28), dtype=np.uint8)
    labels = np.arange(20) % 10
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", images)
    _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", labels)
    source = from_idx(str(tmp_path), "train", class_names=[f"c{i}" for i in range(10)])
    assert source.num_examples == 20 and source.class_names[3] == "c3"
    got = next(source.dataset.batch(20).as_numpy_iterator())
    np.testing.assert_array_equal(got["image"][..., 0], images)
    np.testing.assert_array_equal(got["label"], labels)
    assert from_idx(str(tmp_path), "train[:25%]").num_examples == 5
    with pytest.raises(data_lib.DataError, match=r"t10k-images-idx3-ubyte\[.gz\] does not exist"):
        from_idx(str(tmp_path), "test")
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(b"\x00\x00\x09\x03junk")
    with pytest.raises(data_lib.DataError, match="not an unsigned-byte IDX file"):
        from_idx(str(tmp_path), "test")


def test_jpegs_decode_to_pils_pixels(shared_dir):
    """libjpeg's accurate DCT, as PIL (timm's loader) decodes: TensorFlow's default, the fast
    one, was up to 5 levels off; inception crops decode their window the same way."""
    import io
    import zipfile

    archive = shared_dir / "data/imagenette_224_val/imagenette2_224_val.zip"
    if not archive.is_file():
        pytest.skip("the Imagenette archive is absent")
    with zipfile.ZipFile(archive) as z:
        names = sorted(n for n in z.namelist() if n.endswith(".JPEG"))[::500][:8]
        files = [z.read(n) for n in names]
    for data in files:
        pil = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        np.testing.assert_array_equal(augment.decode(tf.constant(data)).numpy(), pil)
        h, w = pil.shape[:2]
        whole = augment.decode_inception_crop(
            tf.constant(data), 16, (1, 1), (w / h, w / h), tf.constant([0, 0]), "bilinear"
        )
        resized = np.asarray(Image.fromarray(pil).resize((16, 16), Image.BILINEAR), np.float32)
        np.testing.assert_allclose(whole.numpy(), resized, atol=1 + 1e-3)  # PIL's ties


def _jpeg_with_orientation(pixels: np.ndarray, orientation: int, endian: str) -> bytes:
    import io

    exif = Image.Exif()
    exif[0x0112] = orientation
    exif.endian = endian
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG", exif=exif.tobytes(), quality=95)
    return out.getvalue()


@pytest.mark.parametrize("endian", ["<", ">"])
def test_jpegs_are_turned_upright_by_their_exif_orientation(endian):
    """Each of the 8 orientations, in both byte orders: decoding gives PIL's
    ``exif_transpose`` of the image (as viewers show it), and so does the inception crop's
    (whole-image) window."""
    import io

    from PIL import ImageOps

    from vision_jax.data.exif import exif_orientation

    pixels = np.random.default_rng(0).integers(0, 256, (12, 20, 3), np.uint8)
    for orientation in range(1, 9):
        data = _jpeg_with_orientation(pixels, orientation, endian)
        assert int(exif_orientation(tf.constant(data))) == orientation
        with Image.open(io.BytesIO(data)) as stored:
            shown = np.asarray(ImageOps.exif_transpose(stored).convert("RGB"))
        np.testing.assert_array_equal(augment.decode(tf.constant(data)).numpy(), shown)
        h, w = shown.shape[:2]
        whole = augment.decode_inception_crop(
            tf.constant(data), 8, (1, 1), (w / h, w / h), tf.constant([0, 0]), "bilinear"
        )
        want = augment.resize(tf.constant(shown, tf.float32), [8, 8], "bilinear")
        np.testing.assert_array_equal(whole.numpy(), want.numpy())
    plain = io.BytesIO()
    Image.fromarray(pixels).save(plain, "JPEG")
    assert int(exif_orientation(tf.constant(plain.getvalue()))) == 1
    truncated = _jpeg_with_orientation(pixels, 6, endian)[:40]  # EXIF cut short: no orientation
    assert int(exif_orientation(tf.constant(truncated))) == 1


def _tiff(endian: str, entries: list[tuple[int, int]], magic: bytes = b"", offset: int = 8):
    """An EXIF block ("Exif\\0\\0" and a TIFF header) whose first IFD holds SHORT ``entries``."""
    import struct

    magic = magic or (b"II" if endian == "<" else b"MM")
    ifd = struct.pack(endian + "H", len(entries))
    for tag, value in entries:
        ifd += struct.pack(endian + "HHIHH", tag, 3, 1, value, 0)
    return b"Exif\0\0" + struct.pack(endian + "2sHI", magic, 42, offset) + ifd + b"\0" * 4


@pytest.mark.parametrize("endian", ["<", ">"])
def test_exif_orientation_parser_agrees_with_pil(endian):
    """The header parser reads the orientation PIL's ``getexif()[0x0112]`` reads (1 when
    absent or outside 1-8), in both byte orders, with the tag among others, past the IFD's
    end, in EXIF blocks cut short anywhere, and in JPEGs without EXIF."""
    import io
    import warnings

    from vision_jax.data import exif

    def jpeg(block: bytes | None) -> bytes:
        out = io.BytesIO()
        more = {} if block is None else {"exif": block}
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(out, "JPEG", **more)
        return out.getvalue()

    blocks = [_tiff(endian, [(0x010F, 5), (0x0112, o), (0x0131, 2)]) for o in range(11)]
    blocks += [_tiff(endian, [(0x010F, 5)]), _tiff(endian, [(0x0112, 6)], offset=5000)]
    whole = _tiff(endian, [(0x010F, 5), (0x0112, 6), (0x0131, 2)])
    # cut short anywhere but inside the orientation's entry (bytes 28-39: PIL drops the
    # entry; the parser, as it always did, reads on past the segment's end into the next one)
    blocks += [whole[:n] for n in range(6, len(whole)) if not 28 <= n < 40]
    files = [jpeg(block) for block in blocks] + [jpeg(None)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PIL's "Corrupt EXIF data"
        for data in files:
            with Image.open(io.BytesIO(data)) as image:
                want = exif.orientation_in(image)
            assert exif.parse_orientation(data) == want, data[:60]
            assert int(exif.exif_orientation(tf.constant(data))) == want
    assert {exif.parse_orientation(f) for f in files} == set(range(1, 9))


def test_exif_jpegs_decode_about_as_fast_as_plain_ones():
    """JPEGs with an EXIF header (orientation 1, as nearly every camera's photo) decode at
    about the speed of the same JPEGs without one (the parser once ran TensorFlow ops eagerly
    in a Python call: ~40 ms an image, 13-40x the decoding)."""
    import io
    import time

    rng = np.random.default_rng(0)
    pixels = [rng.integers(0, 256, (128, 128, 3), np.uint8) for _ in range(150)]

    def encoded(block: bytes | None) -> list[bytes]:
        out = []
        for p in pixels:
            buf = io.BytesIO()
            Image.fromarray(p).save(buf, "JPEG", **({} if block is None else {"exif": block}))
            out.append(buf.getvalue())
        return out

    def seconds(files: list[bytes]) -> float:
        dataset = tf.data.Dataset.from_tensor_slices(files).map(augment.decode)
        start = time.perf_counter()
        for _ in dataset:
            pass
        return time.perf_counter() - start

    with_exif, plain = encoded(_tiff("<", [(0x010F, 5), (0x0112, 1)])), encoded(None)
    times = [(seconds(with_exif), seconds(plain)) for _ in range(4)]  # the first one warms
    exif_time, plain_time = min(t[0] for t in times[1:]), min(t[1] for t in times[1:])
    # was ~24x; now ~1.3-2.1x: 10x leaves a loaded machine's noise room
    assert exif_time < 10 * plain_time, (exif_time, plain_time)


def test_idx_source_reads_fashion_mnist(shared_dir):
    from vision_jax.data.idx import from_idx

    source = from_idx(str(shared_dir / "data" / "fashion_mnist"), "test")
    assert source.num_examples == 10_000
    images = next(source.dataset.batch(10_000).as_numpy_iterator())["image"]
    assert images.shape == (10_000, 28, 28, 1)
    # PROVENANCE.txt: pixel mean 0.2860 (over the training set; the test set is within 0.002).
    assert abs(images.mean() / 255 - 0.2860) < 0.003


@pytest.mark.parametrize(
    "target, overrides",
    [("label", {}), ("label", {"mixup_alpha": 0.2, "cutmix_alpha": 1.0}), ("label_map", {}),
     ("label_map", {"color_jitter": 0.4})],
)  # fmt: skip
def test_example_shapes_are_those_of_the_batches(target, overrides):
    """The shapes the steps compile against ahead of the data (train and eval) are the
    batches' own: the keys, each row's shape and dtype."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (10, 20, 20, 3), np.uint8)
    labels = rng.integers(0, 3, (10, 20, 20) if target == "label_map" else 10)
    source = data_lib.from_arrays(images, labels, ["a", "b", "c"], target=target)
    spec = spec_of(random_crop=True, flip=True, **overrides)
    rows = lambda batch: {k: (v.shape[1:], v.dtype) for k, v in batch.items()}
    train = data_lib.train_batches(source, spec, global_batch=4, seed=0)
    try:
        assert rows(next(train)) == data_lib.train_example_shapes(source, spec)
    finally:
        train.close()
    evaluation = data_lib.eval_batches(source, spec, global_batch=4)
    assert rows(next(evaluation)) == data_lib.eval_example_shapes(source, spec)
    mixed = "mixup_alpha" in overrides
    assert ("soft_label" in data_lib.train_example_shapes(source, spec)) == mixed


def test_a_url_scheme_epath_cannot_read_is_an_error_naming_the_path():
    with pytest.raises(data_lib.DataError, match=r"hdfs://nn/data/train: not a local path"):
        data_lib.from_image_folder("hdfs://nn/data", "train")


def test_a_missing_image_folder_split_names_what_the_folder_holds(tmp_path):
    """A split folder that is not there: the message names the splits the root holds (or that
    the root itself is not a folder), so a wrong data.*_split is seen at once."""
    for split in ("train", "val"):
        (tmp_path / split / "cat").mkdir(parents=True)
    with pytest.raises(data_lib.DataError, match=rf"split {tmp_path}/test does not exist "
                       rf"\({tmp_path} holds train, val\)"):  # fmt: skip
        data_lib.from_image_folder(str(tmp_path), "test")
    with pytest.raises(data_lib.DataError, match=r"\(data.root .*nowhere is not a folder\)"):
        data_lib.from_image_folder(str(tmp_path / "nowhere"), "train")


def test_a_program_leaving_a_batch_iterator_open_exits(tmp_path):
    """EXIF-turned JPEGs decode through tf.py_function: a train_batches iterator left open at
    exit had those calls in flight while Python tore down, and the program never exited."""
    import os
    import subprocess
    import sys

    pixels = np.random.default_rng(0).integers(0, 256, (24, 40, 3), np.uint8)
    for label in ("a", "b"):
        (tmp_path / "train" / label).mkdir(parents=True)
        for i in range(12):
            data = _jpeg_with_orientation(pixels, 6 if i % 3 else 1, "<")
            (tmp_path / "train" / label / f"{i}.jpg").write_bytes(data)
    script = (
        "import sys\n"
        "from vision_jax.data.folders import from_image_folder\n"
        "from vision_jax.data.pipeline import train_batches\n"
        "from vision_jax.data.preprocess import InputSpec\n"
        "source = from_image_folder(sys.argv[1], 'train')\n"
        "batches = train_batches(source, InputSpec(image_size=16), global_batch=8, seed=0)\n"
        "next(batches)\n"
        "print('read', flush=True)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(pathlib.Path(__file__).parents[1])}
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)], env=env, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert done.returncode == 0 and "read" in done.stdout, done.stderr[-2000:]


def test_a_split_lacking_classes_takes_the_runs_labels_by_name(tmp_path, caplog):
    """A test folder without the class dog (small test sets) is labelled by train's classes,
    matched by name (eel stays 2), with a warning naming dog; a class train lacks refuses."""
    make_folder(tmp_path, per_class=1)
    shutil.rmtree(tmp_path / "test" / "dog")
    cfg = data_config(source="imagefolder", root=str(tmp_path))
    test = data_lib.load_source(specs.data_spec(cfg.data), "test")
    assert test.class_names == ["cat", "eel"]
    with caplog.at_level(logging.WARNING):
        mapped = data_lib.as_classes(test, ["cat", "dog", "eel"], "test")
    assert "The split 'test' lacks 1 of the run's 3 classes: dog (no examples" in caplog.text
    assert mapped.class_names == ["cat", "dog", "eel"]
    np.testing.assert_array_equal(mapped.columns["label"], [0, 0, 2, 2])
    batch = next(data_lib.eval_batches(mapped, spec_of(), global_batch=4))
    np.testing.assert_array_equal(batch["label"], [0, 0, 2, 2])
    assert data_lib.as_classes(test, ["cat", "dog"], "test") is None


def test_data_classes_pick_trains_classes_by_name_in_a_split_lacking_one(tmp_path):
    """data.classes are positions into train's classes: a test folder without dog (each folder
    split lists its own classes) keeps the same classes by name, those it holds (cat, eel for
    (0, 2); not its own second, eel, for (0, 1))."""
    make_folder(tmp_path, per_class=1, classes=("cat", "dog", "eel", "fox"))
    shutil.rmtree(tmp_path / "test" / "dog")
    cfg = data_config(source="imagefolder", root=str(tmp_path), classes=(0, 1, 2))
    assert data_lib.load_source(specs.data_spec(cfg.data), "train").class_names == [
        "cat", "dog", "eel",
    ]  # fmt: skip
    test = data_lib.load_source(specs.data_spec(cfg.data), "test")
    assert test.class_names == ["cat", "eel"]
    mapped = data_lib.as_classes(test, ["cat", "dog", "eel"], "test")
    np.testing.assert_array_equal(mapped.columns["label"], [0, 0, 2, 2])
    cfg = data_config(source="imagefolder", root=str(tmp_path), classes=(3, 1))
    assert data_lib.load_source(specs.data_spec(cfg.data), "test").class_names == ["fox"]


def test_a_tfds_split_fingerprint_holds_its_version_and_records(tmp_path):
    """The resolved dataset (tfds reads the newest version prepared) and a digest of the split's
    records (shards, lengths, bytes) tell a resume that the data changed, as many examples as
    before; moving the data_dir changes neither."""
    from vision_jax import run

    root = tmp_path / "images"
    make_folder(root, per_class=2, classes=("a", "b"))
    data_lib.build_tfds_from_folder(str(root), "tiny", str(tmp_path / "tfds"))
    first = data_lib.from_tfds("tiny", "train[:75%]", str(tmp_path / "tfds")).fingerprint()
    assert first["dataset"] == "tiny/1.0.0" and first["examples"] == 3
    shutil.move(tmp_path / "tfds", tmp_path / "moved")
    assert data_lib.from_tfds("tiny", "train[:75%]", str(tmp_path / "moved")).fingerprint() == first
    _save(root / "train" / "a" / "000.jpg", "RGB", seed=7, size=(30, 20))  # as many images
    shutil.rmtree(tmp_path / "moved" / "tiny")
    data_lib.build_tfds_from_folder(str(root), "tiny", str(tmp_path / "moved"))  # prepared again
    again = data_lib.from_tfds("tiny", "train[:75%]", str(tmp_path / "moved")).fingerprint()
    assert again["examples"] == 3 and again["dataset"] == "tiny/1.0.0"
    assert run._data_changes(first, again) == [
        "the records of tfds dataset tiny/1.0.0 changed (prepared again)"
    ]
    assert data_lib.pinned_tfds_name("tiny/config/1.0.0") == "tiny/config:1.0.0"


def test_tfds_labels_beyond_the_class_label_are_one_clear_error(tmp_path):
    """A tfds dataset whose label feature names fewer classes than its labels use (its
    features.json cut) is refused when read, as every other source's labels are when loaded:
    one line naming the dataset, the label and the class count, without the advice for
    unreadable images (it trained on one-hot targets of zeros, miscounted its evaluation)."""
    root = tmp_path / "images"
    make_folder(root, per_class=1, classes=("a", "b", "c"))
    data_lib.build_tfds_from_folder(str(root), "cut", str(tmp_path / "tfds"))
    folder = tmp_path / "tfds" / "cut" / "1.0.0"
    features = json.loads((folder / "features.json").read_text())
    features["featuresDict"]["features"]["label"]["classLabel"]["numClasses"] = "2"
    (folder / "features.json").write_text(json.dumps(features))
    (folder / "label.labels.txt").write_text("a\nb\n")
    source = data_lib.from_tfds("cut", "train", str(tmp_path / "tfds"))
    assert source.class_names == ["a", "b"]
    said = r"label 2 is outside \[0, 2\), the 2 classes that the label feature \(a ClassLabel\) "
    said += r"of tfds dataset cut names \(its features do not fit its examples\)"
    for read in (
        lambda: data_lib.check_examples(source, spec_of()),
        lambda: list(data_lib.eval_batches(source, spec_of(), global_batch=4)),
        lambda: take(data_lib.train_batches(source, spec_of(), global_batch=3, seed=0), 4),
    ):
        with pytest.raises(data_lib.DataError, match=said) as error:
            read()
        message = str(error.value)
        assert "\n" not in message and "skip_corrupt" not in message and "assertion" not in message


def _tfds_dataset(data_dir, name, features, example):
    """A prepared tfds dataset ``name`` of ``features`` (tfds feature objects by key): three
    train examples, ``example(i)`` each."""
    import tensorflow_datasets as tfds

    tfds.dataset_builders.store_as_tfds_dataset(
        name=name, version="1.0.0", features=tfds.features.FeaturesDict(features),
        split_datasets={"train": [(f"{i}", example(i)) for i in range(3)]},
        data_dir=str(data_dir),
    )  # fmt: skip


def test_tfds_features_that_do_not_fit_the_task_are_named(tmp_path):
    """A tfds dataset without an 'image' feature, with an integer 'label' that is no ClassLabel
    (its names from data.class_names, else an error saying to set them), or with boxes or label
    maps but no 'label', read for classification: a DataError naming its features and what is
    needed (was a traceback: a flattening error, AttributeError 'names', KeyError 'label')."""
    import tensorflow_datasets as tfds

    image = lambda i: np.full((6, 6, 3), 40 * i, np.uint8)
    mask = tfds.features.Image(shape=(None, None, 1))
    objects = tfds.features.Sequence(
        {"bbox": tfds.features.BBoxFeature(), "label": tfds.features.ClassLabel(names=["x"])}
    )
    box = tfds.features.BBox(0.1, 0.1, 0.5, 0.5)
    cases = {
        "img": ({"img": tfds.features.Image(), "label": tfds.features.ClassLabel(num_classes=3)},
                lambda i: {"img": image(i), "label": i}),
        "ints": ({"image": tfds.features.Image(), "label": tfds.features.Tensor(shape=(),
                  dtype=np.int64)}, lambda i: {"image": image(i), "label": i}),
        "boxes": ({"image": tfds.features.Image(), "objects": objects},
                  lambda i: {"image": image(i), "objects": {"bbox": [box], "label": [0]}}),
        "masks": ({"image": tfds.features.Image(), "segmentation_mask": mask},
                  lambda i: {"image": image(i), "segmentation_mask": image(i)[..., :1]}),
    }  # fmt: skip
    for name, (features, example) in cases.items():
        _tfds_dataset(tmp_path, name, features, example)
    load = lambda name, **k: data_lib.load_source(
        data_config(source="tfds", name=name, data_dir=str(tmp_path), **k).data, "train"
    )
    with pytest.raises(data_lib.DataError, match=r"^tfds dataset 'img' has no 'image' feature "
                       r"\(its features: img \(Image\), label \(ClassLabel\)\): vision_jax reads "
                       r"each example's image from a feature named 'image'"):  # fmt: skip
        load("img")
    with pytest.raises(data_lib.DataError, match=r"'label' feature holds integers without class "
                       r"names \(a Tensor, not a ClassLabel\): set data.class_names"):  # fmt: skip
        load("ints")
    source = load("ints", class_names=("a", "b", "c"))
    assert source.class_names == ["a", "b", "c"]
    batch = next(data_lib.eval_batches(source, spec_of(), global_batch=3))
    assert sorted(batch["label"]) == [0, 1, 2]
    with pytest.raises(data_lib.DataError, match=r"label 2 is outside \[0, 2\), the 2 classes "
                       r"that data.class_names names"):  # fmt: skip
        two = load("ints", class_names=("a", "b"))
        list(data_lib.eval_batches(two, spec_of(), global_batch=3))
    boxes = r"^tfds dataset 'boxes' has no 'label' feature \(its features: .*objects \(Sequence"
    with pytest.raises(data_lib.DataError, match=boxes + r"\).*task.name='detection'"):
        load("boxes")
    with pytest.raises(data_lib.DataError, match=r"has no 'label' feature .*"
                       r"task.name='segmentation'"):  # fmt: skip
        load("masks")


def test_build_tfds_from_folder_stores_file_names_that_the_report_shows(tmp_path):
    """Each image's name under its split (tfds's image/filename feature) names the report's
    hardest examples of a tfds run, with data.classes too; a dataset without it has none."""
    from vision_jax.report.tasks import Lowest

    root = tmp_path / "images"
    make_folder(root, per_class=2, classes=("a", "b"))
    data_lib.build_tfds_from_folder(str(root), "named", str(tmp_path / "tfds"))
    source = data_lib.from_tfds("named", "train", str(tmp_path / "tfds"))
    names = [n.decode() for n in source.file_names.as_numpy_iterator()]
    assert sorted(names) == ["a/000.jpg", "a/001.jpeg", "b/000.jpeg", "b/001.JPG"]
    lowest = Lowest(2, source)
    lowest.offer(np.array([0.9, 0.1, 0.2]), np.array([0, 3, 2]), lambda i: (None, [f"r{i}"]))
    table = lowest.table(["x"])
    assert table.columns[:2] == ("index", "file")
    assert table.rows == [[3, names[3], "r1"], [2, names[2], "r2"]]
    kept = data_lib.select_classes(source, [1])
    assert [n.decode() for n in kept.file_names.as_numpy_iterator()] == [
        n for n in names if n.startswith("b/")
    ]
    source.file_names = None  # a dataset without the feature (built before it was stored)
    assert Lowest(2, source).table(["x"]).columns == ("index", "x")
