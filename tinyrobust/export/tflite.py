"""Full-integer TFLite conversion and the TFLite Micro / LiteRT runner."""

import pathlib
import re

import keras
import numpy as np
import tensorflow as tf

from tinyrobust._silence import captured_output
from tinyrobust.export.fold import fold_model
from tinyrobust.files import write_atomically
from tinyrobust.validation import check_choice, check_number, check_range

RUNTIMES = ("tflm", "litert")


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


def check_flatbuffer(data, name="model"):
    """Raises ValueError unless `data` starts like a TFLite flatbuffer (file identifier "TFL3")."""
    data = bytes(data)
    if len(data) < 8 or data[4:8] != b"TFL3":
        raise ValueError(f"Expected a TFLite flatbuffer (file identifier 'TFL3'). Received: {name} with "
                         f"{len(data)} bytes starting {data[:8]!r}")


def _operators(tflite_bytes):
    """Yields (model, subgraph, operator, builtin name) for every operator of a flatbuffer."""
    from tflite_micro.python.tflite_micro import runtime

    check_flatbuffer(tflite_bytes, "tflite_bytes")

    model = runtime.convert_bytearray_to_object(bytearray(tflite_bytes))
    names = {v: k for k, v in vars(runtime.schema_fb.BuiltinOperator).items() if not k.startswith("_")}
    for subgraph in model.subgraphs:
        for op in subgraph.operators or []:
            operator_code = model.operatorCodes[op.opcodeIndex]
            code = runtime.get_builtin_code_from_operator_code(operator_code)
            name = names.get(code, "CUSTOM")
            if name == "CUSTOM" and operator_code.customCode:
                custom = operator_code.customCode
                name = custom.decode() if isinstance(custom, bytes) else str(custom)
            yield model, subgraph, op, name


def operator_names(tflite_bytes):
    """Names of the operators a TFLite flatbuffer uses, sorted (custom operators by their custom code).

    Args:
        tflite_bytes: the model file's bytes.

    Returns:
        A sorted list such as ["CONV_2D", "FULLY_CONNECTED", "TFLM_DECODE", ...].
    """
    return sorted({name for _, _, _, name in _operators(tflite_bytes)})


_WEIGHT_OPS = {"CONV_2D": 1, "DEPTHWISE_CONV_2D": 1, "FULLY_CONNECTED": 1}


def kernel_values_per_channel(tflite_bytes):
    """Largest number of distinct int8 values in one channel of each exported kernel.

    Reads the weight tensors of CONV_2D, DEPTHWISE_CONV_2D and FULLY_CONNECTED
    operators straight from the flatbuffer; a channel is a slice along the
    tensor's quantized dimension.

    Args:
        tflite_bytes: the model file's bytes.

    Returns:
        A list of (operator name, weight tensor name, count), in graph order.
    """
    from tflite_micro.python.tflite_micro import runtime

    result = []
    for model, subgraph, op, op_name in _operators(tflite_bytes):
        if op_name not in _WEIGHT_OPS:
            continue
        tensor = subgraph.tensors[op.inputs[_WEIGHT_OPS[op_name]]]
        raw = model.buffers[tensor.buffer].data
        if raw is None or tensor.type != runtime.schema_fb.TensorType.INT8:
            continue
        values = np.asarray(raw, np.uint8).view(np.int8).reshape(tensor.shape)
        axis = tensor.quantization.quantizedDimension if tensor.quantization else 0
        channels = np.moveaxis(values, axis, 0).reshape(values.shape[axis], -1)
        count = max(len(np.unique(channel)) for channel in channels)
        result.append((op_name, tensor.name.decode() if isinstance(tensor.name, bytes) else tensor.name, count))
    return result


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


def uncompressed_path(path):
    """Where `to_tflite(..., compress=True)` writes the int8 model the shipped file is bit-exact with."""
    path = pathlib.Path(path)
    return path.with_name(path.stem + ".int8.tflite")


def compression_report_path(path):
    """Where `to_tflite(..., compress=True)` writes the `CompressionReport` of `path`."""
    path = pathlib.Path(path)
    return path.with_name(path.stem + ".compression.json")


def to_tflite(model, path, representative_data, int8=True, calibration_size=500, compress=False,
              input_range=(0.0, 1.0)):
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
    `CompressionReport` (`<stem>.compression.json`).

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

    Returns:
        The `pathlib.Path` written.

    Raises:
        ValueError: empty or mis-shaped representative data, layers that cannot
            be exported, a model TFLite Micro cannot run, `compress` without
            `int8`, or a compressed model that is not bit-exact.
    """
    check_number("calibration_size", calibration_size, low=1, integer=True)
    for name, value in (("int8", int8), ("compress", compress)):
        if not isinstance(value, (bool, np.bool_)):
            raise ValueError(f"Expected `{name}` to be True or False. Received: {name}={value!r}")
    if compress and not int8:
        raise ValueError("Compression packs int8 weights below 8 bits, so it needs an int8 model. "
                         "Received: compress=True, int8=False")
    if input_range is not None:
        input_range = check_range(input_range)
    representative = _representative_array(representative_data, model.input_shape[1:], calibration_size, input_range)
    plain = fold_model(model)
    tflite_bytes = _convert(plain, representative, bool(int8))
    _check_runs_in_tflm(tflite_bytes, model.name)
    if not compress:
        return write_atomically(path, tflite_bytes)
    from tinyrobust.export.compress import compress_tflite

    packed, report = compress_tflite(tflite_bytes, representative)
    write_atomically(uncompressed_path(path), tflite_bytes)
    report.save(compression_report_path(path))
    return write_atomically(path, packed)


class TFLiteModel:
    """A `.tflite` model as a callable from float inputs to float logits.

    Inputs in the model's float range are quantized with the input tensor's
    scale and zero point (rounded, then clipped to int8), run one example at a
    time in the TFLite Micro Python interpreter (`runtime="tflm"`) or LiteRT
    (`runtime="litert"`), and the outputs are dequantized. The object can be
    passed to attacks and `tinyrobust.attacks.robust_accuracy` like a model.

    Args:
        model: path of a `.tflite` file, or its bytes.
        runtime: "tflm" or "litert".
        arena_size: TFLite Micro arena bytes to allocate; by default 10x the
            model size, at least 64 KiB.

    Attributes:
        arena_bytes: TFLite Micro arena bytes the model actually uses (None
            for LiteRT).
        model_bytes: size of the flatbuffer.
        queries: number of examples run so far.
    """

    def __init__(self, model, runtime="tflm", arena_size=None):
        check_choice("runtime", runtime, RUNTIMES)
        if isinstance(model, (bytes, bytearray)):
            self.path, data = None, bytes(model)
        else:
            self.path = pathlib.Path(model)
            if not self.path.is_file():
                raise FileNotFoundError(f"No TFLite model at {str(self.path)!r}. Received: model={str(model)!r}")
            data = self.path.read_bytes()
        check_flatbuffer(data, "model" if self.path is None else f"model={str(self.path)!r}")
        if arena_size is not None:
            check_number("arena_size", arena_size, low=1, integer=True)
        self.runtime = runtime
        self.model_bytes = len(data)
        self.queries = 0
        self.arena_bytes = None
        if runtime == "tflm":
            self._interpreter = self._tflm(data, arena_size or max(10 * len(data), 65536))
            input_details = self._interpreter.get_input_details(0)
            output_details = self._interpreter.get_output_details(0)
        else:
            from tinyrobust.export.compress import DECODE_OPERATOR

            if DECODE_OPERATOR in operator_names(data):
                where = "" if self.path is None else f" ({uncompressed_path(self.path).name} beside it)"
                raise ValueError(
                    f"This model is compressed with {DECODE_OPERATOR}, which only TFLite Micro runs; give LiteRT "
                    f"the uncompressed int8 file{where}. Received: runtime='litert'")
            from ai_edge_litert.interpreter import Interpreter

            self._interpreter = Interpreter(model_content=data)
            self._interpreter.allocate_tensors()
            input_details = self._interpreter.get_input_details()[0]
            output_details = self._interpreter.get_output_details()[0]
            self._input_index, self._output_index = input_details["index"], output_details["index"]
        self.input_shape = tuple(int(d) for d in input_details["shape"][1:])
        self.input_dtype = np.dtype(input_details["dtype"])
        self.output_shape = tuple(int(d) for d in output_details["shape"][1:])
        self.output_dtype = np.dtype(output_details["dtype"])
        self._input_quantization = self._quantization(input_details)
        self._output_quantization = self._quantization(output_details)

    @staticmethod
    def _quantization(details):
        params = details.get("quantization_parameters") or {}
        scales = params.get("scales")
        if scales is None or len(scales) == 0:
            scale, zero_point = details.get("quantization", (0.0, 0))
            return (float(scale), int(zero_point)) if scale else None
        return float(scales[0]), int(params["zero_points"][0])

    def _tflm(self, data, arena_size):
        from tflite_micro.python.tflite_micro import runtime

        with captured_output() as log:
            interpreter = runtime.Interpreter.from_bytes(data, arena_size=arena_size)
            details = interpreter.get_input_details(0)
            interpreter.set_input(np.zeros(details["shape"], details["dtype"]), 0)
            interpreter.invoke()
            interpreter.print_allocations()
        match = re.search(r"Arena allocation total (\d+) bytes", log[0])
        self.arena_bytes = int(match.group(1)) if match else None
        return interpreter

    @property
    def input_scale(self):
        """(scale, zero_point) of the int8 input, or None for a float input."""
        return self._input_quantization

    @property
    def output_scale(self):
        """(scale, zero_point) of the int8 output, or None for a float output."""
        return self._output_quantization

    def dtype_name(self, role):
        """The C type of the "INPUT" or "OUTPUT" tensor (e.g. "int8_t")."""
        dtype = self.input_dtype if role == "INPUT" else self.output_dtype
        return {"int8": "int8_t", "uint8": "uint8_t", "int16": "int16_t", "float32": "float"}.get(dtype.name,
                                                                                                 dtype.name)

    def quantize_inputs(self, x):
        """Float inputs as the interpreter's input dtype (rounded and clipped for int8)."""
        x = np.asarray(x, np.float32)
        if self._input_quantization is None:
            return x.astype(self.input_dtype)
        scale, zero_point = self._input_quantization
        info = np.iinfo(self.input_dtype)
        return np.clip(np.round(x / scale) + zero_point, info.min, info.max).astype(self.input_dtype)

    def _dequantize(self, y):
        if self._output_quantization is None:
            return y.astype(np.float32)
        scale, zero_point = self._output_quantization
        return ((y.astype(np.float32) - zero_point) * scale).astype(np.float32)

    def _invoke(self, example):
        if self.runtime == "tflm":
            self._interpreter.set_input(example[None], 0)
            self._interpreter.invoke()
            return self._interpreter.get_output(0)[0]
        self._interpreter.set_tensor(self._input_index, example[None])
        self._interpreter.invoke()
        return self._interpreter.get_tensor(self._output_index)[0]

    def invoke_quantized(self, x):
        """Raw outputs (the interpreter's output dtype) of inputs already in its input dtype, one by one."""
        x = np.asarray(x)
        if x.shape[1:] != self.input_shape or x.dtype != self.input_dtype:
            raise ValueError(f"Expected {self.input_dtype} inputs of shape (N, {', '.join(map(str, self.input_shape))}). "
                             f"Received: x with shape {x.shape} and dtype {x.dtype}")
        self.queries += len(x)
        return np.stack([np.array(self._invoke(example)) for example in x]) if len(x) else np.zeros((0,))

    def __call__(self, x):
        """Dequantized logits, shape (N, classes), of a float batch `x`."""
        x = np.asarray(keras.ops.convert_to_numpy(x), np.float32)
        if x.shape[1:] != self.input_shape:
            raise ValueError(f"Expected inputs of shape (N, {', '.join(map(str, self.input_shape))}). "
                             f"Received: x with shape {x.shape}")
        if not np.all(np.isfinite(x)):  # NaN would quantize to an arbitrary int8 value
            raise ValueError("Expected finite inputs. Received: x with NaN or inf")
        quantized = self.quantize_inputs(x)
        outputs = np.stack([self._invoke(example) for example in quantized]) if len(x) else None
        self.queries += len(x)
        if outputs is None:
            return np.zeros((0,), np.float32)
        return self._dequantize(outputs)

    def predict(self, x, batch_size=None, verbose=0):
        """Same as calling the model (Keras-like signature)."""
        del batch_size, verbose
        return self(x)
