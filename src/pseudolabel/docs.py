"""The configuration reference, generated from the config itself so that it cannot drift.

`python -m pseudolabel.docs [OUT.md]` prints (or writes) a Markdown page listing every key of
the default composition (`pseudolabel.config.compose()`, what `params.yaml` holds), its default,
the conf/ file that sets it, and its description: the comments beside the key in that file and
beside its field in the schema dataclasses of config.py. The documentation site builds this page
on every build (docs/hooks/config_reference.py), so it shows exactly the code's defaults.
"""

from __future__ import annotations

import ast
import io
import json
import re
import sys
import tokenize
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from pseudolabel import config

SCHEMA_FILE = Path(config.__file__)
_KEY = re.compile(r"^(\s*)([A-Za-z_][\w@.-]*):(.*)$")
# Descriptions of the schema fields that no comment in config.py or conf/ describes yet. Better
# as a comment beside the field in config.py: then delete the entry here (tests/test_docs.py
# fails on an entry whose field has gained a comment, or no longer exists).
UNCOMMENTED = {
    "Config.seed": "Random seed of the data split and sampling (ingest) and of training.",
    "DataConfig.image_size": "[height, width] of the images the models take.",
    "DataConfig.channels": "1: grey, 3: RGB.",
    "TrainConfig.epochs": "Training epochs (see steps_per_epoch for their length).",
    "TrainConfig.batch_size": (
        "Images per training step: the global batch, split across the workers or GPUs of "
        "train.strategy (per worker: batch_size / workers)."
    ),
    "TrainConfig.learning_rate": "Initial learning rate, decayed on a cosine schedule.",
    "TrainConfig.patience": "Early stopping: epochs without a better val accuracy.",
    "TrainConfig.label_smoothing": "Label smoothing of the cross-entropy loss (0: none).",
    "AugmentConfig.flip": "Random horizontal flips (keras.layers.RandomFlip).",
    "AugmentConfig.translate": "Random shifts, a fraction of height and width (RandomTranslation).",
    "AugmentConfig.rotate": "Random rotations, a fraction of a full turn (RandomRotation).",
    "AugmentConfig.zoom": "Random zoom, a fraction of the size (RandomZoom).",
    "AugmentConfig.contrast": "Random contrast change, a factor (RandomContrast).",
    "TrackingConfig.experiment": "The MLflow experiment the runs are logged to.",
}


@dataclass(frozen=True)
class Key:
    path: str  # dotted, e.g. pseudo_label.threshold
    default: Any
    source: str  # the conf/ file that sets it ("" when only the schema does)
    description: str


def _mentions(name: str, block: str) -> bool:
    """Whether a comment block written above an earlier key also describes key `name`: it
    names the key, or a word of it (e.g. `test_fraction` under "... val/ or test/ ...")."""
    words = [name, *(w for w in name.split("_") if len(w) >= 4)]
    return any(re.search(rf"\b{re.escape(w)}s?\b", block, re.IGNORECASE) for w in words)


def _comments(source: str) -> dict[int, str]:
    """Line number -> the text of the comment on that line (Python source)."""
    found = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            found[tok.start[0]] = tok.string.lstrip("#").strip()
    return found


def schema_docs(path: Path = SCHEMA_FILE) -> dict[str, dict[str, tuple[str, str]]]:
    """Dataclass name -> field -> (annotation, its comments) from config.py's source."""
    source = path.read_text(encoding="utf-8")
    lines = source.splitlines()
    comments = _comments(source)
    classes: dict[str, dict[str, tuple[str, str]]] = {}
    for node in ast.parse(source).body:
        if not isinstance(node, ast.ClassDef):
            continue
        fields = {}
        block, previous_end = "", 0
        for item in node.body:
            if not (isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)):
                continue
            above = []
            line = item.lineno - 1
            while line >= 1 and lines[line - 1].strip().startswith("#"):
                above.insert(0, comments[line])
                line -= 1
            if above:
                block = " ".join(above)
            elif line != previous_end:  # a blank line or other code: the block has ended
                block = ""
            previous_end = item.end_lineno
            inline = comments.get(item.end_lineno) if item.end_lineno == item.lineno else None
            name = item.target.id
            text = " ".join([*above, *([inline] if inline else [])])
            if not text and block and _mentions(name, block):
                text = block
            fields[name] = (ast.unparse(item.annotation), text)
        classes[node.name] = fields
    return classes


def yaml_docs(path: Path) -> dict[str, str]:
    """Key path (relative to the file's package) -> the comments above and beside it.

    conf/ files are plain block mappings, so indentation gives the nesting; a comment block
    separated from the key by a blank line (a file's header) belongs to no key.
    """
    docs: dict[str, str] = {}
    pending: list[str] = []
    block = ""  # the comment block above the keys of the current paragraph
    stack: list[tuple[int, str]] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if not stripped:
            pending, block = [], ""
            continue
        if stripped.startswith("#"):
            if not stripped.startswith("# @package"):
                pending.append(stripped.lstrip("#").strip())
            continue
        match = _KEY.match(line)
        if match is None:  # a list item, or a continuation
            pending = []
            continue
        indent, key, rest = len(match[1]), match[2], match[3]
        value, _, inline = rest.partition(" #")
        while stack and stack[-1][0] >= indent:
            stack.pop()
        dotted = ".".join([*(k for _, k in stack), key])
        if pending:
            block = " ".join(pending)
        text = " ".join([*pending, *([inline.strip()] if inline.strip() else [])])
        if not text and block and _mentions(key, block):
            text = block
        docs[dotted] = text
        pending = []
        if not value.strip():
            stack.append((indent, key))
    return docs


def _defaults_list(conf_dir: Path) -> list[tuple[str, str, str]]:
    """conf/config.yaml's defaults as (group, package, option), `_self_` left out."""
    raw = OmegaConf.to_container(OmegaConf.load(conf_dir / "config.yaml"))
    entries = []
    for entry in raw.get("defaults", []):
        if not isinstance(entry, dict):
            continue
        ((name, option),) = entry.items()
        group, _, package = name.partition("@")
        entries.append((group, package or group, option))
    return entries


def _extended(path: Path) -> list[Path]:
    """The files a group file extends (its `defaults: [_base@_here_]`), then the file itself."""
    raw = OmegaConf.to_container(OmegaConf.load(path))
    bases = [
        path.parent / f"{entry.partition('@')[0]}.yaml"
        for entry in raw.get("defaults", [])
        if isinstance(entry, str) and entry != "_self_"
    ]
    return [*bases, path]


def sources(conf_dir: Path | None = None) -> list[tuple[str, Path]]:
    """(package prefix, file) for every conf/ file of the default composition, in order."""
    conf_dir = conf_dir or config.conf_dir()
    files = [
        (group_package, file)
        for group, group_package, option in _defaults_list(conf_dir)
        for file in _extended(conf_dir / group / f"{option}.yaml")
    ]
    return [*files, ("", conf_dir / "config.yaml")]


# Nodes conf/config.yaml derives whole from others (do not set them): one row each, their
# interpolation as the default.
DERIVED = {"baseline": "${pseudolabel.baseline:${student},${pseudo_label.rounds}}"}


def config_keys(conf_dir: Path | None = None) -> list[Key]:
    """Every key of the default composition with its default, source file and description."""
    conf_dir = conf_dir or config.conf_dir()
    schema = schema_docs()
    defaults = OmegaConf.to_container(config.compose([], config_dir=conf_dir), resolve=True)
    set_in: dict[str, tuple[str, str]] = {}
    for prefix, path in sources(conf_dir):
        for dotted, doc in yaml_docs(path).items():
            if dotted == "defaults" or dotted.startswith("defaults."):
                continue
            full = f"{prefix}.{dotted}" if prefix else dotted
            rel = path.relative_to(conf_dir.parent).as_posix()
            # Later files win, as in Hydra's composition; an uncommented override keeps the
            # description of the file it overrides (a group's _base.yaml).
            set_in[full] = (rel, doc or set_in.get(full, ("", ""))[1])

    found: list[Key] = []

    def walk(values: dict[str, Any], cls: str, prefix: str) -> None:
        fields = schema.get(cls, {})
        for name, value in values.items():
            dotted = f"{prefix}{name}"
            annotation, schema_doc = fields.get(name, ("", ""))
            if dotted in DERIVED:  # one row: its keys are the student's, listed there
                source, yaml_doc = set_in.get(dotted, ("", ""))
                found.append(Key(dotted, DERIVED[dotted], source, yaml_doc or schema_doc))
                continue
            if annotation in schema and isinstance(value, dict):
                walk(value, annotation, f"{dotted}.")
                continue
            source, yaml_doc = set_in.get(dotted, ("", ""))
            # The comment where the default is set, else the schema's.
            doc = yaml_doc or schema_doc or UNCOMMENTED.get(f"{cls}.{name}", "")
            found.append(Key(dotted, value, source, doc))

    walk(defaults, "Config", "")
    return found


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _value(value: Any) -> str:
    return f"`{json.dumps(value) if not isinstance(value, str) else value}`"


def _groups(conf_dir: Path) -> list[str]:
    chosen = {(group, package): option for group, package, option in _defaults_list(conf_dir)}
    rows = ["| group | options | default |", "|---|---|---|"]
    for folder in sorted(p for p in conf_dir.iterdir() if p.is_dir()):
        options = ", ".join(f"`{name}`" for name in config.group_options(folder))
        used = [
            f"`{o}` ({pkg})" if pkg != g else f"`{o}`"
            for (g, pkg), o in chosen.items()
            if g == folder.name
        ]
        rows.append(f"| `{folder.name}` | {options} | {', '.join(used) or '—'} |")
    return rows


def render(conf_dir: Path | None = None) -> str:
    """The configuration reference page (Markdown)."""
    conf_dir = conf_dir or config.conf_dir()
    lines = [
        "# Configuration reference",
        "",
        "<!-- Generated by `python -m pseudolabel.docs` from conf/ and the schema in",
        "src/pseudolabel/config.py on every docs build: edit those, not this page. -->",
        "",
        "Every key of the default configuration (`conf/config.yaml` and the group files it",
        "composes; `params.yaml` holds the same), its default, the file that sets it, and what",
        "it does. Change a key with `pseudolabel compose key=value` (rewrites `params.yaml`) or",
        "`dvc exp run -S key=value`; see [Configuration](../configuration.md) for how they fit.",
        "",
        "## Config groups",
        "",
        "Pick one option per group, e.g. `model@student.model=efficientnet_b0`, `data=folder`,",
        "`+experiment=smoke`.",
        "",
        *_groups(conf_dir),
    ]
    section, previous = None, ""
    for key in config_keys(conf_dir):
        top = key.path.split(".")[0] if "." in key.path else "top level"
        if top != section:
            section = top
            lines += ["", f"## `{top}`" if top != "top level" else "## Top level", ""]
            lines += ["| key | default | set in | description |", "|---|---|---|---|"]
        source = f"`{key.source}`" if key.source else "schema"
        same = key.description and key.description == previous
        description = "the same as above" if same else _cell(key.description) or "—"
        previous = key.description
        lines.append(f"| `{key.path}` | {_cell(_value(key.default))} | {source} | {description} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    page = render()
    if args:
        Path(args[0]).write_text(page, encoding="utf-8")
    else:
        sys.stdout.write(page)
    return 0


if __name__ == "__main__":
    sys.exit(main())
