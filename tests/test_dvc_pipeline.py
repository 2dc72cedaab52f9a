"""End to end: `dvc repro` on digits in a temporary copy of the repository, then a DVC
experiment that changes the threshold and must re-run only merge, student and evaluation."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import mlflow
import pytest
import yaml

from tests.conftest import copy_tracked_files

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


def _run(cmd, cwd, env):
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, (
        f"{cmd} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    )
    return result.stdout + result.stderr


def _ran(output):
    return set(re.findall(r"Running stage '([\w@]+)'", output))


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A git + DVC copy of the tracked files, with params.yaml composed for digits."""
    root = tmp_path_factory.mktemp("repo")
    copy_tracked_files(root)
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


def _wait_for_queue(root, env, seconds=600):
    """The queued experiment, once `dvc queue status` shows it done: its stage log and params."""
    import time

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        status = _run([str(BIN / "dvc"), "queue", "status"], root, env)
        if not re.search(r"\b(Queued|Running)\b", status):
            break
        # Each poll is a DVC start (1.6 s of CPU on a 2-vCPU AVX2 VM) that the queued
        # experiment's stages would share the two cores with: look every 10 s, not every 2.
        time.sleep(10)
    assert re.search(r"\bSuccess\b", status), status
    name = re.search(r"^\S+\s+(\S+)\s+.*Success", status, re.M).group(1)  # Task, Name, ...
    logs = _run([str(BIN / "dvc"), "queue", "logs", name], root, env)
    shown = json.loads(_run([str(BIN / "dvc"), "exp", "show", "--json"], root, env))
    params = next(
        e["data"]["params"]["params.yaml"]["data"]["data"]
        for rev in shown
        for exp in rev.get("experiments") or []
        for e in exp["revs"]
        if e.get("name") == name
    )
    return SimpleNamespace(name=name, logs=logs, params=params)


@pytest.fixture(scope="module")
def ran(project):
    """`dvc repro`, `dvc repro` again, a commit, then `dvc exp run -S pseudo_label.threshold=0.9`:
    run once (it is slow), checked by the tests below."""
    root, env = project
    first = _run([str(BIN / "dvc"), "repro"], root, env)
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    first_merge = json.loads((root / "metrics/merge.json").read_text())
    second = _run([str(BIN / "dvc"), "repro"], root, env)
    _run(["git", "add", "-A"], root, env)
    _run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "repro"], root, env)
    baseline = _run(["git", "rev-parse", "HEAD"], root, env).strip()
    # -S alone: the preset `pseudolabel compose` recorded in conf/project.yaml is kept (issue
    # 32: DVC composes conf/ plus -S, and used to drop it and run the Fashion-MNIST pipeline).
    exp = _run([str(BIN / "dvc"), "exp", "run", "-S", "pseudo_label.threshold=0.9"], root, env)
    exp_params = yaml.safe_load((root / "params.yaml").read_text())
    exp_merge = json.loads((root / "metrics/merge.json").read_text())
    # The same through the queue: a temporary copy of the repository, run by `dvc queue start`.
    _run([str(BIN / "dvc"), "exp", "run", "--queue", "-S", "pseudo_label.threshold=0.6"], root, env)
    _run([str(BIN / "dvc"), "queue", "start"], root, env)
    queued = _wait_for_queue(root, env)
    # Two Noisy Student rounds: adds the round@round2 stage; round 1 is already up to date.
    rounds = _run([str(BIN / "dvc"), "exp", "run", "-S", "pseudo_label.rounds=2"], root, env)
    rounds_lock = yaml.safe_load((root / "dvc.lock").read_text())
    # A client of its own: mlflow.set_tracking_uri would also repoint later tests' stages.
    client = mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    runs = list(client.search_runs([client.get_experiment_by_name("pseudolabel").experiment_id]))
    return SimpleNamespace(
        exp_params=exp_params,
        queued=queued,
        exp_merge=exp_merge,
        first_merge=first_merge,
        rounds=rounds,
        rounds_lock=rounds_lock,
        root=root,
        env=env,
        first=first,
        second=second,
        exp=exp,
        lock=lock,
        baseline=baseline,
        runs=runs,
    )


def _lock_md5(lock, stage, path):
    return next(o["md5"] for o in lock["stages"][stage]["outs"] if o["path"] == path)


def test_dvc_repro_then_nothing(ran):
    root = ran.root
    assert _ran(ran.first) == {
        "ingest",
        "train_teacher",
        "train_baseline",
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
    # The smoke teacher learns (chance is 0.1) and the merge copies pseudo-labels (issue 16).
    assert json.loads((root / "metrics/teacher.json").read_text())["val_accuracy"] > 0.3
    assert evaluation["teacher_accuracy"] > 0.3
    assert ran.first_merge["pseudo_labeled"] >= 1
    pipeline_runs = [r for r in ran.runs if "dvc.exp_name" not in r.data.tags]
    assert {"evaluate", "pseudo_label", "train_student", "train_teacher"} <= {
        r.data.tags["stage"] for r in pipeline_runs
    }
    # The student's tag equals the md5 DVC recorded for the CSV.
    student = next(r for r in pipeline_runs if r.data.tags["stage"] == "train_student")
    csv_md5 = _lock_md5(ran.lock, "pseudo_label", "outputs/data.csv")
    assert student.data.tags["pseudo_label_csv_md5"] == csv_md5
    assert student.data.tags["merged_data_md5"] == _lock_md5(ran.lock, "merge", "data/train_ssl")
    assert _ran(ran.second) == set(), ran.second


def test_threshold_experiment_reruns_downstream_and_tags_its_runs(ran):
    assert _ran(ran.exp) == {"merge", "train_student", "evaluate"}, ran.exp
    assert ran.exp_merge["threshold"] == 0.9
    assert ran.exp_params["data"]["source"] == "digits", "the preset was dropped"
    # Runs made inside `dvc exp run` carry its name and baseline, in the project's own mlflow.db.
    name = re.search(r"Ran experiment\(s\): ([\w-]+)", ran.exp).group(1)
    exp_runs = [r for r in ran.runs if r.data.tags.get("dvc.exp_name") == name]
    assert {"train_student", "evaluate"} <= {r.data.tags["stage"] for r in exp_runs}
    assert {r.data.tags["dvc.baseline_rev"] for r in exp_runs} == {ran.baseline}
    student = next(r for r in exp_runs if r.data.tags["stage"] == "train_student")
    assert student.data.tags["pseudo_label.threshold"] == "0.9"
    assert sorted(ran.root.rglob("mlflow.db")) == [ran.root / "mlflow.db"]


def test_lineage_of_the_pipeline_student_matches_dvc_lock(ran):
    student = next(
        r
        for r in ran.runs
        if r.data.tags["stage"] == "train_student" and "dvc.exp_name" not in r.data.tags
    )
    labeling = next(
        r
        for r in ran.runs
        if r.data.tags["stage"] == "pseudo_label" and "dvc.exp_name" not in r.data.tags
    )
    teacher = next(r for r in ran.runs if r.data.tags["stage"] == "train_teacher")
    out = _run([str(BIN / "pseudolabel"), "lineage", student.info.run_id], ran.root, ran.env)
    chain = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    chain = {hop.strip(): text.strip() for hop, text in chain.items()}
    assert chain["pseudo-label CSV md5"] == _lock_md5(ran.lock, "pseudo_label", "outputs/data.csv")
    assert chain["labeling run"].startswith(labeling.info.run_id)
    assert chain["teacher run"].startswith(teacher.info.run_id)
    assert chain["merged set"] == _lock_md5(ran.lock, "merge", "data/train_ssl")
    train_dep = next(
        d["md5"]
        for d in ran.lock["stages"]["train_teacher"]["deps"]
        if d["path"] == "data/image_dataset/train"
    )
    assert train_dep in chain["data"]


def test_two_rounds_version_each_round_and_chain_its_runs(ran):
    """pseudo_label.rounds=2: round 2's CSV, merged set and model are DVC outputs, evaluate
    scores both rounds, and round 2's runs lead back through round 1's student to the teacher."""
    root = ran.root
    assert {"round@round2", "evaluate"} <= _ran(ran.rounds), ran.rounds
    assert "train_teacher" not in _ran(ran.rounds)
    outs = {o["path"] for o in ran.rounds_lock["stages"]["round@round2"]["outs"]}
    assert outs >= {"rounds/round2/outputs", "rounds/round2/data/train_ssl", "rounds/round2/models"}
    deps = {d["path"] for d in ran.rounds_lock["stages"]["round@round2"]["deps"]}
    assert {"models/student.keras", "models/student.json"} <= deps  # round 1's student teaches
    assert "outputs/data.csv" in deps  # round 1's flags: exclude=auto decides on them
    first = json.loads((root / "metrics/pseudo_label.json").read_text())["ood"]
    second = json.loads((root / "rounds/round2/metrics/merge.json").read_text())["ood_exclude"]
    assert second == {"setting": "auto", "excluded": first["excluded"]}
    for rel in (
        "rounds/round2/outputs/data.csv",
        "rounds/round2/data/train_ssl/manifest.csv",
        "rounds/round2/models/student.keras",
        "rounds/round2/metrics/student.json",
    ):
        assert (root / rel).exists(), rel
    # The baseline reran with the compute of both rounds' students together.
    assert "train_baseline" in _ran(ran.rounds)
    steps = [
        json.loads((root / rel).read_text())["steps"]
        for rel in ("metrics/student.json", "rounds/round2/metrics/student.json")
    ]
    assert json.loads((root / "metrics/baseline.json").read_text())["steps"] == sum(steps)
    evaluation = json.loads((root / "metrics/evaluation.json").read_text())
    assert evaluation["rounds"] == 2
    assert set(evaluation["round_accuracy"]) == {"round1", "round2"}
    assert evaluation["student_accuracy"] == evaluation["round_accuracy"]["round2"]

    name = re.search(r"Ran experiment\(s\): ([\w-]+)", ran.rounds).group(1)
    exp_runs = [r for r in ran.runs if r.data.tags.get("dvc.exp_name") == name]
    by_id = {r.info.run_id: r for r in ran.runs}
    second = next(
        r
        for r in exp_runs
        if r.data.tags["stage"] == "train_student" and r.data.tags["round"] == "2"
    )
    first = by_id[second.data.tags["teacher_run_id"]]  # round 2's teacher: round 1's student
    assert (first.data.tags["stage"], first.data.tags["round"]) == ("train_student", "1")
    labeling = next(
        r
        for r in exp_runs
        if r.data.tags["stage"] == "pseudo_label" and r.data.tags["round"] == "2"
    )
    assert labeling.data.tags["teacher_run_id"] == first.info.run_id
    assert second.data.tags["pseudo_label_csv_md5"] == labeling.data.tags["pseudo_label_csv_md5"]
    teacher = by_id[first.data.tags["teacher_run_id"]]
    assert teacher.data.tags["stage"] == "train_teacher"

    out = _run([str(BIN / "pseudolabel"), "lineage", second.info.run_id], root, ran.env)
    hops = [line.split(":", 1)[0].strip() for line in out.splitlines() if ":" in line]
    assert hops.index("round 2 student") < hops.index("round 1 student") < len(hops) - 1
    assert f"{first.info.run_id} (" in out and f"{teacher.info.run_id} (" in out


def test_a_teammate_clone_pulls_the_pipeline_from_the_default_remote(ran):
    """`dvc push` to the default remote (.dvc/config: `shared`, ../pseudolabel-dvc-remote beside
    the repository), a fresh `git clone`, `dvc pull`: every output is there, nothing to re-run."""
    root, env = ran.root, ran.env
    dvc = str(BIN / "dvc")
    # The committed pipeline (HEAD: the first `dvc repro`), pushed as a teammate would: from a
    # clean checkout of it. (`dvc push --all-commits` from the workspace the experiments left
    # skips HEAD's version of an output the workspace changed, here models/baseline, and says
    # "Everything is up to date": DVC 3.67, treeverse/dvc#10617.)
    pusher = root.parent / "pusher"
    shutil.copytree(root, pusher, symlinks=True)
    _run(["git", "stash", "-u", "-q"], pusher, env)
    _run([dvc, "checkout", "--force"], pusher, env)
    _run([dvc, "push"], pusher, env)
    remote = root.parent / "pseudolabel-dvc-remote"
    assert (remote / "files" / "md5").is_dir(), "the default remote is not beside the repo"
    assert "in sync" in _run([dvc, "status", "--cloud"], pusher, env)
    clone = root.parent / "clone"
    _run(["git", "clone", "-q", str(root), str(clone)], root.parent, env)
    _run([dvc, "pull"], clone, env)
    for rel in ("models/student.keras", "data/train_ssl/manifest.csv", "outputs/data.csv"):
        assert (clone / rel).is_file(), rel
    status = _run([dvc, "status"], clone, env)
    assert "Data and pipelines are up to date" in status, status


def test_a_queued_experiment_keeps_the_project_settings(ran):
    """`dvc exp run --queue -S ...` + `dvc queue start`: composed from the same conf/, it
    re-runs merge and what follows, on the project's data."""
    assert _ran(ran.queued.logs) == {"merge", "train_student", "evaluate"}, ran.queued.logs
    assert ran.queued.params["source"] == "digits"
    assert ran.queued.params["image_size"] == [8, 8]
