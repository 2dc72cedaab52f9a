"""Team mode: evaluate registers the student (aliases champion/challenger) as a pyfunc model
that takes raw images, served by `mlflow models serve`."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from types import SimpleNamespace

import mlflow
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pseudolabel import registry, tracking
from pseudolabel.config import compose
from pseudolabel.data.images import class_names_from, list_images
from pseudolabel.models import io as model_io
from pseudolabel.paths import Paths
from pseudolabel.stages.evaluate import evaluate
from tests.conftest import REPO, free_port, wait_until_answers

BIN = Path(sys.executable).parent


def _version(tags):
    return SimpleNamespace(version="1", tags=tags)


def test_the_rule_moves_the_champion_only_on_a_win_on_the_same_test_set():
    same = {registry.TEST_TAG: "abc.dir", registry.ACCURACY_TAG: "0.800000"}
    assert registry.decide(None, 0.1, "abc.dir")[0] == registry.CHAMPION
    assert registry.decide(_version(same), 0.81, "abc.dir")[0] == registry.CHAMPION
    assert registry.decide(_version(same), 0.80, "abc.dir")[0] == registry.CHALLENGER  # a tie
    assert registry.decide(_version(same), 0.79, "abc.dir")[0] == registry.CHALLENGER
    alias, why = registry.decide(_version(same), 0.99, "other.dir")
    assert alias == registry.CHALLENGER and "another test set" in why


def _stronger_copy(pipeline, root: Path) -> Paths:
    """The pipeline copied to `root` with a real, stronger student: the smoke student learns
    little in its 18 steps, the smoke teacher more; the teacher's network and weights saved as
    the student (with the student's metadata, so the same lineage)."""
    top = lambda folder, names: ["data"] if Path(folder) == pipeline.root else []  # noqa: E731
    shutil.copytree(pipeline.root, root, dirs_exist_ok=True, ignore=top)  # not the images
    paths = Paths(root, data_root=pipeline.root)
    teacher, _ = model_io.load(pipeline.model("teacher"))
    model_io.save(teacher, paths.model("student"), model_io.read_meta(pipeline.model("student")))
    return paths


@pytest.fixture(scope="module")
def registered(pipeline, tracking_uri, tmp_path_factory):
    """Three evaluate runs against a registered model of their own: the pipeline's student
    becomes champion; the same student again (a tie) challenger; then a stronger student (a
    real model scored on the same test set) wins and takes the alias."""
    name = f"test-student-{uuid.uuid4().hex[:8]}"
    cfg = compose(["+experiment=smoke", f"tracking.registered_model={name}"])
    client = mlflow.MlflowClient()
    weaker = evaluate(cfg, pipeline)["student_accuracy"]
    first = registry.champion(client, name)
    evaluate(cfg, pipeline)
    second = client.get_model_version_by_alias(name, registry.CHALLENGER)
    champion_after_tie = registry.champion(client, name)
    stronger = evaluate(cfg, _stronger_copy(pipeline, tmp_path_factory.mktemp("stronger")))
    assert stronger["student_accuracy"] > weaker, "the premise: a stronger student"
    return SimpleNamespace(
        name=name,
        client=client,
        first=first,
        second=second,
        champion_after_tie=champion_after_tie,
        third=registry.champion(client, name),
        student_run=client.get_run(
            json.loads(pipeline.model("student").with_suffix(".json").read_text())["run_id"]
        ),
    )


def test_the_first_version_is_champion_with_the_student_lineage(registered, pipeline):
    first, student = registered.first, registered.student_run
    assert str(first.version) == "1" and first.tags["promotion"] == registry.CHAMPION
    assert first.run_id == student.info.run_id  # the version links to the student's run
    for key in registry.LINEAGE_KEYS:
        assert first.tags[key] == student.data.tags[key], key
    assert first.tags[registry.TEST_TAG] == tracking.dvc_hash(pipeline.test)
    accuracy = json.loads((pipeline.metrics / "evaluation.json").read_text())["student_accuracy"]
    assert float(first.tags[registry.ACCURACY_TAG]) == pytest.approx(accuracy, abs=1e-6)
    assert "strictly higher" in first.tags["promotion_rule"]
    assert first.source.startswith("models:/")


def test_a_tie_is_challenger_and_the_champion_stays(registered):
    assert str(registered.second.version) == "2"
    assert registered.second.tags["promotion"] == registry.CHALLENGER
    assert registered.second.tags["champion_before"] == "1"
    assert str(registered.champion_after_tie.version) == "1"


def test_a_win_moves_the_champion(registered):
    assert str(registered.third.version) == "3"
    assert registered.third.tags["promotion"] == registry.CHAMPION
    assert "beats champion v1" in registered.third.tags["promotion_reason"]
    accuracy = registry.ACCURACY_TAG
    assert float(registered.third.tags[accuracy]) > float(registered.first.tags[accuracy])


def _png(pipeline) -> tuple[bytes, str]:
    path = list_images(pipeline.test)[0]
    return path.read_bytes(), path.parent.name


def test_the_registered_pyfunc_takes_encoded_images_and_pixel_arrays(registered, pipeline):
    model = mlflow.pyfunc.load_model(f"models:/{registered.name}@{registry.CHAMPION}")
    data, _ = _png(pipeline)
    out = model.predict(pd.DataFrame({"image": [data, data]}))
    names = class_names_from(pipeline.train)
    assert list(out["class"]) == [out["class"][0]] * 2 and out["class"][0] in names
    assert set(out["probabilities"][0]) == set(names)
    assert sum(out["probabilities"][0].values()) == pytest.approx(1.0, abs=1e-4)
    pixels = np.asarray(Image.open(list_images(pipeline.test)[0]).convert("L"))
    direct = model.unwrap_python_model().predict(None, [pixels])
    assert direct["class"][0] == out["class"][0]


@pytest.mark.slow
def test_mlflow_models_serve_answers_with_a_class_name(registered, pipeline, tracking_uri):
    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "PATH": f"{BIN}:{os.environ['PATH']}"}
    uri = f"models:/{registered.name}@{registry.CHAMPION}"
    server = subprocess.Popen(
        [str(BIN / "mlflow"), "models", "serve", "-m", uri, "--env-manager", "local"]
        + ["-p", str(port), "-h", "127.0.0.1"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        wait_until_answers(base + "/ping", server, lambda: server.stdout.read().decode())
        data, _ = _png(pipeline)
        body = {
            "dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(data).decode()]]}
        }
        request = urllib.request.Request(
            base + "/invocations",
            json.dumps(body).encode(),
            {"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            predictions = json.loads(response.read())["predictions"]
        assert predictions[0]["class"] in class_names_from(pipeline.train)
        assert 0.0 <= predictions[0]["confidence"] <= 1.0
        # a body that is not an image: a 400 naming it and why, no stack trace, no server path
        bad = base64.b64encode(b"GIF89a? no, a text file").decode()
        body = {"dataframe_split": {"columns": ["image"], "data": [[bad]]}}
        request = urllib.request.Request(
            base + "/invocations", json.dumps(body).encode(), {"Content-Type": "application/json"}
        )
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(request, timeout=60)
        assert caught.value.code == 400
        answer = json.loads(caught.value.read())
        assert "image 0: " in answer["message"] and "not an image file" in answer["message"]
        assert "stack_trace" not in answer and "Traceback" not in json.dumps(answer)
        assert str(REPO) not in json.dumps(answer) and ".py" not in json.dumps(answer)
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)


def _tiny_model(tmp_path, lambda_layer: bool = False) -> SimpleNamespace:
    import keras

    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Rescaling(1 / 255)(inputs)
    if lambda_layer:
        x = keras.layers.Lambda(lambda t: t * 2)(x)
    outputs = keras.layers.Dense(2, activation="softmax")(keras.layers.Flatten()(x))
    path = tmp_path / "m.keras"
    keras.Model(inputs, outputs).save(path)
    meta = tmp_path / "m.json"
    meta.write_text(
        json.dumps({"class_names": ["cat", "dog"], "image_size": [8, 8], "channels": 1})
    )
    return SimpleNamespace(artifacts={"model": str(path), "meta": str(meta)})


def test_serving_decodes_base64_and_rgb_images_to_the_model_size(tmp_path):
    from pseudolabel.serving import ImageClassifier

    model = ImageClassifier()
    model.load_context(_tiny_model(tmp_path))
    buffer = io.BytesIO()
    Image.new("RGB", (20, 30), (200, 10, 10)).save(buffer, "JPEG")
    encoded = base64.b64encode(buffer.getvalue()).decode()
    out = model.predict(None, pd.DataFrame({"image": [encoded, buffer.getvalue()]}))
    assert list(out["class"]) == [out["class"][0]] * 2 and out["class"][0] in ("cat", "dog")
    assert set(out["probabilities"][0]) == {"cat", "dog"}
    with pytest.raises(ValueError, match="base64"):
        model.predict(None, pd.DataFrame({"image": ["not an image!"]}))


def test_serving_refuses_bad_input_with_the_image_and_the_reason(tmp_path, monkeypatch):
    """Each refusal is MLflow's INVALID_PARAMETER_VALUE (the server's 400) naming the image."""
    from mlflow.exceptions import MlflowException

    from pseudolabel.serving import MAX_IMAGES_ENV, ImageClassifier

    monkeypatch.setenv(MAX_IMAGES_ENV, "3")
    model = ImageClassifier()
    model.load_context(_tiny_model(tmp_path))
    png = io.BytesIO()
    Image.new("L", (8, 8), 10).save(png, "PNG")
    good = png.getvalue()
    noise = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64), np.uint8)).save(
        noise, "PNG"
    )
    bomb = io.BytesIO()
    Image.new("1", (8000, 6000)).save(bomb, "PNG")  # 48 Mpx, a few kB
    cases = {
        "not an image file": [good, b"%PDF-1.4 not a picture"],
        "truncated or corrupt": [noise.getvalue()[: len(noise.getvalue()) // 2]],
        "0 bytes": [b""],
        "over 40,000,000": [bomb.getvalue()],
        "H x W or H x W x 1, 3 or 4": [np.zeros((8, 8, 5), np.uint8)],
        "no images": [],
        "at most 3": [good] * 4,
    }
    for reason, items in cases.items():
        frame = pd.DataFrame({"image": pd.Series(items, dtype=object)})
        with pytest.raises(MlflowException, match=reason) as caught:
            model.predict(None, frame)
        assert caught.value.get_http_status_code() == 400, reason
    with pytest.raises(MlflowException, match="image 1: "):
        model.predict(None, pd.DataFrame({"image": [good, b"junk"]}))
    # another size and channel count than the model's is converted, not refused
    rgb = io.BytesIO()
    Image.new("RGBA", (31, 17), (1, 2, 3, 4)).save(rgb, "PNG")
    assert len(model.predict(None, pd.DataFrame({"image": [rgb.getvalue()]}))) == 1


def test_serving_refuses_a_model_that_would_run_code(tmp_path):
    from pseudolabel.serving import ImageClassifier

    with pytest.raises(ValueError, match="(?i)lambda|safe_mode"):
        ImageClassifier().load_context(_tiny_model(tmp_path, lambda_layer=True))
