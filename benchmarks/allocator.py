"""Page faults and kernel CPU time of the student's training step under each memory allocator.

    .venv/bin/python benchmarks/allocator.py                      # 60 steps, 2 repeats
    .venv/bin/python benchmarks/allocator.py --steps 200 --repeats 3

Issue 31 saw the demo's training processes on a 2-core AVX2 VM spend about 45 % of their CPU
time in the kernel, at 140-200k minor page faults a second in TensorFlow's Eigen threads. This
measures it on this machine, for the consistency student's step (benchmarks/pipeline_profile.py's
in-memory batches of the demo's shape and the default classifier; no input pipeline), each
allocator in its own process:

- `glibc`: the default malloc;
- `glibc_fixed`: glibc with fixed thresholds (MALLOC_MMAP_THRESHOLD_ 256 MiB, MALLOC_TRIM_THRESHOLD_
  1 GiB): tensors' buffers are reused from the heap rather than mapped and unmapped each op;
- `tcmalloc`: Debian's libtcmalloc-minimal4 preloaded (LD_PRELOAD), what TensorFlow's CPU
  performance guide suggests;
- `mallopt`: glibc, the same thresholds set by mallopt(3) in the running process before
  TensorFlow is imported (what a `pseudolabel <stage>` could do without any environment).

Per process: minor page faults, user and system CPU seconds and wall seconds of `--steps` steps
after a warm-up fit (tracing), from getrusage. Faults and the system share of CPU time are
counts, comparable on a host-throttled VM; wall seconds are recorded but compared only as
ratios within one run (variants alternate, repeats keep the median). Writes --out (JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "allocator.json"
DOC = HERE.parent / "docs" / "speed.md"
START, END = "<!-- allocator:start -->", "<!-- allocator:end -->"
TCMALLOC = "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"
VARIANTS = {
    "glibc": {},
    "glibc_fixed": {
        "MALLOC_MMAP_THRESHOLD_": str(256 << 20),
        "MALLOC_TRIM_THRESHOLD_": str(1 << 30),
    },
    "tcmalloc": {"LD_PRELOAD": TCMALLOC},
    "mallopt": {"ALLOCATOR_BENCH_MALLOPT": "1"},
}


def child(steps: int) -> dict:
    """One process: the warm-up fit, then `steps` measured steps."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if os.environ.get("ALLOCATOR_BENCH_MALLOPT"):  # M_MMAP_THRESHOLD -3, M_TRIM_THRESHOLD -1
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        assert libc.mallopt(-3, 256 << 20) == 1 and libc.mallopt(-1, 1 << 30) == 1
    sys.path.insert(0, str(HERE))
    from pipeline_profile import consistency_step_model, step_batches

    from pseudolabel.config import compose

    cfg = compose([])
    step_data, _, _ = step_batches(cfg)
    model = consistency_step_model(cfg, bool(cfg.student.train.mixed_precision), steps)
    model.fit(step_data, steps_per_epoch=5, epochs=1, verbose=0)  # tracing, first allocations
    before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    model.fit(step_data, steps_per_epoch=steps, epochs=1, verbose=0)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    user, system = after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime
    return {
        "minor_faults": after.ru_minflt - before.ru_minflt,
        "user_s": round(user, 2),
        "system_s": round(system, 2),
        "wall_s": round(wall, 2),
        "peak_rss_mib": round(after.ru_maxrss / 1024, 1),
    }


def render(result: dict) -> str:
    """docs/speed.md's table: per allocator, the medians of the committed run."""
    lines = [
        f"`{result['command']}` on {result['cpus']} cores of an {result['cpu']}, "
        f"{result['steps']} consistency steps of the demo's shape after a warm-up, "
        f"{result['repeats']} alternating runs each (medians):",
        "",
        "| allocator | minor page faults a step (runs) | ratio to glibc | kernel share of CPU "
        "time | peak RSS (MiB) | wall ratio to glibc (a throttled host: not comparable) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in result["rows"]:
        rss = statistics.median(r["peak_rss_mib"] for r in row["runs"])
        runs = ", ".join(f"{r['minor_faults'] / result['steps']:,.0f}" for r in row["runs"])
        lines.append(
            f"| `{row['variant']}` | {row['faults_per_step']:,} ({runs}) | "
            f"{row['faults_ratio_to_glibc']:.2f} | {100 * row['system_share_of_cpu']:.1f} % | "
            f"{rss:,.0f} | {row['wall_ratio_to_glibc']:.2f} |"
        )
    return "\n".join(lines)


def _run(variant: str, steps: int) -> dict:
    env = {**os.environ, **VARIANTS[variant]}
    out = subprocess.run(
        [sys.executable, __file__, "--child", "--steps", str(steps)],
        env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def _cpu_model() -> str:
    sys.path.insert(0, str(HERE))
    from ssl_gain import cpu_model

    return cpu_model()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--render", action="store_true", help="write docs/speed.md's block")
    parser.add_argument("--check", action="store_true", help="fail if that block is stale")
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.steps)))
        return 0
    if args.render or args.check:
        sys.path.insert(0, str(HERE))
        import doc_block

        return doc_block.from_json(RESULTS, DOC, START, END, render, args.check)
    variants = ["glibc"] + [v for v in args.variants if v != "glibc"]  # the ratios' base
    variants = [v for v in variants if v != "tcmalloc" or Path(TCMALLOC).is_file()]
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    for repeat in range(args.repeats):
        order = variants if repeat % 2 == 0 else variants[::-1]  # alternating
        for variant in order:
            print(f"repeat {repeat + 1}/{args.repeats}: {variant} ...", flush=True)
            runs[variant].append(_run(variant, args.steps))
    base = {k: statistics.median(r[k] for r in runs["glibc"]) for k in ("minor_faults", "wall_s")}
    rows = []
    for variant, results in runs.items():
        median = {k: statistics.median(r[k] for r in results) for k in results[0]}
        cpu = median["user_s"] + median["system_s"]
        rows.append({
            "variant": variant,
            "env": VARIANTS[variant],
            "faults_per_step": round(median["minor_faults"] / args.steps),
            "system_share_of_cpu": round(median["system_s"] / cpu, 3) if cpu else None,
            "faults_ratio_to_glibc": round(median["minor_faults"] / base["minor_faults"], 3),
            "wall_ratio_to_glibc": round(median["wall_s"] / base["wall_s"], 3),
            "runs": results,
        })  # fmt: skip
    result = {
        "command": "python benchmarks/allocator.py " + " ".join(argv or sys.argv[1:]),
        "cpu": _cpu_model(),
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "steps": args.steps,
        "repeats": args.repeats,
        "rows": rows,
    }
    # (imported after the runs: `import pseudolabel` sets TensorFlow variables the runs inherit)
    from pseudolabel.atomic import write_text_atomic

    write_text_atomic(args.out, json.dumps(result, indent=1) + "\n")
    for row in rows:
        print(
            f"{row['variant']:12s} faults/step {row['faults_per_step']:>8d}  "
            f"system share {row['system_share_of_cpu']:.3f}  "
            f"faults x{row['faults_ratio_to_glibc']:.3f}  wall x{row['wall_ratio_to_glibc']:.3f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
