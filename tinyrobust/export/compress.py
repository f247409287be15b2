"""Sub-int8 weights through TFLite Micro's own LUT compression (the `TFLM_DECODE` operator).

A weight tensor whose int8 values take at most 2^k distinct values in every
channel (ternary: 3, binary: 2, int4: 16) is rewritten by
`tflite_micro.compression` as k-bit indices into one value table per channel;
a `TFLM_DECODE` operator in front of each consumer decodes it into the arena
at run time. Firmware registers that operator with `AddDecode()`. The
compressed model runs only in TFLite Micro (LiteRT does not know the custom
operator), so it is always checked against the int8 model it came from:
outputs must be bit-identical in TFLite Micro, or nothing is written.
"""

import dataclasses
import importlib
import json
import math
import os
import pathlib
import tempfile
from typing import Optional

import numpy as np

from tinyrobust._silence import captured_output
from tinyrobust.export.channel_groups import MAX_GROUPS, split_output_channels, splittable_operators
from tinyrobust.export.flatbuffer import DECODE_OPERATOR, _operators, operator_names
from tinyrobust.export.interpreter import TFLiteModel
from tinyrobust.files import write_json

TFLITE_MICRO_VERSION = "0.dev20261023182759"
MAX_BITS = 4
ARENA_LIMIT = 1.10  # the compressed arena asked for by default, as a multiple of the int8 arena
RANDOM_CHECK_INPUTS = 64
_WEIGHT_INPUT = {"CONV_2D": 1, "DEPTHWISE_CONV_2D": 1, "FULLY_CONNECTED": 1}
_DCM_BYTES = 16  # the decode common metadata in front of every value table


def _api():
    """The parts of tflite-micro's compression API used here.

    Raises:
        ImportError: the installed tflite-micro lacks them, naming the version needed.
    """
    try:
        compression = importlib.import_module("tflite_micro.tensorflow.lite.micro.compression")
        spec = importlib.import_module("tflite_micro.tensorflow.lite.micro.compression.spec")
        editor = importlib.import_module("tflite_micro.tensorflow.lite.micro.compression.model_editor")
        align = importlib.import_module("tflite_micro.tensorflow.lite.micro.tools.tflite_flatbuffer_align_wrapper")
        for module, names in ((compression, ("compress",)), (spec, ("Tensor", "LookUpTableCompression", "PerChannel",
                                                                     "PerTensor")),
                              (editor, ("read", "iter_tensors", "prune_buffers")), (align, ("align_tflite_model",))):
            for name in names:
                getattr(module, name)
    except (ImportError, AttributeError) as error:
        try:
            from tflite_micro import __version__ as installed
        except ImportError:
            installed = "none"
        raise ImportError(
            f"Compressed export needs the compression API of tflite-micro=={TFLITE_MICRO_VERSION} "
            f"(`pip install tflite-micro=={TFLITE_MICRO_VERSION}`). Installed: tflite-micro {installed} ({error})"
        ) from None
    return compression, spec, editor, align


@dataclasses.dataclass(frozen=True)
class TensorPlan:
    """How one weight tensor is compressed.

    Attributes:
        subgraph: subgraph index.
        tensor: tensor index in the subgraph.
        operator: the consuming operator ("CONV_2D", ...).
        name: the tensor's name in the int8 file.
        shape: the tensor's shape.
        axis: the channel axis of the value tables (the tensor's quantized
            dimension), or None for one table for the whole tensor.
        values_per_channel: largest number of distinct values in one channel.
        bits: index bits (1 to 4).
    """

    subgraph: int
    tensor: int
    operator: str
    name: str
    shape: tuple
    axis: object
    values_per_channel: int
    bits: int

    @property
    def int8_bytes(self):
        """Bytes of the tensor in the int8 file."""
        return int(np.prod(self.shape))

    @property
    def compressed_bytes(self):
        """Bytes of the packed indices plus the value tables (with their 16-byte header)."""
        channels = 1 if self.axis is None else self.shape[self.axis]
        return math.ceil(self.int8_bytes * self.bits / 8) + _DCM_BYTES + channels * self.values_per_channel


@dataclasses.dataclass
class CompressionReport:
    """What `compress_tflite` did to one model.

    Attributes:
        tensors: one dict per compressed tensor: operator, name, shape, axis,
            values_per_channel, bits, bytes_before, bytes_after.
        int8_bytes: flatbuffer bytes of the int8 model.
        flash_bytes: flatbuffer bytes of the shipped (compressed) model.
        int8_arena_bytes: TFLite Micro arena bytes of the int8 model.
        arena_bytes: TFLite Micro arena bytes of the shipped model.
        bit_exact_inputs: inputs on which the shipped model's outputs were
            checked to equal the int8 model's, bit for bit (0 when nothing was
            compressed: the shipped file is the int8 file).
        note: what happened, in words.
        groups: `{operator: groups}`, the operators split into output-channel
            groups to bound the arena (`channel_groups`), named
            `"<index> <OPERATOR>"` by their place in the int8 file.
        arena_limit: the largest arena asked for, as a multiple of the int8
            arena (None: the smallest flash was asked for, no grouping).
    """

    tensors: list
    int8_bytes: int
    flash_bytes: int
    int8_arena_bytes: int
    arena_bytes: int
    bit_exact_inputs: int
    note: str
    groups: dict = dataclasses.field(default_factory=dict)
    arena_limit: Optional[float] = None

    @property
    def compressed(self):
        """Whether any tensor was compressed."""
        return bool(self.tensors)

    def to_dict(self):
        """The report as a JSON-ready dict."""
        return {**dataclasses.asdict(self), "compressed": self.compressed}

    @classmethod
    def from_dict(cls, record):
        """The report from `to_dict`'s output."""
        defaults = {"groups": {}, "arena_limit": None}  # absent in reports from before arena bounding
        return cls(**{f.name: record[f.name] if f.name in record else defaults[f.name]
                      for f in dataclasses.fields(cls)})

    def save(self, path):
        """Writes the report as JSON, atomically; returns the path."""
        return write_json(path, self.to_dict())

    @classmethod
    def load(cls, path):
        """Reads a report written by `save`."""
        return cls.from_dict(json.loads(pathlib.Path(path).read_text()))

    def to_table(self):
        """The report as Markdown: one row per compressed tensor, then the totals."""
        lines = ["| operator | tensor | shape | values/channel | bits | bytes before | bytes after |",
                 "| --- | --- | --- | --- | --- | --- | --- |"]
        for t in self.tensors:
            lines.append(f"| {t['operator']} | {t['name']} | {'x'.join(map(str, t['shape']))} | "
                         f"{t['values_per_channel']} | {t['bits']} | {t['bytes_before']:,} | {t['bytes_after']:,} |")
        lines.append(f"\nFlash {self.int8_bytes:,} B (int8) -> {self.flash_bytes:,} B; TFLite Micro arena "
                     f"{self.int8_arena_bytes:,} B -> {self.arena_bytes:,} B; bit-identical to the int8 model on "
                     f"{self.bit_exact_inputs} inputs. {self.note}")
        return "\n".join(lines)


def plan_compression(tflite_bytes, max_bits=MAX_BITS):
    """The weight tensors of an int8 model that fit in `max_bits`-bit indices, with their bits.

    Every INT8 weight of a CONV_2D, DEPTHWISE_CONV_2D or FULLY_CONNECTED
    operator whose channels (slices along its quantized dimension) hold at
    most 2^k distinct values gets the smallest such k, unless its indices and
    value tables would not be smaller than the int8 tensor (e.g. a first
    convolution with 9 weights per channel); its value tables lie along the
    quantized dimension, as TFLite Micro's decoder reads them.

    Args:
        tflite_bytes: an int8 `.tflite` flatbuffer.
        max_bits: largest index width used (1 to 7).

    Returns:
        A list of `TensorPlan`, in graph order.
    """
    from tflite_micro.python.tflite_micro import runtime


    plans, seen = [], set()
    for model, subgraph, op, op_name in _operators(tflite_bytes):
        if op_name not in _WEIGHT_INPUT:
            continue
        index = op.inputs[_WEIGHT_INPUT[op_name]]
        subgraph_index = model.subgraphs.index(subgraph)
        tensor = subgraph.tensors[index]
        raw = model.buffers[tensor.buffer].data
        if (subgraph_index, index) in seen or raw is None or tensor.type != runtime.schema_fb.TensorType.INT8:
            continue
        seen.add((subgraph_index, index))
        values = np.asarray(raw, np.uint8).view(np.int8).reshape(tensor.shape)
        scales = tensor.quantization.scale if tensor.quantization is not None else None
        axis = int(tensor.quantization.quantizedDimension) if scales is not None and len(scales) > 1 else None
        channels = values.reshape(1, -1) if axis is None else np.moveaxis(values, axis, 0).reshape(values.shape[axis], -1)
        count = max(len(np.unique(channel)) for channel in channels)
        bits = max(1, math.ceil(math.log2(count)))
        name = tensor.name.decode() if isinstance(tensor.name, bytes) else str(tensor.name)
        plan = TensorPlan(subgraph_index, int(index), op_name, name, tuple(int(d) for d in tensor.shape), axis,
                          int(count), bits)
        if bits <= max_bits and plan.compressed_bytes < plan.int8_bytes:
            plans.append(plan)
    return plans


def _strip(packed, editor, align):
    """The compressed flatbuffer without what TFLite Micro never reads, re-aligned.

    Drops the quantization parameters the compressor leaves on the packed
    index tensors, tensor and subgraph names, signatures, metadata and the
    description, and stores all-zero per-channel zero points as one zero
    (TFLite Micro broadcasts a single zero point over the channels).
    """
    model = editor.read(bytes(packed))
    for subgraph in model.subgraphs:
        subgraph._fb.name = None
        for op in subgraph.operators:
            if op.custom_code == DECODE_OPERATOR:
                for encoded in op.inputs[0::2]:
                    encoded.quantization = None
                    encoded._fb.quantization = None
    for tensor in editor.iter_tensors(model):
        tensor._fb.name = None
        fb = tensor._fb.quantization
        if fb is not None and fb.zeroPoint is not None and len(fb.zeroPoint) > 1 and not np.any(fb.zeroPoint):
            fb.zeroPoint = [0]
            if tensor.quantization is not None:
                tensor.quantization.zero_points = [0]
    model.metadata = {}
    model._fb.signatureDefs = None
    model._fb.description = None
    editor.prune_buffers(model)
    with tempfile.TemporaryDirectory() as folder:
        source, target = os.path.join(folder, "in.tflite"), os.path.join(folder, "out.tflite")
        pathlib.Path(source).write_bytes(bytes(model.build()))
        align.align_tflite_model(source, target)
        return pathlib.Path(target).read_bytes()


def _check_inputs(reference, check_inputs, seed=0):
    """Quantized inputs for the bit-exactness check: `check_inputs` and random int8 inputs over every input level."""
    quantized = [reference.quantize_inputs(np.asarray(check_inputs, np.float32))] if check_inputs is not None else []
    info = np.iinfo(reference.input_dtype) if reference.input_dtype.kind in "iu" else None
    if info is not None:
        shape = (RANDOM_CHECK_INPUTS,) + reference.input_shape
        quantized.append(np.random.default_rng(seed).integers(info.min, info.max + 1, shape).astype(reference.input_dtype))
    return np.concatenate(quantized) if quantized else np.zeros((0,) + reference.input_shape, reference.input_dtype)


def check_arena_limit(arena_limit):
    """Raises ValueError unless `arena_limit` is None or a real number of at least 1 (a multiple of the int8 arena)."""
    if arena_limit is None:
        return
    if isinstance(arena_limit, bool) or not isinstance(arena_limit, (int, float)) or not math.isfinite(arena_limit) \
            or arena_limit < 1:
        raise ValueError("Expected `arena_limit` to be None (smallest flash) or a number >= 1, the largest arena as a "
                         f"multiple of the int8 model's. Received: arena_limit={arena_limit!r}")


def _pack(tflite_bytes, api, plan=None):
    """`(packed bytes, plan)`: `tflite_bytes` with the tensors of `plan` (default: `plan_compression`'s)
    compressed, unchecked; the bytes unchanged for an empty plan."""
    compression, spec, editor, align = api
    plan = plan_compression(tflite_bytes) if plan is None else list(plan)
    if not plan:
        return bytes(tflite_bytes), plan
    specs = [spec.Tensor(p.subgraph, p.tensor, [spec.LookUpTableCompression(
        p.bits, spec.PerTensor() if p.axis is None else spec.PerChannel(p.axis))]) for p in plan]
    try:
        with captured_output():
            return _strip(compression.compress(bytes(tflite_bytes), specs), editor, align), plan
    except Exception as error:  # the compressor raises CompressionError and ValueError
        raise ValueError(f"TFLite Micro compression failed ({error}); nothing was written.") from None


def _tflm(packed):
    """The compressed flatbuffer in the TFLite Micro interpreter; ValueError when it does not run there."""
    try:
        return TFLiteModel(packed, runtime="tflm")
    except RuntimeError as error:
        raise ValueError(f"The compressed model does not run in TFLite Micro ({error}); nothing was written.") from None


def _arena(packed):
    return _tflm(packed).arena_bytes


def _groups_for(candidates, cap):
    """Per operator, the fewest groups (a power of two dividing its output channels) that bring its kernel to
    at most `cap` bytes, or as close as the channels allow."""
    groups = {}
    for index, op in candidates.items():
        count = 1
        while op.kernel_bytes / count > cap and op.channels % (count * 2) == 0 and count * 2 <= MAX_GROUPS:
            count *= 2
        if count > 1:
            groups[index] = count
    return groups


def _grouped(tflite_bytes, limit_bytes, api, rounds=8):
    """The grouping with the smallest measured arena among decoded-kernel caps halved round by round.

    Round k splits every compressed CONV_2D and FULLY_CONNECTED operator
    whose kernel is larger than the largest kernel / 2^k into the fewest
    output-channel groups that bring it under that cap, and measures the TFLite
    Micro arena. The search stops at the first grouping within `limit_bytes`
    (the fewest splits that reach it) and otherwise keeps the smallest arena
    seen: the peak may be set by activations or by per-operator state, which
    no split lowers.

    Returns:
        `(groups, packed bytes, plan, arena bytes)`.
    """
    packed, plan = _pack(tflite_bytes, api)
    best = (_arena(packed), {}, packed, plan)
    compressed = {(p.subgraph, p.tensor) for p in plan}
    candidates = {i: op for i, op in splittable_operators(tflite_bytes).items() if (0, op.kernel) in compressed}
    if not candidates:
        return best[1], best[2], best[3], best[0]
    largest, tried = max(op.kernel_bytes for op in candidates.values()), [{}]
    for k in range(1, rounds + 1):
        if best[0] <= limit_bytes:
            break
        groups = _groups_for(candidates, largest / 2 ** k)
        if groups in tried:
            continue
        tried.append(groups)
        trial_packed, trial_plan = _pack(split_output_channels(tflite_bytes, groups), api)
        arena = _arena(trial_packed)
        if arena < best[0]:
            best = (arena, groups, trial_packed, trial_plan)
    return best[1], best[2], best[3], best[0]


def compress_tflite(tflite_bytes, check_inputs=None, plan=None, arena_limit=ARENA_LIMIT):
    """Compresses an int8 model's low-bit weights and proves the result bit-exact.

    A decoded kernel lives in the arena while its operator runs, so the
    compressed model can need more RAM than the int8 one. With `arena_limit`,
    large compressed kernels are split into output-channel groups
    (`channel_groups.split_output_channels`, exact) until the TFLite Micro
    arena is at most `arena_limit` times the int8 arena, or no split lowers it
    (the report then says what the file costs; `arena_limit=None` gives the
    smallest flash, `to_tflite(compress=False)` the int8 arena).

    Args:
        tflite_bytes: an int8 `.tflite` flatbuffer that runs in TFLite Micro.
        check_inputs: float inputs (e.g. the calibration set) on which the
            compressed model must give the int8 model's outputs; 64 random
            int8 inputs over the whole input range are always added.
        plan: the tensors to compress (default: `plan_compression`); a given
            plan is used as it is, without grouping.
        arena_limit: the largest arena wanted, as a multiple of the int8
            model's (default 1.10), or None for no grouping.

    Returns:
        `(bytes, CompressionReport)`: the compressed flatbuffer (the int8 one
        unchanged when no tensor fits in 4 bits) and its report.

    Raises:
        ValueError: a bad `arena_limit`, the compressor refused a tensor, or
            the compressed model does not run in TFLite Micro or differs from
            the int8 model.
        ImportError: the installed tflite-micro lacks the compression API.
    """
    check_arena_limit(arena_limit)
    api = _api()
    reference = TFLiteModel(tflite_bytes, runtime="tflm")
    groups = {}
    if plan is not None or arena_limit is None:
        packed, plan = _pack(tflite_bytes, api, plan)
    else:
        groups, packed, plan, _ = _grouped(tflite_bytes, arena_limit * reference.arena_bytes, api)
    if not plan:
        return bytes(tflite_bytes), CompressionReport(
            [], reference.model_bytes, reference.model_bytes, reference.arena_bytes, reference.arena_bytes, 0,
            f"No weight tensor has at most {2 ** MAX_BITS} values per channel in fewer bytes than int8: the "
            f"shipped file is the plain int8 model.", {}, arena_limit)
    shipped = _tflm(packed)
    inputs = _check_inputs(reference, check_inputs)
    expected, received = reference.invoke_quantized(inputs), shipped.invoke_quantized(inputs)
    differ = np.any(expected.reshape(len(inputs), -1) != received.reshape(len(inputs), -1), axis=1)
    if differ.any():
        largest = int(np.max(np.abs(expected.astype(np.int64) - received.astype(np.int64))))
        raise ValueError(
            f"The compressed model's outputs differ from the int8 model's in TFLite Micro on {int(differ.sum())} of "
            f"{len(inputs)} inputs (up to {largest} output steps); nothing was written. Tensors: "
            + ", ".join(f"{p.name} ({p.bits} bits, axis {p.axis})" for p in plan))
    tensors = [{"operator": p.operator, "name": p.name, "shape": list(p.shape), "axis": p.axis,
                "values_per_channel": p.values_per_channel, "bits": p.bits, "bytes_before": p.int8_bytes,
                "bytes_after": p.compressed_bytes} for p in plan]
    bits = sorted({p.bits for p in plan})
    note = (f"{len(plan)} weight tensors as {'/'.join(map(str, bits))}-bit indices into per-channel value tables "
            f"(TFLM_DECODE; register it with AddDecode()); the other tensors stay int8.")
    names = splittable_operators(tflite_bytes) if groups else {}
    grouped = {f"{i} {names[i].operator}": g for i, g in sorted(groups.items())}
    ratio = shipped.arena_bytes / reference.arena_bytes
    if grouped:
        note += (" To bound the arena, " + ", ".join(f"operator {k} runs in {g} output-channel groups"
                                                    for k, g in grouped.items()) + ".")
    if arena_limit is not None and ratio > arena_limit:
        note += (f" Its arena is {ratio:.2f}x the int8 model's ({shipped.arena_bytes:,} B vs "
                 f"{reference.arena_bytes:,} B), above the {arena_limit:.2f}x asked for: no channel grouping "
                 f"lowers it further. Choose: this file (smallest flash at this arena) or the int8 file "
                 f"(compress=False: {reference.model_bytes:,} B of flash, {reference.arena_bytes:,} B of arena).")
    return packed, CompressionReport(tensors, reference.model_bytes, shipped.model_bytes, reference.arena_bytes,
                                     shipped.arena_bytes, int(len(inputs)), note, grouped, arena_limit)


def is_compressed(tflite_bytes):
    """Whether a `.tflite` flatbuffer holds `TFLM_DECODE` operators (runs only in TFLite Micro)."""

    return DECODE_OPERATOR in operator_names(tflite_bytes)
