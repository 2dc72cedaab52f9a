"""The consistency method's pieces as small functions of tensors, one per idea of the papers.

`consistency.ConsistencyModel.train_step` is a thin shell that calls these in order and keeps
their state (the running class distribution, each unlabeled image's last confident class) in
its variables. Each function takes plain tensors and numbers, has no state of its own, and is
tested on hand-made tensors against values worked out from the papers' formulas
(tests/test_method.py). A new method (SoftMatch's weights and FreeMatch's thresholds were
the last) is one more function here and one call in the shell.

| conf key (student.consistency.*) | function |
|---|---|
| `threshold` (FixMatch's tau) | `fixed_thresholds` |
| `flexible` (FlexMatch) | `flexmatch_class_thresholds`, `remember_confident` |
| `mask: softmatch`, `mask_momentum` | `running_mean`, `batch_variance`, `softmatch_weights` |
| `mask: freematch`, `mask_momentum` | `running_mean`, `freematch_class_thresholds` |
| `target_ema` (Mean Teacher's targets) | `mean_teacher_momentum`, `running_mean` |
| `distribution_alignment`, `alignment_momentum` | `running_mean`, `aligned` |
| `weight`, `rampup` | `rampup` |
| `teacher_weight`, `teacher_decay` | `teacher_weight` |
| `warmup_steps`, `warmup_weight` (the rotation warm-up) | `rotations` |
| (the loss) | `masked_cross_entropy` |
"""

from __future__ import annotations

import keras
import tensorflow as tf


def running_mean(mean: tf.Tensor, batch_mean: tf.Tensor, momentum: float) -> tf.Tensor:
    """An exponential moving average's next value: momentum * mean + (1 - momentum) * batch."""
    return momentum * mean + (1.0 - momentum) * batch_mean


def mean_teacher_momentum(step: tf.Tensor, momentum: float) -> tf.Tensor:
    """The weight average's momentum at step `step` (0 first), warmed up as Mean Teacher's
    (Tarvainen and Valpola 2017, their code): min(momentum, 1 - 1 / (step + 1)). 0 at the first
    step (the average is set to the weights), then the plain mean of the weights so far until
    that reaches `momentum`."""
    return tf.minimum(momentum, 1.0 - 1.0 / (step + 1.0))


def aligned(probs: tf.Tensor, prior: tf.Tensor, model_mean: tf.Tensor) -> tf.Tensor:
    """ReMixMatch's distribution alignment (Berthelot et al. 2020, eq. 1): each prediction
    times prior / (the running mean of the predictions), renormalised to sum to 1."""
    probs = probs * prior / model_mean
    return probs / tf.reduce_sum(probs, -1, keepdims=True)


def fixed_thresholds(confidence: tf.Tensor, threshold: float) -> tf.Tensor:
    """FixMatch: the same threshold tau for every image."""
    return tf.fill(tf.shape(confidence), threshold)


def flexmatch_class_thresholds(
    selected: tf.Tensor, threshold: float, num_classes: int
) -> tf.Tensor:
    """FlexMatch's per-class thresholds (Zhang et al. 2021, eqs. 6, 7 and 11, with the
    threshold warm-up): sigma(c) = the unlabeled images whose last confident prediction was c
    (`selected`: one class per unlabeled image, -1 for never confident yet); the learning
    effect beta(c) = sigma(c) / max(max_c sigma, the never-confident count); the threshold
    tau * M(beta(c)) with the convex mapping M(x) = x / (2 - x)."""
    counts = tf.math.bincount(
        tf.maximum(selected, 0),
        weights=tf.cast(selected >= 0, tf.float32),
        minlength=num_classes,
        maxlength=num_classes,
    )
    unused = tf.reduce_sum(tf.cast(selected < 0, tf.float32))
    learnt = counts / tf.maximum(tf.maximum(tf.reduce_max(counts), unused), 1.0)
    return threshold * (learnt / (2.0 - learnt))


def remember_confident(
    selected: tf.Tensor, index: tf.Tensor, pseudo: tf.Tensor, confident: tf.Tensor
) -> tf.Tensor:
    """FlexMatch's bookkeeping: `selected` with the images at `index` whose prediction was
    `confident` (above the fixed threshold) now remembered as their class `pseudo`."""
    return tf.tensor_scatter_nd_update(
        selected,
        tf.expand_dims(tf.boolean_mask(index, confident), 1),
        tf.boolean_mask(pseudo, confident),
    )


def batch_variance(values: tf.Tensor) -> tf.Tensor:
    """The unbiased variance of a batch of numbers (n / (n - 1) times the mean squared
    deviation; 0 for a batch of one), as SoftMatch's running estimate takes it."""
    n = tf.cast(tf.size(values), values.dtype)
    mean = tf.reduce_mean(values)
    return tf.reduce_sum(tf.square(values - mean)) / tf.maximum(n - 1.0, 1.0)


def softmatch_weights(
    confidence: tf.Tensor, mean: tf.Tensor, variance: tf.Tensor, n_sigma: float = 2.0
) -> tf.Tensor:
    """SoftMatch's sample weights (Chen et al. 2023, eq. 9, as USB computes them): 1 for an
    image whose confidence reaches the running mean confidence mu, below it a Gaussian of the
    shortfall, exp(-(conf - mu)^2 / (2 var / n_sigma^2)): nothing is cut, the doubtful count
    less. `mean` and `variance` are the running estimates of the batches' confidences."""
    shortfall = tf.minimum(confidence - mean, 0.0)
    return tf.exp(-tf.square(shortfall) / (2.0 * variance / n_sigma**2))


def freematch_class_thresholds(global_threshold: tf.Tensor, class_mean: tf.Tensor) -> tf.Tensor:
    """FreeMatch's self-adaptive thresholds (Wang et al. 2023, eqs. 5-6): the global tau_t
    (the running mean of the batches' top confidence) scaled per class by MaxNorm of the
    running mean prediction p~_t(c): tau_t * p~_t(c) / max_c p~_t(c). They rise as the
    model grows sure, whatever the size of the unlabeled folder."""
    return global_threshold * class_mean / tf.reduce_max(class_mean)


def masked_cross_entropy(
    pseudo: tf.Tensor, probs: tf.Tensor, mask: tf.Tensor, num_classes: int
) -> tf.Tensor:
    """FixMatch's unlabeled loss: the mean over the batch (masked images count as 0; a float
    mask weighs each image, SoftMatch's) of the cross-entropy of the hard pseudo-label `pseudo`
    and the strong view's `probs`."""
    ce = keras.losses.categorical_crossentropy(tf.one_hot(pseudo, num_classes), probs)
    return tf.reduce_mean(mask * ce)


def rampup(step: tf.Tensor, rampup_steps: float) -> tf.Tensor:
    """The unlabeled term's weight factor: rises linearly from 0 at step 0 to 1 at
    `rampup_steps`, then stays 1."""
    return tf.minimum(1.0, step / rampup_steps)


def teacher_weight(step: tf.Tensor, total_steps: float, weight: float, decay: bool):
    """The teacher term's weight: `weight`, falling linearly to 0 by the last step if `decay`."""
    if not decay:
        return weight
    return weight * tf.maximum(0.0, 1.0 - step / total_steps)


def rotations(images: tf.Tensor, turns: int = 4) -> tuple[tf.Tensor, tf.Tensor]:
    """RotNet's pretext batch (Gidaris et al. 2018): image i of `images` (N, H, W, C) turned
    counter-clockwise by k = i mod `turns` steps of 360 / `turns` degrees; returns the turned
    images and each one's k (its class in the pretext task). `turns` 4 (quarter turns) for
    square images, 2 (0 and 180 degrees, which keep the shape) for the others. The batches
    are shuffled, so each k falls on random images."""
    if turns not in (2, 4):
        raise ValueError(f"turns={turns}: use 4 (square images) or 2")
    k = tf.range(tf.shape(images)[0]) % turns
    out = images
    for turn in range(1, turns):
        where = tf.reshape(tf.equal(k, turn), (-1, 1, 1, 1))
        out = tf.where(where, tf.image.rot90(images, turn * 4 // turns), out)
    return out, k
