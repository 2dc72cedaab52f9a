"""Messy unlabeled pools (issue 29, item 1): does the student still beat the labeled images?

For each scenario and seed, on Fashion-MNIST alone (Debian's IDX files), through the pipeline's
own stage functions (as benchmarks/ssl_gain.py, whose functions this reuses):

- the labeled split: `layout.split_indices` with data.train_per_class (50) and
  data.val_per_class (20) per class, seeded by `seed`, written as ingest writes it
  (`layout.write_layout`, then `decode_once`: the stages read decoded copies);
- the unlabeled pool, from the training images the labeled split left (benchmarks/
  scenarios.py), written to data/unlabeled as pool_<index>.png with its truth table beside it
  (data/unlabeled_truth.json: class index or -1 and kind per file):
  - `mismatch-F` (F = 0, 0.25, 0.5, 0.75): labeled = classes 0-5 only; the pool = 32,000
    images (--pool-size), a share F of them of classes 6-9 (`scenarios.class_mismatch`; 32,000
    is the largest size every F allows: 24,000 images of classes 6-9 at 0.75); test = the
    6,000 test images of classes 0-5;
  - `junk`: the 10-class task; the pool = every image left (59,300) with 10 % of them replaced
    by junk, an equal mix of scenarios.JUNK_KINDS (`scenarios.with_junk`); test = all 10,000;
    `junk-F` the same with a share F of junk (`junk-0.03`: a mostly clean folder);
  - `longtail-R` (R = 10, 100): the 10-class task, the pool long-tailed with imbalance ratio R
    (`scenarios.long_tailed`: class 0 the head with every image it has left, class 9 the tail),
    the labeled set balanced; test = all 10,000;
  - `mixed`: every defect at once (MIXED, `scenarios.mixed`): labeled = classes 0-5 (the
    mismatch split); the pool = those classes long-tailed at ratio 10 with a head class drawn
    by the seed (every image the profile allows), images of classes 6-9 making 25 % of it,
    then 5 % of it replaced by junk (about 20,100 images: 14,300 of classes 0-5, 4,800 of
    6-9, 1,000 junk); test = the 6,000 test images of classes 0-5;
- per scenario and seed, shared by every setting (paired): the labeled split, the teacher
  (`train_teacher`), its labeling (`pseudo_label`) and `merge`; per setting (ARMS) the
  student, its Noisy Student rounds and the labeled-only baseline (ssl_gain's `run_setting`);
  a setting whose overrides change the labeling (pseudo_label.*, not .rounds) labels and
  merges again with the same teacher, and reuses the baseline of an earlier setting with the
  same student recipe;
- per row: teacher, baseline, student, best labeled-only (the best teacher or baseline of the
  same labeled split, test set and seed with at most the student's steps: ssl_gain's
  `with_gains`; all mismatch-F share one split, junk and longtail-R another) and the gain in
  points; for the teacher's labeling (`labeling`) and every later round's (`by_round`):
  `scenarios.labeling_report`, i.e. the pseudo-label precision on in-distribution images,
  each kind's share of the merged pseudo-labeled images, and, when outputs/data.csv has them,
  the AUROC of its `ood_score` column per kind and the share of each kind its `ood` column
  flags; the student's online pseudo-label precision (in-distribution images) in its last
  epoch; the seconds of every part.

Settings: `keep` (pseudo_label.ood.exclude=false: every image is learnt from), `ood`
(pseudo_label.ood.exclude=true: merge and the consistency term leave out the images the
pipeline flags), `ood_fr20` (the same with the cut at 20 % false rejection), `auto` (the
default), `keep_far` (pseudo_label.ood.exclude=far: only the images past twice the cut left
out), and for the long-tailed pools `no_align` (`keep` without the consistency student's
distribution alignment) and `no_flex` (`keep` with one fixed threshold for every class: FlexMatch's
per-class thresholds off). A setting whose overrides `compose` rejects fails with one line;
the others still run (exit status 1).

    python benchmarks/messy_pools.py --scenarios mismatch-0.5 --seeds 0 --settings keep
    python benchmarks/messy_pools.py --scenarios mismatch-0.5 junk longtail-10 --seeds 0 1 2 \\
        --settings keep ood
    python benchmarks/messy_pools.py --scenarios mismatch-0 mismatch-0.25 mismatch-0.75 \\
        longtail-100 --seeds 0 --settings keep ood
    # seconds-long smoke run (a scratch --out): 600-image pools, one epoch, one round
    python benchmarks/messy_pools.py --scenarios mismatch-0.5 junk longtail-10 --pool-size 600 \\
        --out /tmp/messy_smoke.json --work /tmp/messy_smoke_work -- student.train.epochs=1 \\
        teacher.train.epochs=2 pseudo_label.rounds=1

(python: `PYTHONPATH=src .venv/bin/python`.) Extra arguments after `--` are Hydra overrides
applied to every run. Rows are merged into benchmarks/results/messy_pools.json (committed); a
row with the same scenario, seed, setting, pool size and overrides is replaced.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import scenarios  # noqa: E402
import ssl_gain  # noqa: E402
from ood_scores import known_source  # noqa: E402
from ssl_gain import machine  # noqa: E402

from pseudolabel import merged_set, ood, predicting, stages  # noqa: E402
from pseudolabel.config import compose_defaults  # noqa: E402
from pseudolabel.data import layout, sources  # noqa: E402
from pseudolabel.errors import PseudoLabelError  # noqa: E402
from pseudolabel.models import io as model_io  # noqa: E402
from pseudolabel.paths import Paths  # noqa: E402
from pseudolabel.stages.ingest import decode_once  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
CODE = ("benchmarks/messy_pools.py", "benchmarks/scenarios.py", "benchmarks/ssl_gain.py")
KNOWN = 6  # mismatch: classes 0-5 labeled, 6-9 only in the pool
MISMATCH_SIZE = 32_000  # the largest pool every fraction up to 0.75 allows
JUNK_FRACTION = 0.10
# `mixed`: every defect at once, on the mismatch task (classes 0-5 labeled): those classes
# long-tailed at ratio 10 with a head drawn per seed, a quarter of the pool of classes 6-9, 5 %
# junk. No default was tuned on it: it is the check of the defaults on a folder they never saw.
MIXED = {"ratio": 10.0, "unseen": 0.25, "junk": 0.05}
PARTIAL = ("mismatch", "mixed")  # the scenarios whose labeled task is classes 0-5
TRUTH = "data/unlabeled_truth.json"
IN_POOL = RESULTS / "ood_in_pool.json"  # ood_in_pool.py's rows: each pool's class_mix
# Each arm states pseudo_label.ood.exclude itself, so a row means the same whatever the
# project's default (rows before 2026-12-05 named `keep` "default": the default was false;
# since, the default is auto, and a keep, keep_far or ood row ran it where auto decides the
# same on its teacher's labeling: `default` is recomputed so, see ssl_gain.ran_default and
# `ran_ood`). Rows record what their merge left out (`ood_excluded`, `ood_far`).
ARMS = {
    "keep": ["pseudo_label.ood.exclude=false"],
    "ood": ["pseudo_label.ood.exclude=true"],
    # the default: by the share of the pool the teacher flags (ood.auto_decides)
    "auto": ["pseudo_label.ood.exclude=auto"],
    # only the images past twice the cut left out (far from every labeled class: junk); the
    # near ones kept (near classes the teacher never saw: their consistency term still paid
    # at a quarter of the pool). Before 2026-12-06: exclude=false with far=2.0.
    "keep_far": ["pseudo_label.ood.exclude=far", "pseudo_label.ood.far=2.0"],
    # a stricter cut: flags 20 % of the labeled val images, and more of what does not belong
    "ood_fr20": ["pseudo_label.ood.exclude=true", "pseudo_label.ood.false_rejection=0.2"],
    # item 4 on a skewed pool: the student's distribution alignment (to the labeled prior) off
    "no_align": [
        "pseudo_label.ood.exclude=false",
        "student.consistency.distribution_alignment=false",
    ],
    # item 4 on a skewed pool: alignment to the pool's own class mix (estimated by EM from the
    # teacher's probabilities) instead of the labeled images' balanced one
    "pool_align": ["pseudo_label.ood.exclude=auto", "student.consistency.alignment_target=pool"],
    # item 4's per-class thresholds on a skewed pool: FlexMatch's off (one fixed threshold)
    "no_flex": ["pseudo_label.ood.exclude=false", "student.consistency.flexible=false"],
}


def teacher_flagged(row: dict, rows: list[dict]) -> float | None:
    """The share of the pool the teacher's labeling (round 1) flagged out of distribution
    (what pseudo_label.ood.exclude=auto decides on): the row's own labeling report, else that
    of a row with the same scenario, seed, machine and teacher (the same labeling: the rows
    from before reports had the flags); None where none has it."""

    def share(r: dict) -> float | None:
        counts, flagged = r["labeling"].get("pool_counts", {}), r["labeling"].get("flagged")
        if not flagged or not counts or set(flagged) != set(counts):
            return None
        return round(sum(counts[k] * flagged[k] for k in counts) / sum(counts.values()), 6)

    if share(row) is not None:
        return share(row)
    same = ("scenario", "seed", "cpu", "teacher", "pool_size")
    for other in rows:
        if all(other.get(k) == row.get(k) for k in same) and share(other) is not None:
            return share(other)
    return None


def ood_excluded(row: dict) -> bool | None:
    """Whether the row's students learnt without every image its teacher flagged: what its
    merge recorded (metrics/merge.json), else what its arm says (exclude=true; false or far:
    not every one) or, for exclude=auto, the rule on its teacher's flagged share; None where
    that is unknown."""
    if row.get("ood_excluded") is not None:
        return row["ood_excluded"]
    recipe = (f"seed={row['seed']}", *row["setting_overrides"], *row["overrides"])
    rule = json.loads(ssl_gain._composed(recipe))["pseudo_label"]["ood"]  # (cached)
    if rule["exclude"] != "auto":
        return rule["exclude"] is True
    if row.get("ood_flagged") is None:
        return None
    return ood.auto_decides(row["ood_flagged"], rule["false_rejection"]) is True


FAR = "pseudo_label.ood.far="


LEFT_OUT_NAMES = {True: "flagged", "far": "far", False: "none"}  # row["ood_left_out"]


def left_out_by(row: dict) -> bool | str | None:
    """What the row's merge left out: True (every flagged image, `ood_excluded`), "far" (only
    those past far times the cut: `ood_far`, what merge recorded, else a far its recipe set:
    before 2026-12-06 a far set with exclude=false, or auto keeping the folder, applied), False
    (none); None where that is unknown."""
    if row.get("ood_excluded") is None:
        return None
    if row["ood_excluded"]:
        return True
    return "far" if ran_far(row) is not None else False


def ran_far(row: dict) -> float | None:
    """The far multiple the row's merge applied where it did not exclude (`left_out_by`)."""
    recipe = [*row["setting_overrides"], *row["overrides"]]
    stated = [o.removeprefix(FAR) for o in recipe if o.startswith(FAR)]
    far = row.get("ood_far") or next((v for v in stated[::-1] if v != "null"), None)
    return None if far is None else float(far)


def ran_ood(row: dict, recipe: list[str]) -> list[str]:
    """`recipe` with what the row's merge left out (`left_out_by`) in place of its
    pseudo_label.ood.exclude and far, since auto's rule and exclude's values have moved:
    exclude=true, exclude=far with the far it ran, or exclude=false. Unknown: `recipe`."""
    decided = left_out_by(row)
    if decided is None:
        return recipe
    rest = [o for o in recipe if not o.startswith((ssl_gain.EXCLUDE, FAR))]
    if decided == "far":
        return [*rest, f"{ssl_gain.EXCLUDE}far", f"{FAR}{ran_far(row)}"]
    return [*rest, f"{ssl_gain.EXCLUDE}{str(decided).lower()}"]


ALIGN = "student.consistency.alignment_target="


def aimed_at(row: dict) -> str | None:
    """The class mix the row's students aligned to: what they recorded (metrics/student.json's
    `alignment`), else what their recipe says (rows from before the record: `pool` where set,
    else the labeled mix, the only other target then); None: no alignment."""
    if "alignment" in row:
        return row["alignment"]
    recipe = (f"seed={row['seed']}", *row["setting_overrides"], *row["overrides"])
    consistency = json.loads(ssl_gain._composed(recipe))["student"]["consistency"]  # (cached)
    if not consistency["distribution_alignment"]:
        return None
    return "pool" if f"{ALIGN}pool" in recipe else "labeled"


def pool_skewed(row: dict, in_pool: list[dict]) -> bool:
    """Whether the teacher's labeling of the row's pool found it skewed (class_mix.skewed, what
    alignment_target=auto reads): the row's own record, else benchmarks/ood_in_pool.py's row of
    the same scenario and seed (the same teacher and labeling), else the pool's design (the
    long tails and `mixed` skewed, the others not: what the estimate found on every pool
    measured, docs/messy.md)."""
    if row.get("class_mix") is not None:
        return bool(row["class_mix"]["skewed"])
    for other in in_pool:
        same = (other["scenario"], other["seed"]) == (row["scenario"], row["seed"])
        if same and other.get("class_mix") is not None and not other.get("overrides"):
            return bool(other["class_mix"]["skewed"])
    return parse_scenario(row["scenario"])["kind"] in ("longtail", "mixed")


def mark_default(row: dict, rows: list[dict], in_pool: list[dict] | None = None) -> dict:
    """row["default"]: the row ran what today's defaults do on its pool (ssl_gain.ran_default,
    on its teacher's flagged share, row["ood_flagged"], and the class mix its students aligned
    to, `aimed_at`, against what today's alignment_target picks there: auto the pool's mix
    where `pool_skewed`); row["ood_excluded"]: `ood_excluded`; row["ood_left_out"]: what its
    merge left out (`left_out_by`: "flagged", "far", "none")."""
    row["ood_flagged"] = teacher_flagged(row, rows)
    row["ood_excluded"] = ood_excluded(row)
    decided = left_out_by(row)
    row["ood_left_out"] = None if decided is None else LEFT_OUT_NAMES[decided]
    recipe = ran_ood(row, [*row["setting_overrides"], *row["overrides"]])
    rest = [o for o in recipe if not o.startswith(ALIGN)]
    scenario = [f"seed={row['seed']}"]
    target = json.loads(ssl_gain._composed(tuple(scenario)))["student"]["consistency"]
    expected = target["alignment_target"] if target["distribution_alignment"] else None
    if expected == "auto":
        expected = "pool" if pool_skewed(row, in_pool or []) else "labeled"
    aligned_as_default = expected is None or aimed_at(row) == expected
    row["default"] = aligned_as_default and ssl_gain.ran_default(scenario, rest, row["ood_flagged"])
    return row


def parse_scenario(name: str) -> dict:
    """'mismatch-0.5' -> {kind, fraction}, 'junk' (10 %) or 'junk-0.03' -> {kind, fraction},
    'longtail-10' -> {kind, ratio}, 'mixed' -> {kind, ratio, unseen, junk} (MIXED)."""
    kind, _, value = name.partition("-")
    try:
        if kind == "mismatch" and value:
            fraction = float(value)
            if 0.0 <= fraction < 1.0:
                return {"kind": kind, "fraction": fraction}
        elif kind == "junk":
            fraction = float(value) if value else JUNK_FRACTION
            if 0.0 < fraction < 1.0:
                return {"kind": kind, "fraction": fraction}
        elif kind == "longtail" and value and float(value) >= 1.0:
            return {"kind": kind, "ratio": float(value)}
        elif kind == "mixed" and not value:
            return {"kind": kind, **MIXED}
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(
        f"scenario {name!r}: mismatch-F (0 <= F < 1), junk, junk-F (0 < F < 1), longtail-R "
        "(R >= 1) or mixed"
    )


def task_of(spec: dict) -> str:
    """The labeled task (split and test set): classes 0-5 for mismatch and mixed, all ten
    otherwise."""
    return f"classes_0-{KNOWN - 1}" if spec["kind"] in PARTIAL else "classes_0-9"


def build_pool(spec: dict, images, labels, seed: int, pool_size: int | None) -> scenarios.Pool:
    """The scenario's pool from the images the labeled split left."""
    if spec["kind"] == "mismatch":
        size = pool_size or MISMATCH_SIZE
        return scenarios.class_mismatch(images, labels, range(KNOWN), spec["fraction"], size, seed)
    if spec["kind"] == "mixed":
        n_max = None
        if pool_size:  # the head whose known-class part sums to about (1 - unseen) * pool_size
            profile = spec["ratio"] ** (-np.arange(KNOWN) / (KNOWN - 1))
            n_max = max(1, int(pool_size * (1 - spec["unseen"]) / profile.sum()))
        return scenarios.mixed(
            images, labels, range(KNOWN), spec["ratio"], spec["unseen"], spec["junk"], n_max, seed
        )
    if spec["kind"] == "junk":
        if pool_size:
            keep = np.sort(np.random.default_rng(seed).choice(len(images), pool_size, False))
            images, labels = images[keep], labels[keep]
        kind = np.full(len(images), scenarios.IN, dtype=object)
        clean = scenarios.Pool(images.copy(), np.asarray(labels, np.int64), kind)
        return scenarios.with_junk(clean, spec["fraction"], seed)
    n_max = None
    if pool_size:  # the head whose profile sums to about pool_size
        classes = len(np.unique(labels))
        profile = spec["ratio"] ** (-np.arange(classes) / max(1, classes - 1))
        n_max = max(1, int(pool_size / profile.sum()))
    return scenarios.long_tailed(images, labels, spec["ratio"], n_max=n_max, seed=seed)


def prepare(spec: dict, cfg, paths: Paths, pool_size: int | None) -> dict:
    """The labeled split (train, val, test) and the pool written as the stages read them."""
    full = sources.fashion_mnist(cfg.data.idx_dir)
    if spec["kind"] in PARTIAL:
        source, in_full = known_source(full, KNOWN), np.flatnonzero(full.train_labels < KNOWN)
    else:
        source, in_full = full, np.arange(len(full.train_labels))
    data = cfg.data
    split = layout.split_indices(
        source, data.train_per_class, data.val_per_class, data.test_per_class, 0, cfg.seed
    )
    used = in_full[np.concatenate([split.train, split.val])]
    rest = np.setdiff1d(np.arange(len(full.train_labels)), used)
    pool = build_pool(spec, full.train_images[rest], full.train_labels[rest], cfg.seed, pool_size)
    layout.write_layout(source, split, paths.labeled, paths.unlabeled)  # no unlabeled images
    table = scenarios.write_pool(pool, paths.unlabeled, source.class_names)
    model_io.write_text_atomic(paths.input_root / TRUTH, json.dumps(table) + "\n")
    decode_once(cfg, paths)
    return {"train": len(split.train), "val": len(split.val), "test": len(split.test),
            "pool": len(pool), "pool_counts": pool.counts()}  # fmt: skip


def shared_part(scenario: str, seed: int, overrides: list[str], pool_size, work: Path):
    """Labeled split, pool, teacher, pseudo_label and merge of a scenario and seed (reused when
    done with the same overrides)."""
    spec = parse_scenario(scenario)
    overrides = ssl_gain.shared_overrides(overrides)
    root = work / ssl_gain.run_folder_name(
        "_".join([scenario, f"seed{seed}", f"pool{pool_size or 'default'}", *overrides])
    )
    root.mkdir(parents=True, exist_ok=True)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
    cfg = compose_defaults([f"seed={seed}", *overrides])
    paths = Paths(root)
    done = root / "shared_done.json"
    key = json.dumps([scenario, seed, pool_size, overrides])
    previous = json.loads(done.read_text()) if done.is_file() else {}
    label = f"{scenario}, seed {seed}"
    if previous.get("key") == key:
        print(f"[{label}] pool, teacher and pseudo-labels reused", flush=True)
        return cfg, paths, previous["info"]
    seconds = {}
    print(f"[{label}] writing the labeled split and the pool", flush=True)
    start = time.perf_counter()
    counts = prepare(spec, cfg, paths, pool_size)
    seconds["write"] = round(time.perf_counter() - start, 1)
    print(f"[{label}] {json.dumps(counts)}", flush=True)
    for name in ("train_teacher", "pseudo_label", "merge"):
        print(f"[{label}] {name}", flush=True)
        start = time.perf_counter()
        stages.STAGES[name](cfg, paths)
        seconds[name] = round(time.perf_counter() - start, 1)
    info = {
        "teacher": ssl_gain._test_accuracy(paths.model("teacher"), paths.test),
        "split": {k: counts[k] for k in ("train", "val", "test")},
        "pool_size": counts["pool"],
        "pool_counts": counts["pool_counts"],
        "seconds": seconds,
    }
    done.write_text(json.dumps({"key": key, "info": info}))
    return cfg, paths, info


def arm_labeling(shared: Paths, seed: int, setting: str, overrides: list[str], label: str):
    """The Paths a setting's students read their pseudo-labels and merged set from: the shared
    ones, or (a setting whose overrides change the labeling) its own pseudo_label and merge
    with the shared teacher, under the scenario's folder. Also the seconds they took."""
    own = [o for o in ARMS[setting] if o in ssl_gain.shared_overrides(ARMS[setting])]
    base = [f"seed={seed}", *ssl_gain.shared_overrides(overrides)]
    if not own or ssl_gain._composed((*base, *own)) == ssl_gain._composed(tuple(base)):
        return shared, 0.0  # (the shared labeling already ran it: the default's arm, say)
    arm = Paths(
        shared.root / ssl_gain.run_folder_name(f"labels_{setting}"),
        data_root=shared.root,
        teacher_model=shared.model("teacher"),
    )
    arm.root.mkdir(parents=True, exist_ok=True)
    done = arm.root / "labels_done.json"
    key = json.dumps([seed, own, ssl_gain.shared_overrides(overrides)])
    if done.is_file() and json.loads(done.read_text()).get("key") == key:
        print(f"[{label}] {setting}: its pseudo-labels reused", flush=True)
        return arm, 0.0
    cfg = compose_defaults([f"seed={seed}", *ssl_gain.shared_overrides([*own, *overrides])])
    start = time.perf_counter()
    for name in ("pseudo_label", "merge"):
        print(f"[{label}] {setting}: {name}", flush=True)
        stages.STAGES[name](cfg, arm)
    done.write_text(json.dumps({"key": key}))
    return arm, round(time.perf_counter() - start, 1)


def report_of(paths: Paths, truth: scenarios.Truth) -> dict:
    """`scenarios.labeling_report` of one labeling (its data.csv) and merge (its manifest)."""
    csv = predicting.read_csv(paths.csv)
    return scenarios.labeling_report(csv, merged_set.read_manifest(paths.merged), truth)


def baseline_key(setting: str, overrides: list[str]) -> str:
    """What a baseline depends on beyond the labeled split: the student's recipe and rounds."""
    reads = ("student.", "pseudo_label.rounds=", "teacher.", "data.", "seed=", "model@")
    return json.dumps([o for o in [*ARMS[setting], *overrides] if o.lstrip("+~").startswith(reads)])


def split_key(row: dict) -> tuple:
    """Rows with the same labeled split and test set (their teachers and baselines are peers)."""
    data = [o for o in row["overrides"] if o.startswith("data.")]
    return (row["task"], row["budget"], row["seed"], data)


def _same(a: dict, b: dict) -> bool:
    keys = ("scenario", "seed", "setting", "pool_size_asked", "overrides")
    return all(a.get(k) == b.get(k) for k in keys)


def table(rows: list[dict]) -> str:
    """One line per row: accuracies in %, gain in points, the teacher's labeling."""
    head = [
        "scenario", "seed", "setting", "teacher", "baseline", "student", "best labeled-only",
        "gain", "PL precision (in)", "online PL precision", "merged share by kind", "seconds",
    ]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    order = {s: i for i, s in enumerate(ARMS)}
    for r in sorted(rows, key=lambda r: (r["scenario"], r["seed"], order.get(r["setting"], 9))):
        shares = ", ".join(f"{k} {v:.4f}" for k, v in r["labeling"]["merged_share"].items())
        cells = [r["scenario"], r["seed"], r["setting"]]
        cells += [f"{100 * r[k]:.2f}" for k in ("teacher", "baseline", "student")]
        cells += [f"{100 * r['best_labeled_only']:.2f}", f"{r['gain']:+.2f}"]
        cells += [r["labeling"]["pseudo_label_precision"]]
        cells += [r.get("online_pseudo_precision_last_epoch"), shares, round(r["seconds"])]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv, overrides = ssl_gain.split_argv(argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenarios", nargs="+", default=["mismatch-0.5"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--settings", nargs="+", default=["keep", "ood"], choices=ARMS)
    parser.add_argument(
        "--pool-size",
        type=int,
        default=None,
        help="mismatch: the pool's size (default 32,000); junk: images before the junk "
        "(default every one left); longtail: about this many (default the largest profile)",
    )
    parser.add_argument("--work", type=Path, default=Path("/tmp/messy_pools_work"))
    parser.add_argument("--out", type=Path, default=RESULTS / "messy_pools.json")
    parser.add_argument("--strict", action="store_true", help="a failing setting stops the run")
    parser.add_argument(
        "--mark-defaults",
        action="store_true",
        help="only recompute every row's `default` flag in --out against today's conf/",
    )
    args = parser.parse_args(argv)
    for name in args.scenarios:
        try:
            parse_scenario(name)
        except argparse.ArgumentTypeError as exc:
            parser.error(str(exc))
    payload = json.loads(args.out.read_text()) if args.out.is_file() else {"rows": []}
    rows: list[dict] = payload["rows"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    command = " ".join(["python", "benchmarks/messy_pools.py", *sys.argv[1:]])
    cpu = machine()  # model, cores, vector ISA and TensorFlow kernels
    failed = []

    def save(row: dict | None = None) -> None:  # after every row: a stopped run keeps its rows
        if row is not None:
            rows[:] = [r for r in rows if not _same(r, row)] + [row]
        ssl_gain.with_gains(rows, split_key)
        in_pool = json.loads(IN_POOL.read_text())["rows"] if IN_POOL.is_file() else []
        for r in rows:
            mark_default(r, rows, in_pool)
        payload["table"] = table(rows)
        if row is not None and command not in payload.setdefault("commands", []):
            payload["commands"].append(command)
        model_io.write_text_atomic(args.out, json.dumps(payload, indent=1) + "\n")

    if args.mark_defaults:
        save()
        return 0
    for scenario in args.scenarios:
        spec = parse_scenario(scenario)
        for seed in args.seeds:
            label = f"{scenario}, seed {seed}"
            cfg, shared, info = shared_part(scenario, seed, overrides, args.pool_size, args.work)
            truth = scenarios.Truth.load(shared.root / TRUTH)
            budget = int(cfg.data.train_per_class)
            baselines: dict[str, dict] = {}  # baseline_key -> the row that trained it
            # an earlier run's, of the same split, overrides and teacher (machine and kernels)
            for old in rows:
                same = (old["scenario"], old["seed"], old["overrides"]) == (
                    scenario,
                    seed,
                    overrides,
                )
                if same and "baseline_from" not in old and ssl_gain.same_teacher(old, info):
                    baselines.setdefault(baseline_key(old["setting"], overrides), old)
            for setting in args.settings:
                chosen = [f"seed={seed}", *ARMS[setting], *overrides]
                try:
                    arm_cfg = compose_defaults(chosen)
                    arm, label_seconds = arm_labeling(shared, seed, setting, overrides, label)
                    row = ssl_gain.run_setting(
                        arm, budget, seed, setting, 1, overrides, False, settings=ARMS,
                        truth=truth, baseline=baselines.get(baseline_key(setting, overrides)),
                        label=label,
                    )  # fmt: skip
                except (PseudoLabelError, OSError, ValueError, RuntimeError) as exc:
                    if args.strict:
                        raise
                    line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                    print(f"[{label}] {setting}: FAILED: {type(exc).__name__}: {line}", flush=True)
                    failed.append(f"{scenario}/{seed}/{setting}")
                    continue
                baselines.setdefault(baseline_key(setting, overrides), row)
                tag = "".join(
                    f"_{o}" for o in overrides if o not in ssl_gain.shared_overrides(overrides)
                )
                run = Paths(
                    arm.root / ssl_gain.run_folder_name(f"{setting}_x1{tag}"),
                    data_root=shared.root,
                    teacher_model=shared.model("teacher"),
                )
                row["labeling"] = report_of(arm, truth)
                merge = json.loads((arm.metrics / "merge.json").read_text())
                row["ood_excluded"] = merge.get("ood_exclude", {}).get("excluded")
                row["ood_far"] = merge.get("ood_exclude", {}).get("far")
                row["by_round"] = [
                    {"round": r, **report_of(run.round(r), truth)}
                    for r in range(2, arm_cfg.pseudo_label.rounds + 1)
                ]
                # the teacher's class_mix (what alignment_target=auto reads) and the mix the
                # last round's student aligned to
                labeling = json.loads((arm.metrics / "pseudo_label.json").read_text())
                row["class_mix"] = labeling.get("class_mix")
                last = run.round(arm_cfg.pseudo_label.rounds)
                student = json.loads((last.metrics / "student.json").read_text())
                if "alignment" in student:  # (recorded since 2026-12-06)
                    row["alignment"] = student["alignment"]
                row.update(
                    scenario=scenario,
                    scenario_params={k: v for k, v in spec.items() if k != "kind"},
                    task=task_of(spec),
                    pool_size_asked=args.pool_size,
                    pool_size=info["pool_size"],
                    pool_counts=info["pool_counts"],
                    split=info["split"],
                    setting_overrides=ARMS[setting],
                    teacher=info["teacher"],
                    pseudo_label_precision=row["labeling"]["pseudo_label_precision"],
                    pseudo_labeled=row["labeling"]["pseudo_labeled"],
                    shared_seconds=round(sum(info["seconds"].values()), 1),
                    shared_seconds_by_part=info["seconds"],
                    labeling_seconds=label_seconds,
                    code=ssl_gain.code_version(CODE),
                    cpu=cpu,
                )
                row["seconds"] = round(
                    row["shared_seconds"]
                    + label_seconds
                    + row["baseline_seconds"]
                    + row["student_seconds"],
                    1,
                )
                save(row)
                print(json.dumps(row), flush=True)
    if rows:
        print("\naccuracies in %, gain in points\n" + table(rows))
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
