"""Fit a model with Keras: cosine learning-rate decay, early stopping on val with the best
weights restored, a CSV history. A pretrained backbone trains in two phases, as in transfer
learning: the head on the frozen backbone, then fine-tuning from a chosen layer at a lower
learning rate with BatchNorm frozen."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from pseudolabel import resume
from pseudolabel.errors import PseudoLabelError
from pseudolabel.models.builders import backbone_of

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Phase:
    name: str  # "train" (everything), "head" (backbone frozen) or "fine_tune"
    epochs: int
    learning_rate: float


def phases(model: keras.Model, model_cfg, train_cfg) -> list[Phase]:
    """One phase for a model trained from scratch; head then fine-tuning for pretrained ones."""
    pretrained = model_cfg is not None and model_cfg.weights and backbone_of(model) is not None
    if not pretrained:
        return [Phase("train", train_cfg.epochs, train_cfg.learning_rate)]
    out = [Phase("head", train_cfg.epochs, train_cfg.learning_rate)]
    if model_cfg.fine_tune_epochs:
        lr = train_cfg.learning_rate * model_cfg.fine_tune_lr_factor
        out.append(Phase("fine_tune", model_cfg.fine_tune_epochs, lr))
    return out


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Python, NumPy and TensorFlow seeds; optionally deterministic (slower) TF ops."""
    keras.utils.set_random_seed(seed)
    if deterministic:
        tf.config.experimental.enable_op_determinism()


def cpu_has_bfloat16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX-BF16: e.g. AMD Zen 4,
    Intel Sapphire Rapids); elsewhere TensorFlow would emulate it, slower than float32."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            flags = next((line for line in fh if line.startswith("flags")), "").split()
    except OSError:  # not Linux
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def mixed_policy() -> str | None:
    """The mixed-precision policy this machine runs fastest: mixed_float16 on a GPU,
    mixed_bfloat16 on a CPU with native bfloat16, None (stay float32) otherwise."""
    if tf.config.list_physical_devices("GPU"):
        return "mixed_float16"
    if cpu_has_bfloat16():
        return "mixed_bfloat16"
    return None


@contextmanager
def precision(mixed: bool) -> Iterator[None]:
    """Build models under mixed precision when asked and the hardware has it (see
    `mixed_policy`); float32 otherwise, with a warning."""
    policy = mixed_policy() if mixed else None
    if mixed and policy is None:
        log.info("train.mixed_precision: no GPU and no bfloat16 CPU found, training in float32")
    if policy is None:
        yield
        return
    log.info("train.mixed_precision: %s", policy)
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(policy)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def balanced_class_weights(labels: np.ndarray, num_classes: int) -> dict[int, float]:
    """n_images / (n_classes * count) per class, as scikit-learn's "balanced"."""
    counts = np.bincount(np.asarray(labels), minlength=num_classes)
    return {i: float(len(labels) / (num_classes * c)) if c else 1.0 for i, c in enumerate(counts)}


def fine_tune_start(backbone: keras.Model, from_layer: str | None) -> int:
    """Index of the first backbone layer that fine-tuning trains (a name or its start)."""
    if not from_layer:
        return 0
    for i, layer in enumerate(backbone.layers):
        if layer.name == from_layer or layer.name.startswith(from_layer):
            return i
    raise PseudoLabelError(
        f"model.fine_tune_from={from_layer!r}: no layer of {backbone.name} has that name or "
        f"starts with it; use e.g. block6a or top_conv (model.summary() lists the layers)."
    )


def set_trainable(model: keras.Model, phase: Phase, start: int) -> None:
    backbone = backbone_of(model)
    if backbone is None or phase.name == "train":
        return
    backbone.trainable = phase.name == "fine_tune"
    if phase.name == "fine_tune":
        for i, layer in enumerate(backbone.layers):
            # Frozen BatchNorm layers run in inference mode: their ImageNet statistics stay.
            layer.trainable = i >= start and not isinstance(layer, keras.layers.BatchNormalization)


def init_from(model: keras.Model, source: keras.Model) -> int:
    """Copy `source`'s weights into `model`'s leading weighted layers while their shapes match
    (a student one block deeper than its teacher gets all the teacher's blocks); returns how
    many layers were copied."""
    mine = [layer for layer in model.layers if layer.weights]
    theirs = [layer for layer in source.layers if layer.weights]
    copied = 0
    for target, origin in zip(mine, theirs, strict=False):
        shapes = [tuple(w.shape) for w in target.weights]
        if shapes != [tuple(w.shape) for w in origin.weights]:
            break
        target.set_weights(origin.get_weights())
        copied += 1
    return copied


def merge_histories(histories: Sequence[keras.callbacks.History]) -> keras.callbacks.History:
    merged = keras.callbacks.History()
    merged.epoch, merged.history = [], {}
    for history in histories:
        merged.epoch += history.epoch
        for key, values in history.history.items():
            merged.history.setdefault(key, []).extend(values)
    return merged


def fit(
    model: keras.Model,
    train_ds: tf.data.Dataset,
    val_ds: tf.data.Dataset,
    train_cfg,
    steps_per_epoch: int,
    history_csv: Path,
    callbacks: Sequence[keras.callbacks.Callback] = (),
    model_cfg=None,
    class_weight: dict[int, float] | None = None,
    initial_epoch: int = 0,
    state: resume.TrainingState | None = None,
) -> keras.callbacks.History:
    """Compile and fit, phase by phase; the best val-accuracy weights are restored at the end
    (with `train_cfg.restore_best_weights` false: the last epoch's are kept, phase after phase).
    `initial_epoch` > 0 continues an earlier fit: epochs are numbered on, the CSV appended.
    With `state` (pseudolabel.resume) the training state is saved at every epoch's end, a
    SIGTERM stops the training at the next step boundary (resume.Preempted), and a fit that
    finds a state of its own resumes after its last completed epoch."""
    plan = phases(model, model_cfg, train_cfg)
    backbone = backbone_of(model)
    start = fine_tune_start(backbone, model_cfg.fine_tune_from) if len(plan) > 1 else 0
    history_csv.parent.mkdir(parents=True, exist_ok=True)
    endless = train_ds.cardinality() == tf.data.INFINITE_CARDINALITY
    saved = state.load() if state is not None else None
    arrays = state.arrays(saved) if saved else {}
    if saved:
        log.info("resuming from %s: epoch %d done", state.folder, saved["epoch"])
    histories: list[keras.callbacks.History] = []
    best: tuple[float, list] | None = None
    if saved and saved.get("phase_best") is not None:
        best = (saved["phase_best"], _numbered(arrays, "pbest"))
    stop = resume.StopRequest()
    with stop.installed() if state is not None else nullcontext():
        for index, phase in enumerate(plan):
            done = initial_epoch + sum(len(h.epoch) for h in histories)
            if saved and index < saved["phase"]:  # a phase the interrupted run completed
                histories.append(_history(saved["history"][index]))
                continue
            mine = saved if saved and index == saved["phase"] else None
            set_trainable(model, phase, start)
            _compile(model, phase, train_cfg, steps_per_epoch)
            log.info(
                "phase %s: %d epochs at learning rate %g, %d trainable weights",
                phase.name,
                phase.epochs,
                phase.learning_rate,
                len(model.trainable_weights),
            )
            record = _history(mine["history"][index] if mine else None)
            early = _EarlyStopping(
                monitor="val_accuracy",
                mode="max",
                patience=train_cfg.patience,
                restore_best_weights=train_cfg.restore_best_weights,
                restored=mine["early_stopping"] if mine else None,
                restored_weights=_numbered(arrays, "best") if mine else None,
            )
            epochs_done = mine["epochs_in_phase"] if mine else 0
            if mine:
                resume.restore(model, arrays)
            if mine and (mine["stopped"] or epochs_done >= phase.epochs):
                if early.restore_best_weights and early.restored_weights:
                    model.set_weights(early.restored_weights)  # what on_train_end had done
            else:
                checkpoint = _Checkpoint(state, stop, index, done, record, early, histories,
                                         best)  # fmt: skip
                _fit_phase(model, train_ds, val_ds, train_cfg, steps_per_epoch, history_csv,
                           [*callbacks], class_weight, endless, done, phase.epochs, epochs_done,
                           early, checkpoint)  # fmt: skip
            histories.append(record)
            saved = None
            if not train_cfg.restore_best_weights:
                continue
            score = max(record.history["val_accuracy"])
            if best is not None and score < best[0]:
                log.info(
                    "phase %s did not beat val %.4f: keeping earlier weights", phase.name, best[0]
                )
                model.set_weights(best[1])
            else:
                best = (score, model.get_weights())
    return merge_histories(histories)


def _fit_phase(model, train_ds, val_ds, train_cfg, steps, history_csv, callbacks, class_weight,
               endless, done, epochs, epochs_done, early, checkpoint) -> None:  # fmt: skip
    """One phase's model.fit from `epochs_done` epochs on, drawing the data the uninterrupted
    fit would. Every iterator of a seeded tf.data shuffle reshuffles on from the one created
    before it. An endless stream (`steps_per_epoch`) is read by one iterator for the whole fit,
    so the resumed fit skips the batches the done epochs drew. A finite dataset gets a new
    iterator at each epoch's start and another at its end (Keras 3's EpochIterator), so the
    resumed fit first creates as many as the done epochs did, and its epochs then draw the
    orders the uninterrupted ones would (tests/test_resume.py checks it bit for bit)."""
    first = done + epochs_done
    if first > 0:
        _keep_epochs(history_csv, first)  # rows of epochs an interruption made us redo go
    data = train_ds
    if epochs_done and endless:
        data = train_ds.skip(epochs_done * steps)
    elif epochs_done:  # (one a epoch where the length is unknown: no iterator at the end)
        for _ in range((2 if train_ds.cardinality() > 0 else 1) * epochs_done):
            iter(train_ds)
    model.fit(
        data,
        validation_data=val_ds,
        initial_epoch=first,
        epochs=done + epochs,
        steps_per_epoch=steps if endless else None,
        shuffle=False,  # tf.data shuffles; Keras cannot shuffle a Dataset
        class_weight=class_weight,
        callbacks=[
            *_ema_swap(train_cfg),
            early,
            keras.callbacks.CSVLogger(str(history_csv), append=first > 0),
            *callbacks,
            checkpoint,  # last: it saves what the others recorded for the epoch
        ],
        # A progress bar on a terminal, one line per epoch in logs (dvc repro, CI).
        verbose=1 if sys.stdout.isatty() else 2,
    )


def _history(saved: dict | None) -> keras.callbacks.History:
    history = keras.callbacks.History()
    history.epoch = list(saved["epoch"]) if saved else []
    history.history = {k: list(v) for k, v in (saved["history"] if saved else {}).items()}
    return history


def _numbered(arrays: dict, prefix: str) -> list | None:
    values = [arrays[f"{prefix}{i}"] for i in range(len(arrays)) if f"{prefix}{i}" in arrays]
    return values or None


def _keep_epochs(history_csv: Path, first: int) -> None:
    """Drop the CSV's rows of epochs from `first` on (an interrupted run logged them, or part)."""
    if not history_csv.is_file():
        return
    import pandas as pd

    from pseudolabel.atomic import write_text_atomic

    try:
        frame = pd.read_csv(history_csv)
    except (ValueError, OSError):
        return
    if "epoch" in frame:
        write_text_atomic(history_csv, frame[frame["epoch"] < first].to_csv(index=False))


class _EarlyStopping(keras.callbacks.EarlyStopping):
    """Keras's EarlyStopping, whose counters and best weights a resumed fit starts from."""

    def __init__(self, *args, restored=None, restored_weights=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.restored, self.restored_weights = restored, restored_weights

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        if self.restored:
            self.wait, self.best = self.restored["wait"], self.restored["best"]
            self.best_epoch = self.restored["best_epoch"]
            self.best_weights = self.restored_weights

    def snapshot(self) -> dict:
        best = None if self.best is None else float(self.best)
        return {"wait": int(self.wait), "best": best, "best_epoch": int(self.best_epoch)}


class _Checkpoint(keras.callbacks.Callback):
    """Saves the training state (pseudolabel.resume) at every epoch's end; after a SIGTERM it
    stops the training at the next step boundary and raises resume.Preempted (the last epoch's
    state stands: Keras restarts the data iterators at every fit, so an exact resume starts at
    an epoch's beginning). Also records the phase's history."""

    def __init__(self, state, stop, phase, done, record, early, histories, best):
        super().__init__()
        self.state, self.stop, self.phase, self.done = state, stop, phase, done
        self.record, self.early, self.histories, self.best = record, early, histories, best
        self.epoch = done

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_epoch_end(self, epoch, logs=None):
        self.record.epoch.append(epoch)
        for key, value in (logs or {}).items():
            self.record.history.setdefault(key, []).append(float(value))
        self._save(epoch + 1 - self.done, bool(self.model.stop_training))

    def on_train_batch_end(self, batch, logs=None):
        if not self.stop.requested:
            return
        self.model.stop_training = True
        raise resume.Preempted(
            f"stopped by SIGTERM at epoch {self.epoch + 1}, step {batch + 1}; the state of the "
            f"last completed epoch ({self.epoch}) is in {self.state.folder}: run the stage "
            "again to resume from there"
        )

    def _save(self, epochs_in_phase: int, stopped: bool) -> None:
        if self.state is None:
            return
        arrays = resume.capture(self.model)
        if self.early.best_weights is not None:
            arrays.update({f"best{i}": w for i, w in enumerate(self.early.best_weights)})
        best = self.best  # the earlier phases' best (pretrained models' head, then fine-tuning)
        if best is not None:
            arrays.update({f"pbest{i}": w for i, w in enumerate(best[1])})
        history = [{"epoch": h.epoch, "history": h.history} for h in self.histories]
        history.append({"epoch": self.record.epoch, "history": self.record.history})
        self.state.save(
            {
                "phase": self.phase,
                "epochs_in_phase": epochs_in_phase,
                "epoch": self.done + epochs_in_phase,
                "stopped": stopped,
                "history": history,
                "early_stopping": self.early.snapshot(),
                "phase_best": None if best is None else float(best[0]),
                **self.state.extra,
            },
            arrays,
        )


def _ema_swap(train_cfg) -> list[keras.callbacks.Callback]:
    """With an EMA and the best val epoch kept, the average is what is validated, kept and
    saved: Keras's SwapEMAWeights puts it in the model for validation and at each epoch's end
    (before EarlyStopping records the epoch's weights). Without it EarlyStopping would record
    and restore the raw weights over the average: `ema` was silently ignored. Without
    restore_best_weights the average replaces the weights once, when fit ends (the optimizer's
    finalize_variable_values), and the epochs' callbacks see the raw weights as before."""
    if train_cfg.ema and train_cfg.restore_best_weights:
        return [keras.callbacks.SwapEMAWeights(swap_on_epoch=True)]
    return []


def make_optimizer(train_cfg, learning_rate) -> keras.optimizers.Optimizer:
    """`train.optimizer` with its weight decay and EMA. The decay is Keras's (decoupled, scaled by
    the learning rate) and spares biases and normalisation parameters, as is usual."""
    common = {
        "weight_decay": train_cfg.weight_decay or None,
        "use_ema": bool(train_cfg.ema),
        "ema_momentum": train_cfg.ema or 0.99,
    }
    if train_cfg.optimizer == "sgd":
        optimizer = keras.optimizers.SGD(learning_rate, momentum=0.9, nesterov=True, **common)
    else:
        optimizer = keras.optimizers.Adam(learning_rate, **common)
    if train_cfg.weight_decay:
        optimizer.exclude_from_weight_decay(var_names=["bias", "gamma", "beta"])
    return optimizer


def _compile(model: keras.Model, phase: Phase, train_cfg, steps_per_epoch: int) -> None:
    schedule = keras.optimizers.schedules.CosineDecay(
        phase.learning_rate, decay_steps=max(1, phase.epochs * steps_per_epoch)
    )
    model.compile(
        optimizer=make_optimizer(train_cfg, schedule),
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=train_cfg.label_smoothing),
        metrics=["accuracy"],
    )
