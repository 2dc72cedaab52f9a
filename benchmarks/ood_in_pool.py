"""The pipeline's own OOD score on a messy pool: AUROC and share flagged per kind of image.

Runs the `pseudo_label` stage (the score, the cut, the flags: pseudolabel.ood) with the
project's defaults on a pool that benchmarks/messy_pools.py wrote and trained the teacher for,
into a scratch folder, and scores data.csv's ood_score and ood columns against the pool's truth
table. Labeling only: what `pseudo_label.ood.exclude=true` would leave out, without training a
student (messy_pools.py's `ood` arm does that). Also each kind's share past 1.5, 2 and 3 times
the cut (`past`): what a second, farther cut would leave out where the first keeps everything,
and the stage's `class_mix` (head-to-tail, val_error, skewed: what alignment_target=auto reads).

    python benchmarks/messy_pools.py --scenarios junk --seeds 0 --settings default
    python benchmarks/ood_in_pool.py --scenario junk --seed 0

Rows are merged into benchmarks/results/ood_in_pool.json (one per scenario, seed, overrides).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parent))
import scenarios  # noqa: E402
from ssl_gain import code_version, machine, split_argv  # noqa: E402

from pseudolabel.atomic import write_text_atomic  # noqa: E402
from pseudolabel.config import compose_defaults  # noqa: E402
from pseudolabel.paths import Paths  # noqa: E402
from pseudolabel.predicting import read_csv  # noqa: E402
from pseudolabel.stages import pseudo_label  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "ood_in_pool.json"


# Farther cuts than the pipeline's, as multiples of it: each term of the score is centred on
# its val images' median (pseudolabel.ood), so the score's val median is about 0 and k times the
# cut is k times as far from the labeled classes' typical image. What a second, stricter cut
# would leave out of a folder the pipeline keeps whole (exclude=auto below its 10 % line).
FAR = (1.5, 2.0, 3.0)


def by_kind(kinds: np.ndarray, scores: np.ndarray, flags: np.ndarray, cut: float | None = None):
    """AUROC (OOD = positive) and share flagged of each kind, and of all junk together; with
    the cut, `past`: each kind's share past every multiple of it in FAR."""
    inside = kinds == scenarios.IN
    groups = {"in": inside} | {k: kinds == k for k in sorted(set(kinds) - {scenarios.IN})}
    junk = np.char.startswith(kinds.astype(str), "junk:")
    if junk.any():
        groups["junk"] = junk
    out = {}
    for name, mask in groups.items():
        out[name] = {"flagged": round(float(flags[mask].mean()), 4), "n": int(mask.sum())}
        if name != "in":
            truth = np.r_[np.zeros(inside.sum()), np.ones(mask.sum())]
            auc = roc_auc_score(truth, np.r_[scores[inside], scores[mask]])
            out[name] = {"auroc": round(float(auc), 4), **out[name]}
        if cut is not None:
            past = {f"{k:g}": round(float(np.mean(scores[mask] > k * cut)), 4) for k in FAR}
            out[name]["past"] = past
    return out


def in_by_class(kinds: np.ndarray, names: np.ndarray, flags: np.ndarray) -> dict:
    """{class: (images, share flagged)} of the in-distribution images, largest class first."""
    inside = kinds == scenarios.IN
    counts = {c: int((names[inside] == c).sum()) for c in set(names[inside])}
    return {
        c: {"n": n, "flagged": round(float(flags[inside][names[inside] == c].mean()), 4)}
        for c, n in sorted(counts.items(), key=lambda item: -item[1])
    }


def main(argv: list[str] | None = None) -> int:
    argv, overrides = split_argv(argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenario", required=True, help="a messy_pools.py scenario, e.g. junk")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=Path("/tmp/messy_pools_work"))
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    shared = args.work / f"{args.scenario}_seed{args.seed}_pooldefault"
    if not (shared / "models" / "teacher.keras").is_file():
        print(f"{shared}: no teacher; run messy_pools.py for this scenario first", file=sys.stderr)
        return 2
    scratch = shared / "ood_in_pool"
    scratch.mkdir(exist_ok=True)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{scratch / 'mlflow.db'}"
    paths = Paths(scratch, data_root=shared, teacher_model=shared / "models" / "teacher.keras")
    start = time.perf_counter()
    metrics = pseudo_label(compose_defaults([f"seed={args.seed}", *overrides]), paths)
    seconds = round(time.perf_counter() - start, 1)
    truth = scenarios.Truth.load(shared / "data" / "unlabeled_truth.json")
    frame = read_csv(paths.csv)
    kinds = np.array(truth.kinds(frame["path"]))
    row = {
        "scenario": args.scenario,
        "seed": args.seed,
        "overrides": overrides,
        "cut": metrics["ood"]["cut"],
        "flagged_fraction": metrics["ood"]["flagged_fraction"],
        "by_kind": by_kind(
            kinds,
            frame["ood_score"].to_numpy(),
            frame["ood"].to_numpy(bool),
            metrics["ood"]["cut"],
        ),
        # the in-distribution images flagged per true class (a skewed pool's head class first)
        "in_flagged_by_class": in_by_class(
            kinds, np.array(truth(frame["path"]), dtype=object), frame["ood"].to_numpy(bool)
        ),
        # the folder's class mix as the pipeline reports it (what alignment_target=auto reads)
        "class_mix": {
            k: metrics["class_mix"][k]
            for k in ("head", "tail", "head_to_tail", "val_error", "skewed", "images")
        },
        "labeling_seconds": seconds,
        "cpu": machine(),
        "code": code_version(("benchmarks/ood_in_pool.py", "src/pseudolabel/ood.py")),
    }
    payload = json.loads(args.out.read_text()) if args.out.is_file() else {"rows": []}
    key = ("scenario", "seed", "overrides")
    payload["rows"] = [r for r in payload["rows"] if any(r[k] != row[k] for k in key)] + [row]
    write_text_atomic(args.out, json.dumps(payload, indent=1) + "\n")
    print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
