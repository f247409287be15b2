import itertools
import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import tinyrobust as tr
from modes import MODES, build, targets
from tinyrobust import callbacks, distill, multiexit, training

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _data(n=64, seed=0):
    rng = np.random.default_rng(seed)
    return rng.uniform(size=(n, 28, 28, 1)).astype("float32"), (np.arange(n) % 10).astype("int32")


def _robust_stq(**kwargs):
    return tr.RobustModel.wrap(tr.models.small_cnn(quantization="stq", width=4), **kwargs)


@pytest.mark.parametrize("method", [None, "pgd", "trades", "fgsm_rs"])
def test_fit_stq_with_jr_and_adversarial_training(method):
    adversary = None if method is None else tr.AdversarialTraining(method, epsilon=0.05, steps=2)
    model = _robust_stq(jacobian=tr.JacobianRegularizer(layers={"input": 0.01, "relu_2": 0.01}), adversary=adversary)
    model.compile(optimizer="adam", loss=LOSS, metrics=["accuracy"])
    x, y = _data()
    logs = model.fit(x, y, batch_size=16, epochs=1, verbose=0).history
    expected = {"loss", "ce", "jacobian", "jacobian/input", "jacobian/relu_2"}
    if method is not None:
        expected.add("adv_accuracy")
    if method in (None, "trades"):  # steps with a clean pass log the compiled metrics on it
        expected.add("accuracy")
    assert expected <= set(logs)
    if method in ("pgd", "fgsm_rs"):  # no clean pass, so no clean accuracy (see `clean_metrics`)
        assert "accuracy" not in logs
    assert all(np.isfinite(v[-1]) for v in logs.values())
    assert logs["loss"][-1] >= logs["ce"][-1]
    assert model.evaluate(x, y, verbose=0, return_dict=True).keys() >= {"loss", "accuracy"}


def test_clean_metrics_opt_in_costs_one_inference_pass():
    x, y = _data(32)
    model = _robust_stq(adversary=tr.AdversarialTraining("pgd", epsilon=0.05, steps=1), clean_metrics=True)
    model.compile(optimizer="adam", loss=LOSS, metrics=["accuracy"])
    logs = model.fit(x, y, batch_size=16, epochs=1, verbose=0).history
    assert {"accuracy", "adv_accuracy"} <= set(logs)
    assert model.evaluate(x, y, verbose=0, return_dict=True).keys() == {"loss", "accuracy"}


@pytest.mark.parametrize("objective", [training.Objective, training.CrossEntropy, distill.Distillation,
                                       multiexit.NeoKD])
def test_objective_step_methods_convert_with_autograph(objective):
    # The step traces these; a method AutoGraph cannot convert runs unconverted and prints a warning that asks
    # users to report a bug to TensorFlow (a docstring-only body did).
    for name in ("targets", "adversarial_examples", "passes", "losses", "update_accuracies", "test_loss"):
        tf.autograph.to_graph(getattr(objective, name))


def test_trades_loss_adds_robust_term():
    keras.utils.set_random_seed(1)
    model = _robust_stq(adversary=tr.AdversarialTraining("trades", epsilon=0.1, steps=2, beta=6.0))
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss=LOSS)
    x, y = _data(32)
    logs = model.fit(x, y, batch_size=32, epochs=1, verbose=0).history
    assert logs["loss"][0] > logs["ce"][0]


def test_pgd_examples_respect_epsilon():
    model = _robust_stq(adversary=tr.AdversarialTraining("pgd", epsilon=0.03, steps=3))
    x, y = _data(8)
    x_adv = model.adversarial_examples(x, keras.ops.convert_to_tensor(y)).numpy()
    assert np.abs(x_adv - x).max() <= 0.03 + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1


def test_large_weight_shrinks_its_layer_term():
    """A large weight on one layer's term drives that term down during training."""
    keras.utils.set_random_seed(0)
    model = tr.RobustModel.wrap(tr.models.small_cnn(width=4),
                                jacobian=tr.JacobianRegularizer(layers={"relu_2": 10.0}, num_projections=None))
    model.compile(optimizer=keras.optimizers.Adam(3e-3), loss=LOSS)
    x, y = _data(64)
    logs = model.fit(x, y, batch_size=16, epochs=6, verbose=0, shuffle=False).history["jacobian/relu_2"]
    assert logs[-1] < 0.5 * logs[0], logs


def test_jit_compile_and_keras_save_load(tmp_path):
    model = _robust_stq(jacobian=tr.JacobianRegularizer(layers={"input": 0.01, "conv_3": 0.01}),
                        adversary=tr.AdversarialTraining("fgsm_rs", epsilon=0.05))
    model.compile(optimizer="adam", loss=LOSS, metrics=["accuracy"], jit_compile=True)
    x, y = _data(32)
    logs = model.fit(x, y, batch_size=16, epochs=1, verbose=0).history
    assert np.isfinite(logs["jacobian/conv_3"][0])
    path = os.path.join(tmp_path, "robust.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded, tr.RobustModel)
    assert loaded.jacobian.get_config() == model.jacobian.get_config()
    assert loaded.adversary.get_config() == model.adversary.get_config()
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), model.predict(x, verbose=0))


def test_backup_and_restore_resumes_with_same_step_count(tmp_path):
    x, y = _data(64)

    def make():
        keras.utils.set_random_seed(0)
        model = _robust_stq(jacobian=tr.JacobianRegularizer())
        model.compile(optimizer="adam", loss=LOSS)
        return model

    uninterrupted = make()
    uninterrupted.fit(x, y, batch_size=8, epochs=3, verbose=0, shuffle=False)

    class Kill(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if int(self.model.optimizer.iterations) == 13:  # mid-way through epoch 2
                raise KeyboardInterrupt

    backup = str(tmp_path / "backup")
    interrupted = make()
    with pytest.raises(KeyboardInterrupt):
        interrupted.fit(x, y, batch_size=8, epochs=3, verbose=0, shuffle=False,
                        callbacks=[keras.callbacks.BackupAndRestore(backup), Kill()])
    resumed = make()
    history = resumed.fit(x, y, batch_size=8, epochs=3, verbose=0, shuffle=False,
                          callbacks=[keras.callbacks.BackupAndRestore(backup)])
    assert int(resumed.optimizer.iterations) == int(uninterrupted.optimizer.iterations) == 24
    assert len(history.history["loss"]) == 2  # epochs 2 and 3 only: epoch 1 was not redone


@pytest.fixture(scope="module")
def mirrored_runs():
    """One step of every mode under MirroredStrategy (2 logical CPUs) and on one device (tests/mirrored_check.py)."""
    script = os.path.join(os.path.dirname(__file__), "mirrored_check.py")
    out = subprocess.run([sys.executable, script, *MODES], capture_output=True, text=True, timeout=900,
                         env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert out.returncode == 0, out.stderr[-3000:]
    runs = [json.loads(line) for line in out.stdout.splitlines() if line.startswith('{"mode"')]
    return {run["mode"]: run for run in runs}


@pytest.mark.parametrize("mode", MODES)
def test_mirrored_strategy_matches_single_device(mirrored_runs, mode):
    """Two replicas, weighted examples: the weight update and every logged value equal one device on the global
    batch."""
    run = mirrored_runs[mode]
    assert run["replicas"] == 2
    assert run["mirrored"].keys() == run["single"].keys()
    for key, value in run["single"].items():
        assert run["mirrored"][key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    assert run["max_weight_change"] > 1e-3  # the step moved the weights...
    assert run["max_weight_difference"] < 1e-5  # ...by the same amount on both


def test_unknown_layer_fails_before_training():
    with pytest.raises(ValueError, match="Unknown layer names.*'conv_9'"):
        _robust_stq(jacobian=tr.JacobianRegularizer(layers={"conv_9": 0.1}))


def test_layer_not_reaching_logits_fails_before_training():
    inputs = keras.Input((4,))
    h = keras.layers.Dense(3, name="detached")(inputs)
    h = keras.layers.Lambda(keras.ops.stop_gradient, name="stop")(h)
    outputs = keras.layers.Dense(2, name="logits")(keras.layers.Concatenate()([h, inputs]))
    with pytest.raises(ValueError, match="'detached' does not reach the logits"):
        tr.RobustModel(inputs, outputs, jacobian=tr.JacobianRegularizer(layers={"detached": 0.1}))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(method="mart"), "Received: method='mart'"),
        (dict(epsilon=-1), "Received: epsilon=-1"),
        (dict(steps=0), "Received: steps=0"),
        (dict(norm="l1"), "Received: norm='l1'"),
        (dict(input_range=(1, 0)), r"Received: input_range=\(1, 0\)"),
    ],
)
def test_bad_adversary(kwargs, message):
    with pytest.raises(ValueError, match=message):
        tr.AdversarialTraining(**kwargs)


def _dense_data(n=16):
    rng = np.random.default_rng(0)
    return rng.normal(size=(n, 6)).astype("float32"), (np.arange(n) % 3).astype("int32")


def test_trades_without_random_start_gives_every_coordinate_a_direction():
    """At the clean input TRADES' KL has no gradient (rounding noise moved a few coordinates, differently on
    each host); from the fixed start beside it, one step moves every coordinate by the step size."""
    import modes
    from tinyrobust.attacks import kernels

    x, _ = _dense_data(16)
    net = modes._network(0)
    clean = net(x, training=False)
    adversary = tr.AdversarialTraining("trades", epsilon=0.1, steps=1, step_size=0.05, input_range=(-4.0, 4.0),
                                       random_start=False)
    assert np.all(np.asarray(adversary.initial_perturbation(tf.constant(x), None, start="small")) == np.float32(0.001))
    assert not np.any(np.asarray(adversary.initial_perturbation(tf.constant(x), None)))  # PGD's start: the clean input
    runs = [np.asarray(adversary.perturb(lambda z: kernels.kl_divergence(clean, net(z, training=False)),
                                         tf.constant(x), None, start="small")) for _ in range(2)]
    np.testing.assert_array_equal(runs[0], runs[1])
    assert np.allclose(np.abs(runs[0] - x), 0.05, atol=0.0011)  # 0.001 + or - 0.05 in each coordinate


@pytest.mark.parametrize("mode", MODES)
def test_every_mode_compiles_with_xla(mode):
    x, y = _dense_data()
    runs = []
    for jit_compile in (False, True):
        trainer, trained = build(mode, jit_compile=jit_compile)
        logs = trainer.fit(x, targets(mode, trainer, x, y), batch_size=8, epochs=1, verbose=0, shuffle=False).history
        runs.append((logs, trained.get_weights()))
    (plain_logs, plain), (xla_logs, xla) = runs
    assert xla_logs.keys() == plain_logs.keys()
    assert all(np.isfinite(v[-1]) for v in xla_logs.values())
    for key in plain_logs:
        assert xla_logs[key][-1] == pytest.approx(plain_logs[key][-1], rel=1e-4, abs=1e-6), key
    for a, b in zip(plain, xla):
        np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("mode", MODES)
def test_sample_weight_reaches_every_term(mode):
    """Weights 2 on half the batch and 0 on the rest give the step (and the logs) of that half alone."""
    x, y = _dense_data(16)
    weighted, weighted_model = build(mode)
    weights = np.array([2.0] * 8 + [0.0] * 8, "float32")
    weighted_logs = weighted.fit(x, targets(mode, weighted, x, y), sample_weight=weights, batch_size=16, epochs=1,
                                 verbose=0, shuffle=False).history
    half, half_model = build(mode)
    half_logs = half.fit(x[:8], targets(mode, half, x[:8], y[:8]), batch_size=8, epochs=1, verbose=0,
                         shuffle=False).history
    for key in half_logs:
        if not key.endswith("accuracy"):  # accuracies count every example, as Keras' compiled `metrics` do
            assert weighted_logs[key][-1] == pytest.approx(half_logs[key][-1], rel=1e-5, abs=1e-6), key
    for a, b in zip(weighted_model.get_weights(), half_model.get_weights()):
        np.testing.assert_allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("mode", MODES)
def test_epsilon_and_jacobian_ramps_drive_every_mode(mode):
    x, y = _dense_data()
    trainer, _ = build(mode)
    ramps = [callbacks.EpsilonScheduler(ramp_epochs=2, start=0.25), callbacks.JacobianWeightScheduler(ramp_epochs=2)]
    logs = trainer.fit(x, targets(mode, trainer, x, y), batch_size=8, epochs=2, verbose=0, shuffle=False,
                       callbacks=ramps).history
    assert logs["epsilon_scale"] == [0.625, 1.0] and logs["jacobian_scale"] == [0.5, 1.0]
    assert float(trainer.epsilon_scale) == 1.0 and float(trainer.jacobian_scale) == 1.0


@pytest.mark.parametrize("trainer", ["robust", "distiller", "neokd"])
def test_quantization_noise_anneal_drives_every_trainer(trainer):
    x, y = _data(32)
    network = tr.models.small_cnn(quantization="stq", width=4)
    adversary = tr.AdversarialTraining("fgsm_rs", epsilon=0.05)
    if trainer == "robust":
        model = tr.RobustModel.wrap(network, adversary=adversary)
        model.compile(optimizer="adam", loss=LOSS)
    elif trainer == "distiller":
        model = distill.RobustDistiller(network, tr.models.small_cnn(width=4), adversary=adversary)
        model.compile(optimizer="adam")
    else:
        model = multiexit.NEOKD(multiexit.attach_exits(network, ["relu_1"]), adversary=adversary)
        model.compile(optimizer="adam")
    anneal = callbacks.QuantizationNoiseScheduler(ramp_epochs=2)
    logs = model.fit(x, y, batch_size=16, epochs=2, verbose=0, callbacks=[anneal]).history
    assert logs["stochasticity"] == [0.5, 0.0]


@pytest.mark.parametrize("cls, config, message", [
    (distill.RobustDistiller, {"name": "distill_ard", "student": {}, "teacher": {}, "method": "ard"},
     "saved by tinyrobust 0.1.0"),
    (multiexit.NEOKD, {"name": "neokd", "model": {}, "alpha": 3.0}, "saved by tinyrobust 0.1.0"),
])
def test_trainers_saved_before_the_single_engine_fail_naming_the_version(cls, config, message):
    with pytest.raises(ValueError, match=message):
        cls.from_config(config)


def test_no_private_keras_api_in_the_package():
    root = os.path.join(os.path.dirname(__file__), os.pardir, "tinyrobust")
    private = ("keras.src", "._compute_loss", "._loss_tracker", "._compile_metrics", "._compile_loss")
    for folder, _, files in os.walk(root):
        for name in files:
            if name.endswith(".py"):
                text = open(os.path.join(folder, name)).read()
                assert not [p for p in private if p in text], name


def test_n_fgsm_steps_from_its_noise_and_leaves_the_ball():
    """N-FGSM: noise uniform in [-2 eps, 2 eps] (kept in the input range), one step of eps, no projection."""
    from tinyrobust.attacks import kernels

    x, y = _data(32)
    net = tr.models.small_cnn(width=4)
    loss_fn = lambda z: kernels.cross_entropy(net(z, training=False), y)  # noqa: E731
    adversary = tr.AdversarialTraining("n_fgsm", epsilon=0.05)
    assert adversary.step_size_for(0.05) == 0.05 and adversary.noise == 2.0
    seed = keras.random.SeedGenerator(3)
    noise = np.asarray(adversary.initial_perturbation(tf.constant(x), seed))
    assert np.abs(noise).max() <= 0.1 + 1e-7 and np.abs(noise).max() > 0.09  # the 2 eps ball, filled
    x_adv = np.asarray(adversary.perturb(loss_fn, tf.constant(x), None, start=tf.constant(noise)))
    start = np.clip(x + noise, 0, 1)
    inside = (x_adv > 0) & (x_adv < 1)
    np.testing.assert_allclose(np.abs(x_adv - start)[inside], 0.05, atol=1e-6)  # one step of eps from the noise
    delta = x_adv - x
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert np.abs(delta).max() <= 0.15 + 1e-6
    assert np.mean(np.abs(delta) > 0.05 + 1e-6) > 0.2  # the step is not projected back onto the eps ball


def test_grad_align_term_matches_a_hand_computation():
    """lambda * (1 - cos) of the input gradients at x and at x + eta, here eta at its fixed point 0.5 eps."""
    import modes
    from tinyrobust.attacks import kernels

    x, y = _dense_data(16)
    net = modes._network(0)
    adversary = tr.AdversarialTraining("grad_align", epsilon=0.1, input_range=(-4.0, 4.0), random_start=False,
                                       align_weight=0.5)
    loss_fn = lambda z: kernels.cross_entropy(net(z, training=False), y)  # noqa: E731

    def gradient(z):
        z = tf.constant(z)
        with tf.GradientTape() as tape:
            tape.watch(z)
            loss = tf.reduce_sum(loss_fn(z))
        return tape.gradient(loss, z).numpy()

    g1, g2 = gradient(x), gradient(x + 0.05)
    cos = np.sum(g1 * g2, 1) / (np.linalg.norm(g1, axis=1) * np.linalg.norm(g2, axis=1))
    with tf.GradientTape() as tape:
        term = adversary.alignment_penalty(loss_fn, tf.constant(x), None)
    assert float(term) == pytest.approx(np.mean(1 - cos), rel=1e-5)
    weights = tape.gradient(term, net.trainable_weights)
    assert max(float(tf.reduce_max(tf.abs(w))) for w in weights) > 0  # double backpropagation reaches the weights
    # The example: FGSM from the clean input with step eps.
    x_adv = np.asarray(adversary.perturb(loss_fn, tf.constant(x), None))
    np.testing.assert_allclose(x_adv - x, 0.1 * np.sign(g1), atol=1e-6)


def test_grad_align_training_logs_its_term_and_adds_it_to_the_loss():
    x, y = _data(32)
    model = _robust_stq(adversary=tr.AdversarialTraining("grad_align", epsilon=0.05, align_weight=1.0))
    model.compile(optimizer="adam", loss=LOSS)
    logs = model.fit(x, y, batch_size=16, epochs=1, verbose=0).history
    assert {"loss", "ce", "grad_align", "adv_accuracy"} <= set(logs)
    assert 0 <= logs["grad_align"][-1] <= 2
    assert logs["loss"][-1] == pytest.approx(logs["ce"][-1] + logs["grad_align"][-1], rel=1e-5)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(method="pgd", noise=2.0), "`noise` is a setting of method 'n_fgsm'. Received: noise=2.0"),
        (dict(method="n_fgsm", align_weight=0.2), "Received: align_weight=0.2"),
        (dict(method="n_fgsm", noise=-1), "Received: noise=-1"),
        (dict(method="grad_align", align_weight="big"), "Received: align_weight='big'"),
    ],
)
def test_bad_one_step_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        tr.AdversarialTraining(**kwargs)


@pytest.mark.parametrize("method", ["n_fgsm", "grad_align"])
def test_one_step_methods_round_trip_their_settings(method, tmp_path):
    extra = {"noise": 1.5} if method == "n_fgsm" else {"align_weight": 0.3}
    model = _robust_stq(adversary=tr.AdversarialTraining(method, epsilon=0.05, **extra))
    model.compile(optimizer="adam", loss=LOSS)
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert loaded.adversary.get_config() == model.adversary.get_config()
    assert loaded.adversary.get_config()[next(iter(extra))] == next(iter(extra.values()))


def test_one_step_rslad_starts_uniformly_in_the_ball():
    """RSLAD asks for its small Gaussian start, made for its 10-step PGD; a one-step adversary starts uniformly
    in the ball instead, so its examples are not all on the corners +-eps (they were: 100% of coordinates)."""
    x, y = _data(32)
    student, teacher = tr.models.small_cnn(width=4, name="student"), tr.models.small_cnn(width=4, name="teacher")
    results = {}
    for method in ("rslad", "ard"):
        model = distill.RobustDistiller(student, teacher, method=method,
                                        adversary=tr.AdversarialTraining("fgsm_rs", epsilon=0.1, seed=0))
        x_adv = np.asarray(model.adversarial_examples(x, y))
        delta = np.abs(x_adv - x)[(x_adv > 0) & (x_adv < 1)]
        results[method] = np.mean(np.isclose(delta, 0.1, atol=1e-6))
    assert results["rslad"] < 0.9 and results["ard"] < 0.9
    assert results["rslad"] == pytest.approx(results["ard"], abs=0.05)


def test_batch_fraction_jacobian_is_an_unbiased_estimate_of_the_whole_batch():
    import modes

    x, y = _dense_data(16)
    net = modes._network(0)
    terms = {}
    for fraction in (1.0, 0.25):
        model = tr.RobustModel.wrap(net, jacobian=tr.JacobianRegularizer(
            layers={"input": 1.0, "hidden": 1.0}, num_projections=None, batch_fraction=fraction, seed=0))
        draws = [model.forward_with_jacobian(tf.constant(x))[1] for _ in range(1 if fraction == 1 else 400)]
        terms[fraction] = {k: np.mean([float(d[k]) for d in draws]) for k in draws[0]}
        if fraction < 1:  # each draw is the exact mean term of 4 of the 16 examples
            single = tr.RobustModel.wrap(net, jacobian=tr.JacobianRegularizer(layers={"input": 1.0},
                                                                             num_projections=None))
            per_example = [float(single.forward_with_jacobian(tf.constant(x[i:i + 1]))[1]["input"]) for i in range(16)]
            subset_means = [np.mean(c) for c in itertools.combinations(per_example, 4)]
            for draw in draws[:3]:
                assert np.min(np.abs(np.array(subset_means) - float(draw["input"]))) < 1e-4 * float(draw["input"])
    for key in terms[1.0]:
        assert terms[0.25][key] == pytest.approx(terms[1.0][key], rel=0.06), key


def test_bad_batch_fraction():
    for value in (0, 1.5, "half"):
        with pytest.raises(ValueError, match=f"Received: batch_fraction={value!r}"):
            tr.JacobianRegularizer(batch_fraction=value)


def test_batch_fraction_jacobian_trains_and_round_trips(tmp_path):
    x, y = _data(32)
    jacobian = tr.JacobianRegularizer(layers={"input": 0.01, "relu_2": 0.01}, batch_fraction=0.25)
    model = _robust_stq(jacobian=jacobian, adversary=tr.AdversarialTraining("n_fgsm", epsilon=0.05))
    model.compile(optimizer="adam", loss=LOSS)
    logs = model.fit(x, y, batch_size=16, epochs=1, verbose=0).history
    assert {"jacobian/input", "jacobian/relu_2"} <= set(logs) and np.isfinite(logs["loss"][-1])
    path = str(tmp_path / "m.keras")
    model.save(path)
    assert keras.saving.load_model(path).jacobian.batch_fraction == 0.25


def test_metrics_a_step_cannot_compute_are_named_at_compile():
    model = _robust_stq(adversary=tr.AdversarialTraining("pgd", epsilon=0.05, steps=1))
    with pytest.warns(UserWarning, match="no clean pass, so the metrics \\['accuracy'\\] are not computed"):
        model.compile(optimizer="adam", loss=LOSS, metrics=["accuracy"])
    opted_in = _robust_stq(adversary=tr.AdversarialTraining("pgd", epsilon=0.05, steps=1), clean_metrics=True)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opted_in.compile(optimizer="adam", loss=LOSS, metrics=["accuracy"])
        _robust_stq(adversary=tr.AdversarialTraining("trades", epsilon=0.05, steps=1)).compile(
            optimizer="adam", loss=LOSS, metrics=["accuracy"])
