"""pseudolabel.keras_patches: each fix is still needed, and both together make a two-worker
MultiWorkerMirroredStrategy train. Two real worker processes on localhost (TF_CONFIG), a tiny
model: the test that expects Keras's error fails once a Keras release fixes that bug, saying
the fix can be dropped."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import SRC, free_port

_WORKER = """
import json, os, sys

index, ports, fixes = int(sys.argv[1]), sys.argv[2].split(","), sys.argv[3].split(",")
os.environ["TF_CONFIG"] = json.dumps({
    "cluster": {"worker": [f"localhost:{port}" for port in ports]},
    "task": {"type": "worker", "index": index},
})
import numpy as np
import tensorflow as tf
import keras

from pseudolabel import keras_patches

strategy = tf.distribute.MultiWorkerMirroredStrategy()
for fix in fixes:
    if fix:
        getattr(keras_patches, fix)()
keras.utils.set_random_seed(0)
with strategy.scope():
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, activation="softmax")])
    model.compile("sgd", "categorical_crossentropy", metrics=["accuracy"])
x = np.random.default_rng(0).random((64, 4)).astype("float32")
y = np.eye(2, dtype="float32")[np.arange(64) % 2]
try:
    history = model.fit(tf.data.Dataset.from_tensor_slices((x, y)).batch(8), epochs=1, verbose=0)
    weights = [w.tolist() for w in model.get_weights()]
    print("RESULT " + json.dumps({"loss": history.history["loss"], "weights": weights}))
except Exception as exc:
    print("RESULT " + json.dumps({"error": f"{type(exc).__name__}: {exc}"}))
sys.stdout.flush()
os._exit(0)  # a worker whose peer failed would wait in its collectives
"""


def _train_two_workers(fixes: list[str]) -> list[dict]:
    """Each worker's RESULT: its loss and weights, or the error its fit raised."""
    ports = f"{free_port()},{free_port()}"
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", _WORKER, str(i), ports, ",".join(fixes)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )  # fmt: skip
        for i in range(2)
    ]
    results = []
    try:
        for worker in workers:
            out, _ = worker.communicate(timeout=300)
            lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
            assert lines, f"a worker printed no result: {out[-2000:]}"
            results.append(json.loads(lines[-1][len("RESULT ") :]))
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
    return results


def test_keras_still_converts_the_first_distributed_batch_to_a_tensor():
    """keras_patches.build_from_a_local_batch: without it Keras's symbolic build fails."""
    results = _train_two_workers([])
    errors = [r.get("error", "") for r in results]
    assert any("Attempt to convert a value (PerReplica" in e for e in errors), (
        f"Keras no longer fails here ({errors}): drop keras_patches.build_from_a_local_batch"
    )


def test_keras_still_reduces_scalar_metrics_along_axis_0():
    """keras_patches.reduce_scalar_metrics: with the build fixed, the step's metrics fail."""
    results = _train_two_workers(["build_from_a_local_batch"])
    errors = [r.get("error", "") for r in results]
    assert any("Invalid reduction dimension 0 for input with 0 dimensions" in e for e in errors), (
        f"Keras no longer fails here ({errors}): drop keras_patches.reduce_scalar_metrics"
    )


def test_with_both_fixes_two_workers_train_the_same_model():
    results = _train_two_workers(["build_from_a_local_batch", "reduce_scalar_metrics"])
    assert all("error" not in r for r in results), results
    assert results[0]["weights"] == results[1]["weights"]  # mirrored: one model
    assert results[0]["loss"] == results[1]["loss"]  # averaged over both workers' batches
