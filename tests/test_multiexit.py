import keras
import numpy as np
import pytest

import tinyrobust as tr
from tinyrobust import multiexit

CLEAN = [np.array([[2.0, 0.0, 1.0, -1.0]]), np.array([[1.0, 1.0, 0.0, 0.0]]), np.array([[0.0, 3.0, 1.0, 0.5]])]
ADV = [np.array([[0.0, 1.0, 0.0, 0.0]]), np.array([[0.5, 0.0, 2.0, 0.0]]), np.array([[1.0, 1.0, 1.0, 0.0]])]
KEEP = np.array([[0, 1, 0, 0], [0, 0, 1, 1], [1, 0, 0, 0]], "float32")  # exit 3 keeps only the true class
LABEL = np.array([0])


def _softmax(z):
    e = np.exp(z - z.max())
    return e / e.sum()


def _kl(p, q):
    nonzero = p > 0
    return float(np.sum(p[nonzero] * np.log(p[nonzero] / q[nonzero])))


def _hand_neokd(alpha, beta):
    clean = [_softmax(z[0]) for z in CLEAN]
    adv = [_softmax(z[0]) for z in ADV]
    neighbours = [(clean[0] + clean[1]) / 2, (clean[0] + clean[1] + clean[2]) / 3, (clean[1] + clean[2]) / 2]
    total = ce = nkd = eokd = 0.0
    for i in range(3):
        kept = clean[i] * np.maximum(KEEP[i], np.eye(4)[0])
        kept /= kept.sum()
        terms = (-np.log(adv[i][0]), _kl(neighbours[i], adv[i]), _kl(kept, adv[i]))
        ce, nkd, eokd = ce + terms[0] / 3, nkd + terms[1] / 3, eokd + terms[2] / 3
        total += (terms[0] + alpha * terms[1] + beta * terms[2]) / 3
    return total, ce, nkd, eokd


@pytest.mark.parametrize("alpha, beta", [(3.0, 1.0), (0.0, 0.0), (1.0, 2.5)])
def test_neokd_loss_matches_hand_computed_value(alpha, beta):
    got = multiexit.neokd_loss(CLEAN, ADV, LABEL, KEEP, alpha, beta)
    np.testing.assert_allclose([float(v) for v in got], _hand_neokd(alpha, beta), rtol=1e-6)


def test_orthogonal_classes_partition_the_classes():
    keep = np.asarray(multiexit.orthogonal_classes(3, 10, seed=keras.random.SeedGenerator(0)))
    np.testing.assert_array_equal(keep.sum(axis=0), np.ones(10))
    assert sorted(keep.sum(axis=1)) == [3, 3, 4]


@pytest.fixture(scope="module")
def network():
    keras.utils.set_random_seed(0)
    return multiexit.attach_exits(tr.models.small_cnn(quantization="stq", width=4), ["relu_1", "relu_2"])


def test_attach_exits_and_early_exit_compute(network):
    assert [o.shape[-1] for o in network.outputs] == [10, 10, 10]
    macs = multiexit.exit_macs(network)
    assert macs[0] < macs[1] < macs[2]
    x, _ = tr.data.load_arrays("fashion_mnist", "test", limit=16)
    everything = multiexit.early_exit(network, x, threshold=1.0)
    assert np.all(everything.exits == 2) and everything.relative_compute == 1.0
    earliest = multiexit.early_exit(network, x, threshold=1e-6)
    assert np.all(earliest.exits == 0) and earliest.average_macs == macs[0]
    assert earliest.relative_compute < 1.0
    accuracies = multiexit.exit_accuracies(network, x, np.zeros(16, "int32"))
    assert len(accuracies) == 3 and all(0.0 <= a <= 1.0 for a in accuracies)


def test_multi_exit_attacks_respect_the_bound_and_max_average_is_strongest(network):
    x, y = tr.data.load_arrays("fashion_mnist", "test", limit=24)
    eps = 0.05
    results = {t: multiexit.MultiExitPGD(eps, target=t, steps=3).run(network, x, y)
               for t in (0, 1, 2, "average", "max_average")}
    for result in results.values():
        assert np.abs(result.x_adv[0] - x).max() <= eps + 1e-6
    def average_ce(x_adv):
        outputs = network(x_adv, training=False)
        return np.mean([keras.losses.sparse_categorical_crossentropy(y, z, from_logits=True) for z in outputs], axis=0)
    best = average_ce(results["max_average"].x_adv[0])
    for k in (0, 1, 2):  # per example, the max-average pick is at least as strong as every single-exit attack
        assert np.all(best >= average_ce(results[k].x_adv[0]) - 1e-4)


@pytest.mark.parametrize("attack", ["average", "max_average"])
def test_neokd_trains_and_logs_every_exit(network, attack):
    x, y = tr.data.load_arrays("fashion_mnist", "train", limit=64)
    model = multiexit.NEOKD(network, adversary=tr.AdversarialTraining("pgd", epsilon=0.05, steps=2), attack=attack,
                            seed=0)
    model.compile(optimizer="adam")
    logs = model.fit(x, y, batch_size=16, epochs=1, verbose=0).history
    assert {"loss", "ce", "nkd", "eokd", "exit_1_accuracy", "exit_2_accuracy", "exit_3_accuracy"} <= set(logs)
    assert all(np.isfinite(v[-1]) for v in logs.values())
    assert logs["loss"][-1] >= logs["ce"][-1]


def test_neokd_takes_column_labels_like_flat_ones():  # keras.datasets gives labels of shape (N, 1)
    x, y = tr.data.load_arrays("fashion_mnist", "train", limit=16)

    def one_step(labels):
        keras.utils.set_random_seed(0)
        network = multiexit.attach_exits(tr.models.small_cnn(width=4), ["relu_1"])
        model = multiexit.NEOKD(network, adversary=tr.AdversarialTraining("pgd", epsilon=0.05, steps=1), seed=0)
        model.compile(optimizer="sgd")
        logs = model.fit(x, labels, batch_size=16, epochs=1, verbose=0, shuffle=False).history
        return logs, [np.asarray(w) for w in network.weights]

    (flat_logs, flat), (column_logs, column) = one_step(y), one_step(y[:, None])
    assert flat_logs == column_logs
    for a, b in zip(flat, column):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("build, message", [
    (lambda n: multiexit.NEOKD(n, alpha=-1), "Received: alpha=-1"),
    (lambda n: multiexit.NEOKD(n, exit_weights=[1.0]), "Received: exit_weights="),
    (lambda n: multiexit.NEOKD(n, attack="single"), "Received: attack='single'"),
    (lambda n: multiexit.MultiExitPGD(0.1, target="sum"), "Received: target='sum'"),
    (lambda n: multiexit.attach_exits(tr.models.small_cnn(width=4), ["nope"]), "Received: exit_layers=\\['nope'\\]"),
    (lambda n: multiexit.early_exit(n, np.zeros((1, 28, 28, 1)), threshold=0), "Received: threshold=0"),
])
def test_bad_arguments(network, build, message):
    with pytest.raises(ValueError, match=message):
        build(network)
