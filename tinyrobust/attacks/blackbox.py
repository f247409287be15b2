"""Black-box attacks: they only query the model's outputs, so they run against
any callable, e.g. a TFLite interpreter wrapped as a function."""

import functools

import numpy as np
import tensorflow as tf

from tinyrobust.attacks import kernels
from tinyrobust.attacks.base import (
    Attack,
    AttackResult,
    labels_of,
    per_example,
    per_example_norm,
    predict,
)
from tinyrobust.validation import check_choice, check_number

__all__ = ["SimBA", "Square", "Transfer"]


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


def _centred_rings(rows, cols):
    """Concentric rectangles around the centre weighted 1/(k+1)^2, unit L2 norm."""
    pattern = np.zeros((rows, cols))
    r, c = rows // 2, cols // 2
    for k in range(max(r, c) + 1):
        pattern[max(r - k, 0):r + k + 1, max(c - k, 0):c + k + 1] += 1.0 / (k + 1) ** 2
    return pattern / np.linalg.norm(pattern)


def _l2_window(side, rng):
    """Square Attack's L2 update pattern: two opposite-signed halves of rings, randomly transposed, unit norm."""
    half = side // 2
    pattern = np.concatenate([_centred_rings(half, side), -_centred_rings(side - half, side)])
    pattern /= np.linalg.norm(pattern)
    return pattern.T if rng.random() < 0.5 else pattern


def _norm_over_window(t):
    """L2 norm over height and width, per example and channel: shape (n, 1, 1, c)."""
    return np.sqrt(np.sum(t ** 2, axis=(1, 2), keepdims=True))


class Square(Attack):
    """Square Attack (Andriushchenko et al. 2020): random square updates kept
    when they lower the margin loss; L-inf (updates at the corners of the eps
    box) or L2 (mass moved between two windows, on the eps sphere).

    Args:
        eps: radius or list of radii.
        norm: "linf" or "l2".
        queries: query budget per example (including the first).
        p_init: initial fraction of pixels in a square (0.8, AutoAttack's
            value: large squares first).
        targeted: `y` are target labels.
        input_range: valid (low, high) of the inputs.
        seed: seed of the random squares.

    An example is attacked until it is misclassified (a margin tie is not),
    and an L-inf proposal that would leave its window unchanged gets new signs
    before it is queried, as in the reference implementation.
    """

    norms = ("linf", "l2")
    black_box = True
    _REDRAWS = 100  # new signs tried for a window whose proposal changes nothing

    def __init__(self, eps=8 / 255, *, norm="linf", queries=1000, p_init=0.8, targeted=False,
                 input_range=(0.0, 1.0), seed=0):
        super().__init__(eps, norm=norm, targeted=targeted, input_range=input_range, seed=seed)
        self.queries = check_number("queries", queries, low=1, integer=True)
        self.p_init = check_number("p_init", p_init, low=0, high=1, low_open=True)

    def _attack(self, model, x, y, eps):
        if x.ndim != 4:
            raise ValueError(f"Square expects images of shape (batch, height, width, channels). Received: shape={x.shape}")
        rng = np.random.default_rng(self.seed)
        x_best = self._initial(rng, x, eps)
        loss = _margin(predict(model, x_best), y, self.targeted)
        used = np.ones(len(x), dtype=np.int64)
        height, width = x.shape[1:3]
        for iteration in range(1, self.queries):
            active = np.flatnonzero(loss >= 0)  # a tie is not a success: argmax may still be the true class
            if active.size == 0:
                break
            side = int(round(np.sqrt(_square_fraction(self.p_init, iteration, self.queries) * height * width)))
            candidate = self._propose(rng, x[active], x_best[active], eps, side)
            candidate_loss = _margin(predict(model, candidate), y[active], self.targeted)
            used[active] += 1
            better = candidate_loss < loss[active]
            loss[active[better]] = candidate_loss[better]
            x_best[active[better]] = candidate[better]
        return x_best, used

    def _initial(self, rng, x, eps):
        """Vertical stripes of +-eps (L-inf) or a tiling of ring patterns scaled to the eps sphere (L2)."""
        n, height, width, channels = x.shape
        if self.norm == "linf":
            delta = eps * rng.choice([-1.0, 1.0], size=(n, 1, width, channels))
        else:
            delta = np.zeros(x.shape)
            side = max(min(height, width) // 5, 2)
            for top in range(0, height - side + 1, side):
                for left in range(0, width - side + 1, side):
                    signs = rng.choice([-1.0, 1.0], size=(n, 1, 1, channels))
                    delta[:, top:top + side, left:left + side, :] += _l2_window(side, rng)[None, :, :, None] * signs
            delta *= per_example(eps / per_example_norm(delta, "l2"), delta)
        return np.clip(x + delta, *self.input_range).astype("float32")

    def _propose(self, rng, x, x_best, eps, side):
        """A candidate per example: one new square (L-inf), or mass moved from one window into another (L2)."""
        low, high = self.input_range
        n, height, width, channels = x.shape
        delta = (x_best - x).astype("float64")
        if self.norm == "linf":
            side = min(max(side, 1), height - 1, width - 1)
            top, left = rng.integers(0, height - side + 1), rng.integers(0, width - side + 1)
            window = (slice(None), slice(top, top + side), slice(left, left + side))
            current = x_best[window]
            pending = np.arange(n)
            for _ in range(self._REDRAWS):  # new signs where the window would not change (a wasted query)
                delta[(pending, *window[1:])] = eps * rng.choice([-1.0, 1.0], size=(len(pending), 1, 1, channels))
                proposal = np.clip(x[window] + delta[window], low, high).astype("float32")
                unchanged = np.all(np.abs(proposal - current).reshape(n, -1) < 1e-7, axis=1)
                pending = np.flatnonzero(unchanged)
                if pending.size == 0:
                    break
            return np.clip(x + delta, low, high).astype("float32")
        side = min(max(side, 3) | 1, height - 1, width - 1)  # odd, at least 3
        (top, left), (top2, left2) = [(rng.integers(0, height - side + 1), rng.integers(0, width - side + 1))
                                      for _ in range(2)]
        window, window2 = (slice(top, top + side), slice(left, left + side)), (slice(top2, top2 + side),
                                                                               slice(left2, left2 + side))
        both = np.zeros((1, height, width, 1))
        both[(0, *window, 0)] = both[(0, *window2, 0)] = 1.0
        total = per_example(per_example_norm(delta, "l2"), delta)
        in_windows = _norm_over_window(delta * both)
        old = delta[:, window[0], window[1], :]
        new = _l2_window(side, rng)[None, :, :, None] * rng.choice([-1.0, 1.0], size=(n, 1, 1, channels))
        new = new + old / (_norm_over_window(old) + 1e-10)
        # The windows get the mass they held plus whatever the eps budget has left.
        budget = np.sqrt(np.maximum(eps ** 2 - total ** 2, 0.0) / channels + in_windows ** 2)
        delta[:, window2[0], window2[1], :] = 0.0
        delta[:, window[0], window[1], :] = new / _norm_over_window(new) * budget
        norms = per_example(per_example_norm(delta, "l2"), delta)
        return np.clip(x + delta * eps / np.maximum(norms, 1e-12), low, high).astype("float32")

    def get_config(self):
        return {**super().get_config(), "queries": self.queries, "p_init": self.p_init}


@functools.lru_cache(maxsize=8)
def _dct_matrix(size):
    """Orthonormal DCT-II basis: row k is the k-th cosine of length `size`."""
    k, i = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    basis = np.cos(np.pi * (2 * i + 1) * k / (2 * size)) * np.sqrt(2.0 / size)
    basis[0] /= np.sqrt(2.0)
    return basis


class SimBA(Attack):
    """SimBA (Guo et al. 2019): steps of -step / +step along randomly ordered
    orthonormal directions, each kept when it lowers the probability of the
    true class (raises the target's); an example stops once it is
    misclassified (reaches the target).

    Directions are single pixels (`basis="pixel"`, SimBA) or 2-D DCT basis
    images, lowest frequencies first (`basis="dct"`, SimBA-DCT, L2 only).
    Under L-inf each pixel moves at most once by eps, so the attack never
    leaves the ball; under L2 the directions are orthogonal, so the
    perturbation's norm is `step_size * sqrt(steps kept)` and steps stop
    before it would exceed eps (clipping to the input range only shrinks it).

    Args:
        eps: radius or list of radii.
        norm: "linf" or "l2".
        basis: "pixel" or "dct"; default "pixel" for L-inf, "dct" for L2.
        step_size: L2 only: size of a step (default eps / 10).
        queries: query budget per example (including the first).
        targeted: `y` are target labels.
        input_range: valid (low, high) of the inputs.
        seed: seed of the direction order.
    """

    norms = ("linf", "l2")
    black_box = True

    def __init__(self, eps=8 / 255, *, norm="linf", basis=None, step_size=None, queries=1000, targeted=False,
                 input_range=(0.0, 1.0), seed=0):
        super().__init__(eps, norm=norm, targeted=targeted, input_range=input_range, seed=seed)
        if self.norm == "linf":
            if step_size is not None:
                raise ValueError(f"Under L-inf SimBA steps by eps; step_size applies to L2 only. "
                                 f"Received: step_size={step_size!r}")
            if basis not in (None, "pixel"):
                raise ValueError(f"Under L-inf SimBA needs basis='pixel' to stay in the eps box. Received: basis={basis!r}")
        self.basis = check_choice("basis", basis or ("pixel" if self.norm == "linf" else "dct"), ("pixel", "dct"))
        self.step_size = None if step_size is None else check_number("step_size", step_size, low=0, low_open=True)
        self.queries = check_number("queries", queries, low=1, integer=True)

    def _probability(self, model, x, y):
        """Probability of class `y`, negated when targeted (SimBA lowers it), and the predicted labels."""
        outputs = predict(model, x)
        if outputs.ndim != 2:
            raise ValueError(f"SimBA needs logits of shape (batch, classes). Received: shape={outputs.shape}")
        p = tf.nn.softmax(tf.constant(outputs, tf.float32)).numpy()[np.arange(len(x)), y]
        return (-p if self.targeted else p), labels_of(outputs)

    def _order(self, rng, shape, n):
        """Per example, the order in which directions are tried (indices into the flattened input)."""
        size = int(np.prod(shape))
        if self.basis == "pixel":
            return np.argsort(rng.random((n, size)), axis=1)
        # DCT: by frequency ring max(u, v), random within a ring (and across channels).
        rows, cols = np.unravel_index(np.arange(size), shape)[:2]
        ring = np.maximum(rows, cols)
        return np.lexsort((rng.random((n, size)), np.broadcast_to(ring, (n, size))), axis=1)

    def _directions(self, index, shape):
        """Unit directions for flat indices `index`: one-hot pixels or DCT basis images."""
        size = int(np.prod(shape))
        if self.basis == "pixel":
            directions = np.zeros((len(index), size))
            directions[np.arange(len(index)), index] = 1.0
            return directions
        u, v, c = np.unravel_index(index, shape)
        images = np.einsum("nh,nw->nhw", _dct_matrix(shape[0])[u], _dct_matrix(shape[1])[v])
        out = np.zeros((len(index),) + tuple(shape))
        out[np.arange(len(index)), :, :, c] = images
        return out.reshape(len(index), size)

    def _attack(self, model, x, y, eps):
        if self.basis == "dct" and x.ndim != 4:
            raise ValueError(f"basis='dct' needs images of shape (batch, height, width, channels). "
                             f"Received: shape={x.shape}")
        rng = np.random.default_rng(self.seed)
        low, high = self.input_range
        n, shape = len(x), x.shape[1:]
        size = x[0].size
        step = eps if self.norm == "linf" else (self.step_size or eps / 10)
        max_steps = size if self.norm == "linf" else int(np.floor((eps / step) ** 2 + 1e-9))
        order = self._order(rng, shape, n)
        x_best = x.reshape(n, -1).astype("float64")
        score, predicted = self._probability(model, x, y)
        done = self.reached(predicted, y)
        used = np.ones(n, dtype=np.int64)
        kept_steps = np.zeros(n, dtype=np.int64)
        for i in range(size):
            active = np.flatnonzero(~done & (used < self.queries) & (kept_steps < max_steps))
            if active.size == 0:
                break
            direction = self._directions(order[active, i], shape)
            for sign in (-1.0, 1.0):
                candidate = np.clip(x_best[active] + sign * step * direction, low, high)
                new_score, labels = self._probability(model, candidate.reshape((-1,) + shape).astype("float32"),
                                                      y[active])
                used[active] += 1
                better = new_score < score[active]
                kept = active[better]
                x_best[kept], score[kept] = candidate[better], new_score[better]
                kept_steps[kept] += 1
                done[kept] = self.reached(labels, y[active])[better]
                # Directions the first sign did not improve try the other sign, within budget.
                keep = ~better & (used[active] < self.queries)
                active, direction = active[keep], direction[keep]
                if active.size == 0:
                    break
        return x_best.reshape(x.shape).astype("float32"), used

    def get_config(self):
        return {**super().get_config(), "basis": self.basis, "step_size": self.step_size, "queries": self.queries}


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

