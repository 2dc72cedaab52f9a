import json
import subprocess
import sys

import pytest
import yaml
from omegaconf import OmegaConf

from pseudolabel.config import (
    MODEL_NAMES,
    AugmentConfig,
    compose,
    compose_raw,
    group_options,
    load_params,
    no_augmentation,
    to_dict,
    validate,
)
from pseudolabel.errors import PseudoLabelError
from tests.conftest import CONF_DIR, REPO


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
    [[f"data={name}"] for name in group_options(CONF_DIR / "data")]
    + [[f"model@student.model={name}"] for name in group_options(CONF_DIR / "model")]
    + [[f"+experiment={name}"] for name in group_options(CONF_DIR / "experiment")],
)
def test_every_config_option_composes(overrides):
    compose(overrides)


@pytest.mark.parametrize("threshold", [1.5, -0.1, float("nan")])
def test_threshold_out_of_range_is_rejected(threshold):
    with pytest.raises(PseudoLabelError, match="pseudo_label.threshold"):
        compose([f"pseudo_label.threshold={threshold}"])


@pytest.mark.parametrize("momentum", [1.0, -0.5, float("nan")])
@pytest.mark.parametrize("key", ["alignment_momentum", "mask_momentum", "target_ema"])
def test_a_consistency_momentum_out_of_range_is_rejected(key, momentum):
    with pytest.raises(PseudoLabelError, match=f"student.consistency.{key}"):
        compose([f"student.consistency.{key}={momentum}"])


@pytest.mark.parametrize(
    "override",
    ["warmup_steps=-1", "warmup_weight=-0.5", "warmup_weight=nan", "warmup_weight=inf"],
)
def test_a_negative_warmup_is_rejected(override):
    with pytest.raises(PseudoLabelError, match=f"student.consistency.{override.split('=')[0]}"):
        compose([f"student.consistency.{override}"])


@pytest.mark.parametrize("value", ["sometimes", "1", "0.1"])
def test_ood_exclude_is_true_false_far_or_auto(value):
    with pytest.raises(PseudoLabelError, match="pseudo_label.ood.exclude"):
        compose([f"pseudo_label.ood.exclude={value}"])
    for ok in ("true", "false", "far", "auto"):
        compose([f"pseudo_label.ood.exclude={ok}"])
    compose(["pseudo_label.ood.enabled=false"])  # auto without a score: nothing to exclude
    for needs_the_score in ("true", "far"):
        with pytest.raises(PseudoLabelError, match="needs pseudo_label.ood.enabled=true"):
            compose(
                [f"pseudo_label.ood.exclude={needs_the_score}", "pseudo_label.ood.enabled=false"]
            )


def test_steps_per_epoch_must_be_positive():
    with pytest.raises(PseudoLabelError, match="teacher.train.steps_per_epoch"):
        compose(["teacher.train.steps_per_epoch=0"])


def test_null_threshold_keeps_all():
    assert compose(["pseudo_label.threshold=null"]).pseudo_label.threshold is None


def test_unknown_key_and_wrong_type_are_clear_errors():
    with pytest.raises(PseudoLabelError, match="conf/"):
        compose(["pseudo_label.threshhold=0.5"])
    raw = OmegaConf.to_container(compose_raw())
    raw["teacher"]["train"]["epochs"] = "many"
    with pytest.raises(PseudoLabelError, match="epochs"):
        validate(raw)
    raw = OmegaConf.to_container(compose_raw())
    raw["data"]["source"] = "imagenet"
    with pytest.raises(PseudoLabelError, match="data.source"):
        validate(raw)


# A top-level key, keys of each section, and nested ones down to an augmentation switch.
MISSING_KEYS = [
    "seed",
    "data.max_pixels",
    "teacher.path",
    "student.train.ema",
    "student.consistency.strong.erasing",
    "teacher.model.fine_tune_from",
    "pseudo_label.calibrate",
    "tracking.uri",
]


def _params_without(key: str, path) -> None:
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    *parents, leaf = key.split(".")
    node = raw
    for part in parents:
        node = node[part]
    del node[leaf]
    path.write_text(yaml.safe_dump(raw))


@pytest.mark.parametrize("key", MISSING_KEYS)
def test_a_key_missing_from_params_is_an_error_naming_it(key, tmp_path):
    """The schema has no values of its own: a key params.yaml lacks is not silently defaulted."""
    params = tmp_path / "params.yaml"
    _params_without(key, params)
    with pytest.raises(PseudoLabelError) as caught:
        load_params(params)
    message = str(caught.value)
    assert message == (f"{params}: key {key} is missing; recompose with `pseudolabel compose`"), (
        message
    )


def test_cli_names_the_missing_key_in_one_line(tmp_path):
    broken = tmp_path / "broken.yaml"
    _params_without("student.train.ema", broken)
    run = subprocess.run(
        [sys.executable, "-m", "pseudolabel.cli", "merge", "--params", str(broken)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert lines == [
        f"pseudolabel merge: error: {broken}: key student.train.ema is missing; "
        "recompose with `pseudolabel compose`"
    ], run.stderr


def test_the_zoo_is_written_once():
    """Every conf/model/ option builds a zoo model, and every zoo model has its conf file."""
    names = {
        OmegaConf.load(CONF_DIR / "model" / f"{option}.yaml").name
        for option in group_options(CONF_DIR / "model")
    }
    assert names == set(MODEL_NAMES)
    assert set(MODEL_NAMES) <= set(group_options(CONF_DIR / "model"))


def test_no_augmentation_sets_every_field_off():
    augment = no_augmentation()
    assert set(vars(augment)) == set(AugmentConfig.__dataclass_fields__)
    assert not any(vars(augment).values())


def test_compose_cli_writes_params(tmp_path):
    out = tmp_path / "params.yaml"
    run = subprocess.run(
        [sys.executable, "-m", "pseudolabel.cli", "compose", "+experiment=smoke", "-o", str(out)],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    assert load_params(out).data.source == "digits"


def test_the_demo_profile_is_what_the_benchmark_measured():
    """`make demo`'s profile (conf/experiment/demo.yaml) is the default recipe with fewer student
    epochs at another learning rate and nothing else, and benchmarks/results/ssl_gain.json holds
    its rows (exactly those overrides) for the seeds the README and docs/gain.md quote, so the
    demo's figures trace back to a committed run."""
    preset = yaml.safe_load((CONF_DIR / "experiment" / "demo.yaml").read_text())
    train = preset["student"]["train"]
    epochs, rate = train["epochs"], train["learning_rate"]
    assert preset == {"student": {"train": {"epochs": epochs, "patience": epochs,
                                            "learning_rate": rate}}}  # fmt: skip
    overrides = [f"student.train.epochs={epochs}", f"student.train.learning_rate={rate}"]
    demo = to_dict(compose(["+experiment=demo"]))
    same = to_dict(compose([*overrides, f"student.train.patience={epochs}"]))
    assert demo == same
    assert demo["baseline"]["train"]["epochs"] < to_dict(compose())["baseline"]["train"]["epochs"]
    rows = json.loads((REPO / "benchmarks" / "results" / "ssl_gain.json").read_text())["rows"]
    measured = {
        row["seed"]
        for row in rows
        if row["budget"] == 50
        and row["compute"] == 1
        and row["setting"] == "consistency"
        and sorted(row["overrides"]) == sorted(overrides)
    }
    assert {0, 1, 2} <= measured


def test_cli_reports_bad_params_without_traceback(tmp_path):
    bad = tmp_path / "params.yaml"
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["pseudo_label"]["threshold"] = 1.5
    bad.write_text(yaml.safe_dump(raw))
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
    one = compose(["pseudo_label.rounds=1"])
    assert (dict(one.rounds), one.final_student) == ({}, "models/student")


def test_hand_edited_rounds_and_zero_rounds_are_clear_errors():
    raw = OmegaConf.to_container(compose_raw())
    raw["pseudo_label"]["rounds"] = 3  # without recomposing: no round@round3 stage in DVC
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


def test_the_baseline_node_is_the_students_with_all_rounds_epochs():
    """conf/config.yaml derives `baseline` (what train_baseline trains) from the student's node:
    it follows every student.* setting; its epochs and patience are all rounds' together, its
    EMA student.baseline.ema; the offline student's pseudo-label batches and labeled
    fine-tuning are off, the consistency student's fine-tuning kept."""
    cfg = compose(["pseudo_label.rounds=3", "student.train.learning_rate=0.02"])
    base, student = to_dict(cfg.baseline), to_dict(cfg.student)
    assert base["train"]["learning_rate"] == 0.02
    assert base["train"]["epochs"] == 3 * student["train"]["epochs"]
    assert base["train"]["patience"] == 3 * student["train"]["patience"]
    assert base["train"]["ema"] == student["baseline"]["ema"] != student["train"]["ema"]
    for key in ("epochs", "patience", "ema"):
        base["train"][key] = student["train"][key]
    assert base == student  # nothing else differs
    offline = compose(
        ["student.consistency.enabled=false", "student.labeled_finetune_epochs=3",
         "student.train.labeled_fraction=0.5"]
    )  # fmt: skip
    assert offline.baseline.train.labeled_fraction is None
    assert offline.baseline.labeled_finetune_epochs == 0
    online = compose(["student.labeled_finetune_epochs=3"])
    assert online.baseline.labeled_finetune_epochs == 3


def test_a_baseline_node_not_derived_from_the_student_is_refused():
    """A params.yaml edited by hand, or a config changed in code without recomposing."""
    raw = OmegaConf.to_container(compose_raw(), resolve=True)
    raw["student"]["train"]["learning_rate"] = 0.5  # the baseline still has the old one
    with pytest.raises(PseudoLabelError, match="baseline.*recompose"):
        validate(raw)
