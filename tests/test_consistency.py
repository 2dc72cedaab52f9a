"""The consistency student (student.consistency) and the labeled-only baseline, on digits."""

import json
import re
import shutil
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest

from pseudolabel import tracking
from pseudolabel.config import compose
from pseudolabel.data import sources
from pseudolabel.models import io as model_io
from pseudolabel.paths import Paths
from pseudolabel.stages import STAGES

pytestmark = pytest.mark.slow  # trains real (tiny) models end to end


@pytest.fixture(scope="module")
def consistency_run(tmp_path_factory, pipeline, smoke_cfg):
    """The shared smoke pipeline (its student is the consistency student) copied, and its
    student trained again there with the unlabeled images' true classes known for half of them
    (as benchmarks give them): digits' unlabeled files are train_<index>.png of load_digits."""
    assert smoke_cfg.student.consistency.enabled
    root = tmp_path_factory.mktemp("consistency")
    top = lambda folder, names: ["data"] if Path(folder) == pipeline.root else []  # noqa: E731
    shutil.copytree(pipeline.root, root, dirs_exist_ok=True, ignore=top)  # not the images
    shutil.copytree(pipeline.merged, root / pipeline.merged.relative_to(pipeline.root))
    paths = Paths(root, data_root=pipeline.root)
    targets = sources.digits().train_labels
    names = [f"digit_{i}" for i in range(10)]
    seen: list[str] = []

    def truth(rel_paths):  # known for even indices only: the others are -1 in the stream
        seen.extend(rel_paths)
        indices = [int(re.search(r"train_(\d+)", rel).group(1)) for rel in rel_paths]
        return [names[targets[i]] if i % 2 == 0 else None for i in indices]

    STAGES["train_student"](smoke_cfg, paths, truth=truth)
    return smoke_cfg, paths, seen


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
    # The online pseudo-labels' precision against the known half (its formula: test_method);
    # the smoke student is near chance after its 18 steps, so only that it is measured.
    precision = [m.value for m in client.get_metric_history(run.info.run_id, "pseudo_precision")]
    assert len(precision) == cfg.student.train.epochs, precision
    assert all(0.0 < value <= 1.0 for value in precision), precision
    curve = pd.read_csv(paths.history("student"))
    assert {"mask_rate", "loss_unlabeled", "val_accuracy"} <= set(curve.columns)


def test_the_unlabeled_stream_carries_each_images_teacher_row_and_true_class(consistency_run):
    """What the student's stream is built from, row for row: the file, the teacher's
    probabilities from the CSV, merge's decision and the true class where known (else -1)."""
    from pseudolabel import merged_set, predicting
    from pseudolabel.stages.train import _unlabeled_targets

    _, paths, _ = consistency_run
    names = [f"digit_{i}" for i in range(10)]
    targets = sources.digits().train_labels
    files, probs, accepted, labels = _unlabeled_targets(
        paths, names, lambda rel: [names[targets[int(r[6:11])]] for r in rel]
    )
    frame = predicting.read_csv(paths.csv)
    assert [Path(f).name for f in files] == [Path(p).name for p in frame["path"]]
    np.testing.assert_array_equal(labels, [targets[int(Path(f).stem[6:])] for f in files])
    np.testing.assert_array_equal(probs.argmax(1), predicting.probabilities(frame, names).argmax(1))
    pseudo = merged_set.read_manifest(paths.merged).query("source == 'pseudo'")
    assert accepted.sum() == len(pseudo) > 0


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
    # images through the network, for accuracy per second: the baseline its labeled batches;
    # the student also the unlabeled images' strong views, and their weak views forward only
    batch, ratio = cfg.student.train.batch_size, cfg.student.consistency.ratio
    assert base["images_trained"] == base["steps"] * batch and base["images_forward_only"] == 0
    assert student["images_trained"] == student["steps"] * batch * (1 + ratio)
    assert student["images_forward_only"] == student["steps"] * batch * ratio > 0
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


def test_the_student_trains_in_a_mirrored_strategy_scope(consistency_run, pipeline, tmp_path):
    """student.train.strategy=mirrored: the consistency student built, fitted and saved inside
    a tf.distribute.MirroredStrategy scope (one replica on a CPU; every local GPU on a GPU
    machine), the same steps as without it; with Mean Teacher's targets (target_ema), whose
    weight average lives in the strategy's variables and is not saved with the classifier."""
    cfg, paths, _ = consistency_run
    top = lambda folder, names: ["data"] if Path(folder) == paths.root else []  # noqa: E731
    shutil.copytree(paths.root, tmp_path, dirs_exist_ok=True, ignore=top)
    shutil.copytree(paths.merged, tmp_path / paths.merged.relative_to(paths.root))
    mirrored = Paths(tmp_path, data_root=pipeline.root)
    overrides = ["student.train.strategy=mirrored", "student.consistency.target_ema=0.9"]
    strategy_cfg = compose(["+experiment=smoke", *overrides])
    metrics = STAGES["train_student"](strategy_cfg, mirrored)
    alone = json.loads((paths.metrics / "student.json").read_text())
    assert metrics["steps"] == alone["steps"] and metrics["params"] == alone["params"]
    assert len(pd.read_csv(mirrored.history("student"))) == cfg.student.train.epochs
    assert _run(mirrored, "student").data.params["student.train.strategy"] == "mirrored"


def test_the_baseline_can_be_switched_off(tmp_path, digits_data, tracking_uri):
    cfg = compose(["+experiment=smoke", "student.baseline.enabled=false"])
    paths = Paths(tmp_path, data_root=digits_data.root)
    assert STAGES["train_baseline"](cfg, paths) == {"enabled": False}
    assert not paths.model("baseline").exists()
    assert paths.model("baseline").parent.is_dir()  # the DVC output exists either way


def test_the_student_aligns_to_the_mix_its_config_names(consistency_run, pipeline, tmp_path):
    """alignment_target: the default aims at the labeled mix; pool at the teacher's estimate of
    the folder's (round 1's class_mix); auto at that estimate only where the labeling found the
    folder skewed: the smoke teacher cannot tell (its class_mix is not `skewed`), so labeled.
    metrics/student.json says which."""
    cfg, paths, _ = consistency_run
    assert json.loads((paths.metrics / "student.json").read_text())["alignment"] == "labeled"
    mix = json.loads((paths.metrics / "pseudo_label.json").read_text())["class_mix"]
    assert mix["skewed"] is False
    top = lambda folder, names: ["data"] if Path(folder) == paths.root else []  # noqa: E731
    shutil.copytree(paths.root, tmp_path, dirs_exist_ok=True, ignore=top)
    shutil.copytree(paths.merged, tmp_path / paths.merged.relative_to(paths.root))
    copy = Paths(tmp_path, data_root=pipeline.root)
    for target, aimed in (("pool", "pool"), ("auto", "labeled")):
        override = f"student.consistency.alignment_target={target}"
        metrics = STAGES["train_student"](compose(["+experiment=smoke", override]), copy)
        assert metrics["alignment"] == aimed


def test_the_student_warms_up_on_unlabeled_rotations(consistency_run, pipeline, tmp_path):
    """consistency.warmup_steps: the student first learns to tell the unlabeled images' quarter
    turns (RotNet's pretext, beside the labeled loss) for that many steps, then trains as
    before. The warm-up is logged (warmup_* in MLflow) and counted (warmup_steps, the images it
    trained on); the rotation head is dropped (the saved student is the plain classifier);
    the training after it keeps its epochs and steps."""
    cfg, paths, _ = consistency_run
    top = lambda folder, names: ["data"] if Path(folder) == paths.root else []  # noqa: E731
    shutil.copytree(paths.root, tmp_path, dirs_exist_ok=True, ignore=top)
    shutil.copytree(paths.merged, tmp_path / paths.merged.relative_to(paths.root))
    warmed = Paths(tmp_path, data_root=pipeline.root)
    steps = 30
    overrides = [f"student.consistency.warmup_steps={steps}"]
    metrics = STAGES["train_student"](compose(["+experiment=smoke", *overrides]), warmed)
    alone = json.loads((paths.metrics / "student.json").read_text())
    assert alone["warmup_steps"] == 0 and metrics["warmup_steps"] == steps
    assert metrics["steps"] == alone["steps"] and metrics["params"] == alone["params"]
    per_step = alone["images_trained"] / alone["steps"]
    assert metrics["images_trained"] == (alone["steps"] + steps) * per_step
    assert len(pd.read_csv(warmed.history("student"))) == cfg.student.train.epochs
    logged = _run(warmed, "student").data.metrics
    assert logged["warmup_rotation_accuracy"] > 0.4  # it learnt the turns (chance: 0.25)
    assert 0.0 < logged["warmup_loss_rotation"] < logged["warmup_loss"]
    student, _ = model_io.load(warmed.model("student"))
    assert "rotation" not in [layer.name for layer in student.layers]
