"""Flash and TFLite Micro arena bytes of the int8 and the compressed export, per model and quantization.

Each model is exported with `tinyrobust.export.to_tflite(..., compress=True)`:
quantizers and batch norms folded, full-integer int8, then every weight
tensor with at most 16 values per channel stored as 1-4 bit indices into
per-channel value tables (TFLite Micro's `TFLM_DECODE`). Both files are loaded
in the tflite-micro Python interpreter, which reports the arena it allocated;
the compressed file is written only when its outputs equal the int8 file's
bit for bit in TFLite Micro on the calibration inputs and 64 random int8
inputs, and this script checks that again on 64 fresh inputs. Weights are
freshly initialised (a trained STQ model has the same number of values per
channel) and calibration inputs are drawn uniformly from the input range.
MLPerf Tiny's reference int8 sizes are listed next to ours, and the sizes are
checked against the targets of the compressed-export issue.

Writes benchmarks/results/export_size.json and .md. Run:

    .venv/bin/python benchmarks/export_size.py
"""

import argparse
import json
import os
import pathlib
import platform
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import tinyrobust as tr  # noqa: E402

RESULTS = pathlib.Path(__file__).parent / "results"
MODELS = {
    "resnet8": (tr.models.resnet8, "cifar10"),
    "dscnn": (tr.models.dscnn, "speech_commands"),
    "small_cnn": (tr.models.small_cnn, "fashion_mnist"),
}
# MLPerf Tiny v1.0 reference int8 models: (.tflite bytes, TFLite Micro arena bytes).
REFERENCES = {"resnet8": (98_496, 55_984), "dscnn": (53_936, 24_272)}
# (model, quantization): largest compressed flash bytes, or a fraction of the model's own int8 file.
TARGETS = {("resnet8", "stq"): 40_000, ("dscnn", "stq"): 30_000, ("resnet8", "stb"): 36_000,
           ("resnet8", "int4"): 0.70}
ARENA_TARGET = 1.10  # compressed arena at most 10% above the int8 arena


def measure(name, quantization, calibration_size):
    build, dataset = MODELS[name]
    keras.utils.set_random_seed(0)
    model = build(quantization=quantization)
    low, high = tr.data.info(dataset).input_range
    rng = np.random.default_rng(0)
    calibration = rng.uniform(low, high, (calibration_size,) + model.input_shape[1:]).astype("float32")
    with tempfile.TemporaryDirectory() as folder:
        path = tr.export.to_tflite(model, pathlib.Path(folder) / "m.tflite", calibration, compress=True)
        report = tr.export.CompressionReport.load(tr.export.compression_report_path(path))
        shipped, reference = tr.export.TFLiteModel(path), tr.export.TFLiteModel(tr.export.uncompressed_path(path))
        fresh = rng.uniform(low, high, (64,) + model.input_shape[1:]).astype("float32")
        bit_exact = bool(np.array_equal(shipped(fresh), reference(fresh)))
    footprint = tr.summary(model, print_fn=None)
    reference_sizes = REFERENCES.get(name)
    target = TARGETS.get((name, quantization))
    target_bytes = target if target is None or target > 1 else int(target * report.int8_bytes)
    return {
        "model": name, "quantization": quantization, "params": footprint.params,
        "int8_flash_bytes": report.int8_bytes, "flash_bytes": report.flash_bytes,
        "int8_arena_bytes": report.int8_arena_bytes, "arena_bytes": report.arena_bytes,
        "compressed_tensors": len(report.tensors), "bits": sorted({t["bits"] for t in report.tensors}),
        "bit_exact": bit_exact and (report.bit_exact_inputs > 0 or not report.compressed),
        "bit_exact_inputs": report.bit_exact_inputs + 64,
        "ideal_packed_weight_bytes": footprint.packed_bytes,
        "target_flash_bytes": target_bytes,
        "meets_targets": None if target_bytes is None else bool(
            report.flash_bytes <= target_bytes and report.arena_bytes <= ARENA_TARGET * report.int8_arena_bytes
            and bit_exact),
        "mlperf_tflite_bytes": reference_sizes[0] if reference_sizes else None,
        "mlperf_arena_bytes": reference_sizes[1] if reference_sizes else None,
    }


def _bytes(value):
    return "-" if value is None else format(value, ",")


def markdown(rows, command):
    lines = ["| model | quantization | params | int8 flash B | compressed flash B | int8 arena B | compressed arena B | "
             "arena growth | bits | bit-exact | ideal packed B | target flash B | meets target | MLPerf Tiny flash B | "
             "MLPerf Tiny arena B |", "|" + " --- |" * 15]
    for r in rows:
        lines.append(f"| {r['model']} | {r['quantization']} | {r['params']:,} | {r['int8_flash_bytes']:,} | "
                     f"{r['flash_bytes']:,} | {r['int8_arena_bytes']:,} | {r['arena_bytes']:,} | "
                     f"{r['arena_bytes'] / r['int8_arena_bytes'] - 1:+.1%} | {'/'.join(map(str, r['bits'])) or '-'} | {'yes' if r['bit_exact'] else 'NO'} | "
                     f"{r['ideal_packed_weight_bytes']:,} | {_bytes(r['target_flash_bytes'])} | "
                     f"{'-' if r['meets_targets'] is None else 'yes' if r['meets_targets'] else 'NO'} | "
                     f"{_bytes(r['mlperf_tflite_bytes'])} | {_bytes(r['mlperf_arena_bytes'])} |")
    return ("\n".join(lines) + "\n\nFlash: bytes of the shipped `.tflite` (= the C array). Compressed: weights with at "
            "most 16 values per channel as 1-4 bit TFLM_DECODE look-up tables (firmware registers AddDecode()); "
            "bit-exact: identical outputs to the int8 file in TFLite Micro on the calibration inputs, 64 random int8 "
            f"inputs and 64 fresh inputs. Targets: flash as listed, arena at most {ARENA_TARGET - 1:.0%} above int8."
            f"\n\nCommand: `{command}`\n")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quantizations", default="float,int8,int4,stb,stq")
    parser.add_argument("--calibration-size", type=int, default=64)
    args = parser.parse_args()
    rows = [measure(name, q, args.calibration_size) for name in MODELS for q in args.quantizations.split(",")]
    command = (f".venv/bin/python benchmarks/export_size.py --quantizations {args.quantizations} "
               f"--calibration-size {args.calibration_size}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    import tflite_micro

    record = {"command": command, "machine": platform.platform(), "keras": keras.__version__,
              "tflite_micro": tflite_micro.__version__,
              "note": "'quantization' is the Keras model's training scheme; every export is full-integer int8, "
                      "then LUT-compressed where that saves bytes.",
              "rows": rows}
    (RESULTS / "export_size.json").write_text(json.dumps(record, indent=2) + "\n")
    (RESULTS / "export_size.md").write_text(markdown(rows, command))
    print(markdown(rows, command))


if __name__ == "__main__":
    main()
