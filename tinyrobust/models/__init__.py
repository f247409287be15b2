"""Model zoo. Every model outputs logits and names its layers."""

from tinyrobust.models._builder import LayerBuilder
from tinyrobust.models.small_cnn import small_cnn

__all__ = ["LayerBuilder", "small_cnn"]
