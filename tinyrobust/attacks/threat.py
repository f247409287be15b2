"""The threat model shared by evaluation attacks and training adversaries."""

import keras

from tinyrobust.attacks import kernels
from tinyrobust.validation import check_choice, check_number, check_range

__all__ = ["ThreatModel", "check_epsilon"]


def check_epsilon(epsilon, norm, input_range, name="epsilon"):
    """A radius checked against its threat model: finite, at least 0 and, for L-inf, at most the width of the
    input range (a larger ball holds every input: the attack is then unbounded, which is a typo, e.g. 8 for
    8/255)."""
    low, high = input_range
    check_number(name, epsilon, low=0)
    if norm == "linf" and epsilon > high - low:
        raise ValueError(f"Expected `{name}` to be at most the width of the input range {tuple(input_range)}, "
                         f"{high - low:g}: a larger L-inf ball holds every input (8 for 8/255?). "
                         f"Received: {name}={epsilon!r}")
    return epsilon


@keras.saving.register_keras_serializable(package="tinyrobust")
class ThreatModel:
    """Perturbations of at most `epsilon` in `norm` that keep inputs in `input_range`.

    Every attack (`tinyrobust.attacks`) and every training adversary
    (`tinyrobust.AdversarialTraining`) starts, steps and projects through one of
    these, i.e. through the kernels `random_start`, `ascent_step` and
    `project_into`.

    Args:
        norm: "linf" or "l2".
        epsilon: radius, in input units.
        input_range: valid `(low, high)` of the inputs.
    """

    def __init__(self, norm="linf", epsilon=8 / 255, input_range=(0.0, 1.0)):
        self.norm = check_choice("norm", norm, kernels.NORMS)
        self.input_range = check_range(input_range)
        self.epsilon = float(check_epsilon(epsilon, self.norm, self.input_range))

    def _eps(self, epsilon):
        return self.epsilon if epsilon is None else epsilon

    def random_start(self, x, seed, epsilon=None):
        """A uniform random perturbation of the ball per example (see `kernels.random_start` for `seed`)."""
        return kernels.random_start(x, self._eps(epsilon), self.norm, seed=seed)

    def project(self, x, delta, epsilon=None):
        """`x + delta` brought into the threat model."""
        return kernels.project_into(x, delta, self._eps(epsilon), self.norm, self.input_range)

    def step(self, x, x_adv, gradient, step_size, epsilon=None):
        """One projected steepest-ascent step from `x_adv`."""
        return kernels.ascent_step(x, x_adv, gradient, step_size, self._eps(epsilon), self.norm, self.input_range)

    def pgd(self, loss_fn, x, step_size, steps, start=None, epsilon=None, momentum=None):
        """Projected gradient ascent on `loss_fn` (see `kernels.pgd`); `epsilon` overrides the radius (a tensor
        when scheduled)."""
        return kernels.pgd(loss_fn, x, self._eps(epsilon), step_size, steps, self.norm, start, self.input_range,
                           momentum)

    def get_config(self):
        return {"norm": self.norm, "epsilon": self.epsilon, "input_range": list(self.input_range)}

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def __repr__(self):
        return f"ThreatModel(norm={self.norm!r}, epsilon={self.epsilon:.4g}, input_range={self.input_range})"
