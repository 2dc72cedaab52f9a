"""MLflow: one place that sets the store, names runs and attaches tags every run carries."""

from __future__ import annotations

import hashlib
import os
import subprocess
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow


def tracking_uri(cfg) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or cfg.tracking.uri


def configure(cfg) -> None:
    mlflow.set_tracking_uri(tracking_uri(cfg))
    mlflow.set_experiment(cfg.tracking.experiment)


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


def _git_commit() -> str | None:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def context_tags() -> dict[str, str]:
    """Tags that place a run: git commit and, inside `dvc exp run`, the DVC experiment."""
    tags = {}
    commit = _git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    for env, tag in (
        ("DVC_EXP_NAME", "dvc.exp_name"),
        ("DVC_EXP_BASELINE_REV", "dvc.baseline_rev"),
    ):
        if os.environ.get(env):
            tags[tag] = os.environ[env]
    return tags


@contextmanager
def start_run(
    cfg, stage: str, params: Mapping[str, Any] | None = None, tags: Mapping[str, Any] | None = None
) -> Iterator[mlflow.ActiveRun]:
    """A run named after its stage, with the stage's params and the context tags."""
    configure(cfg)
    all_tags = {"stage": stage, **context_tags(), **{k: str(v) for k, v in (tags or {}).items()}}
    with mlflow.start_run(run_name=stage, tags=all_tags) as run:
        if params:
            mlflow.log_params(flatten(params))
        yield run
