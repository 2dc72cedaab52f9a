"""The MLflow Model Registry: each evaluated student becomes a version of one registered model.

`evaluate` logs the student as a pyfunc model that takes raw images (pseudolabel/serving.py)
in the student's own run, registers it as a new version of `tracking.registered_model` with the
student's lineage tags, and applies the promotion rule: the alias `champion` moves to the new
version only when its test accuracy beats the current champion's on the same test set (same
DVC hash of the test folder); otherwise the version gets `challenger`. The rule, the decision
and both figures are tags on the version. Works on any store with a registry (sqlite,
PostgreSQL behind `mlflow server`), through MlflowClient only.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Any

import mlflow
from mlflow.exceptions import MlflowException

from pseudolabel import tracking

log = logging.getLogger(__name__)

CHAMPION, CHALLENGER = "champion", "challenger"
SERVING_MODEL = "student_pyfunc"  # the logged pyfunc's name in the student's run
TEST_TAG = "test_data_md5"  # DVC hash of the test folder the accuracy was measured on
ACCURACY_TAG = "test_accuracy"
LINEAGE_KEYS = (
    tracking.TEACHER_TAG,
    tracking.CSV_TAG,
    tracking.MERGED_TAG,
    tracking.LABELED_TAG,
    tracking.UNLABELED_TAG,
)
RULE = (
    f"'{CHAMPION}' moves to a new version only if its {ACCURACY_TAG} is strictly higher than "
    f"the current champion's on the same test set ({TEST_TAG} equal); otherwise '{CHALLENGER}'"
)


def log_serving_model(model_path: Path, run_id: str):
    """Log the model file and its metadata as a pyfunc (serving.py, as code) in run `run_id`;
    the ModelInfo (model_uri `models:/<model_id>`)."""
    import keras
    import numpy as np
    import pandas as pd
    import PIL
    import PIL.Image
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    from pseudolabel import serving
    from pseudolabel.models import io as model_io

    model_path = Path(model_path)
    signature = ModelSignature(inputs=Schema([ColSpec("binary", serving.COLUMN)]))
    # An input example (one grey PNG of the model's size), so that the UI shows what the model
    # takes and MLflow checks at logging time that it answers such a request.
    meta, example = model_io.read_meta(model_path), None
    if meta is not None:
        buffer = io.BytesIO()
        mode = "L" if meta.channels == 1 else "RGB"
        PIL.Image.new(mode, (meta.image_size[1], meta.image_size[0]), 128).save(buffer, "PNG")
        example = pd.DataFrame({serving.COLUMN: [buffer.getvalue()]})
    requirements = [
        f"mlflow=={mlflow.__version__}",
        f"keras=={keras.__version__}",
        f"numpy=={np.__version__}",
        f"pandas=={pd.__version__}",
        f"pillow=={PIL.__version__}",
    ]
    try:
        import tensorflow as tf

        requirements.append(f"tensorflow=={tf.__version__}")
    except ImportError:  # another Keras backend
        pass
    with mlflow.start_run(run_id=run_id, nested=mlflow.active_run() is not None):
        return mlflow.pyfunc.log_model(
            name=SERVING_MODEL,
            python_model=str(Path(serving.__file__)),
            artifacts={
                "model": str(model_path),
                "meta": str(model_io.meta_path(model_path)),
            },
            signature=signature,
            input_example=example,
            pip_requirements=requirements,
        )


def champion(client: mlflow.MlflowClient, name: str):
    """The version holding the champion alias, or None."""
    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None


def decide(current, accuracy: float, test_hash: str) -> tuple[str, str]:
    """(alias, why) for a new version scoring `accuracy` on the test set `test_hash`."""
    if current is None:
        return CHAMPION, "no champion yet"
    if current.tags.get(TEST_TAG) != test_hash:
        return CHALLENGER, (
            f"champion v{current.version} was scored on another test set "
            f"({current.tags.get(TEST_TAG)}): not comparable, promote by hand if you want"
        )
    best = float(current.tags.get(ACCURACY_TAG, "nan"))
    if accuracy > best:
        return CHAMPION, f"{accuracy:.6f} beats champion v{current.version}'s {best:.6f}"
    return CHALLENGER, f"{accuracy:.6f} does not beat champion v{current.version}'s {best:.6f}"


def register_student(
    name: str,
    model_path: Path,
    meta,
    accuracy: float,
    test_hash: str,
    extra_tags: dict[str, Any] | None = None,
    fallback_run_id: str | None = None,
):
    """Log the serving model, register it as a version of `name` and move the aliases; returns
    the ModelVersion (with the alias it got in its tags' `promotion`)."""
    client = mlflow.MlflowClient()
    # The student's own run when this store holds it (the version links to it), else
    # fallback_run_id (a student trained against another tracking store).
    run_id = meta.run_id if tracking.find_run(client, meta.run_id) else fallback_run_id
    info = log_serving_model(model_path, run_id)
    try:
        client.create_registered_model(
            name, description="The pseudo-label student; aliases champion/challenger."
        )
    except MlflowException as exc:
        if exc.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise
    current = champion(client, name)
    alias, why = decide(current, accuracy, test_hash)
    tags = {
        **{key: str(meta.extra[key]) for key in LINEAGE_KEYS if key in meta.extra},
        "student_run_id": str(meta.run_id),
        TEST_TAG: test_hash,
        ACCURACY_TAG: f"{accuracy:.6f}",
        "promotion": alias,
        "promotion_reason": why,
        "promotion_rule": RULE,
        **{k: str(v) for k, v in (extra_tags or {}).items()},
    }
    if current is not None:
        tags |= {
            "champion_before": str(current.version),
            "champion_before_accuracy": current.tags.get(ACCURACY_TAG, "?"),
        }
    version = client.create_model_version(
        name, info.model_uri, run_id=run_id, tags=tags, model_id=info.model_id
    )
    client.set_registered_model_alias(name, alias, version.version)
    log.info("registry: %s version %s is %s (%s)", name, version.version, alias, why)
    return client.get_model_version(name, version.version)
