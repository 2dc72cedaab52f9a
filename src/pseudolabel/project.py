"""`pseudolabel init`: make an existing git repository a pseudolabel project.

The package ships the default project (conf/, dvc.yaml, params.yaml, .dvcignore and the DVC
settings) as package data in `project_template/`: setup.py copies this repository's top-level
files there when the wheel is built (pseudolabel.template_files lists them), so git holds one
copy. Run from a source checkout (an editable install, the tests), init reads those files in
the repository itself.

In this repository dvc.yaml's stages depend on the modules they run (src/pseudolabel/...).
A user's repository has no such files: there the code is the installed package, so the
written dvc.yaml depends instead on `pseudolabel.lock`, one line naming the installed version.
Every stage checks that line against the version it runs and stops when they differ, so an
upgrade is never silently mixed with results of the old code: `pseudolabel lock` records the
new version, and DVC then re-runs every stage (docs/architecture.md).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from importlib import resources
from pathlib import Path

from pseudolabel import __version__
from pseudolabel.cli import LOCK, lock_text
from pseudolabel.errors import PseudoLabelError
from pseudolabel.template_files import TEMPLATE_FILES

# Template file -> where it goes in the project (pseudolabel.template_files says why the
# package keeps them under other names).
RENAMED = {"dvcignore": ".dvcignore", "dvc.yaml.in": "dvc.yaml"}
DVC_CONFIG = "dvc_config"  # applied with `dvc config`, merged into the project's settings
# What `git add .` must not take in a project: MLflow's store, Hydra's and the plots' folders,
# an interrupted training's state, the environment. The pipeline's outputs (data/, models/,
# outputs/) are DVC's: `dvc repro` writes their own .gitignore entries. Added to the project's
# .gitignore, never replacing it.
GITIGNORE = (
    "/mlflow.db",
    "/mlruns/",
    "/mlartifacts/",
    "/.mlflow-server/",
    "/multirun/",
    "/outputs/hydra/",
    "/outputs/ingest_cache.sqlite",
    ".resume/",  # an interrupted training's state (models/.resume/<name>/), removed on success
    "/dvc_plots/",
    "/.venv/",
    "__pycache__/",
)
_GITIGNORE_HEADER = "# pseudolabel init: MLflow's store, Hydra's folders, the environment"
_CODE_DEP = re.compile(r"^(\s*)- src/")
_CODE_COMMENT = re.compile(r"^\s*# The code `pseudolabel \w+` runs")


def template_dir() -> Path | None:
    """The wheel's project_template/, or None when running from a source checkout."""
    packaged = Path(str(resources.files("pseudolabel") / "project_template"))
    return packaged if (packaged / "conf").is_dir() else None


def source_root() -> Path:
    """The repository this package runs from (a source checkout), whose top-level files are
    the template."""
    root = Path(__file__).resolve().parents[2]
    if not all((root / name).exists() for name in TEMPLATE_FILES):
        raise PseudoLabelError(
            f"this pseudolabel install has no default project: neither the wheel's "
            f"project_template/ nor a source checkout at {root}; reinstall the package."
        )
    return root


def template_files() -> dict[str, Path]:
    """Template name (project_template/'s, e.g. conf/config.yaml or dvc.yaml.in) -> the file."""
    packaged = template_dir()
    if packaged is not None:
        return {
            p.relative_to(packaged).as_posix(): p
            for p in sorted(packaged.rglob("*"))
            if p.is_file() and "__pycache__" not in p.parts
        }
    root, files = source_root(), {}
    for source, name in TEMPLATE_FILES.items():
        path = root / source
        if path.is_dir():
            for p in sorted(path.rglob("*")):
                if p.is_file() and "__pycache__" not in p.parts:
                    files[f"{name}/{p.relative_to(path).as_posix()}"] = p
        else:
            files[name] = path
    return files


def user_dvc_yaml(text: str, version: str = __version__) -> str:
    """This repository's dvc.yaml for a user's repository: each stage's code deps
    (src/pseudolabel/...) become one dep on pseudolabel.lock."""
    out = [
        f"# Written by `pseudolabel init` (pseudolabel {version}). A stage's code is the installed",
        f"# pseudolabel package, recorded in {LOCK}: every stage depends on that file, so",
        "# `pseudolabel lock` after an upgrade re-runs them all.",
    ]
    lines = text.splitlines()
    while lines and lines[0].startswith("#"):  # this repository's header, about its src/ deps
        lines.pop(0)
    replaced = False
    for line in lines:
        if _CODE_COMMENT.match(line):
            continue
        match = _CODE_DEP.match(line)
        if match:
            if not replaced:
                out.append(f"{match[1]}- {LOCK}  # the code: the installed pseudolabel's version")
                replaced = True
            continue
        replaced = False
        out.append(line)
    return "\n".join(out) + "\n"


def _planned(version: str) -> dict[Path, str]:
    """Project-relative path -> content, for every file init writes."""
    files: dict[Path, str] = {}
    for rel, path in template_files().items():
        if rel == DVC_CONFIG:
            continue
        text = path.read_text(encoding="utf-8")
        if rel == "dvc.yaml.in":
            text = user_dvc_yaml(text, version)
        files[Path(RENAMED.get(rel, rel))] = text
    files[Path(LOCK)] = lock_text(version)
    return files


def dvc_settings() -> list[tuple[str, str]]:
    """(section.key, value) of the template's .dvc/config (Hydra integration, autostage, the
    default remote), remotes first so that `core.remote` names one that exists. A remote's
    relative url is relative to .dvc/ in the file and to the project root for `dvc config`."""
    remotes, others, section = [], [], ""
    for line in template_files()[DVC_CONFIG].read_text(encoding="utf-8").splitlines():
        if header := re.match(r"^\s*\[(.+)\]\s*$", line):
            # `['remote "shared"']` -> remote.shared
            section = ".".join(header[1].strip().strip("'").replace('"', "").split())
        elif pair := re.match(r"^\s*([\w.-]+)\s*=\s*(.*?)\s*$", line):
            key, value = f"{section}.{pair[1]}", pair[2]
            if section.startswith("remote."):
                if pair[1] == "url" and "://" not in value and not Path(value).is_absolute():
                    value = os.path.relpath(os.path.join(".dvc", value))
                remotes.append((key, value))
            else:
                others.append((key, value))
    return remotes + others


def _run(cmd: list[str], cwd: Path) -> str:
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if result.returncode != 0:
        why = (result.stderr or result.stdout).strip().splitlines()
        raise PseudoLabelError(f"`{' '.join(cmd)}` failed: {why[-1] if why else result.returncode}")
    return result.stdout.strip()


def gitignore_text(existing: str) -> str | None:
    """`existing` (a .gitignore's text, "" if none) with the GITIGNORE entries it lacks
    appended under one comment line; None when it has them all."""
    have = {line.strip() for line in existing.splitlines()}
    missing = [entry for entry in GITIGNORE if entry not in have]
    if not missing:
        return None
    head = existing if not existing or existing.endswith("\n") else existing + "\n"
    return head + "\n".join([_GITIGNORE_HEADER, *missing]) + "\n"


def init(root: str | Path = ".", force: bool = False) -> list[Path]:
    """Write the default project into `root` (a git repository): conf/, dvc.yaml, params.yaml,
    .dvcignore, pseudolabel.lock, the entries of GITIGNORE added to its .gitignore, `dvc init`
    if it has no .dvc/, and the DVC settings.
    Refuses, before writing anything, to overwrite a file whose content differs, unless
    `force`. Returns the paths written."""
    root = Path(root).resolve()
    try:
        top = Path(_run(["git", "rev-parse", "--show-toplevel"], root)).resolve()
    except (PseudoLabelError, FileNotFoundError):
        raise PseudoLabelError(
            f"{root}: not a git repository; run `git init` first (DVC versions with git)."
        ) from None
    files = _planned(__version__)
    clashes = [
        rel.as_posix()
        for rel, text in files.items()
        if (root / rel).exists() and (root / rel).read_bytes() != text.encode("utf-8")
    ]
    if clashes and not force:
        more = f" (and {len(clashes) - 3} more)" if len(clashes) > 3 else ""
        raise PseudoLabelError(
            f"refusing to overwrite {', '.join(clashes[:3])}{more}: use `pseudolabel init --force`"
        )
    dvc = [sys.executable, "-m", "dvc"]
    if not (root / ".dvc").is_dir():
        _run([*dvc, "init", "-q", *([] if top == root else ["--subdir"])], root)
    written = []
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text, encoding="utf-8")
        written.append(rel)
    ignore = root / ".gitignore"
    text = gitignore_text(ignore.read_text(encoding="utf-8") if ignore.is_file() else "")
    if text is not None:
        ignore.write_text(text, encoding="utf-8")
        written.append(Path(".gitignore"))
    for key, value in dvc_settings():
        _run([*dvc, "config", key, value], root)
    return written


def write_lock(root: str | Path = ".") -> Path:
    """`pseudolabel lock`: record the installed version (DVC then re-runs every stage)."""
    path = Path(root) / LOCK
    path.write_text(lock_text(), encoding="utf-8")
    return path
