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
        ylabel="unlabeled images",
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


def reliability_diagram(before: dict[str, np.ndarray], after: dict[str, np.ndarray]) -> Figure:
    """Accuracy against confidence per bin on val, raw and calibrated (from
    `calibration.reliability`); the diagonal is perfect calibration."""
    fig, axes = plt.subplots(1, 2, figsize=(9, 4), sharey=True)
    for ax, table, title in ((axes[0], before, "raw softmax"), (axes[1], after, "calibrated")):
        width = 1.0 / len(table["lower"])
        filled = table["count"] > 0
        ax.bar(
            table["lower"][filled],
            table["accuracy"][filled],
            width=width,
            align="edge",
            edgecolor="black",
            color="tab:blue",
            label="accuracy",
        )
        ax.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
        ax.plot(table["confidence"][filled], table["accuracy"][filled], "o", color="tab:red")
        ax.set(xlabel="confidence", xlim=(0, 1), ylim=(0, 1), title=title)
    axes[0].set_ylabel("val accuracy")
    axes[0].legend(loc="upper left")
    fig.suptitle("Reliability on the labeled val set")
    fig.tight_layout()
    return fig


def threshold_analysis(
    table: pd.DataFrame,
    class_names: list[str],
    threshold: float | None,
    recommended: float | None,
    target: float,
) -> Figure:
    """Coverage (overall and per class) and estimated precision against the threshold, with
    the configured and the recommended thresholds marked."""
    fig, ax = plt.subplots(figsize=(8, 5))
    x = table["threshold"]
    for name in class_names:
        ax.plot(x, table[f"coverage_{name}"], color="tab:blue", alpha=0.25, linewidth=0.8)
    ax.plot(x, table["coverage"], color="tab:blue", linewidth=2.2, label="coverage (unlabeled)")
    ax.plot([], [], color="tab:blue", alpha=0.35, linewidth=0.8, label="coverage per class")
    ax.plot(
        x, table["precision"], color="tab:green", linewidth=2.2, label="precision (val estimate)"
    )
    ax.axhline(target, color="tab:green", linestyle=":", linewidth=1, label=f"target {target:g}")
    if threshold is not None:
        ax.axvline(threshold, color="tab:red", linestyle="--", label=f"configured {threshold:g}")
    if recommended is not None:
        ax.axvline(
            recommended, color="tab:green", linestyle="--", label=f"recommended {recommended:g}"
        )
    ax.set(
        xlabel="confidence threshold",
        ylabel="share",
        xlim=(0, 1),
        ylim=(0, 1.02),
        title="Images kept vs. precision to expect",
    )
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    return fig


def _thumb(ax, image: np.ndarray | None, caption: str) -> None:
    ax.axis("off")
    if image is not None:
        ax.imshow(image, cmap="gray" if image.ndim == 2 else None, vmin=0, vmax=255)
        ax.set_title(caption, fontsize=7)


def qa_grid(
    name: str,
    accepted: list[tuple[np.ndarray, float]],
    rejected: list[tuple[np.ndarray, float]],
    columns: int,
    totals: tuple[int, int] | None = None,
) -> Figure:
    """Two rows for class `name`: the least confident accepted images (does rubbish get in?)
    and the most confident rejected ones (is good data left out?), with their confidences.
    `totals`: how many images of the class were accepted and rejected in all."""
    fig, axes = plt.subplots(2, columns, figsize=(1.2 * columns, 3.0), squeeze=False)
    for row, items in enumerate((accepted, rejected)):
        for col in range(columns):
            image, conf = items[col] if col < len(items) else (None, 0.0)
            _thumb(axes[row, col], image, f"{conf:.2f}")
    for row, label in enumerate(("accepted,\nleast sure", "rejected,\nmost sure")):
        axes[row, 0].text(-0.1, 0.5, label, transform=axes[row, 0].transAxes,
                          ha="right", va="center", fontsize=8)  # fmt: skip
    kept, left = totals or (len(accepted), len(rejected))
    fig.suptitle(f"{name}: {kept:,} accepted, {left:,} rejected", fontsize=9)
    return fig


def ood_overview(
    val_scores: np.ndarray,
    scores: np.ndarray,
    labels: pd.Series,
    cut: float,
    share: float,
    far_at: float | None = None,
) -> Figure:
    """The OOD score of the val images (labeled, in-distribution) against the unlabeled ones,
    with the cut (and the far cut, pseudo_label.ood.far), and the share of each predicted
    class's unlabeled images past the cut."""
    fig, (hist, bars) = plt.subplots(1, 2, figsize=(10, 3.4), width_ratios=[3, 2])
    both = np.concatenate([val_scores, scores])
    high = np.quantile(both, 0.995) if len(both) else 1.0
    bins = np.linspace(min(both.min(), 0.0), max(high, (far_at or cut) * 1.2), 60)
    for values, name in ((scores, "unlabeled"), (val_scores, "val, labeled")):
        clipped = np.clip(values, None, bins[-1])
        hist.hist(clipped, bins, density=True, alpha=0.6, label=f"{name} ({len(values):,})")
    flagged = float((scores > cut).mean()) if len(scores) else 0.0
    label = f"cut {cut:.2f}: flags {share:.0%} of val, {flagged:.1%} unlabeled"
    hist.axvline(cut, color="black", linestyle="--", label=label)
    if far_at is not None:
        past = float((scores > far_at).mean()) if len(scores) else 0.0
        label = f"far cut {far_at:.2f}: {past:.1%} unlabeled past it"
        hist.axvline(far_at, color="firebrick", linestyle=":", label=label)
    hist.set(xlabel="OOD score (higher: less like the labeled classes)", ylabel="density")
    hist.legend(fontsize=7)
    names = sorted(labels.unique())
    fractions = [float((scores[(labels == n).to_numpy()] > cut).mean()) for n in names]
    bars.barh(names, fractions)
    bars.set(xlabel="share flagged", title="by predicted class", xlim=(0, 1))
    bars.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    return fig


def image_grid(title: str, items: list[tuple[np.ndarray, str]], columns: int = 8) -> Figure:
    """Images with a caption each, `columns` to a row."""
    rows = max(1, math.ceil(len(items) / columns))
    fig, axes = plt.subplots(rows, columns, figsize=(1.2 * columns, 1.4 * rows), squeeze=False)
    for i, ax in enumerate(axes.flat):
        image, caption = items[i] if i < len(items) else (None, "")
        _thumb(ax, image, caption)
    fig.suptitle(title, fontsize=9)
    return fig


SWEEP_PANELS = {
    "student_accuracy": "student test accuracy",
    "gain": "gain over the teacher",
    "kept_fraction": "coverage (kept fraction)",
    "estimated_precision": "estimated precision (val)",
}


def sweep_summary(table: pd.DataFrame, swept: str) -> Figure:
    """One panel per summary metric (those present in `table`) against the swept value."""
    panels = [c for c in SWEEP_PANELS if c in table and table[c].notna().any()]
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(3.6 * max(1, len(panels)), 3.2))
    axes = np.atleast_1d(axes)
    numeric = pd.to_numeric(table[swept], errors="coerce")
    ordered = table.assign(_x=numeric).sort_values("_x" if numeric.notna().all() else swept)
    x = ordered["_x"] if numeric.notna().all() else np.arange(len(ordered))
    for ax, column in zip(axes, panels, strict=False):
        ax.plot(x, ordered[column], marker="o")
        if column == "student_accuracy" and "teacher_accuracy" in ordered:
            ax.axhline(ordered["teacher_accuracy"].mean(), color="grey", ls="--", label="teacher")
            ax.legend(fontsize=8)
        if column == "gain":
            ax.axhline(0.0, color="grey", lw=0.8)
        if not numeric.notna().all():
            ax.set_xticks(x, ordered[swept].astype(str), rotation=30)
        ax.set_title(SWEEP_PANELS[column], fontsize=10)
        ax.set_xlabel(swept)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig
