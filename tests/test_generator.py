"""The seed's calls: PseudoLabelGenerator over the pipeline's teacher and over a foreign .h5."""

import hashlib

import keras
import numpy as np
import pandas as pd
import pytest

from pseudolabel import PseudoLabelGenerator
from pseudolabel.data.images import class_names_from, list_images
from pseudolabel.errors import PseudoLabelError
from pseudolabel.models import io as model_io
from pseudolabel.predicting import predict_folder


def _tree_digest(folder):
    return {p: hashlib.md5(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()}


def _generator(pipeline, tmp_path, **kwargs):
    return PseudoLabelGenerator(
        model_path=kwargs.pop("model_path", pipeline.model("teacher")),
        train_data_path=pipeline.train,
        unlabeled_path=pipeline.unlabeled,
        pseudo_data_path=tmp_path / "train_ssl",
        output_folder=tmp_path / "outputs",
        **kwargs,
    )


def test_seed_calls_label_plot_and_copy(pipeline, tmp_path):
    before = _tree_digest(pipeline.labeled) | _tree_digest(pipeline.unlabeled)
    gen = _generator(pipeline, tmp_path)
    frame = gen.generate_pseudolabel_data(plot_confidences=True, threshold=0.3, move_images=True)
    assert (tmp_path / "outputs" / "data.csv").is_file()
    assert len(frame) == len(list_images(pipeline.unlabeled))
    assert (tmp_path / "outputs" / "confidence.png").is_file()
    assert (tmp_path / "outputs" / "confidence_per_class.png").is_file()
    kept = int((frame["confidence"] >= 0.3).sum())
    assert len(list_images(tmp_path / "train_ssl")) == kept + len(list_images(pipeline.train))
    # The facade and the pipeline stage produce the same predictions from the same teacher.
    stage_csv = pd.read_csv(pipeline.csv)
    assert stage_csv["label"].tolist() == frame["label"].tolist()
    # Originals untouched; calling again with no threshold keeps everything.
    counts = gen.move_unlabeled_images(threshold=None)
    assert sum(c["pseudo"] for c in counts.values()) == len(frame)
    assert _tree_digest(pipeline.labeled) | _tree_digest(pipeline.unlabeled) == before
    written = gen.plot_confidence_scores(per_class=False, overall=True)
    assert [p.name for p in written] == ["confidence.png"]


def test_bad_threshold_is_refused_before_work(pipeline, tmp_path):
    gen = _generator(pipeline, tmp_path)
    with pytest.raises(PseudoLabelError, match="threshold"):
        gen.generate_pseudolabel_data(threshold=1.5)
    with pytest.raises(PseudoLabelError, match="threshold"):
        gen.move_unlabeled_images(threshold=-1)
    assert not (tmp_path / "outputs").exists()
    with pytest.raises(PseudoLabelError, match="generate_pseudolabel_data"):
        gen.plot_confidence_scores()


def test_foreign_h5_model_with_outside_preprocessing(pipeline, tmp_path):
    """A user's model.h5 that expects 0..1 pixels: the facade scales for it, no metadata needed."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(4, 3, activation="relu")(inputs)
    outputs = keras.layers.Dense(10, activation="softmax")(keras.layers.Flatten()(x))
    foreign = keras.Model(inputs, outputs)
    h5 = tmp_path / "model.h5"
    foreign.save(h5)
    # calibrate=False: the raw softmax, to compare with the model's own predictions.
    gen = _generator(pipeline, tmp_path, model_path=h5, input_scale="0-1", calibrate=False)
    frame = gen.generate_pseudolabel_data(batch_size=16)
    first = [pipeline.unlabeled / p for p in frame["path"][:5]]
    pixels = np.stack([np.asarray(keras.utils.load_img(p, color_mode="grayscale")) for p in first])
    expected = foreign.predict(pixels[..., None].astype("float32") / 255.0, verbose=0)
    names = class_names_from(pipeline.train)
    got = frame[[f"prob_{n}" for n in names]].to_numpy()[:5]
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_model_with_wrong_class_count_is_refused(pipeline, tmp_path):
    inputs = keras.Input((8, 8, 1))
    model = keras.Model(
        inputs, keras.layers.Dense(4, activation="softmax")(keras.layers.Flatten()(inputs))
    )
    model.save(tmp_path / "model.keras")
    gen = _generator(pipeline, tmp_path, model_path=tmp_path / "model.keras")
    with pytest.raises(PseudoLabelError, match="predicts 4 classes but there are 10"):
        gen.generate_pseudolabel_data()


def test_missing_model_file(pipeline, tmp_path):
    gen = _generator(pipeline, tmp_path, model_path=tmp_path / "nope.h5")
    with pytest.raises(PseudoLabelError, match="not found"):
        gen.generate_pseudolabel_data()


def test_predict_folder_reports_undecodable_files(pipeline, tmp_path):
    folder = tmp_path / "unlabeled"
    (folder / "nested").mkdir(parents=True)
    good = list_images(pipeline.unlabeled)[:3]
    for p in good:
        (folder / "nested" / p.name).write_bytes(p.read_bytes())
    (folder / "broken.png").write_bytes(b"not an image")
    model, meta = model_io.load(pipeline.model("teacher"))
    frame, failed = predict_folder(model, meta, folder, batch_size=2)
    assert failed == ["broken.png"]
    assert frame["path"].tolist() == sorted(f"nested/{p.name}" for p in good)


def test_facade_writes_the_pipelines_csv_for_the_same_teacher_and_images(
    pipeline, smoke_cfg, tmp_path
):
    """The facade calibrates on the val folder beside train/ with the stage's own function,
    so its confidences are the pipeline's, not the raw softmax."""
    from pseudolabel.predicting import read_csv

    gen = _generator(pipeline, tmp_path)
    assert gen.val_data_path == pipeline.val
    gen.generate_pseudolabel_data(batch_size=smoke_cfg.pseudo_label.batch_size)
    ours = read_csv(tmp_path / "outputs" / "data.csv")
    theirs = read_csv(pipeline.csv)
    pd.testing.assert_frame_equal(ours, theirs, check_exact=False, rtol=1e-6, atol=1e-9)
    raw = _generator(pipeline, tmp_path / "raw", calibrate=False)
    raw.generate_pseudolabel_data(batch_size=smoke_cfg.pseudo_label.batch_size)
    uncalibrated = read_csv(tmp_path / "raw" / "outputs" / "data.csv")
    assert np.allclose(uncalibrated["confidence"], theirs["raw_confidence"], atol=1e-6)
