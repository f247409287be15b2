"""Run as a script: for every training mode, one step under MirroredStrategy on two
logical CPUs and the same step on one device on the global batch; prints one JSON
line per mode with the logged values of both and the largest weight difference.

A subprocess, because logical devices must be configured before TensorFlow
initialises them. Adversaries start at the clean input and the Jacobian terms are
exact, so both runs draw nothing random that depends on how the batch is split.

    python tests/mirrored_check.py [mode ...]
"""

import json
import sys

import tensorflow as tf

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

import keras  # noqa: E402
import numpy as np  # noqa: E402

import tinyrobust as tr  # noqa: E402
from tinyrobust import distill, multiexit  # noqa: E402

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
MODES = ("jr", "pgd", "trades", "fgsm_rs", "kd", "ard", "ard_cached", "rslad", "neokd")


def _network(seed, name="net"):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((6,))
    h = keras.layers.Dense(8, activation="tanh", name="hidden")(inputs)
    h = keras.layers.Dense(8, activation="tanh", name="hidden_2")(h)
    return keras.Model(inputs, keras.layers.Dense(3, name="logits")(h), name=name)


def _adversary(method):
    return tr.AdversarialTraining(method, epsilon=0.1, steps=2, input_range=(-4.0, 4.0), random_start=False)


def build(mode):
    """The trainer of `mode` and the model whose weights it trains."""
    if mode in ("jr", "pgd", "trades", "fgsm_rs"):
        jacobian = tr.JacobianRegularizer(layers={"input": 0.5, "hidden": 0.5}, num_projections=None)
        model = tr.RobustModel.wrap(_network(0), jacobian=jacobian if mode in ("jr", "pgd") else None,
                                    adversary=None if mode == "jr" else _adversary(mode))
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss=LOSS, metrics=["accuracy"])
        return model, model
    if mode == "neokd":
        network = multiexit.attach_exits(_network(0), ["hidden"])
        model = multiexit.NEOKD(network, adversary=_adversary("pgd"), seed=0)
        model.compile(optimizer=keras.optimizers.SGD(0.1))
        return model, network
    student = _network(0, "student")
    method = mode.replace("_cached", "")
    model = distill.RobustDistiller(student, _network(1, "teacher"), method=method, alpha=0.5,
                                    adversary=None if method == "kd" else _adversary("pgd"))
    model.compile(optimizer=keras.optimizers.SGD(0.1))
    return model, student


def main(modes):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 6)).astype("float32")
    y = (np.arange(16) % 3).astype("int32")
    weights = rng.uniform(0.5, 1.5, size=16).astype("float32")
    strategy = tf.distribute.MirroredStrategy([d.name for d in tf.config.list_logical_devices("CPU")])
    for mode in modes:
        runs = {}
        for where in ("single", "mirrored"):
            scope = strategy.scope() if where == "mirrored" else tf.distribute.get_strategy().scope()
            with scope:
                trainer, trained = build(mode)
            targets = y
            if mode == "ard_cached":
                targets = distill.with_teacher_logits(trainer.teacher, x, y)[1]
            dataset = tf.data.Dataset.from_tensor_slices((x, targets, weights)).batch(16)
            logs = trainer.fit(dataset, epochs=1, verbose=0).history
            runs[where] = ({k: float(v[-1]) for k, v in logs.items()}, trained.get_weights())
        difference = max(float(np.abs(a - b).max()) for a, b in zip(runs["single"][1], runs["mirrored"][1]))
        moved = max(float(np.abs(a - b).max()) for a, b in zip(runs["single"][1], build(mode)[1].get_weights()))
        print(json.dumps({"mode": mode, "replicas": strategy.num_replicas_in_sync, "single": runs["single"][0],
                          "mirrored": runs["mirrored"][0], "max_weight_difference": difference,
                          "max_weight_change": moved}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] or MODES)
