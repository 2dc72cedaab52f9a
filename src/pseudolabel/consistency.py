"""The consistency student: every step learns from labeled images, from the teacher's
probabilities (outputs/data.csv) and from every unlabeled image through its own prediction.

One training step (a `keras.Model.train_step`, driven by `fit` and its callbacks, as in keras-io's
AdaMatch example) sees a batch of B labeled images and mu*B unlabeled ones and minimises

    CE(y, f(weak(x_l)))                                          labeled, label-smoothed
  + w_t(t) * CE(teacher(x_u), f(strong(x_u)))                    the teacher's soft targets
  + w_u(t) * mask * CE(argmax p~, f(strong(x_u)))                FixMatch / FlexMatch

where p~ is the student's own prediction on a weak view (no gradient; or, with `target_ema`,
that of a moving average of its weights: Mean Teacher's targets), aligned to the labeled class
distribution (ReMixMatch's distribution alignment), and mask keeps the images whose p~ reaches
the confidence threshold, per class scaled by how well that class is learnt (FlexMatch's
curriculum; `mask: threshold`), or weighs each image by its confidence against the running
mean (SoftMatch) or against self-adaptive thresholds (FreeMatch). w_u ramps up from 0 over the
first steps; w_t can decay to 0 as the student outgrows the teacher. The evaluated model keeps
the optimiser's moving average of the weights (EMA, `train.ema`). With `warmup_steps` the
training starts with a short self-supervised warm-up (RotationWarmup: the unlabeled images'
rotations beside the labeled loss).

Each piece of that loss is a function of src/pseudolabel/method.py (its docstring maps every
student.consistency key to one); this module holds the data streams and the keras.Model shell
that calls them and keeps their state. Only the plain classifier is saved: the wrapper exists
while training.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import keras
import numpy as np
import tensorflow as tf

from pseudolabel import method
from pseudolabel.data import decoded
from pseudolabel.data.images import AUTOTUNE, decode_image, fits_in_memory

log = logging.getLogger(__name__)

# RandAugment picks its ops once per call: the strong view is made in this many slices of the
# batch, so that a batch sees several op combinations.
STRONG_SLICES = 8


def _shuffled(
    paths: Sequence[str], side: tuple[np.ndarray, ...], image_size, channels: int, seed: int
) -> tf.data.Dataset:
    """Endless shuffled (uint8 image, *side) elements, `side` being per-image arrays.

    When the images fit in memory (data.images.CACHE_BYTES) they are read once in order (from
    ingest's decoded copy, data.decoded, or decoded), kept, and shuffled. Otherwise the shuffle
    buffer holds names (or rows of the decoded copy), not images, and each image is read as it is
    drawn: memory stays flat however many images there are."""
    rows = decoded.find(paths, image_size, channels)
    side_ds = tf.data.Dataset.from_tensor_slices(side)
    n = len(paths)
    if fits_in_memory(n, image_size, channels, 1):
        if rows is not None:
            images = rows.dataset()
        else:
            images = tf.data.Dataset.from_tensor_slices(list(paths)).map(
                lambda p: _uint8(decode_image(p, image_size, channels)),
                num_parallel_calls=AUTOTUNE,
            )
        ds = tf.data.Dataset.zip((images.cache(), side_ds))
        ds = ds.shuffle(n, seed=seed, reshuffle_each_iteration=True).repeat()
        return ds.map(lambda x, s: (x, *s))
    size = n * math.prod(image_size) * channels
    log.info("%d images (%.1f GB): not kept in memory, read as drawn", n, size / 1e9)
    source = np.arange(n) if rows is not None else list(paths)
    if rows is not None:
        read = rows.image
    else:
        read = lambda p: _uint8(decode_image(p, image_size, channels))  # noqa: E731
    ds = tf.data.Dataset.zip((tf.data.Dataset.from_tensor_slices(source), side_ds))
    ds = ds.shuffle(n, seed=seed, reshuffle_each_iteration=True).repeat()
    return ds.map(lambda p, s: (read(p), *s), num_parallel_calls=AUTOTUNE)


def _uint8(image: tf.Tensor) -> tf.Tensor:
    return tf.cast(tf.round(image), tf.uint8)


def labeled_stream(
    paths: Sequence[str],
    labels: np.ndarray,
    num_classes: int,
    image_size,
    channels: int,
    batch_size: int,
    seed: int,
) -> tf.data.Dataset:
    """Endless shuffled (image, one-hot) batches."""
    targets = np.eye(num_classes, dtype=np.float32)[labels]
    ds = _shuffled(paths, (targets,), image_size, channels, seed)
    return ds.batch(batch_size, drop_remainder=True)


def unlabeled_stream(
    paths: Sequence[str],
    teacher: np.ndarray,
    accepted: np.ndarray,
    truth: np.ndarray,
    image_size,
    channels: int,
    batch_size: int,
    seed: int,
) -> tf.data.Dataset:
    """Endless shuffled batches of (image, the teacher's probabilities, 1.0 where merge accepted
    the image (the teacher term's weight), the true class or -1 (benchmarks only), index)."""
    side = (
        teacher.astype(np.float32),
        accepted.astype(np.float32),
        truth.astype(np.int32),
        np.arange(len(paths), dtype=np.int32),
    )
    ds = _shuffled(paths, side, image_size, channels, seed + 1)
    return ds.batch(batch_size, drop_remainder=True)


def training_stream(labeled: tf.data.Dataset, unlabeled: tf.data.Dataset | None):
    """What `ConsistencyModel.fit` takes: labeled batches zipped with unlabeled ones."""
    if unlabeled is None:
        return labeled.prefetch(AUTOTUNE)
    return tf.data.Dataset.zip((labeled, unlabeled)).prefetch(AUTOTUNE)


# --- under a tf.distribute strategy (train.strategy mirrored or multi_worker) -------------------
# A train_step runs once per replica on its share of the global batch. The state variables
# (p_model, selected) are mirrored: every replica computes the same update from what all the
# replicas saw, and the first replica's is kept (aggregation only_first_replica). Outside a
# strategy (or with one replica) these are no-ops.


def _replicas() -> int:
    return tf.distribute.get_strategy().num_replicas_in_sync


def _across_replicas(value: tf.Tensor) -> tf.Tensor:
    """`value` summed over the replicas."""
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return value
    return context.all_reduce(tf.distribute.ReduceOp.SUM, value)


def _gathered(*values: tf.Tensor) -> tuple[tf.Tensor, ...]:
    """`values` (int32, per image: the same length) concatenated over the replicas, each
    replica's padded with zeros to the longest share. An all-reduce of each replica's values
    at its own offset: ReplicaContext.all_gather fails under MultiWorkerMirroredStrategy
    (TensorFlow 2.21: "destinations can not be empty")."""
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return values
    replicas = context.num_replicas_in_sync
    me = tf.one_hot(context.replica_id_in_sync_group, replicas, dtype=tf.int32)
    size = tf.shape(values[0])[0]
    longest = tf.reduce_max(context.all_reduce(tf.distribute.ReduceOp.SUM, me * size))
    offset = tf.cast(context.replica_id_in_sync_group, tf.int32) * longest
    places = tf.expand_dims(offset + tf.range(size), 1)
    return tuple(
        context.all_reduce(
            tf.distribute.ReduceOp.SUM,
            tf.scatter_nd(places, value, tf.expand_dims(replicas * longest, 0)),
        )
        for value in values
    )


class _Shell(keras.Model):
    """What the two training wrappers of `classifier` share: their own losses and metrics
    (`self.trackers`), built layers, and the classifier as what they call and predict with."""

    classifier: keras.Model
    trackers: dict[str, keras.metrics.Mean]

    def compile(self, optimizer="rmsprop", loss=None, metrics=None, **kwargs):
        """Only the optimizer (and Keras's options) are kept: the losses and the metrics are
        this model's own (train_step, test_step). A compiled loss or metric would be built by
        Keras's symbolic build under a strategy, on the training batch's structure."""
        super().compile(optimizer=optimizer, **kwargs)

    def build(self, input_shape=None):
        """Nothing to build: the classifier is built (and the warm-up's head with it), the
        views build when first called."""
        self.built = True

    def call(self, inputs, training=False):
        if isinstance(inputs, (tuple, list)):  # a training batch's x (symbolic build): images
            inputs = inputs[0]
        return self.classifier(inputs, training=training)

    @property
    def metrics(self):
        return list(self.trackers.values())

    @staticmethod
    def _view(layers_: Sequence[keras.Layer], images: tf.Tensor, slices: int = 1) -> tf.Tensor:
        x = tf.cast(images, tf.float32)
        if not layers_:
            return x
        parts = tf.split(x, slices) if slices > 1 else [x]
        out = []
        for part in parts:
            for layer in layers_:
                part = layer(part, training=True)
            out.append(part)
        return tf.concat(out, 0) if len(out) > 1 else out[0]

    def _total_and_scaled(self, loss: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """The step's loss with the classifier's own (regularisers), and what this replica
        takes the gradient of: replicas' gradients are summed, so each gives its share (one
        replica: undivided), scaled by the optimizer (mixed precision's loss scale)."""
        loss += sum(self.classifier.losses) if self.classifier.losses else 0.0
        share = loss / _replicas() if _replicas() > 1 else loss
        return loss, self.optimizer.scale_loss(share)


class ConsistencyModel(_Shell):
    """Trains `classifier` (raw pixels -> probabilities) with the loss of the module docstring.

    Without unlabeled batches (`training_stream(labeled, None)`) it is the labeled-only
    baseline with the same weak view, schedule and EMA."""

    def __init__(
        self,
        classifier: keras.Model,
        weak: Sequence[keras.Layer],
        strong: Sequence[keras.Layer],
        settings,
        num_classes: int,
        num_unlabeled: int,
        prior: np.ndarray,
        total_steps: int,
        label_smoothing: float = 0.0,
        **kwargs,
    ):
        super().__init__(name=f"{classifier.name}_consistency", **kwargs)
        self.classifier = classifier
        self.weak = list(weak)
        self.strong = list(strong)
        self.threshold = float(settings.threshold)
        self.flexible = bool(settings.flexible)
        self.unlabeled_weight = float(settings.weight)
        self.teacher_weight = float(settings.teacher_weight)
        self.teacher_decay = bool(settings.teacher_decay)
        self.align = bool(settings.distribution_alignment)
        self.momentum = float(settings.alignment_momentum)
        self.mask = str(settings.mask)  # threshold (FixMatch/FlexMatch), softmatch, freematch
        self.mask_momentum = float(settings.mask_momentum)
        self.target_ema = float(settings.target_ema)
        self.rampup_steps = max(1.0, float(settings.rampup) * total_steps)
        self.total_steps = float(max(1, total_steps))
        self.num_classes = num_classes
        self.smoothing = label_smoothing
        self.prior = tf.constant(prior / prior.sum(), tf.float32)
        # Running mean of the student's weak-view predictions (distribution alignment).
        self.p_model = self.add_weight(
            shape=(num_classes,),
            initializer=keras.initializers.Constant(prior / prior.sum()),
            trainable=False,
            aggregation="only_first_replica",  # every replica assigns the same value
            name="p_model",
        )
        # FlexMatch: each unlabeled image's last confident class (-1: never confident yet).
        self.selected = self.add_weight(
            shape=(max(1, num_unlabeled),),
            initializer=keras.initializers.Constant(-1),
            dtype="int32",
            trainable=False,
            aggregation="only_first_replica",
            name="selected",
        )
        # SoftMatch's running mean and variance of the top confidence, FreeMatch's running top
        # confidence (its global threshold) and mean prediction, started as the papers do: at
        # 1 / classes, a variance of 1, the uniform distribution.
        uniform = np.full(num_classes, 1.0 / num_classes, np.float32)
        self.confidence_stats = self.add_weight(
            shape=(2,),
            initializer=keras.initializers.Constant([1.0 / num_classes, 1.0]),
            trainable=False,
            aggregation="only_first_replica",
            name="confidence_stats",
        )
        self.class_mean = self.add_weight(
            shape=(num_classes,),
            initializer=keras.initializers.Constant(uniform),
            trainable=False,
            aggregation="only_first_replica",
            name="class_mean",
        )
        # target_ema: the moving average of the classifier's weights whose weak-view prediction
        # makes the targets (Mean Teacher's), one variable per trainable weight; none for the
        # labeled-only baseline (no unlabeled images) or with target_ema 0.
        self.target_weights = []
        if self.target_ema and num_unlabeled:
            self.target_weights = [
                self.add_weight(
                    shape=variable.shape,
                    initializer="zeros",
                    dtype=variable.dtype,
                    trainable=False,
                    aggregation="only_first_replica",
                    name=f"target_{i}",
                )
                for i, variable in enumerate(classifier.trainable_variables)
            ]
        names = ("loss", "accuracy", "loss_labeled", "loss_unlabeled", "loss_teacher")
        names += ("mask_rate", "pseudo_precision", "unlabeled_weight", "mean_threshold")
        self.trackers = {name: keras.metrics.Mean(name=name) for name in names}

    def _ce(self, targets: tf.Tensor, probs: tf.Tensor) -> tf.Tensor:
        """Per-image cross-entropy of probability targets."""
        return keras.losses.categorical_crossentropy(targets, probs)

    @staticmethod
    def _batch_mean(values: tf.Tensor) -> tf.Tensor:
        """The mean over the global batch's first axis, the same on every replica."""
        if _replicas() == 1:  # (one replica: the very same ops as always, bit for bit)
            return tf.reduce_mean(values, 0)
        total = _across_replicas(tf.reduce_sum(values, 0))
        return total / _across_replicas(tf.cast(tf.shape(values)[0], values.dtype))

    def _adaptive_mask(self, confidence: tf.Tensor, p_weak: tf.Tensor, pseudo: tf.Tensor):
        """SoftMatch's weights or FreeMatch's thresholds from their running statistics,
        updated with this batch first (as USB does); returns the mask and the thresholds to
        report (SoftMatch: its running mean, below which the weights fall)."""
        m = self.mask_momentum
        stats = self.confidence_stats.value
        mean = method.running_mean(stats[0], self._batch_mean(confidence), m)
        if self.mask == "softmatch":
            if _replicas() == 1:
                spread = method.batch_variance(confidence)
            else:  # the global batch's unbiased variance from its sums
                n = _across_replicas(tf.cast(tf.size(confidence), confidence.dtype))
                total = _across_replicas(tf.reduce_sum(confidence))
                squares = _across_replicas(tf.reduce_sum(tf.square(confidence)))
                spread = (squares - total * total / n) / tf.maximum(n - 1.0, 1.0)
            variance = method.running_mean(stats[1], spread, m)
            self.confidence_stats.assign(tf.stack([mean, variance]))
            weights = method.softmatch_weights(confidence, mean, variance)
            return weights, tf.fill(tf.shape(confidence), mean)
        class_mean = method.running_mean(self.class_mean.value, self._batch_mean(p_weak), m)
        self.confidence_stats.assign(tf.stack([mean, stats[1]]))
        self.class_mean.assign(class_mean)
        limits = tf.gather(method.freematch_class_thresholds(mean, class_mean), pseudo)
        return tf.cast(confidence >= limits, tf.float32), limits

    def _thresholds(self, confidence: tf.Tensor, pseudo: tf.Tensor, index: tf.Tensor):
        """Each image's threshold: FlexMatch's of its class (remembering this batch's
        confident images first), or FixMatch's one tau."""
        if not self.flexible:
            return method.fixed_thresholds(confidence, self.threshold)
        per_class = method.flexmatch_class_thresholds(
            self.selected.value, self.threshold, self.num_classes
        )
        limits = tf.gather(per_class, pseudo)
        # Every replica's confident images (each sees its share of the batch) land on all.
        sure = tf.cast(confidence > self.threshold, tf.int32)  # all_gather takes no bool
        seen, classes, sure = _gathered(index, pseudo, sure)
        self.selected.assign(
            method.remember_confident(self.selected.value, seen, classes, sure > 0)
        )
        return limits

    def _weak_prediction(self, images: tf.Tensor) -> tf.Tensor:
        """The prediction the targets come from, in inference mode (no dropout noise,
        BatchNorm's moving statistics): the classifier's current weights, or (target_ema)
        their moving average, first moved towards the weights the last step left, then
        called through Keras's stateless_call. The momentum warms up as Mean Teacher's does,
        min(target_ema, 1 - 1 / (t + 1)) at step t: the plain mean of the weights so far until
        that reaches target_ema, so the first step's weights (a head not yet trained) fade
        as 1 / (t + 1), not as target_ema ** t."""
        if not self.target_weights:
            return self.classifier(images, training=False)
        step = tf.cast(self.optimizer.iterations, tf.float32)
        momentum = method.mean_teacher_momentum(step, self.target_ema)
        live = self.classifier.trainable_variables
        for average, variable in zip(self.target_weights, live, strict=True):
            average.assign(method.running_mean(average.value, variable.value, momentum))
        weights = [average.value for average in self.target_weights]
        fixed = [variable.value for variable in self.classifier.non_trainable_variables]
        probs, _ = self.classifier.stateless_call(weights, fixed, images, training=False)
        return probs

    def _masked_pseudo_loss(self, p_weak, p_strong, truth, index):
        """FixMatch/FlexMatch (or SoftMatch, FreeMatch) on the aligned weak prediction
        (src/pseudolabel/method.py); returns the loss and the mask."""
        if self.align:  # the mean over the global batch, the same on every replica
            mean = self._batch_mean(p_weak)
            self.p_model.assign(method.running_mean(self.p_model.value, mean, self.momentum))
            p_weak = method.aligned(p_weak, self.prior, self.p_model.value)
        confidence = tf.reduce_max(p_weak, -1)
        pseudo = tf.argmax(p_weak, -1, output_type=tf.int32)
        if self.mask in ("softmatch", "freematch"):
            mask, limits = self._adaptive_mask(confidence, p_weak, pseudo)
        else:
            limits = self._thresholds(confidence, pseudo, index)
            mask = tf.cast(confidence >= limits, tf.float32)
        loss = method.masked_cross_entropy(pseudo, p_strong, mask, self.num_classes)
        known = tf.cast(truth >= 0, tf.float32) * mask
        correct = tf.cast(tf.equal(pseudo, truth), tf.float32)
        self.trackers["pseudo_precision"].update_state(correct, sample_weight=known)
        self.trackers["mean_threshold"].update_state(limits)
        return loss, mask

    def train_step(self, data):
        if isinstance(data[0], (tuple, list)):  # labeled batches zipped with unlabeled ones
            (x_l, y_l), (x_u, teacher, accepted, truth, index) = data
        else:  # the labeled-only baseline
            (x_l, y_l), x_u = data, None
        step = tf.cast(self.optimizer.iterations, tf.float32)
        n_l = tf.shape(x_l)[0]
        smoothed = y_l * (1.0 - self.smoothing) + self.smoothing / self.num_classes
        batch = [self._view(self.weak, x_l)]
        if x_u is not None:
            # The targets: a prediction on a weak view, outside the gradient.
            p_weak = self._weak_prediction(self._view(self.weak, x_u))
            batch.append(self._view(self.strong, x_u, STRONG_SLICES))
        with tf.GradientTape() as tape:
            probs = self.classifier(tf.concat(batch, 0), training=True)
            p_l = probs[:n_l]
            loss_l = tf.reduce_mean(self._ce(smoothed, p_l))
            loss = loss_l
            if x_u is not None:
                p_strong = probs[n_l:]
                loss_u, mask = self._masked_pseudo_loss(p_weak, p_strong, truth, index)
                w_u = self.unlabeled_weight * method.rampup(step, self.rampup_steps)
                w_t = method.teacher_weight(
                    step, self.total_steps, self.teacher_weight, self.teacher_decay
                )
                loss_t = tf.reduce_mean(accepted * self._ce(teacher, p_strong))
                loss = loss + w_u * loss_u + w_t * loss_t
            loss, scaled = self._total_and_scaled(loss)
        variables = self.classifier.trainable_variables
        self.optimizer.apply(tape.gradient(scaled, variables), variables)
        self.trackers["loss"].update_state(loss)
        self.trackers["loss_labeled"].update_state(loss_l)
        hits = tf.cast(tf.equal(tf.argmax(p_l, -1), tf.argmax(y_l, -1)), tf.float32)
        self.trackers["accuracy"].update_state(hits)
        if x_u is not None:
            self.trackers["loss_unlabeled"].update_state(loss_u)
            self.trackers["loss_teacher"].update_state(loss_t)
            self.trackers["mask_rate"].update_state(tf.reduce_mean(mask))
            self.trackers["unlabeled_weight"].update_state(w_u)
            return {name: tracker.result() for name, tracker in self.trackers.items()}
        return {name: self.trackers[name].result() for name in ("loss", "accuracy", "loss_labeled")}

    def test_step(self, data):
        x, y = data[:2]
        probs = self.classifier(x, training=False)
        self.trackers["loss"].update_state(tf.reduce_mean(self._ce(y, probs)))
        hits = tf.cast(tf.equal(tf.argmax(probs, -1), tf.argmax(y, -1)), tf.float32)
        self.trackers["accuracy"].update_state(hits)
        return {name: self.trackers[name].result() for name in ("loss", "accuracy")}


class RotationWarmup(_Shell):
    """consistency.warmup_steps: a short self-supervised warm-up of `classifier` before its
    consistency training, on the same streams (B labeled and mu*B unlabeled images a step):

        CE(y, f(weak(x_l)))  +  warmup_weight * CE(k, g(rot_k(weak(x_u))))

    rot_k turns each unlabeled image by k quarter turns (method.rotations) and g is a 4-way
    head on the classifier's features (the input of its `predictions` layer): RotNet's pretext
    task (Gidaris et al. 2018) on the unlabeled images, beside the labeled loss as in S4L
    (Zhai et al. 2019), so the features learn the unlabeled images' shapes without forgetting
    the classes. Only the classifier's weights go on: the head exists while warming up."""

    def __init__(
        self,
        classifier: keras.Model,
        weak: Sequence[keras.Layer],
        weight: float,
        num_classes: int,
        turns: int = 4,
        label_smoothing: float = 0.0,
        **kwargs,
    ):
        super().__init__(name=f"{classifier.name}_warmup", **kwargs)
        self.classifier = classifier
        self.weak = list(weak)
        self.weight = float(weight)
        self.num_classes = num_classes
        self.turns = turns
        self.smoothing = label_smoothing
        self.predictions = classifier.get_layer("predictions")
        self.features = keras.Model(classifier.inputs, self.predictions.input)
        self.rotation = keras.layers.Dense(
            turns, activation="softmax", dtype="float32", name="rotation"
        )
        self.rotation.build(self.predictions.input.shape)
        names = ("loss", "accuracy", "loss_labeled", "loss_rotation", "rotation_accuracy")
        self.trackers = {name: keras.metrics.Mean(name=name) for name in names}

    def train_step(self, data):
        (x_l, y_l), (x_u, *_) = data
        n_l = tf.shape(x_l)[0]
        smoothed = y_l * (1.0 - self.smoothing) + self.smoothing / self.num_classes
        turned, k = method.rotations(self._view(self.weak, x_u), self.turns)
        images = tf.concat([self._view(self.weak, x_l), turned], 0)
        with tf.GradientTape() as tape:
            features = self.features(images, training=True)
            p_l = self.predictions(features[:n_l])
            p_r = self.rotation(features[n_l:])
            loss_l = tf.reduce_mean(keras.losses.categorical_crossentropy(smoothed, p_l))
            loss_r = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(k, p_r))
            loss = loss_l + self.weight * loss_r
            loss, scaled = self._total_and_scaled(loss)
        variables = self.classifier.trainable_variables + self.rotation.trainable_variables
        self.optimizer.apply(tape.gradient(scaled, variables), variables)
        hits = tf.cast(tf.equal(tf.argmax(p_l, -1), tf.argmax(y_l, -1)), tf.float32)
        turned_right = tf.cast(tf.equal(tf.argmax(p_r, -1, output_type=tf.int32), k), tf.float32)
        for name, value in (("loss", loss), ("loss_labeled", loss_l), ("loss_rotation", loss_r)):
            self.trackers[name].update_state(value)
        self.trackers["accuracy"].update_state(hits)
        self.trackers["rotation_accuracy"].update_state(turned_right)
        return {name: tracker.result() for name, tracker in self.trackers.items()}
