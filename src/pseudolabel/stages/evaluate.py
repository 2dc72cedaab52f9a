"""evaluate: teacher and student on the test folder."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd

from pseudolabel import plots, registry, tracking
from pseudolabel.evaluation import evaluate as evaluate_model
from pseudolabel.models import io as model_io
from pseudolabel.paths import Paths
from pseudolabel.stages.common import publish_metrics, teacher_trust

log = logging.getLogger(__name__)


def evaluate(cfg, paths: Paths = Paths()) -> dict[str, Any]:
    """Teacher, labeled-only baseline and student on the test folder: accuracy, the gain over
    the teacher and over the best labeled-only model, confusion matrices. With
    pseudo_label.rounds > 1 the student is the last round's, and every round is scored."""
    n = cfg.pseudo_label.rounds
    models = _models(paths, n)
    results, metas = _score(cfg, models, paths)
    names = metas[f"round{n}"].class_names
    run_ids = {name: meta.run_id for name, meta in metas.items()}
    run_ids["student"] = run_ids[f"round{n}"]
    _write_confusions(paths, results, names)
    metrics = _metrics(results, n)
    roles = [role for role in ("teacher", "baseline", "student") if role in run_ids]
    tags = {f"{role}_run_id": run_ids[role] for role in roles}
    with tracking.start_run(cfg, "evaluate", tags=tags) as run:
        for role in ("teacher", "student"):
            result = results[role]
            fig = plots.confusion(
                result.confusion, names, f"{role}: test accuracy {result.accuracy:.2%}"
            )
            mlflow.log_figure(fig, f"{role}_confusion.png")
        # unlabeled_helped as 0/1; test_images is no score
        publish_metrics(paths.metrics / "evaluation.json", metrics, exclude=("test_images",))
    _log_test_accuracy(run_ids, results)
    if cfg.tracking.registered_model:
        _register(cfg, paths, models[f"round{n}"], metas[f"round{n}"], results, metrics, run)
    log.info("evaluate: %s", metrics)
    return metrics


def _models(paths: Paths, rounds: int) -> dict[str, Path]:
    """The models to score by name: teacher, baseline (when train_baseline made one) and the
    student of each round (round1..round<rounds>)."""
    models = {"teacher": paths.model("teacher")}
    if paths.model("baseline").is_file():  # train_baseline ran (student.baseline.enabled)
        models["baseline"] = paths.model("baseline")
    return models | {f"round{r}": paths.round(r).model("student") for r in range(1, rounds + 1)}


def _score(cfg, models: dict[str, Path], paths: Paths):
    """Each model's result on the test folder and its metadata, by name; the last round's
    result is also the student's."""
    results, metas = {}, {}
    for name, path in models.items():
        model, metas[name] = model_io.load(path, **teacher_trust(cfg))
        results[name] = evaluate_model(model, metas[name], paths.test)
    results["student"] = results[f"round{cfg.pseudo_label.rounds}"]
    return results, metas


def _write_confusions(paths: Paths, results, names: list[str]) -> None:
    """The teacher's and the student's (actual, predicted) pairs: `dvc plots` confusion data."""
    (paths.plots / "evaluate").mkdir(parents=True, exist_ok=True)
    for role in ("teacher", "student"):
        result = results[role]
        pd.DataFrame(
            {
                "actual": [names[i] for i in result.y_true],
                "predicted": [names[i] for i in result.y_pred],
            }
        ).to_csv(paths.plots / "evaluate" / f"{role}_confusion.csv", index=False)


def _metrics(results, rounds: int) -> dict[str, Any]:
    """Accuracies and gains (6 decimals); with a baseline, the gain over the best labeled-only
    model (a warning when there is none); with several rounds, each round's accuracy."""
    teacher, student = results["teacher"].accuracy, results["student"].accuracy
    metrics: dict[str, Any] = {
        "teacher_accuracy": round(teacher, 6),
        "student_accuracy": round(student, 6),
        "gain": round(student - teacher, 6),
        "test_images": len(results["teacher"].y_true),
        "rounds": rounds,
    }
    if "baseline" in results:
        # What a user asks: did the unlabeled images help, over the best model the labeled
        # images alone gave (the teacher, or the student's network trained on them alone)?
        best = max(teacher, results["baseline"].accuracy)
        gain = student - best
        metrics |= {
            "baseline_accuracy": round(results["baseline"].accuracy, 6),
            "labeled_only_best": round(best, 6),
            "gain_over_labeled_only": round(gain, 6),
            "unlabeled_helped": bool(gain > 0),
        }
        if gain <= 0:
            log.warning(
                "evaluate: the student (%.2f %%) does NOT beat the best labeled-only model "
                "(%.2f %%): the unlabeled images did not help here. Keep the better model; see "
                "the docs' 'Does the student win?' for levers.",
                100 * student,
                100 * best,
            )
    if rounds > 1:  # the student after each round: does iterating still help?
        metrics["round_accuracy"] = {
            f"round{r}": round(results[f"round{r}"].accuracy, 6) for r in range(1, rounds + 1)
        }
    return metrics


def _log_test_accuracy(run_ids: dict[str, str | None], results) -> None:
    """test_accuracy on each scored model's own run: the same metric name on every run, to
    compare them in the UI. A model whose run is not in this tracking store (trained against
    another one) is skipped."""
    client = mlflow.MlflowClient()
    for name, run_id in run_ids.items():
        if name != "student" and tracking.find_run(client, run_id) is not None:
            client.log_metric(run_id, "test_accuracy", results[name].accuracy)


def _register(cfg, paths: Paths, model_path: Path, meta, results, metrics, run) -> None:
    """The last round's student in the model registry (registry.register_student decides the
    alias), and where it went as tags of the evaluate run."""
    version = registry.register_student(
        cfg.tracking.registered_model,
        model_path,
        meta,
        results["student"].accuracy,
        tracking.dvc_hash(paths.test),
        {"evaluate_run_id": run.info.run_id, "teacher_test_accuracy": metrics["teacher_accuracy"]},
        fallback_run_id=run.info.run_id,
    )
    client = mlflow.MlflowClient()
    for key, value in (
        ("registered_model", version.name),
        ("registered_version", version.version),
        ("registered_alias", version.tags["promotion"]),
    ):
        client.set_tag(run.info.run_id, key, value)
