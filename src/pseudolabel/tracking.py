"""MLflow: one place that sets the store, names runs and attaches tags every run carries.

Which `mlflow.db`: a relative store (`sqlite:///mlflow.db`, the default) is resolved against
the *project root*, never the working directory: `DVC_ROOT` when set (DVC sets it for every
stage command and, for `dvc exp run --queue`/`--temp`, points it at the parent repository, not
the temporary copy the experiment runs in), else the nearest folder above the working directory
that holds `.dvc/`, else the working directory. So a stage, a sweep job and a queued DVC
experiment all write to the same project database.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import socket
import subprocess
import urllib.request
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
from omegaconf import OmegaConf

from pseudolabel.errors import PseudoLabelError

log = logging.getLogger(__name__)

SQLITE = "sqlite:///"
KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING = "custom_model_development"


def project_root() -> Path:
    """The project the MLflow store belongs to (see the module docstring)."""
    if os.environ.get("DVC_ROOT"):
        return Path(os.environ["DVC_ROOT"]).resolve()
    cwd = Path.cwd().resolve()
    return next((d for d in (cwd, *cwd.parents) if (d / ".dvc").is_dir()), cwd)


def tracking_uri(cfg) -> str:
    """MLFLOW_TRACKING_URI, else `tracking.uri`; a relative sqlite/file store made absolute."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or cfg.tracking.uri
    if uri.startswith(SQLITE):
        path = uri[len(SQLITE) :]
        if path and path != ":memory:" and not Path(path).is_absolute():
            return SQLITE + str(project_root() / path)
    elif "://" not in uri and not Path(uri).is_absolute():  # a plain folder: the file store
        return str(project_root() / uri)
    return uri


def use_store(cfg) -> str:
    """Point MLflow at the configured store: the one place set_tracking_uri is called, and
    only when it changes (a process sets it once, however many runs it opens)."""
    uri = tracking_uri(cfg)
    if mlflow.get_tracking_uri() != uri:
        mlflow.set_tracking_uri(uri)
    return uri


def configure(cfg) -> None:
    uri = use_store(cfg)
    name = cfg.tracking.experiment
    if uri.startswith(SQLITE) and mlflow.get_experiment_by_name(name) is None:
        # Artifacts beside the database (the project's mlruns/ for the default store), whichever
        # folder (a DVC temp copy, a sweep job) the experiment happens to be created from.
        artifacts = Path(uri[len(SQLITE) :]).resolve().parent / "mlruns"
        # (suppressed: another process created it meanwhile)
        with contextlib.suppress(mlflow.exceptions.MlflowException):
            mlflow.create_experiment(name, artifacts.as_uri())
    experiment = mlflow.set_experiment(name)
    if KIND_TAG not in experiment.tags:
        # "Model training", not GenAI: what MLflow UIs without the workflow toggle read (3.17's
        # toggle decides per browser, docs/team.md).
        mlflow.MlflowClient().set_experiment_tag(experiment.experiment_id, KIND_TAG, MODEL_TRAINING)


HTTP = ("http://", "https://")


def _one_line(exc: BaseException) -> str:
    """An exception as one short line (sqlalchemy's messages carry the SQL and a URL)."""
    text = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {text[:300]}"


SQLITE_MAGIC = b"SQLite format 3\x00"


def check_reachable(cfg, timeout: float = 10) -> None:
    """Open the tracking store once; raise PseudoLabelError, in one line, if it cannot be used:
    a server that does not answer within `tracking.start_wait` seconds (a restart: the stage
    waits for it, saying so; MLflow's own client would retry for minutes at every call) or a
    local database that is not one (MLflow would end the stage in a sqlalchemy traceback)."""
    uri = tracking_uri(cfg)
    if uri.startswith(HTTP):
        _wait_for_server(uri, float(cfg.tracking.start_wait), timeout)
    if uri.startswith(SQLITE):
        db = Path(uri[len(SQLITE) :])
        if db.is_file() and db.stat().st_size:
            with open(db, "rb") as f:
                if f.read(len(SQLITE_MAGIC)) != SQLITE_MAGIC:
                    raise PseudoLabelError(_corrupt(uri, db, "not an SQLite database"))
    try:
        if uri.startswith(HTTP):
            urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout).close()
        configure(cfg)
        mlflow.search_experiments(max_results=1)
    except Exception as exc:  # sqlalchemy, urllib and MLflow raise many types
        if uri.startswith(SQLITE):
            db = Path(uri[len(SQLITE) :])
            if not db.is_file():
                raise PseudoLabelError(
                    f"MLflow tracking store {uri!r} cannot be created ({_one_line(exc)}); check "
                    "that its folder exists and is writable, or fix tracking.uri."
                ) from None
            raise PseudoLabelError(_corrupt(uri, db, _one_line(exc))) from None
        raise PseudoLabelError(
            f"MLflow tracking URI {uri!r} cannot be reached ({_one_line(exc)}); "
            "start the server, fix tracking.uri in conf/tracking/, or unset MLFLOW_TRACKING_URI."
        ) from None


def _wait_for_server(uri: str, seconds: float, timeout: float) -> None:
    """Until the server's /health answers, for up to `seconds` (one warning when it does not at
    once); the caller's own check then reports a server that never answered."""
    import time

    deadline = time.monotonic() + seconds
    warned = False
    while True:
        try:
            urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout).close()
            if warned:
                log.warning("the tracking server %s answers: going on", uri)
            return
        except OSError as exc:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            if not warned:
                log.warning(
                    "the tracking server %s does not answer (%s): waiting up to %g s for it "
                    "(tracking.start_wait)",
                    uri,
                    _one_line(exc),
                    seconds,
                )
                warned = True
            time.sleep(min(2.0, left))


def _corrupt(uri: str, db: Path, why: str) -> str:
    return (
        f"MLflow tracking store {uri!r} cannot be opened ({why}): the file is damaged. Move it "
        f"aside (`mv {db} {db}.broken`) to start a new, empty store (the old runs stay in the "
        "moved file), or point tracking.uri / MLFLOW_TRACKING_URI at a working store."
    )


def md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def git_commit(cwd: Path | None = None) -> str | None:
    """The commit checked out at `cwd` (the working directory by default); None outside git."""
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=cwd,
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def context_tags() -> dict[str, str]:
    """Tags that place a run: git commit and, inside `dvc exp run`, the DVC experiment."""
    tags = {}
    commit = git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    for env, tag in (
        ("DVC_EXP_NAME", "dvc.exp_name"),
        ("DVC_EXP_BASELINE_REV", "dvc.baseline_rev"),
    ):
        if os.environ.get(env):
            tags[tag] = os.environ[env]
    return tags


CONFIG_ARTIFACT = "config.yaml"  # the full composed config, on every run

# Which process opened a run: "host|boot id|pid|process start time". A run left RUNNING whose
# process has ended was killed (SIGKILL, out of memory, power): the next stage run marks it
# FAILED (see close_orphaned_runs).
PROCESS_TAG = "pseudolabel_process"
_SEP = "|"


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _start_time(pid: int) -> str | None:
    """When process `pid` started (clock ticks since boot, from /proc), "" where /proc is not
    available but the process exists, None when there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[19]  # field 22, counted after the name
    except FileNotFoundError:
        if Path("/proc/self/stat").exists():
            return None
    except (OSError, IndexError):
        pass
    try:  # no /proc (macOS): whether the pid exists at all
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except OSError:
        pass
    return ""


def process_id(pid: int | None = None) -> str:
    """The PROCESS_TAG value of process `pid` (default: this one)."""
    pid = os.getpid() if pid is None else pid
    return _SEP.join([socket.gethostname(), _boot_id(), str(pid), _start_time(pid) or ""])


def _ended(process: str) -> bool:
    """True when the process a PROCESS_TAG names has surely ended; False when it may run still
    (or ran on another machine, which cannot be checked from here)."""
    try:
        host, boot, pid, started = process.split(_SEP)
    except ValueError:
        return False
    if host != socket.gethostname():
        return False
    if boot and boot != _boot_id():
        return True  # the machine restarted since
    now = _start_time(int(pid))
    return now is None or bool(started and now and now != started)  # gone, or the pid reused


FAILURE_TAG = "pseudolabel_failure"


def close_orphaned_runs(client: mlflow.MlflowClient | None = None) -> list[str]:
    """Mark FAILED the runs left RUNNING by a stage process of this machine that has ended
    (killed before it could close its run); returns their ids. Runs of live processes (a
    parallel sweep job) and of other machines are left alone."""
    client = client or mlflow.MlflowClient()
    experiments = [e.experiment_id for e in client.search_experiments()]
    host = socket.gethostname().replace("'", "")
    runs = client.search_runs(
        experiments,
        f"attributes.status = 'RUNNING' and tags.{PROCESS_TAG} LIKE '{host}{_SEP}%'",
        max_results=1000,
    )
    closed = []
    for run in runs:
        process = run.data.tags.get(PROCESS_TAG, "")
        if not _ended(process):
            continue
        client.set_tag(
            run.info.run_id,
            FAILURE_TAG,
            f"process {process.split(_SEP)[2]} ended without closing this run (killed?)",
        )
        client.set_terminated(run.info.run_id, status="FAILED")
        log.warning(
            "MLflow run %s (%s) was left RUNNING by process %s, which has ended (killed?): "
            "marked FAILED",
            run.info.run_id,
            run.info.run_name,
            process.split(_SEP)[2],
        )
        closed.append(run.info.run_id)
    return closed


def warn_unknown_run(client: mlflow.MlflowClient, run_id: str | None, what: str) -> bool:
    """Log one warning when the store holds no run `run_id` that an earlier output recorded
    (the store was deleted, recreated or swapped since): the lineage stops there. True if
    the run is missing."""
    if not run_id or run_id == "None" or find_run(client, run_id) is not None:
        return False
    log.warning(
        "MLflow store %s has no run %s (%s): the store was deleted, recreated or replaced "
        "since; this run's lineage stops there (restore the old mlflow.db to keep it whole)",
        mlflow.get_tracking_uri(),
        run_id,
        what,
    )
    return True


@contextmanager
def start_run(
    cfg,
    stage: str,
    params: Mapping[str, Any] | None = None,
    tags: Mapping[str, Any] | None = None,
    resume_run: str | None = None,
) -> Iterator[mlflow.ActiveRun]:
    """A run named after its stage, with the stage's params and the context tags. Runs that
    killed stages left RUNNING are marked FAILED first; a teacher run the tags name but the
    store does not hold is reported (see warn_unknown_run). `resume_run`: the run of an
    interrupted training this one resumes (pseudolabel.resume), continued rather than a new one
    when the store still holds it."""
    configure(cfg)
    client = mlflow.MlflowClient()
    close_orphaned_runs(client)
    tags = dict(tags or {})
    warn_unknown_run(client, tags.get(TEACHER_TAG), "the teacher's, recorded in its metadata")
    all_tags = {
        "stage": stage,
        PROCESS_TAG: process_id(),
        **context_tags(),
        **{k: str(v) for k, v in tags.items()},
    }
    interrupted = find_run(client, resume_run) if resume_run else None
    nested = mlflow.active_run() is not None  # inside a sweep job's run: its child
    if interrupted is not None:
        if FAILURE_TAG in interrupted.data.tags:  # close_orphaned_runs' note: no longer true
            client.delete_tag(resume_run, FAILURE_TAG)
        run = mlflow.start_run(run_id=resume_run, nested=nested)
        mlflow.set_tags({**all_tags, "pseudolabel_resumed": "true"})
        log.info("continuing MLflow run %s of the interrupted training", resume_run)
    else:
        if resume_run:
            warn_unknown_run(client, resume_run, "the interrupted training's")
        run = mlflow.start_run(run_name=stage, tags=all_tags, nested=nested)
        mlflow.log_text(OmegaConf.to_yaml(cfg), CONFIG_ARTIFACT)
        if params:
            mlflow.log_params(flatten(params))
    try:
        yield run
    except BaseException:
        # A server that went away cannot be told the run failed: the next run of the stage
        # resumes and closes it (or close_orphaned_runs marks it FAILED).
        with contextlib.suppress(*OUTAGE), quick_requests():
            mlflow.end_run("FAILED")
        raise
    mlflow.end_run("FINISHED")


# --- A tracking server that goes away mid-training ----------------------------------------------

# What MLflow's client raises when its server does not answer (requests' errors are OSErrors).
OUTAGE = (mlflow.exceptions.MlflowException, OSError)


@contextmanager
def quick_requests(retries: int = 0, timeout: int = 10) -> Iterator[None]:
    """Outbox's requests to a server that went away fail within seconds, not after MLflow's 7
    retries with backoff (minutes a call), so the training is not held up. Settings of the
    user's own (MLFLOW_HTTP_REQUEST_*) win."""
    wanted = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(retries),
              "MLFLOW_HTTP_REQUEST_TIMEOUT": str(timeout)}  # fmt: skip
    mine = {k: v for k, v in wanted.items() if k not in os.environ}
    os.environ.update(mine)
    try:
        yield
    finally:
        for key in mine:
            os.environ.pop(key, None)


class Outbox:
    """A training run's per-epoch metrics: sent at once, or, while the tracking server does not
    answer, kept in order (`pending`, which the training state saves: pseudolabel.resume) and
    sent as soon as it answers again. The training goes on either way."""

    def __init__(self, run_id: str, pending: list | None = None):
        self.run_id = run_id
        self.pending: list[dict] = pending if pending is not None else []
        self._down = False

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        values = {k: float(v) for k, v in metrics.items()}
        self.pending.append({"step": int(step), "time": _now_ms(), "metrics": values})
        self.flush()

    def flush(self) -> bool:
        """Send what is kept; True when nothing is left."""
        from mlflow.entities import Metric

        client = mlflow.MlflowClient()
        while self.pending:
            entry = self.pending[0]
            batch = [
                Metric(k, v, entry["time"], entry["step"]) for k, v in entry["metrics"].items()
            ]
            try:
                with quick_requests():
                    client.log_batch(self.run_id, metrics=batch)
            except OUTAGE as exc:
                if not self._down:
                    log.warning(
                        "the tracking server does not answer (%s): training goes on, the metrics "
                        "of epoch %d on are kept and sent when it answers",
                        _one_line(exc),
                        entry["step"] + 1,
                    )
                self._down = True
                return False
            self.pending.pop(0)
        if self._down:
            log.warning("the tracking server answers again: the kept metrics are sent")
        self._down = False
        return True

    def wait(self, seconds: float) -> bool:
        """Flush, retrying for up to `seconds`; True when everything was sent."""
        import time

        deadline = time.monotonic() + seconds
        while not self.flush():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            time.sleep(min(5.0, left))
        return True


def _now_ms() -> int:
    import time

    return int(time.time() * 1000)


# --- Lineage: student run -> pseudo-label CSV -> labeling run -> teacher run -> data ------------

# Tags every student run carries, whoever made it (pipeline, sweep job, DVC experiment).
CSV_TAG = "pseudo_label_csv_md5"
TEACHER_TAG = "teacher_run_id"
MERGED_TAG = "merged_data_md5"
LABELED_TAG = "labeled_data_md5"
UNLABELED_TAG = "unlabeled_data_md5"


def dvc_hash(path: Path) -> str:
    """The hash DVC records in dvc.lock for `path`: a file's md5, a folder's `<md5>.dir`.

    A folder's files are looked up in the DVC project's state first (the table of inode, mtime
    and size to md5 that `dvc repro` fills as it checks a stage's deps and saves its outs), so a
    folder DVC has just hashed costs a stat per file, not a read of it: the lineage tags of a
    stage whose deps are 59,800 images. Outside a DVC project, or when the state fails (its
    sqlite table locked by another process), every file is read."""
    if Path(path).is_file():
        return md5(Path(path))
    from dvc_data.hashfile.build import build
    from dvc_data.hashfile.db import HashFileDB
    from dvc_data.hashfile.state import StateNoop
    from dvc_objects.fs.local import LocalFileSystem
    from dvc_objects.fs.memory import MemoryFileSystem

    def tree_hash(state) -> str:
        staging = HashFileDB(MemoryFileSystem(), "/staging", state=state)
        return build(staging, folder, LocalFileSystem(), "md5")[2].hash_info.value

    folder = str(Path(path).resolve())
    try:
        with _dvc_state(folder) as state:
            return tree_hash(state)
    except Exception as exc:  # the state only saves reading (e.g. its database is locked)
        log.debug("DVC state not usable for %s (%s: %s)", folder, type(exc).__name__, exc)
        return tree_hash(StateNoop())


@contextmanager
def _dvc_state(folder: str) -> Iterator[Any]:
    """The state of the DVC project that holds `folder` (closed after use), or DVC's no-op
    state where there is none or it cannot be opened: then the hash is computed in full."""
    from dvc_data.hashfile.state import StateNoop

    try:
        from dvc.repo import Repo

        repo = Repo(Repo.find_root(folder))
    except Exception as exc:  # not a DVC project, or one this DVC cannot read: hash in full
        log.debug("no DVC state for %s (%s: %s)", folder, type(exc).__name__, exc)
        yield StateNoop()
        return
    try:
        yield repo.state
    finally:
        repo.close()


def lineage_tags(cfg, paths, teacher_run_id: str | None) -> dict[str, Any]:
    """What a student was made from: teacher run, CSV, merged set, data, selection settings."""
    selection = flatten(OmegaConf.to_container(cfg.pseudo_label, resolve=True), "pseudo_label.")
    return {
        TEACHER_TAG: teacher_run_id,
        CSV_TAG: md5(paths.csv),
        MERGED_TAG: dvc_hash(paths.merged),
        LABELED_TAG: dvc_hash(paths.train),
        UNLABELED_TAG: dvc_hash(paths.unlabeled),
        **selection,
    }


def _digest(dvc_md5: str) -> str:
    return dvc_md5.removesuffix(".dir")  # MLflow keeps at most 36 characters


def log_lineage_inputs(run_id: str, cfg, paths, tags: Mapping[str, Any]) -> None:
    """Attach the student's inputs (`mlflow.log_input`, digests = the DVC hashes) and a note
    whose links lead, one click per hop, to the labeling and teacher runs."""
    import pandas as pd
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    tables = (
        ("pseudo_labels", paths.csv, tags[CSV_TAG], "pseudo_labels"),
        ("train_ssl", paths.merged_manifest, tags[MERGED_TAG], "training"),
    )
    folders = (
        ("image_dataset/train", paths.train, tags[LABELED_TAG], "teacher_training"),
        ("unlabeled", paths.unlabeled, tags[UNLABELED_TAG], "unlabeled"),
    )
    configure(cfg)
    labeling = find_labeling_run(tags[CSV_TAG], mlflow.MlflowClient())

    def source(path: Path):
        with warnings.catch_warnings():  # "local" resolves two equal ways; either is right
            warnings.simplefilter("ignore", UserWarning)
            return resolve_dataset_source(str(Path(path).resolve()))

    with mlflow.start_run(run_id=run_id, nested=mlflow.active_run() is not None):
        for name, path, digest, context in tables:
            dataset = mlflow.data.from_pandas(
                pd.read_csv(path), source=source(path), name=name, digest=_digest(digest)
            )
            mlflow.log_input(dataset, context=context)
        for name, path, digest, context in folders:
            dataset = MetaDataset(source(path), name=name, digest=_digest(digest))
            mlflow.log_input(dataset, context=context)
        mlflow.set_tag("mlflow.note.content", _lineage_note(tags, labeling))


def _run_link(run) -> str:
    info = run.info
    return f"[{info.run_name} {info.run_id}](#/experiments/{info.experiment_id}/runs/{info.run_id})"


def find_run(client: mlflow.MlflowClient, run_id: str | None):
    """The run, or None when there is no id or this tracking store does not hold it (a teacher
    trained against another store, or deleted)."""
    if not run_id or run_id == "None":
        return None
    try:
        return client.get_run(run_id)
    except mlflow.exceptions.MlflowException:
        return None


def _lineage_note(tags: Mapping[str, Any], labeling) -> str:
    teacher = find_run(mlflow.MlflowClient(), tags.get(TEACHER_TAG))
    return "\n".join(
        [
            "**Lineage** (`pseudolabel lineage <this run id>` prints it)",
            "",
            f"- pseudo-label CSV md5 `{tags[CSV_TAG]}`, made by "
            + (_run_link(labeling) if labeling else "an unknown run"),
            "- teacher: " + (_run_link(teacher) if teacher else "unknown"),
            f"- merged set `{tags[MERGED_TAG]}`, labeled train `{tags[LABELED_TAG]}`, "
            f"unlabeled `{tags[UNLABELED_TAG]}` (DVC hashes, as in dvc.lock)",
        ]
    )


def find_labeling_run(csv_md5: str, client: mlflow.MlflowClient):
    """The most recent pseudo_label run that wrote a CSV with this md5, or None."""
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(
        experiments,
        f"tags.{CSV_TAG} = '{csv_md5}' and tags.stage = 'pseudo_label'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0] if runs else None


def lineage(run_id: str) -> list[tuple[str, str]]:
    """The chain student -> CSV md5 -> labeling run -> teacher run -> data, as (hop, text).
    A later round's teacher is the previous round's student: the chain goes on through it,
    one round per hop, down to the first teacher."""
    client = mlflow.MlflowClient()
    try:
        student = client.get_run(run_id)
    except mlflow.exceptions.MlflowException:
        raise PseudoLabelError(
            f"MLflow run {run_id!r} not found in {mlflow.get_tracking_uri()}; copy the id from "
            "the MLflow UI or `mlflow runs list`, and check MLFLOW_TRACKING_URI."
        ) from None
    if CSV_TAG not in student.data.tags:
        raise PseudoLabelError(
            f"run {run_id} ({student.info.run_name}) has no {CSV_TAG} tag: it is not a student "
            "run; pass the id of a train_student run."
        )
    chain: list[tuple[str, str]] = []
    seen = {run_id}
    while True:
        hops, teacher = _student_hops(student, client)
        chain += hops
        if teacher is None or CSV_TAG not in teacher.data.tags or teacher.info.run_id in seen:
            break
        seen.add(teacher.info.run_id)
        student = teacher  # the previous round's student: follow its own chain
    tags = student.data.tags
    chain.append(
        (
            "data",
            f"labeled train {tags.get(LABELED_TAG, '?')}, unlabeled {tags.get(UNLABELED_TAG, '?')}",
        )
    )
    return chain


def _student_hops(student, client: mlflow.MlflowClient) -> tuple[list[tuple[str, str]], Any]:
    """One round's hops (student -> selection -> merged set -> CSV -> labeling -> teacher),
    and the teacher's run (None if it has none)."""
    run_id, tags = student.info.run_id, student.data.tags
    round_ = tags.get("round", "1")
    dvc_exp = tags.get("dvc.exp_name")
    chain = [
        (
            f"round {round_} student",
            f"{run_id} ({student.info.run_name}, {student.info.status}, commit "
            f"{tags.get('mlflow.source.git.commit', '?')[:10]}"
            + (f", dvc exp {dvc_exp}" if dvc_exp else "")
            + f") config: {student.info.artifact_uri}/{CONFIG_ARTIFACT}",
        ),
        (
            "selection",
            ", ".join(
                f"{k.split('.', 1)[1]}={v}"
                for k, v in sorted(tags.items())
                if k.startswith("pseudo_label.")
            ),
        ),
        ("merged set", f"{tags.get(MERGED_TAG, '?')}"),
        ("pseudo-label CSV md5", tags[CSV_TAG]),
    ]
    labeling = find_labeling_run(tags[CSV_TAG], client)
    chain.append(
        (
            "labeling run",
            f"{labeling.info.run_id} ({labeling.info.run_name})"
            if labeling
            else "not found: no pseudo_label run logged a CSV with this md5",
        )
    )
    teacher_id = tags.get(TEACHER_TAG)
    if labeling and labeling.data.tags.get(TEACHER_TAG) not in (None, teacher_id):
        chain.append(
            (
                "warning",
                f"the labeling run's teacher {labeling.data.tags[TEACHER_TAG]} "
                f"is not the student's {teacher_id}",
            )
        )
    if not teacher_id or teacher_id == "None":
        chain.append(("teacher run", "unknown (the teacher has no MLflow run)"))
        return chain, None
    teacher = find_run(client, teacher_id)
    if teacher is None:
        chain.append(("teacher run", f"{teacher_id} (not in {mlflow.get_tracking_uri()})"))
        return chain, None
    accuracy = teacher.data.metrics.get("best_val_accuracy")
    previous = CSV_TAG in teacher.data.tags  # a student of the round before
    chain.append(
        (
            "teacher run",
            f"{teacher_id} ({teacher.info.run_name}"
            + (f", val accuracy {accuracy:.4f}" if accuracy is not None else "")
            + (f", the round {teacher.data.tags.get('round', '?')} student" if previous else "")
            + ")",
        )
    )
    return chain, teacher
