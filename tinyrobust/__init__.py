"""tinyrobust: tiny, deeply quantized and adversarially robust Keras models.

Importing the package imports TensorFlow/Keras and defines classes; it does no
other work.
"""

from tinyrobust import data, layers, models, quantizers
from tinyrobust.footprint import summary

__version__ = "0.1.0"

__all__ = ["data", "layers", "models", "quantizers", "summary"]
