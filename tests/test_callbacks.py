import csv

import keras
import numpy as np
import pytest

import tinyrobust as tr
from tinyrobust import callbacks

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _data(n=32):
    rng = np.random.default_rng(0)
    return rng.uniform(size=(n, 28, 28, 1)).astype("float32"), (np.arange(n) % 10).astype("int32")


def _model(**kwargs):
    model = tr.RobustModel.wrap(tr.models.small_cnn(quantization="stq", width=4), **kwargs)
    model.compile(optimizer="adam", loss=LOSS, metrics=["accuracy"])
    return model


class _Seen(keras.callbacks.Callback):
    """Records a variable's value during each epoch (after schedulers ran)."""

    def __init__(self, read):
        super().__init__()
        self.read, self.values = read, []

    def on_train_batch_begin(self, batch, logs=None):
        if batch == 0:
            self.values.append(round(float(self.read(self.model)), 6))


def test_jacobian_weight_warm_up():
    model = _model(jacobian=tr.JacobianRegularizer())
    seen = _Seen(lambda m: m.jacobian_scale)
    x, y = _data()
    model.fit(x, y, epochs=4, batch_size=16, verbose=0,
              callbacks=[callbacks.JacobianWeightScheduler(ramp_epochs=2, start_epoch=1), seen])
    assert seen.values == [0.0, 0.5, 1.0, 1.0]


def test_epsilon_ramp():
    model = _model(adversary=tr.AdversarialTraining("fgsm_rs", epsilon=0.1))
    seen = _Seen(lambda m: m.epsilon_scale)
    x, y = _data()
    model.fit(x, y, epochs=3, batch_size=16, verbose=0, callbacks=[callbacks.EpsilonScheduler(ramp_epochs=3), seen])
    assert seen.values == pytest.approx([1 / 3, 2 / 3, 1.0], abs=1e-6)


def test_quantization_noise_fades_to_deterministic():
    model = _model()
    quantizer = model.get_layer("conv_2").kernel_quantizer
    seen = _Seen(lambda m: quantizer.stochasticity)
    x, y = _data()
    model.fit(x, y, epochs=3, batch_size=16, verbose=0,
              callbacks=[callbacks.QuantizationNoiseScheduler(ramp_epochs=2), seen])
    assert seen.values == [0.5, 0.0, 0.0]
    # Fully faded: training-mode quantization equals inference.
    kernel = model.get_layer("conv_2").kernel
    np.testing.assert_array_equal(quantizer(kernel, training=True), quantizer(kernel, training=False))


def test_cosine_learning_rate_warms_up_then_decays_and_logs_it():
    model = _model()
    seen = _Seen(lambda m: m.optimizer.learning_rate)
    x, y = _data()
    history = model.fit(x, y, epochs=5, batch_size=16, verbose=0,
                        callbacks=[callbacks.CosineLearningRate(0.01, epochs=5, warmup_epochs=1), seen])
    expected = [0.01, 0.01, 0.01 * (1 + np.cos(np.pi / 4)) / 2, 0.005, 0.01 * (1 + np.cos(3 * np.pi / 4)) / 2]
    assert seen.values == pytest.approx(expected, abs=1e-6)
    assert history.history["learning_rate"] == pytest.approx(expected, abs=1e-6)
    constant = callbacks.CosineLearningRate(0.01, epochs=4, warmup_epochs=2, final_fraction=1.0)
    assert [constant.value(e) for e in range(4)] == pytest.approx([0.005, 0.01, 0.01, 0.01])


def test_schedulers_need_a_robust_model_or_stochastic_quantizers():
    plain = tr.models.small_cnn(width=4)
    plain.compile(optimizer="adam", loss=LOSS)
    x, y = _data(16)
    with pytest.raises(ValueError, match="needs a tinyrobust.RobustModel"):
        plain.fit(x, y, epochs=1, verbose=0, callbacks=[callbacks.JacobianWeightScheduler(1)])
    with pytest.raises(ValueError, match="no stochastic quantizer"):
        plain.fit(x, y, epochs=1, verbose=0, callbacks=[callbacks.QuantizationNoiseScheduler(1)])


def test_robust_accuracy_feeds_checkpoint_early_stopping_and_csv(tmp_path):
    model = _model()
    x, y = _data()
    csv_path = tmp_path / "log.csv"
    robust = callbacks.RobustAccuracy(x[:16], y[:16], epsilon=0.05, every=2)
    model.fit(x, y, epochs=3, batch_size=16, verbose=0, callbacks=[
        robust,
        keras.callbacks.ModelCheckpoint(str(tmp_path / "best.keras"), monitor="robust_accuracy", mode="max",
                                        save_best_only=True),
        keras.callbacks.EarlyStopping(monitor="robust_accuracy", mode="max", patience=5),
        keras.callbacks.CSVLogger(str(csv_path)),
    ])
    rows = list(csv.DictReader(open(csv_path)))
    assert len(rows) == 3 and all(0.0 <= float(r["robust_accuracy"]) <= 1.0 for r in rows)
    assert (tmp_path / "best.keras").exists()


def test_robust_accuracy_is_at_most_clean_accuracy_on_trained_model():
    keras.utils.set_random_seed(0)
    x, y = tr.data.load_arrays("fashion_mnist", "train", limit=1024)
    # No batch norm: its moving statistics would need far more steps to settle.
    model = keras.Sequential([keras.Input((28, 28, 1)), keras.layers.Flatten(), keras.layers.Dense(64, activation="relu"),
                              keras.layers.Dense(10)])
    model.compile(optimizer="adam", loss=LOSS, metrics=["accuracy"])
    model.fit(x, y, epochs=5, batch_size=32, verbose=0)
    robust = callbacks.RobustAccuracy(x[:200], y[:200], epsilon=0.1)
    robust.set_model(model)
    clean = model.evaluate(x[:200], y[:200], verbose=0, return_dict=True)["accuracy"]
    attacked = robust.evaluate()
    assert clean > 0.5 and attacked < clean - 0.2


def test_robust_accuracy_attacks_the_last_exit_of_a_multi_exit_model():
    x, y = _data(16)
    backbone = tr.models.small_cnn(width=4)
    network = tr.multiexit.attach_exits(backbone, ["relu_1"])
    final = keras.Model(network.inputs, network.outputs[-1])
    seen = []

    def attack(model, x, y):
        seen.append(len(model.outputs))
        return x

    robust = callbacks.RobustAccuracy(x, y, attack=attack)
    robust.set_model(network)
    expected = np.mean(np.argmax(final.predict(x, verbose=0), axis=-1) == y)
    assert robust.evaluate() == pytest.approx(expected) and seen == [1]


class _Scripted(callbacks.RobustEarlyStopping):
    """Held-out robust accuracy read from a script instead of measured, one value per epoch."""

    def __init__(self, values, **kwargs):
        x, y = _data(4)
        super().__init__(x, y, **kwargs)
        self.values = values

    def evaluate(self):
        return self.values[len(self.history)]


class _Snapshots(keras.callbacks.Callback):
    """Every weight of the model at the end of each epoch."""

    def __init__(self):
        super().__init__()
        self.epochs = []

    def on_epoch_end(self, epoch, logs=None):
        self.epochs.append({v.path: keras.ops.convert_to_numpy(v) for v in self.model.weights})


def _stochasticity(model):
    return [v.path for v in model.weights if v.path.endswith("stochasticity")]


def test_robust_early_stopping_stops_on_a_collapse_and_restores_the_best_learned_weights():
    model = _model(adversary={"method": "fgsm_rs", "epsilon": 0.05})
    x, y = _data()
    guard = _Scripted([0.3, 0.6, 0.5, 0.3, 0.9], collapse=0.2)
    snapshots = _Snapshots()
    history = model.fit(x, y, epochs=5, batch_size=16, verbose=0, callbacks=[
        guard, callbacks.QuantizationNoiseScheduler(2, start_epoch=1), snapshots])
    # Epoch 4 (1-based) fell 0.3 below the best (epoch 2): training stopped there, epoch 5 never ran.
    assert guard.record() == {"robust_accuracy": [0.3, 0.6, 0.5, 0.3], "best_epoch": 2, "stopped_epoch": 4}
    assert history.history["robust_accuracy"] == [0.3, 0.6, 0.5, 0.3] and len(snapshots.epochs) == 4
    scheduled = {"robust_small_cnn_stq/jacobian_scale", "robust_small_cnn_stq/epsilon_scale", *_stochasticity(model)}
    for variable in model.weights:
        expected = snapshots.epochs[3 if variable.path in scheduled else 1][variable.path]
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(variable), expected, err_msg=variable.path)
    assert not np.array_equal(snapshots.epochs[1]["conv_1/kernel"], snapshots.epochs[3]["conv_1/kernel"])
    # The schedulers' variables keep their last values: the noise had faded to 0 at epoch 3 (0-based).
    assert all(float(keras.ops.convert_to_numpy(v)) == 0.0 for v in model.weights if v.path in _stochasticity(model))


def test_robust_early_stopping_without_collapse_runs_every_epoch_and_can_keep_the_last_weights():
    model = _model()
    x, y = _data()
    guard = _Scripted([0.5, 0.1, 0.2], collapse=None, restore_best_weights=False)
    snapshots = _Snapshots()
    model.fit(x, y, epochs=3, batch_size=16, verbose=0, callbacks=[guard, snapshots])
    assert guard.record() == {"robust_accuracy": [0.5, 0.1, 0.2], "best_epoch": 1, "stopped_epoch": None}
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(model.get_layer("conv_1").kernel),
                                  snapshots.epochs[2]["conv_1/kernel"])


class _Interrupt(keras.callbacks.Callback):
    """Dies at the end of an epoch: after the guard recorded it, before `BackupAndRestore` saved it."""

    def __init__(self, epoch):
        super().__init__()
        self.epoch = epoch

    def on_epoch_end(self, epoch, logs=None):
        if epoch == self.epoch:
            raise KeyboardInterrupt


class _Batches(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.count = 0

    def on_train_batch_end(self, batch, logs=None):
        self.count += 1


def _guarded_fit(path, values, interrupt=None, delete_checkpoint=True):
    """A seeded STQ model trained 5 epochs of 2 batches with a scripted guard kept in `path`; returns (model,
    guard, batches trained)."""
    keras.utils.set_random_seed(0)
    model = _model(adversary={"method": "fgsm_rs", "epsilon": 0.05})
    guard = _Scripted(values, collapse=0.2, path=path / "guard")
    batches = _Batches()
    steps = [guard, *([] if interrupt is None else [_Interrupt(interrupt)]),
             keras.callbacks.BackupAndRestore(str(path / "backup"), delete_checkpoint=delete_checkpoint),
             callbacks.SeedEachEpoch(0), batches]
    x, y = _data()
    try:
        model.fit(x, y, epochs=5, batch_size=16, shuffle=False, verbose=0, callbacks=steps)
    except KeyboardInterrupt:
        pass
    return model, guard, batches.count


@pytest.mark.parametrize("values", [[0.3, 0.6, 0.5, 0.55, 0.58], [0.3, 0.6, 0.5, 0.3, 0.9]],
                         ids=["runs_to_the_end", "stops"])
def test_robust_early_stopping_resumed_selects_like_an_uninterrupted_run(tmp_path, values):
    whole, whole_guard, _ = _guarded_fit(tmp_path / "whole", values)
    # Epoch 3 (1-based) is recorded by the guard but not backed up: the resumed run trains and records it again.
    _guarded_fit(tmp_path / "cut", values, interrupt=2)
    resumed, resumed_guard, _ = _guarded_fit(tmp_path / "cut", values)
    assert resumed_guard.record() == whole_guard.record()
    for a, b in zip(whole.weights, resumed.weights):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b), err_msg=a.path)


def test_robust_early_stopping_resumed_after_it_stopped_trains_no_further(tmp_path):
    values = [0.3, 0.6, 0.5, 0.3, 0.9]
    # The backup is kept, as if the process had died after stopping and before the model was saved.
    first, first_guard, _ = _guarded_fit(tmp_path, values, delete_checkpoint=False)
    again, again_guard, batches = _guarded_fit(tmp_path, values)
    assert again_guard.record() == first_guard.record() and first_guard.record()["stopped_epoch"] == 4
    assert batches == 1  # Keras checks `stop_training` after a batch; the fifth epoch's other batch never runs
    for a, b in zip(first.weights, again.weights):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b), err_msg=a.path)


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: callbacks.JacobianWeightScheduler(ramp_epochs=-1), "Received: ramp_epochs=-1"),
        (lambda: callbacks.QuantizationNoiseScheduler(2, end=1.5), "Received: end=1.5"),
        (lambda: callbacks.CosineLearningRate(0.01, epochs=3, warmup_epochs=3), "Received: warmup_epochs=3"),
        (lambda: callbacks.CosineLearningRate(0.0, epochs=3), "Received: learning_rate=0.0"),
        (lambda: callbacks.CosineLearningRate(0.01, epochs=3, final_fraction=2), "Received: final_fraction=2"),
        (lambda: callbacks.RobustAccuracy(np.zeros((0, 2)), np.zeros(0)), r"Received: len\(x\)=0"),
        (lambda: callbacks.RobustAccuracy(np.zeros((2, 2)), np.zeros(2), every=0), "Received: every=0"),
        (lambda: callbacks.RobustEarlyStopping(np.zeros((2, 2)), np.zeros(2), collapse=0), "Received: collapse=0"),
        (lambda: callbacks.RobustEarlyStopping(np.zeros((2, 2)), np.zeros(2), restore_best_weights="yes"),
         "Received: restore_best_weights='yes'"),
    ],
)
def test_bad_arguments(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_stop_on_non_finite_loss_raises_before_anything_else_runs():
    x = np.random.default_rng(0).random((64, 4)).astype("float32")
    y = np.zeros(64, "int32")
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(2)(inputs))
    model.compile("sgd", lambda y_true, logits: keras.ops.mean(keras.ops.log(logits - 1e9)))  # log of negatives
    with pytest.raises(ValueError, match=r"Training diverged: `loss` is nan at epoch 1, batch 1"):
        model.fit(x, y, batch_size=8, epochs=3, verbose=0, callbacks=[callbacks.StopOnNonFiniteLoss()])


def test_seed_each_epoch_sets_every_random_state_from_the_seed_and_the_epoch():
    import tensorflow as tf

    from tinyrobust import seeding

    adversary = tr.AdversarialTraining("pgd", epsilon=0.1, steps=2)
    model = _model(jacobian=tr.JacobianRegularizer(weight=0.1), adversary=adversary)
    states = seeding.seed_states(model)
    paths = [state.path for state in states]
    assert any("attack_seed" in p for p in paths) and any("projection_seed" in p for p in paths)
    assert sum("seed_generator" in p for p in paths) >= 2  # the STQ quantizers
    epoch = tf.Variable(0, dtype=tf.int64)
    seeder = callbacks.SeedEachEpoch(7, epoch=epoch)
    seeder.set_model(model)
    seeder.on_epoch_begin(2)
    start = [state.numpy().copy() for state in states]
    assert int(epoch.numpy()) == 2
    x, y = _data()
    model.fit(x, y, epochs=1, verbose=0)  # draws advance the states
    assert any(not np.array_equal(s, state.numpy()) for s, state in zip(start, states))
    seeder.on_epoch_begin(2)
    assert all(np.array_equal(s, state.numpy()) for s, state in zip(start, states))
    seeder.on_epoch_begin(3)
    assert all(not np.array_equal(s, state.numpy()) for s, state in zip(start, states))
    assert len({int(s[0]) for s in start}) == len(start)  # one stream per generator
    with pytest.raises(ValueError, match="Received: seed=-1"):
        callbacks.SeedEachEpoch(-1)


def test_robust_early_stopping_keeps_only_epochs_after_the_noise_faded():
    """Epoch 2 (1-based) is the best, but the noise fades over epochs 2-3: the kept weights are the best of the
    epochs trained without noise (3 and 4), so every arm ships the annealed model it was selected as."""
    model = _model()
    x, y = _data()
    guard = _Scripted([0.3, 0.7, 0.5, 0.6], collapse=None, keep_from_epoch=2)
    snapshots = _Snapshots()
    model.fit(x, y, epochs=4, batch_size=16, verbose=0, callbacks=[
        callbacks.QuantizationNoiseScheduler(2, start_epoch=1), guard, snapshots])
    assert guard.record() == {"robust_accuracy": [0.3, 0.7, 0.5, 0.6], "best_epoch": 4, "stopped_epoch": None,
                              "keep_from_epoch": 3}
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(model.get_layer("conv_1").kernel),
                                  snapshots.epochs[3]["conv_1/kernel"])


def test_robust_early_stopping_collapse_before_the_fade_keeps_the_best_checked_epoch():
    model = _model()
    x, y = _data()
    guard = _Scripted([0.6, 0.3, 0.9], collapse=0.2, keep_from_epoch=2)
    model.fit(x, y, epochs=3, batch_size=16, verbose=0, callbacks=[guard])
    assert guard.record() == {"robust_accuracy": [0.6, 0.3], "best_epoch": 1, "stopped_epoch": 2,
                              "keep_from_epoch": 3}


def test_robust_accuracy_of_the_weakest_exit():
    from tinyrobust import multiexit

    keras.utils.set_random_seed(0)
    network = multiexit.attach_exits(tr.models.small_cnn(width=4), ["relu_1"])
    x, y = _data(8)
    identity = lambda model, x, y: x  # noqa: E731  (no attack: the clean accuracies)
    outputs = network(x, training=False)
    per_exit = [float(np.mean(np.argmax(keras.ops.convert_to_numpy(z), -1) == y)) for z in outputs]
    checker = callbacks.RobustAccuracy(x, y, attack=identity, exit="weakest")
    checker.set_model(network)
    assert checker.evaluate() == min(per_exit)
    final = callbacks.RobustAccuracy(x, y, attack=identity)
    final.set_model(network)
    assert final.evaluate() == per_exit[-1]
    with pytest.raises(ValueError, match="Received: exit='all'"):
        callbacks.RobustAccuracy(x, y, exit="all")
