"""What every attack shares: validated configuration, model adapters, results."""

import copy
import dataclasses

import keras
import numpy as np
import tensorflow as tf

from tinyrobust.attacks import kernels
from tinyrobust.attacks.threat import ThreatModel, check_epsilon
from tinyrobust.validation import check_bool, check_choice, check_labels, check_number, check_range


def check_epsilons(eps):
    """A tuple of non-negative epsilons from a number or a sequence."""
    values = tuple(eps) if isinstance(eps, (list, tuple, np.ndarray)) else (eps,)
    if not values:
        raise ValueError(f"Expected at least one epsilon. Received: eps={eps!r}")
    for value in values:
        if (isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating))
                or not np.isfinite(value) or value < 0):
            raise ValueError(f"Expected `eps` to be finite non-negative numbers. Received: eps={eps!r}")
    return tuple(float(v) for v in values)


def logits_function(model):
    """A callable mapping a float32 batch to logits, for a Keras model or any callable.

    For a Keras model it is a `tf.function`, built once and kept on the model
    (eager calls of quantized layers cost several times a compiled call).
    """
    if not isinstance(model, keras.Layer):
        return model
    fn = getattr(model, "_tinyrobust_logits", None)
    if fn is None:
        fn = tf.function(lambda x: model(x, training=False), reduce_retracing=True)
        object.__setattr__(model, "_tinyrobust_logits", fn)  # untracked by Keras; not saved
    return fn


def matching_epsilon(epsilons, eps, done="evaluated"):
    """The index in `epsilons` of the radius equal to `eps` by value (8 / 255 finds 0.03137254901960784).

    Raises:
        ValueError: naming the radii there are.
    """
    for i, e in enumerate(epsilons):
        if np.isclose(float(e), float(eps), rtol=1e-9, atol=1e-12):
            return i
    raise ValueError(f"Not {done} at this radius (radii: {', '.join(f'{float(e):g}' for e in epsilons)}). "
                     f"Received: eps={eps!r}")


def input_shape_of(model):
    """The shape of one input a model takes (a tuple, None where any size goes), or None when unknown (a plain
    callable)."""
    inputs = getattr(model, "inputs", None) if isinstance(model, keras.Layer) else None
    return tuple(inputs[0].shape[1:]) if inputs else None  # other callables (e.g. TFLiteModel) check their own


def classes_of(model):
    """The number of classes (logits of the last output) of a model, or None when unknown."""
    outputs = getattr(model, "outputs", None) if isinstance(model, keras.Layer) else None
    if outputs:
        return outputs[-1].shape[-1]
    return getattr(model, "num_classes", None)


def per_example_norm(t, norm):
    """Numpy `norm` ("linf" or "l2") of each example of a batch."""
    flat = t.reshape(len(t), -1)
    return np.abs(flat).max(axis=1) if norm == "linf" else np.sqrt(np.sum(flat ** 2, axis=1))


def per_example(v, like):
    """Reshapes per-example values `v` to broadcast against the batch `like`."""
    return np.reshape(v, (-1,) + (1,) * (like.ndim - 1))


def predict(model, x, batch_size=512):
    """Numpy logits (or labels, for label-only callables) of `model` on `x`."""
    fn = logits_function(model)
    outputs = [np.asarray(keras.ops.convert_to_numpy(fn(tf.constant(x[i:i + batch_size], tf.float32))))
               for i in range(0, len(x), batch_size)]
    return np.concatenate(outputs)


def labels_of(outputs):
    """Predicted labels from logits (N, C) or labels (N,)."""
    outputs = np.asarray(outputs)
    return outputs if outputs.ndim == 1 else np.argmax(outputs, axis=-1)


@dataclasses.dataclass
class AttackResult:
    """What an attack returns for one batch.

    Attributes:
        epsilons: the radii, one per entry of the lists below.
        x_adv: adversarial inputs per epsilon (clipped to the ball and the input range).
        success: per epsilon, a bool array: the model's prediction on `x_adv`
            is wrong (untargeted) or the target (targeted).
        queries: per epsilon, model queries used per example (black-box
            attacks), or None.
        stages: for a `Cascade`, `{stage: [bool array per epsilon]}`: still
            robust (correct) after that stage and every earlier one; else None.
    """

    epsilons: tuple
    x_adv: list
    success: list
    queries: list = None
    stages: dict = None

    def success_rate(self, eps):
        """The share of examples the attack succeeded on at radius `eps` (matched by value)."""
        return float(np.mean(self.success[matching_epsilon(self.epsilons, eps, "attacked")]))

    def __repr__(self):  # the arrays stay out: a batch of images is not a readable repr
        rates = ", ".join(f"{e:.4g}: {100 * np.mean(s):.1f}%" for e, s in zip(self.epsilons, self.success))
        n = len(self.success[0]) if self.success else 0
        return f"AttackResult({n} examples, success {{{rates}}})"


class Attack:
    """Base class: a configured attack, called as `attack(model, x, y=None)`.

    Subclasses implement `_attack(model, x, y, eps) -> (x_adv, queries or None)`
    on numpy arrays. `y=None` attacks the model's own predictions.

    Args:
        eps: a radius or a list of radii (one adversarial batch per radius).
        norm: "linf" or "l2".
        targeted: if True, `y` holds target labels to reach.
        input_range: valid (low, high) of the inputs.
        seed: seed of the attack's randomness.
    """

    norms = kernels.NORMS
    black_box = False  # True for attacks that only query outputs (scores or labels)

    def __init__(self, eps, norm="linf", targeted=False, input_range=(0.0, 1.0), seed=0):
        self.epsilons = check_epsilons(eps)
        self.norm = check_choice("norm", norm, self.norms)
        self.targeted = check_bool("targeted", targeted)
        self.input_range = check_range(input_range)
        for value in self.epsilons:
            check_epsilon(value, self.norm, self.input_range, name="eps")
        self.seed = check_number("seed", seed, low=0, integer=True)
        self._compiled = {}

    def __call__(self, model, x, y=None):
        """Adversarial inputs: one array, or a list of arrays when several epsilons are configured."""
        result = self.run(model, x, y)
        return result.x_adv[0] if len(self.epsilons) == 1 else result.x_adv

    def run(self, model, x, y=None):
        """Attacks a batch at every epsilon.

        Args:
            model: Keras model or callable returning logits (or labels, for
                decision-based attacks).
            x: inputs within `input_range`.
            y: integer labels (targets when `targeted`), or None for the
                model's predictions.

        Returns:
            An `AttackResult`.
        """
        x, y = self._inputs(model, x, y)
        advs, successes, queries = [], [], []
        for eps in self.epsilons:
            if eps == 0:
                x_adv, used = x.copy(), None
            else:
                x_adv, used = self._attack(model, x, y, eps)
                x_adv = self._project(x, np.asarray(x_adv, "float32"), eps)
            advs.append(x_adv)
            successes.append(self.is_success(model, x_adv, y))
            queries.append(used)
        return AttackResult(self.epsilons, advs, successes, None if all(q is None for q in queries) else queries)

    def _inputs(self, model, x, y):
        """`(x, y)` checked before anything is traced: float32 inputs of the model's input shape within the
        input range, one int32 label per input, within the model's classes."""
        x = np.asarray(x, dtype="float32")
        if x.ndim == 0 or len(x) == 0:
            raise ValueError(f"Expected a non-empty batch of inputs. Received: x with shape {x.shape}")
        expected = input_shape_of(model)
        if expected is not None and (len(expected) != x.ndim - 1 or any(
                e is not None and e != d for e, d in zip(expected, x.shape[1:]))):
            shown = "(N, " + ", ".join("?" if e is None else str(e) for e in expected) + ")"
            raise ValueError(f"Expected inputs of shape {shown} for model {getattr(model, 'name', model)!r}. "
                             f"Received: x with shape {x.shape}")
        if not np.all(np.isfinite(x)):
            raise ValueError("Expected finite inputs. Received: x with NaN or inf")
        low, high = self.input_range
        if x.min() < low or x.max() > high:
            raise ValueError(f"Inputs must lie in input_range={self.input_range}. "
                             f"Received: x in [{x.min():.4g}, {x.max():.4g}]")
        if y is None:
            if self.targeted:
                raise ValueError("A targeted attack needs target labels. Received: y=None")
            y = labels_of(predict(model, x))
        return x, check_labels(y, n=len(x), num_classes=classes_of(model))

    def at(self, eps):
        """The same attack at the single radius `eps` (sharing its compiled functions)."""
        single = copy.copy(self)
        single.epsilons = check_epsilons(eps)
        return single

    def is_success(self, model, x_adv, y):
        """Per-example success of `x_adv` against `model`."""
        return self.reached(labels_of(predict(model, x_adv)), y)

    def reached(self, predicted, y):
        """Per-example success of predicted labels: wrong (untargeted) or the target (targeted)."""
        return predicted == y if self.targeted else predicted != y

    def _project(self, x, x_adv, eps):
        """Guarantees the bound and the input range whatever the attack did."""
        return np.asarray(self.threat_model(eps).project(x, x_adv - x), "float32")

    def threat_model(self, eps):
        """The `ThreatModel` of this attack at radius `eps`."""
        return ThreatModel(self.norm, eps, self.input_range)

    def first_success(self, model, y, candidates):
        """Per example, the first candidate batch that succeeds (the last one if none does).

        Args:
            model: the attacked model.
            y: labels (targets when targeted).
            candidates: iterable of adversarial batches, e.g. one per restart,
                computed lazily.

        Returns:
            One adversarial batch.
        """
        best = None
        for candidate in candidates:
            if best is None:
                best = candidate
            else:
                broken = per_example(self.is_success(model, best, y), best)
                best = np.where(broken, best, candidate)
        return best

    def compiled(self, model, build):
        """A function built once per model by `build(model)` (e.g. a `tf.function`)."""
        key = id(model)
        if key not in self._compiled or self._compiled[key][0] is not model:
            self._compiled[key] = (model, build(model))
        return self._compiled[key][1]

    def _attack(self, model, x, y, eps):
        raise NotImplementedError

    def get_config(self):
        eps = self.epsilons[0] if len(self.epsilons) == 1 else list(self.epsilons)
        return {"eps": eps, "norm": self.norm, "targeted": self.targeted, "input_range": list(self.input_range),
                "seed": self.seed}

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"


class MinimumNormAttack(Attack):
    """An attack that searches, once per batch, for the smallest adversarial
    perturbation it can find; every eps then reuses that search.

    Subclasses implement `minimum_norm(model, x, y, goal)` returning the
    best adversarial inputs (the clean input where none was found) and the
    queries used per example (or None). At each eps the result is that
    perturbation when it is within eps, otherwise its projection onto the eps
    ball, and success is measured on the model.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._search = {}

    def minimum_norm(self, model, x, y, goal):
        """Smallest adversarial inputs found and queries per example.

        Args:
            model: the attacked model.
            x: clean inputs.
            y: labels (targets when targeted).
            goal: a norm below which an example needs no further search
                (the smallest positive eps).

        Returns:
            `(x_adv, queries)`.
        """
        raise NotImplementedError

    def _attack(self, model, x, y, eps):
        key = (id(model), x.tobytes(), y.tobytes())
        if key not in self._search:  # one search serves every eps
            goal = min(e for e in self.epsilons if e > 0)
            self._search = {key: self.minimum_norm(model, x, y, goal)}
        return self._search[key]

