"""The pipeline's stages: one module each, configured by a validated config, I/O at the edges.

dvc.yaml calls them through the CLI (`pseudolabel <stage>`), which imports only the module of
the stage it runs, so a stage's code is what its dvc.yaml `deps` list (tests/test_stage_deps.py
checks). That is why this package imports nothing up front: `STAGES` and the stage functions
are loaded on first use (PEP 562), for the sweep and the benchmarks that run every stage.

The functions named like their module (`ingest`, `merge`, `evaluate`) are imported from it:
`from pseudolabel.stages.merge import merge`.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "STAGES",
    "later_rounds",
    "pseudo_label",
    "run_round",
    "train_student",
    "train_teacher",
]


def __getattr__(name: str) -> Any:
    if name == "STAGES":
        from pseudolabel.stages.evaluate import evaluate
        from pseudolabel.stages.ingest import ingest
        from pseudolabel.stages.label import pseudo_label
        from pseudolabel.stages.merge import merge
        from pseudolabel.stages.train import train_student, train_teacher

        stages = globals()["STAGES"] = {  # cached: one dict, like a module-level constant
            "ingest": ingest,
            "train_teacher": train_teacher,
            "pseudo_label": pseudo_label,
            "merge": merge,
            "train_student": train_student,
            "evaluate": evaluate,
        }
        return stages
    if name == "pseudo_label":
        from pseudolabel.stages.label import pseudo_label

        return pseudo_label
    if name in ("train_teacher", "train_student"):
        from pseudolabel.stages import train

        return getattr(train, name)
    if name in ("later_rounds", "run_round"):
        from pseudolabel.stages import rounds

        return getattr(rounds, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
