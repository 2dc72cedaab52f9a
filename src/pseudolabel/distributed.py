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

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pseudolabel import predicting, ray_connect
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

    started = ray_connect.connect(address)
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
