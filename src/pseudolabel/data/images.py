"""Image folders: listing, checks, and the one decode function used for training and labeling."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import tensorflow as tf

from pseudolabel.data import decoded
from pseudolabel.errors import PseudoLabelError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
AUTOTUNE = tf.data.AUTOTUNE
# Decoded images a training stream keeps in memory (beyond this, each pass decodes again).
CACHE_BYTES = 2 * 1024**3


def _visible(path: Path, root: Path) -> bool:
    """No part of `path` below `root` starts with a dot (string work: Path.relative_to per file
    was most of listing a folder's time)."""
    text, top = str(path), str(root)
    if text.startswith(top + os.sep):
        below = text[len(top) :]
    else:  # e.g. root "." (the listed paths have no "./")
        below = os.sep + os.sep.join(path.relative_to(root).parts)
    return os.sep + "." not in below


def list_images(root: Path) -> list[Path]:
    """Every image file under `root` (any depth), sorted, hidden files and folders skipped."""
    return sorted(
        p
        for p in root.rglob("*")
        if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file() and _visible(p, root)
    )


def skipped_entries(root: Path) -> list[tuple[str, str]]:
    """What `list_images` leaves out under `root` besides hidden ones, as (relative path,
    why): other extensions (.svg, .txt), folders named like images (`x.jpg/`), and entries
    with an image name that are not regular files (a FIFO, a socket, a broken link)."""
    skipped = []
    for path in sorted(root.rglob("*")):
        if not _visible(path, root):
            continue
        rel, suffix = str(path.relative_to(root)), path.suffix.lower()
        if path.is_dir():
            if suffix in IMAGE_EXTENSIONS:
                skipped.append((rel, "a folder, not an image (images inside it are labeled)"))
        elif suffix not in IMAGE_EXTENSIONS:
            kinds = ", ".join(IMAGE_EXTENSIONS)
            skipped.append((rel, f"not an image extension ({suffix or 'none'}; read: {kinds})"))
        elif not path.is_file():
            skipped.append((rel, "not a regular file (a FIFO, socket, device or broken link)"))
    return skipped


def class_names_from(folder: Path, what: str = "training") -> list[str]:
    """Sorted class-folder names of a labeled folder; errors name the path and the fix."""
    if not folder.is_dir():
        raise PseudoLabelError(
            f"{folder}: {what} folder not found. Create it with one sub-folder per class "
            "(or run `dvc repro ingest` for the demo data)."
        )
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise PseudoLabelError(
            f"{folder}: no class folders. Put the images of each class in {folder}/<class name>/."
        )
    empty = [name for name in classes if not list_images(folder / name)]
    if empty:
        raise PseudoLabelError(
            f"{folder}: class folder(s) {', '.join(empty)} contain no images "
            f"({', '.join(IMAGE_EXTENSIONS)}). Add images or remove the folder."
        )
    return classes


def require_images(folder: Path, what: str) -> list[Path]:
    """The images under `folder`, or an error that says the folder is missing or empty."""
    if not folder.is_dir():
        raise PseudoLabelError(f"{folder}: {what} folder not found. Create it and add images.")
    images = list_images(folder)
    if not images:
        raise PseudoLabelError(
            f"{folder}: {what} folder has no images ({', '.join(IMAGE_EXTENSIONS)})."
        )
    return images


def decode_image(path: tf.Tensor, image_size: Sequence[int], channels: int) -> tf.Tensor:
    """File -> float32 (H, W, C) with raw 0..255 values; the model does its own scaling."""
    raw = tf.io.read_file(path)
    image = tf.io.decode_image(raw, channels=channels, expand_animations=False)
    image = tf.image.resize(image, tuple(image_size), method="bilinear")
    return tf.ensure_shape(image, (*image_size, channels))


def labeled_files(folder: Path, class_names: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """Paths and integer labels of a class-folder tree, in the given class order."""
    present = class_names_from(folder, what=folder.name)
    unknown = sorted(set(present) - set(class_names))
    if unknown:
        raise PseudoLabelError(
            f"{folder}: class folder(s) {', '.join(unknown)} are not among the model's classes "
            f"({', '.join(class_names)})."
        )
    paths, labels = [], []
    for label, name in enumerate(class_names):
        if (folder / name).is_dir():
            for path in list_images(folder / name):
                paths.append(str(path))
                labels.append(label)
    return paths, np.asarray(labels, dtype=np.int64)


def _target(y: tf.Tensor, num_classes: int) -> tf.Tensor:
    """One-hot for a class index; a probability vector (a soft label) passes through."""
    return tf.one_hot(y, num_classes) if y.shape.rank == 0 else tf.cast(y, tf.float32)


def labeled_dataset(
    paths: Sequence[str],
    labels: np.ndarray,
    num_classes: int,
    image_size: Sequence[int],
    channels: int,
    batch_size: int,
    shuffle: bool = False,
    seed: int = 0,
    cache: bool = False,
) -> tf.data.Dataset:
    """(image, one-hot label) batches decoded in parallel, or read from ingest's decoded copy of
    the folder (data.decoded) when there is one; one-hot so label smoothing works.

    Decoded once: with `shuffle` (a training set, read every epoch) or `cache` (e.g. a
    validation set) the decoded images stay in memory when they fit in CACHE_BYTES, and every
    later pass reads them from there. The shuffled order is the same either way (tf.data's
    permutation depends on the seed and the count, not on the elements)."""
    in_memory = (shuffle or cache) and fits_in_memory(len(paths), image_size, channels, 4)
    rows = decoded.find(paths, image_size, channels)  # ingest's decoded copy, if it matches
    if rows is not None and (in_memory or not shuffle):  # read in order
        images = rows.dataset().map(lambda x: tf.cast(x, tf.float32))
        targets = tf.data.Dataset.from_tensor_slices(labels).map(lambda y: _target(y, num_classes))
        ds = tf.data.Dataset.zip((images, targets))
    else:
        sources = np.arange(len(paths)) if rows is not None else list(paths)
        ds = tf.data.Dataset.from_tensor_slices((sources, labels))
        if shuffle and not in_memory:  # shuffle names or rows: a buffer of those, not of images
            ds = ds.shuffle(len(paths), seed=seed, reshuffle_each_iteration=True)
        read = rows.image if rows is not None else lambda p: decode_image(p, image_size, channels)
        ds = ds.map(
            lambda p, y: (tf.cast(read(p), tf.float32), _target(y, num_classes)),
            num_parallel_calls=AUTOTUNE,
        )
    if in_memory:
        ds = ds.cache()
        if shuffle:
            ds = ds.shuffle(len(paths), seed=seed, reshuffle_each_iteration=True)
    return ds.batch(batch_size).prefetch(AUTOTUNE)


def fits_in_memory(count: int, image_size: Sequence[int], channels: int, itemsize: int) -> bool:
    """Whether `count` decoded images of this size take at most CACHE_BYTES."""
    return count * int(np.prod(image_size)) * channels * itemsize <= CACHE_BYTES


def mixed_dataset(
    groups: Sequence[tuple[Sequence[str], np.ndarray]],
    weights: Sequence[float],
    num_classes: int,
    image_size: Sequence[int],
    channels: int,
    batch_size: int,
    seed: int = 0,
) -> tf.data.Dataset:
    """Endless (image, one-hot) batches drawing from each group with the given probability:
    e.g. labeled and pseudo-labeled images at a fixed ratio per batch."""
    parts = [
        tf.data.Dataset.from_tensor_slices((list(paths), labels))
        .shuffle(len(paths), seed=seed + i, reshuffle_each_iteration=True)
        .repeat()
        for i, (paths, labels) in enumerate(groups)
    ]
    ds = tf.data.Dataset.sample_from_datasets(parts, weights=list(weights), seed=seed)
    ds = ds.map(
        lambda p, y: (decode_image(p, image_size, channels), _target(y, num_classes)),
        num_parallel_calls=AUTOTUNE,
    )
    return ds.batch(batch_size).prefetch(AUTOTUNE)


def with_mixup(ds: tf.data.Dataset, alpha: float, seed: int = 0) -> tf.data.Dataset:
    """keras.layers.MixUp on every (images, targets) batch: pairs of images and their
    (one-hot or soft) targets blended with a Beta(alpha, alpha) weight."""
    import keras

    layer = keras.layers.MixUp(alpha=alpha, seed=seed)

    def mix(images, targets):
        out = layer({"images": images, "labels": targets}, training=True)
        return out["images"], out["labels"]

    return ds.map(mix, num_parallel_calls=AUTOTUNE)


def path_image_dataset(
    paths: Sequence[str], image_size: Sequence[int], channels: int, batch_size: int
) -> tf.data.Dataset:
    """(path, image) batches; files that fail to decode are dropped, so callers see which."""
    ds = tf.data.Dataset.from_tensor_slices(list(paths))
    ds = ds.map(
        lambda p: (p, decode_image(p, image_size, channels)),
        num_parallel_calls=AUTOTUNE,
        deterministic=True,
    ).ignore_errors()
    return ds.batch(batch_size).prefetch(AUTOTUNE)
