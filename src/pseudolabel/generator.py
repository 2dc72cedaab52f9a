"""The seed's Python API, as a thin facade over the pipeline's own functions.

    from pseudolabel import PseudoLabelGenerator
    gen = PseudoLabelGenerator(model_path="models/teacher.keras")
    gen.generate_pseudolabel_data(plot_confidences=True, threshold=0.8, move_images=True)

Differences from the seed, on purpose: images are *copied* (never moved) into
`pseudo_data_path`, which is rebuilt from scratch on each call; the model's pixel scaling comes
from its metadata (or `input_scale`), never from a hard-coded guess; and the confidences are
calibrated on the labeled val folder exactly as the pipeline's pseudo_label stage does (the
same function), so the CSV equals the pipeline's for the same teacher and images.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from types import SimpleNamespace

import keras
import pandas as pd

from pseudolabel import merged_set, ood, plots, predicting
from pseudolabel.config import check_threshold
from pseudolabel.data.images import class_names_from, list_images, skipped_entries
from pseudolabel.data.validate import too_many_pixels
from pseudolabel.errors import PseudoLabelError
from pseudolabel.models import io as model_io

log = logging.getLogger(__name__)
# Unlabeled images the OOD score's contrast term is fitted on (pseudo_label.ood.contrast_sample).
OOD_CONTRAST_SAMPLE = 20_000


class PseudoLabelGenerator:
    """Label unlabeled images with a trained model, plot confidences, build a merged set."""

    def __init__(
        self,
        model_path: str | Path = "model.h5",
        train_data_path: str | Path = "data/image_dataset/train",
        unlabeled_path: str | Path = "data/unlabeled",
        pseudo_data_path: str | Path = "data/train_ssl",
        output_folder: str | Path = "outputs",
        csv_filename: str = "data.csv",
        class_names: list[str] | None = None,
        input_scale: str = "auto",
        allow_unsafe: bool = False,
        val_data_path: str | Path | None = None,
        calibrate: bool = True,
        max_pixels: int | None = 40_000_000,
        ood_false_rejection: float | None = 0.05,
        ood_far: float = 2.0,
    ) -> None:
        """Paths as in the seed (`model_path`: .keras, .h5 or a SavedModel folder).
        `class_names` defaults to the model's metadata, else to the sorted train folder names.
        For a model without metadata (one not trained by this project): `input_scale` says what
        pixels it expects ("auto": raw if it starts with a Rescaling layer; "0-255", "0-1",
        "-1-1", or a keras.applications name such as "resnet50"), and `allow_unsafe=True`
        loads one with Lambda layers (arbitrary code: only for files you trust).
        `val_data_path`: the labeled val folder the confidences are calibrated on
        (temperature scaling, as the pipeline does); default: `val` beside the train folder
        when it exists, else no calibration (with a log line). `calibrate=False`: raw softmax.
        `max_pixels`: images whose header declares more pixels (height x width; decompression
        bombs) are listed in errors.csv and never decoded, as the pipeline's ingest does with
        `data.max_pixels` (the same default); None: no limit.
        `ood_false_rejection`: the CSV gets the pipeline's ood_score and ood columns (how unlike
        the labeled classes each image is, flagged past the cut that flags this share of the
        val images; pseudo_label.ood), which needs the val folder; None: no OOD columns.
        `ood_far` (pseudo_label.ood.far): with them, the ood_far column, past this multiple of
        the cut (far from every labeled class), which move_unlabeled_images(exclude_ood="far")
        leaves out."""
        self.model_path = Path(model_path)
        self.train_data_path = Path(train_data_path)
        self.unlabeled_path = Path(unlabeled_path)
        self.pseudo_data_path = Path(pseudo_data_path)
        self.output_folder = Path(output_folder)
        self.csv_path = self.output_folder / csv_filename
        self.class_names = list(class_names) if class_names else None
        self.input_scale = input_scale
        self.allow_unsafe = allow_unsafe
        beside = self.train_data_path.parent / "val"
        self.val_data_path = (
            Path(val_data_path) if val_data_path else beside if beside.is_dir() else None
        )
        self.calibrate = calibrate
        if max_pixels is not None and max_pixels < 1:
            raise PseudoLabelError(f"max_pixels={max_pixels} is invalid: use 1 or more, or None.")
        self.max_pixels = max_pixels
        if ood_false_rejection is not None and not 0.0 < ood_false_rejection < 0.5:
            raise PseudoLabelError(
                f"ood_false_rejection={ood_false_rejection} is invalid: use a share in (0, 0.5), "
                "or None for no OOD score."
            )
        self.ood_false_rejection = ood_false_rejection
        if ood_far is None or not (math.isfinite(ood_far) and ood_far >= 1.0):
            raise PseudoLabelError(f"ood_far={ood_far} is invalid: use a multiple of the cut >= 1.")
        self.ood_far = ood_far
        self.threshold: float | None = None
        self._model: tuple[keras.Model, model_io.ModelMeta] | None = None

    def _teacher(self) -> tuple[keras.Model, model_io.ModelMeta]:
        if self._model is None:
            meta = model_io.read_meta(self.model_path)
            if meta is not None:
                if self.class_names and self.class_names != meta.class_names:
                    raise PseudoLabelError(
                        f"class_names {self.class_names} differ from {self.model_path}'s "
                        f"metadata {meta.class_names}."
                    )
                # allow_unsafe is the user's option alone; the metadata's safe_mode never
                # overrides it (the sidecar is as untrusted as the model).
                self._model = model_io.load(self.model_path, meta, self.allow_unsafe)
            else:
                names = self.class_names or class_names_from(self.train_data_path)
                foreign = model_io.load_foreign(self.model_path, self.allow_unsafe)
                self._model = model_io.adopt(foreign, names, self.input_scale, str(self.model_path))
        return self._model

    def _oversized(self) -> dict[str, str]:
        """Unlabeled images whose header declares more than `max_pixels` pixels (read without
        decoding), by relative path: left out before TensorFlow's decoder sees them."""
        if self.max_pixels is None:
            return {}
        found = {}
        for path in list_images(self.unlabeled_path):
            why = too_many_pixels(path.read_bytes(), self.max_pixels, "max_pixels")
            if why:
                found[path.relative_to(self.unlabeled_path).as_posix()] = why
        return found

    def _predictions(self) -> pd.DataFrame:
        if not self.csv_path.is_file():
            raise PseudoLabelError(
                f"{self.csv_path}: no pseudo-labels yet; call generate_pseudolabel_data() first."
            )
        return predicting.read_csv(self.csv_path)

    def generate_pseudolabel_data(
        self,
        plot_confidences: bool = False,
        threshold: float | None = None,
        move_images: bool = False,
        batch_size: int = 32,
    ) -> pd.DataFrame:
        """Predict every unlabeled image into the CSV; optionally plot and build the merged set.

        The CSV never depends on `threshold`; it only marks the charts and selects images.
        """
        check_threshold(threshold)
        if batch_size < 1:
            raise PseudoLabelError(f"batch_size={batch_size} is invalid: use 1 or more.")
        if move_images:  # check the merge's inputs before any work, not after labeling
            class_names_from(self.train_data_path)
        self.threshold = threshold
        model, meta = self._teacher()
        temperature = 1.0
        if self.calibrate and self.val_data_path is not None:
            _, _, fitted = predicting.val_calibration(
                model, meta, self.val_data_path, batch_size, calibrate=True
            )
            temperature = fitted.temperature
        elif self.calibrate:
            log.info("no val folder beside %s: confidences not calibrated", self.train_data_path)
        labeler, scores = model, None
        oversized = self._oversized()
        if self.ood_false_rejection is not None and self.val_data_path is not None:
            # the pipeline's default score (pseudo_label.ood, its contrast term included)
            files = [
                f
                for f in list_images(self.unlabeled_path)
                if f.relative_to(self.unlabeled_path).as_posix() not in oversized
            ]
            sample = ood.pool_sample(files, OOD_CONTRAST_SAMPLE, seed=0)
            scorer = ood.fit_folders(
                model, meta, self.train_data_path, self.val_data_path, batch_size, sample
            )
            labeler = ood.scored_model(model, scorer)
            scores = ood.val_scores(labeler, meta, self.val_data_path, batch_size)
        elif self.ood_false_rejection is not None:
            log.info("no val folder beside %s: no OOD score", self.train_data_path)
        predictions, failed = predicting.predict_folder(
            labeler, meta, self.unlabeled_path, batch_size, temperature, skip=frozenset(oversized)
        )
        if scores is not None:
            cut = ood.flag(predictions, scores, self.ood_false_rejection, self.ood_far)
            log.info(
                "%d of %d images out of distribution (ood_score > %.3g)",
                int(predictions[ood.FLAG_COLUMN].sum()),
                len(predictions),
                cut,
            )
        predicting.write_csv(predictions, self.csv_path)
        # Every entry of the folder not labeled is listed, with why (nothing skipped silently).
        skipped = [(path, "cannot be decoded") for path in failed]
        bomb = "more pixels than max_pixels (a possible decompression bomb)"
        skipped += [(path, f"{bomb}: {why}") for path, why in oversized.items()]
        skipped += skipped_entries(self.unlabeled_path)
        errors_csv = self.csv_path.with_name("errors.csv")
        if skipped:
            errors = pd.DataFrame(skipped, columns=["path", "reason"])
            predicting.write_csv(errors, errors_csv)
            log.warning(
                "%d entries of %s were not labeled (see %s for why)",
                len(skipped),
                self.unlabeled_path,
                errors_csv,
            )
        elif errors_csv.is_file():
            errors_csv.unlink()  # a list from an earlier call no longer applies
        log.info("wrote %d pseudo-labels to %s", len(predictions), self.csv_path)
        if plot_confidences:
            self.plot_confidence_scores()
        if move_images:
            self.move_unlabeled_images(threshold)
        return predictions

    def plot_confidence_scores(self, per_class: bool = True, overall: bool = True) -> list[Path]:
        """Save the confidence charts into `output_folder`; returns the files written."""
        predictions = self._predictions()
        written = []
        if overall:
            fig = plots.confidence_overview(predictions, self.threshold)
            written.append(plots.save(fig, self.output_folder / "confidence.png"))
        if per_class:
            names = self.class_names or self._teacher()[1].class_names
            fig = plots.confidence_per_class(predictions, names, self.threshold)
            written.append(plots.save(fig, self.output_folder / "confidence_per_class.png"))
        return written

    def move_unlabeled_images(
        self, threshold: float | None = None, exclude_ood: bool | str = "auto"
    ) -> dict[str, dict[str, int]]:
        """Build `pseudo_data_path/<class>/` from copies of the train images and of the
        unlabeled images whose confidence is >= threshold (all when None). Originals stay.
        `exclude_ood` (the pipeline's pseudo_label.ood.exclude, where the CSV has the ood
        column): which images flagged out of distribution to leave out: True (every one),
        "far" (those past ood_far times the cut), False (none), or "auto": by the share of the
        folder flagged, against `ood_false_rejection`: none up to twice it, the far ones up to
        6.5 times, every one above (ood.auto_decides)."""
        check_threshold(threshold)
        if exclude_ood not in (True, False, "far", "auto"):
            raise PseudoLabelError(
                f"exclude_ood={exclude_ood!r} is invalid: use True, False, 'far' or 'auto'."
            )
        predictions = self._predictions()
        class_names = self.class_names or class_names_from(self.train_data_path)
        share = self.ood_false_rejection or 0.05  # (a CSV written with another setting)
        rule = SimpleNamespace(exclude=exclude_ood, false_rejection=share, far=self.ood_far)
        # checked before anything is written (auto without the ood column: keeps all)
        column = ood.LEFT_OUT[ood.decides(rule, predictions)]
        if column is not None and column not in predictions:
            raise PseudoLabelError(
                f"{self.csv_path}: no {column} column, which exclude_ood={exclude_ood!r} "
                "needs: run generate_pseudolabel_data with val_data_path and "
                "ood_false_rejection set, or pass exclude_ood=False."
            )
        predictions, flagged, column = ood.left_out(rule, predictions, self.csv_path)
        if flagged is not None:
            log.info("left out %d images (%s)", len(flagged), ood.REASONS[column])
        accepted = merged_set.select(predictions, threshold)
        counts = merged_set.build_merged(
            self.train_data_path, self.unlabeled_path, accepted, self.pseudo_data_path, class_names
        )
        log.info("copied %d pseudo-labeled images into %s", len(accepted), self.pseudo_data_path)
        return counts
