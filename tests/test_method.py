"""The consistency method's functions (src/pseudolabel/method.py) on hand-made tensors, against
values worked out by hand from the papers' formulas. No training: each test takes milliseconds."""

import math

import numpy as np
import pytest
import tensorflow as tf

from pseudolabel import method


def _np(t) -> np.ndarray:
    return np.asarray(t)


def test_running_mean_is_an_exponential_moving_average():
    mean = tf.constant([0.5, 0.5])
    batch = tf.constant([1.0, 0.0])
    np.testing.assert_allclose(_np(method.running_mean(mean, batch, 0.9)), [0.55, 0.45])
    # momentum 0: the batch's mean replaces it
    np.testing.assert_allclose(_np(method.running_mean(mean, batch, 0.0)), [1.0, 0.0])


def test_mean_teacher_momentum_warms_up_from_0_to_the_momentum():
    steps = tf.constant([0.0, 1.0, 3.0, 99.0, 1000.0])
    out = _np(method.mean_teacher_momentum(steps, 0.99))
    np.testing.assert_allclose(out, [0.0, 0.5, 0.75, 0.99, 0.99], rtol=1e-6)


def test_alignment_undoes_a_model_biased_to_one_class():
    # The model predicts class 0 twice as often as the labeled prior says: p * prior / mean.
    prior = tf.constant([0.5, 0.5])
    model_mean = tf.constant([2 / 3, 1 / 3])
    probs = tf.constant([[0.6, 0.4], [2 / 3, 1 / 3]])
    out = _np(method.aligned(probs, prior, model_mean))
    # [0.6 * 0.75, 0.4 * 1.5] = [0.45, 0.6] -> /1.05
    np.testing.assert_allclose(out[0], [0.45 / 1.05, 0.6 / 1.05], rtol=1e-6)
    # a prediction equal to the running mean becomes the prior
    np.testing.assert_allclose(out[1], [0.5, 0.5], rtol=1e-6)
    np.testing.assert_allclose(out.sum(1), [1.0, 1.0], rtol=1e-6)


def test_alignment_with_the_mean_equal_to_the_prior_changes_nothing():
    prior = tf.constant([0.2, 0.3, 0.5])
    probs = tf.constant([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
    np.testing.assert_allclose(_np(method.aligned(probs, prior, prior)), _np(probs), rtol=1e-6)


def test_fixed_thresholds_are_tau_for_every_image():
    out = _np(method.fixed_thresholds(tf.constant([0.1, 0.99, 0.5]), 0.95))
    np.testing.assert_allclose(out, [0.95, 0.95, 0.95])


def test_flexmatch_thresholds_follow_the_learning_effect():
    # 3 classes, 6 unlabeled images: class 0 confident twice, class 1 once, class 2 never,
    # 3 images never confident. sigma = [2, 1, 0]; max(max sigma = 2, unused = 3) = 3;
    # beta = [2/3, 1/3, 0]; M(x) = x / (2 - x) = [0.5, 0.2, 0]; tau * M.
    selected = tf.constant([0, 1, -1, 0, -1, -1])
    out = _np(method.flexmatch_class_thresholds(selected, 0.95, 3))
    np.testing.assert_allclose(out, [0.95 * 0.5, 0.95 * 0.2, 0.0], rtol=1e-6)


def test_flexmatch_warmup_before_anything_is_confident():
    # Nothing selected yet: beta = 0 for every class, so every threshold is 0 (FlexMatch's
    # warm-up: the never-confident count is the denominator, and it is all of them).
    out = _np(method.flexmatch_class_thresholds(tf.constant([-1, -1, -1, -1]), 0.95, 2))
    np.testing.assert_allclose(out, [0.0, 0.0])


def test_flexmatch_best_learnt_class_reaches_tau_once_all_are_selected():
    # Every image selected: the denominator is the largest class count; that class's
    # beta = 1 and M(1) = 1: the full tau; a class half as learnt: M(0.5) = 1/3.
    selected = tf.constant([0, 0, 0, 0, 1, 1])
    out = _np(method.flexmatch_class_thresholds(selected, 0.9, 2))
    np.testing.assert_allclose(out, [0.9, 0.9 / 3], rtol=1e-6)


def test_remember_confident_updates_only_the_confident_images():
    selected = tf.constant([-1, -1, 2, -1, 0])
    index = tf.constant([0, 2, 3])
    pseudo = tf.constant([1, 0, 2])
    confident = tf.constant([True, True, False])
    out = _np(method.remember_confident(selected, index, pseudo, confident))
    # image 0 now class 1, image 2 re-selected as class 0, image 3 (not confident) unchanged
    np.testing.assert_array_equal(out, [1, -1, 0, -1, 0])


def test_batch_variance_is_the_unbiased_sample_variance():
    # [0.2, 0.4, 0.9]: mean 0.5, squared deviations 0.09 + 0.01 + 0.16 = 0.26, / (3 - 1)
    assert float(method.batch_variance(tf.constant([0.2, 0.4, 0.9]))) == pytest.approx(0.13)
    assert float(method.batch_variance(tf.constant([0.7]))) == 0.0  # one image: no spread


def test_softmatch_weights_are_one_above_the_mean_and_gaussian_below():
    # mu 0.8, var 0.04, n_sigma 2: exp(-(conf - mu)^2 / (2 * 0.04 / 4)) = exp(-d^2 / 0.02)
    confidence = tf.constant([0.95, 0.8, 0.7, 0.5])
    out = _np(method.softmatch_weights(confidence, tf.constant(0.8), tf.constant(0.04)))
    expected = [1.0, 1.0, math.exp(-0.01 / 0.02), math.exp(-0.09 / 0.02)]
    np.testing.assert_allclose(out, expected, rtol=1e-5)
    # one standard deviation / n_sigma below the mean: exp(-1/2)
    below = tf.constant([0.8 - 0.1])  # sigma 0.2, / n_sigma 2 = 0.1
    out = float(method.softmatch_weights(below, tf.constant(0.8), tf.constant(0.04))[0])
    assert out == pytest.approx(math.exp(-0.5), rel=1e-5)


def test_freematch_thresholds_scale_the_global_one_by_maxnorm():
    # tau_t 0.9, running mean prediction [0.5, 0.3, 0.2]: MaxNorm [1, 0.6, 0.4]
    out = _np(method.freematch_class_thresholds(tf.constant(0.9), tf.constant([0.5, 0.3, 0.2])))
    np.testing.assert_allclose(out, [0.9, 0.54, 0.36], rtol=1e-6)
    # the papers' start, a uniform mean at 1 / classes: every class's threshold is tau_t
    out = _np(method.freematch_class_thresholds(tf.constant(0.25), tf.fill([4], 0.25)))
    np.testing.assert_allclose(out, [0.25] * 4)


def test_masked_cross_entropy_counts_masked_images_as_zero():
    probs = tf.constant([[0.8, 0.2], [0.25, 0.75], [0.5, 0.5]])
    pseudo = tf.constant([0, 1, 0])
    mask = tf.constant([1.0, 1.0, 0.0])
    loss = float(method.masked_cross_entropy(pseudo, probs, mask, 2))
    expected = (-math.log(0.8) - math.log(0.75) + 0.0) / 3  # the mean over all 3 images
    assert loss == pytest.approx(expected, rel=1e-6)
    # nothing passes the mask: no loss
    assert float(method.masked_cross_entropy(pseudo, probs, tf.zeros(3), 2)) == 0.0


def test_rampup_rises_linearly_then_stays_one():
    values = [float(method.rampup(tf.constant(s, tf.float32), 100.0)) for s in (0, 25, 100, 400)]
    assert values == pytest.approx([0.0, 0.25, 1.0, 1.0])


def test_teacher_weight_decays_to_zero_by_the_last_step():
    steps = [tf.constant(s, tf.float32) for s in (0, 50, 100, 150)]
    decayed = [float(method.teacher_weight(s, 100.0, 2.0, True)) for s in steps]
    assert decayed == pytest.approx([2.0, 1.0, 0.0, 0.0])
    assert [float(method.teacher_weight(s, 100.0, 2.0, False)) for s in steps] == [2.0] * 4


TRUTH = np.array([0, 1, 2, 0, 1, 2, -1, -1], np.int32)  # the unlabeled images' (-1: unknown)


# The shell's settings in the step tests (student.consistency's keys), each test changing some.
SETTINGS = dict(
    threshold=0.5, flexible=True, weight=1.0, teacher_weight=1.0, teacher_decay=False,
    distribution_alignment=True, alignment_momentum=0.9, rampup=0.0, mask="threshold",
    mask_momentum=0.9, target_ema=0.0,
)  # fmt: skip


def _shell(seed: int, learning_rate: float, prior, total_steps: int = 1, **settings):
    """A ConsistencyModel around a one-layer classifier (no views, plain SGD) with SETTINGS
    changed by `settings`, and a dataset of one hand-made batch: 4 labeled images, 8 unlabeled
    ones (their truth: TRUTH); returns the model, the dataset and the unlabeled images."""
    from types import SimpleNamespace

    import keras

    from pseudolabel import consistency

    keras.utils.set_random_seed(seed)
    inputs = keras.Input((2, 2, 1))
    logits = keras.layers.Dense(3)(keras.layers.Flatten()(keras.layers.Rescaling(1 / 255)(inputs)))
    classifier = keras.Model(inputs, keras.layers.Softmax()(logits))
    model = consistency.ConsistencyModel(
        classifier, [], [], SimpleNamespace(**{**SETTINGS, **settings}), 3, 8, prior, total_steps
    )
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=learning_rate))
    rng = np.random.default_rng(seed)
    x_l = rng.integers(0, 256, (4, 2, 2, 1)).astype(np.uint8)
    y_l = np.eye(3, dtype=np.float32)[[0, 1, 2, 2]]
    x_u = rng.integers(0, 256, (8, 2, 2, 1)).astype(np.uint8)
    teacher = np.full((8, 3), 1 / 3, np.float32)
    batch = (
        (x_l, y_l),
        (x_u, teacher, np.ones(8, np.float32), TRUTH, np.arange(8, dtype=np.int32)),
    )
    return model, tf.data.Dataset.from_tensors(batch), x_u


def _one_step(mask: str, momentum: float = 0.9):
    """One ConsistencyModel train_step on hand-made batches (no views, plain SGD at learning
    rate 0, distribution alignment on): the model, its history and, in numpy, the running class
    distribution and the aligned weak predictions it saw."""
    prior = np.array([1.0, 1.0, 2.0])
    model, data, x_u = _shell(0, 0.0, prior, mask=mask, mask_momentum=momentum)
    classifier = model.classifier
    p_weak = np.asarray(classifier(x_u.astype(np.float32), training=False), np.float64)
    history = model.fit(data, epochs=1, verbose=0).history
    prior = prior / prior.sum()
    p_model = 0.9 * prior + 0.1 * p_weak.mean(0)  # the running mean, started at the prior
    aligned = p_weak * prior / p_model
    aligned /= aligned.sum(1, keepdims=True)
    return model, history, p_model, aligned


def test_one_train_step_updates_the_shells_state_as_the_functions_say():
    """FlexMatch (mask: threshold): the running class distribution, the FlexMatch memory and
    the pseudo-label precision follow the formulas, computed here in numpy from the
    classifier's own predictions."""
    model, history, p_model, aligned = _one_step("threshold")
    np.testing.assert_allclose(np.asarray(model.p_model.value), p_model, rtol=1e-5)
    confident = aligned.max(1) > 0.5
    expected = np.where(confident, aligned.argmax(1), -1)
    np.testing.assert_array_equal(np.asarray(model.selected.value), expected)
    # FlexMatch's thresholds before the step: nothing selected yet, so all 0 (the warm-up):
    # every image is masked in, and the precision counts the images whose truth is known.
    pseudo = aligned.argmax(1)
    known = TRUTH >= 0
    assert history["mask_rate"][0] == pytest.approx(1.0)
    assert history["pseudo_precision"][0] == pytest.approx((pseudo == TRUTH)[known].mean())


def test_one_softmatch_step_weighs_each_target_by_the_running_statistics():
    """SoftMatch: the running mean and variance of the aligned top confidence move from the
    papers' start (1 / classes, 1) by one batch, and the mask rate is the mean of the weights
    those give; the FlexMatch memory is left alone."""
    model, history, _, aligned = _one_step("softmatch", momentum=0.5)
    confidence = aligned.max(1)
    mean = 0.5 / 3 + 0.5 * confidence.mean()
    variance = 0.5 * 1.0 + 0.5 * confidence.var(ddof=1)
    stats = np.asarray(model.confidence_stats.value)
    np.testing.assert_allclose(stats, [mean, variance], rtol=1e-5)
    weights = np.exp(-(np.minimum(confidence - mean, 0.0) ** 2) / (2 * variance / 4))
    assert history["mask_rate"][0] == pytest.approx(weights.mean(), rel=1e-5)
    assert history["mean_threshold"][0] == pytest.approx(mean, rel=1e-5)
    np.testing.assert_array_equal(np.asarray(model.selected.value), [-1] * 8)
    known = TRUTH >= 0
    right = (aligned.argmax(1) == TRUTH)[known]
    expected = (weights[known] * right).sum() / weights[known].sum()
    assert history["pseudo_precision"][0] == pytest.approx(expected, rel=1e-5)


def test_one_freematch_step_masks_by_self_adaptive_thresholds():
    """FreeMatch: the global threshold (running top confidence) and the running mean
    prediction move from 1 / classes by one batch (momentum 0.2, so that the thresholds reach
    into the batch); an image counts where its confidence reaches global * MaxNorm(mean)[its
    class]."""
    model, history, _, aligned = _one_step("freematch", momentum=0.2)
    confidence = aligned.max(1)
    tau = 0.2 / 3 + 0.8 * confidence.mean()
    class_mean = 0.2 / 3 + 0.8 * aligned.mean(0)
    np.testing.assert_allclose(np.asarray(model.confidence_stats.value)[0], tau, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(model.class_mean.value), class_mean, rtol=1e-5)
    limits = (tau * class_mean / class_mean.max())[aligned.argmax(1)]
    mask = confidence >= limits
    assert 0 < mask.sum() < 8  # the hand-made batch is split: the test can tell
    assert history["mask_rate"][0] == pytest.approx(mask.mean())
    assert history["mean_threshold"][0] == pytest.approx(limits.mean(), rel=1e-5)


def test_targets_come_from_the_weights_moving_average_with_target_ema():
    """target_ema (Mean Teacher's targets): the first step sets the average to the classifier's
    weights; the next moves it half-way towards the weights the first step left (the warm-up:
    the plain mean of the two, below target_ema 0.9) and predicts the targets with it. The
    second step's unlabeled loss is the cross-entropy of those targets and the current weights'
    prediction, computed here in numpy."""
    import keras

    model, data, x_u = _shell(
        1, 2.0, np.ones(3), total_steps=2, threshold=0.0, flexible=False, teacher_weight=0.0,
        distribution_alignment=False, target_ema=0.9,
    )  # fmt: skip
    classifier = model.classifier
    start = [np.asarray(w) for w in classifier.get_weights()]
    model.fit(data, epochs=1, verbose=0)
    for average, weight in zip(model.target_weights, start, strict=True):
        np.testing.assert_allclose(np.asarray(average.value), weight, rtol=1e-6)
    after = [np.asarray(w) for w in classifier.get_weights()]
    history = model.fit(data, epochs=1, verbose=0).history
    mean = [0.5 * a + 0.5 * b for a, b in zip(start, after, strict=True)]
    for average, expected in zip(model.target_weights, mean, strict=True):
        np.testing.assert_allclose(np.asarray(average.value), expected, rtol=1e-5, atol=1e-7)
    images = x_u.astype(np.float32)

    def predict(weights):
        copy = keras.models.clone_model(classifier)
        copy.set_weights(weights)
        return np.asarray(copy(images), np.float64)

    current = predict(after)  # the weights the second step started from
    targets = predict(mean).argmax(1)
    assert (targets != current.argmax(1)).any()  # the two kinds of target differ: it can tell
    expected = -np.log(current[np.arange(8), targets]).mean()
    assert history["loss_unlabeled"][0] == pytest.approx(expected, rel=1e-5)
    assert history["mask_rate"][0] == pytest.approx(1.0)


def test_the_baseline_keeps_no_target_average():
    """Without unlabeled images (the labeled-only baseline) or with target_ema 0 there are no
    targets to make: no average is kept, so its variables (and resume states) are unchanged."""
    from types import SimpleNamespace

    import keras

    from pseudolabel import consistency

    inputs = keras.Input((2, 2, 1))
    classifier = keras.Model(inputs, keras.layers.Dense(3)(keras.layers.Flatten()(inputs)))
    settings = SimpleNamespace(**{**SETTINGS, "target_ema": 0.99})
    prior = np.ones(3)
    baseline = consistency.ConsistencyModel(classifier, [], [], settings, 3, 0, prior, 1)
    assert baseline.target_weights == []
    student = consistency.ConsistencyModel(classifier, [], [], settings, 3, 8, prior, 1)
    assert len(student.target_weights) == len(classifier.trainable_variables) == 2
    settings.target_ema = 0.0
    plain = consistency.ConsistencyModel(classifier, [], [], settings, 3, 8, prior, 1)
    assert len(plain.variables) == len(student.variables) - 2


def test_rotations_turn_image_i_by_i_mod_turns_steps():
    """RotNet's pretext batch: image i turned counter-clockwise by (i mod 4) quarter turns, its
    class that count; with 2 turns (images that are not square) by 0 or 180 degrees."""
    image = np.arange(4, dtype=np.float32).reshape(2, 2, 1)  # [[0, 1], [2, 3]]
    images = tf.constant(np.stack([image] * 6))
    turned, k = method.rotations(images)
    assert k.numpy().tolist() == [0, 1, 2, 3, 0, 1]
    quarter = [[1, 3], [0, 2]]  # [[0, 1], [2, 3]] a quarter turn counter-clockwise
    expected = [[[0, 1], [2, 3]], quarter, [[3, 2], [1, 0]], [[2, 0], [3, 1]]]
    got = turned.numpy()[..., 0].tolist()
    assert got == [*expected, expected[0], expected[1]]
    tall = tf.constant(np.arange(2 * 6, dtype=np.float32).reshape(2, 3, 2, 1))
    turned, k = method.rotations(tall, turns=2)
    assert k.numpy().tolist() == [0, 1]
    np.testing.assert_array_equal(turned[0], tall[0])
    np.testing.assert_array_equal(turned[1], tall[1, ::-1, ::-1])
    with pytest.raises(ValueError, match="turns=3"):
        method.rotations(tall, turns=3)


def test_one_rotation_warmup_step_is_the_labeled_plus_the_weighted_rotation_loss():
    """consistency.RotationWarmup: one step's loss is the labeled cross-entropy plus
    warmup_weight times the cross-entropy of each unlabeled image's quarter turns, recomputed
    here in numpy from the classifier's features and the rotation head; a step at a learning
    rate trains the classifier and the head, and the head is not the classifier's."""
    import keras

    from pseudolabel import consistency

    keras.utils.set_random_seed(0)
    inputs = keras.Input((2, 2, 1))
    features = keras.layers.Flatten()(keras.layers.Rescaling(1 / 255)(inputs))
    outputs = keras.layers.Dense(3, activation="softmax", name="predictions")(features)
    classifier = keras.Model(inputs, outputs)
    warmup = consistency.RotationWarmup(classifier, [], 0.5, 3)
    warmup.compile(optimizer=keras.optimizers.SGD(learning_rate=0.0))
    rng = np.random.default_rng(0)
    x_l = rng.integers(0, 256, (4, 2, 2, 1)).astype(np.uint8)
    y_l = np.eye(3, dtype=np.float32)[[0, 1, 2, 2]]
    x_u = rng.integers(0, 256, (8, 2, 2, 1)).astype(np.uint8)
    batch = ((x_l, y_l), (x_u, np.full((8, 3), 1 / 3, np.float32)))
    data = tf.data.Dataset.from_tensors(batch)
    history = warmup.fit(data, epochs=1, verbose=0).history

    p_l = np.asarray(classifier(x_l.astype(np.float32)), np.float64)
    labeled = -np.log((p_l * y_l).sum(1)).mean()
    turned, k = method.rotations(tf.constant(x_u, tf.float32))
    flat = turned.numpy().reshape(8, 4) / 255.0
    w, b = (np.asarray(v, np.float64) for v in warmup.rotation.weights)
    logits = flat @ w + b
    p_r = np.exp(logits - logits.max(1, keepdims=True))
    p_r /= p_r.sum(1, keepdims=True)
    rotation = -np.log(p_r[np.arange(8), k.numpy()]).mean()
    assert history["loss_labeled"][0] == pytest.approx(labeled, rel=1e-5)
    assert history["loss_rotation"][0] == pytest.approx(rotation, rel=1e-5)
    assert history["loss"][0] == pytest.approx(labeled + 0.5 * rotation, rel=1e-5)
    turned_right = (p_r.argmax(1) == k.numpy()).mean()
    assert history["rotation_accuracy"][0] == pytest.approx(turned_right)

    before = [np.array(v) for v in classifier.weights + warmup.rotation.weights]
    warmup.optimizer.learning_rate.assign(0.1)
    warmup.fit(data, epochs=1, verbose=0)
    after = classifier.weights + warmup.rotation.weights
    assert all(not np.allclose(a, b) for a, b in zip(before, after, strict=True))
    assert len(classifier.weights) == 2  # the head is the warm-up's, not the classifier's
