import keras
import numpy as np
import pytest

import tinyrobust as tr
from tinyrobust import export


def _wide_end_model(seed=0):
    """A wide first activation, then a strided convolution whose large ternary kernel, decoded, sets the arena
    peak (as the small CNN's third convolution)."""
    rng = np.random.default_rng(seed)
    inputs = keras.Input((24, 24, 4))
    h = keras.layers.Conv2D(32, 3, padding="same", activation="relu", name="conv_1")(inputs)
    h = keras.layers.Conv2D(64, 3, strides=2, padding="same", activation="relu", name="conv_2")(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    logits = keras.layers.Dense(16, name="dense")(h)
    model = keras.Model(inputs, logits)
    for layer in model.layers:
        if hasattr(layer, "kernel"):
            kernel = rng.choice([-1.0, 0.0, 1.0], size=layer.kernel.shape) * rng.uniform(0.05, 0.2, layer.kernel.shape[-1])
            layer.kernel.assign(kernel.astype("float32"))
            layer.bias.assign(rng.normal(0, 0.1, layer.bias.shape).astype("float32"))
    return model


def _inputs(n, seed):
    return np.random.default_rng(seed).uniform(0, 1, (n, 24, 24, 4)).astype("float32")


@pytest.fixture(scope="module")
def int8_bytes(tmp_path_factory):
    path = tmp_path_factory.mktemp("groups") / "m.tflite"
    return export.to_tflite(_wide_end_model(), path, _inputs(32, 0)).read_bytes()


def test_splitting_into_output_channel_groups_gives_the_same_bytes_out(int8_bytes):
    splittable = export.splittable_operators(int8_bytes)
    assert [op.operator for op in splittable.values()] == ["CONV_2D", "CONV_2D", "FULLY_CONNECTED"]
    assert [op.channels for op in splittable.values()] == [32, 64, 16]
    reference = export.TFLiteModel(int8_bytes, runtime="tflm")
    x = reference.quantize_inputs(_inputs(16, 1))
    conv_1, conv_2, dense = splittable
    for groups in ({conv_2: 2}, {conv_2: 8, dense: 4}, {conv_1: 4, conv_2: 2, dense: 2}):
        split = export.split_output_channels(int8_bytes, groups)
        names = export.operator_names(split)
        assert "CONCATENATION" in names
        model = export.TFLiteModel(split, runtime="tflm")
        np.testing.assert_array_equal(model.invoke_quantized(x), reference.invoke_quantized(x))
    assert export.split_output_channels(int8_bytes, {conv_2: 1}) == int8_bytes


def test_a_bad_grouping_is_refused_naming_it(int8_bytes):
    conv_1, conv_2, _ = export.splittable_operators(int8_bytes)
    with pytest.raises(ValueError, match=r"positive divisor of its 64 output channels.*Received: groups=\{%d: 3\}"
                       % conv_2):
        export.split_output_channels(int8_bytes, {conv_2: 3})
    with pytest.raises(ValueError, match="at most 10"):
        export.split_output_channels(int8_bytes, {conv_2: 16})
    with pytest.raises(ValueError, match="is not a CONV_2D or FULLY_CONNECTED"):
        export.split_output_channels(int8_bytes, {999: 2})


def test_grouping_bounds_the_compressed_arena_and_stays_bit_exact(tmp_path):
    # The width-32 STQ small CNN: its ternary third convolution (73,728 B decoded) made the arena 1.78x int8's.
    keras.utils.set_random_seed(0)
    model = tr.models.small_cnn(quantization="stq", width=32)
    calibration = np.random.default_rng(0).uniform(0, 1, (32, 28, 28, 1)).astype("float32")
    int8_bytes = export.to_tflite(model, tmp_path / "m.tflite", calibration).read_bytes()
    smallest, flash_first = export.compress_tflite(int8_bytes, calibration, arena_limit=None)
    assert flash_first.groups == {} and flash_first.arena_bytes > 1.10 * flash_first.int8_arena_bytes
    bounded, report = export.compress_tflite(int8_bytes, calibration)
    assert report.groups and report.arena_limit == export.ARENA_LIMIT
    assert report.arena_bytes <= export.ARENA_LIMIT * report.int8_arena_bytes < flash_first.arena_bytes
    assert "output-channel groups" in report.note
    assert report.flash_bytes < report.int8_bytes
    shipped, reference = export.TFLiteModel(bounded, runtime="tflm"), export.TFLiteModel(int8_bytes, runtime="tflm")
    assert shipped.arena_bytes == report.arena_bytes
    x = reference.quantize_inputs(np.random.default_rng(7).uniform(0, 1, (32, 28, 28, 1)).astype("float32"))
    np.testing.assert_array_equal(shipped.invoke_quantized(x), reference.invoke_quantized(x))
    assert len(smallest) <= len(bounded) <= 1.10 * len(smallest)  # the grouped file keeps the flash saving


def test_an_unreachable_arena_limit_is_reported_with_the_choice(int8_bytes):
    _, report = export.compress_tflite(int8_bytes, _inputs(32, 0), arena_limit=1.0)
    assert report.arena_bytes > report.int8_arena_bytes
    assert "above the 1.00x asked for" in report.note and "compress=False" in report.note
    restored = export.CompressionReport.from_dict(report.to_dict())
    assert restored == report
    old = {k: v for k, v in report.to_dict().items() if k not in ("groups", "arena_limit")}
    assert export.CompressionReport.from_dict(old).groups == {}


@pytest.mark.parametrize("value", [0.5, True, float("nan"), "1.1"])
def test_a_bad_arena_limit_is_refused_before_any_work(tmp_path, value):
    with pytest.raises(ValueError, match=r"arena_limit.*Received: arena_limit="):
        export.to_tflite(_wide_end_model(), tmp_path / "m.tflite", _inputs(4, 0), compress=True, arena_limit=value)
    assert not list(tmp_path.iterdir())
