"""Ingest validation throughput (images/s) against a plain single-process decode loop.

Writes N Fashion-MNIST training images as PNGs into a scratch folder, then, in the same run and
on the same files:
  plain   a loop that reads each file and calls tf.io.decode_image (what training decodes with);
  ingest  data=folder's checks: stat, read, sniff, SHA-256, decode as training does (and the
          perceptual hash with --near-duplicates), on a thread pool of `--workers` (default:
          all cores), with an empty cache;
  cached  the same checks again, answered from the cache (size/mtime unchanged).
The three alternate `--repeats` times; the ratio reported is the median of the pairs.

    .venv/bin/python benchmarks/ingest_throughput.py --images 5000
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

# pseudolabel first: it sets TensorFlow's environment (oneDNN, logging) before TensorFlow
# loads, which reads it once (docs/speed.md)
import pseudolabel  # noqa: F401

# isort: split

import tensorflow as tf
from PIL import Image

from pseudolabel.data import folder, sources

log = logging.getLogger("ingest_throughput")


def write_pngs(out: Path, count: int, idx_dir: str, size: int) -> list[Path]:
    """The first `count` training images as PNGs, upscaled to `size` pixels when not 28."""
    images = sources.fashion_mnist(idx_dir).train_images[:count]
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"fm_{i:05d}.png" for i in range(len(images))]
    for image, path in zip(images, paths, strict=True):
        picture = Image.fromarray(image)
        if size != picture.width:
            picture = picture.resize((size, size), Image.Resampling.BICUBIC)
        picture.save(path, format="PNG")
    return paths


def plain_loop(paths: list[Path], channels: int) -> float:
    start = time.perf_counter()
    for path in paths:
        tf.io.decode_image(path.read_bytes(), channels=channels, expand_animations=False)
    return time.perf_counter() - start


def ingest_checks(
    paths: list[Path], root: Path, channels: int, cache_path: Path, workers: int, near: bool
) -> tuple[float, int]:
    cache = folder.CheckCache(cache_path, channels, perceptual=near)
    start = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        checks = list(folder.check_all(paths, root, cache, pool, "benchmark"))
    seconds = time.perf_counter() - start
    cache.close()
    bad = sum(c.reason is not None for c in checks)
    return seconds, bad


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=20000)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--channels", type=int, default=1)
    parser.add_argument(
        "--repeats", type=int, default=3, help="plain/checks pairs; the median ratio is reported"
    )
    parser.add_argument(
        "--size", type=int, default=28, help="upscale to SIZE x SIZE (photo-like decode cost)"
    )
    parser.add_argument(
        "--near-duplicates", action="store_true", help="also compute perceptual hashes"
    )
    parser.add_argument("--idx-dir", default="/usr/share/datasets/fashion-mnist")
    parser.add_argument("--out", default="benchmarks/results/ingest_throughput.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    scratch = Path(tempfile.mkdtemp(prefix="ingest_bench_"))
    try:
        root = scratch / "unlabeled"
        paths = write_pngs(root, args.images, args.idx_dir, args.size)
        plain_loop(paths[:200], args.channels)  # warm-up: TensorFlow start-up, graph tracing
        warm = scratch / "warm.sqlite"
        ingest_checks(paths[:200], root, args.channels, warm, args.workers, args.near_duplicates)
        # Plain loop and checks alternate, so that a load that comes and goes on a shared
        # machine weighs on both alike; the ratio is the median of the pairs.
        pairs = []
        for repeat in range(args.repeats):
            plain_s = plain_loop(paths, args.channels)
            cache_path = scratch / f"cache_{repeat}.sqlite"
            run = (paths, root, args.channels, cache_path, args.workers, args.near_duplicates)
            ingest_s, bad = ingest_checks(*run)
            cached_s, _ = ingest_checks(*run)
            pairs.append((plain_s, ingest_s, cached_s))
    finally:
        shutil.rmtree(scratch)
    n = len(paths)
    plain_s, ingest_s, cached_s = (statistics.median(p[i] for p in pairs) for i in range(3))
    result = {
        "images": n,
        "size": args.size,
        "workers": args.workers,
        "near_duplicates": args.near_duplicates,
        "cpu_count": os.cpu_count(),
        "repeats": args.repeats,
        "plain_decode_images_per_s": round(n / plain_s, 1),
        "ingest_checks_images_per_s": round(n / ingest_s, 1),
        "ingest_cached_images_per_s": round(n / cached_s, 1),
        "ingest_vs_plain": round(statistics.median(p / i for p, i, _ in pairs), 3),
        "ingest_vs_plain_each": [round(p / i, 3) for p, i, _ in pairs],
        "load_average_1min": round(os.getloadavg()[0], 2),
        "rejected": bad,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    log.info(
        "%d PNGs of %dpx: plain decode loop %.0f img/s | ingest checks (%d threads) %.0f img/s "
        "(x%.2f, median of %s) | re-run from cache %.0f img/s | load average %.1f",
        n,
        args.size,
        result["plain_decode_images_per_s"],
        args.workers,
        result["ingest_checks_images_per_s"],
        result["ingest_vs_plain"],
        result["ingest_vs_plain_each"],
        result["ingest_cached_images_per_s"],
        result["load_average_1min"],
    )


if __name__ == "__main__":
    main()
