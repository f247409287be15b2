"""White-box gradient attacks: FGSM, PGD, MIM, APGD, Carlini-Wagner L2, DeepFool.

Each attack compiles one `tf.function` per model on first use; the loops run
as `tf.while_loop`s inside it.
"""

import math

import numpy as np
import tensorflow as tf

from tinyrobust.attacks import kernels
from tinyrobust.attacks.base import (
    Attack,
    MinimumNormAttack,
    labels_of,
    logits_function,
    predict,
)
from tinyrobust.validation import check_bool, check_number

__all__ = ["PGD", "FGSM", "MIM", "APGD", "APGDTargeted", "CarliniWagnerL2", "DeepFool"]


class PGD(Attack):
    """Projected gradient descent (Madry et al. 2018) on the cross-entropy.

    Args:
        eps: radius or list of radii.
        norm: "linf" or "l2".
        steps: gradient steps.
        step_size: absolute step size; default `rel_step_size * eps`.
        rel_step_size: step size relative to eps when `step_size` is None.
        random_start: start from a uniform point of the ball.
        restarts: independent runs; an example counts as broken if any run breaks it.
        momentum: None, or MIM's decay factor.
        targeted: `y` are target labels (minimise their cross-entropy).
        input_range: valid (low, high) of the inputs.
        seed: seed of the random starts.
    """

    def __init__(self, eps=8 / 255, *, norm="linf", steps=10, step_size=None, rel_step_size=0.25, random_start=True,
                 restarts=1, momentum=None, targeted=False, input_range=(0.0, 1.0), seed=0):
        super().__init__(eps, norm=norm, targeted=targeted, input_range=input_range, seed=seed)
        self.steps = check_number("steps", steps, low=1, integer=True)
        self.step_size = None if step_size is None else check_number("step_size", step_size, low=0, low_open=True)
        self.rel_step_size = check_number("rel_step_size", rel_step_size, low=0, low_open=True)
        self.random_start = check_bool("random_start", random_start)
        self.restarts = check_number("restarts", restarts, low=1, integer=True)
        self.momentum = None if momentum is None else check_number("momentum", momentum, low=0)

    def _build(self, model):
        fn = logits_function(model)
        sign = -1.0 if self.targeted else 1.0
        low_high = self.input_range

        @tf.function(reduce_retracing=True)
        def run(x, y, eps, step_size, steps, start):
            loss_fn = lambda z: sign * kernels.cross_entropy(fn(z), y)  # noqa: E731
            return kernels.pgd(loss_fn, x, eps, step_size, steps, self.norm, start, low_high, self.momentum)

        return run

    def _attack(self, model, x, y, eps):
        run = self.compiled(model, self._build)
        rng = np.random.default_rng(self.seed)
        step_size = self.step_size if self.step_size is not None else self.rel_step_size * eps

        def restart():
            start = kernels.random_start(x, eps, self.norm, seed=rng) if self.random_start else np.zeros_like(x)
            return run(tf.constant(x), tf.constant(y), tf.constant(eps, tf.float32),
                       tf.constant(step_size, tf.float32), tf.constant(self.steps), tf.constant(start)).numpy()

        return self.first_success(model, y, (restart() for _ in range(self.restarts))), None

    def get_config(self):
        return {**super().get_config(), "steps": self.steps, "step_size": self.step_size,
                "rel_step_size": self.rel_step_size, "random_start": self.random_start, "restarts": self.restarts,
                "momentum": self.momentum}


class FGSM(PGD):
    """Fast gradient sign method (Goodfellow et al. 2015): one step of size eps, no random start.

    Args:
        eps: radius or list of radii.
        norm: "linf" (FGSM) or "l2" (fast gradient method).
        targeted: `y` are target labels.
        input_range: valid (low, high) of the inputs.
        seed: unused randomness seed, kept for a uniform interface.
    """

    def __init__(self, eps=8 / 255, *, norm="linf", targeted=False, input_range=(0.0, 1.0), seed=0):
        super().__init__(eps, norm=norm, steps=1, rel_step_size=1.0, random_start=False, targeted=targeted,
                         input_range=input_range, seed=seed)

    def get_config(self):
        return Attack.get_config(self)


class MIM(PGD):
    """Momentum iterative method (Dong et al. 2018).

    Args:
        eps: radius or list of radii.
        norm: "linf" or "l2".
        steps: iterations (step size eps / steps).
        decay: momentum decay factor.
        targeted: `y` are target labels.
        input_range: valid (low, high) of the inputs.
        seed: seed (MIM itself is deterministic).
    """

    def __init__(self, eps=8 / 255, *, norm="linf", steps=10, decay=1.0, targeted=False, input_range=(0.0, 1.0),
                 seed=0):
        check_number("steps", steps, low=1, integer=True)
        super().__init__(eps, norm=norm, steps=steps, rel_step_size=1.0 / steps, random_start=False,
                         momentum=check_number("decay", decay, low=0), targeted=targeted, input_range=input_range,
                         seed=seed)

    def get_config(self):
        return {**Attack.get_config(self), "steps": self.steps, "decay": self.momentum}


def _apgd_checkpoints(steps):
    p = [0.0, 0.22]
    while p[-1] < 1.0:
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
    marks = sorted({int(math.ceil(q * steps)) for q in p[1:] if math.ceil(q * steps) < steps})
    flags = np.zeros(steps, dtype=bool)
    flags[[m for m in marks if m > 0]] = True
    return flags


class APGD(Attack):
    """Auto-PGD (Croce and Hein 2020) with its step-size schedule.

    Step size starts at `2 * eps` and halves at checkpoints where fewer than
    `rho` of the steps since the previous checkpoint increased the loss, or
    where neither the step size nor the best loss changed; each halving
    restarts from the best point. Momentum 0.75. Returns the first iterate
    that is misclassified (reaches the target), else the highest-loss one.

    Args:
        eps: radius or list of radii.
        norm: "linf" or "l2".
        loss: "ce" (cross-entropy) or "dlr" (difference of logits ratio).
        steps: iterations.
        restarts: random restarts; an example is broken if any restart breaks it.
        rho: checkpoint threshold.
        targeted: `y` are target labels.
        input_range: valid (low, high) of the inputs.
        seed: seed of the random starts.
    """

    def __init__(self, eps=8 / 255, *, norm="linf", loss="ce", steps=100, restarts=1, rho=0.75, targeted=False,
                 input_range=(0.0, 1.0), seed=0):
        super().__init__(eps, norm=norm, targeted=targeted, input_range=input_range, seed=seed)
        if loss not in ("ce", "dlr"):
            raise ValueError(f"Expected `loss` to be 'ce' or 'dlr'. Received: loss={loss!r}")
        self.loss = loss
        self.steps = check_number("steps", steps, low=1, integer=True)
        self.restarts = check_number("restarts", restarts, low=1, integer=True)
        self.rho = check_number("rho", rho, low=0, high=1)

    def _build(self, model):
        fn = logits_function(model)
        norm, (low, high), rho = self.norm, self.input_range, self.rho

        def objective(logits, y, target):
            if self.loss == "ce":
                ce = kernels.cross_entropy(logits, target if self.targeted else y)
                return -ce if self.targeted else ce
            return kernels.dlr_loss(logits, y, target if self.targeted else None)

        def value_and_gradient(z, y, target):
            """Loss, its input gradient (zero where the input is unconnected) and whether `z` is adversarial."""
            with tf.GradientTape() as tape:
                tape.watch(z)
                logits = fn(z)
                value = objective(logits, y, target)
            predicted = tf.argmax(logits, axis=-1, output_type=tf.int64)
            success = (tf.equal(predicted, tf.cast(target, tf.int64)) if self.targeted
                       else tf.not_equal(predicted, tf.cast(y, tf.int64)))
            return value, tape.gradient(value, z, unconnected_gradients=tf.UnconnectedGradients.ZERO), success

        def project(x, z, eps):
            return kernels.project_into(x, z - x, eps, norm, (low, high))

        @tf.function(reduce_retracing=True)
        def run(x, y, target, eps, checkpoints, start):
            shape = (-1,) + (1,) * (len(x.shape) - 1)
            x_cur = project(x, x + start, eps)
            loss_cur, grad_cur, found = value_and_gradient(x_cur, y, target)
            x_found = x_cur  # the first adversarial iterate, kept once found
            x_best, loss_best, grad_best = x_cur, loss_cur, grad_cur
            x_prev = x_cur
            eta = 2.0 * eps * tf.ones_like(loss_cur)
            improved_count = tf.zeros_like(loss_cur)
            best_at_checkpoint = loss_best
            reduced_at_checkpoint = tf.zeros_like(loss_cur, dtype=tf.bool)
            last_checkpoint = tf.constant(0)
            for k in tf.range(tf.shape(checkpoints)[0]):
                tf.autograph.experimental.set_loop_options(shape_invariants=[  # batches of any size
                    (v, tf.TensorShape([None]).concatenate(v.shape[1:])) for v in (
                        x_cur, x_prev, x_best, x_found, grad_cur, grad_best, loss_cur, loss_best, found, eta,
                        improved_count, best_at_checkpoint, reduced_at_checkpoint)])
                z = project(x, x_cur + tf.reshape(eta, shape) * kernels.normalized_step(grad_cur, norm), eps)
                alpha = tf.where(k > 0, 0.75, 1.0)
                x_next = project(x, x_cur + alpha * (z - x_cur) + (1.0 - alpha) * (x_cur - x_prev), eps)
                loss_next, grad_next, success = value_and_gradient(x_next, y, target)
                x_found = tf.where(tf.reshape(tf.logical_and(success, tf.logical_not(found)), shape), x_next, x_found)
                found = tf.logical_or(found, success)
                improved_count += tf.cast(loss_next > loss_cur, loss_cur.dtype)
                better = loss_next > loss_best
                x_best = tf.where(tf.reshape(better, shape), x_next, x_best)
                grad_best = tf.where(tf.reshape(better, shape), grad_next, grad_best)
                loss_best = tf.where(better, loss_next, loss_best)
                x_prev, x_cur, loss_cur, grad_cur = x_cur, x_next, loss_next, grad_next
                if checkpoints[k]:
                    since = tf.cast(k - last_checkpoint, loss_cur.dtype)
                    stalled = improved_count < rho * since
                    flat = tf.logical_and(tf.logical_not(reduced_at_checkpoint), best_at_checkpoint >= loss_best)
                    reduce = tf.logical_or(stalled, flat)
                    eta = tf.where(reduce, eta / 2.0, eta)
                    restart = tf.reshape(reduce, shape)
                    x_cur = tf.where(restart, x_best, x_cur)
                    x_prev = tf.where(restart, x_best, x_prev)
                    grad_cur = tf.where(restart, grad_best, grad_cur)
                    loss_cur = tf.where(reduce, loss_best, loss_cur)
                    improved_count = tf.zeros_like(improved_count)
                    best_at_checkpoint = loss_best
                    reduced_at_checkpoint = reduce
                    last_checkpoint = k
            return tf.where(tf.reshape(found, shape), x_found, x_best)

        return run

    def _attack(self, model, x, y, eps):
        run = self.compiled(model, self._build)
        rng = np.random.default_rng(self.seed)
        checkpoints = tf.constant(_apgd_checkpoints(self.steps))
        # Targeted: `y` holds targets; DLR also needs the class to move away from.
        true = labels_of(predict(model, x)).astype("int32") if self.targeted else y

        def restart():
            start = kernels.random_start(x, eps, self.norm, seed=rng)
            return run(tf.constant(x), tf.constant(true), tf.constant(y), tf.constant(eps, tf.float32), checkpoints,
                       tf.constant(start)).numpy()

        return self.first_success(model, y, (restart() for _ in range(self.restarts))), None

    def get_config(self):
        return {**super().get_config(), "loss": self.loss, "steps": self.steps, "restarts": self.restarts,
                "rho": self.rho}


class APGDTargeted(Attack):
    """AutoAttack's APGD-T: targeted APGD on the DLR loss towards each of the
    `target_classes` highest-scoring wrong classes in turn; an example is
    broken once any target run misclassifies it.

    Args:
        eps: radius or list of radii.
        norm: "linf" or "l2".
        target_classes: how many of the top wrong classes are targeted.
        steps: APGD iterations per target.
        restarts: random restarts per target.
        input_range: valid (low, high) of the inputs.
        seed: seed of the random starts.
    """

    def __init__(self, eps=8 / 255, *, norm="linf", target_classes=9, steps=100, restarts=1, input_range=(0.0, 1.0),
                 seed=0):
        super().__init__(eps, norm=norm, input_range=input_range, seed=seed)
        self.target_classes = check_number("target_classes", target_classes, low=1, integer=True)
        self._apgd = APGD(eps, norm=norm, loss="dlr", steps=steps, restarts=restarts, targeted=True,
                          input_range=input_range, seed=seed)

    def _attack(self, model, x, y, eps):
        scores = predict(model, x).copy()
        scores[np.arange(len(x)), y] = -np.inf  # never target the true class
        ranked = np.argsort(-scores, axis=1)[:, :min(self.target_classes, scores.shape[1] - 1)]

        def per_target():
            for rank in range(ranked.shape[1]):
                x_adv, _ = self._apgd._attack(model, x, ranked[:, rank].astype("int32"), eps)
                yield self._project(x, np.asarray(x_adv, "float32"), eps)

        return self.first_success(model, y, per_target()), None

    def get_config(self):
        return {**super().get_config(), "target_classes": self.target_classes, "steps": self._apgd.steps,
                "restarts": self._apgd.restarts}


class CarliniWagnerL2(MinimumNormAttack):
    """Carlini and Wagner's L2 attack (2017): minimum-norm adversarials.

    Optimises in tanh space `||x' - x||^2 + c * max(margin, -confidence)` with
    Adam, binary-searching `c` per example; the smallest successful
    perturbation is kept. At each eps the result is that perturbation when its
    L2 norm is at most eps, otherwise it is projected onto the eps ball.
    Adam's step is set in the input's units: whatever `input_range` is (pixels
    in [0, 1], MFCCs in [-124, 124]), one step moves an input coordinate in the
    middle of the range by about `learning_rate`, so the same settings search
    at the same resolution on every input scale.

    Args:
        eps: L2 radius or list of radii at which success is reported.
        confidence: margin kappa.
        initial_const: first `c`.
        binary_search_steps: searches over `c`.
        steps: Adam steps per `c`.
        learning_rate: Adam step in input units (the tanh-space step is
            `2 * learning_rate / (high - low)`; the default 5e-3 is the
            reference 1e-2 tanh-space step on inputs in [0, 1]).
        targeted: `y` are target labels.
        input_range: valid (low, high) of the inputs.
        seed: unused (deterministic), kept for a uniform interface.
    """

    norms = ("l2",)

    def __init__(self, eps=0.5, *, confidence=0.0, initial_const=1e-2, binary_search_steps=5, steps=100,
                 learning_rate=5e-3, targeted=False, input_range=(0.0, 1.0), seed=0):
        super().__init__(eps, norm="l2", targeted=targeted, input_range=input_range, seed=seed)
        self.confidence = check_number("confidence", confidence, low=0)
        self.initial_const = check_number("initial_const", initial_const, low=0, low_open=True)
        self.binary_search_steps = check_number("binary_search_steps", binary_search_steps, low=1, integer=True)
        self.steps = check_number("steps", steps, low=1, integer=True)
        self.learning_rate = check_number("learning_rate", learning_rate, low=0, low_open=True)

    def _build(self, model):
        fn = logits_function(model)
        low, high = self.input_range
        # d input / d w = (high - low) / 2 at the middle of the range.
        step = self.learning_rate * 2.0 / (high - low)

        def to_input(w):
            return (tf.tanh(w) + 1.0) / 2.0 * (high - low) + low

        @tf.function(reduce_retracing=True)
        def run(x, y, const, steps):
            w = tf.atanh(tf.clip_by_value((x - low) / (high - low) * 2.0 - 1.0, -0.999999, 0.999999))
            # Adam by hand: no optimizer state outlives the call.
            m, v = tf.zeros_like(x), tf.zeros_like(x)
            beta1, beta2 = 0.9, 0.999
            best_norm = tf.fill(tf.shape(y), np.float32(np.inf))
            best = x
            for t in tf.range(1, steps + 1):
                with tf.GradientTape() as tape:
                    tape.watch(w)
                    x_new = to_input(w)
                    logits = fn(x_new)
                    gap = kernels.margin(logits, y)
                    gap = -gap if self.targeted else gap
                    attack_loss = tf.maximum(gap, -self.confidence)
                    distance = tf.reduce_sum(tf.reshape(tf.square(x_new - x), (tf.shape(x)[0], -1)), axis=-1)
                    loss = tf.reduce_sum(distance + const * attack_loss)
                gradient = tape.gradient(loss, w, unconnected_gradients=tf.UnconnectedGradients.ZERO)
                m = beta1 * m + (1 - beta1) * gradient
                v = beta2 * v + (1 - beta2) * tf.square(gradient)
                tf_t = tf.cast(t, tf.float32)
                w = w - step * (m / (1 - beta1 ** tf_t)) / (tf.sqrt(v / (1 - beta2 ** tf_t)) + 1e-8)
                succeeded = gap < 0
                better = tf.logical_and(succeeded, distance < best_norm)
                best_norm = tf.where(better, distance, best_norm)
                best = tf.where(tf.reshape(better, (-1,) + (1,) * (len(x.shape) - 1)), x_new, best)
            return best, best_norm

        return run

    def minimum_norm(self, model, x, y, goal=None):
        """Smallest adversarial found per example (the input where none), and None queries (white-box)."""
        run = self.compiled(model, self._build)
        n = len(x)
        const = np.full(n, self.initial_const, "float32")
        lower, upper = np.zeros(n, "float32"), np.full(n, np.inf, "float32")
        best, best_norm = x.copy(), np.full(n, np.inf, "float32")
        for _ in range(self.binary_search_steps):
            adv, norm = run(tf.constant(x), tf.constant(y), tf.constant(const), tf.constant(self.steps))
            adv, norm = adv.numpy(), np.sqrt(norm.numpy())
            found = np.isfinite(norm)
            better = found & (norm < best_norm)
            best[better], best_norm[better] = adv[better], norm[better]
            upper = np.where(found, np.minimum(upper, const), upper)
            lower = np.where(found, lower, np.maximum(lower, const))
            const = np.where(np.isfinite(upper), (lower + upper) / 2, const * 10).astype("float32")
        return best, None

    def get_config(self):
        config = super().get_config()
        del config["norm"]
        return {**config, "confidence": self.confidence, "initial_const": self.initial_const,
                "binary_search_steps": self.binary_search_steps, "steps": self.steps,
                "learning_rate": self.learning_rate}


class DeepFool(Attack):
    """DeepFool (Moosavi-Dezfooli et al. 2016): minimal perturbation by linearising
    the decision boundaries of the `candidates` most likely classes.

    The accumulated perturbation, times `1 + overshoot`, is projected onto the
    eps ball at each eps.

    Args:
        eps: radius or list of radii.
        norm: "l2" or "linf".
        steps: maximum iterations.
        overshoot: relative overshoot past the boundary.
        candidates: classes considered (the top ones of the clean prediction).
        input_range: valid (low, high) of the inputs.
        seed: unused (deterministic), kept for a uniform interface.
    """

    def __init__(self, eps=0.5, *, norm="l2", steps=50, overshoot=0.02, candidates=10, input_range=(0.0, 1.0),
                 seed=0):
        super().__init__(eps, norm=norm, targeted=False, input_range=input_range, seed=seed)
        self.steps = check_number("steps", steps, low=1, integer=True)
        self.overshoot = check_number("overshoot", overshoot, low=0)
        self.candidates = check_number("candidates", candidates, low=2, integer=True)

    def _build(self, model):
        fn = logits_function(model)
        norm, (low, high), overshoot = self.norm, self.input_range, self.overshoot

        @tf.function(reduce_retracing=True)
        def run(x, y, steps):
            clean = fn(x)
            classes = clean.shape[-1]
            k = min(self.candidates, classes)
            # The label first, then the k most likely classes (a repeat of the label is ignored below).
            candidates = tf.concat([y[:, None], tf.argsort(clean, direction="DESCENDING")[:, :k]], axis=1)
            ignore = tf.concat([tf.ones_like(y[:, None], tf.bool), candidates[:, 1:] == y[:, None]], axis=1)
            shape = (-1,) + (1,) * (len(x.shape) - 1)
            total = tf.zeros_like(x)
            active = tf.ones_like(y, dtype=tf.bool)
            for _ in tf.range(steps):
                x_adv = tf.clip_by_value(x + (1.0 + overshoot) * total, low, high)
                with tf.GradientTape() as tape:
                    tape.watch(x_adv)
                    logits = fn(x_adv)
                    picked = tf.gather(logits, candidates, batch_dims=1)
                active = tf.logical_and(active, tf.argmax(logits, axis=-1, output_type=y.dtype) == y)
                if not tf.reduce_any(active):
                    break
                jacobian = tape.batch_jacobian(picked, x_adv)  # (B, k + 1, ...)
                w = jacobian - jacobian[:, :1]
                f = picked - picked[:, :1]
                flat = tf.reshape(w, (tf.shape(w)[0], k + 1, -1))
                dual = tf.norm(flat, ord=2 if norm == "l2" else 1, axis=-1) + 1e-8
                distance = tf.where(ignore, np.float32(np.inf), tf.abs(f) / dual)
                best = tf.argmin(distance, axis=-1)
                w_best = tf.gather(w, best, batch_dims=1)
                f_best = tf.gather(tf.abs(f), best, batch_dims=1) + 1e-4
                dual_best = tf.gather(dual, best, batch_dims=1)
                if norm == "l2":
                    step = tf.reshape(f_best / tf.square(dual_best), shape) * w_best
                else:
                    step = tf.reshape(f_best / dual_best, shape) * tf.sign(w_best)
                total = total + tf.where(tf.reshape(active, shape), step, tf.zeros_like(step))
            return tf.clip_by_value(x + (1.0 + overshoot) * total, low, high)

        return run

    def _attack(self, model, x, y, eps):
        run = self.compiled(model, self._build)
        return run(tf.constant(x), tf.constant(y), tf.constant(self.steps)).numpy(), None

    def get_config(self):
        config = super().get_config()
        del config["targeted"]
        return {**config, "steps": self.steps, "overshoot": self.overshoot, "candidates": self.candidates}
