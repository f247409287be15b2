"""Run as one of several worker processes (TF_CONFIG set by the caller): trains a
`RobustModel` with Jacobian terms and PGD-AT, then an ARD student, for a few steps
under `MultiWorkerMirroredStrategy`, then the same `RobustModel` again with
`BackupAndRestore`, interrupted after its first epoch and resumed by a fresh
model; prints one JSON line with the SHA-256 of each trained model's weights and
the logged losses.

    TF_CONFIG='{"cluster": {"worker": ["127.0.0.1:p0", "127.0.0.1:p1"]}, "task": {"type": "worker", "index": i}}' \\
        BACKUP_DIR=<a folder per worker> python tests/multi_worker_check.py
"""

import hashlib
import json
import os

import keras
import numpy as np
import tensorflow as tf

import tinyrobust as tr
from tinyrobust import callbacks, distill, distribute

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _network(seed, name):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((6,))
    h = keras.layers.Dense(8, activation="tanh", name="hidden")(inputs)
    return keras.Model(inputs, keras.layers.Dense(3, name="logits")(h), name=name)


def _digest(model):
    return hashlib.sha256(b"".join(np.asarray(w).tobytes() for w in model.get_weights())).hexdigest()


class _Interrupt(keras.callbacks.Callback):
    """Raises at the start of epoch `at`, as a preempted worker stops."""

    def __init__(self, at):
        super().__init__()
        self.at = at

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == self.at:
            raise KeyboardInterrupt(f"interrupted at epoch {epoch}")


def _robust(strategy, adversary):
    with strategy.scope():
        robust = tr.RobustModel.wrap(_network(0, "robust"), adversary=adversary,
                                     jacobian=tr.JacobianRegularizer(layers={"input": 0.1, "hidden": 0.1}, seed=0))
        robust.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9), loss=LOSS)
    return robust


def main():
    strategy = distribute.strategy("multi_worker")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 6)).astype("float32")
    y = (np.arange(64) % 3).astype("int32")
    adversary = tr.AdversarialTraining("pgd", epsilon=0.1, steps=2, input_range=(-4.0, 4.0), seed=0)
    robust = _robust(strategy, adversary)
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)  # global batches of 16, split over the workers
    robust_logs = distribute.fit(robust, data, epochs=3, callbacks=[callbacks.SeedEachEpoch(0)]).history
    # The same training with BackupAndRestore, interrupted before epoch 1, then resumed by a fresh model.
    backup = os.environ["BACKUP_DIR"]
    interrupted = _robust(strategy, adversary)
    try:
        distribute.fit(interrupted, data, epochs=3, callbacks=[
            keras.callbacks.BackupAndRestore(backup), callbacks.SeedEachEpoch(0), _Interrupt(1)])
        raise AssertionError("the run was not interrupted")
    except KeyboardInterrupt:
        pass
    resumed = _robust(strategy, adversary)
    resumed_logs = distribute.fit(resumed, data, epochs=3, callbacks=[
        keras.callbacks.BackupAndRestore(backup), callbacks.SeedEachEpoch(0)]).history
    with strategy.scope():
        student = _network(1, "student")
        distiller = distill.RobustDistiller(student, robust, method="ard", alpha=0.9, adversary=adversary)
        distiller.compile(optimizer=keras.optimizers.SGD(0.1))
    student_logs = distribute.fit(distiller, data, epochs=2).history
    print(json.dumps({"workers": strategy.num_replicas_in_sync, "robust": _digest(robust),
                      "student": _digest(student), "robust_loss": robust_logs["loss"],
                      "student_loss": student_logs["loss"], "resumed": _digest(resumed),
                      "resumed_loss": resumed_logs["loss"]}), flush=True)


if __name__ == "__main__":
    main()
