"""Model files: `<name>.keras` plus `<name>.json` metadata, so nothing has to guess pixels.

A model made elsewhere (the user's `.keras`, legacy `.h5` or SavedModel folder) is *adopted*:
wrapped so that it too takes raw 0..255 pixels, its own preprocessing (`input_scale`) inside
the wrapper, and saved like ours.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import keras
import numpy as np

from pseudolabel.atomic import write_text_atomic
from pseudolabel.config import INPUT_SCALES, KERAS_PREPROCESSING
from pseudolabel.errors import PseudoLabelError

log = logging.getLogger(__name__)

RAW = "0-255"


@dataclass
class ModelMeta:
    """What a caller needs to feed a model correctly and to trace where it came from."""

    class_names: list[str]
    image_size: list[int]
    channels: int
    # What the model expects as input: "0-255" means raw pixels (the model scales itself).
    input_scale: str = RAW
    run_id: str | None = None
    extra: dict = field(default_factory=dict)
    # False only for a teacher the user imported with Lambda layers (teacher.allow_unsafe) or
    # from a SavedModel folder (a keras.layers.TFSMLayer pointing at it). Informational only:
    # a file beside the model can say anything, so loading it again needs the caller's own
    # allow_unsafe (teacher.allow_unsafe, PseudoLabelGenerator(allow_unsafe=True)) as well.
    safe_mode: bool = True

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def meta_path(model_path: Path) -> Path:
    return Path(model_path).with_suffix(".json")


def save(model: keras.Model, path: Path, meta: ModelMeta) -> None:
    """Model and metadata, each written to a temporary name in the same folder and renamed into
    place (os.replace): a run killed while saving leaves the previous complete file, never a
    truncated one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")  # Keras checks suffix
    try:
        model.save(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    write_text_atomic(meta_path(path), json.dumps(asdict(meta), indent=2) + "\n")


def read_meta(path: Path) -> ModelMeta | None:
    mpath = meta_path(path)
    if not mpath.is_file():
        return None
    try:
        return ModelMeta(**json.loads(mpath.read_text(encoding="utf-8")))
    except (ValueError, TypeError) as exc:  # not JSON, or not our fields
        raise PseudoLabelError(
            f"{mpath}: not a model metadata file ({type(exc).__name__}: {exc}); re-save the "
            "model with this project (train_teacher) or remove the file."
        ) from None


def load(
    path: Path,
    meta: ModelMeta | None = None,
    allow_unsafe: bool = False,
    trusted_saved_model: Path | None = None,
) -> tuple[keras.Model, ModelMeta]:
    """Load a model saved by `save` and its metadata, checking they agree.

    Keras safe mode stays on unless the caller passes `allow_unsafe` (the user's own option):
    the metadata's `safe_mode` never turns it off, since a sidecar file is as untrusted as the
    model beside it. `trusted_saved_model`: the SavedModel folder the user configured as the
    teacher (teacher.path); a model whose only unsafe layers wrap that folder loads too."""
    _require(Path(path))
    meta = meta or read_meta(path)
    if meta is None:
        raise PseudoLabelError(
            f"{path}: no metadata file {meta_path(path).name} beside the model; pass class names "
            "and image size explicitly."
        )
    if not meta.safe_mode and not allow_unsafe:
        log.info("%s: its metadata says safe_mode false; loading in safe mode anyway", path)
    if not allow_unsafe and trusted_saved_model is not None:
        allow_unsafe = _wraps_only(Path(path), Path(trusted_saved_model))
    model = load_foreign(path, allow_unsafe=allow_unsafe)
    check_output_size(model, meta.num_classes, str(path))
    return model, meta


def _wraps_only(path: Path, saved_model: Path) -> bool:
    """True when the `.keras` file's only unsafe layers are TFSMLayers over `saved_model` (read
    from its config, nothing deserialized): no Lambda layer, no serialized Python function."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            config = json.loads(archive.read("config.json"))
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return False
    folders, stack = [], [config]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            name = node.get("class_name")
            if name in ("Lambda", "__lambda__") or "__lambda__" in node:
                return False
            if name == "TFSMLayer":
                folders.append(str(node.get("config", {}).get("filepath", "")))
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    target = saved_model.resolve()
    return bool(folders) and all(Path(f).resolve() == target for f in folders)


def check_output_size(model: keras.Model, num_classes: int, where: str) -> None:
    outputs = model.outputs[0].shape[-1]
    if outputs != num_classes:
        raise PseudoLabelError(
            f"{where}: the model predicts {outputs} classes but there are {num_classes} class "
            "folders; use a model trained on these classes or fix the class folders."
        )


# Rescaling (scale, offset) that maps raw 0..255 pixels to what a foreign model expects.
LINEAR_SCALES = {RAW: (1.0, 0.0), "0-1": (1.0 / 255.0, 0.0), "-1-1": (1.0 / 127.5, -1.0)}
# A Rescaling layer at a model's input with a scale at most this expects raw 0..255 pixels.
RAW_RESCALE_MAX = 1.0 / 100.0
# keras.applications preprocessings that pass raw pixels through (their models scale inside).
RAW_PREPROCESSING = ("convnext", "efficientnet", "efficientnet_v2", "mobilenet_v3")
# Layers that may come before a model's own rescaling without changing pixel values' range.
_PASS_THROUGH = (
    keras.layers.InputLayer,
    keras.layers.Resizing,
    keras.layers.CenterCrop,
    keras.layers.RandomFlip,
    keras.layers.RandomTranslation,
    keras.layers.RandomRotation,
    keras.layers.RandomZoom,
    keras.layers.RandomCrop,
)


@keras.saving.register_keras_serializable(package="pseudolabel")
class KerasPreprocessing(keras.layers.Layer):
    """`keras.applications.<module>.preprocess_input` as a layer, so a saved model keeps it."""

    def __init__(self, module: str, **kwargs):
        super().__init__(**kwargs)
        if module not in KERAS_PREPROCESSING:
            raise PseudoLabelError(
                f"input_scale={module!r}: not a keras.applications preprocessing; use one of "
                f"{', '.join(KERAS_PREPROCESSING)}."
            )
        self.module = module
        self._preprocess = getattr(keras.applications, module).preprocess_input

    def call(self, inputs):
        return self._preprocess(inputs)

    def get_config(self):
        return {**super().get_config(), "module": self.module}


def _flat_layers(model: keras.Model):
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            yield from _flat_layers(layer)
        else:
            yield layer


def leading_rescaling(model: keras.Model) -> keras.layers.Rescaling | None:
    """The Rescaling layer a model applies to its input first, if it has one."""
    for layer in _flat_layers(model):
        if not isinstance(layer, _PASS_THROUGH):
            return layer if isinstance(layer, keras.layers.Rescaling) else None
    return None


def resolve_input_scale(model: keras.Model, input_scale: str, where: str) -> str:
    """The input scale to wrap `model` with: `auto` from its own Rescaling layer; a scale that
    would rescale a second time is refused."""
    if input_scale not in INPUT_SCALES:
        raise PseudoLabelError(
            f"input_scale={input_scale!r} is unknown; use one of {', '.join(INPUT_SCALES)}."
        )
    rescaling = leading_rescaling(model)
    scales_raw = rescaling is not None and np.all(
        np.abs(np.asarray(rescaling.scale)) <= RAW_RESCALE_MAX
    )
    if input_scale == "auto":
        if not scales_raw:
            raise PseudoLabelError(
                f"{where}: cannot tell which pixel values the model expects (it does not start "
                "with a Rescaling layer). Set teacher.input_scale (PseudoLabelGenerator("
                f"input_scale=...)) to one of {', '.join(INPUT_SCALES[1:])}: what its "
                "preprocessing did to the training images."
            )
        log.info("%s starts with %s: it takes raw 0-255 pixels", where, rescaling.name)
        return RAW
    if scales_raw and input_scale not in (RAW, *RAW_PREPROCESSING):
        raise PseudoLabelError(
            f"{where}: the model starts with a Rescaling layer (scale={rescaling.scale}) that "
            f"already scales raw 0-255 pixels; input_scale={input_scale} would scale them twice. "
            "Use input_scale: auto (or 0-255)."
        )
    return input_scale


def _scaling_layer(input_scale: str) -> keras.Layer | None:
    if input_scale in LINEAR_SCALES:
        scale, offset = LINEAR_SCALES[input_scale]
        return None if input_scale == RAW else keras.layers.Rescaling(scale, offset, name="scale")
    return KerasPreprocessing(input_scale, name="preprocess")


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
    input_scale = resolve_input_scale(model, input_scale, where)
    inputs = keras.Input(shape=shape[1:], name="image")
    scaling = _scaling_layer(input_scale)
    wrapped = keras.Model(inputs, model(scaling(inputs) if scaling else inputs), name="teacher")
    _check_probabilities(wrapped, where)
    meta = ModelMeta(
        list(class_names),
        [int(shape[1]), int(shape[2])],
        int(shape[3]),
        extra={"imported_from": where, "source_input_scale": input_scale},
        safe_mode=not uses_unsafe_layers(wrapped),
    )
    return wrapped, meta


def _check_probabilities(model: keras.Model, where: str) -> None:
    """The pipeline thresholds confidences, so outputs must be softmax probabilities."""
    pixels = np.random.default_rng(0).uniform(0, 255, (2, *model.input_shape[1:]))
    probs = np.asarray(model(pixels.astype("float32"), training=False), dtype="float64")
    if not (np.all(probs >= -1e-6) and np.allclose(probs.sum(axis=-1), 1.0, atol=1e-3)):
        raise PseudoLabelError(
            f"{where}: the model's outputs are not probabilities (rows sum to "
            f"{probs.sum(axis=-1).round(3).tolist()}); re-save it with a softmax output layer."
        )


def load_foreign(path: Path, allow_unsafe: bool = False) -> keras.Model:
    """Load a `.keras` / `.h5` file or a SavedModel folder, in Keras safe mode unless the user
    opted out, with one clear error on failure."""
    path = Path(path)
    _require(path)
    if path.is_dir():
        return _load_saved_model(path)
    try:
        return keras.saving.load_model(path, compile=False, safe_mode=not allow_unsafe)
    except Exception as exc:  # keras raises many types for unreadable files
        if "safe_mode" in str(exc):
            raise PseudoLabelError(
                f"{path}: the model contains a Lambda layer (or another layer that runs arbitrary "
                "Python code), which Keras safe mode refuses to load. If you trust this file, "
                "opt in with teacher.allow_unsafe=true (PseudoLabelGenerator(allow_unsafe=True)), "
                "or re-save the model without Lambda layers."
            ) from None
        raise PseudoLabelError(
            f"{path}: cannot load this model ({type(exc).__name__}: {exc})."
        ) from None


def _require(path: Path) -> None:
    if not path.exists():
        raise PseudoLabelError(f"{path}: model file not found; check teacher.path / model_path.")


def _load_saved_model(path: Path) -> keras.Model:
    """A TensorFlow SavedModel folder as an inference-only Keras model (keras.layers.TFSMLayer);
    the saved teacher refers to this folder, so keep it in place."""
    import tensorflow as tf

    if not (path / "saved_model.pb").is_file():
        raise PseudoLabelError(
            f"{path}: a folder but not a SavedModel (no saved_model.pb); point teacher.path to a "
            ".keras or .h5 file or to a SavedModel folder."
        )
    try:
        signatures = tf.saved_model.load(str(path)).signatures
        endpoint = "serving_default" if "serving_default" in signatures else next(iter(signatures))
        spec = signatures[endpoint].structured_input_signature[1]
        layer = keras.layers.TFSMLayer(str(path.resolve()), call_endpoint=endpoint)
    except Exception as exc:  # TensorFlow raises many types for unreadable folders
        raise PseudoLabelError(
            f"{path}: cannot load this SavedModel ({type(exc).__name__}: {exc}); it needs a "
            "serving signature (keras `model.export(path)` writes one)."
        ) from None
    if len(spec) != 1:
        raise PseudoLabelError(
            f"{path}: the SavedModel's {endpoint} signature takes {len(spec)} inputs "
            f"({', '.join(spec)}); the teacher must take one image batch."
        )
    name, tensor_spec = next(iter(spec.items()))
    inputs = keras.Input(shape=tensor_spec.shape[1:], name=name)
    outputs = layer(inputs)
    if isinstance(outputs, dict):
        if len(outputs) != 1:
            raise PseudoLabelError(
                f"{path}: the SavedModel returns {len(outputs)} outputs ({', '.join(outputs)}); "
                "the teacher must return one probability vector."
            )
        outputs = next(iter(outputs.values()))
    return keras.Model(inputs, outputs, name="saved_model")


def uses_unsafe_layers(model: keras.Model) -> bool:
    """True for a model Keras safe mode will not load again (Lambda, TFSMLayer)."""
    unsafe = (keras.layers.Lambda, keras.layers.TFSMLayer)
    return any(isinstance(layer, unsafe) for layer in _flat_layers(model))
