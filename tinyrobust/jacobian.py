"""Jacobian regularization (Hoffman, Roberts and Yaida, 2019).

The squared Frobenius norm of the Jacobian of the logits `z` with respect to an
input (or a hidden activation) `h` is estimated with random projections:

    ||J||_F^2 = C * E_v ||v^T J||^2,   v uniform on the unit sphere of R^C,

one backward pass per projection. Every function here works on any callable
returning logits and is differentiable with respect to the model's weights
(double backpropagation) when called under an outer `tf.GradientTape`.
"""

import keras
import tensorflow as tf
from keras import ops

from tinyrobust.attacks import kernels
from tinyrobust.validation import check_number

__all__ = ["frobenius_sq", "jacobian_norms", "JacobianRegularizer"]

INPUT = "input"


def _check_projections(num_projections):
    """None (exact), or a positive integer."""
    return None if num_projections is None else check_number("num_projections", num_projections, low=1, integer=True)


def _per_example_sq_norm(gradient):
    return ops.sum(ops.reshape(ops.square(gradient), (ops.shape(gradient)[0], -1)), axis=-1)


def jacobian_norms(tape, logits, sources, num_projections=1, seed=None, sample_weight=None):
    """Estimates ||d logits / d source||_F^2 for several sources at once.

    All sources share each backward pass, so per-layer terms cost no more
    backward passes than the input term alone.

    Args:
        tape: the `tf.GradientTape` that recorded `logits` from the sources;
            persistent when more than one backward pass is needed.
        logits: tensor of shape (batch, classes).
        sources: list of tensors the logits depend on (input, activations).
        num_projections: random projections per example, or None for the
            exact value (one backward pass per class).
        seed: int or `keras.random.SeedGenerator` for the projections.
        sample_weight: None, or one weight per example (the mean is then
            `sum(w * norm) / batch`, as Keras reduces weighted losses).

    Returns:
        A list with, per source, the batch mean of the squared norm (scalar).
    """
    num_projections = _check_projections(num_projections)
    batch, classes = ops.shape(logits)[0], logits.shape[-1]
    totals = [ops.zeros((batch,), logits.dtype) for _ in sources]
    if num_projections is None:
        vectors = [ops.one_hot(ops.full((batch,), c, "int32"), classes, dtype=logits.dtype) for c in range(classes)]
        factor = 1.0
    else:
        vectors = []
        for _ in range(num_projections):
            v = keras.random.normal(ops.shape(logits), dtype=logits.dtype, seed=seed)
            vectors.append(v / ops.norm(v, axis=-1, keepdims=True))
        factor = classes / num_projections
    for v in vectors:
        gradients = tape.gradient(logits, sources, output_gradients=v, unconnected_gradients="none")
        for i, (source, gradient) in enumerate(zip(sources, gradients)):
            if gradient is None:
                raise ValueError(
                    f"The logits do not depend on a regularised tensor. Received: source={getattr(source, 'name', i)!r}"
                )
            totals[i] = totals[i] + _per_example_sq_norm(gradient)
    return [factor * kernels.weighted_mean(total, sample_weight) for total in totals]


def frobenius_sq(fn, x, num_projections=1, seed=None):
    """Batch mean of ||d fn(x) / dx||_F^2.

    Args:
        fn: callable mapping a batch of inputs to logits of shape (batch, classes).
        x: batch of inputs.
        num_projections: random projections per example (Hoffman et al.), or
            None for the exact value (one backward pass per class).
        seed: int or `keras.random.SeedGenerator` for the projections.

    Returns:
        A scalar tensor, differentiable with respect to `fn`'s weights.
    """
    num_projections = _check_projections(num_projections)
    x = tf.convert_to_tensor(x)
    persistent = num_projections is None or num_projections > 1
    with tf.GradientTape(persistent=persistent) as tape:
        tape.watch(x)
        logits = fn(x)
    return jacobian_norms(tape, logits, [x], num_projections, seed)[0]


@keras.saving.register_keras_serializable(package="tinyrobust")
class JacobianRegularizer:
    """Configuration of (per-layer) Jacobian regularization.

    The loss adds `sum_l (w_l / 2) * ||d logits / d h_l||_F^2` where `h_l` is the
    model input (`"input"`) or the output of the layer named `l`.

    Args:
        weight: weight of the input term when `layers` is None (default 0.01).
        num_projections: random projections per example, or None for exact.
        layers: None (input only), or a dict `{"input" or layer name: weight}`.
        seed: seed of the random projections (and of the batch subset).
        batch_fraction: the share of each batch the terms are estimated on,
            in (0, 1]; default 1 (the whole batch). Below 1 the terms are the
            mean over a uniformly drawn subset of `ceil(batch_fraction * batch)`
            examples: an unbiased estimate of the batch mean at about that
            share of the Jacobian's cost (the terms then need one extra
            training-mode forward pass on the subset, which also updates batch
            normalisation's moving statistics once more).

    Raises:
        ValueError: negative or non-numeric weights, bad `num_projections` or `batch_fraction`.
    """

    def __init__(self, weight=None, num_projections=1, layers=None, seed=None, batch_fraction=1.0):
        if layers is not None and weight is not None:
            raise ValueError(
                "Give either `weight` (input term only) or `layers` (one weight per term), not both. "
                f"Received: weight={weight!r}, layers={layers!r}"
            )
        if layers is None:
            layers = {INPUT: 0.01 if weight is None else weight}
        if not isinstance(layers, dict) or not layers:
            raise ValueError(f"Expected `layers` to be a non-empty dict of name: weight. Received: layers={layers!r}")
        for name, value in layers.items():
            if not isinstance(name, str):
                raise ValueError(f"Expected layer names to be strings. Received: layers={layers!r}")
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                raise ValueError(
                    f"Expected the Jacobian weight of {name!r} to be a non-negative number. Received: weight={value!r}"
                )
        self.layers = {name: float(value) for name, value in layers.items()}
        self.num_projections = _check_projections(num_projections)
        self.seed = seed
        self.batch_fraction = float(check_number("batch_fraction", batch_fraction, low=0, high=1, low_open=True))

    @property
    def hidden_layers(self):
        """Names of the regularised hidden layers (without "input")."""
        return [name for name in self.layers if name != INPUT]

    def get_config(self):
        return {"layers": dict(self.layers), "num_projections": self.num_projections, "seed": self.seed,
                "batch_fraction": self.batch_fraction}

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def __repr__(self):
        fraction = "" if self.batch_fraction == 1 else f", batch_fraction={self.batch_fraction:g}"
        return f"JacobianRegularizer(layers={self.layers}, num_projections={self.num_projections}{fraction})"
