import dataclasses
import json

import keras
import numpy as np
import pytest

import tinyrobust as tr
from tinyrobust import cli, export
from tinyrobust.export import compress as compress_module

LAYER_OPERATORS = {"conv": "CONV_2D", "depthwise": "DEPTHWISE_CONV_2D", "dense": "FULLY_CONNECTED"}


def _levels_model(bits, seed=0):
    """Conv -> depthwise conv -> dense whose kernels take at most 2^bits values per output channel.

    Every channel uses the same levels scaled by its own factor, so per-channel
    int8 quantization gives the same int8 values in every channel (the case in
    which a per-tensor table looks valid but is wrong).
    """
    rng = np.random.default_rng(seed)
    inputs = keras.Input((8, 8, 8))
    h = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="conv")(inputs)
    h = keras.layers.DepthwiseConv2D(7, padding="same", activation="relu", name="depthwise")(h)
    h = keras.layers.Flatten()(h)
    logits = keras.layers.Dense(5, name="dense")(h)
    model = keras.Model(inputs, logits)
    levels = np.linspace(-1.0, 1.0, 2 ** bits)
    for name in LAYER_OPERATORS:
        layer = model.get_layer(name)
        kernel = np.asarray(layer.kernel)
        channels = kernel.shape[-1] if name != "depthwise" else kernel.shape[2]
        flat = rng.choice(levels, size=kernel.shape)
        per_channel = np.moveaxis(flat, -1 if name != "depthwise" else 2, 0).reshape(channels, -1)
        count = min(len(levels), per_channel.shape[1])
        per_channel[:, :count] = levels[:count]  # every channel holds as many levels as it can
        per_channel *= rng.uniform(0.2, 1.0, (channels, 1))
        shape = np.moveaxis(flat, -1 if name != "depthwise" else 2, 0).shape
        kernel = np.moveaxis(per_channel.reshape(shape), 0, -1 if name != "depthwise" else 2)
        layer.kernel.assign(kernel.astype("float32"))
        layer.bias.assign(rng.normal(0, 0.1, layer.bias.shape).astype("float32"))
    return model


def _calibration(n=32, seed=0):
    return np.random.default_rng(seed).uniform(0, 1, (n, 8, 8, 8)).astype("float32")


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_compressed_export_is_bit_exact_for_every_layer_type_and_width(tmp_path, bits):
    model = _levels_model(bits)
    path = export.to_tflite(model, tmp_path / "m.tflite", _calibration(), compress=True)
    int8_path = export.uncompressed_path(path)
    report = export.CompressionReport.load(export.compression_report_path(path))

    by_operator = {t["operator"]: t for t in report.tensors}
    assert set(by_operator) == set(LAYER_OPERATORS.values())
    for tensor in report.tensors:
        assert tensor["values_per_channel"] <= 2 ** bits
        assert tensor["bits"] == max(1, int(np.ceil(np.log2(tensor["values_per_channel"]))))
        assert tensor["bytes_after"] < tensor["bytes_before"]
    assert all(by_operator[op]["bits"] == bits for op in by_operator)
    assert by_operator["CONV_2D"]["axis"] == 0 and by_operator["FULLY_CONNECTED"]["axis"] == 0
    assert by_operator["DEPTHWISE_CONV_2D"]["axis"] == 3  # depthwise kernels are quantized on the last axis
    assert report.compressed and report.bit_exact_inputs == 32 + compress_module.RANDOM_CHECK_INPUTS
    assert report.flash_bytes == path.stat().st_size < int8_path.stat().st_size == report.int8_bytes
    assert "TFLM_DECODE" in export.operator_names(path.read_bytes())
    assert "TFLM_DECODE" not in export.operator_names(int8_path.read_bytes())

    shipped, reference = export.TFLiteModel(path), export.TFLiteModel(int8_path)
    assert shipped.arena_bytes == report.arena_bytes and reference.arena_bytes == report.int8_arena_bytes
    fresh = np.random.default_rng(5).uniform(-0.5, 1.5, (16, 8, 8, 8)).astype("float32")
    np.testing.assert_array_equal(shipped(fresh), reference(fresh))


def test_a_per_tensor_or_wrong_axis_table_is_caught_and_nothing_written(tmp_path, monkeypatch):
    model = _levels_model(2)
    int8_bytes = export.to_tflite(model, tmp_path / "plain.tflite", _calibration()).read_bytes()
    plan = export.plan_compression(int8_bytes)
    conv = next(p for p in plan if p.operator == "CONV_2D")
    # Per channel the int8 values are the same 4 levels, so one table for the whole tensor fits in 2 bits,
    # but TFLite Micro's decoder takes the channel count from the quantization: the outputs are wrong.
    per_tensor = [dataclasses.replace(p, axis=None) if p is conv else p for p in plan]
    with pytest.raises(ValueError, match="differ from the int8 model"):
        export.compress_tflite(int8_bytes, _calibration(), plan=per_tensor)
    depthwise = next(p for p in plan if p.operator == "DEPTHWISE_CONV_2D")
    wrong_axis = [dataclasses.replace(p, axis=0) if p is depthwise else p for p in plan]
    with pytest.raises(ValueError, match="compression failed|differ from the int8 model"):
        export.compress_tflite(int8_bytes, _calibration(), plan=wrong_axis)

    monkeypatch.setattr(compress_module, "plan_compression", lambda _: per_tensor)
    target = tmp_path / "out" / "m.tflite"
    with pytest.raises(ValueError, match="nothing was written"):
        export.to_tflite(model, target, _calibration(), compress=True)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_stq_resnet8_ships_far_below_int8(tmp_path):
    model = tr.models.resnet8(quantization="stq")
    calibration = np.random.default_rng(0).uniform(0, 1, (16, 32, 32, 3)).astype("float32")
    path = export.to_tflite(model, tmp_path / "r8.tflite", calibration, compress=True)
    report = export.CompressionReport.load(export.compression_report_path(path))
    ternary = [t for t in report.tensors if t["values_per_channel"] <= 3]
    assert len(ternary) == 8 and all(t["bits"] == 2 for t in ternary)  # every hidden conv; first conv and logits stay int8
    assert report.flash_bytes < 0.45 * report.int8_bytes
    assert report.arena_bytes <= 1.1 * report.int8_arena_bytes


def test_nothing_compressible_ships_the_int8_file_with_a_note(tmp_path):
    model = tr.models.small_cnn(quantization="float", width=8)
    calibration = np.random.default_rng(0).random((16, 28, 28, 1)).astype("float32")
    path = export.to_tflite(model, tmp_path / "m.tflite", calibration, compress=True)
    report = export.CompressionReport.load(export.compression_report_path(path))
    # Its first convolution has 9 weights per channel: they fit in 4 bits, but tables would not save bytes.
    assert not report.compressed and report.tensors == [] and "plain int8 model" in report.note
    assert path.read_bytes() == export.uncompressed_path(path).read_bytes()
    assert report.flash_bytes == report.int8_bytes == path.stat().st_size


def test_compress_needs_an_int8_boolean_request(tmp_path):
    model = _levels_model(2)
    with pytest.raises(ValueError, match="Received: compress=True, int8=False"):
        export.to_tflite(model, tmp_path / "m.tflite", _calibration(), int8=False, compress=True)
    with pytest.raises(ValueError, match="Received: compress='yes'"):
        export.to_tflite(model, tmp_path / "m.tflite", _calibration(), compress="yes")
    assert not any(tmp_path.iterdir())


def test_compressed_file_downstream_litert_c_array_parity_and_cli(tmp_path, capsys):
    model = tr.models.small_cnn(quantization="stq", width=8)
    model.save(tmp_path / "tiny.keras")
    out = tmp_path / "export"
    assert cli.main(["export", str(tmp_path / "tiny.keras"), "--out", str(out), "--calibration-size", "50",
                     "--parity-size", "64", "--compress"]) == 0
    printed = capsys.readouterr().out
    assert "values/channel" in printed and "TFLM_DECODE" in printed
    assert {p.name for p in out.iterdir()} == {"tiny.tflite", "tiny.int8.tflite", "tiny.compression.json", "tiny.h",
                                               "tiny.cc", "tiny.parity.json"}
    parity = json.loads((out / "tiny.parity.json").read_text())
    assert parity["compressed"] and parity["compression"]["compressed"]
    assert parity["model_bytes"] == (out / "tiny.tflite").stat().st_size < parity["compression"]["int8_bytes"]
    assert parity["agreement"]["litert"] > 0.9 and parity["agreement"]["tflm"] > 0.9  # LiteRT ran tiny.int8.tflite
    assert "#define tiny_COMPRESSED 1" in (out / "tiny.h").read_text()
    with pytest.raises(ValueError, match="only TFLite Micro runs.*tiny.int8.tflite.*Received: runtime='litert'"):
        export.TFLiteModel(out / "tiny.tflite", runtime="litert")
