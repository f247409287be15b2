"""tinyrobust: tiny, deeply quantized and adversarially robust Keras models.

Importing the package imports TensorFlow/Keras and defines classes (so a saved
tinyrobust model loads with `keras.saving.load_model`); it does no other work.
The `tinyrobust` command line is the exception: its process imports the parts
a command needs when it runs, so `tinyrobust --help` starts without
TensorFlow.
"""

import importlib
import os
import sys

__version__ = "0.1.0"

_SUBMODULES = ("attacks", "callbacks", "data", "distill", "distribute", "export", "jacobian", "layers", "models",
               "multiexit", "quantizers", "training")
_NAMES = {"summary": "tinyrobust.footprint", "JacobianRegularizer": "tinyrobust.jacobian",
          "AdversarialTraining": "tinyrobust.training", "RobustModel": "tinyrobust.training"}

__all__ = ["AdversarialTraining", "JacobianRegularizer", "RobustModel", *_SUBMODULES, "summary"]


def __getattr__(name):
    if name in _SUBMODULES:
        return importlib.import_module(f"tinyrobust.{name}")
    if name in _NAMES:
        return getattr(importlib.import_module(_NAMES[name]), name)
    raise AttributeError(f"module 'tinyrobust' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *__all__])


def _is_the_command_line():
    """True in the process of the `tinyrobust` console script (its argv[0] is the script)."""
    return os.path.basename(sys.argv[0] if sys.argv else "") == "tinyrobust"


def _import_all():
    """Imports every part, so every class is registered with Keras (saved tinyrobust models load)."""
    for name in _SUBMODULES:
        importlib.import_module(f"tinyrobust.{name}")


if not _is_the_command_line():
    _import_all()
    from tinyrobust.footprint import summary  # noqa: E402
    from tinyrobust.jacobian import JacobianRegularizer  # noqa: E402
    from tinyrobust.training import AdversarialTraining, RobustModel  # noqa: E402
