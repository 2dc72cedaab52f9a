"""How well the teacher's labeling tells an unlabeled folder's class mix (pseudo_label's
`class_mix`, what student.consistency.alignment_target=pool aligns to).

Reads the teacher's labeling (round 1's outputs/data.csv) of pools that
benchmarks/messy_pools.py wrote and labeled, and their truth tables; no model runs. On the
pool's in-distribution images (their true classes known) it compares with their true mix:

- `em`: EM under label shift from the calibrated probabilities (calibration.label_shift_prior,
  what the pipeline reports and aligns to), from the labeled classes' balanced mix;
- `pcc`: the mean of the probabilities (probabilistic classify and count: pulled flat);
- `cc`: the share of each predicted class (classify and count).

With --stage FOLDER [--name NAME] instead: runs today's `pseudo_label` stage with a
teacher and labeled split benchmarks/ssl_gain.py or messy_pools.py wrote (FOLDER: models/,
data/), into FOLDER/class_mix/, and records the `class_mix` the stage reports (head-to-tail,
val_error, skewed: what alignment_target=auto reads) as a `reported` row: for pools without a
truth table, e.g. ssl_gain's clean pool (its recipe's overrides after `--`).

Each estimate's error is its total variation from the true mix (0-1: the share of the folder
it puts in the wrong class); `head_to_tail` its largest share over its smallest (the smallest
floored at one image), which the pipeline's log reads as skewed from 5 on.

    python benchmarks/class_mix.py --work /tmp/messy_pools_work --scenarios longtail-10 junk \\
        --seeds 0 1 2
    python benchmarks/class_mix.py --stage /tmp/ssl_gain_work/budget50_seed0 --name clean-10 \\
        -- seed=0 data.unlabeled=59300

(python: `PYTHONPATH=src .venv/bin/python`.) Rows are merged into
benchmarks/results/class_mix.json (a row with the same scenario and seed is replaced); a
scenario and seed without a labeled pool under --work is skipped with a line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import scenarios  # noqa: E402
from ssl_gain import code_version, machine, split_argv  # noqa: E402

from pseudolabel import calibration  # noqa: E402
from pseudolabel.atomic import write_text_atomic  # noqa: E402
from pseudolabel.config import compose_defaults  # noqa: E402
from pseudolabel.paths import Paths  # noqa: E402
from pseudolabel.predicting import probabilities, read_csv  # noqa: E402
from pseudolabel.stages import pseudo_label  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "class_mix.json"


def estimates(probs: np.ndarray) -> dict[str, np.ndarray]:
    """Each estimator's class mix from calibrated probabilities (a balanced labeled set)."""
    n = probs.shape[1]
    return {
        "em": calibration.label_shift_prior(probs, np.full(n, 1.0 / n)),
        "pcc": probs.mean(axis=0),
        "cc": np.bincount(probs.argmax(axis=1), minlength=n) / len(probs),
    }


def total_variation(a: np.ndarray, b: np.ndarray) -> float:
    return float(0.5 * np.abs(np.asarray(a) - np.asarray(b)).sum())


def head_to_tail(mix: np.ndarray, images: int) -> float:
    return float(mix.max() / max(mix.min(), 1.0 / max(images, 1)))


def row_of(shared: Path, scenario: str, seed: int) -> dict:
    """The row of one labeled pool (a messy_pools.py scenario folder)."""
    table = json.loads((shared / "data" / "unlabeled_truth.json").read_text())
    truth, names = scenarios.Truth(table), table["class_names"]
    frame = read_csv(shared / "outputs" / "data.csv")
    classes = np.array([truth.entry(p)[0] for p in frame["path"]])
    inside = classes >= 0
    probs = probabilities(frame, names)[inside]
    true = np.bincount(classes[inside], minlength=len(names)) / inside.sum()
    found = estimates(probs)
    done = shared / "shared_done.json"
    teacher = json.loads(done.read_text())["info"]["teacher"] if done.is_file() else None
    return {
        "scenario": scenario,
        "seed": seed,
        "images": int(inside.sum()),
        "teacher": teacher,
        "true": dict(zip(names, np.round(true, 4).tolist(), strict=True)),
        "true_head_to_tail": round(head_to_tail(true, int(inside.sum())), 2),
        "estimates": {
            name: {
                "mix": dict(zip(names, np.round(mix, 4).tolist(), strict=True)),
                "error": round(total_variation(mix, true), 4),
                "head_to_tail": round(head_to_tail(mix, int(inside.sum())), 2),
            }
            for name, mix in found.items()
        },
        "cpu": machine(),
        "code": code_version(("benchmarks/class_mix.py",)),
    }


def reported(folder: Path, name: str, overrides: list[str]) -> dict:
    """The `class_mix` today's pseudo_label stage reports with `folder`'s teacher and data."""
    scratch = folder / "class_mix"
    scratch.mkdir(exist_ok=True)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{scratch / 'mlflow.db'}"
    paths = Paths(scratch, data_root=folder, teacher_model=folder / "models" / "teacher.keras")
    mix = pseudo_label(compose_defaults(overrides), paths)["class_mix"]
    keys = ("head", "tail", "head_to_tail", "val_error", "skewed", "images")
    return {
        "name": name,
        "overrides": overrides,
        "class_mix": {k: mix[k] for k in keys},
        "cpu": machine(),
        "code": code_version(("benchmarks/class_mix.py",)),
    }


def main(argv: list[str] | None = None) -> int:
    argv, overrides = split_argv(argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, nargs="+", default=[Path("/tmp/messy_pools_work")])
    parser.add_argument("--scenarios", nargs="+")
    parser.add_argument("--stage", type=Path, help="a folder with models/teacher.keras and data/")
    parser.add_argument("--name", help="the --stage row's name (default: the folder's)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    payload = json.loads(args.out.read_text()) if args.out.is_file() else {"rows": []}
    if args.stage is not None:
        if not (args.stage / "models" / "teacher.keras").is_file():
            print(f"{args.stage}: no models/teacher.keras", file=sys.stderr)
            return 2
        row = reported(args.stage, args.name or args.stage.name, overrides)
        print(json.dumps(row["class_mix"]), flush=True)
        rows = [r for r in payload.get("reported", []) if r["name"] != row["name"]]
        payload["reported"] = sorted([*rows, row], key=lambda r: r["name"])
        write_text_atomic(args.out, json.dumps(payload, indent=1) + "\n")
        return 0
    if not args.scenarios:
        parser.error("--scenarios (or --stage)")
    rows = []
    for scenario in args.scenarios:
        for seed in args.seeds:
            folders = [w / f"{scenario}_seed{seed}_pooldefault" for w in args.work]
            shared = next((f for f in folders if (f / "outputs" / "data.csv").is_file()), None)
            if shared is None:
                print(f"{scenario}, seed {seed}: no labeled pool under --work; skipped")
                continue
            row = row_of(shared, scenario, seed)
            rows.append(row)
            errors = ", ".join(f"{k} {v['error']:.3f}" for k, v in row["estimates"].items())
            print(f"{scenario}, seed {seed}: error (total variation) {errors}", flush=True)
    if not rows:
        print("no labeled pool found", file=sys.stderr)
        return 2
    new = {(r["scenario"], r["seed"]) for r in rows}
    payload["rows"] = [r for r in payload["rows"] if (r["scenario"], r["seed"]) not in new] + rows
    payload["rows"].sort(key=lambda r: (r["scenario"], r["seed"]))
    write_text_atomic(args.out, json.dumps(payload, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
