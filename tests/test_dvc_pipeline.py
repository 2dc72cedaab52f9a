"""End to end: `dvc repro` on digits in a temporary copy of the repository, then a DVC
experiment that changes the threshold and must re-run only merge, student and evaluation."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


def _run(cmd, cwd, env):
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, (
        f"{cmd} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    )
    return result.stdout + result.stderr


def _ran(output):
    return set(re.findall(r"Running stage '(\w+)'", output))


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A git + DVC copy of the tracked files, with params.yaml composed for digits."""
    root = tmp_path_factory.mktemp("repo")
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    for rel in files:
        if (REPO / rel).is_file():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, root / rel)
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    env.pop("MLFLOW_TRACKING_URI", None)  # the project's own sqlite:///mlflow.db
    _run([str(BIN / "pseudolabel"), "compose", "+experiment=smoke"], root, env)
    for cmd in (
        ["git", "init", "-q"],
        ["git", "add", "-A"],
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init"],
    ):
        _run(cmd, root, env)
    return root, env


def test_dvc_repro_then_nothing_then_threshold_experiment(project):
    root, env = project
    first = _run([str(BIN / "dvc"), "repro"], root, env)
    assert _ran(first) == {
        "ingest",
        "train_teacher",
        "pseudo_label",
        "merge",
        "train_student",
        "evaluate",
    }
    for rel in (
        "outputs/data.csv",
        "models/teacher.keras",
        "models/student.keras",
        "data/train_ssl/manifest.csv",
        "outputs/plots/confidence.png",
    ):
        assert (root / rel).exists(), rel
    evaluation = json.loads((root / "metrics/evaluation.json").read_text())
    assert {"teacher_accuracy", "student_accuracy", "gain"} <= set(evaluation)
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["pseudolabel"], output_format="list")
    assert sorted(r.data.tags["stage"] for r in runs) == [
        "evaluate",
        "pseudo_label",
        "train_student",
        "train_teacher",
    ]
    # The student's tag equals the md5 DVC recorded for the CSV.
    lock = (root / "dvc.lock").read_text()
    student = next(r for r in runs if r.data.tags["stage"] == "train_student")
    assert student.data.tags["pseudo_label_csv_md5"] in lock

    second = _run([str(BIN / "dvc"), "repro"], root, env)
    assert _ran(second) == set(), second

    _run(["git", "add", "-A"], root, env)
    _run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "repro"], root, env)
    exp = _run(
        [
            str(BIN / "dvc"),
            "exp",
            "run",
            "-S",
            "+experiment=smoke",
            "-S",
            "pseudo_label.threshold=0.9",
        ],
        root,
        env,
    )
    assert _ran(exp) == {"merge", "train_student", "evaluate"}, exp
    merged = json.loads((root / "metrics/merge.json").read_text())
    assert merged["threshold"] == 0.9
