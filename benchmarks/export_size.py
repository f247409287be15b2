"""Bytes of the exported int8 TFLite model and of its TFLite Micro arena, per model and quantization.

Each model is exported with `tinyrobust.export.to_tflite` (quantizers and batch
norms folded, full-integer int8) and loaded in the tflite-micro Python
interpreter, which reports the arena it allocated. Weights are freshly
initialised and calibration inputs are drawn uniformly from the input range:
sizes do not depend on the weights' values. MLPerf Tiny's reference numbers
are listed next to ours.

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


def measure(name, quantization, calibration_size):
    build, dataset = MODELS[name]
    keras.utils.set_random_seed(0)
    model = build(quantization=quantization)
    low, high = tr.data.info(dataset).input_range
    calibration = np.random.default_rng(0).uniform(low, high, (calibration_size,) + model.input_shape[1:])
    with tempfile.TemporaryDirectory() as folder:
        path = tr.export.to_tflite(model, pathlib.Path(folder) / "m.tflite", calibration.astype("float32"))
        runner = tr.export.TFLiteModel(path)
        ternary = [c for _, _, c in tr.export.kernel_values_per_channel(path.read_bytes())]
    footprint = tr.summary(model, print_fn=None)
    reference = REFERENCES.get(name)
    return {
        "model": name, "quantization": quantization, "params": footprint.params,
        "tflite_bytes": runner.model_bytes, "arena_bytes": runner.arena_bytes,
        "packed_weight_bytes": footprint.packed_bytes,
        "max_values_per_channel": max(ternary) if ternary else None,
        "mlperf_tflite_bytes": reference[0] if reference else None,
        "mlperf_arena_bytes": reference[1] if reference else None,
    }


def markdown(rows, command):
    lines = ["| model | quantization | params | TFLite bytes | arena bytes | packed weight bytes | "
             "MLPerf Tiny TFLite bytes | MLPerf Tiny arena bytes |", "|" + " --- |" * 8]
    for r in rows:
        lines.append(f"| {r['model']} | {r['quantization']} | {r['params']:,} | {r['tflite_bytes']:,} | "
                     f"{r['arena_bytes']:,} | {r['packed_weight_bytes']:,} | "
                     f"{'-' if r['mlperf_tflite_bytes'] is None else format(r['mlperf_tflite_bytes'], ',')} | "
                     f"{'-' if r['mlperf_arena_bytes'] is None else format(r['mlperf_arena_bytes'], ',')} |")
    return "\n".join(lines) + f"\n\nCommand: `{command}`\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quantizations", default="float,int8,stq")
    parser.add_argument("--calibration-size", type=int, default=64)
    args = parser.parse_args()
    rows = [measure(name, q, args.calibration_size) for name in MODELS for q in args.quantizations.split(",")]
    command = f".venv/bin/python benchmarks/export_size.py --quantizations {args.quantizations}"
    RESULTS.mkdir(parents=True, exist_ok=True)
    record = {"command": command, "machine": platform.platform(), "keras": keras.__version__,
              "note": "All exports are full-integer int8; 'quantization' is the Keras model's training scheme.",
              "rows": rows}
    (RESULTS / "export_size.json").write_text(json.dumps(record, indent=2) + "\n")
    (RESULTS / "export_size.md").write_text(markdown(rows, command))
    print(markdown(rows, command))


if __name__ == "__main__":
    main()
