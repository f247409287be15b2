"""Builds layers of one quantization preset, layer by layer."""

import keras

from tinyrobust import layers, quantizers


class LayerBuilder:
    """Makes the layers of a model for one quantization preset.

    Float builds plain Keras layers; every other preset builds tinyrobust's
    quantized layers, each with fresh quantizers. The first and last layers
    ("edge" layers) take the preset's `edge_kernel` quantizer.

    Args:
        quantization: a preset name (see `tinyrobust.quantizers.PRESETS`) or a
            `tinyrobust.quantizers.Preset`.
    """

    def __init__(self, quantization):
        self.preset = quantizers.preset(quantization)

    def conv(self, filters, kernel_size, name, edge=False, **kwargs):
        if self.preset.is_float:
            return keras.layers.Conv2D(filters, kernel_size, name=name, **kwargs)
        return layers.QConv2D(filters, kernel_size, name=name, kernel_quantizer=self.preset.kernel_quantizer(edge),
                              bias_quantizer=self.preset.bias_quantizer(), **kwargs)

    def depthwise(self, kernel_size, name, edge=False, **kwargs):
        if self.preset.is_float:
            return keras.layers.DepthwiseConv2D(kernel_size, name=name, **kwargs)
        return layers.QDepthwiseConv2D(kernel_size, name=name,
                                       depthwise_quantizer=self.preset.kernel_quantizer(edge),
                                       bias_quantizer=self.preset.bias_quantizer(), **kwargs)

    def dense(self, units, name, edge=False, **kwargs):
        if self.preset.is_float:
            return keras.layers.Dense(units, name=name, **kwargs)
        return layers.QDense(units, name=name, kernel_quantizer=self.preset.kernel_quantizer(edge),
                             bias_quantizer=self.preset.bias_quantizer(), **kwargs)

    def relu(self, name):
        quantizer = self.preset.activation_quantizer()
        if quantizer is None:
            return keras.layers.ReLU(name=name)
        return layers.QActivation(quantizer, name=name)
