"""Where each stage reads and writes: the same names dvc.yaml declares."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Paths:
    """Every file the pipeline reads or writes, relative to one project root."""

    root: Path = Path(".")

    def _p(self, rel: str) -> Path:
        return self.root / rel

    @property
    def labeled(self) -> Path:
        return self._p("data/image_dataset")

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
        return self._p("data/unlabeled")

    @property
    def merged(self) -> Path:
        return self._p("data/train_ssl")

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
    def metrics(self) -> Path:
        return self._p("metrics")

    @property
    def plots(self) -> Path:
        return self._p("plots")

    def model(self, role: str) -> Path:
        return self.models / f"{role}.keras"
