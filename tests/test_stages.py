"""The six stages on digits, run in order by the `pipeline` fixture; then their outputs."""

import json
import shutil

import keras
import mlflow
import numpy as np
import pandas as pd
import pytest

from pseudolabel import tracking
from pseudolabel.data.images import class_names_from, list_images
from pseudolabel.errors import PseudoLabelError
from pseudolabel.models import io as model_io
from pseudolabel.paths import Paths
from pseudolabel.stages import STAGES, pseudo_label, train_teacher
from pseudolabel.stages.merge import merge
from pseudolabel.tracking import md5


def _json(path):
    return json.loads(path.read_text())


def test_every_stage_writes_its_outputs(pipeline, smoke_cfg):
    for rel in (
        "models/teacher.keras",
        "models/teacher.json",
        "models/student.keras",
        "models/student.json",
        "outputs/data.csv",
        "outputs/errors.csv",
        "outputs/plots/confidence.png",
        "outputs/plots/confidence_per_class.png",
        "outputs/selection/confidence.png",
        "plots/train/teacher.csv",
        "plots/train/student.csv",
        "plots/evaluate/teacher_confusion.csv",
        "plots/evaluate/student_confusion.csv",
    ):
        assert (pipeline.root / rel).is_file(), rel
    for name in ("ingest", "teacher", "pseudo_label", "merge", "student", "evaluation"):
        assert (pipeline.metrics / f"{name}.json").is_file(), name


def test_csv_has_one_row_per_unlabeled_image_with_class_names(pipeline, smoke_cfg):
    frame = pd.read_csv(pipeline.csv)
    assert len(frame) == smoke_cfg.data.unlabeled
    assert set(frame["label"]) <= set(class_names_from(pipeline.train))
    assert frame["path"].tolist() == sorted(frame["path"])
    probs = frame.filter(like="prob_").to_numpy()
    assert probs.shape[1] == 10 and np.allclose(probs.sum(axis=1), 1.0, atol=1e-4)
    assert np.allclose(probs.max(axis=1), frame["confidence"], atol=1e-6)


def test_merge_counts_match_the_threshold(pipeline, smoke_cfg):
    frame = pd.read_csv(pipeline.csv)
    merged = _json(pipeline.metrics / "merge.json")
    kept = int((frame["confidence"] >= smoke_cfg.pseudo_label.threshold).sum())
    assert merged["pseudo_labeled"] == kept
    assert len(list_images(pipeline.merged)) == kept + merged["labeled"]


def test_smoke_teacher_learns_and_merge_copies_pseudo_labels(pipeline):
    """The smoke configuration trains a teacher well above chance (0.1) and its merge copies
    pseudo-labels, so the end-to-end tests exercise them (issue 16, finding 9)."""
    assert _json(pipeline.metrics / "teacher.json")["val_accuracy"] > 0.3
    assert _json(pipeline.metrics / "evaluation.json")["teacher_accuracy"] > 0.3
    assert _json(pipeline.metrics / "merge.json")["pseudo_labeled"] >= 1
    copies = [p for p in list_images(pipeline.merged) if p.name.startswith("u__")]
    assert copies, "no pseudo-labeled image was copied into the merged set"


def test_models_carry_metadata_and_the_student_is_larger(pipeline, smoke_cfg):
    sizes = {}
    for role in ("teacher", "student"):
        model, meta = model_io.load(pipeline.model(role))
        assert meta.class_names == class_names_from(pipeline.train)
        assert meta.image_size == list(smoke_cfg.data.image_size) and meta.run_id
        assert meta.input_scale == "0-255"
        sizes[role] = model.count_params()
    assert sizes["student"] > sizes["teacher"]


def _test_accuracy(model_path, test_dir):
    """A saved model's accuracy on the test folder, recomputed here without the pipeline's
    data code: PIL decodes each PNG, the model predicts, the folder names the class."""
    from PIL import Image

    model, meta = model_io.load(model_path)
    files = sorted(test_dir.rglob("*.png"))
    images = np.stack([np.asarray(Image.open(f), np.float32) for f in files])[..., None]
    predicted = np.asarray(model.predict(images, verbose=0)).argmax(1)
    truth = [meta.class_names.index(f.parent.name) for f in files]
    return float((predicted == np.asarray(truth)).mean())


def test_evaluation_metrics(pipeline):
    evaluation = _json(pipeline.metrics / "evaluation.json")
    for role in ("teacher", "baseline", "student"):  # the saved models, not stale numbers
        recomputed = _test_accuracy(pipeline.model(role), pipeline.test)
        assert evaluation[f"{role}_accuracy"] == pytest.approx(recomputed, abs=1e-6), role
    gain = evaluation["student_accuracy"] - evaluation["teacher_accuracy"]
    assert evaluation["gain"] == pytest.approx(gain, abs=1e-6)
    confusion = pd.read_csv(pipeline.plots / "evaluate" / "student_confusion.csv")
    assert list(confusion.columns) == ["actual", "predicted"]
    assert len(confusion) == evaluation["test_images"]


def test_mlflow_has_four_linked_runs(pipeline, smoke_cfg, tracking_uri):
    """This pipeline's runs (other tests log to the same store), found from the models' metadata."""
    mlflow.set_tracking_uri(tracking_uri)
    client = mlflow.MlflowClient()
    teacher = client.get_run(model_io.read_meta(pipeline.model("teacher")).run_id)
    student = client.get_run(model_io.read_meta(pipeline.model("student")).run_id)
    runs = mlflow.search_runs(
        experiment_names=[smoke_cfg.tracking.experiment], output_format="list"
    )
    csv_md5 = md5(pipeline.csv)
    labeling = next(
        r for r in runs
        if r.data.tags.get("stage") == "pseudo_label"
        and r.data.tags.get("pseudo_label_csv_md5") == csv_md5
    )  # fmt: skip
    evaluation = next(
        r for r in runs
        if r.data.tags.get("stage") == "evaluate"
        and r.data.tags.get("student_run_id") == student.info.run_id
    )  # fmt: skip
    assert teacher.data.tags["stage"] == "train_teacher"
    assert student.data.tags["stage"] == "train_student"
    csv_md5 = md5(pipeline.csv)
    assert student.data.tags["pseudo_label_csv_md5"] == csv_md5
    assert labeling.data.tags["pseudo_label_csv_md5"] == csv_md5
    assert student.data.tags["teacher_run_id"] == teacher.info.run_id
    assert float(student.data.tags["threshold"]) == smoke_cfg.pseudo_label.threshold
    assert evaluation.data.tags["student_run_id"] == student.info.run_id
    # Same metric names on teacher and student, one value per epoch.
    for run in (teacher, student):
        assert {"accuracy", "val_accuracy", "test_accuracy"} <= set(run.data.metrics)
        history = client.get_metric_history(run.info.run_id, "val_accuracy")
        assert len(history) == len(
            pd.read_csv(pipeline.plots / "train" / f"{run.data.tags['role']}.csv")
        )
    artifacts = {a.path for a in client.list_artifacts(labeling.info.run_id)}
    assert "data.csv" in artifacts and "plots" in artifacts


def test_threshold_out_of_range_is_one_line_and_nothing_is_written(tmp_path):
    """`pseudolabel compose pseudo_label.threshold=1.5` (what every params.yaml writer, dvc exp
    run -S included, composes) stops with one line, exit 2, before params.yaml or
    conf/project.yaml changes, so no stage runs on it."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    shutil.copytree(repo / "conf", tmp_path / "conf")
    shutil.copy2(repo / "dvc.yaml", tmp_path / "dvc.yaml")
    cli = [sys.executable, "-m", "pseudolabel.cli", "compose"]
    subprocess.run([*cli, "+experiment=smoke"], cwd=tmp_path, check=True, capture_output=True)
    before = {
        p.name: p.read_bytes() for p in (tmp_path / "params.yaml", tmp_path / "conf/project.yaml")
    }
    done = subprocess.run(
        [*cli, "pseudo_label.threshold=1.5"], cwd=tmp_path, capture_output=True, text=True
    )
    assert done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "pseudo_label.threshold" in errors[0], done.stderr
    after = {
        p.name: p.read_bytes() for p in (tmp_path / "params.yaml", tmp_path / "conf/project.yaml")
    }
    assert after == before


def test_missing_inputs_stop_with_the_path(tmp_path, smoke_cfg, pipeline):
    empty = Paths(tmp_path)
    with pytest.raises(PseudoLabelError, match="image_dataset/train"):
        train_teacher(smoke_cfg, empty)
    with pytest.raises(PseudoLabelError, match="unlabeled"):
        pseudo_label(smoke_cfg, empty)
    with pytest.raises(PseudoLabelError, match="teacher"):
        merge(smoke_cfg, empty)
    assert not any(tmp_path.iterdir())  # nothing written


def test_teacher_with_wrong_output_size_is_refused(tmp_path, pipeline, smoke_cfg):
    inputs = keras.Input((8, 8, 1))
    wrong = keras.Model(
        inputs, keras.layers.Dense(3, activation="softmax")(keras.layers.Flatten()(inputs))
    )
    model_io.save(
        wrong,
        tmp_path / "models" / "teacher.keras",
        model_io.ModelMeta(["a", "b", "c", "d"], [8, 8], 1),
    )
    paths = Paths(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "unlabeled").symlink_to(pipeline.unlabeled)
    with pytest.raises(PseudoLabelError, match="predicts 3 classes"):
        pseudo_label(smoke_cfg, paths)
    assert not paths.csv.exists()


def test_stage_registry_matches_dvc_yaml():
    import yaml

    from tests.conftest import REPO

    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())
    stages = dict(dvc["stages"])
    # Rounds 2..N: one foreach stage calling `pseudolabel round <r>`, before evaluate.
    assert stages.pop("round")["do"]["cmd"] == "pseudolabel round ${item.round}"
    assert list(dvc["stages"]).index("round") == list(dvc["stages"]).index("evaluate") - 1
    assert list(stages) == list(STAGES)
    for name, stage in stages.items():
        assert stage["cmd"] == f"pseudolabel {name}"


def test_lineage_survives_a_teacher_run_missing_from_the_store(tracking_uri):
    """A teacher trained against another tracking store: the note and the chain say so."""
    mlflow.set_tracking_uri(tracking_uri)
    tags = {
        tracking.TEACHER_TAG: "0" * 32,
        tracking.CSV_TAG: "c" * 32,
        tracking.MERGED_TAG: "m",
        tracking.LABELED_TAG: "l",
        tracking.UNLABELED_TAG: "u",
    }
    assert "- teacher: unknown" in tracking._lineage_note(tags, None)
    mlflow.set_experiment("lineage-test")
    with mlflow.start_run() as run:
        mlflow.set_tags({**tags, "stage": "train_student"})
    chain = dict(tracking.lineage(run.info.run_id))
    assert chain["teacher run"].startswith("0" * 32) and "not in" in chain["teacher run"]


def test_a_folder_dvc_has_hashed_is_not_read_again_for_the_lineage_tag(tmp_path, monkeypatch):
    """dvc_hash gives what `dvc add` records; inside the project it takes the files' md5s from
    DVC's state instead of reading them again, outside any project (or when the state fails)
    it reads every file."""
    import contextlib
    import sqlite3

    import dvc_data.hashfile.build as build
    import yaml
    from dvc.repo import Repo
    from dvc_data.hashfile.state import StateNoop

    project = tmp_path / "project"
    folder = project / "images"
    (folder / "a").mkdir(parents=True)
    for i in range(5):
        (folder / "a" / f"{i}.png").write_bytes(bytes([i]) * (100 + i))
    outside = shutil.copytree(folder, tmp_path / "elsewhere")
    read: list[str] = []
    hash_files = build._hash_files

    def counting(small_files, large_files, *args, **kwargs):
        read.extend(path for path, _ in [*small_files, *large_files])
        return hash_files(small_files, large_files, *args, **kwargs)

    monkeypatch.setattr(build, "_hash_files", counting)
    with Repo.init(project, no_scm=True) as repo:
        repo.add(str(folder))
    recorded = yaml.safe_load((project / "images.dvc").read_text())["outs"][0]["md5"]
    read.clear()
    assert tracking.dvc_hash(folder) == recorded and read == []
    assert tracking.dvc_hash(outside) == recorded and len(read) == 5

    class Locked(StateNoop):  # a state that fails (its database locked by another process)
        def get_many(self, *args, **kwargs):
            raise sqlite3.OperationalError("database is locked")

    monkeypatch.setattr(tracking, "_dvc_state", lambda _: contextlib.nullcontext(Locked()))
    read.clear()
    assert tracking.dvc_hash(folder) == recorded and len(read) == 5  # read instead


def test_publish_metrics_writes_the_json_and_logs_the_same_numbers(tmp_path, tracking_uri):
    """The one helper every stage publishes with: the metrics file holds the metrics as given
    (nested, in order), the active MLflow run the same numbers, nested keys dotted, a boolean as
    0/1, text and None left out, `exclude` left out; with nothing to log, no run is needed."""
    from pseudolabel.stages.common import publish_metrics

    metrics = {
        "student_accuracy": 0.75,
        "unlabeled_helped": True,
        "round_accuracy": {"round1": 0.5, "round2": 0.75},
        "selection": "threshold",
        "recommended_threshold": None,
        "per_class": {"a": {"pseudo": 3}},
        "rounds": 2,
    }
    path = tmp_path / "metrics" / "stage.json"
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_experiment("publish-metrics-test")
    with mlflow.start_run() as run:
        logged = publish_metrics(path, metrics, exclude=("per_class",))
    assert path.read_text() == json.dumps(metrics, indent=2) + "\n"
    expected = {
        "student_accuracy": 0.75,
        "unlabeled_helped": 1.0,
        "round_accuracy.round1": 0.5,
        "round_accuracy.round2": 0.75,
        "rounds": 2.0,
    }
    assert logged == expected
    assert mlflow.MlflowClient().get_run(run.info.run_id).data.metrics == expected
    # Other names in MLflow than in the file (`logged`), or the file alone (logged={}).
    with mlflow.start_run() as run:
        publish_metrics(path, metrics, {"best": {"accuracy": metrics["student_accuracy"]}})
    assert mlflow.MlflowClient().get_run(run.info.run_id).data.metrics == {"best.accuracy": 0.75}
    assert publish_metrics(tmp_path / "off.json", {"enabled": False}, logged={}) == {}
    assert _json(tmp_path / "off.json") == {"enabled": False}
    # Numbers to log but no run to log them to: an error, not a stray run (nor a file).
    with pytest.raises(RuntimeError, match="no active MLflow run"):
        publish_metrics(tmp_path / "stray.json", {"enabled": False})
    assert not (tmp_path / "stray.json").exists() and mlflow.active_run() is None


def test_student_from_the_teacher_with_a_labeled_fine_tune(pipeline, tmp_path, caplog):
    """student.init_from_teacher and labeled_finetune_epochs: the history gains the fine-tune
    epochs, numbered on, and the log says how many layers came from the teacher."""
    import logging
    import shutil

    from pseudolabel.config import compose
    from pseudolabel.stages import train_student

    root = tmp_path / "project"
    shutil.copytree(pipeline.root, root)
    cfg = compose(
        [
            "+experiment=smoke",
            "student.init_from_teacher=true",
            "student.labeled_finetune_epochs=1",
        ]
    )
    paths = Paths(root)
    with caplog.at_level(logging.INFO, logger="pseudolabel"):
        metrics = train_student(cfg, paths)
    history = pd.read_csv(paths.plots / "train" / "student.csv")
    assert list(history["epoch"]) == list(range(cfg.student.train.epochs + 1))
    assert metrics["epochs"] == cfg.student.train.epochs + 1
    assert "4 leading layers initialised from the teacher" in caplog.text


def test_soft_label_student_trains_on_a_plain_labeled_folder(pipeline, tmp_path, tracking_uri):
    """Soft targets come from the merge manifest; a folder without one (the supervised-only
    baseline's) trains on its one-hot labels instead of failing."""
    from pseudolabel.config import compose
    from pseudolabel.stages.train import _train

    offline = "student.consistency.enabled=false"  # the merged-folder student
    cfg = compose(["+experiment=smoke", "student.soft_labels=true", offline])
    paths = Paths(tmp_path, data_root=pipeline.root, teacher_model=pipeline.model("teacher"))
    metrics = _train(cfg, "student", paths, paths.train, {"baseline": "supervised_only"})
    assert metrics["train_images"] == len(list_images(paths.train))
    batch = cfg.student.train.batch_size  # a supervised fit: its batches, nothing forward only
    assert metrics["images_trained"] == metrics["steps"] * batch
    assert metrics["images_forward_only"] == 0


def test_steps_per_epoch_repeats_a_small_training_set(pipeline, tmp_path, tracking_uri):
    """train.steps_per_epoch: epochs of that many optimiser steps over a folder smaller than
    one such epoch (the data repeats), val scored and MLflow logged once per epoch."""
    from pseudolabel.config import compose
    from pseudolabel.predicting import batches
    from pseudolabel.stages.train import _train

    cfg = compose(
        [
            "+experiment=smoke",
            "student.consistency.enabled=false",  # the merged-folder student
            "student.train.epochs=2",
            "student.train.steps_per_epoch=7",
        ]
    )
    paths = Paths(tmp_path, data_root=pipeline.root, teacher_model=pipeline.model("teacher"))
    assert batches(len(list_images(paths.train)), cfg.student.train.batch_size) < 7
    metrics = _train(cfg, "student", paths, paths.train, {"baseline": "supervised_only"})
    assert metrics["epochs"] == 2
    assert len(pd.read_csv(paths.plots / "train" / "student.csv")) == 2
    model = keras.models.load_model(paths.model("student"))
    assert int(model.optimizer.iterations.numpy()) == 2 * 7
    run = mlflow.search_runs(experiment_names=[cfg.tracking.experiment]).iloc[0]
    history = mlflow.MlflowClient().get_metric_history(run.run_id, "val_accuracy")
    assert len(history) == 2


def test_git_commit_names_the_checked_out_commit_and_none_outside_git(tmp_path):
    """What `mlflow.source.git.commit` and the benchmark rows record (a real git repository)."""
    import subprocess

    assert tracking.git_commit(tmp_path) is None
    run = {"cwd": tmp_path, "check": True, "capture_output": True}
    subprocess.run(["git", "init", "-q"], **run)
    (tmp_path / "f").write_text("x")
    subprocess.run(["git", "add", "f"], **run)
    who = ["-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", *who, "commit", "-qm", "m"], **run)
    head = subprocess.run(["git", "rev-parse", "HEAD"], **run, text=True).stdout.strip()
    assert tracking.git_commit(tmp_path) == head and len(head) == 40
