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
