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


def test_one_train_step_updates_the_shells_state_as_the_functions_say():
    """ConsistencyModel's train_step on hand-made batches (no views, plain SGD at learning rate
    0): the running class distribution, the FlexMatch memory and the pseudo-label precision
    follow the formulas, computed here in numpy from the classifier's own predictions."""
    from types import SimpleNamespace

    import keras

    from pseudolabel import consistency

    keras.utils.set_random_seed(0)
    inputs = keras.Input((2, 2, 1))
    logits = keras.layers.Dense(3)(keras.layers.Flatten()(keras.layers.Rescaling(1 / 255)(inputs)))
    classifier = keras.Model(inputs, keras.layers.Softmax()(logits))
    settings = SimpleNamespace(
        threshold=0.5, flexible=True, weight=1.0, teacher_weight=1.0, teacher_decay=False,
        distribution_alignment=True, alignment_momentum=0.9, rampup=0.0,
    )  # fmt: skip
    prior = np.array([1.0, 1.0, 2.0])
    model = consistency.ConsistencyModel(classifier, [], [], settings, 3, 8, prior, total_steps=1)
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.0))
    rng = np.random.default_rng(0)
    x_l = rng.integers(0, 256, (4, 2, 2, 1)).astype(np.uint8)
    y_l = np.eye(3, dtype=np.float32)[[0, 1, 2, 2]]
    x_u = rng.integers(0, 256, (8, 2, 2, 1)).astype(np.uint8)
    teacher = np.full((8, 3), 1 / 3, np.float32)
    truth = np.array([0, 1, 2, 0, 1, 2, -1, -1], np.int32)
    index = np.arange(8, dtype=np.int32)
    batch = ((x_l, y_l), (x_u, teacher, np.ones(8, np.float32), truth, index))
    data = tf.data.Dataset.from_tensors(batch)
    p_weak = np.asarray(classifier(x_u.astype(np.float32), training=False), np.float64)
    history = model.fit(data, epochs=1, verbose=0).history

    prior = prior / prior.sum()
    p_model = 0.9 * prior + 0.1 * p_weak.mean(0)  # the running mean, started at the prior
    np.testing.assert_allclose(np.asarray(model.p_model.value), p_model, rtol=1e-5)
    aligned = p_weak * prior / p_model
    aligned /= aligned.sum(1, keepdims=True)
    confident = aligned.max(1) > 0.5
    expected = np.where(confident, aligned.argmax(1), -1)
    np.testing.assert_array_equal(np.asarray(model.selected.value), expected)
    # FlexMatch's thresholds before the step: nothing selected yet, so all 0 (the warm-up):
    # every image is masked in, and the precision counts the images whose truth is known.
    pseudo = aligned.argmax(1)
    known = truth >= 0
    assert history["mask_rate"][0] == pytest.approx(1.0)
    assert history["pseudo_precision"][0] == pytest.approx((pseudo == truth)[known].mean())
