import keras
import numpy as np
import pytest
import tensorflow as tf

from tinyrobust import quantizers


def _weights(shape=(3, 3, 4, 8), seed=0):
    return (np.random.default_rng(seed).normal(size=shape) * 0.1).astype("float32")


@pytest.mark.parametrize("cls", [quantizers.StochasticTernary, quantizers.StochasticBinary])
def test_stochastic_mean_is_clipped_input(cls):
    """Over many draws the mean of the quantized value is the clipped input."""
    x = _weights()
    quantizer = cls(seed=7)
    alpha = keras.ops.convert_to_numpy(quantizer.scale(keras.ops.convert_to_tensor(x)))
    draws = np.stack([keras.ops.convert_to_numpy(quantizer(x, training=True)) for _ in range(3000)])
    expected = np.clip(x, -alpha, alpha)
    # Each draw is bounded by alpha: the standard error of 3000 draws is <= alpha / sqrt(3000).
    tolerance = 5 * np.broadcast_to(alpha, x.shape) / np.sqrt(len(draws))
    assert np.all(np.abs(draws.mean(0) - expected) < tolerance)


def test_stochastic_ternary_values_and_determinism():
    x = _weights()
    quantizer = quantizers.StochasticTernary(seed=1)
    alpha = keras.ops.convert_to_numpy(quantizer.scale(keras.ops.convert_to_tensor(x)))
    for training in (True, False):
        y = keras.ops.convert_to_numpy(quantizer(x, training=training))
        for c in range(x.shape[-1]):
            assert set(np.unique(y[..., c])) <= {-alpha.ravel()[c], 0.0, alpha.ravel()[c]}
    np.testing.assert_array_equal(quantizer(x, training=False), quantizer(x, training=False))
    deterministic = keras.ops.convert_to_numpy(quantizer(x, training=False))
    expected = np.where(np.abs(x) > 0.33 * alpha, np.sign(x) * alpha, 0.0)
    np.testing.assert_allclose(deterministic, expected, rtol=1e-6)


def test_ternary_equals_stochastic_ternary_at_inference():
    x = _weights()
    np.testing.assert_array_equal(quantizers.Ternary()(x), quantizers.StochasticTernary()(x, training=False))
    np.testing.assert_array_equal(quantizers.Ternary()(x, training=True), quantizers.Ternary()(x))


def test_reproducible_from_seed():
    x = _weights()
    a = [quantizers.StochasticTernary(seed=5)(x, training=True) for _ in range(2)]
    np.testing.assert_array_equal(a[0], a[1])
    q = quantizers.StochasticTernary(seed=5)
    assert not np.array_equal(q(x, training=True), q(x, training=True))


def test_stochasticity_zero_is_deterministic():
    x = _weights()
    q = quantizers.StochasticTernary(stochasticity=0.0, seed=3)
    np.testing.assert_array_equal(q(x, training=True), q(x, training=False))


@pytest.mark.parametrize("alias", ["stochastic_ternary", "stochastic_binary", "ternary"])
def test_straight_through_gradient(alias):
    x = tf.Variable(_weights())
    quantizer = quantizers.get(alias)
    alpha = quantizer.scale(tf.convert_to_tensor(x))
    with tf.GradientTape() as tape:
        y = tf.reduce_sum(quantizer(x, training=True) * 3.0)
    gradient = tape.gradient(y, x).numpy()
    assert np.all(np.isfinite(gradient))
    # d/dx of clip(x, -alpha, alpha) * 3: 3 inside the range, 0 outside.
    inside = np.abs(x.numpy()) <= alpha.numpy()
    np.testing.assert_allclose(gradient, np.where(inside, 3.0, 0.0))
    assert gradient.any()


def test_integer_quantizers_on_grid():
    x = np.linspace(-1.5, 1.5, 101).astype("float32")
    y = keras.ops.convert_to_numpy(quantizers.get("int4")(x))
    np.testing.assert_allclose(y * 8, np.round(y * 8))  # 4 bits, 0 integer bits: grid 1/8
    assert y.min() >= -1 and y.max() < 1
    relu = keras.ops.convert_to_numpy(quantizers.get("relu_int8")(x))
    assert relu.min() == 0 and np.allclose(relu * 32, np.round(relu * 32))


@pytest.mark.parametrize("alias, precision", [("stq", 2), ("ternary", 2), ("stb", 1), ("int8", 8), ("int4", 4),
                                              ("relu_int8", 8)])
def test_get_alias_instance_dict(alias, precision):
    quantizer = quantizers.get(alias)
    assert quantizer.precision == precision
    assert quantizers.get(quantizer) is quantizer
    config = quantizers.serialize(quantizer)
    clone = quantizers.get(config)
    assert type(clone) is type(quantizer) and clone.get_config() == quantizer.get_config()
    assert quantizers.get(None) is None


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: quantizers.StochasticTernary(threshold=-1), "Received: threshold=-1"),
        (lambda: quantizers.StochasticTernary(threshold=1.5), "Received: threshold=1.5"),
        (lambda: quantizers.StochasticTernary(alpha="max"), "Received: alpha='max'"),
        (lambda: quantizers.StochasticBinary(alpha=0), "Received: alpha=0"),
        (lambda: quantizers.StochasticTernary(stochasticity=2), "Received: stochasticity=2"),
        (lambda: quantizers.QuantizedBits(bits=1), "Received: bits=1"),
        (lambda: quantizers.QuantizedReLU(bits=4, integer=4), "Received: integer=4"),
        (lambda: quantizers.get("ternery"), "Received: identifier='ternery'"),
        (lambda: quantizers.get(3), "Received: identifier=3"),
        (lambda: quantizers.preset("int3"), "Received: quantization='int3'"),
    ],
)
def test_bad_arguments(build, message):
    with pytest.raises(ValueError, match=message):
        build()


@pytest.mark.parametrize("name", sorted(quantizers.PRESETS))
def test_presets_give_fresh_quantizers(name):
    preset = quantizers.preset(name)
    a, b = preset.kernel_quantizer(), preset.kernel_quantizer()
    assert (a is None and b is None) or a is not b
    assert preset.is_float == (name == "float")


@pytest.mark.parametrize("bits, integer", [(8, 0), (4, 0), (8, 3), (2, 1), (16, 4)])
def test_quantized_relu_equals_qkeras_bit_for_bit_with_the_same_gradient(bits, integer):
    import qkeras

    rng = np.random.default_rng(0)
    step = 2.0 ** (integer - bits)
    top = 2.0**integer
    x = np.concatenate([rng.normal(scale=top, size=4000), rng.uniform(-2 * top, 2 * top, size=4000),
                        np.arange(-8, 2**bits + 8) * step, (np.arange(-8, 2**bits + 8) + 0.5) * step,  # grid, ties
                        [0.0, -0.0, top - step, top, 1e-30, -1e-30, 1e30, -1e30]]).astype("float32")
    ours, reference = quantizers.QuantizedReLU(bits, integer), qkeras.quantized_relu(bits=bits, integer=integer)
    x_t = tf.constant(x)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x_t)
        y_ours, y_reference = ours(x_t), reference(x_t)
    np.testing.assert_array_equal(y_ours.numpy().view(np.uint32), y_reference.numpy().view(np.uint32))
    np.testing.assert_array_equal(tape.gradient(y_ours, x_t).numpy(), tape.gradient(y_reference, x_t).numpy())
    # Where x * 2**(bits - integer) overflows float32, qkeras gives NaN (inf - inf); we give the clip values.
    np.testing.assert_array_equal(ours(tf.constant([3e38, -3e38])).numpy(), [top - step, 0.0])
