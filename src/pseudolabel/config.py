"""Configuration: the schema (dataclasses), loading of params.yaml, and Hydra composition.

`conf/` is the one source of truth. `params.yaml` is its composition (written by
`pseudolabel compose` or by DVC on `dvc exp run`); every entry point loads a config through
`load_params` or `compose`, and both validate it against the dataclasses below.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pseudolabel.errors import PseudoLabelError

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
DATA_SOURCES = ("fashion_mnist", "digits")
MODEL_NAMES = ("small_cnn",)
INPUT_SCALES = ("0-255", "0-1", "-1-1")


@dataclass
class DataConfig:
    source: str = "fashion_mnist"
    # Debian's dataset-fashion-mnist package puts the IDX files here.
    idx_dir: str = "/usr/share/datasets/fashion-mnist"
    train_per_class: int = 50
    val_per_class: int = 20
    # None: the whole official test split (Fashion-MNIST) / everything left (digits).
    test_per_class: int | None = None
    unlabeled: int = 20000
    image_size: list[int] = field(default_factory=lambda: [28, 28])
    channels: int = 1


@dataclass
class ModelConfig:
    name: str = "small_cnn"
    width: int = 32
    depth: int = 2
    dropout: float = 0.3


@dataclass
class AugmentConfig:
    """Keras preprocessing layers inside the model; active only while training."""

    flip: bool = False
    translate: float = 0.0
    rotate: float = 0.0
    zoom: float = 0.0
    contrast: float = 0.0


@dataclass
class TrainConfig:
    epochs: int = 30
    batch_size: int = 32
    learning_rate: float = 1e-3
    patience: int = 8
    label_smoothing: float = 0.0
    # Student only: the share of each batch drawn from the labelled images (the rest from the
    # pseudo-labelled ones); None samples the merged set uniformly.
    labeled_fraction: float | None = None
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass
class TeacherConfig:
    # An existing model (.keras or .h5) to use as the teacher instead of training one.
    path: str | None = None
    # The pixel range that model expects: "0-255" (raw), "0-1" or "-1-1". Models trained here
    # scale inside themselves and take raw pixels.
    input_scale: str = "0-255"
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


@dataclass
class StudentConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


@dataclass
class PseudoLabelConfig:
    # Minimum top-1 confidence for an unlabelled image to join the student's training set;
    # None keeps every image, as in the seed.
    threshold: float | None = 0.8
    batch_size: int = 256


@dataclass
class TrackingConfig:
    uri: str = "sqlite:///mlflow.db"
    experiment: str = "pseudolabel"


@dataclass
class Config:
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    pseudo_label: PseudoLabelConfig = field(default_factory=PseudoLabelConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


def validate(raw: Any, origin: str = "config") -> DictConfig:
    """Merge `raw` into the schema and check value ranges; raise PseudoLabelError if invalid."""
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(Config), raw)
    except OmegaConfBaseException as exc:
        raise PseudoLabelError(
            f"{origin}: {exc.msg if hasattr(exc, 'msg') else exc} "
            "(compare with conf/ and src/pseudolabel/config.py)"
        ) from None
    _check_ranges(cfg, origin)
    OmegaConf.set_readonly(cfg, True)
    return cfg


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
    if cfg.data.unlabeled < 1:
        fail("data.unlabeled", cfg.data.unlabeled, "need at least one unlabelled image")
    for role in ("teacher", "student"):
        model, train = cfg[role].model, cfg[role].train
        if model.name not in MODEL_NAMES:
            fail(f"{role}.model.name", model.name, f"choose one of {', '.join(MODEL_NAMES)}")
        if model.width < 1 or model.depth < 1:
            fail(f"{role}.model", f"width={model.width}, depth={model.depth}", "must be >= 1")
        if not 0.0 <= model.dropout < 1.0:
            fail(f"{role}.model.dropout", model.dropout, "use a rate in [0, 1)")
        if train.epochs < 1 or train.batch_size < 1:
            fail(f"{role}.train", f"epochs={train.epochs}, batch_size={train.batch_size}", ">= 1")
        fraction = train.labeled_fraction
        if fraction is not None and not 0.0 < fraction < 1.0:
            fail(f"{role}.train.labeled_fraction", fraction, "use a share in (0, 1), or null")
        if train.learning_rate <= 0:
            fail(f"{role}.train.learning_rate", train.learning_rate, "must be > 0")
    if cfg.pseudo_label.batch_size < 1:
        fail("pseudo_label.batch_size", cfg.pseudo_label.batch_size, "must be >= 1")


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
    return validate(raw, origin=str(path))


def compose_raw(overrides: list[str] | None = None, config_dir: Path = CONF_DIR) -> DictConfig:
    """Compose `conf/` with Hydra overrides, exactly as DVC's Hydra integration does."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException

    try:
        with initialize_config_dir(str(config_dir), version_base=None):
            cfg = hydra_compose(config_name="config", overrides=list(overrides or []))
    except HydraException as exc:
        raise PseudoLabelError(f"conf/: {exc}") from None
    OmegaConf.resolve(cfg)
    return cfg


def compose(overrides: list[str] | None = None, config_dir: Path = CONF_DIR) -> DictConfig:
    """Compose `conf/` with overrides and validate the result."""
    raw = compose_raw(overrides, config_dir)
    return validate(raw, origin="conf/ " + " ".join(overrides or []))


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg)


def to_dict(cfg: DictConfig) -> dict[str, Any]:
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
