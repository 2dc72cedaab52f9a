"""`pseudolabel-sweep`: Hydra multirun jobs on digits that reuse the pipeline's teacher and CSV,
one MLflow parent run with a child per job, failures recorded, bad input refused up front."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

from pseudolabel import tracking
from pseudolabel.config import load_params
from tests.conftest import REPO

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def project(pipeline, tmp_path_factory) -> Path:
    """A copy of the `pipeline` fixture's root made a project as a user makes one: conf/,
    dvc.yaml, then `pseudolabel compose +experiment=smoke` (conf/project.yaml, params.yaml).
    The sweeps below name no preset: they start from the project's composition."""
    root = tmp_path_factory.mktemp("sweep") / "project"
    shutil.copytree(pipeline.root, root)
    shutil.copytree(REPO / "conf", root / "conf")  # pseudolabel-sweep composes the project's
    shutil.copy2(REPO / "dvc.yaml", root / "dvc.yaml")
    subprocess.run([str(BIN / "pseudolabel"), "compose", "+experiment=smoke"], cwd=root, check=True)
    assert load_params(root / "params.yaml").data.source == "digits"
    return root


def _sweep(root: Path, *overrides: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "pseudolabel-sweep"), "-m", *overrides],
        cwd=root,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", **env},
        capture_output=True,
        text=True,
        timeout=600,
    )


def _snapshot(root: Path) -> dict[str, str]:
    """md5 of every file outside multirun/: what the sweep must never write over."""
    return {
        str(p.relative_to(root)): tracking.md5(p)
        for p in root.rglob("*")
        if p.is_file() and "multirun" not in p.relative_to(root).parts
    }


def _parent_and_children(root: Path):
    client = mlflow.MlflowClient()
    parents = [
        run
        for run in client.search_runs(
            [e.experiment_id for e in client.search_experiments()],
            "tags.stage = 'sweep'",
            order_by=["attributes.start_time DESC"],
        )
        if run.data.tags["sweep.dir"].startswith(str(root))
    ]
    parent = parents[0]
    children = client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    return parent, sorted(children, key=lambda r: int(r.data.tags["sweep.job"]))


@pytest.mark.slow  # ~30 s: a real multirun, two jobs trained and two failing in merge
def test_threshold_sweep_with_failing_jobs(project, tracking_uri):
    """Two thresholds x two selections: per_class names a class that does not exist, which
    passes the schema but fails in merge, so those two jobs fail and the sweep goes on."""
    before = _snapshot(project)
    result = _sweep(
        project,
        "pseudo_label.selection=threshold,per_class",
        "pseudo_label.threshold=0.3,0.6",
        "pseudo_label.per_class_threshold={nope:0.5}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert _snapshot(project) == before, "a sweep job wrote into the project's DVC outputs"

    mlflow.set_tracking_uri(tracking_uri)
    parent, children = _parent_and_children(project)
    assert parent.info.status == "FINISHED"
    assert [c.data.params["pseudo_label.threshold"] for c in children] == ["0.3", "0.6"] * 2
    assert [c.info.status for c in children] == ["FINISHED", "FINISHED", "FAILED", "FAILED"]
    assert all("nope" in c.data.tags["sweep.error"] for c in children[2:])
    assert parent.data.metrics["failed_jobs"] == 2
    for child in children[:2]:
        assert {"student_accuracy", "gain", "kept_fraction"} <= set(child.data.metrics)
        job_dir = Path(child.data.tags["sweep.job_dir"])
        assert job_dir.parent == Path(parent.data.tags["sweep.dir"])
        assert (job_dir / "models" / "student.keras").is_file()
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(parent.info.run_id)}
    assert {"sweep_summary.png", "sweep_summary.csv"} <= artifacts

    # Each job's student run, nested in its job run, leads back to the project's CSV.
    student = mlflow.MlflowClient().search_runs(
        [parent.info.experiment_id],
        f"tags.mlflow.parentRunId = '{children[0].info.run_id}' and tags.stage = 'train_student'",
    )[0]
    assert student.data.tags["pseudo_label_csv_md5"] == before["outputs/data.csv"]
    assert student.data.tags["pseudo_label.threshold"] == "0.3"
    assert {d.dataset.digest for d in student.inputs.dataset_inputs} >= {before["outputs/data.csv"]}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["pseudo_label.threshhold=0.5,0.6"], "threshhold"),
        (["pseudo_label.threshold=0.5,1.5"], "pseudo_label.threshold=1.5"),
        (["data.unlabeled=100,200"], "dvc exp run"),
        # What the user changed, and nothing the project itself set (the preset's digits).
        (["data.train_per_class=3,4"], "this job sets data.train_per_class=3 (params.yaml: 10):"),
    ],
)
def test_bad_input_is_one_error_before_any_job(project, overrides, message):
    result = _sweep(project, *overrides)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert "Launching" not in result.stdout + result.stderr


def test_unreachable_tracking_uri_is_one_error_before_any_job(project):
    """After tracking.start_wait (300 s by default: a server restarting; 2 s here) of waiting,
    said at once, one error and no job launched."""
    result = _sweep(
        project,
        "pseudo_label.threshold=0.5",
        "tracking.start_wait=2",
        MLFLOW_TRACKING_URI="http://127.0.0.1:9",
    )
    assert result.returncode == 2
    assert "waiting up to 2 s for it (tracking.start_wait)" in result.stdout + result.stderr
    assert "http://127.0.0.1:9' cannot be reached" in result.stderr
    assert "Launching" not in result.stdout + result.stderr


@pytest.mark.slow  # ~40 s: Ray workers import TensorFlow
def test_jobs_run_in_parallel_on_a_ray_cluster(project, tracking_uri, ray_cluster):
    """hydra/launcher=ray: both jobs run at once as Ray tasks on a two-node cluster, with the
    parent/child runs and the summary of the basic launcher, on the project's sqlite store."""
    pytest.importorskip("hydra_plugins.hydra_ray_launcher")
    result = _sweep(
        project,
        "hydra/launcher=ray",
        f"ray.address={ray_cluster}",
        "pseudo_label.threshold=0.3,0.6",
        RAY_AUTH_MODE="disabled",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Ray Launcher is launching 2 jobs" in result.stdout + result.stderr
    mlflow.set_tracking_uri(tracking_uri)
    parent, children = _parent_and_children(project)
    assert parent.info.status == "FINISHED"
    assert [c.data.params["pseudo_label.threshold"] for c in children] == ["0.3", "0.6"]
    assert [c.info.status for c in children] == ["FINISHED", "FINISHED"]
    # In parallel: each job started before the other ended.
    first, second = children
    assert first.info.start_time < second.info.end_time
    assert second.info.start_time < first.info.end_time
    for child in children:
        assert (Path(child.data.tags["sweep.job_dir"]) / "models" / "student.keras").is_file()
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(parent.info.run_id)}
    assert {"sweep_summary.png", "sweep_summary.csv"} <= artifacts
