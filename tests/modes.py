"""Every training mode on a tiny dense network, shared by the engine tests (and tests/mirrored_check.py).

Adversaries start at the clean input (GradAlign's second gradient at a fixed
point) and Jacobian terms are exact, so a step draws nothing random that
depends on how the batch is split or weighted.
"""

import keras

import tinyrobust as tr
from tinyrobust import distill, multiexit

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
MODES = ("jr", "pgd", "trades", "fgsm_rs", "n_fgsm", "grad_align", "kd", "ard", "ard_cached", "rslad",
         "ard_grad_align", "rslad_n_fgsm", "neokd", "neokd_n_fgsm")


def _network(seed, name="net"):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((6,))
    h = keras.layers.Dense(8, activation="tanh", name="hidden")(inputs)
    h = keras.layers.Dense(8, activation="tanh", name="hidden_2")(h)
    return keras.Model(inputs, keras.layers.Dense(3, name="logits")(h), name=name)


def _adversary(method):
    return tr.AdversarialTraining(method, epsilon=0.1, steps=2, input_range=(-4.0, 4.0), random_start=False)


def build(mode, jit_compile=False):
    """The compiled trainer of `mode` and the model whose weights it trains.

    Args:
        mode: one of `MODES`.
        jit_compile: compile the step with XLA.

    Returns:
        `(trainer, trained)`.
    """
    if mode in ("jr", "pgd", "trades", "fgsm_rs", "n_fgsm", "grad_align"):
        jacobian = tr.JacobianRegularizer(layers={"input": 0.5, "hidden": 0.5}, num_projections=None)
        model = tr.RobustModel.wrap(_network(0), jacobian=jacobian if mode in ("jr", "pgd") else None,
                                    adversary=None if mode == "jr" else _adversary(mode))
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss=LOSS, metrics=["accuracy"], jit_compile=jit_compile)
        return model, model
    if mode.startswith("neokd"):
        network = multiexit.attach_exits(_network(0), ["hidden"])
        model = multiexit.NEOKD(network, adversary=_adversary("n_fgsm" if mode == "neokd_n_fgsm" else "pgd"), seed=0)
        model.compile(optimizer=keras.optimizers.SGD(0.1), jit_compile=jit_compile)
        return model, network
    student = _network(0, "student")
    method, _, attack = mode.replace("_cached", "").partition("_")
    model = distill.RobustDistiller(student, _network(1, "teacher"), method=method, alpha=0.5,
                                    adversary=None if method == "kd" else _adversary(attack or "pgd"))
    model.compile(optimizer=keras.optimizers.SGD(0.1), jit_compile=jit_compile)
    return model, student


def targets(mode, trainer, x, y):
    """The `fit` targets of `mode`: the labels, or for "ard_cached" the labels with the teacher's logits."""
    return distill.with_teacher_logits(trainer.teacher, x, y)[1] if mode == "ard_cached" else y
