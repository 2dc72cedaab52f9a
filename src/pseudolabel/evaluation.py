"""Test-set accuracy and confusion matrices."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
from sklearn.metrics import confusion_matrix

from pseudolabel.data.images import labeled_dataset, labeled_files
from pseudolabel.models.io import ModelMeta


@dataclass
class Evaluation:
    accuracy: float
    y_true: np.ndarray
    y_pred: np.ndarray
    confusion: np.ndarray


def evaluate(
    model: keras.Model, meta: ModelMeta, folder: Path, batch_size: int = 256
) -> Evaluation:
    paths, labels = labeled_files(folder, meta.class_names)
    ds = labeled_dataset(
        paths, labels, meta.num_classes, meta.image_size, meta.channels, batch_size
    )
    probs = model.predict(ds.map(lambda x, _: x), verbose=0)
    y_pred = probs.argmax(axis=1)
    return Evaluation(
        accuracy=float((y_pred == labels).mean()),
        y_true=labels,
        y_pred=y_pred,
        confusion=confusion_matrix(labels, y_pred, labels=range(meta.num_classes)),
    )
