"""merge: copies of the labeled images plus the selected pseudo-labeled ones.

Everything that depends on the threshold or the selection lives here, so changing them re-runs
only this stage: the selection, the threshold-analysis figure with the configured and the
recommended threshold, the charts with the threshold line, and the visual QA grids.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from PIL import Image

from pseudolabel import merged_set, ood, plots, predicting, thresholds, tracking
from pseudolabel.config import to_dict
from pseudolabel.errors import PseudoLabelError
from pseudolabel.models import io as model_io
from pseudolabel.paths import Paths
from pseudolabel.stages.common import publish_metrics

log = logging.getLogger(__name__)


def _images(rows: pd.DataFrame, root: Path) -> list[tuple[np.ndarray, float]]:
    return [
        (np.asarray(Image.open(root / rel)), float(conf))
        for rel, conf in zip(rows["path"], rows["confidence"], strict=True)
    ]


def qa_grids(
    predictions: pd.DataFrame,
    accepted: pd.DataFrame,
    class_names: list[str],
    unlabeled_dir: Path,
    out_dir: Path,
    n: int,
) -> list[Path]:
    """One PNG per class: its least confident accepted and most confident rejected images."""
    written = []
    for name in class_names:
        low, high, totals = merged_set.qa_examples(predictions, accepted, name, n)
        fig = plots.qa_grid(
            name, _images(low, unlabeled_dir), _images(high, unlabeled_dir), n, totals
        )
        written.append(plots.save(fig, out_dir / f"{name}.png"))
    return written


def merge(cfg, paths: Paths = Paths()) -> dict[str, Any]:
    """data/train_ssl/<class>/: copies of the labeled images plus the selected pseudo-labels."""
    pl = cfg.pseudo_label
    class_names, predictions, link_roots = _inputs(cfg, paths)  # checked before writing
    # images unlike the labeled classes are no candidates at all (all flagged, or the far ones)
    predictions, flagged, column = ood.left_out(pl.ood, predictions, paths.csv, paths)
    excluding = column == ood.FLAG_COLUMN  # what exclude decided (ood.decides_in)
    table_path = paths.threshold_analysis
    table = pd.read_csv(table_path) if table_path.is_file() else None
    accepted, per_class, recommended = _select(pl, predictions, class_names, table)
    counts = merged_set.build_merged(
        paths.train, paths.unlabeled, accepted, paths.merged, class_names, link_roots
    )
    out = paths.outputs / "selection"
    _charts(pl, predictions, accepted, class_names, table, recommended, paths, out)
    if flagged is not None:
        listed = flagged[["path", "label", "confidence", ood.SCORE_COLUMN]].assign(
            reason=ood.REASONS[column]
        )
        predicting.write_csv(listed, out / "ood_excluded.csv")
    metrics = {
        "threshold": pl.threshold,
        "selection": pl.selection,
        "recommended_threshold": recommended,
        "target_precision": pl.target_precision,
        "class_thresholds": per_class,
        "pseudo_labeled": len(accepted),
        "kept_fraction": round(len(accepted) / max(1, len(predictions)), 6),
        "labeled": sum(c["labeled"] for c in counts.values()),
        "per_class": counts,
    }
    if ood.FLAG_COLUMN in predictions:  # (scored) what exclude decided
        metrics["ood_exclude"] = {"setting": pl.ood.exclude, "excluded": excluding}
        if column == ood.FAR_COLUMN:  # only what lies past far times the cut
            metrics["ood_exclude"]["far"] = pl.ood.far
        metrics["ood_excluded"] = 0 if flagged is None else len(flagged)
    _log_run(cfg, paths, metrics, out, with_table=table is not None)
    log.info(
        "merge (%s): kept %d of %d pseudo-labels; recommended threshold %s for precision %g",
        pl.selection,
        len(accepted),
        len(predictions),
        recommended,
        pl.target_precision,
    )
    return metrics


def _select(
    pl, predictions: pd.DataFrame, class_names: list[str], table: pd.DataFrame | None
) -> tuple[pd.DataFrame, dict[str, float] | None, float | None]:
    """The accepted rows of the CSV, the per-class thresholds used (selection: per_class) and
    the threshold the analysis table recommends for pseudo_label.target_precision."""
    recommended = thresholds.recommend(table, pl.target_precision) if table is not None else None
    per_class = None
    if pl.selection == "per_class":
        configured = to_dict(pl.per_class_threshold) if pl.per_class_threshold else None
        per_class = thresholds.class_thresholds(
            class_names, configured, pl.threshold, table, pl.target_precision
        )
    accepted = merged_set.choose(
        predictions, pl.selection, class_names, pl.threshold, per_class, pl.top_k, pl.duplicate
    )
    return accepted, per_class, recommended


def _log_run(cfg, paths: Paths, metrics: dict[str, Any], out: Path, with_table: bool) -> None:
    """The merge run (settings as params, lineage tags, the charts) and the metrics, in MLflow
    as counts: pseudo_labeled, kept_fraction, recommended_threshold, kept.<class>."""
    params = {f"pseudo_label.{k}": v for k, v in to_dict(cfg.pseudo_label).items()}
    with tracking.start_run(cfg, "merge", params, _lineage_tags(cfg, paths)):
        mlflow.log_artifacts(str(out), "selection")
        if with_table:
            mlflow.log_artifact(str(paths.threshold_analysis))
        logged = {
            "pseudo_labeled": metrics["pseudo_labeled"],
            "kept_fraction": metrics["kept_fraction"],
            "recommended_threshold": metrics["recommended_threshold"],  # None: left out
            "kept": {name: c["pseudo"] for name, c in metrics["per_class"].items()},
        }
        publish_metrics(paths.metrics / "merge.json", metrics, logged)


def _inputs(cfg, paths: Paths) -> tuple[list[str], pd.DataFrame, list[Path]]:
    """The teacher's class names, the CSV's rows (every row checked) and the roots the view's
    links may point into; raises before anything is written."""
    meta = model_io.read_meta(paths.model("teacher"))
    if meta is None:
        raise PseudoLabelError(
            f"{paths.model('teacher')}: teacher metadata missing; run train_teacher."
        )
    if not paths.csv.is_file():
        raise PseudoLabelError(
            f"{paths.csv}: pseudo-label CSV not found; run the pseudo_label stage."
        )
    predictions = predicting.read_csv(paths.csv)
    # With `data.link: symlink` the view's files are links into the user's folder.
    link_roots = (
        [Path(cfg.data.unlabeled_root)]
        if cfg.data.source == "folder" and cfg.data.link == "symlink"
        else []
    )
    merged_set.check_rows(predictions, paths.unlabeled, meta.class_names, link_roots)
    return meta.class_names, predictions, link_roots


def _charts(
    pl,
    predictions: pd.DataFrame,
    accepted: pd.DataFrame,
    class_names: list[str],
    table: pd.DataFrame | None,
    recommended: float | None,
    paths: Paths,
    out: Path,
) -> None:
    """The confidence charts with the threshold marked, the threshold analysis and the QA
    grids, under outputs/selection/."""
    threshold = pl.threshold
    figures = {
        "confidence.png": plots.confidence_overview(predictions, threshold),
        "confidence_per_class.png": plots.confidence_per_class(predictions, class_names, threshold),
    }
    if table is not None:
        figures["threshold_analysis.png"] = plots.threshold_analysis(
            table, class_names, threshold, recommended, pl.target_precision
        )
    for name, fig in figures.items():
        plots.save(fig, out / name)
    qa_grids(predictions, accepted, class_names, paths.unlabeled, out / "qa", pl.qa_images)


def _lineage_tags(cfg, paths: Paths) -> dict[str, Any]:
    """The CSV's md5 and, when the store holds it, the labeling run that wrote the CSV (the
    merge run is shown nested under it in the MLflow UI)."""
    csv_md5 = tracking.md5(paths.csv)
    tracking.configure(cfg)
    labeling = tracking.find_labeling_run(csv_md5, mlflow.MlflowClient())
    tags = {tracking.CSV_TAG: csv_md5, "round": paths.round_number}
    if labeling:
        parent = labeling.info.run_id
        tags |= {"mlflow.parentRunId": parent, "pseudo_label_run_id": parent}
    else:
        log.warning(
            "MLflow store %s has no pseudo_label run that wrote %s (md5 %s): the store was "
            "deleted or replaced since labeling, or the CSV was edited; this merge's lineage "
            "stops at the CSV",
            mlflow.get_tracking_uri(),
            paths.csv,
            csv_md5,
        )
    return tags
