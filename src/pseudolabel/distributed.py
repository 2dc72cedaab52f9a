"""pseudo_label.engine=ray: the teacher's raw probabilities from a Ray Data pipeline.

The sorted relative paths of the unlabeled folder go through `ray.data.from_items`; tasks read
and decode them in parallel (`decode_image`, the local pipeline's resize and channels), and a
pool of actors, each loading the teacher once (`models.io.load`, safe mode as locally, the flip
TTA wrapper when asked), returns the raw softmax of each batch (`predicting.predict_batch`,
padded to the batch size as locally). Temperature scaling, distribution alignment and
everything after happen on the driver, in the same code as the local engine
(`predicting.raw_frame` and the pseudo_label stage), so both engines write the same CSV.

Every node reads the unlabeled images and the teacher at the paths the driver sees (a shared
or replicated file system) and runs the same Python environment (docs/scale.md).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pseudolabel import predicting
from pseudolabel.data import decoded
from pseudolabel.data.images import require_images
from pseudolabel.errors import PseudoLabelError
from pseudolabel.models.io import ModelMeta

log = logging.getLogger(__name__)

# CPUs each decoding task reserves: half a core, so that a node whose cores the teacher actors
# hold in part (ray.cpus_per_actor) still has room to decode for them.
DECODE_CPUS = 0.5


def _decode(
    batch: dict[str, np.ndarray], root: str, image_size: list[int], channels: int
) -> dict[str, np.ndarray]:
    """Read and decode a batch of files on a worker; a file that cannot be decoded is dropped
    (as the local engine's `ignore_errors`), so the driver sees which are missing."""
    import tensorflow as tf

    from pseudolabel.data.images import decode_image

    paths, images = [], []
    for rel in batch["path"]:
        try:
            image = decode_image(tf.constant(os.path.join(root, str(rel))), image_size, channels)
        except Exception:  # tf.errors.InvalidArgumentError and kin: what ignore_errors drops
            continue
        paths.append(str(rel))
        images.append(image.numpy())
    empty = np.zeros((0, *image_size, channels), np.float32)
    return {
        "path": np.asarray(paths, dtype=object),
        "image": np.stack(images) if images else empty,
    }


class _Teacher:
    """One teacher replica (a Ray Data actor): the model is loaded once, in __init__."""

    def __init__(
        self, model_path: str, trust: dict[str, Any], tta: bool, batch_size: int, scorer=None
    ):
        from pseudolabel import ood
        from pseudolabel.models import io as model_io

        model, _ = model_io.load(Path(model_path), **trust)
        if scorer is not None:  # the OOD score as one more column, as the local engine's
            model = ood.scored_model(model, scorer)
        self.model = predicting.with_flip_tta(model) if tta else model
        self.batch_size = batch_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if not len(batch["path"]):
            classes = self.model.output_shape[-1]
            return {"path": batch["path"], "raw": np.zeros((0, classes), np.float32)}
        raw = predicting.predict_batch(self.model, batch["image"], self.batch_size)
        return {"path": batch["path"], "raw": raw}


def actor_count(requested: int | None, cpus_per_actor: float, cluster_cpus: float) -> int:
    """The teacher replicas to start: `requested`, or with None as many as the cluster's CPUs
    hold while leaving room for one decoding task. An actor pool that would take every CPU
    leaves the decoding tasks none, and Ray Data would wait forever: refused here instead."""
    fit = int((cluster_cpus - DECODE_CPUS) // cpus_per_actor)
    if fit < 1 or (requested is not None and requested > fit):
        asked = "" if requested is None else f"ray.actors={requested} x "
        raise PseudoLabelError(
            f"{asked}ray.cpus_per_actor={cpus_per_actor:g} leaves no CPU to decode on this Ray "
            f"cluster ({cluster_cpus:g} CPUs, {DECODE_CPUS:g} per decoding task): "
            f"use ray.actors <= {max(fit, 0)} or null, or a smaller ray.cpus_per_actor."
        )
    return fit if requested is None else requested


def _connect(address: str | None) -> bool:
    """Join the cluster at `address` (None: start a local Ray instance); True when this call
    started the connection and so must close it."""
    import ray

    if ray.is_initialized():
        return False
    ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
    return True


def _fingerprint(
    model_path: Path, meta: ModelMeta, tta: bool, relative: list[str], batch_size: int, scorer=None
) -> str:
    """What a partial Ray run depends on: the model file's bytes (the driver does not load the
    model), its input, the TTA, the OOD score's fit, the files and the batching."""
    digest = hashlib.md5()
    files = (
        sorted(p for p in model_path.rglob("*") if p.is_file())
        if model_path.is_dir()
        else [model_path]
    )
    for file in files:
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    header = [meta.class_names, meta.image_size, meta.channels, meta.input_scale, batch_size, tta]
    header.append(scorer.fingerprint() if scorer is not None else None)
    digest.update(json.dumps(header).encode())
    digest.update("\n".join(relative).encode())
    return digest.hexdigest()


def predict_folder(
    model_path: Path,
    trust: dict[str, Any],
    meta: ModelMeta,
    unlabeled_dir: Path,
    batch_size: int,
    tta: bool,
    temperature: float,
    address: str | None,
    actors: int | None,
    cpus_per_actor: float,
    partial_dir: Path | None = None,
    chunk_size: int = predicting.CHUNK_SIZE,
    scorer=None,
) -> tuple[pd.DataFrame, list[str]]:
    """predicting.predict_folder's result (rows sorted by relative path, probabilities scaled by
    `temperature`, and the relative paths that could not be decoded), computed on Ray.

    With `partial_dir`, the raw predictions are saved there as they arrive, every `chunk_size`
    images, in the local engine's chunk format; a run killed at any point and started again
    sends Ray only the files no chunk holds, and the folder is removed once the predictions are
    complete."""
    try:
        import ray  # noqa: F401  (checked before anything else)
    except ImportError:
        raise PseudoLabelError(
            "pseudo_label.engine=ray needs Ray: pip install 'pseudolabel[ray]' "
            "(or use pseudo_label.engine=local)."
        ) from None

    root = str(unlabeled_dir)
    files = [str(f) for f in require_images(unlabeled_dir, "unlabeled")]
    relative = [decoded.relative_path(f, root) for f in files]  # sorted, as the local engine's
    chunks = (
        predicting.Chunks(
            partial_dir, _fingerprint(model_path, meta, tta, relative, batch_size, scorer)
        )
        if partial_dir is not None
        else None
    )
    paths, blocks, _ = chunks.load() if chunks else ([], [], 0)
    saved = set(paths)
    todo = [rel for rel in relative if rel not in saved]
    if saved:
        log.info(
            "resuming: %d of %d images already labeled (%s)",
            len(saved),
            len(relative),
            partial_dir,
        )
    if todo:
        _label_on_ray(
            todo, root, model_path, trust, meta, batch_size, tta, address, actors, cpus_per_actor,
            chunks, chunk_size, paths, blocks, scorer,
        )  # fmt: skip
    done = set(paths)
    failed = [rel for rel in relative if rel not in done]
    if failed:
        log.warning("%d unlabeled file(s) could not be decoded and were skipped", len(failed))
    frame = predicting.raw_frame(paths, blocks, meta.class_names, temperature)
    if chunks:
        shutil.rmtree(partial_dir)
    return frame, failed


def _label_on_ray(
    todo: list[str],
    root: str,
    model_path: Path,
    trust: dict[str, Any],
    meta: ModelMeta,
    batch_size: int,
    tta: bool,
    address: str | None,
    actors: int | None,
    cpus_per_actor: float,
    chunks: predicting.Chunks | None,
    chunk_size: int,
    paths: list[str],
    blocks: list[np.ndarray],
    scorer=None,
) -> None:
    """Label `todo` on the cluster; append each batch's paths and raw softmax to `paths` and
    `blocks`, saving them to `chunks` every `chunk_size` images."""
    import ray

    pending_paths: list[str] = []
    pending: list[np.ndarray] = []

    def flush() -> None:
        if pending_paths:
            block = np.concatenate(pending)
            if chunks:
                chunks.save(pending_paths, block, 0)  # order-free: resumed by path
            paths.extend(pending_paths)
            blocks.append(block)
            pending_paths.clear()
            pending.clear()

    started = _connect(address)
    try:
        actors = actor_count(actors, cpus_per_actor, ray.cluster_resources().get("CPU", 0.0))
        log.info(
            "pseudo-label on Ray (%s): %d images, %d actor(s)",
            address or "local instance",
            len(todo),
            actors,
        )
        ds = (
            ray.data.from_items([{"path": rel} for rel in todo])
            .map_batches(
                _decode,
                fn_kwargs={
                    "root": root,
                    "image_size": list(meta.image_size),
                    "channels": meta.channels,
                },
                batch_size=batch_size,
                batch_format="numpy",
                num_cpus=DECODE_CPUS,
            )
            .map_batches(
                _Teacher,
                fn_constructor_kwargs={
                    "model_path": str(model_path),
                    "trust": trust,
                    "tta": tta,
                    "batch_size": batch_size,
                    "scorer": scorer,
                },
                batch_size=batch_size,
                batch_format="numpy",
                concurrency=actors,
                num_cpus=cpus_per_actor,
            )
        )
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            if len(batch["path"]):
                pending_paths.extend(str(p) for p in batch["path"])
                pending.append(np.asarray(batch["raw"], np.float32))
                if len(pending_paths) >= chunk_size:
                    flush()
        flush()
    finally:
        if started:
            ray.shutdown()


# --- train.strategy: mirrored and multi_worker (Ray Train) -------------------------------------
#
# stages.train._train is decorated with `with_strategy`: with strategy=auto it runs as it always
# did (nothing else happens); with mirrored it runs inside a MirroredStrategy scope; with
# multi_worker every Ray Train worker runs the same undecorated _train inside a
# MultiWorkerMirroredStrategy scope (TF_CONFIG set by Ray Train's TensorflowTrainer). Keras
# distributes each dataset itself: tf.data's auto-sharding (by data: the datasets are seeded, so
# every worker builds the same stream and keeps its share) splits each global batch of
# `train.batch_size` across the workers, so the steps per epoch and the schedule are the local
# run's. Only the chief (world rank 0) writes the model, its metadata, the history and the
# metrics at the project's paths and logs to MLflow; the other workers run the same code (every
# fit, evaluate and save step is collective) with their writes sent to a scratch folder and a
# scratch MLflow store, removed after.
#
# Fault tolerance is Ray Train's: FailureConfig(max_failures=ray.max_failures) restarts the whole
# worker group when a worker (or its node) dies, and every worker starts again from the run's
# latest checkpoint. That checkpoint is the chief's training state (pseudolabel.resume), reported
# with ray.train.report at every epoch's end (share_state); the run's storage is
# <models>/.resume/<name>.ray, beside the chief's state folder, so that a driver killed with its
# `dvc repro` resumes from there too (Ray Train restores a run from its storage and name), and
# both are removed once the model is saved.


def with_strategy(train):
    """Run `train(cfg, role, ..., paths, ...)` under `cfg[role].train.strategy`."""
    import functools
    import inspect

    signature = inspect.signature(train)

    @functools.wraps(train)
    def run(*args, **kwargs):
        arguments = signature.bind(*args, **kwargs).arguments
        strategy = arguments["cfg"][arguments["role"]].train.strategy
        if strategy == "mirrored":
            import tensorflow as tf

            with tf.distribute.MirroredStrategy().scope():
                return train(*args, **kwargs)
        if strategy == "multi_worker":
            return train_on_ray(train, arguments)
        return train(*args, **kwargs)

    return run


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
    name = arguments.get("name") or role
    train_cfg = cfg[role].train
    key = f"{role}.train.strategy=multi_worker"
    _require_ray(key)
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.tensorflow import TensorflowTrainer

    from pseudolabel import resume

    paths = arguments["paths"]
    metrics_file = Path(paths.metrics) / f"{name}.json"
    storage = Path(paths.models).resolve() / resume.FOLDER
    run_dir = storage / f"{name}.ray"  # Ray Train's run: its checkpoints, kept until saved
    started = _connect(cfg.ray.address)
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

    _patch_keras_multi_worker()
    os.chdir(config["cwd"])
    os.environ.update(config["env"])
    global _resume_hint
    _resume_hint = Path(config["resume_hint"])
    # Created first, before any TensorFlow op (TF_CONFIG was set by Ray Train).
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    rank = ray.train.get_context().get_world_rank()
    module, qualname = config["function"]
    train = getattr(importlib.import_module(module), qualname).__wrapped__
    arguments = dict(config["arguments"])
    scratch = None
    uri = config["tracking_uri"]
    if rank != 0:
        scratch = Path(tempfile.mkdtemp(prefix=f"pseudolabel-worker{rank}-"))
        name = arguments.get("name") or arguments["role"]
        arguments["paths"] = _scratch_paths(arguments["paths"], scratch, name)
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
    from pseudolabel import resume
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
        scratch=scratch,
    )


def _patch_keras_multi_worker() -> None:
    """Two fixes to Keras 3's TensorFlow trainer (3.15) under a MultiWorkerMirroredStrategy of
    more than one worker, applied in Ray Train workers only: its symbolic build reduces the
    first data batch across workers (tf.distribute refuses: only its shapes are needed, so the
    first local replica's batch is used), and it reduces the scalar metrics with axis=0 (an
    error on a scalar: they are averaged over the replicas with axis=None, as one worker's
    replicas are)."""
    from keras import tree
    from keras.src.backend.tensorflow import trainer

    if getattr(trainer, "_pseudolabel_patched", False):
        return
    import tensorflow as tf

    def symbolic_build(self, iterator=None, data_batch=None):
        if self._distribute_strategy is None:
            return
        if iterator is not None:
            for _, _, it in iterator:
                data_batch = tree.map_structure(
                    lambda x: (
                        self.distribute_strategy.experimental_local_results(x)[0]
                        if isinstance(x, tf.distribute.DistributedValues)
                        else x
                    ),
                    next(it),
                )
                break
        with self.distribute_strategy.scope():
            self._symbolic_build(data_batch=data_batch)

    reduce = trainer.reduce_per_replica

    def reduce_per_replica(values, strategy, reduction):
        if reduction in ("auto", "mean") and trainer._collective_all_reduce_multi_worker(strategy):
            return tree.map_structure(lambda v: strategy.reduce("MEAN", v, axis=None), values)
        return reduce(values, strategy, reduction)

    trainer.TensorFlowTrainer._maybe_symbolic_build = symbolic_build
    trainer.reduce_per_replica = reduce_per_replica
    trainer._pseudolabel_patched = True
