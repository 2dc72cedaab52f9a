"""Issue 16, "nothing lost, nothing run that should not run": one test per failure mode.

Each builds a small digits-sized project, breaks one thing on purpose and checks the tool
refuses with one clear line (or reports the file) before it deletes or writes anything.
docs/failure-modes.md lists every case.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import keras
import pytest

from pseudolabel.errors import PseudoLabelError
from pseudolabel.models import io as model_io
from pseudolabel.paths import Paths

CLASSES = [f"digit_{i}" for i in range(10)]


def _digest(folder: Path) -> dict[str, str]:
    """Every file under `folder` (links not followed) by relative path -> md5."""
    return {
        str(p.relative_to(folder)): hashlib.md5(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


# --- 1. a metadata sidecar never turns Keras safe mode off ----------------------------------


def _lambda_teacher(path: Path, marker: Path) -> None:
    """A digits-shaped model whose Lambda layer writes `marker` when it runs, saved with a
    sidecar claiming safe_mode false (what an attacker would ship beside it)."""
    # Built from source text: Keras serialises the lambda's bytecode, not its closure.
    code = f"lambda x: (__import__('pathlib').Path({str(marker)!r}).write_text('ran'), x)[1]"
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Lambda(eval(code), name="payload")(inputs)  # noqa: S307
    outputs = keras.layers.Dense(10, activation="softmax")(keras.layers.Flatten()(x))
    meta = model_io.ModelMeta(CLASSES, [8, 8], 1, safe_mode=False)
    model_io.save(keras.Model(inputs, outputs), path, meta)
    marker.unlink()  # building the model ran the lambda once, here in the test


def test_sidecar_cannot_turn_safe_mode_off(tmp_path, digits_data, smoke_cfg):
    from pseudolabel import PseudoLabelGenerator
    from pseudolabel.config import compose
    from pseudolabel.stages import pseudo_label, train_teacher

    marker = tmp_path / "pwned"
    model = tmp_path / "models" / "teacher.keras"
    _lambda_teacher(model, marker)
    assert json.loads(model_io.meta_path(model).read_text())["safe_mode"] is False

    # The facade, with its default allow_unsafe=False.
    gen = PseudoLabelGenerator(model_path=model, unlabeled_path=digits_data.unlabeled)
    with pytest.raises(PseudoLabelError, match="allow_unsafe"):
        gen._teacher()
    assert not marker.exists()
    # The pipeline: importing it as teacher.path, and labelling with it as models/teacher.keras.
    paths = Paths(tmp_path, data_root=digits_data.root)
    imported = compose(["+experiment=smoke", f"teacher.path={model}", "teacher.input_scale=0-255"])
    with pytest.raises(PseudoLabelError, match="allow_unsafe"):
        train_teacher(imported, paths)
    with pytest.raises(PseudoLabelError, match="allow_unsafe"):
        pseudo_label(smoke_cfg, paths)
    assert not marker.exists()
    assert not paths.csv.exists()

    # Only the user's own opt-in loads it (and so runs its code).
    loaded, meta = PseudoLabelGenerator(model_path=model, allow_unsafe=True)._teacher()
    assert meta.class_names == CLASSES and loaded.outputs[0].shape[-1] == 10
    assert marker.exists()
