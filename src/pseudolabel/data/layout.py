"""Build the seed's folder layout from an array source.

data/image_dataset/{train,val,test}/<class>/*.png and data/unlabeled/*.png. File names carry the
index in the source split, never the label, so the unlabeled folder leaks nothing.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from pseudolabel.data.sources import ArraySource
from pseudolabel.errors import PseudoLabelError

log = logging.getLogger(__name__)


@dataclass
class Split:
    """Indices into the source's train (or test) arrays for each part of the layout."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray  # indices into the test arrays when the source has them
    unlabeled: np.ndarray
    test_from_train: bool


def split_indices(
    source: ArraySource,
    train_per_class: int,
    val_per_class: int,
    test_per_class: int | None,
    unlabeled: int | None,
    seed: int,
) -> Split:
    """Seeded, class-balanced split; labeled, test and unlabeled indices never overlap."""
    rng = np.random.default_rng(seed)
    has_test = source.test_images is not None
    take_test = 0 if has_test else (test_per_class or 0)
    train, val, test, rest = [], [], [], []
    for label in range(len(source.class_names)):
        idx = rng.permutation(np.flatnonzero(source.train_labels == label))
        need = train_per_class + val_per_class + take_test
        if len(idx) < need + 1:
            raise PseudoLabelError(
                f"class {source.class_names[label]!r} has {len(idx)} images, fewer than the "
                f"{need} labeled ones asked for plus unlabeled ones; lower data.train_per_class "
                "/ val_per_class / test_per_class."
            )
        train.append(idx[:train_per_class])
        val.append(idx[train_per_class : train_per_class + val_per_class])
        test.append(idx[train_per_class + val_per_class : need])
        rest.append(idx[need:])
    pool = np.concatenate(rest)
    if unlabeled is None:  # every image the labeled splits left
        unlabeled = len(pool)
    if unlabeled > len(pool):
        raise PseudoLabelError(
            f"data.unlabeled={unlabeled} but only {len(pool)} images are left after the labeled "
            "splits; lower data.unlabeled."
        )
    unlabeled_idx = np.sort(rng.choice(pool, size=unlabeled, replace=False))
    if has_test:
        test_idx = np.arange(len(source.test_labels))  # type: ignore[arg-type]
        if test_per_class:
            test_idx = np.concatenate(
                [
                    rng.permutation(np.flatnonzero(source.test_labels == c))[:test_per_class]
                    for c in range(len(source.class_names))
                ]
            )
    else:
        test_idx = np.concatenate(test)
    return Split(
        np.concatenate(train), np.concatenate(val), np.sort(test_idx), unlabeled_idx, not has_test
    )


def _save_png(image: np.ndarray, path: Path) -> None:
    Image.fromarray(image).save(path, format="PNG")


def write_layout(
    source: ArraySource, split: Split, labeled_root: Path, unlabeled_root: Path
) -> dict[str, dict[str, int]]:
    """Write every PNG, replacing both folders; return counts per split and class."""
    for root in (labeled_root, unlabeled_root):
        if root.exists():
            shutil.rmtree(root)
    jobs: list[tuple[np.ndarray, Path]] = []
    counts: dict[str, dict[str, int]] = {}
    parts = {"train": split.train, "val": split.val, "test": split.test}
    for part, indices in parts.items():
        from_test = part == "test" and not split.test_from_train
        images = source.test_images if from_test else source.train_images
        labels = source.test_labels if from_test else source.train_labels
        prefix = "test" if from_test else "train"
        counts[part] = {name: 0 for name in source.class_names}
        for i in indices:
            name = source.class_names[int(labels[i])]  # type: ignore[index]
            counts[part][name] += 1
            jobs.append((images[i], labeled_root / part / name / f"{prefix}_{i:05d}.png"))  # type: ignore[index]
    for i in split.unlabeled:
        jobs.append((source.train_images[i], unlabeled_root / f"train_{i:05d}.png"))
    counts["unlabeled"] = {"images": len(split.unlabeled)}
    for folder in {path.parent for _, path in jobs}:
        folder.mkdir(parents=True, exist_ok=True)
    for image, path in tqdm(jobs, desc="ingest: writing PNGs", unit="img", mininterval=2):
        _save_png(image, path)
    return counts
