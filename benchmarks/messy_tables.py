"""docs/messy.md's tables and figure, generated from the committed benchmark JSON.

    python benchmarks/messy_tables.py          # rewrite the generated part of docs/messy.md
    python benchmarks/messy_tables.py --check  # exit 1 if docs/messy.md is out of date

Inputs: benchmarks/results/ood_scores.json (benchmarks/ood_scores.py: which OOD score),
benchmarks/results/messy_pools.json (benchmarks/messy_pools.py: the student on messy pools,
with and without the pipeline's defence), ood_in_pool.json (the pipeline's score on those
pools) and class_mix.json (benchmarks/class_mix.py: how well the teacher tells a pool's mix).
The block between the markers is this script's output (tests/test_docs.py checks it); the
figure is docs/figures/messy_gain.png.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import doc_block  # noqa: E402
from gain_tables import _cell, _pyplot, _save  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SCORES = ROOT / "benchmarks" / "results" / "ood_scores.json"
POOLS = ROOT / "benchmarks" / "results" / "messy_pools.json"
IN_POOL = ROOT / "benchmarks" / "results" / "ood_in_pool.json"
MIX = ROOT / "benchmarks" / "results" / "class_mix.json"
DOC = ROOT / "docs" / "messy.md"
FIGURE = ROOT / "docs" / "figures" / "messy_gain.png"
START, END = "<!-- messy-tables:start -->", "<!-- messy-tables:end -->"
# the paired arms of what to leave out, where the prose on exclude=auto's bands needs it
ARMS_START, ARMS_END = "<!-- messy-arms:start -->", "<!-- messy-arms:end -->"
# The scores shown (ood_scores.json has more): the baseline, the classic ones, the chosen one.
SHOWN = {
    "msp": "max-softmax (baseline)",
    "energy": "energy",
    "knn5": "kNN (k=5), penultimate features",
    "mahalanobis": "Mahalanobis, penultimate features",
    "pipeline_distances": "Mahalanobis, all blocks (`pseudo_label.ood.contrast=false`)",
    "mahalanobis_all_blocks+knn5/pool_knn5": "+ kNN ratio to the pool (transductive)",
    "pipeline": "**+ contrast per block (the pipeline's default)**",
}
SETTINGS = {
    "keep": "nothing left out (exclude=false)",
    "ood": "pseudo_label.ood.exclude=true",
    "auto": "exclude=auto",
    "ood_fr20": "exclude, cut at 20 % false rejection",
    "keep_far": "only past 2x the cut left out (exclude=far, far=2)",
    "pool_align": "alignment to the pool's estimated class mix (alignment_target=pool)",
    "no_align": "no distribution alignment (distribution_alignment=false)",
    "no_flex": "one fixed threshold for every class (flexible=false)",
}
COLUMNS = {
    "unseen_classes": "unseen classes 6-9",
    "unseen:shirt": "shirt",
    "unseen:sneaker": "sneaker",
    "unseen:bag": "bag",
    "unseen:ankle_boot": "boot",
    "junk": "junk (all kinds)",
    "junk:rotated": "rotated",
}


def score_table(rows: list[dict]) -> str:
    seeds = sorted({r["seed"] for r in rows})
    head = "| score | " + " | ".join(COLUMNS.values()) + " | in-distribution test flagged |"
    lines = [
        f"AUROC (OOD = positive), mean ± std over seeds {', '.join(map(str, seeds))}; the last "
        "column: the share of the classes 0-5 test images past the cut set at the val images' "
        "95th percentile.",
        "",
        head,
        "|---" * (len(COLUMNS) + 2) + "|",
    ]
    for score, name in SHOWN.items():
        mine = [r for r in rows if r["score"] == score]
        if not mine:
            continue
        cells = [
            _cell([r["auroc"] for r in mine if r["scenario"] == column], 1, 3) for column in COLUMNS
        ]
        frr = [r["false_rejection_test"] for r in mine if r["scenario"] == "unseen_classes"]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {_cell(frr, 100, 1)} % |")
    return "\n".join(lines)


def _num(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def _setting(row: dict) -> str:
    """A row's setting, with the overrides its run added (another compute, say) spelled out."""
    extra = " ".join(row.get("overrides") or [])
    return f"{row['setting']} (`{extra}`)" if extra else row["setting"]


def _arm(row: dict) -> str:
    """The summary's group: the setting, and for `auto` what it left out on that row, since
    `auto`'s lines moved between runs (seeds run under one line do not average with another's)."""
    did = LEFT_OUT.get(row.get("ood_left_out")) if row["setting"] == "auto" else None
    return f"{_setting(row)}: {did} out" if did else _setting(row)


def pool_table(rows: list[dict]) -> str:
    head = (
        "| scenario | seed | setting | teacher | baseline | best labeled-only | student | "
        "gain (points) | OOD share of the merged set | OOD flagged | in-distribution flagged | "
        "pool flagged (auto decides on it) | AUROC | AUROC, last round's labeling | minutes |"
    )
    lines = [head, "|---" * 15 + "|"]
    order = {name: i for i, name in enumerate(SETTINGS)}
    for r in sorted(rows, key=lambda r: (r["scenario"], r["seed"], order.get(r["setting"], 9))):
        labeling = r.get("labeling", {})
        merged = labeling.get("merged_share", {})
        ood_share = sum(v for k, v in merged.items() if k != "in") if merged else None
        flagged = labeling.get("flagged") or {}
        kinds = labeling.get("pool_counts", {})
        out_kinds = [k for k in flagged if k != "in"]
        total = sum(kinds.get(k, 0) for k in out_kinds)
        ood_flagged = (
            sum(flagged[k] * kinds.get(k, 0) for k in out_kinds) / total if total else None
        )
        auroc = (labeling.get("auroc") or {}).get("ood")
        rounds = r.get("by_round") or [{}]
        last_auroc = (rounds[-1].get("auroc") or {}).get("ood")
        cells = [
            r["scenario"],
            r["seed"],
            _setting(r),
            *(f"{100 * r[k]:.2f}" for k in ("teacher", "baseline", "best_labeled_only")),
            f"{100 * r['student']:.2f}",
            f"{r['gain']:+.2f}",
            _num(ood_share),
            _num(ood_flagged),
            _num(flagged.get("in")),
            _num(r.get("ood_flagged")),
            _num(auroc),
            _num(last_auroc),
            f"{r['seconds'] / 60:.0f}",
        ]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    # Rows of different machines or TensorFlow kernels train different teachers and baselines
    # from the same split: say which rows ran where.
    runs: dict[str, set[str]] = {}
    for r in rows:
        runs.setdefault(r.get("cpu", "?"), set()).add(f"{r['scenario']} seed {r['seed']}")
    machines = "; ".join(f"{cpu}: {', '.join(sorted(runs[cpu]))}" for cpu in sorted(runs))
    commits = sorted({r.get("code") or "?" for r in rows})
    lines += ["", f"Machines (2 cores each): {machines}. Code: {', '.join(commits)}."]
    return "\n".join(lines)


def summary_table(rows: list[dict]) -> str:
    """Per scenario and setting: the gain's mean ± std over seeds, its lowest seed, the seeds."""
    lines = [
        "| scenario | setting | seeds | gain, mean ± std (points) | lowest seed |",
        "|---|---|---|---|---|",
    ]
    order = {name: i for i, name in enumerate(SETTINGS)}
    groups = sorted(
        {(r["scenario"], r["setting"], _arm(r)) for r in rows},
        key=lambda g: (g[0], order.get(g[1], 9), g[2]),
    )
    by_scenario: dict[str, list[str]] = {}
    for scenario, _name, setting in groups:
        mine = sorted(
            (r for r in rows if (r["scenario"], _arm(r)) == (scenario, setting)),
            key=lambda r: r["seed"],
        )
        if all(r.get("default") for r in mine):  # what the project's default does here
            setting = f"**{setting} (= the default: auto {_auto(mine)})**"
        by_scenario.setdefault(scenario, []).append(_summary_line(scenario, setting, mine))
    for scenario, scenario_lines in by_scenario.items():
        lines += scenario_lines
        # the default's seeds where they came from more than one arm (keep/ood before auto)
        mine = [r for r in rows if r["scenario"] == scenario and r.get("default")]
        mine = sorted((r for r in mine if not r["overrides"]), key=lambda r: r["seed"])
        if len({r["setting"] for r in mine}) > 1 and len({r["seed"] for r in mine}) == len(mine):
            arms = ", ".join(f"seed {r['seed']}: {r['setting']}" for r in mine)
            setting = f"**the default, all its seeds (auto {_auto(mine)}; {arms})**"
            lines.append(_summary_line(scenario, setting, mine))
    return "\n".join(lines)


def _summary_line(scenario: str, setting: str, rows: list[dict]) -> str:
    gains = [r["gain"] for r in rows]
    cell = _cell(gains, 1, 2)
    cell = cell if cell.startswith("-") else "+" + cell
    seeds = ", ".join(str(r["seed"]) for r in rows)
    return f"| {scenario} | {setting} | {seeds} | {cell} | {min(gains):+.2f} |"


def _auto(rows: list[dict]) -> str:
    """What exclude=auto decided on these rows' teachers' labelings (their flagged shares)."""
    shares = [r["ood_flagged"] for r in rows if r.get("ood_flagged") is not None]
    low, high = f"{100 * min(shares):.1f}", f"{100 * max(shares):.1f}"
    flagged = f"{low} %" if low == high else f"{low}-{high} %"
    did = {r.get("ood_left_out") for r in rows}  # messy_pools.mark_default
    verbs = {"flagged": "excludes", "far": "leaves out the far ones", "none": "keeps"}
    verb = verbs[did.pop()] if len(did) == 1 and did <= verbs.keys() else "decides per seed"
    return f"{verb}: {flagged} flagged"


# What a row's merge and consistency term left out (`ood_left_out`, messy_pools.mark_default),
# for the arms that differ only in that: keep, ood, keep_far, and auto (which ran one of them).
LEFT_OUT = {"flagged": "every flagged image", "far": "only the far ones", "none": "nothing"}
EXCLUSION_ARMS = ("keep", "ood", "keep_far", "auto")


def arms_table(rows: list[dict]) -> str:
    """What to leave out, paired: per folder and seed, the gain of each arm that left out
    something else (every flagged image, the far ones, nothing) from the same teacher's labeling
    and the same baseline, ordered by the share of the folder the teacher flagged (what
    exclude=auto decides on), with the share past the far cut where that arm ran. The default's
    arm in bold."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["setting"] in EXCLUSION_ARMS and r.get("ood_left_out") in LEFT_OUT:
            key = (r["scenario"], r["seed"], r["teacher"], tuple(r.get("overrides") or []))
            groups.setdefault(key, []).append(r)
    lines = [
        "| folder | seed | teacher | pool flagged | past the far cut | "
        + " | ".join(f"{what} left out" for what in LEFT_OUT.values())
        + " |",
        "|---|---|---:|---:|---:|" + "---:|" * len(LEFT_OUT),
    ]
    body, ranged = [], False
    for (scenario, seed, teacher, overrides), mine in groups.items():
        if len({r["ood_left_out"] for r in mine}) < 2:
            continue  # nothing to pair
        shares = sorted({round(100 * r["ood_flagged"], 1) for r in mine if r.get("ood_flagged")})
        ends = shares[:1] if len(shares) == 1 else [shares[0], shares[-1]]
        ranged |= len(ends) > 1
        flagged = "-".join(f"{v:.1f}" for v in ends) or "–"
        folder = scenario + (f" (`{' '.join(overrides)}`)" if overrides else "")
        thresholded = any(o.startswith("pseudo_label.threshold=") for o in overrides)
        far = [  # what the far arm left out, where no confidence threshold left out more
            1 - r["pseudo_labeled"] / r["pool_size"] for r in mine if r["ood_left_out"] == "far"
        ]
        past = f"{100 * far[0]:.1f} %" if far and not thresholded else "–"
        cells = []
        for what in LEFT_OUT:
            gains = [
                f"**{r['gain']:+.2f}**" if r.get("default") else f"{r['gain']:+.2f}"
                for r in mine
                if r["ood_left_out"] == what
            ]
            cells.append(" / ".join(gains) or "–")
        row = [folder, str(seed), f"{100 * teacher:.2f}", f"{flagged} %", past, *cells]
        line = "| " + " | ".join(row) + " |"
        body.append(((shares[0] if shares else 0, scenario, seed, teacher), line))
    lines += [line for _key, line in sorted(body)]
    if ranged:
        lines += [
            "",
            "A range of flagged shares: that folder's arms ran different versions of the score "
            "(the rows' `code`) on the same teacher.",
        ]
    return "\n".join(lines)


def in_pool_table(rows: list[dict]) -> str:
    """The pipeline's own score and cut on the benchmark's pools (benchmarks/ood_in_pool.py)."""
    lines = [
        "| scenario | seed | kind | images | AUROC | share flagged | past 2x the cut | past 3x |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (r["scenario"], r["seed"])):
        for kind, v in r["by_kind"].items():
            auroc = _num(v.get("auroc"))
            past = [v.get("past", {}).get(k) for k in ("2", "3")]
            far = " | ".join("–" if p is None else f"{p:.3f}" for p in past)
            lines.append(
                f"| {r['scenario']} | {r['seed']} | {kind} | {v['n']:,} | {auroc} | "
                f"{v['flagged']:.3f} | {far} |"
            )
        if r["scenario"].startswith("longtail"):  # the skewed pool: is its head class flagged?
            for name, v in r.get("in_flagged_by_class", {}).items():
                lines.append(
                    f"| {r['scenario']} | {r['seed']} | in: {name} | {v['n']:,} | – | "
                    f"{v['flagged']:.3f} | – | – |"
                )
    codes = sorted({r.get("code") or "?" for r in rows})
    runs: dict[str, list[str]] = {}
    for r in sorted(rows, key=lambda r: (r["scenario"], r["seed"])):
        runs.setdefault(r.get("cpu", "?"), []).append(f"{r['scenario']} seed {r['seed']}")
    machines = "; ".join(f"{cpu}: {', '.join(runs[cpu])}" for cpu in sorted(runs))
    lines += ["", f"Machines (2 cores each): {machines}. Code: {', '.join(codes)}."]
    return "\n".join(lines)


def mix_table(rows: list[dict]) -> str:
    """How well the teacher's labeling tells each pool's class mix (benchmarks/class_mix.py)."""
    lines = [
        "| scenario | seed | teacher | images | true head:tail | EM: error | EM: head:tail | "
        "mean probability: error | predicted-class count: error |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in sorted(rows, key=lambda r: (r["scenario"], r["seed"])):
        est = r["estimates"]
        lines.append(
            f"| {r['scenario']} | {r['seed']} | {_num(r.get('teacher'))} | {r['images']:,} | "
            f"{r['true_head_to_tail']:.1f} | {est['em']['error']:.3f} | "
            f"{est['em']['head_to_tail']:.1f} | {est['pcc']['error']:.3f} | "
            f"{est['cc']['error']:.3f} |"
        )
    codes = sorted({r.get("code") or "?" for r in rows})
    cpus = sorted({r.get("cpu", "?") for r in rows})
    lines += [
        "",
        "Error: total variation from the true mix of the pool's in-distribution images (the "
        "share of them the estimate puts in the wrong class). Read from the teachers' labelings "
        f"(round 1) on {'; '.join(cpus)} (2 cores). Code: {', '.join(codes)}.",
    ]
    return "\n".join(lines)


def reported_mix_table(rows: list[dict], reported: list[dict] = ()) -> str:
    """The pipeline's own class_mix on the pools (benchmarks/ood_in_pool.py's rows that have
    it, and class_mix.py --stage's `reported` rows: pools without a truth table): what
    student.consistency.alignment_target=auto reads."""
    lines = [
        "| pool | seed | images learnt from | estimated head:tail | error on val | skewed |",
        "|---|---|---:|---:|---:|---|",
    ]
    found = [(r["scenario"], str(r["seed"]), r["class_mix"]) for r in rows if "class_mix" in r]
    found.sort(key=lambda f: f[:2])
    for r in reported:
        seed = next((o.split("=", 1)[1] for o in r["overrides"] if o.startswith("seed=")), "–")
        found.append((f"{r['name']} (`{' '.join(r['overrides'])}`)", seed, r["class_mix"]))
    for pool, seed, m in found:
        lines.append(
            f"| {pool} | {seed} | {m['images']:,} | {m['head_to_tail']:.1f} | "
            f"{m['val_error']:.3f} | {'yes' if m['skewed'] else 'no'} |"
        )
    cpus = sorted({r.get("cpu", "?") for r in [*rows, *reported] if "class_mix" in r})
    lines += ["", f"On {'; '.join(cpus)} (2 cores)."]
    return "\n".join(lines)


def render(scores: dict, pools: dict, in_pool: dict | None = None, mix: dict | None = None) -> str:
    parts = ["### Which score", "", score_table(scores.get("rows", []))]
    if in_pool and in_pool.get("rows"):
        parts += ["", "### The pipeline's score on the pools", "", in_pool_table(in_pool["rows"])]
    if mix and mix.get("rows"):
        parts += ["", "### The folder's class mix", "", mix_table(mix["rows"])]
        in_pool_rows = (in_pool or {}).get("rows", [])
        if any("class_mix" in r for r in in_pool_rows) or mix.get("reported"):
            reported = reported_mix_table(in_pool_rows, mix.get("reported", []))
            parts += [
                "",
                "As the pipeline reports it (the stage's `class_mix`: `ood_in_pool.py`, and "
                "`class_mix.py --stage` for ssl_gain's clean pool):",
            ]
            parts += ["", reported]
    parts += ["", "### The student on messy pools", ""]
    rows = pools.get("rows", [])
    if rows:
        parts += [summary_table(rows), "", pool_table(rows)]
    else:
        parts.append("No rows yet.")
    if any(r["scenario"].startswith("mismatch-") for r in rows):
        parts += ["", f"![Gain vs class mismatch](figures/{FIGURE.name})"]
    return "\n".join(parts)


def gain_figure(rows: list[dict], path: Path) -> bool:
    """Gain over the best labeled-only model against the share of unseen classes in the pool,
    per setting (mean over seeds, each seed a dot)."""
    # at the default compute: rows whose run added overrides (half the steps, say) are not
    mismatch = [r for r in rows if r["scenario"].startswith("mismatch-") and not r["overrides"]]
    if not mismatch:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    labels = {**SETTINGS, "ood": "flagged left out (exclude=true, or auto where it excluded)"}

    def arm(row: dict) -> str:  # an auto row learnt what the keep or the ood arm learns
        if row["setting"] == "auto" and row.get("ood_excluded") is not None:
            return "ood" if row["ood_excluded"] else "keep"
        return row["setting"]

    for setting in sorted({arm(r) for r in mismatch}):
        mine = [r for r in mismatch if arm(r) == setting]
        xs = sorted({r["scenario_params"]["fraction"] for r in mine})
        means = [
            sum(r["gain"] for r in mine if r["scenario_params"]["fraction"] == x)
            / len([r for r in mine if r["scenario_params"]["fraction"] == x])
            for x in xs
        ]
        (line,) = ax.plot(xs, means, marker="o", label=labels.get(setting, setting))
        ax.scatter(
            [r["scenario_params"]["fraction"] for r in mine],
            [r["gain"] for r in mine],
            color=line.get_color(),
            alpha=0.4,
            s=12,
        )
    default = [r for r in mismatch if r.get("default")]  # the arm exclude=auto picks, per row
    if default:
        xs = sorted({r["scenario_params"]["fraction"] for r in default})
        means = [
            sum(g := [r["gain"] for r in default if r["scenario_params"]["fraction"] == x]) / len(g)
            for x in xs
        ]
        ax.plot(xs, means, "k--", linewidth=1, label="the default (exclude=auto picks)")
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.set(
        xlabel="share of the pool from classes without labels (6-9)",
        ylabel="student - best labeled-only (points)",
        title="Class mismatch: 50 labels per class of classes 0-5",
    )
    ax.legend(fontsize=8)
    return _save(fig, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="fail if docs/messy.md is stale")
    args = parser.parse_args(argv)
    scores, pools, in_pool, mix = (
        json.loads(p.read_text(encoding="utf-8")) if p.is_file() else {}
        for p in (SCORES, POOLS, IN_POOL, MIX)
    )
    body = render(scores, pools, in_pool, mix)
    command = "python benchmarks/messy_tables.py"
    fresh = doc_block.write_or_check(DOC, START, END, body, args.check, command)
    arms = arms_table(pools.get("rows", []))
    fresh &= doc_block.write_or_check(DOC, ARMS_START, ARMS_END, arms, args.check, command)
    if args.check:
        return 0 if fresh else 1
    gain_figure(pools.get("rows", []), FIGURE)
    return 0


if __name__ == "__main__":
    sys.exit(main())
