"""Threshold analysis: how many unlabeled images a threshold keeps, and how precise they are.

Coverage is measured on the unlabeled predictions (overall, and per predicted class); the
precision one can expect is estimated on the labeled val set as the teacher's accuracy among
val images at or above the threshold. Both use the same (calibrated) confidences.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np
import pandas as pd

from pseudolabel.errors import PseudoLabelError

log = logging.getLogger(__name__)

THRESHOLDS = np.round(np.linspace(0.0, 1.0, 101), 2)


def _coverage(confidence: np.ndarray) -> np.ndarray:
    if not len(confidence):
        return np.full(len(THRESHOLDS), np.nan)
    return (confidence[None, :] >= THRESHOLDS[:, None]).mean(axis=1)


def _precision(confidence: np.ndarray, correct: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Accuracy among the images at or above each threshold (NaN where none), and their count."""
    above = confidence[None, :] >= THRESHOLDS[:, None]
    support = above.sum(axis=1)
    hits = (above & correct[None, :]).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(support > 0, hits / np.maximum(support, 1), np.nan), support


def analysis_table(
    confidence: np.ndarray,
    predicted: np.ndarray,
    val_confidence: np.ndarray,
    val_predicted: np.ndarray,
    val_true: np.ndarray,
    class_names: list[str],
) -> pd.DataFrame:
    """One row per threshold in 0, 0.01, ..., 1: coverage (share of unlabeled images kept),
    precision (estimated on val), val_support, then coverage_<class> and precision_<class> for
    the images predicted as each class. Class arrays hold class indices."""
    confidence, predicted = np.asarray(confidence), np.asarray(predicted)
    val_confidence, val_predicted = np.asarray(val_confidence), np.asarray(val_predicted)
    correct = val_predicted == np.asarray(val_true)
    precision, support = _precision(val_confidence, correct)
    table = {
        "threshold": THRESHOLDS,
        "coverage": _coverage(confidence),
        "precision": precision,
        "val_support": support,
    }
    for i, name in enumerate(class_names):
        table[f"coverage_{name}"] = _coverage(confidence[predicted == i])
    for i, name in enumerate(class_names):
        mask = val_predicted == i
        table[f"precision_{name}"] = _precision(val_confidence[mask], correct[mask])[0]
    return pd.DataFrame(table)


def recommend(table: pd.DataFrame, target: float, column: str = "precision") -> float | None:
    """The threshold with the highest coverage whose estimated precision reaches `target`
    (coverage only falls as the threshold rises, so: the lowest such threshold); None if none."""
    if column not in table.columns:
        raise PseudoLabelError(
            f"threshold analysis lacks column {column!r}; re-run the pseudo_label stage."
        )
    reached = table[table[column] >= target - 1e-12]
    return None if reached.empty else float(reached["threshold"].min())


def class_thresholds(
    class_names: list[str],
    configured: Mapping[str, float] | None,
    fallback: float | None,
    table: pd.DataFrame | None,
    target: float,
) -> dict[str, float | None]:
    """Per-class thresholds: the configured mapping (classes it omits use `fallback`), or, when
    no mapping is given, each class's recommended threshold from the analysis table; a class
    whose val precision never reaches `target` gets 1.0 (keeps only certain images)."""
    if configured is not None:
        unknown = sorted(set(configured) - set(class_names))
        if unknown:
            raise PseudoLabelError(
                f"pseudo_label.per_class_threshold names unknown class(es) {', '.join(unknown)}; "
                f"valid: {', '.join(class_names)}."
            )
        return {name: configured.get(name, fallback) for name in class_names}
    if table is None:
        raise PseudoLabelError(
            "per-class thresholds are derived from the threshold analysis, which is missing; "
            "run the pseudo_label stage, or set pseudo_label.per_class_threshold."
        )
    derived = {}
    for name in class_names:
        found = recommend(table, target, f"precision_{name}")
        if found is None:
            log.warning("class %s never reaches precision %g on val; threshold 1.0", name, target)
        derived[name] = 1.0 if found is None else found
    return derived
