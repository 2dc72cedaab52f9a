"""Messy unlabeled pools (issue 29): class mismatch, junk, a long-tailed class mix.

Pure, seeded functions on uint8 arrays (N, 28, 28) such as Fashion-MNIST's (read with
`pseudolabel.data.sources.fashion_mnist`); no TensorFlow. Each returns a `Pool`: the images, a
per-image truth (the class index, or -1 for an image of none of the labeled classes) and a kind
per image:

- "in": an image of one of the labeled classes;
- "unseen_class": an image of a class of the domain that has no labels (class mismatch);
- "junk:<kind>": an image from outside the domain, one of JUNK_KINDS:
  digits (scikit-learn's 8x8 digits upscaled), noise (uniform or Gaussian, alternately),
  blank (one grey level: black, white or any), inverted (an item, 255 - pixels),
  rotated (an item turned by 90-270 degrees), cropped (a small random crop of an item, upscaled).

    from pseudolabel.data.sources import fashion_mnist
    source = fashion_mnist("/usr/share/datasets/fashion-mnist")
    rest = ...  # the training images the labeled split left (indices)
    pool = class_mismatch(source.train_images[rest], source.train_labels[rest],
                          known=range(6), fraction=0.5, size=30000, seed=0)
    pool = with_junk(pool, fraction=0.10, seed=0)
    pool = long_tailed(source.train_images[rest], source.train_labels[rest], ratio=10, seed=0)

A pool becomes the unlabeled folder with `write_pool` (files named by index only, and a truth
table); `Truth` reads the table back (the `truth=` lookup of stages.train_student) and
`labeling_report` measures a labeling and merge of it against the truth (benchmarks/
messy_pools.py).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from scipy import ndimage
from sklearn.metrics import roc_auc_score

IN = "in"
UNSEEN = "unseen_class"
JUNK_KINDS = ("digits", "noise", "blank", "inverted", "rotated", "cropped")
# Kinds made from an item of the domain (the image they replace); the others are made from nothing.
FROM_ITEM = ("inverted", "rotated", "cropped")


@dataclass(frozen=True)
class Pool:
    """An unlabeled pool with what each image truly is."""

    images: np.ndarray  # uint8 (N, H, W)
    truth: np.ndarray  # int64 (N,): the class index, -1 for out-of-distribution
    kind: np.ndarray  # str (N,): "in", "unseen_class" or "junk:<kind>"

    def __post_init__(self):
        if not (len(self.images) == len(self.truth) == len(self.kind)):
            raise ValueError("images, truth and kind differ in length")

    def __len__(self) -> int:
        return len(self.images)

    @property
    def ood(self) -> np.ndarray:
        """True where the image is of none of the labeled classes."""
        return self.truth < 0

    def counts(self) -> dict[str, int]:
        names, counts = np.unique(self.kind, return_counts=True)
        return {str(n): int(c) for n, c in zip(names, counts, strict=True)}


def class_mismatch(
    images: np.ndarray,
    labels: np.ndarray,
    known: Iterable[int] = range(6),
    fraction: float = 0.5,
    size: int | None = None,
    seed: int = 0,
) -> Pool:
    """A pool of `size` images of which `fraction` are of classes outside `known` (drawn at
    random from `images`; pass the training images the labeled split left). `size` None: the
    largest pool the images allow at this fraction (at 0: every image of the known classes).
    Compare fractions at one fixed `size`: at 0.75 Fashion-MNIST's 24,000 images of classes 6-9
    allow at most 32,000. Truth: the label for known classes, -1 for the others."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"fraction={fraction}: must be in [0, 1)")
    labels = np.asarray(labels, dtype=np.int64)
    known = np.asarray(sorted(set(known)), dtype=np.int64)
    is_known = np.isin(labels, known)
    inside, outside = np.flatnonzero(is_known), np.flatnonzero(~is_known)
    if size is None:
        if fraction == 0:
            size = len(inside)
        else:
            size = int(min(len(inside) / (1.0 - fraction), len(outside) / fraction))
    n_out = int(round(fraction * size))
    n_in = size - n_out
    if n_in > len(inside) or n_out > len(outside):
        raise ValueError(
            f"size={size} at fraction={fraction} needs {n_in} known-class and {n_out} other "
            f"images; there are {len(inside)} and {len(outside)}"
        )
    rng = np.random.default_rng(seed)
    chosen = np.concatenate(
        [rng.choice(inside, n_in, replace=False), rng.choice(outside, n_out, replace=False)]
    )
    chosen = chosen[rng.permutation(len(chosen))]
    truth = np.where(is_known[chosen], labels[chosen], -1)
    kind = np.where(is_known[chosen], IN, UNSEEN).astype(object)
    return Pool(images[chosen].copy(), truth.astype(np.int64), kind)


def digit_images(digits: np.ndarray | None = None) -> np.ndarray:
    """scikit-learn's 8x8 digits as uint8 0..255 (N, 8, 8); `digits` given (0..16 floats or
    uint8 0..255) is only converted."""
    if digits is None:
        from sklearn.datasets import load_digits

        digits = load_digits().images
    digits = np.asarray(digits)
    if digits.dtype != np.uint8:
        digits = np.round(np.clip(digits, 0, 16) * (255.0 / 16.0)).astype(np.uint8)
    return digits


def _resize(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    return np.asarray(Image.fromarray(image).resize(shape[::-1], Image.BILINEAR), np.uint8)


def make_junk(
    kind: str,
    n: int,
    rng: np.random.Generator,
    shape: tuple[int, int] = (28, 28),
    items: np.ndarray | None = None,
    digits: np.ndarray | None = None,
) -> np.ndarray:
    """`n` uint8 junk images of `kind` (JUNK_KINDS). inverted, rotated and cropped are made from
    `items` (n images of the domain, (n, H, W)); digits from `digits` (see `digit_images`)."""
    if kind not in JUNK_KINDS:
        raise ValueError(f"junk kind {kind!r}: one of {', '.join(JUNK_KINDS)}")
    h, w = shape
    if kind in FROM_ITEM:
        if items is None or len(items) != n:
            raise ValueError(f"junk:{kind} needs {n} items to transform")
        items = np.asarray(items, dtype=np.uint8)
    out = np.empty((n, h, w), np.uint8)
    if kind == "digits":
        source = digit_images(digits)
        for i, d in enumerate(source[rng.integers(0, len(source), n)]):
            out[i] = _resize(d, shape)
    elif kind == "noise":
        for i in range(n):
            if i % 2 == 0:  # uniform per pixel
                out[i] = rng.integers(0, 256, (h, w))
            else:  # Gaussian around a random grey
                mean, std = rng.uniform(40, 215), rng.uniform(20, 80)
                out[i] = np.clip(np.round(rng.normal(mean, std, (h, w))), 0, 255)
    elif kind == "blank":
        levels = rng.integers(0, 256, n)
        which = rng.integers(0, 3, n)  # a third black, a third white, a third any grey
        out[:] = np.where(which == 0, 0, np.where(which == 1, 255, levels))[:, None, None]
    elif kind == "inverted":
        out[:] = 255 - items
    elif kind == "rotated":
        for i, angle in enumerate(rng.uniform(90.0, 270.0, n)):
            turned = ndimage.rotate(items[i].astype(np.float32), angle, reshape=False, order=1)
            out[i] = np.clip(np.round(turned), 0, 255)
    else:  # cropped: a square of a 7th to 2/5 of the side (4-11 of 28 pixels), blown up
        for i in range(n):
            side = int(rng.integers(max(2, min(h, w) // 7), max(3, min(h, w) * 2 // 5) + 1))
            # centred on a random pixel of the item (not on its empty background)
            ys, xs = np.nonzero(items[i] > 0)
            j = rng.integers(len(ys)) if len(ys) else None
            cy, cx = (h // 2, w // 2) if j is None else (int(ys[j]), int(xs[j]))
            top = int(np.clip(cy - side // 2, 0, h - side))
            left = int(np.clip(cx - side // 2, 0, w - side))
            crop = np.ascontiguousarray(items[i, top : top + side, left : left + side])
            out[i] = _resize(crop, shape)
    return out


def with_junk(
    pool: Pool,
    fraction: float = 0.10,
    seed: int = 0,
    kinds: Iterable[str] = JUNK_KINDS,
    digits: np.ndarray | None = None,
) -> Pool:
    """`pool` with `fraction` of its images (chosen at random) replaced by junk, an equal mix of
    `kinds` (counts differ by at most one); inverted, rotated and cropped junk is made from the
    image it replaces. Truth -1, kind "junk:<kind>"; the other images are unchanged."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction={fraction}: must be in [0, 1]")
    kinds = tuple(kinds)
    rng = np.random.default_rng(seed)
    n = int(round(fraction * len(pool)))
    where = rng.choice(len(pool), n, replace=False)
    assigned = np.asarray([kinds[i % len(kinds)] for i in range(n)], dtype=object)
    assigned = assigned[rng.permutation(n)]
    images, truth, kind = pool.images.copy(), pool.truth.copy(), pool.kind.copy()
    shape = pool.images.shape[1:3]
    for name in kinds:
        at = where[assigned == name]
        images[at] = make_junk(name, len(at), rng, shape, items=pool.images[at], digits=digits)
        truth[at] = -1
        kind[at] = f"junk:{name}"
    return Pool(images, truth, kind)


def long_tailed_counts(available: np.ndarray, ratio: float, n_max: int | None = None) -> np.ndarray:
    """Images per class (in the given class order, the first the head) on the exponential
    profile n_c = n_max * ratio^(-c / (C - 1)) (as in DARP / CReST): the head has `ratio` times
    the tail's. n_max None: the largest head every class can supply."""
    available = np.asarray(available, dtype=np.int64)
    c = len(available)
    profile = float(ratio) ** (-np.arange(c) / max(1, c - 1))
    if n_max is None:
        n_max = int(np.floor(np.min(available / profile)))
    counts = np.maximum(1, np.floor(n_max * profile + 1e-9)).astype(np.int64)
    if np.any(counts > available):
        raise ValueError(f"n_max={n_max} at ratio {ratio} needs {counts}; there are {available}")
    return counts


def long_tailed(
    images: np.ndarray,
    labels: np.ndarray,
    ratio: float = 10.0,
    classes: Iterable[int] | None = None,
    n_max: int | None = None,
    seed: int = 0,
) -> Pool:
    """A pool long-tailed over `classes` (None: every label present, in index order, the first
    the head; give a permutation to choose the head) with imbalance `ratio` (10, 100): see
    `long_tailed_counts`. Images drawn at random per class; every image "in" its class."""
    labels = np.asarray(labels, dtype=np.int64)
    order = np.unique(labels) if classes is None else np.asarray(list(classes), dtype=np.int64)
    available = np.array([np.sum(labels == c) for c in order])
    counts = long_tailed_counts(available, ratio, n_max)
    rng = np.random.default_rng(seed)
    chosen = np.concatenate(
        [
            rng.choice(np.flatnonzero(labels == c), k, replace=False)
            for c, k in zip(order, counts, strict=True)
        ]
    )
    chosen = chosen[rng.permutation(len(chosen))]
    kind = np.full(len(chosen), IN, dtype=object)
    return Pool(images[chosen].copy(), labels[chosen].copy(), kind)


def mixed(
    images: np.ndarray,
    labels: np.ndarray,
    known: Iterable[int] = range(6),
    ratio: float = 10.0,
    unseen: float = 0.25,
    junk: float = 0.05,
    n_max: int | None = None,
    seed: int = 0,
) -> Pool:
    """A folder as users have them, every defect at once: the `known` classes long-tailed at
    `ratio` with the head drawn by `seed` (not class 0, which `long_tailed`'s scenarios use),
    images of the other classes making `unseen` of the pool, then `junk` of the pool replaced by
    junk (`with_junk`, which may replace images of either). `n_max` as in `long_tailed`."""
    if not (0.0 <= unseen < 1.0 and 0.0 <= junk < 1.0):
        raise ValueError(f"unseen={unseen}, junk={junk}: each must be in [0, 1)")
    labels = np.asarray(labels, dtype=np.int64)
    known = np.asarray(sorted(set(known)), dtype=np.int64)
    is_known = np.isin(labels, known)
    rng = np.random.default_rng(seed)
    head_first = known[rng.permutation(len(known))]
    inside = long_tailed(images[is_known], labels[is_known], ratio, head_first, n_max, seed)
    outside = np.flatnonzero(~is_known)
    n_out = int(round(unseen * len(inside) / (1.0 - unseen)))
    if n_out > len(outside):
        raise ValueError(f"unseen={unseen} needs {n_out} images of other classes; {len(outside)}")
    out = rng.choice(outside, n_out, replace=False)
    order = rng.permutation(len(inside) + n_out)
    pool = Pool(
        np.concatenate([inside.images, images[out]])[order],
        np.concatenate([inside.truth, np.full(n_out, -1, np.int64)])[order],
        np.concatenate([inside.kind, np.full(n_out, UNSEEN, dtype=object)])[order],
    )
    return with_junk(pool, junk, seed)


# A pool written as the unlabeled folder: pool_<index>.png, the index into the pool (never its
# class or kind, so the folder leaks nothing), and a truth table saved beside the folder.
POOL_FILE = re.compile(r"(pool_\d+)(?:-\d+)?\.png$")  # -N: a second copy in the merged set


def pool_file(index: int) -> str:
    return f"pool_{index:05d}.png"


def write_pool(pool: Pool, folder: Path, class_names: Sequence[str]) -> dict:
    """Every image of `pool` as folder/pool_<i>.png (the folder is created; existing files of
    the same names are replaced); returns the truth table: the class names and, per file, its
    class index (-1: of none of them) and kind (see `Truth`)."""
    folder.mkdir(parents=True, exist_ok=True)
    images = {}
    for i, (image, truth, kind) in enumerate(zip(pool.images, pool.truth, pool.kind, strict=True)):
        name = pool_file(i)
        Image.fromarray(np.asarray(image, np.uint8)).save(folder / name, format="PNG")
        images[name] = [int(truth), str(kind)]
    return {"class_names": list(class_names), "images": images}


class Truth:
    """The truth table of a written pool: for any path naming a pool file (under the unlabeled
    folder, or its copy in the merged set: <class>/u__pool_00012.png, -N suffixed), its class
    name (None when out-of-distribution or not a pool file) and kind. Called with a list of
    paths it gives their class names: the `truth` lookup stages.train_student takes."""

    def __init__(self, table: dict):
        self.class_names = list(table["class_names"])
        self.images = {name: (int(c), str(k)) for name, (c, k) in table["images"].items()}

    @classmethod
    def load(cls, path: Path) -> Truth:
        return cls(json.loads(Path(path).read_text()))

    def entry(self, rel: str) -> tuple[int, str] | None:
        match = POOL_FILE.search(str(rel))
        return None if match is None else self.images.get(match.group(1) + ".png")

    def __call__(self, rel_paths: Iterable[str]) -> list[str | None]:
        out = []
        for rel in rel_paths:
            found = self.entry(rel)
            out.append(self.class_names[found[0]] if found and found[0] >= 0 else None)
        return out

    def kinds(self, rel_paths: Iterable[str]) -> list[str | None]:
        return [None if (e := self.entry(rel)) is None else e[1] for rel in rel_paths]


def _flags(column) -> np.ndarray:
    """A CSV's boolean column (True/False, true/false or 1/0) as bools."""
    return np.asarray([str(v).strip().lower() in ("true", "1", "1.0") for v in column])


def labeling_report(csv: pd.DataFrame, manifest: pd.DataFrame, truth: Truth) -> dict:
    """What one labeling (outputs/data.csv) and merge (data/train_ssl/manifest.csv) did with a
    written pool, against its truth:

    - accuracy_in: the predicted class of the in-distribution pool images ("in");
    - pseudo_label_precision: the merged pseudo-labels of in-distribution images that are right;
      pseudo_label_precision_all: of every merged pseudo-label (one of no class counts wrong);
    - kept_by_kind: the share of each kind's pool images merge copied; merged_share: each kind's
      share of the merged pseudo-labeled images (merged_counts: their numbers);
    - with an `ood_score` column (higher = more out-of-distribution): auroc per OOD kind (and
      "ood", every OOD kind together), that kind positive against "in";
    - with an `ood` column (the pipeline's flag): flagged, the share of each kind flagged."""
    paths = list(csv["path"])
    kind = np.asarray(truth.kinds(paths), dtype=object)
    names = np.asarray(truth(paths), dtype=object)
    is_in = kind == IN
    labels = csv["label"].astype(str).to_numpy()
    pool_counts = {str(k): int(np.sum(kind == k)) for k in dict.fromkeys(kind) if k is not None}
    pseudo = manifest[manifest["source"] == "pseudo"]
    p_kind = np.asarray(truth.kinds(list(pseudo["file"])), dtype=object)
    p_true = np.asarray(truth(list(pseudo["file"])), dtype=object)
    p_label = pseudo["label"].astype(str).to_numpy()
    p_in = p_kind == IN
    merged_counts = {k: int(np.sum(p_kind == k)) for k in pool_counts}

    def share(num, den):
        return round(float(num) / den, 4) if den else None

    report = {
        "pool_counts": pool_counts,
        "accuracy_in": share(np.sum(labels[is_in] == names[is_in]), int(is_in.sum())),
        "pseudo_labeled": len(pseudo),
        "pseudo_label_precision": share(np.sum(p_label[p_in] == p_true[p_in]), int(p_in.sum())),
        "pseudo_label_precision_all": share(np.sum(p_label == p_true), len(pseudo)),
        "kept_by_kind": {k: share(merged_counts[k], n) for k, n in pool_counts.items()},
        "merged_counts": merged_counts,
        "merged_share": {k: share(n, len(pseudo)) for k, n in merged_counts.items()},
    }
    ood_kinds = [k for k in pool_counts if k != IN]
    if "ood_score" in csv.columns and is_in.any():
        scores = csv["ood_score"].to_numpy(dtype=float)
        report["auroc"] = {}
        for name in [*ood_kinds, "ood"] if ood_kinds else []:
            out = np.isin(kind, ood_kinds) if name == "ood" else kind == name
            y = np.r_[np.zeros(int(is_in.sum())), np.ones(int(out.sum()))]
            auc = roc_auc_score(y, np.r_[scores[is_in], scores[out]])
            report["auroc"][name] = round(float(auc), 4)
    if "ood" in csv.columns:
        flagged = _flags(csv["ood"])
        report["flagged"] = {
            k: share(np.sum(flagged[kind == k]), n) for k, n in pool_counts.items()
        }
    return report
