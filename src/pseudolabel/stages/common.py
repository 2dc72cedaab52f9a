"""Helpers every stage uses."""

from __future__ import annotations

import json
import logging
import numbers
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import mlflow
import numpy as np

from pseudolabel import tracking
from pseudolabel.atomic import write_text_atomic
from pseudolabel.data.images import class_names_from
from pseudolabel.errors import PseudoLabelError
from pseudolabel.paths import Paths

log = logging.getLogger(__name__)


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Atomically (temporary file + os.replace): a killed stage never leaves half a JSON."""
    write_text_atomic(path, json.dumps(payload, indent=2, sort_keys=False) + "\n")


def metric_values(tree: Mapping[str, Any], exclude: Iterable[str] = ()) -> dict[str, float]:
    """The numbers of `tree` as MLflow metrics: nested mappings flattened to dotted names
    (tracking.flatten), booleans as 0/1, anything not a number (None, text) left out; top-level
    keys in `exclude` left out too."""
    skip = set(exclude)
    flat = tracking.flatten({k: v for k, v in tree.items() if k not in skip})
    return {
        key: float(value)
        for key, value in flat.items()
        if isinstance(value, bool | np.bool_ | numbers.Real)
    }


def publish_metrics(
    path: Path,
    metrics: Mapping[str, Any],
    logged: Mapping[str, Any] | None = None,
    *,
    exclude: Iterable[str] = (),
) -> dict[str, float]:
    """A stage's metrics, once for DVC and once for MLflow: the numbers of `logged` (default:
    `metrics` itself; see metric_values, `exclude` included) go to the active MLflow run, then
    `metrics` is written to `path` (metrics/<stage>.json) as JSON, atomically. `logged={}`: the
    JSON alone, for a stage that opens no run. Returns what was logged."""
    values = metric_values(metrics if logged is None else logged, exclude)
    if values:
        if mlflow.active_run() is None:  # mlflow.log_metrics would open a stray run
            raise RuntimeError(f"{path}: no active MLflow run to log {sorted(values)} to")
        mlflow.log_metrics(values)
    write_json(path, dict(metrics))
    return values


def teacher_trust(cfg) -> dict[str, Any]:
    """How far a stage may trust the saved teacher (keywords of models.io.load): only as far as
    the user's config says (teacher.allow_unsafe, or a SavedModel folder as teacher.path),
    never as far as the metadata file beside the model says."""
    path = cfg.teacher.path
    folder = Path(path) if path and Path(path).is_dir() else None
    return {"allow_unsafe": bool(cfg.teacher.allow_unsafe), "trusted_saved_model": folder}


def labeled_classes(paths: Paths) -> list[str]:
    """Class names from the train folder; val must hold the same classes."""
    class_names = class_names_from(paths.train, "training")
    val_classes = class_names_from(paths.val, "validation")
    if val_classes != class_names:
        raise PseudoLabelError(
            f"{paths.val}: classes {val_classes} differ from {paths.train}: {class_names}; "
            "give val/ one folder per training class."
        )
    return class_names
