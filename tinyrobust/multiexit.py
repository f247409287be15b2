"""Multi-exit networks: early exits on a backbone, early-exit inference,
attacks on all exits, and NEO-KD adversarial training (Ham et al., NeurIPS 2023).

A multi-exit model is a functional `keras.Model` whose outputs are a list of
logits, one per exit, the backbone's own logits last.
"""

import dataclasses

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from tinyrobust import models
from tinyrobust.attacks import kernels
from tinyrobust.attacks.base import Attack
from tinyrobust.footprint import layer_macs
from tinyrobust.training import Objective, RobustModel, Untracked, input_adversary
from tinyrobust.validation import check_bool, check_choice, check_number

__all__ = ["EarlyExitResult", "MultiExitPGD", "NEOKD", "attach_exits", "early_exit", "exit_accuracies", "exit_macs",
           "final_exit", "multi_exit_attack", "neokd_loss", "orthogonal_classes"]


HEADS = ("dense", "conv")


def attach_exits(backbone, exit_layers, name=None, head="dense"):
    """Adds an early exit after each named layer.

    Args:
        backbone: a functional model with one logits output.
        exit_layers: names of the layers whose outputs feed an exit, from the
            input towards the output (in the backbone's layer order).
        name: model name; default `<backbone>_multiexit`.
        head: the exit classifier: "dense" (global average pooling, then a
            dense layer: a linear probe of the features) or "conv" (a 3x3
            convolution with as many filters as the features have channels,
            batch normalisation and ReLU, then global average pooling and a
            dense layer: a one-block version of MSDNet's convolutional
            classifiers, which NEO-KD trains; MSDNet stacks two such blocks,
            stride 2, before its pooling). On a flat (dense) feature a "conv"
            head is the dense one. The heads are float layers, quantized by
            the int8 export like the rest.

    Returns:
        A functional model sharing the backbone's layers, with outputs
        `[exit_1, ..., exit_k, backbone logits]`.
    """
    if not getattr(backbone, "outputs", None) or len(backbone.outputs) != 1:
        raise ValueError(f"Expected a functional backbone with one logits output. Received: backbone={backbone.name!r}")
    head = check_choice("head", head, HEADS)
    if not exit_layers or isinstance(exit_layers, str):
        raise ValueError(f"Expected a non-empty list of exit layer names. Received: exit_layers={exit_layers!r}")
    names = [layer.name for layer in backbone.layers]
    unknown = [n for n in exit_layers if n not in names]
    if unknown:
        raise ValueError(f"Unknown exit layers {unknown}; the backbone's layers are {names}. "
                         f"Received: exit_layers={list(exit_layers)!r}")
    order = [names.index(n) for n in exit_layers]
    if order != sorted(set(order)):
        raise ValueError("Expected distinct exit layers in the backbone's order, from the input towards the output "
                         f"(its layers: {names}). Received: exit_layers={list(exit_layers)!r}")
    classes = backbone.outputs[0].shape[-1]
    outputs = []
    for i, layer_name in enumerate(exit_layers, start=1):
        features = backbone.get_layer(layer_name).output
        if len(features.shape) > 2:
            if head == "conv":
                features = keras.layers.Conv2D(features.shape[-1], 3, padding="same", use_bias=False,
                                               name=f"exit_{i}_conv")(features)
                features = keras.layers.BatchNormalization(name=f"exit_{i}_bn")(features)
                features = keras.layers.ReLU(name=f"exit_{i}_relu")(features)
            features = keras.layers.GlobalAveragePooling2D(name=f"exit_{i}_pool")(features)
        outputs.append(keras.layers.Dense(classes, name=f"exit_{i}")(features))
    return keras.Model(models.inputs_of(backbone), [*outputs, backbone.outputs[0]], name=name or f"{backbone.name}_multiexit")


def final_exit(model, name=None):
    """The model seen through its last output (the backbone's logits of a multi-exit model), sharing its layers.

    Args:
        model: a functional model with one or more outputs.
        name: the view's name; default Keras'.

    Returns:
        `model` itself when it has one output, else a model of its last output.
    """
    if len(model.outputs) == 1:
        return model
    return keras.Model(models.inputs_of(model), model.outputs[-1], name=name)


def exit_macs(model):
    """Cumulative multiply-accumulates to reach each exit (earlier exits' heads included).

    Returns:
        A list with one int per output of `model`.
    """
    seen, totals, total = set(), [], 0
    for output in model.outputs:
        for layer in keras.Model(models.inputs_of(model), output).layers:
            if layer.name not in seen:
                seen.add(layer.name)
                total += layer_macs(layer)
        totals.append(total)
    return totals


def _exit_logits(model, x, batch_size=256):
    """Per-exit numpy logits of a multi-exit model: a list of (n, classes) arrays."""
    chunks = [model(tf.constant(x[i:i + batch_size], tf.float32), training=False) for i in range(0, len(x), batch_size)]
    return [np.concatenate([np.asarray(c[k]) for c in chunks]) for k in range(len(chunks[0]))]


@dataclasses.dataclass
class EarlyExitResult:
    """Confidence-thresholded early-exit inference.

    Attributes:
        predictions: predicted label per example.
        exits: index of the exit taken per example.
        macs: multiply-accumulates spent per example.
        average_macs: mean of `macs`.
        relative_compute: `average_macs` over the cost of running every exit.
    """

    predictions: np.ndarray
    exits: np.ndarray
    macs: np.ndarray
    average_macs: float
    relative_compute: float

    def __repr__(self):
        taken = np.bincount(np.asarray(self.exits, int), minlength=int(np.max(self.exits, initial=0)) + 1)
        return (f"EarlyExitResult({len(self.predictions)} examples, exits taken {taken.tolist()}, "
                f"{self.average_macs:,.0f} MACs on average, {self.relative_compute:.2f} of every exit's)")


def early_exit(model, x, threshold=0.9, batch_size=256):
    """Each example leaves at the first exit whose top softmax probability reaches `threshold` (else the last).

    Args:
        model: a multi-exit model.
        x: inputs.
        threshold: confidence in (0, 1].
        batch_size: inference batch size.

    Returns:
        An `EarlyExitResult`.
    """
    threshold = check_number("threshold", threshold, low=0, high=1, low_open=True)
    logits = _exit_logits(model, np.asarray(x, "float32"), batch_size)
    probabilities = np.stack([tf.nn.softmax(z).numpy() for z in logits])  # (exits, n, classes)
    confident = probabilities.max(axis=2) >= threshold
    confident[-1] = True
    exits = np.argmax(confident, axis=0)
    predictions = probabilities.argmax(axis=2)[exits, np.arange(len(exits))]
    costs = np.asarray(exit_macs(model))
    macs = costs[exits]
    return EarlyExitResult(predictions, exits, macs, float(macs.mean()), float(macs.mean() / costs[-1]))


def exit_accuracies(model, x, y, batch_size=256):
    """Top-1 accuracy of every exit on `(x, y)`: a list of floats."""
    return [float(np.mean(z.argmax(-1) == np.asarray(y))) for z in _exit_logits(model, np.asarray(x, "float32"),
                                                                                 batch_size)]


def _average_ce(outputs, y):
    return ops.mean(ops.stack([kernels.cross_entropy(z, y) for z in outputs]), axis=0)


def multi_exit_attack(model, y, target, perturb):
    """Adversarial inputs against a multi-exit model (traceable).

    Args:
        model: a multi-exit model.
        y: integer labels.
        target: an exit index (that exit's cross-entropy), "average" (the
            cross-entropy averaged over exits) or "max_average" (every
            single-exit attack, keeping per example the one with the largest
            average cross-entropy).
        perturb: maps a per-example loss function to adversarial inputs (one
            PGD run from the same start).

    Returns:
        Adversarial inputs.
    """
    if target == "average":
        return perturb(lambda z: _average_ce(model(z, training=False), y))
    if target != "max_average":
        return perturb(lambda z: kernels.cross_entropy(model(z, training=False)[target], y))
    best, best_loss = None, None
    for k in range(len(model.outputs)):
        candidate = perturb(lambda z, k=k: kernels.cross_entropy(model(z, training=False)[k], y))
        loss = _average_ce(model(candidate, training=False), y)
        if best is None:
            best, best_loss = candidate, loss
        else:
            better = ops.reshape(loss > best_loss, (-1,) + (1,) * (len(candidate.shape) - 1))
            best, best_loss = ops.where(better, candidate, best), ops.maximum(loss, best_loss)
    return best


class MultiExitPGD(Attack):
    """PGD against a multi-exit model (Hu et al. 2020; Ham et al. 2023).

    - `target=k` (an int): the single-exit attack on exit k's cross-entropy.
    - `target="average"`: maximises the cross-entropy averaged over exits.
    - `target="max_average"`: runs every single-exit attack and keeps, per
      example, the one with the largest average cross-entropy over exits.

    Success is measured on exit `success_exit` (default the last).

    Args:
        eps: radius or list of radii.
        target: an exit index, "average" or "max_average".
        norm: "linf" or "l2".
        steps: PGD steps.
        rel_step_size: step size relative to eps.
        random_start: start from a random point of the ball.
        success_exit: the exit whose prediction decides success.
        input_range: valid (low, high) of the inputs.
        seed: seed of the random start.
    """

    def __init__(self, eps=8 / 255, *, target="average", norm="linf", steps=10, rel_step_size=0.25, random_start=True,
                 success_exit=-1, input_range=(0.0, 1.0), seed=0):
        super().__init__(eps, norm=norm, targeted=False, input_range=input_range, seed=seed)
        if not (isinstance(target, (int, np.integer)) and not isinstance(target, bool)):
            target = check_choice("target", target, ("average", "max_average"))
        self.target = target
        self.steps = check_number("steps", steps, low=1, integer=True)
        self.rel_step_size = check_number("rel_step_size", rel_step_size, low=0, low_open=True)
        self.random_start = check_bool("random_start", random_start)
        self.success_exit = int(success_exit)

    def _build(self, model):
        exits = len(model.outputs)
        target = self.target
        if not isinstance(target, str):
            if not -exits <= target < exits:
                raise ValueError(f"The model has {exits} exits. Received: target={target}")
            target %= exits

        @tf.function(reduce_retracing=True)
        def run(x, y, eps, start):
            def perturb(loss_fn):
                return kernels.pgd(loss_fn, x, eps, self.rel_step_size * eps, self.steps, self.norm, start,
                                   self.input_range)

            return multi_exit_attack(model, y, target, perturb)

        return run

    def _attack(self, model, x, y, eps):
        run = self.compiled(model, self._build)
        x_t, eps_t = tf.constant(x), tf.constant(eps, tf.float32)
        start = (kernels.random_start(x_t, eps_t, self.norm, seed=self.seed) if self.random_start
                 else tf.zeros_like(x_t))
        return run(x_t, tf.constant(y), eps_t, start).numpy(), None

    def run(self, model, x, y=None):
        if y is None:
            y = _exit_logits(model, np.asarray(x, "float32"))[self.success_exit].argmax(-1)
        return super().run(model, x, y)

    def is_success(self, model, x_adv, y):
        return _exit_logits(model, x_adv)[self.success_exit].argmax(-1) != y

    def get_config(self):
        config = super().get_config()
        del config["targeted"]
        return {**config, "target": self.target, "steps": self.steps, "rel_step_size": self.rel_step_size,
                "random_start": self.random_start, "success_exit": self.success_exit}


def orthogonal_classes(num_exits, num_classes, seed=None):
    """A random partition of the classes among the exits: a (exits, classes) 0/1 float mask.

    Class `perm[j]` goes to exit `j % num_exits`, so no two exits share a class.
    """
    order = keras.random.shuffle(ops.arange(num_classes), seed=seed)
    owner = ops.mod(ops.arange(num_classes), num_exits)
    owners = ops.scatter(ops.expand_dims(order, 1), owner, (num_classes,))
    return ops.cast(ops.equal(ops.expand_dims(ops.arange(num_exits), 1), ops.expand_dims(owners, 0)), "float32")


def neokd_loss(clean_logits, adv_logits, y, keep, alpha=3.0, beta=1.0, exit_weights=None, sample_weight=None):
    """NEO-KD's training loss (Ham et al., NeurIPS 2023, sections 3.1 and 3.2).

    For each exit i, with weights `w_i` (equal by default):
    `w_i * [CE(clean_i, y) + CE(adv_i, y)
    + alpha * KL(mean_{j in N(i)} softmax(clean_j) || softmax(adv_i))
    + beta * KL(q_i || softmax(adv_i))]`. The two cross-entropies are the
    multi-exit adversarial training NEO-KD builds on (Hu et al. 2020: the sum
    of the clean and adversarial losses of all exits), so `alpha = beta = 0`
    is that baseline. N(i) = {i-1, i, i+1} within the exits (neighbour KD) and
    `q_i` is exit i's clean softmax restricted to the true class plus the
    classes `keep[i]` assigns to exit i, renormalised (exit-wise orthogonal
    KD). As distillation targets the clean outputs carry no gradient; the
    clean cross-entropy does. Terms are averaged over the batch. Deviation:
    equal weights are `1 / exits` (MSDNet's code sums the exits' losses,
    `w_i = 1`), a constant factor on the whole loss.

    Args:
        clean_logits: list of (batch, classes) logits on clean inputs, one per exit.
        adv_logits: the same on adversarial inputs.
        y: integer labels.
        keep: (exits, classes) 0/1 mask, e.g. `orthogonal_classes(...)`.
        alpha: weight of neighbour KD.
        beta: weight of exit-wise orthogonal KD.
        exit_weights: one weight per exit, or None for 1 / exits each.
        sample_weight: per-example weights, or None.

    Returns:
        `(loss, clean_ce, ce, nkd, eokd)`: the total and the four
        weighted-over-exits, unscaled terms (`ce` on the adversarial inputs).
    """
    exits = len(clean_logits)
    if len(adv_logits) != exits:
        raise ValueError(f"Expected as many adversarial as clean outputs. Received: {len(adv_logits)} and {exits}")
    weights = [1.0 / exits] * exits if exit_weights is None else list(exit_weights)
    if len(weights) != exits:
        raise ValueError(f"Expected one weight per exit ({exits}). Received: exit_weights={exit_weights!r}")
    clean = [ops.stop_gradient(ops.softmax(z, axis=-1)) for z in clean_logits]
    classes = clean_logits[0].shape[-1]
    onehot = ops.one_hot(y, classes, dtype=clean[0].dtype)
    clean_ce = ce = nkd = eokd = 0.0
    for i, adv in enumerate(adv_logits):
        clean_ce += weights[i] * kernels.weighted_mean(kernels.cross_entropy(clean_logits[i], y), sample_weight)
        log_q = ops.log_softmax(adv, axis=-1)
        ensemble = sum(clean[j] for j in (i - 1, i, i + 1) if 0 <= j < exits) / len(
            [j for j in (i - 1, i, i + 1) if 0 <= j < exits])
        restricted = clean[i] * ops.maximum(ops.cast(keep[i], clean[i].dtype)[None, :], onehot)
        restricted = restricted / ops.sum(restricted, axis=-1, keepdims=True)
        ce += weights[i] * kernels.weighted_mean(kernels.cross_entropy(adv, y), sample_weight)
        nkd += weights[i] * kernels.weighted_mean(_kl(ensemble, log_q), sample_weight)
        eokd += weights[i] * kernels.weighted_mean(_kl(restricted, log_q), sample_weight)
    return clean_ce + ce + alpha * nkd + beta * eokd, clean_ce, ce, nkd, eokd


def _kl(p, log_q):
    """Per-example KL(p || q) for probabilities `p` (zeros allowed) and log-probabilities `log_q`."""
    safe = ops.where(p > 0, p, 1.0)
    return ops.sum(ops.where(p > 0, p * (ops.log(safe) - log_q), 0.0), axis=-1)


@keras.saving.register_keras_serializable(package="tinyrobust")
class NeoKD(Objective):
    """NEO-KD's loss terms for `RobustModel`'s step on a multi-exit model.

    The adversary attacks every exit (the average attack, or the max-average
    attack whose single-exit attacks share one random start); each step draws
    a fresh orthogonal class partition. Logged: `clean_ce`, `ce` (on the
    adversarial inputs), `nkd`, `eokd` and the clean accuracy of every exit
    (`exit_<k>_accuracy`).

    Args:
        alpha: neighbour-KD weight.
        beta: exit-wise orthogonal KD weight.
        exit_weights: per-exit weights (default equal).
        attack: "average" or "max_average".
        seed: seed of the class partitions.
    """

    seeds = ("partition",)

    def streams(self, model):
        return ("partition", "attack")  # the order of the NEOKD trainer before the single engine

    def __init__(self, alpha=3.0, beta=1.0, exit_weights=None, attack="average", seed=None):
        self.alpha = float(check_number("alpha", alpha, low=0))
        self.beta = float(check_number("beta", beta, low=0))
        if exit_weights is not None:
            for w in exit_weights:
                check_number("exit_weights", w, low=0)
        self.exit_weights = None if exit_weights is None else [float(w) for w in exit_weights]
        self.attack = check_choice("attack", attack, ("average", "max_average"))
        self.seed = seed

    def check(self, model):
        exits = len(model.outputs)
        if exits < 2:
            raise ValueError(f"Expected a multi-exit model (several logits outputs). Received: model={model.name!r}")
        if self.exit_weights is not None and len(self.exit_weights) != exits:
            raise ValueError(f"Expected one weight per exit ({exits}). Received: exit_weights={self.exit_weights!r}")
        if model.jacobian is not None:
            raise ValueError(f"NEO-KD takes no Jacobian terms. Received: jacobian={model.jacobian!r}")

    def targets(self, model, x, y, training=True):
        return ops.reshape(y, (-1,)), None  # (N,) or (N, 1) labels

    def adversarial_examples(self, model, x, labels, context, perturb):
        # Every single-exit attack of the max-average attack starts from the same point.
        start = model.adversary.initial_perturbation(x, model.random_stream("attack"), model.attack_epsilon())
        return multi_exit_attack(model, labels, self.attack, lambda loss_fn: perturb(loss_fn, start=start))

    def passes(self, model, adversarial):
        return True, adversarial

    def scalar_logs(self, model):
        return ["clean_ce", "ce", "nkd", "eokd"]

    def accuracy_logs(self, model):
        return [f"exit_{k}_accuracy" for k in range(1, len(model.outputs) + 1)]

    def update_accuracies(self, model, trackers, labels, clean):
        for k, z in enumerate(clean, start=1):
            trackers[f"exit_{k}_accuracy"].update_state(labels, z)

    def losses(self, model, step):
        keep = orthogonal_classes(len(model.outputs), model.outputs[0].shape[-1], seed=model.random_stream("partition"))
        adv = step.adv if step.adv is not None else step.clean
        loss, clean_ce, ce, nkd, eokd = neokd_loss(step.clean, adv, step.labels, keep, self.alpha, self.beta,
                                                   self.exit_weights, step.sample_weight)
        return [loss], {"clean_ce": clean_ce, "ce": ce, "nkd": nkd, "eokd": eokd}

    def test_loss(self, model, x, labels, outputs, sample_weight):
        return kernels.weighted_mean(_average_ce(outputs, labels), sample_weight)

    def get_config(self):
        return {"alpha": self.alpha, "beta": self.beta, "exit_weights": self.exit_weights, "attack": self.attack,
                "seed": self.seed}


@keras.saving.register_keras_serializable(package="tinyrobust")
class NEOKD(RobustModel):
    """Adversarial training of a multi-exit model with NEO-KD: the `RobustModel` on the network's layers with
    a `NeoKD` objective, driven by `compile(optimizer=...)` and `fit`.

    Each step crafts adversarial examples against all exits (the average
    attack, or the max-average attack), then minimises `neokd_loss` with a
    fresh orthogonal class partition. `alpha=beta=0` gives plain multi-exit
    adversarial training (Hu et al.: clean and adversarial cross-entropy of
    every exit). Logged: `loss`, `clean_ce`, `ce`, `nkd`, `eokd`, the clean
    accuracy of every exit (`exit_<k>_accuracy`) and `adv_accuracy` of the
    last exit. Calling it runs the model; saved, it loads as that `RobustModel`.

    Args:
        model: a multi-exit model (`attach_exits`).
        alpha: neighbour-KD weight (paper: 3).
        beta: exit-wise orthogonal KD weight (paper: 1).
        exit_weights: per-exit weights (default equal).
        adversary: `AdversarialTraining` ("pgd" or a one-step method) or its
            config; default PGD-10 at 8/255.
        attack: "average" or "max_average".
        seed: seed of the class partitions.
        name: model name.
    """

    def __init__(self, model, alpha=3.0, beta=1.0, exit_weights=None, adversary=None, attack="average", seed=None,
                 name=None, **kwargs):
        if not isinstance(model, keras.Model) or len(getattr(model, "outputs", None) or []) < 2:
            raise ValueError(f"Expected a multi-exit model (several logits outputs). Received: model={model!r}")
        objective = NeoKD(alpha, beta, exit_weights, attack, seed)
        super().__init__(models.inputs_of(model), model.outputs, adversary=input_adversary(adversary),
                         objective=objective, name=name or f"neokd_{model.name}", **kwargs)
        self._network = Untracked(model=model)

    @property
    def network(self):
        """The multi-exit model (sharing this trainer's layers and weights)."""
        return self._network.model

    def deployable(self):
        """The multi-exit network: what is evaluated and deployed."""
        return self.network

    def compile_for_training(self, optimizer):
        """Compiles with the optimizer only: the loss comes from the NEO-KD objective."""
        self.compile(optimizer=optimizer)

    @classmethod
    def from_config(cls, config, custom_objects=None):
        if "model" in config:
            raise ValueError("This NEOKD was saved by tinyrobust 0.1.0 before the single training engine (it wrapped "
                             "`model`); this version saves the network it trains. Load the file with that version "
                             f"and save `neokd.network`, or retrain. Received: config with keys {sorted(config)}")
        return RobustModel.from_config(config, custom_objects=custom_objects)
