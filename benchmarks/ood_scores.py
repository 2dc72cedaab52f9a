"""Which out-of-distribution score tells the teacher's classes from images that don't belong?

Issue 29, item 2. Per seed, on Fashion-MNIST (Debian's IDX files), through the pipeline's own
functions: the labeled split of classes 0-5 alone (`layout.split_indices` on a 6-class source:
`data.train_per_class` = 50 and `data.val_per_class` = 20 per class, seeded by `seed`), written
and decoded as ingest does, and the teacher `stages.train_teacher` trains on it (its default
recipe, any Hydra overrides after `--`). Then, from the teacher's outputs and features:

- in-distribution: the official test images of classes 0-5 (6,000), and val (120) for the cut;
- out-of-distribution: (i) the test images of classes 6-9 (4,000; also per class), and (ii)
  each junk kind of benchmarks/scenarios.py (JUNK_PER_KIND images each, made from test images
  of classes 0-5 and scikit-learn's digits);
- AUROC of each score (OOD = positive, higher score = more OOD; sklearn's roc_auc_score);
- the cut the pipeline would use: the 95th percentile of the val scores; its false-rejection
  rate on val and on the in-distribution test images, and the share of each OOD set it removes;
- FPR95: the share of an OOD set kept when the cut keeps 95 % of the in-distribution test images.

Scores (SCORES below): max-softmax (raw and with the pipeline's val temperature), max-logit and
energy (the real logits: the penultimate features through the softmax layer's kernel and bias),
kNN distance in the teacher's L2-normalised penultimate features (`pool`, global average
pooling) to the labeled train images (k = 1, 5, 10; Sun et al. 2022), the same on every block's
pooled features, Mahalanobis (class means, shared Ledoit-Wolf covariance, min over classes),
a PCA-residual norm, and sums of scores each normalised by its val quantiles. And the
pipeline's own score through its code (src/pseudolabel/ood.py): `pipeline_distances` (the
Mahalanobis layer ensemble alone, pseudo_label.ood.contrast=false) and `pipeline` (with the
contrast term, the default), the latter fitted per set on a pool of the in-distribution test
images plus that set's images, as the pipeline fits it on the folder it labels.

    python benchmarks/ood_scores.py --seeds 0 1 2
    python benchmarks/ood_scores.py --seeds 0 -- teacher.train.epochs=50

Rows are merged into benchmarks/results/ood_scores.json (a row with the same seed, score,
scenario and overrides is replaced); the mean AUROC table over seeds is printed and stored.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

# pseudolabel first: it sets TensorFlow's environment (oneDNN, logging) before TensorFlow
# loads, which reads it once (docs/speed.md)
import pseudolabel  # noqa: F401

# isort: split

import keras
import numpy as np
import pandas as pd
from scipy.special import logsumexp
from sklearn.covariance import LedoitWolf
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parent))
import scenarios
from ssl_gain import code_version, machine, split_argv

from pseudolabel import calibration, ood, stages
from pseudolabel.config import compose
from pseudolabel.data import layout, sources
from pseudolabel.models import io as model_io
from pseudolabel.paths import Paths
from pseudolabel.stages.ingest import decode_once

RESULTS = Path(__file__).resolve().parent / "results"
KNOWN = 6  # classes 0-5 labeled; 6-9 unseen
JUNK_PER_KIND = 1000
CUT_QUANTILE = 0.95  # the val-calibrated cut: 5 % of val rejected
KS = (1, 5, 10)
BATCH = 500
CODE = ("benchmarks/ood_scores.py", "benchmarks/scenarios.py", "src/pseudolabel/ood.py")


def known_source(source: sources.ArraySource, known: int = KNOWN) -> sources.ArraySource:
    """The source restricted to classes 0..known-1 (what the user labeled)."""
    train = source.train_labels < known
    test = source.test_labels < known
    return sources.ArraySource(
        source.train_images[train],
        source.train_labels[train],
        source.test_images[test],
        source.test_labels[test],
        tuple(source.class_names[:known]),
    )


def teacher_for(seed: int, overrides: list[str], work: Path):
    """The labeled split of classes 0-5 written as ingest writes it, and train_teacher on it
    (reused when the same seed and overrides trained it before)."""
    root = work / f"seed{seed}"
    root.mkdir(parents=True, exist_ok=True)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
    cfg = compose([f"seed={seed}", *overrides])
    paths = Paths(root)
    source = known_source(sources.fashion_mnist(cfg.data.idx_dir))
    data = cfg.data
    split = layout.split_indices(
        source, data.train_per_class, data.val_per_class, None, 10, cfg.seed
    )
    done = root / "teacher_done.json"
    key = json.dumps([seed, overrides])
    if done.is_file() and json.loads(done.read_text()).get("key") == key:
        print(f"[seed {seed}] teacher reused", flush=True)
        seconds = json.loads(done.read_text())["seconds"]
    else:
        layout.write_layout(source, split, paths.labeled, paths.unlabeled)
        decode_once(cfg, paths)
        print(f"[seed {seed}] train_teacher on {len(split.train)} images", flush=True)
        start = time.perf_counter()
        stages.train_teacher(cfg, paths)
        seconds = round(time.perf_counter() - start, 1)
        done.write_text(json.dumps({"key": key, "seconds": seconds}))
    return cfg, paths, source, split, seconds


class Features:
    """The teacher's probabilities, real logits and pooled features of every block."""

    def __init__(self, model: keras.Model):
        pools = [layer for layer in model.layers if isinstance(layer, keras.layers.MaxPooling2D)]
        self.block_names = [layer.name for layer in pools]
        head = model.get_layer("predictions")
        self.kernel, self.bias = (np.asarray(w, np.float64) for w in head.get_weights())
        outputs = [model.get_layer("pool").output, *(p.output for p in pools), model.output]
        self.extractor = keras.Model(model.inputs, outputs)

    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
        x = images.astype(np.float32)[..., None]
        outs = self.extractor.predict(x, batch_size=BATCH, verbose=0)
        pool, blocks, probs = outs[0], outs[1:-1], outs[-1]
        logits = np.asarray(pool, np.float64) @ self.kernel + self.bias
        return {
            "probs": np.asarray(probs, np.float64),
            "logits": logits,
            "pool": np.asarray(pool, np.float64),
            "blocks": [np.asarray(b, np.float64).mean(axis=(1, 2)) for b in blocks],
            "pixels": images.reshape(len(images), -1).astype(np.float64) / 255.0,
        }


def l2n(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def kth_distance(query: np.ndarray, reference: np.ndarray, k: int, chunk: int = 2000):
    """Distance of each (normalised) query row to its k-th nearest reference row."""
    ref2 = (reference**2).sum(1)[None, :]
    out = np.empty(len(query))
    for start in range(0, len(query), chunk):
        q = query[start : start + chunk]
        d2 = (q**2).sum(1)[:, None] + ref2 - 2 * q @ reference.T
        out[start : start + chunk] = np.partition(d2, k - 1, axis=1)[:, k - 1]
    return np.sqrt(np.maximum(out, 0.0))


def multi_layer(f: dict) -> np.ndarray:
    """Every block's pooled features and the penultimate ones, each L2-normalised, joined."""
    return l2n(np.concatenate([l2n(b) for b in f["blocks"]] + [l2n(f["pool"])], axis=1))


class ClassGaussian:
    """Mahalanobis distance to the nearest class mean under one shared covariance, shrunk by
    Ledoit-Wolf (300 images for up to 128 dimensions)."""

    def __init__(self, feats: np.ndarray, labels: np.ndarray):
        self.means = np.stack([feats[labels == c].mean(0) for c in range(KNOWN)])
        self.precision = LedoitWolf().fit(feats - self.means[labels]).precision_

    def __call__(self, x: np.ndarray) -> np.ndarray:
        diff = x[:, None, :] - self.means[None, :, :]
        return np.einsum("ncd,de,nce->nc", diff, self.precision, diff).min(axis=1)


# The penultimate features (`pool`) and every block's (global average pooled), L2-normalised.
BLOCKS = ("mahalanobis_block0", "mahalanobis_block1", "mahalanobis_block2", "mahalanobis_l2n")
COMBOS = {
    "knn5+msp": ("knn5", "msp"),
    "knn5+energy": ("knn5", "energy"),
    "knn5_all_blocks+msp": ("knn5_all_blocks", "msp"),
    "knn5+mahalanobis": ("knn5", "mahalanobis"),
    "mahalanobis_l2n+pca_residual": ("mahalanobis_l2n", "pca_residual"),
    "mahalanobis_l2n+msp": ("mahalanobis_l2n", "msp"),
    # Lee et al. 2018's layer ensemble, unweighted: each block's Mahalanobis, val-normalised
    "mahalanobis_all_blocks": BLOCKS,
    "mahalanobis_all_blocks+pca_residual": (*BLOCKS, "pca_residual"),
    "mahalanobis_all_blocks+knn5/pool_knn5": (*BLOCKS, "knn5/pool_knn5"),
}


class Scorer:
    """Every candidate score, fitted on the labeled train features (and val for T and the
    quantile normalisation); `__call__` returns {score name: values} for a set's features.
    `pool`: the features of the unlabeled images for the transductive score (kNN distance to
    the labeled images over that to the pool's other images)."""

    def __init__(self, train: dict, train_labels, val: dict, val_labels, pool: dict | None = None):
        self.temperature = calibration.fit_temperature(val["probs"], val_labels).temperature
        self.ref = l2n(train["pool"])
        self.ref_multi = multi_layer(train)
        self.ref_pixels = l2n(train["pixels"])
        self.ref_trainval = np.concatenate([self.ref, l2n(val["pool"])])
        self.val_size = len(val["probs"])
        self.pool_ref = None if pool is None else l2n(pool["pool"])
        self.gauss = ClassGaussian(train["pool"], train_labels)
        normed = l2n(train["pool"])
        self.gauss_n = ClassGaussian(normed, train_labels)
        self.gauss_blocks = [ClassGaussian(l2n(b), train_labels) for b in train["blocks"]]
        # PCA residual: the part of a normalised feature outside the train features' principal
        # subspace (90 % of their variance).
        self.centre = normed.mean(0)
        _, s, vt = np.linalg.svd(normed - self.centre, full_matrices=False)
        share = np.cumsum(s**2) / np.sum(s**2)
        self.dims = int(np.searchsorted(share, 0.90) + 1)
        self.basis = vt[: self.dims]
        self.quantiles: dict[str, tuple[float, float]] = {}
        self.seconds: dict[str, float] = {}  # per score: time spent, images scored
        self.counted: dict[str, int] = {}
        for name, values in self._base(val, is_val=True).items():
            q50, q95 = np.quantile(values, [0.5, CUT_QUANTILE])
            self.quantiles[name] = (float(q50), float(max(q95 - q50, 1e-12)))

    def _base(self, f: dict, is_val: bool = False, in_pool: bool = False) -> dict[str, np.ndarray]:
        probs, logits = f["probs"], f["logits"]
        q = l2n(f["pool"])  # shared by several scores: its cost is counted in none
        temperature = self.temperature
        fns = {
            "msp": lambda: 1.0 - probs.max(1),
            "msp_calibrated": lambda: (
                1.0 - calibration.apply_temperature(probs, temperature).max(1)
            ),
            "max_logit": lambda: -logits.max(1),
            "energy": lambda: -logsumexp(logits, axis=1),
        }
        for k in KS:
            fns[f"knn{k}"] = lambda k=k: kth_distance(q, self.ref, k)
        for k in KS:
            fns[f"knn{k}_all_blocks"] = lambda k=k: kth_distance(multi_layer(f), self.ref_multi, k)
        # train + val as the reference; val images (in it) skip themselves
        fns["knn5_train+val"] = lambda: kth_distance(q, self.ref_trainval, 5 + int(is_val))
        fns["knn5_pixels"] = lambda: kth_distance(l2n(f["pixels"]), self.ref_pixels, 5)
        fns["mahalanobis"] = lambda: self.gauss(f["pool"])
        fns["mahalanobis_l2n"] = lambda: self.gauss_n(q)
        for i, gauss in enumerate(self.gauss_blocks):
            fns[f"mahalanobis_block{i}"] = lambda i=i, g=gauss: g(l2n(f["blocks"][i]))

        def residual():
            centred = q - self.centre
            return np.linalg.norm(centred - (centred @ self.basis.T) @ self.basis, axis=1)

        fns["pca_residual"] = residual
        if self.pool_ref is not None:  # a pool image skips itself
            fns["knn5/pool_knn5"] = lambda: (
                kth_distance(q, self.ref, 5)
                / np.maximum(kth_distance(q, self.pool_ref, 5 + int(in_pool)), 1e-12)
            )
        out = {}
        for name, fn in fns.items():
            start = time.perf_counter()
            out[name] = fn()
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
            self.counted[name] = self.counted.get(name, 0) + len(probs)
        return out

    def norm(self, name: str, values: np.ndarray) -> np.ndarray:
        q50, spread = self.quantiles[name]
        return (values - q50) / spread

    def __call__(self, f: dict, in_pool: bool = False) -> dict[str, np.ndarray]:
        out = self._base(f, in_pool=in_pool)
        for name, parts in COMBOS.items():
            out[name] = sum(self.norm(p, out[p]) for p in parts)
        for i in range(len(self.gauss_blocks)):
            del out[f"mahalanobis_block{i}"]
        return out


def join(parts: list[dict]) -> dict:
    """Feature dicts of several sets stacked into one."""
    out = {}
    for key in parts[0]:
        if key == "blocks":
            out[key] = [
                np.concatenate([p[key][i] for p in parts]) for i in range(len(parts[0][key]))
            ]
        else:
            out[key] = np.concatenate([p[key] for p in parts])
    return out


def ood_sets(full: sources.ArraySource, seed: int) -> dict[str, np.ndarray]:
    """The in-distribution test images ("in") and every OOD set, by name."""
    rng = np.random.default_rng(1000 + seed)
    test_in = full.test_images[full.test_labels < KNOWN]
    sets = {"in": test_in}
    unseen = full.test_labels >= KNOWN
    sets["unseen_classes"] = full.test_images[unseen]
    for c in range(KNOWN, len(full.class_names)):
        sets[f"unseen:{full.class_names[c]}"] = full.test_images[full.test_labels == c]
    digits = scenarios.digit_images()
    for kind in scenarios.JUNK_KINDS:
        items = test_in[rng.choice(len(test_in), JUNK_PER_KIND, replace=False)]
        sets[f"junk:{kind}"] = scenarios.make_junk(
            kind, JUNK_PER_KIND, rng, (28, 28), items=items, digits=digits
        )
    # every kind together: the equal mix of scenario (b)
    sets["junk"] = np.concatenate([sets[f"junk:{kind}"] for kind in scenarios.JUNK_KINDS])
    return sets


def part_of_another(name: str) -> bool:
    """A set that is a part (unseen:<class>) or the union (junk) of others."""
    return name.startswith("unseen:") or name == "junk"


def auroc(inside: np.ndarray, outside: np.ndarray) -> float:
    y = np.r_[np.zeros(len(inside)), np.ones(len(outside))]
    return float(roc_auc_score(y, np.r_[inside, outside]))


def run_seed(seed: int, overrides: list[str], work: Path) -> tuple[list[dict], dict]:
    cfg, paths, source, split, teacher_seconds = teacher_for(seed, overrides, work)
    model, meta = model_io.load(paths.model("teacher"))
    features = Features(model)
    train = features(source.train_images[split.train])
    val = features(source.train_images[split.val])
    # the model's classes are the sorted folder names: source label -> the model's index
    to_model = np.array([meta.class_names.index(name) for name in source.class_names])
    train_labels = to_model[source.train_labels[split.train]]
    val_labels = to_model[source.train_labels[split.val]]
    sets = ood_sets(sources.fashion_mnist(cfg.data.idx_dir), seed)
    start = time.perf_counter()
    set_features = {name: features(images) for name, images in sets.items() if name != "junk"}
    extract_seconds = time.perf_counter() - start
    set_features["junk"] = join([f for n, f in set_features.items() if n.startswith("junk:")])
    # the transductive score's pool: every image scored (in, unseen classes, every junk kind)
    pool = join([f for name, f in set_features.items() if not part_of_another(name)])
    scorer = Scorer(train, train_labels, val, val_labels, pool)
    val_scores = scorer(val)
    start = time.perf_counter()
    set_scores = {name: scorer(f, in_pool=True) for name, f in set_features.items()}
    score_seconds = time.perf_counter() - start
    n_images = sum(len(images) for name, images in sets.items() if not part_of_another(name))
    in_probs = set_features["in"]["probs"]
    accuracy = float((in_probs.argmax(1) == to_model[source.test_labels]).mean())
    # the logits rebuilt from the features must give the model's probabilities
    logits = set_features["in"]["logits"]
    rebuilt = np.exp(logits - logsumexp(logits, axis=1, keepdims=True))
    logit_error = float(np.abs(rebuilt - in_probs).max())
    info = {
        "seed": seed,
        "teacher_accuracy_classes_0_5": round(accuracy, 4),
        "teacher_seconds": teacher_seconds,
        "temperature": round(scorer.temperature, 4),
        "pca_residual_dims": scorer.dims,
        "logits_vs_probs_max_abs_error": logit_error,
        "feature_seconds_per_image": extract_seconds / n_images,
        "all_scores_seconds_per_image": score_seconds / sum(map(len, sets.values())),
        # each score's own work after the features (a sum's: its parts' together)
        "score_seconds_per_image": {
            name: scorer.seconds[name] / scorer.counted[name] for name in scorer.seconds
        },
        "train_images": len(split.train),
        "val_images": len(split.val),
        "blocks": features.block_names,
        "overrides": overrides,
    }
    print(f"[seed {seed}] {json.dumps(info)}", flush=True)
    pipeline_rows = pipeline_scores(
        model, source, split, train_labels, train, val, set_features, sets, seed, overrides
    )
    rows = []
    inside = set_scores["in"]
    for score in inside:
        cut = float(np.quantile(val_scores[score], CUT_QUANTILE))
        keep95 = float(np.quantile(inside[score], CUT_QUANTILE))
        frr_val = float(np.mean(val_scores[score] > cut))
        frr_test = float(np.mean(inside[score] > cut))
        for name in sets:
            if name == "in":
                continue
            outside = set_scores[name][score]
            rows.append(
                {
                    "seed": seed,
                    "score": score,
                    "scenario": name,
                    "auroc": round(auroc(inside[score], outside), 4),
                    "cut": cut,
                    "false_rejection_val": round(frr_val, 4),
                    "false_rejection_test": round(frr_test, 4),
                    "removed": round(float(np.mean(outside > cut)), 4),
                    "fpr95": round(float(np.mean(outside <= keep95)), 4),
                    "n_in": len(inside[score]),
                    "n_ood": len(outside),
                    "overrides": overrides,
                }
            )
    return rows + pipeline_rows, info


def _blocks(f: dict) -> list[np.ndarray]:
    """A feature dict as the pipeline's score reads it: every block's pooled features, then
    the classifier's input (pseudolabel.ood.feature_tensors' order)."""
    return [*f["blocks"], f["pool"]]


def pipeline_scores(
    model, source, split, train_labels, train, val, set_features, sets, seed, overrides
) -> list[dict]:
    """The pipeline's own score (pseudolabel.ood, its code, not a copy): the Mahalanobis
    layer ensemble alone (`pipeline_distances`) and with its contrast term (`pipeline`),
    fitted per scenario on that scenario's pool as the pipeline fits it on a folder: the
    in-distribution test images plus that set's images."""
    base = ood.fit(
        model,
        source.train_images[split.train][..., None].astype(np.float32),
        train_labels,
        source.train_images[split.val][..., None].astype(np.float32),
    )
    prior = np.bincount(train_labels, minlength=KNOWN) / len(train_labels)
    tr, va, inside = _blocks(train), _blocks(val), set_features["in"]
    rows = []
    for name in sets:
        if name == "in":
            continue
        pool = join([inside, set_features[name]])
        scorers = {
            "pipeline_distances": base,
            "pipeline": ood.with_contrast(base, tr, va, _blocks(pool), pool["probs"], prior),
        }
        for score, scorer in scorers.items():
            val_s = scorer.score(va)
            ins, out = scorer.score(_blocks(inside)), scorer.score(_blocks(set_features[name]))
            cut = float(np.quantile(val_s, CUT_QUANTILE))
            keep95 = float(np.quantile(ins, CUT_QUANTILE))
            rows.append(
                {
                    "seed": seed,
                    "score": score,
                    "scenario": name,
                    "auroc": round(auroc(ins, out), 4),
                    "cut": cut,
                    "false_rejection_val": round(float(np.mean(val_s > cut)), 4),
                    "false_rejection_test": round(float(np.mean(ins > cut)), 4),
                    "removed": round(float(np.mean(out > cut)), 4),
                    "fpr95": round(float(np.mean(out <= keep95)), 4),
                    "n_in": len(ins),
                    "n_ood": len(out),
                    "overrides": overrides,
                }
            )
    return rows


def _same(a: dict, b: dict) -> bool:
    return all(a.get(k) == b.get(k) for k in ("seed", "score", "scenario", "overrides"))


def table(rows: list[dict], scenarios_shown: list[str] | None = None) -> str:
    """Mean AUROC over seeds, a score per line, a scenario per column; + the cut's false
    rejection on test and the share of unseen-class and junk images it removes."""
    frame = pd.DataFrame(rows)
    frame["recipe"] = frame["overrides"].map(" ".join)
    lines = []
    for recipe, group in frame.groupby("recipe", sort=False):
        pivot = group.pivot_table(index="score", columns="scenario", values="auroc", aggfunc="mean")
        order = list(dict.fromkeys(group["score"]))
        cols = scenarios_shown or list(dict.fromkeys(group["scenario"]))
        junk = [c for c in pivot.columns if c.startswith("junk:")]
        pivot["junk (mean)"] = pivot[junk].mean(axis=1)
        cols = [*cols, "junk (mean)"]
        frr = group.groupby("score")["false_rejection_test"].mean()
        removed = group.pivot_table(index="score", columns="scenario", values="removed")
        seeds = group["seed"].nunique()
        lines.append(f"overrides: {recipe or '(none)'}; {seeds} seed(s); AUROC (mean over seeds)")
        head = ["score", *cols, "FRR test @val cut", "unseen removed", "junk removed"]
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|---" * len(head) + "|")
        for score in order:
            cells = [f"{pivot.loc[score, c]:.3f}" for c in cols]
            cells.append(f"{frr[score]:.3f}")
            cells.append(f"{removed.loc[score, 'unseen_classes']:.3f}")
            cells.append(f"{removed.loc[score, junk].mean():.3f}")
            lines.append(f"| {score} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv, overrides = split_argv(argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/ood_scores_work"))
    parser.add_argument("--out", type=Path, default=RESULTS / "ood_scores.json")
    args = parser.parse_args(argv)
    payload = json.loads(args.out.read_text()) if args.out.is_file() else {"rows": []}
    rows: list[dict] = payload["rows"]
    payload.setdefault("teachers", [])
    command = " ".join(["python", "benchmarks/ood_scores.py", *sys.argv[1:]])
    for seed in args.seeds:
        start = time.perf_counter()
        new_rows, info = run_seed(seed, overrides, args.work)
        info["seconds"] = round(time.perf_counter() - start, 1)
        info["cpu"] = machine()
        info["code"] = code_version(CODE)
        for row in new_rows:
            row["cpu"], row["code"] = info["cpu"], info["code"]
            rows[:] = [r for r in rows if not _same(r, row)] + [row]
        payload["teachers"] = [
            t for t in payload["teachers"] if (t["seed"], t["overrides"]) != (seed, overrides)
        ] + [info]
        payload["table"] = table(rows)
        if command not in payload.setdefault("commands", []):
            payload["commands"].append(command)
        model_io.write_text_atomic(args.out, json.dumps(payload, indent=1) + "\n")
    print("\n" + table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
