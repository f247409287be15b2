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
    total = clean_ce = ce = nkd = eokd = 0.0
    for i in range(3):
        kept = clean[i] * np.maximum(KEEP[i], np.eye(4)[0])
        kept /= kept.sum()
        terms = (-np.log(clean[i][0]), -np.log(adv[i][0]), _kl(neighbours[i], adv[i]), _kl(kept, adv[i]))
        clean_ce, ce = clean_ce + terms[0] / 3, ce + terms[1] / 3
        nkd, eokd = nkd + terms[2] / 3, eokd + terms[3] / 3
        total += (terms[0] + terms[1] + alpha * terms[2] + beta * terms[3]) / 3
    return total, clean_ce, ce, nkd, eokd


@pytest.mark.parametrize("alpha, beta", [(3.0, 1.0), (0.0, 0.0), (1.0, 2.5)])
def test_neokd_loss_matches_hand_computed_value(alpha, beta):
    """Term by term: the clean and adversarial cross-entropies of every exit (Hu et al.'s multi-exit adversarial
    training, the alpha = beta = 0 baseline), plus NEO-KD's neighbour and exit-wise orthogonal KD."""
    got = multiexit.neokd_loss(CLEAN, ADV, LABEL, KEEP, alpha, beta)
    np.testing.assert_allclose([float(v) for v in got], _hand_neokd(alpha, beta), rtol=1e-6)


def test_neokd_clean_cross_entropy_trains_the_exits_but_distillation_targets_do_not():
    import tensorflow as tf

    clean = [tf.Variable(z.astype("float32")) for z in CLEAN]
    adv = [z.astype("float32") for z in ADV]
    with tf.GradientTape() as tape:
        _, clean_ce, *_ = multiexit.neokd_loss(clean, adv, LABEL, KEEP, 3.0, 1.0)
    with tf.GradientTape() as distilled:
        loss, clean_ce_again, *_ = multiexit.neokd_loss(clean, adv, LABEL, KEEP, 3.0, 1.0)
        targets_only = loss - clean_ce_again
    assert all(float(tf.reduce_max(tf.abs(g))) > 0 for g in tape.gradient(clean_ce, clean))
    for gradient in distilled.gradient(targets_only, clean, unconnected_gradients="zero"):
        np.testing.assert_allclose(gradient, 0.0, atol=1e-7)


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
    (lambda n: multiexit.attach_exits(tr.models.small_cnn(width=4), ["relu_2", "relu_1"]),
     "in the backbone's order.*Received: exit_layers=\\['relu_2', 'relu_1'\\]"),
    (lambda n: multiexit.attach_exits(tr.models.small_cnn(width=4), ["relu_1", "relu_1"]), "Expected distinct"),
    (lambda n: multiexit.attach_exits(tr.models.small_cnn(width=4), ["relu_1"], head="mlp"), "Received: head='mlp'"),
])
def test_bad_arguments(network, build, message):
    with pytest.raises(ValueError, match=message):
        build(network)


def test_convolutional_exit_heads_train_and_cost_more_than_a_linear_probe():
    keras.utils.set_random_seed(0)
    backbone = tr.models.small_cnn(quantization="stq", width=4)
    probe = multiexit.attach_exits(backbone, ["relu_1", "relu_2"])
    conv = multiexit.attach_exits(backbone, ["relu_1", "relu_2"], head="conv")
    names = {layer.name for layer in conv.layers}
    assert {"exit_1_conv", "exit_1_bn", "exit_1_relu", "exit_2_conv", "exit_1_pool", "exit_1"} <= names
    assert conv.get_layer("exit_2_conv").kernel.shape == (3, 3, 8, 8)  # as many filters as the features' channels
    assert multiexit.exit_macs(conv)[0] > multiexit.exit_macs(probe)[0]
    x, y = tr.data.load_arrays("fashion_mnist", "test", limit=16)
    model = multiexit.NEOKD(conv, adversary=tr.AdversarialTraining("n_fgsm", epsilon=0.05), seed=0)
    model.compile(optimizer="adam")
    logs = model.fit(x, y, batch_size=8, epochs=1, verbose=0).history
    assert {"clean_ce", "ce", "nkd", "eokd"} <= set(logs) and all(np.isfinite(v[-1]) for v in logs.values())
