"""ingest: build the seed's folder layout from a built-in source or from the user's folders."""

from __future__ import annotations

import logging
from typing import Any

import mlflow

from pseudolabel import tracking
from pseudolabel.data import decoded, folder, layout, sources
from pseudolabel.data.validate import REASONS
from pseudolabel.paths import Paths
from pseudolabel.stages.common import publish_metrics

log = logging.getLogger(__name__)


def ingest(cfg, paths: Paths = Paths()) -> dict[str, Any]:
    """Build data/image_dataset/{train,val,test}/<class>/ and data/unlabeled/ from a source."""
    if cfg.data.source == "folder":
        return _ingest_folder(cfg, paths)
    data = cfg.data
    source = sources.load(data.source, data.idx_dir)
    split = layout.split_indices(
        source,
        data.train_per_class,
        data.val_per_class,
        data.test_per_class,
        data.unlabeled,
        cfg.seed,
    )
    counts = layout.write_layout(source, split, paths.labeled, paths.unlabeled)
    folder.Report(paths.ingest_report).close()  # generated images: nothing to report
    decode_once(cfg, paths)
    summary = {part: sum(per_class.values()) for part, per_class in counts.items()}
    metrics = {"images": summary, "per_class": counts}
    publish_metrics(paths.metrics / "ingest.json", metrics, logged={})  # no MLflow run here
    log.info("ingest: %s", summary)
    return summary


def _ingest_folder(cfg, paths: Paths) -> dict[str, Any]:
    """Check the user's folders, write the view and the report; counts to metrics and MLflow."""
    data = cfg.data
    params = {
        f"data.{k}": data[k]
        for k in ("source", "labeled_root", "unlabeled_root", "link", "min_size")
    }
    params.update({"data.near_duplicates": data.near_duplicates, "seed": cfg.seed})
    with tracking.start_run(cfg, "ingest", params):
        try:
            outcome = folder.ingest_folder(
                data,
                cfg.seed,
                paths.labeled,
                paths.unlabeled,
                paths.ingest_report,
                paths.ingest_cache,
            )
        finally:
            if paths.ingest_report.is_file():
                mlflow.log_artifact(str(paths.ingest_report))
        decode_once(cfg, paths)
        summary = {
            **{part: sum(pc.values()) for part, pc in outcome.per_class.items()},
            "unlabeled": outcome.unlabeled,
        }
        reported = {reason: outcome.reasons.get(reason, 0) for reason in REASONS}
        metrics = {
            "images": summary,
            "per_class": outcome.per_class,
            "reported": reported,
            "converted_to_png": outcome.converted,
        }
        publish_metrics(paths.metrics / "ingest.json", metrics, exclude=("per_class",))
    log.info("ingest: %s; reported %s", summary, {k: v for k, v in reported.items() if v})
    return summary


def decode_once(cfg, paths: Paths) -> None:
    """The decoded copy of each folder ingest wrote (data.decoded): later stages read pixels
    from it instead of decoding every file again in every stage and epoch."""
    if not cfg.data.decoded_copy:
        return
    for part in (paths.train, paths.val, paths.test, paths.unlabeled):
        if part.is_dir():
            count = decoded.build(part, cfg.data.image_size, cfg.data.channels)
            log.info("ingest: %d images of %s decoded once into %s/", count, part, decoded.DIRNAME)
