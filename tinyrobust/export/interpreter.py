"""The TFLite Micro and LiteRT interpreters behind one callable: `TFLiteModel`."""

import pathlib
import re
import time

import keras
import numpy as np

from tinyrobust._silence import captured_output
from tinyrobust.export.flatbuffer import (
    DECODE_OPERATOR,
    check_flatbuffer,
    operator_names,
    uncompressed_path,
)
from tinyrobust.validation import check_choice, check_number

RUNTIMES = ("tflm", "litert")


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

    def _set_input(self, example):
        if self.runtime == "tflm":
            self._interpreter.set_input(example[None], 0)
        else:
            self._interpreter.set_tensor(self._input_index, example[None])

    def _invoke(self, example):
        self._set_input(example)
        self._interpreter.invoke()
        if self.runtime == "tflm":
            return self._interpreter.get_output(0)[0]
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

    def seconds_per_inference(self, x, runs=200):
        """Median wall seconds of one `invoke` of this interpreter on this host, over `runs` timed invocations.

        The inputs `x` (float, in the model's range) are quantized first and
        cycled through; only the interpreter's `invoke` is timed, not setting
        the input or reading the output. This is the host build of the
        interpreter: a microcontroller's time is not this one, but the ratio of
        two files' times on one host (e.g. a compressed file's `TFLM_DECODE`
        overhead over its int8 file) is what it measures well.

        Args:
            x: one or more float inputs of the model's input shape.
            runs: timed invocations (at least 1), after one untimed warm-up.

        Returns:
            Seconds per inference (float).
        """
        check_number("runs", runs, low=1, integer=True)
        quantized = self.quantize_inputs(np.asarray(x, np.float32).reshape((-1,) + self.input_shape))
        if not len(quantized):
            raise ValueError("Expected at least one input to time. Received: x with 0 examples")
        times = []
        for i in range(runs + 1):
            self._set_input(quantized[i % len(quantized)])
            start = time.perf_counter()
            self._interpreter.invoke()
            times.append(time.perf_counter() - start)
        return float(np.median(times[1:]))

    def predict(self, x, batch_size=None, verbose=0):
        """Same as calling the model (Keras-like signature)."""
        del batch_size, verbose
        return self(x)


def paired_seconds_per_inference(first, second, x, runs=200, blocks=4):
    """Median seconds per inference of two interpreters timed in alternating blocks on the same inputs.

    Timing one file and then the other lets a change in the host's load between
    the two show up as a difference between the files; alternating `blocks`
    blocks of `runs / blocks` invocations each, and taking each file's median
    over its blocks, keeps the two under the same load.

    Args:
        first, second: `TFLiteModel`s of the same input shape.
        x: float inputs in the models' range.
        runs: timed invocations per file (at least `blocks`).
        blocks: alternating blocks per file.

    Returns:
        `(first seconds, second seconds)`.
    """
    check_number("blocks", blocks, low=1, integer=True)
    check_number("runs", runs, low=blocks, integer=True)
    times = ([], [])
    for _ in range(blocks):
        for model, found in zip((first, second), times):
            found.append(model.seconds_per_inference(x, runs=runs // blocks))
    return float(np.median(times[0])), float(np.median(times[1]))
