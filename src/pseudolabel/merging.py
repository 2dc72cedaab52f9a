"""Select confident pseudo-labels and build the merged training set from copies."""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from pseudolabel.data.images import list_images
from pseudolabel.errors import PseudoLabelError
from pseudolabel.labeling import PROB_PREFIX
from pseudolabel.paths import MANIFEST

log = logging.getLogger(__name__)


SELECTIONS = ("threshold", "per_class", "topk")


def select(predictions: pd.DataFrame, threshold: float | None) -> pd.DataFrame:
    """Rows whose confidence is at least `threshold`; every row when it is None (the seed's)."""
    if threshold is None:
        return predictions
    return predictions[predictions["confidence"] >= threshold]


def select_per_class(
    predictions: pd.DataFrame, thresholds: Mapping[str, float | None]
) -> pd.DataFrame:
    """Rows whose confidence reaches the threshold of their predicted class (None: keep all)."""
    limit = predictions["label"].map(thresholds.get).astype(float)
    keep = limit.isna() | (predictions["confidence"] >= limit.fillna(0.0))
    return predictions[keep]


def select_topk(
    predictions: pd.DataFrame, class_names: list[str], k: int, duplicate: bool = False
) -> pd.DataFrame:
    """Class-balanced: the `k` most confident rows predicted as each class (Noisy Student).
    With `duplicate`, a class with fewer than `k` rows has them repeated up to `k`."""
    if k < 1:
        raise PseudoLabelError(f"top_k={k} is invalid: keep at least 1 image per class.")
    parts = []
    for name in class_names:
        rows = predictions[predictions["label"] == name].sort_values(
            ["confidence", "path"], ascending=[False, True], kind="stable"
        )[:k]
        if duplicate and 0 < len(rows) < k:
            rows = rows.iloc[np.resize(np.arange(len(rows)), k)]
        parts.append(rows)
    return pd.concat(parts) if parts else predictions[:0]


def choose(
    predictions: pd.DataFrame,
    strategy: str,
    class_names: list[str],
    threshold: float | None = None,
    thresholds: Mapping[str, float | None] | None = None,
    k: int | None = None,
    duplicate: bool = False,
) -> pd.DataFrame:
    """The accepted rows under `strategy` (one of SELECTIONS)."""
    if strategy == "threshold":
        return select(predictions, threshold)
    if strategy == "per_class":
        return select_per_class(predictions, thresholds or {})
    if strategy == "topk":
        if k is None:
            raise PseudoLabelError("selection topk needs pseudo_label.top_k (images per class).")
        return select_topk(predictions, class_names, k, duplicate)
    raise PseudoLabelError(
        f"pseudo_label.selection={strategy!r} is unknown; use one of {', '.join(SELECTIONS)}."
    )


def qa_examples(
    predictions: pd.DataFrame, accepted: pd.DataFrame, name: str, n: int
) -> tuple[pd.DataFrame, pd.DataFrame, tuple[int, int]]:
    """For class `name`: the `n` least confident accepted rows, the `n` most confident rejected
    ones, and how many were accepted and rejected in all."""
    mine = predictions[predictions["label"] == name]
    taken = mine.index.isin(accepted.index)
    low = mine[taken].sort_values(["confidence", "path"], kind="stable")[:n]
    high = mine[~taken].sort_values(["confidence", "path"], ascending=[False, True])[:n]
    return low, high, (int(taken.sum()), int((~taken).sum()))


def check_rows(accepted: pd.DataFrame, unlabeled_dir: Path, class_names: list[str]) -> None:
    """Refuse a CSV that names an unknown class or a file outside the unlabelled folder."""
    unknown = sorted(set(accepted["label"]) - set(class_names))
    if unknown:
        raise PseudoLabelError(
            f"pseudo-label CSV names unknown class(es) {', '.join(map(str, unknown))}; valid: "
            f"{', '.join(class_names)}. Re-run the pseudo_label stage."
        )
    # Lexical paths, not resolved: with `data.link: symlink` the view's files are links to the
    # user's folder (ingest checked where they point).
    root = Path(os.path.abspath(unlabeled_dir))
    for rel in accepted["path"]:
        source = Path(os.path.normpath(root / rel))
        if not source.is_relative_to(root) or not source.is_file():
            raise PseudoLabelError(
                f"pseudo-label CSV row {rel!r} is not a file inside {unlabeled_dir}; "
                "re-run the pseudo_label stage."
            )


def _unique(folder: Path, name: str) -> Path:
    """A path in `folder` that no other image holds yet: never overwrite an image."""
    target = folder / name
    stem, suffix, n = target.stem, target.suffix, 1
    while target.exists():
        target = folder / f"{stem}-{n}{suffix}"
        n += 1
    return target


def _guard(out_dir: Path, *sources: Path) -> None:
    out = out_dir.resolve()
    for src in sources:
        src = src.resolve()
        if out == src or out.is_relative_to(src) or src.is_relative_to(out):
            raise PseudoLabelError(
                f"the merged folder {out_dir} overlaps the input folder {src}; choose another "
                "output folder (it is rebuilt from scratch on every run)."
            )


def build_merged(
    train_dir: Path,
    unlabeled_dir: Path,
    accepted: pd.DataFrame,
    out_dir: Path,
    class_names: list[str],
) -> dict[str, dict[str, int]]:
    """Copy the labelled train images and the accepted unlabelled ones into `out_dir/<class>/`.

    The folder is rebuilt from scratch; originals are only read. Beside the class folders,
    `manifest.csv` says where each copy came from (labelled or pseudo-labelled, with the
    teacher's confidence and, when `accepted` has them, its per-class probabilities: the soft
    targets a student can train on). A row accepted twice is copied twice. Returns per-class
    counts.
    """
    _guard(out_dir, train_dir, unlabeled_dir)
    check_rows(accepted, unlabeled_dir, class_names)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    prob_cols = [c for c in accepted.columns if c.startswith(PROB_PREFIX)]
    no_probs = [float("nan")] * len(prob_cols)
    # src, class folder, file name, source, confidence, probabilities
    jobs: list[tuple[Path, Path, str, str, float, list[float]]] = []
    counts = {name: {"labeled": 0, "pseudo": 0} for name in class_names}
    for name in class_names:
        (out_dir / name).mkdir(parents=True)
        for src in list_images(train_dir / name):
            jobs.append((src, out_dir / name, src.name, "labeled", float("nan"), no_probs))
            counts[name]["labeled"] += 1
    probs = accepted[prob_cols].to_numpy(dtype=float).tolist()
    for rel, label, conf, row_probs in zip(
        accepted["path"], accepted["label"], accepted["confidence"], probs, strict=True
    ):
        # Named after the path under the unlabelled folder (any depth), flattened.
        name = "u__" + rel.replace("/", "__")
        jobs.append((unlabeled_dir / rel, out_dir / label, name, "pseudo", float(conf), row_probs))
        counts[label]["pseudo"] += 1
    rows = []
    for src, folder, name, source, conf, row_probs in tqdm(
        jobs, desc="merge: copying", unit="img", mininterval=2
    ):
        target = _unique(folder, name)
        shutil.copyfile(src, target)
        rows.append((f"{folder.name}/{target.name}", folder.name, source, conf, *row_probs))
    manifest = pd.DataFrame(rows, columns=["file", "label", "source", "confidence", *prob_cols])
    manifest.to_csv(out_dir / MANIFEST, index=False, float_format="%.6f")
    return counts


def read_manifest(merged_dir: Path) -> pd.DataFrame:
    path = merged_dir / MANIFEST
    if not path.is_file():
        raise PseudoLabelError(f"{path}: merge manifest not found; run the merge stage.")
    return pd.read_csv(path, dtype={"file": str, "label": str, "source": str})
