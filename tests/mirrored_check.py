"""Run as a script: for every training mode, one step under MirroredStrategy on two
logical CPUs and the same step on one device on the global batch; prints one JSON
line per mode with the logged values of both and the largest weight difference.

A subprocess, because logical devices must be configured before TensorFlow
initialises them. Adversaries start at the clean input and the Jacobian terms are
exact (tests/modes.py), so both runs draw nothing random that depends on how the
batch is split.

    python tests/mirrored_check.py [mode ...]
"""

import json
import sys

import tensorflow as tf

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

import numpy as np  # noqa: E402

from modes import MODES, build, targets  # noqa: E402


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
            dataset = tf.data.Dataset.from_tensor_slices((x, targets(mode, trainer, x, y), weights)).batch(16)
            logs = trainer.fit(dataset, epochs=1, verbose=0).history
            runs[where] = ({k: float(v[-1]) for k, v in logs.items()}, trained.get_weights())
        difference = max(float(np.abs(a - b).max()) for a, b in zip(runs["single"][1], runs["mirrored"][1]))
        moved = max(float(np.abs(a - b).max()) for a, b in zip(runs["single"][1], build(mode)[1].get_weights()))
        print(json.dumps({"mode": mode, "replicas": strategy.num_replicas_in_sync, "single": runs["single"][0],
                          "mirrored": runs["mirrored"][0], "max_weight_difference": difference,
                          "max_weight_change": moved}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] or MODES)
