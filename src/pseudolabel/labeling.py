"""Teacher predictions on unlabelled images -> one CSV row per image (threshold-free)."""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import keras
import numpy as np
import pandas as pd
from tqdm import tqdm

from pseudolabel.data.images import path_image_dataset, require_images
from pseudolabel.models.io import ModelMeta

log = logging.getLogger(__name__)

PROB_PREFIX = "prob_"


def prob_columns(class_names: list[str]) -> list[str]:
    return [f"{PROB_PREFIX}{name}" for name in class_names]


def predict_folder(
    model: keras.Model, meta: ModelMeta, unlabeled_dir: Path, batch_size: int
) -> tuple[pd.DataFrame, list[str]]:
    """Predict every image under `unlabeled_dir`, streamed in batches with a progress bar.

    Returns the predictions (sorted by path, relative to `unlabeled_dir`) and the relative paths
    of files that could not be decoded.
    """
    files = require_images(unlabeled_dir, "unlabelled")
    ds = path_image_dataset([str(f) for f in files], meta.image_size, meta.channels, batch_size)
    seen: list[str] = []
    probs: list[np.ndarray] = []
    with tqdm(total=len(files), desc="pseudo-label", unit="img", mininterval=2) as bar:
        for path_batch, image_batch in ds:
            probs.append(np.asarray(model.predict_on_batch(image_batch), dtype=np.float64))
            seen.extend(p.decode() for p in path_batch.numpy())
            bar.update(len(path_batch))
    root = str(unlabeled_dir)
    relative = [os.path.relpath(p, root).replace(os.sep, "/") for p in seen]
    failed = sorted(
        os.path.relpath(str(f), root).replace(os.sep, "/") for f in set(map(str, files)) - set(seen)
    )
    if failed:
        log.warning("%d unlabelled file(s) could not be decoded and were skipped", len(failed))
    return to_frame(
        relative,
        np.concatenate(probs) if probs else np.zeros((0, meta.num_classes)),
        meta.class_names,
    ), failed


def to_frame(paths: list[str], probs: np.ndarray, class_names: list[str]) -> pd.DataFrame:
    """path, label (class name), confidence (top-1), then one probability column per class."""
    top = probs.argmax(axis=1) if len(probs) else np.zeros(0, dtype=int)
    frame = pd.DataFrame(
        {
            "path": paths,
            "label": [class_names[i] for i in top],
            "confidence": probs.max(axis=1) if len(probs) else np.zeros(0),
        }
    )
    frame[prob_columns(class_names)] = probs
    return frame.sort_values("path", kind="stable").reset_index(drop=True)


def write_csv(frame: pd.DataFrame, path: Path) -> None:
    """Write atomically: a killed run never leaves a half-written CSV behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    frame.to_csv(tmp, index=False, float_format="%.6f")
    os.replace(tmp, path)


def read_csv(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype={"path": str, "label": str})


def batches(n: int, batch_size: int) -> int:
    return math.ceil(n / batch_size)
