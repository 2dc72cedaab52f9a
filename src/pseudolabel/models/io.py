"""Model files: `<name>.keras` plus `<name>.json` metadata, so nothing has to guess pixels."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import keras

from pseudolabel.errors import PseudoLabelError


@dataclass
class ModelMeta:
    """What a caller needs to feed a model correctly and to trace where it came from."""

    class_names: list[str]
    image_size: list[int]
    channels: int
    # What the model expects as input: "0-255" means raw pixels (the model scales itself).
    input_scale: str = "0-255"
    run_id: str | None = None
    extra: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def meta_path(model_path: Path) -> Path:
    return Path(model_path).with_suffix(".json")


def save(model: keras.Model, path: Path, meta: ModelMeta) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    model.save(path)
    meta_path(path).write_text(json.dumps(asdict(meta), indent=2) + "\n", encoding="utf-8")


def read_meta(path: Path) -> ModelMeta | None:
    mpath = meta_path(path)
    if not mpath.is_file():
        return None
    return ModelMeta(**json.loads(mpath.read_text(encoding="utf-8")))


def load(path: Path, meta: ModelMeta | None = None) -> tuple[keras.Model, ModelMeta]:
    """Load a `.keras` / `.h5` model and its metadata, checking they agree."""
    model = load_foreign(path)
    meta = meta or read_meta(path)
    if meta is None:
        raise PseudoLabelError(
            f"{path}: no metadata file {meta_path(path).name} beside the model; pass class names "
            "and image size explicitly."
        )
    check_output_size(model, meta.num_classes, str(path))
    return model, meta


def check_output_size(model: keras.Model, num_classes: int, where: str) -> None:
    outputs = model.outputs[0].shape[-1]
    if outputs != num_classes:
        raise PseudoLabelError(
            f"{where}: the model predicts {outputs} classes but there are {num_classes} class "
            "folders; use a model trained on these classes or fix the class folders."
        )


# Rescaling (scale, offset) that maps raw 0..255 pixels to what a foreign model expects.
INPUT_SCALES = {"0-255": (1.0, 0.0), "0-1": (1.0 / 255.0, 0.0), "-1-1": (1.0 / 127.5, -1.0)}


def adopt(
    model: keras.Model, class_names: list[str], input_scale: str, where: str
) -> tuple[keras.Model, ModelMeta]:
    """Wrap a model made elsewhere so it takes raw pixels like ours, and describe it."""
    check_output_size(model, len(class_names), where)
    shape = model.input_shape
    if isinstance(shape, list) or len(shape) != 4 or None in shape[1:]:
        raise PseudoLabelError(
            f"{where}: expected one image input with a fixed (height, width, channels) shape, got "
            f"{shape}; re-save the model with a fixed input size."
        )
    if input_scale not in INPUT_SCALES:
        raise PseudoLabelError(
            f"input_scale={input_scale!r} is unknown; use one of {', '.join(INPUT_SCALES)}."
        )
    scale, offset = INPUT_SCALES[input_scale]
    inputs = keras.Input(shape=shape[1:], name="image")
    x = inputs if (scale, offset) == (1.0, 0.0) else keras.layers.Rescaling(scale, offset)(inputs)
    wrapped = keras.Model(inputs, model(x), name="teacher")
    meta = ModelMeta(
        list(class_names),
        [int(shape[1]), int(shape[2])],
        int(shape[3]),
        extra={"imported_from": where, "source_input_scale": input_scale},
    )
    return wrapped, meta


def load_foreign(path: Path) -> keras.Model:
    """Load a user's `.keras` / `.h5` file in Keras safe mode, with one clear error on failure."""
    path = Path(path)
    if not path.exists():
        raise PseudoLabelError(f"{path}: model file not found; check teacher.path / model_path.")
    try:
        return keras.saving.load_model(path, compile=False, safe_mode=True)
    except Exception as exc:  # keras raises many types for unreadable files
        raise PseudoLabelError(
            f"{path}: cannot load this model ({type(exc).__name__}: {exc})."
        ) from None
