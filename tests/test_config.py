import subprocess
import sys

import pytest
import yaml
from omegaconf import OmegaConf

from pseudolabel.config import CONF_DIR, compose, compose_raw, load_params, validate
from pseudolabel.errors import PseudoLabelError
from tests.conftest import REPO


def test_params_yaml_is_the_composition_of_conf():
    committed = yaml.safe_load((REPO / "params.yaml").read_text())
    composed = OmegaConf.to_container(compose_raw(), resolve=True)
    assert committed == composed, "params.yaml drifted from conf/: run `make params` and commit"


def test_params_yaml_validates():
    cfg = load_params(REPO / "params.yaml")
    assert cfg.data.source == "fashion_mnist"
    assert cfg.student.model.depth > cfg.teacher.model.depth  # the student is the larger model


@pytest.mark.parametrize(
    "overrides",
    [[f"data={p.stem}"] for p in (CONF_DIR / "data").glob("*.yaml")]
    + [[f"model@student.model={p.stem}"] for p in (CONF_DIR / "model").glob("*.yaml")]
    + [[f"+experiment={p.stem}"] for p in (CONF_DIR / "experiment").glob("*.yaml")],
)
def test_every_config_option_composes(overrides):
    compose(overrides)


@pytest.mark.parametrize("threshold", [1.5, -0.1, float("nan")])
def test_threshold_out_of_range_is_rejected(threshold):
    with pytest.raises(PseudoLabelError, match="pseudo_label.threshold"):
        compose([f"pseudo_label.threshold={threshold}"])


def test_steps_per_epoch_must_be_positive():
    with pytest.raises(PseudoLabelError, match="teacher.train.steps_per_epoch"):
        compose(["teacher.train.steps_per_epoch=0"])


def test_null_threshold_keeps_all():
    assert compose(["pseudo_label.threshold=null"]).pseudo_label.threshold is None


def test_unknown_key_and_wrong_type_are_clear_errors():
    with pytest.raises(PseudoLabelError, match="conf/"):
        compose(["pseudo_label.threshhold=0.5"])
    with pytest.raises(PseudoLabelError):
        validate({"teacher": {"train": {"epochs": "many"}}})
    with pytest.raises(PseudoLabelError, match="data.source"):
        validate({"data": {"source": "imagenet"}})


def test_compose_cli_writes_params(tmp_path):
    out = tmp_path / "params.yaml"
    run = subprocess.run(
        [sys.executable, "-m", "pseudolabel.cli", "compose", "+experiment=smoke", "-o", str(out)],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    assert load_params(out).data.source == "digits"


def test_cli_reports_bad_params_without_traceback(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text("pseudo_label:\n  threshold: 1.5\n")
    run = subprocess.run(
        [sys.executable, "-m", "pseudolabel.cli", "merge", "--params", str(bad)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert run.returncode == 2
    assert "pseudo_label.threshold" in run.stderr and "Traceback" not in run.stderr


def test_rounds_derive_the_per_round_stages_and_final_student():
    cfg = compose(["pseudo_label.rounds=3"])
    assert OmegaConf.to_container(cfg.rounds) == {
        "round2": {"round": 2, "dir": "rounds/round2", "teacher": "models/student"},
        "round3": {"round": 3, "dir": "rounds/round3", "teacher": "rounds/round2/models/student"},
    }
    assert cfg.final_student == "rounds/round3/models/student"
    one = compose()
    assert (dict(one.rounds), one.final_student) == ({}, "models/student")


def test_hand_edited_rounds_and_zero_rounds_are_clear_errors():
    raw = OmegaConf.to_container(compose_raw())
    raw["pseudo_label"]["rounds"] = 2  # without recomposing: no round@round2 stage in DVC
    with pytest.raises(PseudoLabelError, match="recompose"):
        validate(raw)
    with pytest.raises(PseudoLabelError, match="pseudo_label.rounds"):
        compose(["pseudo_label.rounds=0"])


def test_round_paths_share_the_images_and_chain_the_teachers(tmp_path):
    from pseudolabel.paths import Paths

    paths = Paths(tmp_path)
    assert paths.round(1) is paths
    third = paths.round(3)
    assert third.csv == tmp_path / "rounds/round3/outputs/data.csv"
    assert third.merged == tmp_path / "rounds/round3/data/train_ssl"
    assert third.train == paths.train and third.unlabeled == paths.unlabeled
    assert third.model("teacher") == tmp_path / "rounds/round2/models/student.keras"
    assert paths.round(2).model("teacher") == paths.model("student")
    assert third.round_number == 3
