"""Black-box attacks: they only query the model's outputs, so they run against
any callable, e.g. a TFLite interpreter wrapped as a function."""

import numpy as np
import tensorflow as tf

from tinyrobust.attacks import kernels
from tinyrobust.attacks.base import Attack, AttackResult, labels_of, predict
from tinyrobust.validation import check_number

__all__ = ["Square", "Transfer"]


def _margin(outputs, y, targeted):
    """Margin to minimise (`kernels.margin`, negated when targeted): positive while the attack has not succeeded."""
    if outputs.ndim != 2:
        raise ValueError(f"Score-based attacks need logits of shape (batch, classes). Received: shape={outputs.shape}")
    value = kernels.margin(tf.constant(outputs, tf.float32), tf.constant(y, tf.int32)).numpy()
    return -value if targeted else value


def _square_fraction(p_init, iteration, budget):
    """Square Attack's schedule of the window area, rescaled to a 10,000-query budget."""
    i = int(iteration / budget * 10000)
    for limit, divisor in [(10, 1), (50, 2), (200, 4), (500, 8), (1000, 16), (2000, 32), (4000, 64), (6000, 128),
                           (8000, 256)]:
        if i <= limit:
            return p_init / divisor
    return p_init / 512


class Square(Attack):
    """Square Attack, L-inf (Andriushchenko et al. 2020): random square updates
    at the corners of the eps box, kept when they lower the margin loss.

    Args:
        eps: radius or list of radii.
        queries: query budget per example (including the first).
        p_init: initial fraction of pixels in a square.
        targeted: `y` are target labels.
        input_range: valid (low, high) of the inputs.
        seed: seed of the random squares.
    """

    norms = ("linf",)

    def __init__(self, eps=8 / 255, *, queries=1000, p_init=0.05, targeted=False, input_range=(0.0, 1.0), seed=0):
        super().__init__(eps, norm="linf", targeted=targeted, input_range=input_range, seed=seed)
        self.queries = check_number("queries", queries, low=1, integer=True)
        self.p_init = check_number("p_init", p_init, low=0, high=1, low_open=True)

    def _attack(self, model, x, y, eps):
        if x.ndim != 4:
            raise ValueError(f"Square expects images of shape (batch, height, width, channels). Received: shape={x.shape}")
        rng = np.random.default_rng(self.seed)
        low, high = self.input_range
        n, height, width, channels = x.shape
        stripes = eps * rng.choice([-1.0, 1.0], size=(n, 1, width, channels))
        x_best = np.clip(x + stripes, low, high).astype("float32")
        loss = _margin(predict(model, x_best), y, self.targeted)
        used = np.ones(n, dtype=np.int64)
        for iteration in range(1, self.queries):
            active = np.flatnonzero(loss > 0)
            if active.size == 0:
                break
            side = int(round(np.sqrt(_square_fraction(self.p_init, iteration, self.queries) * height * width)))
            side = min(max(side, 1), height - 1, width - 1)
            top = rng.integers(0, height - side + 1)
            left = rng.integers(0, width - side + 1)
            delta = x_best[active] - x[active]
            delta[:, top:top + side, left:left + side, :] = eps * rng.choice([-1.0, 1.0], size=(active.size, 1, 1, channels))
            candidate = np.clip(x[active] + delta, low, high).astype("float32")
            candidate_loss = _margin(predict(model, candidate), y[active], self.targeted)
            used[active] += 1
            better = candidate_loss < loss[active]
            loss[active[better]] = candidate_loss[better]
            x_best[active[better]] = candidate[better]
        return x_best, used

    def get_config(self):
        config = super().get_config()
        del config["norm"]
        return {**config, "queries": self.queries, "p_init": self.p_init}


class Transfer(Attack):
    """Crafts adversarial examples on a surrogate model and evaluates them on the target.

    Args:
        surrogate: model (or callable returning logits) the attack sees.
        attack: a configured attack run on the surrogate; its epsilons and norm apply.
    """

    def __init__(self, surrogate, attack):
        if not isinstance(attack, Attack):
            raise ValueError(f"Expected `attack` to be a tinyrobust attack. Received: attack={attack!r}")
        super().__init__(list(attack.epsilons), norm=attack.norm, targeted=attack.targeted,
                         input_range=attack.input_range, seed=attack.seed)
        self.surrogate, self.attack = surrogate, attack

    def run(self, model, x, y=None):
        x = np.asarray(x, "float32")
        labels = np.asarray(y if y is not None else labels_of(predict(model, x))).astype("int32")
        crafted = self.attack.run(self.surrogate, x, labels)
        success = [self.is_success(model, x_adv, labels) for x_adv in crafted.x_adv]
        return AttackResult(self.epsilons, crafted.x_adv, success, None)

    def get_config(self):
        return {"attack": type(self.attack).__name__, **self.attack.get_config()}

