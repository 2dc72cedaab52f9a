"""evaluate: teacher and student on the test folder."""

from __future__ import annotations

import logging
from typing import Any

import mlflow
import pandas as pd

from pseudolabel import plots, tracking
from pseudolabel.evaluation import evaluate as evaluate_model
from pseudolabel.models import io as model_io
from pseudolabel.paths import Paths
from pseudolabel.stages.common import write_json

log = logging.getLogger(__name__)


def evaluate(cfg, paths: Paths = Paths()) -> dict[str, Any]:
    """Teacher and student on the test folder: accuracy, gain and confusion matrices."""
    results, run_ids = {}, {}
    (paths.plots / "evaluate").mkdir(parents=True, exist_ok=True)
    for role in ("teacher", "student"):
        model, meta = model_io.load(paths.model(role))
        result = evaluate_model(model, meta, paths.test)
        results[role], run_ids[role] = result, meta.run_id
        names = meta.class_names
        pd.DataFrame(
            {
                "actual": [names[i] for i in result.y_true],
                "predicted": [names[i] for i in result.y_pred],
            }
        ).to_csv(paths.plots / "evaluate" / f"{role}_confusion.csv", index=False)
    metrics = {
        "teacher_accuracy": round(results["teacher"].accuracy, 6),
        "student_accuracy": round(results["student"].accuracy, 6),
        "gain": round(results["student"].accuracy - results["teacher"].accuracy, 6),
        "test_images": len(results["teacher"].y_true),
    }
    tags = {f"{role}_run_id": run_id for role, run_id in run_ids.items()}
    with tracking.start_run(cfg, "evaluate", tags=tags):
        mlflow.log_metrics({k: v for k, v in metrics.items() if k != "test_images"})
        for role, result in results.items():
            fig = plots.confusion(
                result.confusion, names, f"{role}: test accuracy {result.accuracy:.2%}"
            )
            mlflow.log_figure(fig, f"{role}_confusion.png")
    client = mlflow.MlflowClient()
    for role, run_id in run_ids.items():
        if run_id:  # the same metric name on both runs: the MLflow UI compares them side by side
            client.log_metric(run_id, "test_accuracy", results[role].accuracy)
    write_json(paths.metrics / "evaluation.json", metrics)
    log.info("evaluate: %s", metrics)
    return metrics
