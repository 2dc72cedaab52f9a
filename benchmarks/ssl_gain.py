"""Do the unlabeled images pay? The student against the best labeled-only model.

For each label budget and seed, on Fashion-MNIST (Debian's IDX files), through the pipeline's own
public stage functions; the labeled split, the teacher and its pseudo-labels are shared by every
setting of a seed (paired seeds):

- teacher: `train_teacher` on the labeled images; `pseudo_label` and `merge` as in `dvc repro`;
- per setting (a named set of Hydra overrides, SETTINGS) and compute multiplier (1x, 2x, 4x the
  student's epochs): the student (`train_student`) and its labeled-only baseline
  (`train_baseline`: the student's network, views, steps and EMA on the labeled images alone);
- best labeled-only = the best teacher or baseline of that labeled split (budget, seed, data.*)
  at no more compute, whatever teacher or student recipe trained it; gain = student - best
  labeled-only, in points;
- precision of the teacher's kept pseudo-labels, and (consistency) of the student's own online
  pseudo-labels, against the true labels; per part its seconds, optimiser steps and images
  through the network (`*_images`: trained on, and forward only: the weak views), so recipes
  compare at equal seconds as well as at equal steps (issue 31), and how much of the machine's
  CPU time other processes and the hypervisor took meanwhile (`cpu_other`, `cpu_steal`;
  `cpu_shared` when the seconds are no timing);
- with --test-curves: test accuracy after every epoch of every student and baseline;
- with --full-reference EPOCHS: the teacher's recipe on (nearly) all 60,000 labels, and the share
  of the labeled-only -> all-labels gap the student closes (stretch target: half).

    python benchmarks/ssl_gain.py --budgets 50 --seeds 0                     # one seed, 1x
    python benchmarks/ssl_gain.py --budgets 10 50 --seeds 0 1 2              # the 3-seed tables
    python benchmarks/ssl_gain.py --budgets 50 --seeds 0 --compute 1 2 4     # gain vs compute
    python benchmarks/ssl_gain.py --settings offline consistency --seeds 0   # both recipes
    python benchmarks/ssl_gain.py --budgets 50 --seeds 0 -- student.consistency.threshold=0.9

Extra arguments after `--` are Hydra overrides applied to every run, on top of the committed
defaults of conf/ without this working copy's conf/project.yaml (`make demo` records its profile
there: `config.compose_defaults`), so a row means the same whatever was composed last. Rows are
merged into benchmarks/results/ssl_gain.json (committed: the docs' tables are generated from it
by benchmarks/gain_tables.py); a row with the same budget, seed, setting, compute and overrides
is replaced.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import math
import os
import platform
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

# pseudolabel first: it sets TensorFlow's environment (oneDNN, logging) before TensorFlow
# loads, which reads it once (docs/speed.md)
import pseudolabel

# isort: split

import keras
import numpy as np
import pandas as pd
from omegaconf import OmegaConf

from pseudolabel import merged_set, ood, stages, tracking
from pseudolabel.config import compose_defaults
from pseudolabel.data import sources
from pseudolabel.data.images import (
    class_names_from,
    labeled_dataset,
    labeled_files,
    list_images,
)
from pseudolabel.errors import PseudoLabelError
from pseudolabel.evaluation import evaluate
from pseudolabel.models import io as model_io
from pseudolabel.paths import Paths

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gain_tables import row_machine  # noqa: E402  (light: numpy and the doc blocks)

RESULTS = Path(__file__).resolve().parent / "results"
INDEX = re.compile(r"train_(\d+)(?:-\d+)?\.png$")  # -N: a duplicated copy (topk)
# The recipes compared. offline: the teacher's soft pseudo-labels in a merged set (the pipeline
# before consistency training); consistency: + the online FixMatch/FlexMatch term on every
# unlabeled image (src/pseudolabel/consistency.py).
SETTINGS = {
    "offline": [
        "student.consistency.enabled=false",
        "student.init_from_teacher=false",
        "student.train.epochs=12",
        "student.train.batch_size=64",
        "student.train.ema=0.0",
        "student.train.label_smoothing=0.1",
        "student.train.steps_per_epoch=null",  # one pass over the merged set per epoch
    ],
    "consistency": ["student.consistency.enabled=true"],
}


def truth_of(idx_dir: str):
    """path under data/unlabeled -> true class name, from the Fashion-MNIST index in the name."""
    source = sources.fashion_mnist(idx_dir)
    names = list(source.class_names)

    def lookup(rel_paths: list[str]) -> list[str | None]:
        out = []
        for rel in rel_paths:
            match = INDEX.search(rel)
            out.append(names[source.train_labels[int(match.group(1))]] if match else None)
        return out

    return lookup


def pseudo_label_precision(paths: Paths, lookup) -> float:
    """Share of the kept (merged) pseudo-labels that equal the true label."""
    manifest = merged_set.read_manifest(paths.merged)
    pseudo = manifest[manifest["source"] == "pseudo"]
    if pseudo.empty:
        return float("nan")
    true = lookup(list(pseudo["file"]))
    return float((pseudo["label"].to_numpy() == np.asarray(true)).mean())


class TestCurve(keras.callbacks.Callback):
    """Test accuracy after every epoch (the live weights; the saved model may be their EMA)."""

    def __init__(self, test_folder: Path, class_names, image_size, channels):
        super().__init__()
        files, labels = labeled_files(test_folder, class_names)
        self.labels = labels
        self.ds = labeled_dataset(files, labels, len(class_names), image_size, channels, 512)
        self.curve: list[float] = []

    def on_epoch_end(self, epoch, logs=None):
        probs = np.concatenate([np.asarray(self.model(x, training=False)) for x, _ in self.ds])
        self.curve.append(round(float((probs.argmax(1) == self.labels).mean()), 4))


def _link_shared(shared: Paths, run: Paths) -> None:
    """A setting's folder sees the seed's pseudo-labels and merged set (read-only links), and
    the labeling's and merge's metrics the student reads (pseudo_label.json: class_mix, which
    student.consistency.alignment_target pool and auto read)."""
    for rel in ("outputs", "data/train_ssl"):
        target = run.root / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            target.symlink_to((shared.root / rel).resolve(), target_is_directory=True)
    (run.metrics).mkdir(parents=True, exist_ok=True)
    for name in ("merge.json", "pseudo_label.json"):
        (run.metrics / name).write_text((shared.metrics / name).read_text())


def cpu_model() -> str:
    """The CPU's model name (lscpu), which every result row records."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or "unknown"


def machine(kernels: bool = True) -> str:
    """What a result row records about the machine: CPU model, cores, widest vector ISA and
    TensorFlow's CPU kernels (AVX-512 or AVX2, oneDNN or Eigen change TensorFlow's CPU speed
    several-fold, and the kernels the trained weights: a teacher of one split and seed trained
    to 0.8296 under Eigen and 0.8266 under oneDNN on the same AVX2 VM, 0.8189 on a Zen 4).
    `kernels=False`: not the kernels (a benchmark whose runs choose their own)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        flags = ""
    simd = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    described = f"{cpu_model()}, {os.cpu_count()} CPUs, {simd}"
    if not kernels:
        return described
    backend = {True: "oneDNN", False: "Eigen", None: "kernels unknown"}[
        pseudolabel.onednn_enabled()
    ]
    return f"{described}, {backend}"


def code_version(code: tuple[str, ...] = ("benchmarks/ssl_gain.py",)) -> str | None:
    """The commit the benchmark ran ("+dirty" with uncommitted changes to src/, conf/ or the
    benchmark's own `code`): a row's overrides mean what that commit's defaults made of them."""
    root = Path(__file__).resolve().parents[1]
    commit = tracking.git_commit(root)
    if commit is None:
        return None
    changed = subprocess.run(
        ["git", "status", "--porcelain", "--", "src", "conf", *code],
        cwd=root,
        capture_output=True,
        text=True,
    ).stdout.strip()
    return commit[:7] + ("+dirty" if changed else "")


# A part's seconds are a timing only when nothing else ran: at least this share of the machine's
# CPU time used by other processes marks its row `cpu_shared` (the docs read its minutes as upper
# bounds).
CPU_SHARED = 0.10


def cpu_seconds() -> tuple[float, float, float]:
    """CPU seconds so far: the whole machine's busy time and the time its hypervisor stole
    (/proc/stat, all CPUs; nan elsewhere), and this process's with its waited-for children."""
    own = sum(
        usage.ru_utime + usage.ru_stime
        for usage in (resource.getrusage(resource.RUSAGE_SELF),
                      resource.getrusage(resource.RUSAGE_CHILDREN))
    )  # fmt: skip
    try:
        ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return math.nan, math.nan, own
    user, nice, system, _idle, _iowait, irq, softirq, steal = ticks + [0] * (8 - len(ticks))
    hz = os.sysconf("SC_CLK_TCK")
    return (user + nice + system + irq + softirq) / hz, steal / hz, own


class CpuUse:
    """Who else used the CPU between its start and `shares()`: `cpu_other`, the share of the
    machine's CPU time (wall seconds x CPUs) that other processes used (another benchmark, a
    test suite: the row's seconds are then no timing), and `cpu_steal`, the share its
    hypervisor took (a host throttling the VM)."""

    def __init__(self) -> None:
        self.start, self.wall = cpu_seconds(), time.perf_counter()

    def shares(self) -> dict:
        busy, steal, own = (b - a for a, b in zip(self.start, cpu_seconds(), strict=True))
        capacity = max(time.perf_counter() - self.wall, 1e-9) * (os.cpu_count() or 1)
        if math.isnan(busy):
            return {}
        return {"cpu_other": round(max(busy - own, 0.0) / capacity, 3),
                "cpu_steal": round(steal / capacity, 3)}  # fmt: skip


def cpu_shared(*shares: dict) -> bool:
    """Whether any of these parts' CPU was shared enough for its seconds to be no timing."""
    return any(part.get("cpu_other", 0.0) >= CPU_SHARED for part in shares)


def _test_accuracy(path: Path, test: Path) -> float:
    model, meta = model_io.load(path)
    return evaluate(model, meta, test).accuracy


def shared_overrides(overrides: list[str]) -> list[str]:
    """The overrides the shared part (ingest, teacher, labels, merge) depends on: not `student.*`,
    which only the student and its baseline read. Two student recipes on the same seed thus share
    one labeled split, teacher and CSV (paired), and their baselines are peers (`with_gains`)."""
    later = ("student.", "pseudo_label.rounds=")  # read from round 2 on only
    return [o for o in overrides if not o.lstrip("+~").startswith(later)]


def run_folder_name(label: str, limit: int = 200) -> str:
    """A folder name for one setting's run: readable, and within the file system's 255 bytes
    (a long override list is cut and a hash of the whole keeps two lists apart)."""
    name = re.sub(r"[^\w.=-]+", "_", label)
    if len(name) <= limit:
        return name  # unchanged for short lists, so existing work folders are reused
    return f"{name[: limit - 13]}_{hashlib.sha1(name.encode()).hexdigest()[:12]}"


def shared_part(budget: int, seed: int, overrides: list[str], work: Path) -> tuple[Paths, dict]:
    """ingest, teacher, pseudo_label, merge for one budget and seed (reused when done)."""
    root = work / f"budget{budget}_seed{seed}"
    root.mkdir(parents=True, exist_ok=True)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
    overrides = shared_overrides(overrides)
    cfg = compose_defaults([f"data.train_per_class={budget}", f"seed={seed}", *overrides])
    paths = Paths(root)
    done = root / "shared_done.json"
    key = json.dumps([budget, seed, overrides])
    previous = json.loads(done.read_text()) if done.is_file() else {}
    if previous.get("key") == key:
        print(f"[budget {budget}, seed {seed}] teacher and pseudo-labels reused", flush=True)
        return paths, previous["info"]
    seconds = {}
    use = CpuUse()
    for name in ("ingest", "train_teacher", "pseudo_label", "merge"):
        print(f"[budget {budget}, seed {seed}] {name}", flush=True)
        start = time.perf_counter()
        stages.STAGES[name](cfg, paths)
        seconds[name] = round(time.perf_counter() - start, 1)
    lookup = truth_of(cfg.data.idx_dir)
    info = {
        "teacher": _test_accuracy(paths.model("teacher"), paths.test),
        "teacher_digest": weights_digest(paths.model("teacher")),
        "split_digest": split_digest(paths),
        "pseudo_label_precision": pseudo_label_precision(paths, lookup),
        "pseudo_labeled": json.loads((paths.metrics / "merge.json").read_text())["pseudo_labeled"],
        "ood_flagged": flagged_share(paths),
        "seconds": seconds,
        "cpu": use.shares(),
    }
    done.write_text(json.dumps({"key": key, "info": info}))
    return paths, info


def run_setting(
    shared: Paths,
    budget: int,
    seed: int,
    setting: str,
    compute: int,
    overrides,
    curves: bool,
    settings: dict[str, list[str]] = SETTINGS,
    truth=None,
    baseline: dict | None = None,
    label: str | None = None,
) -> dict:
    """The student and its labeled-only baseline of one setting at `compute` x the epochs.

    For other benchmarks (benchmarks/messy_pools.py): `settings` names the recipes, `truth` is
    the unlabeled images' truth lookup (default: Fashion-MNIST's index in the file name),
    `baseline` a row of the same labeled split and student recipe whose baseline this setting
    reuses instead of training one, `label` the progress lines' prefix."""
    label = label or f"budget {budget}, seed {seed}"
    chosen = [f"data.train_per_class={budget}", f"seed={seed}", *settings[setting], *overrides]
    epochs = compose_defaults(chosen).student.train.epochs * compute
    cfg = compose_defaults(
        [*chosen, f"student.train.epochs={epochs}", f"student.train.patience={epochs}"]
    )
    tag = "".join(f"_{o}" for o in overrides if o not in shared_overrides(overrides))
    run = Paths(
        shared.root / run_folder_name(f"{setting}_x{compute}{tag}"),
        data_root=shared.input_root,
        teacher_model=shared.model("teacher"),
    )
    _link_shared(shared, run)
    lookup = truth or truth_of(cfg.data.idx_dir)
    class_names = class_names_from(shared.train)  # not iterdir: .decoded/ is a folder too
    row: dict = {"budget": budget, "seed": seed, "setting": setting, "compute": compute}
    row["overrides"] = overrides
    row["code"] = code_version()
    row["cpu"] = machine()
    use = CpuUse()
    for part in ("baseline", "student"):
        if part == "baseline" and baseline is not None:
            print(f"[{label}] {setting} x{compute}: baseline of {baseline['setting']}", flush=True)
            copied = ("baseline", "baseline_steps", "baseline_images")
            row.update({k: baseline[k] for k in copied if k in baseline})
            row["baseline_seconds"] = 0.0  # trained by that setting
            row["baseline_from"] = baseline["setting"]
            continue
        print(f"[{label}] {setting} x{compute}: {part}", flush=True)
        callback = [TestCurve(shared.test, class_names, cfg.data.image_size, cfg.data.channels)]
        callbacks = callback if curves else []
        start = time.perf_counter()
        if part == "baseline":
            metrics = stages.train_baseline(cfg, run, callbacks=callbacks)
        else:
            metrics = stages.train_student(cfg, run, truth=lookup, callbacks=callbacks)
        row[f"{part}_seconds"] = round(time.perf_counter() - start, 1)
        row[part] = _test_accuracy(run.model(part), shared.test)
        row[f"{part}_steps"] = _steps(metrics)
        row[f"{part}_images"] = _images(metrics)
        if curves:
            row[f"{part}_test_curve"] = callback[0].curve
    online = _online_last_epoch(run.history("student"))
    row.update(online)  # round 1's (every row has it)
    if cfg.pseudo_label.rounds > 1:  # Noisy Student: each round's student relabels for the next
        row["rounds"] = cfg.pseudo_label.rounds
        row["student_by_round"] = [row["student"]]
        for number in range(2, cfg.pseudo_label.rounds + 1):
            print(f"[{label}] {setting} x{compute}: round {number}", flush=True)
            start = time.perf_counter()
            metrics = stages.run_round(cfg, run, number, truth=lookup)
            row["student_seconds"] += round(time.perf_counter() - start, 1)
            row["student_steps"] += _steps(metrics)
            row["student_images"] = {
                k: v + row["student_images"][k] for k, v in _images(metrics).items()
            }
            accuracy = _test_accuracy(run.round(number).model("student"), shared.test)
            row["student_by_round"].append(accuracy)
            for key, value in _online_last_epoch(run.round(number).history("student")).items():
                row.setdefault(f"{key}_by_round", [online.get(key)]).append(value)
        row["student"] = row["student_by_round"][-1]
    row.update(use.shares())  # the baseline's and the student's part
    return row


def _online_last_epoch(history_csv: Path) -> dict:
    """A consistency student's last epoch: the share of its online targets that are right and
    its mask rate (the mean weight, for SoftMatch's), from its history (plots/train/)."""
    history = pd.read_csv(history_csv)
    if "pseudo_precision" not in history:
        return {}
    last = history.iloc[-1]
    return {
        "online_pseudo_precision_last_epoch": round(float(last["pseudo_precision"]), 4),
        "mask_rate_last_epoch": round(float(last["mask_rate"]), 4),
    }


def _steps(metrics: dict) -> int:
    """Optimiser steps of one training (the stage's metrics): a rotation warm-up's
    (student.consistency.warmup_steps) count, being compute like the training's."""
    return metrics["steps"] + metrics.get("warmup_steps", 0)


def _images(metrics: dict) -> dict:
    """Images through the network (the stage's metrics): trained on (forward and backward) and
    forward only (the consistency student's weak views), beside the steps and seconds."""
    return {k: metrics.get(f"images_{k}", 0) for k in ("trained", "forward_only")}


def full_reference(epochs: int, seed: int, overrides: list[str], work: Path) -> dict:
    """The student's network (trained by the teacher stage, so without unlabeled images) on
    every labeled Fashion-MNIST training image (5,970 per class; 20 per class stay for val, a
    few must remain unlabeled for the split) for `epochs` epochs at batch 128: the "same
    network on all labels" accuracy of the stretch target. Records the test accuracy after
    every epoch (`test_curve`, the live weights) and the val accuracy (`val_curve`): whether
    it converged is read from them and from a run of half the epochs (`ceiling`)."""
    root = work / f"full_reference_seed{seed}_epochs{epochs}"
    root.mkdir(parents=True, exist_ok=True)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
    cfg = compose_defaults(
        [
            "data.train_per_class=5970",
            "data.unlabeled=10",
            f"seed={seed}",
            *overrides,
            "teacher.model=${student.model}",
            f"teacher.train.epochs={epochs}",
            f"teacher.train.patience={epochs}",
            "teacher.train.batch_size=128",
        ]
    )
    paths = Paths(root)
    start, use = time.perf_counter(), CpuUse()
    print(f"[all labels, seed {seed}, {epochs} epochs] ingest", flush=True)
    stages.STAGES["ingest"](cfg, paths)
    class_names = class_names_from(paths.train)  # not iterdir: .decoded/ is a folder too
    curve = TestCurve(paths.test, class_names, cfg.data.image_size, cfg.data.channels)
    print(f"[all labels, seed {seed}, {epochs} epochs] train_teacher", flush=True)
    stages.train_teacher(cfg, paths, callbacks=[curve])
    model, meta = model_io.load(paths.model("teacher"))
    accuracy = evaluate(model, meta, paths.test).accuracy
    labeled = len(list_images(paths.train))
    seconds = round(time.perf_counter() - start, 1)
    shares = use.shares()
    history = pd.read_csv(paths.history("teacher"))
    if curve.curve and abs(max(curve.curve) - accuracy) > 0.05:  # the curve's labels are off
        raise RuntimeError(f"test curve {curve.curve} disagrees with the test accuracy {accuracy}")
    return {"seed": seed, "epochs": epochs, "labeled": labeled, "accuracy": accuracy,
            "seconds": seconds, "overrides": overrides, "code": code_version(),
            "cpu": machine(), "test_curve": curve.curve,
            "val_curve": [round(float(v), 4) for v in history["val_accuracy"]],
            **shares, **({"cpu_shared": cpu_shared(shares)} if shares else {})}  # fmt: skip


def ceiling(runs: list[dict]) -> dict:
    """The all-labels reference the gap-closed shares use: the run with the most epochs. With a
    run of the same seed and recipe at half its epochs or fewer, `doubling_gain` says what the
    last doubling of the epochs added (test accuracy, points): under 0.3, `converged`."""
    top = max(runs, key=lambda r: (r["epochs"], r.get("seconds", 0)))
    shorter = [
        r for r in runs
        if r["seed"] == top["seed"] and r.get("overrides") == top.get("overrides")
        and 2 * r["epochs"] <= top["epochs"]
    ]  # fmt: skip
    out = dict(top)
    if shorter:
        half = max(shorter, key=lambda r: r["epochs"])
        out["doubling_gain"] = round(100 * (top["accuracy"] - half["accuracy"]), 2)
        out["doubling_from"] = half["epochs"]
        out["converged"] = out["doubling_gain"] < 0.3
    return out


FASHION_MNIST_TRAIN = 60_000  # training images, 10 classes


@functools.cache
def _composed(overrides: tuple[str, ...]) -> str:
    """The composed, validated config of `overrides` (without its digest), as text."""
    values = OmegaConf.to_container(compose_defaults(list(overrides)), resolve=True)
    values.pop("params_digest", None)
    data = values["data"]
    if (
        data["source"] == "fashion_mnist"
        and data["unlabeled"] is None
        and data["test_per_class"] is None
    ):
        # null: every training image the labeled split leaves, which rows spell as a count
        data["unlabeled"] = FASHION_MNIST_TRAIN - 10 * (
            data["train_per_class"] + data["val_per_class"]
        )
    return json.dumps(values, sort_keys=True, default=str)


def recipe_is_default(scenario: list[str], recipe: list[str]) -> bool:
    """Whether `recipe` (a row's overrides) changes nothing in the committed conf/ on top of
    `scenario` (the label budget and seed: what is measured, not how): the row ran today's
    default recipe. Recomputed on every save, so a change of a default moves the flag."""
    try:
        return _composed(tuple([*scenario, *recipe])) == _composed(tuple(scenario))
    except PseudoLabelError:  # a key today's conf/ no longer has: not today's recipe
        return False


EXCLUDE = "pseudo_label.ood.exclude="


def flagged_share(paths: Paths) -> float | None:
    """The share of the unlabeled pool the teacher's labeling flagged out of distribution
    (metrics/pseudo_label.json), what pseudo_label.ood.exclude=auto decides on; None: no score."""
    metrics = json.loads((paths.metrics / "pseudo_label.json").read_text())
    return metrics.get("ood", {}).get("flagged_fraction")


def ran_default(scenario: list[str], recipe: list[str], flagged: float | None) -> bool:
    """`recipe_is_default`, where a recipe that set pseudo_label.ood.exclude to true, far or
    false (the rows from before `auto`, the benchmark's arms) also ran the default if, all
    else default, `auto` decides the same on its teacher's labeling, which flagged the share
    `flagged` of the pool (ood.auto_decides): the student learnt from the same images. Unknown
    (`flagged` None) is not the default."""
    if recipe_is_default(scenario, recipe):
        return True
    setting = [o for o in recipe if o.startswith(EXCLUDE)]
    rest = [o for o in recipe if not o.startswith(EXCLUDE)]
    if len(setting) != 1 or flagged is None or not recipe_is_default(scenario, rest):
        return False
    value = {"true": True, "false": False, "far": "far"}.get(
        setting[0].removeprefix(EXCLUDE).strip().lower()
    )
    if value is None:
        return False
    ood_cfg = json.loads(_composed(tuple(scenario)))["pseudo_label"]["ood"]  # (cached)
    if ood_cfg["exclude"] != "auto":
        return False
    return ood.auto_decides(flagged, ood_cfg["false_rejection"]) == value


def mark_default(row: dict) -> dict:
    """row["default"]: the row ran the committed defaults at 1x compute (`ran_default`; rows
    from before their teacher's flagged share was recorded: `recipe_is_default`)."""
    scenario = [f"data.train_per_class={row['budget']}", f"seed={row['seed']}"]
    recipe = [*SETTINGS.get(row["setting"], []), *row["overrides"]]
    row["default"] = row["compute"] == 1 and ran_default(scenario, recipe, row.get("ood_flagged"))
    return row


# Keys the labeled-only baseline never reads: which unlabeled images the student sees, which
# of its own targets count and whose prediction makes them (the baseline has no unlabeled term).
NOT_READ_BY_BASELINE = (
    "pseudo_label.ood.",
    "student.consistency.mask",
    "student.consistency.target_ema",
    "student.consistency.warmup_",  # (the baseline has no unlabeled images to warm up on)
)


def baseline_peer(rows, budget, seed, setting, compute, overrides) -> dict | None:
    """A row of the same budget, seed, setting and compute that trained its own baseline and
    whose overrides differ from `overrides` only in keys the baseline never reads."""

    def read(overrides):
        return sorted(o for o in overrides if not o.lstrip("+~").startswith(NOT_READ_BY_BASELINE))

    for row in rows:
        same = (row["budget"], row["seed"], row["setting"], row["compute"]) == (
            budget, seed, setting, compute,
        )  # fmt: skip
        if same and "baseline_from" not in row and read(row["overrides"]) == read(overrides):
            return {**row, "setting": f"{row['setting']} {' '.join(row['overrides'])}".strip()}
    return None


def same_teacher(row: dict, info: dict) -> bool:
    """Whether a row was paired with the teacher this run trained (`shared_part`'s info): the
    weights' digest where both have one, else the test accuracy. A baseline is only reused from
    such a row: the same split and seed train another teacher on another machine or under
    TensorFlow's other CPU kernels (0.8296 under Eigen, 0.8266 under oneDNN, 0.8189 on a Zen
    4), so a row from there is not paired with this run's student."""
    if row.get("teacher_digest") and info.get("teacher_digest"):
        return row["teacher_digest"] == info["teacher_digest"]
    return round(row["teacher"], 4) == round(info["teacher"], 4)


def weights_digest(model_path: Path) -> str:
    """md5 of a saved model's weights: the same teacher in two rows, whatever file holds it."""
    model, _ = model_io.load(model_path)
    digest = hashlib.md5()
    for weights in model.get_weights():
        digest.update(np.ascontiguousarray(weights).tobytes())
    return digest.hexdigest()


def split_digest(paths: Paths) -> str:
    """md5 of the labeled split: the names of its train and val images, by class."""
    names = sorted(str(p.relative_to(paths.labeled)) for p in list_images(paths.labeled))
    return hashlib.md5("\n".join(n for n in names if not n.startswith("test")).encode()).hexdigest()


def _teacher_recipe(row: dict) -> tuple:
    """What a row's teacher depends on besides the seed: budget and data.* / teacher.* keys."""
    keys = ("data.", "teacher.", "model@teacher")
    mine = [o for o in row["overrides"] if o.lstrip("+~").startswith(keys)]
    return (row["budget"], tuple(o for o in mine if not o.startswith("data.unlabeled=")))


def pairing_problems(rows: list[dict]) -> list[str]:
    """Rows whose pairing is suspect: two seeds sharing one teacher or labeled split (by their
    digests), one seed, teacher recipe and machine with two teachers, or, for rows without
    digests, two seeds of one teacher recipe whose teachers score the same to 4 digits (how seed
    2's rows that reused seed 0's teacher were found)."""
    problems = []
    for i, a in enumerate(rows):
        for b in rows[i + 1 :]:
            same_recipe = _teacher_recipe(a) == _teacher_recipe(b)
            if a["seed"] != b["seed"]:
                for key in ("teacher_digest", "split_digest"):
                    if a.get(key) and a.get(key) == b.get(key):
                        problems.append(f"seeds {a['seed']} and {b['seed']} share a {key}")
                digests = a.get("teacher_digest") and b.get("teacher_digest")
                if same_recipe and not digests and a["teacher"] == b["teacher"]:
                    problems.append(
                        f"seeds {min(a['seed'], b['seed'])} and {max(a['seed'], b['seed'])} "
                        f"(budget {a['budget']}): the same teacher accuracy {a['teacher']} "
                        "with one teacher recipe"
                    )
            elif same_recipe and row_machine(a) == row_machine(b):
                # one seed, one recipe, one machine: one (deterministic) teacher; another
                # machine's kernels train another (machine())
                if a.get("teacher_digest") and b.get("teacher_digest"):
                    differ = a["teacher_digest"] != b["teacher_digest"]
                else:
                    differ = a["teacher"] != b["teacher"]
                if differ:
                    problems.append(
                        f"seed {a['seed']} (budget {a['budget']}): two teachers of one recipe "
                        f"({a['teacher']}, {b['teacher']})"
                    )
    return sorted(set(problems))


def _same(a: dict, b: dict) -> bool:
    keys = ("budget", "seed", "setting", "compute", "overrides")
    return all(a.get(k) == b.get(k) for k in keys)


def with_gains(rows: list[dict], split_key=None) -> list[dict]:
    """best labeled-only = the best teacher or baseline of any row on the same labeled split
    with at most the student's steps: whatever `teacher.*` or `student.*` overrides trained it,
    it is a labeled-only model within the same compute, so a recipe is judged against the
    strongest one found; gain = student - that. `split_key` (row -> key): which rows share a
    labeled split and test set, for other benchmarks (default: budget, seed, data.*)."""

    def split(r: dict) -> tuple:
        # Only data.* decides the labeled split; data.unlabeled does not (the split is drawn
        # first, data.layout), so models trained with another unlabeled count are peers too.
        data = [o for o in r["overrides"] if o.startswith("data.") and "data.unlabeled=" not in o]
        return (r["budget"], r["seed"], data)

    key = split_key or split
    for row in rows:
        # Peers: every teacher and every baseline of the same split trained with at most the
        # student's steps (all rounds' students' together; fewer steps are within the same
        # compute, and the baseline's accuracy is flat in steps).
        peers = [r for r in rows if key(r) == key(row)]
        row["best_labeled_only"] = max(
            [row["teacher"], row["baseline"]]
            + [r["teacher"] for r in peers]
            + [r["baseline"] for r in peers if r["baseline_steps"] <= row["student_steps"]]
        )
        row["gain"] = round(100 * (row["student"] - row["best_labeled_only"]), 2)
        row["gain_vs_own_baseline"] = round(100 * (row["student"] - row["baseline"]), 2)
    return rows


def gap_closed(rows: list[dict], reference: float) -> dict:
    """Per budget, setting, compute and overrides (one recipe): mean best labeled-only model and
    student, and the share of the labeled-only -> all-labels gap the student closes (1 = as
    good as all labels)."""
    out = {}
    frame = pd.DataFrame(rows)
    frame["recipe"] = frame["overrides"].map(" ".join)
    for (budget, setting, compute, recipe), group in frame.groupby(
        ["budget", "setting", "compute", "recipe"]
    ):
        best, student = float(group["best_labeled_only"].mean()), float(group["student"].mean())
        out[f"{budget}/{setting}/x{compute}/{recipe}"] = {
            "best_labeled_only": round(best, 4),
            "student": round(student, 4),
            "all_labels": round(reference, 4),
            "gap_closed": round((student - best) / (reference - best), 3),
        }
    return out


COLUMNS = ["teacher", "baseline", "best_labeled_only", "student", "gain"]


def table(rows: list[dict]) -> str:
    """Mean ± std over seeds per budget, setting and compute (accuracies in %, gain in points)."""
    frame = pd.DataFrame(rows)
    frame["seconds"] = (
        frame["baseline_seconds"] + frame["student_seconds"] + frame["shared_seconds"]
    )
    cols = [*COLUMNS, "pseudo_label_precision", "seconds"]
    lines = [
        "| labels/class | setting | compute | seeds | " + " | ".join(cols) + " |",
        "|---" * (len(cols) + 4) + "|",
    ]
    for (budget, setting, compute), group in frame.groupby(["budget", "setting", "compute"]):
        cells = []
        for col in cols:
            values = group[col].astype(float)
            scale = 100 if col in COLUMNS[:-1] else 1
            std = values.std(ddof=1) * scale if len(values) > 1 else float("nan")
            mean = values.mean() * scale
            digits = 0 if col == "seconds" else 3 if col == "pseudo_label_precision" else 2
            cells.append(f"{mean:.{digits}f}" + ("" if math.isnan(std) else f" ± {std:.{digits}f}"))
        head = f"| {budget} | {setting} | {compute}x | {len(group)} | "
        lines.append(head + " | ".join(cells) + " |")
    return "\n".join(lines)


def split_argv(argv: list[str] | None) -> tuple[list[str], list[str]]:
    """The options before `--` and the Hydra overrides after it."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" not in argv:
        return argv, []
    return argv[: argv.index("--")], argv[argv.index("--") + 1 :]


def main(argv: list[str] | None = None) -> int:
    argv, overrides = split_argv(argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budgets", type=int, nargs="*", default=[50])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--settings", nargs="+", default=["consistency"], choices=SETTINGS)
    parser.add_argument("--compute", type=int, nargs="+", default=[1], help="x the epochs")
    parser.add_argument("--test-curves", action="store_true", help="test accuracy per epoch")
    parser.add_argument(
        "--mark-defaults",
        action="store_true",
        help="only recompute every row's `default` flag in --out against today's conf/",
    )
    parser.add_argument(
        "--reuse-baseline",
        action="store_true",
        help="take the baseline of a row in --out that differs only in pseudo_label.ood.* or "
        "student.consistency.mask* "
        "overrides (which the labeled-only baseline never reads) instead of training it again, "
        "if that row's teacher is the one this run trained (same machine and kernels)",
    )
    parser.add_argument("--work", type=Path, default=Path("/tmp/ssl_gain_work"))
    parser.add_argument("--out", type=Path, default=RESULTS / "ssl_gain.json")
    parser.add_argument(
        "--full-reference",
        type=int,
        nargs="+",
        default=[],
        metavar="EPOCHS",
        help="also train the student's network on all labels (the teacher stage's recipe) for "
        "each of EPOCHS epochs (first seed); the longest is the ceiling, the others say whether "
        "it converged",
    )
    parser.add_argument(
        "--merge",
        type=Path,
        nargs="+",
        default=[],
        metavar="JSON",
        help="only merge the rows, commands and all-labels reference of these result files, "
        "written by runs with "
        "--out elsewhere (e.g. seeds run in parallel on other machines), into --out",
    )
    args = parser.parse_args(argv)
    payload = json.loads(args.out.read_text()) if args.out.is_file() else {"rows": []}
    rows: list[dict] = payload["rows"]
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def save(row: dict | None = None) -> None:  # after every row: a stopped run keeps its rows
        if row is not None:
            rows[:] = [r for r in rows if not _same(r, row)] + [row]
        with_gains(rows)
        for r in rows:
            mark_default(r)
        for problem in pairing_problems(rows):
            print(f"warning: suspect pairing: {problem}", file=sys.stderr, flush=True)
        payload["table"] = table(rows) if rows else ""
        if "full_reference" in payload and rows:
            payload["gap"] = gap_closed(rows, payload["full_reference"]["accuracy"])
        payload.setdefault("commands", [])
        recorded = args.merge or args.mark_defaults
        if not recorded and " ".join(sys.argv) not in payload["commands"]:
            payload["commands"].append(" ".join(sys.argv))
        model_io.write_text_atomic(args.out, json.dumps(payload, indent=1) + "\n")

    def add_reference(run: dict) -> None:  # one all-labels run; the ceiling over them all
        old = [payload["full_reference"]] if "full_reference" in payload else []
        runs = payload.setdefault("full_reference_runs", old)  # (JSON from before the runs)
        key = ("seed", "epochs", "overrides", "cpu")
        runs[:] = [r for r in runs if any(r.get(k) != run.get(k) for k in key)] + [run]
        payload["full_reference"] = ceiling(runs)

    if args.mark_defaults:
        save()
        return 0
    if args.merge:
        for other in map(lambda f: json.loads(f.read_text()), args.merge):
            for command in other.get("commands", []):
                if command not in payload.setdefault("commands", []):
                    payload["commands"].append(command)
            old_format = [other["full_reference"]] if "full_reference" in other else []
            for run in other.get("full_reference_runs") or old_format:
                add_reference(run)
            for row in other["rows"]:
                save(row)
        save()  # the table and the gap closed, recomputed over every row
        return 0
    for epochs in args.full_reference:
        add_reference(full_reference(epochs, args.seeds[0], overrides, args.work))
        print(json.dumps(payload["full_reference"]), flush=True)
        save()
    for budget in args.budgets:
        for seed in args.seeds:
            shared, info = shared_part(budget, seed, overrides, args.work)
            for setting in args.settings:
                for compute in args.compute:
                    peer = None
                    if args.reuse_baseline:
                        peer = baseline_peer(rows, budget, seed, setting, compute, overrides)
                    if peer is not None and not same_teacher(peer, info):
                        print(
                            f"[budget {budget}, seed {seed}] not reusing the baseline of "
                            f"{peer['setting']!r}: its row's teacher ({peer['teacher']}) is not "
                            f"this run's ({info['teacher']}): another machine or TensorFlow's "
                            "other kernels; training the baseline here",
                            flush=True,
                        )
                        peer = None
                    row = run_setting(
                        shared, budget, seed, setting, compute, overrides, args.test_curves,
                        baseline=peer,
                    )  # fmt: skip
                    row["teacher"] = info["teacher"]
                    for key in ("teacher_digest", "split_digest"):
                        if key in info:  # (shared parts reused from before they were kept)
                            row[key] = info[key]
                    row["pseudo_label_precision"] = info["pseudo_label_precision"]
                    row["pseudo_labeled"] = info["pseudo_labeled"]
                    row["ood_flagged"] = info.get("ood_flagged")  # the teacher's, round 1
                    row["shared_seconds"] = sum(info["seconds"].values())
                    if "cpu" in info:  # (shared parts reused from before it was measured)
                        row["shared_cpu_other"] = info["cpu"].get("cpu_other")
                        row["shared_cpu_steal"] = info["cpu"].get("cpu_steal")
                    if "cpu_other" in row:
                        row["cpu_shared"] = cpu_shared(row, info.get("cpu", {}))
                    save(row)
                    print(json.dumps(row), flush=True)
    if rows:
        print("\naccuracies in %, gain in points (mean ± std over seeds)\n" + table(rows))
    if "gap" in payload:
        print("\nshare of the labeled-only -> all-labels gap closed:", json.dumps(payload["gap"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
