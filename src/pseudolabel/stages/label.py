"""pseudo_label: the teacher's predictions for every unlabelled image (no threshold)."""

from __future__ import annotations

import logging
from typing import Any

import mlflow
import pandas as pd

from pseudolabel import labeling, plots, tracking
from pseudolabel.data.images import require_images
from pseudolabel.models import io as model_io
from pseudolabel.paths import Paths
from pseudolabel.stages.common import write_json

log = logging.getLogger(__name__)


def pseudo_label(cfg, paths: Paths = Paths()) -> dict[str, Any]:
    """Teacher predictions for every unlabelled image -> outputs/data.csv (no threshold)."""
    require_images(paths.unlabeled, "unlabelled")
    model, meta = model_io.load(paths.model("teacher"))
    with tracking.start_run(
        cfg,
        "pseudo_label",
        {"pseudo_label.batch_size": cfg.pseudo_label.batch_size},
        {"teacher_run_id": meta.run_id},
    ):
        predictions, failed = labeling.predict_folder(
            model, meta, paths.unlabeled, cfg.pseudo_label.batch_size
        )
        labeling.write_csv(predictions, paths.csv)
        errors = pd.DataFrame({"path": failed, "reason": "cannot be decoded"})
        labeling.write_csv(errors, paths.outputs / "errors.csv")
        figures = {
            "confidence.png": plots.confidence_overview(predictions),
            "confidence_per_class.png": plots.confidence_per_class(predictions, meta.class_names),
        }
        for name, fig in figures.items():
            plots.save(fig, paths.outputs / "plots" / name)
        conf = predictions["confidence"]
        metrics = {
            "images": len(predictions),
            "failed": len(failed),
            "mean_confidence": round(float(conf.mean()), 6),
            "fraction_at_least": {
                f"{t:g}": round(float((conf >= t).mean()), 6) for t in (0.5, 0.7, 0.8, 0.9, 0.95)
            },
            "predicted_per_class": {
                name: int((predictions["label"] == name).sum()) for name in meta.class_names
            },
        }
        mlflow.log_metrics(
            tracking.flatten({k: v for k, v in metrics.items() if k != "predicted_per_class"})
        )
        csv_md5 = tracking.md5(paths.csv)
        mlflow.set_tag("pseudo_label_csv_md5", csv_md5)
        mlflow.log_artifact(str(paths.csv))
        mlflow.log_artifacts(str(paths.outputs / "plots"), "plots")
    write_json(paths.metrics / "pseudo_label.json", metrics)
    log.info("pseudo_label: %d images labelled, %d failed", len(predictions), len(failed))
    return metrics
