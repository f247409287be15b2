import os

import keras
import numpy as np
import pytest

import tinyrobust as tr


@pytest.mark.parametrize("quantization", ["float", "int8", "int4", "stb", "stq"])
def test_small_cnn_trains_saves_and_reloads(quantization, tmp_path):
    model = tr.models.small_cnn(quantization=quantization, width=4)
    assert model.output.shape == (None, 10)
    model.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x = np.random.default_rng(0).uniform(size=(8, 28, 28, 1)).astype("float32")
    assert np.isfinite(model.train_on_batch(x, np.arange(8) % 10))
    path = os.path.join(tmp_path, "m.keras")
    model.save(path)
    np.testing.assert_array_equal(keras.saving.load_model(path).predict(x, verbose=0), model.predict(x, verbose=0))


def test_small_cnn_layer_names_and_edge_layers():
    model = tr.models.small_cnn(quantization="stq", width=4)
    names = [layer.name for layer in model.layers]
    assert {"conv_1", "conv_2", "conv_3", "logits"} <= set(names)
    assert isinstance(model.get_layer("conv_1").kernel_quantizer, tr.quantizers.QuantizedBits)
    assert isinstance(model.get_layer("conv_2").kernel_quantizer, tr.quantizers.StochasticTernary)
    assert isinstance(model.get_layer("logits").kernel_quantizer, tr.quantizers.QuantizedBits)


def test_stq_footprint_below_int8():
    stq = tr.summary(tr.models.small_cnn(quantization="stq"), print_fn=None)
    int8 = tr.summary(tr.models.small_cnn(quantization="int8"), print_fn=None)
    assert stq.packed_bytes < int8.packed_bytes


def test_bad_arguments():
    with pytest.raises(ValueError, match="Received: quantization='int3'"):
        tr.models.small_cnn(quantization="int3")
    with pytest.raises(ValueError, match="Received: width=0"):
        tr.models.small_cnn(width=0)


def test_resnet8_matches_mlperf_tiny_parameter_count():
    assert tr.models.resnet8().count_params() == 78_666
    assert tr.summary(tr.models.resnet8(quantization="stq"), print_fn=None).params == 78_666


@pytest.mark.parametrize("quantization", ["int8", "stq"])
def test_resnet8_trains_saves_and_reloads(quantization, tmp_path):
    model = tr.models.resnet8(quantization=quantization)
    model.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x = np.random.default_rng(0).uniform(size=(4, 32, 32, 3)).astype("float32")
    assert np.isfinite(model.train_on_batch(x, np.arange(4)))
    path = os.path.join(tmp_path, "m.keras")
    model.save(path)
    np.testing.assert_array_equal(keras.saving.load_model(path).predict(x, verbose=0), model.predict(x, verbose=0))


def test_resnet8_stq_footprint_below_int8():
    stq = tr.summary(tr.models.resnet8(quantization="stq"), print_fn=None)
    int8 = tr.summary(tr.models.resnet8(quantization="int8"), print_fn=None)
    assert stq.packed_bytes < 0.5 * int8.packed_bytes


def test_dscnn_matches_mlperf_tiny_parameter_count():
    model = tr.models.dscnn()
    assert model.count_params() == 24_908
    assert model.input_shape == (None, 49, 10, 1) and model.output_shape == (None, 12)
    assert tr.summary(tr.models.dscnn(quantization="stq"), print_fn=None).params == 24_908


@pytest.mark.parametrize(
    "build, kwargs, shape",
    [
        (tr.models.dscnn, {}, (49, 10, 1)),
        (tr.models.mobilenet_v2, {"alpha": 0.35}, (32, 32, 3)),
        (tr.models.wide_resnet, {"depth": 10, "width": 1}, (32, 32, 3)),
    ],
)
@pytest.mark.parametrize("quantization", ["float", "stq"])
def test_zoo_models_train_save_and_reload(build, kwargs, shape, quantization, tmp_path):
    model = build(quantization=quantization, **kwargs)
    model.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x = np.random.default_rng(0).uniform(size=(4,) + shape).astype("float32")
    assert np.isfinite(model.train_on_batch(x, np.arange(4)))
    path = os.path.join(tmp_path, "m.keras")
    model.save(path)
    np.testing.assert_allclose(keras.saving.load_model(path).predict(x, verbose=0), model.predict(x, verbose=0),
                               atol=1e-6)


def test_zoo_layer_names_for_per_layer_jacobian():
    names = {layer.name for layer in tr.models.dscnn().layers}
    assert {"conv_1", "block_4_pointwise", "block_2_relu_2", "logits"} <= names
    names = {layer.name for layer in tr.models.wide_resnet(depth=10, width=1).layers}
    assert {"group_3_block_1_conv_2", "relu_last", "logits"} <= names


def test_zoo_by_name_and_bad_arguments():
    assert tr.models.get("dscnn", quantization="int8").name == "dscnn_int8"
    assert tr.models.wide_resnet(depth=16, width=4).count_params() == 2_752_506  # WRN-16-4
    with pytest.raises(ValueError, match="Received: name='lenet'"):
        tr.models.get("lenet")
    with pytest.raises(ValueError, match="Received: depth=12"):
        tr.models.wide_resnet(depth=12)
    with pytest.raises(ValueError, match="Received: alpha=0"):
        tr.models.mobilenet_v2(alpha=0)


def test_summary_counts_each_layers_multiply_accumulates():
    import keras

    inputs = keras.Input((8, 8, 3))
    h = keras.layers.Conv2D(4, 3, padding="same", use_bias=False, name="conv")(inputs)  # 8*8 positions x 3*3*3*4
    h = keras.layers.DepthwiseConv2D(3, strides=2, padding="same", name="depthwise")(h)  # 4*4 positions x 3*3*4
    h = keras.layers.GlobalAveragePooling2D()(h)
    outputs = keras.layers.Dense(5, name="dense")(h)  # 4 x 5
    footprint = tr.summary(keras.Model(inputs, outputs), print_fn=None)
    macs = {row.name: row.macs for row in footprint.layers}
    assert macs == {"conv": 64 * 108, "depthwise": 16 * 36, "dense": 20}
    assert footprint.macs == 64 * 108 + 16 * 36 + 20 and "MACs" in footprint.to_table()
    assert footprint.to_dict()["macs"] == footprint.macs
