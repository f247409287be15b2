"""Reading TFLite flatbuffers, and where the export writes its files: shared by the converter, the compressor and
the interpreter, below all three."""

import pathlib

import numpy as np

DECODE_OPERATOR = "TFLM_DECODE"  # tflite-micro's operator that expands LUT-compressed weights


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


def uncompressed_path(path):
    """Where `to_tflite(..., compress=True)` writes the int8 model the shipped file is bit-exact with."""
    path = pathlib.Path(path)
    return path.with_name(path.stem + ".int8.tflite")


def compression_report_path(path):
    """Where `to_tflite(..., compress=True)` writes the `CompressionReport` of `path`."""
    path = pathlib.Path(path)
    return path.with_name(path.stem + ".compression.json")
