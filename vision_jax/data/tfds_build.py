"""Turning an image folder into a prepared tfds dataset once, to train from with
``data.source = "tfds"`` (fewer, larger files: faster reads on network filesystems)."""

from __future__ import annotations

import os

from vision_jax.tf_without_keras import load as load_tensorflow

from vision_jax.data.folders import from_image_folder, subdirectories
from vision_jax.data.pipeline import check_examples
from vision_jax.data.preprocess import InputSpec
from vision_jax.data.sources import FILE_NAME, DataError

_FIX = "Fix or remove the file(s), then build the dataset again."


def build_tfds_from_folder(
    root: str,
    name: str,
    data_dir: str,
    *,
    version: str = "1.0.0",
    file_format: str = "tfrecord",
) -> str:
    """Writes every split ``root/<split>/<class>/.../<image>`` (any of
    :data:`~vision_jax.data.folders.IMAGE_EXTENSIONS`, in subfolders too, as
    ``data.source="imagefolder"`` reads them) as tfds dataset ``name`` under ``data_dir``
    (image files stored as they are, with their names under ``<split>/`` as the feature
    ``image/filename``; classes from the sorted folder names; each read once
    first: a file that cannot be decoded is an error naming it). Returns the
    dataset directory. ``file_format`` is "tfrecord" or "array_record".

    Example::

        from vision_jax.data import build_tfds_from_folder
        build_tfds_from_folder("/data/flowers", "flowers", "/data/tfds")
        # then train with
        #   config.data.source = "tfds"
        #   config.data.name = "flowers"
        #   config.data.data_dir = "/data/tfds"
        #   config.data.train_split = "train[:90%]"
    """
    load_tensorflow()  # first: tfds imports TensorFlow
    import tensorflow_datasets as tfds

    splits = subdirectories(root)
    if not splits:
        raise DataError(f"{root} holds no split folders (expected {root}/<split>/<class>/).")
    sources = {split: from_image_folder(root, split) for split in splits}
    class_names = sources[splits[0]].class_names
    if class_names == ["images", "masks"]:  # a segmentation split's two folders, not classes
        raise DataError(
            f"{root}/{splits[0]} holds images/ and masks/, a segmentation layout: "
            "build_tfds_from_folder writes classification datasets; train on the folder as it "
            "is (data.source='imagefolder' with task.name='segmentation')."
        )
    for split, source in sources.items():
        if source.class_names != class_names:
            raise DataError(
                f"Split {split!r} has classes {source.class_names}, split {splits[0]!r} has "
                f"{class_names}: every split needs the same class folders."
            )
    for source in sources.values():  # tfds stores the bytes unread: a bad file would be found
        check_examples(source, InputSpec(image_size=8), advice=_FIX, whole=True)  # at training

    def examples(split: str):
        columns = sources[split].columns
        for i, (path, label) in enumerate(zip(columns["path"], columns["label"], strict=True)):
            name = os.path.relpath(str(path), os.path.join(root, split))  # <class>/.../<image>
            yield f"{i:09d}", {"image": str(path), "label": int(label), FILE_NAME: name}

    features = tfds.features.FeaturesDict({
        "image": tfds.features.Image(), "label": tfds.features.ClassLabel(names=class_names),
        FILE_NAME: tfds.features.Text(),
    })  # fmt: skip
    builder = tfds.dataset_builders.store_as_tfds_dataset(
        name=name,
        version=version,
        features=features,
        split_datasets={split: examples(split) for split in splits},
        data_dir=data_dir,
        file_format=file_format,
    )
    return str(builder.data_dir)
