"""The docs' gain tables, generated from the committed benchmark JSON so they cannot drift.

    python benchmarks/gain_tables.py          # rewrite the generated part of docs/gain.md
    python benchmarks/gain_tables.py --check  # exit 1 if docs/gain.md is out of date

benchmarks/results/ssl_gain.json is written by benchmarks/ssl_gain.py; the block between the
markers in docs/gain.md is this script's output (tests/test_docs.py checks it).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import textwrap
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import doc_block  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "ssl_gain.json"
DOC = ROOT / "docs" / "gain.md"
FIGURE = ROOT / "docs" / "figures" / "gain_curves.png"
COMPUTE_FIGURE = ROOT / "docs" / "figures" / "gain_vs_compute.png"
CEILING_FIGURE = ROOT / "docs" / "figures" / "all_labels_curves.png"
SECONDS_FIGURE = ROOT / "docs" / "figures" / "gain_vs_seconds.png"
START, END = "<!-- gain-tables:start -->", "<!-- gain-tables:end -->"


def _cell(values: list[float], scale: float = 100.0, digits: int = 2) -> str:
    values = [v * scale for v in values if v is not None and not math.isnan(v)]
    if not values:
        return "–"
    mean = sum(values) / len(values)
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


DEFAULT_STEPS = 4180  # the default student's optimiser steps (all its rounds together): 1x


def _compute(row: dict) -> str:
    """All the student's steps (every Noisy Student round trains anew) in units of the
    default's."""
    rounds = row.get("rounds", 1)
    total = f"{row['student_steps'] / DEFAULT_STEPS:g}x"
    return total if rounds == 1 else f"{total} ({rounds} rounds)"


ZEN4 = "AMD EPYC (Zen 4)"  # the machine of the rows from before rows recorded theirs (docs/gain.md)


def row_machine(row: dict) -> str:
    """What ran the row (its minutes and its teacher are that machine's): ssl_gain.machine()'s
    description, or the Zen 4 for the older rows."""
    return row.get("cpu") or ZEN4


def _groups(rows: list[dict]) -> dict[tuple, list[dict]]:
    out: dict[tuple, list[dict]] = {}
    for row in rows:
        key = (row["budget"], row["setting"], _compute(row), " ".join(row["overrides"]))
        key += (row_machine(row),)  # minutes compare on one machine only
        out.setdefault(key, []).append(row)
    return dict(sorted(out.items()))


def summary(rows: list[dict]) -> str:
    """Mean ± std over seeds, per label budget, setting, compute and overrides."""
    head = (
        "| labels/class | setting | compute | overrides | seeds | teacher | baseline | "
        "best labeled-only | student | gain (points) | min gain | minutes/seed | machine |"
    )
    lines = [head, "|---" * 13 + "|"]
    for (budget, setting, compute, overrides, machine), group in _groups(rows).items():
        seeds = ", ".join(str(r["seed"]) for r in sorted(group, key=lambda r: r["seed"]))
        minutes = [
            (r["shared_seconds"] + r["baseline_seconds"] + r["student_seconds"]) / 60 for r in group
        ]
        if all(r.get("default") for r in group):  # ssl_gain.mark_default: today's recipe
            setting = f"**{setting} (default)**"
        lines.append(
            f"| {budget} | {setting} | {compute} | {overrides or '–'} | {seeds} | "
            f"{_cell([r['teacher'] for r in group])} | {_cell([r['baseline'] for r in group])} | "
            f"{_cell([r['best_labeled_only'] for r in group])} | "
            f"{_cell([r['student'] for r in group])} | "
            f"{_cell([r['gain'] for r in group], 1)} | {min(r['gain'] for r in group):+.2f} | "
            f"{_cell(minutes, 1, 1)} | {machine} |"
        )
    return "\n".join(lines)


def per_seed(rows: list[dict]) -> str:
    """Every row: the paired figures of one budget, seed, setting and compute."""
    lines = [
        "| labels/class | seed | setting | compute | overrides | teacher | baseline | student | "
        "gain | student's live weights after the last epoch | best labeled-only | "
        "teacher's pseudo-label precision | online precision, last epoch (round 1) | "
        "mask rate, last epoch (round 1) | student steps | code |",
        "|---" * 16 + "|",
    ]
    key = ("budget", "seed", "setting", "compute")
    for r in sorted(rows, key=lambda r: tuple(r[k] for k in key)):
        online = r.get("online_pseudo_precision_last_epoch")
        mask = r.get("mask_rate_last_epoch")
        # The test curve's last point: the weights training ended with (saved when
        # student.train.ema=0); with EMA the saved model is their moving average ("student").
        curve = r.get("student_test_curve") if r.get("rounds", 1) == 1 else None
        live = f"{100 * curve[-1]:.2f}" if curve else "–"
        lines.append(
            f"| {r['budget']} | {r['seed']} | {r['setting']} | {_compute(r)} | "
            f"{' '.join(r['overrides']) or '–'} | {100 * r['teacher']:.2f} | "
            f"{100 * r['baseline']:.2f} | {100 * r['student']:.2f} | {r['gain']:+.2f} | "
            f"{live} | {100 * r['best_labeled_only']:.2f} | "
            f"{r['pseudo_label_precision']:.3f} | "
            f"{'–' if online is None else f'{online:.3f}'} | "
            f"{'–' if mask is None else f'{mask:.3f}'} | {r['student_steps']} | "
            f"{r.get('code') or '–'} |"
        )
    return "\n".join(lines)


def _one_teacher(a: dict, b: dict) -> bool:
    """Two rows of one labeled split and teacher: their digests where both kept them, else the
    same machine, budget, seed and teacher accuracy (the older rows)."""
    if a["budget"] != b["budget"] or a["seed"] != b["seed"] or row_machine(a) != row_machine(b):
        return False
    if a.get("teacher_digest") and b.get("teacher_digest"):
        return a["teacher_digest"] == b["teacher_digest"]
    return a["teacher"] == b["teacher"]


def paired_arms(rows: list[dict]) -> list[tuple[dict, dict, list[str]]]:
    """(base, arm, what the arm adds): every row whose overrides are another row's plus some,
    on one teacher and at the same rounds; the base is the closest such row (most overrides
    in common). Accuracy at equal steps and wall time compare within a pair: same machine,
    same teacher, same pseudo-labels."""
    pairs = []
    for arm in rows:
        bases = [
            b for b in rows
            if b is not arm and _one_teacher(b, arm) and b["setting"] == arm["setting"]
            and b.get("rounds", 1) == arm.get("rounds", 1)
            and len(b["overrides"]) < len(arm["overrides"])
            and all(o in arm["overrides"] for o in b["overrides"])
        ]  # fmt: skip
        if bases:
            base = max(bases, key=lambda b: len(b["overrides"]))
            pairs.append((base, arm, [o for o in arm["overrides"] if o not in base["overrides"]]))
    return sorted(pairs, key=lambda p: (row_machine(p[1]), p[1]["budget"], p[1]["seed"]))


def _part_seconds(row: dict) -> float:
    """The seconds of what an arm changes: its student and baseline (teacher and labels shared)."""
    return row["student_seconds"] + row["baseline_seconds"]


def arms_table(rows: list[dict]) -> str:
    """One line per paired arm: what it changed, its student and baseline against its base's,
    and the wall minutes of the student and baseline as a ratio to the base's."""
    lines = [
        "| labels/class | seed | machine | compute of the base | the arm adds | student "
        "(base → arm) | baseline (base → arm) | gain (base → arm) | student + baseline minutes, "
        "ratio to the base | CPU shared |",
        "|---" * 10 + "|",
    ]
    for base, arm, added in paired_arms(rows):
        timed = all(r["baseline_seconds"] for r in (base, arm))  # 0: another row's baseline
        ratio = _part_seconds(arm) / _part_seconds(base) if timed else None
        flags = [r.get("cpu_shared") for r in (base, arm)]
        shared = "yes" if any(flags) else "no" if None not in flags else "not measured"
        lines.append(
            f"| {arm['budget']} | {arm['seed']} | {row_machine(arm)} | {_compute(base)} | "
            f"{' '.join(f'`{o}`' for o in added)} | "
            f"{100 * base['student']:.2f} → {100 * arm['student']:.2f} "
            f"(**{100 * (arm['student'] - base['student']):+.2f}**) | "
            f"{100 * base['baseline']:.2f} → {100 * arm['baseline']:.2f} | "
            f"{base['gain']:+.2f} → {arm['gain']:+.2f} | "
            f"{'–' if ratio is None else f'{ratio:.2f}x'} | "
            f"{shared} |"
        )
    return "\n".join(lines)


def render(payload: dict) -> str:
    rows = payload.get("rows", [])
    if not rows:
        return "No benchmark rows yet."
    parts = [
        "Mean ± std over the seeds listed (accuracies in %, on the 10,000 test images):",
        "",
        summary(rows),
        "",
        "Every run (seeds paired: one labeled split, teacher and pseudo-label CSV per seed):",
        "",
        per_seed(rows),
    ]
    if paired_arms(rows):
        parts += [
            "",
            "Arms paired on one teacher (one machine, seed and pseudo-label set; each row "
            "against the run whose overrides it extends: one seed each, so a hint, not a "
            "table; minutes compare within a pair only, and only where neither shared its CPU):",
            "",
            arms_table(rows),
        ]
    if any(r.get("student_test_curve") for r in rows):
        parts += [
            "",
            "Test accuracy after every epoch (the live weights: the saved model with "
            "`student.train.ema=0`, the default; with EMA the saved model is their moving "
            "average): ![student and baseline test curves](figures/gain_curves.png)",
        ]
    if _compute_series(rows):
        parts += [
            "",
            "Gain vs compute (50 labels per class; every recipe and seed measured at more than one "
            "step budget, and the Noisy Student rounds): "
            "![gain vs compute](figures/gain_vs_compute.png)",
        ]
    if _seconds_rows(rows):
        parts += [
            "",
            "Accuracy vs wall time (50 labels per class; one panel per machine, since minutes "
            "compare on one machine only; each student at the minutes of its teacher, labeling "
            "and student, each baseline at those of its teacher, labeling and baseline, each "
            "teacher at those of its training and labeling; faded: rows that measured another "
            "process taking at least 10 % of the machine's CPU time (`cpu_shared`); the rows "
            "before 2026-12-07 did not measure it, and some of the Zen 4's shared the CPU, so "
            "read their minutes as upper bounds): "
            "![accuracy vs minutes](figures/gain_vs_seconds.png)",
        ]
    if payload.get("full_reference"):
        ref = payload["full_reference"]
        runs = payload.get("full_reference_runs") or [ref]
        parts += ["", "All labels: the student's network on every labeled image (the teacher "
                  "stage's recipe, batch 128; test accuracy of the weights kept):", "",
                  "| epochs | seed | accuracy | best epoch's test accuracy (live weights) | "
                  "minutes | machine | overrides |", "|---|---|---|---|---|---|---|"]  # fmt: skip
        for run in sorted(runs, key=lambda r: (r.get("cpu", ""), r["epochs"])):
            curve = run.get("test_curve") or []
            best = f"{100 * max(curve):.2f} (epoch {curve.index(max(curve)) + 1})" if curve else "–"
            shared = " (CPU shared: no timing)" if run.get("cpu_shared") else ""
            parts.append(
                f"| {run['epochs']} | {run['seed']} | {100 * run['accuracy']:.2f} | {best} | "
                f"{run['seconds'] / 60:.0f}{shared} | {run.get('cpu', ZEN4)} | "
                f"{' '.join(run.get('overrides') or []) or run.get('note', '–')} |"
            )
        converged = ""
        if "doubling_gain" in ref:
            converged = (
                f" Its last doubling of the epochs ({ref['doubling_from']} → {ref['epochs']}) "
                f"added {ref['doubling_gain']:+.2f} points: "
                + ("converged (under 0.3)." if ref["converged"] else "not converged yet.")
            )
        if any(r.get("test_curve") for r in runs):
            converged += " ![all-labels test curves](figures/all_labels_curves.png)"
        parts += [
            "",
            f"The ceiling: {ref['epochs']} epochs, {100 * ref['accuracy']:.2f} %.{converged} "
            "Share of the labeled-only → all-labels gap the student closes (stretch target: 0.5):",
            "",
            "| labels/class | setting | compute | overrides | best labeled-only | student "
            "| all labels | gap closed |",
            "|---|---|---|---|---|---|---|---|",
            *(
                f"| {key.split('/')[0]} | {key.split('/')[1]} | {key.split('/')[2]} "
                f"| {key.split('/', 3)[3] if key.count('/') > 2 else '–'} "
                f"| {100 * g['best_labeled_only']:.2f} | {100 * g['student']:.2f} "
                f"| {100 * g['all_labels']:.2f} | {g['gap_closed']:.2f} |"
                for key, g in payload.get("gap", {}).items()
            ),
        ]
    commands = payload.get("commands", [])
    if commands:
        parts += ["", "Made by:", "", "```bash", *commands, "```"]
    return "\n".join(parts)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path, rect: tuple | None = None) -> bool:
    fig.tight_layout(rect=rect)  # rect: the panels' share of the figure (a legend below them)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return True


def _curve_rows(rows: list[dict], budget: int) -> list[dict]:
    """The rows a budget's panel shows: today's default recipe at 1x where it has curves, else
    the recipe of the budget's newest 1x row with curves; one row per seed."""
    mine = [r for r in rows if r["budget"] == budget and r["compute"] == 1]
    chosen = [r for r in mine if r.get("default")] or [
        r for r in mine if r["overrides"] == mine[-1]["overrides"]
    ]
    return sorted(chosen, key=lambda r: r["seed"])


def curves_figure(rows: list[dict], path: Path) -> bool:
    """Test accuracy per epoch of the students and their baselines of one recipe per label
    budget (runs with --test-curves; with Noisy Student rounds, the first round's)."""
    plt = _pyplot()
    rows = [r for r in rows if r.get("student_test_curve") and r.get("baseline_test_curve")]
    if not rows:
        return False
    budgets = sorted({r["budget"] for r in rows})
    fig, axes = plt.subplots(1, len(budgets), figsize=(5 * len(budgets), 4.6), squeeze=False)
    for ax, budget in zip(axes[0], budgets, strict=True):
        shown = _curve_rows(rows, budget)
        for i, r in enumerate(shown):
            colour = f"C{i}"
            ax.plot(100 * np.asarray(r["student_test_curve"]), colour,
                    label=f"seed {r['seed']}: student")  # fmt: skip
            ax.plot(100 * np.asarray(r["baseline_test_curve"]), colour, ls="--", alpha=0.7,
                    label=f"seed {r['seed']}: labeled-only baseline")  # fmt: skip
            ax.axhline(100 * r["teacher"], color=colour, ls=":", lw=0.8)
        recipe = "default recipe" if shown[0].get("default") else _short(shown[0]["overrides"])
        recipe = "\n".join(textwrap.wrap(recipe, 60))
        ax.set(title=f"{budget} labels per class\n{recipe} (dotted: teacher)", xlabel="epoch",
               ylabel="test accuracy (%)")  # fmt: skip
        ax.title.set_fontsize(8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    return _save(fig, path)


def ceiling_figure(runs: list[dict], path: Path) -> bool:
    """Test accuracy per epoch of every all-labels run (the ceiling of the gap-closed shares):
    has the longest one stopped rising?"""
    mine = [r for r in runs if r.get("cpu")]  # (the first reference, of another recipe: none)
    if not any(r.get("test_curve") for r in mine):
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for run in sorted((r for r in mine if not r.get("test_curve")), key=lambda r: r["epochs"]):
        label = f"{run['epochs']} epochs: {100 * run['accuracy']:.2f} % kept (no curve)"
        ax.axhline(100 * run["accuracy"], color="grey", ls="--", lw=1, label=label)
    for run in sorted((r for r in mine if r.get("test_curve")), key=lambda r: r["epochs"]):
        epochs = np.arange(1, len(run["test_curve"]) + 1)
        label = f"{run['epochs']} epochs (cosine): {100 * run['accuracy']:.2f} % kept"
        ax.plot(epochs, 100 * np.asarray(run["test_curve"]), marker=".", label=label)
    ax.set(xlabel="epoch", ylabel="test accuracy (%)",
           title="All labels, the student's network (seed 0)")  # fmt: skip
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return _save(fig, path)


def _short(overrides: list[str]) -> str:
    """A recipe's legend label: its overrides without the key paths and the rounds."""
    kept = [o.split("=", 1) for o in overrides if not o.startswith("pseudo_label.rounds=")]
    short = [f"{key.rsplit('.', 1)[-1]}={value}" for key, value in kept]
    return " ".join(k for k in short if not k.startswith("mixed_precision=")) or "defaults"


def _compute_series(rows: list[dict]) -> dict[tuple, list[dict]]:
    """Per recipe and seed (50 labels), its rows by student steps, where there is more than one."""
    series: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["budget"] == 50:
            series.setdefault((_short(r["overrides"]), r["seed"]), []).append(r)
    return {
        key: sorted(group, key=lambda r: r["student_steps"])
        for key, group in sorted(series.items())
        if len({r["student_steps"] for r in group}) > 1
    }


def compute_figure(rows: list[dict], path: Path) -> bool:
    """Student and best labeled-only accuracy against the student's steps, per recipe and seed:
    what more compute buys (more epochs, or a second Noisy Student round)."""
    plt = _pyplot()
    series = _compute_series(rows)
    if not series:
        return False
    height = 4.5 + 0.15 * len(series)
    fig, (acc, gain) = plt.subplots(1, 2, figsize=(12, height))
    for i, ((recipe, seed), group) in enumerate(series.items()):
        colour, label = f"C{i}", f"seed {seed}: {recipe}"
        for rounds, marker in ((False, "o"), (True, "*")):
            part = [r for r in group if (r.get("rounds", 1) > 1) == rounds]
            if not part:
                continue
            steps = [r["student_steps"] for r in part]
            style = dict(color=colour, marker=marker, ms=11 if rounds else 6)
            line = "none" if rounds else "-"
            name = f"{label}, {part[0]['rounds']} rounds" if rounds else label
            acc.plot(steps, [100 * r["student"] for r in part], ls=line, label=name, **style)
            if not rounds:
                acc.plot(steps, [100 * r["best_labeled_only"] for r in part], ls="--",
                         marker="_", ms=12, color=colour, alpha=0.6)  # fmt: skip
            gain.plot(steps, [r["gain"] for r in part], ls=line, label=name, **style)
    acc.set(title="student (solid), best labeled-only model (dashed)", ylabel="accuracy (%)")
    gain.set(title="gain over the best labeled-only model", ylabel="points")
    gain.axhline(4, color="grey", ls=":", lw=1)
    ticks = sorted({r["student_steps"] for group in series.values() for r in group})
    for ax in (acc, gain):
        ax.set_xscale("log", base=2)
        ax.set_xticks(ticks, [f"{t:,}" for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel("student optimiser steps (log scale; the default's 1x = 4,180)")
        ax.grid(alpha=0.3)
    handles, labels = gain.get_legend_handles_labels()  # below the panels, not over a curve
    fig.legend(handles, labels, loc="lower center", fontsize=7, frameon=False)
    return _save(fig, path, rect=(0, (0.1 + 0.13 * len(labels)) / height, 1, 1))  # inches


def _seconds_rows(rows: list[dict]) -> dict[str, list[dict]]:
    """50-label rows with their seconds, per machine (minutes compare on one machine only)."""
    out: dict[str, list[dict]] = {}
    for r in rows:
        if r["budget"] == 50 and r.get("student_seconds") and r.get("shared_seconds") is not None:
            out.setdefault(row_machine(r), []).append(r)
    return dict(sorted(out.items(), key=lambda kv: -len(kv[1])))


def seconds_figure(rows: list[dict], path: Path) -> bool:
    """Test accuracy against wall minutes a seed, students, their labeled-only baselines and
    their teachers, per machine: what a recipe buys per second, not per step (issue 31). A
    baseline's minutes include the labeling it does not need (the rows keep one sum for the
    shared part)."""
    by_machine = _seconds_rows(rows)
    if not by_machine:
        return False
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(by_machine), figsize=(6.5 * len(by_machine), 5), squeeze=False)
    for ax, (machine, group) in zip(axes[0], by_machine.items(), strict=True):
        for r in group:
            colour = f"C{r['seed'] % 10}"
            # `cpu_shared` (ssl_gain.CpuUse): another process took its CPU, so no timing
            alpha = 0.3 if r.get("cpu_shared") else 1.0
            student = (r["shared_seconds"] + r["student_seconds"]) / 60
            baseline = (r["shared_seconds"] + r["baseline_seconds"]) / 60
            ax.plot(student, 100 * r["student"], "*" if r.get("default") else "o",
                    color=colour, ms=12 if r.get("default") else 6, alpha=alpha)  # fmt: skip
            ax.annotate(_compute(r), (student, 100 * r["student"]), fontsize=6,
                        xytext=(4, 2), textcoords="offset points")  # fmt: skip
            if r["baseline_seconds"]:  # 0: taken from another row
                ax.plot(baseline, 100 * r["baseline"], "s", mfc="none", color=colour, ms=6,
                        alpha=alpha)  # fmt: skip
            if r.get("teacher"):  # labeled only too: at the minutes of the teacher and labeling
                ax.plot(r["shared_seconds"] / 60, 100 * r["teacher"], "^", mfc="none",
                        color=colour, ms=6, alpha=alpha)  # fmt: skip
        ax.set(title=machine, xlabel="minutes a seed (wall)", ylabel="test accuracy (%)")
        ax.title.set_fontsize(9)
        ax.grid(alpha=0.3)
    seeds = sorted({r["seed"] for group in by_machine.values() for r in group})
    from matplotlib.lines import Line2D as line

    handles = [line([], [], color=f"C{s % 10}", marker="o", ls="none") for s in seeds]
    labels = [f"seed {s}" for s in seeds]
    handles += [line([], [], color="grey", marker=m, ls="none", mfc=f, ms=z)
                for m, f, z in (("o", "grey", 6), ("*", "grey", 12), ("s", "none", 6),
                                ("^", "none", 6))]  # fmt: skip
    labels += ["student (another recipe)", "student, today's default recipe",
               "its labeled-only baseline", "its teacher (labeled only)"]  # fmt: skip
    fig.legend(handles, labels, loc="lower center", ncol=5, fontsize=8, frameon=False)
    return _save(fig, path, rect=(0, 0.12, 1, 1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="fail if docs/gain.md is stale")
    args = parser.parse_args(argv)
    payload = json.loads(RESULTS.read_text(encoding="utf-8")) if RESULTS.is_file() else {}
    command = "python benchmarks/gain_tables.py"
    fresh = doc_block.write_or_check(DOC, START, END, render(payload), args.check, command)
    if args.check:
        return 0 if fresh else 1
    curves_figure(payload.get("rows", []), FIGURE)
    compute_figure(payload.get("rows", []), COMPUTE_FIGURE)
    ceiling_figure(payload.get("full_reference_runs", []), CEILING_FIGURE)
    seconds_figure(payload.get("rows", []), SECONDS_FIGURE)
    return 0


if __name__ == "__main__":
    sys.exit(main())
