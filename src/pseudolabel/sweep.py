"""`pseudolabel-sweep`: a Hydra app over `conf/` for multirun sweeps of the selection and student.

    pseudolabel-sweep -m pseudo_label.threshold=0.5,0.6,0.7,0.8,0.9

Run it from the project root after `dvc repro` (or `dvc repro pseudo_label`). Each job reuses the
pipeline's teacher and `outputs/data.csv`, copied into its own job folder
(`multirun/<date>/<time>/<job>/`), then runs merge, train_student and evaluate there: it reads
the project's images and never writes over the DVC workspace outputs. A job whose overrides
change a parameter the teacher or the labeling depends on (those stages' `params`, read
through DVC's own API, not re-parsed here) trains its own teacher and relabels in its folder;
a change to the data set itself (the ingest stage's params) is refused: use
`dvc exp run -S ... --queue` for that.

`MlflowSweepCallback` (conf/sweep.yaml) checks every job's config before the first one trains,
makes one MLflow parent run per multirun, a child run per job and a summary at the end. The task
function returns the student's test accuracy, so `hydra/sweeper=optuna` can search instead.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import shutil
import sys
import traceback
from pathlib import Path
from typing import Any

import hydra
import mlflow
import pandas as pd
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobReturn, JobStatus
from hydra.errors import HydraException
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from pseudolabel import plots, rounds, tracking
from pseudolabel.config import conf_dir, load_params, validate
from pseudolabel.errors import PseudoLabelError
from pseudolabel.paths import Paths

log = logging.getLogger(__name__)
rounds.register()  # conf/config.yaml's per-round keys (Hydra's plugin scan also registers them)

LABELS_STAGES = ("train_teacher", "pseudo_label")  # reused from the pipeline unless changed
JOB_STAGES = ("merge", "train_student", "evaluate")  # run in every job
ERROR_FILE = "error.txt"
SUMMARY_CSV = "sweep_summary.csv"
SUMMARY_PNG = "sweep_summary.png"
JOB_TAG = "sweep.job"


# --- What a job runs --------------------------------------------------------------------------


def _dvc_stages(project: Path, names: tuple[str, ...]) -> list:
    """The named stages of the project's dvc.yaml, as DVC itself reads them (templating,
    params files and all), so the sweep's plan cannot disagree with `dvc repro`'s."""
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    if not (project / "dvc.yaml").is_file():
        raise PseudoLabelError(
            f"{project / 'dvc.yaml'}: not found; run pseudolabel-sweep from the project root "
            "(where dvc.yaml, params.yaml and the pipeline's outputs are)."
        )
    try:
        with Repo(str(project), uninitialized=True) as repo:  # reads; never writes .dvc/
            return [stage for name in names for stage in repo.stage.collect(name)]
    except DvcException as exc:
        raise PseudoLabelError(f"{project / 'dvc.yaml'}: {exc}") from None


def _stage_params(project: Path, names: tuple[str, ...]) -> list[str]:
    """The params.yaml keys the named stages depend on (dvc.yaml's `params`)."""
    return [
        key
        for stage in _dvc_stages(project, names)
        for dep in stage.deps
        if hasattr(dep, "params")  # a ParamsDependency
        for key in dep.params or []
    ]


def _stage_outputs(project: Path, names: tuple[str, ...]) -> list[str]:
    """What the named stages write (outs, metrics and plots), relative to the project."""
    return [out.def_path for stage in _dvc_stages(project, names) for out in stage.outs]


def _changed(cfg: DictConfig, reference: DictConfig, keys: list[str]) -> list[tuple[str, Any, Any]]:
    """(key, params.yaml's value, the job's value) for each of `keys` that differs."""

    def value(c: DictConfig, key: str) -> Any:
        node = OmegaConf.select(c, key)
        return OmegaConf.to_container(node) if isinstance(node, DictConfig) else node

    def leaves(key: str, old: Any, new: Any):  # the keys below a mapping that differ
        if isinstance(old, dict) and isinstance(new, dict):
            for sub in sorted(set(old) | set(new)):
                yield from leaves(f"{key}.{sub}", old.get(sub), new.get(sub))
        elif old != new:
            yield key, old, new

    return [c for k in keys for c in leaves(k, value(reference, k), value(cfg, k))]


def plan(cfg: DictConfig, project: Path) -> tuple[str, ...]:
    """The stages a job runs: the selection and the student, plus teacher and labeling when
    the job changes a parameter they depend on. Raises if the job cannot run here."""
    reference = load_params(project / "params.yaml")
    data_changes = _changed(cfg, reference, _stage_params(project, ("ingest",)))
    if data_changes:
        changes = "; ".join(f"{k}={new!r} (params.yaml: {old!r})" for k, old, new in data_changes)
        raise PseudoLabelError(
            f"this job sets {changes}: that changes the data set itself, which a sweep job "
            "does not rebuild. Sweep it with `dvc exp run -S key=a,b --queue` and `dvc queue "
            "start` instead; if you did not set it, params.yaml is not the composition of conf/: "
            "run `pseudolabel compose`."
        )
    if _changed(cfg, reference, _stage_params(project, LABELS_STAGES)):
        return LABELS_STAGES + JOB_STAGES
    missing = [p for p in _stage_outputs(project, LABELS_STAGES) if not (project / p).exists()]
    if missing:
        raise PseudoLabelError(
            f"{', '.join(missing)} missing under {project}: the sweep reuses the pipeline's "
            "teacher and pseudo-labels. Run `dvc repro pseudo_label` first."
        )
    return JOB_STAGES


def _copy_reused(project: Path, job_dir: Path) -> None:
    """The reused stages' outputs, copied: the job folder holds exactly what the job used."""
    for rel in _stage_outputs(project, LABELS_STAGES):
        source, target = project / rel, job_dir / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target, dirs_exist_ok=True)
        else:
            shutil.copy2(source, target)


def estimated_precision(paths: Paths, threshold: float | None) -> float | None:
    """Precision expected at `threshold`, read off the threshold-analysis table (val set)."""
    table_path = paths.threshold_analysis
    if threshold is None or not table_path.is_file():
        return None
    table = pd.read_csv(table_path)
    at_or_below = table[table["threshold"] <= threshold + 1e-9]
    value = at_or_below["precision"].iloc[-1] if len(at_or_below) else math.nan
    return None if pd.isna(value) else float(value)


def job_metrics(cfg: DictConfig, paths: Paths) -> dict[str, float]:
    """What the sweep compares, from the job's own metrics files (the ones DVC reads)."""
    import json

    def read(name: str) -> dict[str, Any]:
        return json.loads((paths.metrics / f"{name}.json").read_text(encoding="utf-8"))

    evaluation, merged, student = read("evaluation"), read("merge"), read("student")
    metrics = {
        "student_accuracy": evaluation["student_accuracy"],
        "teacher_accuracy": evaluation["teacher_accuracy"],
        "gain": evaluation["gain"],
        "kept_fraction": merged["kept_fraction"],
        "pseudo_labeled": merged["pseudo_labeled"],
        "student_val_accuracy": student["val_accuracy"],
    }
    if cfg.pseudo_label.get("selection", "threshold") == "threshold":
        precision = estimated_precision(paths, cfg.pseudo_label.threshold)
        if precision is not None:
            metrics["estimated_precision"] = precision
    return metrics


def run_job(cfg: DictConfig, project: Path, job_dir: Path) -> dict[str, float]:
    """One sweep job in `job_dir`: the planned stages, reading the project's images."""
    from pseudolabel.stages import STAGES, later_rounds

    stages = plan(cfg, project)
    paths = Paths(root=job_dir, data_root=project)
    if stages == JOB_STAGES:
        _copy_reused(project, job_dir)
    log.info("job %s: %s", job_dir, " -> ".join(stages))
    for name in stages:
        if name == "evaluate":  # pseudo_label.rounds > 1: rounds 2..N before the evaluation
            later_rounds(cfg, paths)
        STAGES[name](cfg, paths)
    return job_metrics(cfg, paths)


# --- Composing and checking every job up front ------------------------------------------------


def _job_config(config: DictConfig) -> DictConfig:
    """The validated pipeline config of a Hydra job config (its `hydra` node left out)."""
    keys = [k for k in config if k != "hydra"]
    raw = OmegaConf.to_container(OmegaConf.masked_copy(config, keys), resolve=True)
    return validate(raw, origin="pseudolabel-sweep config")


def _candidates(override) -> list[str]:
    """`key=value` strings a (sweep) override can take; an interval's two ends."""
    key = override.get_key_element()
    if not override.is_sweep_override():
        return [override.input_line]
    if override.is_discrete_sweep():
        return [f"{key}={v}" for v in override.sweep_string_iterator()]
    sweep = override.value()  # interval(a, b): check both ends
    return [f"{key}={sweep.start}", f"{key}={sweep.end}"]


def job_overrides(config: DictConfig) -> list[list[str]]:
    """Every combination of the multirun's overrides (command line and hydra.sweeper.params)."""
    lines = list(config.hydra.overrides.task)
    params = config.hydra.sweeper.get("params") or {}
    lines += [f"{key}={value}" for key, value in params.items()]
    try:
        parsed = OverridesParser.create().parse_overrides(lines)
    except HydraException as exc:
        raise PseudoLabelError(f"pseudolabel-sweep: bad override: {exc}") from None
    per_key = [_candidates(o) for o in parsed if not o.get_key_element().startswith("hydra")]
    return [list(combo) for combo in itertools.product(*per_key)]


def check_jobs(config: DictConfig, project: Path) -> DictConfig:
    """Compose and validate every job's config and plan it; return the first. Raises
    PseudoLabelError naming the job's overrides on the first bad one."""
    first = None
    for overrides in job_overrides(config):
        where = " ".join(overrides) or "(no overrides)"
        try:
            raw = hydra.compose(config_name=config.hydra.job.config_name, overrides=overrides)
            cfg = validate(OmegaConf.to_container(raw, resolve=True), origin=f"job [{where}]")
        except HydraException as exc:
            raise PseudoLabelError(f"job [{where}]: {exc}") from None
        plan(cfg, project)
        first = first or cfg
    return first


# --- MLflow: parent run per multirun, child run per job ---------------------------------------


def _override_params(overrides: list[str]) -> dict[str, str]:
    parsed = OverridesParser.create().parse_overrides(list(overrides))
    return {o.key_or_group: o.value() if o.value() is not None else "null" for o in parsed}


class MlflowSweepCallback(Callback):
    """One MLflow parent run per multirun, a nested child run per job, a summary at the end.

    With Hydra's basic launcher the jobs run one after another (TensorFlow already uses every
    core); with `hydra/launcher=ray` they run at once in Ray workers, which get this callback
    pickled with its parent run id and open their child runs there.
    """

    def __init__(self) -> None:
        self.parent_run_id: str | None = None
        self.sweep_dir: Path | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            cfg = check_jobs(config, Path(config.hydra.runtime.cwd))
            tracking.check_reachable(cfg)
        except PseudoLabelError as exc:
            # Hydra turns a callback's exception into a warning and launches the jobs anyway;
            # SystemExit is not an Exception, so it stops the sweep before any job trains.
            print(f"pseudolabel-sweep: error: {exc}", file=sys.stderr)
            raise SystemExit(2) from None
        tracking.configure(cfg)
        self.sweep_dir = Path(config.hydra.sweep.dir).resolve()
        experiment = mlflow.get_experiment_by_name(cfg.tracking.experiment)
        tags = tracking.context_tags()  # hydra.job.chdir is false: the cwd is the project
        run = mlflow.MlflowClient().create_run(
            experiment.experiment_id,
            run_name=f"sweep {self.sweep_dir.parent.name}/{self.sweep_dir.name}",
            tags={
                **tags,
                "stage": "sweep",
                "sweep.dir": str(self.sweep_dir),
                "sweep.overrides": " ".join(config.hydra.overrides.task),
            },
        )
        self.parent_run_id = run.info.run_id
        log.info("MLflow parent run %s for the sweep in %s", self.parent_run_id, self.sweep_dir)

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        _enter_project(config.hydra.runtime.cwd)
        if self.parent_run_id is None:  # a single run: the stages' runs stand alone
            return
        cfg = _job_config(config)
        tracking.configure(cfg)
        overrides = list(config.hydra.overrides.task)
        num = config.hydra.job.num
        mlflow.start_run(
            run_name=f"job {num}: {' '.join(overrides)}"[:200],
            parent_run_id=self.parent_run_id,
            tags={
                JOB_TAG: str(num),
                "sweep.job_dir": str(Path(config.hydra.runtime.output_dir).resolve()),
                "stage": "sweep_job",
                **tracking.context_tags(),
            },
        )
        mlflow.log_params(_override_params(overrides))
        mlflow.log_text(OmegaConf.to_yaml(cfg), tracking.CONFIG_ARTIFACT)

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if self.parent_run_id is None or mlflow.active_run() is None:
            return
        job_dir = Path(config.hydra.runtime.output_dir)
        value = job_return._return_value if job_return.status == JobStatus.COMPLETED else None
        failed = not isinstance(value, float) or not math.isfinite(value)
        if failed:
            error = job_dir / ERROR_FILE
            if error.is_file():
                mlflow.log_artifact(str(error))
                mlflow.set_tag("sweep.error", error.read_text(encoding="utf-8").splitlines()[-1])
        else:
            mlflow.log_metrics(job_metrics(_job_config(config), Paths(root=job_dir)))
        mlflow.end_run("FAILED" if failed else "FINISHED")

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self.parent_run_id is None:
            return
        client = mlflow.MlflowClient()
        parent = client.get_run(self.parent_run_id)
        table = summary_table(client, parent)
        swept = swept_columns(table)
        self.sweep_dir.mkdir(parents=True, exist_ok=True)
        table.to_csv(self.sweep_dir / SUMMARY_CSV, index=False)
        client.log_artifact(self.parent_run_id, str(self.sweep_dir / SUMMARY_CSV))
        if swept and len(table):
            fig = plots.sweep_summary(table, swept[0])
            client.log_figure(self.parent_run_id, fig, SUMMARY_PNG)
            plots.save(fig, self.sweep_dir / SUMMARY_PNG)
        failed = int((table["status"] == "FAILED").sum()) if len(table) else 0
        client.log_metric(self.parent_run_id, "failed_jobs", failed)
        finished = table[table["status"] == "FINISHED"] if len(table) else table
        if len(finished):
            best = finished.loc[finished["student_accuracy"].idxmax()]
            client.log_metric(self.parent_run_id, "best_student_accuracy", best.student_accuracy)
            client.set_tag(self.parent_run_id, "best_job", str(best["job"]))
        client.set_terminated(self.parent_run_id, "FINISHED")
        log.info(
            "sweep summary: %s (parent run %s)", self.sweep_dir / SUMMARY_CSV, parent.info.run_id
        )


def summary_table(client: mlflow.MlflowClient, parent) -> pd.DataFrame:
    """One row per job of the sweep: its overrides, status and metrics."""
    runs = client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    children = [run for run in runs if JOB_TAG in run.data.tags]
    rows = [
        {
            "job": int(run.data.tags[JOB_TAG]),
            "run_id": run.info.run_id,
            "status": run.info.status,
            **run.data.params,
            **run.data.metrics,
        }
        for run in children
    ]
    if not rows:
        return pd.DataFrame()
    table = pd.DataFrame(rows).sort_values("job").reset_index(drop=True)
    table.attrs["params"] = sorted({key for run in children for key in run.data.params})
    return table


def swept_columns(table: pd.DataFrame) -> list[str]:
    """The override (param) columns whose value differs between jobs."""
    params = table.attrs.get("params", [])
    return [c for c in params if table[c].nunique(dropna=False) > 1]


# --- The Hydra app ------------------------------------------------------------------------------


def _enter_project(cwd: str) -> None:
    """Run the job from the project root, as the basic launcher does: a job the Ray launcher
    sends to a worker process starts in that worker's folder, where the relative paths of the
    config (the sqlite store, conf/) would mean something else. The project must be at the same
    path on every node (docs/scale.md)."""
    if Path.cwd() != Path(cwd):
        os.chdir(cwd)


def job(config: DictConfig) -> float:
    """One job: select, merge, train the student, evaluate. Returns the student's accuracy."""
    hydra_cfg = HydraConfig.get()
    _enter_project(hydra_cfg.runtime.cwd)
    job_dir = Path(hydra_cfg.runtime.output_dir).resolve()
    try:
        cfg = _job_config(config)
        return run_job(cfg, Path(hydra_cfg.runtime.cwd), job_dir)["student_accuracy"]
    except Exception:
        if hydra_cfg.mode != RunMode.MULTIRUN:
            raise
        # Hydra's basic launcher stops the sweep on an exception: record it, go on.
        (job_dir / ERROR_FILE).write_text(traceback.format_exc(), encoding="utf-8")
        log.exception("job %s failed; the sweep goes on", hydra_cfg.job.num)
        return math.nan


def main() -> None:
    """`pseudolabel-sweep`: the Hydra app on the project's conf/sweep.yaml (found from the
    working directory, so decided at run time, not at import)."""
    try:
        config_path = str(conf_dir())
    except PseudoLabelError as exc:
        print(f"pseudolabel-sweep: error: {exc}", file=sys.stderr)
        sys.exit(2)
    hydra.main(config_path=config_path, config_name="sweep", version_base="1.3")(job)()


if __name__ == "__main__":
    main()
