"""Helpers every stage uses."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from pseudolabel.data.images import class_names_from
from pseudolabel.errors import PseudoLabelError
from pseudolabel.models.io import write_text_atomic
from pseudolabel.paths import Paths

log = logging.getLogger(__name__)


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Atomically (temporary file + os.replace): a killed stage never leaves half a JSON."""
    write_text_atomic(path, json.dumps(payload, indent=2, sort_keys=False) + "\n")


def teacher_trust(cfg) -> dict[str, Any]:
    """How far a stage may trust the saved teacher (keywords of models.io.load): only as far as
    the user's config says (teacher.allow_unsafe, or a SavedModel folder as teacher.path),
    never as far as the metadata file beside the model says."""
    path = cfg.teacher.path
    folder = Path(path) if path and Path(path).is_dir() else None
    return {"allow_unsafe": bool(cfg.teacher.allow_unsafe), "trusted_saved_model": folder}


def labelled_classes(paths: Paths) -> list[str]:
    """Class names from the train folder; val must hold the same classes."""
    class_names = class_names_from(paths.train, "training")
    val_classes = class_names_from(paths.val, "validation")
    if val_classes != class_names:
        raise PseudoLabelError(
            f"{paths.val}: classes {val_classes} differ from {paths.train}: {class_names}; "
            "give val/ one folder per training class."
        )
    return class_names
