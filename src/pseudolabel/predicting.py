"""Teacher predictions on unlabeled images -> one CSV row per image (threshold-free).

Images are read from the folder's decoded copy (`data.decoded`, written by ingest) or, without
one, decoded in parallel by `tf.data` and prefetched while the model runs. With a
`partial_dir`, raw predictions are flushed there in chunks, so a run killed at any point and
started again continues where it stopped and writes the same CSV, byte for byte.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import keras
import numpy as np
import pandas as pd
from tqdm import tqdm

from pseudolabel import calibration, ood
from pseudolabel.calibration import apply_temperature
from pseudolabel.data import decoded
from pseudolabel.data.images import (
    labeled_dataset,
    labeled_files,
    path_image_dataset,
    require_images,
)
from pseudolabel.errors import PseudoLabelError
from pseudolabel.models.io import ModelMeta

log = logging.getLogger(__name__)

PROB_PREFIX = "prob_"
SCORE_COLUMNS = ["confidence", "raw_confidence", "margin", "entropy"]
CHUNK_SIZE = 4096


def prob_columns(class_names: list[str]) -> list[str]:
    return [f"{PROB_PREFIX}{name}" for name in class_names]


def probabilities(frame: pd.DataFrame, class_names: list[str], what: str = "CSV") -> np.ndarray:
    """The per-class probability columns as an array; an error names the missing columns."""
    missing = [c for c in prob_columns(class_names) if c not in frame.columns]
    if missing:
        raise PseudoLabelError(
            f"{what} lacks probability column(s) {', '.join(missing)}; re-run the pseudo_label "
            "stage (it writes one prob_<class> column per class)."
        )
    return frame[prob_columns(class_names)].to_numpy(dtype=np.float64)


def unlabeled_class_mix(
    frame: pd.DataFrame,
    class_names: list[str],
    labeled_prior: np.ndarray,
    ood_cfg=None,
    csv: Path | str = "CSV",
    paths=None,
) -> tuple[np.ndarray, int]:
    """The unlabeled images' class mix, estimated by EM under label shift
    (calibration.label_shift_prior) from the CSV's probabilities of the images the student
    learns from (`ood.left_out`'s kept rows, with `ood_cfg` = pseudo_label.ood; `paths`: the
    round whose CSV `frame` is, which round 1's decides for), and how many images it read.
    `labeled_prior`: the class mix the labeler learnt from. What
    student.consistency.alignment_target=pool aligns to, and pseudo_label's `class_mix`."""
    if ood_cfg is not None:
        frame, _, _ = ood.left_out(ood_cfg, frame, Path(csv), paths)
    probs = probabilities(frame, class_names, str(csv))
    return calibration.label_shift_prior(probs, labeled_prior), len(frame)


def _fingerprint(model: keras.Model, meta: ModelMeta, relative: list[str], batch_size: int) -> str:
    """What a partial run depends on: the model's weights, its input, the files, the batching."""
    digest = hashlib.md5()
    for weight in model.weights:
        digest.update(np.ascontiguousarray(keras.ops.convert_to_numpy(weight)).tobytes())
    header = [meta.class_names, meta.image_size, meta.channels, meta.input_scale, batch_size]
    header.append(model.name)  # e.g. the flip-averaging wrapper (with_flip_tta) vs the model
    digest.update(json.dumps(header).encode())
    digest.update("\n".join(relative).encode())
    return digest.hexdigest()


class Chunks:
    """Raw predictions flushed to numbered .npz files, each written atomically; a folder whose
    fingerprint (model, files, batching) differs from the run's is started afresh. Both engines
    resume from it (the local one by position, the Ray one by the paths already saved)."""

    def __init__(self, folder: Path, fingerprint: str) -> None:
        self.folder = folder
        stamp = folder / "fingerprint"
        if folder.is_dir() and (
            not stamp.is_file() or stamp.read_text(encoding="utf-8") != fingerprint
        ):
            log.info("%s belongs to another model or file list; starting afresh", folder)
            shutil.rmtree(folder)
        folder.mkdir(parents=True, exist_ok=True)
        stamp.write_text(fingerprint, encoding="utf-8")

    def files(self) -> list[Path]:
        return sorted(self.folder.glob("chunk-*.npz"))

    def load(self) -> tuple[list[str], list[np.ndarray], int]:
        """Paths and probabilities saved so far, and the index of the first file still to do."""
        paths: list[str] = []
        probs: list[np.ndarray] = []
        end = 0
        for chunk in self.files():
            with np.load(chunk) as saved:
                paths.extend(saved["paths"].tolist())
                probs.append(saved["probs"])
                end = int(saved["end"])
        return paths, probs, end

    def save(self, paths: list[str], probs: np.ndarray, end: int) -> None:
        target = self.folder / f"chunk-{len(self.files()):06d}.npz"
        tmp = target.with_name(target.name + ".tmp")
        with open(tmp, "wb") as f:
            np.savez(f, paths=np.asarray(paths, dtype=str), probs=probs, end=end)
        os.replace(tmp, target)


def with_flip_tta(model: keras.Model) -> keras.Model:
    """The model's probabilities averaged over each image and its horizontal mirror (test-time
    augmentation): steadier pseudo-labels where the mirror keeps the class, as for clothes or
    most photos. Shares the model's weights."""
    inputs = keras.Input(model.input_shape[1:], name="pixels")
    # Never saved (only used to label), so a Lambda layer costs no safety.
    flipped = keras.layers.Lambda(lambda x: keras.ops.flip(x, axis=2), name="mirror")(inputs)
    outputs = keras.layers.Average()([model(inputs), model(flipped)])
    return keras.Model(inputs, outputs, name=f"{model.name}_flip_tta")


def _image_batches(
    folder: Path, files: list[str], meta: ModelMeta, batch_size: int
) -> Iterator[tuple[list[str], np.ndarray]]:
    """(paths, float32 images) batches of `files`: read from the folder's decoded copy
    (data.decoded, written by ingest) when it matches, else decoded by tf.data in parallel, a
    file that fails to decode left out."""
    cached = decoded.open_rows(folder, files, meta.image_size, meta.channels) if files else None
    if cached is not None:
        for start, images in cached.batches(batch_size):
            yield files[start : start + len(images)], images.astype(np.float32)
        return
    for paths, images in path_image_dataset(files, meta.image_size, meta.channels, batch_size):
        yield [p.decode() for p in paths.numpy()], images.numpy()


def predict_batch(model: keras.Model, images: np.ndarray, batch_size: int) -> np.ndarray:
    """Probabilities for one batch; a short last batch is padded to the full size so the
    compiled predict function is never traced again for a new shape."""
    short = batch_size - len(images)
    if short > 0:
        images = np.pad(images, [(0, short)] + [(0, 0)] * (images.ndim - 1))
    return np.asarray(model.predict_on_batch(images), np.float32)[: batch_size - short]


def val_calibration(
    model: keras.Model, meta: ModelMeta, val_dir: Path, batch_size: int, calibrate: bool = True
) -> tuple[np.ndarray, np.ndarray, calibration.Calibration]:
    """The teacher's raw probabilities on the labeled val folder, its true labels, and the
    temperature fitted on them (`calibrate`; else measured at 1): how the pseudo_label stage
    and PseudoLabelGenerator both scale the confidences they write."""
    files, labels = labeled_files(val_dir, meta.class_names)
    ds = labeled_dataset(
        files, labels, meta.num_classes, meta.image_size, meta.channels, batch_size
    )
    raw = np.asarray(model.predict(ds, verbose=0), dtype=np.float64)
    fitted = (
        calibration.fit_temperature(raw, labels) if calibrate else calibration.measure(raw, labels)
    )
    return raw, labels, fitted


def predict_folder(
    model: keras.Model,
    meta: ModelMeta,
    unlabeled_dir: Path,
    batch_size: int,
    temperature: float = 1.0,
    partial_dir: Path | None = None,
    chunk_size: int = CHUNK_SIZE,
    skip: frozenset[str] = frozenset(),
) -> tuple[pd.DataFrame, list[str]]:
    """Predict every image under `unlabeled_dir` (but the relative paths in `skip`), streamed
    in batches with a progress bar.

    Returns the predictions (sorted by path, relative to `unlabeled_dir`, probabilities scaled by
    `temperature`) and the relative paths of files that could not be decoded. With
    `partial_dir`, results are flushed there every `chunk_size` images and a later call resumes
    from them; the folder is removed once the predictions are complete.
    """
    root = str(unlabeled_dir)
    listed = [str(f) for f in require_images(unlabeled_dir, "unlabeled")]
    pairs = [(f, rel) for f in listed if (rel := decoded.relative_path(f, root)) not in skip]
    files, relative = [f for f, _ in pairs], [rel for _, rel in pairs]
    position = {f: i for i, f in enumerate(files)}
    chunks = (
        Chunks(partial_dir, _fingerprint(model, meta, relative, batch_size))
        if partial_dir is not None
        else None
    )
    seen, probs, start = chunks.load() if chunks else ([], [], 0)
    if start:
        log.info("resuming after %d of %d images (%s)", start, len(files), partial_dir)
    pending_paths: list[str] = []
    pending_probs: list[np.ndarray] = []
    end = start

    def flush() -> None:
        if pending_paths:
            block = np.concatenate(pending_probs)
            if chunks:
                chunks.save(pending_paths, block, end)
            seen.extend(pending_paths)
            probs.append(block)
            pending_paths.clear()
            pending_probs.clear()

    with tqdm(
        total=len(files), initial=start, desc="pseudo-label", unit="img", mininterval=2
    ) as bar:
        for batch_paths, images in _image_batches(unlabeled_dir, files[start:], meta, batch_size):
            pending_probs.append(predict_batch(model, images, batch_size))
            pending_paths.extend(relative[position[p]] for p in batch_paths)
            new_end = position[batch_paths[-1]] + 1
            bar.update(new_end - end)
            end = new_end
            if len(pending_paths) >= chunk_size:
                flush()
    end = len(files)
    flush()
    bar.close()
    done = set(seen)
    failed = [rel for rel in relative if rel not in done]
    if failed:
        log.warning("%d unlabeled file(s) could not be decoded and were skipped", len(failed))
    frame = raw_frame(seen, probs, meta.class_names, temperature)
    if chunks:
        shutil.rmtree(partial_dir)
    return frame, failed


def raw_frame(
    paths: list[str], raw_blocks: list[np.ndarray], class_names: list[str], temperature: float
) -> pd.DataFrame:
    """The teacher's raw softmax blocks (rows in `paths` order) -> the CSV's frame, scaled by
    `temperature`: every engine (local, distributed.predict_folder on Ray) ends here."""
    raw = np.concatenate(raw_blocks) if raw_blocks else np.zeros((0, len(class_names)), np.float32)
    scores = None
    if raw.shape[1] == len(class_names) + 1:  # ood.scored_model: the OOD score comes last
        raw, scores = raw[:, :-1], raw[:, -1]
    return to_frame(paths, apply_temperature(raw, temperature), class_names, raw, scores)


def to_frame(
    paths: list[str],
    probs: np.ndarray,
    class_names: list[str],
    raw_probs: np.ndarray | None = None,
    ood_scores: np.ndarray | None = None,
) -> pd.DataFrame:
    """path, label, confidence (top-1 of `probs`), raw_confidence (top-1 of `raw_probs`, the
    uncalibrated output), margin (top-1 minus top-2), entropy, then one probability per class
    and, given `ood_scores`, the ood_score column (pseudolabel.ood)."""
    probs = np.asarray(probs, dtype=np.float64).reshape(len(paths), len(class_names))
    raw = probs if raw_probs is None else np.asarray(raw_probs, np.float64).reshape(probs.shape)
    ranked = np.sort(probs, axis=1)
    top = probs.argmax(axis=1) if len(probs) else np.zeros(0, dtype=int)
    frame = pd.DataFrame(
        {
            "path": paths,
            "label": [class_names[i] for i in top],
            "confidence": ranked[:, -1] if len(probs) else np.zeros(0),
            "raw_confidence": raw.max(axis=1) if len(probs) else np.zeros(0),
            "margin": (ranked[:, -1] - ranked[:, -2])
            if len(probs) and len(class_names) > 1
            else np.zeros(len(probs)),
            "entropy": -(probs * np.log(np.clip(probs, 1e-12, 1.0))).sum(axis=1),
        }
    )
    frame[prob_columns(class_names)] = probs
    if ood_scores is not None:
        frame[ood.SCORE_COLUMN] = np.asarray(ood_scores, np.float64)
    return frame.sort_values("path", kind="stable").reset_index(drop=True)


def write_csv(frame: pd.DataFrame, path: Path) -> None:
    """Write atomically: a killed run never leaves a half-written CSV behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    frame.to_csv(tmp, index=False, float_format="%.6f")
    os.replace(tmp, path)


def _lines(mask: np.ndarray, limit: int = 5) -> str:
    """The CSV line numbers (header = line 1) of the rows where `mask` holds, the first few."""
    rows = np.flatnonzero(mask)
    shown = ", ".join(str(r + 2) for r in rows[:limit])
    return (
        f"line {shown}"
        if len(rows) == 1
        else f"lines {shown}" + (f" (and {len(rows) - limit} more)" if len(rows) > limit else "")
    )


def read_csv(path: Path) -> pd.DataFrame:
    """The pseudo-label CSV, validated: every problem is one PseudoLabelError naming the column
    and the lines, raised before a caller deletes or writes anything. Refused: an empty file,
    a header without rows, a missing column, an empty path or label, and a confidence or
    prob_<class> value that is not a number in [0, 1] (text, NaN, inf, out of range)."""
    fix = "re-run the pseudo_label stage (or restore the file)."
    try:
        frame = pd.read_csv(path, dtype={"path": str, "label": str})
    except pd.errors.EmptyDataError:
        raise PseudoLabelError(f"{path}: empty file (0 bytes, no header); {fix}") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise PseudoLabelError(f"{path}: not a readable CSV ({exc}); {fix}") from None
    missing = [c for c in ("path", "label", "confidence") if c not in frame.columns]
    if missing:
        raise PseudoLabelError(f"{path}: column(s) {', '.join(missing)} missing; {fix}")
    if frame.empty:
        raise PseudoLabelError(f"{path}: a header but no rows (no pseudo-label); {fix}")
    for column in ("path", "label"):
        blank = frame[column].isna().to_numpy() | (frame[column].str.strip() == "").to_numpy()
        if blank.any():
            raise PseudoLabelError(f"{path}: empty {column} on {_lines(blank)}; {fix}")
    for column in ["confidence", *(c for c in frame.columns if c.startswith(PROB_PREFIX))]:
        values = pd.to_numeric(frame[column], errors="coerce").to_numpy(dtype=np.float64)
        text = np.isnan(values) & frame[column].notna().to_numpy()
        problems = (
            (text, "a value that is not a number"),
            (np.isnan(values) & ~text, "an empty or NaN value"),
            (np.isinf(values), "an infinite value"),
            (np.isfinite(values) & ((values < 0) | (values > 1)), "a value outside [0, 1]"),
        )
        for mask, what in problems:
            if mask.any():
                raise PseudoLabelError(
                    f"{path}: column {column} has {what} on {_lines(mask)}; {fix}"
                )
        frame[column] = values
    if ood.SCORE_COLUMN in frame:
        values = pd.to_numeric(frame[ood.SCORE_COLUMN], errors="coerce").to_numpy(np.float64)
        if not np.isfinite(values).all():
            bad = ~np.isfinite(values)
            raise PseudoLabelError(
                f"{path}: column {ood.SCORE_COLUMN} has a value that is not a finite number on "
                f"{_lines(bad)}; {fix}"
            )
        frame[ood.SCORE_COLUMN] = values
    for column in (ood.FLAG_COLUMN, ood.FAR_COLUMN):
        if column not in frame:
            continue
        flags = pd.to_numeric(frame[column], errors="coerce")
        bad = ~flags.isin([0, 1]).to_numpy()
        if bad.any():
            raise PseudoLabelError(
                f"{path}: column {column} has a value other than 0 or 1 on {_lines(bad)}; {fix}"
            )
        frame[column] = flags.astype(int)
    return frame


def batches(n: int, batch_size: int) -> int:
    return math.ceil(n / batch_size)
