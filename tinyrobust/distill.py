"""Robust knowledge distillation: a frozen teacher trains a compact student.

`RobustDistiller` is the `tinyrobust.RobustModel` on the student's layers with a
`Distillation` objective, driven by `compile(optimizer=...)` and `fit`; the loss
comes from the method:

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
from keras import ops

from tinyrobust import models
from tinyrobust.attacks import kernels
from tinyrobust.training import Objective, RobustModel, Untracked, input_adversary
from tinyrobust.validation import check_choice, check_number

__all__ = ["METHODS", "Distillation", "RobustDistiller", "distillation_loss", "with_teacher_logits"]

METHODS = ("kd", "ard", "rslad")
# (temperature, alpha) of each paper: Hinton's common choice, ARD's released code, RSLAD's 5/6 and 1/6.
DEFAULTS = {"kd": (4.0, 0.9), "ard": (30.0, 1.0), "rslad": (1.0, 5.0 / 6.0)}
TEACHER_LOGITS = "teacher_logits"


def soft_kl(teacher_logits, student_logits, temperature=1.0):
    """Per-example `KL(softmax(t / T) || softmax(s / T))`."""
    return kernels.kl_divergence(teacher_logits / temperature, student_logits / temperature)


def distillation_loss(method, y, teacher_logits, student_logits, student_adv_logits=None, temperature=None,
                      alpha=None, sample_weight=None):
    """The distillation objective of `method` on one batch.

    Args:
        method: "kd", "ard" or "rslad".
        y: integer labels.
        teacher_logits: the teacher's logits on the clean inputs.
        student_logits: the student's logits on the clean inputs; may be None
            for ARD and RSLAD with `alpha=1` (no natural term).
        student_adv_logits: the student's logits on the adversarial inputs
            (ARD, RSLAD).
        temperature: softmax temperature (default per method).
        alpha: weight of the distillation term (default per method).
        sample_weight: per-example weights, or None.

    Returns:
        `(loss, distill, natural)`: the total and its two unweighted batch-mean
        terms (the distillation KL, times T^2 for KD and ARD; the natural CE,
        or for RSLAD the natural KL; None without clean logits).
    """
    method = check_choice("method", method, METHODS)
    temperature = DEFAULTS[method][0] if temperature is None else temperature
    alpha = DEFAULTS[method][1] if alpha is None else alpha
    if method != "kd" and student_adv_logits is None:
        raise ValueError(f"method={method!r} needs the student's adversarial logits. Received: student_adv_logits=None")
    if student_logits is None and (method == "kd" or alpha < 1):
        raise ValueError(f"method={method!r} with alpha={alpha} needs the student's clean logits. "
                         "Received: student_logits=None")
    target = student_logits if method == "kd" else student_adv_logits
    distill = kernels.weighted_mean(soft_kl(teacher_logits, target, temperature), sample_weight)
    if method != "rslad":
        distill = distill * temperature ** 2
    if student_logits is None:
        return alpha * distill, distill, None
    if method == "rslad":
        natural = kernels.weighted_mean(soft_kl(teacher_logits, student_logits, temperature), sample_weight)
    else:
        natural = kernels.weighted_mean(kernels.cross_entropy(student_logits, y), sample_weight)
    return alpha * distill + (1.0 - alpha) * natural, distill, natural


@keras.saving.register_keras_serializable(package="tinyrobust")
class Distillation(Objective):
    """KD, ARD or RSLAD from a frozen teacher, as loss terms of `RobustModel`'s step.

    The teacher's logits come from the targets when they are a dict with
    `"teacher_logits"` (`with_teacher_logits`), otherwise from running the
    teacher. Logged: `distill` and `ce` (KD, ARD) or `natural_kl` (RSLAD), and
    the student's clean `accuracy`. ARD with `alpha=1` and no Jacobian terms
    needs no clean student pass, so costs what its PGD-AT step costs.

    Which mode the student is attacked in follows each method's released
    code by default: ARD's attack runs the student in training mode (batch
    normalisation on the batch's statistics, its moving statistics updated by
    every attack step, as `net.train()` does in ARD's code; a tinyrobust STQ
    student also draws its quantization noise there), RSLAD's in inference
    mode (its code calls `model.eval()` before the attack). Deviation kept
    from ARD's code: its `nn.KLDivLoss()` averages over classes as well as
    examples, so its distillation term is this one divided by the number of
    classes (a constant factor, which Adam and `alpha=1` make moot).

    Args:
        teacher: the frozen teacher (logits out), or None when every batch
            brings its logits (a model loaded from `.keras` has none).
        method: "kd", "ard" or "rslad".
        temperature: softmax temperature (default per method).
        alpha: weight of the distillation term (default per method).
        attack_training: attack the student in training mode (True) or
            inference mode (False); None: the method's released code (True for
            ARD, False for RSLAD; KD has no attack).
    """

    def __init__(self, teacher=None, method="ard", temperature=None, alpha=None, attack_training=None):
        self.method = check_choice("method", method, METHODS)
        if attack_training is not None and not isinstance(attack_training, bool):
            raise ValueError("Expected `attack_training` to be True, False or None. "
                             f"Received: attack_training={attack_training!r}")
        self.attack_training = self.method == "ard" if attack_training is None else attack_training
        default_temperature, default_alpha = DEFAULTS[self.method]
        self.temperature = float(check_number("temperature", default_temperature if temperature is None else temperature,
                                              low=0, low_open=True))
        self.alpha = float(check_number("alpha", default_alpha if alpha is None else alpha, low=0, high=1))
        if teacher is not None and not isinstance(teacher, keras.Model):
            raise ValueError(f"Expected `teacher` to be a Keras model. Received: teacher={teacher!r}")
        self.teacher = teacher
        self._natural = "natural_kl" if self.method == "rslad" else "ce"

    def streams(self, model):
        # The order of the RobustDistiller trainer before the single engine: the attack stream first.
        return ("attack", "projection") if model.jacobian is not None else ("attack",)

    def check(self, model):
        if len(model.outputs) != 1:
            raise ValueError(f"Distillation trains a model with one logits output. Received: {len(model.outputs)} outputs")
        if self.method == "kd" and model.adversary is not None:
            raise ValueError(f"method='kd' distils on clean inputs only. Received: adversary={model.adversary!r}")

    def targets(self, model, x, y, training=True):
        cached = None
        if isinstance(y, dict):
            y, cached = y["labels"], y.get(TEACHER_LOGITS)
        if not training:
            return y, None
        if cached is None:
            if self.teacher is None:
                raise ValueError("Distillation needs the teacher's logits: give the objective a teacher, or targets "
                                 f"{{'labels': ..., '{TEACHER_LOGITS}': ...}} (`with_teacher_logits`). Received: "
                                 "teacher=None")
            cached = self.teacher(x, training=False)
        return y, ops.stop_gradient(ops.convert_to_tensor(cached))

    def adversarial_examples(self, model, x, labels, teacher_logits, perturb):
        training = self.attack_training
        if self.method == "rslad":
            return perturb(lambda z: soft_kl(teacher_logits, model(z, training=training), self.temperature),
                           start="small")
        return perturb(lambda z: kernels.cross_entropy(model(z, training=training), labels))

    def _clean_pass(self, model, adversarial):
        return self.method == "kd" or not adversarial or self.alpha < 1 or model.jacobian is not None

    def passes(self, model, adversarial):
        return self._clean_pass(model, adversarial), adversarial

    def scalar_logs(self, model):
        return ["distill", self._natural] if self._clean_pass(model, model.adversarial) else ["distill"]

    def accuracy_logs(self, model):
        return ["accuracy"]

    def update_accuracies(self, model, trackers, labels, clean):
        trackers["accuracy"].update_state(labels, clean)

    def losses(self, model, step):
        adv = step.adv if step.adv is not None else step.clean
        loss, distill, natural = distillation_loss(self.method, step.labels, step.context, step.clean, adv,
                                                   self.temperature, self.alpha, step.sample_weight)
        logs = {"distill": distill} if natural is None else {"distill": distill, self._natural: natural}
        return [loss], logs

    def get_config(self):  # the teacher is not saved: a loaded model distils from cached logits or a new teacher
        return {"method": self.method, "temperature": self.temperature, "alpha": self.alpha,
                "attack_training": self.attack_training}


@keras.saving.register_keras_serializable(package="tinyrobust")
class RobustDistiller(RobustModel):
    """Trains `student` from a frozen `teacher` with KD, ARD or RSLAD: the `RobustModel` on the student's
    layers with a `Distillation` objective.

    `compile(optimizer=...)` is enough; `fit(x, y)`, `fit(dataset)` and
    `fit(*with_teacher_logits(teacher, x, y))` all work. Logged: `loss`,
    `distill`, `ce` (KD, ARD) or `natural_kl` (RSLAD), `accuracy` of the
    student on clean inputs and, for ARD and RSLAD, `adv_accuracy` on its
    training adversarial examples. Calling the distiller runs the student;
    its weights are the student's. Saved, it loads as that `RobustModel`
    (the teacher is not saved).

    Args:
        student: the model to train (logits out); a `RobustModel`'s Jacobian
            regularizer is kept.
        teacher: a trained model (logits out); frozen.
        method: "kd", "ard" or "rslad".
        temperature: softmax temperature; default 4 (KD), 30 (ARD), 1 (RSLAD).
        alpha: weight of the distillation term; default 0.9 (KD), 1.0 (ARD),
            5/6 (RSLAD).
        adversary: `AdversarialTraining` (method "pgd", or a one-step method:
            "fgsm_rs", "n_fgsm", "grad_align") or its config; default PGD-10 at
            8/255 on [0, 1] inputs. Must be None for KD.
        attack_training: see `Distillation` (default: ARD attacks the student
            in training mode, RSLAD in inference mode, as their code does).
        name: model name.
        clean_metrics: see `RobustModel`.
    """

    def __init__(self, student, teacher, method="ard", temperature=None, alpha=None, adversary=None, name=None,
                 clean_metrics=False, attack_training=None, **kwargs):
        method = check_choice("method", method, METHODS)
        if method != "kd":  # KD with an adversary is refused by `Distillation.check`
            adversary = input_adversary(adversary)
        for role, model in (("student", student), ("teacher", teacher)):
            if not isinstance(model, keras.Model):
                raise ValueError(f"Expected `{role}` to be a Keras model. Received: {role}={model!r}")
        if student is teacher:
            raise ValueError("The student and the teacher must be different models. Received: student is teacher")
        teacher.trainable = False
        objective = Distillation(teacher, method, temperature, alpha, attack_training)
        jacobian = student.jacobian if isinstance(student, RobustModel) else None
        super().__init__(models.inputs_of(student), student.outputs, jacobian=jacobian, adversary=adversary,
                         objective=objective, clean_metrics=clean_metrics, name=name or f"distill_{method}", **kwargs)
        self._student = Untracked(model=student)

    @property
    def student(self):
        """The student model (sharing this trainer's layers and weights)."""
        return self._student.model

    def deployable(self):
        """The student: what is evaluated, exported and deployed."""
        return self.student

    def compile_for_training(self, optimizer):
        """Compiles with the optimizer only: the loss comes from the distillation method."""
        self.compile(optimizer=optimizer)

    @property
    def teacher(self):
        return self.objective.teacher

    @property
    def method(self):
        return self.objective.method

    @property
    def temperature(self):
        return self.objective.temperature

    @property
    def alpha(self):
        return self.objective.alpha

    @classmethod
    def from_config(cls, config, custom_objects=None):
        if "student" in config:
            raise ValueError("This RobustDistiller was saved by tinyrobust 0.1.0 before the single training engine "
                             "(it wrapped `student` and `teacher`); this version saves the student it trains. Load "
                             "the file with that version and save `distiller.student`, or retrain. Received: config "
                             f"with keys {sorted(config)}")
        return RobustModel.from_config(config, custom_objects=custom_objects)


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
