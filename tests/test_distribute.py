import json
import os
import socket
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import tinyrobust as tr
from tinyrobust import distribute


def _free_ports(n):
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def test_two_workers_on_localhost_end_with_identical_weights(tmp_path):
    """MultiWorkerMirroredStrategy, two processes (TF_CONFIG): JR + PGD-AT, then an ARD student, then JR + PGD-AT
    interrupted after one epoch and resumed from `BackupAndRestore` by a fresh model."""
    script = os.path.join(os.path.dirname(__file__), "multi_worker_check.py")
    workers = [f"127.0.0.1:{port}" for port in _free_ports(2)]
    processes = []
    for index in range(2):
        config = {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}
        env = {**os.environ, "TF_CONFIG": json.dumps(config), "TF_CPP_MIN_LOG_LEVEL": "3",
               "BACKUP_DIR": str(tmp_path / f"backup_{index}")}
        processes.append(subprocess.Popen([sys.executable, script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                          text=True, env=env))
    results = []
    for process in processes:
        out, err = process.communicate(timeout=600)
        assert process.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert [r["workers"] for r in results] == [2, 2]
    assert results[0]["robust"] == results[1]["robust"]
    assert results[0]["student"] == results[1]["student"]
    assert results[0]["robust_loss"] == results[1]["robust_loss"]
    assert results[0]["robust_loss"][-1] < results[0]["robust_loss"][0]  # it trained
    # The interrupted and resumed run ends like the uninterrupted one, on both workers, having run epochs 1 and 2.
    assert [r["resumed"] for r in results] == [results[0]["robust"]] * 2
    assert results[0]["resumed_loss"] == results[0]["robust_loss"][1:]


def test_fit_on_one_device_is_keras_fit():
    x = np.random.default_rng(0).normal(size=(32, 4)).astype("float32")
    y = (np.arange(32) % 2).astype("int32")

    def run(train):
        keras.utils.set_random_seed(0)
        inputs = keras.Input((4,))
        model = tr.RobustModel(inputs, keras.layers.Dense(2)(inputs), jacobian=tr.JacobianRegularizer(weight=0.1))
        model.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        history = train(model, tf.data.Dataset.from_tensor_slices((x, y)).batch(8))
        return history.history, model.get_weights()

    (ours, ours_weights) = run(lambda m, d: distribute.fit(m, d, epochs=2))
    (keras_logs, keras_weights) = run(lambda m, d: m.fit(d, epochs=2, verbose=0, shuffle=False))
    assert ours == keras_logs
    for a, b in zip(ours_weights, keras_weights):
        np.testing.assert_array_equal(a, b)


def test_unknown_strategy_is_refused():
    with pytest.raises(ValueError, match="Received: distribute='tpu'"):
        distribute.strategy("tpu")
    assert distribute.strategy(None) is tf.distribute.get_strategy()
