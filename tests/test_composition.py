"""One composition (issue 32): what `pseudolabel compose` sets lives in conf/project.yaml, so
DVC's own Hydra composition (`dvc exp run -S`), the sweep and `compose` agree; a params.yaml
edited by hand or by an older version stops a stage in one line."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from dvc.utils.hydra import compose_and_dump

from pseudolabel import cli
from pseudolabel.config import compose_defaults, compose_raw, load_params, to_yaml
from pseudolabel.errors import PseudoLabelError
from tests.conftest import CONF_DIR


@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    """A project folder holding a copy of the repository's conf/ (an empty conf/project.yaml)."""
    shutil.copytree(CONF_DIR, tmp_path / "conf")
    (tmp_path / "photos" / "labeled").mkdir(parents=True)
    (tmp_path / "photos" / "unlabeled").mkdir()
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _compose(*overrides: str) -> int:
    return cli.main(["compose", *overrides])


def _dvc_composition(project: Path, *overrides: str) -> dict:
    """params.yaml as DVC's Hydra integration writes it for `dvc exp run -S ...`: DVC's own
    function, composing conf/ with the -S overrides and nothing else."""
    out = project / "dvc_params.yaml"
    compose_and_dump(out, str(project / "conf"), None, "config", str(project), list(overrides))
    return yaml.safe_load(out.read_text())


def _settings(project: Path) -> dict:
    return yaml.safe_load((project / "conf" / "project.yaml").read_text()) or {}


def test_compose_records_settings_that_dvc_exp_run_keeps(project):
    assert (
        _compose(
            "data=folder",
            "data.labeled_root=photos/labeled",
            "data.unlabeled_root=photos/unlabeled",
            "data.image_size=[32,32]",
            "data.channels=3",
        )
        == 0
    )
    assert _settings(project) == {
        "defaults": [{"override /data": "folder"}],
        "data": {
            "labeled_root": "photos/labeled",
            "unlabeled_root": "photos/unlabeled",
            "image_size": [32, 32],
            "channels": 3,
        },
    }
    params = yaml.safe_load((project / "params.yaml").read_text())
    # params.yaml is the composition of conf/ alone, and DVC's -S composition keeps the data.
    assert params == _dvc_composition(project)
    after_exp = _dvc_composition(project, "pseudo_label.threshold=0.9")
    assert after_exp["data"] == params["data"]
    assert after_exp["pseudo_label"]["threshold"] == 0.9
    assert load_params(project / "params.yaml").data.image_size == [32, 32]


def test_a_preset_and_later_settings_add_up_and_can_be_dropped(project):
    assert _compose("+experiment=smoke", "model@student.model=small_cnn") == 0
    assert _compose("pseudo_label.threshold=0.6") == 0  # adds to what the file holds
    settings = _settings(project)
    assert settings["defaults"] == [
        {"/experiment": "smoke"},
        {"override /model@student.model": "small_cnn"},
    ]
    assert settings["pseudo_label"] == {"threshold": 0.6}
    params = load_params(project / "params.yaml")
    assert (params.data.source, params.pseudo_label.threshold) == ("digits", 0.6)
    assert params.student.model.name == "small_cnn"
    # The preset's values are the preset's; the project's own settings win over them.
    smoke = yaml.safe_load((project / "conf/experiment/smoke.yaml").read_text())
    assert smoke["pseudo_label"]["threshold"] == 0.3
    assert _dvc_composition(project)["pseudo_label"]["threshold"] == 0.6
    # A -S preset change (no `+`: the project already names one) is DVC's to make.
    assert _dvc_composition(project, "experiment=smoke")["data"]["source"] == "digits"

    assert _compose("~pseudo_label.threshold", "~model@student.model") == 0
    assert _settings(project) == {"defaults": [{"/experiment": "smoke"}]}
    assert load_params(project / "params.yaml").pseudo_label.threshold == 0.3
    assert _compose("--reset") == 0
    assert _settings(project) == {}
    assert load_params(project / "params.yaml").data.source == "fashion_mnist"
    assert "# @package _global_" in (project / "conf/project.yaml").read_text()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("pseudo_label.threshold=2", "pseudo_label.threshold=2.0 is invalid"),
        ("data=nope", "nope"),
        ("pseudo_label.threshold=0.3,0.6", "one value per key"),
        (
            "data=folder data.labeled_root=photos/labeled data.unlabeled_root=photos/missing",
            "data.unlabeled_root=photos/missing: folder not found",
        ),
        ("~pseudo_label.rounds", "does not set pseudo_label.rounds"),
        ("hydra/launcher=ray", "pseudolabel-sweep"),
    ],
)
def test_a_bad_setting_is_one_line_and_writes_nothing(project, override, message, capsys):
    assert _compose("pseudo_label.threshold=0.5") == 0
    before = {p: (project / p).read_bytes() for p in ("conf/project.yaml", "params.yaml")}
    capsys.readouterr()
    assert _compose(*override.split()) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert {p: (project / p).read_bytes() for p in before} == before


def test_output_writes_a_preview_and_leaves_conf_alone(project):
    assert _compose("+experiment=smoke", "-o", "preview.yaml") == 0
    assert load_params(project / "preview.yaml").data.source == "digits"
    assert _settings(project) == {} and not (project / "params.yaml").exists()


def test_a_conf_without_the_project_file_is_refused(project, capsys):
    config = project / "conf" / "config.yaml"
    config.write_text(config.read_text().replace("  - project\n", ""))
    assert _compose("pseudo_label.threshold=0.5") == 2
    assert "must end with `- project`" in capsys.readouterr().err


def _stage(params: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pseudolabel.cli", "merge", "--params", str(params)],
        capture_output=True,
        text=True,
        cwd=params.parent,
    )


def test_a_hand_edited_params_yaml_stops_every_stage_in_one_line(tmp_path):
    raw = yaml.safe_load(to_yaml(compose_raw(["+experiment=smoke"])))
    raw["pseudo_label"]["threshold"] = 0.4  # a valid value, not the composed one
    edited = tmp_path / "params.yaml"
    edited.write_text(yaml.safe_dump(raw))
    run = _stage(edited)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [
        f"pseudolabel merge: error: {edited}: edited by hand (its values no longer match its "
        "params_digest); put the change in conf/ with `pseudolabel compose KEY=VALUE` (or "
        "`dvc exp run -S KEY=VALUE`), which recomposes it."
    ]
    del raw["params_digest"]  # what an older pseudolabel wrote
    edited.write_text(yaml.safe_dump(raw))
    run = _stage(edited)
    assert run.returncode == 2 and len(run.stderr.strip().splitlines()) == 1
    assert "no params_digest: written by an older pseudolabel" in run.stderr
    with pytest.raises(PseudoLabelError, match="older pseudolabel"):
        load_params(edited)


def test_make_demos_profile_is_recorded_and_the_benchmarks_still_compose_the_defaults(project):
    """`make demo` records the demo profile in conf/project.yaml (so `dvc repro` and `dvc exp run
    -S` run it); the benchmarks compose the committed defaults without it, and taking it out
    (`~experiment`) gives them back."""
    default_epochs = compose_raw().student.train.epochs
    assert _compose("+experiment=demo") == 0
    assert _compose("+experiment=demo") == 0  # `make demo` twice: the same single entry
    assert _settings(project) == {"defaults": [{"/experiment": "demo"}]}
    demo = load_params(project / "params.yaml")
    assert demo.student.train.epochs < default_epochs
    assert demo.baseline.train.epochs == demo.student.train.epochs * demo.pseudo_label.rounds
    assert _dvc_composition(project, "seed=1")["student"]["train"]["epochs"] == (
        demo.student.train.epochs
    )
    defaults = compose_defaults(["seed=1"])
    assert (defaults.student.train.epochs, defaults.seed) == (default_epochs, 1)
    assert _compose("~experiment") == 0
    assert load_params(project / "params.yaml").student.train.epochs == default_epochs
    assert _settings(project) == {}
