"""teacher/student.train.strategy: where a training runs, chosen by config in one call.

`run(train, cfg, role, paths, ...)` calls the training function `train` (stages.train's
`_train`) under `cfg[role].train.strategy`:

- auto: as it is, in this process;
- mirrored: inside a tf.distribute.MirroredStrategy scope (every local GPU);
- multi_worker: on `train.workers` Ray Train workers (TensorflowTrainer), each running the same
  function inside a MultiWorkerMirroredStrategy scope (TF_CONFIG set by Ray Train), with the
  Keras fixes of pseudolabel.keras_patches.

Keras distributes each dataset itself: tf.data's auto-sharding (by data: the datasets are
seeded, so every worker builds the same stream and keeps its share) splits each global batch of
`train.batch_size` across the workers, so the steps per epoch and the schedule are the local
run's. Only the chief (world rank 0) writes the model, its metadata, the history and the metrics
at the project's paths and logs to MLflow; the other workers run the same code (every fit,
evaluate and save step is collective) with their writes sent to a scratch folder and a scratch
MLflow store, removed after.

Fault tolerance is Ray Train's: FailureConfig(max_failures=ray.max_failures) restarts the whole
worker group when a worker (or its node) dies, and every worker starts again from the run's
latest checkpoint. That checkpoint is the chief's training state (pseudolabel.resume), reported
with ray.train.report at every epoch's end (share_state); the run's storage is
<models>/.resume/<name>.ray, beside the chief's state folder, so that a driver killed with its
`dvc repro` resumes from there too (Ray Train restores a run from its storage and name), and
both are removed once the model is saved.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pseudolabel import ray_connect, resume
from pseudolabel.errors import PseudoLabelError

log = logging.getLogger(__name__)


def run(train: Callable[..., dict], cfg, role: str, paths, **arguments) -> dict:
    """`train(cfg=cfg, role=role, paths=paths, **arguments)` under
    `cfg[role].train.strategy`; its metrics (the chief's, on Ray Train workers). `train` must
    be a module-level function: Ray Train workers import it by name."""
    arguments = {"cfg": cfg, "role": role, "paths": paths, **arguments}
    strategy = cfg[role].train.strategy
    if strategy == "mirrored":
        import tensorflow as tf

        with tf.distribute.MirroredStrategy().scope():
            return train(**arguments)
    if strategy == "multi_worker":
        return train_on_ray(train, arguments)
    return train(**arguments)


def _require_ray(what: str) -> None:
    try:
        import ray.train  # noqa: F401
    except ImportError:
        raise PseudoLabelError(
            f"{what} needs Ray: pip install 'pseudolabel[ray]' (or use train.strategy=auto)."
        ) from None


def train_on_ray(train, arguments: dict[str, Any]) -> dict[str, Any]:
    """`train(**arguments)` on `train.workers` Ray Train workers; the chief's metrics."""
    from pseudolabel import tracking

    cfg, role = arguments["cfg"], arguments["role"]
    name = role  # the model's and its run's name
    train_cfg = cfg[role].train
    key = f"{role}.train.strategy=multi_worker"
    _require_ray(key)
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.tensorflow import TensorflowTrainer

    paths = arguments["paths"]
    metrics_file = Path(paths.metrics) / f"{name}.json"
    storage = Path(paths.models).resolve() / resume.FOLDER
    run_dir = storage / f"{name}.ray"  # Ray Train's run: its checkpoints, kept until saved
    started = ray_connect.connect(cfg.ray.address)
    succeeded = False
    try:
        resources = ray.cluster_resources()
        workers = train_cfg.workers
        if resources.get("CPU", 0.0) < workers:
            raise PseudoLabelError(
                f"{role}.train.workers={workers}: the Ray cluster has "
                f"{resources.get('CPU', 0.0):g} CPUs and each worker takes one; use "
                f"{role}.train.workers <= {int(resources.get('CPU', 0.0))} or add nodes."
            )
        gpus = resources.get("GPU", 0.0) >= workers
        log.info(
            "%s: training on %d Ray Train workers (%s), global batch %d",
            name,
            workers,
            "a GPU each" if gpus else "CPU",
            train_cfg.batch_size,
        )
        metrics_file.unlink(missing_ok=True)
        config = {
            "function": (train.__module__, train.__qualname__),
            "arguments": arguments,
            "cwd": os.getcwd(),
            "tracking_uri": tracking.tracking_uri(cfg),
            "env": {k: v for k, v in os.environ.items() if k in _PASSED_ENV},
            "resume_hint": str(storage),
        }
        if run_dir.is_dir():
            log.info("%s: resuming the Ray Train run in %s", name, run_dir)
        trainer = TensorflowTrainer(
            _worker_loop,
            train_loop_config=config,
            scaling_config=ScalingConfig(
                num_workers=workers, use_gpu=gpus, resources_per_worker={"CPU": 1}
            ),
            run_config=RunConfig(
                name=run_dir.name,
                storage_path=str(storage),
                failure_config=FailureConfig(max_failures=cfg.ray.max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=1),
            ),
        )
        try:
            trainer.fit()
        except Exception as exc:  # ray.train.TrainingFailedError: the worker's error inside
            raise _worker_error(exc, run_dir) from exc
        succeeded = True
    finally:
        if started:
            ray.shutdown()
        if succeeded:  # the model is saved: nothing left to resume
            shutil.rmtree(run_dir, ignore_errors=True)
            with contextlib.suppress(OSError):
                storage.rmdir()  # when empty
    return json.loads(metrics_file.read_text(encoding="utf-8"))


# What the chief needs of the driver's environment: the context tags (tracking.context_tags)
# and where the stage runs.
_PASSED_ENV = ("DVC_EXP_NAME", "DVC_EXP_BASELINE_REV", "DVC_ROOT")


def _worker_error(exc: Exception, run_dir: Path | None = None) -> Exception:
    """A worker's PseudoLabelError as itself (one line, exit code 2); anything else as it came
    (with where the run's checkpoints are kept, when it has some)."""
    if run_dir is not None and any(run_dir.glob("checkpoint_*")):
        log.error(
            "the Ray Train run failed after ray.max_failures restarts; its last checkpoint is "
            "in %s: run the stage again to resume from it",
            run_dir,
        )
    seen, stack = set(), [exc]
    while stack:
        error = stack.pop()
        if id(error) in seen:
            continue
        seen.add(id(error))
        if isinstance(error, PseudoLabelError):
            return PseudoLabelError(str(error))
        stack.extend(e for e in (error.__cause__, error.__context__) if e is not None)
        stack.extend(getattr(error, "worker_failures", {}).values())
        stack.extend(getattr(error, "errors", ()) or ())
    return exc


def _worker_loop(config: dict[str, Any]) -> None:
    """One Ray Train worker: the undecorated training function in a
    MultiWorkerMirroredStrategy scope; the chief writes, the others write to scratch."""
    import importlib

    import ray.train
    import tensorflow as tf

    from pseudolabel import keras_patches

    keras_patches.apply()
    os.chdir(config["cwd"])
    os.environ.update(config["env"])
    global _resume_hint
    _resume_hint = Path(config["resume_hint"])
    # Created first, before any TensorFlow op (TF_CONFIG was set by Ray Train).
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    rank = ray.train.get_context().get_world_rank()
    module, qualname = config["function"]
    train = getattr(importlib.import_module(module), qualname)
    arguments = dict(config["arguments"])
    scratch = None
    uri = config["tracking_uri"]
    if rank != 0:
        scratch = Path(tempfile.mkdtemp(prefix=f"pseudolabel-worker{rank}-"))
        arguments["paths"] = _scratch_paths(arguments["paths"], scratch, arguments["role"])
        uri = f"sqlite:///{scratch / 'mlflow.db'}"
    os.environ["MLFLOW_TRACKING_URI"] = uri  # tracking.use_store reads it (it wins over cfg)
    try:
        with strategy.scope():
            train(**arguments)
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


# The project's <models>/.resume folder (set in each worker): what a refused state names.
_resume_hint: Path | None = None


def share_state(state) -> None:
    """Make this Ray Train worker's training state (a resume.TrainingState) the run's: its
    folder starts as the run's latest checkpoint (ray.train.get_checkpoint: after a restart, or
    from the run's storage when the driver was killed), or empty with none, so that every worker
    starts from the same epoch; and each save is reported (ray.train.report, which every worker
    calls once an epoch) with the chief's folder as the checkpoint. The chief keeps the MLflow
    run id it holds; the other workers, whose runs go to a scratch store, drop it."""
    import ray.train

    rank = ray.train.get_context().get_world_rank()
    if _resume_hint is not None:
        state.hint = _resume_hint
    checkpoint = ray.train.get_checkpoint()
    shutil.rmtree(state.folder, ignore_errors=True)
    if checkpoint is not None:
        with checkpoint.as_directory() as source:
            _copy_state(Path(source), state.folder, keep_run=rank == 0)
        log.info("worker %d: training state restored from %s", rank, checkpoint.path)

    def report(folder: Path, saved: dict) -> None:
        ray.train.report(
            {"epoch": saved["epoch"]},
            checkpoint=ray.train.Checkpoint.from_directory(str(folder)) if rank == 0 else None,
            delete_local_checkpoint_after_upload=False,  # the state folder stays
        )

    state.on_save = report


def _copy_state(source: Path, folder: Path, keep_run: bool) -> None:
    """A checkpoint's state files into `folder`: the arrays first, state.json last."""
    from pseudolabel.atomic import write_text_atomic

    folder.mkdir(parents=True, exist_ok=True)
    for arrays in source.glob("variables-*.npz"):
        shutil.copyfile(arrays, folder / arrays.name)
    state = json.loads((source / resume.STATE).read_text(encoding="utf-8"))
    if not keep_run:
        state.pop("run_id", None)
        state.pop("pending", None)
    write_text_atomic(folder / resume.STATE, json.dumps(state, indent=1))


def _scratch_paths(paths, scratch: Path, name: str):
    """`paths` whose outputs (models, metrics, plots) are under `scratch`; every input (the
    images, the merged set, the CSV, the teacher a student starts from) is read where the chief
    reads it. `name`: the model being trained, written under `scratch` whatever it is."""
    from dataclasses import dataclass

    from pseudolabel.paths import Paths

    @dataclass(frozen=True)
    class ScratchPaths(Paths):
        scratch: Path = Path("scratch")

        @property
        def models(self) -> Path:
            return self.scratch / "models"

        @property
        def metrics(self) -> Path:
            return self.scratch / "metrics"

        @property
        def plots(self) -> Path:
            return self.scratch / "plots"

    return ScratchPaths(
        root=paths.root,
        data_root=paths.data_root,
        round_number=paths.round_number,
        teacher_model=None if name == "teacher" else paths.model("teacher"),
        first_round_root=paths.first_round_root,
        scratch=scratch,
    )
