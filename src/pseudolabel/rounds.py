"""Iterative rounds (Noisy Student): round r's teacher is round r-1's student.

Round 1 is the pipeline's own stages (pseudo_label, merge, train_student at the project root);
round r >= 2 lives under rounds/round<r>/ with the same layout (outputs/data.csv,
data/train_ssl, models/student.keras, metrics/, plots/). `pseudo_label.rounds: N` is the knob;
the OmegaConf resolvers below derive from it what dvc.yaml needs (its `foreach` list and the
final student), so that `dvc exp run -S pseudo_label.rounds=3` recomposes both.

Light on purpose (no TensorFlow): Hydra imports this through hydra_plugins/ whenever it starts,
DVC's `dvc exp run` included.
"""

from __future__ import annotations

from typing import Any

from omegaconf import OmegaConf

ROUNDS_DIR = "rounds"


def round_dir(round_: int) -> str:
    """The folder holding a round's outputs, relative to the project root ('.' for round 1)."""
    return "." if round_ == 1 else f"{ROUNDS_DIR}/round{round_}"


def student_model(round_: int) -> str:
    """Round r's student model, without the .keras / .json suffix."""
    return "models/student" if round_ == 1 else f"{round_dir(round_)}/models/student"


def foreach_items(rounds: int) -> dict[str, dict[str, Any]]:
    """dvc.yaml's `foreach` items: rounds 2..N, each with its folder and its teacher."""
    rounds = int(rounds)
    return {
        f"round{r}": {"round": r, "dir": round_dir(r), "teacher": student_model(r - 1)}
        for r in range(2, rounds + 1)
    }


def final_student(rounds: int) -> str:
    """The model `evaluate` scores and users deploy: the last round's student."""
    return student_model(max(1, int(rounds)))


def baseline(student, rounds: int) -> dict[str, Any]:
    """conf/config.yaml's `baseline` node: what train_baseline trains, derived from the student's
    node so that it follows every student.* setting. The same network, views, optimiser and
    steps per epoch; the epochs (and patience) of all `rounds` students in one schedule, so
    that it has the chain's compute; its own weight average (student.baseline.ema). The
    offline student's pseudo-label batches (labeled_fraction) and labeled fine-tuning have no
    meaning on labeled images alone: off. Its train.steps_per_epoch null means the student's:
    one pass over the unlabeled images, counted when it trains."""
    node = OmegaConf.to_container(student, resolve=True)
    train = node["train"]
    train["ema"] = node["baseline"]["ema"]
    train["epochs"] = train["epochs"] * int(rounds)
    train["patience"] = train["patience"] * int(rounds)
    if not node["consistency"]["enabled"]:
        train["labeled_fraction"] = None
        node["labeled_finetune_epochs"] = 0
    return node


def register() -> None:
    """Make ${pseudolabel.later_rounds:N}, ${pseudolabel.final_student:N} and
    ${pseudolabel.baseline:STUDENT,N} resolvable."""
    resolvers = {
        # A DictConfig, not a dict: OmegaConf.resolve (which DVC calls too) cannot store a dict.
        "later_rounds": lambda n: OmegaConf.create(foreach_items(n)),
        "final_student": final_student,
        "baseline": lambda student, n: OmegaConf.create(baseline(student, n)),
    }
    for name, fn in resolvers.items():
        if not OmegaConf.has_resolver(f"pseudolabel.{name}"):
            OmegaConf.register_new_resolver(f"pseudolabel.{name}", fn)
