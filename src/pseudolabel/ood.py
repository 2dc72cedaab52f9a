"""Out-of-distribution (OOD) scores: how unlike the labeled classes each unlabeled image is.

A softmax teacher is confident on classes it never saw, so its confidence cannot keep them out
(benchmarks/ood_scores.py: a teacher of Fashion-MNIST's classes 0-5 separates classes 6-9 from
its own with a max-softmax AUROC of 0.65). The score, chosen there by measurement among
max-softmax, energy, max-logit, kNN and Mahalanobis variants, is the Mahalanobis layer ensemble
(Lee et al. 2018, "A simple unified framework for detecting out-of-distribution samples"):

- features: each of the teacher's blocks (every pooling layer of its own graph, averaged over
  the image) and the input of its classifier, each L2-normalised;
- per block, the squared Mahalanobis distance to the nearest labeled class mean under one
  shared covariance of the class-centred labeled training features, shrunk by Ledoit-Wolf
  (a few hundred labeled images for up to a few hundred dimensions);
- each block's distance normalised by its spread on the val images, (d - median) / (q95 -
  median), and the blocks summed;
- with `pseudo_label.ood.contrast` (the default), per block one more term that looks at the
  unlabeled folder itself: a logistic regression of the labeled training images against a
  sample of the unlabeled ones on that block's L2-normalised features (PU learning: the labeled
  images are a sample of the classes, the folder a mix of them and of what does not belong, so
  where the folder has images and the labeled set has none the classifier says "unlabeled").
  Classes the teacher never saw but that lie near one it did (sneakers beside sandals) fool a
  distance to the class means, not this (benchmarks/ood_scores.py, docs/messy.md). The
  folder's sample is weighted so that its predicted-class mix (among the images the distances
  call in-distribution) matches the labeled one: otherwise a skewed folder's head class,
  over-represented against the balanced labeled set, would look "unlabeled" too. Each block's
  logit, negated and val-normalised like its distance, is added to the sum: `ood_score`, higher
  = less likely one of the labeled classes.

The cut is the val images' (1 - false_rejection) quantile of that score, so it flags about that
share of in-distribution images (measured on the test images in the benchmark: docs/messy.md).
The score is computed in the same forward pass as the probabilities: `scored_model` returns
them with the score as one more column, so both labeling engines, the chunked resume and the
flip TTA treat it like any other output.
"""

from __future__ import annotations

import hashlib
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import pandas as pd

from pseudolabel.data.images import labeled_dataset, labeled_files, path_image_dataset
from pseudolabel.errors import PseudoLabelError

log = logging.getLogger(__name__)

SCORE_COLUMN = "ood_score"
FLAG_COLUMN = "ood"
FAR_COLUMN = "ood_far"  # past pseudo_label.ood.far times the cut
# The Keras layers whose outputs are a block's features (besides the classifier's input).
POOLING = (keras.layers.MaxPooling2D, keras.layers.AveragePooling2D)


def feature_tensors(model: keras.Model) -> list:
    """The symbolic features the score reads: every pooling layer's output in the model's own
    graph (a nested backbone counts as one layer), then the input of its last Dense layer."""
    dense = [layer for layer in model.layers if isinstance(layer, keras.layers.Dense)]
    if not dense:
        raise PseudoLabelError(
            f"model {model.name!r} has no Dense classifier layer, whose input the OOD score reads: "
            "turn the score off for this teacher (pseudo_label.ood.enabled=false; "
            "PseudoLabelGenerator(ood_false_rejection=None))."
        )
    pools = [layer.output for layer in model.layers if isinstance(layer, POOLING)]
    return [*pools, dense[-1].input]


def feature_model(model: keras.Model) -> keras.Model:
    """The model's probabilities and its blocks' features, each flattened to (batch, dims). A
    model that ends in a nested model (an imported teacher behind its pixel scaling) is read
    through it: the nested model's features, fed by what the outer graph feeds it."""
    last = model.layers[-1]
    if isinstance(last, keras.Model) and not any(
        isinstance(layer, keras.layers.Dense) for layer in model.layers
    ):  # a chain (models.io.adopt's): the outer layers again, then the nested model's features
        x = inputs = keras.Input(model.input_shape[1:], name="pixels")
        for layer in model.layers[:-1]:
            if not isinstance(layer, keras.layers.InputLayer):
                x = layer(x)
        return keras.Model(inputs, feature_model(last)(x), name=f"{model.name}_features")
    features = [
        keras.layers.GlobalAveragePooling2D()(t) if len(t.shape) == 4 else t
        for t in feature_tensors(model)
    ]
    return keras.Model(model.inputs, [model.output, *features], name=f"{model.name}_features")


def _l2(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


@dataclass(frozen=True)
class Block:
    """One block's class means (classes x dims), shared precision matrix and val spread."""

    means: np.ndarray
    precision: np.ndarray
    median: float
    spread: float

    def distance(self, features: np.ndarray) -> np.ndarray:
        """Squared Mahalanobis distance of L2-normalised `features` to the nearest class mean."""
        x = _l2(features)
        xp = x @ self.precision
        d = (
            (xp * x).sum(1)[:, None]
            - 2 * xp @ self.means.T
            + np.einsum("cd,de,ce->c", self.means, self.precision, self.means)[None, :]
        )
        return d.min(axis=1)

    def normalised(self, features: np.ndarray) -> np.ndarray:
        return (self.distance(features) - self.median) / self.spread


@dataclass(frozen=True)
class Contrast:
    """One block's labeled-vs-unlabeled logistic regression on its L2-normalised features and
    its val spread: raw = -(kernel . x + bias), higher = more like the unlabeled folder than
    the labeled set."""

    kernel: np.ndarray
    bias: float
    median: float
    spread: float

    def raw(self, features: np.ndarray) -> np.ndarray:
        return -(_l2(features) @ self.kernel + self.bias)

    def normalised(self, features: np.ndarray) -> np.ndarray:
        return (self.raw(features) - self.median) / self.spread


@dataclass(frozen=True)
class Scorer:
    """The fitted score: one Block per feature tensor of the model, and with the contrast term
    one Contrast per block too; every term val-normalised, all summed."""

    blocks: tuple[Block, ...]
    contrast: tuple[Contrast, ...] = ()

    def distances(self, features: list[np.ndarray]) -> np.ndarray:
        return sum(b.normalised(f) for b, f in zip(self.blocks, features, strict=True))

    def score(self, features: list[np.ndarray]) -> np.ndarray:
        total = self.distances(features)
        for term, f in zip(self.contrast, features, strict=False):
            total = total + term.normalised(f)
        return total

    def fingerprint(self) -> str:
        digest = hashlib.md5()
        arrays = [a for b in self.blocks for a in (b.means, b.precision, [b.median, b.spread])]
        arrays += [a for c in self.contrast for a in (c.kernel, [c.bias, c.median, c.spread])]
        for array in arrays:
            digest.update(np.ascontiguousarray(array, np.float64).tobytes())
        return digest.hexdigest()


def _spread(values: np.ndarray) -> tuple[float, float]:
    """(median, q95 - median) of the val images' values: what a term is normalised by."""
    median, q95 = np.quantile(values, [0.5, 0.95])
    return float(median), float(max(q95 - median, 1e-9))


def fit_contrast(
    train: list[np.ndarray],
    val: list[np.ndarray],
    pool: list[np.ndarray],
    pool_probs: np.ndarray,
    pool_in: np.ndarray,
    prior: np.ndarray,
) -> tuple[Contrast, ...]:
    """Per block, the labeled training images (`train`: per-block features) against the
    unlabeled sample (`pool`), half the weight each. The sample's images are weighted by
    prior[c] / share[c], c their predicted class and share the classes' mix among the sample's
    in-distribution-looking images (`pool_in`, by the distances alone), so that the class mix
    alone cannot tell the two apart. L2-regularised, C = 1 (0.3 and 3 measured no better:
    docs/messy.md)."""
    from sklearn.linear_model import LogisticRegression

    predicted = pool_probs.argmax(1)
    k = pool_probs.shape[1]
    counts = np.bincount(predicted[pool_in] if pool_in.any() else predicted, minlength=k)
    share = counts / max(1, counts.sum())
    weights = prior[predicted] / np.maximum(share[predicted], 1e-3)
    if not weights.sum() > 0:  # no predicted class among the labeled ones: unweighted
        weights = np.ones(len(predicted))
    n_train = len(train[0])
    sample_weight = np.concatenate(
        [np.full(n_train, 0.5 / n_train), 0.5 * weights / weights.sum()]
    ) * (n_train + len(predicted))
    y = np.concatenate([np.ones(n_train), np.zeros(len(predicted))])
    terms = []
    for block_train, block_val, block_pool in zip(train, val, pool, strict=True):
        x = np.concatenate([_l2(block_train), _l2(block_pool)])
        clf = LogisticRegression(C=1.0, max_iter=3000).fit(x, y, sample_weight=sample_weight)
        kernel, bias = clf.coef_[0].astype(np.float64), float(clf.intercept_[0])
        median, spread = _spread(-(_l2(block_val) @ kernel + bias))
        terms.append(Contrast(kernel, bias, median, spread))
    return tuple(terms)


def fit(model: keras.Model, train_ds, train_labels: np.ndarray, val_ds, pool_ds=None) -> Scorer:
    """Fit the score on the labeled training images (`train_ds`, batches of images in the
    order of `train_labels`: class means, covariance) and the val images (each block's
    spread); with `pool_ds` (batches of a sample of the unlabeled images) the Contrast term
    too."""
    from sklearn.covariance import LedoitWolf

    present = np.unique(train_labels)
    if len(present) < 2:
        raise PseudoLabelError("the OOD score needs labeled training images of two classes.")
    extractor = feature_model(model)
    train = [np.asarray(o, np.float64) for o in extractor.predict(train_ds, verbose=0)[1:]]
    val = [np.asarray(o, np.float64) for o in extractor.predict(val_ds, verbose=0)[1:]]
    # A class with no labeled image (an imported teacher's may lack some) has no mean.
    index = np.searchsorted(present, train_labels)
    blocks = []
    for feats, val_feats in zip(train, val, strict=True):
        x = _l2(feats)
        means = np.stack([x[index == i].mean(0) for i in range(len(present))])
        precision = LedoitWolf().fit(x - means[index]).precision_
        median, spread = _spread(Block(means, precision, 0.0, 1.0).distance(val_feats))
        blocks.append(Block(means, precision, median, spread))
    scorer = Scorer(tuple(blocks))
    if pool_ds is None:
        return scorer
    with warnings.catch_warnings():  # its length is unknown (undecodable files are dropped)
        warnings.filterwarnings("ignore", "Your input ran out of data", UserWarning)
        outputs = extractor.predict(pool_ds, verbose=0)
    pool_probs = np.asarray(outputs[0], np.float64)
    pool = [np.asarray(o, np.float64) for o in outputs[1:]]
    if not len(pool_probs):
        return scorer
    # the labeled class mix over the model's classes (an imported teacher's may lack some)
    prior = np.zeros(pool_probs.shape[1])
    prior[present] = np.bincount(index, minlength=len(present)) / len(index)
    return with_contrast(scorer, train, val, pool, pool_probs, prior)


def with_contrast(
    scorer: Scorer,
    train: list[np.ndarray],
    val: list[np.ndarray],
    pool: list[np.ndarray],
    pool_probs: np.ndarray,
    prior: np.ndarray,
) -> Scorer:
    """`scorer` with the Contrast term fitted on per-block features of the labeled training
    images, the val images and the unlabeled sample (`pool`, with the model's probabilities);
    `prior`: the labeled class mix over the model's classes."""
    # the sample's images the distances alone keep (at the default 5 % false rejection)
    inside = scorer.distances(pool) <= np.quantile(scorer.distances(val), 0.95)
    contrast = fit_contrast(train, val, pool, pool_probs, inside, prior)
    return Scorer(scorer.blocks, contrast)


class _ScoreLayer(keras.layers.Layer):
    """The fitted score inside the graph: features in, one score per image out."""

    def __init__(self, scorer: Scorer, **kwargs):
        super().__init__(**kwargs)
        self.blocks = []
        for i, b in enumerate(scorer.blocks):
            constant = {
                "means": b.means,
                "precision": b.precision,
                "bias": np.einsum("cd,de,ce->c", b.means, b.precision, b.means),
            }
            weights = {
                name: self.add_weight(
                    name=f"block{i}_{name}",
                    shape=value.shape,
                    initializer=keras.initializers.Constant(value.astype(np.float32)),
                    trainable=False,
                )
                for name, value in constant.items()
            }
            self.blocks.append((weights, b.median, b.spread))
        self.contrast = []
        for i, c in enumerate(scorer.contrast):
            kernel = self.add_weight(
                name=f"block{i}_contrast_kernel",
                shape=(len(c.kernel), 1),
                initializer=keras.initializers.Constant(c.kernel[:, None].astype(np.float32)),
                trainable=False,
            )
            self.contrast.append((kernel, c.bias, c.median, c.spread))

    def call(self, features):
        ops = keras.ops
        total = 0.0
        for x, (w, median, spread) in zip(features, self.blocks, strict=True):
            x = ops.cast(x, "float32")
            x = x / ops.maximum(ops.norm(x, axis=1, keepdims=True), 1e-12)
            xp = ops.matmul(x, w["precision"])
            d = (
                ops.sum(xp * x, axis=1, keepdims=True)
                - 2.0 * ops.matmul(xp, ops.transpose(w["means"]))
                + w["bias"][None, :]
            )
            total = total + (ops.min(d, axis=1, keepdims=True) - median) / spread
        for x, (kernel, bias, median, spread) in zip(features, self.contrast, strict=False):
            x = ops.cast(x, "float32")
            x = x / ops.maximum(ops.norm(x, axis=1, keepdims=True), 1e-12)
            total = total + (-(ops.matmul(x, kernel) + bias) - median) / spread
        return total


def scored_model(model: keras.Model, scorer: Scorer) -> keras.Model:
    """The model's probabilities with the OOD score as one more, last column."""
    extractor = feature_model(model)
    probs, *features = extractor.outputs
    score = _ScoreLayer(scorer, name="ood_score", dtype="float32")(features)
    outputs = keras.layers.Concatenate(name="with_ood_score", dtype="float32")([probs, score])
    return keras.Model(extractor.inputs, outputs, name=f"{model.name}_scored")


def histogram(val_scores: np.ndarray, scores: np.ndarray, cut: float, bins: int = 40):
    """The share of val and of unlabeled images per score bin (a DVC plot), and whether the
    bin is past the cut."""
    both = np.concatenate([val_scores, scores])
    if not len(both):
        return pd.DataFrame(columns=["ood_score", "val", "unlabeled", "flagged"])
    edges = np.linspace(min(both.min(), 0.0), max(np.quantile(both, 0.995), cut * 1.2), bins + 1)
    shares = {
        name: np.histogram(np.clip(v, edges[0], edges[-1]), edges)[0] / max(1, len(v))
        for name, v in (("val", val_scores), ("unlabeled", scores))
    }
    centre = (edges[:-1] + edges[1:]) / 2
    return pd.DataFrame({"ood_score": centre, **shares, "flagged": (centre > cut).astype(int)})


def cut(val_scores: np.ndarray, false_rejection: float) -> float:
    """The score above which an image is flagged: the val images' (1 - false_rejection)
    quantile, so that share of in-distribution images is flagged."""
    return float(np.quantile(np.asarray(val_scores, np.float64), 1.0 - false_rejection))


def flag(frame: pd.DataFrame, val_scores: np.ndarray, false_rejection: float, far: float) -> float:
    """Add the ood column (1: ood_score past the cut) and the ood_far column (1: past `far`
    times the cut) to a frame with ood_score; returns the cut."""
    at = cut(val_scores, false_rejection)
    scores = frame[SCORE_COLUMN].to_numpy()
    frame[FLAG_COLUMN] = (scores > at).astype(int)
    frame[FAR_COLUMN] = (scores > far_cut(at, far)).astype(int)
    return at


def far_cut(at: float, far: float) -> float:
    """`far` times the cut: every term of the score is centred on its val images' median, so
    the score's val median is about 0 and this is `far` times as far from the labeled classes'
    typical image as the cut (never nearer than the cut itself)."""
    return max(at, far * at)


def _labeled(folder: Path, meta, batch_size: int):
    """A labeled folder's images in file order (batches) and their class indices."""
    files, labels = labeled_files(folder, meta.class_names)
    ds = labeled_dataset(
        files, labels, meta.num_classes, meta.image_size, meta.channels, batch_size
    )
    return ds, labels


def pool_sample(files: list, size: int, seed: int) -> list:
    """At most `size` of the unlabeled `files`, drawn at random (seeded), in their order."""
    if len(files) <= size:
        return list(files)
    keep = np.sort(np.random.default_rng(seed).choice(len(files), size, replace=False))
    return [files[i] for i in keep]


def fit_folders(
    model: keras.Model,
    meta,
    train_dir: Path,
    val_dir: Path,
    batch_size: int,
    pool_files: list | None = None,
) -> Scorer:
    """`fit` on a labeled train folder and its val folder (class folders, as the pipeline's),
    and with `pool_files` (unlabeled image paths: `pool_sample`'s) the Contrast term."""
    train_ds, train_labels = _labeled(train_dir, meta, batch_size)
    val_ds, _ = _labeled(val_dir, meta, batch_size)
    pool_ds = None
    if pool_files:
        pool_ds = path_image_dataset(
            [str(f) for f in pool_files], meta.image_size, meta.channels, batch_size
        ).map(lambda _path, image: image)
    return fit(model, train_ds, train_labels, val_ds, pool_ds)


def val_scores(labeler: keras.Model, meta, val_dir: Path, batch_size: int) -> np.ndarray:
    """The val images' OOD score through the labeler itself (its flip TTA included): what the
    cut is calibrated on."""
    ds, _ = _labeled(val_dir, meta, batch_size)
    return np.asarray(labeler.predict(ds, verbose=0), np.float64)[:, -1]


# exclude=auto's lines, in multiples of false_rejection (the share of the labeled classes' own
# val images the cut flags), on the share of the folder the teacher flags (docs/messy.md):
AUTO_FACTOR = 2.0  # above: the folder holds what does not belong; leave out the far images
AUTO_ALL_FACTOR = 6.5  # above: much of it does not belong; leave out every flagged image


def auto_decides(flagged_share: float, false_rejection: float) -> bool | str:
    """exclude=auto's rule on the share of the folder the teacher flags: False (keep every
    image) up to AUTO_FACTOR * false_rejection, what a folder of only the labeled classes
    gives; "far" (leave out what lies past far times the cut) up to AUTO_ALL_FACTOR *
    false_rejection; True (leave out every flagged image) above. Measured by the teacher
    (docs/messy.md): clean and long-tailed pools 3.5-8.8 % flagged, junk pools 12.7-16.2 %,
    a quarter of other classes 19.6-29.5 % (with junk and a long tail: 20.8-29.5 %), half or
    more 36-46 %. The far cut beat leaving out every flagged image on every folder measured
    up to 29.5 %; leaving every flagged one out paid from 36 %."""
    if flagged_share > AUTO_ALL_FACTOR * false_rejection:
        return True
    if flagged_share > AUTO_FACTOR * false_rejection:
        return "far"
    return False


def decides(ood_cfg, predictions: pd.DataFrame) -> bool | str:
    """What merge and the consistency student leave out (pseudo_label.ood.exclude), given the
    teacher's labeling (round 1's CSV: the stages call it through `decides_in`): True (every
    flagged image), "far" (those past far times the cut), False (none); auto decides by
    `auto_decides` on the share the CSV flags (no score: nothing to decide on, False). Later
    rounds keep round 1's decision: their labelers (students) flag more of a clean pool
    (7-9 %), their cut being calibrated on val images they selected epochs on."""
    if ood_cfg.exclude != "auto":
        return ood_cfg.exclude
    if FLAG_COLUMN not in predictions or predictions.empty:
        return False
    return auto_decides(float(predictions[FLAG_COLUMN].mean()), ood_cfg.false_rejection)


def excludes(ood_cfg, predictions: pd.DataFrame) -> bool:
    """Whether every flagged image is left out (`decides` is True)."""
    return decides(ood_cfg, predictions) is True


def decides_in(ood_cfg, paths, predictions: pd.DataFrame) -> bool | str:
    """`decides` for the round of `paths` (pseudolabel.paths.Paths) whose CSV is
    `predictions`: round 1 decides on it, later rounds on round 1's CSV."""
    if ood_cfg.exclude != "auto" or paths.round_number == 1:
        return decides(ood_cfg, predictions)
    first = paths.first_round_csv
    if not first.is_file():
        raise PseudoLabelError(
            f"{first}: round 1's labeling is missing, and pseudo_label.ood.exclude=auto decides "
            "on it: run the pseudo_label stage first (dvc repro)."
        )
    return decides(ood_cfg, pd.read_csv(first, usecols=lambda c: c == FLAG_COLUMN))


REASONS = {
    FLAG_COLUMN: "out of distribution: ood_score above the cut (metrics/pseudo_label.json)",
    FAR_COLUMN: "far out of distribution: ood_score above pseudo_label.ood.far times the cut "
    "(metrics/pseudo_label.json)",
}
LEFT_OUT = {True: FLAG_COLUMN, "far": FAR_COLUMN, False: None}  # decides -> the column


def left_out(
    ood_cfg, predictions: pd.DataFrame, csv: Path, paths=None
) -> tuple[pd.DataFrame, pd.DataFrame | None, str | None]:
    """What merge and the consistency student learn from: (the kept rows, the rows left out or
    None, the column that decided or None), as `decides_in` (`decides` without `paths`) says:
    every flagged image (the ood column), those past far times the cut (ood_far), or none."""
    decided = (
        decides(ood_cfg, predictions) if paths is None else decides_in(ood_cfg, paths, predictions)
    )
    column = LEFT_OUT[decided]
    if column is None:
        return predictions, None, None
    kept, out = without_flagged(predictions, csv, column)
    return kept, out, column


def without_flagged(
    predictions: pd.DataFrame, csv: Path, column: str = FLAG_COLUMN
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The CSV's rows the OOD score did not flag, and the flagged ones (pseudo_label.ood.exclude:
    merge and the consistency student both leave them out); `column`: FLAG_COLUMN or
    FAR_COLUMN."""
    if column not in predictions:
        how = (
            "with pseudo_label.ood.enabled=true"
            if column == FLAG_COLUMN or FLAG_COLUMN not in predictions
            else "(a CSV scored before it had the ood_far column; dvc repro does)"
        )
        raise PseudoLabelError(
            f"{csv}: no {column} column, which pseudo_label.ood.exclude needs: re-run "
            f"the pseudo_label stage {how}."
        )
    flagged = predictions[column].to_numpy(bool)
    if flagged.all():
        raise PseudoLabelError(
            f"{csv}: every unlabeled image is flagged out of distribution; nothing to learn "
            "from (check the unlabeled folder, or set pseudo_label.ood.exclude=false)."
        )
    kept = predictions[~flagged].reset_index(drop=True)
    return kept, predictions[flagged].reset_index(drop=True)
