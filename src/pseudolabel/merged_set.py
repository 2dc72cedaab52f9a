"""Select confident pseudo-labels and build the merged training set from copies."""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from pseudolabel.config import SELECTIONS
from pseudolabel.data.images import list_images
from pseudolabel.errors import PseudoLabelError
from pseudolabel.paths import MANIFEST, swap_folder
from pseudolabel.predicting import PROB_PREFIX

log = logging.getLogger(__name__)


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


def check_rows(
    accepted: pd.DataFrame,
    unlabeled_dir: Path,
    class_names: list[str],
    link_roots: Sequence[Path] = (),
) -> None:
    """Refuse a CSV that names an unknown class or a file outside the unlabeled folder, also
    through a symbolic link: a row's file must resolve inside the unlabeled folder or inside
    one of `link_roots` (the user's folder the view links to, with `data.link: symlink`)."""
    unknown = sorted(set(accepted["label"]) - set(class_names))
    if unknown:
        raise PseudoLabelError(
            f"pseudo-label CSV names unknown class(es) {', '.join(map(str, unknown))}; valid: "
            f"{', '.join(class_names)}. Re-run the pseudo_label stage."
        )
    # Lexical paths first (a `..` in the CSV), then where each file really is: inside the
    # folder, or where `data.link: symlink` links point (ingest checked those).
    root = Path(os.path.abspath(unlabeled_dir))
    allowed = [root.resolve(), *(Path(r).resolve() for r in link_roots)]
    for rel in accepted["path"]:
        source = Path(os.path.normpath(root / rel))
        if not source.is_relative_to(root) or not source.is_file():
            raise PseudoLabelError(
                f"pseudo-label CSV row {rel!r} is not a file inside {unlabeled_dir}; "
                "re-run the pseudo_label stage."
            )
        target = source.resolve()
        if not any(target.is_relative_to(a) for a in allowed):
            raise PseudoLabelError(
                f"{source}: a symbolic link to {target}, outside {unlabeled_dir}"
                f"{' and ' + ', '.join(map(str, link_roots)) if link_roots else ''} "
                "(symlink_outside); nothing was copied. Remove the link or put the file itself "
                "in the unlabeled folder."
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


def copy_name(rel: str) -> str:
    """The file name a pseudo-labeled image gets in the merged set: its path under the
    unlabeled folder (any depth), flattened (-N is appended when a name is taken)."""
    return "u__" + rel.replace("/", "__")


def build_merged(
    train_dir: Path,
    unlabeled_dir: Path,
    accepted: pd.DataFrame,
    out_dir: Path,
    class_names: list[str],
    link_roots: Sequence[Path] = (),
) -> dict[str, dict[str, int]]:
    """Copy the labeled train images and the accepted unlabeled ones into `out_dir/<class>/`.

    The folder is rebuilt from scratch; originals are only read. Beside the class folders,
    `manifest.csv` says where each copy came from (labeled or pseudo-labeled, with the
    teacher's confidence and, when `accepted` has them, its per-class probabilities: the soft
    targets a student can train on). A row accepted twice is copied twice. Returns per-class
    counts.
    """
    _guard(out_dir, train_dir, unlabeled_dir)
    check_rows(accepted, unlabeled_dir, class_names, link_roots)
    # Built in a sibling folder and swapped in only once complete (manifest included): a run
    # that fails or is killed half-way leaves the previous merged folder whole.
    building = out_dir.with_name(f".{out_dir.name}.building")
    if building.exists():
        shutil.rmtree(building)  # a killed run's leftovers
    try:
        counts = _build(train_dir, unlabeled_dir, accepted, building, class_names)
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise
    swap_folder(building, out_dir)
    return counts


def _build(
    train_dir: Path,
    unlabeled_dir: Path,
    accepted: pd.DataFrame,
    out_dir: Path,
    class_names: list[str],
) -> dict[str, dict[str, int]]:
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
        name = copy_name(rel)
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


def check_complete(merged_dir: Path) -> None:
    """Refuse a merged folder that is not what one merge wrote: no manifest, or image files the
    manifest does not list (or listed ones missing), e.g. after a hand edit or a killed copy."""
    manifest = read_manifest(merged_dir)
    listed = set(manifest["file"])
    on_disk = {p.relative_to(merged_dir).as_posix() for p in list_images(merged_dir)}
    extra, missing = sorted(on_disk - listed), sorted(listed - on_disk)
    if extra or missing:
        what = "; ".join(
            f"{len(names)} {kind} (e.g. {names[0]})"
            for names, kind in ((extra, "not in the manifest"), (missing, "listed but missing"))
            if names
        )
        raise PseudoLabelError(
            f"{merged_dir}: the folder does not match its {MANIFEST} ({what}); re-run the merge "
            "stage instead of editing the merged folder."
        )


def read_manifest(merged_dir: Path) -> pd.DataFrame:
    path = merged_dir / MANIFEST
    if not path.is_file():
        raise PseudoLabelError(f"{path}: merge manifest not found; run the merge stage.")
    return pd.read_csv(path, dtype={"file": str, "label": str, "source": str})
