"""Does the pseudo-label student beat both its teacher and a supervised-only student?

For each label budget and seed, on Fashion-MNIST (Debian's IDX files), through the pipeline's own
stage functions:

- teacher: `train_teacher` on the labelled images;
- pseudo-label student: `pseudo_label` -> `merge` -> `train_student`, then rounds 2..N
  (`pseudo_label.rounds`, the `round` stage) each relabelling with the previous student;
- supervised-only student: the same student architecture, noise, optimiser steps and epochs,
  trained on the labelled images alone (what tells whether the pseudo-labels, not the bigger
  model, made the gain);
- gain = student (last round) - max(teacher, supervised-only student);
- precision of the kept pseudo-labels against the true Fashion-MNIST labels, count kept (last
  round; every round's in the JSON), time;
- with --full-reference EPOCHS: the teacher's architecture and recipe trained on (nearly) all
  60,000 labelled training images, and the share of the teacher -> all-labels gap the student
  closes (the issue's stretch target: half).

    python benchmarks/ssl_gain.py --budgets 50 --seeds 0            # one seed: ~18 min, 2 cores
    python benchmarks/ssl_gain.py --budgets 10 50 --seeds 0 1 2     # the full table
    python benchmarks/ssl_gain.py --budgets 50 --seeds 0 -- pseudo_label.selection=topk
    python benchmarks/ssl_gain.py --budgets --seeds 0 --full-reference 10  # all labels only

Extra arguments after `--` are Hydra overrides applied to every run. Prints a markdown table
(mean ± std over seeds) and writes every row and the table to benchmarks/results/ssl_gain.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from pseudolabel import stages  # noqa: E402
from pseudolabel.config import compose, to_dict, validate  # noqa: E402
from pseudolabel.data import sources  # noqa: E402
from pseudolabel.data.images import list_images  # noqa: E402
from pseudolabel.evaluation import evaluate  # noqa: E402
from pseudolabel.models import io as model_io  # noqa: E402
from pseudolabel.paths import Paths  # noqa: E402
from pseudolabel.stages.train import _train  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
INDEX = re.compile(r"train_(\d+)(?:-\d+)?\.png$")  # -N: a duplicated copy (topk)


def pseudo_label_precision(paths: Paths, truth: np.ndarray, class_names: list[str]) -> float:
    """Share of the kept pseudo-labels that equal the true label (from the source's index);
    `class_names` in the source's label order (not the sorted folder order)."""
    from pseudolabel import merging

    manifest = merging.read_manifest(paths.merged)
    pseudo = manifest[manifest["source"] == "pseudo"]
    if pseudo.empty:
        return float("nan")
    index = pseudo["file"].map(lambda f: int(INDEX.search(f).group(1)))
    true = [class_names[i] for i in truth[index.to_numpy()]]
    return float((pseudo["label"].to_numpy() == np.asarray(true)).mean())


def supervised_only(cfg, paths: Paths, student_steps: int, student_epochs: int) -> float:
    """The student's recipe on the labelled images alone: same architecture, noise, start
    (from scratch, or from the teacher with student.init_from_teacher), optimiser steps, epochs
    and patience (so the cosine schedule is the same and val picks the best of as many
    checkpoints): the labelled images repeat within each epoch (`train.steps_per_epoch`)."""
    raw = to_dict(cfg)
    raw["student"]["train"].update(
        epochs=student_epochs,
        steps_per_epoch=math.ceil(student_steps / student_epochs),
        patience=min(cfg.student.train.patience, student_epochs),
        labeled_fraction=None,
    )
    raw["student"].update(labeled_finetune_epochs=0)  # it trains on nothing else
    sup_cfg = validate(raw)
    sup_paths = Paths(
        paths.root / "supervised", data_root=paths.root, teacher_model=paths.model("teacher")
    )
    _train(sup_cfg, "student", paths.train, sup_paths, tags={"baseline": "supervised_only"})
    model, meta = model_io.load(sup_paths.model("student"))
    return evaluate(model, meta, paths.test).accuracy


def student_steps(cfg, paths: Paths) -> tuple[int, int]:
    """Optimiser steps and epochs the pseudo-label student took: one round's, or every round's
    when each round starts from the previous student (student.init_from_teacher)."""
    batch = cfg.student.train.batch_size
    finetune = cfg.student.labeled_finetune_epochs
    n_labelled = len(list_images(paths.train))
    steps, epochs = [], []
    for r in range(1, cfg.pseudo_label.rounds + 1):
        here = paths.round(r)
        epochs.append(len(pd.read_csv(here.plots / "train" / "student.csv")))
        merged = json.loads((here.metrics / "merge.json").read_text())
        n_merged = merged["labeled"] + merged["pseudo_labeled"]
        per_epoch = cfg.student.train.steps_per_epoch or math.ceil(n_merged / batch)
        steps.append((epochs[-1] - finetune) * per_epoch + finetune * math.ceil(n_labelled / batch))
    if cfg.student.init_from_teacher:
        return sum(steps), sum(epochs)
    return steps[0], epochs[0]


def run_one(budget: int, seed: int, overrides: list[str], work: Path) -> dict:
    root = work / f"budget{budget}_seed{seed}"
    root.mkdir(parents=True, exist_ok=True)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
    cfg = compose([f"data.train_per_class={budget}", f"seed={seed}", *overrides])
    paths = Paths(root)
    # A finished pseudo-label part with the same config is reused (a run stopped in the
    # supervised-only part continues there); its time is the one measured then.
    done = root / "ssl_done.json"
    config = json.dumps(to_dict(cfg), sort_keys=True)
    previous = json.loads(done.read_text()) if done.is_file() else {}
    if previous.get("config") == config:
        ssl_seconds = previous["seconds"]
        print(f"[budget {budget}, seed {seed}] pseudo-label part reused from {root}", flush=True)
    else:
        start = time.perf_counter()
        for name in ("ingest", "train_teacher", "pseudo_label", "merge", "train_student"):
            print(f"[budget {budget}, seed {seed}] {name}", flush=True)
            stages.STAGES[name](cfg, paths)
        for number in range(2, cfg.pseudo_label.rounds + 1):
            print(f"[budget {budget}, seed {seed}] round {number}", flush=True)
            stages.run_round(cfg, paths, number)
        stages.STAGES["evaluate"](cfg, paths)
        ssl_seconds = time.perf_counter() - start
        done.write_text(json.dumps({"config": config, "seconds": ssl_seconds}))
    evaluation = json.loads((paths.metrics / "evaluation.json").read_text())
    print(f"[budget {budget}, seed {seed}] supervised-only student", flush=True)
    start = time.perf_counter()
    supervised = supervised_only(cfg, paths, *student_steps(cfg, paths))
    sup_seconds = time.perf_counter() - start
    source = sources.fashion_mnist(cfg.data.idx_dir)
    rounds = range(1, cfg.pseudo_label.rounds + 1)
    precision = {
        r: pseudo_label_precision(paths.round(r), source.train_labels, list(source.class_names))
        for r in rounds
    }
    kept = {
        r: json.loads((paths.round(r).metrics / "merge.json").read_text())["pseudo_labeled"]
        for r in rounds
    }
    per_round = evaluation.get("round_accuracy", {"round1": evaluation["student_accuracy"]})
    teacher, student = evaluation["teacher_accuracy"], evaluation["student_accuracy"]
    last = cfg.pseudo_label.rounds
    return {
        "budget": budget,
        "seed": seed,
        "overrides": overrides,
        "teacher": teacher,
        "supervised_only": supervised,
        "student": student,
        "gain": student - max(teacher, supervised),
        "gain_vs_teacher": student - teacher,
        "student_per_round": per_round,
        "pseudo_labeled": kept[last],
        "pseudo_label_precision": precision[last],
        "pseudo_labeled_per_round": kept,
        "pseudo_label_precision_per_round": precision,
        "ssl_seconds": round(ssl_seconds, 1),
        "supervised_seconds": round(sup_seconds, 1),
    }


def full_reference(epochs: int, seed: int, overrides: list[str], work: Path) -> dict:
    """The teacher's architecture and noise trained on every labelled Fashion-MNIST training
    image (5,970 per class; 20 per class stay for val, a few must remain unlabelled for the
    split) for `epochs` epochs at batch 128: the "all labels" accuracy of the stretch target."""
    root = work / f"full_reference_seed{seed}"
    root.mkdir(parents=True, exist_ok=True)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
    cfg = compose(
        [
            "data.train_per_class=5970",
            "data.unlabeled=10",
            f"seed={seed}",
            *overrides,
            f"teacher.train.epochs={epochs}",
            f"teacher.train.patience={epochs}",
            "teacher.train.batch_size=128",
        ]
    )
    paths = Paths(root)
    start = time.perf_counter()
    for name in ("ingest", "train_teacher"):
        print(f"[all labels, seed {seed}] {name}", flush=True)
        stages.STAGES[name](cfg, paths)
    model, meta = model_io.load(paths.model("teacher"))
    accuracy = evaluate(model, meta, paths.test).accuracy
    labelled = len(list_images(paths.train))
    seconds = round(time.perf_counter() - start, 1)
    return {"seed": seed, "epochs": epochs, "labelled": labelled, "accuracy": accuracy,
            "seconds": seconds}  # fmt: skip


def gap_closed(rows: list[dict], reference: float) -> dict:
    """Per budget: mean teacher and student, and the share of the teacher -> all-labels gap
    the student closes (1 = as good as all labels)."""
    out = {}
    for budget, group in pd.DataFrame(rows).groupby("budget"):
        teacher, student = float(group["teacher"].mean()), float(group["student"].mean())
        out[int(budget)] = {
            "teacher": round(teacher, 4),
            "student": round(student, 4),
            "all_labels": round(reference, 4),
            "half_gap_target": round(teacher + (reference - teacher) / 2, 4),
            "gap_closed": round((student - teacher) / (reference - teacher), 3),
        }
    return out


def table(rows: list[dict]) -> str:
    frame = pd.DataFrame(rows)
    rounds = max(len(r["student_per_round"]) for r in rows)
    for r in range(1, rounds):  # the student after each round but the last (= "student")
        frame[f"round {r}"] = [row["student_per_round"].get(f"round{r}") for row in rows]
    frame["seconds"] = frame["ssl_seconds"] + frame["supervised_seconds"]
    accuracies = ["teacher", "supervised_only", *(f"round {r}" for r in range(1, rounds))]
    accuracies += ["student", "gain"]
    cols = [*accuracies, "pseudo_label_precision", "pseudo_labeled", "seconds"]
    lines = ["| labels/class | seeds | " + " | ".join(cols) + " |",
             "|---" * (len(cols) + 2) + "|"]  # fmt: skip
    for budget, group in frame.groupby("budget"):
        cells = []
        for col in cols:
            values = group[col].astype(float)
            scale = 100 if col in accuracies else 1
            std = values.std(ddof=1) * scale if len(values) > 1 else float("nan")
            mean = values.mean() * scale
            digits = 0 if col in ("pseudo_labeled", "seconds") else 2 if scale == 100 else 3
            cells.append(f"{mean:.{digits}f}" + ("" if math.isnan(std) else f" ± {std:.{digits}f}"))
        lines.append(f"| {budget} | {len(group)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budgets", type=int, nargs="*", default=[10, 50])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--work", type=Path, default=RESULTS / "ssl_gain_work")
    parser.add_argument("--out", type=Path, default=RESULTS / "ssl_gain.json")
    parser.add_argument(
        "--full-reference",
        type=int,
        default=0,
        metavar="EPOCHS",
        help="also train the teacher's recipe on all labels for EPOCHS epochs (first seed)",
    )
    args = parser.parse_args(argv)
    rows: list[dict] = []
    payload: dict = {"command": sys.argv, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:  # after every seed: a long run stopped early keeps what it measured
        if rows:
            payload["table"] = table(rows)
        if "full_reference" in payload and rows:
            payload["gap"] = gap_closed(rows, payload["full_reference"]["accuracy"])
        args.out.write_text(json.dumps(payload, indent=2) + "\n")

    if args.full_reference:
        payload["full_reference"] = full_reference(
            args.full_reference, args.seeds[0], overrides, args.work
        )
        print(json.dumps(payload["full_reference"]), flush=True)
        save()
    for budget in args.budgets:
        for seed in args.seeds:
            rows.append(run_one(budget, seed, overrides, args.work))
            print(json.dumps(rows[-1]), flush=True)
            save()
    if rows:
        print("\naccuracies and gain in points (mean ± std over seeds)\n" + table(rows))
    if "gap" in payload:
        print("\nshare of the teacher -> all-labels gap closed\n" + json.dumps(payload["gap"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
