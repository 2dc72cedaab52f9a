"""Temperature scaling: one scalar T, fitted on the labeled val set, so confidences mean what
they say.

The teacher outputs probabilities, so its logits are recovered as log-probabilities (softmax is
invariant to the constant that drops out); `softmax(log p / T)` is then the calibrated output.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize_scalar

log = logging.getLogger(__name__)

ECE_BINS = 15
_EPS = 1e-12


def apply_temperature(probs: np.ndarray, temperature: float) -> np.ndarray:
    """Probabilities rescaled by `temperature` (1 leaves them unchanged)."""
    logits = np.log(np.clip(np.asarray(probs, dtype=np.float64), _EPS, 1.0)) / temperature
    logits -= logits.max(axis=1, keepdims=True)
    scaled = np.exp(logits)
    return scaled / scaled.sum(axis=1, keepdims=True)


def nll(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean negative log-likelihood of the true labels."""
    picked = probs[np.arange(len(labels)), labels]
    return float(-np.log(np.clip(picked, _EPS, 1.0)).mean())


def ece(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> float:
    """Expected calibration error: |accuracy - confidence| per confidence bin, weighted by size."""
    table = reliability(probs, labels, bins)
    return float(
        (table["count"] * np.abs(table["accuracy"] - table["confidence"])).sum()
        / max(1, len(labels))
    )


def reliability(
    probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS
) -> dict[str, np.ndarray]:
    """Per equal-width confidence bin: image count, mean confidence, accuracy (0 where empty)."""
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    which = np.minimum((confidence * bins).astype(int), bins - 1)
    count = np.bincount(which, minlength=bins).astype(float)
    safe = np.maximum(count, 1)
    return {
        "lower": np.arange(bins) / bins,
        "count": count,
        "confidence": np.bincount(which, confidence, minlength=bins) / safe,
        "accuracy": np.bincount(which, correct.astype(float), minlength=bins) / safe,
    }


@dataclass
class Calibration:
    """The fitted temperature and what it did on the val set."""

    temperature: float = 1.0
    nll_before: float | None = None
    nll_after: float | None = None
    ece_before: float | None = None
    ece_after: float | None = None

    def metrics(self) -> dict[str, float | None]:
        return {k: (None if v is None else round(float(v), 6)) for k, v in vars(self).items()}


def measure(probs: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> Calibration:
    """NLL and ECE on (`probs`, `labels`) before and after scaling by `temperature`."""
    labels = np.asarray(labels, dtype=np.int64)
    calibrated = apply_temperature(probs, temperature)
    return Calibration(
        temperature,
        nll(probs, labels),
        nll(calibrated, labels),
        ece(probs, labels),
        ece(calibrated, labels),
    )


def fit_temperature(probs: np.ndarray, labels: np.ndarray) -> Calibration:
    """The temperature in [0.05, 20] minimising val NLL; 1 unless it lowers the NLL."""
    labels = np.asarray(labels, dtype=np.int64)
    before = nll(probs, labels)
    result = minimize_scalar(
        lambda log_t: nll(apply_temperature(probs, float(np.exp(log_t))), labels),
        bounds=(np.log(0.05), np.log(20.0)),
        method="bounded",
    )
    fitted = measure(probs, labels, float(np.exp(result.x)) if result.fun < before else 1.0)
    log.info(
        "calibration: T=%.3f, val NLL %.4f -> %.4f, ECE %.4f -> %.4f",
        fitted.temperature,
        fitted.nll_before,
        fitted.nll_after,
        fitted.ece_before,
        fitted.ece_after,
    )
    return fitted


def alignment_weights(
    probs: np.ndarray, prior: np.ndarray, iterations: int = 100, tol: float = 1e-8
) -> np.ndarray:
    """Per-class weights w that make the mean of `align(probs, w)` equal `prior`: distribution
    alignment (ReMixMatch), iterated to its fixed point (iterative proportional fitting).

    A teacher that over-predicts some classes on the unlabeled images (a label-shift guess
    from a few labels) has those classes' probabilities scaled down and the rest scaled up, so
    the pseudo-labels follow the class distribution of the labeled data."""
    probs = np.clip(np.asarray(probs, dtype=np.float64), _EPS, 1.0)
    prior = np.asarray(prior, dtype=np.float64)
    prior = prior / prior.sum()
    weights = np.ones(probs.shape[1])
    for _ in range(iterations):
        marginal = align(probs, weights).mean(axis=0)
        step = prior / np.maximum(marginal, _EPS)
        weights *= step
        weights /= weights.mean()
        if np.abs(step - 1.0).max() < tol:
            break
    return weights


def label_shift_prior(
    probs: np.ndarray, source_prior: np.ndarray, iterations: int = 1000, tol: float = 1e-8
) -> np.ndarray:
    """The class distribution of the images `probs` were predicted on, estimated by maximum
    likelihood under label shift (EM: Saerens, Latinne and Decaestecker 2002; with calibrated
    probabilities it is hard to beat, Alexandari et al. 2020): q <- the mean of the
    predictions reweighted by q / source_prior, renormalised, to its fixed point.
    `source_prior`: the class mix the model learnt from (its labeled images). A folder with
    the labeled classes' mix gives about `source_prior` back; a skewed folder its skew."""
    probs = np.clip(np.asarray(probs, dtype=np.float64), _EPS, 1.0)
    source = np.asarray(source_prior, dtype=np.float64)
    source = source / source.sum()
    prior = source.copy()
    for _ in range(iterations):
        new = align(probs, prior / source).mean(axis=0)
        new = new / new.sum()
        done = np.abs(new - prior).max() < tol
        prior = new
        if done:
            break
    return prior


def align(probs: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """`probs` reweighted per class by `weights` and renormalised (1s leave them unchanged)."""
    scaled = np.asarray(probs, dtype=np.float64) * np.asarray(weights, dtype=np.float64)
    return scaled / np.maximum(scaled.sum(axis=1, keepdims=True), _EPS)
