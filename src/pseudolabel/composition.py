"""One composition: a project's own settings live in `conf/project.yaml`, which `conf/config.yaml`
lists last in its defaults, so every writer of params.yaml composes them: `pseudolabel compose`,
`dvc exp run -S` and `--queue` (DVC's Hydra integration composes `conf/` plus `-S` alone) and
`pseudolabel-sweep`.

`pseudolabel compose KEY=VALUE ...` edits that file and then writes params.yaml from `conf/`:
a group choice (`data=folder`, `model@student.model=efficientnet_b0`) becomes an `override`
entry of its defaults list, a preset (`+experiment=smoke`) an entry of its own, and a value
(`data.image_size=[32,32]`) a key below, so `git diff conf/` shows what the user set.

params.yaml also records `params_digest`, a hash of its own values computed by the composition
(the resolver below, run by Hydra wherever it composes, DVC's process included): a stage that
reads a params.yaml edited by hand, or written by an older version without the digest, says so
in one line instead of running a pipeline `conf/` does not describe.

Light on purpose (no TensorFlow): Hydra's plugin scan imports it (src/hydra_plugins/).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf

from pseudolabel.errors import PseudoLabelError

PROJECT = "project"  # conf/project.yaml
DIGEST = "params_digest"
# Keys of a composition that are not the pipeline's parameters: the digest itself, and the
# `hydra` node a Hydra app's composition (the sweep's) carries.
UNHASHED = (DIGEST, "hydra")
HEADER = """\
# @package _global_
# This project's own settings, on top of the defaults in the rest of conf/. conf/config.yaml
# lists this file last, so every writer of params.yaml composes it: `pseudolabel compose`,
# `dvc exp run -S key=value` (and --queue), `pseudolabel-sweep`. `pseudolabel compose KEY=VALUE`
# rewrites it (`~KEY` drops a setting, `--reset` all of them); editing it by hand works too,
# then run `pseudolabel compose` to write params.yaml. Commit it with params.yaml.
"""


def digest(values: dict[str, Any]) -> str:
    """The hash of a composition's values (a plain dict as params.yaml loads), without the keys
    that are not parameters."""
    kept = {k: v for k, v in values.items() if k not in UNHASHED}
    text = json.dumps(kept, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _digest_resolver(*, _root_: DictConfig) -> str:
    # A copy without this key: resolving the root itself would resolve this node again.
    plain = OmegaConf.to_container(_root_, resolve=False)
    copy = OmegaConf.create({k: v for k, v in plain.items() if k not in UNHASHED})
    return digest(OmegaConf.to_container(copy, resolve=True))


def register() -> None:
    """Make ${pseudolabel.params_digest:} resolvable (conf/config.yaml's params_digest)."""
    if not OmegaConf.has_resolver("pseudolabel.params_digest"):
        OmegaConf.register_new_resolver("pseudolabel.params_digest", _digest_resolver)


def check_digest(raw: dict[str, Any], origin: str) -> None:
    """A params.yaml's values are the ones its composition hashed."""
    recorded = raw.get(DIGEST)
    if recorded is None:
        raise PseudoLabelError(
            f"{origin}: no {DIGEST}: written by an older pseudolabel or by hand, not composed "
            "from conf/; recompose it with `pseudolabel compose` (your settings belong in "
            "conf/project.yaml: `pseudolabel compose KEY=VALUE`)."
        )
    if recorded != digest(raw):
        raise PseudoLabelError(
            f"{origin}: edited by hand (its values no longer match its {DIGEST}); put the change "
            "in conf/ with `pseudolabel compose KEY=VALUE` (or `dvc exp run -S KEY=VALUE`), "
            "which recomposes it."
        )


# --- conf/project.yaml -------------------------------------------------------------------------


class _Dumper(yaml.SafeDumper):
    """Mappings as blocks, lists in one line (`image_size: [32, 32]`), as conf/ writes them."""


_Dumper.add_representer(
    list, lambda d, v: d.represent_sequence("tag:yaml.org,2002:seq", v, flow_style=True)
)


class Settings:
    """What conf/project.yaml holds: the preset and group choices (its defaults list, in
    order: Hydra wants additions before overrides) and the values below them."""

    def __init__(self, added=None, overridden=None, values=None):
        self.added: dict[str, str] = dict(added or {})  # "/experiment" -> "smoke"
        self.overridden: dict[str, str] = dict(overridden or {})  # "/data" -> "folder"
        self.values: dict[str, Any] = dict(values or {})

    @classmethod
    def read(cls, path: Path) -> Settings:
        if not path.is_file():
            return cls()
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise PseudoLabelError(f"{path}: not valid YAML ({exc}).") from None
        if not isinstance(raw, dict):
            raise PseudoLabelError(f"{path}: expected a mapping of settings.")
        settings = cls(values={k: v for k, v in raw.items() if k != "defaults"})
        for entry in raw.get("defaults") or []:
            if not (isinstance(entry, dict) and len(entry) == 1):
                raise PseudoLabelError(
                    f"{path}: defaults entry {entry!r}: expected `GROUP: OPTION` or "
                    "`override GROUP: OPTION`."
                )
            ((key, option),) = entry.items()
            if key.startswith("override "):
                settings.overridden[key.removeprefix("override ").strip()] = option
            else:
                settings.added[key] = option
        return settings

    def text(self) -> str:
        entries = [f"{k}: {v}" for k, v in self.added.items()]
        entries += [f"override {k}: {v}" for k, v in self.overridden.items()]
        text = HEADER + "".join(
            f"{'defaults:' if i == 0 else ''}\n  - {e}" for i, e in enumerate(entries)
        ).lstrip("\n")
        if entries:
            text += "\n"
        if self.values:
            text += yaml.dump(self.values, Dumper=_Dumper, sort_keys=False)
        return text


def _primary_groups(conf: Path) -> set[str]:
    """The `group[@package]` entries of conf/config.yaml's defaults list; refused if that list
    does not end with this project's file (a conf/ from before it existed)."""
    config = conf / "config.yaml"
    defaults = (yaml.safe_load(config.read_text(encoding="utf-8")) or {}).get("defaults") or []
    if not defaults or defaults[-1] != PROJECT:
        raise PseudoLabelError(
            f"{config}: its defaults list must end with `- {PROJECT}` (conf/{PROJECT}.yaml, this "
            "project's own settings); a conf/ from an older pseudolabel lacks it: add the line "
            f"after `- _self_` and create conf/{PROJECT}.yaml (`pseudolabel init` writes both)."
        )
    return {next(iter(e)) for e in defaults if isinstance(e, dict)}


def _set(values: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = values
    for part in parents:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[leaf] = value


def _drop(values: dict[str, Any], dotted: str) -> bool:
    *parents, leaf = dotted.split(".")
    chain = [values]
    for part in parents:
        node = chain[-1].get(part)
        if not isinstance(node, dict):
            return False
        chain.append(node)
    if leaf not in chain[-1]:
        return False
    del chain[-1][leaf]
    for node, part in zip(reversed(chain[:-1]), reversed(parents), strict=True):  # prune empties
        if not node[part]:
            del node[part]
    return True


def apply(settings: Settings, overrides: list[str], conf: Path) -> Settings:
    """The settings with `overrides` (Hydra's syntax) applied: group choices for the folders
    of conf/, values for the rest, `~KEY` to drop a setting."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except HydraException as exc:
        raise PseudoLabelError(f"pseudolabel compose: bad override: {exc}") from None
    primary = _primary_groups(conf)
    out = Settings(settings.added, settings.overridden, json.loads(json.dumps(settings.values)))
    for o in parsed:
        key = o.key_or_group
        if key == "hydra" or key.startswith("hydra/") or key.startswith("hydra."):
            raise PseudoLabelError(
                f"{o.input_line}: Hydra's own settings are not parameters; pass them to "
                "`pseudolabel-sweep`."
            )
        if o.is_sweep_override():
            raise PseudoLabelError(
                f"{o.input_line}: one value per key here; sweep several with `pseudolabel-sweep "
                "-m` or `dvc exp run -S KEY=A,B --queue`."
            )
        group = (conf / key).is_dir()
        entry = f"{key}@{o.package}" if o.package else key
        if o.is_delete():
            dropped = _drop(out.values, key) if not group else False
            for choices in (out.added, out.overridden):
                dropped = choices.pop(f"/{entry}", None) is not None or dropped
            if not dropped:
                raise PseudoLabelError(f"{o.input_line}: conf/{PROJECT}.yaml does not set {key}.")
            continue
        value = o.value()
        if group:
            if not isinstance(value, str):
                raise PseudoLabelError(f"{o.input_line}: give one option of conf/{key}/.")
            (out.overridden if entry in primary else out.added)[f"/{entry}"] = value
        else:
            _set(out.values, key, value)
    return out
