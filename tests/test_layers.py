import inspect

import keras
import numpy as np
import pytest
import qkeras
import tensorflow as tf

import tinyrobust as tr
from tinyrobust import layers, quantizers
from tinyrobust.testing import layer_test

KERNEL_QUANTIZERS = ["stochastic_ternary", "ternary", "stochastic_binary", "int8", "int4", None]


@pytest.mark.parametrize("quantizer", KERNEL_QUANTIZERS)
def test_qconv2d(quantizer):
    layer_test(layers.QConv2D, dict(filters=4, kernel_size=3, kernel_quantizer=quantizer, bias_quantizer="int8"),
               input_shape=(2, 6, 6, 3))


@pytest.mark.parametrize("quantizer", KERNEL_QUANTIZERS)
def test_qdepthwiseconv2d(quantizer):
    layer_test(layers.QDepthwiseConv2D, dict(kernel_size=3, depth_multiplier=2, depthwise_quantizer=quantizer),
               input_shape=(2, 6, 6, 3))


@pytest.mark.parametrize("quantizer", KERNEL_QUANTIZERS)
def test_qdense(quantizer):
    layer_test(layers.QDense, dict(units=5, kernel_quantizer=quantizer, activation="relu"), input_shape=(3, 7))


@pytest.mark.parametrize("activation", ["relu_int8", "relu_int4", "relu", {"class_name": "QuantizedReLU",
                                                                           "config": {"bits": 6, "integer": 2},
                                                                           "module": None,
                                                                           "registered_name": "tinyrobust>QuantizedReLU"}])
def test_qactivation(activation):
    layer_test(layers.QActivation, dict(activation=activation), input_shape=(2, 4, 4, 3))


@pytest.mark.parametrize(
    "qlayer, klayer, extra",
    [
        (layers.QConv2D, keras.layers.Conv2D, {"kernel_quantizer", "bias_quantizer"}),
        (layers.QDepthwiseConv2D, keras.layers.DepthwiseConv2D, {"depthwise_quantizer", "bias_quantizer"}),
        (layers.QDense, keras.layers.Dense, {"kernel_quantizer", "bias_quantizer"}),
    ],
)
def test_signature_mirrors_keras(qlayer, klayer, extra):
    ours = inspect.signature(qlayer.__init__).parameters
    theirs = inspect.signature(klayer.__init__).parameters
    assert [p for p in ours if p not in extra] == list(theirs)
    for name, parameter in theirs.items():
        assert ours[name].default == parameter.default, name


def test_layers_are_qkeras_layers():
    assert issubclass(layers.QConv2D, qkeras.QConv2D)
    assert issubclass(layers.QDepthwiseConv2D, qkeras.QDepthwiseConv2D)
    assert issubclass(layers.QDense, qkeras.QDense)
    assert issubclass(layers.QActivation, qkeras.QActivation)


def test_float_layer_equals_keras_layer():
    x = np.random.default_rng(0).normal(size=(2, 5, 5, 3)).astype("float32")
    ours, theirs = layers.QConv2D(4, 3, activation="relu"), keras.layers.Conv2D(4, 3, activation="relu")
    ours.build(x.shape)
    theirs.build(x.shape)
    theirs.set_weights(ours.get_weights())
    np.testing.assert_allclose(ours(x), theirs(x), rtol=1e-5, atol=1e-6)


def test_quantized_layer_equals_float_layer_on_quantized_weights():
    x = np.random.default_rng(0).normal(size=(2, 5, 5, 3)).astype("float32")
    ours = layers.QConv2D(4, 3, kernel_quantizer="ternary", bias_quantizer="int8")
    ours.build(x.shape)
    folded = layers.quantized_weights(ours)
    theirs = keras.layers.Conv2D(4, 3)
    theirs.build(x.shape)
    theirs.set_weights([folded["kernel"], folded["bias"]])
    np.testing.assert_allclose(ours(x), theirs(x), rtol=1e-5, atol=1e-6)


def _stq_model(seed=3):
    inputs = keras.Input((8, 8, 1))
    h = layers.QConv2D(4, 3, kernel_quantizer=quantizers.StochasticTernary(seed=seed), name="conv")(inputs)
    h = keras.layers.Flatten()(h)
    outputs = layers.QDense(3, kernel_quantizer=quantizers.StochasticTernary(seed=seed + 1), name="dense")(h)
    return keras.Model(inputs, outputs)


def test_stochastic_inside_compiled_fit():
    """The quantized kernel a compiled train step sees changes between steps.

    The learning rate is 0, so the float kernel never changes: any difference
    between steps is quantization noise drawn inside the traced function.
    """
    model = _stq_model()
    conv = model.get_layer("conv")
    probe = keras.Model(model.input, conv.output)

    model.compile(optimizer=keras.optimizers.SGD(0.0), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x = np.random.default_rng(0).uniform(size=(4, 8, 8, 1)).astype("float32")
    y = np.array([0, 1, 2, 0])

    # A traced function that calls the layer with training=True, like fit does.
    @tf.function
    def quantized_kernel():
        return conv.quantized("kernel", training=True)

    draws = [quantized_kernel().numpy() for _ in range(3)]
    assert not np.array_equal(draws[0], draws[1]) and not np.array_equal(draws[1], draws[2])

    # And through model.fit itself: the training loss differs from step to step
    # with a fixed float model (lr=0), which only noise can explain.
    history = model.fit(x, y, batch_size=4, epochs=6, verbose=0, shuffle=False)
    losses = history.history["loss"]
    assert len(set(np.round(losses, 6))) > 1, losses
    # Inference is deterministic.
    np.testing.assert_array_equal(probe.predict(x, verbose=0), probe.predict(x, verbose=0))


def test_predict_is_ternary_per_channel():
    model = _stq_model()
    kernel = layers.quantized_weights(model.get_layer("conv"))["kernel"]
    for channel in range(kernel.shape[-1]):
        values = np.unique(kernel[..., channel])
        assert len(values) <= 3
        nonzero = values[values != 0]
        np.testing.assert_allclose(np.abs(nonzero), np.abs(nonzero[0]))


def test_summary_reports_bits_and_bytes():
    model = _stq_model()
    footprint = tr.summary(model, print_fn=None)
    conv = footprint.layers[0]
    assert (conv.name, conv.bits, conv.params) == ("conv", 2, 3 * 3 * 1 * 4 + 4)
    assert conv.int8_bytes == 36 + 4 * 4
    assert conv.packed_bytes == round((36 * 2 + 4 * 32) / 8)
    assert footprint.int8_bytes == sum(r.int8_bytes for r in footprint.layers)
    assert "total" in footprint.to_table()


def test_summary_float_vs_stq():
    def build(quantizer):
        inputs = keras.Input((8, 8, 1))
        h = layers.QConv2D(16, 3, kernel_quantizer=quantizer)(inputs)
        return keras.Model(inputs, h)

    # 144 kernel weights and 16 float biases: 2 bits vs 32 bits per weight.
    assert tr.summary(build("stq"), print_fn=None).packed_bytes == 144 * 2 / 8 + 16 * 4
    assert tr.summary(build(None), print_fn=None).packed_bytes == 160 * 4


def test_bad_activation_names_argument():
    with pytest.raises(ValueError, match="Received: activation='nope'"):
        layers.QActivation("nope")
