"""Run as one of several worker processes (TF_CONFIG set by the caller): trains a
`RobustModel` with Jacobian terms and PGD-AT, then an ARD student, for a few steps
under `MultiWorkerMirroredStrategy`; prints one JSON line with the SHA-256 of each
trained model's weights and the logged losses.

    TF_CONFIG='{"cluster": {"worker": ["127.0.0.1:p0", "127.0.0.1:p1"]}, "task": {"type": "worker", "index": i}}' \\
        python tests/multi_worker_check.py
"""

import hashlib
import json

import keras
import numpy as np
import tensorflow as tf

import tinyrobust as tr
from tinyrobust import distill, distribute

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _network(seed, name):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((6,))
    h = keras.layers.Dense(8, activation="tanh", name="hidden")(inputs)
    return keras.Model(inputs, keras.layers.Dense(3, name="logits")(h), name=name)


def _digest(model):
    return hashlib.sha256(b"".join(np.asarray(w).tobytes() for w in model.get_weights())).hexdigest()


def main():
    strategy = distribute.strategy("multi_worker")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 6)).astype("float32")
    y = (np.arange(64) % 3).astype("int32")
    adversary = tr.AdversarialTraining("pgd", epsilon=0.1, steps=2, input_range=(-4.0, 4.0), seed=0)
    with strategy.scope():
        robust = tr.RobustModel.wrap(_network(0, "robust"), adversary=adversary,
                                     jacobian=tr.JacobianRegularizer(layers={"input": 0.1, "hidden": 0.1}, seed=0))
        robust.compile(optimizer=keras.optimizers.SGD(0.1), loss=LOSS)
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)  # global batches of 16, split over the workers
    robust_logs = distribute.fit(robust, data, epochs=2).history
    with strategy.scope():
        student = _network(1, "student")
        distiller = distill.RobustDistiller(student, robust, method="ard", alpha=0.9, adversary=adversary)
        distiller.compile(optimizer=keras.optimizers.SGD(0.1))
    student_logs = distribute.fit(distiller, data, epochs=2).history
    print(json.dumps({"workers": strategy.num_replicas_in_sync, "robust": _digest(robust),
                      "student": _digest(student), "robust_loss": robust_logs["loss"],
                      "student_loss": student_logs["loss"]}), flush=True)


if __name__ == "__main__":
    main()
