"""Run as a script: one training step under MirroredStrategy on two logical
CPUs and the same step on one device; prints a JSON comparison.

A subprocess, because logical devices must be configured before TensorFlow
initialises them.
"""

import json

import tensorflow as tf

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

import keras  # noqa: E402
import numpy as np  # noqa: E402

import tinyrobust as tr  # noqa: E402


def build():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((6,))
    h = keras.layers.Dense(8, activation="tanh", name="hidden")(inputs)
    outputs = keras.layers.Dense(3, name="logits")(h)
    model = tr.RobustModel(inputs, outputs,
                           jacobian=tr.JacobianRegularizer(layers={"input": 0.5, "hidden": 0.5}, num_projections=None))
    model.compile(optimizer=keras.optimizers.SGD(0.1),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    return model


rng = np.random.default_rng(0)
x = rng.normal(size=(16, 6)).astype("float32")
y = (np.arange(16) % 3).astype("int32")

single = build()
single_logs = single.fit(x, y, batch_size=16, epochs=1, verbose=0, shuffle=False).history
strategy = tf.distribute.MirroredStrategy([d.name for d in tf.config.list_logical_devices("CPU")])
with strategy.scope():
    mirrored = build()
dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)
mirrored_logs = mirrored.fit(dataset, epochs=1, verbose=0).history

difference = max(float(np.abs(a - b).max()) for a, b in zip(single.get_weights(), mirrored.get_weights()))
print(json.dumps({
    "replicas": strategy.num_replicas_in_sync,
    "single": {k: float(v[-1]) for k, v in single_logs.items()},
    "mirrored": {k: float(v[-1]) for k, v in mirrored_logs.items()},
    "max_weight_difference": difference,
}))
