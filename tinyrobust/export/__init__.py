"""Export to TFLite and TFLite Micro, and check the exported model.

`to_tflite` folds quantizers and batch norms into a plain Keras clone and
converts it to a full-integer int8 `.tflite`; `TFLiteModel` runs it in the
TFLite Micro Python interpreter (or LiteRT) as a float-in, logits-out
callable; `verify` reports parity with the Keras model; `to_c_array` writes
the C source for firmware. With `compress=True` low-bit weights ship below
int8 through TFLite Micro's LUT compression (`compress_tflite`), bit-exact
with the int8 model; large kernels run in output-channel groups
(`split_output_channels`) so that the compressed file needs no more than
`ARENA_LIMIT` times the int8 arena where that is reachable.
"""

from tinyrobust.export.c_array import to_c_array
from tinyrobust.export.channel_groups import split_output_channels, splittable_operators
from tinyrobust.export.compress import (
    ARENA_LIMIT,
    CompressionReport,
    TensorPlan,
    compress_tflite,
    is_compressed,
    plan_compression,
)
from tinyrobust.export.deploy import export_and_verify
from tinyrobust.export.flatbuffer import (
    compression_report_path,
    kernel_values_per_channel,
    operator_names,
    uncompressed_path,
)
from tinyrobust.export.fold import (
    FoldedBatchNorm,
    distinct_values_per_channel,
    fold_model,
    fold_quantized_weights,
)
from tinyrobust.export.interpreter import RUNTIMES, TFLiteModel, paired_seconds_per_inference
from tinyrobust.export.parity import ParityReport, verify
from tinyrobust.export.tflite import to_tflite

__all__ = [
    "ARENA_LIMIT",
    "CompressionReport",
    "FoldedBatchNorm",
    "ParityReport",
    "RUNTIMES",
    "TFLiteModel",
    "TensorPlan",
    "compress_tflite",
    "compression_report_path",
    "distinct_values_per_channel",
    "export_and_verify",
    "fold_model",
    "fold_quantized_weights",
    "is_compressed",
    "kernel_values_per_channel",
    "operator_names",
    "paired_seconds_per_inference",
    "plan_compression",
    "split_output_channels",
    "splittable_operators",
    "to_c_array",
    "to_tflite",
    "uncompressed_path",
    "verify",
]
