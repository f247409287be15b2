"""Argument checks: bad input is refused with a message naming the argument and what was received."""

import numpy as np
import pytest
import tensorflow as tf

from tinyrobust import attacks
from tinyrobust.validation import check_labels, check_number


def _sign_model(x):
    mean = tf.reduce_mean(tf.reshape(tf.convert_to_tensor(x, tf.float32), (tf.shape(x)[0], -1)), axis=1)
    return tf.stack([mean, -mean, -2 * mean], axis=1)


def test_check_labels_accepts_column_vectors_and_whole_floats():
    np.testing.assert_array_equal(check_labels(np.array([[1], [0], [2]])), [1, 0, 2])
    np.testing.assert_array_equal(check_labels([1.0, 2.0]), [1, 2])
    assert check_labels(np.array([[3]], np.uint8)).dtype == np.int32


@pytest.mark.parametrize("labels, kwargs, message", [
    (np.zeros((3, 2), int), {}, r"shape \(N,\) or \(N, 1\). Received: y with shape \(3, 2\)"),
    ([0.5, 1.0], {}, "non-integer values such as \\[0.5\\]"),
    (["a", "b"], {}, "Received: y of dtype <U1"),
    ([0, 1, 2], {"n": 2}, r"one label per input \(2\). Received: y with 3 labels"),
    ([0, 3], {"num_classes": 3}, r"in \[0, 3\). Received: y in \[0, 3\]"),
    ([-1, 0], {}, r">= 0. Received: y in \[-1, 0\]"),
])
def test_check_labels_refuses_what_is_not_one_label_per_example(labels, kwargs, message):
    with pytest.raises(ValueError, match=message):
        check_labels(labels, **kwargs)


def test_check_number_refuses_non_finite_values():
    for value in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="finite number.*Received: learning_rate="):
            check_number("learning_rate", value, low=0)
    with pytest.raises(ValueError, match="Received: eps=nan"):
        attacks.FGSM(float("nan"))


def test_column_labels_give_the_same_robust_accuracy_as_flat_ones():
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (12, 4, 4, 1)).astype("float32") - np.linspace(0, 1, 12)[:, None, None, None] * 0.6
    x = np.clip(x, 0, 1).astype("float32")
    y = rng.integers(0, 2, 12)
    suite = {"pgd": attacks.PGD(0.1, steps=3)}
    flat = attacks.robust_accuracy(_sign_model, (x, y), suite, verbose=False).accuracy()
    column = attacks.robust_accuracy(_sign_model, (x, y[:, None]), suite, verbose=False).accuracy()
    assert flat == column
    assert attacks.check_model(_sign_model, x, y[:, None], warn=False).flags.keys() == \
        attacks.check_model(_sign_model, x, y, warn=False).flags.keys()


def test_attacks_refuse_empty_non_finite_inputs_and_out_of_range_labels():
    x = np.full((4, 4, 4, 1), 0.5, np.float32)
    with pytest.raises(ValueError, match=r"non-empty batch.*Received: x with shape \(0, 4, 4, 1\)"):
        attacks.PGD(0.1).run(_sign_model, x[:0], np.zeros(0, int))
    bad = x.copy()
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="Received: x with NaN or inf"):
        attacks.PGD(0.1).run(_sign_model, bad, np.zeros(4, int))
    with pytest.raises(ValueError, match=r"in \[0, 3\). Received: y in \[0, 7\]"):
        attacks.robust_accuracy(_sign_model, (x, [0, 1, 2, 7]), {"pgd": attacks.PGD(0.1, steps=2)}, verbose=False)
