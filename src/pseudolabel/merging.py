"""Select confident pseudo-labels and build the merged training set from copies."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pandas as pd
from tqdm import tqdm

from pseudolabel.data.images import list_images
from pseudolabel.errors import PseudoLabelError

log = logging.getLogger(__name__)


def select(predictions: pd.DataFrame, threshold: float | None) -> pd.DataFrame:
    """Rows whose confidence is at least `threshold`; every row when it is None (the seed's)."""
    if threshold is None:
        return predictions
    return predictions[predictions["confidence"] >= threshold]


def check_rows(accepted: pd.DataFrame, unlabeled_dir: Path, class_names: list[str]) -> None:
    """Refuse a CSV that names an unknown class or a file outside the unlabelled folder."""
    unknown = sorted(set(accepted["label"]) - set(class_names))
    if unknown:
        raise PseudoLabelError(
            f"pseudo-label CSV names unknown class(es) {', '.join(map(str, unknown))}; valid: "
            f"{', '.join(class_names)}. Re-run the pseudo_label stage."
        )
    root = unlabeled_dir.resolve()
    for rel in accepted["path"]:
        source = (unlabeled_dir / rel).resolve()
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


MANIFEST = "manifest.csv"


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
    teacher's confidence). Returns per-class counts.
    """
    _guard(out_dir, train_dir, unlabeled_dir)
    check_rows(accepted, unlabeled_dir, class_names)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    jobs: list[tuple[Path, Path, str, str, float]] = []  # src, folder, name, source, confidence
    counts = {name: {"labeled": 0, "pseudo": 0} for name in class_names}
    for name in class_names:
        (out_dir / name).mkdir(parents=True)
        for src in list_images(train_dir / name):
            jobs.append((src, out_dir / name, src.name, "labeled", float("nan")))
            counts[name]["labeled"] += 1
    for rel, label, conf in zip(
        accepted["path"], accepted["label"], accepted["confidence"], strict=True
    ):
        # Named after the path under the unlabelled folder (any depth), flattened.
        jobs.append(
            (
                unlabeled_dir / rel,
                out_dir / label,
                "u__" + rel.replace("/", "__"),
                "pseudo",
                float(conf),
            )
        )
        counts[label]["pseudo"] += 1
    rows = []
    for src, folder, name, source, conf in tqdm(
        jobs, desc="merge: copying", unit="img", mininterval=2
    ):
        target = _unique(folder, name)
        shutil.copyfile(src, target)
        rows.append((f"{folder.name}/{target.name}", folder.name, source, conf))
    manifest = pd.DataFrame(rows, columns=["file", "label", "source", "confidence"])
    manifest.to_csv(out_dir / MANIFEST, index=False, float_format="%.6f")
    return counts


def read_manifest(merged_dir: Path) -> pd.DataFrame:
    path = merged_dir / MANIFEST
    if not path.is_file():
        raise PseudoLabelError(f"{path}: merge manifest not found; run the merge stage.")
    return pd.read_csv(path, dtype={"file": str, "label": str, "source": str})
