"""round: one later Noisy Student round (r >= 2), whose teacher is round r-1's student.

The same three stages as round 1 (pseudo_label -> merge -> train_student) on Paths.round(r):
everything it writes lives under rounds/round<r>/, which dvc.yaml's `round` stage declares as
its outputs. Its MLflow runs carry a `round` tag, and their `teacher_run_id` is round r-1's
student run, so the lineage walks back one round per hop (`pseudolabel lineage`).
"""

from __future__ import annotations

import logging
from typing import Any

from pseudolabel.errors import PseudoLabelError
from pseudolabel.paths import Paths
from pseudolabel.stages.label import pseudo_label
from pseudolabel.stages.merge import merge
from pseudolabel.stages.train import train_student

log = logging.getLogger(__name__)


def run_round(cfg, paths: Paths = Paths(), number: int = 2, truth=None) -> dict[str, Any]:
    """Round `number` (2..pseudo_label.rounds) of self-training; returns its student metrics.
    `truth` is train_student's (benchmarks: the online targets' precision)."""
    total = cfg.pseudo_label.rounds
    if not 2 <= number <= total:
        raise PseudoLabelError(
            f"round {number}: pseudo_label.rounds={total}, so rounds 2..{total} exist "
            "(round 1 is the pseudo_label, merge and train_student stages)."
        )
    here = paths.round(number)
    if not here.model("teacher").is_file():
        raise PseudoLabelError(
            f"round {number}: its teacher {here.model('teacher')} (round {number - 1}'s student) "
            "does not exist; run the earlier rounds first (dvc repro does)."
        )
    log.info("round %d of %d: teacher %s", number, total, here.model("teacher"))
    pseudo_label(cfg, here)
    merge(cfg, here)
    return train_student(cfg, here, truth=truth)


def later_rounds(cfg, paths: Paths = Paths()) -> list[dict[str, Any]]:
    """Rounds 2..N in order (for callers that run the stages themselves: sweeps, benchmarks)."""
    return [run_round(cfg, paths, r) for r in range(2, cfg.pseudo_label.rounds + 1)]
