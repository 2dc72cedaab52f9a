"""benchmarks/scenarios.py: the messy unlabeled pools of issue 29, on small synthetic arrays."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import scenarios  # noqa: E402


def _arrays(per_class: int = 40, classes: int = 10, seed: int = 0):
    """Images whose label is written in their first pixel, so a test can check the truth."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(classes), per_class)
    images = rng.integers(1, 200, (len(labels), 28, 28)).astype(np.uint8)
    images[:, 0, 0] = labels
    order = rng.permutation(len(labels))
    return images[order], labels[order]


DIGITS = np.random.default_rng(1).integers(0, 17, (30, 8, 8)).astype(np.float64)


@pytest.mark.parametrize("fraction", [0.0, 0.25, 0.5, 0.75])
def test_class_mismatch_has_the_asked_share_of_unseen_classes(fraction):
    images, labels = _arrays()
    pool = scenarios.class_mismatch(images, labels, range(6), fraction, size=100, seed=0)
    assert pool.images.shape == (100, 28, 28) and pool.images.dtype == np.uint8
    assert pool.ood.sum() == round(fraction * 100)
    # truth: the true class for classes 0-5, -1 (and kind unseen_class) for 6-9
    true = pool.images[:, 0, 0].astype(int)
    assert np.array_equal(pool.truth, np.where(true < 6, true, -1))
    assert set(pool.kind[pool.ood]) <= {"unseen_class"}
    assert set(pool.kind[~pool.ood]) == {"in"}


def test_class_mismatch_default_size_and_refusals():
    images, labels = _arrays()
    assert len(scenarios.class_mismatch(images, labels, range(6), 0.0)) == 240  # every known one
    pool = scenarios.class_mismatch(images, labels, range(6), 0.75)
    assert pool.ood.sum() == 160 and len(pool) == 213  # limited by the 160 unseen-class images
    with pytest.raises(ValueError):
        scenarios.class_mismatch(images, labels, range(6), 0.75, size=400)
    with pytest.raises(ValueError):
        scenarios.class_mismatch(images, labels, range(6), 1.0)


def test_with_junk_replaces_the_fraction_with_an_equal_mix_of_kinds():
    images, labels = _arrays()
    clean = scenarios.class_mismatch(images, labels, range(6), 0.0, size=240, seed=3)
    pool = scenarios.with_junk(clean, 0.10, seed=0, digits=DIGITS)
    assert len(pool) == 240 and pool.images.dtype == np.uint8
    counts = pool.counts()
    junk = {k: v for k, v in counts.items() if k.startswith("junk:")}
    assert set(junk) == {f"junk:{k}" for k in scenarios.JUNK_KINDS}
    assert sum(junk.values()) == 24 and max(junk.values()) - min(junk.values()) <= 1
    is_junk = np.char.startswith(pool.kind.astype(str), "junk:")
    assert np.all(pool.truth[is_junk] == -1)
    # the other images are untouched, with their truth
    assert np.array_equal(pool.images[~is_junk], clean.images[~is_junk])
    assert np.array_equal(pool.truth[~is_junk], clean.truth[~is_junk])
    # each kind is what it says
    blank = pool.images[pool.kind == "junk:blank"]
    assert all(len(np.unique(x)) == 1 for x in blank)
    at = np.flatnonzero(pool.kind == "junk:inverted")
    assert np.array_equal(pool.images[at], 255 - clean.images[at])
    assert not np.array_equal(pool.images[pool.kind == "junk:rotated"],
                              clean.images[pool.kind == "junk:rotated"])  # fmt: skip


def test_every_junk_kind_gives_uint8_images_of_the_shape():
    rng = np.random.default_rng(0)
    items = _arrays()[0][:5]
    for kind in scenarios.JUNK_KINDS:
        out = scenarios.make_junk(kind, 5, rng, (28, 28), items=items, digits=DIGITS)
        assert out.shape == (5, 28, 28) and out.dtype == np.uint8, kind
    with pytest.raises(ValueError):
        scenarios.make_junk("rotated", 5, rng)  # needs the items it turns
    with pytest.raises(ValueError):
        scenarios.make_junk("screenshot", 5, rng)


def test_long_tailed_pool_follows_the_exponential_profile():
    images, labels = _arrays(per_class=120)
    pool = scenarios.long_tailed(images, labels, ratio=10, seed=0)
    per_class = np.bincount(pool.truth, minlength=10)
    assert per_class[0] == 120 and per_class[-1] == 12  # head / tail = the ratio
    assert np.all(np.diff(per_class) <= 0)
    expected = np.floor(120 * 10.0 ** (-np.arange(10) / 9) + 1e-9)
    assert np.array_equal(per_class, expected)
    assert set(pool.kind) == {"in"} and not pool.ood.any()
    assert np.array_equal(pool.images[:, 0, 0], pool.truth)  # truth follows the images
    hundred = scenarios.long_tailed(images, labels, ratio=100, classes=[9, 8, 7], seed=0)
    assert np.bincount(hundred.truth, minlength=10)[[9, 8, 7]].tolist() == [120, 12, 1]


def test_pools_are_deterministic_by_seed():
    images, labels = _arrays()

    def build(seed):
        pool = scenarios.class_mismatch(images, labels, range(6), 0.5, size=120, seed=seed)
        return scenarios.with_junk(pool, 0.1, seed=seed, digits=DIGITS)

    a, b, c = build(0), build(0), build(1)
    assert np.array_equal(a.images, b.images) and np.array_equal(a.kind, b.kind)
    assert np.array_equal(a.truth, b.truth)
    assert not np.array_equal(a.images, c.images)
    lt = [scenarios.long_tailed(images, labels, 10, seed=s).images for s in (0, 0, 1)]
    assert np.array_equal(lt[0], lt[1]) and not np.array_equal(lt[0], lt[2])


def _written(tmp_path):
    """A 6-image pool (4 of two classes, an unseen-class image, a blank) written as a folder."""
    images = np.zeros((6, 28, 28), np.uint8)
    images[:, 0, 0] = np.arange(6)
    truth = np.array([0, 1, 1, 0, -1, -1])
    kind = np.array(["in"] * 4 + ["unseen_class", "junk:blank"], dtype=object)
    pool = scenarios.Pool(images, truth, kind)
    table = scenarios.write_pool(pool, tmp_path / "unlabeled", ["cat", "dog"])
    return pool, table


def test_write_pool_names_files_by_index_only_and_keeps_the_truth(tmp_path):
    pool, table = _written(tmp_path)
    files = sorted(p.name for p in (tmp_path / "unlabeled").iterdir())
    assert files == [f"pool_{i:05d}.png" for i in range(6)]
    from PIL import Image

    for i, name in enumerate(files):
        assert np.array_equal(np.asarray(Image.open(tmp_path / "unlabeled" / name)), pool.images[i])
    truth = scenarios.Truth(json.loads(json.dumps(table)))  # survives a JSON round trip
    # a CSV path, a merged-set copy (and a second copy, -1), an unknown file
    paths = ["pool_00001.png", "dog/u__pool_00002.png", "cat/u__pool_00003-1.png",
             "pool_00004.png", "pool_00005.png", "train_00001.png"]  # fmt: skip
    assert truth(paths) == ["dog", "dog", "cat", None, None, None]
    assert truth.kinds(paths) == ["in", "in", "in", "unseen_class", "junk:blank", None]


def test_labeling_report_precision_shares_auroc_and_flags(tmp_path):
    _, table = _written(tmp_path)
    truth = scenarios.Truth(table)
    csv = pd.DataFrame(
        {
            "path": [scenarios.pool_file(i) for i in range(6)],
            "label": ["cat", "dog", "cat", "cat", "dog", "cat"],  # image 2 wrong
            "confidence": 0.9,
            "ood_score": [0.1, 0.2, 0.5, 0.3, 0.4, 0.9],  # unseen below one "in" image
            "ood": ["False", "False", "True", "False", "True", "True"],
        }
    )
    manifest = pd.DataFrame(  # merge kept images 0, 1, 2 and 4; one labeled image
        {
            "file": [
                "cat/train_1.png",
                "cat/u__pool_00000.png",
                "dog/u__pool_00001.png",
                "cat/u__pool_00002.png",
                "dog/u__pool_00004.png",
            ],  # fmt: skip
            "label": ["cat", "cat", "dog", "cat", "dog"],
            "source": ["labeled", "pseudo", "pseudo", "pseudo", "pseudo"],
        }
    )
    report = scenarios.labeling_report(csv, manifest, truth)
    assert report["pool_counts"] == {"in": 4, "unseen_class": 1, "junk:blank": 1}
    assert report["accuracy_in"] == 0.75
    assert report["pseudo_labeled"] == 4
    assert report["pseudo_label_precision"] == round(2 / 3, 4)
    assert report["pseudo_label_precision_all"] == 0.5
    assert report["merged_counts"] == {"in": 3, "unseen_class": 1, "junk:blank": 0}
    assert report["merged_share"] == {"in": 0.75, "unseen_class": 0.25, "junk:blank": 0.0}
    assert report["kept_by_kind"] == {"in": 0.75, "unseen_class": 1.0, "junk:blank": 0.0}
    assert report["auroc"] == {"unseen_class": 0.75, "junk:blank": 1.0, "ood": 0.875}
    assert report["flagged"] == {"in": 0.25, "unseen_class": 1.0, "junk:blank": 1.0}
    # without the pipeline's score and flag: neither is reported
    plain = scenarios.labeling_report(csv.drop(columns=["ood_score", "ood"]), manifest, truth)
    assert "auroc" not in plain and "flagged" not in plain


def test_an_arm_the_shared_labeling_already_ran_reuses_it(tmp_path, monkeypatch):
    """messy_pools: the auto arm (exclude=auto, the default) is the shared labeling itself;
    keep (exclude=false) relabels under its own folder."""
    import messy_pools

    from pseudolabel.paths import Paths

    shared = Paths(tmp_path)
    assert messy_pools.arm_labeling(shared, 0, "auto", [], "t") == (shared, 0.0)
    ran = []
    monkeypatch.setitem(messy_pools.stages.STAGES, "pseudo_label", lambda c, p: ran.append(p))
    monkeypatch.setitem(messy_pools.stages.STAGES, "merge", lambda c, p: ran.append(p))
    arm, _ = messy_pools.arm_labeling(shared, 0, "keep", [], "t")
    assert arm.root == tmp_path / "labels_keep" and ran == [arm, arm]


def test_messy_scenario_names_parse_or_fail_with_the_forms():
    """messy_pools: 'junk' is 10 % junk, 'junk-0.03' 3 %; a bad name names every form."""
    import argparse

    import messy_pools

    assert messy_pools.parse_scenario("junk") == {"kind": "junk", "fraction": 0.10}
    assert messy_pools.parse_scenario("junk-0.03") == {"kind": "junk", "fraction": 0.03}
    assert messy_pools.parse_scenario("mismatch-0") == {"kind": "mismatch", "fraction": 0.0}
    assert messy_pools.parse_scenario("longtail-100") == {"kind": "longtail", "ratio": 100.0}
    assert messy_pools.parse_scenario("mixed") == {"kind": "mixed", **messy_pools.MIXED}
    assert messy_pools.task_of(messy_pools.parse_scenario("mixed")) == "classes_0-5"
    bad_names = ("junk-0", "junk-1.5", "junk-x", "mismatch-1", "longtail-0.5", "noise", "mixed-2")
    for bad in bad_names:
        with pytest.raises(argparse.ArgumentTypeError, match="junk-F"):
            messy_pools.parse_scenario(bad)


def test_ood_in_pool_reports_each_kind_past_farther_cuts():
    """ood_in_pool.by_kind: AUROC and the flagged share per kind, all junk together, and with
    the cut each kind's share past 1.5, 2 and 3 times it (a second, farther cut)."""
    import ood_in_pool

    kinds = np.array(["in"] * 4 + ["junk:blank"] * 2 + ["junk:noise"] * 2)
    scores = np.array([0.0, 0.5, 1.0, 2.5, 5.0, 1.2, 3.5, 2.2])
    flags = scores > 1.0  # the cut: 1.0
    out = ood_in_pool.by_kind(kinds, scores, flags, cut=1.0)
    assert list(out) == ["in", "junk:blank", "junk:noise", "junk"]
    assert out["in"] == {"flagged": 0.25, "n": 4, "past": {"1.5": 0.25, "2": 0.25, "3": 0.0}}
    assert out["junk"]["past"] == {"1.5": 0.75, "2": 0.75, "3": 0.5}
    assert out["junk:blank"]["flagged"] == 1.0 and out["junk:noise"]["auroc"] == 0.875
    assert "past" not in ood_in_pool.by_kind(kinds, scores, flags)["junk"]  # no cut given


def test_mixed_pool_has_every_defect_at_once():
    """scenarios.mixed: the known classes long-tailed with a head drawn by the seed, the asked
    share of other classes, then the asked share replaced by junk; deterministic by seed."""
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(10), 400)
    images = rng.integers(1, 255, (len(labels), 28, 28)).astype(np.uint8)
    heads = set()
    for seed in range(4):
        pool = scenarios.mixed(images, labels, range(6), 10.0, 0.25, 0.05, seed=seed)
        kinds = pool.counts()
        junk = sum(v for k, v in kinds.items() if k.startswith("junk:"))
        assert junk == round(0.05 * len(pool))
        before_junk = kinds["in"] + kinds["unseen_class"] + junk
        assert abs(kinds["unseen_class"] / before_junk - 0.25) < 0.03
        known = np.bincount(pool.truth[pool.truth >= 0], minlength=10)
        assert known[6:].sum() == 0  # classes 6-9 are never "in"
        counts = known[:6]
        assert counts.max() / counts.min() > 7  # about 10 less what junk replaced
        heads.add(int(np.argmax(counts)))
        again = scenarios.mixed(images, labels, range(6), 10.0, 0.25, 0.05, seed=seed)
        assert np.array_equal(pool.images, again.images) and np.array_equal(pool.kind, again.kind)
    assert len(heads) > 1  # the head class changes with the seed
    with pytest.raises(ValueError, match="unseen"):
        scenarios.mixed(images, labels, range(6), 10.0, 0.99, 0.05)


def test_a_row_is_the_defaults_only_if_it_aligned_as_the_default(monkeypatch):
    """messy_pools.mark_default: with alignment_target=auto the default aligns a skewed pool
    to its own mix and a balanced one to the labeled mix; a row counts where its students did
    the same (recorded, or read from its recipe for rows from before the record)."""
    import messy_pools
    import ssl_gain

    composed = ssl_gain._composed
    auto = "student.consistency.alignment_target=auto"
    monkeypatch.setattr(ssl_gain, "_composed", lambda recipe: composed((auto, *recipe)))

    def row(scenario, setting, **extra):
        labeling = {"pool_counts": {"in": 100}, "flagged": {"in": 0.05}}
        arm = messy_pools.ARMS[setting]
        return {"scenario": scenario, "seed": 0, "setting": setting, "overrides": [],
                "setting_overrides": arm, "labeling": labeling, **extra}  # fmt: skip

    def default(r, in_pool=()):
        return messy_pools.mark_default(r, [r], list(in_pool))["default"]

    assert not default(row("longtail-10", "auto"))  # ran labeled (from before the record)
    assert default(row("longtail-10", "pool_align"))
    assert default(row("longtail-10", "auto", alignment="pool"))  # recorded: auto picked pool
    assert default(row("junk", "auto")) and not default(row("junk", "pool_align"))
    # the pool's own labeling decides over its design: a long tail its teacher found balanced
    said = [{"scenario": "longtail-10", "seed": 0, "class_mix": {"skewed": False}}]
    assert default(row("longtail-10", "auto"), said)
    assert not default(row("longtail-10", "auto", class_mix={"skewed": True}), said)
    assert not default(row("longtail-10", "no_align"))


def test_a_benchmark_run_folder_sees_what_the_student_reads(tmp_path):
    """ssl_gain._link_shared: a setting's folder links the labeling's CSV and merged set and
    copies the metrics the student reads (merge's, and the labeling's class_mix, which the
    default alignment_target=auto reads); a missing one failed the mixed scenario's arm."""
    import ssl_gain

    from pseudolabel.paths import Paths

    shared, run = Paths(tmp_path / "shared"), Paths(tmp_path / "run")
    for folder in (shared.outputs, shared.merged, shared.metrics):
        folder.mkdir(parents=True)
    (shared.metrics / "merge.json").write_text('{"pseudo_labeled": 3}')
    (shared.metrics / "pseudo_label.json").write_text('{"class_mix": {"skewed": true}}')
    ssl_gain._link_shared(shared, run)
    assert run.outputs.resolve() == shared.outputs.resolve()
    assert run.merged.resolve() == shared.merged.resolve()
    labeling = json.loads(run.first_round_labeling_metrics.read_text())
    assert labeling["class_mix"]["skewed"] is True


def test_a_mask_arm_reuses_the_baseline_of_its_recipe_without_the_mask(tmp_path):
    """ssl_gain.baseline_peer: the labeled-only baseline never reads student.consistency.mask*
    (it has no unlabeled term), so an arm that only changes them takes the baseline of the row
    without them; any other student key still trains its own. And _online_last_epoch reads a
    student's last epoch of its history (what every row records, per round since rounds
    relabel with truth too)."""
    import ssl_gain

    recipe = ["student.train.epochs=3"]
    row = {"budget": 50, "seed": 0, "setting": "consistency", "compute": 1, "overrides": recipe}
    mask = ["student.consistency.mask=softmatch", "student.consistency.mask_momentum=0.99"]
    peer = ssl_gain.baseline_peer([row], 50, 0, "consistency", 1, [*recipe, *mask])
    assert peer is not None and peer["setting"] == "consistency student.train.epochs=3"
    other = [*recipe, "student.consistency.ratio=7"]
    assert ssl_gain.baseline_peer([row], 50, 0, "consistency", 1, other) is None
    assert ssl_gain.baseline_peer([row], 50, 1, "consistency", 1, [*recipe, *mask]) is None

    history = tmp_path / "student.csv"
    history.write_text("epoch,mask_rate,pseudo_precision\n0,1.0,0.75\n1,0.8512,0.90068\n")
    assert ssl_gain._online_last_epoch(history) == {
        "online_pseudo_precision_last_epoch": 0.9007,
        "mask_rate_last_epoch": 0.8512,
    }
    history.write_text("epoch,loss\n0,1.0\n")  # a labeled-only history: nothing to read
    assert ssl_gain._online_last_epoch(history) == {}
