"""Model zoo. Every model outputs logits and names its layers."""

from tinyrobust.models._builder import LayerBuilder
from tinyrobust.models.resnet8 import resnet8
from tinyrobust.models.small_cnn import small_cnn

__all__ = ["LayerBuilder", "resnet8", "small_cnn"]
