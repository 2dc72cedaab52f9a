"""A training stage killed or preempted resumes at its last epoch (issue 33, item 1).

Real processes (`python -m pseudolabel.cli <stage>`, as `dvc repro` runs them), real signals and
a real MLflow store: the stage is SIGKILLed or SIGTERMed once its state says an epoch is done,
started again, and must end with the model an uninterrupted run of the same params gives, in
the same MLflow run, with its state folder gone."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pseudolabel.config import compose_raw, to_yaml
from pseudolabel.models import io as model_io
from pseudolabel.paths import Paths
from pseudolabel.resume import FOLDER, STATE

pytestmark = pytest.mark.slow

DETERMINISTIC = ["teacher.train.deterministic=true", "student.train.deterministic=true"]
TEACHER = ["+experiment=smoke", "teacher.train.epochs=8", "teacher.train.patience=8"]
STUDENT = ["+experiment=smoke", "student.train.epochs=4", "student.train.patience=4"]


def _project(root: Path, source: Paths, overrides: list[str], upto_merge: bool = False) -> Paths:
    """A project with the digits images (and, for a student, the pipeline's teacher, labels and
    merged set) and params.yaml composed from `overrides`."""
    paths = Paths(root)
    shutil.copytree(source.root / "data" / "image_dataset", root / "data" / "image_dataset")
    shutil.copytree(source.root / "data" / "unlabeled", root / "data" / "unlabeled")
    if upto_merge:
        shutil.copytree(source.merged, paths.merged)
        for name in ("teacher.keras", "teacher.json"):
            paths.models.mkdir(parents=True, exist_ok=True)
            shutil.copy(source.models / name, paths.models / name)
        paths.csv.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source.csv, paths.csv)
        paths.metrics.mkdir(parents=True, exist_ok=True)
        shutil.copy(source.metrics / "merge.json", paths.metrics / "merge.json")
    (root / "params.yaml").write_text(to_yaml(compose_raw([*overrides, *DETERMINISTIC])))
    return paths


def _start(paths: Paths, stage: str) -> tuple[subprocess.Popen, Path]:
    log = paths.root / f"{stage}.{time.monotonic_ns()}.log"
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{paths.root / 'mlflow.db'}"}
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pseudolabel.cli", stage],
            cwd=paths.root,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    return proc, log


def _run(paths: Paths, stage: str, expect: int = 0) -> str:
    proc, log = _start(paths, stage)
    proc.wait(timeout=900)
    assert proc.returncode == expect, log.read_text()[-3000:]
    return log.read_text()


def _state(paths: Paths, name: str) -> dict | None:
    path = paths.models / FOLDER / name / STATE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _interrupt(paths: Paths, stage: str, name: str, sig: int, epochs: int) -> tuple[int, str]:
    """Start `stage`, send `sig` once its state has `epochs` epochs done; its exit status and
    output."""
    proc, log = _start(paths, stage)
    try:
        deadline = time.monotonic() + 600
        while (_state(paths, name) or {}).get("epoch", 0) < epochs:
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "no epoch ended"
            time.sleep(0.05)
        proc.send_signal(sig)
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, log.read_text()


def _weights(path: Path) -> list[np.ndarray]:
    model, _ = model_io.load(path)
    return [np.asarray(w) for w in model.get_weights()]


def _runs(paths: Paths, stage: str) -> dict[str, tuple[str, dict]]:
    with sqlite3.connect(paths.root / "mlflow.db") as con:
        rows = con.execute("SELECT run_uuid, status FROM runs WHERE name = ?", (stage,)).fetchall()
        tags = con.execute("SELECT run_uuid, key, value FROM tags").fetchall()
    return {run: (status, {k: v for r, k, v in tags if r == run}) for run, status in rows}


def _same(a: list[np.ndarray], b: list[np.ndarray]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)


def test_teacher_killed_or_preempted_resumes_to_the_uninterrupted_model(tmp_path, digits_data):
    whole = _project(tmp_path / "whole", digits_data, TEACHER)
    _run(whole, "train_teacher")
    reference = _weights(whole.model("teacher"))
    assert not (whole.models / FOLDER).exists()  # removed once the model is saved

    # SIGKILL after 3 epochs: the state of epoch 3 stands, the run is left RUNNING.
    killed = _project(tmp_path / "killed", digits_data, TEACHER)
    status, _ = _interrupt(killed, "train_teacher", "teacher", signal.SIGKILL, 3)
    assert status == -signal.SIGKILL
    saved = _state(killed, "teacher")
    assert saved["epoch"] >= 3 and saved["run_id"]

    # Other params: the state is refused in one line (exit 2), nothing is mixed in.
    params = killed.root / "params.yaml"
    kept = params.read_text()
    params.write_text(
        to_yaml(compose_raw([*TEACHER, *DETERMINISTIC, "teacher.train.learning_rate=0.02"]))
    )
    refused = _run(killed, "train_teacher", expect=2)
    assert "interrupted training of other params, code or images" in refused
    assert _state(killed, "teacher")["epoch"] == saved["epoch"]
    params.write_text(kept)

    out = _run(killed, "train_teacher")
    assert f"epoch {saved['epoch']} done" in out
    _same(_weights(killed.model("teacher")), reference)
    assert not (killed.models / FOLDER).exists()
    history = pd.read_csv(killed.history("teacher"))
    assert history["epoch"].tolist() == list(range(8))  # each epoch once, none lost
    runs = _runs(killed, "train_teacher")
    assert list(runs) == [saved["run_id"]]  # the same MLflow run, continued and closed
    status, tags = runs[saved["run_id"]]
    assert status == "FINISHED" and tags.get("pseudolabel_resumed") == "true"
    assert "pseudolabel_failure" not in tags

    # SIGTERM (a preemption's notice): stops at a step boundary, exits 143, resumes.
    preempted = _project(tmp_path / "preempted", digits_data, TEACHER)
    status, out = _interrupt(preempted, "train_teacher", "teacher", signal.SIGTERM, 2)
    assert status == 143, out[-3000:]
    assert "stopped by SIGTERM" in out and "run the stage again to resume" in out
    _run(preempted, "train_teacher")
    _same(_weights(preempted.model("teacher")), reference)


def test_consistency_student_preempted_mid_epoch_resumes_to_the_same_model(tmp_path, pipeline):
    """The consistency student draws endless streams: its state (FlexMatch's memory, the
    alignment's running mean, the optimizer, the augmentations' seeds) is restored and the
    resume skips the streams by the batches the done epochs drew. A SIGTERM mid-epoch stops at
    the next step and the resume redoes that epoch from its start."""
    whole = _project(tmp_path / "whole", pipeline, STUDENT, upto_merge=True)
    _run(whole, "train_student")
    reference = _weights(whole.model("student"))

    preempted = _project(tmp_path / "preempted", pipeline, STUDENT, upto_merge=True)
    status, out = _interrupt(preempted, "train_student", "student", signal.SIGTERM, 1)
    assert status == 143, out[-3000:]
    saved = _state(preempted, "student")
    assert saved["epoch"] >= 1
    out = _run(preempted, "train_student")
    assert f"epoch {saved['epoch']} done" in out
    _same(_weights(preempted.model("student")), reference)
    history = pd.read_csv(preempted.history("student"))
    assert history["epoch"].tolist() == list(range(4))
    (run,) = _runs(preempted, "train_student")
    assert run == saved["run_id"]
