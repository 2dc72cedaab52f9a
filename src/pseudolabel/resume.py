"""Training that survives a kill or a preemption: the state of an interrupted fit, and its resume.

Every training stage (teacher, baseline, student, each round's) keeps, while it trains, a state
folder `<models>/.resume/<name>/` (`models/.resume/teacher/`, `rounds/round2/models/.resume/
student/`, ...): DVC deletes a stage's declared outputs before it runs, not this folder, as it
leaves labeling's `outputs/.data.csv.partial/` alone. At the end of every epoch it holds:

- `variables-<n>.npz`: every Keras variable of the model being trained and of its optimizer,
  in their tracking order: the weights, BatchNorm statistics, the random-seed states of the
  augmentation layers (which `Model.save_weights` leaves out), the consistency student's
  FlexMatch and alignment state, the optimizer's step count, moments and EMA; and, for
  `EarlyStopping`, the best epoch's weights;
- `state.json`, written last and atomically, naming that file: the fingerprint of what the
  training depends on, where it stands (phase, epochs done, step within the epoch), the
  epochs' metrics so far, EarlyStopping's counters and the MLflow run id.

The next run of the stage with the same fingerprint restores all of it, draws the data the
uninterrupted run would have drawn from there on (fitting._fit_phase), continues the same
MLflow run, and removes the folder once the model is saved: on one process (no Ray Train
workers) it ends with the very weights of an uninterrupted run (tests/test_resume.py). A
SIGTERM (a preemption's notice) stops the training at the next step boundary, within a step,
and exits with status 143; the last completed epoch's state stands, so that epoch is redone.
A state whose fingerprint differs (other params, other code, other images) is refused in one
line, never mixed in; deleting the folder starts afresh (docs/failure-modes.md).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from pseudolabel.atomic import write_text_atomic
from pseudolabel.errors import Preempted, PseudoLabelError  # noqa: F401 (resume.Preempted)

log = logging.getLogger(__name__)

FOLDER = ".resume"
STATE = "state.json"


def code_digest() -> str:
    """A digest of this package's source files: a state saved by other code is not resumed."""
    digest = hashlib.md5()
    root = Path(__file__).resolve().parent
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def fingerprint(**parts: Any) -> str:
    """The digest of what a training depends on (JSON-able parts) and of the code."""
    text = json.dumps({**parts, "code": code_digest()}, sort_keys=True, default=str)
    return hashlib.md5(text.encode()).hexdigest()


class TrainingState:
    """The state folder of one training (see the module docstring)."""

    def __init__(self, folder: Path, fingerprint: str):
        self.folder = Path(folder)
        self.fingerprint = fingerprint
        self.hint = self.folder  # what a refusal says to delete (Ray Train: the .resume folder)
        self.extra: dict = {}  # saved with every state (the MLflow run id)
        # Called with (folder, state) after every save: under Ray Train workers it reports the
        # folder as the run's checkpoint (strategies.share_state).
        self.on_save: Callable[[Path, dict], None] | None = None

    def load(self) -> dict | None:
        """The saved state, or None when there is none. A state of another fingerprint is
        refused (PseudoLabelError: one line, exit status 2)."""
        path = self.folder / STATE
        if not path.is_file():
            return None
        try:
            state = json.loads(path.read_text(encoding="utf-8"))
            arrays = self.folder / state["arrays"]
        except (ValueError, KeyError, TypeError) as exc:
            raise PseudoLabelError(
                f"{path}: not a training state this version wrote ({exc}); delete "
                f"{self.hint} to train from the first epoch."
            ) from None
        if state.get("fingerprint") != self.fingerprint:
            raise PseudoLabelError(
                f"{self.hint} holds an interrupted training of other params, code or images "
                f"(stopped after epoch {state.get('epoch')}); it is not mixed in: delete the "
                "folder to train from the first epoch, or restore what it was trained with."
            )
        if not arrays.is_file():
            raise PseudoLabelError(f"{arrays}: missing; delete {self.hint} to start afresh.")
        return state

    def arrays(self, state: dict) -> dict[str, np.ndarray]:
        with np.load(self.folder / state["arrays"]) as data:
            return {name: data[name] for name in data.files}

    def save(self, state: dict, arrays: dict[str, np.ndarray]) -> None:
        """Write the arrays under a new name, then state.json naming them (atomically), then
        remove the older arrays: a kill at any moment leaves a complete state."""
        self.folder.mkdir(parents=True, exist_ok=True)
        previous = self.folder / STATE
        counter = 0
        if previous.is_file():
            try:
                counter = int(json.loads(previous.read_text(encoding="utf-8"))["counter"]) + 1
            except (ValueError, KeyError, TypeError):
                counter = 0
        name = f"variables-{counter:06d}.npz"
        tmp = self.folder / f".{name}.{os.getpid()}.tmp"
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.folder / name)
        write_text_atomic(
            previous,
            json.dumps({**state, "arrays": name, "counter": counter,
                        "fingerprint": self.fingerprint}, indent=1),
        )  # fmt: skip
        for old in self.folder.glob("variables-*.npz"):
            if old.name != name:
                old.unlink(missing_ok=True)
        if self.on_save is not None:
            self.on_save(self.folder, state)

    def clear(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
        parent = self.folder.parent
        if parent.name == FOLDER and parent.is_dir() and not any(parent.iterdir()):
            parent.rmdir()


def variables_of(model) -> list:
    """Every variable a resume must restore, in a stable order: the model's (weights, seeds,
    state) and its optimizer's (built first, so that it has them all)."""
    optimizer = getattr(model, "optimizer", None)
    out = list(model.variables)
    if optimizer is not None:
        if not optimizer.built:
            optimizer.build(model.trainable_variables)
        out += list(optimizer.variables)
    return out


def capture(model) -> dict[str, np.ndarray]:
    return {f"v{i}": np.asarray(v.numpy()) for i, v in enumerate(variables_of(model))}


def restore(model, arrays: dict[str, np.ndarray]) -> None:
    """Assign the captured values back; a state of another model shape is refused."""
    targets = variables_of(model)
    names = [f"v{i}" for i in range(len(targets))]
    shapes = [tuple(arrays[n].shape) if n in arrays else None for n in names]
    if len(arrays) < len(targets) or shapes != [tuple(v.shape) for v in targets]:
        raise PseudoLabelError(
            "the saved training state does not fit this model (another architecture?): "
            "delete its .resume folder to train from the first epoch."
        )
    for name, variable in zip(names, targets, strict=True):
        variable.assign(arrays[name])


class StopRequest:
    """Set by SIGTERM (a preemption's notice) while a training runs: the training stops at its
    next step boundary, saves, and raises Preempted."""

    def __init__(self):
        self.requested = False

    @contextmanager
    def installed(self) -> Iterator[StopRequest]:
        """Handle SIGTERM for the duration (main thread only; elsewhere nothing changes)."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return

        def handler(signum, frame):
            log.warning("SIGTERM: stopping at the next step boundary, saving the training state")
            self.requested = True

        previous = signal.signal(signal.SIGTERM, handler)
        try:
            yield self
        finally:
            signal.signal(signal.SIGTERM, previous)
