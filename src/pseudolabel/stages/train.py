"""train_teacher, train_baseline and train_student: each trains one model from its config node
(`teacher`, `baseline`, `student` in conf/; the baseline's node is derived from the student's)
with the one function `_train`, run where the node's `train.strategy` says (strategies.run).

Read top to bottom: the three stage entry points; `_train`; then its steps in the order it
takes them: the labeled images (`_job`); the data and model, either the consistency student's
(`_consistency_setup`: the method itself is pseudolabel.consistency and pseudolabel.method) or
a supervised model's (`_supervised_setup`); the start from the teacher; the resume state; the
fit; the labeled fine-tune; saving and publishing. Importing the user's own teacher
(`teacher.path`) comes last."""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import keras
import mlflow
import numpy as np
import pandas as pd
import tensorflow as tf
from omegaconf import OmegaConf

from pseudolabel import (
    consistency,
    fitting,
    merged_set,
    ood,
    plots,
    predicting,
    resume,
    strategies,
    tracking,
)
from pseudolabel.config import no_augmentation, to_dict
from pseudolabel.data.images import (
    labeled_dataset,
    labeled_files,
    list_images,
    mixed_dataset,
    with_mixup,
)
from pseudolabel.errors import PseudoLabelError
from pseudolabel.models import io as model_io
from pseudolabel.models.builders import augmentation_layers, build_model
from pseudolabel.paths import Paths
from pseudolabel.stages.common import (
    labeled_classes,
    publish_metrics,
    teacher_trust,
    write_json,
)

log = logging.getLogger(__name__)


def train_teacher(cfg, paths: Paths = Paths(), callbacks=()) -> dict[str, Any]:
    """The teacher on the labeled images (or the user's own, `teacher.path`). `callbacks`: extra
    Keras callbacks, for benchmarks."""
    if cfg.teacher.path:
        return import_teacher(cfg, paths)
    return strategies.run(
        _train, cfg, "teacher", paths, train_dir=paths.train, tags={}, callbacks=callbacks
    )


def train_baseline(cfg, paths: Paths = Paths(), callbacks=()) -> dict[str, Any]:
    """The `baseline` node (the student's network and steps, all rounds' epochs together) on the
    labeled images alone: what the unlabeled images must beat. Off (student.baseline.enabled):
    a metrics file saying so, and no model."""
    if not cfg.student.baseline.enabled:
        paths.model("baseline").parent.mkdir(parents=True, exist_ok=True)
        write_json(paths.model("baseline").with_suffix(".off.json"), {"enabled": False})
        paths.history("baseline").parent.mkdir(parents=True, exist_ok=True)
        pd.DataFrame(columns=["epoch", "val_accuracy"]).to_csv(
            paths.history("baseline"), index=False
        )
        metrics = {"enabled": False}
        publish_metrics(paths.metrics / "baseline.json", metrics, logged={})  # no MLflow run
        return metrics
    node, steps = cfg.baseline, None  # its node: conf/config.yaml derives it from the student's
    if node.train.steps_per_epoch is None:  # the student's: one pass over the unlabeled images
        unlabeled = len(list_images(paths.unlabeled))
        if node.consistency.enabled:
            steps = consistency_steps(node, unlabeled)
        else:  # the offline student's pass: labeled + all unlabeled images
            n = len(list_images(paths.train)) + unlabeled
            steps = predicting.batches(n, node.train.batch_size)
    tags = {"baseline": "labeled_only", tracking.LABELED_TAG: tracking.dvc_hash(paths.train)}
    return strategies.run(
        _train, cfg, "baseline", paths, train_dir=paths.train, tags=tags,
        unlabeled=False, callbacks=callbacks, steps=steps,
    )  # fmt: skip


def train_student(cfg, paths: Paths = Paths(), truth=None, callbacks=()) -> dict[str, Any]:
    """The larger, noised student on the merged set (and, with student.consistency, every
    unlabeled image), tagged with the pseudo-label set it used. `truth` and `callbacks` are for
    benchmarks: the unlabeled images' true classes, extra Keras callbacks."""
    merged_set.check_complete(paths.merged)  # a merge's complete output, nothing more or less
    teacher_meta = model_io.read_meta(paths.model("teacher"))
    merge_metrics = json.loads((paths.metrics / "merge.json").read_text(encoding="utf-8"))
    # Lineage (see tracking.lineage): the same tags whether dvc repro, a sweep job or a DVC
    # experiment made this student; the hashes equal those dvc.lock records.
    tags = {
        **tracking.lineage_tags(cfg, paths, teacher_meta.run_id if teacher_meta else None),
        "threshold": cfg.pseudo_label.threshold,
        "pseudo_labeled": merge_metrics["pseudo_labeled"],
        "round": paths.round_number,  # round r > 1: the teacher is round r-1's student
    }
    metrics = strategies.run(
        _train, cfg, "student", paths, train_dir=paths.merged, tags=tags, truth=truth,
        callbacks=callbacks,
    )  # fmt: skip
    student_meta = model_io.read_meta(paths.model("student"))
    tracking.log_lineage_inputs(student_meta.run_id, cfg, paths, tags)
    return metrics


def _train(
    cfg,
    role: str,
    paths: Paths,
    train_dir: Path,
    tags: dict[str, Any],
    unlabeled: bool = True,
    truth=None,
    callbacks: tuple = (),
    steps: int | None = None,
) -> dict[str, Any]:
    """Train one model from its config node `cfg[role]` (teacher, baseline or student) on a
    class-folder tree; save the model, its metadata and metrics. Called through
    strategies.run, which runs it where `cfg[role].train.strategy` says.

    `role` also names the model, its metrics and its MLflow run. With consistency.enabled a student
    trains in a ConsistencyModel, on the unlabeled images too unless `unlabeled` is false (the
    labeled-only baseline). `steps`: the steps per epoch, when the node's train.steps_per_epoch
    is null and the count is another's (the baseline's is the student's). `truth` (path under
    data/unlabeled -> class name, benchmarks only) adds the online pseudo-labels' precision to
    the logged metrics."""
    job = _job(cfg, role, train_dir, paths)
    warmup_ds = None
    if job.online:
        job, train_ds, warmup_ds, model, steps = _consistency_setup(
            job, train_dir, unlabeled, truth, steps
        )
    else:
        train_ds, model, steps = _supervised_setup(job, train_dir, steps)
    classifier = model.classifier if job.online else model  # what is saved
    if role != "teacher" and job.role_cfg.init_from_teacher:
        _init_from_teacher(job, classifier)
    params = {
        "seed": cfg.seed,
        "data": to_dict(cfg.data),
        role: to_dict(job.role_cfg),
        "train_images": len(job.train_files),
        "val_images": len(job.val_files),
        "steps_per_epoch": steps,
    }
    state = _training_state(job, train_dir, steps, unlabeled)
    saved = state.load()  # an interrupted run's state, or None; another config's: refused here
    with tracking.start_run(
        cfg,
        f"train_{job.name}",
        params,
        {"role": job.name, **tags},
        resume_run=saved.get("run_id") if saved else None,
    ) as run:
        outbox = tracking.Outbox(run.info.run_id, saved.get("pending") if saved else None)
        # The metrics not sent yet are part of the state.
        state.extra = {"run_id": run.info.run_id, "pending": outbox.pending}
        outbox.flush()  # an interrupted run's kept metrics
        if warmup_ds is not None and not saved:  # (a resumed run's weights are past it)
            outbox.log(_rotation_warmup(job, model, warmup_ds), 0)
        history = _fit(job, model, train_ds, steps, [_EpochLogger(outbox), *callbacks], state)
        if job.online:  # the consistency wrapper only trained it
            classifier.compile(loss="categorical_crossentropy", metrics=["accuracy"])
        if role != "teacher" and job.role_cfg.labeled_finetune_epochs:
            history = _labeled_finetune(classifier, job, history)
        metrics = _save_and_publish(job, classifier, history, steps, run.info.run_id, tags, outbox)
    state.clear()  # the model is saved: nothing left to resume
    return metrics


@dataclass(frozen=True)
class _Job:
    """What the steps of one training share: its config and name, and the labeled images."""

    cfg: Any
    role: str  # teacher | baseline | student: its config node (cfg[role]), model and MLflow run
    paths: Paths
    class_names: list[str]
    train_files: list[str]
    train_labels: np.ndarray
    val_files: list[str]
    val_ds: tf.data.Dataset
    size: list[int]
    channels: int
    unlabeled_images: int = 0  # those the consistency student learns from (after the OOD cut)
    alignment: str | None = None  # the mix its distribution alignment aimed at: labeled | pool

    @property
    def role_cfg(self):
        return self.cfg[self.role]

    @property
    def images_per_step(self) -> tuple[int, int]:
        """Images through the network in one step, for accuracy per second: (forward and
        backward, forward only). A consistency student with unlabeled images: its labeled batch
        and their strong views trained on, their weak views predicted for targets; otherwise
        the batch."""
        batch = self.role_cfg.train.batch_size
        unlabeled = self.role_cfg.consistency.ratio * batch if self.unlabeled_images else 0
        return batch + unlabeled, unlabeled

    @property
    def warmup_steps(self) -> int:
        """Steps of the rotation warm-up before the training (a student with unlabeled images)."""
        return self.role_cfg.consistency.warmup_steps if self.unlabeled_images else 0

    @property
    def name(self) -> str:
        """The model, its metrics and its MLflow run: models/<role>.keras, train_<role>."""
        return self.role

    @property
    def network(self) -> str:
        """The network's name, and the config node its errors name: the baseline trains the
        student's network, set by student.*."""
        return "teacher" if self.role == "teacher" else "student"

    @property
    def online(self) -> bool:
        """A student or its baseline trains in a ConsistencyModel (consistency.enabled)."""
        return self.role != "teacher" and self.role_cfg.consistency.enabled


def _job(cfg, role: str, train_dir: Path, paths: Paths) -> _Job:
    """The labeled train and val images (val as batches), with the run seeded."""
    class_names = labeled_classes(paths)
    train_files, train_labels = labeled_files(train_dir, class_names)
    val_files, val_labels = labeled_files(paths.val, class_names)
    size, channels = list(cfg.data.image_size), cfg.data.channels
    fitting.seed_everything(cfg.seed, cfg[role].train.deterministic)
    n = len(class_names)  # val is read after every epoch: decoded once, kept when it fits
    val_ds = labeled_dataset(val_files, val_labels, n, size, channels, 256, cache=True)
    return _Job(
        cfg,
        role,
        paths,
        class_names,
        train_files,
        train_labels,
        val_files,
        val_ds,
        size,
        channels,
    )


def _consistency_setup(job: _Job, train_dir: Path, unlabeled: bool, truth, steps=None):
    """The consistency student's streams (labeled and, if `unlabeled`, every unlabeled image
    with the teacher's probabilities), its ConsistencyModel and its steps per epoch (`steps`,
    else its node's). From the merged set it takes the labeled rows only (the job it returns
    says so)."""
    cfg, paths, n = job.cfg, job.paths, len(job.class_names)
    if train_dir == paths.merged:  # the labeled rows of the merged set, not its pseudo ones
        manifest = merged_set.read_manifest(train_dir)
        rows = manifest[manifest["source"] == "labeled"]
        index = {label: i for i, label in enumerate(job.class_names)}
        job = replace(
            job,
            train_files=[str(train_dir / file) for file in rows["file"]],
            train_labels=np.array([index[label] for label in rows["label"]], np.int64),
        )
    batch = job.role_cfg.train.batch_size
    parts, n_unlabeled = None, 0
    prior = labeled_prior(job.train_labels, n)
    if unlabeled:
        parts = _unlabeled_targets(paths, job.class_names, truth, cfg.pseudo_label.ood)
        n_unlabeled = len(parts[0])
        cons = job.role_cfg.consistency
        aimed = None
        if cons.distribution_alignment:
            aimed = "labeled"
            if cons.alignment_target != "labeled":
                prior, aimed = _pool_prior(paths, job.class_names, prior, cons.alignment_target)
        job = replace(job, unlabeled_images=n_unlabeled, alignment=aimed)

    def stream(seed: int) -> tf.data.Dataset:
        labeled = consistency.labeled_stream(
            job.train_files, job.train_labels, n, job.size, job.channels, batch, seed
        )
        if parts is None:
            return consistency.training_stream(labeled, None)
        per_step = job.role_cfg.consistency.ratio * batch
        unlabeled_ds = consistency.unlabeled_stream(*parts, job.size, job.channels, per_step, seed)
        return consistency.training_stream(labeled, unlabeled_ds)

    steps = steps or consistency_steps(job.role_cfg, n_unlabeled)
    # The warm-up draws from streams of its own, so the training's draw what they would
    # without it (and what a resumed training, which skips the warm-up, redraws).
    warmup_ds = stream(cfg.seed + WARMUP_SEED) if job.warmup_steps else None
    with fitting.precision(job.role_cfg.train.mixed_precision):
        model = _consistency_model(
            job.role_cfg, job.class_names, prior, job.size, job.channels, steps, n_unlabeled
        )
    return job, stream(cfg.seed), warmup_ds, model, steps


# The warm-up's streams are seeded with the run's seed plus this (the training's: the seed, and
# the seed + 1 for the unlabeled images).
WARMUP_SEED = 10


def _rotation_warmup(job: _Job, model: consistency.ConsistencyModel, stream) -> dict[str, float]:
    """student.consistency.warmup_steps: the self-supervised warm-up (consistency.RotationWarmup)
    of the classifier that `model` trains, from the weights it starts with (the teacher's, where
    init_from_teacher), at train.learning_rate, with train's optimizer and weight decay but no
    weight average (its end would swap the average in). Returns its last metrics (warmup_*)."""
    cons, train_cfg = job.role_cfg.consistency, job.role_cfg.train
    square = job.size[0] == job.size[1]
    with fitting.precision(train_cfg.mixed_precision):
        warmup = consistency.RotationWarmup(
            model.classifier,
            model.weak,
            cons.warmup_weight,
            len(job.class_names),
            turns=4 if square else 2,
            label_smoothing=train_cfg.label_smoothing,
        )
    warmup.compile(optimizer=fitting.make_optimizer(OmegaConf.merge(train_cfg, {"ema": 0.0}),
                                                    train_cfg.learning_rate))  # fmt: skip
    log.info(
        "%s: a rotation warm-up of %d steps on the unlabeled images before the consistency "
        "training",
        job.name,
        cons.warmup_steps,
    )
    verbose = 1 if sys.stdout.isatty() else 2  # (as the training's fit)
    history = warmup.fit(stream, steps_per_epoch=cons.warmup_steps, shuffle=False, verbose=verbose)
    return {f"warmup_{name}": values[-1] for name, values in history.history.items()}


def labeled_prior(train_labels: np.ndarray, n: int) -> np.ndarray:
    """The labeled images' class mix (add-one smoothed): what the student learns from."""
    prior = np.bincount(train_labels, minlength=n).astype(np.float64) + 1.0
    return prior / prior.sum()


def _pool_prior(
    paths: Paths, class_names, labeled: np.ndarray, target: str
) -> tuple[np.ndarray, str]:
    """student.consistency.alignment_target=pool: the unlabeled images' class mix that
    distribution alignment aligns the student's predictions to, as the teacher's labeling
    estimated it (round 1's metrics/pseudo_label.json, `class_mix`: EM under label shift over
    the images merge keeps) whatever the round (a later round's labeler is a student that
    learnt with alignment). `auto`: that mix where the labeling found the folder skewed
    (`class_mix.skewed`), else `labeled` (the labeled images' mix). Returns the mix and which
    it is (pool or labeled)."""
    path = paths.first_round_labeling_metrics
    try:
        mix = json.loads(path.read_text())["class_mix"]
        estimated = np.array([mix["estimated"][name] for name in class_names], np.float64)
        skewed = bool(mix["skewed"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise PseudoLabelError(
            f"{path}: no class_mix with every class ({type(exc).__name__}: {exc}), which "
            f"student.consistency.alignment_target={target} reads: re-run the pseudo_label "
            "stage (dvc repro does), or set student.consistency.alignment_target=labeled."
        ) from exc
    if target == "auto" and not skewed:
        log.info(
            "distribution alignment to the labeled images' mix (alignment_target=auto: the "
            "teacher's labeling did not find the folder skewed: head-to-tail %.1f, off by %.0f "
            "%% on val)", mix.get("head_to_tail", float("nan")), 100 * mix.get("val_error", 0),
        )  # fmt: skip
        return labeled, "labeled"
    # no class below one image's share: alignment would never let the student predict it
    images = int(mix.get("images") or 0)
    floor = 1.0 / images if images else 0.0
    prior = np.maximum(estimated / estimated.sum(), floor)
    prior = prior / prior.sum()
    log.info(
        "distribution alignment to the unlabeled images' estimated class mix: %s",
        ", ".join(f"{name} {share:.3f}" for name, share in zip(class_names, prior, strict=True)),
    )
    return prior, "pool"


def _unlabeled_targets(paths: Paths, class_names, truth, ood_cfg=None):
    """Every unlabeled image of the CSV with the teacher's probabilities, whether merge
    accepted it (the teacher term's weight) and its true class where `truth` knows it (-1).
    With `ood_cfg` (pseudo_label.ood) the images merge left out (ood.left_out: every flagged
    one, or those past pseudo_label.ood.far times the cut, as exclude decides) are left out of
    the stream, so neither the online nor the teacher term learns from them."""
    frame = predicting.read_csv(paths.csv)
    if ood_cfg is not None:
        frame, _, _ = ood.left_out(ood_cfg, frame, paths.csv, paths)
    probs = predicting.probabilities(frame, class_names, str(paths.csv)).astype(np.float32)
    probs /= probs.sum(axis=1, keepdims=True)
    manifest = merged_set.read_manifest(paths.merged)
    pseudo = manifest.loc[manifest["source"] == "pseudo", "file"]
    merged = {file.split("/")[-1] for file in pseudo}
    accepted = np.array([merged_set.copy_name(p) in merged for p in frame["path"]])
    index = {name: i for i, name in enumerate(class_names)}
    known = truth(list(frame["path"])) if truth else [None] * len(frame)
    labels = np.array([index.get(k, -1) if k is not None else -1 for k in known], np.int32)
    files = [str(paths.unlabeled / p) for p in frame["path"]]
    return files, probs, accepted, labels


def consistency_steps(node, n_unlabeled: int) -> int:
    """Optimiser steps per epoch of a consistency student (`node`: cfg.student, or
    cfg.baseline): train.steps_per_epoch, else one pass over the unlabeled images
    (ratio * batch_size of them per step)."""
    per_step = node.consistency.ratio * node.train.batch_size
    return node.train.steps_per_epoch or max(1, predicting.batches(n_unlabeled, per_step))


def _consistency_model(student, class_names, prior, size, channels, steps, n_unlabeled):
    """The student's classifier (no noise layers inside: the views are made in the step) in
    the ConsistencyModel that trains it (`student`: the student's or the baseline's node;
    `prior`: the class mix distribution alignment aligns to)."""
    n = len(class_names)
    classifier = build_model(student.model, no_augmentation(), n, size, channels, "student")
    return consistency.ConsistencyModel(
        classifier,
        augmentation_layers(student.consistency.weak),
        augmentation_layers(student.consistency.strong),
        student.consistency,
        n,
        n_unlabeled,
        prior,
        total_steps=student.train.epochs * steps,
        label_smoothing=student.train.label_smoothing,
    )


def _supervised_setup(job: _Job, train_dir: Path, steps: int | None = None):
    """The teacher's (or the merged-set student's) batches, network and steps per epoch
    (`steps`, else its node's train.steps_per_epoch, else one pass over the images)."""
    role_cfg, n = job.role_cfg, len(job.class_names)
    data = (job.train_files, job.train_labels, job.class_names, job.size, job.channels)
    train_ds = _training_data(role_cfg, train_dir, *data, job.cfg.seed)
    if role_cfg.train.augment.mixup:
        train_ds = with_mixup(train_ds, role_cfg.train.augment.mixup, job.cfg.seed)
    with fitting.precision(role_cfg.train.mixed_precision):
        model = build_model(
            role_cfg.model, role_cfg.train.augment, n, job.size, job.channels, job.network
        )
    fixed = steps or role_cfg.train.steps_per_epoch
    steps = fixed or predicting.batches(len(job.train_files), role_cfg.train.batch_size)
    endless = train_ds.cardinality() == tf.data.INFINITE_CARDINALITY
    if fixed and not endless:
        train_ds = train_ds.repeat()  # epochs of steps_per_epoch batches, across passes
    return train_ds, model, steps


def _training_data(role_cfg, train_dir, files, labels, class_names, size, channels, seed):
    """Shuffled batches of the training folder; for a student with `labeled_fraction`, an
    endless stream with that share of labeled images in each batch (see the merge manifest).
    With `student.soft_labels`, pseudo-labeled images are trained on the teacher's probability
    vectors from the manifest, labeled ones on one-hot targets."""
    train_cfg = role_cfg.train
    fraction = train_cfg.labeled_fraction
    n = len(class_names)
    soft = bool(role_cfg.get("soft_labels", False))  # the teacher's config has no such key
    has_manifest = train_dir.joinpath(merged_set.MANIFEST).exists()
    if not has_manifest or (not soft and fraction is None):  # a plain labeled folder
        return labeled_dataset(
            files, labels, n, size, channels, train_cfg.batch_size, shuffle=True, seed=seed
        )
    manifest = merged_set.read_manifest(train_dir)
    index = {name: i for i, name in enumerate(class_names)}
    groups = []
    for source in ("labeled", "pseudo"):
        rows = manifest[manifest["source"] == source]
        targets = np.array([index[label] for label in rows["label"]], dtype=np.int64)
        if soft:
            targets = np.eye(n, dtype=np.float32)[targets]
            if source == "pseudo":
                what = f"{train_dir / merged_set.MANIFEST} (student.soft_labels: true)"
                probs = predicting.probabilities(rows, class_names, what).astype(np.float32)
                targets = probs / probs.sum(axis=1, keepdims=True)
        groups.append(([str(train_dir / f) for f in rows["file"]], targets))
    if fraction is None:  # the whole merged set, sampled uniformly
        paths = groups[0][0] + groups[1][0]
        targets = np.concatenate([groups[0][1], groups[1][1]])
        return labeled_dataset(
            paths, targets, n, size, channels, train_cfg.batch_size, shuffle=True, seed=seed
        )
    if not len(groups[1][0]):  # no pseudo-label passed the threshold: labeled images only
        return labeled_dataset(
            *groups[0], n, size, channels, train_cfg.batch_size, shuffle=True, seed=seed
        )
    return mixed_dataset(
        groups, [fraction, 1.0 - fraction], n, size, channels, train_cfg.batch_size, seed
    )


def _init_from_teacher(job: _Job, classifier: keras.Model) -> None:
    """student.init_from_teacher: the leading layers that match the teacher's take its weights."""
    teacher, _ = model_io.load(job.paths.model("teacher"), **teacher_trust(job.cfg))
    copied = fitting.init_from(classifier, teacher)
    log.info("%s: %d leading layers initialised from the teacher", job.name, copied)
    if not copied:
        log.warning("student.init_from_teacher: no layer matches the teacher's; from scratch")


def _training_state(job: _Job, train_dir: Path, steps: int, unlabeled: bool):
    """The state folder of this training (pseudolabel.resume): <models>/.resume/<name>, keyed
    by what the training depends on: its config, the seed, the images it reads (names and
    labels, and for a student the pseudo-label CSV and merged set), the teacher it starts from,
    and the code. Under Ray Train workers (train.strategy=multi_worker) each worker keeps its
    own (the chief's here, the others' in their scratch folder), restored from and reported as
    the Ray Train run's checkpoint (strategies.share_state)."""
    inputs = {
        "name": job.name,
        "role": to_dict(job.role_cfg),
        "seed": job.cfg.seed,
        "data": to_dict(job.cfg.data),
        "train": [job.train_files, np.asarray(job.train_labels).tolist()],
        "val": job.val_files,
        "steps": steps,
    }
    if job.role != "teacher" and train_dir.joinpath(merged_set.MANIFEST).is_file():
        inputs["merged"] = tracking.md5(train_dir / merged_set.MANIFEST)
    if job.online and unlabeled:
        inputs["labels"] = tracking.md5(job.paths.csv)
        inputs["ood_exclude"] = job.cfg.pseudo_label.ood.exclude  # (auto: decided by the CSV)
    if job.role != "teacher" and job.role_cfg.init_from_teacher:
        teacher = job.paths.model("teacher")
        inputs["teacher"] = tracking.md5(teacher) if teacher.is_file() else None
    folder = job.paths.models / resume.FOLDER / job.name
    state = resume.TrainingState(folder, resume.fingerprint(**inputs))
    if job.role_cfg.train.strategy == "multi_worker":
        strategies.share_state(state)  # restored from and reported as Ray Train checkpoints
    return state


def _fit(
    job: _Job, model: keras.Model, train_ds, steps: int, callbacks, state=None
) -> keras.callbacks.History:
    """The training itself, each epoch logged to MLflow and to plots/train/<name>.csv."""
    train_cfg = job.role_cfg.train
    class_weight = (
        fitting.balanced_class_weights(job.train_labels, len(job.class_names))
        if train_cfg.class_weights and not job.online
        else None
    )
    return fitting.fit(
        model,
        train_ds,
        job.val_ds,
        train_cfg,
        steps,
        job.paths.history(job.name),
        callbacks=list(callbacks),
        model_cfg=None if job.online else job.role_cfg.model,
        class_weight=class_weight,
        state=state,
    )


class _EpochLogger(mlflow.keras.MlflowCallback):
    """MLflow's Keras callback: one value per epoch per metric, through `outbox`
    (tracking.Outbox: kept while the tracking server does not answer, sent when it does).
    Fine-tuning is a second `fit` with a new optimizer, so the optimizer params and summary are
    logged at the first only."""

    def __init__(self, outbox: tracking.Outbox):
        super().__init__()
        self.outbox = outbox

    def on_train_begin(self, logs=None):
        if not getattr(self, "_begun", False):
            self._begun = True
            super().on_train_begin(logs)  # (MLflow's callbacks warn rather than raise)

    def on_epoch_end(self, epoch, logs=None):
        if logs:
            self.outbox.log(logs, epoch)

    def on_test_end(self, logs=None):
        """Nothing: MLflow's callback would log each validation again, asynchronously and at
        step 0; the epoch's logs above carry it (val_*)."""


def _labeled_finetune(model, job: _Job, history):
    """A last few epochs on the labeled images alone at a lower learning rate; kept only if
    they beat the best val accuracy of the training before (always, when the training keeps
    its last epoch's weights rather than the best val epoch's)."""
    role_cfg, n = job.role_cfg, len(job.class_names)
    files, labels = labeled_files(job.paths.train, job.class_names)
    size, channels = list(model.input_shape[1:3]), model.input_shape[3]
    train_ds = labeled_dataset(
        files, labels, n, size, channels, role_cfg.train.batch_size, True, job.cfg.seed
    )
    before = (max(history.history["val_accuracy"]), model.get_weights())
    epochs = role_cfg.labeled_finetune_epochs
    # The student's own training settings (optimiser, decay, EMA, ...), shorter and slower.
    train_cfg = OmegaConf.merge(
        role_cfg.train,
        {
            "epochs": epochs,
            "patience": epochs,
            "learning_rate": role_cfg.train.learning_rate * role_cfg.labeled_finetune_lr_factor,
        },
    )
    log.info("student: fine-tuning on %d labeled images for %d epochs", len(files), epochs)
    tuned = fitting.fit(
        model,
        train_ds,
        job.val_ds,
        train_cfg,
        predicting.batches(len(files), role_cfg.train.batch_size),
        job.paths.history(job.name),
        initial_epoch=len(history.epoch),
    )
    if role_cfg.train.restore_best_weights and max(tuned.history["val_accuracy"]) < before[0]:
        log.info("labeled fine-tuning did not beat val %.4f: keeping the weights before", before[0])
        model.set_weights(before[1])
    return fitting.merge_histories([history, tuned])


def _save_and_publish(
    job: _Job, model, history, steps: int, run_id: str, tags, outbox: tracking.Outbox
) -> dict[str, Any]:
    """Score on val, save the model with its metadata and its metrics file, then (once the
    tracking server answers: `outbox` sent) log the model, its training curves and its metrics
    (best_val_accuracy, best_val_loss in MLflow) to the active run."""
    val_loss, val_accuracy = model.evaluate(job.val_ds, verbose=0)
    extra = {"role": job.name, **{k: str(v) for k, v in tags.items()}}
    meta = model_io.ModelMeta(job.class_names, job.size, job.channels, run_id=run_id, extra=extra)
    model_path = job.paths.model(job.name)
    model_io.save(model, model_path, meta)
    metrics = {
        "val_accuracy": float(val_accuracy),
        "val_loss": float(val_loss),
        "epochs": len(history.epoch),
        "steps": int(len(history.epoch) * steps),
        "warmup_steps": job.warmup_steps,  # the rotation warm-up's, before those
        "train_images": len(job.train_files),
        "unlabeled_images": job.unlabeled_images,
        "alignment": job.alignment,  # the mix alignment aimed at (None: none, or no pool)
        # images through the network (at most: an epoch's last labeled batch may be short)
        # (the warm-up's steps train on the same batches, its unlabeled images turned)
        "images_trained": int(
            (len(history.epoch) * steps + job.warmup_steps) * job.images_per_step[0]
        ),
        "images_forward_only": int(len(history.epoch) * steps * job.images_per_step[1]),
        "params": int(model.count_params()),
    }
    metrics_path = job.paths.metrics / f"{job.name}.json"
    write_json(metrics_path, metrics)  # saved here whatever the server does
    wait = float(job.cfg.tracking.outage_wait)
    if not outbox.wait(wait):
        raise PseudoLabelError(
            f"the tracking server ({mlflow.get_tracking_uri()}) did not answer for {wait:g} s "
            f"after the training (tracking.outage_wait): {model_path} and {metrics_path} are "
            f"saved and the training state kept; run the stage again once the server answers: "
            "it only logs"
        )
    mlflow.log_figure(
        plots.training_curves(pd.read_csv(job.paths.history(job.name)), f"{job.name} training"),
        f"{job.name}_training_curves.png",
    )
    _log_model(model, job.val_ds, job.name)
    mlflow.log_artifact(str(model_io.meta_path(model_path)), "model")
    _publish(job.paths, job.name, metrics)
    return metrics


def _log_model(model: keras.Model, val_ds, name: str) -> None:
    """The model in MLflow's Keras flavour with a signature: raw pixels in, probabilities out."""
    images = next(iter(val_ds))[0][:2].numpy()
    probs = np.asarray(model(images, training=False))  # eager: no predict function to trace
    signature = mlflow.models.infer_signature(images, probs)
    mlflow.keras.log_model(
        model,
        name=name,
        signature=signature,
        # Given, so that MLflow does not reload the model in a subprocess to infer them.
        pip_requirements=[f"keras=={keras.__version__}", f"tensorflow=={tf.__version__}"],
    )


def _publish(paths: Paths, name: str, metrics: dict[str, Any]) -> None:
    """metrics/<name>.json; in MLflow the val scores as best_val_accuracy and best_val_loss
    (val_accuracy and val_loss there are the per-epoch curves)."""
    best = {"best_val_accuracy": metrics["val_accuracy"], "best_val_loss": metrics["val_loss"]}
    publish_metrics(paths.metrics / f"{name}.json", metrics, best)
    log.info(
        "%s: val_accuracy=%.4f after %d epochs", name, best["best_val_accuracy"], metrics["epochs"]
    )


def import_teacher(cfg, paths: Paths) -> dict[str, Any]:
    """Adopt the user's model as the teacher: validate it and save it with our metadata."""
    class_names = _teacher_classes(cfg, paths)
    source = Path(cfg.teacher.path)
    foreign = model_io.load_foreign(source, allow_unsafe=cfg.teacher.allow_unsafe)
    model, meta = model_io.adopt(foreign, class_names, cfg.teacher.input_scale, str(source))
    _warn_input_mismatch(meta, cfg.data, source)
    with tracking.start_run(
        cfg,
        "train_teacher",
        {"teacher": to_dict(cfg.teacher)},
        {
            "role": "teacher",
            "imported_from": source,
            "input_scale": meta.extra["source_input_scale"],
        },
    ) as run:
        meta.run_id = run.info.run_id
        val_files, val_labels = labeled_files(paths.val, class_names)
        val_ds = labeled_dataset(
            val_files, val_labels, len(class_names), meta.image_size, meta.channels, 256
        )
        model.compile(loss="categorical_crossentropy", metrics=["accuracy"])
        val_loss, val_accuracy = model.evaluate(val_ds, verbose=0)
        model_io.save(model, paths.model("teacher"), meta)
        _log_model(model, val_ds, "teacher")
        mlflow.log_artifact(str(model_io.meta_path(paths.model("teacher"))), "model")
        metrics = {
            "val_accuracy": float(val_accuracy),
            "val_loss": float(val_loss),
            "epochs": 0,
            "train_images": 0,
            "params": int(model.count_params()),
        }
        _publish(paths, "teacher", metrics)
    return metrics


def _warn_input_mismatch(meta: model_io.ModelMeta, data, source: Path) -> None:
    """An imported model is fed the data's images resized to its own input; say so when that
    input is not the data's (a 32x32 RGB model given 8x8 grey images, say), never silently."""
    expected = (list(meta.image_size), meta.channels)
    given = (list(data.image_size), data.channels)
    if expected != given:
        log.warning(
            "teacher.path %s expects %dx%dx%d images but the data is %dx%dx%d "
            "(data.image_size, data.channels): each image is resized to %dx%d%s for it. If the "
            "model was made for other images, import the right one, or set data.image_size "
            "and data.channels to match.",
            source,
            *expected[0],
            expected[1],
            *given[0],
            given[1],
            *expected[0],
            " and its grey copied to 3 channels" if (given[1], expected[1]) == (1, 3) else "",
        )


def _teacher_classes(cfg, paths: Paths) -> list[str]:
    """The imported teacher's output classes in order: from config, else the folder names."""
    folders = labeled_classes(paths)
    names = list(cfg.teacher.class_names or folders)
    if sorted(names) != folders:
        raise PseudoLabelError(
            f"teacher.class_names {names} are not the class folders of {paths.train}: "
            f"{folders}; list each folder once, in the order of the model's outputs."
        )
    return names
