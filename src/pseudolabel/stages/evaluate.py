"""evaluate: teacher and student on the test folder."""

from __future__ import annotations

import logging
from typing import Any

import mlflow
import pandas as pd

from pseudolabel import plots, registry, tracking
from pseudolabel.evaluation import evaluate as evaluate_model
from pseudolabel.models import io as model_io
from pseudolabel.paths import Paths
from pseudolabel.stages.common import teacher_trust, write_json

log = logging.getLogger(__name__)


def evaluate(cfg, paths: Paths = Paths()) -> dict[str, Any]:
    """Teacher, labelled-only baseline and student on the test folder: accuracy, the gain over
    the teacher and over the best labelled-only model, confusion matrices. With
    pseudo_label.rounds > 1 the student is the last round's, and every round is scored."""
    n = cfg.pseudo_label.rounds
    models = {"teacher": paths.model("teacher")}
    if paths.model("baseline").is_file():  # train_baseline ran (student.baseline.enabled)
        models["baseline"] = paths.model("baseline")
    models |= {f"round{r}": paths.round(r).model("student") for r in range(1, n + 1)}
    results, run_ids, metas = {}, {}, {}
    for name, path in models.items():
        model, metas[name] = model_io.load(path, **teacher_trust(cfg))
        meta = metas[name]
        results[name], run_ids[name] = evaluate_model(model, meta, paths.test), meta.run_id
        names = meta.class_names
    results["student"], run_ids["student"] = results[f"round{n}"], run_ids[f"round{n}"]
    (paths.plots / "evaluate").mkdir(parents=True, exist_ok=True)
    for role in ("teacher", "student"):
        result = results[role]
        pd.DataFrame(
            {
                "actual": [names[i] for i in result.y_true],
                "predicted": [names[i] for i in result.y_pred],
            }
        ).to_csv(paths.plots / "evaluate" / f"{role}_confusion.csv", index=False)
    metrics: dict[str, Any] = {
        "teacher_accuracy": round(results["teacher"].accuracy, 6),
        "student_accuracy": round(results["student"].accuracy, 6),
        "gain": round(results["student"].accuracy - results["teacher"].accuracy, 6),
        "test_images": len(results["teacher"].y_true),
        "rounds": n,
    }
    if "baseline" in results:
        # What a user asks: did the unlabelled images help, over the best model the labelled
        # images alone gave (the teacher, or the student's network trained on them alone)?
        best = max(results["teacher"].accuracy, results["baseline"].accuracy)
        gain = results["student"].accuracy - best
        metrics |= {
            "baseline_accuracy": round(results["baseline"].accuracy, 6),
            "labelled_only_best": round(best, 6),
            "gain_over_labelled_only": round(gain, 6),
            "unlabelled_helped": bool(gain > 0),
        }
        if gain <= 0:
            log.warning(
                "evaluate: the student (%.2f %%) does NOT beat the best labelled-only model "
                "(%.2f %%): the unlabelled images did not help here. Keep the better model; see "
                "the docs' 'Does the student win?' for levers.",
                100 * results["student"].accuracy,
                100 * best,
            )
    if n > 1:  # the student after each round: does iterating still help?
        metrics["round_accuracy"] = {
            f"round{r}": round(results[f"round{r}"].accuracy, 6) for r in range(1, n + 1)
        }
    roles = [role for role in ("teacher", "baseline", "student") if role in run_ids]
    tags = {f"{role}_run_id": run_ids[role] for role in roles}
    with tracking.start_run(cfg, "evaluate", tags=tags) as run:
        flat = tracking.flatten({k: v for k, v in metrics.items() if k != "test_images"})
        mlflow.log_metrics({k: float(v) for k, v in flat.items()})  # unlabelled_helped: 0/1
        for role in ("teacher", "student"):
            result = results[role]
            fig = plots.confusion(
                result.confusion, names, f"{role}: test accuracy {result.accuracy:.2%}"
            )
            mlflow.log_figure(fig, f"{role}_confusion.png")
    client = mlflow.MlflowClient()
    for name, run_id in run_ids.items():
        # The same metric name on every run: compare them in the UI. A model whose run is not
        # in this tracking store (trained against another one) is skipped.
        if name != "student" and tracking.find_run(client, run_id) is not None:
            client.log_metric(run_id, "test_accuracy", results[name].accuracy)
    if cfg.tracking.registered_model:
        version = registry.register_student(
            cfg.tracking.registered_model,
            models[f"round{n}"],
            metas[f"round{n}"],
            results["student"].accuracy,
            tracking.dvc_hash(paths.test),
            {
                "evaluate_run_id": run.info.run_id,
                "teacher_test_accuracy": metrics["teacher_accuracy"],
            },
            fallback_run_id=run.info.run_id,
        )
        for key, value in (
            ("registered_model", version.name),
            ("registered_version", version.version),
            ("registered_alias", version.tags["promotion"]),
        ):
            client.set_tag(run.info.run_id, key, value)
    write_json(paths.metrics / "evaluation.json", metrics)
    log.info("evaluate: %s", metrics)
    return metrics
