"""How well the teacher's labeling tells an unlabeled folder's class mix (pseudo_label's
`class_mix`, what student.consistency.alignment_target=pool aligns to).

Reads the teacher's labeling (round 1's outputs/data.csv) of pools that
benchmarks/messy_pools.py wrote and labeled, and their truth tables; no model runs. On the
pool's in-distribution images (their true classes known) it compares with their true mix:

- `em`: EM under label shift from the calibrated probabilities (calibration.label_shift_prior,
  what the pipeline reports and aligns to), from the labeled classes' balanced mix;
- `pcc`: the mean of the probabilities (probabilistic classify and count: pulled flat);
- `cc`: the share of each predicted class (classify and count).

Each estimate's error is its total variation from the true mix (0-1: the share of the folder
it puts in the wrong class); `head_to_tail` its largest share over its smallest (the smallest
floored at one image), which the pipeline's log reads as skewed from 5 on.

    python benchmarks/class_mix.py --work /tmp/messy_pools_work --scenarios longtail-10 junk \\
        --seeds 0 1 2

(python: `PYTHONPATH=src .venv/bin/python`.) Rows are merged into
benchmarks/results/class_mix.json (a row with the same scenario and seed is replaced); a
scenario and seed without a labeled pool under --work is skipped with a line.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import scenarios  # noqa: E402
from ssl_gain import code_version, machine  # noqa: E402

from pseudolabel import calibration  # noqa: E402
from pseudolabel.atomic import write_text_atomic  # noqa: E402
from pseudolabel.predicting import probabilities, read_csv  # noqa: E402

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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, nargs="+", default=[Path("/tmp/messy_pools_work")])
    parser.add_argument("--scenarios", nargs="+", required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
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
    payload = json.loads(args.out.read_text()) if args.out.is_file() else {"rows": []}
    new = {(r["scenario"], r["seed"]) for r in rows}
    payload["rows"] = [r for r in payload["rows"] if (r["scenario"], r["seed"]) not in new] + rows
    payload["rows"].sort(key=lambda r: (r["scenario"], r["seed"]))
    write_text_atomic(args.out, json.dumps(payload, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
