"""Where each stage reads and writes: the same names dvc.yaml declares."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from pseudolabel import rounds

# The merged set's table of its images, labels and probabilities (written by the merge stage).
MANIFEST = "manifest.csv"


@dataclass(frozen=True)
class Paths:
    """Every file the pipeline reads or writes, relative to one project root.

    `data_root`, when given, is where the ingested images (`data/image_dataset`,
    `data/unlabeled`) are read from; everything else lives under `root`. A sweep job reads the
    project's images and writes its merged set, models and metrics only under its own folder.

    `round(r)` gives round r's paths (Noisy Student rounds, see pseudolabel.rounds): the same
    layout under rounds/round<r>/, the same images, and round r-1's student as the teacher.
    """

    root: Path = Path(".")
    data_root: Path | None = None
    round_number: int = 1
    teacher_model: Path | None = None  # None: models/teacher.keras under root
    first_round_root: Path | None = None  # round 1's root (None: root, this is round 1)

    def round(self, number: int) -> Paths:
        """Round `number`'s paths (1: these); call it on the project's paths."""
        if number == 1:
            return self
        return Paths(
            root=self.root / rounds.round_dir(number),
            data_root=self.input_root,
            round_number=number,
            teacher_model=self.round(number - 1).model("student"),
            first_round_root=self.root,
        )

    def _p(self, rel: str) -> Path:
        return self.root / rel

    @property
    def input_root(self) -> Path:
        """The project the ingested images (and their dvc.lock entries) belong to."""
        return self.root if self.data_root is None else self.data_root

    def _data(self, rel: str) -> Path:
        return self.input_root / rel

    @property
    def labeled(self) -> Path:
        return self._data("data/image_dataset")

    @property
    def train(self) -> Path:
        return self.labeled / "train"

    @property
    def val(self) -> Path:
        return self.labeled / "val"

    @property
    def test(self) -> Path:
        return self.labeled / "test"

    @property
    def unlabeled(self) -> Path:
        return self._data("data/unlabeled")

    @property
    def merged(self) -> Path:
        return self._p("data/train_ssl")

    @property
    def merged_manifest(self) -> Path:
        return self.merged / MANIFEST

    @property
    def models(self) -> Path:
        return self._p("models")

    @property
    def outputs(self) -> Path:
        return self._p("outputs")

    @property
    def csv(self) -> Path:
        return self.outputs / "data.csv"

    @property
    def first_round_csv(self) -> Path:
        """Round 1's CSV (the teacher's labeling): pseudo_label.ood.exclude=auto decides on it
        for every round."""
        return (self.first_round_root or self.root) / "outputs" / "data.csv"

    @property
    def first_round_labeling_metrics(self) -> Path:
        """Round 1's metrics/pseudo_label.json: student.consistency.alignment_target=auto reads
        its class_mix for every round."""
        return (self.first_round_root or self.root) / "metrics" / "pseudo_label.json"

    @property
    def ingest_report(self) -> Path:
        return self.outputs / "ingest_report.csv"

    @property
    def ingest_cache(self) -> Path:
        """Not a DVC output (DVC would delete it before each run): kept beside the report."""
        return self.outputs / "ingest_cache.sqlite"

    @property
    def metrics(self) -> Path:
        return self._p("metrics")

    @property
    def plots(self) -> Path:
        return self._p("plots")

    @property
    def threshold_analysis(self) -> Path:
        """The threshold-analysis table pseudo_label writes and merge reads (`dvc plots show`)."""
        return self.plots / "pseudo_label" / "threshold_analysis.csv"

    @property
    def ood_histogram(self) -> Path:
        """The OOD score's histogram, val against unlabeled images (`dvc plots show`)."""
        return self.plots / "pseudo_label" / "ood_histogram.csv"

    def model(self, role: str) -> Path:
        if role == "teacher" and self.teacher_model is not None:
            return self.teacher_model
        if role == "baseline":  # a folder DVC tracks whether the baseline is on or off
            return self.models / "baseline" / "baseline.keras"
        return self.models / f"{role}.keras"

    def history(self, role: str) -> Path:
        """The per-epoch training log (dvc plots)."""
        return self.plots / "train" / f"{role}.csv"


def swap_folder(new: Path, target: Path) -> None:
    """Put the complete folder `new` at `target` (ingest's views, merge's data/train_ssl): the
    old one is moved aside first and removed only afterwards, so a kill at any moment leaves
    `target` whole, old or new (a leftover `.<name>.old` is cleared by the next swap)."""
    old = target.with_name(f".{target.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if target.exists():
        os.replace(target, old)
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(new, target)
    if old.exists():
        shutil.rmtree(old)
