"""One training engine for every robust mode.

`RobustModel` is a functional `keras.Model` whose single `train_step` serves
plain, Jacobian-regularised and adversarial training, TRADES, KD / ARD / RSLAD
distillation (`tinyrobust.distill`) and NEO-KD (`tinyrobust.multiexit`): an
`Objective` says which loss terms to add and what the adversary attacks, an
`AdversarialTraining` crafts the examples through the shared
`tinyrobust.attacks.ThreatModel`, and a `JacobianRegularizer` adds its terms.
Users drive it with `compile` / `fit` and callbacks as any Keras model, on one
device or under a `tf.distribute` strategy.
"""

import dataclasses
import warnings

import keras
import tensorflow as tf
from keras import ops

from tinyrobust import models
from tinyrobust.attacks import kernels
from tinyrobust.attacks.threat import ThreatModel
from tinyrobust.jacobian import INPUT, JacobianRegularizer, jacobian_norms
from tinyrobust.validation import check_bool, check_choice, check_number

__all__ = ["AdversarialTraining", "CrossEntropy", "Objective", "RobustModel", "Step", "compile_for_training"]

METHODS = ("pgd", "trades", "fgsm_rs", "n_fgsm", "grad_align")
ONE_STEP = ("fgsm_rs", "n_fgsm", "grad_align")


@keras.saving.register_keras_serializable(package="tinyrobust")
class AdversarialTraining:
    """Configuration of the training adversary.

    Methods:
    - "pgd": PGD-AT (Madry et al.): train on PGD examples with random start.
    - "trades": TRADES (Zhang et al.): CE on clean inputs + `beta` * KL between
      clean and adversarial predictions, the adversary maximising that KL.
    - "fgsm_rs": FGSM from a uniform random start with step `1.25 * eps`
      ("fast is better than free", Wong et al.).
    - "n_fgsm": N-FGSM (de Jorge et al., NeurIPS 2022, "Make some noise"):
      noise uniform in the ball of radius `noise * eps` (kept in the input
      range), one signed-gradient step of `step_size` from there, and no
      projection back onto the eps ball (only onto the input range), so the
      training perturbation reaches up to `(noise + 1) * eps`. Defaults are the
      paper's and its released code's: `noise=2` (U[-2 eps, 2 eps]) and
      `step_size = eps`.
    - "grad_align": FGSM + GradAlign (Andriushchenko and Flammarion, NeurIPS
      2020): FGSM from the clean input with step `step_size` (default eps, the
      released code's 1.25 eps clipped to the ball), plus the regulariser
      `align_weight * (1 - cos(grad_x loss(x), grad_x loss(x + eta)))`,
      `eta` uniform in the eps ball, averaged over the examples whose two
      gradients are nonzero; as in the released code the first gradient is a
      constant and the second is differentiated through (double
      backpropagation). `align_weight` defaults to 0.2, the paper's value for
      CIFAR-10 at eps 8/255; its code scales it log-linearly with eps on
      CIFAR-10 (0.02 * 10^(255 eps / 8)), a rule for that data set only, so
      choose it on validation data for another. Deviation: both gradients are
      taken with the model in inference mode (as every tinyrobust adversary
      attacks), where the released code keeps batch norm in training mode; and
      the paper starts FGSM at the clean input, so `random_start` does not
      apply to the example (it fixes eta, see below).

    Distillation and NEO-KD use "pgd" or a one-step method on their own
    attacked loss; one-step methods start from their own start (uniform in
    the ball, N-FGSM's noise, GradAlign's clean input) whatever start the
    objective asks for (TRADES' and RSLAD's small Gaussian is for multi-step
    attacks: from there one FGSM step lands every coordinate on +-eps).

    Args:
        method: one of "pgd", "trades", "fgsm_rs", "n_fgsm", "grad_align".
        epsilon: radius of the threat model (in input units).
        steps: attack steps (PGD, TRADES); the one-step methods always take one.
        step_size: step size; default `2.5 * epsilon / steps` (1.25 eps for
            FGSM-RS, eps for N-FGSM and GradAlign).
        norm: "linf" or "l2" (N-FGSM and GradAlign are defined for L-inf in
            their papers; with "l2" they use the L2 ball and step).
        beta: TRADES' weight of the robustness term.
        input_range: valid (low, high) of the inputs.
        seed: seed of the random starts.
        random_start: start from a random point (uniform in the ball, N-FGSM's
            noise, or TRADES' and RSLAD's small Gaussian); False starts at the
            clean input, which makes the examples deterministic (e.g. to compare
            runs across devices). TRADES and RSLAD then start at the clean
            input plus 0.001 in every coordinate: TRADES' KL has no gradient
            at the clean input, so a step from there would follow rounding
            noise and differ from host to host. For GradAlign, False puts eta
            at the fixed point `0.5 * eps` in every coordinate (L2: a constant
            vector of norm `0.5 * eps`).
        noise: N-FGSM's noise radius as a multiple of `epsilon` (default 2).
        align_weight: GradAlign's weight lambda (default 0.2).

    Attributes:
        threat: the `ThreatModel` (norm, epsilon, input range) it perturbs within.
    """

    def __init__(self, method="pgd", epsilon=8 / 255, steps=10, step_size=None, norm="linf", beta=6.0,
                 input_range=(0.0, 1.0), seed=None, random_start=True, noise=None, align_weight=None):
        self.method = check_choice("method", method, METHODS)
        if not isinstance(random_start, bool):
            raise ValueError(f"Expected `random_start` to be True or False. Received: random_start={random_start!r}")
        self.random_start = random_start
        self.threat = ThreatModel(norm, epsilon, input_range)
        self.steps = check_number("steps", steps, low=1, integer=True)
        self.seed = seed
        self.step_size = None if step_size is None else float(check_number("step_size", step_size, low=0, low_open=True))
        self.beta = float(check_number("beta", beta, low=0))
        for name, value, owner in (("noise", noise, "n_fgsm"), ("align_weight", align_weight, "grad_align")):
            if value is not None and method != owner:
                raise ValueError(f"`{name}` is a setting of method {owner!r}. Received: {name}={value!r}, "
                                 f"method={method!r}")
        self.noise = 2.0 if noise is None else float(check_number("noise", noise, low=0))
        self.align_weight = 0.2 if align_weight is None else float(check_number("align_weight", align_weight, low=0))

    @property
    def epsilon(self):
        return self.threat.epsilon

    @property
    def norm(self):
        return self.threat.norm

    @property
    def input_range(self):
        return self.threat.input_range

    @property
    def one_step(self):
        """True for the methods that take one gradient step (FGSM-RS, N-FGSM, GradAlign)."""
        return self.method in ONE_STEP

    def step_size_for(self, epsilon):
        """The step size used at radius `epsilon` (a tensor when scheduled)."""
        if self.step_size is not None:
            return self.step_size
        if self.method == "fgsm_rs":
            return 1.25 * epsilon
        if self.method in ("n_fgsm", "grad_align"):
            return epsilon
        return 2.5 * epsilon / self.steps

    def perturb(self, loss_fn, x, seed, epsilon=None, start="uniform"):
        """Adversarial inputs maximising `loss_fn` within the threat model.

        Args:
            loss_fn: maps a batch of inputs to per-example losses.
            x: clean inputs.
            seed: `keras.random.SeedGenerator` of the random start.
            epsilon: radius (a tensor when scheduled); default `self.epsilon`.
            start: "uniform" (uniform in the ball), "small" (N(0, 0.001^2),
                as TRADES and RSLAD start; one-step methods take their own
                start instead), or a given initial perturbation.

        Returns:
            Adversarial inputs, without gradient.
        """
        eps = ops.cast(self.epsilon if epsilon is None else epsilon, x.dtype)
        delta = start if not isinstance(start, str) else self.initial_perturbation(x, seed, eps, start)
        if self.method == "n_fgsm":
            x_start = kernels.clip_to_range(ops.stop_gradient(x) + delta, self.input_range)
            gradient = kernels.input_gradient(loss_fn, x_start)
            step = self.step_size_for(eps) * kernels.normalized_step(gradient, self.norm)
            return ops.stop_gradient(kernels.clip_to_range(x_start + step, self.input_range))
        steps = 1 if self.one_step else self.steps
        return self.threat.pgd(loss_fn, x, self.step_size_for(eps), steps, start=delta, epsilon=eps)

    def initial_perturbation(self, x, seed, epsilon=None, start="uniform"):
        """Where the attack starts, as a perturbation of `x`.

        PGD: uniform in the ball ("uniform") or N(0, 0.001^2) ("small", as TRADES and RSLAD start); FGSM-RS:
        uniform; N-FGSM: uniform in the ball of radius `noise * epsilon`; GradAlign: zero. When `random_start`
        is False: zero, or 0.001 everywhere for "small" with a multi-step method (a fixed point beside the clean
        input, where TRADES' KL has a gradient).
        """
        eps = self.epsilon if epsilon is None else epsilon
        if self.method == "grad_align" or (self.one_step and not self.random_start):
            return ops.zeros_like(x)
        if self.one_step:
            start = "uniform"
        if not self.random_start:
            return ops.full_like(x, 0.001) if start == "small" else ops.zeros_like(x)
        if start == "small":
            return 0.001 * keras.random.normal(ops.shape(x), dtype=x.dtype, seed=seed)
        if self.method == "n_fgsm":
            return self.threat.random_start(x, seed, epsilon=self.noise * eps)
        return self.threat.random_start(x, seed, epsilon=eps)

    def alignment_penalty(self, loss_fn, x, seed, epsilon=None, sample_weight=None):
        """GradAlign's regulariser (unweighted by `align_weight`), differentiable in the model's weights.

        Args:
            loss_fn: the per-example loss the adversary attacks (e.g. the cross-entropy of the model).
            x: clean inputs.
            seed: `keras.random.SeedGenerator` of eta.
            epsilon: radius (a tensor when scheduled); default `self.epsilon`.
            sample_weight: per-example weights or None.

        Returns:
            The scalar `mean(1 - cos(grad_x loss(x), grad_x loss(x + eta)))` over the examples whose two
            gradients are nonzero (weighted by `sample_weight`), the first gradient held constant.
        """
        eps = ops.cast(self.epsilon if epsilon is None else epsilon, x.dtype)
        x = ops.stop_gradient(x)
        first = ops.stop_gradient(kernels.input_gradient(loss_fn, x))
        if self.random_start:
            eta = self.threat.random_start(x, seed, epsilon=eps)
        elif self.norm == "linf":
            eta = 0.5 * eps * ops.ones_like(x)
        else:
            size = ops.cast(ops.prod(ops.shape(x)[1:]), x.dtype)
            eta = 0.5 * eps / ops.sqrt(size) * ops.ones_like(x)
        with tf.GradientTape() as tape:
            shifted = x + eta
            tape.watch(shifted)
            loss = ops.sum(loss_fn(shifted))
        second = tape.gradient(loss, shifted, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        flat1 = ops.reshape(first, (ops.shape(x)[0], -1))
        flat2 = ops.reshape(second, (ops.shape(x)[0], -1))
        norm1, norm2 = ops.norm(flat1, axis=-1), ops.norm(flat2, axis=-1)
        nonzero = ops.cast(ops.logical_and(norm1 > 0, norm2 > 0), x.dtype)
        cos = ops.sum(flat1 * flat2, axis=-1) / (ops.maximum(norm1, 1e-12) * ops.maximum(norm2, 1e-12))
        weight = nonzero if sample_weight is None else nonzero * ops.reshape(ops.cast(sample_weight, x.dtype), (-1,))
        return ops.sum(weight * (1.0 - cos)) / ops.maximum(ops.sum(nonzero), 1.0)

    def get_config(self):
        config = {"method": self.method, "epsilon": self.epsilon, "steps": self.steps, "step_size": self.step_size,
                  "norm": self.norm, "beta": self.beta, "input_range": list(self.input_range), "seed": self.seed,
                  "random_start": self.random_start}
        if self.method == "n_fgsm":
            config["noise"] = self.noise
        if self.method == "grad_align":
            config["align_weight"] = self.align_weight
        return config

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def __repr__(self):
        return f"AdversarialTraining(method={self.method!r}, epsilon={self.epsilon:.4g}, steps={self.steps})"


def input_adversary(adversary):
    """The adversary of a training mode that attacks one loss (distillation, NEO-KD).

    Args:
        adversary: an `AdversarialTraining` with method "pgd" or a one-step
            method ("fgsm_rs", "n_fgsm", "grad_align"), its config, or None for
            PGD-10 at 8/255 on [0, 1] inputs.

    Returns:
        An `AdversarialTraining`.
    """
    adversary = AdversarialTraining("pgd", epsilon=8 / 255, steps=10) if adversary is None else adversary
    if isinstance(adversary, dict):
        adversary = AdversarialTraining.from_config(adversary)
    if not isinstance(adversary, AdversarialTraining) or adversary.method == "trades":
        raise ValueError("Expected an AdversarialTraining with method 'pgd', 'fgsm_rs', 'n_fgsm' or 'grad_align'. "
                         f"Received: adversary={adversary!r}")
    return adversary


def _deserialize(value, cls):
    if value is None or isinstance(value, cls):
        return value
    if isinstance(value, dict):
        return keras.saving.deserialize_keras_object(value) if "class_name" in value else cls(**value)
    raise ValueError(f"Expected a {cls.__name__}, its config or None. Received: {value!r}")


class Untracked:
    """Holds objects that Keras must not track (and save) as part of the model."""

    def __init__(self, **items):
        self.__dict__.update(items)


@dataclasses.dataclass
class Step:
    """What one training step has computed, handed to the `Objective`.

    Attributes:
        x: clean inputs.
        labels: integer labels.
        context: what `Objective.targets` returned besides the labels (e.g. teacher logits).
        sample_weight: per-example weights or None.
        x_adv: adversarial inputs, or None.
        clean: the model's training-mode outputs on `x`, or None if the objective needs no clean pass.
        adv: the same on `x_adv`, or None.
    """

    x: object
    labels: object
    context: object
    sample_weight: object
    x_adv: object = None
    clean: object = None
    adv: object = None


class Objective:
    """The loss terms of a training mode, plugged into `RobustModel.train_step`.

    Subclasses say which forward passes they need (`passes`), what the
    adversary maximises (`adversarial_examples`), and turn the outputs into
    loss terms (`losses`). The engine adds the Jacobian terms, scales the loss
    for distribution, applies the gradients and logs every term.

    Attributes:
        seeds: names of the objective's own random streams; the engine
            creates them (tracked, so `tinyrobust.callbacks.SeedEachEpoch`
            reseeds them), seeded with the objective's `seed` attribute, and
            hands them out as `model.random_stream(name)`.
    """

    seeds = ()

    def streams(self, model):
        """The model's random streams in creation order: "projection" (Jacobian projections), "attack"
        (adversarial starts) and the objective's `seeds`. The order numbers the streams
        `tinyrobust.callbacks.SeedEachEpoch` reseeds, so it stays fixed for a mode: the same seed gives the
        same run across versions."""
        return ("projection", "attack", *self.seeds)

    def check(self, model):
        """Validates the objective against the model (e.g. its number of outputs)."""

    def targets(self, model, x, y, training=True):
        """`(labels, context)` from the batch's targets; `context` reaches `Step.context`."""
        return y, None

    def adversarial_examples(self, model, x, labels, context, perturb):
        """Adversarial inputs; `perturb(loss_fn, start="uniform")` runs the model's adversary on `loss_fn`."""
        return perturb(lambda z: kernels.cross_entropy(model(z, training=False), labels))

    def passes(self, model, adversarial):
        """`(clean, adv)`: which training-mode forward passes the loss needs (the Jacobian terms ride on the
        first one)."""
        raise NotImplementedError

    def losses(self, model, step):
        """`(parts, logs)`: `parts` is a list of scalar loss tensors summed in order (the Jacobian penalty
        goes after the first); `logs` maps the names of `scalar_logs` to batch values."""
        raise NotImplementedError

    def scalar_logs(self, model):
        """Names of the loss terms `losses` logs (each a batch mean)."""
        return []

    def accuracy_logs(self, model):
        """Names of the accuracies `update_accuracies` logs."""
        return []

    def update_accuracies(self, model, trackers, labels, clean):
        """Updates the accuracy trackers from the clean outputs (training and evaluation); like Keras'
        compiled `metrics`, accuracies count every example whatever its sample weight."""
        return None  # nothing to log; a docstring-only body fails AutoGraph's conversion inside the step

    def test_loss(self, model, x, labels, outputs, sample_weight):
        """The evaluation loss (unscaled batch mean)."""
        return kernels.weighted_mean(kernels.cross_entropy(outputs, labels), sample_weight)

    def get_config(self):
        return {}

    @classmethod
    def from_config(cls, config):
        return cls(**config)


def _unscaled(value):
    """A loss Keras divided by the replica count (`Model.compute_loss`), as the per-replica mean."""
    replicas = tf.distribute.get_strategy().num_replicas_in_sync
    return value if replicas == 1 else value * replicas


@keras.saving.register_keras_serializable(package="tinyrobust")
class CrossEntropy(Objective):
    """The classification loss: the compiled loss (default sparse cross-entropy on logits) on the clean
    inputs, on the adversarial inputs for PGD-AT and FGSM-RS, and for TRADES on the clean inputs plus
    `beta * KL(clean || adversarial)` (logged as `robust_kl`)."""

    def _trades(self, model):
        return model.adversary is not None and model.adversary.method == "trades"

    def adversarial_examples(self, model, x, labels, context, perturb):
        if self._trades(model):
            clean = ops.stop_gradient(model(x, training=False))
            return perturb(lambda z: kernels.kl_divergence(clean, model(z, training=False)), start="small")
        return super().adversarial_examples(model, x, labels, context, perturb)

    def passes(self, model, adversarial):
        if not adversarial:
            return True, False
        return self._trades(model), True

    def scalar_logs(self, model):
        return ["ce", "robust_kl"] if self._trades(model) else ["ce"]

    def _ce(self, model, x, labels, logits, sample_weight, training):
        if model.loss is None:  # compiled without a loss: sparse cross-entropy on logits
            return kernels.weighted_mean(kernels.cross_entropy(logits, labels), sample_weight)
        return _unscaled(model.compute_loss(x=x, y=labels, y_pred=logits, sample_weight=sample_weight,
                                            training=training))

    def losses(self, model, step):
        trained, inputs = (step.clean, step.x) if step.clean is not None else (step.adv, step.x_adv)
        ce = self._ce(model, inputs, step.labels, trained, step.sample_weight, True)
        if step.clean is None or step.adv is None:
            return [ce], {"ce": ce}
        robust = kernels.weighted_mean(kernels.kl_divergence(step.clean, step.adv), step.sample_weight)
        return [ce, model.adversary.beta * robust], {"ce": ce, "robust_kl": robust}

    def test_loss(self, model, x, labels, outputs, sample_weight):
        return self._ce(model, x, labels, outputs, sample_weight, False)


@keras.saving.register_keras_serializable(package="tinyrobust")
class RobustModel(keras.Model):
    """A functional model trained by the one robust training step.

    Construct it like a functional model, `RobustModel(inputs, outputs,
    jacobian=..., adversary=..., objective=...)`, or wrap an existing one with
    `RobustModel.wrap(model, ...)`. The outputs must be logits. Compile with
    the classification loss (e.g. `SparseCategoricalCrossentropy(from_logits=True)`);
    distillation and NEO-KD need only an optimizer.

    Logged in training: `loss` (total), the objective's terms (`ce`,
    `robust_kl`, `distill`, `natural_kl`, `nkd`, `eokd`), `jacobian` and one
    `jacobian/<layer>` per regularised tensor, GradAlign's unweighted
    `grad_align` term (of the loss the objective's last attack call attacked), `adv_accuracy` on the training
    adversarial examples, and the compiled metrics on the clean inputs when the
    step has a clean pass (TRADES, distillation, NEO-KD, plain training) or
    `clean_metrics=True` (one extra inference pass for PGD-AT and FGSM-RS).

    Under a `tf.distribute` strategy each replica's loss is divided by the
    replica count, so the summed gradients are those of the global batch.

    Args:
        *args: functional model arguments (inputs, outputs).
        jacobian: a `JacobianRegularizer`, its config, or None.
        adversary: an `AdversarialTraining`, its config, or None.
        objective: an `Objective` (its config), or None for `CrossEntropy`.
        clean_metrics: run an extra inference pass on the clean inputs for
            the compiled metrics when the step has none.
        **kwargs: functional model keyword arguments (name, ...).

    Attributes:
        jacobian_scale: variable multiplying every Jacobian term
            (`tinyrobust.callbacks.JacobianWeightScheduler` sets it).
        epsilon_scale: variable multiplying the adversary's epsilon
            (`tinyrobust.callbacks.EpsilonScheduler` sets it).
    """

    def __init__(self, *args, jacobian=None, adversary=None, objective=None, clean_metrics=False, **kwargs):
        super().__init__(*args, **kwargs)
        self.jacobian_scale = self.add_weight(shape=(), initializer="ones", trainable=False, name="jacobian_scale")
        self.epsilon_scale = self.add_weight(shape=(), initializer="ones", trainable=False, name="epsilon_scale")
        self.configure(jacobian=jacobian, adversary=adversary, objective=objective, clean_metrics=clean_metrics)

    @classmethod
    def wrap(cls, model, jacobian=None, adversary=None, objective=None, clean_metrics=False, name=None):
        """A `RobustModel` sharing the layers (and weights) of a functional or Sequential model."""
        _check_wrappable(model)
        return cls(models.inputs_of(model), model.outputs, jacobian=jacobian, adversary=adversary,
                   objective=objective, clean_metrics=clean_metrics, name=name or f"robust_{model.name}")

    def configure(self, jacobian=None, adversary=None, objective=None, clean_metrics=False):
        """Sets the regularizer, the adversary and the objective; validates them against the model.

        Raises:
            ValueError: unknown layer names, a regularised layer whose output
                does not reach the logits, or an objective that does not fit
                the model.
        """
        self.jacobian = _deserialize(jacobian, JacobianRegularizer)
        self.adversary = _deserialize(adversary, AdversarialTraining)
        self.objective = CrossEntropy() if objective is None else _deserialize(objective, Objective)
        self.clean_metrics = check_bool("clean_metrics", clean_metrics)
        if len(self.outputs) != 1 and (self.jacobian is not None or isinstance(self.objective, CrossEntropy)):
            raise ValueError("A RobustModel with cross-entropy or Jacobian terms needs exactly one output (the "
                             f"logits); multi-exit models train with `multiexit.NEOKD`. Received: {len(self.outputs)} "
                             "outputs")
        self.objective.check(self)
        features = None
        if self.jacobian is not None:
            names = {layer.name for layer in self.layers}
            unknown = [n for n in self.jacobian.hidden_layers if n not in names]
            if unknown:
                raise ValueError(
                    f"Unknown layer names in the Jacobian regularizer: {unknown}. Layers are {sorted(names)}. "
                    f"Received: layers={self.jacobian.layers!r}"
                )
            hidden = [self.get_layer(n).output for n in self.jacobian.hidden_layers]
            # One forward pass gives the logits and every regularised activation.
            features = keras.Model(models.inputs_of(self), [self.outputs[0], *hidden], name=f"{self.name}_features")
        self._aux = Untracked(features=features, trackers=self._make_trackers())
        # Tracked, so that `tinyrobust.callbacks.SeedEachEpoch` finds them (their state is not saved); created
        # in the objective's order, which `SeedEachEpoch` numbers them by.
        seeds = {"projection": None if self.jacobian is None else self.jacobian.seed,
                 "attack": None if self.adversary is None else self.adversary.seed,
                 **{name: getattr(self.objective, "seed", None) for name in self.objective.seeds}}
        streams = tuple(self.objective.streams(self))
        needed = (["projection"] if self.jacobian is not None else []) + (["attack"] if self.adversary else [])
        missing = [name for name in (*needed, *self.objective.seeds) if name not in streams]
        if missing:
            raise ValueError(f"{type(self.objective).__name__}.streams() leaves out the random streams {missing} "
                             f"this model draws from. Received: streams={streams!r}")
        self._streams = {name: keras.random.SeedGenerator(seeds[name], name=f"{name}_seed") for name in streams}
        if self.jacobian is not None and self.jacobian.hidden_layers:
            self._check_layers_reach_logits()

    def compile(self, *args, **kwargs):
        """Keras' `compile`; metrics the training step cannot compute are named in a warning.

        A PGD-AT, FGSM-RS, N-FGSM or GradAlign step (and ARD with `alpha=1`)
        trains on adversarial inputs only: compiled metrics on clean inputs
        then need `clean_metrics=True` (one extra inference pass a step);
        without it they are computed by `evaluate` but not in `fit`'s logs.
        """
        super().compile(*args, **kwargs)
        metrics = kwargs.get("metrics", args[2] if len(args) > 2 else None)
        clean, _ = self.objective.passes(self, self.adversarial)
        if metrics and not clean and not self.clean_metrics:
            warnings.warn(f"{self.name}: its training step has no clean pass, so the metrics {metrics!r} are not "
                          "computed in training (evaluate() computes them); construct the model with "
                          "clean_metrics=True to log them on the clean inputs at one inference pass a step.",
                          stacklevel=2)

    def deployable(self):
        """The trained network that is evaluated, exported and deployed: this model (a distiller's student, a
        NEO-KD trainer's multi-exit network). A method, not a property: Keras' saving walks properties."""
        return self

    def compile_for_training(self, optimizer):
        """Compiles with the loss and metrics this model's training step computes: sparse cross-entropy on the
        logits, and accuracy where the step has a clean pass (`compile` warns about metrics it cannot log).

        Args:
            optimizer: a Keras optimizer.
        """
        clean = self.objective.passes(self, self.adversarial)[0] or self.clean_metrics
        self.compile(optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                     metrics=["accuracy"] if clean else None)

    def compile_from_config(self, config):
        """Compiles a loaded model with its saved compile settings (Keras skips a `compile` it did not write)."""
        self.compile(**keras.saving.deserialize_keras_object(config))
        if getattr(self, "optimizer", None) is not None and self.built:
            self.optimizer.build(self.trainable_variables)

    def random_stream(self, name):
        """The `keras.random.SeedGenerator` of the random stream `name` ("projection", "attack", or one of
        the objective's `seeds`)."""
        if name not in self._streams:
            raise ValueError(f"The model has the random streams {list(self._streams)}. Received: name={name!r}")
        return self._streams[name]

    @property
    def adversarial(self):
        """True when the training step crafts adversarial examples (an adversary with a positive epsilon)."""
        return self.adversary is not None and self.adversary.epsilon > 0

    def attack_epsilon(self):
        """The adversary's radius this epoch: its epsilon times `epsilon_scale`."""
        return self.adversary.epsilon * self.epsilon_scale

    def _make_trackers(self):
        names = ["loss", *self.objective.scalar_logs(self)]
        if self.jacobian is not None:
            names.append("jacobian")
            names += [f"jacobian/{n}" for n in self.jacobian.layers]
        trackers = {n: keras.metrics.Mean(name=n) for n in names}
        for name in self.objective.accuracy_logs(self):
            trackers[name] = keras.metrics.SparseCategoricalAccuracy(name=name)
        if self.adversary is not None and self.adversary.method == "grad_align":
            trackers["grad_align"] = keras.metrics.Mean(name="grad_align")
        if self.adversary is not None:
            trackers["adv_accuracy"] = keras.metrics.SparseCategoricalAccuracy(name="adv_accuracy")
        return trackers

    def _check_layers_reach_logits(self):
        shape = [1 if d is None else d for d in self.inputs[0].shape]
        x = tf.zeros(shape, self.inputs[0].dtype)
        with tf.GradientTape() as tape:
            outputs = self._aux.features(x, training=False)
        gradients = tape.gradient(outputs[0], outputs[1:], unconnected_gradients="none")
        for name, gradient in zip(self.jacobian.hidden_layers, gradients):
            if gradient is None:
                raise ValueError(f"The output of layer {name!r} does not reach the logits. Received: layers={self.jacobian.layers!r}")

    @property
    def metrics(self):
        # This step logs its own total `loss`; Keras' loss tracker (also named "loss") is left out.
        compiled = [m for m in super().metrics if m.name != "loss"]
        return [self._aux.trackers["loss"], *compiled, *list(self._aux.trackers.values())[1:]]

    def get_metrics_result(self):
        """The results of `self.metrics`, leaving out compiled metrics that no step has updated since their
        reset (a PGD-AT or FGSM-RS step has no clean outputs to update them with, unless `clean_metrics`), so
        that the epoch's logs have the step's keys and Keras reads them aggregated over replicas."""
        results = {}
        own = list(self._aux.trackers.values())
        for metric in self.metrics:
            if not any(metric is m for m in own) and not _updated(metric):
                continue
            result = metric.result()
            results.update(result if isinstance(result, dict) else {metric.name: result})
        return results

    # -- training -----------------------------------------------------------------------------

    def forward_with_jacobian(self, x, sample_weight=None):
        """One training forward pass.

        Args:
            x: a batch of inputs.
            sample_weight: per-example weights of the Jacobian terms, or None.

        Returns:
            `(logits, terms)`: `terms` maps each regularised tensor ("input" or a
            layer name) to its unweighted per-batch Jacobian term; empty without
            a regularizer.
        """
        if self.jacobian is None:
            return self(x, training=True), {}
        fraction = self.jacobian.batch_fraction
        subset, sub_weight = x, sample_weight
        if fraction < 1:  # the terms on a uniform subset of the batch, the logits on all of it
            batch = ops.shape(x)[0]
            size = ops.maximum(1, ops.cast(ops.ceil(fraction * ops.cast(batch, "float32")), "int32"))
            chosen = keras.random.shuffle(ops.arange(batch), seed=self.random_stream("projection"))[:size]
            subset = ops.take(x, chosen, axis=0)
            sub_weight = None if sample_weight is None else ops.take(ops.reshape(sample_weight, (-1,)), chosen, axis=0)
        projections = self.jacobian.num_projections
        with tf.GradientTape(persistent=projections is None or projections > 1) as tape:
            tape.watch(subset)
            outputs = self._aux.features(subset, training=True)
            logits, *hidden = outputs if isinstance(outputs, (list, tuple)) else [outputs]
        names = list(self.jacobian.layers)
        sources = [subset if n == INPUT else hidden[self.jacobian.hidden_layers.index(n)] for n in names]
        norms = jacobian_norms(tape, logits, sources, projections, seed=self.random_stream("projection"),
                               sample_weight=sub_weight)
        if fraction < 1:
            logits = self(x, training=True)
        return logits, dict(zip(names, norms))

    def jacobian_penalty(self, terms):
        """The weighted Jacobian loss `sum_l 0.5 * w_l * term_l`, times `jacobian_scale`."""
        return sum(0.5 * self.jacobian.layers[n] * t for n, t in terms.items()) * self.jacobian_scale

    def adversarial_examples(self, x, y):
        """The training adversary's examples for a batch (labels or the objective's targets), or None when
        the model has no adversary or a zero epsilon."""
        x = ops.convert_to_tensor(x)
        labels, context = self.objective.targets(self, x, y)
        return self._adversarial_examples(x, labels, context)

    def _adversarial_examples(self, x, labels, context, attacked=None):
        if not self.adversarial:
            return None
        epsilon, seed = self.attack_epsilon(), self.random_stream("attack")

        def perturb(loss_fn, start="uniform"):
            if attacked is not None:  # GradAlign's term aligns the gradients of the loss the adversary attacked
                attacked["loss_fn"] = loss_fn
            return self.adversary.perturb(loss_fn, x, seed, epsilon=epsilon, start=start)

        return self.objective.adversarial_examples(self, x, labels, context, perturb)

    def train_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        x, sample_weight = ops.convert_to_tensor(x), _per_example(sample_weight)
        labels, context = self.objective.targets(self, x, y)
        attacked = {}
        x_adv = self._adversarial_examples(x, labels, context, attacked)
        use_clean, use_adv = self.objective.passes(self, x_adv is not None)
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        step = Step(x, labels, context, sample_weight, x_adv)
        with tf.GradientTape() as tape:
            # The Jacobian terms ride on the first pass.
            logits, terms = self.forward_with_jacobian(x if use_clean else x_adv, sample_weight)
            step.clean = logits if use_clean else None
            if use_adv:
                step.adv = self(x_adv, training=True) if use_clean else logits
            parts, logs = self.objective.losses(self, step)
            loss = parts[0]
            if terms:
                jacobian = self.jacobian_penalty(terms)
                loss = loss + jacobian
            for part in parts[1:]:
                loss = loss + part
            if x_adv is not None and self.adversary.method == "grad_align":
                logs = {**logs, "grad_align": self.adversary.alignment_penalty(
                    attacked["loss_fn"], x, self.random_stream("attack"), self.attack_epsilon(), sample_weight)}
                loss = loss + self.adversary.align_weight * logs["grad_align"]
            # Each replica's mean over its share of the batch, divided by the replica count: the summed
            # gradients are those of the global-batch mean.
            scaled = loss if replicas == 1 else loss / replicas
            scaled = self.optimizer.scale_loss(scaled) if self.optimizer is not None else scaled
        gradients = tape.gradient(scaled, self.trainable_weights)
        self.optimizer.apply_gradients(zip(gradients, self.trainable_weights))
        return self._log(step, loss, logs, terms, jacobian if terms else None)

    def _log(self, step, loss, logs, terms, jacobian):
        trackers = self._aux.trackers
        batch = ops.shape(step.x)[0]
        trackers["loss"].update_state(loss, sample_weight=batch)
        for name, value in logs.items():
            trackers[name].update_state(value, sample_weight=batch)
        if terms:
            trackers["jacobian"].update_state(jacobian, sample_weight=batch)
            for name, value in terms.items():
                trackers[f"jacobian/{name}"].update_state(value, sample_weight=batch)
        if step.x_adv is not None:
            adv = step.adv if step.adv is not None else self(step.x_adv, training=False)
            trackers["adv_accuracy"].update_state(step.labels, _last(adv))
        clean = step.clean
        if clean is None and self.clean_metrics:
            clean = self(step.x, training=False)
        if clean is None:  # no clean outputs: neither the compiled metrics nor the clean accuracies are logged
            accuracies = self.objective.accuracy_logs(self)
            return {name: tracker.result() for name, tracker in trackers.items() if name not in accuracies}
        self.objective.update_accuracies(self, trackers, step.labels, clean)
        return self.compute_metrics(step.x, step.labels, clean, sample_weight=step.sample_weight)

    def test_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        sample_weight = _per_example(sample_weight)
        labels, _ = self.objective.targets(self, x, y, training=False)
        outputs = self(x, training=False)
        trackers = self._aux.trackers
        loss = self.objective.test_loss(self, x, labels, outputs, sample_weight)
        trackers["loss"].update_state(loss, sample_weight=ops.shape(x)[0])
        self.objective.update_accuracies(self, trackers, labels, outputs)
        logs = self.compute_metrics(x, labels, outputs, sample_weight=sample_weight)
        evaluated = {"loss", *self.objective.accuracy_logs(self)}
        return {k: v for k, v in logs.items() if k in evaluated or k not in trackers}

    # -- serialization ------------------------------------------------------------------------

    def get_config(self):
        # The graph of a plain functional model on the same layers: subclasses with their own constructor
        # (distill.RobustDistiller, multiexit.NEOKD) save as the RobustModel they train.
        config = keras.Model(models.inputs_of(self), self.outputs, name=self.name).get_config()
        config["trainable"] = self.trainable
        config["jacobian"] = None if self.jacobian is None else keras.saving.serialize_keras_object(self.jacobian)
        config["adversary"] = None if self.adversary is None else keras.saving.serialize_keras_object(self.adversary)
        config["objective"] = (None if isinstance(self.objective, CrossEntropy)
                               else keras.saving.serialize_keras_object(self.objective))
        config["clean_metrics"] = self.clean_metrics
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        settings = {key: config.pop(key, None) for key in ("jacobian", "adversary", "objective")}
        clean_metrics = bool(config.pop("clean_metrics", False))
        model = super().from_config(config, custom_objects=custom_objects)
        model.configure(clean_metrics=clean_metrics, **settings)
        return model


def _updated(metric):
    """False for a metric never built, or (read eagerly, after the steps) with an all-zero state."""
    if not getattr(metric, "built", True):
        return False
    if not tf.executing_eagerly():
        return True
    return any(bool(ops.any(ops.not_equal(v, 0))) for v in metric.variables)


def _per_example(sample_weight):
    """One weight per example: Keras repeats `fit(..., sample_weight=w)` for every entry of dict targets."""
    while isinstance(sample_weight, (dict, list, tuple)):
        sample_weight = next(iter(sample_weight.values())) if isinstance(sample_weight, dict) else sample_weight[0]
    return sample_weight


def _last(outputs):
    """The last (backbone) logits of a multi-exit model, or the logits."""
    return outputs[-1] if isinstance(outputs, (list, tuple)) else outputs


def compile_for_training(model, optimizer):
    """Compiles any model the training engine fits with the loss and metrics its training step computes.

    A `RobustModel` (and so a `RobustDistiller` or `multiexit.NEOKD`) compiles
    itself (`RobustModel.compile_for_training`); a plain Keras model gets sparse
    cross-entropy on its logits and accuracy, averaged over the outputs of a
    multi-exit model.

    Args:
        model: a Keras model with logits output(s).
        optimizer: a Keras optimizer.
    """
    if isinstance(model, RobustModel):
        return model.compile_for_training(optimizer)
    exits = len(model.outputs)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    if exits == 1:
        return model.compile(optimizer=optimizer, loss=loss, metrics=["accuracy"])
    return model.compile(optimizer=optimizer, loss=[loss] * exits, loss_weights=[1 / exits] * exits,
                         metrics=[["accuracy"]] * exits)


def _check_wrappable(model):
    if not getattr(model, "inputs", None) or not getattr(model, "outputs", None):
        raise ValueError(
            "Expected a built functional or Sequential model with inputs and outputs. "
            f"Received: model={getattr(model, 'name', model)!r}"
        )
