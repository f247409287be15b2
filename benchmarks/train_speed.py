"""Time per training step of the MLPerf Tiny ResNet-8 with STQ kernels.

Configurations, measured in one run on the same random batch:
plain QAT, QAT + JR (1 projection, input only), QAT + JR (1 projection, input
and three hidden layers), QAT + PGD-AT (PGD-10).

Writes benchmarks/results/train_speed.json and .md. Run:

    .venv/bin/python benchmarks/train_speed.py [--batch-size 32] [--steps 30] [--repeats 3]
"""

import argparse
import json
import os
import pathlib
import platform
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import tinyrobust as tr  # noqa: E402

RESULTS = pathlib.Path(__file__).parent / "results"
HIDDEN = ["stack_1_relu_2", "stack_2_relu_2", "stack_3_relu_2"]
CONFIGS = {
    "qat": dict(),
    "qat_jr_input": dict(jacobian=tr.JacobianRegularizer(weight=0.01)),
    "qat_jr_per_layer": dict(jacobian=tr.JacobianRegularizer(layers={"input": 0.01, **{n: 0.005 for n in HIDDEN}})),
    "qat_pgd10": dict(adversary=tr.AdversarialTraining("pgd", epsilon=8 / 255, steps=10)),
}


def seconds_per_step(config, x, y, steps, repeats, jit_compile):
    keras.utils.set_random_seed(0)
    model = tr.RobustModel.wrap(tr.models.resnet8(quantization="stq"), **config)
    model.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  jit_compile=jit_compile)
    dataset = tf.data.Dataset.from_tensors((x, y)).repeat(steps).cache()
    model.fit(dataset.take(3), epochs=1, verbose=0)  # trace and warm up
    timings = []
    for _ in range(repeats):
        start = time.perf_counter()
        model.fit(dataset, epochs=1, verbose=0)
        timings.append((time.perf_counter() - start) / steps)
    return statistics.median(timings)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--jit-compile", action="store_true")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(args.batch_size, 32, 32, 3)).astype("float32")
    y = rng.integers(0, 10, size=args.batch_size).astype("int32")
    times = {}
    for name, config in CONFIGS.items():
        times[name] = seconds_per_step(config, x, y, args.steps, args.repeats, args.jit_compile)
        print(f"{name:18s} {1000 * times[name]:8.1f} ms/step  ({times[name] / times['qat']:.2f}x plain)")
    result = {
        "benchmark": "train_speed",
        "model": "resnet8 (MLPerf Tiny), stq kernels, int8 edges and activations",
        "batch_size": args.batch_size,
        "steps": args.steps,
        "repeats": args.repeats,
        "jit_compile": args.jit_compile,
        "seconds_per_step": times,
        "ratio_to_plain": {k: v / times["qat"] for k, v in times.items()},
        "target": {"qat_jr_input": 2.0},
        "target_met": times["qat_jr_input"] / times["qat"] <= 2.0,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "tensorflow": tf.__version__,
                    "keras": keras.__version__},
        "command": "python benchmarks/train_speed.py " + " ".join(
            [f"--batch-size {args.batch_size}", f"--steps {args.steps}", f"--repeats {args.repeats}"]
            + (["--jit-compile"] if args.jit_compile else [])),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "train_speed.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = ["| configuration | ms / step | x plain |", "| --- | --- | --- |"]
    lines += [f"| {k} | {1000 * v:.1f} | {v / times['qat']:.2f} |" for k, v in times.items()]
    (RESULTS / "train_speed.md").write_text(
        f"# Training step time, ResNet-8 STQ, batch {args.batch_size}\n\n" + "\n".join(lines)
        + f"\n\nCommand: `{result['command']}`\n")


if __name__ == "__main__":
    main()
