"""Shared fixtures: a tiny digits project, built once per session through the real stages."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pseudolabel.config import compose  # pseudolabel sets TF_CPP_MIN_LOG_LEVEL
from pseudolabel.paths import Paths

REPO = Path(__file__).resolve().parents[1]


def copy_tracked_files(dest: Path) -> Path:
    """A copy of the repository's tracked (and untracked, not ignored) files under `dest`."""
    import shutil
    import subprocess

    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    for rel in listed:
        if (REPO / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, dest / rel)
    return dest


CONF_DIR = REPO / "conf"


@pytest.fixture(scope="session")
def smoke_cfg():
    """The `experiment=smoke` config: digits, tiny models, two epochs."""
    return compose(["+experiment=smoke"])


@pytest.fixture(scope="session")
def tracking_uri(tmp_path_factory) -> str:
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    os.environ["MLFLOW_TRACKING_URI"] = uri
    return uri


@pytest.fixture(autouse=True)
def _session_tracking_store(tracking_uri):
    """Every test starts on the session's store: mlflow.set_tracking_uri also rewrites the
    MLFLOW_TRACKING_URI variable, so a test that points MLflow elsewhere (a DVC project's
    mlflow.db, a tracking server) would otherwise send every later stage's runs there."""
    import mlflow

    os.environ["MLFLOW_TRACKING_URI"] = tracking_uri
    mlflow.set_tracking_uri(tracking_uri)


@pytest.fixture(scope="session")
def digits_data(tmp_path_factory, smoke_cfg) -> Paths:
    """A project root with the digits layout written by the ingest stage."""
    from pseudolabel.stages.ingest import ingest

    paths = Paths(tmp_path_factory.mktemp("digits"))
    ingest(smoke_cfg, paths)
    return paths


@pytest.fixture(scope="session")
def pipeline(tmp_path_factory, smoke_cfg, tracking_uri) -> Paths:
    """Every stage run once, in order, on digits (what `dvc repro` runs, without DVC)."""
    from pseudolabel.stages import STAGES

    paths = Paths(tmp_path_factory.mktemp("pipeline"))
    for stage in STAGES.values():
        stage(smoke_cfg, paths)
    return paths
