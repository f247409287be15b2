"""The standard suite (cascade), and the evaluation rules that keep a worst case honest."""

import numpy as np
import pytest
import tensorflow as tf

from tinyrobust import attacks
from tinyrobust.attacks.evaluation import RobustnessReport


def _sign_model(x):
    """Two classes: 0 when the input's mean is positive, else 1 (logits +-mean)."""
    mean = tf.reduce_mean(tf.reshape(tf.convert_to_tensor(x, tf.float32), (tf.shape(x)[0], -1)), axis=1)
    return tf.stack([mean, -mean], axis=1)


class _Flip(attacks.Attack):
    """Negates every input at eps 1.0 only (a test double with a chosen outcome)."""

    def _attack(self, model, x, y, eps):
        return (-x if eps == 1.0 else x), None


class _Spy(attacks.Attack):
    """Records the batch sizes it is run on and changes nothing."""

    def __init__(self, eps, seen, **kwargs):
        super().__init__(eps, **kwargs)
        self.seen = seen

    def _attack(self, model, x, y, eps):
        self.seen.append(len(x))
        return x, None


def _inputs(n=8, seed=0):
    rng = np.random.default_rng(seed)
    return rng.uniform(0.1, 0.5, (n, 4, 4, 1)).astype("float32")  # mean > 0: class 0


def test_cascade_attacks_only_the_examples_still_robust():
    x = _inputs()
    y = np.array([0, 0, 0, 0, 1, 1, 0, 0])  # two examples misclassified on clean input
    seen = []
    cascade = attacks.Cascade({"flip": _Flip([1.0, 2.0], input_range=(-1, 1)),
                               "spy": _Spy([1.0, 2.0], seen, input_range=(-1, 1))})
    result = cascade.run(_sign_model, x, y)
    # eps 1.0: the flip breaks all 6 correct examples, the spy sees none; eps 2.0: the flip does nothing,
    # the spy sees the 6 correct ones.
    assert seen == [6]
    np.testing.assert_array_equal(result.stages["flip"][0], np.zeros(8, bool))
    np.testing.assert_array_equal(result.stages["spy"][1], y == 0)
    np.testing.assert_array_equal(result.success[0], np.ones(8, bool))
    np.testing.assert_array_equal(result.success[1], y != 0)


def test_suite_builds_the_standard_stages():
    cascade = attacks.suite("autoattack", [0.03, 0.1], num_classes=10)
    assert list(cascade.stages) == ["apgd-ce", "apgd-t", "square"]
    apgd_ce, apgd_t, square = cascade.stages.values()
    assert apgd_ce.loss == "ce" and apgd_ce.steps == 100
    assert apgd_t.target_classes == 9 and square.queries == 5000 and square.p_init == 0.8
    fast = attacks.suite("autoattack-fast", 0.1, num_classes=3, steps=5, queries=20)
    assert fast.stages["apgd-t"].target_classes == 2 and fast.stages["square"].queries == 20
    with pytest.raises(ValueError, match="Received: name='autoattack-plus'"):
        attacks.suite("autoattack-plus", 0.1)


def test_per_attack_accuracy_needs_clean_correctness_and_worst_case_never_rises():
    x = _inputs()
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1])  # half misclassified on clean input
    report = attacks.robust_accuracy(_sign_model, (x, y), {"flip": _Flip([1.0, 2.0], input_range=(-1, 1))},
                                     verbose=False)
    accuracy = report.accuracy()
    assert accuracy["clean"] == 0.5
    # Flipping fixes the misclassified half at eps 1.0 and leaves everything alone at eps 2.0.
    assert accuracy["attacks"]["flip"] == {"1.0": 0.0, "2.0": 0.5}
    assert accuracy["worst"] == {"1.0": 0.0, "2.0": 0.0}  # broken within a smaller ball: broken within a larger


def test_suite_columns_appear_per_stage(trained_small):
    model, x, y = trained_small
    cascade = attacks.suite("autoattack-fast", [0.05, 0.2], steps=3, target_classes=1, queries=20)
    report = attacks.robust_accuracy(model, (x, y), {"aa": cascade}, verbose=False)
    assert {"aa", "aa/apgd-ce", "aa/apgd-t", "aa/square"} <= set(report.attacks)
    assert report.kinds["aa"] == "suite" and report.kinds["aa/square"] == "black-box"
    for eps in (0.05, 0.2):
        stages = [report.attacks[f"aa/{s}"][eps] for s in ("apgd-ce", "apgd-t", "square")]
        assert all(np.all(later <= earlier) for earlier, later in zip(stages, stages[1:]))
        np.testing.assert_array_equal(report.attacks["aa"][eps], stages[-1])


@pytest.fixture(scope="module")
def trained_small():
    import keras

    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (64, 6, 6, 1)).astype("float32")
    y = (x.mean(axis=(1, 2, 3)) > 0.5).astype("int32") + 2 * (x[:, 0, 0, 0] > 0.5)
    inputs = keras.Input((6, 6, 1))
    h = keras.layers.Flatten()(inputs)
    h = keras.layers.Dense(16, activation="relu")(h)
    model = keras.Model(inputs, keras.layers.Dense(4)(h))
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, epochs=30, verbose=0)
    return model, x, y


def test_square_defaults_to_autoattack_squares_and_redraws_no_op_windows():
    assert attacks.Square(0.1).p_init == 0.8
    square = attacks.Square(0.1, queries=10)
    rng = np.random.default_rng(0)
    x = np.full((16, 8, 8, 1), 0.5, np.float32)
    x_best = x + 0.1  # every pixel already at +eps: a +eps window would change nothing
    for _ in range(30):
        candidate = square._propose(rng, x, x_best, 0.1, 2)
        assert np.all(np.any((candidate != x_best).reshape(16, -1), axis=1))


def test_square_keeps_attacking_on_a_margin_tie():
    tie = lambda batch: tf.zeros((tf.shape(batch)[0], 3))  # noqa: E731  (argmax 0 = the label: correct)
    result = attacks.Square(0.1, queries=20).run(tie, _inputs(4), np.zeros(4, int))
    np.testing.assert_array_equal(result.queries[0], [20] * 4)


@pytest.mark.parametrize("make", [lambda: attacks.APGD(0.1, steps=3), lambda: attacks.APGD(0.1, steps=3, loss="dlr"),
                                  lambda: attacks.CarliniWagnerL2(0.5, steps=3, binary_search_steps=1)])
def test_gradient_attacks_survive_a_model_without_input_gradient(make):
    constant = lambda batch: tf.zeros((tf.shape(batch)[0], 3)) + tf.constant([1.0, 0.0, -1.0])  # noqa: E731
    result = make().run(constant, _inputs(4), np.zeros(4, int))
    assert not result.success[0].any()


def test_hopskipjump_refuses_a_budget_that_runs_no_iteration():
    with pytest.raises(ValueError, match="at least 162 queries.*Received: queries=100"):
        attacks.HopSkipJump(0.5, queries=100)
    assert attacks.HopSkipJump(0.5, queries=80, init_evals=10).min_queries == 72


def test_check_model_flags_softmax_on_an_int8_grid_and_partial_masking():
    x = _inputs(16)
    y = np.zeros(16, int)
    quantized_softmax = lambda batch: np.round(tf.nn.softmax(  # noqa: E731
        tf.random.stateless_normal((len(batch), 10), seed=(1, 2)) * 3).numpy() * 256) / 256
    assert "softmax_output" in attacks.check_model(quantized_softmax, x, y, gradients=False, warn=False).flags
    clean = np.ones(16, bool)
    report = RobustnessReport(clean, {"pgd": {0.1: np.arange(16) < 10}, "apgd": {0.1: np.arange(16) < 4}},
                              {0.1: np.arange(16) < 4}, {}, {"pgd": "iterative", "apgd": "iterative"},
                              apgd_columns=("apgd",))
    flags = attacks.check_model(_sign_model, x, y, report=report, warn=False).flags
    assert "partial_gradient_masking" in flags and "25.0%" in flags["partial_gradient_masking"]


def test_apgd_returns_the_first_misclassified_iterate_not_the_highest_loss_one():
    def model(x):  # misclassified near t = 1; the cross-entropy peaks at t = 0.8, where it is correct
        t = tf.reduce_mean(tf.reshape(tf.convert_to_tensor(x, tf.float32), (tf.shape(x)[0], -1)), axis=1)
        wrong = -0.01 - 30.0 * (t - 0.8) ** 2
        return tf.stack([tf.zeros_like(t), 1.0 - 50.0 * (t - 1.0) ** 2] + [wrong] * 8, axis=1)

    x = np.full((4, 4, 4, 1), 0.5, np.float32)
    result = attacks.APGD(0.5, steps=50, loss="ce").run(model, x, np.zeros(4, int))
    assert result.success[0].all()
