import json

import keras
import numpy as np
import pytest
import qkeras

import tinyrobust as tr
from tinyrobust import cli, export


def _randomise_batch_norm(model, seed=0):
    """Non-trivial moving statistics, so that folding is really exercised."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            n = layer.moving_mean.shape[0]
            layer.moving_mean.assign(rng.normal(0, 0.05, n))
            layer.moving_variance.assign(rng.uniform(0.5, 1.5, n))
            layer.gamma.assign(rng.uniform(0.5, 1.5, n))
            layer.beta.assign(rng.normal(0, 0.1, n))


@pytest.mark.parametrize("build", [tr.models.small_cnn, tr.models.resnet8])
@pytest.mark.parametrize("quantization", ["float", "stq"])
def test_fold_model_matches_keras_inference(build, quantization):
    model = build(quantization=quantization)
    _randomise_batch_norm(model)
    folded = export.fold_model(model)
    assert not any(isinstance(layer, keras.layers.BatchNormalization) for layer in folded.layers)
    assert not any(type(layer).__module__.startswith(("qkeras", "tinyrobust.layers")) for layer in folded.layers)
    x = np.random.default_rng(1).random((16,) + model.input_shape[1:]).astype("float32")
    reference, plain = model.predict(x, verbose=0), folded.predict(x, verbose=0)
    # Quantized ReLUs become clipped ReLUs: the activation grid is left to the int8 conversion.
    tolerance = 1e-4 if quantization == "float" else 0.05 * np.abs(reference).max()
    np.testing.assert_allclose(plain, reference, atol=tolerance)
    if quantization == "stq":
        counts = export.distinct_values_per_channel(folded)
        ternary = [name for name in counts if name not in ("conv_1", "logits")]
        assert ternary and all(counts[name] <= 3 for name in ternary)


@pytest.mark.parametrize("build", [tr.models.small_cnn, tr.models.resnet8, tr.models.dscnn])
@pytest.mark.parametrize("quantization", ["float", "int8", "stq"])
def test_export_runs_in_tflite_micro(tmp_path, build, quantization):
    model = build(quantization=quantization)
    _randomise_batch_norm(model)
    rng = np.random.default_rng(0)
    calibration = rng.random((32,) + model.input_shape[1:]).astype("float32")
    path = export.to_tflite(model, tmp_path / "m.tflite", calibration)
    ops = export.operator_names(path.read_bytes())
    assert "ROUND" not in ops and "POW" not in ops and "DEQUANTIZE" not in ops
    runner = export.TFLiteModel(path)
    assert runner.arena_bytes > 0 and runner.model_bytes == path.stat().st_size
    assert runner.input_dtype == np.int8
    logits = runner(calibration[:4])
    assert logits.shape == (4, model.output_shape[-1]) and logits.dtype == np.float32 and runner.queries == 4
    if quantization == "stq":
        counts = export.kernel_values_per_channel(path.read_bytes())
        hidden = [c for op, name, c in counts if "/conv_1" not in name and "logits" not in name]
        assert hidden and max(hidden) <= 3


@pytest.fixture(scope="module")
def trained_stq():
    keras.utils.set_random_seed(0)
    x, y = tr.data.load_arrays("fashion_mnist", "train", limit=20000)
    model = tr.models.small_cnn(quantization="stq")
    model.compile(keras.optimizers.Adam(2e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    model.fit(x, y, batch_size=64, epochs=1, verbose=0)
    return model


def test_trained_stq_model_agrees_with_tflite_micro(tmp_path, trained_stq, capsys):
    calibration, indices = tr.data.calibration_set("fashion_mnist", size=200)
    path = export.to_tflite(trained_stq, tmp_path / "fmnist.tflite", calibration)
    x, y = tr.data.load_arrays("fashion_mnist", "test", limit=1000)
    report = export.verify(trained_stq, path, (x, y), verbose=True)
    assert "1000/1000" in capsys.readouterr().out  # the progress bar reached the end
    assert report.accuracy["keras"] > 0.6
    # int8 post-training quantization flips near-tie examples: 97.1-99% agreement in the committed results, 97.7%
    # for this model on one CI host (the trained model differs by host); a broken export lands far lower.
    assert report.agreement["tflm"] >= 0.97 and report.agreement["litert"] >= 0.97
    assert abs(report.accuracy["tflm"] - report.accuracy["keras"]) <= 0.01
    assert report.arena_bytes > 0 and "tflm" in report.to_table()
    json.dumps(report.to_dict())
    column = export.verify(trained_stq, path, (x[:50], y[:50, None]), runtimes=("tflm",))  # keras.datasets' (N, 1)
    assert column.accuracy == export.verify(trained_stq, path, (x[:50], y[:50]), runtimes=("tflm",)).accuracy
    for bad, message in [(y[:49], "one label per input"), (y[:50] + 0.5, "integer"), (y[:50] + 10, "10")]:
        with pytest.raises(ValueError, match=f"(?s){message}.*Received: y"):
            export.verify(trained_stq, path, (x[:50], bad), runtimes=("tflm",))


def test_tflite_model_quantizes_with_rounding_and_clipping(tmp_path):
    model = tr.models.small_cnn(quantization="float")
    calibration = np.random.default_rng(0).random((16, 28, 28, 1)).astype("float32")
    runner = export.TFLiteModel(export.to_tflite(model, tmp_path / "m.tflite", calibration))
    scale, zero_point = runner.input_scale
    q = runner.quantize_inputs(np.array([-5.0, 0.0, 0.6 * scale, 1.4 * scale, 5.0], np.float32))
    np.testing.assert_array_equal(q, [-128, zero_point, zero_point + 1, zero_point + 1, 127])
    litert = export.TFLiteModel(tmp_path / "m.tflite", runtime="litert")
    # LiteRT's kernels may round one output step differently from TFLite Micro's reference kernels.
    output_step = runner._output_quantization[0]
    np.testing.assert_allclose(litert(calibration[:3]), runner(calibration[:3]), atol=2.01 * output_step)


def test_c_array_is_aligned_and_complete(tmp_path):
    model = tr.models.small_cnn(quantization="int8")
    calibration = np.random.default_rng(0).random((16, 28, 28, 1)).astype("float32")
    path = export.to_tflite(model, tmp_path / "m.tflite", calibration)
    header, source = export.to_c_array(path, tmp_path / "c", "fmnist_model")
    text = source.read_text()
    assert "alignas(16) const unsigned char fmnist_model[]" in text
    assert f"fmnist_model_len = {path.stat().st_size};" in text
    body = text[text.index("{") + 1: text.index("};")]
    assert bytes(int(b, 16) for b in body.replace(",", " ").split()) == path.read_bytes()
    deployed = export.TFLiteModel(path)
    arena = deployed.arena_bytes
    written = header.read_text()
    assert f"#define fmnist_model_ARENA_SIZE {arena}" in written
    # What firmware needs around the array: flash, the int8 input's and output's scale and zero point, the
    # operators to register (the resolver's template argument included).
    assert f"#define fmnist_model_FLASH_BYTES {path.stat().st_size}" in written
    scale, zero_point = deployed.input_scale
    assert f"#define fmnist_model_INPUT_SCALE {scale!r}f" in written
    assert f"#define fmnist_model_INPUT_ZERO_POINT {zero_point}" in written
    assert "#define fmnist_model_OUTPUT_SCALE " in written and "(28, 28, 1), int8_t" in written
    operators = export.tflite.operator_names(path.read_bytes())
    assert f"#define fmnist_model_OPERATOR_COUNT {len(operators)}" in written
    assert "resolver.AddConv2D();" in written and "resolver.AddFullyConnected();" in written
    assert export.c_array.resolver_call("DEPTHWISE_CONV_2D") == "AddDepthwiseConv2D()"
    assert export.c_array.resolver_call("TFLM_DECODE") == "AddDecode()"
    with pytest.raises(ValueError, match="Received: name='1bad'"):
        export.to_c_array(path, tmp_path / "c", "1bad")


def test_bad_inputs_fail_clearly_and_leave_no_files(tmp_path):
    model = tr.models.small_cnn(quantization="stq")
    target = tmp_path / "out" / "m.tflite"
    with pytest.raises(ValueError, match="representative_data"):
        export.to_tflite(model, target, np.zeros((0, 28, 28, 1), np.float32))
    with pytest.raises(ValueError, match=r"shape \(28, 28, 1\)"):
        export.to_tflite(model, target, np.zeros((4, 32, 32, 3), np.float32))
    inputs = keras.Input((8,))
    unsupported = keras.Model(inputs, qkeras.QDense(4, kernel_quantizer="quantized_bits(4,0,1)")(inputs))
    with pytest.raises(ValueError, match="Cannot export layer"):
        export.to_tflite(unsupported, target, np.zeros((4, 8), np.float32))
    tanh = keras.Model(inputs, tr.layers.QActivation("int8")(inputs))
    with pytest.raises(ValueError, match="only quantized ReLU"):
        export.to_tflite(tanh, target, np.zeros((4, 8), np.float32))
    assert not target.exists() and not any(tmp_path.rglob("*.tflite*"))
    with pytest.raises(ValueError, match="Received: runtime='tflite'"):
        export.TFLiteModel(b"", runtime="tflite")
    with pytest.raises(FileNotFoundError, match="missing.tflite"):
        export.TFLiteModel(tmp_path / "missing.tflite")
    (tmp_path / "garbage.tflite").write_bytes(b"not a model at all")
    for runtime in ("tflm", "litert"):
        with pytest.raises(ValueError, match="Expected a TFLite flatbuffer.*garbage.tflite.*18 bytes"):
            export.TFLiteModel(tmp_path / "garbage.tflite", runtime=runtime)


def test_tflite_model_is_an_attack_target(tmp_path, trained_stq):
    calibration, _ = tr.data.calibration_set("fashion_mnist", size=100)
    runner = export.TFLiteModel(export.to_tflite(trained_stq, tmp_path / "m.tflite", calibration))
    x, y = tr.data.load_arrays("fashion_mnist", "test", limit=24)
    result = tr.attacks.Square(0.1, queries=30, seed=0).run(runner, x, y)
    assert result.queries[0].max() <= 30
    adversarial_accuracy = np.mean(runner(result.x_adv[0]).argmax(-1) == y)
    assert adversarial_accuracy <= np.mean(runner(x).argmax(-1) == y)
    before = runner.queries
    decision = tr.attacks.HopSkipJump(2.0, queries=170).run(runner, x, y)  # label decisions of the interpreter
    assert decision.queries[0].max() <= 170 and runner.queries - before >= decision.queries[0].sum()
    assert decision.success[0].mean() >= 1 - np.mean(runner(x).argmax(-1) == y)


def test_tflite_export_callback_exports_best_epoch(tmp_path):
    x, y = tr.data.load_arrays("fashion_mnist", "train", limit=512)
    model = tr.models.small_cnn(quantization="stq", width=8)
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    callback = tr.callbacks.TFLiteExport(tmp_path, x[:64], (x[:128], y[:128]), monitor="accuracy", name="best")
    model.fit(x, y, epochs=2, batch_size=64, verbose=0, callbacks=[callback])
    record = json.loads((tmp_path / "best.parity.json").read_text())
    assert record["best_epoch"] in (0, 1) and record["examples"] == 128
    assert (tmp_path / "best.tflite").is_file() and (tmp_path / "best.cc").is_file()


def test_export_cli_writes_tflite_c_array_and_report(tmp_path, capsys):
    model = tr.models.small_cnn(quantization="stq", width=8)
    model.save(tmp_path / "tiny.keras")
    out = tmp_path / "export"
    assert cli.main(["export", str(tmp_path / "tiny.keras"), "--out", str(out), "--calibration-size", "50",
                     "--parity-size", "100"]) == 0
    assert {p.name for p in out.iterdir()} == {"tiny.tflite", "tiny.h", "tiny.cc", "tiny.parity.json"}
    record = json.loads((out / "tiny.parity.json").read_text())
    assert len(record["calibration_indices"]) == 50 and record["examples"] == 100
    assert "tflm" in capsys.readouterr().out
    assert cli.main(["export", str(tmp_path / "nope.keras"), "--out", str(out)]) == 2


@pytest.mark.parametrize("quantization", ["stq", "stb", "int4"])
def test_fold_quantized_weights_gives_identical_outputs(quantization):
    model = tr.models.resnet8(quantization=quantization)
    _randomise_batch_norm(model)
    clone = export.fold_quantized_weights(model)
    assert not any(type(layer).__module__.startswith("tinyrobust.layers") and hasattr(layer, "kernel_quantizer")
                   for layer in clone.layers)
    x = np.random.default_rng(2).random((32, 32, 32, 3)).astype("float32")
    np.testing.assert_array_equal(clone.predict(x, verbose=0), model.predict(x, verbose=0))
    float_model = tr.models.small_cnn(quantization="float")
    assert export.fold_quantized_weights(float_model) is float_model


def test_calibration_inputs_on_another_scale_are_refused(tmp_path):
    """0-255 calibration for a [0, 1] model wrote a file with 6.2% accuracy against Keras' 48.4%, silently."""
    model = tr.models.small_cnn(width=4)
    calibration = np.random.default_rng(0).uniform(0, 255, (16, 28, 28, 1)).astype("float32")
    with pytest.raises(ValueError, match=r"calibration inputs in the model's input range \(0.0, 1.0\).*Received: "):
        export.to_tflite(model, tmp_path / "m.tflite", calibration)
    assert not (tmp_path / "m.tflite").exists()
    assert export.to_tflite(model, tmp_path / "w.tflite", calibration, input_range=(0, 255)).is_file()


def test_the_interpreter_refuses_nan_inputs(tmp_path):
    model = tr.models.small_cnn(width=4)
    calibration = np.random.default_rng(0).random((16, 28, 28, 1)).astype("float32")
    deployed = export.TFLiteModel(export.to_tflite(model, tmp_path / "m.tflite", calibration))
    x = calibration[:2].copy()
    x[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="Expected finite inputs"):
        deployed(x)


def test_interpreter_time_is_measured_per_inference_and_in_alternating_blocks(tmp_path):
    model = tr.models.small_cnn(width=4)
    calibration = np.random.default_rng(0).random((8, 28, 28, 1)).astype("float32")
    path = export.to_tflite(model, tmp_path / "m.tflite", calibration, compress=True)
    shipped, int8_file = export.TFLiteModel(path), export.TFLiteModel(export.uncompressed_path(path))
    queries = shipped.queries
    assert 0 < shipped.seconds_per_inference(calibration[:3], runs=5) < 1
    assert shipped.queries == queries  # timing is not querying
    first, second = export.paired_seconds_per_inference(shipped, int8_file, calibration, runs=8, blocks=2)
    assert first > 0 and second > 0
    with pytest.raises(ValueError, match="Received: runs=1"):
        export.paired_seconds_per_inference(shipped, int8_file, calibration, runs=1, blocks=2)
    with pytest.raises(ValueError, match="at least one input"):
        shipped.seconds_per_inference(calibration[:0])
