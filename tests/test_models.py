"""The model zoo, transfer learning through the train stage, and importing the user's teacher."""

import json

import keras
import mlflow
import numpy as np
import pandas as pd
import pytest

from pseudolabel import fitting
from pseudolabel.config import (
    KERAS_PREPROCESSING,
    MODEL_NAMES,
    OWN_MODELS,
    compose,
    group_options,
)
from pseudolabel.data.images import labeled_files, path_image_dataset
from pseudolabel.errors import PseudoLabelError
from pseudolabel.models import io as model_io
from pseudolabel.models.builders import BACKBONES, backbone_of, build_model
from pseudolabel.paths import Paths
from pseudolabel.stages import train_teacher
from tests.conftest import CONF_DIR

BIG = {"efficientnet_b5", "efficientnet_b6", "efficientnet_b7", "efficientnetv2_m"}
BIG |= {"efficientnetv2_l"}


def _cfg(*overrides):
    return compose(["+experiment=smoke", *overrides])


def _zoo_cfg(name, *overrides):
    """A zoo model at 32 px, random weights, on the smoke config's 8x8 grey digits."""
    weights = [] if name in OWN_MODELS else ["teacher.model.weights=null"]
    return _cfg(
        f"model@teacher.model={name}", *weights, "teacher.model.input_size=[32,32]", *overrides
    )


def _build(cfg, image_size=(8, 8), channels=1):
    model = cfg.teacher.model
    return build_model(model, cfg.teacher.train.augment, 10, image_size, channels, "teacher")


def _raw_pixels(shape, seed=0):
    return np.random.default_rng(seed).uniform(0, 255, shape).astype("float32")


def test_zoo_names_configs_and_builders_agree():
    assert set(MODEL_NAMES) == {"small_cnn", "resnet", *BACKBONES}
    assert set(group_options(CONF_DIR / "model")) >= set(MODEL_NAMES)
    for module in KERAS_PREPROCESSING:  # every named input_scale is a keras.applications one
        assert callable(getattr(keras.applications, module).preprocess_input), module


@pytest.mark.parametrize(
    "name",
    [pytest.param(n, marks=pytest.mark.slow) if n in BIG else n for n in MODEL_NAMES],
)
def test_every_zoo_model_builds_and_predicts_from_raw_pixels(name):
    keras.backend.clear_session()
    model = _build(_zoo_cfg(name))
    probs = np.asarray(model(_raw_pixels((2, 8, 8, 1)), training=False))  # eager: no tracing
    assert probs.shape == (2, 10) and np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    names = [layer.name for layer in model.layers]
    assert "resize" in names  # 8x8 images resized to 32x32 inside the model
    backbone = backbone_of(model)
    if name in OWN_MODELS:
        assert backbone is None and "rescale" in names
    else:
        # keras.applications scales pixels itself: no second rescaling outside it.
        assert "rescale" not in names and "grey_to_rgb" in names
        assert isinstance(backbone.layers[1], keras.layers.Rescaling)
        assert backbone.input_shape == (None, 32, 32, 3)
    keras.backend.clear_session()


def test_head_and_stochastic_depth_options():
    model = _build(
        _zoo_cfg(
            "efficientnet_b0",
            "teacher.model.hidden_units=16",
            "teacher.model.pooling=max",
            "teacher.model.drop_connect_rate=0.4",
        )
    )
    assert model.get_layer("hidden").units == 16
    assert isinstance(model.get_layer("pool"), keras.layers.GlobalMaxPooling2D)
    drops = [la.rate for la in backbone_of(model).layers if la.name.endswith("drop")]
    # keras' 0.2 schedule, rising over the blocks, scaled to 0.4.
    assert 0.3 < max(drops) < 0.4 and min(drops) > 0


def test_noise_layers_act_only_while_training():
    cfg = _cfg(
        "teacher.train.augment.flip=true",  # the smoke teacher trains without noise
        "teacher.train.augment.randaugment_ops=2",
        "teacher.train.augment.randaugment_magnitude=0.8",
        "teacher.train.augment.erasing=1.0",
    )
    model = _build(cfg)
    classes = {type(layer).__name__ for layer in model.layers}
    assert {"RandAugment", "RandomErasing", "RandomFlip"} <= classes
    x = _raw_pixels((4, 8, 8, 1))
    augmented = keras.Model(model.input, model.get_layer("rescale").input)
    np.testing.assert_array_equal(augmented(x, training=False), x)
    assert not np.allclose(augmented(x, training=True), x)


def test_bad_model_settings_are_clear_errors():
    with pytest.raises(PseudoLabelError, match="efficientnet_b0, efficientnet_b1"):
        _cfg("teacher.model.name=efficientnet_b9")
    with pytest.raises(PseudoLabelError, match=r"at least 32x32 pixels, got 16x16"):
        _zoo_cfg("efficientnet_b0", "teacher.model.input_size=[16,16]")
    # No input_size: the data's 8x8 images are too small for the backbone.
    with pytest.raises(PseudoLabelError, match=r"input_size=\[32,32\]"):
        _cfg("model@teacher.model=efficientnet_b0", "teacher.model.input_size=null")
    with pytest.raises(PseudoLabelError, match="randaugment_magnitude"):
        _cfg("student.train.augment.randaugment_magnitude=2")
    with pytest.raises(PseudoLabelError, match="no pretrained weights"):
        _cfg("++teacher.model.weights=imagenet")


def test_imagenet_weights_unavailable_say_how_to_provide_them(monkeypatch):
    """What happens offline: keras' get_file cannot download the weights file."""
    from keras.src.utils import file_utils

    def offline(fname=None, origin=None, **_):
        raise Exception(f"URL fetch failure on {origin}: None -- Name or service not known")

    monkeypatch.setattr(file_utils, "get_file", offline)
    cfg = _zoo_cfg("efficientnet_b0", "teacher.model.weights=imagenet")
    with pytest.raises(PseudoLabelError) as err:
        _build(cfg)
    message = str(err.value)
    assert "efficientnetb0_notop.h5" in message and "~/.keras/models/" in message
    assert "teacher.model.weights=null" in message


def test_class_weights_and_mixed_precision_on_cpu(monkeypatch):
    weights = fitting.balanced_class_weights(np.array([0, 0, 0, 1]), 3)
    assert weights == {0: 4 / 9, 1: 4 / 3, 2: 1.0}
    monkeypatch.setattr(fitting, "cpu_has_bfloat16", lambda: False)
    with fitting.precision(True):  # no GPU, no bfloat16 CPU: stays float32, with a warning
        assert keras.config.dtype_policy().name == "float32"
    monkeypatch.setattr(fitting, "cpu_has_bfloat16", lambda: True)
    with fitting.precision(True):
        assert keras.config.dtype_policy().name == "mixed_bfloat16"
        bf16 = _build(_cfg("teacher.train.augment.randaugment_ops=2"))
    assert keras.config.dtype_policy().name == "float32"  # restored
    bf16.compile(optimizer="adam", loss="categorical_crossentropy")
    labels = keras.utils.to_categorical(np.arange(8) % 10, 10)
    bf16.fit(_raw_pixels((8, 8, 8, 1)), labels, batch_size=8, verbose=0)
    assert bf16.dtype_policy.name == "mixed_bfloat16" and bf16.output.dtype == "float32"
    # What precision(True) does on a GPU; pixel layers (noise, resize) must stay float32.
    cfg = _cfg("teacher.train.augment.randaugment_ops=2", "teacher.train.augment.erasing=0.5")
    keras.config.set_dtype_policy("mixed_float16")
    try:
        model = _build(cfg)
        model.compile(optimizer="adam", loss="categorical_crossentropy")
        labels = keras.utils.to_categorical(np.arange(8) % 10, 10)
        model.fit(_raw_pixels((8, 8, 8, 1)), labels, batch_size=8, verbose=0)
    finally:
        keras.config.set_dtype_policy("float32")
    assert model.dtype_policy.name == "mixed_float16" and model.output.dtype == "float32"


def _three_epochs(*overrides):
    """A seeded teacher config of 3 epochs, its model, 2 training batches and a val batch."""
    import tensorflow as tf

    cfg = _cfg("teacher.train.epochs=3", "teacher.train.patience=3", *overrides)
    keras.utils.set_random_seed(0)
    model = _build(cfg)
    x, y = _raw_pixels((32, 8, 8, 1)), keras.utils.to_categorical(np.arange(32) % 10, 10)
    train_ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)
    val_ds = tf.data.Dataset.from_tensor_slices((x[:10], y[:10])).batch(10)
    return cfg, model, train_ds, val_ds


@pytest.mark.parametrize("restore", [True, False])
def test_fit_keeps_the_best_val_epoch_or_the_last(tmp_path, restore):
    """train.restore_best_weights: the weights of the first best val-accuracy epoch (Keras
    EarlyStopping), or with false those of the last epoch."""
    cfg, model, train_ds, val_ds = _three_epochs(f"teacher.train.restore_best_weights={restore}")

    class Snapshots(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.weights = []

        def on_epoch_end(self, epoch, logs=None):
            self.weights.append(self.model.get_weights())

    snapshots = Snapshots()
    history = fitting.fit(
        model, train_ds, val_ds, cfg.teacher.train, 2, tmp_path / "h.csv", [snapshots]
    )
    val = history.history["val_accuracy"]
    kept = int(np.argmax(val)) if restore else len(val) - 1
    assert kept != len(val) - 1 or not restore  # seeded: an earlier epoch is the best
    assert not np.array_equal(snapshots.weights[0][-1], snapshots.weights[-1][-1])
    for got, want in zip(model.get_weights(), snapshots.weights[kept], strict=True):
        np.testing.assert_array_equal(got, want)


def test_fit_with_ema_keeps_the_best_epochs_average(tmp_path):
    """train.ema with restore_best_weights: the average is what is validated and what is kept
    (Keras's EarlyStopping alone would restore the epoch's raw weights over it)."""
    cfg, model, train_ds, val_ds = _three_epochs(
        "teacher.train.restore_best_weights=true", "teacher.train.ema=0.9"
    )

    class Snapshots(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.raw, self.averaged = [], []

        def on_train_batch_end(self, batch, logs=None):  # the optimizer's weights
            if batch == 1:  # the epoch's last step (2 steps an epoch)
                self.raw.append(self.model.get_weights())

        def on_epoch_end(self, epoch, logs=None):  # what EarlyStopping recorded
            self.averaged.append(self.model.get_weights())

    snapshots = Snapshots()
    history = fitting.fit(
        model, train_ds, val_ds, cfg.teacher.train, 2, tmp_path / "h.csv", [snapshots]
    )
    kept = int(np.argmax(history.history["val_accuracy"]))
    for got, want in zip(model.get_weights(), snapshots.averaged[kept], strict=True):
        np.testing.assert_array_equal(got, want)
    assert not np.allclose(snapshots.averaged[kept][0], snapshots.raw[kept][0])
    accuracy = model.evaluate(val_ds, verbose=0, return_dict=True)["accuracy"]
    assert accuracy == pytest.approx(history.history["val_accuracy"][kept])


@pytest.mark.parametrize("name", ["adam", "sgd"])
def test_weight_decay_shrinks_kernels_only(name):
    """train.weight_decay is Keras's decoupled decay (weights shrink by lr x decay a step);
    biases and batch-norm scales and offsets are spared. train.optimizer picks Adam or SGD
    with Nesterov momentum."""
    cfg = _cfg(f"student.train.optimizer={name}", "student.train.weight_decay=0.5")
    optimizer = fitting.make_optimizer(cfg.student.train, 0.1)
    assert type(optimizer) is {"adam": keras.optimizers.Adam, "sgd": keras.optimizers.SGD}[name]
    if name == "sgd":
        assert optimizer.nesterov and optimizer.momentum == 0.9
    model = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(3), keras.layers.BatchNormalization()]
    )
    before = {v.path: np.array(v) for v in model.trainable_variables}
    optimizer.apply(
        [keras.ops.zeros_like(v) for v in model.trainable_variables], model.trainable_variables
    )  # no gradient: only the decay moves weights
    for variable in model.trainable_variables:
        factor = 1 - 0.1 * 0.5 if variable.name == "kernel" else 1.0
        np.testing.assert_allclose(np.array(variable), before[variable.path] * factor, rtol=1e-6)
    assert fitting.make_optimizer(cfg.teacher.train, 0.1).weight_decay is None  # default: off


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("teacher.train.optimizer=lamb", "use one of adam, sgd"),
        ("student.train.weight_decay=-1", "student.train.weight_decay"),
    ],
)
def test_bad_optimizer_settings_are_clear_errors(override, message):
    from pseudolabel.errors import PseudoLabelError

    with pytest.raises(PseudoLabelError, match=message):
        _cfg(override)


# --- training through the stage function ------------------------------------------------------


def _paths(tmp_path, digits_data):
    return Paths(tmp_path, data_root=digits_data.root)


def _run(tracking_uri, paths):
    mlflow.set_tracking_uri(tracking_uri)
    run_id = model_io.read_meta(paths.model("teacher")).run_id
    return mlflow.get_run(run_id), mlflow.MlflowClient()


def _logged_model_signature(run):
    models = mlflow.search_logged_models(
        experiment_ids=[run.info.experiment_id],
        filter_string=f"source_run_id = '{run.info.run_id}'",
        output_format="list",
    )
    assert len(models) == 1
    return mlflow.models.get_model_info(models[0].model_uri).signature


def test_small_cnn_trains_one_epoch_through_the_stage(tmp_path, digits_data, tracking_uri):
    paths = _paths(tmp_path, digits_data)
    cfg = _cfg("teacher.model.input_size=[32,32]", "teacher.train.epochs=1")
    metrics = train_teacher(cfg, paths)
    assert metrics["epochs"] == 1
    model, meta = model_io.load(paths.model("teacher"))
    assert meta.image_size == [8, 8] and meta.channels == 1 and meta.input_scale == "0-255"
    run, client = _run(tracking_uri, paths)
    assert len(client.get_metric_history(run.info.run_id, "val_accuracy")) == 1
    signature = _logged_model_signature(run)
    assert signature.inputs.inputs[0].shape == (-1, 8, 8, 1)
    assert signature.outputs.inputs[0].shape == (-1, 10)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert "teacher_training_curves.png" in artifacts


@pytest.mark.slow  # ~25 s: two training phases of an EfficientNet
def test_efficientnet_transfer_learning_in_two_phases(tmp_path, digits_data, tracking_uri):
    """B0 at 32 px from a weights file (as with ImageNet's): head, then fine-tuning."""
    keras.backend.clear_session()
    weights = tmp_path / "b0_notop.weights.h5"
    keras.applications.EfficientNetB0(
        include_top=False, weights=None, input_shape=(32, 32, 3)
    ).save_weights(weights)
    paths = _paths(tmp_path, digits_data)
    cfg = _zoo_cfg(
        "efficientnet_b0",
        f"teacher.model.weights={weights}",
        "teacher.model.fine_tune_epochs=1",
        "teacher.model.fine_tune_from=block6a",
        "teacher.train.epochs=1",
        "teacher.train.batch_size=25",  # 100 images: no partial batch to trace again
    )
    metrics = train_teacher(cfg, paths)
    assert metrics["epochs"] == 2
    history = pd.read_csv(paths.plots / "train" / "teacher.csv")
    assert history["epoch"].tolist() == [0, 1]
    run, client = _run(tracking_uri, paths)
    assert len(client.get_metric_history(run.info.run_id, "val_accuracy")) == 2
    assert run.data.params["optimizer_name"] == "adam"  # phase 1 logged, phase 2 no clash
    model, meta = model_io.load(paths.model("teacher"))
    backbone = backbone_of(model)
    start = fitting.fine_tune_start(backbone, "block6a")
    assert start > 0
    for i, layer in enumerate(backbone.layers):
        if not layer.weights:
            continue
        if isinstance(layer, keras.layers.BatchNormalization) or i < start:
            assert not layer.trainable, layer.name
        else:
            assert layer.trainable, layer.name
    # The labeler's decoding (raw 8x8 grey pixels) is all the saved model needs.
    files, _ = labeled_files(digits_data.val, meta.class_names)
    _, images = next(iter(path_image_dataset(files[:4], meta.image_size, meta.channels, 4)))
    assert model.predict(images, verbose=0).shape == (4, 10)
    keras.backend.clear_session()


def test_unknown_fine_tune_layer_is_a_clear_error(tmp_path, digits_data, tracking_uri):
    weights = tmp_path / "b0.weights.h5"
    keras.applications.EfficientNetB0(
        include_top=False, weights=None, input_shape=(32, 32, 3)
    ).save_weights(weights)
    cfg = _zoo_cfg(
        "efficientnet_b0",
        f"teacher.model.weights={weights}",
        "teacher.model.fine_tune_epochs=1",
        "teacher.model.fine_tune_from=block99",
    )
    with pytest.raises(PseudoLabelError, match="block99.*block6a"):
        train_teacher(cfg, _paths(tmp_path, digits_data))


# --- the user's own teacher -------------------------------------------------------------------


def _foreign(inputs, x):
    x = keras.layers.Conv2D(4, 3, activation="relu")(x)
    outputs = keras.layers.Dense(10, activation="softmax")(keras.layers.Flatten()(x))
    return keras.Model(inputs, outputs)


def _project_vs_own(paths, digits_data, own_predict, scale, **trust):
    """Predictions of the imported teacher on the pipeline's raw pixels vs the foreign model's
    own on correctly scaled pixels (decoded independently with PIL). `trust`: what the user's
    config allows (model_io.load's allow_unsafe / trusted_saved_model)."""
    model, meta = model_io.load(paths.model("teacher"), **trust)
    files, _ = labeled_files(digits_data.val, meta.class_names)
    files = files[:6]
    _, raw = next(iter(path_image_dataset(files, meta.image_size, meta.channels, 6)))
    pil = np.stack([np.asarray(keras.utils.load_img(f, color_mode="grayscale")) for f in files])
    expected = own_predict(scale(pil[..., None].astype("float32")))
    np.testing.assert_allclose(model.predict(raw, verbose=0), expected, atol=1e-5)
    return meta


def test_foreign_h5_with_outside_preprocessing(tmp_path, digits_data, tracking_uri):
    keras.utils.set_random_seed(1)
    inputs = keras.Input((8, 8, 1))
    foreign = _foreign(inputs, inputs)  # trained elsewhere on pixels / 255
    foreign.save(tmp_path / "model.h5")
    paths = _paths(tmp_path, digits_data)
    cfg = _cfg(f"teacher.path={tmp_path / 'model.h5'}", "teacher.input_scale=0-1")
    metrics = train_teacher(cfg, paths)
    assert metrics["epochs"] == 0 and 0 <= metrics["val_accuracy"] <= 1
    meta = _project_vs_own(
        paths, digits_data, lambda x: foreign.predict(x, verbose=0), lambda x: x / 255.0
    )
    assert meta.input_scale == "0-255" and meta.extra["source_input_scale"] == "0-1"
    run, _ = _run(tracking_uri, paths)
    assert run.data.tags["input_scale"] == "0-1"
    assert _logged_model_signature(run).inputs.inputs[0].shape == (-1, 8, 8, 1)
    # Without an input scale the project cannot know it, and says so.
    with pytest.raises(PseudoLabelError, match="teacher.input_scale"):
        train_teacher(_cfg(f"teacher.path={tmp_path / 'model.h5'}"), paths)


def test_own_rescaling_layer_is_detected(tmp_path, digits_data, tracking_uri):
    keras.utils.set_random_seed(2)
    inputs = keras.Input((8, 8, 1))
    foreign = _foreign(inputs, keras.layers.Rescaling(1 / 255.0)(inputs))
    foreign.save(tmp_path / "model.keras")
    paths = _paths(tmp_path, digits_data)
    train_teacher(_cfg(f"teacher.path={tmp_path / 'model.keras'}"), paths)  # input_scale auto
    _project_vs_own(paths, digits_data, lambda x: foreign.predict(x, verbose=0), lambda x: x)
    with pytest.raises(PseudoLabelError, match="scale them twice"):
        train_teacher(
            _cfg(f"teacher.path={tmp_path / 'model.keras'}", "teacher.input_scale=0-1"), paths
        )


def test_saved_model_folder_import(tmp_path, digits_data, tracking_uri):
    keras.utils.set_random_seed(3)
    inputs = keras.Input((8, 8, 1))
    foreign = _foreign(inputs, inputs)  # expects pixels in [-1, 1]
    foreign.export(tmp_path / "saved_model", verbose=False)
    paths = _paths(tmp_path, digits_data)
    folder = tmp_path / "saved_model"
    with pytest.raises(PseudoLabelError, match="teacher.input_scale"):
        train_teacher(_cfg(f"teacher.path={folder}"), paths)  # a graph: nothing to detect
    train_teacher(_cfg(f"teacher.path={folder}", "teacher.input_scale=-1-1"), paths)
    meta = _project_vs_own(
        paths,
        digits_data,
        lambda x: foreign.predict(x, verbose=0),
        lambda x: x / 127.5 - 1.0,
        trusted_saved_model=folder,  # the stages pass teacher.path (stages.common.teacher_trust)
    )
    assert meta.safe_mode is False  # the saved teacher wraps the folder (TFSMLayer)
    with pytest.raises(PseudoLabelError, match="allow_unsafe"):  # not any other folder
        model_io.load(paths.model("teacher"), trusted_saved_model=tmp_path)


def test_lambda_layer_needs_explicit_opt_in(tmp_path, digits_data, tracking_uri):
    keras.utils.set_random_seed(4)
    inputs = keras.Input((8, 8, 1))
    foreign = _foreign(inputs, keras.layers.Lambda(lambda t: t / 255.0)(inputs))
    foreign.save(tmp_path / "lambda.keras")
    paths = _paths(tmp_path, digits_data)
    path = tmp_path / "lambda.keras"
    with pytest.raises(PseudoLabelError, match="teacher.allow_unsafe=true"):
        train_teacher(_cfg(f"teacher.path={path}", "teacher.input_scale=0-255"), paths)
    assert not paths.model("teacher").exists()
    cfg = _cfg(f"teacher.path={path}", "teacher.input_scale=0-255", "teacher.allow_unsafe=true")
    train_teacher(cfg, paths)
    meta = json.loads(model_io.meta_path(paths.model("teacher")).read_text())
    assert meta["safe_mode"] is False  # the labeler may load it again, as the user allowed
    _project_vs_own(
        paths, digits_data, lambda x: foreign.predict(x, verbose=0), lambda x: x, allow_unsafe=True
    )
    with pytest.raises(PseudoLabelError, match="allow_unsafe"):  # the metadata alone: refused
        model_io.load(paths.model("teacher"))


def test_teacher_class_names_from_config_give_the_output_order(tmp_path, digits_data):
    inputs = keras.Input((8, 8, 1))
    foreign = _foreign(inputs, keras.layers.Rescaling(1 / 255.0)(inputs))
    foreign.save(tmp_path / "model.keras")
    names = [f"digit_{i}" for i in range(9, -1, -1)]
    cfg = _cfg(
        f"teacher.path={tmp_path / 'model.keras'}", f"teacher.class_names=[{','.join(names)}]"
    )
    paths = _paths(tmp_path, digits_data)
    train_teacher(cfg, paths)
    assert model_io.read_meta(paths.model("teacher")).class_names == names
    bad = _cfg(f"teacher.path={tmp_path / 'model.keras'}", "teacher.class_names=[a,b]")
    with pytest.raises(PseudoLabelError, match="class folders"):
        train_teacher(bad, paths)


def test_bad_teacher_files_are_clear_errors(tmp_path):
    with pytest.raises(PseudoLabelError, match="not found"):
        model_io.load_foreign(tmp_path / "missing.h5")
    with pytest.raises(PseudoLabelError, match="not a SavedModel"):
        model_io.load_foreign(tmp_path)
    corrupt = tmp_path / "model.h5"
    corrupt.write_bytes(b"not a model")
    with pytest.raises(PseudoLabelError, match="cannot load this model"):
        model_io.load_foreign(corrupt)
    inputs = keras.Input((8, 8, 1))
    logits = keras.Model(inputs, keras.layers.Dense(10)(keras.layers.Flatten()(inputs)))
    with pytest.raises(PseudoLabelError, match="not probabilities"):
        model_io.adopt(logits, [str(i) for i in range(10)], "0-255", "logits.keras")
    with pytest.raises(PseudoLabelError, match="predicts 10 classes but there are 3"):
        model_io.adopt(logits, ["a", "b", "c"], "0-255", "logits.keras")


@pytest.mark.parametrize("module", ["resnet50", "mobilenet_v2", "densenet", "efficientnet"])
def test_named_keras_preprocessing_matches_keras(module, tmp_path):
    """A named input_scale runs keras.applications' own preprocess_input inside the model."""
    inputs = keras.Input((8, 8, 3))
    model = keras.Model(inputs, keras.layers.Softmax()(keras.layers.Flatten()(inputs)))
    wrapped, meta = model_io.adopt(model, [str(i) for i in range(192)], module, "m")
    model_io.save(wrapped, tmp_path / "t.keras", meta)
    reloaded, _ = model_io.load(tmp_path / "t.keras")  # safe mode: the layer is registered
    x = _raw_pixels((2, 8, 8, 3))
    preprocess = getattr(keras.applications, module).preprocess_input
    expected = model.predict(preprocess(x.copy()), verbose=0)
    np.testing.assert_allclose(reloaded.predict(x, verbose=0), expected, rtol=1e-5, atol=1e-7)


def test_student_init_from_a_shallower_teacher_copies_its_blocks():
    teacher = _build(_cfg("teacher.model.width=8", "teacher.model.depth=1"))
    student = _build(_cfg("teacher.model.width=8", "teacher.model.depth=2"))
    copied = fitting.init_from(student, teacher)
    assert copied == 4  # block 1: two convolutions and their BatchNorms; then shapes differ
    mine = [layer for layer in student.layers if layer.weights]
    theirs = [layer for layer in teacher.layers if layer.weights]
    for a_layer, b_layer in zip(mine[:copied], theirs, strict=False):
        for a, b in zip(a_layer.get_weights(), b_layer.get_weights(), strict=True):
            np.testing.assert_array_equal(a, b)
    wider = _build(_cfg("teacher.model.width=16", "teacher.model.depth=2"))
    assert fitting.init_from(wider, teacher) == 0


def test_resnet_halves_the_map_per_stage_saves_safely_and_starts_from_a_small_cnn(tmp_path):
    """model.name=resnet (issue 31's network lever): `depth` stages of two residual blocks,
    each stage after the first halving the map and doubling the filters; a plain .keras file
    (no custom layer: it loads in safe mode); a student ResNet started from a small_cnn
    teacher takes the stem and the first block's convolution that match it."""
    keras.backend.clear_session()
    cfg = _cfg("model@teacher.model=resnet", "teacher.model.width=8", "teacher.model.depth=3")
    model = build_model(cfg.teacher.model, cfg.teacher.train.augment, 10, (28, 28), 1, "teacher")
    adds = [layer for layer in model.layers if isinstance(layer, keras.layers.Add)]
    assert [tuple(layer.output.shape[1:]) for layer in adds] == [
        (28, 28, 8), (28, 28, 8), (14, 14, 16), (14, 14, 16), (7, 7, 32), (7, 7, 32)
    ]  # fmt: skip
    shortcuts = [layer.name for layer in model.layers if layer.name.endswith("_shortcut")]
    assert shortcuts == ["stage2_block1_shortcut", "stage3_block1_shortcut"]
    x = _raw_pixels((3, 28, 28, 1))
    path = tmp_path / "resnet.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    np.testing.assert_allclose(loaded(x, training=False), model(x, training=False), atol=1e-6)
    teacher = _build(_cfg("teacher.model.width=8", "teacher.model.depth=2"), (28, 28))
    # stem = the teacher's first convolution, then BN, the first block's conv1 and BN
    assert fitting.init_from(model, teacher) == 4
    np.testing.assert_array_equal(
        model.get_layer("stem").get_weights()[0],
        [la for la in teacher.layers if isinstance(la, keras.layers.Conv2D)][0].get_weights()[0],
    )
    with pytest.raises(PseudoLabelError, match="no pretrained weights"):
        _cfg("model@teacher.model=resnet", "teacher.model.weights=imagenet")
    keras.backend.clear_session()


def test_flip_tta_averages_the_image_and_its_mirror():
    from pseudolabel.predicting import with_flip_tta

    model = _build(_cfg())
    images = _raw_pixels((4, 8, 8, 1))
    tta = with_flip_tta(model)
    expected = (model.predict(images, verbose=0) + model.predict(images[:, :, ::-1], verbose=0)) / 2
    np.testing.assert_allclose(tta.predict(images, verbose=0), expected, rtol=1e-5, atol=1e-6)
    assert tta.name != model.name  # partial labeling chunks of one are not reused by the other


@pytest.mark.parametrize(
    "text", ["{not json", '{"class_names": ["a"], "image_size": [8, 8], "channels": 1, "x": 1}']
)
def test_a_metadata_file_that_is_not_ours_is_one_line_and_nothing_loads(tmp_path, text):
    """docs/failure-modes.md: the metadata beside a model is not JSON, or has unknown fields."""
    inputs = keras.Input((8, 8, 1))
    model = keras.Model(inputs, keras.layers.Dense(2)(keras.layers.Flatten()(inputs)))
    path = tmp_path / "models" / "teacher.keras"
    model_io.save(model, path, model_io.ModelMeta(["a", "b"], [8, 8], 1))
    model_io.meta_path(path).write_text(text)
    for call in (lambda: model_io.read_meta(path), lambda: model_io.load(path)):
        with pytest.raises(PseudoLabelError, match="not a model metadata file") as err:
            call()
        assert "\n" not in str(err.value) and str(model_io.meta_path(path)) in str(err.value)


@pytest.mark.parametrize("preset", [None, "0"])
def test_import_pseudolabel_turns_onednn_on_unless_the_user_chose(preset):
    """docs/speed.md: `import pseudolabel` sets TF_ENABLE_ONEDNN_OPTS=1 on x86 before TensorFlow
    loads (TensorFlow's own default is off on AVX2-only CPUs); a value the user set stays."""
    import os
    import platform
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TF_ENABLE_ONEDNN_OPTS"}
    if preset is not None:
        env["TF_ENABLE_ONEDNN_OPTS"] = preset
    code = (
        "import os, pseudolabel, tensorflow\n"
        "from tensorflow.python.util import _pywrap_util_port as port\n"
        "print(os.environ.get('TF_ENABLE_ONEDNN_OPTS'), port.IsMklEnabled())"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    expected = preset or ("1" if x86 else "None")
    assert done.stdout.split()[0] == expected
    if expected in ("0", "1"):
        assert done.stdout.split()[1] == str(expected == "1")


def test_tensorflow_imported_first_keeps_its_choice_and_a_warning_says_so_where_it_is_eigen():
    """TensorFlow reads TF_ENABLE_ONEDNN_OPTS once, when it loads: a script that imports it (or
    Keras) before pseudolabel keeps TensorFlow's own choice (the benchmarks did, on Eigen: 3x
    slower on this AVX2 CPU). Where that choice is off, `import pseudolabel` warns, once."""
    import os
    import platform
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TF_ENABLE_ONEDNN_OPTS"}
    code = (
        "import keras, pseudolabel\n"
        "from tensorflow.python.util import _pywrap_util_port as port\n"
        "print(port.IsMklEnabled())"
    )
    done = subprocess.run(
        [sys.executable, "-W", "default", "-c", code],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    warned = done.stderr.count("TensorFlow was imported before pseudolabel")
    on = done.stdout.split()[-1] == "True"
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    assert warned == (1 if x86 and not on else 0), (done.stdout, done.stderr[-2000:])
