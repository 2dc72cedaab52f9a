"""TensorFlow's CPU kernels (Eigen or oneDNN) and the allocator, on the real train_student stage.

    .venv/bin/python benchmarks/cpu_backend.py                      # 30 steps, 2 repeats
    .venv/bin/python benchmarks/cpu_backend.py --shared /tmp/ssl_gain_work/budget50_seed0
    .venv/bin/python benchmarks/cpu_backend.py --render             # docs/speed.md's block

Issue 31 saw the demo's training processes on a 2-core AVX2 VM spend about 45 % of their CPU
time in the kernel, at 140-200k minor page faults a second. benchmarks/allocator.py, which times
a consistency step on in-memory batches, did not reproduce it (3 % there). This runs the stage
itself: `pseudolabel.stages.train_student` with the consistency student of the demo's recipe,
on one seed's teacher, pseudo-labels and merged set (ssl_gain.py's shared part, built under
--work or reused with --shared), for `--steps` optimiser steps after 5 warm-up steps, each
variant in its own process (variants alternate; medians of --repeats):

- `eigen`: TF_ENABLE_ONEDNN_OPTS=0, TensorFlow's Eigen kernels: its own choice on a CPU without
  AVX-512 VNNI/BF16 or AMX;
- `onednn`: TF_ENABLE_ONEDNN_OPTS=1, its oneDNN kernels: its own choice on the others (Zen 4,
  Cascade Lake and newer), and what `import pseudolabel` now sets unless the variable is set;
- `*_tcmalloc`: the same with Debian's libtcmalloc-minimal4 preloaded (LD_PRELOAD).

Per process: minor page faults, user and system CPU seconds (getrusage) and wall seconds of the
measured steps. CPU seconds and faults are counts, comparable on a host-throttled VM; wall
seconds only as ratios within one run. Writes --out (JSON) and, with --render, the docs block.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "cpu_backend.json"
DOC = HERE.parent / "docs" / "speed.md"
START, END = "<!-- cpu-backend:start -->", "<!-- cpu-backend:end -->"
TCMALLOC = "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"
VARIANTS = {
    "eigen": {"TF_ENABLE_ONEDNN_OPTS": "0"},
    "onednn": {"TF_ENABLE_ONEDNN_OPTS": "1"},
    "eigen_tcmalloc": {"TF_ENABLE_ONEDNN_OPTS": "0", "LD_PRELOAD": TCMALLOC},
    "onednn_tcmalloc": {"TF_ENABLE_ONEDNN_OPTS": "1", "LD_PRELOAD": TCMALLOC},
}
WARMUP = 5  # steps before the measurement: tracing, first allocations
# The default recipe as the committed default rows of ssl_gain.json spell it (shared part only).
RECIPE = [
    "data.unlabeled=59300",
    "teacher.train.augment.rotate=0",
    "teacher.train.augment.zoom=0",
    "teacher.train.augment.contrast=0",
]


def child(shared_root: Path, overrides: list[str], steps: int, folder: Path) -> dict:
    """One process: train_student for WARMUP + `steps` steps; the measured steps' counts."""
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{folder / 'mlflow.db'}"
    import keras

    from pseudolabel import stages
    from pseudolabel.config import compose
    from pseudolabel.paths import Paths

    sys.path.insert(0, str(HERE))
    from ssl_gain import _link_shared

    shared = Paths(shared_root)
    run = Paths(folder, data_root=shared_root, teacher_model=shared.model("teacher"))
    _link_shared(shared, run)
    cfg = compose(
        [
            *overrides,
            f"student.train.steps_per_epoch={WARMUP + steps}",
            "student.train.epochs=1",
            "student.train.patience=1",
        ]
    )
    marks: dict = {}

    class Meter(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            if batch == WARMUP:
                marks["start"] = (resource.getrusage(resource.RUSAGE_SELF), time.perf_counter())

        def on_epoch_end(self, epoch, logs=None):
            marks.setdefault("end", (resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()))

    stages.train_student(cfg, run, callbacks=[Meter()])
    (before, t0), (after, t1) = marks["start"], marks["end"]
    return {
        "minor_faults": after.ru_minflt - before.ru_minflt,
        "user_s": round(after.ru_utime - before.ru_utime, 2),
        "system_s": round(after.ru_stime - before.ru_stime, 2),
        "wall_s": round(t1 - t0, 2),
        "peak_rss_mib": round(after.ru_maxrss / 1024, 1),
    }


def render(result: dict) -> str:
    """docs/speed.md's table: per variant, the medians of the committed run."""
    lines = [
        f"`{result['command']}` on {result['cpu']}; {result['steps']} steps of the demo's "
        f"consistency student (`train_student`, after {WARMUP} warm-up steps), "
        f"{result['repeats']} alternating runs each (medians); the seed's recipe: "
        f"`{' '.join(result['overrides'])}`.",
        "",
        "| variant | CPU seconds a step | ratio to eigen | kernel share of CPU time | minor page "
        "faults a step | peak RSS (MiB) | wall ratio to eigen (same run) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["rows"]:
        lines.append(
            f"| `{row['variant']}` | {row['cpu_s_per_step']:.2f} | "
            f"{row['cpu_ratio_to_eigen']:.2f} | {100 * row['system_share_of_cpu']:.1f} % | "
            f"{row['faults_per_step']:,} | {row['peak_rss_mib']:,.0f} | "
            f"{row['wall_ratio_to_eigen']:.2f} |"
        )
    return "\n".join(lines)


def _run(variant: str, shared: Path, overrides: list[str], steps: int, work: Path) -> dict:
    folder = work / "runs" / variant
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    env = {**os.environ, **VARIANTS[variant], "TF_CPP_MIN_LOG_LEVEL": "2"}
    command = [sys.executable, __file__, "--child", "--steps", str(steps), "--shared", str(shared)]
    out = subprocess.run(
        [*command, "--folder", str(folder), "--", *overrides],
        env=env, capture_output=True, text=True, cwd=HERE.parent,
    )  # fmt: skip
    if out.returncode:
        raise RuntimeError(f"{variant} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, str(HERE))
    from ssl_gain import machine, split_argv

    own, overrides = split_argv(argv if argv is not None else sys.argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--work", type=Path, default=Path("/tmp/cpu_backend_work"))
    parser.add_argument(
        "--shared", type=Path, help="a seed folder ssl_gain.py built (reused read-only)"
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--render", action="store_true", help="write docs/speed.md's block")
    parser.add_argument("--check", action="store_true", help="fail if that block is stale")
    args = parser.parse_args(own)
    if args.child:
        print(json.dumps(child(args.shared, overrides, args.steps, args.folder)))
        return 0
    if args.render or args.check:
        import doc_block

        return doc_block.from_json(RESULTS, DOC, START, END, render, args.check)
    if args.shared is None:  # build (or reuse) seed 0's shared part of the default recipe
        from ssl_gain import shared_part

        paths, _ = shared_part(50, 0, RECIPE, args.work)
        args.shared, recipe = paths.root, RECIPE
    else:  # the recipe that folder was built with
        recipe = json.loads((args.shared / "shared_done.json").read_text())["key"]
        recipe = json.loads(recipe)[2]
    budget_seed = ["data.train_per_class=50", "seed=0", *recipe, *overrides]
    variants = ["eigen"] + [v for v in args.variants if v != "eigen"]  # the ratios' base
    variants = [v for v in variants if "tcmalloc" not in v or Path(TCMALLOC).is_file()]
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    for repeat in range(args.repeats):
        for variant in variants if repeat % 2 == 0 else variants[::-1]:  # alternating
            print(f"repeat {repeat + 1}/{args.repeats}: {variant} ...", flush=True)
            runs[variant].append(_run(variant, args.shared, budget_seed, args.steps, args.work))
    median = {
        v: {k: statistics.median(r[k] for r in results) for k in results[0]}
        for v, results in runs.items()
    }
    base = median["eigen"]
    rows = []
    for variant, m in median.items():
        cpu = m["user_s"] + m["system_s"]
        rows.append({
            "variant": variant,
            "env": VARIANTS[variant],
            "cpu_s_per_step": round(cpu / args.steps, 3),
            "cpu_ratio_to_eigen": round(cpu / (base["user_s"] + base["system_s"]), 3),
            "system_share_of_cpu": round(m["system_s"] / cpu, 3),
            "faults_per_step": round(m["minor_faults"] / args.steps),
            "peak_rss_mib": m["peak_rss_mib"],
            "wall_ratio_to_eigen": round(m["wall_s"] / base["wall_s"], 3),
            "runs": runs[variant],
        })  # fmt: skip
    result = {
        "command": "python benchmarks/cpu_backend.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "cpu": machine(kernels=False),  # each variant chooses its own
        "steps": args.steps,
        "repeats": args.repeats,
        "overrides": budget_seed,
        "rows": rows,
    }
    # (imported after the runs: `import pseudolabel` sets TensorFlow variables the runs inherit)
    from pseudolabel.atomic import write_text_atomic

    write_text_atomic(args.out, json.dumps(result, indent=1) + "\n")
    for row in rows:
        print(
            f"{row['variant']:16s} CPU s/step {row['cpu_s_per_step']:.3f} "
            f"(x{row['cpu_ratio_to_eigen']:.2f})  kernel {row['system_share_of_cpu']:.3f}  "
            f"faults/step {row['faults_per_step']:>8d}  wall x{row['wall_ratio_to_eigen']:.2f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
