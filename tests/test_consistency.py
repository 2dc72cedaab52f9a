"""The consistency student (student.consistency) and the labeled-only baseline, on digits."""

import json

import mlflow
import numpy as np
import pandas as pd
import pytest

from pseudolabel import tracking
from pseudolabel.config import compose
from pseudolabel.paths import Paths
from pseudolabel.stages import STAGES

pytestmark = pytest.mark.slow  # trains real (tiny) models end to end


@pytest.fixture(scope="module")
def consistency_run(tmp_path_factory, tracking_uri):
    """Every stage on digits with the consistency student, its truth known (as in benchmarks)."""
    cfg = compose(["+experiment=smoke", "student.consistency.enabled=true"])
    paths = Paths(tmp_path_factory.mktemp("consistency"))
    seen: list[str] = []

    def truth(rel_paths):  # digits' unlabeled files do not carry their class: half unknown
        seen.extend(rel_paths)
        return [None] * len(rel_paths)

    for name, stage in STAGES.items():
        if name == "train_student":
            stage(cfg, paths, truth=truth)
        else:
            stage(cfg, paths)
    return cfg, paths, seen


def _run(paths: Paths, role: str):
    run_id = json.loads(paths.model(role).with_suffix(".json").read_text())["run_id"]
    return mlflow.MlflowClient().get_run(run_id)


def test_the_student_logs_mask_rate_and_unlabeled_loss_per_epoch(consistency_run):
    cfg, paths, seen = consistency_run
    assert len(seen) == cfg.data.unlabeled  # every unlabeled image, not only the merged ones
    run = _run(paths, "student")
    client = mlflow.MlflowClient()
    for key in ("mask_rate", "loss_unlabeled", "loss_teacher", "loss_labeled"):
        history = client.get_metric_history(run.info.run_id, key)
        assert [m.step for m in history] == list(range(cfg.student.train.epochs)), key
        assert all(np.isfinite(m.value) for m in history), key
    assert all(
        0.0 <= m.value <= 1.0 for m in client.get_metric_history(run.info.run_id, "mask_rate")
    )
    curve = pd.read_csv(paths.history("student"))
    assert {"mask_rate", "loss_unlabeled", "val_accuracy"} <= set(curve.columns)


def test_the_student_keeps_complete_lineage_tags(consistency_run):
    _, paths, _ = consistency_run
    tags = _run(paths, "student").data.tags
    for key in (
        tracking.TEACHER_TAG,
        tracking.CSV_TAG,
        tracking.MERGED_TAG,
        tracking.LABELED_TAG,
        tracking.UNLABELED_TAG,
    ):
        assert tags.get(key), key
    assert tags[tracking.CSV_TAG] == tracking.md5(paths.csv)
    assert tags[tracking.UNLABELED_TAG] == tracking.dvc_hash(paths.unlabeled)


def test_the_saved_student_is_a_plain_classifier(consistency_run):
    from pseudolabel.models import io as model_io

    cfg, paths, _ = consistency_run
    model, meta = model_io.load(paths.model("student"))
    assert model.name == "student" and model.output_shape[-1] == len(meta.class_names)
    # No noise layers inside: the views are made in the training step.
    assert not [layer for layer in model.layers if "random" in layer.name.lower()]


def test_baseline_trains_the_student_network_on_labeled_images_alone(consistency_run):
    cfg, paths, _ = consistency_run
    base = json.loads((paths.metrics / "baseline.json").read_text())
    student = json.loads((paths.metrics / "student.json").read_text())
    assert base["params"] == student["params"]  # the same network
    assert base["steps"] == student["steps"]  # the same optimiser steps
    assert base["train_images"] == len(list((paths.train).rglob("*.png")))
    run = _run(paths, "baseline")
    assert run.info.run_name == "train_baseline"
    assert run.data.tags["baseline"] == "labeled_only"
    assert "mask_rate" not in run.data.metrics


def test_evaluate_reports_the_gain_over_the_best_labeled_only_model(consistency_run):
    _, paths, _ = consistency_run
    evaluation = json.loads((paths.metrics / "evaluation.json").read_text())
    best = max(evaluation["teacher_accuracy"], evaluation["baseline_accuracy"])
    assert evaluation["labeled_only_best"] == pytest.approx(best)
    gain = evaluation["student_accuracy"] - best
    assert evaluation["gain_over_labeled_only"] == pytest.approx(gain, abs=1e-6)
    assert evaluation["unlabeled_helped"] == (gain > 0)


def test_the_baseline_can_be_switched_off(tmp_path, digits_data, tracking_uri):
    cfg = compose(["+experiment=smoke", "student.baseline.enabled=false"])
    paths = Paths(tmp_path, data_root=digits_data.root)
    assert STAGES["train_baseline"](cfg, paths) == {"enabled": False}
    assert not paths.model("baseline").exists()
    assert paths.model("baseline").parent.is_dir()  # the DVC output exists either way
