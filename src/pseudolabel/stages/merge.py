"""merge: copies of the labelled images plus the selected pseudo-labelled ones."""

from __future__ import annotations

import logging
from typing import Any

from pseudolabel import labeling, merging, plots
from pseudolabel.errors import PseudoLabelError
from pseudolabel.models import io as model_io
from pseudolabel.paths import Paths
from pseudolabel.stages.common import write_json

log = logging.getLogger(__name__)


def merge(cfg, paths: Paths = Paths()) -> dict[str, Any]:
    """data/train_ssl/<class>/: copies of the labelled images plus the confident pseudo-labels."""
    threshold = cfg.pseudo_label.threshold
    meta = model_io.read_meta(paths.model("teacher"))
    if meta is None:
        raise PseudoLabelError(
            f"{paths.model('teacher')}: teacher metadata missing; run train_teacher."
        )
    if not paths.csv.is_file():
        raise PseudoLabelError(
            f"{paths.csv}: pseudo-label CSV not found; run the pseudo_label stage."
        )
    predictions = labeling.read_csv(paths.csv)
    accepted = merging.select(predictions, threshold)
    counts = merging.build_merged(
        paths.train, paths.unlabeled, accepted, paths.merged, meta.class_names
    )
    for name, fig in {
        "confidence.png": plots.confidence_overview(predictions, threshold),
        "confidence_per_class.png": plots.confidence_per_class(
            predictions, meta.class_names, threshold
        ),
    }.items():
        plots.save(fig, paths.outputs / "selection" / name)
    metrics = {
        "threshold": threshold,
        "pseudo_labeled": len(accepted),
        "kept_fraction": round(len(accepted) / max(1, len(predictions)), 6),
        "labeled": sum(c["labeled"] for c in counts.values()),
        "per_class": counts,
    }
    write_json(paths.metrics / "merge.json", metrics)
    log.info(
        "merge: kept %d of %d pseudo-labels at threshold %s",
        len(accepted),
        len(predictions),
        threshold,
    )
    return metrics
