"""Time per training step of the MLPerf Tiny ResNet-8 with STQ kernels, every robust mode against plain QAT.

Configurations, on the same random batch: plain QAT; QAT + JR (1 projection,
input only); QAT + JR (1 projection, input and three hidden layers); QAT +
PGD-10 AT; ARD (PGD-10, alpha 1) with the teacher's logits cached. Every
configuration is built, traced and warmed up first, then timed in interleaved
rounds (each round times one step of every configuration in turn; `--steps`
times `--repeats` rounds), so a slow spell of the machine falls on all of
them; each step is timed on its own
(the step's `tf.function` on a fixed batch, waiting for its loss), and the
figure is the median over every timed step. Timing `fit` over many steps
instead measured steps of 63, 127, 255 or 511 ms on this 2-core machine
whatever the configuration: with dispatch running ahead of compute, the wall
time snapped to powers of two.

Targets (issue #18): input JR <= 1.5x plain, per-layer JR <= 1.8x, PGD-10 AT
<= 5.0x, ARD with cached teacher logits <= its PGD-AT step.

Floors. Three passes of the same network are timed alongside (interleaved with
the steps): `forward_train` (a training-mode forward pass), `input_vjp_train`
(that forward pass and one backward pass to the input, as a Jacobian
projection needs) and `attack_10_iterations` (ten chained PGD iterations in
one traced function: an inference-mode forward pass and the gradient of the
cross-entropy with respect to the input, then a signed step; one function call,
so the call's own overhead is counted once, as in a training step).
From them, lower bounds on each robust step that no implementation computing
the exact gradients can beat:
- PGD-10 AT >= plain + attack_10_iterations: ten attack steps, then a plain
  training step on their output.
- JR (one projection) >= plain + 2 * (input_vjp_train - forward_train): the
  projection's backward pass to the input, and the weights' gradient flowing
  back through that backward pass again (double backpropagation), which costs
  at least as much as the pass itself.
A target below its floor cannot be met by making the step leaner, only by
doing less work (fewer attack steps, a cheaper estimator).

References. Two steps written directly with `tf.GradientTape` on the bare
network and an Adam optimizer, without the engine, are timed too:
`handwritten_jr_input` (one projection, input term) and `handwritten_pgd10`
(ten linf steps in inference mode from a uniform start, then a training step on
their output). The engine's `qat_jr_input` and `qat_pgd10` against them is what
the engine itself costs.

Writes benchmarks/results/<output>.json and .md. Run:

    .venv/bin/python benchmarks/train_speed.py [--batch-sizes 32 64] [--steps 10] [--repeats 5] [--output train_speed]
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
from tinyrobust import distill  # noqa: E402

RESULTS = pathlib.Path(__file__).parent / "results"
HIDDEN = ["stack_1_relu_2", "stack_2_relu_2", "stack_3_relu_2"]
LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
CONFIGS = ("qat", "qat_jr_input", "qat_jr_per_layer", "qat_pgd10", "ard_cached_pgd10")
PASSES = ("forward_train", "input_vjp_train", "attack_10_iterations", "handwritten_jr_input", "handwritten_pgd10")
EPSILON = 8 / 255
TARGETS = {"qat_jr_input": 1.5, "qat_jr_per_layer": 1.8, "qat_pgd10": 5.0}


def _step(name, x, y, jit_compile):
    """The traced, warmed-up training step of configuration `name` on the batch `(x, y)`."""
    keras.utils.set_random_seed(0)
    network = tr.models.resnet8(quantization="stq")
    if name == "ard_cached_pgd10":
        teacher = tr.models.resnet8(quantization="float")
        model = distill.RobustDistiller(network, teacher, method="ard",
                                        adversary=tr.AdversarialTraining("pgd", epsilon=8 / 255, steps=10))
        model.compile(optimizer="adam", jit_compile=jit_compile)
        targets = {"labels": y, distill.TEACHER_LOGITS: teacher.predict(x, verbose=0)}
    else:
        settings = {
            "qat": {},
            "qat_jr_input": {"jacobian": tr.JacobianRegularizer(weight=0.01)},
            "qat_jr_per_layer": {"jacobian": tr.JacobianRegularizer(layers={"input": 0.01,
                                                                             **{n: 0.005 for n in HIDDEN}})},
            "qat_pgd10": {"adversary": tr.AdversarialTraining("pgd", epsilon=8 / 255, steps=10)},
        }[name]
        model = tr.RobustModel.wrap(network, **settings)
        model.compile(optimizer="adam", loss=LOSS, jit_compile=jit_compile)
        targets = y
    batch = (tf.constant(x), tf.nest.map_structure(tf.constant, targets))
    model.fit(tf.data.Dataset.from_tensors(batch), epochs=1, verbose=0)  # builds the optimizer
    step = tf.function(model.train_step, jit_compile=jit_compile)

    def run():
        float(step(batch)["loss"])  # waits for the step

    for _ in range(3):  # trace and warm up
        run()
    return run


def _pass(name, x, y, jit_compile):
    """One traced, warmed-up pass `name` (see PASSES) of the STQ ResNet-8 on the batch `(x, y)`."""
    keras.utils.set_random_seed(0)
    network = tr.models.resnet8(quantization="stq")
    x, y = tf.constant(x), tf.constant(y)
    optimizer = keras.optimizers.Adam()
    optimizer.build(network.trainable_variables)
    projection_seed = keras.random.SeedGenerator(0)

    def train_on(inputs, jacobian_weight=0.0):
        with tf.GradientTape() as outer:
            with tf.GradientTape() as inner:
                inner.watch(inputs)
                logits = network(inputs, training=True)
            loss = tf.reduce_mean(LOSS(y, logits)) + tf.add_n(network.losses)
            if jacobian_weight:
                v = keras.random.normal(tf.shape(logits), seed=projection_seed)
                v = v / tf.norm(v, axis=-1, keepdims=True)
                g = inner.gradient(logits, inputs, output_gradients=v)
                term = logits.shape[-1] * tf.reduce_mean(tf.reduce_sum(tf.square(tf.reshape(g, (len(x), -1))), -1))
                loss = loss + 0.5 * jacobian_weight * term
        optimizer.apply_gradients(zip(outer.gradient(loss, network.trainable_variables), network.trainable_variables))
        return loss

    def attack_10_iterations():
        x_adv = tf.clip_by_value(x + tf.random.uniform(tf.shape(x), -EPSILON, EPSILON, seed=0), 0.0, 1.0)
        for _ in range(10):
            with tf.GradientTape() as tape:
                tape.watch(x_adv)
                loss = tf.reduce_sum(LOSS(y, network(x_adv, training=False)))
            x_adv = x_adv + 0.25 * EPSILON * tf.sign(tape.gradient(loss, x_adv))
            x_adv = tf.clip_by_value(tf.clip_by_value(x_adv, x - EPSILON, x + EPSILON), 0.0, 1.0)
        return x_adv

    def input_vjp_train():
        with tf.GradientTape() as tape:
            tape.watch(x)
            logits = network(x, training=True)
            target = tf.reduce_sum(logits * tf.ones_like(logits))  # a Jacobian projection v^T dz/dx, v fixed
        return tape.gradient(target, x)

    fn = {"forward_train": lambda: network(x, training=True),
          "input_vjp_train": input_vjp_train,
          "attack_10_iterations": attack_10_iterations,
          "handwritten_jr_input": lambda: train_on(x, jacobian_weight=0.01),
          "handwritten_pgd10": lambda: train_on(tf.stop_gradient(attack_10_iterations()))}[name]
    traced = tf.function(fn, jit_compile=jit_compile)

    def run():
        float(tf.reduce_sum(traced()))  # waits for the pass

    for _ in range(3):
        run()
    return run


def seconds_per_step(batch_size, steps, repeats, jit_compile):
    """Seconds per step of every configuration and pass at one batch size, timed in interleaved rounds.

    Returns:
        `(medians, quartiles)`: dicts from name to the median, and to the `[first, third]` quartiles.
    """
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(batch_size, 32, 32, 3)).astype("float32")
    y = rng.integers(0, 10, size=batch_size).astype("int32")
    runs = {name: _step(name, x, y, jit_compile) for name in CONFIGS}
    runs.update({name: _pass(name, x, y, jit_compile) for name in PASSES})
    timings = {name: [] for name in runs}
    for _ in range(repeats):
        for _ in range(steps):  # one step of each in turn, so that a slow spell falls on all of them alike
            for name, run in runs.items():
                start = time.perf_counter()
                run()
                timings[name].append(time.perf_counter() - start)
    quartiles = {name: statistics.quantiles(values, n=4, method="inclusive") for name, values in timings.items()}
    return ({name: statistics.median(values) for name, values in timings.items()},
            {name: [q[0], q[2]] for name, q in quartiles.items()})


def _checks(times):
    ratios = {name: times[name] / times["qat"] for name in times}
    met = {name: ratios[name] <= limit for name, limit in TARGETS.items()}
    met["ard_cached_pgd10"] = times["ard_cached_pgd10"] <= times["qat_pgd10"]
    return ratios, met


def floors(times):
    """Lower bounds (seconds) on the robust steps from the timed passes (see the module docstring)."""
    projection = max(times["input_vjp_train"] - times["forward_train"], 0.0)
    jr = times["qat"] + 2 * projection
    return {"qat_jr_input": jr, "qat_jr_per_layer": jr, "qat_pgd10": times["qat"] + times["attack_10_iterations"]}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--jit-compile", action="store_true")
    parser.add_argument("--output", default="train_speed", help="file name (without extension) under results/")
    args = parser.parse_args()
    command = "python benchmarks/train_speed.py " + " ".join(
        ["--batch-sizes", *map(str, args.batch_sizes), f"--steps {args.steps}", f"--repeats {args.repeats}",
         f"--output {args.output}"] + (["--jit-compile"] if args.jit_compile else []))
    result = {"benchmark": "train_speed", "model": "resnet8 (MLPerf Tiny), stq kernels, int8 edges and activations",
              "steps": args.steps, "repeats": args.repeats, "jit_compile": args.jit_compile,
              "targets": {**{k: f"<= {v}x qat" for k, v in TARGETS.items()}, "ard_cached_pgd10": "<= qat_pgd10"},
              "batches": {},
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "tensorflow": tf.__version__,
                          "keras": keras.__version__, "tinyrobust": tr.__version__},
              "command": command}
    lines = []
    for batch_size in args.batch_sizes:
        times, quartiles = seconds_per_step(batch_size, args.steps, args.repeats, args.jit_compile)
        ratios, met = _checks(times)
        floor = floors(times)
        floor_ratios = {name: value / times["qat"] for name, value in floor.items()}
        reachable = {name: floor_ratios[name] <= TARGETS[name] for name in floor}
        result["batches"][str(batch_size)] = {"seconds_per_step": times, "quartiles_seconds": quartiles,
                                              "ratio_to_plain": ratios, "target_met": met,
                                              "floor_seconds": floor, "floor_ratio_to_plain": floor_ratios,
                                              "target_above_floor": reachable}
        lines += [f"\n## Batch {batch_size}\n",
                  "| configuration | ms / step | quartiles (ms) | x plain | target | met | floor (x plain) "
                  "| target >= floor |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        def timing(name):  # "median | quartiles" cells, in ms
            low, high = (1000 * q for q in quartiles[name])
            return f"{1000 * times[name]:.1f} | {low:.1f}-{high:.1f}"

        for name in CONFIGS:
            target = result["targets"].get(name, "")
            lines.append(f"| {name} | {timing(name)} | {ratios[name]:.2f} | {target} | "
                         f"{'' if name not in met else 'yes' if met[name] else 'no'} | "
                         f"{f'{floor_ratios[name]:.2f}' if name in floor else ''} | "
                         f"{'' if name not in reachable else 'yes' if reachable[name] else 'no'} |")
            print(f"batch {batch_size} {name:18s} {1000 * times[name]:8.1f} ms/step ({ratios[name]:.2f}x plain)",
                  flush=True)
        lines += ["", "| pass | ms | quartiles (ms) | x plain |", "| --- | --- | --- | --- |"]
        lines += [f"| {name} | {timing(name)} | {ratios[name]:.2f} |" for name in PASSES]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.output}.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / f"{args.output}.md").write_text(
        "# Training step time, ResNet-8 STQ, every robust mode\n\nMedians over steps timed one by one in "
        "interleaved rounds on "
        f"{os.cpu_count()} CPUs. Floor: the least a step with exact gradients can cost, from the timed passes "
        "below each table (see the script's docstring); a target under its floor is out of reach. The handwritten "
        "passes are the JR and PGD-10 steps written directly with `tf.GradientTape`, without the engine.\n" + "\n".join(lines) + f"\n\nCommand: `{command}`\n")


if __name__ == "__main__":
    main()
