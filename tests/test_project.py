"""Installable into the user's own repository: the package ships the default project (a copy of
this repository's conf/, dvc.yaml, params.yaml and DVC settings), `pseudolabel init` writes it
into a git repository without overwriting anything, and the pipeline then runs from the wheel."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import yaml

from pseudolabel import __version__, config, project
from pseudolabel.cli import LOCK
from pseudolabel.errors import PseudoLabelError
from tests.conftest import REPO, copy_tracked_files


def test_the_template_is_the_repositorys_own_files():
    """From a source checkout init reads the top-level files themselves (one copy in git; the
    wheel's copy is made at build time: the wheel test below runs init from it)."""
    files = project.template_files()
    assert files["conf/config.yaml"] == REPO / "conf" / "config.yaml"
    assert files["dvc.yaml.in"] == REPO / "dvc.yaml"
    assert files["dvc_config"] == REPO / ".dvc" / "config"
    assert not (REPO / "src" / "pseudolabel" / "project_template").exists()


def test_the_users_dvc_yaml_depends_on_the_lock_not_on_source_files():
    text = project.user_dvc_yaml((REPO / "dvc.yaml").read_text(), "9.9.9")
    assert "src/" not in text and "pseudolabel 9.9.9" in text
    ours = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    theirs = yaml.safe_load(text)["stages"]
    assert set(theirs) == set(ours)
    for name, stage in theirs.items():
        body, original = stage.get("do", stage), ours[name].get("do", ours[name])
        assert body["deps"].count(LOCK) == 1, name
        kept = [d for d in original["deps"] if not d.startswith("src/")]
        assert [d for d in body["deps"] if d != LOCK] == kept, name


def _git_repo(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["git", "init", "-q"], cwd=path, check=True)
    return path


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.run(
        [sys.executable, "-m", "pseudolabel.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
    )


def test_init_writes_the_project_and_refuses_to_overwrite(tmp_path):
    root = _git_repo(tmp_path / "repo")
    written = {p.as_posix() for p in project.init(root)}
    assert {"dvc.yaml", "params.yaml", ".dvcignore", LOCK, "conf/config.yaml"} <= written
    assert (root / ".dvc").is_dir()
    dvc_config = (root / ".dvc" / "config").read_text()
    assert "hydra" in dvc_config and "enabled = true" in dvc_config
    # The default remote, beside the repository as in this one (docs/team.md).
    assert "remote = shared" in dvc_config and "url = ../../pseudolabel-dvc-remote" in dvc_config
    assert (root / LOCK).read_text() == f"pseudolabel=={__version__}\n"
    # The project's conf/ is the one composed, from the root or from below it (DVC's root).
    (root / "notebooks").mkdir()
    assert config.conf_dir(root / "notebooks") == root / "conf"
    assert config.compose([], config_dir=root / "conf").data.source == "fashion_mnist"

    # `git add .` takes none of MLflow's store, Hydra's folders or the environment.
    for made in ("mlflow.db", "mlruns/0/meta.yaml", "multirun/x", ".venv/bin/python"):
        (root / made).parent.mkdir(parents=True, exist_ok=True)
        (root / made).write_text("x")
    status = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=all"],
        cwd=root,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert not any(name in status for name in ("mlflow.db", "mlruns/", "multirun/", ".venv/")), (
        status
    )
    assert ".gitignore" in status

    project.init(root)  # the same files again: nothing to refuse
    (root / "conf" / "config.yaml").write_text("# mine\n")
    with pytest.raises(PseudoLabelError, match=r"refusing to overwrite conf/config\.yaml"):
        project.init(root)
    run = _cli("init", cwd=root)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [
        "pseudolabel init: error: refusing to overwrite conf/config.yaml: "
        "use `pseudolabel init --force`"
    ], run.stderr
    assert (root / "conf" / "config.yaml").read_text() == "# mine\n"
    assert _cli("init", "--force", cwd=root).returncode == 0
    assert (root / "conf" / "config.yaml").read_bytes() == (REPO / "conf/config.yaml").read_bytes()


def test_init_adds_to_a_users_gitignore_and_never_replaces_it():
    mine = "*.ckpt\n/mlruns/\nnotes.txt"
    text = project.gitignore_text(mine)
    assert text.startswith("*.ckpt\n/mlruns/\nnotes.txt\n")  # theirs first, untouched
    added = text.splitlines()[3:]
    assert added[0].startswith("# pseudolabel init")
    assert "/mlruns/" not in added and "/mlflow.db" in added and "/.venv/" in added
    assert project.gitignore_text(text) is None  # a second init adds nothing


def test_init_outside_git_and_compose_without_conf_are_one_line_errors(tmp_path):
    run = _cli("init", cwd=tmp_path)
    assert run.returncode == 2 and "git init" in run.stderr and "Traceback" not in run.stderr
    run = _cli("compose", cwd=tmp_path)
    assert run.returncode == 2 and "pseudolabel init" in run.stderr
    assert "Traceback" not in run.stderr


def test_a_stage_refuses_a_lock_of_another_version(tmp_path):
    (tmp_path / LOCK).write_text("pseudolabel==0.0.1\n")
    run = _cli("merge", cwd=tmp_path)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [
        f"pseudolabel merge: error: {LOCK} records pseudolabel==0.0.1 but pseudolabel "
        f"{__version__} is installed: run `pseudolabel lock` to record it (DVC then re-runs "
        "every stage), or install that version."
    ], run.stderr
    assert _cli("lock", cwd=tmp_path).returncode == 0
    assert (tmp_path / LOCK).read_text() == f"pseudolabel=={__version__}\n"


def _run(cmd, cwd, env, timeout=600):
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{cmd}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


@pytest.mark.slow  # ~90 s of CPU (a wheel build, `dvc repro` of the smoke experiment, an exp)
def test_the_wheel_runs_the_pipeline_in_a_fresh_repository(tmp_path, digits_data):
    """What a user does: install the wheel, `pseudolabel init` in their repository, compose
    their own folders, `dvc repro`, then `dvc exp run -S` one threshold, which must keep their
    folders (issue 32). Nothing may come from this source tree."""
    # Build from a copy of the tracked files, so the build leaves nothing in the checkout.
    source = tmp_path / "source"
    copy_tracked_files(source)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MLFLOW_TRACKING_URI")}
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    wheels = tmp_path / "wheels"
    pip = [sys.executable, "-m", "pip"]
    _run([*pip, "wheel", "--no-deps", "-q", str(source), "-w", str(wheels)], tmp_path, env)
    (wheel,) = wheels.glob("pseudolabel-*.whl")

    # A fresh venv holding only the wheel. Its heavy dependencies (TensorFlow, DVC, MLflow:
    # gigabytes, minutes to install) are this interpreter's, reached through a .pth line:
    # a path in a .pth file is put on sys.path after the venv's own site-packages, and .pth
    # files inside it are not processed, so this checkout's editable install stays invisible
    # and `import pseudolabel` finds the wheel's copy.
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp_path, env)
    python = venv / "bin" / "python"
    _run([*pip, "--python", str(python), "install", "--no-deps", "-q", str(wheel)], tmp_path, env)
    purelib = _run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        tmp_path,
        env,
    ).strip()
    heavy = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    Path(purelib, "_heavy_deps.pth").write_text("\n".join(sorted(heavy)) + "\n")
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env['PATH']}"
    found = _run(
        [str(python), "-c", "import pseudolabel; print(pseudolabel.__file__)"], tmp_path, env
    )
    assert found.startswith(str(venv)), found

    repo = _git_repo(tmp_path / "user_repo")
    _run([str(venv / "bin" / "pseudolabel"), "init"], repo, env)
    assert not (repo / "src").exists() and "src/" not in (repo / "dvc.yaml").read_text()
    # The user's own images: the digits, as folders of PNG files in the repository.
    photos = repo / "photos"
    for source, target in (
        (digits_data.labeled, "labeled"),
        (digits_data.unlabeled, "unlabeled"),
    ):
        shutil.copytree(source, photos / target, ignore=shutil.ignore_patterns(".*"))
    user_settings = [
        "+experiment=smoke",
        "data=folder",
        "data.labeled_root=photos/labeled",
        "data.unlabeled_root=photos/unlabeled",
        "data.image_size=[8,8]",
        "data.min_size=4",
    ]
    _run([str(venv / "bin" / "pseudolabel"), "compose", *user_settings], repo, env)
    settings = yaml.safe_load((repo / "conf" / "project.yaml").read_text())
    assert settings["data"]["labeled_root"] == "photos/labeled", settings
    _run([str(python), "-m", "dvc", "repro"], repo, env)
    evaluation = json.loads((repo / "metrics" / "evaluation.json").read_text())
    assert evaluation, "metrics/evaluation.json is empty"
    for cmd in (["add", "-A"], ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "r"]):
        _run(["git", *cmd], repo, env)
    exp = _run(
        [str(python), "-m", "dvc", "exp", "run", "-S", "pseudo_label.threshold=0.9"], repo, env
    )
    assert set(re.findall(r"Running stage '([\w@]+)'", exp)) == {
        "merge",
        "train_student",
        "evaluate",
    }
    params = yaml.safe_load((repo / "params.yaml").read_text())
    assert params["data"]["source"] == "folder" and params["data"]["image_size"] == [8, 8]
    assert params["pseudo_label"]["threshold"] == 0.9
