"""Peak memory of labeling and of the consistency student as the unlabeled folder grows.

    .venv/bin/python benchmarks/training_memory.py --sizes 10000 100000

For each size N: a scratch project whose labeled images are the demo's (Fashion-MNIST, 50 per
class, from the built-in source) and whose unlabeled folder holds N PNGs (20,000 distinct
Fashion-MNIST images, hard-linked again for larger sets, as labeling_throughput.py does), read
with `data.source=folder`. ingest, a one-epoch teacher and merge run as the pipeline runs them;
`pseudo_label` and `train_student` (the default consistency student, a short schedule of
--steps steps) each run alone in a fresh process, whose peak RSS (ru_maxrss) is the figure.
Writes benchmarks/results/training_memory.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from labeling_throughput import image_folder  # noqa: E402

MEASURED = ("pseudo_label", "train_student")


def overrides(project: Path, base: Path, unlabeled: Path, steps: int) -> list[str]:
    return [
        "data.source=folder",
        f"data.labeled_root={base / 'data' / 'image_dataset'}",
        f"data.unlabeled_root={unlabeled}",
        "data.link=hardlink",
        "data.image_size=[28,28]",
        "data.channels=1",
        "teacher.train.epochs=1",
        "student.train.epochs=1",
        f"student.train.steps_per_epoch={steps}",
        "student.baseline.enabled=false",
    ]


def run_stage(stage: str, project: Path, chosen: list[str]) -> dict:
    """One stage in this process, as `pseudolabel <stage>` runs it: its seconds and peak RSS."""
    from pseudolabel import stages
    from pseudolabel.config import compose
    from pseudolabel.paths import Paths

    os.chdir(REPO)  # conf/ is read from the repository
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{project / 'mlflow.db'}"
    cfg = compose(chosen)
    start = time.perf_counter()
    stages.STAGES[stage](cfg, Paths(project))
    seconds = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"seconds": round(seconds, 1), "peak_rss_mb": round(peak_mb)}


def in_child(stage: str, project: Path, chosen: list[str]) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", stage, str(project), "--", *chosen],
        capture_output=True,
        text=True,
    )
    if out.returncode:
        sys.stderr.write(out.stderr[-4000:])
        raise SystemExit(f"{stage} failed in {project}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    argv = sys.argv[1:]
    chosen = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10000, 100000])
    parser.add_argument("--steps", type=int, default=100, help="student steps")
    parser.add_argument("--work", type=Path, default=Path("/tmp/training_memory"))
    parser.add_argument("--out", type=Path, default=HERE / "results" / "training_memory.json")
    parser.add_argument("--child", nargs=2, metavar=("STAGE", "PROJECT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(run_stage(args.child[0], Path(args.child[1]), chosen)))
        return 0
    args.work.mkdir(parents=True, exist_ok=True)
    base = args.work / "base"
    if not (base / "data" / "image_dataset" / "test").is_dir():  # the demo's labeled images
        in_child("ingest", base, ["data.unlabeled=1000"])
    results: dict = {"steps": args.steps, "cpus": os.cpu_count(), "runs": {}}
    for n in args.sizes:
        project = args.work / f"project_{n}"
        chosen = overrides(project, base, image_folder(args.work / "pool", n), args.steps)
        run: dict = {}
        for stage in ("ingest", "train_teacher", "pseudo_label", "merge", "train_student"):
            print(f"[{n} unlabeled] {stage}", flush=True)
            run[stage] = in_child(stage, project, chosen)
        results["runs"][n] = {stage: run[stage] for stage in MEASURED}
        print(json.dumps({n: results["runs"][n]}), flush=True)
    small, large = min(args.sizes), max(args.sizes)
    for stage in MEASURED:
        ratio = (
            results["runs"][large][stage]["peak_rss_mb"]
            / results["runs"][small][stage]["peak_rss_mb"]
        )
        results[f"{stage}_ratio_{large}_to_{small}"] = round(ratio, 3)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
