"""Pseudo-labels people can trust: calibration, threshold analysis, selection, QA, resume."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest

from pseudolabel import calibration, merged_set, thresholds, tracking
from pseudolabel.config import compose, compose_raw, to_dict, to_yaml, validate
from pseudolabel.data.images import list_images
from pseudolabel.errors import PseudoLabelError
from pseudolabel.paths import Paths
from pseudolabel.predicting import prob_columns, read_csv
from pseudolabel.stages import pseudo_label
from pseudolabel.stages.label import PARTIAL, analysis_csv
from pseudolabel.stages.merge import merge
from pseudolabel.stages.train import _training_data

CLASSES = [f"digit_{i}" for i in range(10)]


def _cfg(smoke_cfg, **pseudo_label):
    raw = to_dict(smoke_cfg)
    raw["pseudo_label"].update(pseudo_label)
    return validate(raw)


def _project(pipeline, tmp_path) -> Paths:
    """A project root that reads the pipeline's data, teacher and CSV and writes its own merge."""
    paths = Paths(tmp_path / "project")
    (paths.root / "data").mkdir(parents=True)
    os.symlink(pipeline.labeled.resolve(), paths.labeled)
    os.symlink(pipeline.unlabeled.resolve(), paths.unlabeled)
    os.symlink(pipeline.models.resolve(), paths.models)
    paths.outputs.mkdir()
    shutil.copy(pipeline.csv, paths.csv)
    analysis_csv(paths).parent.mkdir(parents=True)
    shutil.copy(analysis_csv(pipeline), analysis_csv(paths))
    return paths


# --- selection strategies ---------------------------------------------------------------


def test_global_threshold_and_null(pipeline):
    frame = read_csv(pipeline.csv)
    kept = merged_set.choose(frame, "threshold", CLASSES, threshold=0.6)
    assert (kept["confidence"] >= 0.6).all()
    assert len(kept) == int((frame["confidence"] >= 0.6).sum())
    assert len(merged_set.choose(frame, "threshold", CLASSES, threshold=None)) == len(frame)


def test_per_class_thresholds_configured_and_derived(pipeline):
    frame = read_csv(pipeline.csv)
    limits = thresholds.class_thresholds(CLASSES, {"digit_0": 0.95}, 0.2, None, 0.9)
    assert limits["digit_0"] == 0.95 and limits["digit_5"] == 0.2
    kept = merged_set.choose(frame, "per_class", CLASSES, thresholds=limits)
    assert (kept["confidence"] >= kept["label"].map(limits.get).astype(float)).all()
    rejected = frame.drop(kept.index)
    assert (rejected["confidence"] < rejected["label"].map(limits.get).astype(float)).all()

    table = pd.read_csv(analysis_csv(pipeline))
    derived = thresholds.class_thresholds(CLASSES, None, None, table, 0.9)
    for name, limit in derived.items():
        reached = table.loc[table[f"precision_{name}"] >= 0.9, "threshold"]
        assert limit == (reached.min() if len(reached) else 1.0)
    with pytest.raises(PseudoLabelError, match="unknown class"):
        thresholds.class_thresholds(CLASSES, {"cat": 0.5}, None, table, 0.9)


def test_topk_is_class_balanced_and_duplicates_rare_classes(pipeline):
    frame = read_csv(pipeline.csv)
    per_class = frame["label"].value_counts()
    k = int(per_class.median())
    kept = merged_set.choose(frame, "topk", CLASSES, k=k)
    for name in CLASSES:
        mine, theirs = kept[kept["label"] == name], frame[frame["label"] == name]
        assert len(mine) == min(k, len(theirs))
        if len(theirs) > k:  # the most confident ones
            assert mine["confidence"].min() >= theirs.drop(mine.index)["confidence"].max()
    k = int(per_class.max()) + 1  # every class is now rare: its images are repeated up to k
    padded = merged_set.choose(frame, "topk", CLASSES, k=k, duplicate=True)
    counts = padded["label"].value_counts()
    assert all(counts[name] == k for name in per_class.index)
    assert set(padded["path"]) == set(frame["path"])
    assert padded["path"].duplicated().any()
    with pytest.raises(PseudoLabelError, match="top_k=0"):
        merged_set.choose(frame, "topk", CLASSES, k=0)
    with pytest.raises(PseudoLabelError, match="unknown"):
        merged_set.choose(frame, "random", CLASSES)


@pytest.mark.parametrize(
    "override, key",
    [
        ({"selection": "random"}, "selection"),
        ({"target_precision": 0.0}, "target_precision"),
        ({"target_precision": 1.5}, "target_precision"),
        ({"top_k": 0}, "top_k"),
        ({"per_class_threshold": {"digit_1": 2.0}}, "per_class_threshold"),
    ],
)
def test_bad_selection_config_is_one_clear_error(smoke_cfg, override, key):
    with pytest.raises(PseudoLabelError, match=key):
        _cfg(smoke_cfg, **override)


def test_merge_topk_writes_soft_targets_qa_grids_and_analysis(pipeline, smoke_cfg, tmp_path):
    paths = _project(pipeline, tmp_path)
    cfg = _cfg(smoke_cfg, selection="topk", top_k=30, duplicate=True, qa_images=4)
    metrics = merge(cfg, paths)
    predicted = read_csv(paths.csv)["label"].value_counts()
    assert all(metrics["per_class"][name]["pseudo"] == 30 for name in predicted.index)
    manifest = merged_set.read_manifest(paths.merged)
    pseudo = manifest[manifest["source"] == "pseudo"]
    assert len(pseudo) == 30 * len(predicted)
    assert np.allclose(pseudo[prob_columns(CLASSES)].sum(axis=1), 1.0, atol=1e-4)
    selection = paths.outputs / "selection"
    assert sorted(p.stem for p in (selection / "qa").glob("*.png")) == CLASSES
    assert (selection / "threshold_analysis.png").is_file()
    assert 0.0 <= (metrics["recommended_threshold"] or 0.0) <= 1.0


def test_soft_labels_feed_probability_vectors(pipeline, smoke_cfg, tmp_path):
    paths = _project(pipeline, tmp_path)
    merge(_cfg(smoke_cfg, threshold=None), paths)
    cfg = compose(
        ["+experiment=smoke", "student.soft_labels=true", "student.train.labeled_fraction=null"]
    )
    files = [str(p) for p in list_images(paths.merged)]
    ds = _training_data(cfg.student, paths.merged, files, None, CLASSES, [8, 8], 1, 0)
    targets = np.concatenate([y.numpy() for _, y in ds])
    assert targets.shape == (len(files), 10)
    assert np.allclose(targets.sum(axis=1), 1.0, atol=1e-5)
    assert (targets.max(axis=1) < 0.999).any()  # soft, not one-hot

    manifest = merged_set.read_manifest(paths.merged)
    manifest.drop(columns=prob_columns(CLASSES)).to_csv(paths.merged / merged_set.MANIFEST)
    with pytest.raises(PseudoLabelError, match="probability column"):
        _training_data(cfg.student, paths.merged, files, None, CLASSES, [8, 8], 1, 0)


@pytest.mark.parametrize(
    "edit, message",
    [({"path": "../../escape.png"}, "not a file inside"), ({"label": "cat"}, "unknown class")],
)
def test_hand_edited_csv_is_refused_before_writing(pipeline, smoke_cfg, tmp_path, edit, message):
    paths = _project(pipeline, tmp_path)
    frame = read_csv(paths.csv)
    for column, value in edit.items():
        frame.loc[0, column] = value
    frame.to_csv(paths.csv, index=False)
    with pytest.raises(PseudoLabelError, match=message):
        merge(smoke_cfg, paths)
    assert not paths.merged.exists() and not (paths.outputs / "selection").exists()


# --- calibration and threshold analysis ---------------------------------------------------


def test_temperature_scaling_fixes_overconfidence():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 2000)
    logits = rng.normal(size=(2000, 4))
    logits[np.arange(2000), labels] += 1.0
    overconfident = calibration.apply_temperature(
        np.exp(logits) / np.exp(logits).sum(1, keepdims=True), 0.25
    )
    fitted = calibration.fit_temperature(overconfident, labels)
    assert fitted.temperature == pytest.approx(4.0, rel=0.2)
    assert fitted.nll_after < fitted.nll_before and fitted.ece_after < fitted.ece_before


def test_calibration_lowers_or_keeps_val_nll(pipeline):
    metrics = json.loads((pipeline.metrics / "pseudo_label.json").read_text())["calibration"]
    assert metrics["nll_after"] <= metrics["nll_before"] + 1e-9
    frame = read_csv(pipeline.csv)
    assert {"raw_confidence", "margin", "entropy"} <= set(frame.columns)
    assert (pipeline.outputs / "plots" / "reliability.png").is_file()


def test_threshold_analysis_is_consistent(pipeline):
    table = pd.read_csv(analysis_csv(pipeline))
    frame = read_csv(pipeline.csv)
    assert list(table["threshold"]) == list(thresholds.THRESHOLDS)
    assert table["coverage"].iloc[0] == 1.0
    assert (np.diff(table["coverage"]) <= 1e-12).all()
    for t in (0.3, 0.5, 0.8):
        row = table[np.isclose(table["threshold"], t)].iloc[0]
        assert row["coverage"] == pytest.approx((frame["confidence"] >= t).mean(), abs=2e-3)
        name = frame["label"].mode()[0]
        mine = frame.loc[frame["label"] == name, "confidence"]
        assert row[f"coverage_{name}"] == pytest.approx((mine >= t).mean(), abs=5e-3)
    # The recommendation: the lowest threshold whose precision reaches the target.
    target = float(table["precision"].dropna().median())
    chosen = thresholds.recommend(table, target)
    assert table.loc[table["threshold"] == chosen, "precision"].iloc[0] >= target
    assert (table.loc[table["threshold"] < chosen, "precision"].fillna(0) < target).all()
    assert thresholds.recommend(table.assign(precision=0.1), 0.99) is None


def test_analysis_precision_on_known_numbers():
    table = thresholds.analysis_table(
        np.array([0.9, 0.4]),
        np.array([0, 1]),
        val_confidence=np.array([0.95, 0.85, 0.6, 0.3]),
        val_predicted=np.array([0, 1, 1, 0]),
        val_true=np.array([0, 1, 0, 0]),
        class_names=["a", "b"],
    )
    at = table.set_index("threshold")
    assert at.loc[0.5, "precision"] == pytest.approx(2 / 3) and at.loc[0.5, "val_support"] == 3
    assert at.loc[0.8, "precision"] == 1.0 and at.loc[0.5, "coverage"] == 0.5
    assert at.loc[0.5, "precision_b"] == 0.5 and np.isnan(at.loc[0.99, "precision_a"])


def test_distribution_alignment_undoes_a_teacher_biased_to_one_class():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 4000)
    logits = rng.normal(size=(4000, 4))
    logits[np.arange(4000), labels] += 1.5
    honest = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    biased = calibration.align(honest, np.array([4.0, 1.0, 1.0, 1.0]))  # favours class 0
    prior = np.full(4, 0.25)
    weights = calibration.alignment_weights(biased, prior)
    aligned = calibration.align(biased, weights)
    np.testing.assert_allclose(aligned.mean(axis=0), prior, atol=1e-6)
    assert weights[0] < weights[1:].min()  # class 0 scaled down, the rest up
    accuracy = lambda p: (p.argmax(axis=1) == labels).mean()  # noqa: E731
    assert accuracy(aligned) > accuracy(biased) + 0.05
    # Already aligned: (almost) nothing moves; and an unbalanced prior is met as well.
    again = calibration.alignment_weights(aligned, prior)
    np.testing.assert_allclose(calibration.align(aligned, again), aligned, atol=1e-5)
    skewed = np.array([0.4, 0.3, 0.2, 0.1])
    to_skewed = calibration.align(biased, calibration.alignment_weights(biased, skewed))
    np.testing.assert_allclose(to_skewed.mean(axis=0), skewed, atol=1e-6)


def test_the_pools_class_mix_is_estimated_from_calibrated_probabilities():
    """calibration.label_shift_prior (student.consistency.alignment_target=pool): from a
    model's calibrated posteriors under its balanced labeled mix, EM recovers a skewed folder's
    class mix, and a folder with the labeled mix gives it back."""
    rng = np.random.default_rng(0)
    means = np.eye(4) * 2.0  # four overlapping Gaussian classes

    def posteriors(mix: np.ndarray, n: int = 20000) -> np.ndarray:
        labels = rng.choice(4, n, p=mix)
        x = means[labels] + rng.normal(size=(n, 4))
        logits = -0.5 * ((x[:, None, :] - means[None]) ** 2).sum(-1)  # log p(x|y) + const
        return np.exp(logits) / np.exp(logits).sum(1, keepdims=True)  # under a uniform prior

    balanced = np.full(4, 0.25)
    skewed = np.array([0.70, 0.20, 0.07, 0.03])  # a long tail
    probs = posteriors(skewed)
    assert np.abs(probs.mean(axis=0) - skewed).max() > 0.05  # the plain mean is pulled flat
    np.testing.assert_allclose(calibration.label_shift_prior(probs, balanced), skewed, atol=0.02)
    np.testing.assert_allclose(
        calibration.label_shift_prior(posteriors(balanced), balanced), balanced, atol=0.02
    )


def test_labeling_with_distribution_alignment(pipeline, smoke_cfg, tmp_path, tracking_uri):
    import mlflow

    cfg = _cfg(smoke_cfg, distribution_alignment=True)
    paths = _labeling_project(tmp_path / "aligned", pipeline, pipeline.unlabeled.resolve())
    metrics = pseudo_label(cfg, paths)
    frame, plain = read_csv(paths.csv), read_csv(pipeline.csv)
    counts = np.array([len(list_images(paths.train / name)) for name in CLASSES], float)
    probs = frame[prob_columns(CLASSES)].to_numpy()
    np.testing.assert_allclose(probs.mean(axis=0), counts / counts.sum(), atol=1e-4)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert (frame["path"] == plain["path"]).all()
    np.testing.assert_allclose(frame["raw_confidence"], plain["raw_confidence"], atol=1e-6)
    np.testing.assert_allclose(frame["confidence"], probs.max(axis=1), atol=1e-6)
    assert (frame["label"] == np.asarray(CLASSES)[probs.argmax(axis=1)]).all()
    assert set(metrics["alignment_weights"]) == set(CLASSES)
    assert json.loads((paths.metrics / "pseudo_label.json").read_text())["alignment_weights"]
    mlflow.set_tracking_uri(tracking_uri)
    run = mlflow.search_runs(
        experiment_names=[cfg.tracking.experiment],
        filter_string=f"tags.{tracking.CSV_TAG} = '{tracking.md5(paths.csv)}'",
        output_format="list",
    )[0]
    assert run.data.params["pseudo_label.distribution_alignment"] == "True"
    assert f"alignment.{CLASSES[0]}" in run.data.metrics
    # The folder's class mix is the same estimate either way: the aligned probabilities are
    # read as those of a labeler whose prior the alignment weights moved.
    plain_mix = json.loads((pipeline.metrics / "pseudo_label.json").read_text())["class_mix"]
    mix = metrics["class_mix"]
    assert mix["images"] == plain_mix["images"] and sum(mix["estimated"].values()) == (
        pytest.approx(1, abs=1e-5)
    )
    for name in CLASSES:
        assert mix["estimated"][name] == pytest.approx(plain_mix["estimated"][name], abs=0.01)
    assert run.data.metrics["class_mix.head_to_tail"] == pytest.approx(mix["head_to_tail"])


def test_labeling_reports_the_folders_class_mix(pipeline):
    """pseudo_label's class_mix in metrics/pseudo_label.json: EM's estimate over the images the
    student learns from, and how far the same estimate lands from val's known mix."""
    mix = json.loads((pipeline.metrics / "pseudo_label.json").read_text())["class_mix"]
    assert set(mix["estimated"]) == set(CLASSES)
    assert sum(mix["estimated"].values()) == pytest.approx(1, abs=1e-5)
    assert mix["images"] == len(read_csv(pipeline.csv)) and mix["head_to_tail"] >= 1
    assert mix["head"] in CLASSES and 0 <= mix["val_error"] <= 1


def test_a_skewed_folder_is_told_and_an_unsure_teacher_says_so(caplog):
    """mix_report: from calibrated posteriors, a long-tailed folder gets the skew line (and the
    way to align the student to it); a balanced one none; a teacher whose estimate misses val's
    known mix says it cannot tell, whatever its estimate of the folder."""
    from pseudolabel.stages.label import mix_report

    rng = np.random.default_rng(0)
    means = np.eye(4) * 2.5

    def posteriors(mix, n=4000, scale=1.0):
        labels = rng.choice(4, n, p=mix)
        x = means[labels] + rng.normal(size=(n, 4))
        logits = -0.5 * scale * ((x[:, None, :] - means[None]) ** 2).sum(-1)
        return np.exp(logits) / np.exp(logits).sum(1, keepdims=True), labels

    names, balanced = ["a", "b", "c", "d"], np.full(4, 0.25)
    val, val_true = posteriors(balanced, 400)
    val_mix = np.bincount(val_true, minlength=4) / 400
    val_estimate = calibration.label_shift_prior(val, balanced)

    def report(pool_mix, val_estimate=val_estimate):
        probs, _ = posteriors(pool_mix)
        mix = calibration.label_shift_prior(probs, balanced)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="pseudolabel.stages.label"):
            return mix_report(mix, len(probs), val_estimate, val_mix, names)

    skewed = report(np.array([0.72, 0.18, 0.07, 0.03]))
    assert skewed["head"] == "a" and skewed["tail"] == "d" and skewed["head_to_tail"] > 10
    assert skewed["val_error"] < 0.15 and skewed["skewed"]
    assert "looks skewed" in caplog.text and "aligns its predictions to this mix" in caplog.text
    flat = report(balanced)
    assert flat["head_to_tail"] < 2 and not flat["skewed"] and "looks skewed" not in caplog.text
    wrong = np.array([0.7, 0.1, 0.1, 0.1])  # an estimate far from val's known, balanced mix
    unsure = report(np.array([0.72, 0.18, 0.07, 0.03]), wrong)
    assert unsure["val_error"] > 0.4 and not unsure["skewed"] and "cannot be told" in caplog.text
    assert "looks skewed" not in caplog.text
    probs, _ = posteriors(np.array([0.72, 0.18, 0.07, 0.03]))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="pseudolabel.stages.label"):
        mix = calibration.label_shift_prior(probs, balanced)
        mix_report(mix, len(probs), val_estimate, val_mix, names, "labeled")
    assert "alignment_target=auto aligns them to this one" in caplog.text
    caplog.clear()  # a later round's labeling: the student reads round 1's estimate
    with caplog.at_level(logging.INFO, logger="pseudolabel.stages.label"):
        mix_report(mix, len(probs), val_estimate, val_mix, names, "auto", first_round=False)
    assert "round 1's (the teacher's) class_mix" in caplog.text
    assert "aligns its predictions to this mix" not in caplog.text


# --- streaming that resumes ----------------------------------------------------------------


def _labeling_project(root, pipeline, unlabeled=None) -> Paths:
    paths = Paths(root)
    (root / "data").mkdir(parents=True)
    os.symlink(pipeline.labeled.resolve(), paths.labeled)
    os.symlink(pipeline.models.resolve(), paths.models)
    if unlabeled is not None:
        os.symlink(unlabeled, paths.unlabeled)
    else:  # many hard-linked copies of the digits, so labeling lasts long enough to kill
        for copy in range(4):
            folder = paths.unlabeled / f"copy{copy:02d}"
            folder.mkdir(parents=True)
            for image in list_images(pipeline.unlabeled):
                os.link(image, folder / image.name)
    return paths


def test_killed_labeling_resumes_to_the_same_csv(pipeline, smoke_cfg, tmp_path, caplog):
    cfg = _cfg(smoke_cfg, batch_size=4, chunk_size=32)
    killed = _labeling_project(tmp_path / "killed", pipeline)
    # The stage refuses a params.yaml that is not a composition (a hand edit): compose it.
    overrides = ["+experiment=smoke", "pseudo_label.batch_size=4", "pseudo_label.chunk_size=32"]
    (killed.root / "params.yaml").write_text(to_yaml(compose_raw(overrides)), encoding="utf-8")
    process = subprocess.Popen(
        [sys.executable, "-m", "pseudolabel.cli", "pseudo_label", "--params", "params.yaml"],
        cwd=killed.root,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    partial = killed.outputs / PARTIAL
    deadline = time.monotonic() + 120
    while len(list(partial.glob("chunk-*.npz"))) < 3 and time.monotonic() < deadline:
        assert process.poll() is None, "labeling ended before it could be killed"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    done_before = len(list(partial.glob("chunk-*.npz")))
    assert done_before >= 3 and not killed.csv.exists()

    with caplog.at_level(logging.INFO, logger="pseudolabel.predicting"):
        pseudo_label(cfg, killed)
    assert "resuming after" in caplog.text
    assert not partial.exists()

    fresh = _labeling_project(tmp_path / "fresh", pipeline, killed.unlabeled.resolve())
    pseudo_label(cfg, fresh)
    assert killed.csv.read_bytes() == fresh.csv.read_bytes()
    assert len(read_csv(fresh.csv)) == len(list_images(killed.unlabeled))


def test_mlflow_labeling_run_and_merge_run_beneath_it(pipeline, smoke_cfg, tracking_uri):
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    runs = mlflow.search_runs(
        experiment_names=[smoke_cfg.tracking.experiment],
        filter_string=f"tags.{tracking.CSV_TAG} = '{tracking.md5(pipeline.csv)}'",
        output_format="list",
    )
    by_stage = {run.data.tags["stage"]: run for run in runs}
    labeling, merged = by_stage["pseudo_label"], by_stage["merge"]
    assert labeling.data.tags[tracking.UNLABELED_TAG].endswith(".dir")
    assert labeling.data.tags["teacher_run_id"]
    assert {"calibration.ece_before", "calibration.ece_after"} <= set(labeling.data.metrics)
    client = mlflow.MlflowClient()
    artifacts = {a.path for a in client.list_artifacts(labeling.info.run_id)}
    assert {"data.csv", "threshold_analysis.csv", "plots"} <= artifacts
    assert merged.data.tags["mlflow.parentRunId"] == labeling.info.run_id
    assert {f"kept.{name}" for name in CLASSES} <= set(merged.data.metrics)
    qa = {a.path for a in client.list_artifacts(merged.info.run_id, "selection/qa")}
    assert {f"selection/qa/{name}.png" for name in CLASSES} == qa


def test_the_student_aligns_to_the_mix_the_teachers_labeling_estimated(tmp_path):
    """The estimate leaves out the images merge leaves out. alignment_target=pool aligns to
    round 1's class_mix (the teacher's labeling) in every round; auto to that mix where the
    labeling found the folder skewed, else to the labeled mix; a labeling without class_mix,
    or a bad target, is one clear line."""
    from types import SimpleNamespace

    from pseudolabel.predicting import unlabeled_class_mix
    from pseudolabel.stages.train import _pool_prior, labeled_prior

    names = ["a", "b", "c"]
    labeled = labeled_prior(np.repeat(np.arange(3), 10), 3)
    np.testing.assert_allclose(labeled, np.full(3, 1 / 3))
    probs = np.array([[0.9, 0.05, 0.05]] * 8 + [[0.05, 0.9, 0.05]] * 2)
    frame = pd.DataFrame({"path": [f"{i}.png" for i in range(10)]})
    frame["label"] = np.array(names)[probs.argmax(1)]
    frame["confidence"] = probs.max(1)
    for j, name in enumerate(names):
        frame[f"prob_{name}"] = probs[:, j]
    frame["ood"] = [1] * 4 + [0] * 6  # 40 % flagged: auto leaves four "a" images out
    mix, used = unlabeled_class_mix(frame, names, labeled)
    assert used == 10 and mix[0] > 0.7 and mix[2] < 0.05 and mix.sum() == pytest.approx(1)
    auto = SimpleNamespace(exclude="auto", false_rejection=0.05, far=None)
    without, kept = unlabeled_class_mix(frame, names, labeled, auto)
    assert kept == 6 and without[0] < mix[0]  # 4 "a" of 6 images, not 8 of 10

    project = Paths(tmp_path)
    project.metrics.mkdir(parents=True)

    def labeling(skewed: bool) -> None:
        estimated = {"a": 0.7, "b": 0.2, "c": 0.1}
        report = {"estimated": estimated, "head_to_tail": 7.0, "val_error": 0.05, "skewed": skewed}
        (project.metrics / "pseudo_label.json").write_text(json.dumps({"class_mix": report}))

    labeling(True)
    prior, aimed = _pool_prior(project, names, labeled, "pool")
    assert aimed == "pool"
    np.testing.assert_allclose(prior, [0.7, 0.2, 0.1])
    report = json.loads((project.metrics / "pseudo_label.json").read_text())
    report["class_mix"] |= {"estimated": {"a": 0.8, "b": 0.2, "c": 0.0}, "images": 10}
    (project.metrics / "pseudo_label.json").write_text(json.dumps(report))
    floored, _ = _pool_prior(project, names, labeled, "pool")  # no class below one image
    assert floored[2] == pytest.approx(0.1 / 1.1) and floored.sum() == pytest.approx(1)
    labeling(True)
    later = project.round(2)  # round 1's labeling decides in every round
    np.testing.assert_allclose(_pool_prior(later, names, labeled, "auto")[0], prior)
    labeling(False)
    assert _pool_prior(project, names, labeled, "pool")[1] == "pool"
    prior, aimed = _pool_prior(project, names, labeled, "auto")
    assert aimed == "labeled"
    np.testing.assert_allclose(prior, labeled)
    (project.metrics / "pseudo_label.json").write_text(json.dumps({"images": 10}))
    with pytest.raises(PseudoLabelError, match="no class_mix with every class .* re-run the"):
        _pool_prior(project, names, labeled, "auto")
    with pytest.raises(PseudoLabelError, match="alignment_target='skewed' is invalid: use labeled"):
        compose(["student.consistency.alignment_target=skewed"])
