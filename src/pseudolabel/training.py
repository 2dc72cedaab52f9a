"""Fit a model with Keras: cosine learning-rate decay, early stopping on val, a CSV history."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import keras
import tensorflow as tf


def fit(
    model: keras.Model,
    train_ds: tf.data.Dataset,
    val_ds: tf.data.Dataset,
    train_cfg,
    steps_per_epoch: int,
    history_csv: Path,
    callbacks: Sequence[keras.callbacks.Callback] = (),
) -> keras.callbacks.History:
    """Compile and fit; the best val-accuracy weights are restored at the end."""
    schedule = keras.optimizers.schedules.CosineDecay(
        train_cfg.learning_rate, decay_steps=max(1, train_cfg.epochs * steps_per_epoch)
    )
    model.compile(
        optimizer=keras.optimizers.Adam(schedule),
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=train_cfg.label_smoothing),
        metrics=["accuracy"],
    )
    history_csv.parent.mkdir(parents=True, exist_ok=True)
    all_callbacks = [
        keras.callbacks.EarlyStopping(
            monitor="val_accuracy",
            mode="max",
            patience=train_cfg.patience,
            restore_best_weights=True,
        ),
        keras.callbacks.CSVLogger(str(history_csv)),
        *callbacks,
    ]
    endless = train_ds.cardinality() == tf.data.INFINITE_CARDINALITY
    return model.fit(
        train_ds,
        validation_data=val_ds,
        epochs=train_cfg.epochs,
        steps_per_epoch=steps_per_epoch if endless else None,
        shuffle=False,  # tf.data shuffles; Keras cannot shuffle a Dataset
        callbacks=all_callbacks,
        # A progress bar on a terminal, one line per epoch in logs (dvc repro, CI).
        verbose=1 if sys.stdout.isatty() else 2,
    )
