"""Every figure the tool makes (matplotlib only, no display needed)."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402


def save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def confidence_overview(predictions: pd.DataFrame, threshold: float | None = None) -> Figure:
    """Histogram of top-1 confidences and the seed's sorted-confidence chart."""
    conf = predictions["confidence"].to_numpy()
    fig, (hist, ranked) = plt.subplots(1, 2, figsize=(11, 4))
    hist.hist(conf, bins=40, range=(0, 1), color="tab:blue")
    hist.set(
        xlabel="top-1 confidence",
        ylabel="unlabelled images",
        title=f"Confidence of {len(conf):,} pseudo-labels",
    )
    ranked.plot(np.sort(conf)[::-1], color="tab:blue")
    ranked.set(
        xlabel="images, most confident first",
        ylabel="top-1 confidence",
        ylim=(0, 1.02),
        title="Sorted confidences",
    )
    if threshold is not None:
        kept = int((conf >= threshold).sum())
        for ax in (hist, ranked):
            line = ax.axvline if ax is hist else ax.axhline
            line(
                threshold,
                color="tab:red",
                linestyle="--",
                label=f"threshold {threshold:g}: {kept:,} kept ({kept / max(1, len(conf)):.0%})",
            )
        ranked.legend(loc="lower left")
    fig.tight_layout()
    return fig


def confidence_per_class(
    predictions: pd.DataFrame, class_names: list[str], threshold: float | None = None
) -> Figure:
    """Small multiples: confidences of the images predicted as each class."""
    cols = min(5, len(class_names))
    rows = math.ceil(len(class_names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 2.4 * rows), sharex=True, squeeze=False)
    for ax, name in zip(axes.flat, class_names, strict=False):
        conf = predictions.loc[predictions["label"] == name, "confidence"]
        ax.hist(conf, bins=20, range=(0, 1), color="tab:blue")
        kept = f", {int((conf >= threshold).sum())} kept" if threshold is not None else ""
        ax.set_title(f"{name} ({len(conf)}{kept})", fontsize=9)
        if threshold is not None:
            ax.axvline(threshold, color="tab:red", linestyle="--")
    for ax in list(axes.flat)[len(class_names) :]:
        ax.axis("off")
    fig.supxlabel("top-1 confidence")
    fig.suptitle("Confidence per predicted class")
    fig.tight_layout()
    return fig


def training_curves(history: pd.DataFrame, title: str) -> Figure:
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for ax, metric in zip(axes, ("loss", "accuracy"), strict=True):
        for split, style in (("", "-"), ("val_", "--")):
            if split + metric in history:
                ax.plot(
                    history["epoch"] + 1,
                    history[split + metric],
                    style,
                    label=(split or "train_") + metric,
                )
        ax.set(xlabel="epoch", title=metric)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def confusion(matrix: np.ndarray, class_names: list[str], title: str) -> Figure:
    fig, ax = plt.subplots(figsize=(0.6 * len(class_names) + 3, 0.6 * len(class_names) + 2.5))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(class_names)), class_names, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(class_names)), class_names, fontsize=8)
    peak = matrix.max() or 1
    for (i, j), value in np.ndenumerate(matrix):
        ax.text(
            j,
            i,
            str(value),
            ha="center",
            va="center",
            fontsize=7,
            color="white" if value > peak / 2 else "black",
        )
    ax.set(xlabel="predicted", ylabel="actual", title=title)
    fig.tight_layout()
    return fig
