"""ingest: build the seed's folder layout from a built-in source."""

from __future__ import annotations

import logging
from typing import Any

from pseudolabel.data import ingest as ingest_lib
from pseudolabel.data import sources
from pseudolabel.paths import Paths
from pseudolabel.stages.common import write_json

log = logging.getLogger(__name__)


def ingest(cfg, paths: Paths = Paths()) -> dict[str, Any]:
    """Build data/image_dataset/{train,val,test}/<class>/ and data/unlabeled/ from a source."""
    data = cfg.data
    source = sources.load(data.source, data.idx_dir)
    split = ingest_lib.split_indices(
        source,
        data.train_per_class,
        data.val_per_class,
        data.test_per_class,
        data.unlabeled,
        cfg.seed,
    )
    counts = ingest_lib.write_layout(source, split, paths.labeled, paths.unlabeled)
    summary = {part: sum(per_class.values()) for part, per_class in counts.items()}
    write_json(paths.metrics / "ingest.json", {"images": summary, "per_class": counts})
    log.info("ingest: %s", summary)
    return summary
