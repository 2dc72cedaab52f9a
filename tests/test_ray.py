"""pseudo_label.engine=ray on a real two-node Ray cluster (localhost) writes the local CSVs."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pseudolabel.paths import Paths

ray = pytest.importorskip("ray")  # the optional extra (pip install ".[ray]")

SRC = Path(__file__).resolve().parents[1] / "src"
RAY = Path(sys.executable).with_name("ray")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ours(temp_dir: str) -> list[int]:
    """The pids of this cluster's Ray processes: the daemons, which name its temp dir, and
    their descendants (the workers, whose command line Ray rewrites)."""
    parents: dict[int, int] = {}
    roots: set[int] = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        pid = int(entry.name)
        parents[pid] = int(stat.rpartition(")")[2].split()[1])
        if temp_dir in cmdline:
            roots.add(pid)
    ours = set(roots)
    grown = True
    while grown:
        children = {pid for pid, parent in parents.items() if parent in ours} - ours
        ours |= children
        grown = bool(children)
    return sorted(ours)


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")  # so that a killed run still stops the cluster


@pytest.fixture
def ray_cluster():
    """A head node and a worker node on localhost, one CPU each; its address. Stopped after,
    even on failure: `ray stop --force` would also kill other Ray clusters on this machine,
    so the teardown kills only the processes that name this cluster's own temp dir."""
    temp_dir = tempfile.mkdtemp(prefix="ray17-", dir="/tmp")  # short: Unix socket paths
    port = _free_port()
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
    }
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    # Explicit, so a token left in ~/.ray by another cluster cannot split head and worker.
    env["RAY_AUTH_MODE"] = "disabled"
    os.environ["RAY_AUTH_MODE"] = "disabled"  # the driver (ray.init in the stage) too
    common = ["--num-cpus=1", "--disable-usage-stats"]
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        subprocess.run(
            [str(RAY), "start", "--head", f"--port={port}", "--include-dashboard=false",
             f"--temp-dir={temp_dir}", "--node-ip-address=127.0.0.1", *common],
            env=env, check=True, capture_output=True, timeout=120,
        )  # fmt: skip
        for attempt in range(3):  # a loaded machine may not have the head's GCS ready yet
            worker = subprocess.run(
                [str(RAY), "start", f"--address=127.0.0.1:{port}", "--node-ip-address=127.0.0.1",
                 *common],
                env=env, capture_output=True, text=True, timeout=120,
            )  # fmt: skip
            if worker.returncode == 0:
                break
            time.sleep(5 * (attempt + 1))
        else:
            pytest.fail(f"the worker node did not start: {worker.stderr[-2000:]}")
        yield f"127.0.0.1:{port}"
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in _ours(temp_dir):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            time.sleep(1)
        shutil.rmtree(temp_dir, ignore_errors=True)
        signal.signal(signal.SIGTERM, previous)


@pytest.fixture
def project(digits_data, tmp_path, tracking_uri) -> Paths:
    """The digits images plus one file that cannot be decoded, and a trained teacher."""
    from pseudolabel.config import compose
    from pseudolabel.stages import train_teacher

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
    ],
)
def test_engine_and_ray_keys_are_checked(override, message):
    from pseudolabel.config import compose
    from pseudolabel.errors import PseudoLabelError

    with pytest.raises(PseudoLabelError, match=message):
        compose(["+experiment=smoke", override])
