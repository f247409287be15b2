import keras
import numpy as np
import pytest

import tinyrobust as tr
from tinyrobust import attacks


@pytest.fixture(scope="module")
def trained():
    """A small BN-free CNN trained briefly on Fashion-MNIST, and 100 test examples."""
    keras.utils.set_random_seed(0)
    x, y = tr.data.load_arrays("fashion_mnist", "train", limit=4000)
    model = keras.Sequential([
        keras.Input((28, 28, 1)), keras.layers.Conv2D(16, 3, activation="relu"), keras.layers.MaxPooling2D(),
        keras.layers.Conv2D(32, 3, activation="relu"), keras.layers.MaxPooling2D(), keras.layers.Flatten(),
        keras.layers.Dense(10),
    ])
    model.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, epochs=4, batch_size=64, verbose=0)
    xt, yt = tr.data.load_arrays("fashion_mnist", "test", limit=100)
    return model, xt, yt


LINF = [
    lambda eps: attacks.FGSM(eps),
    lambda eps: attacks.PGD(eps, steps=5),
    lambda eps: attacks.MIM(eps, steps=5),
    lambda eps: attacks.APGD(eps, steps=10),
    lambda eps: attacks.APGD(eps, steps=10, loss="dlr"),
    lambda eps: attacks.DeepFool(eps, norm="linf", steps=10),
    lambda eps: attacks.Square(eps, queries=200),
    lambda eps: attacks.SimBA(eps, queries=200),
    lambda eps: attacks.HopSkipJump(eps, norm="linf", queries=300),
]
L2 = [
    lambda eps: attacks.PGD(eps, norm="l2", steps=5),
    lambda eps: attacks.CarliniWagnerL2(eps, steps=20, binary_search_steps=2),
    lambda eps: attacks.DeepFool(eps, norm="l2", steps=10),
    lambda eps: attacks.Square(eps, norm="l2", queries=100),
    lambda eps: attacks.SimBA(eps, norm="l2", queries=200),
    lambda eps: attacks.HopSkipJump(eps, queries=300),
    lambda eps: attacks.Boundary(eps, queries=300),
]


def _norms(delta, norm):
    flat = delta.reshape(len(delta), -1)
    return np.abs(flat).max(axis=1) if norm == "linf" else np.sqrt((flat ** 2).sum(axis=1))


@pytest.mark.parametrize("make, epsilons", [(m, [0.0, 0.02, 0.1]) for m in LINF] + [(m, [0.0, 0.5, 2.0]) for m in L2])
def test_attack_properties(trained, make, epsilons):
    model, x, y = trained
    attack = make(epsilons)
    result = attack.run(model, x[:40], y[:40])
    np.testing.assert_array_equal(result.x_adv[0], x[:40])  # eps = 0 returns the input
    for eps, x_adv in zip(epsilons, result.x_adv):
        assert np.all(_norms(x_adv - x[:40], attack.norm) <= eps + 1e-5)
        assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
    rates = [s.mean() for s in result.success]
    assert rates == sorted(rates), rates  # success does not decrease with eps
    assert rates[-1] > rates[0]
    again = make(epsilons).run(model, x[:40], y[:40])  # reproducible from the seed
    for a, b in zip(result.x_adv, again.x_adv):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_single_epsilon_call_returns_one_batch(trained):
    model, x, y = trained
    assert attacks.FGSM(0.05)(model, x[:5], y[:5]).shape == x[:5].shape
    assert len(attacks.FGSM([0.01, 0.05])(model, x[:5])) == 2  # y=None: the model's predictions


@pytest.mark.parametrize("attack", [attacks.PGD(0.3, steps=20, targeted=True), attacks.APGD(0.3, steps=20, targeted=True)])
def test_targeted_attack_reaches_target(trained, attack):
    model, x, y = trained
    target = (y[:30] + 1) % 10
    result = attack.run(model, x[:30], target)
    predicted = np.argmax(model.predict(result.x_adv[0], verbose=0), axis=1)
    assert np.mean(predicted == target) >= 0.8
    np.testing.assert_array_equal(result.success[0], predicted == target)


def test_targeted_dlr_lifts_target_above_predicted_class(trained):
    """Targeted DLR maximises z_t - z_y against the clean prediction y (as in AutoAttack's APGD-T)."""
    model, x, y = trained
    predicted = np.argmax(model.predict(x[:30], verbose=0), axis=1)
    target = (predicted + 1) % 10
    x_adv = attacks.APGD(0.3, steps=20, loss="dlr", targeted=True)(model, x[:30], target)
    logits = model.predict(x_adv, verbose=0)
    rows = np.arange(30)
    assert np.mean(logits[rows, target] > logits[rows, predicted]) >= 0.8


@pytest.mark.parametrize("attack", [attacks.Square(0.1, queries=30), attacks.Square(1.0, norm="l2", queries=30),
                                    attacks.SimBA(0.1, queries=30), attacks.HopSkipJump(1.0, queries=200),
                                    attacks.HopSkipJump(1.0, queries=80, init_evals=10),
                                    attacks.Boundary(1.0, queries=100)])
def test_black_box_attacks_report_queries_within_budget(trained, attack):
    model, x, y = trained
    result = attack.run(model, x[:20], y[:20])
    assert result.queries[0].shape == (20,)
    assert 1 <= result.queries[0].min() and result.queries[0].max() <= attack.queries


def test_score_based_attacks_run_on_a_plain_callable(trained):
    model, x, y = trained
    as_function = lambda batch: np.asarray(model(batch, training=False))  # noqa: E731
    for attack in [attacks.Square(0.1, queries=30), attacks.SimBA(1.0, norm="l2", queries=30)]:
        result = attack.run(as_function, x[:10], y[:10])
        np.testing.assert_array_equal(result.success[0], attack.run(model, x[:10], y[:10]).success[0])


def test_score_based_attacks_refuse_label_only_models(trained):
    model, x, y = trained
    labels_only = lambda batch: np.argmax(model(batch, training=False), axis=-1)  # noqa: E731
    with pytest.raises(ValueError, match="logits"):
        attacks.SimBA(0.1, queries=10).run(labels_only, x[:4], y[:4])


@pytest.mark.parametrize("make", [lambda: attacks.HopSkipJump([0.5, 2.0], queries=200),
                                  lambda: attacks.Boundary([0.5, 2.0], queries=100)])
def test_decision_based_attacks_need_only_labels(trained, make):
    model, x, y = trained
    labels_only = lambda batch: np.argmax(model(batch, training=False), axis=-1)  # noqa: E731
    on_labels, on_logits = make().run(labels_only, x[:20], y[:20]), make().run(model, x[:20], y[:20])
    for a, b in zip(on_labels.x_adv, on_logits.x_adv):  # same decisions, same seed: the same walk
        np.testing.assert_allclose(a, b, atol=1e-6)
    np.testing.assert_array_equal(on_labels.queries[0], on_logits.queries[0])


def test_decision_based_attacks_approach_white_box_strength(trained):
    model, x, y = trained
    x, y = x[:50], y[:50]
    pgd = attacks.PGD(2.0, norm="l2", steps=20).run(model, x, y).success[0].mean()
    hsj = attacks.HopSkipJump(2.0, queries=2000).run(model, x, y).success[0].mean()
    assert 0.3 < hsj <= pgd + 0.02, (hsj, pgd)


def test_transfer_uses_surrogate_and_scores_target(trained):
    model, x, y = trained
    result = attacks.Transfer(model, attacks.PGD([0.05, 0.1], steps=5)).run(model, x[:30], y[:30])
    direct = attacks.PGD([0.05, 0.1], steps=5).run(model, x[:30], y[:30])
    for a, b in zip(result.success, direct.success):  # a model is its own perfect surrogate
        np.testing.assert_array_equal(a, b)


def test_robust_accuracy_worst_case(trained):
    model, x, y = trained
    report = attacks.robust_accuracy(model, (x, y), [attacks.FGSM([0.02, 0.05]), attacks.PGD([0.05], steps=5)],
                                     batch_size=50, verbose=False)
    pgd, fgsm = report.attacks["PGD"][0.05], report.attacks["FGSM"][0.05]
    np.testing.assert_array_equal(report.worst[0.05], report.clean & pgd & fgsm)
    np.testing.assert_array_equal(report.worst[0.02], report.clean & report.attacks["FGSM"][0.02])
    summary = report.accuracy()
    assert summary["worst"]["0.05"] <= min(summary["attacks"]["PGD"]["0.05"], summary["attacks"]["FGSM"]["0.05"])
    assert report.kinds == {"FGSM": "single-step", "PGD": "iterative"}


def test_robust_accuracy_accepts_dataset_and_shows_progress(trained, capsys):
    import tensorflow as tf

    model, x, y = trained
    dataset = tf.data.Dataset.from_tensor_slices((x[:40], y[:40])).batch(16)
    report = attacks.robust_accuracy(model, dataset, {"fgsm": attacks.FGSM(0.05)}, verbose=False)
    assert report.clean.shape == (40,)
    attacks.robust_accuracy(model, (x[:40], y[:40]), [attacks.FGSM(0.05), attacks.FGSM(0.1)], batch_size=16)
    assert "6/6" in capsys.readouterr().out  # 3 batches x 2 attacks


def test_eot_averages_random_model(trained):
    model, x, y = trained
    noisy = lambda batch: model(batch + keras.random.normal(keras.ops.shape(batch), stddev=0.05), training=False)  # noqa: E731
    plain = attacks.PGD(0.1, steps=5).run(noisy, x[:40], y[:40])
    eot = attacks.EOT(attacks.PGD(0.1, steps=5), samples=8).run(noisy, x[:40], y[:40])
    assert eot.success[0].mean() >= plain.success[0].mean() - 0.1
    assert np.all(np.abs(eot.x_adv[0] - x[:40]) <= 0.1 + 1e-6)


# -- cross-check against ART -----------------------------------------------------------------

def _art_classifier(model):
    from art.estimators.classification import TensorFlowV2Classifier

    return TensorFlowV2Classifier(model, nb_classes=10, input_shape=(28, 28, 1), clip_values=(0.0, 1.0),
                                  loss_object=keras.losses.SparseCategoricalCrossentropy(from_logits=True))


def _accuracy(model, x, y):
    return float(np.mean(np.argmax(model.predict(x, verbose=0), axis=1) == y))


def test_pgd_agrees_with_art(trained):
    from art.attacks.evasion import ProjectedGradientDescent

    model, x, y = trained
    eps = 0.03
    ours = 1 - attacks.PGD(eps, steps=10, rel_step_size=0.25).run(model, x, y).success[0].mean()
    art = ProjectedGradientDescent(_art_classifier(model), norm=np.inf, eps=eps, eps_step=0.25 * eps, max_iter=10,
                                   num_random_init=1, batch_size=100, verbose=False)
    theirs = _accuracy(model, art.generate(x, y=y), y)
    assert abs(ours - theirs) <= 0.02, (ours, theirs)


def test_square_agrees_with_art(trained):
    from art.attacks.evasion import SquareAttack

    model, x, y = trained
    eps = 0.05
    ours = 1 - attacks.Square(eps, queries=300).run(model, x, y).success[0].mean()  # p_init 0.8 by default
    art = SquareAttack(_art_classifier(model), norm=np.inf, eps=eps, max_iter=300, p_init=0.8, nb_restarts=1,
                       batch_size=100, verbose=False)
    theirs = _accuracy(model, art.generate(x, y=y), y)
    assert abs(ours - theirs) <= 0.02, (ours, theirs)


# -- checks -----------------------------------------------------------------------------------

def test_check_model_passes_a_plain_logit_model(trained):
    model, x, y = trained
    assert attacks.check_model(model, x[:50], y[:50], warn=False).ok
    constant = lambda batch: keras.ops.one_hot(keras.ops.zeros(keras.ops.shape(batch)[:1], "int32"), 10) * 5  # noqa: E731
    assert "clean_near_chance" in attacks.check_model(constant, x[:50], y[:50], warn=False).flags


def test_check_model_flags_softmax_and_randomness(trained):
    model, x, y = trained
    softmax = keras.Sequential([model, keras.layers.Softmax()])
    assert "softmax_output" in attacks.check_model(softmax, x[:20], y[:20], warn=False).flags
    noisy = lambda batch: model(batch + keras.random.normal(keras.ops.shape(batch), stddev=0.05), training=False)  # noqa: E731
    with pytest.warns(UserWarning, match="EOT"):
        assert "randomized" in attacks.check_model(noisy, x[:20], y[:20]).flags


def test_check_model_flags_gradient_masking(trained):
    model, x, y = trained
    # Quantising the input with a hard round: zero gradients everywhere.
    masked = lambda batch: model(keras.ops.round(batch * 4) / 4, training=False)  # noqa: E731
    flags = attacks.check_model(masked, x[:20], y[:20], warn=False).flags
    assert "zero_gradients" in flags
    report = attacks.robust_accuracy(masked, (x[:60], y[:60]),
                                     {"pgd": attacks.PGD(0.1, steps=5), "square": attacks.Square(0.1, queries=200)},
                                     verbose=False)
    flags = attacks.check_model(masked, x[:20], y[:20], report=report, warn=False).flags
    assert "black_box_beats_white_box" in flags
    assert "not_reaching_chance" in flags


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: attacks.PGD(-1), "Received: eps=-1"),
        (lambda: attacks.PGD(0.1, steps=0), "Received: steps=0"),
        (lambda: attacks.PGD(0.1, norm="l1"), "Received: norm='l1'"),
        (lambda: attacks.APGD(0.1, loss="hinge"), "Received: loss='hinge'"),
        (lambda: attacks.Square(0.1, queries=0), "Received: queries=0"),
        (lambda: attacks.Square(0.1, p_init=1.5), "Received: p_init=1.5"),
        (lambda: attacks.SimBA(0.1, step_size=0.01), "Received: step_size=0.01"),
        (lambda: attacks.SimBA(0.1, basis="dct"), "Received: basis='dct'"),
        (lambda: attacks.SimBA(0.1, norm="l2", basis="haar"), "Received: basis='haar'"),
        (lambda: attacks.HopSkipJump(0.5, init_evals=100, max_evals=10), "Received: max_evals=10"),
        (lambda: attacks.HopSkipJump(0.5, norm="l1"), "Received: norm='l1'"),
        (lambda: attacks.Boundary(0.5, source_step=1.0), "Received: source_step=1.0"),
        (lambda: attacks.CarliniWagnerL2(0.5, learning_rate=0), "Received: learning_rate=0"),
        (lambda: attacks.EOT(attacks.FGSM(0.1), samples=0), "Received: samples=0"),
        (lambda: attacks.PGD(0.1, input_range=(1, 0)), r"Received: input_range=\(1, 0\)"),
    ],
)
def test_bad_arguments(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_inputs_outside_range_are_rejected(trained):
    model, x, y = trained
    with pytest.raises(ValueError, match="input_range"):
        attacks.FGSM(0.1).run(model, x[:2] * 2 + 1, y[:2])


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_threat_model_start_step_and_projection_stay_inside(norm):
    """The one start, step and projection that attacks and training adversaries share."""
    threat = attacks.ThreatModel(norm, 0.3, input_range=(0.0, 1.0))
    x = np.random.default_rng(0).uniform(size=(16, 5, 5, 1)).astype("float32")

    def in_ball(delta):
        size = np.abs(delta).reshape(16, -1)
        size = size.max(axis=1) if norm == "linf" else np.sqrt((size ** 2).sum(axis=1))
        return bool(np.all(size <= 0.3 + 1e-5))

    def inside(x_adv):
        return in_ball(x_adv - x) and x_adv.min() >= 0 and x_adv.max() <= 1

    for seed in (np.random.default_rng(1), keras.random.SeedGenerator(1)):
        start = np.asarray(threat.random_start(x, seed))
        assert start.dtype == np.float32 and np.any(start != 0) and in_ball(start)
    far = np.asarray(threat.project(x, np.full_like(x, 5.0)))
    assert inside(far) and np.any(far != x)
    stepped = np.asarray(threat.step(x, far, np.ones_like(x), 10.0))
    assert inside(stepped)
    trained = tr.AdversarialTraining("pgd", epsilon=0.3, steps=2, norm=norm, input_range=(0.0, 1.0))
    assert trained.threat.get_config() == threat.get_config()
    with pytest.raises(ValueError, match="Received: epsilon=-1"):
        attacks.ThreatModel(norm, -1)


@pytest.mark.parametrize("half_width", [1.0, 124.0])
def test_carlini_wagner_steps_in_input_units(half_width):
    """C&W's default search is as fine on MFCC-wide inputs (±124) as on [-1, 1].

    A linear two-class model: the smallest L2 perturbation that flips it is
    |margin| / ||w1 - w0||. With Adam's step set in tanh space, inputs in
    [-124, 124] got steps of about one unit per coordinate and C&W stayed far
    from that minimum.
    """
    rng = np.random.default_rng(0)
    weights = rng.normal(size=(10, 2)).astype("float32")
    model = keras.Sequential([keras.Input((10,)), keras.layers.Dense(2, use_bias=False)])
    model.layers[0].set_weights([weights])
    x = rng.uniform(-0.2, 0.2, size=(8, 10)).astype("float32")
    logits = x @ weights
    y = logits.argmax(axis=1)
    minimum = np.abs(logits[:, 1] - logits[:, 0]) / np.linalg.norm(weights[:, 1] - weights[:, 0])
    attack = attacks.CarliniWagnerL2(1.0, steps=100, binary_search_steps=6, initial_const=1.0,
                                     input_range=(-half_width, half_width))
    x_adv, _ = attack.minimum_norm(model, x, y)
    found = np.sqrt(((x_adv - x) ** 2).sum(axis=1))
    assert np.all((x_adv @ weights).argmax(axis=1) != y)
    np.testing.assert_array_less(found, 1.05 * minimum)  # the old step: up to 1.48x


def test_a_call_with_the_wrong_input_shape_is_refused_before_tracing_and_later_calls_work():
    """keras.datasets gives (N, 28, 28): refused naming the model's shape, and the model's next attack call with
    (N, 28, 28, 1) works (a traced wrong shape once broke every later call with 'as_list() is not defined')."""
    model = tr.models.small_cnn(width=4)
    x, y = tr.data.load_arrays("fashion_mnist", "test", limit=8)
    attack = tr.attacks.PGD(0.05, steps=2)
    with pytest.raises(ValueError, match=r"Expected inputs of shape \(N, 28, 28, 1\) .*Received: x with shape \(8, 28, 28\)"):
        attack(model, x[..., 0], y)
    assert attack(model, x, y).shape == x.shape
    assert tr.attacks.FGSM(0.05)(model, x[:3], y[:3]).shape == (3, 28, 28, 1)


@pytest.mark.parametrize("build, message", [
    (lambda: tr.attacks.FGSM(8), "at most the width of the input range .*Received: eps=8"),
    (lambda: tr.attacks.PGD([0.1, 2.0]), "Received: eps=2.0"),
    (lambda: tr.attacks.PGD(0.1, targeted="no"), "Received: targeted='no'"),
    (lambda: tr.attacks.PGD(0.1, random_start="no"), "Received: random_start='no'"),
    (lambda: tr.AdversarialTraining("pgd", epsilon=8), "Received: epsilon=8"),
    (lambda: tr.attacks.ThreatModel("linf", 1.5), "Received: epsilon=1.5"),
])
def test_the_api_refuses_what_the_bench_refuses(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_large_l2_radii_and_wide_input_ranges_stay_allowed():
    assert tr.attacks.PGD(3.0, norm="l2").epsilons == (3.0,)
    assert tr.attacks.FGSM(8, input_range=(0, 255)).epsilons == (8.0,)


def test_labels_outside_the_models_classes_are_refused():
    model = tr.models.small_cnn(width=4)
    x, y = tr.data.load_arrays("fashion_mnist", "test", limit=4)
    for attack in (tr.attacks.PGD(0.05, steps=1), tr.attacks.Square(0.05, queries=5)):
        with pytest.raises(ValueError, match=r"class labels in \[0, 10\)"):
            attack(model, x, y + 10)


def test_progress_in_a_log_is_one_plain_line(capsys):
    """Redirected output (not a terminal) gets no carriage returns, backspaces or ANSI codes."""
    model = tr.models.small_cnn(width=4)
    x, y = tr.data.load_arrays("fashion_mnist", "test", limit=8)
    tr.attacks.robust_accuracy(model, (x, y), {"fgsm": tr.attacks.FGSM(0.05)})
    printed = capsys.readouterr().out
    assert printed.strip() and not any(c in printed for c in ("\r", "\b", "\x1b"))
