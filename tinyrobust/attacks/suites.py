"""Named evaluation suites, run as a cascade (AutoAttack, Croce and Hein 2020).

A `Cascade` runs its stages in order, each only on the examples every
earlier stage left correctly classified, and reports per stage which examples
are still robust. `suite("autoattack", ...)` builds the standard one: APGD on
the cross-entropy, targeted APGD on the DLR loss over the top wrong classes,
and Square with AutoAttack's initial square size and query budget.
"""

import numpy as np

from tinyrobust.attacks.base import Attack, AttackResult, labels_of, predict
from tinyrobust.attacks.blackbox import Square
from tinyrobust.attacks.gradient import APGD, APGDTargeted
from tinyrobust.validation import check_choice, check_number

__all__ = ["Cascade", "SUITES", "suite"]

# name: (APGD-CE steps, APGD-T steps, APGD-T target classes, Square queries)
_SETTINGS = {"autoattack": (100, 100, 9, 5000), "autoattack-fast": (50, 50, 3, 1000)}
SUITES = tuple(_SETTINGS)


class Cascade(Attack):
    """Attacks run in order, each only on the examples still robust after the earlier ones.

    Untargeted. At each eps an example is robust if it is correctly
    classified on clean input and no stage found an adversarial for it.

    Args:
        stages: `{name: attack}`, run in this order; every attack shares the
            cascade's norm and input range.
        eps: radius or list of radii (the stages' own radii are ignored).
    """

    def __init__(self, stages, eps=None):
        if not isinstance(stages, dict) or not stages or not all(isinstance(a, Attack) for a in stages.values()):
            raise ValueError(f"Expected `stages` to be a non-empty dict of tinyrobust attacks. Received: stages={stages!r}")
        first = next(iter(stages.values()))
        for name, attack in stages.items():
            if attack.targeted or attack.norm != first.norm or attack.input_range != first.input_range:
                raise ValueError(f"Every stage of a cascade must be untargeted, with one norm and input range. "
                                 f"Received: stages[{name!r}]={attack!r}")
        super().__init__(first.epsilons if eps is None else eps, norm=first.norm, input_range=first.input_range,
                         seed=first.seed)
        self.stages = dict(stages)

    def run(self, model, x, y=None):
        """Attacks a batch at every epsilon; the result's `stages` holds who is still robust after each stage."""
        x, y = self._inputs(model, x, y)
        clean = labels_of(predict(model, x)) == y
        advs, successes, stages = [], [], {name: [] for name in self.stages}
        for eps in self.epsilons:
            x_adv, robust = x.copy(), clean.copy()
            for name, attack in self.stages.items():
                index = np.flatnonzero(robust)
                if index.size and eps > 0:
                    result = attack.at(eps).run(model, x[index], y[index])
                    broken = result.success[0]
                    x_adv[index[broken]] = result.x_adv[0][broken]
                    robust[index[broken]] = False
                stages[name].append(robust.copy())
            advs.append(x_adv)
            successes.append(self.is_success(model, x_adv, y))
        return AttackResult(self.epsilons, advs, successes, None, stages)

    def get_config(self):
        return {**super().get_config(), "stages": {name: {"type": type(a).__name__, **a.get_config()}
                                                   for name, a in self.stages.items()}}


def suite(name, epsilons, *, norm="linf", input_range=(0.0, 1.0), num_classes=10, seed=0, steps=None,
          target_classes=None, queries=None):
    """A named evaluation suite as a `Cascade`.

    - "autoattack": APGD-CE (100 steps), APGD-T (targeted DLR, 100 steps, the
      9 highest-scoring wrong classes) and Square (5,000 queries, p_init 0.8),
      the standard AutoAttack suite without FAB-T.
    - "autoattack-fast": the same stages with 50 steps, 3 target classes and
      1,000 Square queries, for quick profiles.

    Args:
        name: "autoattack" or "autoattack-fast".
        epsilons: radius or list of radii.
        norm: "linf" or "l2".
        input_range: valid (low, high) of the inputs.
        num_classes: classes of the model (bounds the target classes).
        seed: seed of the random starts and squares.
        steps, target_classes, queries: override the APGD steps (both
            stages), the APGD-T target classes and the Square queries (e.g. a
            tiny suite for smoke tests).

    Returns:
        A `Cascade` with stages "apgd-ce", "apgd-t" and "square".
    """
    check_choice("name", name, SUITES)
    check_number("num_classes", num_classes, low=2, integer=True)
    ce_steps, t_steps, targets, square_queries = _SETTINGS[name]
    if steps is not None:
        ce_steps = t_steps = check_number("steps", steps, low=1, integer=True)
    if target_classes is not None:
        targets = check_number("target_classes", target_classes, low=1, integer=True)
    if queries is not None:
        square_queries = check_number("queries", queries, low=1, integer=True)
    common = {"norm": norm, "input_range": input_range, "seed": seed}
    return Cascade({
        "apgd-ce": APGD(epsilons, loss="ce", steps=ce_steps, **common),
        "apgd-t": APGDTargeted(epsilons, steps=t_steps, target_classes=min(targets, num_classes - 1), **common),
        "square": Square(epsilons, queries=square_queries, p_init=0.8, **common),
    })
