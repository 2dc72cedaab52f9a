"""Labeling on Ray against the local engine: images/s with 1 and 2 workers, and peak memory.

    .venv/bin/python benchmarks/labeling_scale.py                       # 20,000 images, 2 cores
    .venv/bin/python benchmarks/labeling_scale.py --images 5000 --memory-sizes 10000 100000

One run, one teacher (the demo's small CNN saved as a .keras file, as the pipeline labels with),
the demo's Fashion-MNIST PNGs (written once under --workdir by benchmarks/labeling_throughput.py's
`image_folder`). Each configuration runs in its own process pinned with `taskset` to the cores it
is given, so "1 worker" means one core for everything (driver, decoding, the teacher actor) and
"2 workers" two:

- local:  `predicting.predict_folder` (the pseudo_label stage's local engine) on 2 cores;
- ray_1:  `distributed.predict_folder` on a local Ray instance with 1 CPU: one teacher actor;
- ray_2:  the same with 2 CPUs: two teacher actors.

Ray's configurations include starting Ray and its workers (the figure a user sees), and are
also reported without the start-up (from the first labeled image). Ratios: ray_2 / local (target
>= 0.85) and ray_2 / ray_1 (target >= 1.7). The CSV of each Ray run is compared with the local
one (rows, order, labels, probabilities within 1e-6).

Memory: the whole process tree's peak resident memory (driver, raylet, GCS, workers, sampled
every 0.2 s; Ray's shared-memory object store is counted once per process that maps it, so this
is an upper bound) while labeling N images on ray_2, for each of --memory-sizes; the ratio of
the largest to the smallest (target <= 1.1x).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).parent))

import contextlib

import numpy as np  # noqa: E402

CONFIGS = {"local": ("0,1", None), "ray_1": ("0", 1), "ray_2": ("0,1", 2)}


def _teacher(workdir: Path) -> Path:
    """The demo's small CNN, untrained but fixed (seeded), saved once as a .keras file."""
    from labeling_throughput import build_teacher

    from pseudolabel.models import io as model_io

    path = workdir / "teacher.keras"
    if not path.is_file():
        model, meta = build_teacher("small_cnn")
        model_io.save(model, path, meta)
    return path


class _PeakRss(threading.Thread):
    """Samples the summed RSS of this process and all its descendants."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak = 0
        self.running = True

    def run(self) -> None:
        import psutil

        me = psutil.Process()
        while self.running:
            total = 0
            for proc in [me, *me.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):
                    total += proc.memory_info().rss
            self.peak = max(self.peak, total)
            time.sleep(0.2)


def child(config: str, folder: Path, teacher: Path, batch: int, out: Path) -> dict:
    """One configuration in this (pinned) process: seconds, images/s, peak RSS; CSV to `out`."""
    from pseudolabel import distributed, predicting
    from pseudolabel.models import io as model_io

    model, meta = model_io.load(teacher)
    sampler = _PeakRss()
    sampler.start()
    start = time.perf_counter()
    if CONFIGS[config][1] is None:
        frame, failed = predicting.predict_folder(model, meta, folder, batch)
        startup = 0.0
    else:
        import ray

        cpus = CONFIGS[config][1]
        ray.init(num_cpus=cpus, logging_level="WARNING", log_to_driver=False)
        startup = time.perf_counter() - start
        per_actor = (cpus - distributed.DECODE_CPUS) / cpus
        frame, failed = distributed.predict_folder(
            teacher, {}, meta, folder, batch, tta=False, temperature=1.0, address=None,
            actors=cpus, cpus_per_actor=per_actor,
        )  # fmt: skip
        ray.shutdown()
    seconds = time.perf_counter() - start
    sampler.running = False
    sampler.join()
    predicting.write_csv(frame, out)
    return {
        "config": config,
        "images": len(frame),
        "failed": len(failed),
        "seconds": round(seconds, 2),
        "startup_seconds": round(startup, 2),
        "images_per_s": round(len(frame) / seconds, 1),
        "images_per_s_after_startup": round(len(frame) / (seconds - startup), 1),
        "peak_rss_mb": round(sampler.peak / 2**20),
    }


def run_child(config: str, folder: Path, teacher: Path, batch: int, out: Path) -> dict:
    cores = CONFIGS[config][0]
    cmd = ["taskset", "-c", cores, sys.executable, __file__, "--child", config,
           "--folder", str(folder), "--teacher", str(teacher), "--batch-size", str(batch),
           "--csv", str(out)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{config} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"{config}: {result}", flush=True)
    return result


def same_csv(a: Path, b: Path) -> dict:
    from pseudolabel import predicting

    x, y = predicting.read_csv(a), predicting.read_csv(b)
    numeric = [c for c in x.columns if x[c].dtype.kind == "f"]
    return {
        "rows_equal": len(x) == len(y) and list(x["path"]) == list(y["path"]),
        "labels_equal": bool((x["label"].to_numpy() == y["label"].to_numpy()).all()),
        "max_probability_difference": float(
            np.abs(x[numeric].to_numpy() - y[numeric].to_numpy()).max()
        ),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=20000)
    parser.add_argument("--memory-sizes", type=int, nargs="*", default=[10000, 100000])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2, help="best of this many runs each")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/labeling_bench"))
    default_out = Path(__file__).parent / "results" / "labeling_scale.json"
    parser.add_argument("--out", type=Path, default=default_out)
    parser.add_argument("--child", choices=CONFIGS, help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--teacher", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--csv", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        result = child(args.child, args.folder, args.teacher, args.batch_size, args.csv)
        print(json.dumps(result))
        return 0
    from labeling_throughput import image_folder

    args.workdir.mkdir(parents=True, exist_ok=True)
    teacher = _teacher(args.workdir)
    scratch = Path(tempfile.mkdtemp(prefix="labeling_scale_"))
    results: dict = {"cpus": os.cpu_count(), "batch_size": args.batch_size, "runs": {}}
    if args.images:
        folder = image_folder(args.workdir, args.images)
        best: dict = {}
        for _ in range(args.repeats):  # alternate the configurations: load drifts hit all alike
            for config in CONFIGS:
                run = run_child(config, folder, teacher, args.batch_size, scratch / f"{config}.csv")
                if config not in best or run["seconds"] < best[config]["seconds"]:
                    best[config] = run
        results["images"] = args.images
        results["runs"] = best
        rate = {k: v["images_per_s"] for k, v in best.items()}
        warm = {k: v["images_per_s_after_startup"] for k, v in best.items()}
        results["ratios"] = {
            "ray_2_to_local": round(rate["ray_2"] / rate["local"], 3),
            "ray_2_to_ray_1": round(rate["ray_2"] / rate["ray_1"], 3),
            "ray_2_to_local_after_startup": round(warm["ray_2"] / rate["local"], 3),
            "ray_2_to_ray_1_after_startup": round(warm["ray_2"] / warm["ray_1"], 3),
        }
        results["csv_vs_local"] = {
            config: same_csv(scratch / "local.csv", scratch / f"{config}.csv")
            for config in ("ray_1", "ray_2")
        }
        print(json.dumps(results["ratios"]), json.dumps(results["csv_vs_local"]), flush=True)
    if len(args.memory_sizes) >= 2:
        memory = {}
        for n in args.memory_sizes:
            folder = image_folder(args.workdir, n)
            memory[n] = run_child("ray_2", folder, teacher, args.batch_size, scratch / f"m{n}.csv")
            csv = scratch / f"m{n}.csv"
            memory[n]["csv_mb"] = round(csv.stat().st_size / 2**20, 1)
        small, large = min(args.memory_sizes), max(args.memory_sizes)
        results["memory"] = {
            "runs": memory,
            f"peak_rss_ratio_{large}_to_{small}": round(
                memory[large]["peak_rss_mb"] / memory[small]["peak_rss_mb"], 3
            ),
        }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    tmp.replace(args.out)
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
