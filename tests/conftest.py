"""Shared fixtures: a tiny digits project, built once per session through the real stages."""

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

import pytest

from pseudolabel.config import compose  # pseudolabel sets TF_CPP_MIN_LOG_LEVEL
from pseudolabel.paths import Paths

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"
RAY = Path(sys.executable).with_name("ray")


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

# Fixtures that train models (directly or through fixtures they use): a test that uses one is
# an end-to-end test whatever its own cost, so `-m "not slow"` (make test-fast) leaves it out.
TRAINING_FIXTURES = {"pipeline"}


# pytest-xdist (`make test` runs `-n 2 --dist loadfile --no-loadscope-reorder`): each module runs
# on one worker, so a module-scoped fixture (test_dvc_pipeline's ten-minute `ran`) runs once, and
# the two modules on the session's Ray cluster go to the same worker, so one cluster serves both
# (xdist's own `loadgroup` would do this with marks, but with pytest 9.2 its group suffix no
# longer reaches the node ids, and every test became its own group). Modules go out in
# collection order, longest first (`--durations` of `pytest -m slow` on 2 vCPUs: about 11, 12,
# 8, 6, 4 and 2 minutes), so that no worker is left with a long one while the other idles.
SHARED_GROUPS = {"test_ray": "ray_cluster", "test_sweep": "ray_cluster"}
LONGEST_FIRST = [
    "test_dvc_pipeline",
    "ray_cluster",
    "test_resume",
    "test_project",
    "test_consistency",
    "test_faults",
]


def _group(nodeid: str) -> str:
    module = nodeid.split("::", 1)[0].rpartition("/")[2].removesuffix(".py")
    return SHARED_GROUPS.get(module, module)


def pytest_collection_modifyitems(items):
    for item in items:
        if TRAINING_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)

    def rank(item) -> int:
        group = _group(item.nodeid)
        return LONGEST_FIRST.index(group) if group in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: each module keeps its own order


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist, which a plain `pytest` lacks
def pytest_xdist_make_scheduler(config, log):
    """`--dist loadfile` with the modules of SHARED_GROUPS as one file."""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class ModuleGroups(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _group(nodeid)

    return ModuleGroups(config, log)


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


# --- A real two-node Ray cluster on localhost (tests/test_ray.py, tests/test_sweep.py) -----


def wait_until_answers(url: str, proc: subprocess.Popen, output, seconds: float = 120) -> None:
    """Poll `url` until it answers; fail with the server's last output (`output()`) as soon as
    `proc` has exited, or after `seconds`."""
    import urllib.request

    deadline = time.monotonic() + seconds
    while True:
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except OSError:
            assert proc.poll() is None, output()[-3000:]
            assert time.monotonic() < deadline, f"{url}: no answer in {seconds} s"
            time.sleep(1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ours(temp_dir: str, port: int) -> list[int]:
    """The pids of this cluster's Ray processes: the daemons, which name its temp dir or its
    GCS port (the head's Ray Client server names only the port, and is re-parented to init),
    and their descendants (the workers, whose command line Ray rewrites)."""
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
        if temp_dir in cmdline or f":{port}\x00" in cmdline or f":{port} " in cmdline:
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


@pytest.fixture(scope="session")
def ray_cluster():
    """A head node and a worker node on localhost, one CPU each; its address (one per test
    session, shared by tests/test_ray.py and tests/test_sweep.py: starting one costs tens of
    seconds). Stopped after,
    even on failure: `ray stop --force` would also kill other Ray clusters on this machine,
    so the teardown kills only the processes that name this cluster's own temp dir."""
    temp_dir = tempfile.mkdtemp(prefix="ray17-", dir="/tmp")  # short: Unix socket paths
    port = free_port()
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
            for pid in _ours(temp_dir, port):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            time.sleep(1)
        shutil.rmtree(temp_dir, ignore_errors=True)
        signal.signal(signal.SIGTERM, previous)
