"""A training stage killed or preempted resumes at its last epoch (issue 33, item 1).

Real processes (`python -m pseudolabel.cli <stage>`, as `dvc repro` runs them), real signals and
a real MLflow store: the stage is SIGKILLed or SIGTERMed once its state says an epoch is done,
started again, and must end with the model an uninterrupted run of the same params gives, in
the same MLflow run, with its state folder gone."""

from __future__ import annotations

import contextlib
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
        for name in ("merge.json", "pseudo_label.json"):  # what the student reads
            shutil.copy(source.metrics / name, paths.metrics / name)
    (root / "params.yaml").write_text(to_yaml(compose_raw([*overrides, *DETERMINISTIC])))
    return paths


def _start(paths: Paths, stage: str, uri: str | None = None) -> tuple[subprocess.Popen, Path]:
    """`pseudolabel <stage>` in the project, tracking to `uri` (default: its own mlflow.db)."""
    log = paths.root / f"{stage}.{time.monotonic_ns()}.log"
    uri = uri or f"sqlite:///{paths.root / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
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


@contextlib.contextmanager
def _stage(paths: Paths, stage: str, uri: str | None = None):
    """`_start`'s process and log; killed on the way out if it is still running."""
    proc, log = _start(paths, stage, uri)
    try:
        yield proc, log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _wait_epoch(paths: Paths, name: str, proc, log: Path, epochs: int) -> None:
    """Until the training state of `name` has `epochs` epochs done (the stage still running)."""
    deadline = time.monotonic() + 600
    while (_state(paths, name) or {}).get("epoch", 0) < epochs:
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, "no epoch ended"
        time.sleep(0.05)


def _interrupt(paths: Paths, stage: str, name: str, sig: int, epochs: int) -> tuple[int, str]:
    """Start `stage`, send `sig` once its state has `epochs` epochs done; its exit status and
    output."""
    with _stage(paths, stage) as (proc, log):
        _wait_epoch(paths, name, proc, log, epochs)
        proc.send_signal(sig)
        proc.wait(timeout=300)
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
    alignment's running mean, the weight average its targets come from (target_ema, on here:
    without it the state is the same less the average), the optimizer, the augmentations'
    seeds) is restored and the resume skips the streams by the batches the done epochs drew.
    A SIGTERM mid-epoch stops at the next step and the resume redoes that epoch from its
    start. The rotation warm-up (warmup_steps, on here) ran before the first epoch: the resume
    skips it, its streams being the warm-up's own."""
    student = [
        *STUDENT,
        "student.consistency.target_ema=0.9",
        "student.consistency.warmup_steps=20",
    ]
    whole = _project(tmp_path / "whole", pipeline, student, upto_merge=True)
    _run(whole, "train_student")
    reference = _weights(whole.model("student"))

    preempted = _project(tmp_path / "preempted", pipeline, student, upto_merge=True)
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


# --- A tracking server that goes away mid-training (issue 33, item 2) --------------------------


class _Server:
    """A real `mlflow server` (SQLite backend, artifacts proxied) that can be stopped and started
    again on the same port and store."""

    def __init__(self, base: Path):
        from tests.conftest import free_port

        self.base, self.port = base, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        from tests.conftest import wait_until_answers

        bin_dir = Path(sys.executable).parent
        log = self.base / f"server.{time.monotonic_ns()}.log"
        self.proc = subprocess.Popen(
            [str(bin_dir / "mlflow"), "server", "--backend-store-uri",
             f"sqlite:///{self.base / 'mlflow.db'}", "--artifacts-destination",
             str(self.base / "artifacts"), "--host", "127.0.0.1", "--port", str(self.port),
             "--workers", "1"],
            env={**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"},
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        wait_until_answers(f"{self.url}/health", self.proc, lambda: log.read_text(), 240)

    def stop(self) -> None:
        from tests.test_team import _stop

        if self.proc is not None:
            _stop(self.proc)
            self.proc = None


@pytest.fixture
def server(tmp_path):
    served = _Server(tmp_path / "server")
    served.base.mkdir()
    served.start()
    try:
        yield served
    finally:
        served.stop()


def _server_run(url: str, run_id: str):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=url)
    run = client.get_run(run_id)
    epochs = [m.step for m in client.get_metric_history(run_id, "val_accuracy")]
    return run.info.status, sorted(epochs), run.data.metrics


LONG_TEACHER = ["+experiment=smoke", "teacher.train.epochs=30", "teacher.train.patience=30"]


def test_a_server_away_mid_training_gets_every_epoch_when_back(tmp_path, digits_data, server):
    """Stopped after 2 epochs, started again: the training goes on, the epochs' metrics are kept
    and sent once it answers, and the run ends FINISHED with all of them."""
    paths = _project(tmp_path / "p", digits_data, LONG_TEACHER)
    with _stage(paths, "train_teacher", server.url) as (proc, log):
        _wait_epoch(paths, "teacher", proc, log, 2)
        server.stop()
        _wait_epoch(paths, "teacher", proc, log, 4)  # it trains on without the server
        server.start()
        proc.wait(timeout=900)
    out = log.read_text()
    assert proc.returncode == 0, out[-3000:]
    assert "training goes on, the metrics of epoch" in out
    assert "the tracking server answers again" in out
    run_id = model_io.read_meta(paths.model("teacher")).run_id
    status, epochs, metrics = _server_run(server.url, run_id)
    assert status == "FINISHED"
    assert epochs == list(range(30))  # every epoch, those of the outage included
    assert "best_val_accuracy" in metrics
    assert not (paths.models / FOLDER).exists()


def test_a_server_away_past_the_wait_fails_at_the_end_and_the_rerun_only_logs(
    tmp_path, digits_data, server
):
    overrides = [*LONG_TEACHER, "tracking.outage_wait=2"]
    paths = _project(tmp_path / "p", digits_data, overrides)
    with _stage(paths, "train_teacher", server.url) as (proc, log):
        _wait_epoch(paths, "teacher", proc, log, 2)
        server.stop()
        proc.wait(timeout=900)
    out = log.read_text()
    assert proc.returncode == 2, out[-3000:]
    lines = [line for line in out.splitlines() if "did not answer for 2 s" in line]
    assert len(lines) == 1 and "run the stage again once the server answers" in lines[0]
    assert paths.model("teacher").is_file()  # the model and its metrics, saved locally
    assert json.loads((paths.metrics / "teacher.json").read_text())["epochs"] == 30
    saved = _state(paths, "teacher")
    assert saved["epoch"] == 30 and saved["pending"]  # the unsent epochs, kept

    server.start()
    proc, log = _start(paths, "train_teacher", server.url)
    proc.wait(timeout=900)
    out = log.read_text()
    assert proc.returncode == 0, out[-3000:]
    assert "Epoch 1/" not in out  # nothing trained again: it only logs
    status, epochs, _ = _server_run(server.url, saved["run_id"])
    assert status == "FINISHED" and epochs == list(range(30))
    assert not (paths.models / FOLDER).exists()


def test_a_stage_started_while_the_server_restarts_waits_for_it(tmp_path, digits_data):
    """A queued experiment's stage that starts while the server is down waits for it
    (tracking.start_wait) instead of failing, says so, and logs to it once it answers."""
    served = _Server(tmp_path / "server")
    served.base.mkdir()
    paths = _project(tmp_path / "p", digits_data, ["+experiment=smoke", "tracking.start_wait=300"])
    try:
        with _stage(paths, "train_teacher", served.url) as (proc, log):
            deadline = time.monotonic() + 300
            while "waiting up to 300 s" not in log.read_text():
                assert proc.poll() is None, log.read_text()[-3000:]
                assert time.monotonic() < deadline, "no waiting said"
                time.sleep(0.2)
            served.start()
            proc.wait(timeout=900)
        out = log.read_text()
        assert proc.returncode == 0, out[-3000:]
        run_id = model_io.read_meta(paths.model("teacher")).run_id
        assert _server_run(served.url, run_id)[0] == "FINISHED"
    finally:
        served.stop()
