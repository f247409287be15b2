"""Adversarial attacks and honest robustness evaluation.

Every attack is a configured object called as `attack(model, x, y=None)`
(adversarial inputs, one batch per eps) or `attack.run(model, x, y)` (an
`AttackResult` with success per eps and queries used). `suite("autoattack",
eps)` is the standard evaluation, run as a cascade. `kernels` holds the
traceable building blocks.
"""

from tinyrobust.attacks import kernels
from tinyrobust.attacks.base import Attack, AttackResult
from tinyrobust.attacks.blackbox import SimBA, Square, Transfer
from tinyrobust.attacks.decision import Boundary, HopSkipJump
from tinyrobust.attacks.evaluation import (
    EOT,
    CheckReport,
    RobustnessReport,
    check_model,
    robust_accuracy,
)
from tinyrobust.attacks.gradient import APGD, FGSM, MIM, PGD, APGDTargeted, CarliniWagnerL2, DeepFool
from tinyrobust.attacks.suites import SUITES, Cascade, suite
from tinyrobust.attacks.threat import ThreatModel

__all__ = [
    "APGD", "APGDTargeted", "Attack", "AttackResult", "Boundary", "Cascade", "CarliniWagnerL2", "CheckReport", "DeepFool", "EOT", "FGSM",
    "HopSkipJump", "MIM", "PGD", "RobustnessReport", "SimBA", "Square", "Transfer", "check_model", "kernels",
    "SUITES", "ThreatModel", "robust_accuracy", "suite",
]
