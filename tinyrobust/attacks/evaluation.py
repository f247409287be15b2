"""Honest robustness evaluation: robust accuracy over several attacks with the
per-example worst case, expectation over transformation, and checks that flag
false robustness (Carlini et al. 2019; AutoAttack)."""

import dataclasses
import sys
import warnings

import keras
import numpy as np
import tensorflow as tf

from tinyrobust.attacks import blackbox, gradient, kernels, suites
from tinyrobust.attacks.base import Attack, labels_of, logits_function, matching_epsilon, predict
from tinyrobust.validation import check_labels, check_number

__all__ = ["EOT", "RobustnessReport", "robust_accuracy", "CheckReport", "check_model"]


class EOT(Attack):
    """Expectation over transformation for randomised models.

    The wrapped attack sees the model averaged over `samples` random draws
    (of the model's own randomness, and of `transform` applied to its input),
    so its input gradient is the average of the draws' logit gradients.

    Args:
        attack: the attack to run on the averaged model.
        samples: draws per query.
        transform: optional random input transform `x -> x'` (traceable).
    """

    def __init__(self, attack, samples=10, transform=None):
        if not isinstance(attack, Attack):
            raise ValueError(f"Expected `attack` to be a tinyrobust attack. Received: attack={attack!r}")
        super().__init__(list(attack.epsilons), norm=attack.norm, targeted=attack.targeted,
                         input_range=attack.input_range, seed=attack.seed)
        self.attack = attack
        self.samples = check_number("samples", samples, low=1, integer=True)
        self.transform = transform

    def expectation(self, model):
        """The averaged model, a callable returning mean logits."""
        fn = logits_function(model)
        transform = self.transform or (lambda x: x)

        def averaged(x):
            return tf.add_n([fn(transform(x)) for _ in range(self.samples)]) / float(self.samples)

        return averaged

    def run(self, model, x, y=None):
        averaged = self.compiled(model, self.expectation)
        result = self.attack.run(averaged, x, y)
        labels = np.asarray(y if y is not None else labels_of(predict(averaged, np.asarray(x, "float32"))))
        result.success = [self.is_success(averaged, x_adv, labels.astype("int32")) for x_adv in result.x_adv]
        return result

    def get_config(self):
        return {"attack": type(self.attack).__name__, "samples": self.samples, **self.attack.get_config()}


@dataclasses.dataclass
class RobustnessReport:
    """Per-example correctness under every attack, and the worst case.

    Attributes:
        clean: bool array, correct on clean inputs.
        attacks: `{name: {eps: bool array}}`, correct on clean input and under
            that attack; a cascade (`tinyrobust.attacks.suite`) also adds
            `"<name>/<stage>"` columns: still robust after that stage and the
            ones before it.
        worst: `{eps: bool array}`: correct under clean and every attack run at
            eps or at any smaller eps (an adversarial within a smaller ball is
            within the larger one too), so it never rises with eps.
        queries: `{name: {eps: mean queries per example}}` for query-based attacks.
        kinds: `{name: "single-step" | "iterative" | "black-box" | "transfer" | "suite"}`.
    """

    clean: np.ndarray
    attacks: dict
    worst: dict
    queries: dict
    kinds: dict
    apgd_columns: tuple = ()

    def accuracy(self):
        """Accuracies as plain floats: clean, per attack and eps, worst case (eps keys as `str(eps)`, the form of
        the result files; `at(eps)` reads one radius by its value)."""
        return {
            "clean": float(self.clean.mean()),
            "attacks": {n: {str(e): float(v.mean()) for e, v in per.items()} for n, per in self.attacks.items()},
            "worst": {str(e): float(v.mean()) for e, v in self.worst.items()},
        }

    @property
    def epsilons(self):
        """The radii evaluated, in order."""
        return tuple(self.worst)

    def at(self, eps):
        """`{attack: accuracy, ..., "worst": accuracy}` at the radius `eps` (matched by value, e.g. 8 / 255).

        Raises:
            ValueError: naming the radii evaluated.
        """
        e = self.epsilons[matching_epsilon(self.epsilons, eps)]
        row = {name: float(per[e].mean()) for name, per in self.attacks.items() if e in per}
        return {**row, "worst": float(self.worst[e].mean())}

    def to_table(self):
        """A plain-text table: one row per attack (and the worst case), one column per radius, in percent."""
        header = ["attack", *(f"eps {e:.4g}" for e in self.worst)]
        rows = [["clean", *(f"{100 * self.clean.mean():.1f}" for _ in self.worst)]]
        rows += [[name, *(f"{100 * per[e].mean():.1f}" if e in per else "-" for e in self.worst)]
                 for name, per in self.attacks.items()]
        rows.append(["worst", *(f"{100 * v.mean():.1f}" for v in self.worst.values())])
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(header, widths)), "  ".join("-" * w for w in widths)]
        return "\n".join(lines + ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows])

    def __repr__(self):
        worst = ", ".join(f"{e:.4g}: {100 * v.mean():.1f}%" for e, v in self.worst.items())
        return (f"RobustnessReport({len(self.clean)} examples, clean {100 * self.clean.mean():.1f}%, "
                f"{len(self.attacks)} attacks, worst {{{worst}}})")


def _unwrapped(attack):
    """The attack an `EOT` wraps, or the attack itself."""
    return attack.attack if isinstance(attack, EOT) else attack


def attack_kind(attack):
    """How an attack counts in the sanity checks."""
    inner = _unwrapped(attack)
    if isinstance(inner, suites.Cascade):
        return "suite"
    if isinstance(inner, blackbox.Transfer):
        return "transfer"
    if inner.black_box:
        return "black-box"
    if isinstance(inner, gradient.FGSM) or (isinstance(inner, gradient.PGD) and inner.steps == 1):
        return "single-step"
    return "iterative"


def _batches(data, batch_size):
    if isinstance(data, tf.data.Dataset):
        for x, y in data:
            x = np.asarray(x, "float32")
            yield x, check_labels(y, n=len(x))
        return
    x, y = data
    x = np.asarray(x, "float32")
    if x.ndim == 0 or len(x) == 0:
        raise ValueError(f"Expected a non-empty batch of inputs. Received: x with shape {x.shape}")
    y = check_labels(y, n=len(x))
    for i in range(0, len(x), batch_size):
        yield x[i:i + batch_size], y[i:i + batch_size]


def robust_accuracy(model, data, attacks, batch_size=256, verbose=True):
    """Evaluates a model against one or several attacks.

    An example counts as robust at eps only if it is correct on clean input
    and survives every attack run at that eps and at every smaller eps. A
    `Cascade` (e.g. `tinyrobust.attacks.suite("autoattack", ...)`) runs each
    stage only on the examples still robust and adds one column per stage.

    Args:
        model: Keras model or callable returning logits.
        data: `(x, y)` arrays or a `tf.data.Dataset` of `(x, y)` batches.
        attacks: an attack, a list of attacks, or a dict `{name: attack}`.
        batch_size: batch size for arrays.
        verbose: show a progress bar.

    Returns:
        A `RobustnessReport`.
    """
    if isinstance(attacks, Attack):
        attacks = [attacks]
    if isinstance(attacks, (list, tuple)):
        named = {}
        for attack in attacks:
            name = type(attack).__name__
            named[name if name not in named else f"{name}_{len(named)}"] = attack
        attacks = named
    if not attacks or not all(isinstance(a, Attack) for a in attacks.values()):
        raise ValueError(f"Expected one or more tinyrobust attacks. Received: attacks={attacks!r}")
    clean, correct, queries = [], {n: {} for n in attacks}, {n: {} for n in attacks}
    progress = None
    if verbose:  # one step per attack per batch; the total is known for arrays
        total = None if isinstance(data, tf.data.Dataset) else -(-len(data[0]) // batch_size) * len(attacks)
        progress = keras.utils.Progbar(total, unit_name="attack batch", verbose=1 if sys.stdout.isatty() else 2)
    step = 0
    for x, y in _batches(data, batch_size):
        logits = predict(model, x)
        if logits.ndim == 2:
            check_labels(y, num_classes=logits.shape[1])
        clean.append(labels_of(logits) == y)
        for name, attack in attacks.items():
            result = attack.run(model, x, y)
            for i, eps in enumerate(result.epsilons):
                correct[name].setdefault(eps, []).append(~result.success[i] & clean[-1])
                if result.queries is not None and result.queries[i] is not None:
                    queries[name].setdefault(eps, []).append(result.queries[i])
            for stage, robust in (result.stages or {}).items():
                for i, eps in enumerate(result.epsilons):
                    correct.setdefault(f"{name}/{stage}", {}).setdefault(eps, []).append(robust[i] & clean[-1])
            step += 1
            if progress is not None:
                progress.update(step, finalize=step == progress.target)
    if progress is not None and progress.target is None:
        progress.update(step, finalize=True)
    clean = np.concatenate(clean)
    per_attack = {n: {e: np.concatenate(v) for e, v in per.items()} for n, per in correct.items()}
    worst = {}
    for per in per_attack.values():
        for eps, values in per.items():
            worst[eps] = (worst[eps] if eps in worst else clean) & values
    robust = clean
    for eps in sorted(worst):  # broken within a smaller ball means broken within a larger one
        robust = worst[eps] = worst[eps] & robust
    mean_queries = {n: {e: float(np.concatenate(v).mean()) for e, v in per.items()} for n, per in queries.items() if per}
    kinds = {n: attack_kind(a) for n, a in attacks.items()}
    for name, attack in attacks.items():
        for stage, stage_attack in getattr(_unwrapped(attack), "stages", {}).items():
            kinds[f"{name}/{stage}"] = attack_kind(stage_attack)
    apgd = tuple(n for n, a in attacks.items() if isinstance(_unwrapped(a), (gradient.APGD, gradient.APGDTargeted)))
    return RobustnessReport(clean, per_attack, dict(sorted(worst.items())), mean_queries, kinds, apgd)


@dataclasses.dataclass
class CheckReport:
    """Flags raised by `check_model`: `{flag: message}`; empty when nothing is suspicious."""

    flags: dict

    @property
    def ok(self):
        return not self.flags


def check_model(model, x, y, report=None, num_classes=None, chance_margin=0.1, warn=True, gradients=True,
                masking_margin=0.05):
    """Flags signs of false robustness.

    On the model: softmax outputs instead of logits ("softmax_output", also
    when they are dequantized from an int8 grid, as a deployed model's are), outputs
    that change between identical calls ("randomized"), input gradients that
    are zero for most examples ("zero_gradients") or not finite
    ("nonfinite_gradients"), clean accuracy on `(x, y)` within `chance_margin`
    of chance ("clean_near_chance": robust accuracies of such a model mean
    nothing; e.g. too few training steps for the BatchNormalization
    statistics). With a `RobustnessReport` from an evaluation:
    black-box or transfer attacks beating white-box ones ("black_box_beats_white_box"),
    single-step beating iterative ("single_step_beats_iterative"), APGD
    (configured, or the stages of a suite) leaving clearly lower accuracy than
    the other gradient attacks ("partial_gradient_masking": their gradients
    are masked in part, e.g. by scaled logits), and accuracy at the largest
    eps still above chance ("not_reaching_chance").

    Args:
        model: Keras model or callable returning logits.
        x: a batch of inputs.
        y: their integer labels.
        report: optional `RobustnessReport`.
        num_classes: for the chance level; read from the outputs by default.
        chance_margin: how far above chance accuracy may stay at the largest eps.
        warn: also issue each flag as a `UserWarning`.
        gradients: check input gradients; False for models that give none
            (e.g. a `tinyrobust.export.TFLiteModel`).
        masking_margin: how much lower APGD's accuracy may be than the other
            gradient attacks' before "partial_gradient_masking" is raised.

    Returns:
        A `CheckReport`.
    """
    x = np.asarray(x, "float32")
    y = check_labels(y, n=len(x))
    flags = {}
    first, second = predict(model, x), predict(model, x)
    if first.ndim == 2:
        num_classes = num_classes or first.shape[1]
        levels = np.unique(first)
        step = float(np.min(np.diff(levels))) if len(levels) > 1 else 0.0  # an int8 grid's step, else tiny
        tolerance = 1e-3 + (num_classes * step / 2 if step >= 1e-4 else 0.0)
        if np.all(first >= 0) and np.all(first <= 1) and np.allclose(first.sum(axis=1), 1.0, atol=tolerance):
            flags["softmax_output"] = "Outputs are probabilities (rows sum to 1): attacks need logits."
    if not np.array_equal(first, second):
        flags["randomized"] = "Outputs differ between identical calls: evaluate with EOT."
    if num_classes and first.ndim == 2:
        clean = float(np.mean(first.argmax(axis=1) == y))
        if clean <= 1.0 / num_classes + chance_margin:
            flags["clean_near_chance"] = (
                f"Clean accuracy is {clean:.1%}, near chance ({1 / num_classes:.1%}): the model has not learned (or "
                "runs in the wrong mode), so its robust accuracies mean nothing.")
    grads = _input_gradients(model, x, y) if gradients else False
    if grads is None:
        flags["zero_gradients"] = "The loss has no gradient with respect to the input."
    elif grads is not False:
        grads = grads.numpy().reshape(len(x), -1)
        if not np.all(np.isfinite(grads)):
            flags["nonfinite_gradients"] = "Input gradients contain NaN or inf."
        zero = np.mean(np.all(grads == 0, axis=1))
        if zero > 0.5:
            flags["zero_gradients"] = f"Input gradients are zero for {zero:.0%} of the examples (gradient masking?)."
    if report is not None:
        flags.update(_check_report(report, num_classes, chance_margin, masking_margin))
    if warn:
        for message in flags.values():
            warnings.warn(message, stacklevel=2)
    return CheckReport(flags)


def _input_gradients(model, x, y):
    """Input gradients of the cross-entropy as a tensor, or None where the loss does not depend on the input."""
    fn = logits_function(model)
    inputs = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(inputs)
        loss = tf.reduce_sum(kernels.cross_entropy(fn(inputs), tf.constant(y)))
    return tape.gradient(loss, inputs)


def _is_apgd(report, name):
    """Whether a column is an APGD attack or a white-box stage of a suite."""
    return "/" in name or name in report.apgd_columns


def _check_report(report, num_classes, chance_margin, masking_margin):
    flags = {}
    accuracy = {n: {e: float(v.mean()) for e, v in per.items()} for n, per in report.attacks.items()}
    by_kind = {}
    for name, kind in report.kinds.items():
        by_kind.setdefault(kind, []).append(name)
    for eps in report.worst:
        def best(kind):
            values = [accuracy[n][eps] for n in by_kind.get(kind, []) if eps in accuracy[n]]
            return min(values) if values else None

        iterative, single = best("iterative"), best("single-step")
        white = min(v for v in (iterative, single) if v is not None) if iterative is not None or single is not None else None
        for kind in ("black-box", "transfer"):
            other = best(kind)
            if white is not None and other is not None and other < white - 0.01:
                flags["black_box_beats_white_box"] = (
                    f"At eps={eps:g} a {kind} attack leaves {other:.1%} accuracy, below the white-box {white:.1%}: "
                    "gradients may be masked.")
        if iterative is not None and single is not None and single < iterative - 0.01:
            flags["single_step_beats_iterative"] = (
                f"At eps={eps:g} a single-step attack ({single:.1%}) beats iterative ones ({iterative:.1%}).")
        gradient_based = [n for kind in ("iterative", "single-step") for n in by_kind.get(kind, []) if eps in accuracy[n]]
        strong = [accuracy[n][eps] for n in gradient_based if _is_apgd(report, n)]
        plain = [accuracy[n][eps] for n in gradient_based if not _is_apgd(report, n)]
        if strong and plain and min(strong) < min(plain) - masking_margin:
            flags["partial_gradient_masking"] = (
                f"At eps={eps:g} APGD leaves {min(strong):.1%} accuracy, clearly below the other gradient attacks' "
                f"{min(plain):.1%}: their gradients are partly masked (e.g. scaled logits); trust APGD's numbers.")
    if num_classes and report.worst:
        largest = max(report.worst)
        remaining = float(report.worst[largest].mean())
        if remaining > 1.0 / num_classes + chance_margin:
            flags["not_reaching_chance"] = (
                f"At the largest eps={largest:g} accuracy is still {remaining:.1%}, above chance "
                f"({1 / num_classes:.1%}): use a larger eps or a stronger attack.")
    return flags
