"""The robust training step: cross-entropy + Jacobian terms + adversarial training.

`RobustModel` is a functional `keras.Model` whose `train_step` perturbs the
inputs (PGD-AT, TRADES or FGSM with random start) and adds (per-layer)
Jacobian regularization to the compiled loss. Users drive it with
`compile` / `fit` and callbacks as any Keras model.
"""

import keras
import tensorflow as tf
from keras import ops

from tinyrobust import models
from tinyrobust.attacks import kernels
from tinyrobust.jacobian import INPUT, JacobianRegularizer, jacobian_norms
from tinyrobust.validation import check_choice, check_number, check_range

__all__ = ["AdversarialTraining", "RobustModel"]

METHODS = ("pgd", "trades", "fgsm_rs")


@keras.saving.register_keras_serializable(package="tinyrobust")
class AdversarialTraining:
    """Configuration of adversarial training.

    Methods:
    - "pgd": PGD-AT (Madry et al.): train on PGD examples with random start.
    - "trades": TRADES (Zhang et al.): CE on clean inputs + `beta` * KL between
      clean and adversarial predictions, the adversary maximising that KL.
    - "fgsm_rs": FGSM from a uniform random start with step `1.25 * eps`
      ("fast is better than free", Wong et al.).

    Args:
        method: one of "pgd", "trades", "fgsm_rs".
        epsilon: radius of the threat model (in input units).
        steps: attack steps (PGD, TRADES); FGSM-RS always takes one.
        step_size: step size; default `2.5 * epsilon / steps` (1.25 eps for FGSM-RS).
        norm: "linf" or "l2".
        beta: TRADES' weight of the robustness term.
        input_range: valid (low, high) of the inputs.
        seed: seed of the random starts.
    """

    def __init__(self, method="pgd", epsilon=8 / 255, steps=10, step_size=None, norm="linf", beta=6.0,
                 input_range=(0.0, 1.0), seed=None):
        self.method = check_choice("method", method, METHODS)
        self.norm = check_choice("norm", norm, kernels.NORMS)
        self.steps = check_number("steps", steps, low=1, integer=True)
        self.seed = seed
        self.epsilon = float(check_number("epsilon", epsilon, low=0))
        self.step_size = None if step_size is None else float(check_number("step_size", step_size, low=0, low_open=True))
        self.beta = float(check_number("beta", beta, low=0))
        self.input_range = check_range(input_range)

    def step_size_for(self, epsilon):
        """The step size used at radius `epsilon` (a tensor when scheduled)."""
        if self.step_size is not None:
            return self.step_size
        if self.method == "fgsm_rs":
            return 1.25 * epsilon
        return 2.5 * epsilon / self.steps

    def perturb(self, loss_fn, x, seed, epsilon=None, start="uniform"):
        """Adversarial inputs maximising `loss_fn` within this threat model.

        Args:
            loss_fn: maps a batch of inputs to per-example losses.
            x: clean inputs.
            seed: `keras.random.SeedGenerator` of the random start.
            epsilon: radius (a tensor when scheduled); default `self.epsilon`.
            start: "uniform" (uniform in the ball), "small" (N(0, 0.001^2),
                as TRADES and RSLAD start), or a given initial perturbation.

        Returns:
            Adversarial inputs, without gradient.
        """
        eps = ops.cast(self.epsilon if epsilon is None else epsilon, x.dtype)
        steps = 1 if self.method == "fgsm_rs" else self.steps
        if not isinstance(start, str):
            delta = start
        elif start == "small":
            delta = 0.001 * keras.random.normal(ops.shape(x), dtype=x.dtype, seed=seed)
        else:
            delta = kernels.random_start(x, eps, self.norm, seed=seed)
        return kernels.pgd(loss_fn, x, eps, self.step_size_for(eps), steps, self.norm, delta, self.input_range)

    def get_config(self):
        return {"method": self.method, "epsilon": self.epsilon, "steps": self.steps, "step_size": self.step_size,
                "norm": self.norm, "beta": self.beta, "input_range": list(self.input_range), "seed": self.seed}

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def __repr__(self):
        return f"AdversarialTraining(method={self.method!r}, epsilon={self.epsilon:.4g}, steps={self.steps})"


def input_adversary(adversary):
    """The adversary of a training mode that attacks one loss (distillation, NEO-KD).

    Args:
        adversary: an `AdversarialTraining` with method "pgd" or "fgsm_rs", its
            config, or None for PGD-10 at 8/255 on [0, 1] inputs.

    Returns:
        An `AdversarialTraining`.
    """
    adversary = AdversarialTraining("pgd", epsilon=8 / 255, steps=10) if adversary is None else adversary
    if isinstance(adversary, dict):
        adversary = AdversarialTraining.from_config(adversary)
    if not isinstance(adversary, AdversarialTraining) or adversary.method not in ("pgd", "fgsm_rs"):
        raise ValueError(f"Expected an AdversarialTraining with method 'pgd' or 'fgsm_rs'. Received: adversary={adversary!r}")
    return adversary


def _deserialize(value, cls):
    if value is None or isinstance(value, cls):
        return value
    if isinstance(value, dict):
        return keras.saving.deserialize_keras_object(value) if "class_name" in value else cls(**value)
    raise ValueError(f"Expected a {cls.__name__}, its config or None. Received: {value!r}")


class _Untracked:
    """Holds objects that Keras must not track (and save) as part of the model."""

    def __init__(self, **items):
        self.__dict__.update(items)


@keras.saving.register_keras_serializable(package="tinyrobust")
class RobustModel(keras.Model):
    """A functional model trained with Jacobian regularization and/or adversarial training.

    Construct it like a functional model, `RobustModel(inputs, outputs,
    jacobian=..., adversary=...)`, or wrap an existing one with
    `RobustModel.wrap(model, ...)`. The outputs must be logits. Compile with
    the classification loss (e.g. `SparseCategoricalCrossentropy(from_logits=True)`).

    Logged in training: `loss` (total), `ce`, `jacobian` and one
    `jacobian/<layer>` per regularised tensor, the compiled metrics on clean
    inputs, and `adv_accuracy` on the training adversarial examples.

    Args:
        *args: functional model arguments (inputs, outputs).
        jacobian: a `JacobianRegularizer`, its config, or None.
        adversary: an `AdversarialTraining`, its config, or None.
        **kwargs: functional model keyword arguments (name, ...).

    Attributes:
        jacobian_scale: variable multiplying every Jacobian term
            (`tinyrobust.callbacks.JacobianWeightScheduler` sets it).
        epsilon_scale: variable multiplying the adversary's epsilon
            (`tinyrobust.callbacks.EpsilonScheduler` sets it).
    """

    def __init__(self, *args, jacobian=None, adversary=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.jacobian_scale = self.add_weight(shape=(), initializer="ones", trainable=False, name="jacobian_scale")
        self.epsilon_scale = self.add_weight(shape=(), initializer="ones", trainable=False, name="epsilon_scale")
        self.configure(jacobian=jacobian, adversary=adversary)

    @classmethod
    def wrap(cls, model, jacobian=None, adversary=None, name=None):
        """A `RobustModel` sharing the layers (and weights) of a functional or Sequential model."""
        if not getattr(model, "inputs", None) or not getattr(model, "outputs", None):
            raise ValueError(
                "Expected a built functional or Sequential model with inputs and outputs. "
                f"Received: model={getattr(model, 'name', model)!r}"
            )
        return cls(models.inputs_of(model), model.outputs, jacobian=jacobian, adversary=adversary,
                   name=name or f"robust_{model.name}")

    def configure(self, jacobian=None, adversary=None):
        """Sets the regularizer and the adversary; validates them against the model.

        Raises:
            ValueError: unknown layer names, or a regularised layer whose output
                does not reach the logits.
        """
        self.jacobian = _deserialize(jacobian, JacobianRegularizer)
        self.adversary = _deserialize(adversary, AdversarialTraining)
        if len(self.outputs) != 1:
            raise ValueError(f"RobustModel needs exactly one output (the logits). Received: {len(self.outputs)} outputs")
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
        seed = None if self.jacobian is None else self.jacobian.seed
        attack_seed = None if self.adversary is None else self.adversary.seed
        self._aux = _Untracked(features=features, trackers=self._make_trackers())
        # Tracked, so that `tinyrobust.callbacks.SeedEachEpoch` finds them (their state is not saved).
        self._projection_seed = keras.random.SeedGenerator(seed, name="projection_seed")
        self._attack_seed = keras.random.SeedGenerator(attack_seed, name="attack_seed")
        if self.jacobian is not None and self.jacobian.hidden_layers:
            self._check_layers_reach_logits()

    def _make_trackers(self):
        names = ["ce"]
        if self.jacobian is not None:
            names.append("jacobian")
            names += [f"jacobian/{n}" for n in self.jacobian.layers]
        trackers = {n: keras.metrics.Mean(name=n) for n in names}
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
        return super().metrics + list(self._aux.trackers.values())

    # -- training -----------------------------------------------------------------------------

    def _replicas(self):
        return tf.distribute.get_strategy().num_replicas_in_sync

    def _adversarial_examples(self, x, y):
        adversary = self.adversary
        eps = adversary.epsilon * self.epsilon_scale
        seed = self._attack_seed
        if adversary.method == "trades":
            clean = ops.stop_gradient(self(x, training=False))
            loss_fn = lambda z: kernels.kl_divergence(clean, self(z, training=False))  # noqa: E731
            return adversary.perturb(loss_fn, x, seed, epsilon=eps, start="small")
        return adversary.perturb(lambda z: kernels.cross_entropy(self(z, training=False), y), x, seed, epsilon=eps)

    def forward_with_jacobian(self, x):
        """One training forward pass.

        Args:
            x: a batch of inputs.

        Returns:
            `(logits, terms)`: `terms` maps each regularised tensor ("input" or a
            layer name) to its unweighted per-batch Jacobian term; empty without
            a regularizer.
        """
        if self.jacobian is None:
            return self(x, training=True), {}
        projections = self.jacobian.num_projections
        with tf.GradientTape(persistent=projections is None or projections > 1) as tape:
            tape.watch(x)
            outputs = self._aux.features(x, training=True)
            logits, *hidden = outputs if isinstance(outputs, (list, tuple)) else [outputs]
        names = list(self.jacobian.layers)
        sources = [x if n == INPUT else hidden[self.jacobian.hidden_layers.index(n)] for n in names]
        norms = jacobian_norms(tape, logits, sources, projections, seed=self._projection_seed)
        return logits, dict(zip(names, norms))

    def jacobian_penalty(self, terms):
        """The weighted Jacobian loss `sum_l 0.5 * w_l * term_l`, times `jacobian_scale`."""
        return sum(0.5 * self.jacobian.layers[n] * t for n, t in terms.items()) * self.jacobian_scale

    def train_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        x = ops.convert_to_tensor(x)
        x_adv = None
        if self.adversary is not None and self.adversary.epsilon > 0:
            x_adv = self._adversarial_examples(x, y)
        trades = self.adversary is not None and self.adversary.method == "trades"
        x_train = x if x_adv is None or trades else x_adv

        with tf.GradientTape() as tape:
            logits, terms = self.forward_with_jacobian(x_train)
            ce = self._compute_loss(x=x_train, y=y, y_pred=logits, sample_weight=sample_weight, training=True)
            loss = ce
            if terms:
                jacobian = self.jacobian_penalty(terms)
                # Like the compiled loss, the per-replica mean is divided by the replica count,
                # so that summing gradients over replicas gives the global-batch mean.
                loss = loss + jacobian / self._replicas()
            if trades and x_adv is not None:
                adv_logits = self(x_adv, training=True)
                robust = ops.mean(kernels.kl_divergence(logits, adv_logits))
                loss = loss + self.adversary.beta * robust / self._replicas()
            scaled = self.optimizer.scale_loss(loss) if self.optimizer is not None else loss
        gradients = tape.gradient(scaled, self.trainable_weights)
        self.optimizer.apply_gradients(zip(gradients, self.trainable_weights))

        batch = ops.shape(x)[0]
        replicas = self._replicas()
        self._loss_tracker.update_state(loss * replicas, sample_weight=batch)
        trackers = self._aux.trackers
        trackers["ce"].update_state(ce * replicas, sample_weight=batch)
        if terms:
            trackers["jacobian"].update_state(jacobian, sample_weight=batch)
            for name, value in terms.items():
                trackers[f"jacobian/{name}"].update_state(value, sample_weight=batch)
        if x_adv is not None:
            adv_logits = adv_logits if trades else logits
            trackers["adv_accuracy"].update_state(y, adv_logits, sample_weight=sample_weight)
            clean_logits = logits if trades else self(x, training=False)
        else:
            clean_logits = logits
        return self.compute_metrics(x, y, clean_logits, sample_weight=sample_weight)

    # -- serialization ------------------------------------------------------------------------

    def get_config(self):
        config = super().get_config()
        config["jacobian"] = None if self.jacobian is None else keras.saving.serialize_keras_object(self.jacobian)
        config["adversary"] = None if self.adversary is None else keras.saving.serialize_keras_object(self.adversary)
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        jacobian, adversary = config.pop("jacobian", None), config.pop("adversary", None)
        model = super().from_config(config, custom_objects=custom_objects)
        model.configure(jacobian=jacobian, adversary=adversary)
        return model
