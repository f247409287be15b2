import keras
import numpy as np
import pytest
import tensorflow as tf

import tinyrobust as tr
from tinyrobust import jacobian


def _dense_model(classes=5):
    inputs = keras.Input((6,))
    h = keras.layers.Dense(8, activation="tanh", name="hidden")(inputs)
    return keras.Model(inputs, keras.layers.Dense(classes, name="logits")(h))


def _conv_model(classes=4):
    inputs = keras.Input((6, 6, 2))
    h = keras.layers.Conv2D(3, 3, activation="tanh")(inputs)
    h = keras.layers.Flatten()(h)
    return keras.Model(inputs, keras.layers.Dense(classes)(h))


def _exact(model, x):
    x = tf.convert_to_tensor(x)
    with tf.GradientTape() as tape:
        tape.watch(x)
        z = model(x)
    j = tape.batch_jacobian(z, x)
    return float(tf.reduce_mean(tf.reduce_sum(tf.reshape(j, (x.shape[0], -1)) ** 2, axis=-1)))


@pytest.mark.parametrize("build, shape", [(_dense_model, (16, 6)), (_conv_model, (8, 6, 6, 2))])
def test_exact_mode_matches_batch_jacobian(build, shape):
    model = build()
    x = np.random.default_rng(0).normal(size=shape).astype("float32")
    value = float(jacobian.frobenius_sq(model, x, num_projections=None))
    assert value == pytest.approx(_exact(model, x), rel=1e-5)


@pytest.mark.parametrize("build, shape", [(_dense_model, (16, 6)), (_conv_model, (8, 6, 6, 2))])
def test_projection_estimate_is_unbiased(build, shape):
    model = build()
    x = np.random.default_rng(0).normal(size=shape).astype("float32")
    seed = keras.random.SeedGenerator(3)
    estimates = [float(jacobian.frobenius_sq(model, x, num_projections=1, seed=seed)) for _ in range(400)]
    # Mean of 400 one-projection estimates: within a few percent of the exact value.
    assert np.mean(estimates) == pytest.approx(_exact(model, x), rel=0.05)
    several = float(jacobian.frobenius_sq(model, x, num_projections=4, seed=seed))
    assert several > 0


def test_gradient_wrt_weights_matches_finite_differences():
    keras.utils.set_random_seed(0)
    model = _dense_model()
    x = np.random.default_rng(1).normal(size=(4, 6)).astype("float32")
    kernel = model.get_layer("hidden").kernel
    with tf.GradientTape() as tape:
        value = jacobian.frobenius_sq(model, x, num_projections=None)
    analytic = tape.gradient(value, kernel).numpy()
    original = kernel.numpy().astype("float64")
    numeric = np.zeros_like(original)
    h = 1e-3
    for index in [(0, 0), (2, 3), (5, 7), (1, 4)]:
        for sign in (1, -1):
            shifted = original.copy()
            shifted[index] += sign * h
            kernel.assign(shifted.astype("float32"))
            numeric[index] += sign * float(jacobian.frobenius_sq(model, x, num_projections=None)) / (2 * h)
        kernel.assign(original.astype("float32"))
        assert analytic[index] == pytest.approx(numeric[index], rel=2e-2, abs=1e-3)


def test_double_backprop_through_stq_is_finite():
    model = tr.models.small_cnn(quantization="stq", width=4)
    x = np.random.default_rng(0).uniform(size=(2, 28, 28, 1)).astype("float32")
    with tf.GradientTape() as tape:
        value = jacobian.frobenius_sq(lambda z: model(z, training=True), x)
    gradients = tape.gradient(value, model.trainable_weights)
    assert all(np.all(np.isfinite(g)) for g in gradients if g is not None)
    assert any(np.any(g.numpy() != 0) for g in gradients if g is not None)


def test_regularizer_config_round_trip():
    reg = tr.JacobianRegularizer(layers={"input": 0.01, "conv_2": 0.005}, num_projections=2, seed=4)
    clone = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(reg))
    assert clone.get_config() == reg.get_config()
    assert tr.JacobianRegularizer().layers == {"input": 0.01}
    assert tr.JacobianRegularizer(weight=0.1).layers == {"input": 0.1}


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(weight=-1.0), "Received: weight=-1.0"),
        (dict(layers={"conv_2": -0.5}), "Received: weight=-0.5"),
        (dict(num_projections=0), "Received: num_projections=0"),
        (dict(layers={}), "Received: layers={}"),
        (dict(weight=0.1, layers={"input": 0.1}), "Received: weight=0.1"),
    ],
)
def test_bad_regularizer(kwargs, message):
    with pytest.raises(ValueError, match=message):
        tr.JacobianRegularizer(**kwargs)
