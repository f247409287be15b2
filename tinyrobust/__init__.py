"""tinyrobust: tiny, deeply quantized and adversarially robust Keras models.

Importing the package imports TensorFlow/Keras and defines classes; it does no
other work.
"""

from tinyrobust import (
    attacks,
    callbacks,
    data,
    distill,
    distribute,
    export,
    jacobian,
    layers,
    models,
    multiexit,
    quantizers,
    training,
)
from tinyrobust.footprint import summary
from tinyrobust.jacobian import JacobianRegularizer
from tinyrobust.training import AdversarialTraining, RobustModel

__version__ = "0.1.0"

__all__ = [
    "AdversarialTraining",
    "JacobianRegularizer",
    "RobustModel",
    "attacks",
    "callbacks",
    "data",
    "distill",
    "distribute",
    "export",
    "jacobian",
    "layers",
    "models",
    "multiexit",
    "quantizers",
    "summary",
    "training",
]
