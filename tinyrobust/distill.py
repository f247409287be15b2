"""Robust knowledge distillation: a frozen teacher trains a compact student.

`RobustDistiller` is a `keras.Model` driven by `compile(optimizer=...)` and
`fit`; the loss comes from the method:

- "kd" (Hinton et al. 2015): `alpha * T^2 * KL(t(x)/T || s(x)/T) + (1 - alpha) * CE(s(x), y)`.
- "ard" (Goldblum et al. 2020): `alpha * T^2 * KL(t(x)/T || s(x_adv)/T) + (1 - alpha) * CE(s(x), y)`,
  `x_adv` from PGD on the student's cross-entropy.
- "rslad" (Zi et al. 2021): `alpha * KL(t(x)/T || s(x_adv)/T) + (1 - alpha) * KL(t(x)/T || s(x)/T)`,
  `x_adv` maximising the KL between the student's output and the teacher's
  clean soft labels.

`KL(p || q)` is summed over classes and averaged over the batch; `t` and `s`
are the teacher's and student's logits. If the student is a
`tinyrobust.training.RobustModel` with a Jacobian regularizer, its (per-layer)
Jacobian penalty is added, so STQ students with per-layer JR distil as they
train.
"""

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from tinyrobust.attacks import kernels
from tinyrobust.training import RobustModel, input_adversary
from tinyrobust.validation import check_choice, check_number

__all__ = ["METHODS", "RobustDistiller", "distillation_loss", "with_teacher_logits"]

METHODS = ("kd", "ard", "rslad")
# (temperature, alpha) of each paper: Hinton's common choice, ARD's released code, RSLAD's 5/6 and 1/6.
DEFAULTS = {"kd": (4.0, 0.9), "ard": (30.0, 1.0), "rslad": (1.0, 5.0 / 6.0)}
TEACHER_LOGITS = "teacher_logits"


def soft_kl(teacher_logits, student_logits, temperature=1.0):
    """Per-example `KL(softmax(t / T) || softmax(s / T))`."""
    return kernels.kl_divergence(teacher_logits / temperature, student_logits / temperature)


def distillation_loss(method, y, teacher_logits, student_logits, student_adv_logits=None, temperature=None,
                      alpha=None):
    """The distillation objective of `method` on one batch.

    Args:
        method: "kd", "ard" or "rslad".
        y: integer labels.
        teacher_logits: the teacher's logits on the clean inputs.
        student_logits: the student's logits on the clean inputs.
        student_adv_logits: the student's logits on the adversarial inputs
            (ARD, RSLAD).
        temperature: softmax temperature (default per method).
        alpha: weight of the distillation term (default per method).

    Returns:
        `(loss, distill, natural)`: the total and its two unweighted batch-mean
        terms (the distillation KL, times T^2 for KD and ARD; the natural CE,
        or for RSLAD the natural KL).
    """
    method = check_choice("method", method, METHODS)
    temperature = DEFAULTS[method][0] if temperature is None else temperature
    alpha = DEFAULTS[method][1] if alpha is None else alpha
    if method != "kd" and student_adv_logits is None:
        raise ValueError(f"method={method!r} needs the student's adversarial logits. Received: student_adv_logits=None")
    target = student_logits if method == "kd" else student_adv_logits
    distill = ops.mean(soft_kl(teacher_logits, target, temperature))
    if method == "rslad":
        natural = ops.mean(soft_kl(teacher_logits, student_logits, temperature))
    else:
        distill = distill * temperature ** 2
        natural = ops.mean(kernels.cross_entropy(student_logits, y))
    return alpha * distill + (1.0 - alpha) * natural, distill, natural


def with_teacher_logits(teacher, x, y, batch_size=256):
    """Computes the teacher's logits once, for training without augmentation.

    Args:
        teacher: the frozen teacher.
        x: training inputs.
        y: integer labels.
        batch_size: prediction batch size.

    Returns:
        `(x, targets)` to pass to `RobustDistiller.fit`: `targets` is a dict
        with the labels and the teacher's logits, so the teacher does not run
        again in any epoch.
    """
    logits = teacher.predict(np.asarray(x), batch_size=batch_size, verbose=0)
    return x, {"labels": np.asarray(y), TEACHER_LOGITS: logits.astype("float32")}


@keras.saving.register_keras_serializable(package="tinyrobust")
class RobustDistiller(keras.Model):
    """Trains `student` from a frozen `teacher` with KD, ARD or RSLAD.

    `compile(optimizer=...)` is enough; `fit(x, y)`, `fit(dataset)` and
    `fit(*with_teacher_logits(teacher, x, y))` all work. Logged: `loss`,
    `distill`, `ce` (KD, ARD) or `natural_kl` (RSLAD), `accuracy` of the
    student on clean inputs and, for ARD and RSLAD, `adv_accuracy` on its
    training adversarial examples. Calling the distiller runs the student.

    Args:
        student: the model to train (logits out); a `RobustModel` adds its
            Jacobian penalty.
        teacher: a trained model (logits out); frozen.
        method: "kd", "ard" or "rslad".
        temperature: softmax temperature; default 4 (KD), 30 (ARD), 1 (RSLAD).
        alpha: weight of the distillation term; default 0.9 (KD), 1.0 (ARD),
            5/6 (RSLAD).
        adversary: `AdversarialTraining` (method "pgd", or "fgsm_rs" for the
            single-step variant) or its config; default PGD-10 at 8/255 on
            [0, 1] inputs. Must be None for KD.
        name: model name.
    """

    def __init__(self, student, teacher, method="ard", temperature=None, alpha=None, adversary=None, name=None,
                 **kwargs):
        super().__init__(name=name or f"distill_{method}", **kwargs)
        self.method = check_choice("method", method, METHODS)
        default_temperature, default_alpha = DEFAULTS[self.method]
        self.temperature = float(check_number("temperature", default_temperature if temperature is None else temperature,
                                              low=0, low_open=True))
        self.alpha = float(check_number("alpha", default_alpha if alpha is None else alpha, low=0, high=1))
        if self.method == "kd" and adversary is not None:
            raise ValueError(f"method='kd' distils on clean inputs only. Received: adversary={adversary!r}")
        if self.method != "kd":
            adversary = input_adversary(adversary)
        for role, model in (("student", student), ("teacher", teacher)):
            if not isinstance(model, keras.Model):
                raise ValueError(f"Expected `{role}` to be a Keras model. Received: {role}={model!r}")
        if student is teacher:
            raise ValueError("The student and the teacher must be different models. Received: student is teacher")
        self.student, self.teacher, self.adversary = student, teacher, adversary
        self.teacher.trainable = False
        self.built = student.built
        seed = None if adversary is None else adversary.seed
        self._attack_seed = keras.random.SeedGenerator(seed)
        self._natural = "natural_kl" if self.method == "rslad" else "ce"
        self._trackers = {"loss": keras.metrics.Mean(name="loss"), "distill": keras.metrics.Mean(name="distill"),
                          self._natural: keras.metrics.Mean(name=self._natural),
                          "accuracy": keras.metrics.SparseCategoricalAccuracy(name="accuracy")}
        if adversary is not None:
            self._trackers["adv_accuracy"] = keras.metrics.SparseCategoricalAccuracy(name="adv_accuracy")

    def call(self, inputs, training=False):
        return self.student(inputs, training=training)

    @property
    def metrics(self):
        return list(self._trackers.values())

    def _adversarial_examples(self, x, y, teacher_logits):
        if self.method == "rslad":
            loss_fn = lambda z: soft_kl(teacher_logits, self.student(z, training=False), self.temperature)  # noqa: E731
            return self.adversary.perturb(loss_fn, x, self._attack_seed, start="small")
        loss_fn = lambda z: kernels.cross_entropy(self.student(z, training=False), y)  # noqa: E731
        return self.adversary.perturb(loss_fn, x, self._attack_seed)

    def _student_forward(self, x):
        if isinstance(self.student, RobustModel) and self.student.jacobian is not None:
            logits, terms = self.student.forward_with_jacobian(x)
            return logits, self.student.jacobian_penalty(terms)
        return self.student(x, training=True), 0.0

    def train_step(self, data):
        x, targets, _ = keras.utils.unpack_x_y_sample_weight(data)
        x = ops.convert_to_tensor(x)
        if isinstance(targets, dict):
            y, teacher_logits = targets["labels"], ops.convert_to_tensor(targets[TEACHER_LOGITS])
        else:
            y, teacher_logits = targets, self.teacher(x, training=False)
        teacher_logits = ops.stop_gradient(teacher_logits)
        x_adv = None if self.adversary is None else self._adversarial_examples(x, y, teacher_logits)
        with tf.GradientTape() as tape:
            logits, penalty = self._student_forward(x)
            adv_logits = None if x_adv is None else self.student(x_adv, training=True)
            loss, distill, natural = distillation_loss(self.method, y, teacher_logits, logits, adv_logits,
                                                       self.temperature, self.alpha)
            loss = loss + penalty
            scaled = self.optimizer.scale_loss(loss)
        weights = self.student.trainable_weights
        self.optimizer.apply_gradients(zip(tape.gradient(scaled, weights), weights))
        self._trackers["loss"].update_state(loss)
        self._trackers["distill"].update_state(distill)
        self._trackers[self._natural].update_state(natural)
        self._trackers["accuracy"].update_state(y, logits)
        if adv_logits is not None:
            self._trackers["adv_accuracy"].update_state(y, adv_logits)
        return {m.name: m.result() for m in self.metrics}

    def test_step(self, data):
        x, targets, _ = keras.utils.unpack_x_y_sample_weight(data)
        y = targets["labels"] if isinstance(targets, dict) else targets
        logits = self.student(x, training=False)
        self._trackers["loss"].update_state(ops.mean(kernels.cross_entropy(logits, y)))
        self._trackers["accuracy"].update_state(y, logits)
        return {"loss": self._trackers["loss"].result(), "accuracy": self._trackers["accuracy"].result()}

    def get_config(self):
        return {
            "name": self.name,
            "student": keras.saving.serialize_keras_object(self.student),
            "teacher": keras.saving.serialize_keras_object(self.teacher),
            "method": self.method, "temperature": self.temperature, "alpha": self.alpha,
            "adversary": None if self.adversary is None else self.adversary.get_config(),
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        for role in ("student", "teacher"):
            config[role] = keras.saving.deserialize_keras_object(config[role], custom_objects=custom_objects)
        return cls(**config)
