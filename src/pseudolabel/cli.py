"""`pseudolabel <stage>`: the thin entry points dvc.yaml calls, plus `compose`, `init`, `lock`
and `lineage`."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from pathlib import Path

import pseudolabel  # also quiets TensorFlow (TF_CPP_MIN_LOG_LEVEL)
from pseudolabel.errors import Preempted, PseudoLabelError
from pseudolabel.stages import ENTRIES as STAGE_ENTRIES  # imports no stage
from pseudolabel.stages import entry

STAGE_NAMES = tuple(name for name in STAGE_ENTRIES if name != "round")
# In a project made by `pseudolabel init`, the installed version its stages depend on
# (pseudolabel.project explains why).
LOCK = "pseudolabel.lock"


def lock_text(version: str | None = None) -> str:
    return f"pseudolabel=={version or pseudolabel.__version__}\n"


def check_lock(root: str | Path = ".") -> None:
    """A project made by `pseudolabel init` runs only the version its lock records; a
    development checkout (no lock: its dvc.yaml depends on the source) is not checked."""
    path = Path(root) / LOCK
    if not path.is_file():
        return
    recorded = path.read_text(encoding="utf-8").strip()
    if recorded != lock_text().strip():
        raise PseudoLabelError(
            f"{LOCK} records {recorded or 'nothing'} but pseudolabel {pseudolabel.__version__} is "
            "installed: run `pseudolabel lock` to record it (DVC then re-runs every stage), "
            "or install that version."
        )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pseudolabel",
        description="Pseudo-labeling pipeline stages (run them all with `dvc repro`).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name in STAGE_NAMES:
        stage = sub.add_parser(name, help=f"run the {name} stage")
        stage.add_argument("--params", default="params.yaml", help="composed parameter file")
    round_ = sub.add_parser(
        "round", help="run one later Noisy Student round (2..pseudo_label.rounds)"
    )
    round_.add_argument("number", type=int, help="the round, 2 or more")
    round_.add_argument("--params", default="params.yaml", help="composed parameter file")
    compose = sub.add_parser(
        "compose",
        help="record settings in conf/project.yaml, then compose conf/ into params.yaml",
        description="Record KEY=VALUE settings (Hydra overrides: data=folder, "
        "data.image_size=[32,32], +experiment=smoke; ~KEY drops one) in conf/project.yaml, "
        "which every writer of params.yaml composes (dvc exp run -S, the queue, the sweep), "
        "then write params.yaml. With no settings: recompose params.yaml from conf/.",
    )
    compose.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. data=digits")
    compose.add_argument(
        "--reset", action="store_true", help="drop the settings conf/project.yaml holds first"
    )
    compose.add_argument(
        "-o",
        "--output",
        help="write the composition of conf/ + overrides to this file instead; conf/ and "
        "params.yaml stay as they are",
    )
    init = sub.add_parser(
        "init", help="write conf/, dvc.yaml, params.yaml and the DVC settings into this git repo"
    )
    init.add_argument("--force", action="store_true", help="overwrite existing files")
    sub.add_parser("lock", help=f"record the installed version in {LOCK} (re-runs the stages)")
    lineage = sub.add_parser(
        "lineage", help="print a student run's chain: CSV md5 -> labeling run -> teacher -> data"
    )
    lineage.add_argument("run_id", help="the MLflow run id of a train_student run")
    lineage.add_argument("--params", default="params.yaml", help="for tracking.uri")
    return parser


def _print_lineage(run_id: str, params: str) -> int:
    from pseudolabel import tracking
    from pseudolabel.config import load_params

    tracking.use_store(load_params(params))
    for hop, text in tracking.lineage(run_id):
        print(f"{hop + ':':<22} {text}")
    return 0


def _check_tracking_store(cfg) -> None:
    """The tracking store answers and is sound, checked before any work: an http(s) server that
    does not answer or a damaged mlflow.db stops the stage in seconds, in one line."""
    from pseudolabel import tracking

    tracking.check_reachable(cfg, timeout=5)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        if args.command == "compose":
            from pseudolabel.atomic import write_text_atomic
            from pseudolabel.config import (
                check_data_roots,
                compose_project,
                compose_raw,
                project_root,
                to_yaml,
                validate,
            )

            if args.output:
                raw = compose_raw(args.overrides)
                check_data_roots(validate(raw, "conf/ " + " ".join(args.overrides)), project_root())
                write_text_atomic(Path(args.output), to_yaml(raw))
                logging.info("wrote %s", args.output)
                return 0
            for path in compose_project(args.overrides, reset=args.reset):
                logging.info("wrote %s", path)
            return 0
        if args.command in ("init", "lock"):
            # Like the stages (ENTRIES), a command's module is imported only when it runs:
            # project.py is never stage code, so no stage's deps list it.
            project = importlib.import_module("pseudolabel.project")
            if args.command == "init":
                written = project.init(".", force=args.force)
                logging.info(
                    "wrote %d files; next: `pseudolabel compose`, `dvc repro`", len(written)
                )
            else:
                logging.info("wrote %s", project.write_lock("."))
            return 0
        if args.command == "lineage":
            return _print_lineage(args.run_id, args.params)
        from pseudolabel.config import load_params

        check_lock()
        cfg = load_params(args.params)
        _check_tracking_store(cfg)
        stage = entry(args.command)
        if args.command == "round":
            stage(cfg, number=args.number)
        else:
            stage(cfg)
        return 0
    except PseudoLabelError as exc:
        print(f"pseudolabel {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except Preempted as exc:  # SIGTERM during a training: its state is saved, resume later
        print(f"pseudolabel {args.command}: {exc}", file=sys.stderr)
        return Preempted.exit_code
    except KeyboardInterrupt:
        print(f"pseudolabel {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
