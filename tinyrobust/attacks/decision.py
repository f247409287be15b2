"""Decision-based attacks: they only need the model's predicted label, so they
run against label-only callables and TFLite interpreters as well as logits.

Both are minimum-norm searches: they start from a misclassified point and walk
it towards the clean input along the decision boundary. Untargeted only.
"""

import numpy as np

from tinyrobust.attacks.base import (
    MinimumNormAttack,
    labels_of,
    per_example,
    per_example_norm,
    predict,
)
from tinyrobust.validation import check_number

__all__ = ["Boundary", "HopSkipJump"]


class _Oracle:
    """Counts queries per example and answers "is this input misclassified?"."""

    def __init__(self, model, y):
        self.model, self.y = model, y
        self.queries = np.zeros(len(y), dtype=np.int64)

    def __call__(self, x, index):
        """Misclassified flags of inputs `x` belonging to examples `index` (which may repeat)."""
        np.add.at(self.queries, index, 1)
        return labels_of(predict(self.model, x.astype("float32"))) != self.y[index]


def _blend(x, x_adv, alpha, norm, input_range):
    """Points between `x` (alpha=0) and `x_adv` (alpha=1): linear for L2, a shrinking box for L-inf."""
    if norm == "l2":
        return x + per_example(alpha, x) * (x_adv - x)
    radius = per_example(alpha * per_example_norm(x_adv - x, "linf"), x)
    return np.clip(np.clip(x_adv, x - radius, x + radius), *input_range)


def _binary_search(oracle, index, x, x_adv, norm, input_range, steps):
    """Moves each misclassified `x_adv` to the decision boundary between it and `x`."""
    low, high = np.zeros(len(x)), np.ones(len(x))
    for _ in range(steps):
        mid = (low + high) / 2
        adversarial = oracle(_blend(x, x_adv, mid, norm, input_range), index)
        high, low = np.where(adversarial, mid, high), np.where(adversarial, low, mid)
    return _blend(x, x_adv, high, norm, input_range)


def _starting_points(oracle, x, rng, input_range, tries, norm, search_steps, budget):
    """A misclassified point per example, from uniform noise, moved to the boundary.

    Returns:
        `(x_adv, found)`: where no noise within `tries` (and the query
        `budget`, which must leave room for the binary search) was
        misclassified, the clean input and False.
    """
    start, found = x.copy(), np.zeros(len(x), bool)
    for _ in range(tries):
        todo = np.flatnonzero(~found & (oracle.queries + 1 + search_steps <= budget))
        if todo.size == 0:
            break
        noise = rng.uniform(*input_range, size=x[todo].shape)
        adversarial = oracle(noise, todo)
        start[todo[adversarial]], found[todo[adversarial]] = noise[adversarial], True
    index = np.flatnonzero(found)
    if index.size:
        start[index] = _binary_search(oracle, index, x[index], start[index], norm, input_range, search_steps)
    return start, found


_MAX_SEARCH_STEPS = 25  # binary-search queries to locate the decision boundary


class _DecisionAttack(MinimumNormAttack):
    """Shared configuration of decision-based attacks."""

    black_box = True

    def __init__(self, eps, *, norm, queries, init_tries, input_range, seed):
        super().__init__(eps, norm=norm, targeted=False, input_range=input_range, seed=seed)
        self.queries = check_number("queries", queries, low=1, integer=True)
        self.init_tries = check_number("init_tries", init_tries, low=1, integer=True)

    def _start(self, model, x, y):
        rng = np.random.default_rng(self.seed)
        oracle = _Oracle(model, y)
        # Examples already misclassified need no search.
        wrong = oracle(x, np.arange(len(x)))
        start, found = _starting_points(oracle, x, rng, self.input_range, self.init_tries, self.norm,
                                        self._search_steps(x), self.queries)
        start[wrong], found[wrong] = x[wrong], True
        return rng, oracle, start, found, wrong

    def _search_steps(self, x):  # boundary located to ~1e-3 / sqrt(d)
        return min(int(np.ceil(np.log2(np.sqrt(x[0].size) * 1e3))), _MAX_SEARCH_STEPS)

    def get_config(self):
        config = super().get_config()
        del config["targeted"]
        return {**config, "queries": self.queries, "init_tries": self.init_tries}


class HopSkipJump(_DecisionAttack):
    """HopSkipJump (Chen, Jordan and Wainwright 2020), untargeted.

    From a misclassified starting point on the decision boundary, each
    iteration estimates the boundary's normal from the signs of `evals`
    random probes, jumps along it with a geometrically shrinking step, and
    binary-searches back to the boundary towards the clean input.

    Args:
        eps: radius or list of radii at which success is reported.
        norm: "l2" or "linf".
        queries: query budget per example; an example stops once its next
            iteration would exceed it, or once its perturbation is within the
            smallest positive eps.
        init_evals: probes in the first gradient estimate (grows as sqrt(t)).
        max_evals: cap on the probes per estimate.
        gamma: sets the binary-search tolerance and probe radius.
        init_tries: uniform-noise draws to find a starting point.
        input_range: valid (low, high) of the inputs.
        seed: seed of the noise and probes.
    """

    def __init__(self, eps=0.5, *, norm="l2", queries=1000, init_evals=100, max_evals=1000, gamma=1.0,
                 init_tries=100, input_range=(0.0, 1.0), seed=0):
        super().__init__(eps, norm=norm, queries=queries, init_tries=init_tries, input_range=input_range, seed=seed)
        self.init_evals = check_number("init_evals", init_evals, low=1, integer=True)
        self.max_evals = check_number("max_evals", max_evals, low=self.init_evals, integer=True)
        self.gamma = check_number("gamma", gamma, low=0, low_open=True)
        if self.queries < self.min_queries:
            raise ValueError(
                f"HopSkipJump needs at least {self.min_queries} queries per example to run one iteration (a start "
                f"point: 2 + up to {_MAX_SEARCH_STEPS} binary-search queries; an iteration: init_evals="
                f"{self.init_evals} probes, up to 10 step-size and {_MAX_SEARCH_STEPS} binary-search queries); a "
                f"smaller budget measures nothing. Raise `queries` or lower `init_evals`. Received: queries={queries}")

    @property
    def min_queries(self):
        """Queries per example that always allow one iteration: the start point plus one iteration at most."""
        return 2 + _MAX_SEARCH_STEPS + self.init_evals + 10 + _MAX_SEARCH_STEPS

    def minimum_norm(self, model, x, y, goal):
        rng, oracle, x_adv, found, wrong = self._start(model, x, y)
        size = x[0].size
        theta = self.gamma / (size ** 1.5 if self.norm == "l2" else size ** 2)
        search_steps = max(self._search_steps(x), int(np.ceil(np.log2(1.0 / theta))))
        search_steps = min(search_steps, _MAX_SEARCH_STEPS)
        distance = per_example_norm(x_adv - x, self.norm)
        span = self.input_range[1] - self.input_range[0]
        for t in range(1, self.queries + 1):
            evals = int(min(self.init_evals * np.sqrt(t), self.max_evals))
            # An iteration costs the probes, the step search (<= 10) and the binary search.
            cost = evals + 10 + search_steps
            active = np.flatnonzero(found & ~wrong & (distance > goal) & (oracle.queries + cost <= self.queries))
            if active.size == 0:
                break
            xa, boundary = x[active], x_adv[active]
            if t == 1:
                radius = 0.1 * span * np.ones(active.size)
            else:
                radius = (np.sqrt(size) if self.norm == "l2" else size) * theta * distance[active]
            direction = self._estimate_normal(oracle, active, boundary, radius, evals, rng)
            if self.norm == "linf":
                direction = np.sign(direction)
            step = per_example_norm(boundary - xa, self.norm) / np.sqrt(t)
            moved = boundary.copy()
            pending = np.arange(active.size)
            for _ in range(10):  # geometric step search: halve until still misclassified
                candidate = np.clip(boundary[pending] + per_example(step[pending], boundary) * direction[pending],
                                    *self.input_range)
                adversarial = oracle(candidate, active[pending])
                moved[pending[adversarial]] = candidate[adversarial]
                pending = pending[~adversarial]
                step[pending] /= 2
                if pending.size == 0:
                    break
            new = _binary_search(oracle, active, xa, moved, self.norm, self.input_range, search_steps)
            new_distance = per_example_norm(new - xa, self.norm)
            better = new_distance < distance[active]
            x_adv[active[better]], distance[active[better]] = new[better], new_distance[better]
        return x_adv, oracle.queries

    def _estimate_normal(self, oracle, index, boundary, radius, evals, rng):
        """Monte Carlo estimate of the boundary's outward normal at each point (unit L2)."""
        n, shape = len(index), boundary.shape[1:]
        if self.norm == "l2":
            probes = rng.normal(size=(n, evals) + shape)
        else:
            probes = rng.uniform(-1, 1, size=(n, evals) + shape)
        per_probe = (n, evals) + (1,) * len(shape)
        probes /= np.sqrt(np.sum(probes.reshape(n, evals, -1) ** 2, axis=2)).reshape(per_probe)
        radius = radius.reshape((n, 1) + (1,) * len(shape))
        points = np.clip(boundary[:, None] + radius * probes, *self.input_range)
        probes = (points - boundary[:, None]) / radius
        signs = oracle(points.reshape((-1,) + shape), np.repeat(index, evals)).reshape(n, evals) * 2.0 - 1.0
        mean = signs.mean(axis=1, keepdims=True)
        # Baseline the signs unless all probes agree (then their mean direction is used as is).
        centred = np.where(np.abs(mean) == 1.0, signs, signs - mean)
        normal = np.mean(centred.reshape(per_probe) * probes, axis=1)
        return normal / per_example(np.maximum(per_example_norm(normal, "l2"), 1e-12), normal)

    def get_config(self):
        return {**super().get_config(), "init_evals": self.init_evals, "max_evals": self.max_evals,
                "gamma": self.gamma}


class Boundary(_DecisionAttack):
    """Boundary Attack (Brendel, Rauber and Bethge 2018), L2, untargeted.

    A random walk along the decision boundary: each step takes an orthogonal
    move on the sphere around the clean input, then a step towards it, and is
    kept when the result is still misclassified (two queries per step). The
    step sizes adapt to the recent success rates.

    Args:
        eps: L2 radius or list of radii at which success is reported.
        queries: query budget per example.
        spherical_step: initial orthogonal step, relative to the distance.
        source_step: initial step towards the clean input, relative to the distance.
        step_adaptation: factor by which steps grow or shrink.
        init_tries: uniform-noise draws to find a starting point.
        input_range: valid (low, high) of the inputs.
        seed: seed of the noise and the walk.
    """

    norms = ("l2",)
    window = 10

    def __init__(self, eps=0.5, *, queries=1000, spherical_step=0.01, source_step=0.01, step_adaptation=1.5,
                 init_tries=100, input_range=(0.0, 1.0), seed=0):
        super().__init__(eps, norm="l2", queries=queries, init_tries=init_tries, input_range=input_range, seed=seed)
        self.spherical_step = check_number("spherical_step", spherical_step, low=0, low_open=True)
        self.source_step = check_number("source_step", source_step, low=0, high=1, low_open=True, high_open=True)
        self.step_adaptation = check_number("step_adaptation", step_adaptation, low=1, low_open=True)

    def minimum_norm(self, model, x, y, goal):
        rng, oracle, x_adv, found, wrong = self._start(model, x, y)
        n = len(x)
        spherical = np.full(n, self.spherical_step)
        source = np.full(n, self.source_step)
        spherical_hits, source_hits, tried = np.zeros(n), np.zeros(n), np.zeros(n)
        distance = per_example_norm(x_adv - x, "l2")
        while True:
            active = np.flatnonzero(found & ~wrong & (distance > goal) & (oracle.queries + 2 <= self.queries))
            if active.size == 0:
                break
            xa, current, d = x[active], x_adv[active], distance[active]
            towards = (xa - current) / per_example(np.maximum(d, 1e-12), xa)
            noise = rng.normal(size=xa.shape)
            noise -= per_example(np.sum((noise * towards).reshape(len(xa), -1), axis=1), xa) * towards  # orthogonal
            noise *= per_example(spherical[active] * d / np.maximum(per_example_norm(noise, "l2"), 1e-12), xa)
            on_sphere = xa + (current + noise - xa) * per_example(d / np.maximum(per_example_norm(current + noise - xa, "l2"),
                                                                              1e-12), xa)
            on_sphere = np.clip(on_sphere, *self.input_range)
            candidate = np.clip(xa + (on_sphere - xa) * per_example(1.0 - source[active], xa), *self.input_range)
            sphere_ok = oracle(on_sphere, active)
            candidate_ok = oracle(candidate, active)
            new_distance = per_example_norm(candidate - xa, "l2")
            better = candidate_ok & (new_distance < d)
            x_adv[active[better]], distance[active[better]] = candidate[better], new_distance[better]
            spherical_hits[active] += sphere_ok
            source_hits[active] += candidate_ok
            tried[active] += 1
            self._adapt(active[tried[active] >= self.window], spherical, source, spherical_hits, source_hits, tried)
        return x_adv, oracle.queries

    def _adapt(self, index, spherical, source, spherical_hits, source_hits, tried):
        """Every `window` steps: grow a step whose success rate is high, shrink it when low."""
        if index.size == 0:
            return
        factor = self.step_adaptation
        sphere_rate = spherical_hits[index] / tried[index]
        spherical[index] *= np.where(sphere_rate > 0.5, factor, np.where(sphere_rate < 0.2, 1 / factor, 1.0))
        source_rate = source_hits[index] / tried[index]
        source[index] = np.minimum(
            source[index] * np.where(source_rate > 0.5, factor, np.where(source_rate < 0.2, 1 / factor, 1.0)), 0.5)
        spherical_hits[index] = source_hits[index] = tried[index] = 0

    def get_config(self):
        config = super().get_config()
        del config["norm"]
        return {**config, "spherical_step": self.spherical_step, "source_step": self.source_step,
                "step_adaptation": self.step_adaptation}
