"""The pipeline's stages: one module each, configured by a validated config, I/O at the edges.

dvc.yaml calls them through the CLI (`pseudolabel <stage>`), which imports only the module of
the stage it runs, so a stage's code is what its dvc.yaml `deps` list (tests/test_stage_deps.py
checks). That is why this package imports nothing up front: `STAGES` and the stage functions
are loaded on first use (PEP 562), for the sweep and the benchmarks that run every stage.

The functions named like their module (`ingest`, `merge`, `evaluate`) are imported from it:
`from pseudolabel.stages.merge import merge`.
"""

from __future__ import annotations

import importlib
from typing import Any

# Each pipeline command's module and function, in pipeline order: the one list of the stages.
# The CLI imports only the module of the stage it runs (tests/test_stage_deps.py derives each
# stage's imports from this table and checks them against dvc.yaml's deps).
ENTRIES = {
    "ingest": ("pseudolabel.stages.ingest", "ingest"),
    "train_teacher": ("pseudolabel.stages.train", "train_teacher"),
    "train_baseline": ("pseudolabel.stages.train", "train_baseline"),
    "pseudo_label": ("pseudolabel.stages.label", "pseudo_label"),
    "merge": ("pseudolabel.stages.merge", "merge"),
    "train_student": ("pseudolabel.stages.train", "train_student"),
    "evaluate": ("pseudolabel.stages.evaluate", "evaluate"),
    "round": ("pseudolabel.stages.rounds", "run_round"),
}

__all__ = [
    "STAGES",
    "later_rounds",
    "pseudo_label",
    "run_round",
    "train_baseline",
    "train_student",
    "train_teacher",
]


def entry(name: str):
    """The function of pipeline command `name` (a key of ENTRIES), its module imported now."""
    module, function = ENTRIES[name]
    return getattr(importlib.import_module(module), function)


def __getattr__(name: str) -> Any:
    if name == "STAGES":  # every stage but the per-round one, in order; cached
        stages = {key: entry(key) for key in ENTRIES if key != "round"}
        globals()["STAGES"] = stages
        return stages
    if name == "later_rounds":
        return importlib.import_module("pseudolabel.stages.rounds").later_rounds
    for key, (module, function) in ENTRIES.items():
        # ingest, merge and evaluate are also module names: those import as the modules.
        if function == name and not module.endswith(f".{name}"):
            return entry(key)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
