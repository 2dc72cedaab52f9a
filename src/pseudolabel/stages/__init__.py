"""The pipeline's stages: one function each, configured by a validated config, I/O at the edges.

dvc.yaml calls them through the CLI (`pseudolabel <stage>`); the sweep and the benchmarks call
them directly. Each checks its inputs before it writes anything.
"""

from pseudolabel.stages.evaluate import evaluate
from pseudolabel.stages.ingest import ingest
from pseudolabel.stages.label import pseudo_label
from pseudolabel.stages.merge import merge
from pseudolabel.stages.rounds import later_rounds, run_round
from pseudolabel.stages.train import train_baseline, train_student, train_teacher

STAGES = {
    "ingest": ingest,
    "train_teacher": train_teacher,
    "train_baseline": train_baseline,
    "pseudo_label": pseudo_label,
    "merge": merge,
    "train_student": train_student,
    "evaluate": evaluate,
}

__all__ = [
    "STAGES",
    "evaluate",
    "ingest",
    "later_rounds",
    "run_round",
    "merge",
    "pseudo_label",
    "train_baseline",
    "train_student",
    "train_teacher",
]
