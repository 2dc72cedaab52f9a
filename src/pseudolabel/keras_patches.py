"""Two fixes to Keras 3's TensorFlow trainer (3.15) under a MultiWorkerMirroredStrategy of more
than one worker: train.strategy=multi_worker applies them in its Ray Train workers only
(strategies._worker_loop), never in a one-process run.

Each fix has a test (tests/test_keras_patches.py) that runs two real workers on localhost
without it and expects Keras's error: once a Keras release fixes the bug, that test fails, and
the fix can go.
"""

from __future__ import annotations


def apply() -> None:
    """Both fixes (idempotent)."""
    build_from_a_local_batch()
    reduce_scalar_metrics()


def build_from_a_local_batch() -> None:
    """Keras builds the model symbolically from the first data batch, which under a
    MultiWorkerMirroredStrategy is a PerReplica value that it then tries to convert to a
    tensor (ValueError: "Attempt to convert a value (PerReplica:...) with an unsupported type").
    Only the batch's shapes are needed: the first local replica's batch is used."""
    import tensorflow as tf
    from keras import tree
    from keras.src.backend.tensorflow import trainer

    if getattr(trainer.TensorFlowTrainer, "_pseudolabel_local_build", False):
        return

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

    trainer.TensorFlowTrainer._maybe_symbolic_build = symbolic_build
    trainer.TensorFlowTrainer._pseudolabel_local_build = True


def reduce_scalar_metrics() -> None:
    """Keras averages each step's scalar metrics over the replicas with axis=0, which a
    multi-worker strategy refuses on a scalar; they are averaged with axis=None, as one
    worker's replicas are."""
    from keras import tree
    from keras.src.backend.tensorflow import trainer

    if getattr(trainer, "_pseudolabel_scalar_reduce", False):
        return
    reduce = trainer.reduce_per_replica

    def reduce_per_replica(values, strategy, reduction):
        if reduction in ("auto", "mean") and trainer._collective_all_reduce_multi_worker(strategy):
            return tree.map_structure(lambda v: strategy.reduce("MEAN", v, axis=None), values)
        return reduce(values, strategy, reduction)

    trainer.reduce_per_replica = reduce_per_replica
    trainer._pseudolabel_scalar_reduce = True
