"""docs/team.md's table of the served model under load, generated from the committed JSON.

    python benchmarks/serving_tables.py          # rewrite the generated part of docs/team.md
    python benchmarks/serving_tables.py --check  # exit 1 if docs/team.md is out of date

Input: benchmarks/results/serving_load.json (benchmarks/serving_load.py). The block between the
markers is this script's output (tests/test_docs.py checks it).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import doc_block  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "serving_load.json"
DOC = ROOT / "docs" / "team.md"
START, END = "<!-- serving-tables:start -->", "<!-- serving-tables:end -->"


def render(rows: list[dict]) -> str:
    parts = []
    for r in rows:
        size = "x".join(map(str, r["image_size"]))
        bare = r["bare_predict"]
        lines = [
            f"`{r['model']}` ({size} px, {r['channels']} channel(s)), requests of {r['batch']} "
            f"PNG images, {r['seconds_per_level']:.0f} s per level; {r['cpu']}, "
            f"{r['cpus']} cores, server and clients on the same machine.",
            "",
            "| clients | requests | errors | images/s | p50 latency (ms) | p99 latency (ms) |",
            "|---|---|---|---|---|---|",
        ]
        for level in r["server"]:
            lines.append(
                f"| {level['clients']} | {level['requests']} | {level['errors']} | "
                f"{level['images_per_s']:.0f} | {level['p50_ms']:.0f} | {level['p99_ms']:.0f} |"
            )
        lines.append(
            f"| bare `model.predict`, same images decoded | {bare['requests']} | – | "
            f"{bare['images_per_s']:.0f} | {bare['p50_ms']:.0f} | {bare['p99_ms']:.0f} |"
        )
        refused = [name for name, v in r.get("bad_input", {}).items() if v["status"] == 400]
        traces = [name for name, v in r.get("bad_input", {}).items() if v["stack_trace"]]
        lines += [
            "",
            f"Bad input answered 400 with its reason: {', '.join(refused) or 'none'}; "
            f"with a stack trace: {', '.join(traces) or 'none'}.",
            "",
            f"Command: `{r['command']}`.",
        ]
        parts.append("\n".join(lines))
    return "\n\n".join(parts) if parts else "No rows yet."


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="fail if docs/team.md is stale")
    args = parser.parse_args(argv)
    rows = json.loads(RESULTS.read_text(encoding="utf-8"))["rows"] if RESULTS.is_file() else []
    command = "python benchmarks/serving_tables.py"
    fresh = doc_block.write_or_check(DOC, START, END, render(rows), args.check, command)
    return 0 if fresh else 1


if __name__ == "__main__":
    sys.exit(main())
