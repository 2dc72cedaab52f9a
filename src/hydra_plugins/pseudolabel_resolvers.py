"""Hydra imports every module of the `hydra_plugins` namespace when it starts (its plugin
scan), and so does DVC before it composes conf/ for `dvc exp run -S ...`. This one has no
plugin class: it registers the OmegaConf resolvers conf/config.yaml uses, to derive the per-round
stages of dvc.yaml from `pseudo_label.rounds` (see pseudolabel.rounds) and params.yaml's
`params_digest` (see pseudolabel.composition)."""

from pseudolabel import composition, rounds

rounds.register()
composition.register()
