"""Full-integer TFLite conversion."""

import numpy as np
import tensorflow as tf

from tinyrobust._silence import captured_output
from tinyrobust.export.compress import ARENA_LIMIT, check_arena_limit, compress_tflite
from tinyrobust.export.flatbuffer import (  # noqa: F401 (read here, and re-exported where they were)
    _operators,
    check_flatbuffer,
    compression_report_path,
    kernel_values_per_channel,
    operator_names,
    uncompressed_path,
)
from tinyrobust.export.fold import fold_model
from tinyrobust.export.interpreter import RUNTIMES, TFLiteModel  # noqa: F401 (re-exported where it was)
from tinyrobust.files import write_atomically
from tinyrobust.validation import check_number, check_range


def _representative_array(representative_data, input_shape, limit, input_range=None):
    """Up to `limit` inputs from an array, an (x, y) tuple or a dataset of x or (x, y) batches."""
    data = representative_data
    if isinstance(data, tuple):
        data = data[0]
    if isinstance(data, tf.data.Dataset):
        batches, count = [], 0
        for batch in data:
            batch = batch[0] if isinstance(batch, (tuple, list)) else batch
            batches.append(np.asarray(batch, np.float32))
            count += len(batches[-1])
            if count >= limit:
                break
        data = np.concatenate(batches) if batches else np.zeros((0,) + tuple(input_shape), np.float32)
    data = np.asarray(data, np.float32)
    if data.ndim != len(input_shape) + 1 or len(data) == 0:
        raise ValueError(
            "Expected `representative_data` to hold at least one input of shape "
            f"{tuple(input_shape)} (calibrate with train-split data, e.g. tinyrobust.data.calibration_set). "
            f"Received: representative_data with shape {data.shape}"
        )
    if tuple(data.shape[1:]) != tuple(input_shape):
        raise ValueError(
            f"Expected `representative_data` inputs of shape {tuple(input_shape)}. "
            f"Received: representative_data with shape {data.shape}"
        )
    if not np.all(np.isfinite(data)):
        raise ValueError("Expected finite `representative_data`. Received: representative_data with NaN or inf")
    if input_range is not None and (data.min() < input_range[0] or data.max() > input_range[1]):
        raise ValueError(f"Expected calibration inputs in the model's input range {tuple(input_range)} (inputs on "
                         f"another scale, e.g. 0-255 for a [0, 1] model, calibrate the int8 input wrongly and the "
                         f"file's accuracy collapses). Received: representative_data in [{data.min():.4g}, "
                         f"{data.max():.4g}]")
    return data[:limit]


def _convert(plain, representative, int8):
    converter = tf.lite.TFLiteConverter.from_keras_model(plain)
    if int8:
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = lambda: ([representative[i:i + 1]] for i in range(len(representative)))
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.int8
        converter.inference_output_type = tf.int8
    with captured_output():
        try:
            return converter.convert()
        except Exception as error:  # the converter raises several error types
            raise ValueError(f"TFLite conversion of {plain.name!r} failed: {error}") from None


def _check_runs_in_tflm(tflite_bytes, name):
    try:
        TFLiteModel(tflite_bytes, runtime="tflm")
    except RuntimeError as error:
        raise ValueError(
            f"The TFLite model of {name!r} does not run in TFLite Micro ({error}). "
            f"Its operators: {', '.join(operator_names(tflite_bytes))}"
        ) from None


def to_tflite(model, path, representative_data, int8=True, calibration_size=500, compress=False,
              input_range=(0.0, 1.0), arena_limit=ARENA_LIMIT):
    """Exports `model` to a `.tflite` file that runs in TFLite Micro.

    Folds quantizers and batch norms into a plain Keras clone
    (`tinyrobust.export.fold_model`), then converts it with full-integer int8
    post-training quantization (int8 input and output, per-channel weights)
    calibrated on `representative_data`, which should come from the train
    split. The result is checked to load and run in TFLite Micro before it is
    written; nothing is written when any step fails.

    With `compress=True`, every weight tensor whose int8 values take at most
    2^k values per channel (k = 1..4: binary 1 bit, ternary 2, int4 4) is
    stored as k-bit indices into per-channel value tables that TFLite Micro's
    `TFLM_DECODE` operator expands at run time
    (`tinyrobust.export.compress_tflite`); the file is written only when its
    outputs equal the int8 model's bit for bit in TFLite Micro on the
    calibration inputs and on random inputs. Beside `path` go the int8 model
    (`<stem>.int8.tflite`, for LiteRT, which cannot run `TFLM_DECODE`) and the
    `CompressionReport` (`<stem>.compression.json`). A decoded kernel lives
    in the arena while its operator runs; large ones are split into
    output-channel groups (exact) until the arena is at most `arena_limit`
    times the int8 model's, and the report says what the file costs when no
    grouping reaches it.

    Args:
        model: a functional Keras model (tinyrobust quantized layers allowed).
        path: where to write the `.tflite` file.
        representative_data: calibration inputs: an array, an `(x, y)` tuple or
            a `tf.data.Dataset` of `x` or `(x, y)` batches.
        int8: full-integer int8 (True) or float32 (False) model.
        calibration_size: largest number of calibration inputs used.
        compress: store low-bit weights below int8 (needs `int8=True`).
        input_range: the model's valid `(low, high)` inputs (default [0, 1], as
            every tinyrobust data set but the MFCC ones); calibration inputs
            outside it are refused. None skips the check.
        arena_limit: with `compress`, the largest TFLite Micro arena wanted as
            a multiple of the int8 model's (default 1.10); None ships the
            smallest flash whatever its arena.

    Returns:
        The `pathlib.Path` written.

    Raises:
        ValueError: empty or mis-shaped representative data, layers that cannot
            be exported, a model TFLite Micro cannot run, `compress` without
            `int8`, a bad `arena_limit`, or a compressed model that is not bit-exact.
    """
    check_number("calibration_size", calibration_size, low=1, integer=True)
    for name, value in (("int8", int8), ("compress", compress)):
        if not isinstance(value, (bool, np.bool_)):
            raise ValueError(f"Expected `{name}` to be True or False. Received: {name}={value!r}")
    if compress and not int8:
        raise ValueError("Compression packs int8 weights below 8 bits, so it needs an int8 model. "
                         "Received: compress=True, int8=False")
    check_arena_limit(arena_limit)
    if input_range is not None:
        input_range = check_range(input_range)
    representative = _representative_array(representative_data, model.input_shape[1:], calibration_size, input_range)
    plain = fold_model(model)
    tflite_bytes = _convert(plain, representative, bool(int8))
    _check_runs_in_tflm(tflite_bytes, model.name)
    if not compress:
        return write_atomically(path, tflite_bytes)

    packed, report = compress_tflite(tflite_bytes, representative, arena_limit=arena_limit)
    write_atomically(uncompressed_path(path), tflite_bytes)
    report.save(compression_report_path(path))
    return write_atomically(path, packed)
