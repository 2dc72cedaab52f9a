"""Labeling throughput and memory: the streaming labeler against `model.predict` on images
already decoded in memory, and against a decavision-style loop (per-file PIL decode, then
predict per batch).

    .venv/bin/python benchmarks/labeling_throughput.py --teacher small_cnn --images 20000 \
        --memory-sizes 10000 100000
    .venv/bin/python benchmarks/labeling_throughput.py --teacher efficientnet_b0 --images 2000 \
        --memory-sizes 1000 10000

Images are Fashion-MNIST PNGs written once under --workdir (a pool of distinct images, then
hard links, so large sets repeat images). For each teacher it reports, from one process:
labeling images/s (`predicting.predict_folder`, the pseudo_label stage's streaming loop, with
chunked flushing; reading ingest's decoded copy of the folder, and decoding the files as without
one), `model.predict` images/s on the same images pre-decoded (same model, same
batch size), the tf.data decode-only rate, the bound that decoding and the model sharing the
CPU allow, and the decavision-style rate; then the peak RSS of labeling N images, each size in
a fresh subprocess.
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

log = logging.getLogger("labeling_throughput")

IDX = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
POOL = 20000  # distinct PNGs; bigger sets hard-link these again
PER_FOLDER = 1000
# efficientnet_b0: the files are decoded to 96x96 RGB by tf.data (the model takes 96 px);
# efficientnet_b0_resize_in_model: decoded at 28x28 grey, the model resizes (as the zoo builds it).
TEACHERS = ("small_cnn", "efficientnet_b0", "efficientnet_b0_resize_in_model")


def _fashion_mnist(n: int) -> np.ndarray:
    with gzip.open(IDX, "rb") as f:
        raw = np.frombuffer(f.read(), dtype=np.uint8, offset=16)
    return raw.reshape(-1, 28, 28)[:n]


def image_folder(workdir: Path, n: int) -> Path:
    """`workdir/fmnist_<n>/` with n PNGs in folders of 1000 (written once, then reused)."""
    pool = workdir / "pool"
    if len(list(pool.glob("*.png"))) < min(n, POOL):
        pool.mkdir(parents=True, exist_ok=True)
        for i, pixels in enumerate(_fashion_mnist(POOL)):
            Image.fromarray(pixels).save(pool / f"{i:05d}.png")
    folder = workdir / f"fmnist_{n}"
    if not folder.is_dir():
        tmp = workdir / f".fmnist_{n}.tmp"
        for i in range(n):
            sub = tmp / f"{i // PER_FOLDER:04d}"
            sub.mkdir(parents=True, exist_ok=True)
            os.link(pool / f"{i % POOL:05d}.png", sub / f"{i:07d}.png")
        tmp.rename(folder)
    return folder


def build_teacher(name: str):
    """The demo's small CNN (28x28 grey), or EfficientNetB0 without weights at 96x96 RGB; both
    take raw 0..255 pixels (EfficientNet rescales and normalises inside itself)."""
    from pseudolabel.config import compose  # first: it sets TensorFlow's environment (oneDNN)

    # isort: split
    import keras

    from pseudolabel.models.builders import build_model
    from pseudolabel.models.io import ModelMeta

    keras.utils.set_random_seed(0)
    classes = [f"class_{i}" for i in range(10)]
    if name == "small_cnn":
        cfg = compose([])
        model = build_model(cfg.teacher.model, cfg.teacher.train.augment, 10, [28, 28], 1, "t")
        return model, ModelMeta(classes, [28, 28], 1)
    model = keras.applications.EfficientNetB0(weights=None, input_shape=(96, 96, 3), classes=10)
    if name == "efficientnet_b0":
        return model, ModelMeta(classes, [96, 96], 3)
    inputs = keras.Input((28, 28, 1))
    x = keras.layers.Resizing(96, 96)(inputs)
    x = keras.layers.Concatenate()([x, x, x])
    return keras.Model(inputs, model(x)), ModelMeta(classes, [28, 28], 1)


def _timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def ensure_copy(meta, folder: Path) -> float:
    """ingest's decoded copy of `folder` at the teacher's input size (data.decoded), written
    once: the seconds it took, 0 when it was there."""
    from pseudolabel.data import decoded
    from pseudolabel.data.images import list_images

    if decoded.open_rows(folder, list_images(folder), meta.image_size, meta.channels):
        return 0.0
    return _timed(lambda: decoded.build(folder, meta.image_size, meta.channels))[0]


def label(model, meta, folder: Path, batch_size: int, copy: bool = True) -> tuple[float, int]:
    """Seconds and images for the labeling stage's loop (with chunked flushing) + CSV write,
    reading ingest's decoded copy (`copy`) or decoding the files (as without one)."""
    from pseudolabel.data import decoded

    hidden = decoded.DIRNAME
    if not copy:
        decoded.DIRNAME = ".no-copy"  # the readers look for none: the files are decoded
    try:
        return _label(model, meta, folder, batch_size)
    finally:
        decoded.DIRNAME = hidden


def _label(model, meta, folder: Path, batch_size: int) -> tuple[float, int]:
    from pseudolabel import predicting

    with tempfile.TemporaryDirectory() as scratch:
        seconds, (frame, _) = _timed(
            lambda: predicting.predict_folder(
                model, meta, folder, batch_size, partial_dir=Path(scratch) / "partial"
            )
        )
        start = time.perf_counter()
        predicting.write_csv(frame, Path(scratch) / "data.csv")
        seconds += time.perf_counter() - start
    return seconds, len(frame)


def decode_only(meta, files: list[str], batch_size: int) -> tuple[float, np.ndarray]:
    """The same tf.data decoding without a model: its time, and the decoded images."""
    from pseudolabel.data.images import path_image_dataset

    ds = path_image_dataset(files, meta.image_size, meta.channels, batch_size)
    seconds, images = _timed(lambda: np.concatenate([x.numpy() for _, x in ds]))
    return seconds, images


def batch_loop(model, images: np.ndarray, batch_size: int) -> None:
    """The model alone: `predict_on_batch` over pre-decoded batches (what the labeler calls)."""
    for i in range(0, len(images), batch_size):
        model.predict_on_batch(images[i : i + batch_size])


def decavision_style(model, meta, files: list[str], batch_size: int) -> float:
    """Per-file PIL decode in Python, then `model.predict` per batch: seconds."""
    mode = "L" if meta.channels == 1 else "RGB"
    size = tuple(reversed(meta.image_size))
    start = time.perf_counter()
    for i in range(0, len(files), batch_size):
        batch = []
        for path in files[i : i + batch_size]:
            image = Image.open(path).convert(mode).resize(size, Image.BILINEAR)
            batch.append(np.asarray(image, dtype=np.float32).reshape(*meta.image_size, -1))
        model.predict(np.stack(batch), batch_size=batch_size, verbose=0)
    return time.perf_counter() - start


def throughput(
    teacher: str, n: int, baseline_n: int, batch_size: int, workdir: Path, repeats: int
) -> dict:
    """Best of `repeats` alternating runs of each measurement (the CPUs are shared, so the best
    run is the one least disturbed by other work)."""
    from pseudolabel.data.images import list_images

    model, meta = build_teacher(teacher)
    folder = image_folder(workdir, n)
    files = [str(p) for p in list_images(folder)]
    warm = np.zeros((batch_size, *meta.image_size, meta.channels), np.float32)
    model.predict_on_batch(warm)
    model.predict(warm, batch_size=batch_size, verbose=0)  # trace both paths before timing
    from pseudolabel import predicting

    decode_s, images = decode_only(meta, files, batch_size)
    copy_s = ensure_copy(meta, folder)
    label_s = decoding_s = predict_s = batch_loop_s = list_s = table_s = float("inf")
    probs = np.random.default_rng(0).dirichlet(np.ones(10), n).astype(np.float32)
    for _ in range(repeats):
        # What labeling does besides the model: list the folder, and turn the probabilities
        # into the CSV (frame, sort, write).
        list_s = min(list_s, _timed(lambda: list_images(folder))[0])
        with tempfile.TemporaryDirectory() as scratch:
            table_s = min(
                table_s,
                _timed(
                    lambda: predicting.write_csv(
                        predicting.raw_frame(files, [probs], meta.class_names, 1.0),
                        Path(scratch) / "data.csv",
                    )
                )[0],
            )
        seconds, labeled = label(model, meta, folder, batch_size)
        label_s = min(label_s, seconds)
        seconds, decoded_n = label(model, meta, folder, batch_size, copy=False)
        decoding_s = min(decoding_s, seconds)
        assert decoded_n == labeled
        seconds, _ = _timed(lambda: model.predict(images, batch_size=batch_size, verbose=0))
        predict_s = min(predict_s, seconds)
        seconds, _ = _timed(lambda: batch_loop(model, images, batch_size))
        batch_loop_s = min(batch_loop_s, seconds)
        decode_s = min(decode_s, decode_only(meta, files, batch_size)[0])
    baseline_files = files[:baseline_n]
    baseline_s = decavision_style(model, meta, baseline_files, batch_size)
    rates = {
        "labeling": labeled / label_s,
        "labeling_decoding_files": labeled / decoding_s,
        "predict_in_memory": n / predict_s,
        "predict_on_batch_in_memory": n / batch_loop_s,
        "decode_only": n / decode_s,
        "decavision_style": len(baseline_files) / baseline_s,
    }
    # Decoding and the model share the same cores: at best one image costs 1/D + 1/P seconds
    # of the whole machine, so labeling/predict <= D / (D + P).
    bound = rates["decode_only"] / (rates["decode_only"] + rates["predict_in_memory"])
    # From the decoded copy nothing is decoded, but the folder is still listed and the CSV
    # written: labeling/predict <= predict / (predict + list + table).
    bound_copy = predict_s / (predict_s + list_s + table_s)
    return {
        "teacher": teacher,
        "images": n,
        "batch_size": batch_size,
        "repeats": repeats,
        "images_per_s": {k: round(v, 1) for k, v in rates.items()},
        "ratio_labeling_to_predict": round(rates["labeling"] / rates["predict_in_memory"], 3),
        "ratio_labeling_decoding_files_to_predict": round(
            rates["labeling_decoding_files"] / rates["predict_in_memory"], 3
        ),
        "decoded_copy_seconds": round(copy_s, 2),
        "ratio_labeling_to_predict_on_batch": round(
            rates["labeling"] / rates["predict_on_batch_in_memory"], 3
        ),
        "ratio_bound_from_decode": round(bound, 3),
        "seconds_listing_the_folder": round(list_s, 3),
        "seconds_writing_the_csv": round(table_s, 3),
        "ratio_bound_with_the_copy": round(bound_copy, 3),
        "decavision_images": len(baseline_files),
        "ratio_decavision_to_predict": round(
            rates["decavision_style"] / rates["predict_in_memory"], 3
        ),
    }


def child_memory(teacher: str, n: int, batch_size: int, workdir: Path) -> dict:
    """Peak RSS of labeling n images in this (fresh) process."""
    model, meta = build_teacher(teacher)
    folder = image_folder(workdir, n)
    ensure_copy(meta, folder)  # as ingest leaves it
    seconds, labeled = label(model, meta, folder, batch_size)
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {"images": labeled, "seconds": round(seconds, 1), "peak_rss_mb": round(peak_kb / 1024)}


def memory(teacher: str, sizes: list[int], batch_size: int, workdir: Path) -> dict:
    results = {}
    _, meta = build_teacher(teacher)
    for n in sizes:
        # The folder and its decoded copy written by the parent, so the child only labels.
        ensure_copy(meta, image_folder(workdir, n))
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--teacher",
                teacher,
                "--batch-size",
                str(batch_size),
                "--workdir",
                str(workdir),
                "--child",
                str(n),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        results[n] = json.loads(out.stdout.strip().splitlines()[-1])
        log.info("memory %s n=%d: %s", teacher, n, results[n])
    small, large = min(sizes), max(sizes)
    ratio = results[large]["peak_rss_mb"] / results[small]["peak_rss_mb"]
    return {"runs": results, f"ratio_{large}_to_{small}": round(ratio, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", choices=TEACHERS, default="small_cnn")
    parser.add_argument("--images", type=int, default=20000, help="0 skips the throughput run")
    parser.add_argument("--memory-sizes", type=int, nargs="*", default=[10000, 100000])
    parser.add_argument(
        "--baseline-images",
        type=int,
        default=5000,
        help="images for the (slow) decavision-style loop",
    )
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3, help="best of this many runs")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/labeling_bench"))
    parser.add_argument("--out", type=Path, help="also write the results as JSON here")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("pseudolabel", "absl"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    args.workdir.mkdir(parents=True, exist_ok=True)
    if args.child:
        print(json.dumps(child_memory(args.teacher, args.child, args.batch_size, args.workdir)))
        return
    results: dict = {"teacher": args.teacher, "cpus": os.cpu_count()}
    if args.images:
        results["throughput"] = throughput(
            args.teacher,
            args.images,
            args.baseline_images,
            args.batch_size,
            args.workdir,
            args.repeats,
        )
        log.info("throughput: %s", results["throughput"])
    if len(args.memory_sizes) >= 2:
        results["memory"] = memory(args.teacher, args.memory_sizes, args.batch_size, args.workdir)
    print(json.dumps(results, indent=2))
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
