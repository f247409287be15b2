"""Large kernels in output-channel groups: the rewrite that bounds a compressed model's TFLite Micro arena.

A `TFLM_DECODE` operator expands a compressed kernel into the arena just
before the operator that reads it, so a model's arena grows by its largest
decoded kernel beside the activations live at that operator (the width-32
small CNN: its 73,728-byte third convolution). Splitting that operator into
`g` operators over consecutive output-channel groups, each with its own slice
of the kernel, bias and per-channel scales, and joining their outputs with one
`CONCATENATION`, makes each decoded kernel `g` times smaller.

The rewrite is exact: every output channel of a TFLite convolution or fully
connected layer is computed from its own kernel slice, bias and requantisation
multiplier only, the group outputs keep the output tensor's scale and zero
point, and an int8 concatenation with equal quantisation on every side copies
bytes. The compressor still checks the result bit for bit against the int8
file (`compress_tflite`).
"""

import collections
import copy

import numpy as np

__all__ = ["MAX_GROUPS", "Splittable", "splittable_operators", "split_output_channels"]

_SPLITTABLE = ("CONV_2D", "FULLY_CONNECTED")

MAX_GROUPS = 10  # TFLite Micro's CONCATENATION takes at most 10 inputs (kMaxInputNum in its kernel)

Splittable = collections.namedtuple("Splittable", ["operator", "channels", "kernel_bytes", "kernel"])
Splittable.__doc__ = "A splittable operator: its name, output channels, kernel bytes and kernel tensor index."


def _schema():
    from tflite_micro.tensorflow.lite.micro.compression import model_editor
    from tflite_micro.tensorflow.lite.micro.python import schema_py_generated

    return model_editor, schema_py_generated


def _name(schema, op):
    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    return names.get(op.opcode, "CUSTOM")


def splittable_operators(tflite_bytes):
    """The operators of a flatbuffer's first subgraph that `split_output_channels` can split.

    Args:
        tflite_bytes: an int8 `.tflite` flatbuffer.

    Returns:
        `{operator index: Splittable(operator, channels, kernel_bytes, kernel)}` for
        every CONV_2D and FULLY_CONNECTED operator with a constant int8 kernel.
    """
    editor, schema = _schema()
    model = editor.read(bytes(tflite_bytes))
    found = {}
    for index, op in enumerate(model.subgraphs[0].operators):
        name = _name(schema, op)
        if name not in _SPLITTABLE or len(op.inputs) < 2 or op.inputs[1] is None:
            continue
        kernel = op.inputs[1]
        if kernel.buffer is None or kernel.dtype != schema.TensorType.INT8:
            continue
        found[index] = Splittable(name, int(kernel.shape[0]), int(np.prod(kernel.shape)), int(kernel.index))
    return found


def _sliced(tensor, editor, part, groups, name):
    """A constant tensor's `part`-th slice of `groups` along axis 0, with its scales and zero points."""
    values = tensor.array
    size = values.shape[0] // groups
    piece = tensor.copy(name=name)
    piece.buffer = editor.Buffer(data=np.ascontiguousarray(values[part * size:(part + 1) * size]).tobytes())
    piece.shape = (size,) + values.shape[1:]
    quantization = tensor.quantization
    if quantization is not None and np.size(quantization.scales) > 1:  # per channel: its channels' scales
        zeros = quantization.zero_points
        zeros = zeros[part * size:(part + 1) * size] if np.size(zeros) > 1 else zeros
        piece.quantization = editor.Quantization(scales=list(quantization.scales[part * size:(part + 1) * size]),
                                                 zero_points=list(zeros), axis=0)
    return piece


def split_output_channels(tflite_bytes, groups):
    """Splits operators into output-channel groups joined by a concatenation; the outputs are bit-identical.

    Args:
        tflite_bytes: an int8 `.tflite` flatbuffer.
        groups: `{operator index: number of groups}` for operators of the first
            subgraph listed by `splittable_operators`; each number must divide
            the operator's output channels and be at most `MAX_GROUPS`.

    Returns:
        The rewritten flatbuffer's bytes (`tflite_bytes` unchanged for no groups above 1).

    Raises:
        ValueError: an index that is not a splittable operator, or a number of
            groups that does not divide its output channels.
    """
    groups = {int(k): v for k, v in dict(groups).items() if v != 1}
    if not groups:
        return bytes(tflite_bytes)
    editor, schema = _schema()
    splittable = splittable_operators(tflite_bytes)
    for index, count in groups.items():
        if index not in splittable:
            raise ValueError(f"Operator {index} is not a CONV_2D or FULLY_CONNECTED operator with a constant int8 "
                             f"kernel (splittable: {sorted(splittable)}). Received: groups={groups}")
        channels = splittable[index].channels
        if (isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 1 or channels % count
                or count > MAX_GROUPS):
            raise ValueError(f"The groups of operator {index} must be a positive divisor of its {channels} output "
                             f"channels and at most {MAX_GROUPS} (the inputs TFLite Micro's CONCATENATION takes). "
                             f"Received: groups={groups}")
    model = editor.read(bytes(tflite_bytes))
    subgraph = model.subgraphs[0]
    operators, dropped = [], set()
    for index, op in enumerate(subgraph.operators):
        count = groups.get(index, 1)
        if count == 1:
            operators.append(op)
            continue
        source, kernel, bias = op.inputs[0], op.inputs[1], op.inputs[2] if len(op.inputs) > 2 else None
        output = op.outputs[0]
        pieces = []
        for part in range(count):
            kernel_part = _sliced(kernel, editor, part, count, f"{kernel.name}/group_{part}")
            bias_part = None if bias is None else _sliced(bias, editor, part, count, f"{bias.name}/group_{part}")
            piece = output.copy(name=f"{output.name}/group_{part}")
            piece.buffer = None
            piece.shape = output.shape[:-1] + (output.shape[-1] // count,)
            subgraph.tensors.extend(t for t in (kernel_part, bias_part, piece) if t is not None)
            operators.append(editor.Operator(opcode=op.opcode, inputs=[source, kernel_part, bias_part, *op.inputs[3:]],
                                             outputs=[piece], _fb=copy.deepcopy(op._fb)))
            pieces.append(piece)
        join = schema.OperatorT()
        join.builtinOptionsType = schema.BuiltinOptions.ConcatenationOptions
        join.builtinOptions = schema.ConcatenationOptionsT()
        join.builtinOptions.axis = len(output.shape) - 1
        join.builtinOptions.fusedActivationFunction = schema.ActivationFunctionType.NONE
        operators.append(editor.Operator(opcode=schema.BuiltinOperator.CONCATENATION, inputs=pieces,
                                         outputs=[output], _fb=join))
        dropped |= {id(t) for t in (kernel, bias) if t is not None}
    subgraph.operators = operators
    still_read = {id(t) for op in operators for t in op.inputs if t is not None}
    subgraph.tensors = [t for t in subgraph.tensors if id(t) not in dropped or id(t) in still_read]
    editor.prune_buffers(model)
    return bytes(model.build())
