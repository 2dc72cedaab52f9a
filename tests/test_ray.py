"""pseudo_label.engine=ray on a real two-node Ray cluster (localhost) writes the local CSVs."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pseudolabel.paths import Paths

ray = pytest.importorskip("ray")  # the optional extra (pip install ".[ray]")


@pytest.fixture
def project(digits_data, tmp_path, tracking_uri) -> Paths:
    """The digits images plus one file that cannot be decoded, and a trained teacher."""
    from pseudolabel.config import compose
    from pseudolabel.stages import train_teacher

    data = tmp_path / "data_root"
    (data / "data").mkdir(parents=True)
    os.symlink(digits_data.root / "data" / "image_dataset", data / "data" / "image_dataset")
    shutil.copytree(digits_data.unlabeled, data / "data" / "unlabeled")
    (data / "data" / "unlabeled" / "broken.png").write_bytes(b"not an image")
    teacher = Paths(tmp_path / "teacher", data_root=data)
    train_teacher(compose(["+experiment=smoke"]), teacher)
    return teacher


def _label(overrides: list[str], tmp_path: Path, project: Paths, name: str) -> tuple:
    from pseudolabel.config import compose
    from pseudolabel.stages import pseudo_label

    cfg = compose(
        [
            "+experiment=smoke",
            "pseudo_label.tta=true",
            "pseudo_label.distribution_alignment=true",
            *overrides,
        ]
    )
    teacher = project.model("teacher")
    paths = Paths(tmp_path / name, data_root=project.input_root, teacher_model=teacher)
    start = time.perf_counter()
    metrics = pseudo_label(cfg, paths)
    seconds = time.perf_counter() - start
    data = pd.read_csv(paths.csv)
    errors = pd.read_csv(paths.outputs / "errors.csv")
    print(f"{name}: {metrics['images']} images in {seconds:.1f} s")
    return data, errors, metrics


@pytest.mark.slow
def test_ray_engine_writes_the_local_csv(ray_cluster, project, tmp_path):
    local, local_errors, _ = _label([], tmp_path, project, "local")
    on_ray, ray_errors, metrics = _label(
        ["pseudo_label.engine=ray", f"ray.address={ray_cluster}", "ray.cpus_per_actor=0.5"],
        tmp_path,
        project,
        "ray",
    )
    assert metrics["images"] == len(local) > 0
    assert on_ray["path"].tolist() == local["path"].tolist()
    assert on_ray["label"].tolist() == local["label"].tolist()
    numbers = [c for c in local.columns if c not in ("path", "label")]
    assert list(on_ray.columns) == list(local.columns)
    np.testing.assert_allclose(on_ray[numbers], local[numbers], atol=1e-6, rtol=0)
    assert local_errors["path"].tolist() == ["broken.png"]
    pd.testing.assert_frame_equal(ray_errors, local_errors)


def test_actor_count_leaves_room_for_decoding():
    from pseudolabel.distributed import actor_count
    from pseudolabel.errors import PseudoLabelError

    assert actor_count(None, 1, 2) == 1  # a 2-core machine: one actor, the rest decodes
    assert actor_count(None, 0.5, 2) == 3
    assert actor_count(2, 0.5, 2) == 2
    with pytest.raises(PseudoLabelError, match="ray.actors <= 1"):
        actor_count(2, 1, 2)  # both CPUs to actors: the decoding would wait forever
    with pytest.raises(PseudoLabelError, match="leaves no CPU"):
        actor_count(None, 4, 2)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("pseudo_label.engine=spark", "pseudo_label.engine"),
        ("ray.address=somewhere", "ray.address"),
        ("ray.actors=0", "ray.actors"),
        ("ray.cpus_per_actor=0", "ray.cpus_per_actor"),
    ],
)
def test_engine_and_ray_keys_are_checked(override, message):
    from pseudolabel.config import compose
    from pseudolabel.errors import PseudoLabelError

    with pytest.raises(PseudoLabelError, match=message):
        compose(["+experiment=smoke", override])
