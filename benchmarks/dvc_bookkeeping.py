"""What DVC's own bookkeeping costs on a folder of the demo's size, and the lineage tag's hash.

    .venv/bin/python benchmarks/dvc_bookkeeping.py                   # data/unlabeled, 2 repeats
    .venv/bin/python benchmarks/dvc_bookkeeping.py --folder data/train_ssl --repeats 3
    .venv/bin/python benchmarks/dvc_bookkeeping.py --render          # docs/speed.md's block

The demo saves three folders of about 59,300 images as DVC outs (ingest's views, each round's
merged set), checks them as deps of most stages, and hashes one for each lineage tag of a
labeling or a student. Per repeat, in a fresh git + DVC repository holding a copy of
`--folder`, for each cache type (alternating order; `copy` is what DVC picks on a file system
without reflinks, `hardlink` what its large-data guide suggests):

- `dvc add` of the folder (hashing every file and putting it into the cache);
- `dvc status` with everything up to date (a stage's dep check: a stat per file, DVC's state);
- the lineage tag's hash (`pseudolabel.tracking.dvc_hash`) reading every file, then through
  DVC's state, which the `dvc add` filled: what the stages do since 2026-12-07.

Wall seconds and CPU seconds (user + system, from getrusage of the DVC processes or of this
one). Each repository's copy has just been written, so every read hits the page cache (a
folder written long before costs the reading hash more). Writes --out (JSON).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results" / "dvc_bookkeeping.json"
DOC = REPO / "docs" / "speed.md"
START, END = "<!-- dvc_bookkeeping:start -->", "<!-- dvc_bookkeeping:end -->"
CACHE_TYPES = ("copy", "hardlink")
DVC = str(Path(sys.executable).with_name("dvc"))


def _timed(run) -> dict:
    """Wall and CPU seconds of `run()` (this process and the children it waited for)."""
    before = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    start = time.perf_counter()
    run()
    wall = time.perf_counter() - start
    after = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    cpu = sum(
        (a.ru_utime - b.ru_utime) + (a.ru_stime - b.ru_stime)
        for a, b in zip(after, before, strict=True)
    )
    return {"wall_s": round(wall, 2), "cpu_s": round(cpu, 2)}


def _dvc(*args: str, cwd: Path) -> None:
    subprocess.run([DVC, *args], cwd=cwd, check=True, capture_output=True, text=True)


def measure(folder: Path, cache_type: str, scratch: Path) -> dict:
    """One repository with a copy of `folder`, cache type `cache_type`: the four timings."""
    import dvc.repo  # noqa: F401  (imported here, not inside the first timing)
    import dvc_data.hashfile.build  # noqa: F401
    from dvc_data.hashfile.state import StateNoop

    from pseudolabel import tracking

    root = scratch / f"repo-{cache_type}"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    shutil.copytree(folder, root / "images")
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    _dvc("init", "-q", cwd=root)
    _dvc("config", "cache.type", cache_type, cwd=root)
    images = root / "images"
    row = {"cache_type": cache_type}
    row["dvc_add"] = _timed(lambda: _dvc("add", "-q", "images", cwd=root))
    row["dvc_status"] = _timed(lambda: _dvc("status", "-q", cwd=root))
    hashes = {}
    real = tracking._dvc_state
    try:
        tracking._dvc_state = lambda _folder: contextlib.nullcontext(StateNoop())
        row["hash_reading_files"] = _timed(lambda: hashes.update(read=tracking.dvc_hash(images)))
    finally:
        tracking._dvc_state = real
    row["hash_dvc_state"] = _timed(lambda: hashes.update(state=tracking.dvc_hash(images)))
    recorded = (root / "images.dvc").read_text(encoding="utf-8")
    assert hashes["read"] == hashes["state"] and hashes["read"] in recorded, hashes
    shutil.rmtree(root)
    return row


TIMINGS = {
    "dvc_add": "`dvc add`",
    "dvc_status": "`dvc status`, up to date",
    "hash_reading_files": "lineage hash, reading every file (before 2026-12-07)",
    "hash_dvc_state": "lineage hash through DVC's state (`tracking.dvc_hash`)",
}


def render(result: dict) -> str:
    """docs/speed.md's table: per timing and cache type, each repeat's seconds."""
    lines = [
        f"`{result['command']}` on {result['cpus']} cores of an {result['cpu']}: "
        f"a copy of the demo's `{result['folder']}` ({result['files']:,} files, "
        f"{result['bytes'] / 1e6:.0f} MB), {result['repeats']} repeats, cache types alternating:",
        "",
        "| what | cache type | wall s (repeats) | CPU s (repeats) |",
        "|---|---|---:|---:|",
    ]
    for key, what in TIMINGS.items():
        # DVC's commands per cache type; the lineage hash never writes: every repeat together
        groups = result["cache_types"] if key.startswith("dvc_") else [None]
        for cache_type in groups:
            runs = [r[key] for r in result["rows"] if cache_type in (None, r["cache_type"])]
            walls = ", ".join(f"{r['wall_s']:.1f}" for r in runs)
            cpus = ", ".join(f"{r['cpu_s']:.1f}" for r in runs)
            lines.append(f"| {what} | {cache_type or 'either'} | {walls} | {cpus} |")
    return "\n".join(lines)


def summary(result: dict) -> dict[str, float]:
    """Medians over every repeat and cache type of each timing's wall seconds."""
    return {key: statistics.median(r[key]["wall_s"] for r in result["rows"]) for key in TIMINGS}


def _cpu_model() -> str:
    sys.path.insert(0, str(HERE))
    from ssl_gain import cpu_model

    return cpu_model()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", type=Path, default=Path("data/unlabeled"))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--scratch", type=Path, help="where the repositories go (default: tmp)")
    parser.add_argument("--render", action="store_true", help="write docs/speed.md's block")
    parser.add_argument("--check", action="store_true", help="fail if that block is stale")
    args = parser.parse_args(argv)
    if args.render or args.check:
        sys.path.insert(0, str(HERE))
        import doc_block

        return doc_block.from_json(RESULTS, DOC, START, END, render, args.check)
    files = [p for p in args.folder.rglob("*") if p.is_file()] if args.folder.is_dir() else []
    if not files:
        print(
            f"{args.folder}: not a folder of files (run `dvc repro ingest` first, or pass "
            "--folder)",
            file=sys.stderr,
        )
        return 2
    if args.repeats < 1:
        print(f"--repeats {args.repeats}: at least 1", file=sys.stderr)
        return 2
    rows = []
    with tempfile.TemporaryDirectory(dir=args.scratch) as scratch:
        for repeat in range(args.repeats):
            order = CACHE_TYPES if repeat % 2 == 0 else CACHE_TYPES[::-1]
            for cache_type in order:
                print(f"repeat {repeat + 1}/{args.repeats}: cache.type={cache_type}", flush=True)
                rows.append({"repeat": repeat, **measure(args.folder, cache_type, Path(scratch))})
                print(f"  {json.dumps(rows[-1])}", flush=True)
    result = {
        "command": "python benchmarks/dvc_bookkeeping.py " + " ".join(argv or sys.argv[1:]),
        "cpu": _cpu_model(),
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "folder": args.folder.as_posix(),
        "files": len(files),
        "bytes": sum(p.stat().st_size for p in files),
        "repeats": args.repeats,
        "cache_types": list(CACHE_TYPES),
        "rows": rows,
    }
    from pseudolabel.atomic import write_text_atomic

    write_text_atomic(args.out, json.dumps(result, indent=1) + "\n")
    for key, wall in summary(result).items():
        print(f"{key:20s} median wall {wall:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
