"""Pure TensorFlow building blocks of gradient attacks.

Each function is traceable (no Python side effects), so attack loops built
from them run inside a compiled train step or a per-model `tf.function`.
Inputs are batches; `eps` bounds the perturbation in the given norm.
"""

import keras
import numpy as np
import tensorflow as tf
from keras import ops

NORMS = ("linf", "l2")


def _batch_norm(t):
    return ops.sqrt(ops.sum(ops.reshape(ops.square(t), (ops.shape(t)[0], -1)), axis=-1))


def _expand(v, like):
    return ops.reshape(v, (-1,) + (1,) * (len(like.shape) - 1))


def project(delta, eps, norm):
    """Projects perturbations onto the `norm` ball of radius `eps`."""
    if norm == "linf":
        return ops.clip(delta, -eps, eps)
    scale = ops.minimum(1.0, eps / ops.maximum(_batch_norm(delta), 1e-12))
    return delta * _expand(scale, delta)


def normalized_step(gradient, norm):
    """The steepest-ascent direction of unit `norm`: sign for L-inf, unit L2 otherwise."""
    if norm == "linf":
        return ops.sign(gradient)
    return gradient / _expand(ops.maximum(_batch_norm(gradient), 1e-12), gradient)


def random_start(x, eps, norm, seed=None):
    """A uniform random point of the `norm` ball of radius `eps` around zero, one per example.

    The one random start of every attack and training adversary.

    Args:
        x: a batch of inputs (only its shape and dtype are used).
        eps: radius (scalar, may be a tensor).
        norm: "linf" or "l2".
        seed: an int or `keras.random.SeedGenerator` (draws inside TensorFlow, e.g. in a
            compiled train step), or a `numpy.random.Generator` (evaluation: float64 draws
            reproducible outside TensorFlow).

    Returns:
        A tensor shaped like `x`, in its dtype.
    """
    shape = ops.shape(x)
    if isinstance(seed, np.random.Generator):
        dtype = "float64"
        uniform = lambda size: ops.convert_to_tensor(seed.uniform(size=size))  # noqa: E731
        normal = lambda size: ops.convert_to_tensor(seed.normal(size=size))  # noqa: E731
    else:
        dtype = x.dtype
        uniform = lambda size: keras.random.uniform(size, dtype=dtype, seed=seed)  # noqa: E731
        normal = lambda size: keras.random.normal(size, dtype=dtype, seed=seed)  # noqa: E731
    # A Python radius straight to `dtype` (via float32 it would change in float64).
    eps = ops.cast(eps, dtype) if hasattr(eps, "dtype") else ops.convert_to_tensor(eps, dtype=dtype)
    if norm == "linf":
        delta = uniform(shape) * (eps - (-eps)) + (-eps)  # the arithmetic of a uniform draw in [-eps, eps]
    else:
        direction = normal(shape)
        direction = direction / _expand(_batch_norm(direction), direction)
        size = ops.cast(ops.prod(shape[1:]), dtype)
        radius = eps * uniform((shape[0],)) ** (1.0 / size)
        delta = direction * _expand(radius, direction)
    return ops.cast(delta, x.dtype)


def clip_to_range(x, input_range):
    """Clips inputs to the valid `(low, high)` range."""
    return ops.clip(x, input_range[0], input_range[1])


def project_into(x, delta, eps, norm, input_range):
    """`x + delta` brought into the threat model: `delta` projected onto the `eps` ball, the sum clipped to the
    input range. The one projection of every attack and training adversary."""
    return clip_to_range(x + project(delta, eps, norm), input_range)


def ascent_step(x, x_adv, gradient, step_size, eps, norm, input_range):
    """One projected steepest-ascent step of size `step_size` from `x_adv` (the one step rule of PGD-type attacks)."""
    return project_into(x, x_adv + step_size * normalized_step(gradient, norm) - x, eps, norm, input_range)


def weighted_mean(values, sample_weight=None):
    """Batch mean of per-example `values`; with weights `sum(w * v) / batch`, as Keras reduces weighted losses."""
    if sample_weight is None:
        return ops.mean(values)
    weight = ops.reshape(ops.cast(sample_weight, values.dtype), (-1,))
    return ops.sum(values * weight) / ops.cast(ops.shape(values)[0], values.dtype)


def cross_entropy(logits, labels):
    """Per-example softmax cross-entropy of logits with integer labels."""
    return keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)


def kl_divergence(reference_logits, logits):
    """Per-example KL(softmax(reference) || softmax(logits))."""
    log_p = ops.log_softmax(reference_logits, axis=-1)
    log_q = ops.log_softmax(logits, axis=-1)
    return ops.sum(ops.exp(log_p) * (log_p - log_q), axis=-1)


def input_gradient(loss_fn, x):
    """Gradient of `sum(loss_fn(x))` with respect to `x`."""
    with tf.GradientTape() as tape:
        tape.watch(x)
        loss = ops.sum(loss_fn(x))
    # A masked model (e.g. a hard round) has no gradient: that is a zero gradient, not an error.
    return tape.gradient(loss, x, unconnected_gradients=tf.UnconnectedGradients.ZERO)


def pgd(loss_fn, x, eps, step_size, steps, norm="linf", start=None, input_range=(0.0, 1.0), momentum=None):
    """Projected gradient ascent on `loss_fn` within the `eps` ball around `x`.

    Args:
        loss_fn: maps a batch of inputs to per-example losses to maximise.
        x: clean inputs.
        eps: radius of the ball (scalar, may be a tensor).
        step_size: size of each step in `norm`.
        steps: number of steps: a Python int unrolls the loop, a tensor makes
            it a `tf.while_loop` inside a `tf.function`.
        norm: "linf" or "l2".
        start: initial perturbation (e.g. `random_start`), or None for zero.
        input_range: valid `(low, high)` of the inputs.
        momentum: None, or the decay of MIM's accumulated L1-normalised gradient.

    Returns:
        Adversarial inputs, without gradient.
    """
    x = ops.stop_gradient(x)
    x_adv = project_into(x, ops.zeros_like(x) if start is None else start, eps, norm, input_range)
    velocity = ops.zeros_like(x)
    for _ in range(steps):
        gradient = input_gradient(loss_fn, x_adv)
        if momentum is not None:
            l1 = ops.sum(ops.reshape(ops.abs(gradient), (ops.shape(x)[0], -1)), axis=-1)
            velocity = momentum * velocity + gradient / _expand(ops.maximum(l1, 1e-12), gradient)
            gradient = velocity
        x_adv = ascent_step(x, x_adv, gradient, step_size, eps, norm, input_range)
    return ops.stop_gradient(x_adv)


def margin(logits, labels):
    """Per-example `z_y - max_{j != y} z_j`: negative when misclassified."""
    classes = logits.shape[-1]
    mask = ops.one_hot(labels, classes, dtype=logits.dtype)
    true = ops.sum(logits * mask, axis=-1)
    other = ops.max(logits - 1e9 * mask, axis=-1)
    return true - other


def dlr_loss(logits, labels, target=None):
    """Difference-of-logits-ratio loss of Croce and Hein (2020), to maximise.

    Untargeted: `-(z_y - max_{j != y} z_j) / (z_pi1 - z_pi3)`; targeted:
    `-(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2)`, pi sorting the logits in
    decreasing order.
    """
    ordered = ops.flip(ops.sort(logits, axis=-1), axis=-1)
    if target is None:
        return -margin(logits, labels) / (ordered[:, 0] - ordered[:, 2] + 1e-12)
    classes = logits.shape[-1]
    true = ops.sum(logits * ops.one_hot(labels, classes, dtype=logits.dtype), axis=-1)
    goal = ops.sum(logits * ops.one_hot(target, classes, dtype=logits.dtype), axis=-1)
    return -(true - goal) / (ordered[:, 0] - 0.5 * (ordered[:, 2] + ordered[:, 3]) + 1e-12)
