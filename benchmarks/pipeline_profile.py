"""Where the demo's time goes: seconds and images/s per stage, and per phase of the student's
step, as ratios to bare baselines measured in the same run.

    .venv/bin/python benchmarks/pipeline_profile.py                 # the demo's stages, full size
    .venv/bin/python benchmarks/pipeline_profile.py --scale 0.1     # a scaled-down copy (~2 min)
    .venv/bin/python benchmarks/pipeline_profile.py --skip-stages   # the phase table only

Stages: the demo's configuration (conf/, Fashion-MNIST) run through the pipeline's own stage
functions in `dvc repro`'s order, in a scratch project under --work; `--scale` multiplies the
epochs of the teacher, the baseline and the student and the number of unlabeled images
(1.0 = the demo). Images/s counts the images a stage pushes through its network (a training
step of the consistency student: its labeled batch plus `ratio` unlabeled images, each seen
twice: a weak view in inference and a strong one in training).

Phases of the student's step (fixed in-memory batches of the demo's shape, no input pipeline):
decode (tf.data decoding the unlabeled PNGs), augment (the weak and strong views), forward
(the weak-view inference pass), the bare training step (`fit` of the classifier alone on the
same 128 images: the baseline every phase is a ratio of), the whole consistency step, and the
variants the issue asks about: the step in float32 instead of bfloat16, and XLA (`jit_compile`)
on the bare step (Keras refuses XLA on the consistency step: its augmentation layers do not
support it). Writes --out (JSON) and prints both tables.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

# pseudolabel first: it sets TensorFlow's environment (oneDNN, logging) before TensorFlow
# loads, which reads it once (docs/speed.md)
import pseudolabel  # noqa: F401

# isort: split

import keras
import numpy as np
import tensorflow as tf

from pseudolabel import consistency, fitting, stages
from pseudolabel.config import compose, no_augmentation
from pseudolabel.data import sources
from pseudolabel.data.images import decode_image, list_images
from pseudolabel.models.builders import augmentation_layers, build_model
from pseudolabel.paths import Paths

ORDER = ("ingest", "train_teacher", "train_baseline", "pseudo_label", "merge", "train_student",
         "evaluate")  # fmt: skip


def _unlabeled(cfg) -> int:
    """data.unlabeled, or with null (all of them) what the labeled splits leave."""
    if cfg.data.unlabeled is not None:
        return cfg.data.unlabeled
    source = sources.load(cfg.data.source, cfg.data.idx_dir)
    per_class = cfg.data.train_per_class + cfg.data.val_per_class
    return len(source.train_labels) - per_class * len(source.class_names)


def scaled_config(scale: float, overrides: list[str]):
    cfg = compose(overrides)
    if scale == 1.0:
        return cfg
    epochs = {
        role: max(1, round(cfg[role].train.epochs * scale)) for role in ("teacher", "student")
    }
    return compose(
        [
            *overrides,
            f"data.unlabeled={max(1000, round(_unlabeled(cfg) * scale))}",
            *(f"{role}.train.epochs={n}" for role, n in epochs.items()),
            *(f"{role}.train.patience={n}" for role, n in epochs.items()),
        ]
    )


def _read(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def profile_stages(cfg, work: Path) -> list[dict]:
    """Each stage of the demo, timed, with the images it pushed through its network."""
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"
    paths = Paths(work)
    rows = []
    for name in ORDER:
        print(f"stage {name} ...", flush=True)
        start = time.perf_counter()
        stages.STAGES[name](cfg, paths)
        seconds = time.perf_counter() - start
        images = None
        if name == "ingest":
            images = sum(len(list_images(d)) for d in (paths.train, paths.val, paths.test))
            images += len(list_images(paths.unlabeled))
        elif name.startswith("train_"):
            role = name.removeprefix("train_")
            steps = _read(paths.metrics / f"{role}.json").get("steps", 0)
            per_step = cfg["teacher" if role == "teacher" else "student"].train.batch_size
            if role == "student" and cfg.student.consistency.enabled:
                per_step *= 1 + 2 * cfg.student.consistency.ratio
            images = steps * per_step
        elif name == "pseudo_label":
            images = _read(paths.metrics / "pseudo_label.json").get("images")
        elif name == "evaluate":
            images = len(list_images(paths.test))
        rows.append(
            {
                "stage": name,
                "seconds": round(seconds, 1),
                "images": images,
                "images_per_s": round(images / seconds, 1) if images else None,
            }
        )
        print(f"stage {name}: {seconds:.1f} s", flush=True)
    total = sum(r["seconds"] for r in rows)
    for row in rows:
        row["share"] = round(row["seconds"] / total, 3)
    return rows


def _rate(fn, calls: int, images_per_call: int) -> float:
    fn()  # warm-up: tracing, allocation
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return calls * images_per_call / (time.perf_counter() - start)


def _fit_rate(model: keras.Model, data, steps: int, images_per_step: int) -> float:
    model.fit(data, steps_per_epoch=5, epochs=1, verbose=0)  # tracing
    start = time.perf_counter()
    model.fit(data, steps_per_epoch=steps, epochs=1, verbose=0)
    return steps * images_per_step / (time.perf_counter() - start)


def step_batches(cfg, n: int = 10):
    """One step's in-memory batches of the demo's shape, repeated: (the consistency step's
    labeled + unlabeled batch, the bare step's batch of as many labeled images, and its x_u)."""
    student, size, channels = cfg.student, list(cfg.data.image_size), cfg.data.channels
    b = student.train.batch_size
    u = student.consistency.ratio * b
    rng = np.random.default_rng(0)
    x_l = rng.integers(0, 256, (b, *size, channels)).astype(np.uint8)
    y_l = np.eye(n, dtype=np.float32)[rng.integers(0, n, b)]
    x_u = rng.integers(0, 256, (u, *size, channels)).astype(np.uint8)
    side = (np.full((u, n), 1 / n, np.float32), np.ones(u, np.float32),
            np.full(u, -1, np.int32), np.arange(u, dtype=np.int32))  # fmt: skip
    step_data = tf.data.Dataset.from_tensors(((x_l, y_l), (x_u, *side))).repeat()
    both = np.concatenate([x_l, x_u]).astype(np.float32)
    bare_data = tf.data.Dataset.from_tensors(
        (both, np.eye(n, dtype=np.float32)[rng.integers(0, n, b + u)])
    ).repeat()
    return step_data, bare_data, x_u


def student_classifier(cfg, mixed: bool, n: int = 10) -> keras.Model:
    keras.utils.set_random_seed(0)
    size, channels = list(cfg.data.image_size), cfg.data.channels
    with fitting.precision(mixed):
        return build_model(cfg.student.model, no_augmentation(), n, size, channels, "student")


def student_optimizer(cfg) -> keras.optimizers.Optimizer:
    ema = cfg.student.train.ema
    return keras.optimizers.Adam(1e-3, use_ema=bool(ema), ema_momentum=ema or 0.99)


def consistency_step_model(cfg, mixed: bool, steps: int, n: int = 10) -> keras.Model:
    """The consistency student's keras.Model (its train_step) around the default classifier,
    compiled: what one step of train_student runs."""
    student = cfg.student
    with fitting.precision(mixed):
        model = consistency.ConsistencyModel(
            student_classifier(cfg, mixed, n), augmentation_layers(student.consistency.weak),
            augmentation_layers(student.consistency.strong), student.consistency, n, 20000,
            np.ones(n), total_steps=steps * 10, label_smoothing=0.0,
        )  # fmt: skip
    model.compile(optimizer=student_optimizer(cfg))
    return model


def profile_phases(cfg, unlabeled: list[str], steps: int, repeats: int = 3) -> dict:
    """Images/s of each phase of the student's step on in-memory batches (see the docstring)."""
    student, n, size, channels = cfg.student, 10, list(cfg.data.image_size), cfg.data.channels
    b = student.train.batch_size
    u = student.consistency.ratio * b
    step_data, bare_data, x_u = step_batches(cfg, n)

    def classifier(mixed: bool):
        return student_classifier(cfg, mixed, n)

    def optimizer():
        return student_optimizer(cfg)

    def bare(mixed: bool, jit: bool) -> float:
        model = classifier(mixed)
        model.compile(optimizer=optimizer(), loss="categorical_crossentropy", jit_compile=jit)
        return _fit_rate(model, bare_data, steps, b + u)

    def step(mixed: bool) -> float:
        model = consistency_step_model(cfg, mixed, steps, n)
        return _fit_rate(model, step_data, steps, b + u)  # images trained on per step

    mixed = bool(student.train.mixed_precision)
    print("phases: decode ...", flush=True)
    decode = None
    if unlabeled:
        files = tf.data.Dataset.from_tensor_slices(unlabeled[:4000]).map(
            lambda p: decode_image(p, size, channels), num_parallel_calls=tf.data.AUTOTUNE
        )
        start = time.perf_counter()
        for _ in files.batch(256):
            pass
        decode = min(len(unlabeled), 4000) / (time.perf_counter() - start)
    weak = augmentation_layers(student.consistency.weak)
    strong = augmentation_layers(student.consistency.strong)
    view = tf.function(lambda x: consistency.ConsistencyModel._view(weak, x))
    strong_view = tf.function(
        lambda x: consistency.ConsistencyModel._view(strong, x, consistency.STRONG_SLICES)
    )
    xu = tf.constant(x_u)
    print("phases: augment, forward ...", flush=True)
    augment = _rate(lambda: (view(xu), strong_view(xu)), steps, u)
    net = classifier(mixed)
    infer = tf.function(lambda x: net(x, training=False))
    xf = tf.constant(x_u.astype(np.float32))
    forward = _rate(lambda: infer(xf), steps, u)
    print("phases: training steps ...", flush=True)
    variants = {
        "bare_step": lambda: bare(mixed, False),
        "consistency_step": lambda: step(mixed),
        "consistency_step_other_precision": lambda: step(not mixed),
        "bare_step_xla": lambda: bare(mixed, True),
        "bare_step_other_precision": lambda: bare(not mixed, False),
    }
    best: dict[str, float] = {}
    for _ in range(repeats):  # alternating, best of: a disturbance hits one run, not a variant
        for name, measure in variants.items():
            best[name] = max(best.get(name, 0.0), measure())
    rates = {
        "decode_png": decode,
        "augment_weak_and_strong": augment,
        "forward_weak_view": forward,
        **best,
    }
    base = rates["bare_step"]
    return {
        "mixed_precision": mixed,
        "steps": steps,
        "repeats": repeats,
        "images_per_s": {k: round(v, 1) for k, v in rates.items() if v},
        "ratio_to_bare_step": {k: round(v / base, 3) for k, v in rates.items() if v},
    }


def _table(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=float, default=1.0, help="epochs and unlabeled x this")
    parser.add_argument("--steps", type=int, default=100, help="steps per phase measurement")
    parser.add_argument("--repeats", type=int, default=3, help="best of this many, alternating")
    parser.add_argument("--skip-stages", action="store_true", help="only the phase table")
    parser.add_argument("--work", type=Path, default=None, help="scratch project (default: tmp)")
    default_out = Path(__file__).parent / "results" / "pipeline_profile.json"
    parser.add_argument("--out", type=Path, default=default_out, help="the JSON written")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every stage")
    args = parser.parse_args(argv)
    cfg = scaled_config(args.scale, args.overrides)
    work = args.work or Path(tempfile.mkdtemp(prefix="pipeline_profile_"))
    work.mkdir(parents=True, exist_ok=True)
    result: dict = {
        "command": " ".join(["benchmarks/pipeline_profile.py", *(argv or sys.argv[1:])]),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "scale": args.scale,
        "load_average_at_start": round(os.getloadavg()[0], 2),
    }
    if os.getloadavg()[0] > 0.5:
        print(f"warning: load average {os.getloadavg()[0]:.1f}: other jobs share the CPU; "
              "oversubscribed cores make TensorFlow's thread pools spin and the phase rates "
              "meaningless. Measure on an idle machine.", flush=True)  # fmt: skip
    if not args.skip_stages:
        result["stages"] = profile_stages(cfg, work)
        result["pipeline_seconds"] = round(sum(r["seconds"] for r in result["stages"]), 1)
        unlabeled = [str(p) for p in list_images(Paths(work).unlabeled)]
    else:
        stages.STAGES["ingest"](cfg, Paths(work))
        unlabeled = [str(p) for p in list_images(Paths(work).unlabeled)]
    result["phases"] = profile_phases(cfg, unlabeled, args.steps, args.repeats)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(args.out)
    if "stages" in result:
        print(_table(result["stages"], ["stage", "seconds", "share", "images", "images_per_s"]))
        print(f"pipeline: {result['pipeline_seconds']} s")
    phases = result["phases"]
    rows = [{"phase": k, "images/s": v, "x bare step": phases["ratio_to_bare_step"][k]}
            for k, v in phases["images_per_s"].items()]  # fmt: skip
    print(_table(rows, ["phase", "images/s", "x bare step"]))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
