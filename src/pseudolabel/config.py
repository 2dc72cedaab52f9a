"""Configuration: the schema (dataclasses), loading of params.yaml, and Hydra composition.

`conf/` is the one source of truth, for values too: the dataclasses below are a schema of
types and structure only (every field is MISSING), so a key that conf/ or params.yaml lacks is
an error naming it, never a silent default from here. `params.yaml` is conf/'s composition
(written by `pseudolabel compose` or by DVC on `dvc exp run`); every entry point loads a config
through `load_params` or `compose`, and both validate it against the schema.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pseudolabel import composition, rounds
from pseudolabel.atomic import write_text_atomic
from pseudolabel.errors import PseudoLabelError

# The project's configuration folder, read from the project (never from this package: an
# installed pseudolabel composes the conf/ that `pseudolabel init` wrote into your repository).
CONF = "conf"
DATA_SOURCES = ("fashion_mnist", "digits", "folder")
LINK_MODES = ("copy", "hardlink", "symlink")
# The model zoo, written once: zoo name -> keras.applications constructor (models/builders.py
# builds them; conf/model/ has one file per name, tests/test_config.py checks both ways).
BACKBONES = {
    **{f"efficientnet_b{i}": f"EfficientNetB{i}" for i in range(8)},
    **{f"efficientnetv2_b{i}": f"EfficientNetV2B{i}" for i in range(4)},
    **{f"efficientnetv2_{s}": f"EfficientNetV2{s.upper()}" for s in "sml"},
}
EFFICIENTNETS = tuple(BACKBONES)
# Built from the config alone (models/builders.OWN_BUILDERS), no pretrained weights.
OWN_MODELS = ("small_cnn", "resnet")
MODEL_NAMES = (*OWN_MODELS, *EFFICIENTNETS)
# How pseudo-labeled images are selected (pseudo_label.selection; merged_set.py applies them).
SELECTIONS = ("threshold", "per_class", "topk")
ENGINES = ("local", "ray")  # pseudo_label.engine
STRATEGIES = ("auto", "mirrored", "multi_worker")  # teacher/student.train.strategy
OPTIMIZERS = ("adam", "sgd")  # teacher/student.train.optimizer
# What data.labeled_root / unlabeled_root name for the built-in sources (conf/data/_base.yaml):
# a folder every project has, since dvc.yaml's ingest depends on both roots. data=folder must
# point them at the user's folders instead.
BUILTIN_ROOT = "conf/data"
# keras.applications refuses EfficientNet inputs smaller than this (height and width, pixels).
MIN_INPUT_SIZE = {name: 32 for name in EFFICIENTNETS}
# keras.applications modules whose `preprocess_input` a foreign teacher may name as its scale.
KERAS_PREPROCESSING = (
    "convnext",
    "densenet",
    "efficientnet",
    "efficientnet_v2",
    "inception_resnet_v2",
    "inception_v3",
    "mobilenet",
    "mobilenet_v2",
    "mobilenet_v3",
    "nasnet",
    "resnet",
    "resnet50",
    "resnet_v2",
    "vgg16",
    "vgg19",
    "xception",
)
INPUT_SCALES = ("auto", "0-255", "0-1", "-1-1", *KERAS_PREPROCESSING)
POOLINGS = ("avg", "max")


@dataclass
class DataConfig:
    source: str = MISSING
    # Debian's dataset-fashion-mnist package puts the IDX files here.
    idx_dir: str = MISSING
    train_per_class: int = MISSING
    val_per_class: int = MISSING
    # None: the whole official test split (Fashion-MNIST) / everything left (digits).
    test_per_class: int | None = MISSING
    unlabeled: int | None = MISSING  # None: every image not drawn for the labeled splits
    image_size: list[int] = MISSING
    channels: int = MISSING
    # source=folder (conf/data/folder.yaml): your own images. Built-in sources point both roots
    # at BUILTIN_ROOT so that dvc.yaml's `${data.labeled_root}` dependency always exists.
    labeled_root: str = MISSING
    unlabeled_root: str = MISSING
    # Shares of each class split off train/ when val/ or test/ is absent (seeded, files unmoved).
    val_fraction: float = MISSING
    test_fraction: float = MISSING
    link: str = MISSING  # how the view holds usable files: copy, hardlink or symlink
    min_size: int = MISSING  # pixels; smaller images are reported and left out
    max_pixels: int = MISSING  # height x width; larger ones (decompression bombs) reported
    near_duplicates: bool = MISSING  # also exclude unlabeled near-copies of val/test (dHash)
    near_duplicate_distance: int = MISSING  # max differing bits of the 64-bit perceptual hash
    workers: int | None = MISSING  # checking threads; None: all cores
    # Ingest also writes each folder's images decoded (uint8 at image_size) into its hidden
    # .decoded/ sub-folder, which later stages read instead of decoding the files again.
    decoded_copy: bool = MISSING


@dataclass
class ModelConfig:
    """One model of the zoo (conf/model/): small_cnn, resnet or a keras.applications
    EfficientNet."""

    name: str = MISSING
    # small_cnn: `depth` blocks of two convolutions, `width` filters in the first. resnet: a
    # stem of `width` filters and `depth` stages of two residual blocks, the filters doubling
    # and the map halving at each stage after the first.
    width: int = MISSING
    depth: int = MISSING
    # The head of every model: global pooling (avg|max), dropout, an optional hidden Dense
    # layer (0: none), softmax.
    pooling: str = MISSING
    hidden_units: int = MISSING
    dropout: float = MISSING
    # [height, width] the images are resized to inside the model; None: data.image_size.
    input_size: list[int] | None = MISSING
    # EfficientNets: "imagenet", null (random initialisation) or the path of a weights file.
    weights: str | None = MISSING
    # EfficientNets: stochastic depth (keras' drop_connect_rate, rising over the blocks).
    drop_connect_rate: float = MISSING
    # With pretrained weights, training runs in two phases: `train.epochs` with the backbone
    # frozen, then `fine_tune_epochs` at learning_rate * fine_tune_lr_factor with the backbone
    # trainable from the layer `fine_tune_from` (a layer name or its start, e.g. block6a;
    # null: the whole backbone). BatchNorm layers stay frozen. Without pretrained weights the
    # whole model trains in one phase.
    fine_tune_from: str | None = MISSING
    fine_tune_epochs: int = MISSING
    fine_tune_lr_factor: float = MISSING


@dataclass
class AugmentConfig:
    """Keras preprocessing layers inside the model; active only while training."""

    flip: bool = MISSING
    translate: float = MISSING
    rotate: float = MISSING
    zoom: float = MISSING
    contrast: float = MISSING
    # keras.layers.RandAugment: number of random ops per image (0: off) and their strength.
    randaugment_ops: int = MISSING
    randaugment_magnitude: float = MISSING
    # keras.layers.RandomErasing: probability that an image gets a rectangle of noise.
    erasing: float = MISSING
    # keras.layers.MixUp on each training batch (images and targets blended): its alpha,
    # 0: off. Applied in the tf.data pipeline, since it needs the targets too.
    mixup: float = MISSING


def no_augmentation() -> AugmentConfig:
    """An AugmentConfig with every kind of noise off (the schema itself has no values)."""
    return AugmentConfig(
        flip=False,
        translate=0.0,
        rotate=0.0,
        zoom=0.0,
        contrast=0.0,
        randaugment_ops=0,
        randaugment_magnitude=0.0,
        erasing=0.0,
        mixup=0.0,
    )


@dataclass
class TrainConfig:
    epochs: int = MISSING
    batch_size: int = MISSING
    learning_rate: float = MISSING
    # adam, or sgd (Nesterov momentum 0.9, FixMatch's optimiser); both on the cosine schedule.
    optimizer: str = MISSING
    # Decoupled weight decay (Keras's `weight_decay`: each step shrinks the weights by
    # learning_rate * weight_decay of themselves; biases and normalisation scales excluded); 0: off.
    weight_decay: float = MISSING
    patience: int = MISSING
    # At the end, the weights of the best val-accuracy epoch (Keras EarlyStopping's
    # restore_best_weights); false: the last epoch's. With a val set of a few hundred images the
    # best of N noisy scores is mostly luck, and a decayed learning rate ends on good weights.
    restore_best_weights: bool = MISSING
    label_smoothing: float = MISSING
    # Optimiser steps per epoch (Keras's steps_per_epoch; the training data repeats as needed);
    # None: one pass over the training images. An epoch is when val is scored, the best weights
    # kept, early stopping decided and MLflow logged: a few hundred images give 2-16 step epochs
    # whose overhead can outweigh the training.
    steps_per_epoch: int | None = MISSING
    # Student only: the share of each batch drawn from the labeled images (the rest from the
    # pseudo-labeled ones); None samples the merged set uniformly.
    labeled_fraction: float | None = MISSING
    # Weight each class by n_images / (n_classes * its count) in the loss.
    class_weights: bool = MISSING
    # Mixed precision, float32 weights: mixed_float16 on a GPU, mixed_bfloat16 on a CPU with
    # native bfloat16 (AVX512-BF16/AMX); elsewhere a warning and float32.
    mixed_precision: bool = MISSING
    # tf.config.experimental.enable_op_determinism(): reproducible, slower.
    deterministic: bool = MISSING
    # Keep an exponential moving average of the weights with this momentum (e.g. 0.999) and
    # save it as the model (Keras optimizers' use_ema; with restore_best_weights, validation
    # scores the average and the best epoch's average is kept); 0: off.
    ema: float = MISSING
    # Where training runs (docs/scale.md): auto (one process, TensorFlow's default device),
    # mirrored (tf.distribute.MirroredStrategy over this machine's GPUs; one device without
    # any), multi_worker (`workers` Ray Train workers on the cluster in `ray`,
    # MultiWorkerMirroredStrategy). batch_size is always the global batch: each step's batch is
    # split across the workers/devices, so the steps and results do not depend on their number.
    strategy: str = MISSING
    # Ray Train workers of strategy=multi_worker (one CPU each, and one GPU each when the
    # cluster has that many); ignored by the other strategies.
    workers: int = MISSING
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass
class TeacherConfig:
    # An existing model (.keras, .h5 or a SavedModel folder) to use as the teacher instead of
    # training one.
    path: str | None = MISSING
    # What that model expects: "0-255" (raw), "0-1", "-1-1", or a keras.applications module
    # whose preprocess_input it needs (e.g. resnet50); "auto": raw pixels if the model starts
    # with a Rescaling layer, else an error asking for the scale. Models trained here take raw
    # pixels and scale inside themselves.
    input_scale: str = MISSING
    # The model's output classes in order; None: the sorted train folder names.
    class_names: list[str] | None = MISSING
    # Load a model with Lambda layers (arbitrary Python code): only for files you trust.
    allow_unsafe: bool = MISSING
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


@dataclass
class ConsistencyConfig:
    """The student's online term on every unlabeled image (pseudolabel.consistency)."""

    enabled: bool = MISSING
    # Unlabeled images per labeled one in each step (mu): a step sees train.batch_size
    # labeled and ratio * batch_size unlabeled images (each as a weak and a strong view).
    ratio: int = MISSING
    # Confidence the student's weak-view prediction needs to become a target (FixMatch's tau).
    threshold: float = MISSING
    # FlexMatch: scale the threshold per class by how well the class is learnt so far.
    flexible: bool = MISSING
    # What decides which targets count: "threshold" (the two keys above: FixMatch's tau, or
    # FlexMatch's per-class thresholds), "softmatch" (every target, weighted by its confidence
    # against the running mean confidence: a Gaussian below it, 1 above) or "freematch"
    # (self-adaptive thresholds: the running mean confidence, scaled per class by the running
    # mean prediction). The last two ignore threshold and flexible; all three read the aligned
    # prediction where distribution_alignment is on (it stands in for SoftMatch's uniform
    # alignment; FreeMatch's fairness term is not implemented).
    mask: str = MISSING
    # Momentum of SoftMatch's and FreeMatch's running statistics, [0, 1) (the papers': 0.999).
    mask_momentum: float = MISSING
    # Whose weak-view prediction becomes the targets: 0, the student's current weights
    # (FixMatch's); a momentum in (0, 1), an exponential moving average of those weights with
    # that momentum, warmed up as Mean Teacher's (Mean Teacher's targets, steadier than one
    # step's weights; train.ema is the average that is evaluated and saved, this one only
    # makes targets).
    target_ema: float = MISSING
    # A short self-supervised warm-up before the consistency training (0 steps: none): this
    # many steps on the same batches, learning to tell each unlabeled image's rotation (0, 90,
    # 180, 270 degrees: RotNet's pretext task; 0 and 180 for images that are not square) with
    # a head that is dropped after, beside the labeled loss (S4L), the rotation loss weighted
    # by warmup_weight (consistency.RotationWarmup). Not run by the labeled-only baseline.
    warmup_steps: int = MISSING
    warmup_weight: float = MISSING
    # Weight of the online term (it rises linearly from 0 over the first `rampup` share of
    # the steps) and of the teacher's probabilities (the CSV) as targets of the strong view.
    weight: float = MISSING
    rampup: float = MISSING
    teacher_weight: float = MISSING
    # The teacher term falls linearly to 0 by the last step: the student outgrows its teacher.
    teacher_decay: bool = MISSING
    # Align the student's predictions to the labeled class distribution (ReMixMatch).
    distribution_alignment: bool = MISSING
    # The distribution it aligns to: "labeled" (the labeled images' class mix, ReMixMatch) or
    # "pool" (the unlabeled images' own, estimated from the teacher's probabilities by EM,
    # calibration.label_shift_prior: for a folder whose class mix is skewed), or "auto": pool
    # where the teacher's labeling finds the folder skewed (metrics/pseudo_label.json's
    # class_mix.skewed: head-to-tail 5 or more, told within 0.15 on val), else labeled.
    alignment_target: str = MISSING
    # Momentum of the running mean of the student's predictions that alignment divides by.
    alignment_momentum: float = MISSING
    # The views: weak (labeled images and the targets' view), strong (what learns from them).
    weak: AugmentConfig = field(default_factory=AugmentConfig)
    strong: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass
class BaselineConfig:
    """train_baseline: the student's network, steps and weak view on the labeled images alone,
    so that evaluate can say whether the unlabeled images helped."""

    enabled: bool = MISSING
    # The baseline's own weight average (train.ema's meaning), so that it stays the strongest
    # labeled-only model whatever the student's student.train.ema is.
    ema: float = MISSING


@dataclass
class StudentConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    consistency: ConsistencyConfig = field(default_factory=ConsistencyConfig)
    baseline: BaselineConfig = field(default_factory=BaselineConfig)
    # Train on the teacher's probability vectors for pseudo-labeled images (from the merge
    # manifest) instead of one-hot pseudo-labels.
    soft_labels: bool = MISSING
    # Start from the teacher's weights wherever the student's leading layers have the same
    # shapes (small_cnn one block deeper: all the teacher's blocks); False: from scratch, as in
    # Noisy Student.
    init_from_teacher: bool = MISSING
    # After training on the merged set: this many epochs on the labeled images alone at
    # learning_rate * labeled_finetune_lr_factor (0: none); the best val epoch is kept.
    labeled_finetune_epochs: int = MISSING
    labeled_finetune_lr_factor: float = MISSING


@dataclass
class OODConfig:
    # Score every unlabeled image's distance from the labeled classes (pseudolabel.ood):
    # outputs/data.csv's ood_score, and its ood flag past the cut.
    enabled: bool = MISSING
    # The cut flags this share of the labeled val images (in-distribution), in (0, 0.5).
    false_rejection: float = MISSING
    # Add the labeled-vs-unlabeled classifier's term (PU learning, pseudolabel.ood.Contrast),
    # fitted on at most contrast_sample unlabeled images drawn at random (seeded by `seed`).
    contrast: bool = MISSING
    contrast_sample: int = MISSING
    # What stays out of data/train_ssl and of the student's unlabeled terms: true (every
    # flagged image), "far" (those past `far` times the cut: data.csv's ood_far column),
    # false (none), or "auto": by the share of the folder flagged, against false_rejection
    # (the share of the labeled classes' own images the cut flags): false up to twice it, far
    # up to 6.5 times, true above (pseudolabel.ood.auto_decides).
    exclude: bool | str = MISSING
    # "Far" from every labeled class: past this multiple (>= 1) of the cut (junk: blank,
    # noise, scans; pseudolabel.ood.far_cut).
    far: float = MISSING


@dataclass
class PseudoLabelConfig:
    # Minimum top-1 confidence for an unlabeled image to join the student's training set;
    # None keeps every image, as in the seed. Also the line drawn on the selection charts.
    threshold: float | None = MISSING
    # threshold (the global one above) | per_class | topk (class-balanced, Noisy Student).
    selection: str = MISSING
    # per_class: {class: threshold}; classes left out use `threshold`. None derives each class's
    # threshold from val: the lowest one whose precision in that class reaches target_precision.
    per_class_threshold: dict[str, float] | None = MISSING
    # topk: the K most confident images per predicted class; `duplicate` repeats the images of
    # a class that has fewer than K up to K.
    top_k: int = MISSING
    duplicate: bool = MISSING
    # The recommended threshold is the one keeping most images whose precision (estimated on
    # val) reaches this.
    target_precision: float = MISSING
    # Temperature scaling fitted on val before any threshold; false keeps the raw softmax.
    calibrate: bool = MISSING
    # Average the teacher's probabilities over each image and its horizontal mirror.
    tta: bool = MISSING
    # Distribution alignment: reweight the (calibrated) probabilities per class so that their
    # mean over the unlabeled images matches the labeled images' class distribution.
    distribution_alignment: bool = MISSING
    batch_size: int = MISSING
    # local (tf.data on this machine) | ray (a Ray Data pipeline on the cluster in `ray`).
    engine: str = MISSING
    # Predictions are flushed every chunk_size images, so a killed run resumes from there.
    chunk_size: int = MISSING
    # Visual QA: images per row in each class's grid.
    qa_images: int = MISSING
    # Noisy Student rounds: round r's student labels the images again as round r+1's teacher.
    rounds: int = MISSING
    # Images unlike the labeled classes (other classes, junk): scored, flagged, left out.
    ood: OODConfig = field(default_factory=OODConfig)


@dataclass
class TrackingConfig:
    uri: str = MISSING
    experiment: str = MISSING
    # evaluate registers the student as a version of this MLflow registered model (alias
    # champion on a win on the same test set, else challenger); null: no registration.
    registered_model: str | None = MISSING
    # Seconds a training stage waits at its end for a tracking server that stopped answering
    # during the training (its metrics kept meanwhile); past it the stage fails in one line,
    # model and metrics saved, and the next run only logs.
    outage_wait: float = MISSING
    # Seconds a stage waits at its start for a tracking server that does not answer (being
    # restarted); past it the stage stops in one line before any work.
    start_wait: float = MISSING


@dataclass
class RayConfig:
    # The cluster pseudo_label.engine=ray labels on (and train.strategy=multi_worker trains
    # on): None starts a local Ray instance, `auto`
    # joins the one this machine is part of, HOST:PORT is the head node's address.
    address: str | None = MISSING
    # Teacher replicas (Ray Data actors, the model loaded once in each; None: as many as the
    # cluster's CPUs hold beside the decoding) and the CPUs each reserves.
    actors: int | None = MISSING
    cpus_per_actor: float = MISSING
    # Restarts of a Ray Train run (multi_worker) from its last checkpoint after a worker
    # dies; -1: without limit.
    max_failures: int = MISSING


@dataclass
class Config:
    seed: int = MISSING
    # Derived from pseudo_label.rounds by conf/config.yaml (pseudolabel.rounds): dvc.yaml's
    # per-round stages and the model `evaluate` scores.
    rounds: dict[str, Any] = MISSING
    final_student: str = MISSING
    # A hash of the other values, computed by the composition (pseudolabel.composition): a
    # params.yaml edited by hand no longer matches it, and load_params refuses it.
    params_digest: str = MISSING
    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    # Derived from `student` and pseudo_label.rounds by conf/config.yaml (pseudolabel.rounds.
    # baseline): the labeled-only model train_baseline trains.
    baseline: StudentConfig = field(default_factory=StudentConfig)
    pseudo_label: PseudoLabelConfig = field(default_factory=PseudoLabelConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    ray: RayConfig = field(default_factory=RayConfig)


def validate(raw: Any, origin: str = "config") -> DictConfig:
    """Merge `raw` into the schema and check that every key is set and every value in range;
    raise PseudoLabelError (one line) if not."""
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(Config), raw)
    except OmegaConfBaseException as exc:
        raise PseudoLabelError(
            f"{origin}: {exc.msg if hasattr(exc, 'msg') else exc} "
            "(compare with conf/ and src/pseudolabel/config.py)"
        ) from None
    _check_complete(cfg, origin)
    _check_ranges(cfg, origin)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def _check_complete(cfg: DictConfig, origin: str) -> None:
    """The schema has no values: a key that `raw` lacks is MISSING, and named here (OmegaConf
    would raise only when a stage first reads it, mid-run)."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        keys = f"key {missing[0]} is" if len(missing) == 1 else f"keys {', '.join(missing)} are"
        raise PseudoLabelError(f"{origin}: {keys} missing; recompose with `pseudolabel compose`")


def check_threshold(threshold: float | None, key: str = "threshold") -> None:
    """A confidence threshold is None (keep all) or a number in [0, 1]."""
    if threshold is None:
        return
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        raise PseudoLabelError(f"{key}={threshold!r} is invalid: give a number in [0, 1] or None.")
    if not (math.isfinite(threshold) and 0.0 <= threshold <= 1.0):
        raise PseudoLabelError(
            f"{key}={threshold!r} is invalid: use a confidence in [0, 1], or null/None to keep all."
        )


def _check_ranges(cfg: DictConfig, origin: str) -> None:
    def fail(key: str, value: Any, why: str) -> None:
        raise PseudoLabelError(f"{origin}: {key}={value!r} is invalid: {why}.")

    check_threshold(cfg.pseudo_label.threshold, f"{origin}: pseudo_label.threshold")
    if not 0 <= cfg.seed < 2**32:  # numpy's generators refuse anything else, mid-run
        fail("seed", cfg.seed, "use a whole number from 0 to 4294967295")
    for key in ("outage_wait", "start_wait"):
        if not (math.isfinite(cfg.tracking[key]) and cfg.tracking[key] >= 0):
            fail(f"tracking.{key}", cfg.tracking[key], "use seconds, 0 or more")
    if cfg.teacher.input_scale not in INPUT_SCALES:
        fail(
            "teacher.input_scale", cfg.teacher.input_scale, f"use one of {', '.join(INPUT_SCALES)}"
        )
    if cfg.data.source not in DATA_SOURCES:
        fail("data.source", cfg.data.source, f"choose one of {', '.join(DATA_SOURCES)}")
    if len(cfg.data.image_size) != 2 or min(cfg.data.image_size) < 1:
        fail("data.image_size", list(cfg.data.image_size), "give [height, width] in pixels")
    if cfg.data.channels not in (1, 3):
        fail("data.channels", cfg.data.channels, "use 1 (grayscale) or 3 (RGB)")
    for key in ("train_per_class", "val_per_class"):
        if cfg.data[key] < 1:
            fail(f"data.{key}", cfg.data[key], "need at least one image per class")
    if cfg.data.unlabeled is not None and cfg.data.unlabeled < 1:
        fail("data.unlabeled", cfg.data.unlabeled, "need at least one unlabeled image")
    _check_folder_keys(cfg.data, fail)
    for role in ("teacher", "student"):
        train = cfg[role].train
        _check_model(cfg[role].model, cfg.data.image_size, f"{role}.model", fail)
        _check_augment(train.augment, f"{role}.train.augment", fail)
        if train.epochs < 1 or train.batch_size < 1:
            fail(f"{role}.train", f"epochs={train.epochs}, batch_size={train.batch_size}", ">= 1")
        fraction = train.labeled_fraction
        if fraction is not None and not 0.0 < fraction < 1.0:
            fail(f"{role}.train.labeled_fraction", fraction, "use a share in (0, 1), or null")
        if train.steps_per_epoch is not None and train.steps_per_epoch < 1:
            fail(f"{role}.train.steps_per_epoch", train.steps_per_epoch, "use >= 1, or null")
        if train.learning_rate <= 0:
            fail(f"{role}.train.learning_rate", train.learning_rate, "must be > 0")
    _check_consistency(cfg.student.consistency, fail)
    for role in ("teacher", "student"):
        _check_strategy(cfg, role, fail)
    for role in ("teacher", "student"):
        if not 0.0 <= cfg[role].train.ema < 1.0:
            fail(f"{role}.train.ema", cfg[role].train.ema, "use a momentum in [0, 1), 0: off")
    if cfg.student.labeled_finetune_epochs < 0:
        fail("student.labeled_finetune_epochs", cfg.student.labeled_finetune_epochs, ">= 0")
    if not 0.0 < cfg.student.labeled_finetune_lr_factor <= 1.0:
        fail(
            "student.labeled_finetune_lr_factor",
            cfg.student.labeled_finetune_lr_factor,
            "use a factor in (0, 1]",
        )
    _check_pseudo_label(cfg.pseudo_label, fail)
    _check_ray(cfg.ray, fail)
    _check_rounds(cfg, origin)
    _check_baseline(cfg, origin)


def _check_baseline(cfg: DictConfig, origin: str) -> None:
    """`baseline` must be the node conf/config.yaml derives from the student's (a hand-edited
    params.yaml, or a config changed in code, may not match it)."""
    expected = rounds.baseline(cfg.student, cfg.pseudo_label.rounds)
    if OmegaConf.to_container(cfg.baseline, resolve=True) != expected:
        raise PseudoLabelError(
            f"{origin}: `baseline` is not the node derived from `student` and "
            "pseudo_label.rounds (it is derived: set student.* instead); recompose with "
            "`pseudolabel compose`"
        )


def _check_rounds(cfg: DictConfig, origin: str) -> None:
    """The derived keys must match pseudo_label.rounds (a hand-edited params.yaml may not)."""
    n = cfg.pseudo_label.rounds
    expected = (rounds.foreach_items(n), rounds.final_student(n))
    found = (OmegaConf.to_container(cfg.rounds), cfg.final_student)
    if found != expected:
        raise PseudoLabelError(
            f"{origin}: pseudo_label.rounds={n} but `rounds`/`final_student` describe "
            f"{len(found[0]) + 1} round(s); they are derived: recompose with "
            f"`pseudolabel compose pseudo_label.rounds={n}` or `dvc exp run -S "
            f"pseudo_label.rounds={n}` instead of editing params.yaml by hand."
        )


def input_size(model_cfg, image_size) -> list[int]:
    """The [height, width] a model resizes its raw input to: its own, else the data's."""
    return list(model_cfg.input_size or image_size)


def check_input_size(name: str, size, key: str) -> None:
    """A backbone's input must be at least its minimum size; the error says how to set it."""
    smallest = MIN_INPUT_SIZE.get(name, 1)
    if min(size) < smallest:
        raise PseudoLabelError(
            f"{key}: {name} needs an input of at least {smallest}x{smallest} pixels, got "
            f"{size[0]}x{size[1]}; set {key}.input_size=[{smallest},{smallest}] or more (images "
            "are resized inside the model), or pick small_cnn."
        )


def _check_model(model: DictConfig, image_size, key: str, fail) -> None:
    if model.name not in MODEL_NAMES:
        fail(f"{key}.name", model.name, f"choose one of {', '.join(MODEL_NAMES)}")
    if model.width < 1 or model.depth < 1:
        fail(key, f"width={model.width}, depth={model.depth}", "must be >= 1")
    for rate in ("dropout", "drop_connect_rate"):
        if not 0.0 <= model[rate] < 1.0:
            fail(f"{key}.{rate}", model[rate], "use a rate in [0, 1)")
    if model.pooling not in POOLINGS:
        fail(f"{key}.pooling", model.pooling, f"use one of {', '.join(POOLINGS)}")
    for count in ("hidden_units", "fine_tune_epochs"):
        if model[count] < 0:
            fail(f"{key}.{count}", model[count], "must be >= 0")
    if not 0.0 < model.fine_tune_lr_factor <= 1.0:
        fail(f"{key}.fine_tune_lr_factor", model.fine_tune_lr_factor, "use a factor in (0, 1]")
    if model.input_size is not None and (len(model.input_size) != 2 or min(model.input_size) < 1):
        fail(f"{key}.input_size", list(model.input_size), "give [height, width], or null")
    if model.weights is not None and model.name not in MIN_INPUT_SIZE:
        fail(f"{key}.weights", model.weights, f"{model.name} has no pretrained weights; use null")
    check_input_size(model.name, input_size(model, image_size), key)


def _check_augment(augment: DictConfig, key: str, fail) -> None:
    if augment.randaugment_ops < 0:
        fail(f"{key}.randaugment_ops", augment.randaugment_ops, "use >= 0 (0: off)")
    for share in ("randaugment_magnitude", "erasing", "mixup"):
        if not 0.0 <= augment[share] <= 1.0:
            fail(f"{key}.{share}", augment[share], "use a value in [0, 1]")


ALIGNMENT_TARGETS = ("labeled", "pool", "auto")
MASKS = ("threshold", "softmatch", "freematch")


def _check_consistency(cons: DictConfig, fail) -> None:
    key = "student.consistency"
    if cons.ratio < 1:
        fail(f"{key}.ratio", cons.ratio, "use >= 1 unlabeled image per labeled one")
    for share in ("threshold", "rampup"):
        if not 0.0 <= cons[share] <= 1.0:
            fail(f"{key}.{share}", cons[share], "use a value in [0, 1]")
    if cons.mask not in MASKS:
        fail(f"{key}.mask", cons.mask, "use threshold, softmatch or freematch")
    if not 0.0 <= cons.mask_momentum < 1.0:
        fail(f"{key}.mask_momentum", cons.mask_momentum, "use a momentum in [0, 1)")
    if not 0.0 <= cons.target_ema < 1.0:
        fail(f"{key}.target_ema", cons.target_ema, "use a momentum in [0, 1), 0: off")
    if cons.alignment_target not in ALIGNMENT_TARGETS:
        fail(f"{key}.alignment_target", cons.alignment_target, "use labeled, pool or auto")
    if not 0.0 <= cons.alignment_momentum < 1.0:
        fail(f"{key}.alignment_momentum", cons.alignment_momentum, "use a momentum in [0, 1)")
    if cons.warmup_steps < 0:
        fail(f"{key}.warmup_steps", cons.warmup_steps, "use >= 0 steps (0: no warm-up)")
    for weight in ("weight", "teacher_weight", "warmup_weight"):
        if not (math.isfinite(cons[weight]) and cons[weight] >= 0.0):
            fail(f"{key}.{weight}", cons[weight], "use a weight >= 0")
    _check_augment(cons.weak, f"{key}.weak", fail)
    _check_augment(cons.strong, f"{key}.strong", fail)


def _check_pseudo_label(pl: DictConfig, fail) -> None:
    for key in ("batch_size", "chunk_size", "qa_images"):
        if pl[key] < 1:
            fail(f"pseudo_label.{key}", pl[key], "must be >= 1")
    if not 0.0 < pl.ood.false_rejection < 0.5:
        fail("pseudo_label.ood.false_rejection", pl.ood.false_rejection, "use a share in (0, 0.5)")
    if pl.ood.contrast_sample < 1:
        fail("pseudo_label.ood.contrast_sample", pl.ood.contrast_sample, "use >= 1 image")
    if pl.ood.exclude not in (True, False, "far", "auto"):
        fail("pseudo_label.ood.exclude", pl.ood.exclude, "use true, false, far or auto")
    if pl.ood.exclude in (True, "far") and not pl.ood.enabled:
        fail(
            "pseudo_label.ood.exclude",
            pl.ood.exclude,
            "needs pseudo_label.ood.enabled=true (the score)",
        )
    far = pl.ood.far
    if far is None or not (math.isfinite(far) and far >= 1.0):
        fail("pseudo_label.ood.far", far, "use a multiple of the cut >= 1")
    if pl.selection not in SELECTIONS:
        fail("pseudo_label.selection", pl.selection, f"use one of {', '.join(SELECTIONS)}")
    if not (math.isfinite(pl.target_precision) and 0.0 < pl.target_precision <= 1.0):
        fail("pseudo_label.target_precision", pl.target_precision, "use a precision in (0, 1]")
    if pl.top_k < 1:
        fail("pseudo_label.top_k", pl.top_k, "keep at least 1 image per class")
    if pl.rounds < 1:
        fail("pseudo_label.rounds", pl.rounds, "use 1 (one student) or more")
    for name, value in (pl.per_class_threshold or {}).items():
        check_threshold(value, f"pseudo_label.per_class_threshold.{name}")
    if pl.engine not in ENGINES:
        fail("pseudo_label.engine", pl.engine, f"use one of {', '.join(ENGINES)}")


def _check_strategy(cfg: DictConfig, role: str, fail) -> None:
    train = cfg[role].train
    key = f"{role}.train"
    if train.strategy not in STRATEGIES:
        fail(f"{key}.strategy", train.strategy, f"use one of {', '.join(STRATEGIES)}")
    if train.optimizer not in OPTIMIZERS:
        fail(f"{key}.optimizer", train.optimizer, f"use one of {', '.join(OPTIMIZERS)}")
    if not (math.isfinite(train.weight_decay) and train.weight_decay >= 0):
        fail(f"{key}.weight_decay", train.weight_decay, "use 0 (off) or a positive decay")
    if train.workers < 1:
        fail(f"{key}.workers", train.workers, "use >= 1 Ray Train worker")
    if train.strategy == "multi_worker" and train.batch_size < train.workers:
        fail(
            f"{key}.batch_size",
            train.batch_size,
            f"the global batch is split across {key}.workers={train.workers}: use at least one "
            "image per worker",
        )


def _check_ray(ray: DictConfig, fail) -> None:
    if ray.actors is not None and ray.actors < 1:
        fail("ray.actors", ray.actors, "use >= 1 teacher replica, or null")
    if not ray.cpus_per_actor > 0:
        fail("ray.cpus_per_actor", ray.cpus_per_actor, "must be > 0 (fractions allowed)")
    if ray.max_failures < -1:
        fail("ray.max_failures", ray.max_failures, "use >= 0 restarts, or -1 for no limit")
    address = ray.address
    if address is not None and address != "auto" and not _host_port(address):
        fail("ray.address", address, "use null (a local Ray), auto, or HOST:PORT")


def _host_port(address: str) -> bool:
    host, _, port = str(address).rpartition(":")
    return bool(host) and port.isdigit() and 0 < int(port) < 65536


def _check_folder_keys(data: DictConfig, fail) -> None:
    if data.link not in LINK_MODES:
        fail("data.link", data.link, f"use one of {', '.join(LINK_MODES)}")
    for key in ("val_fraction", "test_fraction"):
        if not 0.0 < data[key] < 0.5:
            fail(f"data.{key}", data[key], "use a share in (0, 0.5)")
    if data.min_size < 1:
        fail("data.min_size", data.min_size, "must be >= 1 pixel")
    if data.max_pixels < 1:
        fail("data.max_pixels", data.max_pixels, "must be >= 1 pixel (height x width)")
    if not 0 <= data.near_duplicate_distance < 64:
        fail("data.near_duplicate_distance", data.near_duplicate_distance, "use 0..63 bits")
    if data.workers is not None and data.workers < 1:
        fail("data.workers", data.workers, "use >= 1, or null for all cores")
    if data.source == "folder" and data.labeled_root == BUILTIN_ROOT:
        fail("data.labeled_root", data.labeled_root, "set it to your labeled folder")
    if data.source == "folder" and data.unlabeled_root == BUILTIN_ROOT:
        fail("data.unlabeled_root", data.unlabeled_root, "set it to your unlabeled folder")


def group_options(group_dir: Path) -> list[str]:
    """The options of a conf/ group folder: its files but the `_base.yaml` they extend."""
    return sorted(p.stem for p in group_dir.glob("*.yaml") if not p.name.startswith("_"))


def load_params(path: str | Path = "params.yaml") -> DictConfig:
    """Load and validate a composed parameter file (what DVC stages read)."""
    path = Path(path)
    if not path.is_file():
        raise PseudoLabelError(
            f"{path}: parameter file not found. Run from the project root, or write it with "
            "`pseudolabel compose`."
        )
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise PseudoLabelError(f"{path}: not valid YAML ({exc}).") from None
    if not isinstance(raw, dict):
        raise PseudoLabelError(f"{path}: expected a mapping of parameters.")
    if composition.DIGEST not in raw:
        composition.check_digest(raw, str(path))  # the older-version message
    cfg = validate(raw, origin=str(path))  # names a missing key or a bad value first
    composition.check_digest(raw, str(path))
    return cfg


def project_root(start: str | Path | None = None) -> Path:
    """The project whose conf/ to compose: `start` (default: the working directory) if it has
    conf/config.yaml, else the DVC root above it (the nearest folder with a .dvc/), as DVC's
    own Hydra integration reads the root's conf/."""
    here = Path(start or Path.cwd()).resolve()
    if (here / CONF / "config.yaml").is_file():
        return here
    for folder in (here, *here.parents):
        if (folder / ".dvc").is_dir():
            if (folder / CONF / "config.yaml").is_file():
                return folder
            break
    raise PseudoLabelError(
        f"{here}: no {CONF}/config.yaml here or at the DVC root above: run `pseudolabel init` "
        "in your repository, or cd to the project."
    )


def conf_dir(start: str | Path | None = None) -> Path:
    """The project's conf/ folder (see project_root)."""
    return project_root(start) / CONF


def compose_raw(overrides: list[str] | None = None, config_dir: Path | None = None) -> DictConfig:
    """Compose the project's `conf/` (or `config_dir`) with Hydra overrides, exactly as DVC's
    Hydra integration does."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException

    config_dir = Path(config_dir) if config_dir is not None else conf_dir()
    rounds.register()  # conf/config.yaml derives the per-round keys with these resolvers
    composition.register()  # and its params_digest
    try:
        with initialize_config_dir(str(config_dir.resolve()), version_base=None):
            cfg = hydra_compose(config_name="config", overrides=list(overrides or []))
    except HydraException as exc:
        raise PseudoLabelError(f"conf/: {_one_line(str(exc))}") from None
    OmegaConf.resolve(cfg)
    return cfg


def _one_line(message: str) -> str:
    """Hydra's multi-line composition errors (a list of options below) in one line."""
    message = message.split("Config search path:")[0]  # Hydra's, naming temporary folders
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    head, rest = lines[0], [line for line in lines[1:] if not line.startswith("_")]
    return f"{head} ({' '.join(rest)})" if rest else head


def compose(overrides: list[str] | None = None, config_dir: Path | None = None) -> DictConfig:
    """Compose `conf/` with overrides and validate the result."""
    raw = compose_raw(overrides, config_dir)
    return validate(raw, origin="conf/ " + " ".join(overrides or []))


def compose_defaults(overrides: list[str] | None = None) -> DictConfig:
    """`compose`, without what this project's conf/project.yaml sets (`pseudolabel compose
    KEY=VALUE`, `make demo`'s profile): the committed defaults plus `overrides`, which is what
    the benchmarks measure and call the default recipe, whatever the working copy composes."""
    conf = conf_dir()
    settings = composition.Settings.read(conf / f"{composition.PROJECT}.yaml")
    if not (settings.added or settings.overridden or settings.values):
        return compose(overrides)
    with _conf_with_project(conf, composition.Settings().text()) as trial:
        return compose(overrides, trial)


@contextlib.contextmanager
def _conf_with_project(conf: Path, text: str | None):
    """A temporary copy of `conf` whose project.yaml holds `text` (None: as it is)."""
    import shutil
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        trial = Path(tmp) / CONF
        shutil.copytree(conf, trial)
        if text is not None:
            (trial / f"{composition.PROJECT}.yaml").write_text(text, encoding="utf-8")
        yield trial


def compose_project(
    overrides: list[str], reset: bool = False, root: str | Path | None = None
) -> tuple[Path, Path]:
    """`pseudolabel compose`: record `overrides` in the project's conf/project.yaml (on top of
    what it holds; `reset`: instead of it), then write params.yaml as the composition of conf/
    alone, which is what DVC and the sweep compose too. Everything is checked (the composition,
    its values, the data folders) before either file is written. Returns both paths."""
    root = project_root(root)
    conf = root / CONF
    project = conf / f"{composition.PROJECT}.yaml"
    settings = composition.Settings() if reset else composition.Settings.read(project)
    settings = composition.apply(settings, overrides, conf)
    text = settings.text()
    unchanged = project.is_file() and not (overrides or reset)  # keep hand edits as they are
    with _conf_with_project(conf, None if unchanged else text) as trial:
        raw = compose_raw([], trial)
    cfg = validate(raw, origin=f"conf/ {' '.join(overrides)}".rstrip())
    check_data_roots(cfg, root)
    if not unchanged:
        write_text_atomic(project, text)
    params = root / "params.yaml"
    write_text_atomic(params, to_yaml(raw))
    return project, params


def check_data_roots(cfg: DictConfig, root: str | Path) -> None:
    """The user's folders (data.source=folder) exist, relative paths read from the project
    `root` as the stages read them: refused when composing, before DVC removes the ingest
    outputs to re-run it."""
    if cfg.data.source != "folder":
        return
    for key in ("labeled_root", "unlabeled_root"):
        folder = Path(cfg.data[key])
        where = folder if folder.is_absolute() else Path(root) / folder
        if not where.is_dir():
            raise PseudoLabelError(
                f"data.{key}={cfg.data[key]}: folder not found ({where}); create it or fix the "
                "path, then compose again."
            )


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg)


def to_dict(cfg: DictConfig) -> dict[str, Any]:
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
