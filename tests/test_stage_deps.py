"""dvc.yaml's code deps cannot drift from what each stage imports.

Each stage's command is `pseudolabel <command>`; the CLI (cli.py) imports only that command's
module (cli.STAGE_ENTRIES). From cli.py and that module, the import graph is built with `ast`:
every Import/ImportFrom anywhere in a module (function-level imports count), plus the packages
whose `__init__.py` an import runs. A package's PEP 562 `__getattr__` (lazy attributes, as in
pseudolabel/__init__.py and pseudolabel/stages/__init__.py) only runs when an attribute it
serves is asked for, so its imports are followed only when a reached module does
`from <package> import <name>` with a name that is not a submodule.

Every reached file must be covered by the stage's deps (a file, or a folder above it), and every
code dep must cover a reached file, so that editing a module re-runs exactly the stages that run
it. The slow test checks the analysis against what a real interpreter imports.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest
import yaml

from pseudolabel.cli import STAGE_ENTRIES

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
PACKAGE = "pseudolabel"
CLI = "pseudolabel.cli"
STAGES_PACKAGE = "pseudolabel.stages"
# Stage modules that run other stages by design: `pseudolabel round` is pseudo_label -> merge ->
# train_student on one round's paths.
COMPOSITE_STAGES = {"pseudolabel.stages.rounds"}
# Helpers shared by stages, not stages themselves.
STAGE_HELPERS = {"pseudolabel.stages.common"}


def module_file(name: str) -> Path | None:
    """The file of module `name` under src/, or None when it is not one of ours."""
    base = SRC.joinpath(*name.split("."))
    for candidate in (base / "__init__.py", base.with_suffix(".py")):
        if candidate.is_file():
            return candidate
    return None


def is_package(name: str) -> bool:
    return (SRC.joinpath(*name.split(".")) / "__init__.py").is_file()


def _resolve(module: str | None, level: int, importer: str) -> str:
    """The absolute module an ImportFrom names (relative imports resolved against importer)."""
    if level == 0:
        return module or ""
    package = importer if is_package(importer) else importer.rpartition(".")[0]
    for _ in range(level - 1):
        package = package.rpartition(".")[0]
    return f"{package}.{module}" if module else package


@cache
def imports_of(name: str) -> tuple[frozenset[str], frozenset[str], frozenset[str]]:
    """(modules importing `name` always runs, modules its lazy `__getattr__` may import,
    names it takes with `from <package> import <name>` that are attributes, as 'pkg:name')."""
    path = module_file(name)
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    lazy_nodes: set[int] = set()
    if path.name == "__init__.py":
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and node.name == "__getattr__":
                lazy_nodes.update(id(n) for n in ast.walk(node))
    eager: set[str] = set()
    lazy: set[str] = set()
    attributes: set[str] = set()
    for node in ast.walk(tree):
        found: set[str] = set()
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(node.module, node.level, name)
            found.add(base)
            for alias in node.names:
                if module_file(f"{base}.{alias.name}"):
                    found.add(f"{base}.{alias.name}")
                elif is_package(base):
                    attributes.add(f"{base}:{alias.name}")
        ours = {m for m in found if m == PACKAGE or m.startswith(PACKAGE + ".")}
        (lazy if id(node) in lazy_nodes else eager).update(ours)
    return frozenset(eager), frozenset(lazy), frozenset(attributes)


def reached(*entries: str) -> set[str]:
    """Every module of ours that importing `entries` (and calling their functions) can run."""
    seen: set[str] = set()
    todo = list(entries)
    while todo:
        name = todo.pop()
        parts = name.split(".")
        # Importing a.b.c runs a/__init__.py and a/b/__init__.py first.
        for i in range(1, len(parts) + 1):
            module = ".".join(parts[:i])
            if module in seen or module_file(module) is None:
                continue
            seen.add(module)
            eager, _, attributes = imports_of(module)
            todo.extend(eager)
            for attribute in attributes:  # a lazy attribute: its package's __getattr__ runs
                todo.extend(imports_of(attribute.partition(":")[0])[1])
    return seen


def _dvc_stages() -> dict[str, dict]:
    """dvc.yaml's stages, a foreach stage by its `do` body."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    return {name: body.get("do", body) for name, body in stages.items()}


def stage_entry(name: str) -> str:
    """The module `pseudolabel <command>` imports for dvc.yaml stage `name`."""
    cmd = _dvc_stages()[name]["cmd"].split()
    assert cmd[0] == "pseudolabel", f"{name}: cmd {cmd} is not a `pseudolabel <command>`"
    assert cmd[1] in STAGE_ENTRIES, f"{name}: `pseudolabel {cmd[1]}` is not in cli.STAGE_ENTRIES"
    return STAGE_ENTRIES[cmd[1]][0]


def code_deps(name: str) -> list[str]:
    """The stage's deps under src/ (paths relative to the project root)."""
    return [d for d in _dvc_stages()[name].get("deps", []) if d.startswith("src/")]


def covers(dep: str, path: Path) -> bool:
    target = (ROOT / dep).resolve()
    return path == target or target in path.parents


def rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


STAGE_NAMES = sorted(_dvc_stages())


def test_every_stage_runs_a_cli_command():
    assert STAGE_NAMES, "dvc.yaml has no stages"
    for name in STAGE_NAMES:
        stage_entry(name)


@pytest.mark.parametrize("stage", STAGE_NAMES)
def test_code_deps_cover_every_module_the_stage_imports(stage):
    deps = code_deps(stage)
    files = sorted(module_file(m) for m in reached(CLI, stage_entry(stage)))
    missing = [rel(f) for f in files if not any(covers(d, f) for d in deps)]
    assert not missing, (
        f"dvc.yaml stage {stage!r} imports these modules but does not list them in its deps "
        f"(editing them would not re-run it): {missing}"
    )


@pytest.mark.parametrize("stage", STAGE_NAMES)
def test_code_deps_list_only_modules_the_stage_imports(stage):
    files = [module_file(m) for m in reached(CLI, stage_entry(stage))]
    for dep in code_deps(stage):
        assert (ROOT / dep).exists(), f"dvc.yaml stage {stage!r}: dep {dep} does not exist"
        assert any(covers(dep, f) for f in files), (
            f"dvc.yaml stage {stage!r} lists {dep}, which it never imports "
            "(editing it would re-run the stage for nothing)"
        )


def _stage_modules() -> list[str]:
    folder = SRC / "pseudolabel" / "stages"
    names = (f"{STAGES_PACKAGE}.{p.stem}" for p in sorted(folder.glob("*.py")))
    return [n for n in names if not n.endswith("__init__") and n not in STAGE_HELPERS]


@pytest.mark.parametrize("module", sorted(set(_stage_modules()) - COMPOSITE_STAGES))
def test_no_stage_module_imports_another(module):
    others = set(_stage_modules()) - {module}
    imported = sorted(reached(module) & others)
    assert not imported, (
        f"{module} imports the stage module(s) {imported}: a stage's edit would re-run the other "
        "(share paths through pseudolabel.paths.Paths, helpers through pseudolabel.stages.common)"
    )


def test_every_stage_module_is_run_by_the_cli():
    entries = {module for module, _ in STAGE_ENTRIES.values()}
    assert set(_stage_modules()) == entries


def test_the_analysis_follows_lazy_attributes(tmp_path):
    """`from pseudolabel import PseudoLabelGenerator` runs the package's __getattr__ import."""
    assert f"{PACKAGE}.generator" not in reached(CLI)
    assert "pseudolabel.generator" in imports_of(PACKAGE)[1]
    # pseudolabel.stages imports its stage modules by name (importlib), never up front.
    assert not {m for m in imports_of(STAGES_PACKAGE)[0] if m.startswith(STAGES_PACKAGE + ".")}


_PROBE = """
import importlib, json, sys
importlib.import_module("pseudolabel.cli")
importlib.import_module(sys.argv[1])
print(json.dumps(sorted(m for m in sys.modules if m == "pseudolabel" or
                        m.startswith("pseudolabel."))))
"""


@pytest.mark.slow
@pytest.mark.parametrize("module", sorted({module for module, _ in STAGE_ENTRIES.values()}))
def test_the_analysis_covers_what_python_imports(module):
    """A real interpreter importing the CLI and the stage module loads no module the analysis
    missed (function-level imports run later, so it may load fewer)."""
    env = {**os.environ, "PYTHONPATH": str(SRC), "TF_CPP_MIN_LOG_LEVEL": "3"}
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, module],
        capture_output=True,
        text=True,
        check=True,
        env=env,
        cwd=ROOT,
    ).stdout
    loaded = set(json.loads(out.strip().splitlines()[-1]))
    assert loaded <= reached(CLI, module), sorted(loaded - reached(CLI, module))
