"""Model zoo. Every model outputs logits and names its layers.

`get(name, **kwargs)` builds a model by name (used by experiment files).
"""

from tinyrobust.models._builder import LayerBuilder
from tinyrobust.models.dscnn import dscnn
from tinyrobust.models.mobilenet_v2 import mobilenet_v2
from tinyrobust.models.resnet8 import resnet8
from tinyrobust.models.small_cnn import small_cnn
from tinyrobust.models.wide_resnet import wide_resnet

BUILDERS = {
    "dscnn": dscnn,
    "mobilenet_v2": mobilenet_v2,
    "resnet8": resnet8,
    "small_cnn": small_cnn,
    "wide_resnet": wide_resnet,
}


def get(name, **kwargs):
    """Builds the model called `name` with keyword arguments `kwargs`.

    Raises:
        ValueError: unknown model name.
    """
    if name not in BUILDERS:
        raise ValueError(f"Unknown model. Expected one of {sorted(BUILDERS)}. Received: name={name!r}")
    return BUILDERS[name](**kwargs)


__all__ = ["BUILDERS", "LayerBuilder", "dscnn", "get", "mobilenet_v2", "resnet8", "small_cnn", "wide_resnet"]


def inputs_of(model):
    """The inputs to build a new functional model over `model`'s graph with: its input tensor when it has one
    (so the new model is called with a tensor, as `model` is), else the list."""
    return model.inputs[0] if len(model.inputs) == 1 else model.inputs
