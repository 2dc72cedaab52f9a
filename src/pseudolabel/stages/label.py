"""pseudo_label: the teacher's calibrated predictions for every unlabeled image (no threshold).

Everything here is threshold-free, so changing the threshold or the selection never re-runs it:
the CSV, the temperature fitted on val, the reliability diagram, and the threshold-analysis
table (coverage and estimated precision for every threshold) that `merge` marks up.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from PIL import Image

from pseudolabel import calibration, ood, plots, predicting, thresholds, tracking
from pseudolabel.data.images import labeled_files, require_images
from pseudolabel.errors import PseudoLabelError
from pseudolabel.models import io as model_io
from pseudolabel.paths import Paths
from pseudolabel.stages.common import publish_metrics, teacher_trust

log = logging.getLogger(__name__)

PARTIAL = ".data.csv.partial"


def analysis_csv(paths: Paths) -> Path:
    """The threshold-analysis table (`dvc plots show` renders it): `paths.threshold_analysis`."""
    return paths.threshold_analysis


def unlabeled_dvc_hash(paths: Paths) -> str | None:
    """The unlabeled folder's DVC hash, computed as DVC does (not read from dvc.lock, which a
    stage run by hand could have left stale); None with a log line if it cannot be computed.
    Cheaper than the labeling itself, which decodes every one of those files."""
    try:
        return tracking.dvc_hash(paths.unlabeled)
    except Exception as exc:  # an optional tag: never fail the labeling for it
        log.info("unlabeled data's DVC hash not tagged (%s: %s)", type(exc).__name__, exc)
        return None


def _class_indices(labels: pd.Series, class_names: list[str]) -> np.ndarray:
    index = {name: i for i, name in enumerate(class_names)}
    return labels.map(index).to_numpy(dtype=np.int64)


def _labeled_prior(paths: Paths, meta: model_io.ModelMeta) -> np.ndarray:
    """The class distribution of the labeled training images (what distribution alignment
    aims the pseudo-labels at); uniform, with a log line, where a class has no labeled image
    (an imported teacher's class may be absent from the folder)."""
    _, labels = labeled_files(paths.train, meta.class_names)
    counts = np.bincount(labels, minlength=meta.num_classes).astype(np.float64)
    if (counts == 0).any():
        missing = [n for n, c in zip(meta.class_names, counts, strict=True) if not c]
        log.info("distribution alignment: no labeled %s image; aiming at uniform", missing)
        return np.full(meta.num_classes, 1.0 / meta.num_classes)
    return counts / counts.sum()


def _aligned(
    predictions: pd.DataFrame, weights: np.ndarray, class_names: list[str]
) -> pd.DataFrame:
    """The predictions with every probability reweighted per class (label, confidence, margin
    and entropy follow); raw_confidence keeps the teacher's own top-1."""
    probs = calibration.align(predicting.probabilities(predictions, class_names), weights)
    scores = predictions.get(ood.SCORE_COLUMN)
    frame = predicting.to_frame(
        predictions["path"].tolist(),
        probs,
        class_names,
        ood_scores=None if scores is None else scores.to_numpy(),
    )
    frame["raw_confidence"] = predictions["raw_confidence"].to_numpy()
    return frame


def pseudo_label(cfg, paths: Paths = Paths()) -> dict[str, Any]:
    """Teacher predictions for every unlabeled image -> outputs/data.csv (no threshold)."""
    pl = cfg.pseudo_label
    files = require_images(paths.unlabeled, "unlabeled")
    model, meta = model_io.load(paths.model("teacher"), **teacher_trust(cfg))
    scorer = None
    if pl.ood.enabled:
        sample = None
        if pl.ood.contrast:
            sample = ood.pool_sample(files, pl.ood.contrast_sample, cfg.seed)
        scorer = ood.fit_folders(model, meta, paths.train, paths.val, pl.batch_size, sample)
    labeler = ood.scored_model(model, scorer) if scorer else model
    if pl.tta:
        model, labeler = predicting.with_flip_tta(model), predicting.with_flip_tta(labeler)
    # The same calibration PseudoLabelGenerator applies (predicting.val_calibration).
    val_raw, val_true, fitted = predicting.val_calibration(
        model, meta, paths.val, pl.batch_size, pl.calibrate
    )
    val_scores = ood.val_scores(labeler, meta, paths.val, pl.batch_size) if scorer else None
    keys = ("batch_size", "chunk_size", "calibrate", "tta", "distribution_alignment", "engine")
    params = {f"pseudo_label.{key}": pl[key] for key in keys}
    keys = ("enabled", "false_rejection", "contrast", "contrast_sample", "far")
    params |= {f"pseudo_label.ood.{key}": pl.ood[key] for key in keys}
    with tracking.start_run(
        cfg, "pseudo_label", params, {"teacher_run_id": meta.run_id, "round": paths.round_number}
    ):
        predictions, failed = _predict(cfg, paths, labeler, meta, fitted.temperature, scorer)
        labeled = _labeled_prior(paths, meta)  # alignment's target and class_mix's source
        weights = None
        if pl.distribution_alignment:
            weights = calibration.alignment_weights(
                predicting.probabilities(predictions, meta.class_names),
                labeled,
            )
            predictions = _aligned(predictions, weights, meta.class_names)
        cut = None
        if scorer:  # checked before the CSV is written
            cut = ood.flag(predictions, val_scores, pl.ood.false_rejection, pl.ood.far)
            _check_some_belong(predictions, paths, cut, pl.ood.false_rejection)
        predicting.write_csv(predictions, paths.csv)
        errors = pd.DataFrame({"path": failed, "reason": "cannot be decoded"})
        predicting.write_csv(errors, paths.outputs / "errors.csv")
        val_probs = calibration.apply_temperature(val_raw, fitted.temperature)
        if weights is not None:  # val's confidences on the same scale as the CSV's
            val_probs = calibration.align(val_probs, weights)
        _analysis_and_plots(paths, predictions, meta.class_names, val_raw, val_probs, val_true)
        val = (val_probs, val_true)
        ood_cfg = pl.ood if scorer else None
        mix = _class_mix(cfg, paths, meta, predictions, labeled, weights, ood_cfg, *val)
        metrics = _metrics(predictions, failed, fitted, weights, meta.class_names)
        metrics["class_mix"] = mix
        if scorer:
            metrics["ood"] = _ood_report(paths, predictions, val_scores, cut, pl.ood, meta)
        else:  # dvc.yaml declares the plot either way
            predicting.write_csv(ood.histogram(np.zeros(0), np.zeros(0), 0.0), paths.ood_histogram)
        _log_run(paths, metrics)
    log.info("pseudo_label: %d images labeled, %d failed", len(predictions), len(failed))
    return metrics


SKEWED = 5.0  # the estimated head-to-tail ratio past which the log calls the folder skewed
UNSURE = 0.15  # the estimate's error on val (total variation) past which it is not trusted


def _class_mix(
    cfg, paths: Paths, meta, predictions, labeled, weights, ood_cfg, val_probs, val_true
) -> dict[str, Any]:
    """metrics' `class_mix`: the unlabeled images' class mix estimated by EM under label shift
    (predicting.unlabeled_class_mix: the images the student learns from), checked on the
    labeled val images, whose mix is known (`mix_report`). The CSV's probabilities aligned by
    pseudo_label.distribution_alignment are read as those of a labeler whose prior is the
    labeled mix times the alignment weights (what the weights make them)."""
    source = labeled  # the labeled mix the labeler learnt from (_labeled_prior)
    if weights is not None:
        source = source * weights / np.sum(source * weights)
    mix, used = predicting.unlabeled_class_mix(
        predictions, meta.class_names, source, ood_cfg, paths.csv, paths
    )
    val_mix = np.bincount(val_true, minlength=meta.num_classes) / max(len(val_true), 1)
    val_estimate = calibration.label_shift_prior(val_probs, source)
    cons = cfg.student.consistency
    target = cons.alignment_target if cons.distribution_alignment else None
    first = paths.round_number == 1
    return mix_report(mix, used, val_estimate, val_mix, meta.class_names, target, first)


def mix_report(
    mix: np.ndarray,
    images: int,
    val_estimate: np.ndarray,
    val_mix: np.ndarray,
    class_names: list[str],
    target: str | None = "auto",
    first_round: bool = True,
) -> dict[str, Any]:
    """The estimated mix with its head and tail classes and their ratio (the tail floored at
    one image), and `val_error`: how far the same estimate lands from the val images' known mix
    (total variation, 0-1). A log line where the folder looks skewed (a balanced labeled set
    says nothing of the folder's mix: the line says what the student's alignment will aim at,
    `target` being student.consistency.alignment_target, None without alignment); where the
    estimate misses val's mix by more than UNSURE, the teacher is too unsure to tell and the
    line says that instead. `skewed`: both (what alignment_target=auto reads). A later
    round's line says that the student reads round 1's estimate, not this one."""
    head, tail = int(np.argmax(mix)), int(np.argmin(mix))
    ratio = float(mix[head] / max(mix[tail], 1.0 / max(images, 1)))
    val_error = float(0.5 * np.abs(np.asarray(val_estimate) - np.asarray(val_mix)).sum())
    names = class_names
    if val_error > UNSURE:
        log.info(
            "the unlabeled images' class mix cannot be told from this teacher's probabilities: "
            "on the val images, whose mix is known, the estimate is off by %.0f %% (total "
            "variation); metrics/pseudo_label.json class_mix",
            100 * val_error,
        )
    elif ratio >= SKEWED:
        advice = ""
        if target in ("auto", "pool"):  # both read round 1's estimate in every round
            aim = "this mix" if first_round else "round 1's (the teacher's) class_mix, not this one"
            advice = f"; the student aligns its predictions to {aim} (alignment_target={target})"
        elif target == "labeled":
            advice = (
                "; the student aligns its predictions to the labeled images' mix: "
                "student.consistency.alignment_target=auto aligns them to this one"
            )
        log.warning(
            "the unlabeled images' class mix looks skewed (estimated: %.1f %% %s, %.2f %% %s, "
            "%.0fx; off by %.0f %% on val; metrics/pseudo_label.json class_mix)%s",
            100 * mix[head], names[head], 100 * mix[tail], names[tail], ratio,
            100 * val_error, advice,
        )  # fmt: skip
    return {
        "estimated": {n: round(float(v), 6) for n, v in zip(names, mix, strict=True)},
        "images": int(images),
        "head": names[head],
        "tail": names[tail],
        "head_to_tail": round(ratio, 3),
        "val_error": round(val_error, 6),
        # what student.consistency.alignment_target=auto reads: skewed, and told surely
        "skewed": bool(ratio >= SKEWED and val_error <= UNSURE),
    }


def _check_some_belong(predictions: pd.DataFrame, paths: Paths, cut: float, share: float) -> None:
    """An unlabeled folder none of whose images is like the labeled classes is the wrong
    folder (or all junk): one line, before the CSV is written and any student trains."""
    flagged = predictions[ood.FLAG_COLUMN].to_numpy(bool)
    if len(flagged) and flagged.all():
        raise PseudoLabelError(
            f"{paths.unlabeled}: all {len(flagged):,} unlabeled images are out of distribution "
            f"(ood_score above {cut:.3g}, the cut that flags {share:.0%} of the labeled val "
            "images): is it the right folder? (pseudo_label.ood.enabled=false skips the check)"
        )
    if flagged.mean() > 0.5:
        log.warning(
            "%.0f%% of the unlabeled images are out of distribution (ood_score > %.3g); see "
            "outputs/plots/ood.png and ood_most_out_of_place.png",
            100 * flagged.mean(),
            cut,
        )


def _ood_report(
    paths: Paths, predictions: pd.DataFrame, val_scores, cut: float, cfg_ood, meta
) -> dict[str, Any]:
    """The OOD charts (score histogram with the cut, share flagged per predicted class, the
    most out-of-place images) and their metrics."""
    scores = predictions[ood.SCORE_COLUMN].to_numpy(np.float64)
    flagged = predictions[ood.FLAG_COLUMN].to_numpy(bool)
    out = paths.outputs / "plots"
    labels = predictions["label"]
    far_at = ood.far_cut(cut, cfg_ood.far)
    plots.save(
        plots.ood_overview(val_scores, scores, labels, cut, cfg_ood.false_rejection, far_at),
        out / "ood.png",
    )
    worst = predictions.sort_values(ood.SCORE_COLUMN, ascending=False).head(24)
    items = [
        (np.asarray(Image.open(paths.unlabeled / rel)), f"{label} {score:.1f}")
        for rel, label, score in zip(
            worst["path"], worst["label"], worst[ood.SCORE_COLUMN], strict=True
        )
    ]
    title = f"most out of place (ood_score; {int(flagged.sum()):,} of {len(flagged):,} flagged)"
    plots.save(plots.image_grid(title, items), out / "ood_most_out_of_place.png")
    predicting.write_csv(ood.histogram(val_scores, scores, cut), paths.ood_histogram)
    decided = ood.decides_in(cfg_ood, paths, predictions)  # what merge, the student leave out
    report = {
        "cut": round(cut, 6),
        "false_rejection": cfg_ood.false_rejection,
        "val_flagged_fraction": round(float((val_scores > cut).mean()), 6),
        "flagged": int(flagged.sum()),
        "flagged_fraction": round(float(flagged.mean()), 6) if len(flagged) else 0.0,
        "excluded": decided is True,  # every flagged image
        "far_excluded": decided == "far",  # only those past far times the cut
        "flagged_per_class": {
            name: round(float(flagged[(labels == name).to_numpy()].mean()), 6)
            if (labels == name).any()
            else 0.0
            for name in meta.class_names
        },
    }
    far = predictions[ood.FAR_COLUMN].to_numpy(bool)  # past pseudo_label.ood.far times the cut
    report |= {
        "far": cfg_ood.far,
        "far_cut": round(far_at, 6),
        "far_flagged": int(far.sum()),
        "far_flagged_fraction": round(float(far.mean()), 6) if len(far) else 0.0,
    }
    return report


def _predict(
    cfg, paths: Paths, model, meta, temperature: float, scorer: ood.Scorer | None
) -> tuple[pd.DataFrame, list[str]]:
    """The raw predictions (scaled by `temperature`) on the configured engine, resumable; with
    `scorer`, `model` is its scored model and the frame has the ood_score column."""
    pl = cfg.pseudo_label
    if pl.engine == "ray":
        from pseudolabel import distributed

        return distributed.predict_folder(
            paths.model("teacher"),
            teacher_trust(cfg),
            meta,
            paths.unlabeled,
            pl.batch_size,
            tta=pl.tta,
            temperature=temperature,
            address=cfg.ray.address,
            actors=cfg.ray.actors,
            cpus_per_actor=cfg.ray.cpus_per_actor,
            partial_dir=paths.outputs / PARTIAL,
            chunk_size=pl.chunk_size,
            scorer=scorer,
        )
    return predicting.predict_folder(
        model,
        meta,
        paths.unlabeled,
        pl.batch_size,
        temperature=temperature,
        partial_dir=paths.outputs / PARTIAL,
        chunk_size=pl.chunk_size,
    )


def _analysis_and_plots(
    paths: Paths,
    predictions: pd.DataFrame,
    class_names: list[str],
    val_raw: np.ndarray,
    val_probs: np.ndarray,
    val_true: np.ndarray,
) -> None:
    """The threshold-analysis table (coverage on the unlabeled set, precision estimated on
    val) and the confidence and reliability charts."""
    table = thresholds.analysis_table(
        predictions["confidence"].to_numpy(),
        _class_indices(predictions["label"], class_names),
        val_probs.max(axis=1),
        val_probs.argmax(axis=1),
        val_true,
        class_names,
    )
    predicting.write_csv(table, analysis_csv(paths))
    figures = {
        "confidence.png": plots.confidence_overview(predictions),
        "confidence_per_class.png": plots.confidence_per_class(predictions, class_names),
        "reliability.png": plots.reliability_diagram(
            calibration.reliability(val_raw, val_true),
            calibration.reliability(val_probs, val_true),
        ),
    }
    for name, fig in figures.items():
        plots.save(fig, paths.outputs / "plots" / name)


def _metrics(
    predictions: pd.DataFrame,
    failed: list[str],
    fitted: calibration.Calibration,
    weights: np.ndarray | None,
    class_names: list[str],
) -> dict[str, Any]:
    conf = predictions["confidence"]
    return {
        "images": len(predictions),
        "failed": len(failed),
        "mean_confidence": round(float(conf.mean()), 6),
        "mean_raw_confidence": round(float(predictions["raw_confidence"].mean()), 6),
        "calibration": fitted.metrics(),
        "alignment_weights": None
        if weights is None
        else {n: round(float(w), 6) for n, w in zip(class_names, weights, strict=True)},
        "fraction_at_least": {
            f"{t:g}": round(float((conf >= t).mean()), 6) for t in (0.5, 0.7, 0.8, 0.9, 0.95)
        },
        "predicted_per_class": {
            name: int((predictions["label"] == name).sum()) for name in class_names
        },
    }


def _log_run(paths: Paths, metrics: dict[str, Any]) -> None:
    """The CSV's lineage tags and the outputs on the active MLflow run, and the metrics there
    and in metrics/pseudo_label.json (in MLflow the per-class ones as alignment.<class> and
    predicted.<class>)."""
    mlflow.set_tag(tracking.CSV_TAG, tracking.md5(paths.csv))
    data_hash = unlabeled_dvc_hash(paths)
    if data_hash:
        mlflow.set_tag(tracking.UNLABELED_TAG, data_hash)
    mlflow.log_artifact(str(paths.csv))
    mlflow.log_artifact(str(analysis_csv(paths)))
    mlflow.log_artifacts(str(paths.outputs / "plots"), "plots")
    per_class = {
        "alignment": metrics["alignment_weights"],  # None (no alignment): left out
        "predicted": metrics["predicted_per_class"],
    }
    publish_metrics(
        paths.metrics / "pseudo_label.json",
        metrics,
        {**metrics, **per_class},
        exclude=("alignment_weights", "predicted_per_class"),
    )
