"""A soak of team mode (issue 33, item 4): queued DVC experiments against one tracking server on
PostgreSQL, the server restarted while they run.

In a scratch copy of this repository (its tracked files, a git repository of its own) composed
for the smoke preset: `make server`'s script (scripts/tracking-server.sh: PostgreSQL and
`mlflow server` on free ports), `dvc repro` once and a commit (the queued experiments then only
re-run what their params change), `--experiments` experiments queued with `dvc exp run --queue
-S pseudo_label.threshold=...` (one threshold each) and run by `dvc queue start -j JOBS`. Once
`--restart-after` of them have ended, while others run, the MLflow server is stopped (SIGTERM
to its process group) and started again on the same port and database, `--down` seconds
later. Then, after every experiment has ended:

- from `dvc queue status` and `dvc exp show --json`: how many succeeded and are listed;
- from the server (MlflowClient): every run by stage and status (none may be left RUNNING);
  per experiment, its train_student run with `student_accuracy`-style metrics and the lineage
  tags (tracking.CSV_TAG, tracking.TEACHER_TAG, tracking.MERGED_TAG);
- wall seconds, the CPU model.

    python benchmarks/soak.py                                 # 20 experiments, 2 at a time
    python benchmarks/soak.py --experiments 4 --restart-after 1 --out /tmp/soak.json  # a trial
    python benchmarks/soak.py --render     # docs/failure-modes.md's soak block from the JSON
    python benchmarks/soak.py --check      # exit 1 if that block is out of date

(python: `.venv/bin/python`, from the repository root; PostgreSQL installs when missing, as
root.) The result goes to benchmarks/results/soak.json (committed).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "soak.json"
DOC = ROOT / "docs" / "failure-modes.md"
START, END = "<!-- soak:start -->", "<!-- soak:end -->"
BIN = Path(sys.executable).parent
LINEAGE = ("pseudo_label_csv_md5", "teacher_run_id", "merged_data_md5")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd: list[str], cwd: Path, env: dict, timeout: float = 3600) -> str:
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return done.stdout + done.stderr


class Server:
    """scripts/tracking-server.sh in its own process group, restartable on the same port."""

    def __init__(self, folder: Path, env: dict):
        self.folder, self.env = folder, env
        self.pg_port, self.port = _port(), _port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, seconds: float = 300) -> None:
        env = {**self.env, "SERVER_DIR": str(self.folder), "PG_PORT": str(self.pg_port),
               "MLFLOW_PORT": str(self.port)}  # fmt: skip
        log = open(self.folder.parent / "server.log", "ab")  # noqa: SIM115 (the server's)
        self.proc = subprocess.Popen(
            [str(ROOT / "scripts" / "tracking-server.sh"), "--workers", "2"],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + seconds
        while True:
            try:
                urllib.request.urlopen(f"{self.url}/health", timeout=2).close()
                return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("the tracking server did not start: see server.log") from None
                time.sleep(1)

    def stop(self) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=20)
        except ProcessLookupError:
            pass
        self.proc = None

    def close(self) -> None:
        self.stop()
        subprocess.run([str(ROOT / "scripts" / "postgres.sh"), "stop",
                        str(self.folder / "postgres")], capture_output=True)  # fmt: skip


def _project(work: Path, env: dict) -> Path:
    """This repository's tracked files in `work/project`, composed for the smoke preset and
    committed in a git repository of its own."""
    root = work / "project"
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout.split()  # fmt: skip
    for rel in listed:
        if (ROOT / rel).is_file():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, root / rel)
    _run([str(BIN / "pseudolabel"), "compose", "+experiment=smoke"], root, env)
    git = ["git", "-c", "user.name=soak", "-c", "user.email=soak@localhost"]
    _run(["git", "init", "-q"], root, env)
    _run([*git, "add", "-A"], root, env)
    _run([*git, "commit", "-qm", "soak project"], root, env)
    return root


def _queue_status(root: Path, env: dict) -> dict[str, int]:
    out = _run([str(BIN / "dvc"), "queue", "status"], root, env)
    counts: dict[str, int] = {}
    for word in ("Queued", "Running", "Success", "Failed"):
        counts[word] = len(re.findall(rf"\b{word}\b", out))
    return counts


def soak(args) -> dict:
    work = Path(tempfile.mkdtemp(prefix="pseudolabel-soak-", dir=args.work))
    work.chmod(0o755)  # PostgreSQL runs as its own user (postgres.sh) and must reach its folder
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    server_dir = work / "server"
    server_dir.mkdir()
    server = Server(server_dir, env)
    started = time.monotonic()
    try:
        print("soak: starting the tracking server (PostgreSQL)", flush=True)
        server.start()
        env["MLFLOW_TRACKING_URI"] = server.url
        root = _project(work, env)
        print("soak: dvc repro (the committed baseline)", flush=True)
        _run([str(BIN / "dvc"), "repro"], root, env)
        git = ["git", "-c", "user.name=soak", "-c", "user.email=soak@localhost"]
        _run([*git, "add", "-A"], root, env)
        _run([*git, "commit", "-qm", "repro"], root, env)
        # none equal to the committed 0.3 (smoke's), which an experiment would not re-run
        thresholds = [round(0.31 + 0.02 * i, 2) for i in range(args.experiments)]
        for t in thresholds:
            _run([str(BIN / "dvc"), "exp", "run", "--queue", "-S",
                  f"pseudo_label.threshold={t}"], root, env)  # fmt: skip
        print(f"soak: {len(thresholds)} experiments queued, {args.jobs} at a time", flush=True)
        queue_start = time.monotonic()
        # Its workers outlive it and inherit its output: a file, not a pipe run() would wait on.
        with open(work / "queue.log", "wb") as out:
            subprocess.run([str(BIN / "dvc"), "queue", "start", "-j", str(args.jobs)], cwd=root,
                           env=env, stdout=out, stderr=subprocess.STDOUT, check=True)  # fmt: skip
        restarted_at = away = None
        while True:
            counts = _queue_status(root, env)
            ended = counts["Success"] + counts["Failed"]
            print(f"soak: {json.dumps(counts)}", flush=True)
            if restarted_at is None and ended >= args.restart_after and counts["Running"]:
                print(f"soak: stopping the tracking server for {args.down} s", flush=True)
                server.stop()
                stopped = time.monotonic()
                restarted_at = round(stopped - queue_start, 1)
                time.sleep(args.down)
                server.start()
                away = round(time.monotonic() - stopped, 1)
                print(f"soak: the tracking server is back after {away} s", flush=True)
            if counts["Queued"] + counts["Running"] == 0 and ended >= len(thresholds):
                break
            if time.monotonic() - queue_start > args.timeout:
                raise SystemExit(f"soak: experiments still running after {args.timeout} s")
            time.sleep(10)
        wall = round(time.monotonic() - started, 1)
        result = _verify(root, env, server.url, thresholds, counts, restarted_at, wall, args)
        return {**result, "server_away_seconds": away}
    finally:
        with contextlib.suppress(OSError, subprocess.SubprocessError):  # its celery workers
            subprocess.run([str(BIN / "dvc"), "queue", "stop", "--kill"], cwd=work / "project",
                           env=env, capture_output=True, timeout=120)  # fmt: skip
        server.close()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def _verify(root, env, url, thresholds, counts, restarted_at, wall, args) -> dict:
    import mlflow

    shown = json.loads(_run([str(BIN / "dvc"), "exp", "show", "--json"], root, env))
    listed = [e for rev in shown for exp in rev.get("experiments") or [] for e in exp["revs"]]
    client = mlflow.MlflowClient(url)
    experiment = client.get_experiment_by_name("pseudolabel")
    runs = list(client.search_runs([experiment.experiment_id], max_results=5000))
    by_stage: dict[str, dict[str, int]] = {}
    for run in runs:
        stage = run.data.tags.get("stage", "?")
        by_stage.setdefault(stage, {}).setdefault(run.info.status, 0)
        by_stage[stage][run.info.status] += 1
    students = [r for r in runs if r.data.tags.get("stage") == "train_student"]
    seen_thresholds = sorted(
        {float(r.data.tags["threshold"]) for r in students if r.data.tags.get("threshold")}
    )
    complete = [
        r for r in students
        if r.info.status == "FINISHED" and all(r.data.tags.get(k) for k in LINEAGE)
        and "best_val_accuracy" in r.data.metrics
    ]  # fmt: skip
    from ssl_gain import cpu_model  # benchmarks/: the CPU model line of lscpu

    return {
        "experiments": len(thresholds),
        "jobs": args.jobs,
        "restart_after_experiments": args.restart_after,
        "server_down_seconds": args.down,
        "restarted_at_seconds": restarted_at,
        "queue": counts,
        "listed_by_dvc_exp_show": len(listed),
        "runs_by_stage_and_status": by_stage,
        "runs_left_running": sum(1 for r in runs if r.info.status == "RUNNING"),
        "student_runs_complete": len(complete),
        "thresholds_with_a_student_run": len(
            [t for t in thresholds if any(abs(t - s) < 1e-9 for s in seen_thresholds)]
        ),
        "wall_seconds": wall,
        "cpu": cpu_model(),
        "command": " ".join(["python", "benchmarks/soak.py", *sys.argv[1:]]),
    }


def render(result: dict | None) -> str:
    if not result:
        return "No soak result yet: `python benchmarks/soak.py`."
    r = result
    stages = "; ".join(
        f"{stage}: " + ", ".join(f"{n} {status}" for status, n in sorted(statuses.items()))
        for stage, statuses in sorted(r["runs_by_stage_and_status"].items())
    )
    return "\n".join([
        f"{r['experiments']} queued experiments (`dvc queue start -j {r['jobs']}`), the server "
        f"stopped after {r['restart_after_experiments']} had ended ({r['restarted_at_seconds']} s "
        f"into the queue) and answering again {r.get('server_away_seconds')} s later (stopped "
        f"for {r['server_down_seconds']} s, then its start): {r['queue'].get('Success', 0)} "
        f"succeeded, {r['queue'].get('Failed', 0)} failed; `dvc exp show` lists "
        f"{r['listed_by_dvc_exp_show']}; {r['student_runs_complete']} student runs FINISHED with "
        f"their metrics and lineage tags, {r['thresholds_with_a_student_run']} of "
        f"{r['experiments']} thresholds have one; runs left RUNNING: {r['runs_left_running']}. "
        f"Runs on the server by stage: {stages}. {r['wall_seconds'] / 60:.0f} minutes on "
        f"{r['cpu']} (2 cores); `{r['command']}`.",
    ])  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experiments", type=int, default=20)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--restart-after", type=int, default=5, help="experiments ended")
    parser.add_argument("--down", type=float, default=30, help="seconds the server is away")
    parser.add_argument("--timeout", type=float, default=4 * 3600)
    parser.add_argument("--work", type=Path, default=None, help="scratch folder's parent")
    parser.add_argument("--keep", action="store_true", help="keep the scratch project")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--render", action="store_true", help="write docs/failure-modes.md's block")
    parser.add_argument("--check", action="store_true", help="fail if that block is stale")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    if args.render or args.check:
        import doc_block

        result = json.loads(RESULTS.read_text()) if RESULTS.is_file() else None
        command = "python benchmarks/soak.py --render"
        fresh = doc_block.write_or_check(DOC, START, END, render(result), args.check, command)
        return 0 if fresh else 1
    result = soak(args)
    print(json.dumps(result, indent=1), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    ok = (
        result["queue"].get("Failed", 0) == 0
        and result["runs_left_running"] == 0
        and result["student_runs_complete"] >= result["experiments"]
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
