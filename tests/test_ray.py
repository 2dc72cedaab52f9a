"""pseudo_label.engine=ray on a real two-node Ray cluster (localhost) writes the local CSVs."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pseudolabel.paths import Paths
from tests.conftest import SRC

ray = pytest.importorskip("ray")  # the optional extra (pip install ".[ray]")


@pytest.fixture(scope="module")
def project(digits_data, tmp_path_factory, tracking_uri) -> Paths:
    """The digits images plus one file that cannot be decoded, and a trained teacher."""
    from pseudolabel.config import compose
    from pseudolabel.stages import train_teacher

    tmp_path = tmp_path_factory.mktemp("ray_project")
    data = tmp_path / "data_root"
    (data / "data").mkdir(parents=True)
    os.symlink(digits_data.root / "data" / "image_dataset", data / "data" / "image_dataset")
    shutil.copytree(digits_data.unlabeled, data / "data" / "unlabeled")
    (data / "data" / "unlabeled" / "broken.png").write_bytes(b"not an image")
    teacher = Paths(tmp_path / "teacher", data_root=data)
    train_teacher(compose(["+experiment=smoke"]), teacher)
    return teacher


def _label(overrides: list[str], tmp_path: Path, project: Paths, name: str) -> tuple:
    from pseudolabel.config import compose
    from pseudolabel.stages import pseudo_label

    cfg = compose(
        [
            "+experiment=smoke",
            "pseudo_label.tta=true",
            "pseudo_label.distribution_alignment=true",
            *overrides,
        ]
    )
    teacher = project.model("teacher")
    paths = Paths(tmp_path / name, data_root=project.input_root, teacher_model=teacher)
    start = time.perf_counter()
    metrics = pseudo_label(cfg, paths)
    seconds = time.perf_counter() - start
    data = pd.read_csv(paths.csv)
    errors = pd.read_csv(paths.outputs / "errors.csv")
    print(f"{name}: {metrics['images']} images in {seconds:.1f} s")
    return data, errors, metrics


@pytest.mark.slow
def test_ray_engine_writes_the_local_csv(ray_cluster, project, tmp_path):
    local, local_errors, _ = _label([], tmp_path, project, "local")
    on_ray, ray_errors, metrics = _label(
        ["pseudo_label.engine=ray", f"ray.address={ray_cluster}", "ray.cpus_per_actor=0.5"],
        tmp_path,
        project,
        "ray",
    )
    assert metrics["images"] == len(local) > 0
    assert on_ray["path"].tolist() == local["path"].tolist()
    assert on_ray["label"].tolist() == local["label"].tolist()
    numbers = [c for c in local.columns if c not in ("path", "label")]
    assert list(on_ray.columns) == list(local.columns)
    np.testing.assert_allclose(on_ray[numbers], local[numbers], atol=1e-6, rtol=0)
    assert local_errors["path"].tolist() == ["broken.png"]
    pd.testing.assert_frame_equal(ray_errors, local_errors)


def test_actor_count_leaves_room_for_decoding():
    from pseudolabel.distributed import actor_count
    from pseudolabel.errors import PseudoLabelError

    assert actor_count(None, 1, 2) == 1  # a 2-core machine: one actor, the rest decodes
    assert actor_count(None, 0.5, 2) == 3
    assert actor_count(2, 0.5, 2) == 2
    with pytest.raises(PseudoLabelError, match="ray.actors <= 1"):
        actor_count(2, 1, 2)  # both CPUs to actors: the decoding would wait forever
    with pytest.raises(PseudoLabelError, match="leaves no CPU"):
        actor_count(None, 4, 2)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("pseudo_label.engine=spark", "pseudo_label.engine"),
        ("ray.address=somewhere", "ray.address"),
        ("ray.actors=0", "ray.actors"),
        ("ray.cpus_per_actor=0", "ray.cpus_per_actor"),
        ("ray.max_failures=-2", "ray.max_failures"),
        ("teacher.train.strategy=horovod", "teacher.train.strategy"),
        ("student.train.workers=0", "student.train.workers"),
        ("teacher.train.strategy=multi_worker teacher.train.workers=9", "teacher.train.batch_size"),
    ],
)
def test_engine_and_ray_keys_are_checked(override, message):
    from pseudolabel.config import compose
    from pseudolabel.errors import PseudoLabelError

    with pytest.raises(PseudoLabelError, match=message):
        compose(["+experiment=smoke", *override.split()])


@pytest.mark.parametrize("strategy", ["multi_worker", "mirrored"])
def test_the_consistency_student_composes_under_every_strategy(strategy, tmp_path):
    """The consistency student's (the default student's) config is accepted under mirrored and
    multi_worker. The trainings: test_two_worker_training_on_the_cluster below (multi_worker),
    tests/test_consistency.py's mirrored-scope test."""
    from pseudolabel import cli

    output = tmp_path / "params.yaml"
    assert cli.main(["compose", "-o", str(output), f"student.train.strategy={strategy}"]) == 0
    assert output.exists()


@pytest.mark.slow
def test_two_worker_training_on_the_cluster(ray_cluster, pipeline, tmp_path, tracking_uri):
    """The smoke student (the consistency student, its custom train_step) trained by two Ray
    Train workers (one per node) from the pipeline's teacher, CSV and merged set: the chief
    writes a model the usual loader loads and logs exactly one MLflow run with the usual params
    and metrics; batch_size is global, so the steps per epoch are the local run's."""
    import json

    import mlflow

    from pseudolabel.config import compose
    from pseudolabel.models import io as model_io
    from pseudolabel.stages import train_student
    from pseudolabel.stages.train import consistency_steps

    cfg = compose(
        [
            "+experiment=smoke",
            "student.train.strategy=multi_worker",
            "student.train.workers=2",
            "student.train.epochs=1",
            "student.train.patience=1",
            f"ray.address={ray_cluster}",
        ]
    )
    assert cfg.student.consistency.enabled  # the default student
    paths = Paths(
        tmp_path / "two_workers", data_root=pipeline.input_root,
        teacher_model=pipeline.model("teacher"),
    )  # fmt: skip
    shutil.copytree(pipeline.merged, paths.merged)
    paths.outputs.mkdir(parents=True)
    shutil.copy(pipeline.csv, paths.csv)
    paths.metrics.mkdir(parents=True)
    for name in ("merge.json", "pseudo_label.json"):  # what the student reads
        shutil.copy(pipeline.metrics / name, paths.metrics / name)
    client = mlflow.MlflowClient(tracking_uri)
    before = {r.info.run_id for r in client.search_runs(_experiments(client))}
    start = time.perf_counter()
    metrics = train_student(cfg, paths)
    print(f"two-worker student: {time.perf_counter() - start:.1f} s")

    model, meta = model_io.load(paths.model("student"))
    assert meta.class_names == model_io.read_meta(pipeline.model("teacher")).class_names
    assert model.predict(np.zeros((2, 8, 8, 1), np.float32), verbose=0).shape == (2, 10)
    assert json.loads((paths.metrics / "student.json").read_text()) == metrics
    assert metrics["epochs"] == 1
    unlabeled = len(pd.read_csv(paths.csv))
    assert metrics["steps"] == consistency_steps(cfg.student, unlabeled)
    history = pd.read_csv(paths.history("student"))
    assert len(history) == 1 and {"mask_rate", "loss_unlabeled"} <= set(history.columns)
    new = [r for r in client.search_runs(_experiments(client)) if r.info.run_id not in before]
    assert [r.info.run_id for r in new] == [meta.run_id]  # one run: the chief's
    run = new[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["student.train.strategy"] == "multi_worker"
    assert {"val_accuracy", "best_val_accuracy", "loss", "mask_rate"} <= set(run.data.metrics)
    assert len(client.get_metric_history(run.info.run_id, "val_accuracy")) == 1  # chief only
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"model", "student_training_curves.png"} <= artifacts
    logged = mlflow.search_logged_models(
        experiment_ids=[run.info.experiment_id],
        filter_string=f"source_run_id = '{run.info.run_id}'",
        output_format="list",
    )
    assert len(logged) == 1


def _experiments(client) -> list[str]:
    return [e.experiment_id for e in client.search_experiments()]


_KILLED_RUN = """
import sys
from pathlib import Path

from pseudolabel import distributed
from pseudolabel.models import io as model_io

model, unlabeled, partial = map(Path, sys.argv[1:4])
address = sys.argv[4]
distributed.predict_folder(
    model, {"allow_unsafe": False, "trusted_saved_model": None}, model_io.read_meta(model),
    unlabeled, 16, tta=False, temperature=1.0, address=address, actors=1,
    cpus_per_actor=0.5, partial_dir=partial, chunk_size=16,
)
"""


@pytest.mark.slow
def test_ray_engine_resumes_a_killed_run_from_its_saved_chunks(
    ray_cluster, project, tmp_path, caplog
):
    """A driver killed (SIGKILL) mid-run leaves its finished chunks; the next run sends Ray only
    the files no chunk holds and writes what an uninterrupted run writes."""
    import signal
    import subprocess
    import sys

    from pseudolabel import distributed, predicting
    from pseudolabel.models import io as model_io

    model = project.model("teacher")
    meta = model_io.read_meta(model)
    partial = tmp_path / "partial"
    unlabeled = project.unlabeled
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    killed = subprocess.Popen(
        [sys.executable, "-c", _KILLED_RUN, str(model), str(unlabeled), str(partial), ray_cluster],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and killed.poll() is None:
        if len(list(partial.glob("chunk-*.npz"))) >= 2:
            killed.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    killed.wait(timeout=30)
    assert killed.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    saved = len(list(partial.glob("chunk-*.npz")))
    assert saved >= 2

    with caplog.at_level("INFO", logger="pseudolabel.distributed"):
        resumed, failed = distributed.predict_folder(
            model, {"allow_unsafe": False, "trusted_saved_model": None}, meta, unlabeled, 16,
            tta=False, temperature=1.0, address=ray_cluster, actors=1, cpus_per_actor=0.5,
            partial_dir=partial, chunk_size=16,
        )  # fmt: skip
    assert "resuming:" in caplog.text
    done = int(caplog.text.split("resuming: ")[1].split()[0])
    assert 32 <= done < len(resumed)
    assert not partial.exists()  # removed once complete
    whole, whole_failed = predicting.predict_folder(
        model_io.load(model)[0], meta, unlabeled, 16, temperature=1.0
    )
    assert failed == whole_failed == ["broken.png"]
    assert resumed["path"].tolist() == whole["path"].tolist()
    numbers = [c for c in whole.columns if c not in ("path", "label")]
    np.testing.assert_allclose(resumed[numbers], whole[numbers], atol=1e-6, rtol=0)


@pytest.mark.slow
def test_ray_engine_survives_a_killed_worker(ray_cluster, project, tmp_path):
    """SIGKILL the teacher actor's worker process once the first results are back: Ray restarts
    the actor and retries its batches, and the run still returns every image, equal to local."""
    import signal

    from pseudolabel import distributed, predicting
    from pseudolabel.models import io as model_io

    model = project.model("teacher")
    meta = model_io.read_meta(model)
    partial = tmp_path / "partial"
    thread, result = _in_thread(
        lambda: distributed.predict_folder(
            model, {"allow_unsafe": False, "trusted_saved_model": None}, meta,
            project.unlabeled, 16, tta=False, temperature=1.0, address=ray_cluster,
            actors=1, cpus_per_actor=0.5, partial_dir=partial, chunk_size=16,
        )
    )  # fmt: skip
    killed = None
    deadline = time.monotonic() + 240
    while killed is None and thread.is_alive() and time.monotonic() < deadline:
        if list(partial.glob("chunk-*.npz")):  # results are coming back: mid-run
            for pid in _actor_pids():
                os.kill(pid, signal.SIGKILL)
                killed = pid
        time.sleep(0.02)
    thread.join(timeout=300)
    assert killed is not None, "no teacher actor was found to kill before the run ended"
    assert "error" not in result, result.get("error")
    frame, failed = result["value"]
    whole, whole_failed = predicting.predict_folder(
        model_io.load(model)[0], meta, project.unlabeled, 16, temperature=1.0
    )
    assert failed == whole_failed == ["broken.png"]
    assert frame["path"].tolist() == whole["path"].tolist()
    numbers = [c for c in whole.columns if c not in ("path", "label")]
    np.testing.assert_allclose(frame[numbers], whole[numbers], atol=1e-6, rtol=0)


def _in_thread(call) -> tuple:
    """Start `call()` in a thread; the thread, and a dict that gets its "value" or "error"."""
    import threading

    result: dict = {}

    def run() -> None:
        try:
            result["value"] = call()
        except BaseException as exc:  # noqa: BLE001 (the test's assertion reports it)
            result["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    return thread, result


def _actor_pids() -> list[int]:
    """The processes of Ray Data's teacher actors (their command line names the class)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if cmdline.startswith("ray::") and "_Teacher" in cmdline:
                pids.append(int(entry.name))
    return pids


def test_a_workers_user_error_comes_back_as_one_line():
    """A PseudoLabelError raised in a Ray Train worker is re-raised as itself (exit code 2)."""
    from ray.train import WorkerGroupError

    from pseudolabel.errors import PseudoLabelError
    from pseudolabel.strategies import _worker_error

    failure = WorkerGroupError("rank 0 failed", {0: PseudoLabelError("models/teacher.keras: no")})
    error = _worker_error(failure)
    assert isinstance(error, PseudoLabelError) and str(error) == "models/teacher.keras: no"
    other = WorkerGroupError("rank 1 failed", {1: ValueError("a bug")})
    assert _worker_error(other) is other


@pytest.mark.slow
def test_two_worker_training_survives_a_killed_worker(
    ray_cluster, digits_data, tmp_path, tracking_uri
):
    """train.strategy=multi_worker: SIGKILL the chief's process once the run holds a checkpoint
    (an epoch's training state, reported with ray.train.report). Ray Train (ray.max_failures)
    restarts both workers, which start again from that checkpoint: the chief continues its
    MLflow run, and the stage ends with every epoch once in the history and in MLflow, its
    state folder and the run's storage removed."""
    import signal

    import mlflow

    from pseudolabel import tracking
    from pseudolabel.config import compose
    from pseudolabel.stages import train_teacher

    cfg = compose([*_two_worker_teacher(ray_cluster), "ray.max_failures=1"])
    paths = Paths(tmp_path / "killed_worker", data_root=digits_data.input_root)
    run_dir = paths.models / ".resume" / "teacher.ray"  # the Ray Train run's storage
    client = mlflow.MlflowClient(tracking_uri)
    before = {r.info.run_id for r in client.search_runs(_experiments(client))}
    thread, result = _in_thread(lambda: train_teacher(cfg, paths))
    killed = None
    deadline = time.monotonic() + 600
    while killed is None and thread.is_alive() and time.monotonic() < deadline:
        if _checkpoint_registered(run_dir):  # an epoch's state is the run's checkpoint
            for run in client.search_runs(_experiments(client), "attributes.status = 'RUNNING'"):
                if run.info.run_id not in before and run.info.run_name == "train_teacher":
                    killed = int(run.data.tags[tracking.PROCESS_TAG].split("|")[2])
                    os.kill(killed, signal.SIGKILL)  # the chief's Ray Train worker
        time.sleep(0.05)
    thread.join(timeout=600)
    assert killed is not None, "the chief was not found running after a checkpoint"
    assert "error" not in result, result.get("error")
    with pytest.raises(ProcessLookupError):
        os.kill(killed, 0)

    _resumed_once(result["value"], paths, client, before)


_EPOCHS = 6  # the two-worker teacher's, all run (patience as long)


def _two_worker_teacher(address: str) -> list[str]:
    """The smoke teacher on two Ray Train workers of the cluster at `address`."""
    return [
        "+experiment=smoke",
        "teacher.train.strategy=multi_worker",
        "teacher.train.workers=2",
        f"teacher.train.epochs={_EPOCHS}",
        f"teacher.train.patience={_EPOCHS}",
        f"ray.address={address}",
    ]


def _resumed_once(metrics: dict, paths: Paths, client, before: set) -> None:
    """The interrupted teacher ended as one uninterrupted one would look: every epoch once in
    its history and in MLflow, in the chief's one run (continued: tag pseudolabel_resumed),
    and no training state or Ray Train storage left."""
    from pseudolabel.models import io as model_io

    assert metrics["epochs"] == _EPOCHS
    history = pd.read_csv(paths.history("teacher"))
    assert history["epoch"].tolist() == list(range(_EPOCHS))  # the redone epoch once
    new = [r for r in client.search_runs(_experiments(client)) if r.info.run_id not in before]
    meta = model_io.read_meta(paths.model("teacher"))
    assert [r.info.run_id for r in new] == [meta.run_id]  # the chief's one run, continued
    run = new[0]
    assert run.info.status == "FINISHED"
    assert run.data.tags.get("pseudolabel_resumed") == "true"  # restored from a checkpoint
    steps = {m.step for m in client.get_metric_history(run.info.run_id, "val_accuracy")}
    assert steps == set(range(_EPOCHS))
    assert not (paths.models / ".resume").exists()  # the state and the run's storage


def _checkpoint_registered(run_dir: Path) -> bool:
    """Whether Ray Train has registered a checkpoint of the run (its checkpoint manager's
    snapshot names one): a worker's report returns before that, so a kill right after the
    first report may leave a run with no checkpoint, which starts from the first epoch."""
    import json

    try:
        snapshot = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
    except (OSError, ValueError):
        return False
    return bool(snapshot.get("latest_checkpoint_result"))


def _epochs_saved(state: Path) -> int:
    """The epochs a training state file says are done (0 while there is none)."""
    import json

    try:
        return int(json.loads(state.read_text())["epoch"])
    except (OSError, ValueError, KeyError):
        return 0


_KILLED_DRIVER = """
import sys
from pathlib import Path

from pseudolabel.config import compose
from pseudolabel.paths import Paths
from pseudolabel.stages import train_teacher

root, data_root, overrides = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
train_teacher(compose(overrides), Paths(root, data_root=data_root))
"""


@pytest.mark.slow
def test_two_worker_training_resumes_after_its_driver_is_killed(
    ray_cluster, digits_data, tmp_path, tracking_uri
):
    """The stage's own process (the Ray Train driver, what `dvc repro` runs) SIGKILLed
    mid-training: its workers go with it, the run's storage (<models>/.resume/teacher.ray)
    stays, and the next run of the stage restores the Ray Train run from it and resumes from
    its last checkpoint, in the same MLflow run."""
    import signal
    import subprocess
    import sys

    import mlflow

    from pseudolabel.config import compose
    from pseudolabel.stages import train_teacher

    overrides = _two_worker_teacher(ray_cluster)
    root = tmp_path / "killed_driver"
    paths = Paths(root, data_root=digits_data.input_root)
    state = paths.models / ".resume" / "teacher" / "state.json"
    client = mlflow.MlflowClient(tracking_uri)
    before = {r.info.run_id for r in client.search_runs(_experiments(client))}
    env = {
        **os.environ,
        "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "MLFLOW_TRACKING_URI": tracking_uri,
    }
    driver = subprocess.Popen(
        [sys.executable, "-c", _KILLED_DRIVER, str(root), str(digits_data.input_root),
         *overrides],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 600
    while driver.poll() is None and time.monotonic() < deadline:
        if _checkpoint_registered(paths.models / ".resume" / "teacher.ray"):
            driver.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    driver.wait(timeout=60)
    assert driver.returncode == -signal.SIGKILL, "the stage ended before it could be killed"
    assert any((paths.models / ".resume" / "teacher.ray").glob("checkpoint_*"))
    killed_at = _epochs_saved(state)

    _resumed_once(train_teacher(compose(overrides), paths), paths, client, before)
    assert 1 <= killed_at < _EPOCHS
