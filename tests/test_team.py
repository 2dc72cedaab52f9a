"""Team mode, end to end: the pipeline against `mlflow server` on PostgreSQL (what `make server`
runs), found again through MlflowClient with its registered version and alias; an existing
mlflow.db's runs copied onto that server (docs/team.md's migration)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from mlflow import MlflowClient

from pseudolabel import registry, tracking
from pseudolabel.data.images import class_names_from, list_images
from pseudolabel.models import io as model_io
from pseudolabel.paths import Paths
from tests.conftest import REPO, free_port, wait_until_answers

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
POSTGRES = REPO / "scripts" / "postgres.sh"


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the server's process group, SIGKILL after 5 s (uvicorn drains slowly)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


@pytest.fixture(scope="module")
def server():
    """PostgreSQL (scripts/postgres.sh: installed by `make test` when root) and `mlflow server`
    on free ports, in a temporary folder the postgres user can reach."""
    installed = any(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if not installed and os.geteuid() != 0:
        pytest.skip("PostgreSQL is not installed and this is not root: apt-get install postgresql")
    base = Path(tempfile.mkdtemp(prefix="pseudolabel-team-"))
    base.chmod(0o755)
    pg_dir = base / "postgres"
    backend = subprocess.run(
        [str(POSTGRES), "start", str(pg_dir), str(free_port())],
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    ).stdout.strip()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = base / "server.log"
    proc = subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--backend-store-uri", backend]
        + ["--artifacts-destination", str(base / "artifacts"), "--host", "127.0.0.1"]
        + ["--port", str(port), "--workers", "1"],
        env={**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"},
        stdout=log.open("wb"),  # a file, not a pipe nobody reads: the server logs every request
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        wait_until_answers(url + "/health", proc, lambda: log.read_text(errors="replace"), 180)
        yield url
    finally:
        try:
            _stop(proc)
        finally:  # PostgreSQL stopped and its folder removed whatever happened to the server
            subprocess.run([str(POSTGRES), "stop", str(pg_dir)], check=False, timeout=120)
            shutil.rmtree(base, ignore_errors=True)


def test_the_pipeline_logs_and_registers_on_the_tracking_server(
    server, smoke_cfg, tmp_path, monkeypatch
):
    from pseudolabel.stages import STAGES

    monkeypatch.setenv("MLFLOW_TRACKING_URI", server)
    paths = Paths(tmp_path)
    for stage in STAGES.values():
        stage(smoke_cfg, paths)
    client = mlflow.MlflowClient(server)
    experiment = client.get_experiment_by_name(smoke_cfg.tracking.experiment)
    runs = client.search_runs([experiment.experiment_id])
    assert {"train_teacher", "pseudo_label", "train_student", "evaluate"} <= {
        r.data.tags["stage"] for r in runs
    }
    name = smoke_cfg.tracking.registered_model
    champion = client.get_model_version_by_alias(name, registry.CHAMPION)
    student_run = model_io.read_meta(paths.model("student")).run_id
    assert champion.run_id == student_run
    assert champion.tags["promotion"] == registry.CHAMPION
    # The model's files come back through the server (artifacts proxied, not a shared disk).
    mlflow.set_tracking_uri(server)
    model = mlflow.pyfunc.load_model(f"models:/{name}@{registry.CHAMPION}")
    image = list_images(paths.test)[0].read_bytes()
    predicted = model.predict(pd.DataFrame({"image": [image]}))["class"][0]
    assert predicted in class_names_from(paths.train)


def _tool(name: str, tracking_uri: str, *args) -> None:
    """One of mlflow-export-import's commands against `tracking_uri`."""
    result = subprocess.run(
        [str(BIN / name), *map(str, args)],
        env={**os.environ, "MLFLOW_TRACKING_URI": tracking_uri},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, f"{name}:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"


def test_export_import_copies_an_sqlite_history_to_the_server(server, tracking_uri, tmp_path):
    """docs/team.md's migration: mlflow-export-import copies an experiment's runs from an
    mlflow.db (the session's: a new one costs seconds of schema migrations) to the server
    (params, metric history, tags, artifacts, the experiment's tags); run IDs change."""
    old = MlflowClient(tracking_uri)
    experiment_id = old.create_experiment(
        "history",
        artifact_location=(tmp_path / "mlruns").as_uri(),
        tags={tracking.KIND_TAG: tracking.MODEL_TRAINING},
    )
    run = old.create_run(experiment_id, tags={"stage": "train_teacher"}, run_name="teacher")
    old.log_param(run.info.run_id, "seed", "0")
    for step, value in enumerate((0.5, 0.7)):
        old.log_metric(run.info.run_id, "val_accuracy", value, step=step)
    report = tmp_path / "report.txt"
    report.write_text("what the run wrote")
    old.log_artifact(run.info.run_id, str(report))
    old.set_terminated(run.info.run_id)

    exported = tmp_path / "exported"
    _tool("export-experiment", tracking_uri, "--experiment", "history", "--output-dir", exported)
    _tool("import-experiment", server, "--experiment-name", "history", "--input-dir", exported)

    new = MlflowClient(server)
    experiment = new.get_experiment_by_name("history")
    assert experiment.tags[tracking.KIND_TAG] == tracking.MODEL_TRAINING
    (copied,) = new.search_runs([experiment.experiment_id])
    assert copied.info.run_id != run.info.run_id  # lineage tags holding run IDs go stale
    assert copied.info.run_name == "teacher" and copied.data.tags["stage"] == "train_teacher"
    assert copied.data.params == {"seed": "0"}
    history = new.get_metric_history(copied.info.run_id, "val_accuracy")
    assert [(m.step, m.value) for m in history] == [(0, 0.5), (1, 0.7)]
    # The artifact comes back through the server's proxy, from its own artifact store.
    path = new.download_artifacts(copied.info.run_id, "report.txt", str(tmp_path / "back"))
    assert Path(path).read_text() == "what the run wrote"
